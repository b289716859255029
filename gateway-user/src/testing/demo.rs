//! The scenario of `cargo xtask demo`, on one test node: a payments pod and an intruder pod,
//! PostgreSQL with a table of card numbers, and the test Kubernetes API server. Unmodified
//! `psql` and `kubectl` run in the pods. `gatewayd` masks, denies, holds for approval, detects
//! a stolen token and records it all, and `gatewayctl` reads the recordings back.
//!
//! [`run`] writes the transcript to any writer, so the demo's test can check every step.

use std::{
    io::Write,
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::Duration,
};

use anyhow::{Context as _, ensure};
use serde_json::{Value, json};

use super::{POSTGRES_PASSWORD, TestNode, wait_until};
use crate::testing_apiserver::fixture::{Options, TestApiServer};

/// The `kubernetes` Service's ClusterIP in the demo cluster.
const API_SERVICE_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 1);

const POLICY: &str = "\
apiVersion: gateway.example.dev/v1alpha1
kind: AccessPolicy
metadata:
  name: payments
spec:
  defaults:
    postgres:
      action: allow
    kube_api:
      action: allow
  rules:
    - name: no-drop
      sql:
        statementKinds: [drop, truncate]
      action: deny
    - name: no-stolen-tokens
      tokenPodMismatch: true
      action: deny
    - name: no-interactive-exec
      kube:
        verbs: [create]
        resources: [pods]
        subresources: [exec]
        stdin: true
        tty: true
      action: deny
    - name: review-secret-writes
      kube:
        verbs: [create, update, patch, delete]
        resources: [secrets]
      action: review
";

/// Paths of the demo's programs and of its recording store.
#[derive(Clone, Debug)]
pub struct DemoPaths {
    /// Directory with `gatewayd`, `gatewayctl` and `gateway-test-apiserver`.
    pub binaries: PathBuf,
    /// The recording store; it stays after the demo.
    pub store: PathBuf,
}

/// Runs the demo, writing its transcript to `out`.
pub fn run(paths: &DemoPaths, out: &mut dyn Write) -> anyhow::Result<()> {
    let gatewayd = paths.binaries.join("gatewayd");
    let gatewayctl = paths.binaries.join("gatewayctl");
    let apiserver = paths.binaries.join("gateway-test-apiserver");
    for binary in [&gatewayd, &gatewayctl, &apiserver] {
        ensure!(
            binary.exists(),
            "{} not found: build it first (`cargo build --features gateway-user/testing`)",
            binary.display()
        );
    }

    let mut node = TestNode::new("gateway-demo");
    node.set_recordings(paths.store.clone());
    let payments = node.add_pod("payments-api-0");
    let intruder = node.add_pod("intruder");
    let db_server = node.add_server("db", &[]);
    let api_server = node.add_server("apiserver", &[IpAddr::V4(API_SERVICE_IP)]);

    let postgres = node.start_postgres(&db_server);
    postgres.admin_sql(
        "CREATE TABLE cards (id int PRIMARY KEY, holder text, pan text);
         INSERT INTO cards VALUES (1, 'Ada', '4111 1111 1111 1111'),
                                  (2, 'Grace', '5555-5555-5555-4444');",
    );

    let mut seed = vec![json!({
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": { "name": "payments" },
    })];
    for (pod, account) in [(&payments, "payments-api"), (&intruder, "intruder")] {
        let mut object = TestApiServer::seed_pod("payments", account, pod);
        object["spec"]["nodeName"] = json!(node.node_netns);
        seed.push(object);
    }
    let api = TestApiServer::start(
        &node,
        &api_server,
        &apiserver,
        Options {
            address: Some(IpAddr::V4(API_SERVICE_IP)),
            seed,
            ..Options::default()
        },
    );

    // gatewayd terminates the pods' TLS with a certificate from the cluster CA, as an operator
    // makes one with `gatewayctl cert issue`.
    let serving_cert = node.dir.join("apiserver-serving.crt");
    let serving_key = node.dir.join("apiserver-serving.key");
    let issued = Command::new(&gatewayctl)
        .args(["cert", "issue", "--ca-cert"])
        .arg(&api.ca.cert_path)
        .arg("--ca-key")
        .arg(&api.ca.key_path)
        .args(["--san", &API_SERVICE_IP.to_string()])
        .args(["--san", "kubernetes.default.svc"])
        .arg("--out-cert")
        .arg(&serving_cert)
        .arg("--out-key")
        .arg(&serving_key)
        .output()
        .context("run gatewayctl cert issue")?;
    ensure_success("gatewayctl cert issue", &issued)?;

    let policy_dir = node.dir.join("policies");
    std::fs::create_dir_all(&policy_dir)?;
    std::fs::write(policy_dir.join("10-payments.yaml"), POLICY)?;
    let kubeconfig = api.kubeconfig("gateway-system", "gatewayd");
    let targets = format!(
        "  - name: payments-db\n    address: {db}\n    port: 5432\n    class: postgres\n\
         \x20 - name: kubernetes\n    address: {API_SERVICE_IP}\n    port: 443\n    class: kube_api\n\
         \x20   tls: {{cert: {cert}, key: {key}}}\n\
         \x20   upstream_tls: {{mode: verify-full, ca: {ca}}}\n\
         identity:\n  cluster: true\n  kubeconfig: {kubeconfig}\n  wait: 3s\n\
         policy:\n  path: {policy}\n",
        db = postgres.addr.ip(),
        cert = serving_cert.display(),
        key = serving_key.display(),
        ca = api.ca.cert_path.display(),
        kubeconfig = kubeconfig.display(),
        policy = policy_dir.display(),
    );
    let config = node.daemon_config("gatewayd.yaml", "", &targets);
    let daemon = node.start_daemon(&gatewayd, &config, None);

    writeln!(out, "== The node")?;
    writeln!(
        out,
        "Pods `{}` ({}) and `{}` ({}), both in namespace payments.",
        payments.name, payments.addr_v4, intruder.name, intruder.addr_v4
    )?;
    writeln!(
        out,
        "PostgreSQL at {}, holding a table of card numbers in clear.",
        postgres.addr
    )?;
    writeln!(out, "The Kubernetes API server at {API_SERVICE_IP}:443.")?;
    writeln!(
        out,
        "gatewayd (pid {}) redirects both from the pods' cgroup {}, under the AccessPolicy in {}.",
        daemon.pid(),
        node.kubepods.display(),
        policy_dir.display()
    )?;

    let psql = |sql: &str| -> anyhow::Result<Output> {
        node.in_pod(&payments, postgres.bin_dir.join("psql"))
            .arg(format!(
                "host={} port={} user=postgres dbname=postgres connect_timeout=10",
                postgres.addr.ip(),
                postgres.addr.port()
            ))
            .args(["-X", "-c", sql])
            .env("PGPASSWORD", POSTGRES_PASSWORD)
            .stdin(Stdio::null())
            .output()
            .context("run psql")
    };

    writeln!(
        out,
        "\n== psql in {}: SELECT * FROM cards ORDER BY id",
        payments.name
    )?;
    let select = psql("SELECT * FROM cards ORDER BY id")?;
    ensure_success("psql SELECT", &select)?;
    write_indented(out, &select.stdout)?;
    writeln!(
        out,
        "The card numbers came back masked; the server still holds them whole."
    )?;

    writeln!(out, "\n== psql in {}: DROP TABLE cards", payments.name)?;
    let drop = psql("DROP TABLE cards")?;
    ensure!(!drop.status.success(), "DROP TABLE was not denied");
    write_indented(out, &drop.stderr)?;
    let remaining = postgres.admin_sql("SELECT count(*) FROM cards");
    writeln!(
        out,
        "The table is still there, with {} rows.",
        remaining.trim()
    )?;

    // The pods' own service-account tokens, as the kubelet mounts them.
    let home = node.dir.join("kubectl-home");
    let payments_token = api.token_for("payments", "payments-api", &payments);
    let payments_account = api.service_account_dir("payments", &payments_token, "payments");
    let kubectl = |pod: &super::Pod, account: &Path, args: &[&str]| -> Command {
        let mut command = api.kubectl(&node, pod, account, &home);
        command.args(args).stdin(Stdio::null());
        command
    };

    writeln!(out, "\n== kubectl in {}: get pods", payments.name)?;
    let pods = kubectl(&payments, &payments_account, &["get", "pods"]).output()?;
    ensure_success("kubectl get pods", &pods)?;
    write_indented(out, &pods.stdout)?;

    writeln!(
        out,
        "\n== kubectl in {}: create secret generic db-password (held for review)",
        payments.name
    )?;
    let pending_create = kubectl(
        &payments,
        &payments_account,
        &[
            "create",
            "secret",
            "generic",
            "db-password",
            "--from-literal=password=s3cret",
        ],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()?;
    let socket = node.approval_socket();
    let approvals = |args: &[&str]| -> anyhow::Result<Output> {
        Command::new(&gatewayctl)
            .arg("approvals")
            .arg("--socket")
            .arg(&socket)
            .args(args)
            .output()
            .context("run gatewayctl approvals")
    };
    let mut listing = Value::Null;
    wait_until("the held request", Duration::from_secs(30), || {
        listing = approvals(&["list", "--json"])
            .ok()
            .and_then(|output| serde_json::from_slice(&output.stdout).ok())
            .unwrap_or(Value::Null);
        listing["requests"]
            .as_array()
            .is_some_and(|requests| !requests.is_empty())
    });
    let id = listing["requests"][0]["id"]
        .as_str()
        .context("held request without an id")?
        .to_string();
    writeln!(
        out,
        "kubectl waits. An SRE on the node:\n$ gatewayctl approvals list"
    )?;
    write_indented(out, &approvals(&["list"])?.stdout)?;
    writeln!(
        out,
        "$ gatewayctl approvals approve {id} --reason \"change 4711\""
    )?;
    let approved = approvals(&["approve", &id, "--reason", "change 4711"])?;
    ensure_success("gatewayctl approvals approve", &approved)?;
    write_indented(out, &approved.stdout)?;
    let created = pending_create.wait_with_output()?;
    ensure_success("kubectl create secret", &created)?;
    writeln!(out, "kubectl printed:")?;
    write_indented(out, &created.stdout)?;

    writeln!(
        out,
        "\n== kubectl in {}: exec -it {} -- sh",
        payments.name, payments.name
    )?;
    // kubectl requests a terminal only when it has one, so `script` provides one. kubectl's
    // error then goes to the terminal, which is script's output.
    let exec = api
        .in_cluster(&node, &payments, &payments_account, &home, "script")
        .args([
            "-qec",
            &format!("exec kubectl exec -it {} -- sh", payments.name),
            "/dev/null",
        ])
        .stdin(Stdio::piped())
        .output()?;
    ensure!(
        !exec.status.success(),
        "the interactive exec was not denied"
    );
    write_indented(out, &exec.stdout)?;

    writeln!(
        out,
        "\n== kubectl in {}, with a copy of {}'s token: get secrets",
        intruder.name, payments.name
    )?;
    let stolen_account = api.service_account_dir("stolen", &payments_token, "payments");
    let stolen = kubectl(&intruder, &stolen_account, &["get", "secrets"]).output()?;
    ensure!(!stolen.status.success(), "the stolen token was not denied");
    write_indented(out, &stolen.stderr)?;

    daemon.stop();
    let events: Vec<Value> = node.sessions().into_iter().flatten().collect();
    let mismatches = events
        .iter()
        .filter(|event| {
            event["event"] == "token_pod_mismatch" && event["caller_pod"] == intruder.name.as_str()
        })
        .count();
    writeln!(
        out,
        "The recording holds {mismatches} token_pod_mismatch event(s) naming the intruder pod."
    )?;

    // The SRE's view afterwards: the session list and a check of the whole store.
    for args in [&["list", "--since", "10m"][..], &["verify", "--all"][..]] {
        writeln!(
            out,
            "\n$ gatewayctl sessions --store {} {}",
            paths.store.display(),
            args.join(" ")
        )?;
        let output = Command::new(&gatewayctl)
            .arg("sessions")
            .arg("--store")
            .arg(&paths.store)
            .args(args)
            .output()?;
        ensure_success(&format!("gatewayctl sessions {}", args[0]), &output)?;
        write_indented(out, &output.stdout)?;
    }

    let uninstall = Command::new(&gatewayd)
        .args(["uninstall", "--config"])
        .arg(&config)
        .output()?;
    ensure_success("gatewayd uninstall", &uninstall)?;
    writeln!(
        out,
        "\nStopped gatewayd and removed its eBPF programs and the test node. The recordings stay in {}.",
        paths.store.display()
    )?;
    Ok(())
}

fn ensure_success(command: &str, output: &Output) -> anyhow::Result<()> {
    ensure!(
        output.status.success(),
        "{command} failed with {}: {}",
        output.status,
        String::from_utf8_lossy(&output.stderr).trim()
    );
    Ok(())
}

/// Writes `text` indented by two spaces, without carriage returns.
fn write_indented(out: &mut dyn Write, text: &[u8]) -> anyhow::Result<()> {
    for line in String::from_utf8_lossy(text).replace('\r', "").lines() {
        writeln!(out, "  {line}")?;
    }
    Ok(())
}
