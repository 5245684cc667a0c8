//! The operations kit without a cluster: the chart linted with every value set the tests use,
//! its values documented and in step with the schema, the alerts checked and unit-tested by
//! the real promtool, and every metric the alerts and the dashboard query one the operator
//! exports. The real helm renders what is checked.

mod chart;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;

use anyhow::{Context, bail};
use chart::{KUBE_VERSION, VALUE_SETS, chart, values};
use serde_json::{Value, json};
use vault_registrar_testkit::controlplane::Binaries;
use vault_registrar_testkit::tools::promtool;

/// Runs a command; its stdout, or an error with its output.
fn run(mut cmd: Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    if !out.status.success() {
        bail!(
            "{cmd:?} failed with {}:\n{stdout}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(stdout)
}

/// The real helm, with its state in a directory of its own, removed after; no cluster is
/// needed.
fn helm(args: &[&str]) -> anyhow::Result<String> {
    let dir = tempfile::tempdir()?;
    let home = dir.path();
    let mut cmd = Command::new(Binaries::locate()?.helm);
    cmd.args(args)
        .env("HELM_CACHE_HOME", home.join("cache"))
        .env("HELM_CONFIG_HOME", home.join("config"))
        .env("HELM_DATA_HOME", home.join("data"));
    run(cmd)
}

/// The chart rendered as release "vr" in namespace "ops" with a value set: one object per
/// document.
fn render(set: &str) -> anyhow::Result<Vec<Value>> {
    let chart = chart();
    let mut args = vec![
        "template",
        "vr",
        chart.to_str().unwrap(),
        "-n",
        "ops",
        KUBE_VERSION,
    ];
    args.extend(values(set));
    let text = helm(&args)?;
    let mut objects = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let value: Value = serde_yaml::with::singleton_map_recursive::deserialize(doc)?;
        if !value.is_null() {
            objects.push(value);
        }
    }
    Ok(objects)
}

fn object<'a>(objects: &'a [Value], kind: &str) -> Option<&'a Value> {
    objects.iter().find(|o| o["kind"] == kind)
}

#[test]
fn chart_lints_clean_with_every_value_set_the_tests_use() -> anyhow::Result<()> {
    let chart = chart();
    for (name, set) in VALUE_SETS {
        let mut args = vec!["lint", "--strict", chart.to_str().unwrap()];
        args.extend(set.iter().copied());
        let out = helm(&args).with_context(|| format!("value set {name}"))?;
        assert!(
            !out.contains("[WARNING]") && !out.contains("[ERROR]"),
            "{name}: {out}"
        );
    }
    let refused = helm(&[
        "lint",
        "--strict",
        chart.to_str().unwrap(),
        "--set",
        "crds.keep=maybe",
    ]);
    assert!(
        refused.is_err(),
        "the schema must refuse a non-boolean crds.keep"
    );
    Ok(())
}

/// The ServiceMonitor's durations are refused by the chart, naming the value, where the
/// Prometheus Operator's CRD or the operator itself would refuse them later.
#[test]
fn scrape_durations_are_checked_before_install() -> anyhow::Result<()> {
    let chart = chart();
    let template = |set: &str| {
        let on = format!("serviceMonitor.enabled=true,{set}");
        helm(&[
            "template",
            "vr",
            chart.to_str().unwrap(),
            KUBE_VERSION,
            "--set",
            &on,
        ])
    };
    let longer = template("serviceMonitor.interval=1m,serviceMonitor.scrapeTimeout=60001ms")
        .expect_err("a timeout longer than the interval is refused");
    assert!(
        longer.to_string().contains(
            "serviceMonitor.scrapeTimeout (60001ms) is longer than serviceMonitor.interval (1m)"
        ),
        "{longer}"
    );
    let go_syntax = template("serviceMonitor.interval=1.5s")
        .expect_err("a fractional duration is not a Prometheus duration");
    assert!(
        go_syntax.to_string().contains("serviceMonitor.interval"),
        "{go_syntax}"
    );
    let fits = template("serviceMonitor.interval=1m30s,serviceMonitor.scrapeTimeout=90000ms")?;
    assert!(fits.contains("scrapeTimeout: 90000ms"), "{fits}");
    Ok(())
}

#[test]
fn crd_is_a_template_kept_on_uninstall_unless_disabled() -> anyhow::Result<()> {
    let crd = |set: &str| -> anyhow::Result<Option<Value>> {
        Ok(object(&render(set)?, "CustomResourceDefinition").cloned())
    };
    let kept = crd("defaults")?.expect("the CRD is rendered by default");
    assert_eq!(
        kept["metadata"]["annotations"]["helm.sh/resource-policy"], "keep",
        "{kept}"
    );
    assert_eq!(
        kept["metadata"]["labels"]["app.kubernetes.io/component"],
        "crd"
    );
    let generated: Value = serde_yaml::from_str(&vault_registrar::crd_yaml())?;
    assert_eq!(
        kept["spec"], generated["spec"],
        "the template is the generated CRD"
    );
    let not_kept = crd("crd-not-kept")?.expect("still rendered");
    assert!(not_kept["metadata"]["annotations"].is_null(), "{not_kept}");
    assert!(
        crd("shared-crd")?.is_none(),
        "crds.enabled=false renders no CRD"
    );
    Ok(())
}

#[test]
fn pod_settings_are_overridable_and_restricted_by_default() -> anyhow::Result<()> {
    let pod = |set: &str| -> anyhow::Result<Value> {
        let objects = render(set)?;
        Ok(object(&objects, "Deployment").expect("a Deployment")["spec"]["template"].clone())
    };
    let default = pod("defaults")?;
    let spec = &default["spec"];
    let container = &spec["containers"][0];
    assert_eq!(spec["securityContext"]["runAsNonRoot"], true);
    assert_eq!(
        spec["securityContext"]["seccompProfile"]["type"],
        "RuntimeDefault"
    );
    assert_eq!(
        container["securityContext"]["allowPrivilegeEscalation"],
        false
    );
    assert_eq!(
        container["securityContext"]["capabilities"]["drop"][0],
        "ALL"
    );
    let spread = &spec["topologySpreadConstraints"][0];
    assert_eq!(spread["topologyKey"], "kubernetes.io/hostname");
    assert_eq!(
        spread["labelSelector"]["matchLabels"]["app.kubernetes.io/instance"],
        "vr"
    );
    assert_eq!(
        default["metadata"]["labels"]["app.kubernetes.io/component"],
        "controller"
    );

    let openshift = pod("openshift")?;
    let context = &openshift["spec"]["securityContext"];
    assert!(
        context["runAsUser"].is_null() && context["runAsGroup"].is_null(),
        "{context}"
    );
    assert_eq!(context["runAsNonRoot"], true);

    let overridden = pod("overrides")?;
    let spec = &overridden["spec"];
    let container = &spec["containers"][0];
    let args: Vec<&str> = container["args"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    for want in [
        "--log-level=info,vault_registrar=debug",
        "--log-format=text",
        "--startup-timeout=2m",
    ] {
        assert!(args.contains(&want), "{want}: {args:?}");
    }
    assert!(
        container["env"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["name"] == "RUST_BACKTRACE" && e["value"] == "1"),
        "{container}"
    );
    assert_eq!(spec["priorityClassName"], "system-cluster-critical");
    assert_eq!(
        spec["topologySpreadConstraints"][0]["topologyKey"],
        "topology.kubernetes.io/zone"
    );
    // The binary accepts the log filter the chart passes.
    let out = Command::new(env!("CARGO_BIN_EXE_vault-registrar"))
        .args([
            "run",
            "--log-level=info,vault_registrar=debug",
            "--kubeconfig=/nonexistent",
        ])
        .env_remove("KUBECONFIG")
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("reading kubeconfig /nonexistent"),
        "{stderr}"
    );
    let out = Command::new(env!("CARGO_BIN_EXE_vault-registrar"))
        .args(["run", "--log-level=info,[", "--kubeconfig=/nonexistent"])
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--log-level"), "{stderr}");

    let monitor = render("overrides")?;
    let endpoint =
        &object(&monitor, "ServiceMonitor").expect("a ServiceMonitor")["spec"]["endpoints"][0];
    assert_eq!(endpoint["honorLabels"], false);
    assert_eq!(endpoint["scrapeTimeout"], "5s");
    assert_eq!(endpoint["relabelings"][0]["targetLabel"], "team");
    Ok(())
}

/// What platform teams expect of an operator chart: no Service links, the image by digest,
/// the PDB either way, probes they can slow down, and VaultCluster rights aggregated into
/// view, edit and admin unless turned off.
#[test]
fn platform_settings_render_as_asked() -> anyhow::Result<()> {
    let default = render("defaults")?;
    let pod = &object(&default, "Deployment").expect("a Deployment")["spec"]["template"]["spec"];
    assert_eq!(pod["enableServiceLinks"], false);
    let container = &pod["containers"][0];
    assert!(
        container["image"]
            .as_str()
            .is_some_and(|i| i.starts_with("ghcr.io/vault-registrar/vault-registrar:")),
        "{container}"
    );
    assert_eq!(container["livenessProbe"]["periodSeconds"], 10);
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(container["readinessProbe"]["failureThreshold"], 3);
    let pdb = &object(&default, "PodDisruptionBudget").expect("a PDB")["spec"];
    assert_eq!(
        (pdb["minAvailable"].clone(), pdb["maxUnavailable"].clone()),
        (json!(1), Value::Null)
    );
    let aggregated = |objects: &[Value], role: &str| -> Vec<String> {
        objects
            .iter()
            .filter(|o| {
                o["kind"] == "ClusterRole"
                    && o["metadata"]["labels"]
                        [format!("rbac.authorization.k8s.io/aggregate-to-{role}")]
                        == "true"
            })
            .flat_map(|o| o["rules"].as_array().cloned().unwrap_or_default())
            .flat_map(|r| r["verbs"].as_array().cloned().unwrap_or_default())
            .filter_map(|v| v.as_str().map(String::from))
            .collect()
    };
    let view = aggregated(&default, "view");
    assert!(
        view.contains(&"list".to_string()) && !view.contains(&"update".to_string()),
        "{view:?}"
    );
    let edit = aggregated(&default, "edit");
    assert!(
        edit.contains(&"update".to_string()) && edit.contains(&"list".to_string()),
        "{edit:?}"
    );

    let platform = render("platform")?;
    let pod = &object(&platform, "Deployment").expect("a Deployment")["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    assert_eq!(
        container["image"],
        "ghcr.io/vault-registrar/vault-registrar@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
    );
    assert_eq!(container["livenessProbe"]["periodSeconds"], 30);
    assert_eq!(container["readinessProbe"]["failureThreshold"], 6);
    let pdb = &object(&platform, "PodDisruptionBudget").expect("a PDB")["spec"];
    assert_eq!(
        (pdb["minAvailable"].clone(), pdb["maxUnavailable"].clone()),
        (Value::Null, json!("50%"))
    );
    assert!(aggregated(&platform, "view").is_empty());
    // Secure metrics: the flag, the review rights, a reader role and an HTTPS ServiceMonitor.
    for (set, verified) in [("secure-metrics", false), ("secure-metrics-cert", true)] {
        let objects = render(set)?;
        let container = &object(&objects, "Deployment").expect("a Deployment")["spec"]["template"]
            ["spec"]["containers"][0];
        assert!(
            container["args"]
                .as_array()
                .unwrap()
                .contains(&json!("--metrics-secure")),
            "{set}"
        );
        assert_eq!(
            container["volumeMounts"].is_array(),
            verified,
            "{set}: the certificate Secret mounted only when named"
        );
        let rules: Vec<&Value> = objects
            .iter()
            .filter(|o| o["kind"] == "ClusterRole")
            .flat_map(|o| o["rules"].as_array().into_iter().flatten())
            .collect();
        for resource in ["tokenreviews", "subjectaccessreviews"] {
            assert!(
                rules.iter().any(|r| r["resources"][0] == resource),
                "{set}: {resource}"
            );
        }
        assert!(
            rules.iter().any(|r| r["nonResourceURLs"][0] == "/metrics"),
            "{set}"
        );
        let endpoint =
            &object(&objects, "ServiceMonitor").expect("a ServiceMonitor")["spec"]["endpoints"][0];
        assert_eq!(endpoint["scheme"], "https", "{set}");
        assert_eq!(
            endpoint["tlsConfig"]["insecureSkipVerify"]
                .as_bool()
                .unwrap_or(false),
            !verified,
            "{set}"
        );
    }
    let plain = render("defaults")?;
    assert!(
        !plain.iter().any(|o| o["metadata"]["name"]
            .as_str()
            .is_some_and(|n| n.ends_with("-metrics-auth"))),
        "review rights only with secure metrics"
    );
    // A digest that is not one is refused before anything renders.
    let chart = chart();
    let refused = helm(&[
        "template",
        "vr",
        chart.to_str().unwrap(),
        KUBE_VERSION,
        "--set",
        "image.digest=latest",
    ]);
    assert!(
        refused
            .as_ref()
            .is_err_and(|e| format!("{e:#}").contains("image.digest")),
        "{refused:?}"
    );
    Ok(())
}

/// The rules as a rule file, from the PrometheusRule the chart renders.
fn rule_groups() -> anyhow::Result<Value> {
    let objects = render("monitoring")?;
    let rule = object(&objects, "PrometheusRule").context("no PrometheusRule rendered")?;
    Ok(serde_json::json!({"groups": rule["spec"]["groups"]}))
}

fn alerts(groups: &Value) -> Vec<Value> {
    groups["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap().clone())
        .collect()
}

const ALERTS: [&str; 7] = [
    "VaultRegistrarNoActivePod",
    "VaultRegistrarMultipleActive",
    "VaultRegistrarDegraded",
    "VaultRegistrarProbesFailing",
    "VaultRegistrarNoLeader",
    "VaultRegistrarReconcileErrors",
    "VaultRegistrarOperatorDown",
];

#[test]
fn alerts_pass_promtool_and_their_unit_tests() -> anyhow::Result<()> {
    let groups = rule_groups()?;
    let dir = tempfile::tempdir()?;
    std::fs::write(
        dir.path().join("rules.yaml"),
        serde_yaml::to_string(&groups)?,
    )?;
    let tests =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/alerts/vault-registrar.test.yaml");
    std::fs::copy(&tests, dir.path().join("rules.test.yaml"))?;
    let promtool = promtool()?;

    let mut check = Command::new(&promtool);
    check.args(["check", "rules", "--lint=all", "--lint-fatal"]);
    check.arg(dir.path().join("rules.yaml"));
    let out = run(check)?;
    assert!(out.contains("SUCCESS: 7 rules found"), "{out}");

    let mut test = Command::new(&promtool);
    test.args(["test", "rules"])
        .arg(dir.path().join("rules.test.yaml"));
    let out = run(test)?;
    assert!(out.contains("SUCCESS"), "{out}");

    // Each alert: its annotations, a runbook section, a case firing it and one not.
    let names: Vec<String> = alerts(&groups)
        .iter()
        .map(|a| a["alert"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ALERTS);
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))?;
    for alert in alerts(&groups) {
        let name = alert["alert"].as_str().unwrap();
        for key in ["summary", "description", "runbook_url"] {
            assert!(
                alert["annotations"][key]
                    .as_str()
                    .is_some_and(|s| !s.is_empty()),
                "{name} has no {key}"
            );
        }
        let anchor = alert["annotations"]["runbook_url"].as_str().unwrap();
        assert!(
            anchor.ends_with(&format!("#{}", name.to_lowercase())),
            "{anchor}"
        );
        assert!(
            readme.contains(&format!("\n### {name}\n")),
            "README has no runbook section for {name}"
        );
    }
    let cases: Value = serde_yaml::from_str(&std::fs::read_to_string(&tests)?)?;
    let mut fired = BTreeSet::new();
    let mut silent = BTreeSet::new();
    for case in cases["tests"].as_array().unwrap() {
        for t in case["alert_rule_test"].as_array().into_iter().flatten() {
            let name = t["alertname"].as_str().unwrap().to_string();
            match t["exp_alerts"].as_array().is_some_and(|a| !a.is_empty()) {
                true => fired.insert(name),
                false => silent.insert(name),
            };
        }
    }
    let all: BTreeSet<String> = ALERTS.iter().map(|s| s.to_string()).collect();
    assert_eq!(fired, all, "every alert has a case that fires it");
    assert_eq!(silent, all, "every alert has a case where it stays quiet");
    Ok(())
}

/// Every `metric{labels}` a PromQL expression names: the metric and its matchers' labels.
fn queried(expr: &str) -> Vec<(String, Vec<String>)> {
    let selector =
        regex::Regex::new(r"\b((?:vault_registrar|process)_[a-z_]+)\b(\{[^}]*\})?").unwrap();
    let matcher = regex::Regex::new(r#"([a-z_]+)\s*(=~|!~|!=|=)\s*""#).unwrap();
    selector
        .captures_iter(expr)
        .map(|c| {
            let labels = c
                .get(2)
                .map(|m| {
                    matcher
                        .captures_iter(m.as_str())
                        .map(|l| l[1].to_string())
                        .collect()
                })
                .unwrap_or_default();
            (c[1].to_string(), labels)
        })
        .collect()
}

/// Every PromQL expression of the dashboard: panel targets and variable queries.
fn dashboard_queries(dashboard: &Value) -> Vec<String> {
    let mut out = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            out.push(target["expr"].as_str().unwrap().to_string());
        }
    }
    for variable in dashboard["templating"]["list"].as_array().unwrap() {
        if let Some(q) = variable["definition"].as_str() {
            out.push(q.to_string());
        }
    }
    out
}

#[test]
fn dashboard_and_alerts_query_only_what_the_operator_exports() -> anyhow::Result<()> {
    let exported = vault_registrar::metrics::Metrics::new().exported();
    // Labels Prometheus adds to every series of a target.
    let target_labels = ["job", "instance", "namespace", "pod", "service"];
    let file = chart().join("dashboards/vault-registrar.json");
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(&file)?)?;
    let mut queries = dashboard_queries(&dashboard);
    let groups = rule_groups()?;
    queries.extend(
        alerts(&groups)
            .iter()
            .map(|a| a["expr"].as_str().unwrap().to_string()),
    );
    let mut seen = BTreeSet::new();
    for expr in &queries {
        for (name, labels) in queried(expr) {
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s).filter(|b| exported.contains_key(*b)))
                .unwrap_or(&name);
            let known = exported.get(base).unwrap_or_else(|| {
                panic!(
                    "{name} in {expr:?} is not exported; exported: {:?}",
                    exported.keys()
                )
            });
            for label in labels {
                assert!(
                    known.contains(&label) || target_labels.contains(&label.as_str()),
                    "{name} has no label {label} ({expr})"
                );
            }
            seen.insert(base.to_string());
        }
    }
    for wanted in [
        "vault_registrar_cluster_active_pod",
        "vault_registrar_active_changes_total",
        "vault_registrar_cluster_pods",
        "vault_registrar_probe_duration_seconds",
        "vault_registrar_probes_total",
        "vault_registrar_reconciles_total",
        "vault_registrar_reconcile_errors_total",
        "vault_registrar_leader",
    ] {
        assert!(seen.contains(wanted), "nothing shows {wanted}");
    }

    // The ConfigMap carries the same dashboard, labelled for Grafana's sidecar.
    let objects = render("monitoring")?;
    let map = objects
        .iter()
        .find(|o| {
            o["kind"] == "ConfigMap" && o["metadata"]["name"] == "vr-vault-registrar-dashboard"
        })
        .context("no dashboard ConfigMap")?;
    assert_eq!(map["metadata"]["labels"]["grafana_dashboard"], "1");
    let carried: Value =
        serde_json::from_str(map["data"]["vault-registrar.json"].as_str().unwrap())?;
    assert_eq!(carried, dashboard);
    Ok(())
}

/// One row of the README's table.
struct Documented {
    kind: String,
    default: String,
    description: String,
}

/// The README's table rows: key → type, default, description.
fn documented(readme: &str) -> BTreeMap<String, Documented> {
    readme
        .lines()
        .filter_map(|line| {
            let cells: Vec<&str> = line
                .strip_prefix('|')?
                .strip_suffix('|')?
                .split(" | ")
                .collect();
            let key = cells.first()?.trim().strip_prefix('`')?.strip_suffix('`')?;
            let default = cells.get(2)?.trim().strip_prefix('`')?.strip_suffix('`')?;
            Some((
                key.to_string(),
                Documented {
                    kind: cells.get(1)?.trim().to_string(),
                    default: default.to_string(),
                    description: cells.get(3)?.trim().to_string(),
                },
            ))
        })
        .collect()
}

/// A schema node with its `$ref`s followed.
fn resolved<'a>(schema: &'a Value, root: &'a Value) -> &'a Value {
    match schema["$ref"].as_str() {
        Some(r) => resolved(
            &root["definitions"][r.rsplit('/').next().unwrap_or("")],
            root,
        ),
        None => schema,
    }
}

/// The type a reader is told: the schema's `type`, or the types of its `anyOf` alternatives
/// joined with "or".
fn type_of(schema: &Value, root: &Value) -> String {
    let schema = resolved(schema, root);
    match &schema["type"] {
        Value::String(t) => return t.clone(),
        Value::Array(ts) => {
            return ts
                .iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join(" or ");
        }
        _ => {}
    }
    let Some(alternatives) = schema["anyOf"].as_array() else {
        return "any".into();
    };
    let mut kinds: Vec<String> = Vec::new();
    for kind in alternatives.iter().flat_map(|a| {
        type_of(a, root)
            .split(" or ")
            .map(String::from)
            .collect::<Vec<_>>()
    }) {
        if !kinds.contains(&kind) {
            kinds.push(kind);
        }
    }
    kinds.join(" or ")
}

/// Walks values.yaml along the schema. A key the schema describes with `properties` is
/// a section; any other is a value, documented on its own.
fn walk(
    path: &str,
    value: &Value,
    (schema, root): (&Value, &Value),
    leaves: &mut BTreeMap<String, (Value, String)>,
    problems: &mut Vec<String>,
) {
    let schema = resolved(schema, root);
    let Some(properties) = schema["properties"].as_object() else {
        leaves.insert(path.to_string(), (value.clone(), type_of(schema, root)));
        return;
    };
    let Some(map) = value.as_object() else {
        problems.push(format!(
            "{path}: the schema has properties, values.yaml has {value}"
        ));
        return;
    };
    for (key, child) in map {
        let at = if path.is_empty() {
            key.clone()
        } else {
            format!("{path}.{key}")
        };
        match properties.get(key) {
            Some(s) => walk(&at, child, (s, root), leaves, problems),
            None => problems.push(format!("{at} is in values.yaml, not in the schema")),
        }
    }
    for key in properties
        .keys()
        .filter(|k| !map.contains_key(*k) && *k != "global")
    {
        let at = if path.is_empty() {
            key.clone()
        } else {
            format!("{path}.{key}")
        };
        problems.push(format!("{at} is in the schema, not in values.yaml"));
    }
}

#[test]
fn every_value_is_documented_and_the_schema_agrees() -> anyhow::Result<()> {
    let dir = chart();
    let values: Value = serde_yaml::from_str(&std::fs::read_to_string(dir.join("values.yaml"))?)?;
    let schema: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("values.schema.json"))?)?;
    let readme = std::fs::read_to_string(dir.join("README.md"))?;
    let mut leaves = BTreeMap::new();
    let mut problems = Vec::new();
    walk("", &values, (&schema, &schema), &mut leaves, &mut problems);
    let docs = documented(&readme);
    for (key, (default, kind)) in &leaves {
        let want = serde_json::to_string(default)?;
        match docs.get(key) {
            None => problems.push(format!(
                "{key} is not in the chart README (type {kind}, default `{want}`)"
            )),
            Some(row) if row.default != want => problems.push(format!(
                "{key}: README says `{}`, values.yaml has `{want}`",
                row.default
            )),
            Some(row) if row.kind != *kind => problems.push(format!(
                "{key}: README says type {}, the schema {kind}",
                row.kind
            )),
            Some(row) if row.description.is_empty() => {
                problems.push(format!("{key} has no description in the README"))
            }
            Some(_) => {}
        }
    }
    for key in docs.keys().filter(|k| !leaves.contains_key(*k)) {
        problems.push(format!(
            "the README documents {key}, which values.yaml does not have"
        ));
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    assert!(leaves.len() > 40, "{leaves:?}");
    Ok(())
}

/// The compatibility pass of `make test` runs the oldest release the chart's `kubeVersion`
/// admits: raising one without the other fails here.
#[test]
fn the_oldest_kubernetes_tested_is_the_oldest_the_chart_admits() -> anyhow::Result<()> {
    let chart_yaml: Value =
        serde_yaml::from_str(&std::fs::read_to_string(chart().join("Chart.yaml"))?)?;
    let admits = chart_yaml["kubeVersion"].as_str().context("kubeVersion")?;
    let pinned = vault_registrar_testkit::tools::pinned_kubernetes("controlplane/oldest/go.mod")?;
    let pinned = pinned.trim_start_matches('v');
    let minor = |v: &str| v.split('.').take(2).collect::<Vec<_>>().join(".");
    assert_eq!(
        admits,
        format!(">={}.0-0", minor(pinned)),
        "Chart.yaml admits {admits}; the compatibility pass runs {pinned}"
    );
    Ok(())
}
