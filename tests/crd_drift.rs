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
