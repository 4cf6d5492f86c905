//! Choosing a replica for a request, from what the gateway knows of each: its load (requests the
//! gateway has in flight there, or what the replica last reported waiting and running, whichever
//! is more) and whether it has the request's model loaded.
//!
//! Among the replicas with the model loaded (all, when none has it), a request with a prompt goes
//! by rendezvous hashing of its prompt's start: every gateway orders the replicas the same way for
//! the same start, so requests that share a system prompt meet the prefix cache that holds it.
//! The load is bounded (consistent hashing with bounded loads): a replica already holding more than
//! `BOUND` × its fair share (and at least `FLOOR` requests) is passed over for the next in that prefix's order, so a hot prefix
//! spills to a second replica instead of queueing behind itself. Requests without a prompt go to
//! the least loaded. The other replicas follow in the plan, least loaded first: they are where a
//! request that failed before its first byte is retried.

/// How far above an even share a replica's load may go before a prefix's request spills over.
const BOUND: f64 = 1.25;
/// A replica with fewer requests than this is never over its share: it batches them, so a few
/// more cost little, while a prefix sent elsewhere loses its cache.
const FLOOR: f64 = 8.0;

/// How requests are spread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// Prefix affinity with bounded load, model affinity, least load.
    Balanced,
    /// Each request to the next replica in turn (to compare against; knows nothing of load).
    RoundRobin,
}

/// A replica that may take the request.
#[derive(Debug, Clone, Copy)]
pub struct Candidate {
    /// Stable over the replica's life (a hash of its address): what rendezvous hashing mixes.
    pub id: u64,
    pub load: f64,
    pub has_model: bool,
    /// It runs as many of the gateway's requests as it can at once.
    pub full: bool,
}

/// Why a replica was chosen (a metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// First in the prompt start's order.
    Affinity,
    /// The prompt start's first choice was over its share; the next in its order.
    AffinitySpill,
    LeastLoaded,
    RoundRobin,
    /// Tried after the choices above failed before the first byte.
    Retry,
    /// Every replica was saturated or none was ready: the remote endpoint.
    Overflow,
}

impl Reason {
    pub fn label(self) -> &'static str {
        match self {
            Reason::Affinity => "prefix_affinity",
            Reason::AffinitySpill => "prefix_affinity_spill",
            Reason::LeastLoaded => "least_loaded",
            Reason::RoundRobin => "round_robin",
            Reason::Retry => "retry",
            Reason::Overflow => "overflow",
        }
    }
}

/// The order in which to try `candidates` (indices into it): the first is the choice, with its
/// reason; the rest are retries. `turn` rotates ties and round-robin.
pub fn plan(candidates: &[Candidate], prefix: Option<u64>, policy: Policy, turn: usize) -> Vec<(usize, Reason)> {
    let n = candidates.len();
    if n == 0 {
        return Vec::new();
    }
    if policy == Policy::RoundRobin {
        return (0..n).map(|k| ((turn + k) % n, if k == 0 { Reason::RoundRobin } else { Reason::Retry })).collect();
    }
    // First choices: with the model loaded and room, with the model, with room, any.
    let pick = |keep: &dyn Fn(&Candidate) -> bool| (0..n).filter(|&i| keep(&candidates[i])).collect::<Vec<usize>>();
    let pool = [pick(&|c| c.has_model && !c.full), pick(&|c| c.has_model), pick(&|c| !c.full)]
        .into_iter()
        .find(|p| !p.is_empty())
        .unwrap_or_else(|| (0..n).collect());
    // Least loaded first; equal loads in an order that turns with each request.
    let by_load = |set: &mut Vec<usize>| {
        set.sort_by(|&a, &b| {
            candidates[a]
                .load
                .total_cmp(&candidates[b].load)
                .then(((a + n - turn % n) % n).cmp(&((b + n - turn % n) % n)))
        })
    };
    let mut first: Option<(usize, Reason)> = None;
    if let Some(key) = prefix {
        let mut order = pool.clone();
        order.sort_by_key(|&i| std::cmp::Reverse(mix(key ^ candidates[i].id)));
        let total: f64 = pool.iter().map(|&i| candidates[i].load.max(0.0)).sum();
        let cap = ((total + 1.0) * BOUND / pool.len() as f64).ceil().max(FLOOR);
        first = order
            .iter()
            .position(|&i| candidates[i].load + 1.0 <= cap)
            .map(|k| (order[k], if k == 0 { Reason::Affinity } else { Reason::AffinitySpill }));
    }
    let mut rest = pool.clone();
    by_load(&mut rest);
    let first = first.unwrap_or((rest[0], Reason::LeastLoaded));
    let mut others: Vec<usize> = (0..n).filter(|i| !pool.contains(i)).collect();
    by_load(&mut others);
    std::iter::once(first)
        .chain(rest.into_iter().chain(others).filter(|&i| i != first.0).map(|i| (i, Reason::Retry)))
        .collect()
}

/// splitmix64's finaliser: every input bit moves every output bit.
fn mix(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn replicas(loads: &[f64]) -> Vec<Candidate> {
        loads
            .iter()
            .enumerate()
            .map(|(i, &load)| Candidate { id: mix(i as u64 + 7), load, has_model: true, full: false })
            .collect()
    }

    #[test]
    fn the_same_prompt_start_goes_to_the_same_replica_and_starts_spread() {
        let c = replicas(&[0.0, 0.0, 0.0]);
        let mut seen = [0usize; 3];
        for key in 0..300u64 {
            let a = plan(&c, Some(key), Policy::Balanced, 0);
            let b = plan(&c, Some(key), Policy::Balanced, 5);
            assert_eq!(a[0], b[0], "the turn does not move a prefix");
            assert_eq!(a[0].1, Reason::Affinity);
            seen[a[0].0] += 1;
        }
        assert!(seen.iter().all(|&s| s > 60), "starts spread over the replicas: {seen:?}");
    }

    #[test]
    fn a_prefix_whose_replica_is_over_its_share_spills_to_its_next() {
        let key = 42;
        let idle = replicas(&[0.0, 0.0, 0.0]);
        let home = plan(&idle, Some(key), Policy::Balanced, 0)[0].0;
        let mut loads = [0.0; 3];
        loads[home] = FLOOR - 1.0;
        assert_eq!(plan(&replicas(&loads), Some(key), Policy::Balanced, 0)[0].0, home, "under the floor it stays");
        loads[home] = FLOOR + 4.0;
        let busy = replicas(&loads);
        let p = plan(&busy, Some(key), Policy::Balanced, 0);
        assert_ne!(p[0].0, home);
        assert_eq!(p[0].1, Reason::AffinitySpill);
        // Always the same second replica for that prefix.
        assert_eq!(plan(&busy, Some(key), Policy::Balanced, 9)[0].0, p[0].0);
    }

    #[test]
    fn without_a_prompt_the_least_loaded_and_every_replica_is_in_the_plan() {
        let c = replicas(&[3.0, 1.0, 2.0]);
        let p = plan(&c, None, Policy::Balanced, 0);
        assert_eq!(p.iter().map(|x| x.0).collect::<Vec<_>>(), vec![1, 2, 0]);
        assert_eq!(p[0].1, Reason::LeastLoaded);
        assert!(p[1..].iter().all(|x| x.1 == Reason::Retry));
        // Ties turn.
        let even = replicas(&[0.0, 0.0]);
        assert_ne!(plan(&even, None, Policy::Balanced, 0)[0].0, plan(&even, None, Policy::Balanced, 1)[0].0);
    }

    #[test]
    fn replicas_with_the_model_loaded_come_first() {
        let mut c = replicas(&[0.0, 5.0, 0.0]);
        c[0].has_model = false;
        c[2].has_model = false;
        let p = plan(&c, Some(1), Policy::Balanced, 0);
        assert_eq!(p[0].0, 1, "the loaded one, though busier");
        assert_eq!(p.len(), 3, "the others stay as retries");
    }

    #[test]
    fn a_full_replica_is_passed_over_while_another_has_room() {
        let key = 42;
        let mut c = replicas(&[0.0, 0.0, 0.0]);
        let home = plan(&c, Some(key), Policy::Balanced, 0)[0].0;
        c[home].full = true;
        assert_ne!(plan(&c, Some(key), Policy::Balanced, 0)[0].0, home);
        for x in &mut c {
            x.full = true;
        }
        assert_eq!(plan(&c, Some(key), Policy::Balanced, 0)[0].0, home, "all full: affinity again");
    }

    #[test]
    fn round_robin_turns() {
        let c = replicas(&[9.0, 0.0, 0.0]);
        let firsts: Vec<usize> = (0..3).map(|t| plan(&c, Some(3), Policy::RoundRobin, t)[0].0).collect();
        assert_eq!(firsts, vec![0, 1, 2]);
        assert!(plan(&[], None, Policy::Balanced, 0).is_empty());
    }
}
