//! The demo's code path at a tenth of the size, in CI: both phases (the second with kill -9
//! twice) against the `weir` binary cargo built for this workspace, every total verified.

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
