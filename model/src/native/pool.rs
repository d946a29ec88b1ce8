//! A small pool of worker threads for the native decode step: a step has a few dozen parallel regions (each
//! product, each layer's attention) of tens to hundreds of microseconds, too short to spawn threads for. The
//! workers spin briefly between regions, then sleep until the next one, so an idle pool costs nothing.

use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

/// How many times an idle worker polls for the next region before it sleeps (tens of microseconds).
const SPINS: u32 = 20_000;

type Job = *const (dyn Fn(usize) + Sync);

struct Shared {
    /// Incremented for every region; a worker runs the job when it sees a new value.
    epoch: AtomicU64,
    job: UnsafeCell<Option<Job>>,
    /// Workers that finished the current region.
    done: AtomicUsize,
    /// Workers waiting on `wake`.
    sleeping: AtomicUsize,
    /// A worker's job panicked in the current region.
    panicked: AtomicBool,
    stop: AtomicBool,
    lock: Mutex<()>,
    wake: Condvar,
}

// `job` is written only while no worker reads it (between regions) and read only during a region.
unsafe impl Sync for Shared {}
unsafe impl Send for Shared {}

pub(crate) struct Pool {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
}

impl Pool {
    /// A pool running regions on `threads` threads: the caller's and `threads − 1` workers.
    pub fn new(threads: usize) -> Pool {
        let shared = Arc::new(Shared {
            epoch: AtomicU64::new(0),
            job: UnsafeCell::new(None),
            done: AtomicUsize::new(0),
            sleeping: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            lock: Mutex::new(()),
            wake: Condvar::new(),
        });
        let workers = (1..threads.max(1))
            .map(|index| {
                let s = shared.clone();
                std::thread::Builder::new().name(format!("whet-decode-{index}")).spawn(move || worker(&s, index)).expect("spawning a decode worker")
            })
            .collect();
        Pool { shared, workers }
    }

    pub fn threads(&self) -> usize {
        self.workers.len() + 1
    }

    /// Runs `f(i)` for every thread index i (0 on the calling thread) and returns when all have finished.
    pub fn run(&self, f: &(dyn Fn(usize) + Sync)) {
        if self.workers.is_empty() {
            return f(0);
        }
        let s = &*self.shared;
        // SAFETY: no worker reads `job` between regions (the previous region ended: `done` reached the worker
        // count), and `f` outlives this call, which waits for every worker below.
        unsafe { *s.job.get() = Some(std::mem::transmute::<&(dyn Fn(usize) + Sync), Job>(f)) };
        s.done.store(0, Ordering::Relaxed);
        s.epoch.fetch_add(1, Ordering::SeqCst);
        if s.sleeping.load(Ordering::SeqCst) > 0 {
            let _g = s.lock.lock().unwrap_or_else(|e| e.into_inner());
            s.wake.notify_all();
        }
        // the workers borrow `f`: wait for them even if this thread's share panics, then pass the panic on
        let mine = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(0)));
        while s.done.load(Ordering::Acquire) < self.workers.len() {
            std::hint::spin_loop();
        }
        if let Err(p) = mine {
            std::panic::resume_unwind(p);
        }
        if s.panicked.swap(false, Ordering::AcqRel) {
            panic!("a native decode worker panicked (its message is above)");
        }
    }
}

fn worker(s: &Shared, index: usize) {
    let mut seen = 0u64;
    loop {
        let mut spins = 0u32;
        let epoch = loop {
            let e = s.epoch.load(Ordering::Acquire);
            if e != seen || s.stop.load(Ordering::Acquire) {
                break e;
            }
            spins += 1;
            if spins < SPINS {
                std::hint::spin_loop();
                continue;
            }
            // sleep until the next region (or the pool's end)
            let mut g = s.lock.lock().unwrap_or_else(|e| e.into_inner());
            // SeqCst here and in `run`: of "publish the epoch, then look for sleepers" and "announce sleep, then
            // look at the epoch", at least one side sees the other's write
            s.sleeping.fetch_add(1, Ordering::SeqCst);
            while s.epoch.load(Ordering::SeqCst) == seen && !s.stop.load(Ordering::Acquire) {
                g = s.wake.wait(g).unwrap_or_else(|e| e.into_inner());
            }
            s.sleeping.fetch_sub(1, Ordering::AcqRel);
            spins = 0;
        };
        if s.stop.load(Ordering::Acquire) {
            return;
        }
        seen = epoch;
        // SAFETY: set before the epoch was published and kept until every worker reports done
        let job = unsafe { (*s.job.get()).expect("a region's job") };
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| unsafe { (*job)(index) })).is_err() {
            s.panicked.store(true, Ordering::Release);
        }
        s.done.fetch_add(1, Ordering::Release);
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        {
            let _g = self.shared.lock.lock().unwrap_or_else(|e| e.into_inner());
            self.shared.wake.notify_all();
        }
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

/// The range of `0..n` thread `i` of `threads` takes (contiguous, sizes differing by at most one).
pub(crate) fn share(n: usize, i: usize, threads: usize) -> std::ops::Range<usize> {
    let (q, r) = (n / threads, n % threads);
    let start = i * q + i.min(r);
    start..start + q + usize::from(i < r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_thread_runs_each_region_once_and_the_pool_sleeps_and_wakes() {
        for threads in [1usize, 2, 3] {
            let pool = Pool::new(threads);
            assert_eq!(pool.threads(), threads);
            let hits: Vec<AtomicUsize> = (0..threads).map(|_| AtomicUsize::new(0)).collect();
            for round in 0..200 {
                pool.run(&|i| {
                    hits[i].fetch_add(1, Ordering::Relaxed);
                });
                if round == 100 {
                    // long enough for the workers to fall asleep
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
            }
            assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 200), "{threads} threads");
        }
        // a panic in any thread's share reaches the caller once every thread is done, and the pool goes on
        let pool = Pool::new(2);
        for bad in [0usize, 1] {
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| pool.run(&|i| assert!(i != bad, "share {i}"))));
            assert!(r.is_err());
        }
        let hits = AtomicUsize::new(0);
        pool.run(&|_| {
            hits.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(hits.load(Ordering::Relaxed), 2);
        // shares cover the range once, in order
        for n in [0usize, 1, 5, 17] {
            for t in [1usize, 2, 3, 4] {
                let all: Vec<usize> = (0..t).flat_map(|i| share(n, i, t)).collect();
                assert_eq!(all, (0..n).collect::<Vec<_>>());
            }
        }
    }
}
