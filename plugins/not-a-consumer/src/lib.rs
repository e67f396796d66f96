//! A component built for wasm32-wasip2 that forgot `#[weir_sdk::consumer]`: it exports nothing
//! of the plugin world, so a deploy must be refused with a message naming what is missing.

/// Not exported to the host: there is no `#[consumer]`.
pub fn forgot_the_attribute(x: u32) -> u32 {
    x + 1
}
