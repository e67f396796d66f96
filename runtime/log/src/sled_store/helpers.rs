//! Long-lived threads that fdatasync segments in parallel during a sync round.
//!
//! A round that finds several partitions' segments dirty syncs them at once (on ext4 one
//! journal commit, or one device flush each in parallel, serves them). Spawning a thread per
//! segment per round cost a `clone3`, a stack `mmap`, its `munmap` and the scheduler's work
//! for each — over a thousand threads created and destroyed per 300,000 plugin records with
//! four output partitions, measured with `strace -c`. These threads are started the first
//! time a round needs them, at most [`MAX_HELPERS`], and wait for work between rounds.

use parking_lot::{Condvar, Mutex};
use std::collections::VecDeque;
use std::sync::Arc;

use crate::LogError;

/// Helper threads at most; the syncing thread itself runs one job too.
pub(super) const MAX_HELPERS: usize = 8;

type Outcome = std::thread::Result<Result<(), LogError>>;

/// A queued job and where its outcome goes.
struct Job {
    run: Box<dyn FnOnce() -> Result<(), LogError> + Send>,
    done: std::sync::mpsc::Sender<Outcome>,
}

impl Job {
    fn run(self) -> (Outcome, std::sync::mpsc::Sender<Outcome>) {
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(self.run));
        (outcome, self.done)
    }
}

#[derive(Default)]
struct Queue {
    jobs: VecDeque<Job>,
    threads: usize,
    idle: usize,
    stop: bool,
}

#[derive(Default)]
struct Shared {
    queue: Mutex<Queue>,
    wake: Condvar,
}

/// The helper threads; dropping it lets them end once the queue is empty.
#[derive(Default)]
pub(super) struct SyncHelpers {
    shared: Arc<Shared>,
}

impl SyncHelpers {
    /// Runs every job, the first on this thread and the rest on helpers (at most
    /// [`MAX_HELPERS`] at once; more jobs queue), and returns the first error after all of them
    /// finished. A job's panic is resumed here as soon as it is heard of; the jobs still running
    /// finish on their helpers.
    pub(super) fn run_all<F>(&self, mut jobs: Vec<F>) -> Result<(), LogError>
    where
        F: FnOnce() -> Result<(), LogError> + Send + 'static,
    {
        if jobs.is_empty() {
            return Ok(());
        }
        let first = jobs.remove(0);
        let (done, results) = std::sync::mpsc::channel::<Outcome>();
        let handed = jobs.len();
        {
            let mut q = self.shared.queue.lock();
            for job in jobs {
                q.jobs.push_back(Job {
                    run: Box::new(job),
                    done: done.clone(),
                });
            }
            let wanted = q.jobs.len().saturating_sub(q.idle);
            let room = MAX_HELPERS.saturating_sub(q.threads);
            for _ in 0..wanted.min(room) {
                if self.spawn() {
                    q.threads += 1;
                    q.idle += 1;
                }
            }
            if q.threads == 0 {
                // No helper could be started: this thread runs everything.
                let queued: Vec<Job> = q.jobs.drain(..).collect();
                drop(q);
                for job in queued {
                    let (outcome, done) = job.run();
                    let _ = done.send(outcome);
                }
            } else {
                // One waiting helper per job (not all of them for one).
                for _ in 0..handed {
                    self.shared.wake.notify_one();
                }
            }
        }
        drop(done);
        let mut result = first();
        for _ in 0..handed {
            match results.recv() {
                Ok(Ok(r)) => result = result.and(r),
                Ok(Err(panic)) => std::panic::resume_unwind(panic),
                Err(_) => unreachable!("every queued job sends its outcome"),
            }
        }
        result
    }

    /// Starts one helper; `false` if the thread could not be created.
    fn spawn(&self) -> bool {
        let shared = self.shared.clone();
        std::thread::Builder::new()
            .name("weir-seg-sync".into())
            .spawn(move || work(&shared))
            .is_ok()
    }
}

impl Drop for SyncHelpers {
    fn drop(&mut self) {
        self.shared.queue.lock().stop = true;
        self.shared.wake.notify_all();
    }
}

fn work(shared: &Shared) {
    let _allowed = weir_core::blocking::allow();
    let mut q = shared.queue.lock();
    loop {
        if let Some(job) = q.jobs.pop_front() {
            q.idle -= 1;
            drop(q);
            let (outcome, done) = job.run();
            q = shared.queue.lock();
            // Idle again before the caller hears of it: its next round counts this thread.
            q.idle += 1;
            let _ = done.send(outcome);
        } else if q.stop {
            q.threads -= 1;
            q.idle -= 1;
            return;
        } else {
            shared.wake.wait(&mut q);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn every_job_runs_errors_come_back_and_threads_are_reused() {
        let helpers = SyncHelpers::default();
        let ran = Arc::new(AtomicUsize::new(0));
        for round in 0..50 {
            let jobs: Vec<_> = (0..5)
                .map(|i| {
                    let ran = ran.clone();
                    move || {
                        ran.fetch_add(1, Ordering::SeqCst);
                        if round == 7 && i == 3 {
                            Err(LogError::Malformed {
                                what: "job".into(),
                                reason: "told to fail".into(),
                            })
                        } else {
                            Ok(())
                        }
                    }
                })
                .collect();
            let r = helpers.run_all(jobs);
            assert_eq!(r.is_err(), round == 7, "round {round}: {r:?}");
        }
        assert_eq!(ran.load(Ordering::SeqCst), 250);
        let threads = helpers.shared.queue.lock().threads;
        assert!(
            (1..=4).contains(&threads),
            "{threads} helpers for 4 jobs a round"
        );
    }

    #[test]
    fn a_panicking_job_panics_the_caller_and_the_helpers_carry_on() {
        let helpers = SyncHelpers::default();
        let jobs: Vec<Box<dyn FnOnce() -> Result<(), LogError> + Send>> =
            vec![Box::new(|| Ok(())), Box::new(|| panic!("boom"))];
        let caught =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| helpers.run_all(jobs)));
        assert!(caught.is_err());
        let jobs: Vec<Box<dyn FnOnce() -> Result<(), LogError> + Send>> =
            vec![Box::new(|| Ok(())), Box::new(|| Ok(()))];
        assert!(helpers.run_all(jobs).is_ok());
    }
}
