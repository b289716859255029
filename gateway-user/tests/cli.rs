//! `gatewayd` as an operator meets it on bad input: a broken configuration is refused before
//! anything is attached, with the field named.

use std::process::Command;

const GATEWAYD: &str = env!("CARGO_BIN_EXE_gatewayd");

fn check(config: &str) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join("gatewayd.yaml");
    std::fs::write(&path, config).expect("write config");
    let output = Command::new(GATEWAYD)
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .expect("run gatewayd check");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

const BASE: &str = "proxy:\n  listen_v4: 10.0.0.1:15001\ntargets:\n";

#[test]
fn check_rejects_unknown_class() {
    let (code, stderr) = check(&format!(
        "{BASE}  - address: 10.96.0.1\n    port: 443\n    class: ftp\n"
    ));
    assert_eq!(code, Some(1));
    assert!(stderr.contains("targets[0].class"), "{stderr}");
    assert!(stderr.contains("unknown variant `ftp`"), "{stderr}");
}

#[test]
fn check_rejects_bad_address() {
    let (code, stderr) = check(&format!(
        "{BASE}  - address: 10.96.0.256\n    port: 443\n    class: tcp\n"
    ));
    assert_eq!(code, Some(1));
    assert!(stderr.contains("targets[0].address"), "{stderr}");
}

#[test]
fn check_rejects_missing_field() {
    let (code, stderr) = check(&format!("{BASE}  - address: 10.96.0.1\n    class: tcp\n"));
    assert_eq!(code, Some(1));
    assert!(stderr.contains("missing field `port`"), "{stderr}");
}

#[test]
fn check_reports_missing_file() {
    let output = Command::new(GATEWAYD)
        .args(["check", "--config", "/nonexistent/gatewayd.yaml"])
        .output()
        .expect("run gatewayd check");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr.contains("failed to read config file /nonexistent/gatewayd.yaml"),
        "{stderr}"
    );
}

#[test]
fn check_rejects_broken_policy() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let policy = dir.path().join("policy.yaml");
    std::fs::write(
        &policy,
        "apiVersion: gateway.example.dev/v1alpha1\nkind: AccessPolicy\nmetadata:\n  name: x\nspec:\n  rules:\n    - name: a\n      action: maybe\n",
    )
    .expect("write policy");
    let (code, stderr) = check(&format!(
        "{BASE}  - address: 10.96.0.1\n    port: 5432\n    class: postgres\npolicy:\n  path: {}\n",
        policy.display()
    ));
    assert_eq!(code, Some(1));
    assert!(stderr.contains("policy.yaml:8:"), "{stderr}");
    assert!(stderr.contains("spec.rules[0].action"), "{stderr}");
}
