//! How much a step may carry, learned from the steps already run.
//!
//! A step's wall time is close to linear in what it runs: a fixed part (waking the workers, the
//! per-layer bookkeeping), a part per generated-position token (its matrix-vector work, its logits,
//! its sampling), a part per prompt token (matrix-matrix work), and attention over the cached
//! positions each token reads. [`StepCost`] fits those four coefficients online (non-negative least
//! squares over exponentially weighted recent steps) from every step's measured time, so the
//! figures follow the machine (threads, other models taking turns on the team, a noisy neighbour)
//! rather than a table.
//!
//! The scheduler uses the fit two ways (Sarathi-Serve's stall-free batching, with the budget from
//! measurements rather than a fixed token count):
//! - a step that carries generating sequences takes prompt tokens only up to a time limit derived
//!   from what its decodes alone cost and how many requests are still on their prompts
//!   ([`StepTarget::limit_ms`]), so a new prompt slows the running streams by a bounded share
//!   instead of stalling them for a whole chunk;
//! - the running set grows only while a larger batch still pays in throughput: past the point where
//!   the weights' reading is shared well enough, one more stream only slows every other one, and the
//!   newcomer is better served waiting for the next free place ([`Pacer::may_grow`]).

use std::time::Duration;

/// What one step runs, as the cost model sees it.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StepShape {
    /// Tokens at generated positions (a sampled token, a grammar's forced ones).
    pub decode_tokens: usize,
    /// Prompt tokens (prefill chunks, recomputation after preemption).
    pub prompt_tokens: usize,
    /// Cached positions read by attention, summed over the step's tokens.
    pub attended: usize,
}

impl StepShape {
    /// Add a sequence's `n` tokens starting at position `start`, prompt or generated.
    pub fn add(&mut self, start: usize, n: usize, prompt: bool) {
        if prompt {
            self.prompt_tokens += n;
        } else {
            self.decode_tokens += n;
        }
        // Token i reads positions 0..=start+i.
        self.attended += n * start + n * (n + 1) / 2;
    }

    fn features(&self) -> [f64; FEATURES] {
        [1.0, self.decode_tokens as f64, self.prompt_tokens as f64, self.attended as f64 / ATTENDED_UNIT]
    }
}

const FEATURES: usize = 4;
/// Attended positions are counted in thousands, so the four coefficients are of like magnitude.
const ATTENDED_UNIT: f64 = 1000.0;
/// Weight of a step that many steps back: 0.99^n (a half-life of about 70 steps, a few seconds of
/// serving), long enough to average out noise, short enough to follow a change of load.
const FORGETTING: f64 = 0.99;
/// A little ridge keeps the normal equations solvable while the steps seen so far are all alike.
const RIDGE: f64 = 1.0e-3;
/// Steps seen (of both kinds) before the fit is trusted; until then steps are sized by the
/// configured maximum.
const WARMUP_STEPS: u32 = 4;

/// A step's time as a linear function of its shape, fitted online (milliseconds): least squares
/// over exponentially weighted past steps, with every coefficient non-negative (more work never
/// predicted to take less time). Four unknowns make the exact non-negative solution cheap: the
/// best of the fits on each subset of the features whose coefficients all come out non-negative.
#[derive(Debug, Clone, Default)]
pub struct StepCost {
    /// Weighted sums of x xᵀ and x y over the steps seen.
    xx: [[f64; FEATURES]; FEATURES],
    xy: [f64; FEATURES],
    theta: [f64; FEATURES],
    seen: u32,
    /// Whether steps of both kinds have been seen (without prompt steps nothing is known of a
    /// prompt token's cost, and so on).
    seen_decode: bool,
    seen_prompt: bool,
}

impl StepCost {
    /// Learn from a step that ran `shape` in `took`.
    pub fn observe(&mut self, shape: &StepShape, took: Duration) {
        if shape.decode_tokens + shape.prompt_tokens == 0 {
            return;
        }
        let y = took.as_secs_f64() * 1000.0;
        if !y.is_finite() {
            return;
        }
        let x = shape.features();
        for i in 0..FEATURES {
            for j in 0..FEATURES {
                self.xx[i][j] = self.xx[i][j] * FORGETTING + x[i] * x[j];
            }
            self.xy[i] = self.xy[i] * FORGETTING + x[i] * y;
        }
        self.theta = self.solve();
        self.seen = self.seen.saturating_add(1);
        self.seen_decode |= shape.decode_tokens > 0;
        self.seen_prompt |= shape.prompt_tokens > 0;
    }

    /// The non-negative least-squares coefficients: of the subsets of features whose
    /// unconstrained fit is non-negative, the one that explains the most (the largest θᵀXᵀy,
    /// which for a least-squares fit on a subset is what it removes from the residual).
    fn solve(&self) -> [f64; FEATURES] {
        let mut best = ([0.0; FEATURES], 0.0);
        for mask in 1u32..(1 << FEATURES) {
            let idx: Vec<usize> = (0..FEATURES).filter(|i| mask & (1 << i) != 0).collect();
            let m = idx.len();
            let mut a = vec![vec![0.0; m + 1]; m];
            for (r, &i) in idx.iter().enumerate() {
                for (c, &j) in idx.iter().enumerate() {
                    a[r][c] = self.xx[i][j] + if r == c { RIDGE * (1.0 + self.xx[i][i]) } else { 0.0 };
                }
                a[r][m] = self.xy[i];
            }
            let Some(sol) = gauss(a) else { continue };
            if sol.iter().any(|v| *v < 0.0 || !v.is_finite()) {
                continue;
            }
            let explained: f64 = idx.iter().zip(&sol).map(|(&i, v)| v * self.xy[i]).sum();
            if explained > best.1 {
                let mut theta = [0.0; FEATURES];
                for (&i, v) in idx.iter().zip(&sol) {
                    theta[i] = *v;
                }
                best = (theta, explained);
            }
        }
        best.0
    }

    /// Whether the fit has seen enough steps of each kind to size steps by.
    pub fn is_calibrated(&self) -> bool {
        self.seen >= WARMUP_STEPS && self.seen_decode && self.seen_prompt
    }

    /// Predicted time of a step (ms).
    pub fn predict(&self, shape: &StepShape) -> f64 {
        dot(&self.theta, &shape.features())
    }

    /// Whether a running set of `n` generating sequences gains throughput from one more: the
    /// per-token time at n+1 must beat the time at n by at least `min_gain` (a share, 0.01 = 1%).
    /// `context` is the mean length the sequences attend to.
    pub fn batch_pays(&self, n: usize, context: usize, min_gain: f64) -> bool {
        if n == 0 || !self.is_calibrated() {
            return true;
        }
        let per_token = |n: usize| {
            let shape = StepShape { decode_tokens: n, prompt_tokens: 0, attended: n * context };
            self.predict(&shape) / n as f64
        };
        let (now, more) = (per_token(n), per_token(n + 1));
        now > 0.0 && more < now * (1.0 - min_gain)
    }
}

/// What the scheduler aims for: how long a step that carries generating sequences may take (every
/// stream waits for the whole step, so this is their time between tokens).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepTarget {
    /// Time between a stream's tokens to stay under where the machine allows: prompt work joins a
    /// step only up to it, and the running set grows past it only while a larger batch still pays.
    pub itl: Duration,
    /// Prompt work may add at most this share of the decodes' own time (1.0: a step takes at most
    /// twice what its decodes alone would), so short decode steps are not stretched to `itl`...
    pub prompt_share: f64,
    /// ... but at least this much time, so prompts still move when decode steps are very short or
    /// already at the target.
    pub min_prompt_time: Duration,
    /// Past `itl`, one more running sequence must still cut the time per generated token by this
    /// share (0.05: 5%).
    pub min_batch_gain: f64,
}

impl Default for StepTarget {
    fn default() -> Self {
        Self {
            itl: Duration::from_millis(100),
            prompt_share: 1.0,
            min_prompt_time: Duration::from_millis(10),
            min_batch_gain: 0.05,
        }
    }
}

impl StepTarget {
    /// The time (ms) a step may take whose decodes alone are predicted to take `decode_ms`, for
    /// `streams` generating sequences while `starting` admitted ones are still on their prompts.
    ///
    /// Prompt work gets the larger of two allowances: what keeps the streams' pace (a share of
    /// their decode time, up to `itl`), and a fair share of the step: each request still on its
    /// prompt as much time as each stream's token takes. The second matters when many requests
    /// arrive at once beside few streams: holding all of them back for the sake of those few
    /// would trade a little smoothness for long first-token waits.
    pub fn limit_ms(&self, decode_ms: f64, streams: usize, starting: usize) -> f64 {
        let to_target = ms(self.itl) - decode_ms;
        let pace = (decode_ms * self.prompt_share).min(to_target);
        let fair = decode_ms * starting as f64 / streams.max(1) as f64;
        decode_ms + pace.max(fair).max(ms(self.min_prompt_time))
    }
}

/// The fit and the target together: what the scheduler asks.
#[derive(Debug, Clone, Default)]
pub struct Pacer {
    pub cost: StepCost,
    pub target: StepTarget,
}

impl Pacer {
    pub fn new(target: StepTarget) -> Self {
        Self { cost: StepCost::default(), target }
    }

    /// The time (ms) a step whose decodes are `decodes` (of `streams` sequences, while `starting`
    /// wait for their prompts) may take with prompt work added; `None` when nothing limits it (no
    /// stream waits on the step, or the fit is not trusted yet).
    pub fn limit_ms(&self, decodes: &StepShape, streams: usize, starting: usize) -> Option<f64> {
        if decodes.decode_tokens == 0 || !self.cost.is_calibrated() {
            return None;
        }
        Some(self.target.limit_ms(self.cost.predict(decodes), streams, starting))
    }

    /// The most of `n` prompt tokens from position `start` that keep a step of `shape` within
    /// `limit_ms`, as predicted.
    pub fn prompt_tokens_within(&self, shape: &StepShape, start: usize, n: usize, limit_ms: f64) -> usize {
        let with = |k: usize| {
            let mut s = *shape;
            s.add(start, k, true);
            self.cost.predict(&s)
        };
        // Predictions grow with k (the coefficients are non-negative): the largest k within the
        // limit, by bisection.
        let (mut lo, mut hi) = (0, n);
        while lo < hi {
            let mid = (lo + hi).div_ceil(2);
            if with(mid) <= limit_ms { lo = mid } else { hi = mid - 1 }
        }
        lo
    }

    /// Whether a running set of `n` sequences (attending to `context` positions on average) may
    /// take one more: while its decode steps stay within the target, or past it while the batch
    /// still gains throughput.
    pub fn may_grow(&self, n: usize, context: usize) -> bool {
        if !self.cost.is_calibrated() {
            return true;
        }
        let next = StepShape { decode_tokens: n + 1, prompt_tokens: 0, attended: (n + 1) * context };
        self.cost.predict(&next) <= ms(self.target.itl) || self.cost.batch_pays(n, context, self.target.min_batch_gain)
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn dot(a: &[f64; FEATURES], b: &[f64; FEATURES]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Solve the m×(m+1) augmented system by Gaussian elimination with partial pivoting; `None` when
/// it is singular.
fn gauss(mut a: Vec<Vec<f64>>) -> Option<Vec<f64>> {
    let m = a.len();
    for col in 0..m {
        let pivot = (col..m).max_by(|&r, &s| a[r][col].abs().total_cmp(&a[s][col].abs()))?;
        if a[pivot][col].abs() < 1e-12 {
            return None;
        }
        a.swap(col, pivot);
        let pivot_row = a[col].clone();
        for (r, row) in a.iter_mut().enumerate() {
            if r != col {
                let f = row[col] / pivot_row[col];
                for (v, p) in row[col..].iter_mut().zip(&pivot_row[col..]) {
                    *v -= f * p;
                }
            }
        }
    }
    Some((0..m).map(|r| a[r][m] / a[r][r]).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A machine whose steps cost 3 ms + 2 ms per decode + 0.5 ms per prompt token + 0.1 ms per
    /// thousand attended positions.
    fn truth(s: &StepShape) -> f64 {
        3.0 + 2.0 * s.decode_tokens as f64 + 0.5 * s.prompt_tokens as f64 + 0.1 * s.attended as f64 / 1000.0
    }

    fn shapes() -> impl Iterator<Item = StepShape> {
        (0..400).map(|i| {
            let mut s = StepShape::default();
            for k in 0..(i % 7) {
                s.add(100 + 13 * k, 1, false);
            }
            if i % 3 == 0 {
                s.add(i % 50, 16 + (i * 37) % 200, true);
            }
            s
        })
    }

    #[test]
    fn the_fit_finds_the_costs_of_a_linear_machine() {
        let mut cost = StepCost::default();
        assert!(!cost.is_calibrated());
        for s in shapes() {
            cost.observe(&s, Duration::from_secs_f64(truth(&s) / 1000.0));
        }
        assert!(cost.is_calibrated());
        for s in shapes().take(20) {
            let (want, got) = (truth(&s), cost.predict(&s));
            assert!((want - got).abs() < 0.05 * want, "predicted {got} ms for a {want} ms step");
        }
    }

    #[test]
    fn noise_does_not_make_more_work_look_cheaper() {
        let mut cost = StepCost::default();
        // Alternating wild timings: whatever the fit becomes, predictions stay monotone.
        for (i, s) in shapes().enumerate() {
            let ms = if i % 2 == 0 { 1.0 } else { 200.0 };
            cost.observe(&s, Duration::from_secs_f64(ms / 1000.0));
        }
        let small = StepShape { decode_tokens: 1, prompt_tokens: 10, attended: 100 };
        let large = StepShape { decode_tokens: 8, prompt_tokens: 100, attended: 10_000 };
        assert!(cost.predict(&large) >= cost.predict(&small));
        assert!(cost.predict(&small) >= 0.0);
    }

    #[test]
    fn a_batch_pays_until_the_fixed_cost_is_shared_out() {
        let mut cost = StepCost::default();
        for s in shapes() {
            cost.observe(&s, Duration::from_secs_f64(truth(&s) / 1000.0));
        }
        // Per-token time 3/n + 2: one more stream gains 3/(n(n+1)) / (3/n + 2).
        assert!(cost.batch_pays(1, 100, 0.05));
        assert!(!cost.batch_pays(32, 100, 0.05));
        // Nothing known yet: grow.
        assert!(StepCost::default().batch_pays(100, 100, 0.05));
    }

    #[test]
    fn the_target_leaves_prompts_a_share_up_to_the_itl_and_a_floor() {
        let t = StepTarget {
            itl: Duration::from_millis(100),
            prompt_share: 0.5,
            min_prompt_time: Duration::from_millis(10),
            min_batch_gain: 0.05,
        };
        // Short decode steps: half again for prompts, at least 10 ms.
        assert_eq!(t.limit_ms(40.0, 10, 1), 60.0);
        assert_eq!(t.limit_ms(4.0, 10, 1), 14.0);
        // Near the target: up to it; past it: the floor only.
        assert_eq!(t.limit_ms(80.0, 10, 1), 100.0);
        assert_eq!(t.limit_ms(150.0, 20, 1), 160.0);
        // Many requests starting beside few streams: each gets a stream's share of the step.
        assert_eq!(t.limit_ms(20.0, 2, 14), 160.0);
    }

    #[test]
    fn the_running_set_grows_to_the_target_then_while_it_pays() {
        let mut pacer = Pacer::new(StepTarget { itl: Duration::from_millis(50), ..StepTarget::default() });
        assert!(pacer.may_grow(1000, 100), "nothing known yet");
        for s in shapes() {
            pacer.cost.observe(&s, Duration::from_secs_f64(truth(&s) / 1000.0));
        }
        // 3 + 2n ms: 23 sequences fit in 50 ms.
        assert!(pacer.may_grow(20, 100));
        // Past it, one more would gain 3/((n+1)(3+2n)) per token: far below 5%.
        assert!(!pacer.may_grow(30, 100));
        assert!(pacer.limit_ms(&StepShape::default(), 0, 1).is_none(), "no stream waits on a prompt-only step");
        let decodes = StepShape { decode_tokens: 10, prompt_tokens: 0, attended: 1000 };
        let limit = pacer.limit_ms(&decodes, 10, 1).expect("calibrated");
        assert!((limit - 46.2).abs() < 2.0, "{limit}");
    }

    #[test]
    fn attention_counts_every_position_read() {
        let mut s = StepShape::default();
        s.add(10, 1, false);
        assert_eq!(s.attended, 11);
        s.add(0, 3, true);
        assert_eq!((s.attended, s.prompt_tokens, s.decode_tokens), (11 + 6, 3, 1));
    }
}
