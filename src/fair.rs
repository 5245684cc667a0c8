//! The probe slots, shared fairly between namespaces. A tenant owns a namespace, not a
//! VaultCluster: with only a per-cluster bound, a namespace holding many clusters of pods
//! that accept a connection and never answer could hold every slot for a whole probe
//! timeout (up to 30 s), and another namespace's failover would wait that long.
//!
//! Two rules, decided by the pure `next` below:
//! - while `busy` namespaces hold or wait for slots, none is granted a slot beyond
//!   `cap(total, busy)`, a share that leaves room for one more namespace: whoever comes
//!   next finds free slots at once instead of waiting for a hung probe to time out;
//! - a freed slot goes to the waiting namespace holding the fewest, the longest waiting
//!   first among equals.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

/// What the scheduler knows of one namespace.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Load {
    /// Slots it holds.
    pub held: usize,
    /// Ticket of its longest-waiting probe, if one waits; tickets grow with time.
    pub oldest: Option<u64>,
}

impl Load {
    fn busy(&self) -> bool {
        self.held > 0 || self.oldest.is_some()
    }
}

/// Most slots one namespace may be granted while `busy` namespaces hold or want slots: an
/// equal share among them and one namespace more, so that a newcomer never waits on the
/// others' probes; at least one.
pub fn cap(total: usize, busy: usize) -> usize {
    (total / (busy + 1)).max(1)
}

/// The namespace the next free slot goes to, if a slot is free and someone may take it.
pub fn next<'a>(
    total: usize,
    in_use: usize,
    loads: impl Iterator<Item = (&'a str, &'a Load)> + Clone,
) -> Option<&'a str> {
    if in_use >= total {
        return None;
    }
    let busy = loads.clone().filter(|(_, l)| l.busy()).count();
    let cap = cap(total, busy);
    loads
        .filter_map(|(ns, l)| Some((l.held, l.oldest?, ns)))
        .filter(|(held, _, _)| *held < cap)
        .min()
        .map(|(_, _, ns)| ns)
}

/// The shared slots.
#[derive(Clone)]
pub struct FairPool {
    state: Arc<Mutex<State>>,
}

struct State {
    total: usize,
    in_use: usize,
    next_ticket: u64,
    namespaces: HashMap<String, Namespace>,
    /// Every probe waiting or granted and not yet taken up, by ticket.
    tickets: HashMap<u64, Ticket>,
}

#[derive(Default)]
struct Namespace {
    load: Load,
    waiting: VecDeque<(u64, oneshot::Sender<()>)>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Ticket {
    Waiting,
    /// Counted as held; the waiter takes it up, or gives it back if it went away.
    Granted,
}

/// One slot, held until dropped.
pub struct Slot {
    pool: FairPool,
    namespace: String,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.pool.state.lock().unwrap().release(&self.namespace);
    }
}

/// A probe waiting for a slot; dropping it (the probe's deadline passed) gives up its place
/// or the slot it was just granted.
struct Waiter {
    pool: FairPool,
    namespace: String,
    ticket: u64,
}

impl Drop for Waiter {
    fn drop(&mut self) {
        let mut state = self.pool.state.lock().unwrap();
        match state.tickets.remove(&self.ticket) {
            Some(Ticket::Waiting) => state.forget_waiter(&self.namespace, self.ticket),
            Some(Ticket::Granted) => state.release(&self.namespace),
            None => {} // taken up as a Slot
        }
    }
}

impl FairPool {
    pub fn new(total: usize) -> Self {
        Self {
            state: Arc::new(Mutex::new(State {
                total: total.max(1),
                in_use: 0,
                next_ticket: 0,
                namespaces: HashMap::new(),
                tickets: HashMap::new(),
            })),
        }
    }

    /// Waits for a slot for a probe of a pod in `namespace`.
    pub async fn acquire(&self, namespace: &str) -> Slot {
        let (mut waiter, granted) = {
            let mut state = self.state.lock().unwrap();
            let ticket = state.next_ticket;
            state.next_ticket += 1;
            let (tx, rx) = oneshot::channel();
            let ns = state.namespaces.entry(namespace.to_string()).or_default();
            ns.load.oldest.get_or_insert(ticket);
            ns.waiting.push_back((ticket, tx));
            state.tickets.insert(ticket, Ticket::Waiting);
            state.dispatch();
            let waiter = Waiter {
                pool: self.clone(),
                namespace: namespace.to_string(),
                ticket,
            };
            (waiter, rx)
        };
        // The sender lives until the grant or until the waiter goes: it cannot fail.
        let _ = granted.await;
        // With its ticket gone the waiter's drop finds nothing to give back, and needs no
        // namespace: the slot takes it. The waiter must still be dropped, not forgotten:
        // forgetting leaked its namespace and its pool handle on every probe (a steady
        // growth of the live heap at 3,000 probes a second).
        self.state.lock().unwrap().tickets.remove(&waiter.ticket);
        Slot {
            pool: self.clone(),
            namespace: std::mem::take(&mut waiter.namespace),
        }
    }

    /// Slots held by each namespace, for tests and metrics.
    pub fn held(&self, namespace: &str) -> usize {
        let state = self.state.lock().unwrap();
        state.namespaces.get(namespace).map_or(0, |n| n.load.held)
    }
}

impl State {
    /// Grants free slots as `next` says, until it names no one.
    fn dispatch(&mut self) {
        loop {
            let loads = self.namespaces.iter().map(|(k, n)| (k.as_str(), &n.load));
            let Some(chosen) = next(self.total, self.in_use, loads).map(str::to_string) else {
                return;
            };
            let ns = self.namespaces.get_mut(&chosen).expect("chosen exists");
            let (ticket, tx) = ns.waiting.pop_front().expect("chosen waits");
            ns.load.oldest = ns.waiting.front().map(|(t, _)| *t);
            ns.load.held += 1;
            self.in_use += 1;
            self.tickets.insert(ticket, Ticket::Granted);
            let _ = tx.send(());
        }
    }

    fn release(&mut self, namespace: &str) {
        self.in_use -= 1;
        if let Some(ns) = self.namespaces.get_mut(namespace) {
            ns.load.held -= 1;
        }
        self.tidy(namespace);
        self.dispatch();
    }

    fn forget_waiter(&mut self, namespace: &str, ticket: u64) {
        if let Some(ns) = self.namespaces.get_mut(namespace) {
            ns.waiting.retain(|(t, _)| *t != ticket);
            ns.load.oldest = ns.waiting.front().map(|(t, _)| *t);
        }
        self.tidy(namespace);
        // A namespace that stopped waiting may lower `busy`, and so raise the cap.
        self.dispatch();
    }

    /// Forgets a namespace that neither holds nor waits, so it stops counting as busy.
    fn tidy(&mut self, namespace: &str) {
        if self
            .namespaces
            .get(namespace)
            .is_some_and(|n| !n.load.busy())
        {
            self.namespaces.remove(namespace);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn load(held: usize, oldest: Option<u64>) -> Load {
        Load { held, oldest }
    }

    #[tokio::test]
    async fn a_granted_slot_and_its_waiter_leave_nothing_behind() {
        let pool = FairPool::new(2);
        for _ in 0..100 {
            let slot = pool.acquire("ns").await;
            assert_eq!(pool.held("ns"), 1);
            drop(slot);
        }
        assert_eq!(pool.held("ns"), 0);
        // Every handle on the pool a waiter or a slot took is given back.
        assert_eq!(Arc::strong_count(&pool.state), 1);
    }

    #[test]
    fn a_share_always_leaves_room_for_one_more_namespace() {
        // (total, busy namespaces, cap)
        for (total, busy, want) in [
            (64, 1, 32),
            (64, 2, 21),
            (64, 3, 16),
            (8, 1, 4),
            (8, 2, 2),
            (8, 7, 1),
            (8, 100, 1),
            (1, 1, 1),
        ] {
            assert_eq!(cap(total, busy), want, "{total} slots, {busy} busy");
        }
    }

    #[test]
    fn the_next_slot_goes_to_the_namespace_that_holds_least() {
        // (scenario, total, in use, namespaces (name, held, oldest ticket), granted to)
        type Case = (
            &'static str,
            usize,
            usize,
            Vec<(&'static str, Load)>,
            Option<&'static str>,
        );
        let cases: Vec<Case> = vec![
            ("nobody waits", 8, 0, vec![("a", load(0, None))], None),
            (
                "alone: up to half",
                8,
                3,
                vec![("a", load(3, Some(1)))],
                Some("a"),
            ),
            (
                "alone at half: no more",
                8,
                4,
                vec![("a", load(4, Some(1)))],
                None,
            ),
            (
                "a newcomer is served though the other waited longer",
                8,
                4,
                vec![("a", load(4, Some(1))), ("b", load(0, Some(9)))],
                Some("b"),
            ),
            (
                "two hogs at their share leave room for a third",
                9,
                6,
                vec![
                    ("a", load(3, Some(1))),
                    ("c", load(3, Some(2))),
                    ("b", load(0, Some(9))),
                ],
                Some("b"),
            ),
            (
                "equal holdings: the longest waiting first",
                8,
                2,
                vec![("a", load(1, Some(5))), ("b", load(1, Some(3)))],
                Some("b"),
            ),
            (
                "over the cap after a newcomer came: no more until below",
                8,
                5,
                vec![("a", load(4, Some(1))), ("b", load(1, None))],
                None,
            ),
            (
                "the pool is full",
                8,
                8,
                vec![("a", load(4, Some(1))), ("b", load(4, Some(2)))],
                None,
            ),
            (
                "more namespaces than slots: one each, in turn",
                2,
                1,
                vec![
                    ("a", load(1, Some(1))),
                    ("b", load(0, Some(2))),
                    ("c", load(0, Some(3))),
                ],
                Some("b"),
            ),
        ];
        for (scenario, total, in_use, loads, want) in cases {
            let got = next(total, in_use, loads.iter().map(|(n, l)| (*n, l)));
            assert_eq!(got, want, "{scenario}");
        }
    }

    #[tokio::test]
    async fn a_namespace_of_hung_probes_leaves_slots_to_another() {
        let pool = FairPool::new(8);
        // Namespace "hog" asks for 40 slots and never gives them back.
        let mut held = Vec::new();
        let mut waiting = Vec::new();
        for _ in 0..40 {
            let pool = pool.clone();
            waiting.push(tokio::spawn(async move { pool.acquire("hog").await }));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        for w in waiting.iter_mut().filter(|w| w.is_finished()) {
            held.push(w.await.unwrap());
        }
        assert_eq!(held.len(), 4, "alone, at most half the pool");
        // Another namespace finds a slot at once, twice over.
        let one = tokio::time::timeout(Duration::from_secs(1), pool.acquire("other")).await;
        let two = tokio::time::timeout(Duration::from_secs(1), pool.acquire("other")).await;
        assert!(one.is_ok() && two.is_ok(), "the other namespace waited");
        assert_eq!((pool.held("hog"), pool.held("other")), (4, 2));
        // A waiter that gives up leaves nothing behind; the hog's queue still drains
        // as slots come back.
        drop(one);
        drop(two);
        tokio::time::sleep(Duration::from_millis(20)).await;
        for w in &waiting {
            w.abort();
        }
        drop(held);
        tokio::time::sleep(Duration::from_millis(20)).await;
        let state = pool.state.lock().unwrap();
        assert_eq!(state.in_use, 0, "every slot came back");
        assert!(state.namespaces.is_empty() && state.tickets.is_empty());
    }
}
