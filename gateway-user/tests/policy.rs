//! AccessPolicy loading and decisions as an operator meets them: policy files on disk, the
//! library's `Policy::decide`, `gatewayctl policy check | test`, and `gatewayctl approvals`
//! against a real approvals socket.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::Arc,
    time::Duration,
};

use gateway_user::{
    approval::{self, Broker, HoldRequest, Verdict},
    config::TargetClass,
    policy::{
        self, Action, ExecAttributes, KubeRequest, Mode, PolicyError, PolicyStore, Request,
        ReviewScope, Subject, Target,
    },
    sql::{SqlDialect, analyze},
};

const GATEWAYCTL: &str = env!("CARGO_BIN_EXE_gatewayctl");

/// Two files: a kube policy (enforce) with a kube default, and a database policy (enforce)
/// plus an audit-mode policy in the second file.
const KUBE_POLICY: &str = "\
apiVersion: gateway.example.dev/v1alpha1
kind: AccessPolicy
metadata:
  name: cluster
spec:
  defaults:
    kube_api:
      action: allow
  rules:
    - name: stolen-token
      tokenPodMismatch: true
      action: deny
    - name: unknown-callers-read-only
      subjects:
        unknown: true
      kube:
        verbs: [create, update, patch, delete, deletecollection]
      action: deny
    - name: prod-secret-writes
      subjects:
        namespaces: [prod]
      kube:
        verbs: [create, update, patch, delete]
        resources: [secrets]
      action: review
      review:
        deadline: 2m
        scope: request
        forbidSelfApproval: true
    - name: ci-deploys
      subjects:
        serviceAccounts: [ci/deployer]
      kube:
        verbs: ['*']
        groups: [apps]
        resources: [deployments]
      action: allow
    - name: interactive-exec
      subjects:
        selector:
          matchExpressions:
            - key: tier
              operator: NotIn
              values: [debug]
      kube:
        subresources: [exec, attach]
        stdin: true
        tty: true
      action: deny
    - name: exec-shell
      kube:
        subresources: [exec]
        commands: [sh, bash]
      action: review
";

const SQL_POLICY: &str = "\
apiVersion: gateway.example.dev/v1alpha1
kind: AccessPolicy
metadata:
  name: databases
spec:
  defaults:
    postgres:
      action: allow
    mysql:
      action: deny
  rules:
    - name: no-drop
      sql:
        statementKinds: [drop, truncate]
      action: deny
    - name: unbounded-writes
      sql:
        statementKinds: [delete, update]
        withoutWhere: true
      action: deny
    - name: card-deletes
      subjects:
        selector:
          matchLabels:
            app: billing
      targets:
        names: [payments-db]
      sql:
        statementKinds: [delete]
        tables: [cards]
      action: review
      review:
        scope: session
    - name: mysql-reads
      targets:
        classes: [mysql]
      sql:
        statementKinds: [select, show]
      action: allow
---
apiVersion: gateway.example.dev/v1alpha1
kind: AccessPolicy
metadata:
  name: watch-audit-log
spec:
  mode: audit
  rules:
    - name: audit-log-reads
      sql:
        tables: [audit_log]
      action: deny
";

fn write_policies(dir: &Path) {
    std::fs::write(dir.join("10-cluster.yaml"), KUBE_POLICY).expect("write policy");
    std::fs::write(dir.join("20-databases.yml"), SQL_POLICY).expect("write policy");
    // Ignored: hidden (as a ConfigMap's `..data` entries are) and not YAML.
    std::fs::write(dir.join(".hidden.yaml"), "not: [valid").expect("write file");
    std::fs::write(dir.join("README.txt"), "notes").expect("write file");
}

fn subject(namespace: &str, account: &str, labels: &[(&str, &str)]) -> Subject {
    Subject {
        namespace: Some(namespace.to_string()),
        service_account: Some(account.to_string()),
        labels: labels
            .iter()
            .map(|(key, value)| ((*key).to_string(), (*value).to_string()))
            .collect(),
        ..Subject::default()
    }
}

fn kube(verb: &str, group: &str, resource: &str, namespace: &str) -> KubeRequest {
    KubeRequest {
        verb: verb.to_string(),
        group: group.to_string(),
        resource: resource.to_string(),
        namespace: namespace.to_string(),
        ..KubeRequest::default()
    }
}

fn exec(stdin: bool, tty: bool, command: &[&str]) -> KubeRequest {
    KubeRequest {
        subresource: "exec".to_string(),
        name: "web".to_string(),
        exec: Some(ExecAttributes {
            stdin,
            tty,
            command: command.iter().map(|word| (*word).to_string()).collect(),
        }),
        ..kube("create", "", "pods", "prod")
    }
}

#[test]
fn kube_decision_table() {
    let dir = tempfile::tempdir().expect("temporary directory");
    write_policies(dir.path());
    let loaded = policy::load_path(dir.path()).expect("policies load");
    let api = Target {
        class: TargetClass::KubeApi,
        name: "kubernetes".to_string(),
    };
    let mut stolen = subject("prod", "api", &[]);
    stolen.token_pod_mismatch = true;

    let cases: Vec<(&str, Subject, KubeRequest, Action, &str)> = vec![
        (
            "stolen token denied first",
            stolen,
            kube("get", "", "pods", "prod"),
            Action::Deny,
            "stolen-token",
        ),
        (
            "unknown caller may read",
            Subject::unknown(),
            kube("list", "", "pods", "prod"),
            Action::Allow,
            "default/kube_api",
        ),
        (
            "unknown caller may not write",
            Subject::unknown(),
            kube("create", "", "configmaps", "prod"),
            Action::Deny,
            "unknown-callers-read-only",
        ),
        (
            "prod secret write held",
            subject("prod", "api", &[]),
            kube("create", "", "secrets", "prod"),
            Action::Review,
            "prod-secret-writes",
        ),
        (
            "prod secret read allowed",
            subject("prod", "api", &[]),
            kube("get", "", "secrets", "prod"),
            Action::Allow,
            "default/kube_api",
        ),
        (
            "dev secret write allowed",
            subject("dev", "api", &[]),
            kube("create", "", "secrets", "dev"),
            Action::Allow,
            "default/kube_api",
        ),
        (
            "ci deploys any verb",
            subject("ci", "deployer", &[]),
            kube("delete", "apps", "deployments", "prod"),
            Action::Allow,
            "ci-deploys",
        ),
        (
            "interactive exec denied",
            subject("prod", "api", &[("tier", "web")]),
            exec(true, true, &["sh"]),
            Action::Deny,
            "interactive-exec",
        ),
        (
            "debug tier exec shell reviewed",
            subject("prod", "api", &[("tier", "debug")]),
            exec(true, true, &["/bin/sh"]),
            Action::Review,
            "exec-shell",
        ),
        (
            "non-interactive exec of other program",
            subject("prod", "api", &[("tier", "web")]),
            exec(false, false, &["date"]),
            Action::Allow,
            "default/kube_api",
        ),
    ];
    for (case, subject, request, action, rule) in cases {
        let decision = loaded.decide(&subject, &api, Request::Kube(&request));
        assert_eq!(decision.action, action, "{case}: action");
        assert_eq!(decision.rule, rule, "{case}: rule");
    }
}

#[test]
fn sql_decision_table() {
    let dir = tempfile::tempdir().expect("temporary directory");
    write_policies(dir.path());
    let loaded = policy::load_path(dir.path()).expect("policies load");
    let payments = Target {
        class: TargetClass::Postgres,
        name: "payments-db".to_string(),
    };
    let other = Target {
        class: TargetClass::Postgres,
        name: "other-db".to_string(),
    };
    let mysql = Target {
        class: TargetClass::Mysql,
        name: "shop".to_string(),
    };
    let billing = subject("pay", "billing", &[("app", "billing")]);
    let web = subject("pay", "web", &[("app", "web")]);

    let cases: Vec<(&str, &Subject, &Target, &str, Action, &str)> = vec![
        (
            "drop denied",
            &web,
            &payments,
            "DROP TABLE cards",
            Action::Deny,
            "no-drop",
        ),
        (
            "truncate denied",
            &web,
            &payments,
            "TRUNCATE cards",
            Action::Deny,
            "no-drop",
        ),
        (
            "delete without where denied",
            &billing,
            &payments,
            "DELETE FROM cards",
            Action::Deny,
            "unbounded-writes",
        ),
        (
            "update without where denied",
            &web,
            &payments,
            "UPDATE accounts SET x = 1",
            Action::Deny,
            "unbounded-writes",
        ),
        (
            "billing card delete held",
            &billing,
            &payments,
            "DELETE FROM public.cards WHERE id = 1",
            Action::Review,
            "card-deletes",
        ),
        (
            "web card delete allowed",
            &web,
            &payments,
            "DELETE FROM cards WHERE id = 1",
            Action::Allow,
            "default/postgres",
        ),
        (
            "card delete on other target allowed",
            &billing,
            &other,
            "DELETE FROM cards WHERE id = 1",
            Action::Allow,
            "default/postgres",
        ),
        (
            "select allowed by default",
            &web,
            &payments,
            "SELECT * FROM cards",
            Action::Allow,
            "default/postgres",
        ),
        (
            "audit rule matches audit_log",
            &web,
            &payments,
            "SELECT * FROM audit_log",
            Action::Deny,
            "audit-log-reads",
        ),
        (
            "mysql select allowed",
            &web,
            &mysql,
            "SELECT 1",
            Action::Allow,
            "mysql-reads",
        ),
        (
            "mysql insert falls to class default",
            &web,
            &mysql,
            "INSERT INTO t VALUES (1)",
            Action::Deny,
            "default/mysql",
        ),
    ];
    for (case, subject, target, sql, action, rule) in cases {
        let dialect = match target.class {
            TargetClass::Mysql => SqlDialect::Mysql,
            _ => SqlDialect::Postgres,
        };
        let statement = analyze(sql, dialect).remove(0);
        let decision = loaded.decide(subject, target, Request::Sql(&statement));
        assert_eq!(decision.action, action, "{case}: action");
        assert_eq!(decision.rule, rule, "{case}: rule");
    }
}

#[test]
fn audit_mode_decides_without_enforcing() {
    let dir = tempfile::tempdir().expect("temporary directory");
    write_policies(dir.path());
    let loaded = policy::load_path(dir.path()).expect("policies load");
    let target = Target {
        class: TargetClass::Postgres,
        name: "payments-db".to_string(),
    };
    let web = subject("pay", "web", &[]);

    let audited = analyze("SELECT * FROM audit_log", SqlDialect::Postgres).remove(0);
    let decision = loaded.decide(&web, &target, Request::Sql(&audited));
    assert_eq!(decision.mode, Mode::Audit);
    assert_eq!(decision.policy.as_deref(), Some("watch-audit-log"));
    assert_eq!(decision.action, Action::Deny);
    assert_eq!(decision.enforced(), Action::Allow);
    assert!(decision.audit_only());

    let enforced = analyze("DROP TABLE t", SqlDialect::Postgres).remove(0);
    let decision = loaded.decide(&web, &target, Request::Sql(&enforced));
    assert_eq!(decision.mode, Mode::Enforce);
    assert_eq!(decision.enforced(), Action::Deny);
    assert!(!decision.audit_only());
}

#[test]
fn review_settings_and_masking() {
    let dir = tempfile::tempdir().expect("temporary directory");
    write_policies(dir.path());
    let loaded = policy::load_path(dir.path()).expect("policies load");
    let api = Target {
        class: TargetClass::KubeApi,
        name: "kubernetes".to_string(),
    };
    let request = kube("patch", "", "secrets", "prod");
    let decision = loaded.decide(&subject("prod", "a", &[]), &api, Request::Kube(&request));
    let review = decision.review.expect("review settings");
    assert_eq!(review.deadline, Duration::from_secs(120));
    assert_eq!(review.scope, ReviewScope::Request);
    assert!(review.forbid_self_approval);

    let shell = exec(false, false, &["bash"]);
    let decision = loaded.decide(&subject("prod", "a", &[]), &api, Request::Kube(&shell));
    let review = decision.review.expect("review settings");
    assert_eq!(
        review.deadline,
        Duration::from_secs(300),
        "default deadline is five minutes"
    );
    assert!(!review.forbid_self_approval);

    let masked = "\
apiVersion: gateway.example.dev/v1alpha1
kind: AccessPolicy
metadata: {name: masking}
spec:
  defaults:
    postgres:
      action: allow
      masking: {keep: last4}
  rules:
    - name: analysts-see-nothing
      subjects: {namespaces: [analytics]}
      action: allow
      masking: {keep: none, fields: [cvv, card_number]}
";
    let file = dir.path().join("30-masking.yaml");
    std::fs::write(&file, masked).expect("write policy");
    let loaded = policy::load_path(&file).expect("policy loads");
    let target = Target {
        class: TargetClass::Postgres,
        name: "db".to_string(),
    };
    let analytics = loaded.session_mask(&subject("analytics", "a", &[]), &target);
    assert_eq!(analytics.keep, policy::spec::KeepDigits::Nothing);
    assert_eq!(analytics.fields, vec!["cvv", "card_number"]);
    let others = loaded.session_mask(&subject("web", "a", &[]), &target);
    assert_eq!(others.keep, policy::spec::KeepDigits::LastFour);
}

/// Loads `text` as a file named `name` and returns the error.
fn load_error(name: &str, text: &str) -> PolicyError {
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join(name);
    std::fs::write(&path, text).expect("write policy");
    policy::load_path(&path).expect_err("policy must be rejected")
}

fn invalid_parts(error: &PolicyError) -> (String, Option<usize>, String, String) {
    match error {
        PolicyError::Invalid {
            path,
            line,
            field,
            message,
            ..
        } => (
            path.file_name()
                .expect("file name")
                .to_string_lossy()
                .into_owned(),
            *line,
            field.clone(),
            message.clone(),
        ),
        other => panic!("expected an Invalid error, got {other}"),
    }
}

const HEADER: &str = "apiVersion: gateway.example.dev/v1alpha1\nkind: AccessPolicy\nmetadata:\n  name: x\nspec:\n  rules:\n";

#[test]
fn malformed_yaml_names_file_and_line() {
    let error = load_error("broken.yaml", &format!("{HEADER}    - name: [a\n"));
    let (file, line, _, message) = invalid_parts(&error);
    assert_eq!(file, "broken.yaml");
    assert!(line.is_some(), "{error}");
    assert!(!message.is_empty(), "{error}");
    assert!(error.to_string().contains("broken.yaml:"), "{error}");
}

#[test]
fn unknown_field_names_line_and_field() {
    let text = format!(
        "{HEADER}    - name: a\n      sql: {{statementKinds: [drop]}}\n      actoin: deny\n"
    );
    let error = load_error("typo.yaml", &text);
    let (file, line, field, message) = invalid_parts(&error);
    assert_eq!(file, "typo.yaml");
    assert_eq!(line, Some(9), "{error}");
    assert_eq!(field, "spec.rules[0].actoin");
    assert!(message.contains("unknown field `actoin`"), "{message}");
}

#[test]
fn impossible_selector_rejected() {
    let cases = [
        (
            "matchLabels: {app: web}\n            matchExpressions: [{key: app, operator: In, values: [db]}]",
            "impossible selector",
        ),
        (
            "matchExpressions: [{key: app, operator: Exists}, {key: app, operator: DoesNotExist}]",
            "impossible selector",
        ),
        (
            "matchExpressions: [{key: app, operator: In, values: [a]}, {key: app, operator: NotIn, values: [a]}]",
            "impossible selector",
        ),
        (
            "matchExpressions: [{key: app, operator: In, values: []}]",
            "needs at least one value",
        ),
        (
            "matchExpressions: [{key: app, operator: Exists, values: [x]}]",
            "takes no values",
        ),
        ("matchLabels: {'-bad': x}", "invalid label key"),
    ];
    for (selector, expected) in cases {
        let text = format!(
            "{HEADER}    - name: a\n      subjects:\n          selector:\n            {selector}\n      action: deny\n"
        );
        let error = load_error("selector.yaml", &text);
        let (file, line, field, message) = invalid_parts(&error);
        assert_eq!(file, "selector.yaml");
        assert!(line.is_some(), "{error}");
        assert_eq!(field, "spec.rules[0].subjects.selector", "{error}");
        assert!(message.contains(expected), "{selector}: {message}");
    }
}

#[test]
fn contradictory_rules_rejected() {
    let cases = [
        (
            "    - name: a\n      kube: {verbs: [get]}\n      sql: {statementKinds: [drop]}\n      action: deny\n",
            "spec.rules[0]",
            "sets both `kube` and `sql`",
        ),
        (
            "    - name: a\n      sql: {statementKinds: [dropp]}\n      action: deny\n",
            "spec.rules[0].sql",
            "unknown statement kind",
        ),
        (
            "    - name: a\n      subjects: {unknown: true, namespaces: [prod]}\n      action: deny\n",
            "spec.rules[0].subjects",
            "cannot be combined",
        ),
        (
            "    - name: a\n      subjects: {namespaces: [prod], serviceAccounts: [dev/x]}\n      action: deny\n",
            "spec.rules[0].subjects",
            "can never match",
        ),
        (
            "    - name: a\n      action: deny\n      review: {deadline: 1m}\n",
            "spec.rules[0]",
            "only valid with `action: review`",
        ),
        (
            "    - name: a\n      action: review\n      review: {deadline: 2d}\n",
            "spec.rules[0].review",
            "out of range",
        ),
        (
            "    - name: a\n      targets: {classes: [kube_api]}\n      sql: {tables: [t]}\n      action: deny\n",
            "spec.rules[0]",
            "no database",
        ),
    ];
    for (rule, field, expected) in cases {
        let error = load_error("rule.yaml", &format!("{HEADER}{rule}"));
        let (_, line, got_field, message) = invalid_parts(&error);
        assert!(line.is_some(), "{error}");
        assert_eq!(got_field, field, "{error}");
        assert!(message.contains(expected), "{rule}: {message}");
    }

    let wrong_version = load_error("v.yaml", &HEADER.replace("v1alpha1", "v9"));
    let (_, line, field, _) = invalid_parts(&wrong_version);
    assert_eq!(line, Some(1));
    assert_eq!(field, "apiVersion");
}

#[test]
fn conflicts_across_objects_rejected() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let object = |name: &str| {
        format!(
            "apiVersion: gateway.example.dev/v1alpha1\nkind: AccessPolicy\nmetadata: {{name: {name}}}\nspec:\n  defaults:\n    postgres: {{action: deny}}\n"
        )
    };
    std::fs::write(dir.path().join("a.yaml"), object("one")).expect("write");
    std::fs::write(dir.path().join("b.yaml"), object("one")).expect("write");
    let error = policy::load_path(dir.path()).expect_err("duplicate names");
    assert!(error.to_string().contains("used twice"), "{error}");

    std::fs::write(dir.path().join("b.yaml"), object("two")).expect("write");
    let error = policy::load_path(dir.path()).expect_err("two postgres defaults");
    assert!(
        error
            .to_string()
            .contains("default for postgres is already set"),
        "{error}"
    );
}

#[test]
fn reload_on_change_keeps_last_good() {
    let dir = tempfile::tempdir().expect("temporary directory");
    write_policies(dir.path());
    let store = Arc::new(PolicyStore::load(dir.path()).expect("policies load"));
    let target = Target {
        class: TargetClass::Postgres,
        name: "payments-db".to_string(),
    };
    let web = subject("pay", "web", &[]);
    let select = analyze("SELECT 1", SqlDialect::Postgres).remove(0);
    let rule_of = |store: &PolicyStore| {
        store
            .current()
            .decide(&web, &target, Request::Sql(&select))
            .rule
    };
    assert_eq!(rule_of(&store), "default/postgres");

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let watcher = runtime.spawn(Arc::clone(&store).watch(Duration::from_millis(50)));
    let wait_for = |what: &str, condition: &dyn Fn() -> bool| {
        for _ in 0..200 {
            if condition() {
                return;
            }
            runtime.block_on(async { tokio::time::sleep(Duration::from_millis(25)).await });
        }
        panic!("timed out waiting for {what}: {:?}", store.status());
    };

    // A changed file is picked up.
    let stricter = SQL_POLICY.replace(
        "statementKinds: [drop, truncate]",
        "statementKinds: [select]",
    );
    std::fs::write(dir.path().join("20-databases.yml"), stricter).expect("write policy");
    wait_for("the new policy", &|| rule_of(&store) == "no-drop");
    assert_eq!(store.status().generation, 2);
    assert!(store.status().alert.is_none());

    // A broken file keeps the last good policy and raises the alert.
    std::fs::write(dir.path().join("20-databases.yml"), "spec: [\n").expect("write policy");
    wait_for("the alert", &|| store.status().alert.is_some());
    assert_eq!(rule_of(&store), "no-drop", "the last good policy stays");
    let alert = store.status().alert.expect("alert").to_string();
    assert!(alert.contains("20-databases.yml"), "{alert}");

    // A fixed file clears the alert; a new file in the directory counts as a change.
    std::fs::write(dir.path().join("20-databases.yml"), SQL_POLICY).expect("write policy");
    wait_for("the alert to clear", &|| store.status().alert.is_none());
    assert_eq!(rule_of(&store), "default/postgres");
    let extra = "apiVersion: gateway.example.dev/v1alpha1\nkind: AccessPolicy\nmetadata: {name: late}\nspec:\n  rules:\n    - {name: late-select, sql: {statementKinds: [select]}, action: deny}\n";
    std::fs::write(dir.path().join("30-late.yaml"), extra).expect("write policy");
    wait_for("the added file", &|| rule_of(&store) == "late-select");
    watcher.abort();
}

fn gatewayctl(args: &[&str]) -> Output {
    Command::new(GATEWAYCTL)
        .args(args)
        .output()
        .expect("run gatewayctl")
}

fn stdout_of(output: &Output) -> String {
    assert!(
        output.status.success(),
        "gatewayctl failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
fn gatewayctl_policy_test_and_check() {
    let dir = tempfile::tempdir().expect("temporary directory");
    write_policies(dir.path());
    let path = dir.path().to_str().expect("UTF-8 path");

    let check = stdout_of(&gatewayctl(&["policy", "check", path]));
    assert!(check.contains("valid: 3 policies, 11 rule(s)"), "{check}");

    let kube = stdout_of(&gatewayctl(&[
        "policy",
        "test",
        "--policy",
        path,
        "--subject",
        "prod/api",
        "--kube",
        "create secrets -n prod",
    ]));
    assert!(kube.contains("decision: review"), "{kube}");
    assert!(kube.contains("rule:     prod-secret-writes"), "{kube}");
    assert!(kube.contains("self-approval forbidden"), "{kube}");

    let apps = stdout_of(&gatewayctl(&[
        "policy",
        "test",
        "--policy",
        path,
        "--subject",
        "ci/deployer",
        "--kube",
        "delete deployments.apps/web -n prod",
    ]));
    assert!(apps.contains("rule:     ci-deploys"), "{apps}");

    let sql = stdout_of(&gatewayctl(&[
        "policy",
        "test",
        "--policy",
        path,
        "--subject",
        "pay/web",
        "--sql",
        "DELETE FROM cards",
        "--json",
    ]));
    let parsed: serde_json::Value = serde_json::from_str(&sql).expect("JSON output");
    assert_eq!(parsed[0]["decision"]["action"], "deny");
    assert_eq!(parsed[0]["decision"]["rule"], "unbounded-writes");
    assert_eq!(parsed[0]["decision"]["policy"], "databases");

    let audited = stdout_of(&gatewayctl(&[
        "policy",
        "test",
        "--policy",
        path,
        "--subject",
        "unknown",
        "--sql",
        "SELECT * FROM audit_log",
    ]));
    assert!(audited.contains("mode:     audit"), "{audited}");
    assert!(audited.contains("enforced: allow"), "{audited}");

    let bad_subject = gatewayctl(&[
        "policy",
        "test",
        "--policy",
        path,
        "--subject",
        "nobody",
        "--sql",
        "SELECT 1",
    ]);
    assert!(!bad_subject.status.success());
    assert!(
        String::from_utf8_lossy(&bad_subject.stderr).contains("namespace/service-account"),
        "{}",
        String::from_utf8_lossy(&bad_subject.stderr)
    );
}

#[test]
fn gatewayctl_policy_check_reports_location() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join("bad.yaml");
    std::fs::write(
        &path,
        format!("{HEADER}    - name: a\n      action: sometimes\n"),
    )
    .expect("write policy");
    let output = gatewayctl(&["policy", "check", path.to_str().expect("UTF-8 path")]);
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("bad.yaml:8:"), "{stderr}");
    assert!(stderr.contains("spec.rules[0].action"), "{stderr}");
    assert!(stderr.contains("sometimes"), "{stderr}");
}

/// A broker serving a socket in a fresh directory, on its own runtime.
struct SocketFixture {
    runtime: tokio::runtime::Runtime,
    broker: Arc<Broker>,
    socket: PathBuf,
    _dir: tempfile::TempDir,
}

fn socket_fixture() -> SocketFixture {
    let dir = tempfile::tempdir().expect("temporary directory");
    let socket = dir.path().join("state").join("approvals.sock");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let broker = Broker::new();
    {
        let _guard = runtime.enter();
        approval::serve(Arc::clone(&broker), &socket, None).expect("serve approvals socket");
    }
    SocketFixture {
        runtime,
        broker,
        socket,
        _dir: dir,
    }
}

fn hold_request(rule: &str, subject_uid: Option<u32>, forbid_self: bool) -> HoldRequest {
    HoldRequest {
        session: "session-1".to_string(),
        subject: "pay/billing".to_string(),
        subject_uid,
        target: "payments-db".to_string(),
        rule: rule.to_string(),
        policy: Some("databases".to_string()),
        summary: "DELETE FROM cards WHERE id = 1".to_string(),
        deadline: Duration::from_secs(60),
        scope: ReviewScope::Request,
        forbid_self_approval: forbid_self,
    }
}

fn approvals(socket: &Path, args: &[&str]) -> Output {
    Command::new(GATEWAYCTL)
        .arg("approvals")
        .arg("--socket")
        .arg(socket)
        .args(args)
        .output()
        .expect("run gatewayctl approvals")
}

#[test]
fn approvals_socket_root_only() {
    use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _, PermissionsExt as _};
    let fixture = socket_fixture();
    let metadata = std::fs::metadata(&fixture.socket).expect("socket exists");
    assert!(metadata.file_type().is_socket());
    assert_eq!(metadata.permissions().mode() & 0o777, 0o600);
    assert_eq!(metadata.uid(), 0);

    let empty = stdout_of(&approvals(&fixture.socket, &["list"]));
    assert_eq!(empty.trim(), "no held requests");
}

#[test]
fn approvals_list_approve_deny_via_gatewayctl() {
    let fixture = socket_fixture();
    let first = fixture
        .broker
        .hold(hold_request("card-deletes", Some(4242), false));
    let second = fixture
        .broker
        .hold(hold_request("card-deletes", Some(4242), false));

    let table = stdout_of(&approvals(&fixture.socket, &["list"]));
    let header = table.lines().next().expect("header line");
    assert!(header.starts_with("ID"), "{table}");
    assert!(header.contains("RULE"), "{table}");
    assert!(table.contains(&first.id), "{table}");
    assert!(table.contains(&second.id), "{table}");
    assert!(table.contains("DELETE FROM cards WHERE id = 1"), "{table}");

    let listed = stdout_of(&approvals(&fixture.socket, &["list", "--json"]));
    let listed: serde_json::Value = serde_json::from_str(&listed).expect("JSON");
    assert_eq!(listed["requests"].as_array().expect("list").len(), 2);
    assert_eq!(listed["requests"][0]["subject"], "pay/billing");

    let approved = stdout_of(&approvals(
        &fixture.socket,
        &["approve", &first.id, "--reason", "ticket 7"],
    ));
    assert!(
        approved.contains(&format!("approved {}", first.id)),
        "{approved}"
    );
    assert!(approved.contains("root (uid 0)"), "{approved}");
    let answer = fixture.runtime.block_on(first.wait());
    assert_eq!(answer.verdict, Verdict::Approved);
    let approver = answer.approver.expect("approver");
    assert_eq!(approver.uid, 0, "the uid comes from SO_PEERCRED");
    assert_eq!(approver.name.as_deref(), Some("root"));
    assert_eq!(answer.reason.as_deref(), Some("ticket 7"));

    let missing_reason = approvals(&fixture.socket, &["deny", &second.id, "--reason", " "]);
    assert!(!missing_reason.status.success());

    let denied = stdout_of(&approvals(
        &fixture.socket,
        &["deny", &second.id, "--reason", "not during the freeze"],
    ));
    assert!(
        denied.contains(&format!("denied {}", second.id)),
        "{denied}"
    );
    let answer = fixture.runtime.block_on(second.wait());
    assert_eq!(answer.verdict, Verdict::Denied);
    assert_eq!(answer.reason.as_deref(), Some("not during the freeze"));

    let again = approvals(&fixture.socket, &["approve", &answer.id]);
    assert!(!again.status.success(), "an answered request is gone");
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(stderr.contains("no held request"), "{stderr}");
}

#[test]
fn approvals_self_approval_refused() {
    let fixture = socket_fixture();
    // uid 0 made the connection and answers as root: refused when the rule forbids it.
    let forbidden = fixture.broker.hold(hold_request("strict", Some(0), true));
    let output = approvals(&fixture.socket, &["approve", &forbidden.id]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("self-approval refused"), "{stderr}");
    assert_eq!(fixture.broker.list().len(), 1, "the request stays held");

    // Denying one's own request is allowed, and so is approving when the rule permits it.
    stdout_of(&approvals(
        &fixture.socket,
        &["deny", &forbidden.id, "--reason", "withdrawn"],
    ));
    let permitted = fixture.broker.hold(hold_request("lenient", Some(0), false));
    stdout_of(&approvals(&fixture.socket, &["approve", &permitted.id]));
    assert_eq!(
        fixture.runtime.block_on(permitted.wait()).verdict,
        Verdict::Approved
    );
}

#[test]
fn approvals_timeout_denies_and_unlists() {
    let fixture = socket_fixture();
    let mut request = hold_request("quick", None, false);
    request.deadline = Duration::from_millis(200);
    let pending = fixture.broker.hold(request);
    let id = pending.id.clone();
    let answer = fixture.runtime.block_on(pending.wait());
    assert_eq!(answer.verdict, Verdict::TimedOut);
    assert!(answer.approver.is_none());
    assert!(
        answer
            .reason
            .as_deref()
            .unwrap_or_default()
            .contains("no answer within"),
        "{answer:?}"
    );
    assert!(fixture.broker.list().is_empty());
    let late = approvals(&fixture.socket, &["approve", &id]);
    assert!(!late.status.success());
}

#[test]
fn approvals_socket_bad_requests() {
    use std::io::{Read as _, Write as _};
    let fixture = socket_fixture();
    for line in [
        "not json\n",
        "{\"op\":\"delete\",\"id\":\"x\"}\n",
        "{\"op\":\"list\"}",
    ] {
        let mut stream = std::os::unix::net::UnixStream::connect(&fixture.socket).expect("connect");
        stream.write_all(line.as_bytes()).expect("write");
        stream
            .shutdown(std::net::Shutdown::Write)
            .expect("shutdown");
        let mut response = String::new();
        stream.read_to_string(&mut response).expect("read");
        let response: serde_json::Value = serde_json::from_str(&response).expect("JSON response");
        assert!(response["error"].is_string(), "{line:?}: {response}");
    }
    // The server keeps serving after bad clients.
    stdout_of(&approvals(&fixture.socket, &["list"]));
}

#[test]
fn approvals_socket_group_mode() {
    use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
    let dir = tempfile::tempdir().expect("temporary directory");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let _guard = runtime.enter();

    // Group "0" is taken as a numeric gid.
    let socket = dir.path().join("group.sock");
    approval::serve(Broker::new(), &socket, Some("0")).expect("serve with a group");
    let metadata = std::fs::metadata(&socket).expect("socket exists");
    assert_eq!(metadata.permissions().mode() & 0o777, 0o660);
    assert_eq!(metadata.gid(), 0);

    let error = approval::serve(
        Broker::new(),
        &dir.path().join("other.sock"),
        Some("no-such-group-here"),
    )
    .expect_err("unknown group");
    assert!(error.to_string().contains("no-such-group-here"), "{error}");

    let in_use = approval::serve(Broker::new(), &socket, None).expect_err("socket in use");
    assert!(in_use.to_string().contains("in use"), "{in_use}");
}
