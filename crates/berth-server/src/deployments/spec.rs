//! What a deployment is, as it is stored: a name clients call, the version serving it, a rollout
//! to a new version in progress (or the end of the last one), and the policy rollouts follow.
//! Everything here is plain data, serialised whole into the deployment's database row, so that a
//! restarted server finds every deployment, and a rollout, in the state it left it.

use serde::{Deserialize, Serialize};

/// The most events a deployment keeps (the oldest go first).
const MAX_EVENTS: usize = 32;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Deployment {
    pub name: String,
    /// The version serving every request not assigned to a canary.
    pub stable: Version,
    pub rollout: Option<Rollout>,
    /// The version serving before the last promotion, for `rollback`.
    pub previous: Option<Version>,
    pub policy: Policy,
    pub follow: Option<Follow>,
    /// How the last rollout ended, with why.
    pub last_rollout: Option<RolloutEnd>,
    /// What happened to the deployment, newest last.
    pub events: Vec<Event>,
}

/// One version: a model in the store pinned to its manifest digest, with its own settings.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Version {
    /// `repository@sha256:…`: what is loaded, whatever the tag it came from points to later.
    pub reference: String,
    pub digest: String,
    /// What the operator named (`ai/smollm2:latest`), for people.
    pub source: String,
    pub settings: VersionSettings,
    /// berth made the `repository@digest` reference for this version (it removes it again once no
    /// deployment needs the version; one the operator made stays).
    #[serde(default)]
    pub pinned_by_berth: bool,
}

impl Version {
    /// The version's short name in headers, metrics and tables: the digest's first 12 hex digits.
    pub fn label(&self) -> String {
        version_label(&self.digest)
    }
}

/// A manifest digest's first 12 hex digits.
pub fn version_label(digest: &str) -> String {
    let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
    hex.chars().take(12).collect()
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct VersionSettings {
    /// Tokens of context a request may use (less than the model's own).
    pub context: Option<usize>,
    /// Seconds the version stays loaded when idle (negative: for ever).
    pub keep_alive_seconds: Option<i64>,
    /// Never evicted to make room for other models.
    pub pinned: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Rollout {
    pub to: Version,
    /// Percent of requests the new version gets (0 to 100).
    pub weight: u8,
    pub state: RolloutState,
    /// Unix milliseconds: when it began (also what sticky assignment is salted with, so that each
    /// rollout draws its own canary users), and when the weight last changed.
    pub started_ms: i64,
    pub stepped_ms: i64,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum RolloutState {
    /// Loading the new version and sending it a smoke request; it gets no traffic yet.
    Starting,
    /// The new version receives its weight of the traffic.
    Canary,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RolloutEnd {
    pub outcome: Outcome,
    pub to: String,
    pub reason: String,
    pub at_ms: i64,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The new version became the stable one.
    Promoted,
    /// Stopped by the operator, or by a guard.
    Aborted,
    /// The new version could not load or answer.
    Failed,
}

/// How rollouts of a deployment proceed.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Policy {
    /// The first weight of a new version.
    pub canary: u8,
    /// Percent added by each step.
    pub step: u8,
    /// Seconds between automatic steps; none: the operator steps (`berth rollout step`).
    pub interval_seconds: Option<u64>,
    pub guards: Guards,
}

impl Default for Policy {
    fn default() -> Self {
        Self { canary: 10, step: 40, interval_seconds: None, guards: Guards::default() }
    }
}

/// When a canary is aborted without the operator.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Guards {
    /// The largest share of the canary's requests that may fail (0 to 1).
    pub max_error_rate: Option<f64>,
    /// The largest canary TTFT p95 as a multiple of the stable version's.
    pub max_ttft_ratio: Option<f64>,
    /// Seconds of requests the guards look at.
    pub window_seconds: u64,
    /// Requests the canary must have answered in the window before a guard judges it.
    pub min_requests: u64,
}

impl Default for Guards {
    fn default() -> Self {
        Self { max_error_rate: None, max_ttft_ratio: None, window_seconds: 60, min_requests: 20 }
    }
}

/// A registry tag the deployment follows: a new digest there starts a rollout.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Follow {
    pub reference: String,
    pub interval_seconds: u64,
    pub checked_ms: Option<i64>,
    /// Why the last check failed, if it did.
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Event {
    pub at_ms: i64,
    pub text: String,
}

impl Deployment {
    pub fn new(name: String, stable: Version, policy: Policy, follow: Option<Follow>) -> Self {
        let mut d = Deployment {
            events: Vec::new(),
            name,
            stable,
            rollout: None,
            previous: None,
            policy,
            follow,
            last_rollout: None,
        };
        d.log(format!("deployed {} ({})", d.stable.source, d.stable.label()));
        d
    }

    /// Note an event, and log it.
    pub fn log(&mut self, text: String) {
        tracing::info!(deployment = %self.name, "{text}");
        self.events.push(Event { at_ms: now_ms(), text });
        if self.events.len() > MAX_EVENTS {
            self.events.remove(0);
        }
    }

    /// Whether the deployment may still serve this version: now, or after a rollback.
    pub fn needs(&self, digest: &str) -> bool {
        self.digests().any(|d| d == digest) || self.previous.as_ref().is_some_and(|p| p.digest == digest)
    }

    /// The digests the deployment serves now (stable, and a canary's).
    pub fn digests(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.stable.digest.as_str()).chain(self.rollout.as_ref().map(|r| r.to.digest.as_str()))
    }

    /// End the rollout in progress: promoted (the new version serves everything) or not (the
    /// stable one does). Returns the version that stops serving.
    pub fn end_rollout(&mut self, outcome: Outcome, reason: String) -> Option<Version> {
        let rollout = self.rollout.take()?;
        let to = format!("{} ({})", rollout.to.source, rollout.to.label());
        self.log(match outcome {
            Outcome::Promoted => format!("promoted {to}: {reason}"),
            Outcome::Aborted => format!("rollout to {to} aborted: {reason}"),
            Outcome::Failed => format!("rollout to {to} failed: {reason}"),
        });
        self.last_rollout = Some(RolloutEnd { outcome, to, reason, at_ms: now_ms() });
        match outcome {
            Outcome::Promoted => {
                let old = std::mem::replace(&mut self.stable, rollout.to);
                self.previous = Some(old.clone());
                Some(old)
            }
            Outcome::Aborted | Outcome::Failed => Some(rollout.to),
        }
    }
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// A deployment's name: what clients put in `model`, so plain and short.
pub fn check_name(name: &str) -> Result<(), String> {
    let ok = (1..=64).contains(&name.len())
        && name.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "a deployment name is 1 to 64 lowercase letters, digits, '-', '_' or '.', starting with a letter or digit; got {name:?}"
        ))
    }
}
