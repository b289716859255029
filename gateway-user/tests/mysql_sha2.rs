//! `caching_sha2_password` through the MySQL handler: full authentication over TLS and with
//! the RSA public-key exchange, the fast path on later logins, a wrong password, and the
//! handler's rejection of full authentication when only one leg has TLS. Then the plugins
//! that send the password in clear text: `mysql_clear_password`, which the handler passes only
//! onto a server leg with TLS, and `sha256_password`, which needs the legs to agree on TLS.
//! No MySQL server can be installed on the test machines, so the server is `gateway-testpeer
//! mysql-sha2-server`, which implements the plugins' server side and prints what it received.
//! The clients are real: mysql_async (`gateway-testpeer mysql-login`) and the `mariadb` CLI,
//! whose client library has all three plugins. Every pod connection goes through the eBPF
//! redirect. The test server also replies to a multi-statement query in one write, which MariaDB
//! cannot be made to do. Needs root; run with `cargo xtask test`.

use std::{
    io::BufRead as _,
    path::{Path, PathBuf},
    process::{Output, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

use gateway_user::testing::{ChildGuard, Pod, TestCa, TestNode, wait_until};
use serde_json::{Value, json};

const GATEWAYD: &str = env!("CARGO_BIN_EXE_gatewayd");
const TESTPEER: &str = env!("CARGO_BIN_EXE_gateway-testpeer");

const PASSWORD: &str = "sha2-test-secret";
const WRONG_PASSWORD: &str = "not-the-secret";
const PORT: u16 = 3306;
/// Accounts of the test server, one per scenario, so each starts with an empty cache entry.
const ACCOUNTS: [&str; 10] = [
    "app", "cli", "direct", "wrong", "plain", "warm", "changed", "switch", "native", "leaky",
];
/// Accounts that authenticate with mysql_clear_password.
const CLEAR_PASSWORD_ACCOUNTS: [&str; 6] = [
    "clear",
    "clearcli",
    "clearfirst",
    "clearplain",
    "clearchange",
    "clearnext",
];
/// Accounts that authenticate with sha256_password.
const SHA256_ACCOUNTS: [&str; 2] = ["sha256", "sha256plain"];
/// Flag of `mysql-login` that lets mysql_async use mysql_clear_password.
const CLEARTEXT: &str = "--enable-cleartext-plugin";

struct Sha2Setup {
    node: TestNode,
    pod: Pod,
    addr: String,
    server: Option<ChildGuard>,
    /// Login lines the server printed, in order.
    logins: Arc<Mutex<Vec<Value>>>,
    server_log: PathBuf,
    daemon: Option<gateway_user::testing::Daemon>,
    password_file: PathBuf,
    wrong_password_file: PathBuf,
    /// The gateway CA's certificate, for clients of a target with `tls`.
    gateway_ca: PathBuf,
    /// The database CA's certificate, for clients that connect to the server directly.
    database_ca: PathBuf,
}

/// Starts the caching_sha2_password server and a daemon with a `mysql` target for it. With
/// `server_tls` the server offers TLS with a certificate from a database CA; with
/// `client_tls` the gateway terminates TLS with a certificate from its own CA; with
/// `upstream_tls` the gateway speaks TLS to the server and verifies it.
fn start(test_name: &str, server_tls: bool, client_tls: bool, upstream_tls: bool) -> Sha2Setup {
    let mut node = TestNode::new(test_name);
    let pod = node.add_pod("app");
    let server = node.add_server("db", &[]);
    let server_ip = server.addr_v4.to_string();
    let addr = format!("{server_ip}:{PORT}");

    let password_file = node.dir.join("password");
    std::fs::write(&password_file, format!("{PASSWORD}\n")).expect("write password file");
    let wrong_password_file = node.dir.join("wrong-password");
    std::fs::write(&wrong_password_file, format!("{WRONG_PASSWORD}\n"))
        .expect("write password file");

    let gateway_ca = TestCa::new(&node.dir, "gateway");
    let database_ca = TestCa::new(&node.dir, "database");
    let server_log = node.dir.join("mysql-sha2-server.log");
    let mut command = node.in_server(&server, TESTPEER);
    command
        .args(["mysql-sha2-server", "--listen", &addr, "--password-file"])
        .arg(&password_file);
    for account in ACCOUNTS {
        command.args(["--account", account]);
    }
    for account in CLEAR_PASSWORD_ACCOUNTS {
        command.args(["--clear-password-account", account]);
    }
    for account in SHA256_ACCOUNTS {
        command.args(["--sha256-account", account]);
    }
    if server_tls {
        let (cert, key) = database_ca.issue("sha2-server", std::slice::from_ref(&server_ip));
        command
            .arg("--tls-cert")
            .arg(cert)
            .arg("--tls-key")
            .arg(key);
    }
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&server_log).expect("create server log"))
        .spawn()
        .expect("spawn mysql-sha2-server");
    let stdout = child.stdout.take().expect("piped stdout");
    let server = ChildGuard(child);
    let lines = Arc::new(Mutex::new(Vec::new()));
    let reader_lines = Arc::clone(&lines);
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let value: Value = serde_json::from_str(&line).expect("server prints JSON lines");
            reader_lines.lock().expect("lines lock").push(value);
        }
    });
    wait_until(
        "mysql-sha2-server to listen",
        Duration::from_secs(60),
        || !lines.lock().expect("lines lock").is_empty(),
    );
    let listening = lines.lock().expect("lines lock").remove(0);
    assert_eq!(listening["listening"], addr.as_str());

    let mut targets = format!(
        "  - name: sha2-mysql\n    address: {server_ip}\n    port: {PORT}\n    class: mysql\n"
    );
    targets.push_str(&gateway_user::testing::target_tls_lines(
        &gateway_ca,
        &database_ca,
        &server_ip,
        client_tls,
        upstream_tls,
    ));
    let config = node.daemon_config("gatewayd.yaml", "", &targets);
    let daemon = node.start_daemon(Path::new(GATEWAYD), &config, None);
    Sha2Setup {
        node,
        pod,
        addr,
        server: Some(server),
        logins: lines,
        server_log,
        daemon: Some(daemon),
        password_file,
        wrong_password_file,
        gateway_ca: gateway_ca.cert_path.clone(),
        database_ca: database_ca.cert_path.clone(),
    }
}

impl Drop for Sha2Setup {
    fn drop(&mut self) {
        if std::thread::panicking() {
            if let Some(daemon) = &self.daemon {
                eprintln!("gatewayd log:\n{}", daemon.log());
            }
            eprintln!(
                "mysql-sha2-server log:\n{}",
                std::fs::read_to_string(&self.server_log).unwrap_or_default()
            );
        }
        if let Some(daemon) = self.daemon.take() {
            daemon.stop();
        }
        self.server.take();
    }
}

impl Sha2Setup {
    /// Logs in with mysql_async from the pod (through the gateway) or from the node (direct),
    /// runs `query`, and returns the JSON `mysql-login` prints.
    fn login(
        &self,
        through_gateway: bool,
        user: &str,
        password_file: &Path,
        query: &str,
        tls_ca: Option<&Path>,
    ) -> Value {
        self.run_login(through_gateway, user, password_file, query, tls_ca, &[])
    }

    /// Logs in from the pod as `user`, runs `SELECT 1`, changes to `new_user` with
    /// COM_CHANGE_USER and runs it again (see `mysql-login --change-user`).
    fn change_user(&self, user: &str, new_user: &str, tls_ca: Option<&Path>) -> Value {
        let password = self.password_file.clone();
        let extra = ["--change-user", new_user];
        self.run_login(true, user, &password, "SELECT 1", tls_ca, &extra)
    }

    fn run_login(
        &self,
        through_gateway: bool,
        user: &str,
        password_file: &Path,
        query: &str,
        tls_ca: Option<&Path>,
        extra: &[&str],
    ) -> Value {
        let mut command = if through_gateway {
            self.node.in_pod(&self.pod, TESTPEER)
        } else {
            self.node.in_node(None, TESTPEER)
        };
        command
            .args(["mysql-login", "--connect", &self.addr, "--user", user])
            .arg("--password-file")
            .arg(password_file)
            .args(["--query", query])
            .args(extra);
        if let Some(ca) = tls_ca {
            command.arg("--tls-ca").arg(ca);
        }
        let output = command
            .stdin(Stdio::null())
            .output()
            .expect("run mysql-login");
        assert!(
            output.status.success(),
            "mysql-login failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        serde_json::from_slice(&output.stdout).expect("mysql-login prints JSON")
    }

    /// Runs the `mariadb` CLI in the pod with `args` and the test password.
    fn cli(&self, user: &str, args: &[&str]) -> Output {
        let (host, port) = self.addr.split_once(':').expect("host:port");
        self.node
            .in_pod(&self.pod, "mariadb")
            .arg("--no-defaults")
            .arg(format!("--host={host}"))
            .arg(format!("--port={port}"))
            .arg(format!("--user={user}"))
            .arg(format!("--password={PASSWORD}"))
            .args(["--batch", "--skip-column-names", "--connect-timeout=10"])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run mariadb")
    }

    /// Waits until the server has printed `count` login lines and returns them.
    fn wait_logins(&self, count: usize) -> Vec<Value> {
        wait_until(
            "the test server's login lines",
            Duration::from_secs(20),
            || self.logins.lock().expect("lines lock").len() >= count,
        );
        self.logins.lock().expect("lines lock").clone()
    }

    /// Waits until the server has printed `count` login lines for `user` and returns them.
    fn wait_logins_of(&self, user: &str, count: usize) -> Vec<Value> {
        wait_until(
            "the test server's login lines for one account",
            Duration::from_secs(20),
            || self.logins_of(user).len() >= count,
        );
        self.logins_of(user)
    }

    /// Returns the server's login lines for `user`.
    fn logins_of(&self, user: &str) -> Vec<Value> {
        self.logins
            .lock()
            .expect("lines lock")
            .iter()
            .filter(|line| line["user"] == user)
            .cloned()
            .collect()
    }

    /// Checks that no recording contains either test password.
    fn assert_no_password_recorded(&self) {
        for path in self.node.session_files() {
            let text = std::fs::read_to_string(&path).expect("read recording");
            assert!(!text.contains(PASSWORD), "{}", path.display());
            assert!(!text.contains(WRONG_PASSWORD), "{}", path.display());
        }
    }
}

fn rows(value: &Value) -> &Value {
    assert!(value.get("rows").is_some(), "expected rows: {value}");
    &value["rows"]
}

/// Collects the `session.end` lines of all recordings.
fn session_ends(sessions: &[Vec<Value>]) -> Vec<Value> {
    sessions
        .iter()
        .flatten()
        .filter(|line| line["event"] == "session.end")
        .cloned()
        .collect()
}

#[test]
fn sha2_rsa_exchange_then_fast_path() {
    let setup = start("sha2_rsa_exchange_then_fast_path", false, false, false);
    let password = setup.password_file.clone();

    // First login: nothing cached, so full authentication with the server's RSA key, which
    // mysql_async requests itself.
    let first = setup.login(true, "app", &password, "SELECT 1", None);
    assert_eq!(rows(&first), &json!([["1"]]));
    setup.wait_logins(1);
    let app = setup.logins_of("app");
    assert_eq!(app[0]["method"], "full-rsa", "{app:?}");
    assert_eq!(app[0]["tls"], false);
    assert_eq!(app[0]["accepted"], true);

    // Second login: the account is in the cache, so the scramble alone passes.
    let second = setup.login(true, "app", &password, "SELECT card", None);
    assert_eq!(rows(&second), &json!([["411111******1111"]]));
    setup.wait_logins(2);
    let app = setup.logins_of("app");
    assert_eq!(app[1]["method"], "fast", "{app:?}");
    assert_eq!(app[1]["accepted"], true);

    // Directly, the same card number comes back unmasked.
    let direct = setup.login(false, "direct", &password, "SELECT card", None);
    assert_eq!(rows(&direct), &json!([["4111111111111111"]]));
    setup.wait_logins(3);
    assert_eq!(setup.logins_of("direct")[0]["method"], "full-rsa");

    // The mariadb CLI without TLS requests the key as well, then takes the fast path.
    for expected in ["full-rsa", "fast"] {
        let output = setup.cli("cli", &["--skip-ssl", "-e", "SELECT CURRENT_USER()"]);
        assert!(
            output.status.success(),
            "mariadb ({expected}): {}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(
            String::from_utf8_lossy(&output.stdout).starts_with("cli@"),
            "{output:?}"
        );
    }
    setup.wait_logins(5);
    let methods: Vec<Value> = setup
        .logins_of("cli")
        .iter()
        .map(|line| line["method"].clone())
        .collect();
    assert_eq!(methods, ["full-rsa", "fast"]);
    assert!(
        setup
            .logins_of("cli")
            .iter()
            .all(|line| line["switched"] == false),
        "the CLI starts with the plugin the greeting names"
    );

    // A CLI starting with mysql_native_password is switched to caching_sha2_password, and
    // the gateway relays the switch before the RSA exchange.
    let output = setup.cli(
        "native",
        &[
            "--skip-ssl",
            "--default-auth=mysql_native_password",
            "-e",
            "SELECT 1",
        ],
    );
    assert!(
        output.status.success(),
        "mariadb: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    setup.wait_logins(6);
    let native = setup.logins_of("native");
    assert_eq!(native[0]["switched"], true, "{native:?}");
    assert_eq!(native[0]["method"], "full-rsa", "{native:?}");
    assert_eq!(native[0]["accepted"], true);

    // With its default --ssl and no TLS offered, the mariadb 10.11 CLI sends the password in
    // clear text after the server requests full authentication. The gateway keeps it off the
    // server leg and ends the login.
    let output = setup.cli("leaky", &["-e", "SELECT 1"]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("ERROR 1043"), "{stderr}");
    assert!(stderr.contains("in clear text"), "{stderr}");

    // A wrong password: the client gets the server's error, and the session records it.
    let wrong = setup.login(true, "wrong", &setup.wrong_password_file, "SELECT 1", None);
    assert_eq!(wrong["error"]["code"], 1045, "{wrong}");
    assert_eq!(wrong["error"]["state"], "28000", "{wrong}");
    setup.wait_logins(8);
    let rejected = setup.logins_of("wrong");
    assert_eq!(rejected[0]["method"], "full-rsa");
    assert_eq!(rejected[0]["accepted"], false);

    // COM_CHANGE_USER to an account not in the cache runs the RSA exchange again.
    let changed = setup.change_user("app", "changed", None);
    assert_eq!(rows(&changed), &json!([["1"]]));
    assert_eq!(rows(&changed["change_user"]), &json!([["1"]]), "{changed}");
    setup.wait_logins(10);
    assert_eq!(setup.logins_of("app")[2]["method"], "fast");
    let changed_logins = setup.logins_of("changed");
    assert_eq!(
        changed_logins[0]["method"], "full-rsa",
        "{changed_logins:?}"
    );
    assert_eq!(changed_logins[0]["accepted"], true);

    // The server received only the scramble before the gateway closed the connection, never
    // the leaked password.
    let leaky = setup.wait_logins_of("leaky", 1);
    assert_eq!(leaky.len(), 1, "{leaky:?}");
    assert_eq!(leaky[0]["received"], json!(["scramble"]), "{leaky:?}");
    assert_eq!(leaky[0]["accepted"], false);
    assert!(leaky[0]["error"].is_string(), "{leaky:?}");

    // Eight sessions went through the gateway: app three times (once changing to `changed`),
    // cli twice, native, leaky and wrong once each.
    let sessions = setup.node.wait_for_sessions(8);
    let wrong_session = sessions
        .iter()
        .find(|lines| {
            lines
                .iter()
                .any(|line| line["event"] == "sql.startup" && line["database_user"] == "wrong")
        })
        .expect("the wrong password's session is recorded");
    let startup = wrong_session
        .iter()
        .find(|line| line["event"] == "sql.startup")
        .expect("startup event");
    assert_eq!(startup["authenticated"], false);
    assert_eq!(startup["server_auth_plugin"], "caching_sha2_password");
    let end = wrong_session
        .iter()
        .find(|line| line["event"] == "session.end")
        .expect("end event");
    let reason = end["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("rejected the login: error 1045"), "{end}");
    let authenticated = sessions
        .iter()
        .flatten()
        .filter(|line| line["event"] == "sql.startup" && line["authenticated"] == true)
        .count();
    assert_eq!(authenticated, 6);
    let leaked = session_ends(&sessions)
        .into_iter()
        .filter(|end| {
            end["reason"]
                .as_str()
                .is_some_and(|reason| reason.contains("in clear text"))
        })
        .count();
    assert_eq!(leaked, 1);
    let change = sessions
        .iter()
        .flatten()
        .find(|line| line["event"] == "sql.change_user")
        .expect("change of user recorded");
    assert_eq!(change["database_user"], "changed");
    assert_eq!(change["outcome"], "ok");
    setup.assert_no_password_recorded();
}

#[test]
fn sha2_full_auth_over_tls_both_legs() {
    let setup = start("sha2_full_auth_over_tls_both_legs", true, true, true);
    let password = setup.password_file.clone();
    let ca = setup.gateway_ca.clone();

    // Over TLS the client sends the password itself after the server asks for full
    // authentication, and the gateway passes it on inside its own TLS to the server.
    for expected in ["full-tls", "fast"] {
        let result = setup.login(true, "app", &password, "SELECT card", Some(&ca));
        assert_eq!(rows(&result), &json!([["411111******1111"]]), "{expected}");
    }
    setup.wait_logins(2);
    let app = setup.logins_of("app");
    assert_eq!(app[0]["method"], "full-tls", "{app:?}");
    assert_eq!(app[1]["method"], "fast", "{app:?}");
    assert!(app.iter().all(|line| line["tls"] == true), "{app:?}");

    // The same with the mariadb CLI, verifying the gateway's certificate.
    let ca_arg = format!("--ssl-ca={}", ca.display());
    for expected in ["full-tls", "fast"] {
        let output = setup.cli(
            "cli",
            &[
                "--ssl",
                &ca_arg,
                "--ssl-verify-server-cert",
                "-e",
                "SELECT 1",
            ],
        );
        assert!(
            output.status.success(),
            "mariadb ({expected}): {}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert_eq!(String::from_utf8_lossy(&output.stdout), "1\n");
    }
    setup.wait_logins(4);
    let methods: Vec<Value> = setup
        .logins_of("cli")
        .iter()
        .map(|line| line["method"].clone())
        .collect();
    assert_eq!(methods, ["full-tls", "fast"]);

    // A wrong password over TLS reaches the server, which rejects it.
    let wrong = setup.login(
        true,
        "wrong",
        &setup.wrong_password_file,
        "SELECT 1",
        Some(&ca),
    );
    assert_eq!(wrong["error"]["code"], 1045, "{wrong}");
    setup.wait_logins(5);
    assert_eq!(setup.logins_of("wrong")[0]["method"], "full-tls");
    assert_eq!(setup.logins_of("wrong")[0]["accepted"], false);

    // Directly, the server's own TLS carries the same exchange.
    let direct = setup.login(
        false,
        "direct",
        &password,
        "SELECT 1",
        Some(&setup.database_ca),
    );
    assert_eq!(rows(&direct), &json!([["1"]]));

    let sessions = setup.node.wait_for_sessions(5);
    let startups: Vec<&Value> = sessions
        .iter()
        .flatten()
        .filter(|line| line["event"] == "sql.startup")
        .collect();
    assert_eq!(startups.len(), 5);
    assert!(
        startups.iter().all(|s| s["client_tls"] == true),
        "{startups:?}"
    );
    assert!(
        startups.iter().all(|s| s["upstream_tls"] == true),
        "{startups:?}"
    );
    setup.assert_no_password_recorded();
}

#[test]
fn sha2_full_auth_needs_tls_on_both_legs() {
    // The client leg has TLS, the server leg has none.
    let setup = start("sha2_full_auth_needs_tls_on_both_legs", false, true, false);
    let password = setup.password_file.clone();
    let ca = setup.gateway_ca.clone();

    // Full authentication would send the password in clear text on the server leg, so the
    // gateway ends the login with its own error and the server never gets the password.
    let refused = setup.login(true, "plain", &password, "SELECT 1", Some(&ca));
    assert_eq!(refused["error"]["code"], 1043, "{refused}");
    assert_eq!(refused["error"]["state"], "08S01", "{refused}");
    let message = refused["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("TLS on both legs"), "{refused}");

    // Without TLS from the client either, the RSA exchange runs end to end.
    let plain = setup.login(true, "plain", &password, "SELECT 1", None);
    assert_eq!(rows(&plain), &json!([["1"]]));

    // Once the server has the account cached, the fast path works with TLS on one leg,
    // because the scramble is no secret.
    let warmed = setup.login(false, "warm", &password, "SELECT 1", None);
    assert_eq!(rows(&warmed), &json!([["1"]]));
    let fast = setup.login(true, "warm", &password, "SELECT 1", Some(&ca));
    assert_eq!(rows(&fast), &json!([["1"]]));

    // The same rejection in COM_CHANGE_USER ends the session, since the server still waits for
    // the password and would read the next command in its place.
    let switched = setup.change_user("warm", "switch", Some(&ca));
    assert_eq!(rows(&switched), &json!([["1"]]));
    let change = &switched["change_user"];
    assert_eq!(change["error"]["code"], 1043, "{switched}");
    assert!(change["then"]["failure"].is_string(), "{switched}");

    // The server received only the scramble in the rejected exchanges, which the gateway broke
    // off by closing the server leg.
    setup.wait_logins(6);
    let switch = setup.logins_of("switch");
    assert_eq!(switch.len(), 1, "{switch:?}");
    assert_eq!(switch[0]["received"], json!(["scramble"]), "{switch:?}");
    assert!(switch[0]["error"].is_string(), "{switch:?}");
    let plain_logins = setup.logins_of("plain");
    assert_eq!(plain_logins.len(), 2, "{plain_logins:?}");
    let broken: Vec<&Value> = plain_logins
        .iter()
        .filter(|line| line["error"].is_string())
        .collect();
    assert_eq!(broken.len(), 1, "{plain_logins:?}");
    assert_eq!(
        broken[0]["received"],
        json!(["scramble"]),
        "{plain_logins:?}"
    );
    let accepted: Vec<&Value> = plain_logins
        .iter()
        .filter(|line| line["accepted"] == true)
        .collect();
    assert_eq!(accepted.len(), 1, "{plain_logins:?}");
    assert_eq!(accepted[0]["method"], "full-rsa");
    let warm: Vec<Value> = setup
        .logins_of("warm")
        .iter()
        .map(|line| line["method"].clone())
        .collect();
    assert_eq!(warm, ["full-rsa", "fast", "fast"]);

    let sessions = setup.node.wait_for_sessions(4);
    let ends = session_ends(&sessions);
    let refusals: Vec<&Value> = ends
        .iter()
        .filter(|end| {
            end["reason"]
                .as_str()
                .is_some_and(|reason| reason.contains("needs TLS on both legs"))
        })
        .collect();
    assert_eq!(refusals.len(), 2, "{ends:#?}");
    let refused_session = sessions
        .iter()
        .find(|lines| lines.iter().any(|line| line == refusals[0]))
        .expect("session of the refusal");
    let startup = refused_session
        .iter()
        .find(|line| line["event"] == "sql.startup")
        .expect("startup event");
    assert_eq!(startup["authenticated"], false);
    assert_eq!(startup["client_tls"], true);
    assert_eq!(startup["upstream_tls"], false);

    let switch_session = sessions
        .iter()
        .find(|lines| lines.iter().any(|line| line == refusals[1]))
        .expect("session of the rejected change of user");
    let change = switch_session
        .iter()
        .find(|line| line["event"] == "sql.change_user")
        .expect("change of user recorded");
    assert_eq!(change["database_user"], "switch");
    assert_eq!(change["outcome"], "error");
    setup.assert_no_password_recorded();
}

/// Asserts that the mariadb CLI failed with the gateway's ERR 1043 and a message containing
/// `expected`.
fn assert_cli_rejected(output: &Output, expected: &str) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "mariadb succeeded: {stderr}");
    assert!(stderr.contains("ERROR 1043"), "{stderr}");
    assert!(stderr.contains(expected), "{stderr}");
}

/// Asserts that the mariadb CLI succeeded and printed `1` for `SELECT 1`.
fn assert_cli_selected_one(output: &Output) {
    assert!(
        output.status.success(),
        "mariadb: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&output.stdout), "1\n");
}

/// Returns the recordings' `session.end` lines whose reason contains `text`.
fn ends_with_reason(sessions: &[Vec<Value>], text: &str) -> Vec<Value> {
    session_ends(sessions)
        .into_iter()
        .filter(|end| {
            end["reason"]
                .as_str()
                .is_some_and(|reason| reason.contains(text))
        })
        .collect()
}

/// Returns the first line of `event` in the recording whose lines include `member`.
fn event_in_session_of<'a>(sessions: &'a [Vec<Value>], member: &Value, event: &str) -> &'a Value {
    sessions
        .iter()
        .find(|lines| lines.iter().any(|line| line == member))
        .expect("session of the line")
        .iter()
        .find(|line| line["event"] == event)
        .unwrap_or_else(|| panic!("no {event} in the session of {member}"))
}

#[test]
fn clear_password_needs_upstream_tls() {
    // The client leg may have TLS, but the server leg has none.
    let setup = start("clear_password_needs_upstream_tls", false, true, false);
    let password = setup.password_file.clone();
    let ca = setup.gateway_ca.clone();
    let ca_arg = format!("--ssl-ca={}", ca.display());
    let tls_args = ["--ssl", ca_arg.as_str(), "--ssl-verify-server-cert"];
    const UPSTREAM: &str = "set upstream_tls on the target";

    // mysql_async over TLS, switched to mysql_clear_password by the server: the gateway keeps
    // the password the client then sends off the plain server leg.
    let rejected_login = setup.run_login(
        true,
        "clear",
        &password,
        "SELECT 1",
        Some(&ca),
        &[CLEARTEXT],
    );
    assert_eq!(rejected_login["error"]["code"], 1043, "{rejected_login}");
    assert_eq!(
        rejected_login["error"]["state"], "08S01",
        "{rejected_login}"
    );
    let message = rejected_login["error"]["message"]
        .as_str()
        .unwrap_or_default();
    assert!(message.contains(UPSTREAM), "{rejected_login}");

    // The mariadb CLI over TLS, switched the same way.
    let switched = [&tls_args[..], &["-e", "SELECT 1"]].concat();
    assert_cli_rejected(&setup.cli("clearcli", &switched), UPSTREAM);

    // Starting with mysql_clear_password, the CLI puts the password in its handshake
    // response, which the gateway does not forward at all.
    let first = [
        &tls_args[..],
        &["--default-auth=mysql_clear_password", "-e", "SELECT 1"],
    ]
    .concat();
    assert_cli_rejected(&setup.cli("clearfirst", &first), UPSTREAM);

    // Without TLS on either leg, the password would cross the network in clear text too.
    assert_cli_rejected(
        &setup.cli("clearplain", &["--skip-ssl", "-e", "SELECT 1"]),
        UPSTREAM,
    );

    // sha256_password over TLS sends the password in clear text, which the server leg
    // without TLS must not carry and the server would not take.
    assert_cli_rejected(
        &setup.cli("sha256", &switched),
        "sha256_password authentication needs TLS on both legs",
    );

    // With TLS on neither leg, sha256_password runs its RSA key exchange end to end.
    assert_cli_selected_one(&setup.cli("sha256plain", &["--skip-ssl", "-e", "SELECT 1"]));

    // COM_CHANGE_USER to a mysql_clear_password account, after a fast login that an account
    // cached by a direct login allows with TLS on one leg.
    let warmed = setup.login(false, "warm", &password, "SELECT 1", None);
    assert_eq!(rows(&warmed), &json!([["1"]]));
    let extra = ["--change-user", "clearchange", CLEARTEXT];
    let changed = setup.run_login(true, "warm", &password, "SELECT 1", Some(&ca), &extra);
    assert_eq!(rows(&changed), &json!([["1"]]));
    let change = &changed["change_user"];
    assert_eq!(change["error"]["code"], 1043, "{changed}");
    let message = change["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains(UPSTREAM), "{changed}");
    assert!(change["then"]["failure"].is_string(), "{changed}");

    // What the server received: a scramble and no password from each rejected login, and
    // nothing at all from the CLI that started with mysql_clear_password.
    setup.wait_logins(8);
    for user in ["clear", "clearcli", "clearplain", "sha256", "clearchange"] {
        let lines = setup.logins_of(user);
        assert_eq!(lines.len(), 1, "{user}: {lines:?}");
        assert_eq!(
            lines[0]["received"],
            json!(["scramble"]),
            "{user}: {lines:?}"
        );
        assert_eq!(lines[0]["switched"], true, "{user}: {lines:?}");
        assert_eq!(lines[0]["accepted"], false, "{user}: {lines:?}");
        assert!(lines[0]["error"].is_string(), "{user}: {lines:?}");
    }
    assert_eq!(
        setup.logins_of("clear")[0]["plugin"],
        "mysql_clear_password"
    );
    assert_eq!(setup.logins_of("sha256")[0]["plugin"], "sha256_password");
    assert_eq!(setup.logins_of("clearfirst"), Vec::<Value>::new());
    let sha256_plain = setup.logins_of("sha256plain");
    assert_eq!(sha256_plain.len(), 1, "{sha256_plain:?}");
    assert_eq!(sha256_plain[0]["method"], "sha256-rsa", "{sha256_plain:?}");
    assert_eq!(
        sha256_plain[0]["received"],
        json!(["scramble", "key-request", "rsa"]),
        "{sha256_plain:?}"
    );
    assert_eq!(sha256_plain[0]["accepted"], true);

    // Seven sessions went through the gateway, and each rejection is the reason one ended.
    let sessions = setup.node.wait_for_sessions(7);
    let clear_text = ends_with_reason(&sessions, UPSTREAM);
    assert_eq!(clear_text.len(), 5, "{:#?}", session_ends(&sessions));
    let sha256 = ends_with_reason(&sessions, "sha256_password authentication needs TLS");
    assert_eq!(sha256.len(), 1, "{:#?}", session_ends(&sessions));
    let rejected_startups: Vec<&Value> = clear_text
        .iter()
        .map(|end| event_in_session_of(&sessions, end, "sql.startup"))
        .collect();
    let first_startup = rejected_startups
        .iter()
        .find(|startup| startup["database_user"] == "clearfirst")
        .expect("startup of the CLI that started with mysql_clear_password");
    assert_eq!(first_startup["auth_plugin"], "mysql_clear_password");
    assert_eq!(first_startup["authenticated"], false);
    assert_eq!(first_startup["client_tls"], true);
    assert_eq!(first_startup["upstream_tls"], false);
    let change = sessions
        .iter()
        .flatten()
        .find(|line| line["event"] == "sql.change_user")
        .expect("change of user recorded");
    assert_eq!(change["database_user"], "clearchange");
    assert_eq!(change["outcome"], "error");
    setup.assert_no_password_recorded();
}

#[test]
fn clear_password_over_tls_both_legs() {
    let setup = start("clear_password_over_tls_both_legs", true, true, true);
    let password = setup.password_file.clone();
    let ca = setup.gateway_ca.clone();
    let ca_arg = format!("--ssl-ca={}", ca.display());
    let tls_args = ["--ssl", ca_arg.as_str(), "--ssl-verify-server-cert"];

    // mysql_async over TLS, switched to mysql_clear_password. Its COM_CHANGE_USER then names
    // mysql_clear_password and carries the password itself.
    let extra = [CLEARTEXT, "--change-user", "clearnext"];
    let result = setup.run_login(true, "clear", &password, "SELECT card", Some(&ca), &extra);
    assert_eq!(rows(&result), &json!([["411111******1111"]]), "{result}");
    assert_eq!(
        rows(&result["change_user"]),
        &json!([["411111******1111"]]),
        "{result}"
    );

    // A client without TLS has sent the password in clear text on its own leg already, and
    // the server leg with TLS exposes it no further.
    let plain = setup.run_login(
        true,
        "clearplain",
        &password,
        "SELECT 1",
        None,
        &[CLEARTEXT],
    );
    assert_eq!(rows(&plain), &json!([["1"]]), "{plain}");

    // The mariadb CLI, switched by the server and starting with the plugin itself.
    let switched = [&tls_args[..], &["-e", "SELECT 1"]].concat();
    assert_cli_selected_one(&setup.cli("clearcli", &switched));
    let first = [
        &tls_args[..],
        &["--default-auth=mysql_clear_password", "-e", "SELECT 1"],
    ]
    .concat();
    assert_cli_selected_one(&setup.cli("clearfirst", &first));

    // sha256_password over TLS on both legs, and rejected when only the server leg has TLS.
    assert_cli_selected_one(&setup.cli("sha256", &switched));
    assert_cli_rejected(
        &setup.cli("sha256plain", &["--skip-ssl", "-e", "SELECT 1"]),
        "sha256_password authentication needs TLS on both legs",
    );

    setup.wait_logins(7);
    let expected = [
        ("clear", "clear", true, json!(["scramble", "clear-text"])),
        ("clearnext", "clear", false, json!(["clear-text"])),
        (
            "clearplain",
            "clear",
            true,
            json!(["scramble", "clear-text"]),
        ),
        ("clearcli", "clear", true, json!(["scramble", "clear-text"])),
        ("clearfirst", "clear", false, json!(["clear-text"])),
        (
            "sha256",
            "sha256-tls",
            true,
            json!(["scramble", "clear-text"]),
        ),
    ];
    for (user, method, switched, received) in expected {
        let lines = setup.logins_of(user);
        assert_eq!(lines.len(), 1, "{user}: {lines:?}");
        assert_eq!(lines[0]["method"], method, "{user}: {lines:?}");
        assert_eq!(lines[0]["switched"], switched, "{user}: {lines:?}");
        assert_eq!(lines[0]["received"], received, "{user}: {lines:?}");
        assert_eq!(lines[0]["tls"], true, "{user}: {lines:?}");
        assert_eq!(lines[0]["accepted"], true, "{user}: {lines:?}");
    }
    let sha256_plain = setup.logins_of("sha256plain");
    assert_eq!(sha256_plain.len(), 1, "{sha256_plain:?}");
    assert_eq!(sha256_plain[0]["received"], json!(["scramble"]));
    assert_eq!(sha256_plain[0]["accepted"], false);

    let sessions = setup.node.wait_for_sessions(6);
    let authenticated = sessions
        .iter()
        .flatten()
        .filter(|line| line["event"] == "sql.startup" && line["authenticated"] == true)
        .count();
    assert_eq!(authenticated, 5);
    let change = sessions
        .iter()
        .flatten()
        .find(|line| line["event"] == "sql.change_user")
        .expect("change of user recorded");
    assert_eq!(change["database_user"], "clearnext");
    assert_eq!(change["outcome"], "ok");
    let rejected = ends_with_reason(&sessions, "sha256_password authentication needs TLS");
    assert_eq!(rejected.len(), 1, "{:#?}", session_ends(&sessions));
    setup.assert_no_password_recorded();
}

/// A three-statement text whose result sets the server sends in a single write, so
/// that they reach the gateway in one read. Each result set comes back in order, the card
/// number masked, each statement is recorded with its place in the text, and the next query on
/// the connection works.
#[test]
fn multi_statement_results_in_one_read() {
    let setup = start("multi_statement_results_in_one_read", false, false, false);
    // With `//` as the delimiter the CLI sends the three statements as one COM_QUERY, then
    // `SELECT 1` as another.
    let output = setup.cli(
        "cli",
        &[
            "--skip-ssl",
            "--delimiter=//",
            "-e",
            "SELECT 1; SELECT card; SELECT CURRENT_USER()// SELECT 1//",
        ],
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "mariadb: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 4, "{stdout}");
    assert_eq!(lines[0], "1");
    assert_eq!(lines[1], "411111******1111");
    assert!(lines[2].starts_with("cli@"), "{stdout}");
    assert_eq!(lines[3], "1");

    // The server sent the three result sets in one write.
    wait_until(
        "the test server's report of the batched answer",
        Duration::from_secs(20),
        || {
            let lines = setup.logins.lock().expect("lines lock");
            lines.iter().any(|line| line["statements"] == 3)
        },
    );

    let sessions = setup.node.wait_for_sessions(1);
    let parts: Vec<Value> = sessions
        .iter()
        .flatten()
        .filter(|line| line["event"] == "sql.statement")
        .filter(|line| line["statement"] == "SELECT 1; SELECT card; SELECT CURRENT_USER()")
        .map(|line| json!([line["part"], line["parts"], line["rows"], line["outcome"]]))
        .collect();
    assert_eq!(
        parts,
        [
            json!([1, 3, 1, "ok"]),
            json!([2, 3, 1, "ok"]),
            json!([3, 3, 1, "ok"])
        ],
        "{sessions:#?}"
    );
    let after = sessions
        .iter()
        .flatten()
        .filter(|line| line["event"] == "sql.statement" && line["statement"] == "SELECT 1")
        .count();
    assert_eq!(after, 1, "{sessions:#?}");
    for path in setup.node.session_files() {
        let text = std::fs::read_to_string(&path).expect("read recording");
        assert!(!text.contains("4111111111111111"), "{}", path.display());
    }
}
