//! The MySQL handler against a real MariaDB server and real clients (the `mariadb` CLI, and a
//! raw protocol client for exact payload sizes, prepared statements and bad input), with every
//! connection redirected from a pod namespace by the real eBPF programs. Needs root; run with
//! `cargo xtask test`.

use std::{
    path::{Path, PathBuf},
    process::{Output, Stdio},
};

use gateway_user::testing::{MARIADB_PASSWORD, Mariadb, Pod, TestCa, TestNode};
use serde_json::{Value, json};

const GATEWAYD: &str = env!("CARGO_BIN_EXE_gatewayd");
const TESTPEER: &str = env!("CARGO_BIN_EXE_gateway-testpeer");

/// SQL rules every test daemon runs with.
const SQL_RULES: &str = "sql_rules:
  - name: no-drop
    statement_kinds: [drop]
  - name: no-unbounded-delete
    statement_kinds: [delete, update]
    without_where: true
  - name: no-truncate-cards
    statement_kinds: [truncate]
    tables: [payments.cards]
  - name: guarded-rows-stay
    statement_kinds: [update, delete]
    tables: [guarded]
";

struct MySetup {
    node: TestNode,
    pod: Pod,
    mariadb: Mariadb,
    daemon: Option<gateway_user::testing::Daemon>,
    /// The gateway CA's certificate, when the client leg has TLS.
    gateway_ca: PathBuf,
}

fn my_setup(test_name: &str) -> MySetup {
    my_setup_tls(test_name, false, false)
}

/// Starts MariaDB and a daemon with a `mysql` target. With `client_tls` the gateway terminates
/// TLS with a certificate from its own CA; with `upstream_tls` MariaDB has a certificate from
/// a database CA that the gateway verifies.
fn my_setup_tls(test_name: &str, client_tls: bool, upstream_tls: bool) -> MySetup {
    start(test_name, client_tls, upstream_tls, None)
}

/// Starts MariaDB and the daemon like [`my_setup_tls`], with the AccessPolicy `policy` (YAML)
/// in place of the SQL rules when given.
fn start(test_name: &str, client_tls: bool, upstream_tls: bool, policy: Option<&str>) -> MySetup {
    let mut node = TestNode::new(test_name);
    let pod = node.add_pod("app");
    let server = node.add_server("db", &[]);
    let server_ip = server.addr_v4.to_string();

    let gateway_ca = TestCa::new(&node.dir, "gateway");
    let database_ca = TestCa::new(&node.dir, "database");
    let mariadb = if upstream_tls {
        let (cert, key) = database_ca.issue("mariadb-server", std::slice::from_ref(&server_ip));
        node.start_mariadb_with_tls(&server, Some((&cert, &key)))
    } else {
        node.start_mariadb(&server)
    };
    let mut targets = format!(
        "  - name: payments-mysql\n    address: {server_ip}\n    port: 3306\n    class: mysql\n"
    );
    targets.push_str(&gateway_user::testing::target_tls_lines(
        &gateway_ca,
        &database_ca,
        &server_ip,
        client_tls,
        upstream_tls,
    ));
    let config = node.daemon_config("gatewayd.yaml", "", &targets);
    let mut text = std::fs::read_to_string(&config).expect("read config");
    if let Some(policy) = policy {
        let policy_dir = node.dir.join("policies");
        std::fs::create_dir_all(&policy_dir).expect("create the policy directory");
        std::fs::write(policy_dir.join("10-test.yaml"), policy).expect("write the policy");
        text.push_str(&format!("policy:\n  path: {}\n", policy_dir.display()));
    } else {
        text.push_str(SQL_RULES);
    }
    std::fs::write(&config, text).expect("write config");
    let daemon = node.start_daemon(Path::new(GATEWAYD), &config, None);
    let gateway_ca = gateway_ca.cert_path.clone();
    MySetup {
        node,
        pod,
        mariadb,
        daemon: Some(daemon),
        gateway_ca,
    }
}

impl Drop for MySetup {
    fn drop(&mut self) {
        if std::thread::panicking() {
            if let Some(daemon) = &self.daemon {
                eprintln!("gatewayd log:\n{}", daemon.log());
            }
            eprintln!(
                "mariadb log:\n{}",
                std::fs::read_to_string(&self.mariadb.log_path).unwrap_or_default()
            );
        }
        if let Some(daemon) = self.daemon.take() {
            daemon.stop();
        }
    }
}

/// Runs the `mariadb` CLI with `args` in the pod (through the gateway) or in the node (direct).
fn cli(setup: &MySetup, through_gateway: bool, user: &str, args: &[&str]) -> Output {
    let mut command = if through_gateway {
        setup.node.in_pod(&setup.pod, "mariadb")
    } else {
        setup.node.in_node(None, "mariadb")
    };
    command
        .arg("--no-defaults")
        .arg(format!("--host={}", setup.mariadb.addr.ip()))
        .arg(format!("--port={}", setup.mariadb.addr.port()))
        .arg(format!("--user={user}"))
        .arg(format!("--password={MARIADB_PASSWORD}"))
        .args(["--batch", "--connect-timeout=10", "--database=payments"])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run mariadb")
}

fn cli_ok(setup: &MySetup, through_gateway: bool, sql: &str) -> String {
    let output = cli(setup, through_gateway, "gateway", &["-e", sql]);
    assert!(
        output.status.success(),
        "mariadb -e {sql:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Runs a `mysql-raw` scenario in the pod and returns its JSON output.
fn raw(setup: &MySetup, scenario: &str, extra: &[&str]) -> Value {
    let output = setup
        .node
        .in_pod(&setup.pod, TESTPEER)
        .args([
            "mysql-raw",
            "--connect",
            &setup.mariadb.addr.to_string(),
            "--scenario",
            scenario,
        ])
        .args(extra)
        .stdin(Stdio::null())
        .output()
        .expect("run mysql-raw");
    assert!(
        output.status.success(),
        "mysql-raw {scenario} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("mysql-raw prints JSON")
}

/// Collects the statement events of all recordings, in order.
fn statements(node: &TestNode) -> Vec<Value> {
    node.sessions()
        .into_iter()
        .flatten()
        .filter(|line| line["event"] == "sql.statement")
        .collect()
}

fn card_table(mariadb: &Mariadb) {
    mariadb.admin_sql(
        "CREATE TABLE payments.cards (
             id INT PRIMARY KEY,
             card_text VARCHAR(64),
             card_number BIGINT,
             note TEXT
         );
         INSERT INTO payments.cards VALUES
             (1, '4111111111111111', 4111111111111111, 'visa'),
             (2, '4111 1111 1111 1111', 5555555555554444, 'spaces'),
             (3, '4111-1111-1111-1111', NULL, 'dashes'),
             (4, '2221000000000009', 2223003122003222, 'mastercard 2-series'),
             (5, '1748503543012', 1748503543012, 'timestamp, not a card'),
             (6, 'order 42', 42, 'paid with 378282246310005 today');
         DELIMITER //
         CREATE PROCEDURE payments.four_results()
         BEGIN
             SELECT 1 AS a;
             SELECT 2 AS b, 'two' AS c;
             SELECT id FROM payments.cards WHERE id <= 3 ORDER BY id;
             SELECT note FROM payments.cards WHERE id = 1;
         END //
         DELIMITER ;",
    );
}

#[test]
fn cli_results_match_direct() {
    let setup = my_setup("cli_results_match_direct");
    card_table(&setup.mariadb);
    let script = "SELECT id, note FROM cards WHERE id < 6 ORDER BY id; \
                  CALL four_results(); \
                  SELECT 42 AS after_call; \
                  USE mysql; SELECT DATABASE(); \
                  SELECT @@version_comment IS NOT NULL";
    let through = cli_ok(&setup, true, script);
    let direct = cli_ok(&setup, false, script);
    assert_eq!(through, direct);
    assert!(through.contains("after_call\n42\n"), "{through}");

    let sessions = setup.node.wait_for_sessions(1);
    let startup = sessions[0]
        .iter()
        .find(|line| line["event"] == "sql.startup")
        .expect("startup event");
    assert_eq!(startup["database_user"], "gateway");
    assert_eq!(startup["database"], "payments");
    assert_eq!(startup["authenticated"], true);
    let recorded = statements(&setup.node);
    let call = recorded
        .iter()
        .find(|s| s["kind"] == "call")
        .expect("CALL recorded");
    assert_eq!(call["outcome"], "ok");
    // Four result sets: 1 + 1 + 3 + 1 rows.
    assert_eq!(call["rows"], 6, "{call}");
    let select = recorded
        .iter()
        .find(|s| s["statement"] == "SELECT 42 AS after_call")
        .expect("query after CALL recorded");
    assert_eq!(select["rows"], 1);
    assert_eq!(select["database"], "payments");
    // The CLI's `use` runs `SELECT DATABASE()` itself before COM_INIT_DB: take the last one.
    let after_use = recorded
        .iter()
        .rev()
        .find(|s| s["statement"] == "SELECT DATABASE()")
        .expect("query after USE recorded");
    assert_eq!(after_use["database"], "mysql");
    let use_db = recorded
        .iter()
        .find(|s| s["kind"] == "use")
        .expect("USE recorded");
    assert_eq!(use_db["outcome"], "ok");
}

#[test]
fn pan_masking_text_and_binary() {
    let setup = my_setup("pan_masking_text_and_binary");
    card_table(&setup.mariadb);
    let sql = "SELECT id, card_text, card_number, note FROM cards ORDER BY id";
    let direct = cli_ok(&setup, false, sql);
    let through = cli_ok(&setup, true, sql);
    assert!(direct.contains("4111111111111111"), "{direct}");
    let expected_rows = [
        "1\t411111******1111\t411111******1111\tvisa",
        "2\t4111 11** **** 1111\t555555******4444\tspaces",
        "3\t4111-11**-****-1111\tNULL\tdashes",
        "4\t222100******0009\t222300******3222\tmastercard 2-series",
        "5\t1748503543012\t1748503543012\ttimestamp, not a card",
        "6\torder 42\t42\tpaid with 378282*****0005 today",
    ];
    for row in expected_rows {
        assert!(through.contains(row), "missing {row:?} in {through}");
    }
    assert_eq!(through.len(), direct.len(), "masking keeps lengths");

    // Text rows carry numbers as text, so they are masked like text. In binary rows, strings
    // are masked as text and BIGINT by zeroing the hidden digits.
    let binary = raw(&setup, "binary-rows", &[]);
    let rows = &binary["answers"][0]["rows"];
    assert_eq!(
        rows[0],
        json!([1, "411111******1111", 4111110000001111i64, "visa"]),
        "{binary}"
    );
    assert_eq!(rows[1][2], 5555550000004444i64);
    assert_eq!(rows[2][2], Value::Null);
    assert_eq!(rows[3][1], "222100******0009");
    // Its hidden digits are not all zero, so the masked value differs from the stored one.
    assert_eq!(rows[3][2], 2223000000003222i64);
    assert_eq!(rows[4][2], 1748503543012i64);
    assert_eq!(rows[5][3], "paid with 378282*****0005 today");

    // A hex literal carries the number encoded: the value comes back masked as text, and the
    // recorded statement has the literal's hidden digits masked in hex.
    let pan_hex: String = "4111111111111111"
        .bytes()
        .map(|byte| format!("{byte:02x}"))
        .collect();
    let selected = cli_ok(&setup, true, &format!("SELECT X'{pan_hex}' AS card"));
    assert_eq!(selected.trim_end(), "card\n411111******1111");

    setup.node.wait_for_sessions(3);
    for path in setup.node.session_files() {
        let text = std::fs::read_to_string(&path).expect("read recording");
        assert!(!text.contains("4111111111111111"), "{text}");
        assert!(!text.contains(&pan_hex), "{text}");
    }
}

#[test]
fn exact_payload_sizes_both_ways() {
    let setup = my_setup("exact_payload_sizes_both_ways");
    for extra in [&[][..], &["--deprecate-eof"][..]] {
        let results = raw(&setup, "sizes", extra);
        let expected_packets = [
            (16_777_214u64, json!([16_777_214])),
            (16_777_215, json!([16_777_215, 0])),
            (16_777_216, json!([16_777_215, 1])),
            (33_554_430, json!([16_777_215, 16_777_215, 0])),
        ];
        for (result, (size, packets)) in results
            .as_array()
            .expect("one result per size")
            .iter()
            .zip(expected_packets)
        {
            assert_eq!(result["size"], size);
            assert_eq!(
                result["server_length"],
                result["query_filler"].to_string(),
                "query of {size} bytes reached the server whole ({extra:?})"
            );
            assert_eq!(
                result["row_value_len"], result["row_value_expected"],
                "{result}"
            );
            assert_eq!(result["row_all_x"], true, "{result}");
            assert_eq!(
                result["row_packets"], packets,
                "row packets for {size} ({extra:?})"
            );
        }
    }
}

#[test]
fn prepared_statements_big_and_long_data() {
    let setup = my_setup("prepared_statements_big_and_long_data");
    for extra in [&[][..], &["--deprecate-eof"][..]] {
        let result = raw(&setup, "prepared", extra);
        assert_eq!(result["params"], 2);
        assert_eq!(
            result["big"][0]["rows"],
            json!([[20_971_520, 7]]),
            "{result}"
        );
        // Types from the first execute apply; the BIGINT result is a card number and masked.
        assert_eq!(
            result["reused_types"][0]["rows"],
            json!([[21, 4111110000001111i64]]),
            "{result}"
        );
        let expected = result["long_data_expected"].as_u64().expect("number");
        assert_eq!(
            result["long_data"][0]["rows"],
            json!([[expected, 1]]),
            "{result}"
        );
        assert_eq!(result["after"][0]["rows"], json!([["still usable"]]));
    }

    setup.node.wait_for_sessions(2);
    let executes: Vec<Value> = statements(&setup.node)
        .into_iter()
        .filter(|s| s["statement"] == "SELECT LENGTH(?), ? + 0")
        .collect();
    assert_eq!(executes.len(), 6, "{executes:#?}");
    assert!(
        executes[0]["params"][0]
            .as_str()
            .is_some_and(|p| p.ends_with("(20971520 bytes in all)")),
        "{}",
        executes[0]
    );
    assert_eq!(executes[1]["params"][0], "card 411111******1111");
    assert_eq!(executes[1]["params"][1], 4111110000001111i64);
    assert_eq!(
        executes[2]["params"][0],
        json!({ "long_data_bytes": 12_582_913 })
    );
}

#[test]
fn procedure_results_then_query() {
    let setup = my_setup("procedure_results_then_query");
    card_table(&setup.mariadb);
    for extra in [&[][..], &["--deprecate-eof"][..]] {
        let result = raw(&setup, "results", extra);
        let call = result["call"].as_array().expect("answers");
        assert_eq!(
            call.len(),
            5,
            "four result sets and the CALL's OK: {result}"
        );
        assert_eq!(call[0]["rows"], json!([["1"]]));
        assert_eq!(call[1]["rows"], json!([["2", "two"]]));
        assert_eq!(call[2]["rows"], json!([["1"], ["2"], ["3"]]));
        assert_eq!(call[3]["rows"], json!([["visa"]]));
        assert!(call[4]["ok"].is_number(), "{result}");
        assert_eq!(result["after"][0]["rows"], json!([["42"]]));
        let multi = result["multi"].as_array().expect("answers");
        assert_eq!(multi.len(), 3, "{result}");
        assert_eq!(multi[2]["rows"], json!([["four"]]));
    }

    // Each statement of the three-statement text is recorded with its place in it, and a
    // text of one statement carries no place.
    setup.node.wait_for_sessions(2);
    let recorded = statements(&setup.node);
    let parts: Vec<Value> = recorded
        .iter()
        .filter(|statement| statement["statement"] == "SELECT 1; SELECT 2, 3; SELECT 'four'")
        .map(|statement| json!([statement["part"], statement["parts"], statement["rows"]]))
        .collect();
    // Two runs, one with each EOF style.
    let once = [json!([1, 3, 1]), json!([2, 3, 1]), json!([3, 3, 1])];
    assert_eq!(parts, [once.clone(), once].concat(), "{recorded:#?}");
    let single = recorded
        .iter()
        .find(|statement| statement["statement"] == "SELECT 42")
        .expect("the single statement is recorded");
    assert!(single.get("part").is_none(), "{single}");
}

/// A client that resets the connection while its result is still arriving ends the session,
/// and the query is recorded as interrupted rather than lost.
#[test]
fn abandoned_query_recorded_interrupted() {
    let setup = my_setup("abandoned_query_recorded_interrupted");
    let result = raw(&setup, "abandon", &[]);
    assert!(result["first_packet_bytes"].is_number(), "{result}");

    let sessions = setup.node.wait_for_sessions(1);
    let statement = sessions
        .iter()
        .flatten()
        .find(|line| line["statement"] == "SELECT REPEAT('x', 8000000) AS big")
        .unwrap_or_else(|| panic!("the query is recorded: {sessions:#?}"));
    assert_eq!(statement["outcome"], "interrupted", "{statement}");
    let end = sessions
        .iter()
        .flatten()
        .find(|line| line["event"] == "session.end")
        .expect("session end");
    assert_eq!(end["outcome"], "error", "{end}");
}

#[test]
fn denied_drop_keeps_connection() {
    let setup = my_setup("denied_drop_keeps_connection");
    card_table(&setup.mariadb);
    let result = raw(&setup, "denied", &[]);
    for step in ["drop", "multi", "prepare"] {
        let answer = &result[step].as_array().expect("answers")[0];
        assert_eq!(answer["error"], 1142, "{step}: {result}");
        assert!(
            answer["message"]
                .as_str()
                .is_some_and(|m| m.contains("no-drop")),
            "{step}: {result}"
        );
    }
    assert_eq!(result["after"][0]["rows"], json!([["6"]]));
    assert_eq!(result["last"][0]["rows"], json!([["6"]]));

    // The CLI sees the same error with its SQLSTATE and goes on with the next statement on
    // the same connection. `--force` applies to statements read from standard input only.
    let script = setup.node.dir.join("denied.sql");
    std::fs::write(&script, "DROP TABLE cards;\nSELECT COUNT(*) FROM cards;\n")
        .expect("write script");
    let mut command = setup.node.in_pod(&setup.pod, "mariadb");
    command
        .arg("--no-defaults")
        .arg(format!("--host={}", setup.mariadb.addr.ip()))
        .args(["--user=gateway", &format!("--password={MARIADB_PASSWORD}")])
        .args(["--batch", "--force", "--database=payments"])
        .stdin(std::fs::File::open(&script).expect("open script"));
    let output = command.output().expect("run mariadb");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("ERROR 1142 (42000)"), "{stderr}");
    assert!(stderr.contains("\"no-drop\""), "{stderr}");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains('6'), "stdout {stdout:?}, stderr {stderr:?}");
    assert_eq!(
        setup
            .mariadb
            .admin_sql("SELECT COUNT(*) FROM payments.cards")
            .trim(),
        "6"
    );

    setup.node.wait_for_sessions(2);
    let denied: Vec<Value> = statements(&setup.node)
        .into_iter()
        .filter(|s| s["outcome"] == "denied")
        .collect();
    assert_eq!(denied.len(), 4, "{denied:#?}");
    for statement in &denied {
        assert_eq!(statement["decision"], "deny");
        assert_eq!(statement["rule"], "no-drop");
        // In a multi-statement query, the denied statement is the one recorded.
        assert_eq!(statement["kind"], "drop", "{statement}");
        assert_eq!(statement["tables"], json!(["cards"]), "{statement}");
    }
}

#[test]
fn session_commands_pass_through() {
    let setup = my_setup("session_commands_pass_through");
    let result = raw(&setup, "session-commands", &[]);
    for step in ["ping", "init_db", "reset_connection", "change_user"] {
        assert_eq!(result[step], "ok", "{step}: {result}");
    }
    assert_eq!(result["init_db_then"][0]["rows"][0][0], "mysql");
    assert!(
        result["statistics"]
            .as_str()
            .is_some_and(|s| s.ends_with("bytes"))
    );
    assert_eq!(result["change_user_then"][0]["rows"][0][0], "payments");

    setup.node.wait_for_sessions(2);
    let lines = setup.node.sessions().concat();
    let change = lines
        .iter()
        .find(|line| line["event"] == "sql.change_user")
        .expect("change user recorded");
    assert_eq!(change["outcome"], "ok");

    // A client that leaves while the server waits for its response ends its session with
    // that reason, because the server leg is still in the exchange.
    assert_eq!(result["change_user_left_after"], "0xfe", "{result}");
    let left = lines
        .iter()
        .find(|line| {
            line["event"] == "session.end"
                && line["reason"]
                    .as_str()
                    .is_some_and(|reason| reason.contains("left during authentication"))
        })
        .map(|line| line.to_string());
    assert!(left.is_some(), "{lines:#?}");
}

#[test]
fn ed25519_login_passes_through() {
    let setup = my_setup("ed25519_login_passes_through");
    let output = cli(&setup, true, "eduser", &["-e", "SELECT CURRENT_USER()"]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(String::from_utf8_lossy(&output.stdout).contains("eduser@%"));
    let wrong = setup
        .node
        .in_pod(&setup.pod, "mariadb")
        .arg("--no-defaults")
        .arg(format!("--host={}", setup.mariadb.addr.ip()))
        .args(["--user=eduser", "--password=wrong", "-e", "SELECT 1"])
        .stdin(Stdio::null())
        .output()
        .expect("run mariadb");
    assert!(!wrong.status.success());
    assert!(String::from_utf8_lossy(&wrong.stderr).contains("1045"));

    let sessions = setup.node.wait_for_sessions(2);
    let rejected = sessions.iter().flatten().find(|line| {
        line["event"] == "session.end"
            && line["reason"]
                .as_str()
                .is_some_and(|r| r.contains("rejected the login"))
    });
    assert!(rejected.is_some(), "{sessions:#?}");
}

#[test]
fn bad_input_ends_only_its_session() {
    let setup = my_setup("bad_input_ends_only_its_session");
    for scenario in ["garbage-handshake", "too-long", "eof-mid-packet"] {
        let result = raw(&setup, scenario, &[]);
        assert_eq!(result["closed"], true, "{scenario}: {result}");
    }
    // Another session on the same daemon is unaffected.
    assert_eq!(cli_ok(&setup, true, "SELECT 7 AS n"), "n\n7\n");

    let sessions = setup.node.wait_for_sessions(4);
    let reasons: Vec<String> = sessions
        .iter()
        .filter_map(|lines| lines.iter().find(|line| line["event"] == "session.end"))
        .filter(|end| end["outcome"] == "error")
        .map(|end| end["reason"].as_str().unwrap_or("").to_string())
        .collect();
    assert_eq!(reasons.len(), 3, "{sessions:#?}");
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("client: malformed handshake response")),
        "{reasons:?}"
    );
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("limit of the authentication phase")),
        "{reasons:?}"
    );
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("closed in the middle of a packet")),
        "{reasons:?}"
    );
}

#[test]
fn tls_terminated_and_upstream_verified() {
    let setup = my_setup_tls("tls_terminated_and_upstream_verified", true, true);
    let ca = setup.gateway_ca.display().to_string();
    for user in ["gateway", "eduser"] {
        let output = cli(
            &setup,
            true,
            user,
            &[
                "--ssl",
                &format!("--ssl-ca={ca}"),
                "--ssl-verify-server-cert",
                "-e",
                "SHOW SESSION STATUS LIKE 'Ssl_cipher'",
            ],
        );
        assert!(
            output.status.success(),
            "{user}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        // The server sees TLS on its own leg from the gateway.
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(stdout.contains("Ssl_cipher\tTLS"), "{user}: {stdout}");
    }
    // A client without TLS still gets through; the server leg stays encrypted.
    let output = cli(
        &setup,
        true,
        "gateway",
        &["--ssl=0", "-e", "SHOW SESSION STATUS LIKE 'Ssl_cipher'"],
    );
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(String::from_utf8_lossy(&output.stdout).contains("Ssl_cipher\tTLS"));

    let sessions = setup.node.wait_for_sessions(3);
    let startups: Vec<&Value> = sessions
        .iter()
        .flatten()
        .filter(|line| line["event"] == "sql.startup")
        .collect();
    assert_eq!(
        startups.iter().filter(|s| s["client_tls"] == true).count(),
        2
    );
    assert!(startups.iter().all(|s| s["upstream_tls"] == true));
}

/// Runs the mysql_async scenario in the pod (through the gateway) or in the node (direct).
fn driver(setup: &MySetup, through_gateway: bool) -> Value {
    let mut command = if through_gateway {
        setup.node.in_pod(&setup.pod, TESTPEER)
    } else {
        setup.node.in_node(None, TESTPEER)
    };
    let output = command
        .args(["mysql-driver", "--connect", &setup.mariadb.addr.to_string()])
        .args(["--user", "gateway", "--password", MARIADB_PASSWORD])
        .stdin(Stdio::null())
        .output()
        .expect("run mysql-driver");
    assert!(
        output.status.success(),
        "mysql-driver failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("mysql-driver prints JSON")
}

#[test]
fn rust_driver_matches_direct() {
    let setup = my_setup("rust_driver_matches_direct");
    card_table(&setup.mariadb);
    // Directly, the DROP runs, so the table is put back for the proxied run.
    let direct = driver(&setup, false);
    assert_eq!(direct["denied"], "ran");
    card_table_again(&setup.mariadb);
    let through = driver(&setup, true);

    assert_eq!(through["denied"]["code"], 1142, "{through}");
    assert_eq!(through["denied"]["state"], "42000");
    assert!(
        through["denied"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("no-drop")),
        "{through}"
    );
    // The table still exists, and the connection still runs queries.
    assert_eq!(through["after_denied"], 1);
    assert_eq!(direct["after_denied"], 0);
    for field in [
        "reused",
        "big_param",
        "big_value_len",
        "big_value_all_x",
        "call_sets",
        "after_call",
    ] {
        assert_eq!(through[field], direct[field], "{field}");
    }
    assert_eq!(through["big_param"], 20 * 1024 * 1024);
    assert_eq!(through["call_sets"], json!([1, 1, 3, 1]));

    // Rows match except for the masked card numbers.
    assert_eq!(
        direct["text_rows"][0],
        json!([1, "4111111111111111", "4111111111111111", "visa"])
    );
    assert_eq!(
        through["text_rows"][0],
        json!([1, "411111******1111", "411111******1111", "visa"]),
        "{through}"
    );
    assert_eq!(
        through["binary_rows"][0],
        json!([1, "411111******1111", 4111110000001111i64, "visa"])
    );
    assert_eq!(through["binary_rows"][4], direct["binary_rows"][4]);
    assert_eq!(through["text_rows"][4], direct["text_rows"][4]);
}

/// Recreates the card table after a direct run dropped it.
fn card_table_again(mariadb: &Mariadb) {
    mariadb.admin_sql("DROP PROCEDURE payments.four_results");
    card_table(mariadb);
}

/// Deletes from `cards` wait for an approver; reads of `hurry` wait two seconds at most.
const REVIEW_POLICY: &str = "\
apiVersion: gateway.example.dev/v1alpha1
kind: AccessPolicy
metadata:
  name: payments
spec:
  defaults:
    mysql:
      action: allow
  rules:
    - name: review-card-deletes
      sql:
        statementKinds: [delete]
        tables: [cards]
      action: review
    - name: quick-review
      sql:
        tables: [hurry]
      action: review
      review:
        deadline: 2s
";

impl MySetup {
    fn approvals(&self, args: &[&str]) -> Output {
        std::process::Command::new(env!("CARGO_BIN_EXE_gatewayctl"))
            .arg("approvals")
            .arg("--socket")
            .arg(self.node.approval_socket())
            .args(args)
            .output()
            .expect("run gatewayctl approvals")
    }

    /// Waits until one request is held and returns its id.
    fn wait_held(&self) -> String {
        let mut held = Vec::new();
        gateway_user::testing::wait_until(
            "a held statement",
            std::time::Duration::from_secs(30),
            || {
                let output = self.approvals(&["list", "--json"]);
                assert!(output.status.success(), "{output:?}");
                let listing: Value = serde_json::from_slice(&output.stdout).expect("JSON listing");
                held = listing["requests"].as_array().cloned().unwrap_or_default();
                !held.is_empty()
            },
        );
        assert_eq!(held.len(), 1, "{held:#?}");
        assert_eq!(held[0]["target"], "payments-mysql");
        held[0]["id"].as_str().expect("request id").to_string()
    }

    /// Starts the `mariadb` CLI in the pod running `sql`.
    fn spawn_cli(&self, sql: &str) -> std::process::Child {
        self.node
            .in_pod(&self.pod, "mariadb")
            .arg("--no-defaults")
            .arg(format!("--host={}", self.mariadb.addr.ip()))
            .arg(format!("--port={}", self.mariadb.addr.port()))
            .args(["--user=gateway", &format!("--password={MARIADB_PASSWORD}")])
            .args([
                "--batch",
                "--connect-timeout=10",
                "--database=payments",
                "-e",
                sql,
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start mariadb")
    }

    fn count_cards(&self) -> String {
        self.mariadb
            .admin_sql("SELECT COUNT(*) FROM payments.cards")
            .trim()
            .to_string()
    }
}

#[test]
fn held_statements_wait_for_approval() {
    let setup = start(
        "held_statements_wait_for_approval",
        false,
        false,
        Some(REVIEW_POLICY),
    );
    card_table(&setup.mariadb);
    setup
        .mariadb
        .admin_sql("CREATE TABLE payments.hurry (id INT); INSERT INTO payments.hurry VALUES (1);");

    // Approved: the delete runs once the approver approves it.
    let approved = setup.spawn_cli("DELETE FROM cards WHERE id = 1");
    let id = setup.wait_held();
    assert_eq!(setup.count_cards(), "6", "a held delete has not run");
    let answer = setup.approvals(&["approve", &id, "--reason", "ticket 42"]);
    assert!(answer.status.success(), "{answer:?}");
    let output = approved.wait_with_output().expect("wait for mariadb");
    assert!(output.status.success(), "{output:?}");
    assert_eq!(setup.count_cards(), "5");

    // Denied: the client gets the gateway's error with the approver's reason.
    let denied = setup.spawn_cli("DELETE FROM cards WHERE id = 2");
    let id = setup.wait_held();
    let answer = setup.approvals(&["deny", &id, "--reason", "change freeze"]);
    assert!(answer.status.success(), "{answer:?}");
    let output = denied.wait_with_output().expect("wait for mariadb");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("ERROR 1142 (42000)"), "{stderr}");
    assert!(stderr.contains("\"review-card-deletes\""), "{stderr}");
    assert!(stderr.contains("change freeze"), "{stderr}");
    assert_eq!(setup.count_cards(), "5");

    // No verdict: the deadline denies the read, and the connection is still usable.
    let output = setup
        .spawn_cli("SELECT * FROM hurry; SELECT 7")
        .wait_with_output()
        .expect("wait for mariadb");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("no approval within 2s"), "{stderr}");
    let after = cli_ok(&setup, true, "SELECT COUNT(*) FROM cards");
    assert!(after.contains('5'), "{after}");

    setup.node.wait_for_sessions(4);
    let events: Vec<Value> = setup.node.sessions().into_iter().flatten().collect();
    let verdicts: Vec<&Value> = events
        .iter()
        .filter(|event| event["event"] == "approval.answered")
        .map(|event| &event["verdict"])
        .collect();
    assert_eq!(verdicts, ["approved", "denied", "timed_out"]);
    let requested: Vec<&Value> = events
        .iter()
        .filter(|event| event["event"] == "approval.requested")
        .collect();
    assert_eq!(requested.len(), 3);
    assert_eq!(requested[0]["statement"], "DELETE FROM cards WHERE id = 1");
    let recorded = statements(&setup.node);
    let denied: Vec<&Value> = recorded
        .iter()
        .filter(|statement| statement["outcome"] == "denied")
        .map(|statement| &statement["rule"])
        .collect();
    assert_eq!(denied, ["review-card-deletes", "quick-review"]);
}

#[test]
fn policy_masks_named_columns_whole() {
    const POLICY: &str = "\
apiVersion: gateway.example.dev/v1alpha1
kind: AccessPolicy
metadata:
  name: payments
spec:
  defaults:
    mysql:
      action: allow
      masking:
        keep: last4
        fields: [note]
";
    let setup = start(
        "policy_masks_named_columns_whole",
        false,
        false,
        Some(POLICY),
    );
    card_table(&setup.mariadb);
    let output = cli_ok(
        &setup,
        true,
        "SELECT id, card_text, note FROM cards WHERE id <= 2",
    );
    let rows: Vec<&str> = output.lines().skip(1).collect();
    assert_eq!(
        rows,
        [
            "1\t************1111\t****",
            "2\t**** **** **** 1111\t******"
        ],
        "{output}"
    );
}

/// Card numbers in the server's other packets (a column name, an ERR message that starts with
/// the number), in wide character sets, in exponent notation and in BIT values come back
/// masked. A MariaDB executable comment is judged as SQL, quoted and bare table names match
/// rules on `database.table`, and upserts and REPLACE match rules on `update` and `delete`.
#[test]
fn server_text_fields_and_comments() {
    let setup = my_setup("server_text_fields_and_comments");
    card_table(&setup.mariadb);

    let header = cli_ok(&setup, true, "SELECT 7 AS `4111111111111111`");
    assert_eq!(header.trim_end(), "411111******1111\n7");

    let output = cli(
        &setup,
        true,
        "gateway",
        &[
            "-e",
            "SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = '4111111111111111'",
        ],
    );
    // The CLI echoes the failed statement itself before the server's error line.
    let stderr = String::from_utf8_lossy(&output.stderr);
    let error = stderr
        .lines()
        .find(|line| line.starts_with("ERROR"))
        .unwrap_or_default();
    assert_eq!(
        error, "ERROR 1644 (45000) at line 1: 411111******1111",
        "{stderr}"
    );

    for comment in ["/*M! DROP TABLE cards */", "/*M!100000 DROP TABLE cards */"] {
        let output = cli(&setup, true, "gateway", &["-e", comment]);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains("ERROR 1142 (42000)"), "{comment}: {stderr}");
    }
    assert_eq!(
        setup
            .mariadb
            .admin_sql("SELECT COUNT(*) FROM payments.cards")
            .trim(),
        "6"
    );

    // Results in a character set whose characters take 2 or 4 bytes.
    for (charset, width) in [("utf16", 2), ("ucs2", 2), ("utf32", 4)] {
        let sql = format!(
            "SET character_set_results = {charset}; SELECT card_text FROM cards WHERE id = 1"
        );
        let output = cli(
            &setup,
            true,
            "gateway",
            &["--raw", "--skip-column-names", "-e", &sql],
        );
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let value: String = output
            .stdout
            .chunks(width)
            .filter(|unit| unit.len() == width)
            .filter_map(|unit| {
                char::from_u32(unit.iter().fold(0, |acc, &b| acc << 8 | u32::from(b)))
            })
            .collect();
        assert_eq!(value, "411111******1111", "{charset}: {:?}", output.stdout);
    }

    // A rule on `payments.cards` holds for the bare and the quoted name while `payments` is
    // the current database.
    for statement in ["TRUNCATE TABLE cards", "TRUNCATE TABLE `payments`.`cards`"] {
        let output = cli(&setup, true, "gateway", &["-e", statement]);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            stderr.contains("no-truncate-cards"),
            "{statement}: {stderr}"
        );
    }

    // An upsert changes rows as an UPDATE does, and REPLACE deletes the row it replaces.
    setup.mariadb.admin_sql(
        "CREATE TABLE payments.guarded (id INT PRIMARY KEY, note TEXT); \
         INSERT INTO payments.guarded VALUES (1, 'kept')",
    );
    for statement in [
        "INSERT INTO guarded VALUES (1, 'changed') ON DUPLICATE KEY UPDATE note = 'changed'",
        "REPLACE INTO guarded VALUES (1, 'replaced')",
        "LOAD DATA LOCAL INFILE '/nonexistent/rows.csv' REPLACE INTO TABLE payments.guarded",
    ] {
        let output = cli(&setup, true, "gateway", &["-e", statement]);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            stderr.contains("guarded-rows-stay"),
            "{statement}: {stderr}"
        );
    }
    cli_ok(&setup, true, "INSERT INTO guarded VALUES (2, 'new')");
    assert_eq!(
        setup
            .mariadb
            .admin_sql("SELECT note FROM payments.guarded ORDER BY id")
            .trim(),
        "kept\nnew"
    );

    // A large DOUBLE prints in exponent notation, and a BIT value is a big-endian number.
    // With ANSI_QUOTES a backslash ends a double-quoted name where the default mode reads on,
    // so a DROP can hide in what the parser reads as a string.
    setup
        .mariadb
        .admin_sql("CREATE TABLE payments.scratch (id INT)");
    let hidden = raw(&setup, "mode-hidden-drop", &[]);
    let answer = hidden["hidden"].to_string();
    assert!(answer.contains("no-drop"), "{hidden}");
    assert_eq!(
        setup
            .mariadb
            .admin_sql(
                "SELECT COUNT(*) FROM information_schema.tables WHERE table_name = 'scratch'"
            )
            .trim(),
        "1",
        "the gateway denies the hidden DROP"
    );

    // `FORMAT()` groups digits in thousands.
    let numbers = cli_ok(
        &setup,
        true,
        "SELECT CAST(4111111111111111 AS DOUBLE) AS d, FORMAT(4111111111111111, 0) AS f",
    );
    assert_eq!(
        numbers.trim_end(),
        "d\tf\n4.11111******1111e15\t4,111,11*,***,**1,111"
    );
    setup.mariadb.admin_sql(
        "CREATE TABLE payments.bits (b BIT(64)); INSERT INTO payments.bits VALUES (4111111111111111)",
    );
    let bits = cli(
        &setup,
        true,
        "gateway",
        &[
            "--binary-as-hex",
            "--skip-column-names",
            "-e",
            "SELECT b FROM bits",
        ],
    );
    assert_eq!(
        String::from_utf8_lossy(&bits.stdout).trim_end(),
        format!("0x{:016X}", 4_111_110_000_001_111_u64)
    );

    cli_ok(&setup, true, "DELETE FROM `payments`.`cards` WHERE id = 99");
    setup.node.wait_for_sessions(17);
    let recorded = statements(&setup.node);
    let delete = recorded
        .iter()
        .find(|statement| statement["kind"] == "delete")
        .expect("the DELETE is recorded");
    assert_eq!(delete["tables"], json!(["payments.cards"]), "{delete}");
    for path in setup.node.session_files() {
        let text = std::fs::read_to_string(&path).expect("read recording");
        assert!(!text.contains("4111111111111111"), "{text}");
    }
}

/// Large statements being read share one memory budget across sessions. While it is held,
/// another large statement is read and dropped with an ERR, recorded with the gateway's rule,
/// and its session goes on.
#[test]
fn large_statements_share_memory_budget() {
    let setup = my_setup("large_statements_share_memory_budget");
    let result = raw(&setup, "statement-budget", &[]);
    let rejected = &result["rejected"][0];
    assert_eq!(rejected["error"], 1041, "{result}");
    assert!(
        rejected["message"]
            .as_str()
            .is_some_and(|message| message.contains("retry later")),
        "{result}"
    );
    assert_eq!(result["after"][0]["rows"], json!([["2097152"]]), "{result}");

    setup.node.wait_for_sessions(5);
    let recorded: Vec<Value> = statements(&setup.node)
        .into_iter()
        .filter(|statement| statement["rule"] == "gateway:statement-memory")
        .collect();
    assert_eq!(recorded.len(), 1, "{recorded:#?}");
    assert_eq!(recorded[0]["outcome"], "denied");
}
