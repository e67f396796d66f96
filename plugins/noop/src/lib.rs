//! Does nothing with each record: measures what the host itself costs per record (fetch, dedup,
//! the WASM call, the atomic commit) in `weir bench plugin`.

use weir_sdk::{consumer, Context, Record, Result};

/// Ignores the record.
#[consumer]
pub fn ignore(_record: &Record, _ctx: &mut Context) -> Result<()> {
    Ok(())
}
