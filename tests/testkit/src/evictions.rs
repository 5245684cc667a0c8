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
    let mut pending: Option<&str> = None;
    for (what, pod) in history {
        match (what.as_str(), pending) {
            ("evict", Some(away)) => {
                return Err(format!(
                    "{pod} evicted before {away} was created again: {history:?}"
                ));
            }
            ("evict", None) => pending = Some(pod),
            ("create", Some(away)) if away == pod => pending = None,
            _ => {}
        }
    }
    Ok(())
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
