//! What each version of a deployment answered lately, and the guards that judge a canary by it.
//!
//! A request routed to a version is followed by a [`ServedRequest`]: the response's status and the
//! generation's end (a stream ends after its handler returned) mark it, and when the last holder
//! lets go it lands in the version's [`Window`] as answered or failed, with its time to first
//! token.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::spec::Guards;

/// The most requests a window keeps, whatever its span (bounds memory under any load).
const MAX_SAMPLES: usize = 50_000;

#[derive(Default)]
pub struct Window {
    samples: Mutex<VecDeque<Sample>>,
}

struct Sample {
    at: Instant,
    failed: bool,
    ttft: Option<f32>,
}

/// A window's figures over a span.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct WindowStats {
    pub requests: u64,
    pub failed: u64,
    /// Seconds; none without a first token in the span.
    pub ttft_p95: Option<f64>,
}

impl WindowStats {
    pub fn error_rate(&self) -> f64 {
        if self.requests == 0 { 0.0 } else { self.failed as f64 / self.requests as f64 }
    }
}

impl Window {
    fn push(&self, failed: bool, ttft: Option<Duration>) {
        let mut samples = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        if samples.len() >= MAX_SAMPLES {
            samples.pop_front();
        }
        samples.push_back(Sample { at: Instant::now(), failed, ttft: ttft.map(|d| d.as_secs_f32()) });
    }

    /// The figures of the requests that ended within `span`.
    pub fn stats(&self, span: Duration) -> WindowStats {
        let samples = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        let since = Instant::now().checked_sub(span);
        let recent = samples.iter().filter(|s| since.is_none_or(|t| s.at >= t));
        let mut stats = WindowStats::default();
        let mut ttfts = Vec::new();
        for s in recent {
            stats.requests += 1;
            stats.failed += u64::from(s.failed);
            ttfts.extend(s.ttft);
        }
        if !ttfts.is_empty() {
            ttfts.sort_by(f32::total_cmp);
            let i = ((ttfts.len() as f64 * 0.95).ceil() as usize).clamp(1, ttfts.len()) - 1;
            stats.ttft_p95 = Some(f64::from(ttfts[i]));
        }
        stats
    }
}

/// Why the canary must stop, if a guard says so.
pub fn breach(guards: &Guards, canary: &WindowStats, stable: &WindowStats) -> Option<String> {
    if canary.requests < guards.min_requests.max(1) {
        return None;
    }
    if let Some(max) = guards.max_error_rate
        && canary.error_rate() > max
    {
        return Some(format!(
            "error-rate guard: {} of the canary's last {} requests failed ({:.1}%, the limit is {:.1}%)",
            canary.failed,
            canary.requests,
            canary.error_rate() * 100.0,
            max * 100.0
        ));
    }
    if let (Some(max), Some(c), Some(s)) = (guards.max_ttft_ratio, canary.ttft_p95, stable.ttft_p95)
        && stable.requests >= guards.min_requests.max(1)
        && s > 0.0
        && c / s > max
    {
        return Some(format!(
            "TTFT guard: the canary's p95 time to first token is {:.0} ms, {:.1}x the stable version's {:.0} ms (the limit is {max:.1}x)",
            c * 1e3,
            c / s,
            s * 1e3
        ));
    }
    None
}

/// One request routed to a version, recorded in its window when the last holder drops it.
pub struct ServedRequest {
    window: std::sync::Arc<Window>,
    started: Instant,
    failed: AtomicBool,
    first_token: Mutex<Option<Instant>>,
}

impl ServedRequest {
    pub fn new(window: std::sync::Arc<Window>) -> Self {
        Self { window, started: Instant::now(), failed: AtomicBool::new(false), first_token: Mutex::new(None) }
    }

    pub fn fail(&self) {
        self.failed.store(true, Ordering::Relaxed);
    }

    pub fn first_token(&self, at: Instant) {
        let mut first = self.first_token.lock().unwrap_or_else(|e| e.into_inner());
        first.get_or_insert(at);
    }
}

impl Drop for ServedRequest {
    fn drop(&mut self) {
        let first = *self.first_token.lock().unwrap_or_else(|e| e.into_inner());
        self.window.push(self.failed.load(Ordering::Relaxed), first.map(|t| t.duration_since(self.started)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn guards() -> Guards {
        Guards { max_error_rate: Some(0.2), max_ttft_ratio: Some(2.0), window_seconds: 60, min_requests: 10 }
    }

    #[test]
    fn requests_land_in_their_window_when_let_go() {
        let w = Arc::new(Window::default());
        for i in 0..10 {
            let r = ServedRequest::new(w.clone());
            if i % 5 == 0 {
                r.fail();
            }
            r.first_token(Instant::now());
        }
        let s = w.stats(Duration::from_secs(60));
        assert_eq!((s.requests, s.failed), (10, 2));
        assert!(s.ttft_p95.is_some());
    }

    #[test]
    fn the_error_guard_waits_for_enough_requests_then_breaches() {
        let few = WindowStats { requests: 5, failed: 5, ttft_p95: None };
        assert_eq!(breach(&guards(), &few, &WindowStats::default()), None);
        let ok = WindowStats { requests: 50, failed: 10, ttft_p95: None };
        assert_eq!(breach(&guards(), &ok, &WindowStats::default()), None);
        let bad = WindowStats { requests: 50, failed: 11, ttft_p95: None };
        let why = breach(&guards(), &bad, &WindowStats::default()).unwrap();
        assert!(why.contains("error-rate guard") && why.contains("11 of"), "{why}");
    }

    #[test]
    fn the_ttft_guard_compares_with_the_stable_version() {
        let stable = WindowStats { requests: 50, failed: 0, ttft_p95: Some(0.1) };
        let slow = WindowStats { requests: 50, failed: 0, ttft_p95: Some(0.25) };
        let fine = WindowStats { requests: 50, failed: 0, ttft_p95: Some(0.15) };
        assert!(breach(&guards(), &slow, &stable).unwrap().contains("TTFT guard"));
        assert_eq!(breach(&guards(), &fine, &stable), None);
    }
}
