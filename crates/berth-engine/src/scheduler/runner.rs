//! One thread per loaded model owns its scheduler; callers hand it requests over a channel and
//! hear back through their [`TokenSink`]. The waiting queue is bounded: a request beyond
//! `max_queue` is refused at once, before it costs anything.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use super::{Scheduler, SchedulerConfig, SchedulerStats, TokenSink};
use crate::error::EngineError;
use crate::generate::Engine;
use crate::request::GenerationRequest;

#[derive(Debug, Clone)]
pub struct RunnerConfig {
    pub scheduler: SchedulerConfig,
    /// Requests that may wait to be admitted; more are refused.
    pub max_queue: usize,
    /// Time limit of a request from its arrival, waiting included.
    pub request_timeout: Option<Duration>,
    /// Workers of the model's own (its steps then run beside other models' rather than taking turns
    /// with them on the shared team); `None` shares the process's team.
    pub threads: Option<usize>,
}

struct Submission {
    req: GenerationRequest,
    sink: Box<dyn TokenSink + Send>,
    deadline: Option<Instant>,
}

/// A model's scheduler thread. Dropping the runner lets the thread finish what it has, then end.
pub struct Runner {
    tx: mpsc::Sender<Submission>,
    /// Submissions sent but not yet queued by the thread (counted against `max_queue` too, so a
    /// burst is bounded before the thread sees it).
    in_transit: Arc<AtomicUsize>,
    stats: Arc<SchedulerStats>,
    config: RunnerConfig,
    limits: crate::request::RequestLimits,
}

impl Runner {
    pub fn start(engine: Arc<Engine>, config: RunnerConfig) -> Result<Runner, EngineError> {
        let (tx, rx) = mpsc::channel::<Submission>();
        let in_transit = Arc::new(AtomicUsize::new(0));
        let (ready_tx, ready_rx) = mpsc::channel();
        let scheduler_config = config.scheduler.clone();
        let transit = in_transit.clone();
        let threads = config.threads;
        std::thread::Builder::new()
            .name("berth-scheduler".into())
            .spawn(move || {
                if let Some(n) = threads
                    && let Err(e) = crate::use_own_team(n, "berth-model")
                {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
                let mut scheduler = match Scheduler::new(&engine, scheduler_config) {
                    Ok(s) => s,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok((scheduler.stats(), scheduler.limits())));
                serve(&mut scheduler, &rx, &transit);
            })
            .map_err(|e| EngineError::BadConfig(format!("cannot start the scheduler thread: {e}")))?;
        let (stats, limits) = ready_rx.recv().map_err(|_| EngineError::Stopped)??;
        Ok(Runner { tx, in_transit, stats, config, limits })
    }

    /// Queue a request; its tokens and its end go to `sink`. Refused at once with
    /// [`EngineError::QueueFull`] when `max_queue` requests are already waiting.
    pub fn submit(&self, req: GenerationRequest, sink: Box<dyn TokenSink + Send>) -> Result<(), EngineError> {
        let before = self.in_transit.fetch_add(1, Ordering::SeqCst);
        let waiting = before + self.stats.queued.load(Ordering::SeqCst);
        if waiting >= self.config.max_queue {
            self.in_transit.fetch_sub(1, Ordering::SeqCst);
            return Err(EngineError::QueueFull { waiting });
        }
        let deadline = self.config.request_timeout.map(|t| Instant::now() + t);
        self.tx.send(Submission { req, sink, deadline }).map_err(|_| {
            self.in_transit.fetch_sub(1, Ordering::SeqCst);
            EngineError::Stopped
        })
    }

    pub fn stats(&self) -> &SchedulerStats {
        &self.stats
    }

    pub fn config(&self) -> &RunnerConfig {
        &self.config
    }

    /// What every request must fit to be accepted (see [`crate::request::check`]).
    pub fn limits(&self) -> crate::request::RequestLimits {
        self.limits
    }
}

/// The thread's loop: take what arrived, run a step, repeat; sleep while there is nothing to do.
fn serve(scheduler: &mut Scheduler<'_, 'static>, rx: &mpsc::Receiver<Submission>, in_transit: &AtomicUsize) {
    let accept = |scheduler: &mut Scheduler<'_, 'static>, s: Submission| {
        let sink: Box<dyn TokenSink> = s.sink;
        scheduler.submit(s.req, sink, s.deadline);
        in_transit.fetch_sub(1, Ordering::SeqCst);
    };
    let mut open = true;
    loop {
        if scheduler.is_idle() {
            if !open {
                return;
            }
            match rx.recv() {
                Ok(s) => accept(scheduler, s),
                // The runner is gone and nothing is left to finish.
                Err(_) => return,
            }
        }
        loop {
            match rx.try_recv() {
                Ok(s) => accept(scheduler, s),
                Err(mpsc::TryRecvError::Empty) => break,
                Err(mpsc::TryRecvError::Disconnected) => {
                    open = false;
                    break;
                }
            }
        }
        // A bug in a step must not leave clients waiting for ever: they get an error instead.
        if catch_unwind(AssertUnwindSafe(|| scheduler.step())).is_err() {
            scheduler.abort_all(|| EngineError::BadModel("the engine failed during a step (a bug in berth)".into()));
        }
    }
}
