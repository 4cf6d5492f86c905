//! Which version answers a request during a canary.
//!
//! A request that says who it is from (its API key, or an `x-berth-session` header) is assigned by
//! a hash of that identity: the same caller always lands on the same version while the weight
//! stays, and raising the weight only moves callers from the stable version to the new one, never
//! back, so a conversation does not flip between versions mid-way. Anonymous requests are dealt
//! out by a counter in exact proportion (for any run of N requests, within one of N × weight).

use std::sync::atomic::{AtomicU64, Ordering};

use sha2::{Digest as _, Sha256};

/// Whether a request goes to the canary (true) or the stable version.
pub fn to_canary(weight: u8, salt: i64, identity: Option<&str>, counter: &AtomicU64) -> bool {
    let weight = u64::from(weight.min(100));
    match identity {
        Some(id) => bucket(salt, id) < weight * 100,
        None => {
            let n = counter.fetch_add(1, Ordering::Relaxed);
            (n + 1) * weight / 100 > n * weight / 100
        }
    }
}

/// An identity's place in 0..10000, fixed for one rollout (`salt`).
fn bucket(salt: i64, identity: &str) -> u64 {
    let mut h = Sha256::new();
    h.update(salt.to_le_bytes());
    h.update(identity.as_bytes());
    let bytes = h.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&bytes[..8]);
    u64::from_le_bytes(first) % 10_000
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn anonymous_requests_split_exactly() {
        for weight in [0u8, 1, 10, 33, 50, 99, 100] {
            let counter = AtomicU64::new(0);
            let canary = (0..1000).filter(|_| to_canary(weight, 7, None, &counter)).count();
            assert_eq!(canary, weight as usize * 10, "weight {weight}");
        }
    }

    #[test]
    fn an_identity_keeps_its_version_and_only_moves_forward() {
        let counter = AtomicU64::new(0);
        let ids: Vec<String> = (0..2000).map(|i| format!("key-{i}")).collect();
        let at = |w: u8| -> Vec<bool> { ids.iter().map(|id| to_canary(w, 42, Some(id), &counter)).collect() };
        let (ten, fifty) = (at(10), at(50));
        assert_eq!(ten, at(10), "the same weight gives the same assignment");
        assert!(ten.iter().zip(&fifty).all(|(a, b)| !a || *b), "raising the weight never moves a caller back");
        let share = fifty.iter().filter(|c| **c).count() as f64 / ids.len() as f64;
        assert!((0.45..0.55).contains(&share), "{share}");
        assert!(at(100).iter().all(|c| *c) && at(0).iter().all(|c| !*c));
    }
}
