//! The engine's worker team: a fixed set of threads that run each operation of a forward pass
//! together, fork-join style, and spin between operations.
//!
//! Why not rayon: a decoding step is a few hundred short operations (tens of microseconds each
//! for a small model). Rayon's idle workers go to sleep within microseconds and each operation
//! then pays a futex wake-up, which measured as ~10% of a two-thread decode step in the kernel's
//! scheduler alone. llama.cpp's threads spin between operations; so do these, for a bounded time
//! ([`SPIN`]) after the last operation, then sleep on a condition variable, so an idle server
//! costs nothing.
//!
//! The calling thread is worker 0, so a team of one runs everything inline.

use std::cell::Cell;
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long an idle worker spins before it sleeps.
const SPIN: Duration = Duration::from_millis(2);

/// A job as the workers see it: the caller's closure with its lifetime erased. Sound because
/// [`Team::run`] does not return before every worker has finished with it.
#[derive(Clone, Copy)]
struct JobRef(*const (dyn Fn(usize) + Sync));
// SAFETY: the closure is `Sync`, and it outlives every use (see `JobRef`).
unsafe impl Send for JobRef {}
unsafe impl Sync for JobRef {}

struct Shared {
    /// Bumped once per job; workers run a job when they see a new epoch.
    epoch: AtomicUsize,
    job: Mutex<Option<JobRef>>,
    /// Workers (other than the caller) still inside the current job.
    running: AtomicUsize,
    /// A worker's panic, re-raised in the caller.
    panicked: AtomicBool,
    sleepers: AtomicUsize,
    wake_lock: Mutex<()>,
    wake: Condvar,
    stop: AtomicBool,
}

pub struct Team {
    shared: Arc<Shared>,
    size: usize,
    /// One job at a time: forward passes of different models interleave operation by operation.
    busy: Mutex<()>,
    handles: Vec<JoinHandle<()>>,
}

thread_local! {
    /// Set while this thread runs a team job: a nested call runs inline instead of deadlocking.
    static IN_JOB: Cell<bool> = const { Cell::new(false) };
}

impl Team {
    /// A team of `size` workers: the caller plus `size - 1` threads.
    pub fn new(size: usize) -> std::io::Result<Self> {
        Self::named(size, "berth-worker")
    }

    /// The same, its threads named `{name}-{index}` (what `top -H` and /proc show).
    pub fn named(size: usize, name: &str) -> std::io::Result<Self> {
        let size = size.max(1);
        let shared = Arc::new(Shared {
            epoch: AtomicUsize::new(0),
            job: Mutex::new(None),
            running: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            sleepers: AtomicUsize::new(0),
            wake_lock: Mutex::new(()),
            wake: Condvar::new(),
            stop: AtomicBool::new(false),
        });
        let mut handles = Vec::new();
        for index in 1..size {
            let shared = shared.clone();
            handles.push(
                std::thread::Builder::new().name(format!("{name}-{index}")).spawn(move || worker(&shared, index))?,
            );
        }
        Ok(Self { shared, size, busy: Mutex::new(()), handles })
    }

    /// Workers in the team, the caller included.
    pub fn size(&self) -> usize {
        self.size
    }

    /// Run `f(worker)` once on every worker (the caller is worker 0) and return when all are done.
    /// A panic in any of them is re-raised here, after all have finished.
    pub fn run(&self, f: &(dyn Fn(usize) + Sync)) {
        if self.size == 1 || IN_JOB.get() {
            f(0);
            return;
        }
        let _busy = self.busy.lock().unwrap_or_else(|e| e.into_inner());
        let shared = &*self.shared;
        // SAFETY: only the lifetime is erased; the reference is dropped by every worker before
        // `running` reaches zero, and this function waits for that.
        let job = JobRef(unsafe { std::mem::transmute::<&(dyn Fn(usize) + Sync), &'static (dyn Fn(usize) + Sync)>(f) });
        *shared.job.lock().unwrap_or_else(|e| e.into_inner()) = Some(job);
        shared.running.store(self.size - 1, Ordering::SeqCst);
        shared.epoch.fetch_add(1, Ordering::SeqCst);
        if shared.sleepers.load(Ordering::SeqCst) > 0 {
            let _lock = shared.wake_lock.lock().unwrap_or_else(|e| e.into_inner());
            shared.wake.notify_all();
        }
        IN_JOB.set(true);
        let mine = catch_unwind(AssertUnwindSafe(|| f(0)));
        IN_JOB.set(false);
        while shared.running.load(Ordering::Acquire) != 0 {
            std::hint::spin_loop();
        }
        *shared.job.lock().unwrap_or_else(|e| e.into_inner()) = None;
        if let Err(panic) = mine {
            resume_unwind(panic);
        }
        if shared.panicked.swap(false, Ordering::SeqCst) {
            panic!("an engine worker panicked");
        }
    }

    /// Call `f` on every item, each exactly once, the items shared out among the workers as they
    /// become free.
    pub fn for_each_mut<T: Send>(&self, items: &mut [T], f: impl Fn(&mut T) + Sync) {
        if self.size == 1 || items.len() <= 1 || IN_JOB.get() {
            items.iter_mut().for_each(f);
            return;
        }
        let next = AtomicUsize::new(0);
        let base = SendPtr(items.as_mut_ptr());
        let len = items.len();
        self.run(&|_| {
            let base = &base;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= len {
                    break;
                }
                // SAFETY: `i < len`, and the counter hands each index to exactly one worker, so
                // no two workers ever hold the same item.
                f(unsafe { &mut *base.0.add(i) });
            }
        });
    }

    /// Call `f(index, chunk)` for every `chunk`-sized piece of `data` (the last may be shorter).
    pub fn for_each_chunk_mut<T: Send>(&self, data: &mut [T], chunk: usize, f: impl Fn(usize, &mut [T]) + Sync) {
        let mut pieces: Vec<(usize, &mut [T])> = data.chunks_mut(chunk.max(1)).enumerate().collect();
        self.for_each_mut(&mut pieces, |(i, piece)| f(*i, piece));
    }
}

struct SendPtr<T>(*mut T);
// SAFETY: used only to hand disjoint items to workers (see `for_each_mut`).
unsafe impl<T: Send> Sync for SendPtr<T> {}

fn worker(shared: &Shared, index: usize) {
    // Epoch 0 is the team's creation: a job may be posted before this thread first looks.
    let mut seen = 0;
    loop {
        // Spin for new work, then sleep until it comes.
        let spin_start = Instant::now();
        let mut spins = 0u32;
        while shared.epoch.load(Ordering::SeqCst) == seen && !shared.stop.load(Ordering::Relaxed) {
            std::hint::spin_loop();
            spins += 1;
            if spins.is_multiple_of(256) && spin_start.elapsed() > SPIN {
                // Announce the sleep before the last look at the epoch: `run` bumps the epoch
                // before it reads `sleepers`, so one of the two sees the other.
                shared.sleepers.fetch_add(1, Ordering::SeqCst);
                let mut lock = shared.wake_lock.lock().unwrap_or_else(|e| e.into_inner());
                while shared.epoch.load(Ordering::SeqCst) == seen && !shared.stop.load(Ordering::SeqCst) {
                    lock = shared.wake.wait(lock).unwrap_or_else(|e| e.into_inner());
                }
                drop(lock);
                shared.sleepers.fetch_sub(1, Ordering::SeqCst);
            }
        }
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        seen = shared.epoch.load(Ordering::SeqCst);
        let job = *shared.job.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(JobRef(f)) = job {
            IN_JOB.set(true);
            // SAFETY: the caller of `run` keeps the closure alive until `running` is zero.
            let result = catch_unwind(AssertUnwindSafe(|| unsafe { (*f)(index) }));
            IN_JOB.set(false);
            if result.is_err() {
                shared.panicked.store(true, Ordering::SeqCst);
            }
        }
        shared.running.fetch_sub(1, Ordering::Release);
    }
}

impl Drop for Team {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        {
            let _lock = self.shared.wake_lock.lock().unwrap_or_else(|e| e.into_inner());
            self.shared.wake.notify_all();
        }
        for handle in self.handles.drain(..) {
            let _ = handle.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_item_is_visited_once() {
        for size in [1, 2, 3] {
            let team = Team::new(size).expect("threads");
            for round in 0..200 {
                let mut items: Vec<usize> = vec![0; round % 37];
                team.for_each_mut(&mut items, |x| *x += 1);
                assert!(items.iter().all(|&x| x == 1));
                let mut data = vec![0u32; round];
                team.for_each_chunk_mut(&mut data, 7, |i, c| c.iter_mut().for_each(|x| *x = i as u32));
                assert!(data.iter().enumerate().all(|(j, &x)| x == (j / 7) as u32));
            }
        }
    }

    #[test]
    fn nested_calls_run_inline_and_sleeping_workers_wake() {
        let team = Team::new(2).expect("threads");
        let mut outer = vec![0usize; 4];
        team.for_each_mut(&mut outer, |x| {
            let mut inner = vec![1usize; 3];
            team.for_each_mut(&mut inner, |y| *y *= 2);
            *x = inner.iter().sum();
        });
        assert_eq!(outer, vec![6; 4]);
        std::thread::sleep(SPIN * 3);
        let mut items = vec![0; 8];
        team.for_each_mut(&mut items, |x| *x = 5);
        assert_eq!(items, vec![5; 8]);
    }

    #[test]
    fn a_worker_panic_reaches_the_caller() {
        let team = Team::new(2).expect("threads");
        let result = catch_unwind(AssertUnwindSafe(|| team.run(&|w| assert_ne!(w, 1, "worker one fails"))));
        assert!(result.is_err());
        let mut items = vec![0; 4];
        team.for_each_mut(&mut items, |x| *x = 1);
        assert_eq!(items, vec![1; 4]);
    }
}
