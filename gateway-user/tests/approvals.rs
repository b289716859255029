//! AccessPolicy and approvals through the PostgreSQL handler: real `psql` in a pod namespace,
//! redirected by the real eBPF programs into `gatewayd`, which holds statements until
//! `gatewayctl approvals` answers on the daemon's real socket. Needs root; run with
//! `cargo xtask test`.

use std::{
    path::{Path, PathBuf},
    process::{Child, Output, Stdio},
    time::Duration,
};

use gateway_user::testing::{Daemon, POSTGRES_PASSWORD, Pod, Postgres, TestNode, wait_until};
use serde_json::Value;

const GATEWAYD: &str = env!("CARGO_BIN_EXE_gatewayd");
const GATEWAYCTL: &str = env!("CARGO_BIN_EXE_gatewayctl");

/// Subjects are `unknown` to policy until the identity module resolves pods from the cluster,
/// so the rules match on `unknown: true`.
const POLICY: &str = "\
apiVersion: gateway.example.dev/v1alpha1
kind: AccessPolicy
metadata:
  name: payments
spec:
  defaults:
    postgres:
      action: allow
  rules:
    - name: no-drop
      sql:
        statementKinds: [drop]
      action: deny
    - name: review-card-deletes
      subjects:
        unknown: true
      sql:
        statementKinds: [delete]
        tables: [cards]
      action: review
    - name: review-vault
      sql:
        tables: [vault]
      action: review
      review:
        forbidSelfApproval: true
    - name: review-ledger-session
      sql:
        tables: [ledger]
      action: review
      review:
        scope: session
    - name: quick-review
      sql:
        tables: [hurry]
      action: review
      review:
        deadline: 2s
---
apiVersion: gateway.example.dev/v1alpha1
kind: AccessPolicy
metadata:
  name: watch-only
spec:
  mode: audit
  rules:
    - name: audited-reads
      sql:
        tables: [audited]
      action: deny
";

struct Setup {
    node: TestNode,
    pod: Pod,
    postgres: Postgres,
    daemon: Option<Daemon>,
    policy_dir: PathBuf,
    socket: PathBuf,
}

impl Drop for Setup {
    fn drop(&mut self) {
        if std::thread::panicking()
            && let Some(daemon) = &self.daemon
        {
            eprintln!("gatewayd log:\n{}", daemon.log());
        }
        if let Some(daemon) = self.daemon.take() {
            daemon.stop();
        }
    }
}

fn setup(test_name: &str) -> Setup {
    let mut node = TestNode::new(test_name);
    let pod = node.add_pod("app");
    let server = node.add_server("db", &[]);
    let postgres = node.start_postgres(&server);
    postgres.admin_sql(
        "CREATE TABLE cards (id int PRIMARY KEY, pan text);
         INSERT INTO cards VALUES (1, '4111 1111 1111 1111'), (2, '5555-5555-5555-4444'), (3, 'x');
         CREATE TABLE vault (id int); INSERT INTO vault VALUES (1);
         CREATE TABLE ledger (id int); INSERT INTO ledger VALUES (1), (2);
         CREATE TABLE hurry (id int); INSERT INTO hurry VALUES (1);
         CREATE TABLE audited (id int); INSERT INTO audited VALUES (7);",
    );

    let policy_dir = node.dir.join("policies");
    std::fs::create_dir_all(&policy_dir).expect("create policy directory");
    std::fs::write(policy_dir.join("10-payments.yaml"), POLICY).expect("write policy");
    let socket = node.approval_socket();

    let targets = format!(
        "  - name: payments-db\n    address: {}\n    port: 5432\n    class: postgres\n",
        server.addr_v4
    );
    let config = node.daemon_config("gatewayd.yaml", "", &targets);
    let mut text = std::fs::read_to_string(&config).expect("read config");
    text.push_str(&format!(
        "policy:\n  path: {}\n  reload_interval: 100ms\n",
        policy_dir.display()
    ));
    std::fs::write(&config, text).expect("write config");
    let daemon = node.start_daemon(Path::new(GATEWAYD), &config, None);
    Setup {
        node,
        pod,
        postgres,
        daemon: Some(daemon),
        policy_dir,
        socket,
    }
}

/// Starts psql in the pod, through the gateway, running each of `commands` with `-c`.
fn spawn_psql(setup: &Setup, commands: &[&str]) -> Child {
    let mut command = setup
        .node
        .in_pod(&setup.pod, setup.postgres.bin_dir.join("psql"));
    command
        .arg(format!(
            "host={} port={} user=postgres dbname=postgres connect_timeout=10",
            setup.postgres.addr.ip(),
            setup.postgres.addr.port()
        ))
        .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1"]);
    for sql in commands {
        command.args(["-c", sql]);
    }
    command
        .env("PGPASSWORD", POSTGRES_PASSWORD)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn psql")
}

fn gatewayctl(setup: &Setup, args: &[&str]) -> Output {
    std::process::Command::new(GATEWAYCTL)
        .arg("approvals")
        .arg("--socket")
        .arg(&setup.socket)
        .args(args)
        .output()
        .expect("run gatewayctl")
}

fn held(setup: &Setup) -> Vec<Value> {
    let output = gatewayctl(setup, &["list", "--json"]);
    assert!(
        output.status.success(),
        "approvals list failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let response: Value = serde_json::from_slice(&output.stdout).expect("JSON response");
    response["requests"].as_array().cloned().unwrap_or_default()
}

/// Waits until exactly `count` requests are held and returns them.
fn wait_held(setup: &Setup, count: usize) -> Vec<Value> {
    let mut requests = Vec::new();
    wait_until(
        &format!("{count} held request(s)"),
        Duration::from_secs(20),
        || {
            requests = held(setup);
            requests.len() == count
        },
    );
    requests
}

fn finish(child: Child) -> (bool, String, String) {
    let output = child.wait_with_output().expect("wait for psql");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Collects the recorded events of one type, across sessions.
fn events(node: &TestNode, event: &str) -> Vec<Value> {
    node.sessions()
        .into_iter()
        .flatten()
        .filter(|line| line["event"] == event)
        .collect()
}

fn count_of(setup: &Setup, table: &str) -> String {
    setup
        .postgres
        .admin_sql(&format!("SELECT count(*) FROM {table}"))
        .trim()
        .to_string()
}

#[test]
fn held_statement_approved_runs() {
    let setup = setup("held_statement_approved_runs");
    let psql = spawn_psql(&setup, &["DELETE FROM cards WHERE id = 1"]);
    let requests = wait_held(&setup, 1);
    let request = &requests[0];
    assert_eq!(request["rule"], "review-card-deletes");
    assert_eq!(request["policy"], "payments");
    assert_eq!(request["target"], "payments-db");
    assert_eq!(request["subject"], "unknown");
    assert_eq!(request["summary"], "DELETE FROM cards WHERE id = 1");
    assert_eq!(count_of(&setup, "cards"), "3", "nothing runs while held");

    let table = gatewayctl(&setup, &["list"]);
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(table.starts_with("ID"), "{table}");
    assert!(table.contains("review-card-deletes"), "{table}");

    let id = request["id"].as_str().expect("id");
    let approved = gatewayctl(&setup, &["approve", id, "--reason", "ticket 42"]);
    assert!(
        approved.status.success(),
        "{}",
        String::from_utf8_lossy(&approved.stderr)
    );
    let (ok, stdout, stderr) = finish(psql);
    assert!(ok, "psql failed after approval: {stderr}");
    assert!(stdout.contains("DELETE 1") || stdout.is_empty(), "{stdout}");
    assert_eq!(count_of(&setup, "cards"), "2");
    assert!(held(&setup).is_empty());

    setup.node.wait_for_sessions(1);
    let requested = events(&setup.node, "approval.requested");
    assert_eq!(requested.len(), 1);
    assert_eq!(requested[0]["id"], id);
    assert_eq!(requested[0]["rule"], "review-card-deletes");
    let answered = events(&setup.node, "approval.answered");
    assert_eq!(answered.len(), 1);
    assert_eq!(answered[0]["verdict"], "approved");
    assert_eq!(answered[0]["approver_uid"], 0);
    assert_eq!(answered[0]["approver_name"], "root");
    assert_eq!(answered[0]["reason"], "ticket 42");
    assert!(answered[0]["answered_at"].is_string());
    let statements = events(&setup.node, "sql.statement");
    let delete = statements
        .iter()
        .find(|s| s["kind"] == "delete")
        .expect("the delete is recorded");
    assert_eq!(delete["outcome"], "ok");
    assert_eq!(delete["rows"], 1);
}

#[test]
fn held_statement_denied_or_timed_out() {
    let setup = setup("held_statement_denied_or_timed_out");

    // Denied: the client gets 42501 naming the rule and the reason; nothing ran.
    let psql = spawn_psql(&setup, &["DELETE FROM cards WHERE id = 2"]);
    let requests = wait_held(&setup, 1);
    let id = requests[0]["id"].as_str().expect("id").to_string();
    let denied = gatewayctl(&setup, &["deny", &id, "--reason", "change freeze"]);
    assert!(
        denied.status.success(),
        "{}",
        String::from_utf8_lossy(&denied.stderr)
    );
    let (ok, _, stderr) = finish(psql);
    assert!(!ok, "a denied statement must fail");
    assert!(stderr.contains("review-card-deletes"), "{stderr}");
    assert!(
        stderr.contains("denied by root (uid 0): change freeze"),
        "{stderr}"
    );
    assert_eq!(count_of(&setup, "cards"), "3");

    // Self-approval: psql runs as uid 0 in the pod and so does this approver.
    let psql = spawn_psql(&setup, &["SELECT count(*) FROM vault"]);
    let requests = wait_held(&setup, 1);
    let id = requests[0]["id"].as_str().expect("id").to_string();
    assert_eq!(requests[0]["forbid_self_approval"], true);
    let refused = gatewayctl(&setup, &["approve", &id]);
    assert!(!refused.status.success());
    let message = String::from_utf8_lossy(&refused.stderr);
    assert!(message.contains("self-approval refused"), "{message}");
    assert_eq!(held(&setup).len(), 1, "still held after the refusal");
    let denied = gatewayctl(&setup, &["deny", &id, "--reason", "ask someone else"]);
    assert!(denied.status.success());
    let (ok, _, stderr) = finish(psql);
    assert!(!ok);
    assert!(stderr.contains("ask someone else"), "{stderr}");

    // No answer within the rule's 2 s deadline: denied.
    let psql = spawn_psql(&setup, &["DELETE FROM hurry WHERE id = 1"]);
    let (ok, _, stderr) = finish(psql);
    assert!(!ok, "a timed-out statement must fail");
    assert!(stderr.contains("quick-review"), "{stderr}");
    assert!(stderr.contains("no approval within 2s"), "{stderr}");
    assert_eq!(count_of(&setup, "hurry"), "1");
    assert!(held(&setup).is_empty());

    // A plain deny rule still answers at once.
    let psql = spawn_psql(&setup, &["DROP TABLE cards"]);
    let (ok, _, stderr) = finish(psql);
    assert!(!ok);
    assert!(stderr.contains("no-drop"), "{stderr}");

    setup.node.wait_for_sessions(4);
    let verdicts: Vec<Value> = events(&setup.node, "approval.answered")
        .iter()
        .map(|event| event["verdict"].clone())
        .collect();
    assert_eq!(verdicts, vec!["denied", "denied", "timed_out"]);
    let denied_statements: Vec<Value> = events(&setup.node, "sql.statement")
        .into_iter()
        .filter(|s| s["outcome"] == "denied")
        .collect();
    let rules: Vec<&str> = denied_statements
        .iter()
        .map(|s| s["rule"].as_str().expect("rule"))
        .collect();
    assert_eq!(
        rules,
        vec![
            "review-card-deletes",
            "review-vault",
            "quick-review",
            "no-drop"
        ]
    );
    let answered = events(&setup.node, "approval.answered");
    assert_eq!(answered[0]["reason"], "change freeze");
    assert_eq!(answered[2]["approver_uid"], Value::Null);
}

#[test]
fn session_scope_approval_covers_session() {
    let setup = setup("session_scope_approval_covers_session");
    let psql = spawn_psql(
        &setup,
        &[
            "DELETE FROM ledger WHERE id = 1",
            "DELETE FROM ledger WHERE id = 2",
        ],
    );
    let requests = wait_held(&setup, 1);
    assert_eq!(requests[0]["scope"], "session");
    let id = requests[0]["id"].as_str().expect("id").to_string();
    assert!(gatewayctl(&setup, &["approve", &id]).status.success());
    let (ok, _, stderr) = finish(psql);
    assert!(ok, "{stderr}");
    assert_eq!(count_of(&setup, "ledger"), "0", "both deletes ran");
    setup.node.wait_for_sessions(1);
    assert_eq!(
        events(&setup.node, "approval.requested").len(),
        1,
        "one approval covers the session"
    );
}

#[test]
fn audit_mode_reload_and_alert() {
    let setup = setup("audit_mode_reload_and_alert");

    // Audit mode: the read runs and the would-be denial is recorded.
    let (ok, stdout, stderr) = finish(spawn_psql(&setup, &["SELECT id FROM audited"]));
    assert!(ok, "{stderr}");
    assert_eq!(stdout.trim(), "7");
    setup.node.wait_for_sessions(1);
    let audits = events(&setup.node, "policy.audit");
    assert_eq!(audits.len(), 1);
    assert_eq!(audits[0]["rule"], "audited-reads");
    assert_eq!(audits[0]["would"], "deny");
    assert_eq!(audits[0]["mode"], "audit");

    // Switch the policy to enforce: the daemon reloads it.
    let file = setup.policy_dir.join("10-payments.yaml");
    std::fs::write(&file, POLICY.replace("mode: audit", "mode: enforce")).expect("write policy");
    let mut last = (false, String::new());
    wait_until("the enforcing policy", Duration::from_secs(20), || {
        let (ok, _, stderr) = finish(spawn_psql(&setup, &["SELECT id FROM audited"]));
        last = (ok, stderr);
        !last.0
    });
    assert!(last.1.contains("audited-reads"), "{}", last.1);

    // A broken file: the last good policy stays, and new sessions record the alert.
    std::fs::write(&file, "spec: [\n").expect("write policy");
    wait_until("the reload failure", Duration::from_secs(20), || {
        setup
            .daemon
            .as_ref()
            .expect("daemon")
            .log()
            .contains("policy reload failed")
    });
    let sessions_before = setup.node.session_files().len();
    let (ok, _, stderr) = finish(spawn_psql(&setup, &["SELECT id FROM audited"]));
    assert!(!ok, "the enforcing policy is still in force");
    assert!(stderr.contains("audited-reads"), "{stderr}");
    setup.node.wait_for_sessions(sessions_before + 1);
    let alerts = events(&setup.node, "policy.alert");
    assert!(!alerts.is_empty(), "the session records the alert");
    let alert = alerts.last().expect("alert");
    assert_eq!(alert["alert"], "policy_reload_failed");
    assert!(
        alert["error"]
            .as_str()
            .expect("error text")
            .contains("10-payments.yaml"),
        "{alert}"
    );
}

/// Starts a raw protocol script in the pod: a pipeline of three extended-protocol statements,
/// the middle one held for review, then one Sync.
fn spawn_pipeline(setup: &Setup, name: &str) -> Child {
    let script = [
        "startup rawuser postgres",
        "read-ready 1",
        "parse - SELECT 1",
        "bind - -",
        "execute -",
        "parse - DELETE FROM cards WHERE id = 3",
        "bind - -",
        "execute -",
        "parse - SELECT 2",
        "bind - -",
        "execute -",
        "sync",
        "read-ready 1",
        "terminate",
    ];
    let path = setup.node.dir.join(format!("{name}.script"));
    std::fs::write(&path, script.join("\n")).expect("write script");
    setup
        .node
        .in_pod(&setup.pod, env!("CARGO_BIN_EXE_gateway-testpeer"))
        .args([
            "pg-script",
            "--connect",
            &setup.postgres.addr.to_string(),
            "--script",
        ])
        .arg(&path)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn pg-script")
}

/// Returns the message tags the script printed after authentication.
fn tags_after_auth(stdout: &str) -> String {
    let tags: String = stdout
        .lines()
        .map(|line| serde_json::from_str::<Value>(line).expect("pg-script prints JSON lines"))
        .filter_map(|message| message["tag"].as_str().map(str::to_string))
        .collect();
    let start = tags.find('Z').expect("authenticated") + 1;
    tags[start..].to_string()
}

#[test]
fn held_parse_in_pipeline() {
    let setup = setup("held_parse_in_pipeline");

    // Approved: all three statements complete, then one ReadyForQuery.
    let script = spawn_pipeline(&setup, "approved");
    let requests = wait_held(&setup, 1);
    assert_eq!(requests[0]["summary"], "DELETE FROM cards WHERE id = 3");
    let id = requests[0]["id"].as_str().expect("id").to_string();
    assert!(gatewayctl(&setup, &["approve", &id]).status.success());
    let (ok, stdout, stderr) = finish(script);
    assert!(ok, "{stderr}");
    assert_eq!(tags_after_auth(&stdout), "12DC12C12DCZ");
    assert_eq!(count_of(&setup, "cards"), "2");

    // Denied: the statement before completes, the denial follows, nothing after it runs
    // until Sync, and exactly one ReadyForQuery ends the pipeline.
    let script = spawn_pipeline(&setup, "denied");
    let requests = wait_held(&setup, 1);
    let id = requests[0]["id"].as_str().expect("id").to_string();
    assert!(
        gatewayctl(&setup, &["deny", &id, "--reason", "no"])
            .status
            .success()
    );
    let (ok, stdout, stderr) = finish(script);
    assert!(ok, "{stderr}");
    assert_eq!(tags_after_auth(&stdout), "12DCEZ");
    let error = stdout
        .lines()
        .map(|line| serde_json::from_str::<Value>(line).expect("JSON line"))
        .find(|message| message["tag"] == "E")
        .expect("the denial");
    assert_eq!(error["fields"]["C"], "42501");
    assert!(
        error["fields"]["M"]
            .as_str()
            .expect("message")
            .contains("denied by root (uid 0): no"),
        "{error}"
    );
}

#[test]
fn policy_masks_named_columns_whole() {
    let setup = setup("policy_masks_named_columns_whole");
    // A rule placed last decides nothing the others do not, and sets the session's masking.
    std::fs::write(
        setup.policy_dir.join("99-masking.yaml"),
        "\
apiVersion: gateway.example.dev/v1alpha1
kind: AccessPolicy
metadata:
  name: masking
spec:
  rules:
    - name: hide-card-column
      targets:
        names: [payments-db]
      action: allow
      masking:
        keep: last4
        fields: [pan]
",
    )
    .expect("write policy");
    let mut last = String::new();
    wait_until("the masking policy", Duration::from_secs(20), || {
        let (ok, stdout, stderr) = finish(spawn_psql(
            &setup,
            &["SELECT id, pan, 'x 4111111111111111' FROM cards ORDER BY id"],
        ));
        assert!(ok, "{stderr}");
        last = stdout;
        last.contains("1|*******************|")
    });
    let rows: Vec<&str> = last.lines().collect();
    assert_eq!(
        rows,
        [
            "1|*******************|x ************1111",
            "2|*******************|x ************1111",
            "3|*|x ************1111",
        ],
        "{last}"
    );
}
