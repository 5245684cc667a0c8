//! An upgrade's steps as the API server's audit log records them: the evictions and the
//! StatefulSet controller's pod creations in one namespace, in order. The tests hold the
//! operator to this record, not to its own word.

/// The successful pod creations and evictions among `writes` (as
/// `ControlPlane::writes_in` gives them): ("create" | "evict", pod name), in order.
pub fn pod_history(writes: Vec<(String, String, String, String, i64)>) -> Vec<(String, String)> {
    writes
        .into_iter()
        .filter(|(_, verb, resource, _, code)| {
            *code < 300 && verb == "create" && (resource == "pods" || resource == "pods/eviction")
        })
        .map(|(_, _, resource, name, _)| {
            let what = if resource == "pods" {
                "create"
            } else {
                "evict"
            };
            (what.to_string(), name)
        })
        .collect()
}

/// The evicted pods, in order.
pub fn evicted(history: &[(String, String)]) -> Vec<String> {
    history
        .iter()
        .filter(|(what, _)| what == "evict")
        .map(|(_, pod)| pod.clone())
        .collect()
}

/// Fails when a pod was evicted before the pod evicted last was created again: two pods
/// away at once.
pub fn one_at_a_time(history: &[(String, String)]) -> Result<(), String> {
    match away_at_evictions(history)
        .into_iter()
        .find(|(_, away)| *away > 1)
    {
        Some((pod, _)) => Err(format!(
            "{pod} evicted before the pod evicted before it was created again: {history:?}"
        )),
        None => Ok(()),
    }
}

/// For each eviction, the pod and how many pods were then evicted and not yet created
/// again, itself included.
pub fn away_at_evictions(history: &[(String, String)]) -> Vec<(String, usize)> {
    let mut away = std::collections::BTreeSet::new();
    let mut out = Vec::new();
    for (what, pod) in history {
        match what.as_str() {
            "evict" => {
                away.insert(pod.as_str());
                out.push((pod.clone(), away.len()));
            }
            "create" => {
                away.remove(pod.as_str());
            }
            _ => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(items: &[(&str, &str)]) -> Vec<(String, String)> {
        items
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    #[test]
    fn one_at_a_time_reads_the_history() {
        assert!(
            one_at_a_time(&h(&[("evict", "v-2"), ("create", "v-2"), ("evict", "v-1")])).is_ok()
        );
        assert!(
            one_at_a_time(&h(&[("evict", "v-2"), ("create", "v-1"), ("evict", "v-1")])).is_err()
        );
        let pairs = h(&[
            ("evict", "v-4"),
            ("evict", "v-3"),
            ("create", "v-4"),
            ("create", "v-3"),
            ("evict", "v-0"),
        ]);
        let away: Vec<usize> = away_at_evictions(&pairs)
            .into_iter()
            .map(|(_, n)| n)
            .collect();
        assert_eq!(away, [1, 2, 1]);
    }

    #[test]
    fn the_history_keeps_successful_pod_creations_and_evictions() {
        let w = |user: &str, verb: &str, resource: &str, name: &str, code: i64| {
            (user.into(), verb.into(), resource.into(), name.into(), code)
        };
        let writes = vec![
            w("kcm", "create", "pods", "v-0", 201),
            w("op", "create", "pods/eviction", "v-1", 429),
            w("op", "create", "pods/eviction", "v-2", 201),
            w("op", "patch", "pods", "v-2", 200),
            w("kcm", "create", "pods", "v-2", 201),
        ];
        let history = pod_history(writes);
        assert_eq!(
            history,
            h(&[("create", "v-0"), ("evict", "v-2"), ("create", "v-2")])
        );
        assert_eq!(evicted(&history), ["v-2"]);
    }
}
