//! Starts a node plane with one pod running, writes a marker file, and holds the node until
//! killed: for the test that kills a run outright and checks that the next start removes
//! what it left (`tests/node.rs`).

use std::path::PathBuf;

use vault_registrar_testkit::image::SIM_IMAGE;
use vault_registrar_testkit::node::NodePlane;
use vault_registrar_testkit::stage::run;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args_os().skip(1);
    let (Some(operator_bin), Some(marker)) = (args.next(), args.next()) else {
        anyhow::bail!("usage: node-hold OPERATOR_BINARY MARKER_FILE");
    };
    let node = NodePlane::start(&PathBuf::from(operator_bin))?;
    run(node.plane.kubectl().args([
        "run",
        "held",
        "--image",
        SIM_IMAGE,
        "--image-pull-policy=Never",
    ]))?;
    run(node
        .plane
        .kubectl()
        .args(["wait", "--for=condition=Ready", "pod/held", "--timeout=60s"]))?;
    std::fs::write(&marker, node.dir().display().to_string())?;
    loop {
        // Held until killed; a kill outright is the point. The wait is in this process: a
        // `sleep` child outlived the kill, holding the test's output open for an hour.
        std::thread::sleep(std::time::Duration::from_secs(3600));
    }
}
