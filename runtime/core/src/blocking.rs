//! The one way blocking work (store reads and writes, file syncs, WebAssembly calls) leaves the
//! async workers: [`run`] moves a closure to tokio's blocking pool and marks the thread while
//! it runs. Stores call [`check`] on entry: in debug builds (every test run) a store call made
//! on an async worker panics with the operation's name, so a missed call site fails the tests
//! instead of stalling every connection of the server behind one disk access.

use std::cell::Cell;

thread_local! {
    static BLOCKING_ALLOWED: Cell<bool> = const { Cell::new(false) };
}

/// A blocking task panicked; the panic message, for logs and errors.
#[derive(Clone, Debug, thiserror::Error)]
#[error("a storage task panicked: {0}")]
pub struct Panicked(pub String);

/// Runs `f` on tokio's blocking pool, with store calls allowed.
///
/// # Errors
/// [`Panicked`] when `f` panicked (nothing it held stays locked: weir's locks do not poison).
pub async fn run<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, Panicked> {
    tokio::task::spawn_blocking(move || {
        let _allowed = allow();
        f()
    })
    .await
    .map_err(|e| {
        Panicked(match e.try_into_panic() {
            Ok(payload) => panic_message(payload.as_ref()),
            Err(e) => e.to_string(),
        })
    })
}

/// Marks the current thread as one that may block until the guard drops: dedicated threads
/// (the syncer) and synchronous start-up code outside any runtime.
pub fn allow() -> AllowGuard {
    let previous = BLOCKING_ALLOWED.with(|b| b.replace(true));
    AllowGuard { previous }
}

/// Restores the thread's previous marking when dropped.
pub struct AllowGuard {
    previous: bool,
}

impl Drop for AllowGuard {
    fn drop(&mut self) {
        BLOCKING_ALLOWED.with(|b| b.set(self.previous));
    }
}

/// Called by stores before blocking: panics in debug builds when the caller is an async
/// worker (inside a tokio runtime, not under [`run`] or [`allow`]). Code outside any runtime
/// (unit tests, tools) may block freely.
#[inline]
pub fn check(operation: &str) {
    if cfg!(debug_assertions)
        && !BLOCKING_ALLOWED.with(Cell::get)
        && tokio::runtime::Handle::try_current().is_ok()
    {
        panic!(
            "blocking store operation `{operation}` on an async worker: route it through \
             weir_core::blocking::run"
        );
    }
}

/// The text of a panic payload.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn store_calls_are_allowed_only_off_the_async_workers() {
        assert!(run(|| check("get")).await.is_ok());
        let on_worker = std::panic::catch_unwind(|| check("get"));
        assert_eq!(cfg!(debug_assertions), on_worker.is_err());
        let panicked = run(|| panic!("disk on fire")).await.unwrap_err();
        assert!(panicked.0.contains("disk on fire"), "{panicked}");
    }
}
