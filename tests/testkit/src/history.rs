//! Every version of the pods of a namespace that the API server stored, in resourceVersion
//! order, from a pod watch: for claims about every moment ("no moment shows two pods
//! labelled active"), which sampling cannot prove.
//!
//! A watch started from a resourceVersion delivers every later change, in order. The kube
//! watcher resumes a watch that ends from the last version it saw; only when the API server
//! no longer holds that version (410 Gone) does it list again, which skips versions. Such a
//! relist is counted as a gap, and `check` fails on gaps unless the caller allows them (an
//! API server killed and restarted may start its watch cache after the last version seen).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};
use kube::runtime::{WatchStreamExt, watcher};
use tokio::sync::watch;

/// One stored version of one pod: its resourceVersion and whether it carried the label.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Version {
    pub resource_version: u64,
    pub pod: String,
    /// The value of the watched label, None when absent (or the pod deleted).
    pub value: Option<String>,
    pub deleted: bool,
}

/// What the watch saw.
#[derive(Clone, Debug, Default)]
pub struct History {
    /// Every version after the initial list, in the order the API server sent them.
    pub versions: Vec<Version>,
    /// The label's value on each pod when the watch started (and after each relist).
    pub initial: BTreeMap<String, Option<String>>,
    /// Relists after the first: each may have skipped versions.
    pub gaps: usize,
    /// Versions that came with a resourceVersion not above the one before.
    pub out_of_order: usize,
    /// For each moment (the initial state, then after each version or relist) the pods
    /// whose label had the watched value, when that set changed.
    pub sets: Vec<BTreeSet<String>>,
    /// The largest number of pods holding the value at once, and the versions that made it.
    pub most: usize,
    pub most_at: Vec<String>,
    key: String,
    value: String,
}

impl History {
    /// Fails if two pods ever held the value at once, if a pod outside `allowed` (when
    /// given) ever held it, if versions came out of resourceVersion order, or if the watch
    /// relisted more than `gaps_allowed` times.
    pub fn check(&self, allowed: Option<&[&str]>, gaps_allowed: usize) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.out_of_order == 0,
            "{} versions came out of resourceVersion order",
            self.out_of_order
        );
        anyhow::ensure!(
            self.gaps <= gaps_allowed,
            "the pod watch relisted {} times (at most {gaps_allowed} allowed): versions may be missing",
            self.gaps
        );
        anyhow::ensure!(
            self.most <= 1,
            "{} pods labelled {}={} at once, at {:?}; every set: {:?}",
            self.most,
            self.key,
            self.value,
            self.most_at,
            self.sets
        );
        if let Some(allowed) = allowed {
            for set in &self.sets {
                for pod in set {
                    anyhow::ensure!(
                        allowed.contains(&pod.as_str()),
                        "{pod} labelled {}={} though only {allowed:?} may be: {:?}",
                        self.key,
                        self.value,
                        self.sets
                    );
                }
            }
        }
        Ok(())
    }
}

struct State {
    history: History,
    current: BTreeMap<String, Option<String>>,
    /// Each pod's last resourceVersion seen, to tell when the watch has caught up.
    seen: BTreeMap<String, u64>,
    last_rv: u64,
    in_init: bool,
    inits: usize,
    init_buffer: BTreeMap<String, (Option<String>, u64)>,
    error: Option<String>,
    out_of_order: usize,
}

impl State {
    /// One version from the watch, after the initial list.
    fn record(&mut self, pod: &Pod, key: &str, deleted: bool) {
        let name = pod.metadata.name.clone().unwrap_or_default();
        let r = rv(pod);
        if r <= self.last_rv {
            self.error = Some(format!(
                "version {r} of {name} after version {}: out of order",
                self.last_rv
            ));
            self.out_of_order += 1;
        }
        self.last_rv = self.last_rv.max(r);
        let value = if deleted { None } else { label(pod, key) };
        if deleted {
            self.current.remove(&name);
        } else {
            self.current.insert(name.clone(), value.clone());
        }
        self.seen.insert(name.clone(), r);
        self.history.versions.push(Version {
            resource_version: r,
            pod: name.clone(),
            value,
            deleted,
        });
        self.note_set(format!("{name}@{r}"));
    }

    fn note_set(&mut self, at: String) {
        let set: BTreeSet<String> = self
            .current
            .iter()
            .filter(|(_, v)| v.as_deref() == Some(self.history.value.as_str()))
            .map(|(k, _)| k.clone())
            .collect();
        if set.len() > self.history.most {
            self.history.most = set.len();
            self.history.most_at.clear();
        }
        if set.len() > 1 && set.len() == self.history.most {
            self.history.most_at.push(at);
        }
        if self.history.sets.last() != Some(&set) {
            self.history.sets.push(set);
        }
    }
}

/// A running watch of the pods of a namespace and one label; `finish` ends it.
pub struct LabelHistory {
    state: Arc<Mutex<State>>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    pods: Api<Pod>,
}

fn rv(pod: &Pod) -> u64 {
    pod.metadata
        .resource_version
        .as_deref()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn label(pod: &Pod, key: &str) -> Option<String> {
    pod.metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(key))
        .cloned()
}

impl LabelHistory {
    /// Starts watching label `key` (the value that must be unique: `value`) on the pods of
    /// `namespace`; returns once the initial list is in, so what follows is all seen.
    pub async fn start(
        client: kube::Client,
        namespace: &str,
        key: &str,
        value: &str,
    ) -> anyhow::Result<Self> {
        let pods: Api<Pod> = Api::namespaced(client, namespace);
        let state = Arc::new(Mutex::new(State {
            history: History {
                key: key.into(),
                value: value.into(),
                ..History::default()
            },
            current: BTreeMap::new(),
            seen: BTreeMap::new(),
            last_rv: 0,
            in_init: false,
            inits: 0,
            init_buffer: BTreeMap::new(),
            error: None,
            out_of_order: 0,
        }));
        let (stop, mut stopped) = watch::channel(false);
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let st = state.clone();
        let key = key.to_string();
        let stream = watcher(pods.clone(), watcher::Config::default()).default_backoff();
        let task = tokio::spawn(async move {
            let mut ready = Some(ready_tx);
            let mut stream = std::pin::pin!(stream);
            loop {
                let event = tokio::select! {
                    _ = stopped.changed() => return,
                    e = stream.next() => e,
                };
                let Some(event) = event else { return };
                let mut s = st.lock().unwrap();
                match event {
                    Err(e) => {
                        // Connection errors are retried from the last version; a 410 leads
                        // to a relist, counted below.
                        s.error = Some(e.to_string());
                    }
                    Ok(watcher::Event::Init) => {
                        s.in_init = true;
                        s.init_buffer.clear();
                    }
                    Ok(watcher::Event::InitApply(pod)) => {
                        let name = pod.metadata.name.clone().unwrap_or_default();
                        let v = (label(&pod, &key), rv(&pod));
                        s.init_buffer.insert(name, v);
                    }
                    Ok(watcher::Event::InitDone) => {
                        s.in_init = false;
                        s.inits += 1;
                        let buffer = std::mem::take(&mut s.init_buffer);
                        s.current = buffer
                            .iter()
                            .map(|(k, (v, _))| (k.clone(), v.clone()))
                            .collect();
                        s.seen = buffer.iter().map(|(k, (_, r))| (k.clone(), *r)).collect();
                        if s.inits == 1 {
                            s.history.initial = s.current.clone();
                        } else {
                            s.history.gaps += 1;
                        }
                        s.last_rv = s.last_rv.max(s.seen.values().copied().max().unwrap_or(0));
                        let at = format!("list #{}", s.inits);
                        s.note_set(at);
                        if let Some(tx) = ready.take() {
                            let _ = tx.send(());
                        }
                    }
                    Ok(watcher::Event::Apply(pod)) => s.record(&pod, &key, false),
                    // A Delete event carries the pod's last stored version; it leaves.
                    Ok(watcher::Event::Delete(pod)) => s.record(&pod, &key, true),
                }
            }
        });
        let mut history = Self {
            state,
            stop,
            task,
            pods,
        };
        match tokio::time::timeout(Duration::from_secs(30), ready_rx).await {
            Ok(Ok(())) => Ok(history),
            _ => {
                let error = history.state.lock().unwrap().error.clone();
                history.stop_now();
                anyhow::bail!("the pod watch did not list the pods within 30 s: {error:?}")
            }
        }
    }

    fn stop_now(&mut self) {
        let _ = self.stop.send(true);
        self.task.abort();
    }

    /// The largest number of pods that held the value at once so far.
    pub fn most(&self) -> usize {
        self.state.lock().unwrap().history.most
    }

    /// Waits until the watch has seen every pod at the version a fresh list shows (so no
    /// write before this call is missed), then stops and returns what it saw.
    pub async fn finish(mut self) -> anyhow::Result<History> {
        let result = tokio::time::timeout(Duration::from_secs(60), async {
            loop {
                // A list from the API server's current state (not its watch cache).
                let list = self.pods.list(&ListParams::default()).await?;
                let want: BTreeMap<String, u64> = list
                    .items
                    .iter()
                    .map(|p| (p.metadata.name.clone().unwrap_or_default(), rv(p)))
                    .collect();
                let caught_up = {
                    let s = self.state.lock().unwrap();
                    want.iter()
                        .all(|(name, r)| s.seen.get(name).is_some_and(|seen| seen >= r))
                };
                if caught_up {
                    return anyhow::Ok(());
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
        .await;
        self.stop_now();
        let s = self.state.lock().unwrap();
        let mut history = s.history.clone();
        history.out_of_order = s.out_of_order;
        match result {
            Ok(Ok(())) => Ok(history),
            Ok(Err(e)) => Err(e),
            Err(_) => anyhow::bail!(
                "the pod watch did not catch up with the pods within 60 s (last error {:?})",
                s.error
            ),
        }
    }
}

impl Drop for LabelHistory {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        self.task.abort();
    }
}
