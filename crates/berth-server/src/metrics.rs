//! Per-model serving metrics in the names inference gateways and autoscalers already read (vLLM's,
//! with the `berth:` prefix), every one labelled `model_name`.
//!
//! A histogram here is a fixed list of buckets and atomic counters: observing is two atomic adds,
//! and the text is written in Prometheus' exposition format directly, in the shape vLLM's
//! dashboards expect (a client library would rename `berth:` names and add its own conventions).

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

use berth_engine::FinishReason;

/// Seconds-valued histogram with fixed upper bounds.
pub struct Histogram {
    bounds: &'static [f64],
    counts: Vec<AtomicU64>,
    /// Sum in microseconds, to keep it an integer.
    sum_us: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        Self { bounds, counts: bounds.iter().map(|_| AtomicU64::new(0)).collect(), sum_us: 0.into(), count: 0.into() }
    }

    pub fn observe(&self, seconds: f64) {
        let seconds = if seconds.is_finite() { seconds.max(0.0) } else { 0.0 };
        if let Some(i) = self.bounds.iter().position(|&b| seconds <= b) {
            self.counts[i].fetch_add(1, Ordering::Relaxed);
        }
        self.sum_us.fetch_add((seconds * 1e6) as u64, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    /// Each bucket's count (not cumulative), in the order of [`Self::bounds`].
    pub fn counts(&self) -> Vec<u64> {
        self.counts.iter().map(|c| c.load(Ordering::Relaxed)).collect()
    }

    pub fn bounds(&self) -> &'static [f64] {
        self.bounds
    }

    pub(crate) fn write(&self, out: &mut String, name: &str, labels: &str) {
        let mut cumulative = 0;
        for (bound, count) in self.bounds.iter().zip(&self.counts) {
            cumulative += count.load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{bound}\"}} {cumulative}");
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {count}");
        let _ = writeln!(out, "{name}_sum{{{labels}}} {}", self.sum_us.load(Ordering::Relaxed) as f64 / 1e6);
        let _ = writeln!(out, "{name}_count{{{labels}}} {count}");
    }
}

// vLLM's buckets, so the same dashboards and alerts fit.
pub(crate) const TTFT: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
    160.0, 640.0, 2560.0,
];
pub(crate) const ITL: &[f64] =
    &[0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0];
const LATENCY: &[f64] = &[
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0,
    1920.0, 7680.0,
];

/// How a request ended, as `request_success_total{finished_reason}` names it.
pub fn finished_reason(finish: FinishReason) -> &'static str {
    match finish {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
        FinishReason::Cancelled => "abort",
    }
}

const FINISHED: [&str; 3] = ["stop", "length", "abort"];
/// Why a request failed, for `request_failure_total{reason}`.
pub const FAILURES: [&str; 5] = ["queue_full", "quota", "timeout", "invalid", "error"];

/// One model's request metrics (the scheduler keeps the rest: running, waiting, cache, tokens).
pub struct ServingMetrics {
    pub ttft: Histogram,
    pub itl: Histogram,
    pub e2e: Histogram,
    pub queue: Histogram,
    success: [AtomicU64; 3],
    failure: [AtomicU64; FAILURES.len()],
    /// Seconds the model took to load.
    pub load_seconds: f64,
}

impl ServingMetrics {
    pub fn new(load_seconds: f64) -> Self {
        Self {
            ttft: Histogram::new(TTFT),
            itl: Histogram::new(ITL),
            e2e: Histogram::new(LATENCY),
            queue: Histogram::new(LATENCY),
            success: Default::default(),
            failure: Default::default(),
            load_seconds,
        }
    }

    pub fn success(&self, finish: FinishReason) {
        let i = FINISHED.iter().position(|&f| f == finished_reason(finish)).unwrap_or(0);
        self.success[i].fetch_add(1, Ordering::Relaxed);
    }

    /// Requests that ended, answered or failed.
    pub fn finished(&self) -> u64 {
        self.success.iter().chain(&self.failure).map(|c| c.load(Ordering::Relaxed)).sum()
    }

    pub fn failure(&self, reason: &str) {
        let i = FAILURES.iter().position(|&f| f == reason).unwrap_or(FAILURES.len() - 1);
        self.failure[i].fetch_add(1, Ordering::Relaxed);
    }

    /// The request metrics' families for one model, appended to `families` (name → text), so
    /// that each family's lines stay together under one HELP/TYPE header across models.
    pub fn write(&self, labels: &str, families: &mut Families) {
        let histograms = [
            ("time_to_first_token_seconds", "Time from arrival to the first token.", &self.ttft),
            ("inter_token_latency_seconds", "Time between two tokens of a stream.", &self.itl),
            ("e2e_request_latency_seconds", "Time from arrival to the last token.", &self.e2e),
            ("request_queue_time_seconds", "Time from arrival to admission.", &self.queue),
        ];
        for (name, help, h) in histograms {
            let full = format!("berth:{name}");
            h.write(families.entry(&full, "histogram", help), &full, labels);
        }
        let counters = [
            (
                "request_success_total",
                "Requests that ended, by how.",
                "finished_reason",
                &FINISHED[..],
                &self.success[..],
            ),
            ("request_failure_total", "Requests that failed, by why.", "reason", &FAILURES[..], &self.failure[..]),
        ];
        for (name, help, label, reasons, counts) in counters {
            for (reason, n) in reasons.iter().zip(counts) {
                let sample_labels = format!("{labels},{label}=\"{reason}\"");
                families.sample(&format!("berth:{name}"), "counter", help, &sample_labels, n.load(Ordering::Relaxed));
            }
        }
        let help = "Seconds the model took to load.";
        families.sample("berth:model_load_seconds", "gauge", help, labels, self.load_seconds);
    }
}

/// Metric families in the order they were first seen, each with its header and samples.
#[derive(Default)]
pub struct Families {
    order: Vec<String>,
    text: std::collections::HashMap<String, String>,
}

impl Families {
    /// The text of family `name`, started with its HELP and TYPE lines on first use.
    pub fn entry(&mut self, name: &str, kind: &str, help: &str) -> &mut String {
        if !self.text.contains_key(name) {
            self.order.push(name.to_string());
            self.text.insert(name.to_string(), format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
        }
        self.text.get_mut(name).expect("inserted above")
    }

    /// One sample of family `name` with these labels.
    pub fn sample(&mut self, name: &str, kind: &str, help: &str, labels: &str, value: impl std::fmt::Display) {
        let _ = writeln!(self.entry(name, kind, help), "{name}{{{labels}}} {value}");
    }

    pub fn finish(mut self) -> String {
        self.order.iter().filter_map(|n| self.text.remove(n)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_are_cumulative() {
        let h = Histogram::new(&[0.1, 1.0]);
        for s in [0.05, 0.5, 0.5, 3.0] {
            h.observe(s);
        }
        let mut out = String::new();
        h.write(&mut out, "x", "model_name=\"m\"");
        assert!(out.contains("x_bucket{model_name=\"m\",le=\"0.1\"} 1\n"), "{out}");
        assert!(out.contains("x_bucket{model_name=\"m\",le=\"1\"} 3\n"), "{out}");
        assert!(out.contains("x_bucket{model_name=\"m\",le=\"+Inf\"} 4\n"), "{out}");
        assert!(
            out.contains("x_sum{model_name=\"m\"} 4.05\n") && out.contains("x_count{model_name=\"m\"} 4\n"),
            "{out}"
        );
    }
}
