//! The `weir` binary: parses the command line, sets up logging and Ctrl-C/SIGTERM handling,
//! and hands over to [`weir::cli::run`].

use std::process::ExitCode;

/// mimalloc keeps freed memory for reuse: with glibc's allocator the server spent ~10% of its
/// time faulting in pages for request buffers it had just returned to the OS (see BENCHMARKS.md).
#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::Parser;
use tokio_util::sync::CancellationToken;

fn main() -> ExitCode {
    let cli = weir::cli::Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("WEIR_LOG").unwrap_or_else(|_| {
                // The server narrates its life; client commands print only what went wrong.
                let serving = matches!(cli.command, weir::cli::Command::Serve(_));
                (if serving { "info" } else { "warn" }).into()
            }),
        )
        .with_writer(std::io::stderr)
        .init();
    // Servers only (a discard server is measured against `weir serve`, so it runs as one).
    if matches!(
        cli.command,
        weir::cli::Command::Serve(_)
            | weir::cli::Command::Bench(weir::cli::BenchCommand::DiscardServer(_))
    ) {
        no_transparent_huge_pages();
    }
    if matches!(cli.command, weir::cli::Command::Serve(_)) {
        raise_open_file_limit();
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        let shutdown = CancellationToken::new();
        tokio::spawn(cancel_on_signal(shutdown.clone()));
        weir::cli::run(cli, shutdown).await
    });
    // Everything that must finish has (the server synced its store before returning).
    // Dropping the runtime would wait for every blocking task still running — a read of a
    // shared log whose servers are gone waits out its request time-out, partition after
    // partition — so a stopped server would not exit.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", describe(&e));
            ExitCode::FAILURE
        }
    }
}

/// Cancels `shutdown` on the first SIGINT or SIGTERM.
async fn cancel_on_signal(shutdown: CancellationToken) {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => return,
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    tracing::info!(message = "Shutting down.");
    shutdown.cancel();
}

/// Turns transparent huge pages off for the server's process (and what it starts). mimalloc
/// asks for them on its arenas (`madvise(MADV_HUGEPAGE)`, honoured on kernels set to `madvise`
/// or `always`): each first touch of a fresh 2 MiB region then zeroes a whole huge page, which
/// was about 23% of a busy server's CPU time (BENCHMARKS.md, "Transparent huge pages"). A
/// kernel that refuses leaves them as they were.
fn no_transparent_huge_pages() {
    #[cfg(target_os = "linux")]
    {
        let off: libc::c_ulong = 1;
        let zero: libc::c_ulong = 0;
        // SAFETY: PR_SET_THP_DISABLE takes integer arguments and touches no memory of ours.
        if unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, off, zero, zero, zero) } != 0 {
            tracing::debug!(message = "Could not turn transparent huge pages off.", error = %std::io::Error::last_os_error());
        }
    }
}

/// Raises the soft limit on open files to the hard one, as Kafka's and Redpanda's guides ask
/// of their brokers: each partition being written keeps its newest segment file open, beside
/// the clients' sockets, and the usual soft limit of 1,024 would end a server with many
/// partitions (`EMFILE`). A limit that cannot be raised stays as it was.
fn raise_open_file_limit() {
    #[cfg(unix)]
    {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit and setrlimit read and write the one struct passed, which lives
        // on this stack frame for both calls.
        unsafe {
            if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0
                && limit.rlim_cur < limit.rlim_max
            {
                let previous = limit.rlim_cur;
                limit.rlim_cur = limit.rlim_max;
                if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                    tracing::debug!(message = "Could not raise the open-file limit.", from = previous, error = %std::io::Error::last_os_error());
                }
            }
        }
    }
}

/// An error and its causes joined by ": ", leaving out a cause the message before it already
/// ends with as its own clause (errors that print their source, `#[error("plugins: {0}")]`, would
/// otherwise say everything twice).
fn describe(e: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in e.chain() {
        let words = cause.to_string();
        if text.is_empty() {
            text = words;
        } else if text != words && !text.ends_with(&format!(": {words}")) {
            text.push_str(": ");
            text.push_str(&words);
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::describe;

    #[test]
    fn a_cause_the_message_already_ends_with_is_said_once() {
        let said_twice =
            anyhow::Error::from(std::io::Error::other("disk full")).context("plugins: disk full");
        assert_eq!(describe(&said_twice), "plugins: disk full");
        let chained =
            anyhow::Error::from(std::io::Error::other("disk full")).context("cannot write");
        assert_eq!(describe(&chained), "cannot write: disk full");
        let mid_word =
            anyhow::Error::from(std::io::Error::other("used")).context("connection refused");
        assert_eq!(describe(&mid_word), "connection refused: used");
    }
}
