//! crds/ is generated from the Rust types; this fails when someone changes one without the
//! other. Regenerate with `make crds`.

#[test]
fn crds_directory_matches_the_rust_types() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/crds/vaultclusters.vault-registrar.dev.yaml"
    );
    let committed = std::fs::read_to_string(path).expect("crds/ holds the CRD");
    assert!(
        committed == vault_registrar::crd_yaml(),
        "{path} is stale: run `make crds` and commit the result"
    );
}

fn read(relative: &str) -> String {
    let path = format!("{}/{relative}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

#[test]
fn chart_and_kustomize_carry_the_same_crd() {
    let generated = vault_registrar::crd_yaml();
    assert!(
        read("config/crd/vaultclusters.vault-registrar.dev.yaml") == generated,
        "config/crd is stale: run `make crds` and commit the result"
    );
    assert!(
        read("charts/vault-registrar/templates/crd.yaml")
            == vault_registrar::crd_chart_template(&generated),
        "the chart's templates/crd.yaml is stale: run `make crds` and commit the result"
    );
    assert!(
        !std::path::Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/charts/vault-registrar/crds"
        ))
        .exists(),
        "the chart's crds/ directory would install a CRD Helm never upgrades, beside the template"
    );
}
