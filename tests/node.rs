//! The chart run for real: a node (kubelet, containerd, CNI, kube-proxy) beside the control
//! plane runs the operator from its image, as users run it.

use std::path::Path;
use std::time::{Duration, Instant};

use vault_registrar_testkit::node::NodePlane;
use vault_registrar_testkit::stage::run;

fn bin() -> &'static Path {
    env!("CARGO_BIN_EXE_vault-registrar").as_ref()
}

#[test]
fn node_runs_a_pod_and_teardown_leaves_the_machine_as_it_was() -> anyhow::Result<()> {
    let started = Instant::now();
    let node = NodePlane::start(bin())?;
    println!(
        "node Ready {:?} after the kubelet started ({:?} in all)",
        node.ready_after,
        started.elapsed()
    );
    run(node.plane.kubectl().args([
        "run",
        "sim",
        "--image",
        vault_registrar_testkit::image::SIM_IMAGE,
        "--image-pull-policy=Never",
        "--",
        "--role",
        "active",
    ]))?;
    let t = Instant::now();
    let out = run(node.plane.kubectl().args([
        "wait",
        "--for=condition=Ready",
        "pod/sim",
        "--timeout=60s",
    ]));
    if out.is_err() {
        println!(
            "{}",
            run(node.plane.kubectl().args(["describe", "pod", "sim"])).unwrap_or_default()
        );
        println!(
            "kubelet:\n{}\ncontainerd:\n{}",
            node.log_tail("kubelet"),
            node.log_tail("containerd")
        );
    }
    out?;
    println!("pod Ready after {:?}", t.elapsed());
    let diffs = node.stop();
    assert!(
        diffs.is_empty(),
        "the machine differs after teardown:\n{}",
        diffs.join("\n")
    );
    let _ = Duration::ZERO;
    Ok(())
}
