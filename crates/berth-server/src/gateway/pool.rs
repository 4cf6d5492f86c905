//! The replicas behind the gateway and what it knows of each: whether it may take requests, its
//! load, its loaded models. A poller asks every replica's `/load` about ten times a second; the
//! requests themselves report failures. A replica that refuses connections, or fails
//! [`FAILURES_TO_EJECT`] requests in a row before answering, is ejected (the circuit opens) for a
//! back-off that doubles with each ejection (up to [`MAX_BACKOFF`]); once the back-off has passed,
//! the next poll that finds it ready admits it again.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde::Deserialize;

use crate::metrics::Histogram;

/// Buckets of the time to a replica's answer head: a non-streamed answer's head comes when it is
/// done, a stream's with its first event.
pub(super) const HEAD_LATENCY: &[f64] =
    &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0];

/// Consecutive failed requests (before any answer) that eject a replica.
pub const FAILURES_TO_EJECT: u32 = 3;
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Polls that fail in a row before a replica counts as down (one refused connection is enough).
const POLLS_TO_DOWN: u32 = 2;

/// What a replica's `/load` says.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Load {
    pub ready: bool,
    #[serde(default)]
    pub draining: bool,
    #[serde(default)]
    pub waiting: u64,
    #[serde(default)]
    pub running: u64,
    #[serde(default)]
    pub kv_cache_usage: f64,
    /// Requests the replica runs at once (0: not said).
    #[serde(default)]
    pub max_running: u64,
    #[serde(default)]
    pub models: Vec<String>,
    /// Tokens generated since the replica started (to its last few seconds).
    #[serde(default)]
    pub generated_tokens: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// Not polled yet, or down: no requests.
    Unknown,
    Up,
    /// The circuit is open until then.
    Ejected {
        until: Instant,
    },
}

struct State {
    health: Health,
    load: Load,
    failed_requests: u32,
    failed_polls: u32,
    backoff: Duration,
}

/// One replica.
pub struct Upstream {
    /// `http://host:port`, without a trailing slash.
    pub base: String,
    /// A hash of `base`: the replica's place in every prefix's order.
    pub id: u64,
    /// Requests this gateway has sent there and not finished.
    pub in_flight: AtomicUsize,
    /// Requests sent there (retries included).
    pub requests: AtomicU64,
    /// Answers relayed from there.
    pub answered: AtomicU64,
    /// Requests that failed there before an answer.
    pub failures: AtomicU64,
    /// Answers it cut short after the first byte.
    pub cut: AtomicU64,
    pub ejections: AtomicU64,
    /// From the request's arrival at the gateway to the replica's answer head.
    pub head_latency: Histogram,
    state: Mutex<State>,
}

/// What happened to a request sent to a replica, as far as the replica's health goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// It answered.
    Answered,
    /// The connection was refused: nothing listens there now.
    Refused,
    /// It failed before answering in another way (reset, closed, timed out).
    Failed,
}

impl Upstream {
    pub fn new(base: String) -> Upstream {
        let id = super::hash64(&[base.as_bytes()]);
        Upstream {
            base,
            id,
            in_flight: AtomicUsize::new(0),
            requests: AtomicU64::new(0),
            answered: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            cut: AtomicU64::new(0),
            ejections: AtomicU64::new(0),
            head_latency: Histogram::new(HEAD_LATENCY),
            state: Mutex::new(State {
                health: Health::Unknown,
                load: Load::default(),
                failed_requests: 0,
                failed_polls: 0,
                backoff: FIRST_BACKOFF,
            }),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // The state is a few plain fields, each write whole: a panic elsewhere cannot leave it
        // half-changed.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn health(&self) -> Health {
        self.state().health
    }

    /// Whether requests may go there now.
    pub fn routable(&self) -> bool {
        let s = self.state();
        s.health == Health::Up && s.load.ready && !s.load.draining
    }

    /// The load a request there would join: the larger of what the gateway has in flight there
    /// and what the replica last reported (other gateways' requests included), with a full KV
    /// cache counting as one more.
    pub fn load(&self) -> f64 {
        let s = self.state();
        let reported = (s.load.waiting + s.load.running) as f64;
        let mine = self.in_flight.load(Ordering::Relaxed) as f64;
        mine.max(reported) + if s.load.kv_cache_usage > 0.95 { 1.0 } else { 0.0 }
    }

    /// Whether the gateway already has as many requests there as it runs at once: more would
    /// only wait in its queue.
    pub fn full(&self) -> bool {
        let capacity = self.state().load.max_running;
        capacity > 0 && self.in_flight.load(Ordering::Relaxed) as u64 >= capacity
    }

    pub fn last_load(&self) -> Load {
        self.state().load.clone()
    }

    /// Whether `model` is among the replica's loaded models (`name` and `name:latest` are one).
    pub fn has_model(&self, model: &str) -> bool {
        let wanted = model.strip_suffix(":latest").unwrap_or(model);
        self.state().load.models.iter().any(|m| m.strip_suffix(":latest").unwrap_or(m) == wanted)
    }

    /// A poll's answer. Returns true when this admitted the replica (again).
    pub fn polled(&self, load: Load, now: Instant) -> bool {
        let mut s = self.state();
        s.failed_polls = 0;
        s.load = load;
        match s.health {
            Health::Up => false,
            Health::Ejected { until } if now < until => false,
            Health::Unknown | Health::Ejected { .. } => {
                if !s.load.ready {
                    return false;
                }
                s.health = Health::Up;
                s.failed_requests = 0;
                true
            }
        }
    }

    /// For a target nobody polls (the remote): once its back-off has passed, let requests try it
    /// again (the circuit half-opens; a failure ejects it for twice as long).
    pub fn half_open(&self, now: Instant) {
        let mut s = self.state();
        if let Health::Ejected { until } = s.health
            && now >= until
        {
            s.health = Health::Up;
            s.load.ready = true;
            s.failed_requests = 0;
        }
    }

    /// A poll that got no answer. Returns true when this took the replica out.
    pub fn poll_failed(&self, refused: bool, now: Instant) -> bool {
        let mut s = self.state();
        s.failed_polls += 1;
        s.load.ready = false;
        if s.health == Health::Up && (refused || s.failed_polls >= POLLS_TO_DOWN) {
            return self.eject(&mut s, now);
        }
        false
    }

    /// A request's outcome. Returns true when this ejected the replica.
    pub fn request_ended(&self, outcome: Outcome, now: Instant) -> bool {
        let mut s = self.state();
        match outcome {
            Outcome::Answered => {
                s.failed_requests = 0;
                if s.health == Health::Up {
                    s.backoff = FIRST_BACKOFF;
                }
                false
            }
            Outcome::Refused => s.health == Health::Up && self.eject(&mut s, now),
            Outcome::Failed => {
                s.failed_requests += 1;
                s.health == Health::Up && s.failed_requests >= FAILURES_TO_EJECT && self.eject(&mut s, now)
            }
        }
    }

    fn eject(&self, s: &mut State, now: Instant) -> bool {
        s.health = Health::Ejected { until: now + s.backoff };
        s.backoff = (s.backoff * 2).min(MAX_BACKOFF);
        s.load.ready = false;
        self.ejections.fetch_add(1, Ordering::Relaxed);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ready() -> Load {
        Load { ready: true, ..Load::default() }
    }

    #[test]
    fn a_replica_is_admitted_by_a_ready_poll_and_ejected_by_a_refused_request() {
        let u = Upstream::new("http://127.0.0.1:1".into());
        let t = Instant::now();
        assert!(!u.routable(), "unknown until polled");
        assert!(!u.polled(Load::default(), t), "not ready: not admitted");
        assert!(u.polled(ready(), t));
        assert!(u.routable());
        assert!(u.request_ended(Outcome::Refused, t));
        assert!(!u.routable());
        // Within the back-off a ready poll does not admit it; after, it does.
        assert!(!u.polled(ready(), t + Duration::from_millis(100)));
        assert!(u.polled(ready(), t + FIRST_BACKOFF));
        assert!(u.routable());
    }

    #[test]
    fn the_back_off_doubles_while_a_replica_keeps_failing_and_resets_once_it_answers() {
        let u = Upstream::new("http://127.0.0.1:1".into());
        let mut t = Instant::now();
        u.polled(ready(), t);
        let mut waits = Vec::new();
        for _ in 0..8 {
            assert!(u.request_ended(Outcome::Refused, t));
            let Health::Ejected { until } = u.health() else { panic!("ejected") };
            waits.push(until - t);
            t = until;
            assert!(u.polled(ready(), t));
        }
        assert_eq!(waits[0], FIRST_BACKOFF);
        assert_eq!(waits[1], FIRST_BACKOFF * 2);
        assert_eq!(*waits.last().unwrap(), MAX_BACKOFF);
        u.request_ended(Outcome::Answered, t);
        u.request_ended(Outcome::Refused, t);
        assert_eq!(u.health(), Health::Ejected { until: t + FIRST_BACKOFF });
    }

    #[test]
    fn failures_eject_only_in_a_row_and_polls_take_a_silent_replica_out() {
        let u = Upstream::new("http://127.0.0.1:1".into());
        let t = Instant::now();
        u.polled(ready(), t);
        for _ in 0..FAILURES_TO_EJECT - 1 {
            assert!(!u.request_ended(Outcome::Failed, t));
        }
        u.request_ended(Outcome::Answered, t);
        for _ in 0..FAILURES_TO_EJECT - 1 {
            assert!(!u.request_ended(Outcome::Failed, t));
        }
        assert!(u.request_ended(Outcome::Failed, t));

        let v = Upstream::new("http://127.0.0.1:2".into());
        v.polled(ready(), t);
        assert!(!v.poll_failed(false, t), "one timed-out poll is not enough");
        assert!(!v.routable(), "but it is not sent requests meanwhile");
        assert!(v.poll_failed(false, t));
    }

    #[test]
    fn load_and_models() {
        let u = Upstream::new("http://127.0.0.1:1".into());
        u.polled(
            Load { ready: true, waiting: 2, running: 3, models: vec!["ai/smollm2:latest".into()], ..Load::default() },
            Instant::now(),
        );
        assert_eq!(u.load(), 5.0);
        u.in_flight.store(9, Ordering::Relaxed);
        assert_eq!(u.load(), 9.0);
        assert!(u.has_model("ai/smollm2") && u.has_model("ai/smollm2:latest") && !u.has_model("other"));
        assert!(!u.polled(Load { draining: true, ..ready() }, Instant::now()) && !u.routable());
    }
}
