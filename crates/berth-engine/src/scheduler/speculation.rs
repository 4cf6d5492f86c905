//! Prompt-lookup speculation: a generating sequence guesses its next tokens from its own text (the
//! tokens that followed the last time its latest few tokens occurred, as when an answer quotes or
//! edits its input), and the model checks the guesses in the step it runs anyway.
//!
//! Verification samples each position exactly as decoding one token at a time would — the same
//! logits (a drafted token at a generated position is computed as if alone, see
//! [`crate::model::SeqStep::prompt_len`]), the same sampler, the same random draws in the same
//! order — and keeps going only while the sampled token equals the guess. So answers do not
//! change, greedy or sampled, seeded or not: every token kept was sampled from the distribution
//! given the tokens before it. (With a guess that is one token, this is the standard rejection
//! scheme: the guess survives with the probability the model gives it, and a rejection leaves a
//! token drawn from the rest.)
//!
//! Guesses cost compute: every drafted token runs through the model. Whether they pay is decided
//! per step from the step-cost fit ([`super::pacing::StepCost`]) and each sequence's record of
//! accepted guesses ([`Acceptance`]): a guess is worth its cost when the chance it survives beats
//! what it adds to the step's time over what the step yields. Under heavy batching the step is
//! already compute-bound and guesses stop by themselves.

/// Most tokens guessed ahead in one step.
pub const MAX_DRAFT: usize = 8;
/// Longest and shortest runs of latest tokens looked up (longer runs first: their guesses are
/// better).
const NGRAM_MAX: usize = 4;
const NGRAM_MIN: usize = 2;
/// How far back the lookup searches, in tokens.
const WINDOW: usize = 8192;

/// The tokens that followed the most recent earlier occurrence of the sequence's last few tokens,
/// at most `max` of them; empty when its last tokens never occurred before.
pub fn lookup_draft(tokens: &[u32], max: usize) -> Vec<u32> {
    if max == 0 {
        return Vec::new();
    }
    let len = tokens.len();
    let from = len.saturating_sub(WINDOW);
    for n in (NGRAM_MIN..=NGRAM_MAX).rev() {
        if len <= n {
            continue;
        }
        let pattern = &tokens[len - n..];
        // Occurrences that end before the last token, most recent first.
        for start in (from..len - n).rev() {
            if &tokens[start..start + n] == pattern {
                let after = start + n;
                return tokens[after..(after + max).min(len)].to_vec();
            }
        }
    }
    Vec::new()
}

/// A sequence's record of its guesses: how often a guessed token survived, counted with decay so
/// that the record follows the part of the answer being written (a quoted passage, then free text).
#[derive(Debug, Clone)]
pub struct Acceptance {
    survived: f64,
    failed: f64,
    /// Steps since the last guess, to try again now and then after a run of failures.
    quiet_steps: u32,
}

/// Weight of past observations at each new one.
const DECAY: f64 = 0.9;
/// After this many steps without guessing, past failures count half.
const RETRY_AFTER: u32 = 32;

impl Default for Acceptance {
    fn default() -> Self {
        // A prior of one survival and one failure: a guess survives half the time until seen.
        Self { survived: 1.0, failed: 1.0, quiet_steps: 0 }
    }
}

impl Acceptance {
    /// Estimated chance that a guessed token survives, given that those before it did.
    pub fn rate(&self) -> f64 {
        self.survived / (self.survived + self.failed)
    }

    /// How many tokens to guess when each adds `cost` to the step relative to what the step
    /// yields (a drafted token's time over the time per token the step produces): the i-th guess
    /// survives with chance rateⁱ and is worth it while that beats its cost.
    pub fn draft_len(&self, cost: f64) -> usize {
        let rate = self.rate();
        let mut k = 0;
        let mut survives = rate;
        while k < MAX_DRAFT && survives > cost {
            k += 1;
            survives *= rate;
        }
        k
    }

    /// A step verified `drafted` guesses of which the first `accepted` survived.
    pub fn observe(&mut self, drafted: usize, accepted: usize) {
        self.survived = self.survived * DECAY + accepted as f64;
        self.failed = self.failed * DECAY + f64::from(accepted < drafted);
        self.quiet_steps = 0;
    }

    /// A step without guesses.
    pub fn quiet(&mut self) {
        self.quiet_steps += 1;
        if self.quiet_steps >= RETRY_AFTER {
            self.failed *= 0.5;
            self.quiet_steps = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guesses_what_followed_the_latest_tokens_last_time() {
        // "a b c d e ... a b c" → guess "d e".
        let tokens = [1, 2, 3, 4, 5, 9, 9, 1, 2, 3];
        assert_eq!(lookup_draft(&tokens, 2), vec![4, 5]);
        assert_eq!(lookup_draft(&tokens, 8), vec![4, 5, 9, 9, 1, 2, 3]);
        // The most recent occurrence wins.
        let tokens = [7, 8, 1, 7, 8, 2, 7, 8];
        assert_eq!(lookup_draft(&tokens, 1), vec![2]);
        // Nothing to go on: a single repeated token is not a run, and new text has no past.
        assert!(lookup_draft(&[1, 2, 3, 4], 4).is_empty());
        assert!(lookup_draft(&[5, 5], 4).is_empty());
        assert!(lookup_draft(&[1, 2, 1, 2], 0).is_empty());
    }

    #[test]
    fn guesses_grow_with_success_and_stop_when_they_do_not_pay() {
        let mut a = Acceptance::default();
        assert_eq!(a.draft_len(0.4), 1, "half a chance against 0.4: one guess");
        for _ in 0..20 {
            a.observe(4, 4);
        }
        assert!(a.rate() > 0.9);
        assert_eq!(a.draft_len(0.3), MAX_DRAFT);
        assert_eq!(a.draft_len(1.0), 0, "a guess that costs a whole token never pays");
        for _ in 0..30 {
            a.observe(4, 0);
        }
        assert!(a.rate() < 0.3);
        assert_eq!(a.draft_len(0.4), 0);
        // Quiet for a while, past failures fade and guessing resumes.
        for _ in 0..(4 * RETRY_AFTER) {
            a.quiet();
        }
        assert!(a.draft_len(0.4) >= 1, "rate {}", a.rate());
    }
}
