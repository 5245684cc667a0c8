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
    if let Some(path) = std::env::var_os("VAULT_REGISTRAR_PROMTOOL") {
        return Ok(PathBuf::from(path));
    }
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    if let Some(path) = BUILT.get() {
        return Ok(path.clone());
    }
    let path = built_by("promtool/build.sh")?;
    Ok(BUILT.get_or_init(|| path).clone())
}
