//! A key's tokens-per-day quota over a rolling window. The usage rows in SQLite are the truth (a
//! restarted server picks up where it was); a ledger per metered key keeps the window in memory so
//! that checking a request costs no query: loaded from the rows on the key's first request, added to
//! as its requests end, trimmed as time passes.

use std::collections::VecDeque;
use std::time::Duration;

/// A window's length in milliseconds, as usage rows count time.
pub fn millis(window: Duration) -> i64 {
    window.as_millis().min(i64::MAX as u128) as i64
}

/// Whole seconds to tell a client to wait (`Retry-After`): rounded up, so that a client that waits
/// exactly this long is served, and at least one.
pub fn retry_after_seconds(wait: Duration) -> u64 {
    (wait.as_secs_f64().ceil() as u64).max(1)
}

/// What one key used within the window: (when a request ended, Unix ms; its tokens), oldest first;
/// and what the requests running now may still use (reserved when they were admitted, so that
/// many at once cannot overrun the quota together).
#[derive(Debug, Default)]
pub struct TokenLedger {
    entries: VecDeque<(i64, u64)>,
    total: u64,
    reserved: u64,
}

impl TokenLedger {
    pub fn new(entries: impl IntoIterator<Item = (i64, u64)>) -> Self {
        let mut ledger = Self::default();
        for (at_ms, tokens) in entries {
            ledger.add(at_ms, tokens);
        }
        ledger
    }

    pub fn add(&mut self, at_ms: i64, tokens: u64) {
        self.entries.push_back((at_ms, tokens));
        self.total = self.total.saturating_add(tokens);
    }

    /// Hold `tokens` for a request that starts.
    pub fn reserve(&mut self, tokens: u64) {
        self.reserved = self.reserved.saturating_add(tokens);
    }

    /// Let go of a reservation (the request ended, and [`Self::add`] charges what it used).
    pub fn release(&mut self, tokens: u64) {
        self.reserved = self.reserved.saturating_sub(tokens);
    }

    /// Tokens left under `limit` now, reservations counted.
    pub fn left(&mut self, limit: u64, window: Duration, now_ms: i64) -> u64 {
        self.trim(window, now_ms);
        limit.saturating_sub(self.total.saturating_add(self.reserved))
    }

    fn trim(&mut self, window: Duration, now_ms: i64) {
        let window_ms = millis(window);
        while let Some(&(at_ms, tokens)) = self.entries.front() {
            if at_ms > now_ms.saturating_sub(window_ms) {
                break;
            }
            self.entries.pop_front();
            self.total -= tokens;
        }
    }

    /// If `limit` tokens or more were used within `window` of `now_ms` or are reserved: how long
    /// until enough of the oldest leave the window for the total to be under the limit again (a
    /// second, when running requests' reservations alone fill it: they end soon).
    pub fn wait(&mut self, limit: u64, window: Duration, now_ms: i64) -> Option<Duration> {
        let window_ms = millis(window);
        self.trim(window, now_ms);
        if self.total.saturating_add(self.reserved) < limit {
            return None;
        }
        if self.reserved >= limit {
            return Some(Duration::from_secs(1));
        }
        let limit = limit - self.reserved;
        let mut left = self.total;
        for &(at_ms, tokens) in &self.entries {
            left -= tokens;
            if left < limit {
                let wait_ms = at_ms.saturating_add(window_ms).saturating_sub(now_ms).max(0);
                return Some(Duration::from_millis(wait_ms as u64));
            }
        }
        Some(window)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_window_rolls_and_says_when_the_quota_recovers() {
        let day = Duration::from_secs(86_400);
        let ms = |d: Duration| d.as_millis() as i64;
        let mut ledger = TokenLedger::new([(1_000, 60)]);
        assert_eq!(ledger.wait(100, day, 2_000), None, "60 of 100");
        ledger.add(5_000, 50);
        // 110 of 100: once the first 60 leave (a day after they were used) it is 50.
        assert_eq!(ledger.wait(100, day, 6_000), Some(Duration::from_millis(ms(day) as u64 + 1_000 - 6_000)));
        // A request larger than the whole quota: the wait is until that one leaves.
        ledger.add(6_000, 500);
        assert_eq!(ledger.wait(100, day, 7_000), Some(Duration::from_millis(ms(day) as u64 + 6_000 - 7_000)));
        // A day after the first two, only the third is in the window; a day after it, nothing.
        assert_eq!(ledger.wait(1_000, day, 5_000 + ms(day)), None);
        assert_eq!(ledger.total, 500);
        assert_eq!(ledger.wait(100, day, 6_000 + ms(day)), None);
        assert_eq!((ledger.total, ledger.entries.len()), (0, 0));
    }

    #[test]
    fn reservations_count_until_released() {
        let day = Duration::from_secs(86_400);
        let mut ledger = TokenLedger::new([(1_000, 60)]);
        assert_eq!(ledger.left(100, day, 2_000), 40);
        ledger.reserve(30);
        assert_eq!(ledger.left(100, day, 2_000), 10);
        ledger.reserve(10);
        assert_eq!(ledger.wait(100, day, 2_000), Some(Duration::from_millis(ms_day() + 1_000 - 2_000)));
        ledger.release(40);
        ledger.add(3_000, 25);
        assert_eq!(ledger.left(100, day, 4_000), 15);
        ledger.reserve(100);
        assert_eq!(ledger.wait(100, day, 4_000), Some(Duration::from_secs(1)), "reservations alone fill it");
    }

    fn ms_day() -> u64 {
        86_400_000
    }
}
