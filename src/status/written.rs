//! The status this term last wrote, for as long as the VaultCluster cache has not shown it.
//! Under load the watch can lag the operator's own writes by seconds. A round that built
//! its status on the stale copy would find it different from what it just built (a
//! condition's transition time is "now" again, an event is due again) and write once
//! more, every burst round, until the cache caught up. So a round starts from the newer
//! of the two. Only the operator writes the status; should another writer change it
//! meanwhile, the cache wins again after `TRUSTED_FOR`.

use std::time::{Duration, Instant};

use crate::crd::VaultClusterStatus;

/// How long a written status outranks a cache that does not show it.
pub const TRUSTED_FOR: Duration = Duration::from_secs(30);

/// One status write of this term.
#[derive(Clone, Debug)]
pub struct StatusWrite {
    pub at: Instant,
    /// The object's resourceVersion that the write returned.
    pub resource_version: Option<String>,
    /// What was written; dropped once the cache has shown it.
    pub status: Option<VaultClusterStatus>,
}

/// What a round starts from: the status written last, or `None` for the cache's (it shows
/// the write, or the write is too old to outrank it).
pub fn newer<'a>(
    cached_version: Option<&str>,
    cached: Option<&VaultClusterStatus>,
    written: &'a StatusWrite,
    now: Instant,
) -> Option<&'a VaultClusterStatus> {
    let status = written.status.as_ref()?;
    let shown = written.resource_version.as_deref() == cached_version || cached == Some(status);
    (!shown && now.duration_since(written.at) < TRUSTED_FOR).then_some(status)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(pods: i32) -> VaultClusterStatus {
        VaultClusterStatus {
            pods,
            ..Default::default()
        }
    }

    fn write(at: Instant, version: &str, pods: i32) -> StatusWrite {
        StatusWrite {
            at,
            resource_version: Some(version.into()),
            status: Some(status(pods)),
        }
    }

    #[test]
    fn the_cache_or_the_last_write() {
        let t = Instant::now();
        let w = write(t, "7", 3);
        let later = t + Duration::from_secs(1);
        // (cache's version, cache's status, now, what the round starts from)
        let cases: [(
            Option<&str>,
            Option<VaultClusterStatus>,
            Instant,
            Option<i32>,
        ); 6] = [
            (Some("5"), Some(status(2)), later, Some(3)),
            (Some("5"), None, later, Some(3)),
            (Some("7"), Some(status(3)), later, None),
            // A spec edit after the write: a newer version, the same status.
            (Some("9"), Some(status(3)), later, None),
            // The cache never shows it (another writer?): the cache wins after a while.
            (Some("5"), Some(status(2)), t + TRUSTED_FOR, None),
            (
                Some("5"),
                Some(status(2)),
                t + TRUSTED_FOR - Duration::from_millis(1),
                Some(3),
            ),
        ];
        for (i, (version, cached, now, expected)) in cases.into_iter().enumerate() {
            let got = newer(version, cached.as_ref(), &w, now).map(|s| s.pods);
            assert_eq!(got, expected, "case {i}");
        }
        let shown = StatusWrite { status: None, ..w };
        assert_eq!(
            newer(Some("5"), Some(&status(2)), &shown, later),
            None,
            "once shown, the cache"
        );
    }
}
