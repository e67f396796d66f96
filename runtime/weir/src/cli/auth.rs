//! `weir auth token`: mints a bearer token and prints the hash the auth file stores.

use clap::Subcommand;

/// `weir auth` subcommands.
#[derive(Subcommand, Debug, Clone)]
pub enum AuthCommand {
    /// Mint a new random token. The token is shown once; the server keeps only its hash.
    Token {
        /// Principal the token is for (only used to print a ready auth-file entry).
        #[arg(long, default_value = "my-team")]
        principal: String,
        /// Print only the token and its hash, tab-separated (for scripts).
        #[arg(long)]
        quiet: bool,
    },
    /// Print the hash of an existing token (to add it to an auth file).
    Hash {
        /// The token.
        token: String,
    },
}

pub(super) fn run(cmd: AuthCommand) -> anyhow::Result<()> {
    match cmd {
        AuthCommand::Token { principal, quiet } => {
            let (token, hash) = weir_server::auth::mint_token();
            if quiet {
                println!("{token}\t{hash}");
            } else {
                println!("token:  {token}");
                println!("sha256: {hash}");
                println!();
                println!("Give the token to {principal:?} (WEIR_TOKEN=... or --token); it is not stored anywhere.");
                println!("Add the hash to the server's auth file:");
                println!();
                println!("[[principal]]");
                println!("name = {principal:?}");
                println!("tokens = [\"{hash}\"]");
                println!("grants = [");
                println!(
                    "  {{ allow = [\"publish\", \"subscribe\"], topics = [\"{principal}.*\"] }},"
                );
                println!("]");
            }
        }
        AuthCommand::Hash { token } => println!("{}", weir_server::auth::token_hash(&token)),
    }
    Ok(())
}
