//! The gateway's own queue, fair between API keys. When every replica already has as many of the
//! gateway's requests as it runs at once (its `max_running`), a new request waits here instead of
//! in a replica's first-come queue, where one busy key would hold everyone else up. A freed slot
//! goes to the keys in turn (round-robin over keys with requests waiting, first-come within a key),
//! so a key sending one request now and then gets it through while another sends hundreds. The
//! queue is bounded: past its length, or after waiting its timeout, a request gets 429 with
//! Retry-After.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use tokio::sync::oneshot;

/// Who a request counts against: a hash of its key (`Authorization` or `x-api-key`), or 0 for
/// requests without one.
pub type Tenant = u64;

#[derive(Default)]
struct Waiting {
    by_tenant: HashMap<Tenant, VecDeque<oneshot::Sender<()>>>,
    /// Tenants with requests waiting, in the order their turns come.
    turns: VecDeque<Tenant>,
    len: usize,
}

pub struct FairQueue {
    max: usize,
    waiting: Mutex<Waiting>,
}

impl FairQueue {
    pub fn new(max: usize) -> FairQueue {
        FairQueue { max, waiting: Mutex::new(Waiting::default()) }
    }

    fn waiting(&self) -> std::sync::MutexGuard<'_, Waiting> {
        self.waiting.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Requests waiting now.
    pub fn len(&self) -> usize {
        self.waiting().len
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Wait for a turn: the receiver fires when one comes. `None`: the queue is full.
    pub fn join(&self, tenant: Tenant) -> Option<oneshot::Receiver<()>> {
        let mut w = self.waiting();
        if w.len >= self.max {
            return None;
        }
        let (tx, rx) = oneshot::channel();
        let queue = w.by_tenant.entry(tenant).or_default();
        queue.push_back(tx);
        if queue.len() == 1 {
            w.turns.push_back(tenant);
        }
        w.len += 1;
        Some(rx)
    }

    /// A slot was freed: the next tenant's first request gets it. Requests that stopped waiting
    /// (timed out, or their client left) are skipped.
    pub fn release(&self) {
        let mut w = self.waiting();
        while let Some(tenant) = w.turns.pop_front() {
            let Some(queue) = w.by_tenant.get_mut(&tenant) else { continue };
            let next = queue.pop_front();
            let more = !queue.is_empty();
            if more {
                w.turns.push_back(tenant);
            } else {
                w.by_tenant.remove(&tenant);
            }
            let Some(next) = next else { continue };
            w.len -= 1;
            if next.send(()).is_ok() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn turns_go_round_the_tenants_and_first_come_within_one() {
        let q = FairQueue::new(100);
        let heavy: Vec<_> = (0..5).map(|_| q.join(1).unwrap()).collect();
        let light: Vec<_> = (0..2).map(|_| q.join(2).unwrap()).collect();
        let mut order = Vec::new();
        let mut heavy = heavy.into_iter().map(|r| (1, r)).collect::<VecDeque<_>>();
        let mut light = light.into_iter().map(|r| (2, r)).collect::<VecDeque<_>>();
        for _ in 0..7 {
            q.release();
            for waiting in [&mut heavy, &mut light] {
                if let Some((who, rx)) = waiting.front_mut()
                    && rx.try_recv().is_ok()
                {
                    order.push(*who);
                    waiting.pop_front();
                }
            }
        }
        assert_eq!(order, vec![1, 2, 1, 2, 1, 1, 1]);
        assert!(q.is_empty());
    }

    #[test]
    fn a_full_queue_refuses_and_a_gone_waiter_passes_its_turn_on() {
        let q = FairQueue::new(2);
        let gone = q.join(1).unwrap();
        let mut next = q.join(1).unwrap();
        assert!(q.join(3).is_none(), "full");
        drop(gone);
        q.release();
        assert!(next.try_recv().is_ok(), "the turn skipped the request that left");
        assert_eq!(q.len(), 0);
    }
}
