//! `#[weir_sdk::consumer]`: turns a plain function into a weir plugin's exports.

use proc_macro::TokenStream;
use quote::quote;
use syn::{parse_macro_input, ItemFn};

/// Marks the function called for each record: `fn(&Record, &mut Context) -> Result<()>`.
///
/// On `wasm32` it exports the plugin world (`configure`, `process`) calling it per record of each
/// batch; on other targets the function stays a plain function for native unit tests.
#[proc_macro_attribute]
pub fn consumer(attr: TokenStream, item: TokenStream) -> TokenStream {
    if !attr.is_empty() {
        return syn::Error::new(
            proc_macro2::Span::call_site(),
            "#[consumer] takes no arguments",
        )
        .to_compile_error()
        .into();
    }
    let function = parse_macro_input!(item as ItemFn);
    let name = &function.sig.ident;
    if function.sig.inputs.len() != 2 {
        return syn::Error::new_spanned(
            &function.sig,
            "a consumer is `fn(record: &Record, ctx: &mut Context) -> weir_sdk::Result<()>`",
        )
        .to_compile_error()
        .into();
    }
    quote! {
        #function

        #[cfg(target_arch = "wasm32")]
        const _: () = {
            struct WeirPlugin;
            impl ::weir_sdk::bindings::Guest for WeirPlugin {
                fn configure(config: ::std::vec::Vec<(::std::string::String, ::std::string::String)>) -> ::core::result::Result<(), ::std::string::String> {
                    ::weir_sdk::__private::configure(config)
                }
                fn process(batch: ::std::vec::Vec<u8>) -> ::core::result::Result<::std::vec::Vec<u8>, ::std::string::String> {
                    ::weir_sdk::__private::process(&batch, #name)
                }
            }
            ::weir_sdk::bindings::export!(WeirPlugin with_types_in ::weir_sdk::bindings);
        };
    }
    .into()
}
