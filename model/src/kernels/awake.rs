//! Keeping the pool's other workers awake through one forward pass.
//!
//! A decode step of a small model is dozens of parallel regions of a few microseconds each,
//! separated by serial work (norms, one query's attention, routing). Rayon parks a worker that
//! has found no work for a few dozen polls, and waking it again (a futex call and a context
//! switch, slower still in a VM) takes longer than the work it is woken for. Measured on the
//! tiny model, batch-1 decode on 2 threads: ~30 context switches per token, and the attention
//! projections ran no faster on 2 threads than on 1.
//!
//! So, for the duration of a pass, the other workers run a polling job instead of parking: they
//! take any job the pass spawns at once, and yield the CPU to the OS between polls, so other
//! threads (gRPC I/O, other processes) still get it. This is what OpenMP runtimes do with their
//! spin-wait time before sleeping (e.g. `KMP_BLOCKTIME`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// A poller with nothing to do for this long leaves. That bounds the CPU it burns while the pass
/// waits on something else (a remote expert call), and the delay it adds to a job it might have
/// been started inside (a worker that was already busy when it picked the poller up).
const IDLE_LIMIT: Duration = Duration::from_micros(500);

/// Runs `f` on the calling thread while the other workers of the current pool poll for the jobs
/// it spawns. Off a pool, or on a one-thread pool, this is just `f()`.
///
/// Pollers also run jobs queued on the pool from outside, and `f`'s caller gets its result only
/// once every poller has finished the job in hand: a pool meant for forward passes should not
/// also carry long unrelated jobs (the engine runs one pass at a time on its pool; expert
/// workers in the same process get their own pool).
pub fn with_awake_pool<R>(f: impl FnOnce() -> R) -> R {
    let Some(caller) = rayon::current_thread_index() else {
        return f();
    };
    let pollers = rayon::current_num_threads() - 1;
    if pollers == 0 {
        return f();
    }
    let done = AtomicBool::new(false);
    rayon::in_place_scope(|scope| {
        for _ in 0..pollers {
            scope.spawn(|_| poll_until(&done, caller));
        }
        // Set on the way out, also when `f` panics: the scope waits for every poller.
        struct Finished<'a>(&'a AtomicBool);
        impl Drop for Finished<'_> {
            fn drop(&mut self) {
                self.0.store(true, Ordering::Release);
            }
        }
        let _finished = Finished(&done);
        f()
    })
}

/// Executes the pool's pending jobs until `done`, or until idle for `IDLE_LIMIT`.
fn poll_until(done: &AtomicBool, caller: usize) {
    // A poller the caller's own thread picks up (while `f` waits for a job, or after `f`) would
    // hold that thread until `done`: return at once.
    if rayon::current_thread_index() == Some(caller) {
        return;
    }
    let mut idle_since = Instant::now();
    while !done.load(Ordering::Acquire) {
        match rayon::yield_now() {
            Some(rayon::Yield::Executed) => idle_since = Instant::now(),
            _ if idle_since.elapsed() > IDLE_LIMIT => return,
            _ => std::thread::yield_now(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rayon::prelude::*;
    use std::collections::HashSet;
    use std::sync::Mutex;

    fn pool(threads: usize) -> rayon::ThreadPool {
        rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap()
    }

    /// The pass's parallel work is shared with the polling workers and every result arrives.
    #[test]
    fn runs_the_pass_with_the_other_workers_taking_its_jobs() {
        let threads = Mutex::new(HashSet::new());
        let sum: u64 = pool(2).install(|| {
            with_awake_pool(|| {
                (0..64u64)
                    .into_par_iter()
                    .map(|i| {
                        // Long enough per item that one thread cannot drain the queue alone.
                        std::thread::sleep(Duration::from_micros(200));
                        threads.lock().unwrap().insert(rayon::current_thread_index());
                        i
                    })
                    .sum()
            })
        });
        assert_eq!(sum, (0..64).sum::<u64>());
        assert_eq!(threads.into_inner().unwrap().len(), 2, "both workers ran items");
    }

    /// A panicking pass releases the pollers (no hang) and the panic reaches the caller.
    #[test]
    fn a_panic_in_the_pass_propagates_and_releases_the_pollers() {
        let p = pool(2);
        let caught = p.install(|| std::panic::catch_unwind(|| with_awake_pool(|| panic!("pass failed"))));
        assert!(caught.is_err());
        // The pool is usable afterwards: nothing is left polling forever.
        assert_eq!(p.install(|| with_awake_pool(|| 7)), 7);
    }

    /// Nested passes (a pass started from inside another) and calls off any pool just run.
    #[test]
    fn nested_and_off_pool_calls_complete() {
        let n = pool(3).install(|| with_awake_pool(|| with_awake_pool(|| (0..1000u32).into_par_iter().count())));
        assert_eq!(n, 1000);
        assert_eq!(with_awake_pool(|| 5), 5);
        assert_eq!(pool(1).install(|| with_awake_pool(|| 6)), 6);
    }
}
