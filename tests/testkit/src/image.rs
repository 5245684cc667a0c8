//! Container images built here with buildah, without a registry or a base image download:
//! the operator's from the repository's Dockerfile, the Vault simulator's and the pause
//! image the node's sandboxes run.
//!
//! The Dockerfile's runtime stage starts from distroless `cc-debian12:nonroot`: Debian 12's
//! C runtime (libc, libm, libgcc_s, the loader), CA certificates and a `nonroot` user (65532),
//! no shell. The same base is assembled here from this Debian 12 machine's own files, and the
//! runtime stage's instructions are used as they stand, so the image has the layout users
//! get from `docker build`. The binaries are the ones the tests built, stripped.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::machine;
use crate::stage::run;

/// Repository and tag of the operator's image, as the chart's values name it.
pub const OPERATOR_REPOSITORY: &str = "localhost/vault-registrar";
pub const TAG: &str = "test";
pub const SIM_IMAGE: &str = "localhost/vault-registrar-sim:test";
pub const PAUSE_IMAGE: &str = "localhost/vault-registrar-pause:test";
/// Real Vault, from the binary tests/vault/build.sh makes.
pub const VAULT_IMAGE: &str = "localhost/vault:test";

pub fn operator_image() -> String {
    format!("{OPERATOR_REPOSITORY}:{TAG}")
}

/// One built image, saved as a docker-archive that `ctr images import` loads.
#[derive(Debug)]
pub struct Image {
    pub name: String,
    pub archive: PathBuf,
    /// The image configuration (`config` of the OCI image config: User, Entrypoint, Cmd...).
    pub config: serde_json::Value,
    /// Every path in the image's file system, absolute.
    pub files: BTreeSet<String>,
}

#[derive(Debug)]
pub struct Images {
    pub operator: Image,
    pub sim: Image,
    pub pause: Image,
    /// How long building all three took.
    pub took: Duration,
}

/// The three images, built once per process. Call it with the machine lock held: buildah
/// writes to fixed places (removed again here) that a node's teardown also removes.
pub fn built(operator_bin: &Path) -> anyhow::Result<&'static Images> {
    static IMAGES: OnceLock<Result<Images, String>> = OnceLock::new();
    IMAGES
        .get_or_init(|| build_all(operator_bin).map_err(|e| format!("{e:#}")))
        .as_ref()
        .map_err(|e| anyhow::anyhow!("building the images: {e}"))
}

fn build_all(operator_bin: &Path) -> anyhow::Result<Images> {
    let start = Instant::now();
    with_builder(|builder| {
        let testkit = testkit_bins()?;
        Ok::<_, anyhow::Error>(Images {
            operator: builder.build(
                &operator_image(),
                operator_bin,
                "vault-registrar",
                &operator_containerfile(&dockerfile())?,
            )?,
            sim: builder.build(
                SIM_IMAGE,
                &testkit.join("vault-sim"),
                "vault-sim",
                SIM_CONTAINERFILE,
            )?,
            pause: builder.build(
                PAUSE_IMAGE,
                &testkit.join("pause"),
                "pause",
                PAUSE_CONTAINERFILE,
            )?,
            took: start.elapsed(),
        })
    })
}

/// The Vault image, built once per process from `vault_bin` (static, so no libraries go
/// in). Call it with the machine lock held, as `built`.
pub fn vault_built(vault_bin: &Path) -> anyhow::Result<&'static Image> {
    static IMAGE: OnceLock<Result<Image, String>> = OnceLock::new();
    IMAGE
        .get_or_init(|| {
            with_builder(|b| b.build(VAULT_IMAGE, vault_bin, "vault", VAULT_CONTAINERFILE))
                .map_err(|e| format!("{e:#}"))
        })
        .as_ref()
        .map_err(|e| anyhow::anyhow!("building the Vault image: {e}"))
}

/// Runs `build` with a builder in a directory of this process, then removes what buildah
/// left in fixed places and its storage (the archives stay for `ctr images import`).
fn with_builder<T>(build: impl FnOnce(&Builder) -> anyhow::Result<T>) -> anyhow::Result<T> {
    let before = machine::Machine::observe()?;
    let dir = tempfile::Builder::new()
        .prefix(&format!("vault-registrar-images-{}-", std::process::id()))
        .tempdir()?
        .keep();
    crate::controlplane::register_dir_for_exit(dir.clone());
    let result = build(&Builder { dir: dir.clone() });
    machine::unmount_below(&dir);
    machine::remove_new_paths(&before.paths);
    let _ = std::fs::remove_dir_all(dir.join("storage"));
    result
}

/// The repository's Dockerfile.
pub fn dockerfile() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../Dockerfile")
}

/// The Dockerfile's last stage with its base replaced by the assembled one, and its builder
/// stage by the binary at hand.
pub fn operator_containerfile(dockerfile: &Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(dockerfile)
        .with_context(|| format!("reading {}", dockerfile.display()))?;
    let runtime = runtime_stage(&text)
        .with_context(|| format!("{} has no FROM line", dockerfile.display()))?;
    Ok(format!(
        "FROM scratch AS builder\nCOPY vault-registrar /vault-registrar\n\nFROM scratch\nCOPY base/ /\nCOPY --chown=65532:65532 home/ /home/\n{runtime}"
    ))
}

/// The instructions of the Dockerfile's last stage, after its FROM line.
pub fn runtime_stage(dockerfile: &str) -> Option<String> {
    let lines: Vec<&str> = dockerfile.lines().collect();
    let from = lines
        .iter()
        .rposition(|l| l.trim_start().to_ascii_uppercase().starts_with("FROM "))?;
    Some(lines[from + 1..].join("\n") + "\n")
}

/// The base image the Dockerfile's last stage starts from.
pub fn runtime_base(dockerfile: &str) -> Option<String> {
    let line = dockerfile
        .lines()
        .rfind(|l| l.trim_start().to_ascii_uppercase().starts_with("FROM "))?;
    line.split_whitespace().nth(1).map(str::to_string)
}

const SIM_CONTAINERFILE: &str = "FROM scratch\nCOPY base/ /\nCOPY --chown=65532:65532 home/ /home/\nCOPY vault-sim /vault-sim\nUSER 65532:65532\nEXPOSE 8200\nENTRYPOINT [\"/vault-sim\"]\n";

/// As the official image: `vault server` reading /vault/config, data under /vault/data
/// (a volume), run as the nonroot user; Vault's own home is its config and data.
const VAULT_CONTAINERFILE: &str = "FROM scratch\nCOPY base/ /\nCOPY --chown=65532:65532 home/ /home/\nCOPY vault /bin/vault\nUSER 65532:65532\nEXPOSE 8200 8201\nENTRYPOINT [\"/bin/vault\"]\nCMD [\"server\", \"-config=/vault/config\"]\n";

const PAUSE_CONTAINERFILE: &str =
    "FROM scratch\nCOPY base/ /\nCOPY pause /pause\nUSER 65535:65535\nENTRYPOINT [\"/pause\"]\n";

/// The directory of the test kit's own programs (the simulator, pause, node-hold): from
/// VAULT_REGISTRAR_TESTKIT_BIN_DIR when set (as `make test` does), otherwise built now with
/// cargo.
pub fn testkit_bins() -> anyhow::Result<PathBuf> {
    if let Some(dir) = std::env::var_os("VAULT_REGISTRAR_TESTKIT_BIN_DIR") {
        return Ok(PathBuf::from(dir));
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    run(Command::new(cargo).current_dir(&root).args([
        "build",
        "-q",
        "--workspace",
        "--bin",
        "vault-sim",
        "--bin",
        "pause",
        "--bin",
        "node-hold",
    ]))
    .context("building the simulator and pause programs")?;
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    Ok(target.join("debug"))
}

struct Builder {
    dir: PathBuf,
}

impl Builder {
    fn buildah(&self) -> Command {
        let mut cmd = Command::new("buildah");
        // vfs: plain directories, no mounts; everything under our directory.
        cmd.arg("--root")
            .arg(self.dir.join("storage/root"))
            .arg("--runroot")
            .arg(self.dir.join("storage/run"))
            .args(["--storage-driver", "vfs"])
            .env("TMPDIR", self.dir.join("tmp"));
        cmd
    }

    /// Builds `name` from `containerfile` in a context holding the base, the home directory
    /// and `bin` (stripped) as `bin_name`.
    fn build(
        &self,
        name: &str,
        bin: &Path,
        bin_name: &str,
        containerfile: &str,
    ) -> anyhow::Result<Image> {
        let context = self.dir.join(bin_name);
        std::fs::create_dir_all(context.join("home/nonroot"))?;
        std::fs::create_dir_all(self.dir.join("tmp"))?;
        run(Command::new("strip")
            .arg("-o")
            .arg(context.join(bin_name))
            .arg(bin))
        .with_context(|| format!("stripping {} (binutils)", bin.display()))?;
        assemble_base(&context.join("base"), &context.join(bin_name))?;
        std::fs::write(context.join("Containerfile"), containerfile)?;
        run(self
            .buildah()
            .args(["build", "-q", "--pull=false", "-f"])
            .arg(context.join("Containerfile"))
            .args(["-t", name])
            .arg(&context))
        .with_context(|| format!("buildah build of {name}"))?;
        let archive = self.dir.join(format!("{bin_name}.tar"));
        run(self
            .buildah()
            .args(["push", "-q", name])
            .arg(format!("docker-archive:{}:{name}", archive.display())))
        .with_context(|| format!("buildah push of {name}"))?;
        let inspect: serde_json::Value = serde_json::from_str(&run(self
            .buildah()
            .args(["inspect", "--type", "image", name]))?)?;
        let config = inspect["OCIv1"]["config"].clone();
        let files = self.files(name)?;
        let _ = std::fs::remove_dir_all(&context);
        Ok(Image {
            name: name.to_string(),
            archive,
            config,
            files,
        })
    }

    /// The image's file system, listed from a working container of it.
    fn files(&self, name: &str) -> anyhow::Result<BTreeSet<String>> {
        let container = run(self.buildah().args(["from", "--pull=false", name]))?
            .trim()
            .to_string();
        let root = PathBuf::from(run(self.buildah().args(["mount", &container]))?.trim());
        let mut files = BTreeSet::new();
        list(&root, &root, &mut files);
        run(self.buildah().args(["rm", &container]))?;
        Ok(files)
    }
}

fn list(root: &Path, dir: &Path, out: &mut BTreeSet<String>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if let Ok(rel) = path.strip_prefix(root) {
            out.insert(format!("/{}", rel.display()));
        }
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            list(root, &path, out);
        }
    }
}

/// Debian's files the distroless `cc` base holds: the libraries `bin` loads (as `ldd` finds
/// them), the `nonroot` user, CA certificates, os-release, a world-writable /tmp.
fn assemble_base(base: &Path, bin: &Path) -> anyhow::Result<()> {
    let ldd = match run(Command::new("ldd").arg(bin)) {
        Ok(out) => out,
        // A static binary (Vault, CGO off) loads no libraries.
        Err(e) if format!("{e:#}").contains("not a dynamic executable") => String::new(),
        Err(e) => return Err(e),
    };
    for lib in libraries(&ldd) {
        let target = base.join(lib.trim_start_matches('/'));
        std::fs::create_dir_all(target.parent().unwrap())?;
        // Copies the file a symlink points at, under the symlink's name, as the loader asks.
        std::fs::copy(&lib, &target).with_context(|| format!("copying {lib}"))?;
    }
    let etc = base.join("etc");
    std::fs::create_dir_all(etc.join("ssl/certs"))?;
    std::fs::write(etc.join("passwd"), PASSWD)?;
    std::fs::write(etc.join("group"), GROUP)?;
    std::fs::copy("/etc/os-release", etc.join("os-release")).context("copying /etc/os-release")?;
    let certs = Path::new("/etc/ssl/certs/ca-certificates.crt");
    if certs.is_file() {
        std::fs::copy(certs, etc.join("ssl/certs/ca-certificates.crt"))?;
    }
    let tmp = base.join("tmp");
    std::fs::create_dir_all(&tmp)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o1777))?;
    Ok(())
}

/// Absolute paths of the shared libraries and loader in `ldd` output.
pub fn libraries(ldd: &str) -> Vec<String> {
    ldd.lines()
        .filter_map(|l| {
            let path = match l.split_once("=>") {
                Some((_, right)) => right.split_whitespace().next()?,
                None => l.split_whitespace().next()?,
            };
            path.starts_with('/').then(|| path.to_string())
        })
        .collect()
}

const PASSWD: &str = "root:x:0:0:root:/root:/sbin/nologin\nnobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n";
const GROUP: &str = "root:x:0:\nnobody:x:65534:\nnonroot:x:65532:\n";

/// Fails unless the machine's Debian release is the one the Dockerfile's base names
/// (`cc-debian12` needs Debian 12's files).
pub fn check_debian_release(base_image: &str) -> anyhow::Result<()> {
    let os = std::fs::read_to_string("/etc/os-release")?;
    let id = os
        .lines()
        .find_map(|l| l.strip_prefix("VERSION_ID="))
        .map(|v| v.trim_matches('"').to_string())
        .unwrap_or_default();
    if !base_image.contains(&format!("debian{id}")) {
        bail!(
            "the Dockerfile's runtime base {base_image} is not this machine's Debian {id}; the image's base is assembled from this machine's files"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libraries_are_read_from_ldd_output() {
        let ldd = "\tlinux-vdso.so.1 (0x00007ffd)\n\tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x1)\n\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x2)\n\t/lib64/ld-linux-x86-64.so.2 (0x3)\n";
        assert_eq!(
            libraries(ldd),
            [
                "/lib/x86_64-linux-gnu/libgcc_s.so.1",
                "/lib/x86_64-linux-gnu/libc.so.6",
                "/lib64/ld-linux-x86-64.so.2"
            ]
        );
    }

    #[test]
    fn the_runtime_stage_is_the_last_from() {
        let file = "FROM rust AS builder\nRUN cargo build\n\nfrom gcr.io/distroless/cc-debian12:nonroot\nUSER 65532:65532\nENTRYPOINT [\"/x\"]\n";
        assert_eq!(
            runtime_stage(file).unwrap(),
            "USER 65532:65532\nENTRYPOINT [\"/x\"]\n"
        );
        assert_eq!(
            runtime_base(file).unwrap(),
            "gcr.io/distroless/cc-debian12:nonroot"
        );
        assert_eq!(runtime_stage("USER 1\n"), None);
    }
}
