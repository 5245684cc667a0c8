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

#[test]
fn chart_and_kustomize_carry_the_same_crd() {
    let root = env!("CARGO_MANIFEST_DIR");
    let generated = vault_registrar::crd_yaml();
    for copy in ["charts/vault-registrar/crds", "config/crd"] {
        let path = format!("{root}/{copy}/vaultclusters.vault-registrar.dev.yaml");
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        assert!(
            text == generated,
            "{path} is stale: run `make crds` and commit the result"
        );
    }
}
