//! `weir plugin …` and `weir state get`.

use clap::Subcommand;

use weir_api::{Client, Deploy, PluginStatus};

/// Plugin operations.
#[derive(Subcommand, Debug)]
pub enum PluginCommand {
    /// Deploy a WebAssembly consumer.
    Deploy(DeployArgs),
    /// Replace a plugin's code, keeping its state and offsets.
    Upgrade {
        /// Plugin name.
        name: String,
        /// The new component.
        #[arg(long)]
        wasm: std::path::PathBuf,
    },
    /// List plugins with their partitions.
    List,
    /// Stop processing (state and offsets kept).
    Pause {
        /// Plugin name.
        name: String,
    },
    /// Continue processing.
    Resume {
        /// Plugin name.
        name: String,
    },
    /// Remove a plugin with its state and offsets.
    Remove {
        /// Plugin name.
        name: String,
    },
    /// Print a plugin's log (its stdout/stderr and log lines, retries, failures).
    Logs {
        /// Plugin name.
        name: String,
    },
    /// Generate a plugin project that builds and passes its test as generated.
    New {
        /// Project and plugin name.
        name: String,
        /// The plugin's language.
        #[arg(long, value_enum, default_value = "rust")]
        lang: super::scaffold::Lang,
        /// Directory to create it in.
        #[arg(long, default_value = ".")]
        path: std::path::PathBuf,
        /// Rust only: depend on the weir-sdk of a weir checkout (its sdk/ directory) instead of
        /// the copy this weir writes into the project's vendor/.
        #[arg(long)]
        sdk: Option<std::path::PathBuf>,
    },
    /// Build a plugin project into a component and print its path (installs the pinned
    /// build tool first: the wasm32-wasip2 target, componentize-py or componentize-qjs).
    Build {
        /// The project's directory (Rust: Cargo.toml, JavaScript: package.json, Python: app.py).
        #[arg(default_value = ".")]
        path: std::path::PathBuf,
    },
}

/// State queries.
#[derive(Subcommand, Debug)]
pub enum StateCommand {
    /// Print a plugin's committed state value for a key.
    Get {
        /// Plugin name.
        plugin: String,
        /// State key (e.g. balance/user-42).
        key: String,
        /// `PARTITION:OFFSET` of your own input record (as `weir publish` acknowledged it):
        /// prints `pending` until the plugin has processed it.
        #[arg(long, value_parser = parse_position)]
        after: Option<(u32, u64)>,
    },
}

fn parse_position(s: &str) -> Result<(u32, u64), String> {
    let (p, o) = s
        .split_once(':')
        .ok_or_else(|| format!("{s:?}: expected PARTITION:OFFSET, e.g. 3:1041"))?;
    Ok((
        p.parse().map_err(|_| format!("{p:?} is not a partition"))?,
        o.parse().map_err(|_| format!("{o:?} is not an offset"))?,
    ))
}

pub(super) fn parse_kv(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("{s:?} is not key=value"))
}

fn read_wasm(path: &std::path::Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))
}

fn print_plugin(p: &PluginStatus) {
    let status = if p.paused { "paused" } else { "deployed" };
    println!(
        "{} v{} ({status}) {} -> [{}] on-error={} memory={}MiB timeout={}ms commit={} records/{}ms sha256={}",
        p.name,
        p.version,
        p.input,
        p.outputs.join(", "),
        p.on_error,
        p.memory_mb,
        p.timeout_ms,
        p.commit_records,
        p.commit_interval_ms,
        &p.wasm_sha256[..12.min(p.wasm_sha256.len())]
    );
    if !p.node.is_empty() {
        println!("  runs on node {}", p.node);
    }
    println!(
        "  {:>9} {:>12} {:>10} {:>8} {:>6}  STATE",
        "PARTITION", "COMMITTED", "PROCESSED", "SKIPPED", "DLQ"
    );
    for q in &p.partitions {
        let outputs = if q.forwarding.is_empty() {
            String::new()
        } else {
            format!("; outputs {}", q.forwarding)
        };
        println!(
            "  {:>9} {:>12} {:>10} {:>8} {:>6}  {}{outputs}",
            q.partition, q.committed, q.processed, q.skipped, q.dead_lettered, q.state
        );
    }
}

/// `weir plugin deploy`.
#[derive(clap::Args, Debug)]
pub struct DeployArgs {
    /// Plugin name.
    pub name: String,
    /// The component (built for wasm32-wasip2).
    #[arg(long)]
    pub wasm: std::path::PathBuf,
    /// Input topic.
    #[arg(long)]
    pub input: String,
    /// Topic the plugin may emit to (repeatable).
    #[arg(long)]
    pub output: Vec<String>,
    /// `key=value` passed to the plugin's configure (repeatable).
    #[arg(long, value_parser = parse_kv)]
    pub config: Vec<(String, String)>,
    /// Start at the oldest record or only new ones.
    #[arg(long, default_value = "earliest", value_parser = ["earliest", "latest"])]
    pub from: String,
    /// Memory cap per instance, MiB.
    #[arg(long, default_value_t = 64)]
    pub memory_mb: u32,
    /// CPU bound per batch, ms [default: 5000, or the server's --max-plugin-timeout-ms when
    /// that is lower].
    #[arg(long)]
    pub timeout_ms: Option<u32>,
    /// After retries: stop the partition (halt) or dead-letter the record (dlq).
    #[arg(long, default_value = "halt", value_parser = ["halt", "dlq"])]
    pub on_error: String,
    /// Message ids remembered to skip redeliveries.
    #[arg(long, default_value_t = 1_000_000)]
    pub dedup_ids: u64,
    /// How long message ids are remembered, ms (by record time).
    #[arg(long, default_value_t = 24 * 3600 * 1000)]
    pub dedup_age_ms: u64,
    /// Alert when more than this many records wait (all partitions; 0 = never).
    #[arg(long, default_value_t = 0)]
    pub alert_lag: u64,
    /// Alert when the oldest waiting record is older than this, ms (0 = never).
    #[arg(long, default_value_t = 0)]
    pub alert_delay_ms: u64,
    /// Most input records per second over all partitions: the pace the system behind the
    /// plugin takes (0 = as fast as it goes).
    #[arg(long, default_value_t = 0)]
    pub max_rate: u64,
    /// Most records one commit covers while the input has a backlog: the plugin is called
    /// 500 records at a time and their effects are committed together (Kafka Streams'
    /// commit.interval.ms). With --max-rate each call is its own commit [default: 5000].
    #[arg(long)]
    pub commit_records: Option<u32>,
    /// Longest the calls one commit covers run, ms: after that the commit is written and
    /// the next records wait for the next one [default: 100].
    #[arg(long)]
    pub commit_interval_ms: Option<u32>,
}

impl DeployArgs {
    fn into_deploy(self, wasm: Vec<u8>) -> Deploy {
        Deploy {
            name: self.name,
            wasm,
            input: self.input,
            outputs: self.output,
            config: self.config,
            from: self.from,
            memory_mb: self.memory_mb,
            // 0: the server's default, which it lowers to its own ceiling.
            timeout_ms: self.timeout_ms.unwrap_or(0),
            on_error: self.on_error,
            dedup_ids: self.dedup_ids,
            dedup_age_ms: self.dedup_age_ms,
            alert_lag: self.alert_lag,
            alert_delay_ms: self.alert_delay_ms,
            max_rate: self.max_rate,
            // 0: the server's defaults.
            commit_records: self.commit_records.unwrap_or(0),
            commit_interval_ms: self.commit_interval_ms.unwrap_or(0),
        }
    }
}

pub(super) async fn run(client: &Client, cmd: PluginCommand) -> anyhow::Result<()> {
    match cmd {
        PluginCommand::Deploy(args) => {
            let wasm = read_wasm(&args.wasm)?;
            let p = client.deploy_plugin(args.into_deploy(wasm)).await?;
            println!("deployed plugin {} v{}", p.name, p.version);
            print_plugin(&p);
        }
        PluginCommand::Upgrade { name, wasm } => {
            let p = client.upgrade_plugin(&name, read_wasm(&wasm)?).await?;
            println!("upgraded plugin {} to v{}", p.name, p.version);
        }
        PluginCommand::List => {
            for p in client.list_plugins().await? {
                print_plugin(&p);
            }
        }
        PluginCommand::Pause { name } => {
            client.pause_plugin(&name, true).await?;
            println!("paused plugin {name}");
        }
        PluginCommand::Resume { name } => {
            client.pause_plugin(&name, false).await?;
            println!("resumed plugin {name}");
        }
        PluginCommand::Remove { name } => {
            client.remove_plugin(&name).await?;
            println!("removed plugin {name}");
        }
        PluginCommand::New { .. } | PluginCommand::Build { .. } => {
            unreachable!("handled without a server")
        }
        PluginCommand::Logs { name } => {
            for line in client.plugin_logs(&name).await? {
                println!("{line}");
            }
        }
    }
    Ok(())
}

/// `plugin new` and `plugin build` need no server; `None` for the other commands.
pub(super) fn local_command(cmd: &PluginCommand) -> Option<anyhow::Result<()>> {
    match cmd {
        PluginCommand::New {
            name,
            lang,
            path,
            sdk,
        } => Some(
            super::scaffold::new_plugin(name, path, *lang, sdk.clone()).map(|root| {
                println!("created plugin project {}", root.display());
                println!("next: {}", super::scaffold::next_steps(*lang, &root));
            }),
        ),
        PluginCommand::Build { path } => Some(super::scaffold::build_plugin(path).map(|wasm| {
            let size = std::fs::metadata(&wasm).map(|m| m.len()).unwrap_or(0);
            println!("{} ({size} bytes)", wasm.display());
            println!("{}", super::scaffold::after_build(path, &wasm));
        })),
        _ => None,
    }
}

pub(super) async fn state(client: &Client, cmd: StateCommand) -> anyhow::Result<()> {
    let StateCommand::Get { plugin, key, after } = cmd;
    if let Some((partition, offset)) = after {
        use weir_api::StateAnswer;
        match client
            .get_state_after(&plugin, key.as_bytes(), partition, offset)
            .await?
        {
            StateAnswer::Pending => println!(
                "pending: {plugin} has not processed partition {partition} offset {offset} yet"
            ),
            StateAnswer::Value(value, version) => {
                println!("{} (version {version})", String::from_utf8_lossy(&value))
            }
            StateAnswer::Absent => {
                anyhow::bail!(
                    "plugin {plugin} processed the record and has no state for key {key:?}"
                )
            }
        }
        return Ok(());
    }
    match client.get_state(&plugin, key.as_bytes()).await? {
        Some((value, version)) => {
            println!("{} (version {version})", String::from_utf8_lossy(&value))
        }
        None => anyhow::bail!("plugin {plugin} has no state for key {key:?}"),
    }
    Ok(())
}
