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

const GATEWAYCTL: &str = env!("CARGO_BIN_EXE_gatewayctl");

/// Writes a CA certificate and its PKCS#8 key into `dir`.
fn write_ca(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let key = rcgen::KeyPair::generate().expect("generate CA key");
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "kubernetes");
    let cert = params.self_signed(&key).expect("self-sign CA");
    let cert_path = dir.join("ca.crt");
    let key_path = dir.join("ca.key");
    std::fs::write(&cert_path, cert.pem()).expect("write CA certificate");
    std::fs::write(&key_path, key.serialize_pem()).expect("write CA key");
    (cert_path, key_path)
}

fn cert_issue(args: &[&std::ffi::OsStr]) -> std::process::Output {
    Command::new(GATEWAYCTL)
        .args(["cert", "issue"])
        .args(args)
        .output()
        .expect("run gatewayctl cert issue")
}

#[test]
fn cert_issue_signs_for_the_names() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let (ca_cert, ca_key) = write_ca(dir.path());
    let out_cert = dir.path().join("serving.crt");
    let out_key = dir.path().join("serving.key");
    let args = [
        "--ca-cert".as_ref(),
        ca_cert.as_os_str(),
        "--ca-key".as_ref(),
        ca_key.as_os_str(),
        "--san".as_ref(),
        "kubernetes.default.svc".as_ref(),
        "--san".as_ref(),
        "10.96.0.1".as_ref(),
        "--out-cert".as_ref(),
        out_cert.as_os_str(),
        "--out-key".as_ref(),
        out_key.as_os_str(),
    ];
    let output = cert_issue(&args);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );

    let verify = Command::new("openssl")
        .args(["verify", "-purpose", "sslserver", "-CAfile"])
        .arg(&ca_cert)
        .arg(&out_cert)
        .output()
        .expect("run openssl verify");
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stdout)
    );
    let names = Command::new("openssl")
        .args(["x509", "-noout", "-ext", "subjectAltName", "-in"])
        .arg(&out_cert)
        .output()
        .expect("run openssl x509");
    let names = String::from_utf8_lossy(&names.stdout);
    assert!(names.contains("DNS:kubernetes.default.svc"), "{names}");
    assert!(names.contains("IP Address:10.96.0.1"), "{names}");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&out_key)
            .expect("key metadata")
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);

    // A second run does not replace the files unless asked to.
    let again = cert_issue(&args);
    assert_eq!(again.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("already exists; pass --force"),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
}

#[test]
fn cert_issue_rejects_pkcs1_ca_key() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let (ca_cert, _) = write_ca(dir.path());
    let rsa_key = dir.path().join("rsa.key");
    let generated = Command::new("openssl")
        .args(["genrsa", "-traditional", "-out"])
        .arg(&rsa_key)
        .arg("2048")
        .output()
        .expect("run openssl genrsa");
    assert!(generated.status.success());
    let output = cert_issue(&[
        "--ca-cert".as_ref(),
        ca_cert.as_os_str(),
        "--ca-key".as_ref(),
        rsa_key.as_os_str(),
        "--san".as_ref(),
        "kubernetes".as_ref(),
        "--out-cert".as_ref(),
        dir.path().join("c.crt").as_os_str(),
        "--out-key".as_ref(),
        dir.path().join("c.key").as_os_str(),
    ]);
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("invalid CA key"), "{stderr}");
    assert!(stderr.contains("openssl pkcs8 -topk8"), "{stderr}");
}

#[test]
fn check_warns_service_target_without_cluster() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join("gatewayd.yaml");
    std::fs::write(
        &path,
        "proxy:\n  listen_v4: 10.0.0.1:15001\nredirect:\n  cgroup: /\ntargets:\n  \
         - service: default/kubernetes\n    port: 443\n    class: tcp\n",
    )
    .expect("write config");
    let output = Command::new(GATEWAYD)
        .args(["check", "--config"])
        .arg(&path)
        .env_remove("KUBERNETES_SERVICE_HOST")
        .output()
        .expect("run gatewayd check");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{output:?}");
    assert!(
        stdout.contains("configuration valid: 1 target(s)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("warning: service targets read their addresses from the API server"),
        "{stdout}"
    );
}

#[test]
fn check_warns_open_files_limit_too_low() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join("gatewayd.yaml");
    std::fs::write(
        &path,
        "proxy:\n  listen_v4: 10.0.0.1:15001\n  max_connections: 1000\nredirect:\n  cgroup: /\n\
         targets:\n  - address: 10.96.0.1\n    port: 5432\n    class: postgres\n",
    )
    .expect("write config");
    // 1,000 sessions need 5 files each and 1,024 for the daemon itself: 6,024.
    let check_with_limit = |limit: u64| {
        let output = Command::new("prlimit")
            .arg(format!("--nofile={limit}:{limit}"))
            .args([GATEWAYD, "check", "--config"])
            .arg(&path)
            .output()
            .expect("run gatewayd check under prlimit");
        assert!(output.status.success(), "{output:?}");
        String::from_utf8_lossy(&output.stdout).into_owned()
    };

    let low = check_with_limit(4096);
    assert!(
        low.contains("warning: the open files limit here is 4096, below the 6024"),
        "{low}"
    );
    let enough = check_with_limit(8192);
    assert!(enough.contains("configuration valid"), "{enough}");
    assert!(!enough.contains("open files limit"), "{enough}");
}
