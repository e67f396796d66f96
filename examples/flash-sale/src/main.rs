//! `flash-sale demo`: the README's flash sale against a `weir serve` it starts itself (see the
//! library docs). `cargo xtask demo [--cluster|--kafka]` builds everything and runs it.

use std::path::PathBuf;

use clap::Parser;

/// The flash sale, verified, then again across kill -9.
#[derive(Parser)]
#[command(name = "flash-sale", about)]
enum Command {
    /// Run both phases and print the verified totals.
    Demo {
        /// The `weir` binary.
        #[arg(long, default_value = "target/release/weir")]
        weir: PathBuf,
        /// Directory of the plugin `.wasm` files.
        #[arg(long, default_value = "target/wasm32-wasip2/plugin")]
        wasm_dir: PathBuf,
        /// The CI-sized sale (a tenth of the load).
        #[arg(long)]
        small: bool,
        /// Run the second phase on three weir nodes over the JetStream cluster at these
        /// URLs (`cargo xtask demo --cluster` starts one) instead of kill -9 on one node.
        #[arg(long)]
        cluster: Option<String>,
        /// Run the second phase through Kafka: the requests and payments produced by
        /// confluent-kafka under this Python (`cargo xtask demo --kafka` installs it).
        #[arg(long, value_name = "PYTHON", conflicts_with = "cluster")]
        kafka: Option<PathBuf>,
    },
    /// Measure how fast the order plugin drains the accepted burst, unthrottled, on P
    /// partitions (docs/flash-sale.md's sizing numbers).
    DrainBench {
        /// The `weir` binary.
        #[arg(long, default_value = "target/release/weir")]
        weir: PathBuf,
        /// Directory of the plugin `.wasm` files.
        #[arg(long, default_value = "target/wasm32-wasip2/plugin")]
        wasm_dir: PathBuf,
        /// Partition counts to measure.
        #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
        partitions: Vec<u32>,
    },
    /// Measure the failover of the points plugin between two weir nodes over the JetStream
    /// cluster at `--cluster` (kill -9 of the node running it → first commit on the other).
    FailoverBench {
        /// The `weir` binary.
        #[arg(long, default_value = "target/release/weir")]
        weir: PathBuf,
        /// Directory of the plugin `.wasm` files.
        #[arg(long, default_value = "target/wasm32-wasip2/plugin")]
        wasm_dir: PathBuf,
        /// NATS URLs of the JetStream cluster.
        #[arg(long)]
        cluster: String,
        /// Paid orders in the backlog.
        #[arg(long, default_value_t = 200_000)]
        records: u64,
        /// Runs (each on fresh names).
        #[arg(long, default_value_t = 3)]
        runs: u32,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let (weir, wasm_dir, small, cluster, kafka) = match Command::parse() {
        Command::Demo {
            weir,
            wasm_dir,
            small,
            cluster,
            kafka,
        } => (weir, wasm_dir, small, cluster, kafka),
        Command::FailoverBench {
            weir,
            wasm_dir,
            cluster,
            records,
            runs,
        } => {
            let mut took = Vec::new();
            for run in 1..=runs {
                let prefix = format!("failover{}-{run}", std::process::id());
                let t = flash_sale::cluster::failover_bench(
                    &weir, &wasm_dir, &cluster, &prefix, records,
                )
                .await?;
                println!("failover run {run}: kill -9 of the node running points → first commit on the other node: {:.2} s ({records} orders, every one credited once)", t.as_secs_f64());
                took.push(t.as_secs_f64());
            }
            took.sort_by(f64::total_cmp);
            println!(
                "failover: median {:.2} s of {runs} runs",
                took[took.len() / 2]
            );
            return Ok(());
        }
        Command::DrainBench {
            weir,
            wasm_dir,
            partitions,
        } => {
            println!("partitions  requests  drain s  requests/s   (order plugin, unthrottled, fsync always)");
            for p in partitions {
                let (n, secs) = flash_sale::drain_bench(&weir, &wasm_dir, p).await?;
                println!("{p:>10}  {n:>8}  {secs:>7.2}  {:>10.0}", n as f64 / secs);
            }
            return Ok(());
        }
    };
    anyhow::ensure!(
        weir.exists(),
        "{} not found: build it first (cargo xtask demo does)",
        weir.display()
    );
    let sale = if small {
        flash_sale::Sale::small()
    } else {
        flash_sale::Sale::demo()
    };
    let opts = flash_sale::DemoOptions {
        weir,
        wasm_dir,
        sale,
        verbose: true,
    };
    match (cluster, kafka) {
        (Some(nats), _) => {
            let prefix = format!("demo{}", std::process::id());
            flash_sale::demo_cluster(&opts, &nats, &prefix).await?;
        }
        (None, Some(python)) => {
            flash_sale::demo_kafka(&opts, &python).await?;
        }
        (None, None) => {
            flash_sale::demo(&opts).await?;
        }
    }
    Ok(())
}
