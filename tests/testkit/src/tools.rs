//! The tools the tests run that are built from Go modules of ours and cached outside the
//! repository: the build script prints where, and builds first when the cache lacks them.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use anyhow::{Context, bail};

/// What the build script (relative to tests/) prints last: the path of what it built.
pub fn built_by(script: &str) -> anyhow::Result<PathBuf> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(script);
    let out = Command::new("bash")
        .arg(&script)
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    if !out.status.success() {
        bail!("{} failed with {}", script.display(), out.status);
    }
    let path = PathBuf::from(
        String::from_utf8(out.stdout)?
            .trim()
            .lines()
            .last()
            .unwrap_or_default(),
    );
    if !path.exists() {
        bail!(
            "{} printed {}, which does not exist",
            script.display(),
            path.display()
        );
    }
    Ok(path)
}

/// The real promtool: `VAULT_REGISTRAR_PROMTOOL` when set, else the cached build of
/// tests/promtool, built first when missing.
pub fn promtool() -> anyhow::Result<PathBuf> {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    from_env_or_script("VAULT_REGISTRAR_PROMTOOL", "promtool/build.sh", &BUILT)
}

/// The directory holding the Prometheus Operator's ServiceMonitor and PrometheusRule CRDs:
/// `VAULT_REGISTRAR_PROMETHEUS_OPERATOR_CRDS` when set, else what
/// tests/prometheus-operator/crds.sh fetched from the Go module pinned there.
pub fn prometheus_operator_crds() -> anyhow::Result<PathBuf> {
    static FETCHED: OnceLock<PathBuf> = OnceLock::new();
    from_env_or_script(
        "VAULT_REGISTRAR_PROMETHEUS_OPERATOR_CRDS",
        "prometheus-operator/crds.sh",
        &FETCHED,
    )
}

/// The path in `var` when set, else what `script` prints, run once per process.
pub(crate) fn from_env_or_script(
    var: &str,
    script: &str,
    once: &'static OnceLock<PathBuf>,
) -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os(var) {
        return Ok(PathBuf::from(path));
    }
    if let Some(path) = once.get() {
        return Ok(path.clone());
    }
    let path = built_by(script)?;
    Ok(once.get_or_init(|| path).clone())
}

/// The k8s.io/kubernetes release that a go.mod under tests/ (e.g. "controlplane/go.mod")
/// requires, as "v1.35.4".
pub fn pinned_kubernetes(go_mod: &str) -> anyhow::Result<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(go_mod);
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .map(|l| {
            l.trim()
                .trim_start_matches("require ")
                .split_whitespace()
                .collect::<Vec<_>>()
        })
        .find(|words| words.first() == Some(&"k8s.io/kubernetes"))
        .and_then(|words| words.get(1).map(|v| v.to_string()))
        .with_context(|| format!("{} requires no k8s.io/kubernetes", path.display()))
}
