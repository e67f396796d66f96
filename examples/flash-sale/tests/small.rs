//! The demo's code path at a tenth of the size, in CI: both phases (the second with kill -9
//! twice) against the `weir` binary cargo built for this workspace, every total verified; and
//! the sale produced through Kafka by confluent-kafka, with the same effects.

use std::path::PathBuf;

/// `target/<profile>/weir`, next to this test's own `deps/` directory.
fn weir_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>/deps/<test>");
    let weir = profile_dir.join("weir");
    assert!(
        weir.exists(),
        "{} is missing: run the tests with `cargo xtask test` (cargo test --workspace builds it)",
        weir.display()
    );
    weir
}

fn wasm_dir() -> PathBuf {
    std::env::var("WEIR_PLUGIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/wasm32-wasip2/plugin")
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_flash_sale_verifies_and_survives_kill_9() {
    let (first, second) = flash_sale::demo(&flash_sale::DemoOptions {
        weir: weir_binary(),
        wasm_dir: wasm_dir(),
        sale: flash_sale::Sale::small(),
        verbose: false,
    })
    .await
    .unwrap();
    assert_eq!(first.orders, 200);
    assert!(first.refused > 0 && first.accepted > first.orders);
    assert!(first.paid > 0 && first.envelopes == first.paid);
    assert_eq!(first, second);
}

/// The venv python `cargo xtask kafka-clients` installs confluent-kafka into.
fn kafka_python() -> PathBuf {
    let python = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../target/kafka-clients/venv/bin/python");
    assert!(
        python.exists(),
        "confluent-kafka is not installed at {}: run `cargo xtask kafka-clients` (cargo xtask test does it first)",
        python.display()
    );
    python
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_flash_sale_produced_through_kafka_has_the_same_effects() {
    let (grpc, kafka) = flash_sale::demo_kafka(
        &flash_sale::DemoOptions {
            weir: weir_binary(),
            wasm_dir: wasm_dir(),
            sale: flash_sale::Sale::small(),
            verbose: false,
        },
        &kafka_python(),
    )
    .await
    .unwrap();
    assert_eq!(kafka.orders, 200);
    // The repeats admission refused on gRPC reached the log and the order plugin instead:
    // rejected, or skipped by id (a retry's same request id).
    assert!(kafka.rejected > grpc.rejected && kafka.deduplicated > 0);
    assert_eq!(
        (
            grpc.buyers,
            grpc.paid,
            grpc.points,
            grpc.envelopes,
            grpc.analytics
        ),
        (
            kafka.buyers,
            kafka.paid,
            kafka.points,
            kafka.envelopes,
            kafka.analytics
        )
    );
}
