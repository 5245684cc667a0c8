//! Client-visible downtime: a client polling the active Service's ClusterIP (through
//! kube-proxy's rules, as a Vault client in the cluster reaches it) beside a poller asking
//! every Vault pod directly, so that what the client lost can be set against Vault's own
//! gap between two active nodes. Figures are printed, not judged against a bound.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};

use crate::election::http_get_at;

/// How long one request may take before it counts as failed.
const REQUEST_LIMIT: Duration = Duration::from_secs(1);
const HEALTH: &str = "/v1/sys/health";

/// How soon after an active answer a run of sealed answers may start and still be the
/// pod that gave it changing its own answer. Moving the Service to another pod takes a
/// probe answer, the operator's write, the EndpointSlice controller and kube-proxy's sync,
/// which together take longer; the old active stepping down has been seen answering 503
/// once, 24 ms after its last 200, then 200 again.
const OWN_CHANGE: Duration = Duration::from_millis(100);

/// What one request got.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Answer(u16),
    /// A body saying sealed or not initialized, whatever the code.
    Sealed(u16),
    /// Refused, reset or not answered within the limit.
    Failed,
}

impl Outcome {
    fn of(code: u16, body: &str) -> Self {
        let body = serde_json::from_str::<serde_json::Value>(body).unwrap_or_default();
        let says =
            |field: &str, value: bool| body.get(field).and_then(|v| v.as_bool()) == Some(value);
        if says("sealed", true) || says("initialized", false) {
            Self::Sealed(code)
        } else {
            Self::Answer(code)
        }
    }
}

#[derive(Clone, Copy, Debug)]
pub struct Sample {
    pub sent: Instant,
    pub outcome: Outcome,
}

/// Asks `GET /v1/sys/health` at one address every `every`, each on a fresh connection and
/// without waiting for the one before, until finished.
pub struct ServiceClient {
    stop: Arc<AtomicBool>,
    samples: Arc<Mutex<Vec<Sample>>>,
    task: tokio::task::JoinHandle<()>,
}

impl ServiceClient {
    pub fn start(addr: SocketAddr, every: Duration) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let samples = Arc::new(Mutex::new(Vec::new()));
        let (stopped, log) = (stop.clone(), samples.clone());
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            // Each request on its own task: one that hangs to its limit must not blind the
            // client to the answers meanwhile.
            let mut requests = tokio::task::JoinSet::new();
            while !stopped.load(Ordering::Relaxed) {
                tick.tick().await;
                let log = log.clone();
                requests.spawn(async move {
                    let sent = Instant::now();
                    let outcome = match http_get_at(addr, HEALTH, REQUEST_LIMIT).await {
                        Ok((code, body)) => Outcome::of(code, &body),
                        Err(_) => Outcome::Failed,
                    };
                    log.lock()
                        .expect("client lock")
                        .push(Sample { sent, outcome });
                });
                while requests.try_join_next().is_some() {}
            }
            requests.join_all().await;
        });
        Self {
            stop,
            samples,
            task,
        }
    }

    /// Whether the last `n` requests were all answered active.
    pub fn settled(&self, n: usize) -> bool {
        let mut samples = self.samples.lock().expect("client lock");
        samples.sort_by_key(|s| s.sent);
        samples.len() >= n
            && samples[samples.len() - n..]
                .iter()
                .all(|s| s.outcome == Outcome::Answer(200))
    }

    pub async fn finish(self) -> Vec<Sample> {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.task.await;
        let mut samples = self.samples.lock().expect("client lock").clone();
        samples.sort_by_key(|s| s.sent);
        samples
    }
}

/// Asks every pod of `selector` directly every `every`, picking up new pods' addresses as
/// they come; records when a pod answered active (200).
pub struct DirectPoller {
    stop: Arc<AtomicBool>,
    actives: Arc<Mutex<Vec<(Instant, String)>>>,
    task: tokio::task::JoinHandle<()>,
}

impl DirectPoller {
    pub fn start(client: &kube::Client, namespace: &str, selector: &str, every: Duration) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let actives = Arc::new(Mutex::new(Vec::new()));
        let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
        let params = ListParams::default().labels(selector);
        let (stopped, log) = (stop.clone(), actives.clone());
        let task = tokio::spawn(async move {
            let mut polled = BTreeSet::new();
            while !stopped.load(Ordering::Relaxed) {
                for (name, ip) in addresses(&pods, &params).await {
                    if polled.insert((name.clone(), ip)) {
                        tokio::spawn(poll_pod(name, ip, every, stopped.clone(), log.clone()));
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        Self {
            stop,
            actives,
            task,
        }
    }

    /// Stops polling; every 200 answer, in time order, with the pod that gave it.
    pub async fn finish(self) -> Vec<(Instant, String)> {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.task.await;
        let mut actives = self.actives.lock().expect("poller lock").clone();
        actives.sort();
        actives
    }
}

async fn addresses(pods: &Api<Pod>, params: &ListParams) -> Vec<(String, Ipv4Addr)> {
    let Ok(list) = pods.list(params).await else {
        return Vec::new();
    };
    list.items
        .into_iter()
        .filter_map(|p| Some((p.metadata.name?, p.status?.pod_ip?.parse().ok()?)))
        .collect()
}

async fn poll_pod(
    name: String,
    ip: Ipv4Addr,
    every: Duration,
    stop: Arc<AtomicBool>,
    log: Arc<Mutex<Vec<(Instant, String)>>>,
) {
    let addr = SocketAddr::new(ip.into(), 8200);
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while !stop.load(Ordering::Relaxed) {
        tick.tick().await;
        // A pod gone leaves an address that no longer answers: a short limit keeps its
        // poller from holding on, and its failures count for nothing here.
        if let Ok((200, _)) = http_get_at(addr, HEALTH, Duration::from_millis(300)).await {
            log.lock()
                .expect("poller lock")
                .push((Instant::now(), name.clone()));
        }
    }
}

/// The figures of one measured window.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Report {
    pub requests: usize,
    /// The longest time from a request not answered active to the next one answered active
    /// (to the end of the window when none was).
    pub longest_outage: Duration,
    /// Answers by a standby: 429 (or a redirect) through the active Service.
    pub by_standby: usize,
    /// Answers by a sealed or uninitialized pod (as its body says) that the Service was
    /// routed to: not a run starting within `OWN_CHANGE` of an active answer.
    pub sealed: usize,
    /// Answers by the pod that had just answered active, saying sealed in its own
    /// transition: a run starting within `OWN_CHANGE` of an active answer.
    pub sealed_by_the_old_active: usize,
    pub failed: usize,
    /// Whether the last request was answered active.
    pub ends_active: bool,
    /// Vault's own gap: the longest time between two 200 answers of any pod, asked directly.
    pub vault_gap: Duration,
    /// The pods answering active before and after that gap.
    pub vault_handover: Option<(String, String)>,
}

impl Report {
    pub fn new(samples: &[Sample], actives: &[(Instant, String)]) -> Self {
        let count = |f: &dyn Fn(Outcome) -> bool| samples.iter().filter(|s| f(s.outcome)).count();
        let (vault_gap, vault_handover) = longest_gap(actives);
        let own = own_sealed(samples);
        Self {
            requests: samples.len(),
            longest_outage: longest_outage(samples),
            by_standby: count(&|o| matches!(o, Outcome::Answer(429 | 300..=399))),
            sealed: count(&|o| matches!(o, Outcome::Sealed(_))) - own,
            sealed_by_the_old_active: own,
            failed: count(&|o| o == Outcome::Failed),
            ends_active: samples
                .last()
                .is_some_and(|s| s.outcome == Outcome::Answer(200)),
            vault_gap,
            vault_handover,
        }
    }

    /// One line for the test's output.
    pub fn line(&self, what: &str) -> String {
        let handover = self
            .vault_handover
            .as_ref()
            .map(|(a, b)| format!(" ({a} -> {b})"))
            .unwrap_or_default();
        format!(
            "{what}: {} requests through the active Service; longest run not answered active {} ms; {} answered by a standby, {} by a sealed pod routed to, {} by the old active saying sealed as it changed, {} failed; Vault's own gap {} ms{handover}",
            self.requests,
            self.longest_outage.as_millis(),
            self.by_standby,
            self.sealed,
            self.sealed_by_the_old_active,
            self.failed,
            self.vault_gap.as_millis(),
        )
    }
}

/// The client's answers as runs of one outcome, from the window's start: "200 x120
/// (0-1210 ms), failed x3 (1220-1250 ms), ...", for reading what happened when.
pub fn timeline(samples: &[Sample]) -> String {
    let Some(first) = samples.first() else {
        return String::new();
    };
    let ms = |s: &Sample| (s.sent - first.sent).as_millis();
    let name = |o: Outcome| match o {
        Outcome::Answer(code) => code.to_string(),
        Outcome::Sealed(code) => format!("{code} sealed"),
        Outcome::Failed => "failed".into(),
    };
    let mut runs: Vec<(Outcome, usize, u128, u128)> = Vec::new();
    for s in samples {
        match runs.last_mut() {
            Some(run) if run.0 == s.outcome => {
                run.1 += 1;
                run.3 = ms(s);
            }
            _ => runs.push((s.outcome, 1, ms(s), ms(s))),
        }
    }
    runs.iter()
        .map(|(o, n, from, to)| format!("{} x{n} ({from}-{to} ms)", name(*o)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// When each pod answered active, asked directly, as runs from `origin`: "vault-0
/// (0-1200 ms), vault-1 (2070-5000 ms)"; a pause of over 50 ms starts a new run.
pub fn active_runs(actives: &[(Instant, String)], origin: Instant) -> String {
    let ms = |t: Instant| t.saturating_duration_since(origin).as_millis();
    let mut runs: Vec<(&str, Instant, Instant)> = Vec::new();
    for (at, pod) in actives {
        match runs.last_mut() {
            Some(run) if run.0 == pod && *at - run.2 <= Duration::from_millis(50) => run.2 = *at,
            _ => runs.push((pod, *at, *at)),
        }
    }
    runs.iter()
        .map(|(pod, from, to)| format!("{pod} ({}-{} ms)", ms(*from), ms(*to)))
        .collect::<Vec<_>>()
        .join(", ")
}

fn longest_outage(samples: &[Sample]) -> Duration {
    let mut longest = Duration::ZERO;
    let mut since: Option<Instant> = None;
    for s in samples {
        match (s.outcome, since) {
            (Outcome::Answer(200), Some(start)) => {
                longest = longest.max(s.sent - start);
                since = None;
            }
            (Outcome::Answer(200), None) => {}
            (_, None) => since = Some(s.sent),
            (_, Some(_)) => {}
        }
    }
    if let (Some(start), Some(last)) = (since, samples.last()) {
        longest = longest.max(last.sent - start);
    }
    longest
}

/// The sealed answers in runs that start within `OWN_CHANGE` of an active answer, with
/// nothing between.
fn own_sealed(samples: &[Sample]) -> usize {
    let mut own = 0;
    let mut last_active: Option<Instant> = None;
    let mut in_own_run = false;
    for s in samples {
        match s.outcome {
            Outcome::Answer(200) => {
                last_active = Some(s.sent);
                in_own_run = false;
            }
            Outcome::Sealed(_) => {
                in_own_run = in_own_run || last_active.is_some_and(|at| s.sent - at <= OWN_CHANGE);
                own += usize::from(in_own_run);
                last_active = None;
            }
            _ => {
                last_active = None;
                in_own_run = false;
            }
        }
    }
    own
}

fn longest_gap(actives: &[(Instant, String)]) -> (Duration, Option<(String, String)>) {
    actives
        .windows(2)
        .map(|w| (w[1].0 - w[0].0, (w[0].1.clone(), w[1].1.clone())))
        .max_by_key(|(gap, _)| *gap)
        .map(|(gap, pods)| (gap, Some(pods)))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples(start: Instant, outcomes: &[Outcome]) -> Vec<Sample> {
        outcomes
            .iter()
            .enumerate()
            .map(|(i, o)| Sample {
                sent: start + Duration::from_millis(10 * i as u64),
                outcome: *o,
            })
            .collect()
    }

    #[test]
    fn the_longest_outage_runs_to_the_next_active_answer() {
        use Outcome::{Answer, Failed};
        let t = Instant::now();
        let s = samples(
            t,
            &[
                Answer(200),
                Answer(429),
                Failed,
                Answer(200),
                Failed,
                Answer(200),
            ],
        );
        let report = Report::new(&s, &[]);
        assert_eq!(report.longest_outage, Duration::from_millis(20));
        assert_eq!((report.by_standby, report.failed), (1, 2));
        assert!(report.ends_active);
        let open = samples(t, &[Answer(200), Answer(503), Answer(503), Answer(503)]);
        let report = Report::new(&open, &[]);
        assert_eq!(report.longest_outage, Duration::from_millis(20));
        assert!(!report.ends_active);
    }

    #[test]
    fn a_sealed_answer_is_the_old_actives_own_only_straight_after_an_active_one() {
        use Outcome::{Answer, Failed, Sealed};
        let t = Instant::now();
        // The active pod changing its own answer: 200, then sealed at once.
        let own = samples(t, &[Answer(200), Sealed(503), Sealed(503), Answer(200)]);
        let report = Report::new(&own, &[]);
        assert_eq!((report.sealed, report.sealed_by_the_old_active), (0, 2));
        // Sealed after a failure or a standby: the Service was moved to a sealed pod.
        let moved = samples(
            t,
            &[Answer(200), Failed, Sealed(503), Answer(429), Sealed(501)],
        );
        let report = Report::new(&moved, &[]);
        assert_eq!((report.sealed, report.sealed_by_the_old_active), (2, 0));
        // Sealed too long after the last active answer (samples every 200 ms).
        let late: Vec<Sample> = [Answer(200), Sealed(503)]
            .iter()
            .enumerate()
            .map(|(i, o)| Sample {
                sent: t + Duration::from_millis(200 * i as u64),
                outcome: *o,
            })
            .collect();
        assert_eq!(Report::new(&late, &[]).sealed, 1);
    }

    #[test]
    fn the_body_not_the_code_says_sealed() {
        let sealed = r#"{"initialized":true,"sealed":true,"standby":true}"#;
        let uninit = r#"{"initialized":false,"sealed":true}"#;
        let standby = r#"{"initialized":true,"sealed":false,"standby":true}"#;
        assert_eq!(Outcome::of(503, sealed), Outcome::Sealed(503));
        assert_eq!(Outcome::of(204, uninit), Outcome::Sealed(204));
        assert_eq!(Outcome::of(503, standby), Outcome::Answer(503));
        assert_eq!(Outcome::of(503, ""), Outcome::Answer(503));
    }

    #[test]
    fn vaults_gap_is_the_longest_between_two_active_answers() {
        let t = Instant::now();
        let at = |ms: u64, pod: &str| (t + Duration::from_millis(ms), pod.to_string());
        let actives = [at(0, "a"), at(10, "a"), at(250, "b"), at(260, "b")];
        let report = Report::new(&[], &actives);
        assert_eq!(report.vault_gap, Duration::from_millis(240));
        assert_eq!(report.vault_handover, Some(("a".into(), "b".into())));
    }
}
