//! The PostgreSQL handler against a real PostgreSQL server and real clients (`psql`,
//! `pgbench`, and a raw protocol client for exact pipelines), with every connection redirected
//! from a pod namespace by the real eBPF programs. Needs root; run with `cargo xtask test`.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Output, Stdio},
};

use gateway_user::testing::{POSTGRES_PASSWORD, Pod, Postgres, TestCa, TestNode};
use serde_json::Value;

const GATEWAYD: &str = env!("CARGO_BIN_EXE_gatewayd");
const TESTPEER: &str = env!("CARGO_BIN_EXE_gateway-testpeer");

/// SQL rules every test daemon runs with.
const SQL_RULES: &str = "sql_rules:
  - name: no-drop
    statement_kinds: [drop]
  - name: no-unbounded-delete
    statement_kinds: [delete, update]
    without_where: true
  - name: no-fast-path
    statement_kinds: [function_call]
  - name: no-vault-writes
    statement_kinds: [insert, update, delete]
    tables: [vault]
";

struct PgSetup {
    node: TestNode,
    pod: Pod,
    postgres: Postgres,
    daemon: Option<gateway_user::testing::Daemon>,
}

fn pg_setup(test_name: &str) -> PgSetup {
    pg_setup_tls(test_name, false, false).0
}

/// Like `pg_setup`, with TLS on the client leg (a serving certificate for the server's
/// address from a gateway CA) and on the server leg (PostgreSQL with `ssl=on` and a
/// certificate from a database CA, verified by the gateway). Returns the gateway CA's file.
fn pg_setup_tls(test_name: &str, client_tls: bool, upstream_tls: bool) -> (PgSetup, PathBuf) {
    pg_setup_with(test_name, client_tls, upstream_tls, "")
}

/// Like `pg_setup_tls`, with `proxy_settings` (YAML lines) added to the daemon's `proxy`.
fn pg_setup_with(
    test_name: &str,
    client_tls: bool,
    upstream_tls: bool,
    proxy_settings: &str,
) -> (PgSetup, PathBuf) {
    let mut node = TestNode::new(test_name);
    let pod = node.add_pod("app");
    let server = node.add_server("db", &[]);
    let server_ip = server.addr_v4.to_string();

    let gateway_ca = TestCa::new(&node.dir, "gateway");
    let database_ca = TestCa::new(&node.dir, "database");
    let postgres = if upstream_tls {
        let (cert, key) = database_ca.issue("postgres-server", std::slice::from_ref(&server_ip));
        node.start_postgres_with_tls(&server, Some((&cert, &key)))
    } else {
        node.start_postgres(&server)
    };
    let mut targets = format!(
        "  - name: payments-db\n    address: {server_ip}\n    port: 5432\n    class: postgres\n"
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
    text = text.replacen("proxy:\n", &format!("proxy:\n{proxy_settings}"), 1);
    text.push_str(SQL_RULES);
    std::fs::write(&config, text).expect("write config");
    let daemon = node.start_daemon(Path::new(GATEWAYD), &config, None);
    let ca = gateway_ca.cert_path.clone();
    (
        PgSetup {
            node,
            pod,
            postgres,
            daemon: Some(daemon),
        },
        ca,
    )
}

impl Drop for PgSetup {
    fn drop(&mut self) {
        if std::thread::panicking() {
            if let Some(daemon) = &self.daemon {
                eprintln!("gatewayd log:\n{}", daemon.log());
            }
            eprintln!(
                "postgres log:\n{}",
                std::fs::read_to_string(&self.postgres.log_path).unwrap_or_default()
            );
        }
        if let Some(daemon) = self.daemon.take() {
            daemon.stop();
        }
    }
}

fn conninfo(addr: SocketAddr, user: &str) -> String {
    format!(
        "host={} port={} user={user} dbname=postgres sslmode=prefer gssencmode=prefer connect_timeout=10",
        addr.ip(),
        addr.port()
    )
}

/// Runs psql with `args` in the pod (through the gateway) or in the node (direct).
fn psql(setup: &PgSetup, through_gateway: bool, user: &str, args: &[&str]) -> Output {
    let program = setup.postgres.bin_dir.join("psql");
    let mut command = if through_gateway {
        setup.node.in_pod(&setup.pod, &program)
    } else {
        setup.node.in_node(None, &program)
    };
    command
        .arg(conninfo(setup.postgres.addr, user))
        .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
        .args(args)
        .env("PGPASSWORD", POSTGRES_PASSWORD)
        .stdin(Stdio::null())
        .output()
        .expect("run psql")
}

fn psql_ok(setup: &PgSetup, through_gateway: bool, user: &str, sql: &str) -> String {
    let output = psql(setup, through_gateway, user, &["-c", sql]);
    assert!(
        output.status.success(),
        "psql {sql:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Runs a raw protocol script in the pod and returns the backend messages it printed.
fn pg_script(setup: &PgSetup, name: &str, lines: &[String]) -> Vec<Value> {
    let output = pg_script_output(setup, name, lines, &[]);
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).expect("pg-script prints JSON lines"))
        .collect()
}

/// Runs a raw protocol script in the pod with extra `pg-script` arguments.
fn pg_script_output(
    setup: &PgSetup,
    name: &str,
    lines: &[String],
    extra: &[&std::ffi::OsStr],
) -> Output {
    let path: PathBuf = setup.node.dir.join(format!("{name}.script"));
    std::fs::write(&path, lines.join("\n")).expect("write script");
    setup
        .node
        .in_pod(&setup.pod, TESTPEER)
        .args([
            "pg-script",
            "--connect",
            &setup.postgres.addr.to_string(),
            "--script",
        ])
        .arg(&path)
        .args(extra)
        .stdin(Stdio::null())
        .output()
        .expect("run pg-script")
}

fn tags(messages: &[Value]) -> String {
    messages
        .iter()
        .filter_map(|message| message["tag"].as_str())
        .collect()
}

/// Collects the statement events of all recordings, in order.
fn statements(node: &TestNode) -> Vec<Value> {
    node.sessions()
        .into_iter()
        .flatten()
        .filter(|line| line["event"] == "sql.statement")
        .collect()
}

/// Returns the count of rows in the `vault` table, read directly.
fn vault_rows(setup: &PgSetup) -> String {
    setup
        .postgres
        .admin_sql("SELECT count(*) FROM vault")
        .trim()
        .to_string()
}

fn lines(items: &[&str]) -> Vec<String> {
    items.iter().map(|line| (*line).to_string()).collect()
}

#[test]
fn psql_results_match_direct() {
    let setup = pg_setup("psql_results_match_direct");
    setup.postgres.admin_sql(
        "CREATE TABLE accounts (id int PRIMARY KEY, owner text, balance numeric); \
         INSERT INTO accounts VALUES (1, 'ada', 10.5), (2, 'grace', 20), (3, 'edsger', 0)",
    );
    let query = "SELECT id, owner, balance FROM accounts ORDER BY id";
    let direct = psql_ok(&setup, false, "postgres", query);
    assert_eq!(
        direct.lines().count(),
        3,
        "direct run returns the rows: {direct}"
    );

    // SCRAM-SHA-256, md5 and trust all pass through untouched.
    for user in ["postgres", "md5user", "rawuser"] {
        let proxied = psql_ok(&setup, true, user, query);
        assert_eq!(
            proxied, direct,
            "user {user}: results through the gateway differ"
        );
    }

    let sessions = setup.node.wait_for_sessions(3);
    let startups: Vec<&Value> = sessions
        .iter()
        .flatten()
        .filter(|line| line["event"] == "sql.startup")
        .collect();
    assert_eq!(startups.len(), 3);
    assert_eq!(startups[0]["database_user"], "postgres");
    assert_eq!(startups[1]["database_user"], "md5user");
    let recorded = statements(&setup.node);
    let selects: Vec<&Value> = recorded
        .iter()
        .filter(|s| s["statement"] == query)
        .collect();
    assert_eq!(selects.len(), 3, "{recorded:#?}");
    assert_eq!(selects[0]["kind"], "select");
    assert_eq!(selects[0]["tables"], serde_json::json!(["accounts"]));
    assert_eq!(selects[0]["rows"], 3);
    assert_eq!(selects[0]["database"], "postgres");
    assert_eq!(selects[0]["decision"], "allow");
}

#[test]
fn pan_columns_masked_recording_clean() {
    let setup = pg_setup("pan_columns_masked_recording_clean");
    setup.postgres.admin_sql(
        "CREATE TABLE cards (id int, pan text); \
         INSERT INTO cards VALUES (1, '4111 1111 1111 1111'), (2, '5555-5555-5555-4444'), \
         (3, '2221000000000009'), (4, '6200000000000000000'), (5, '1748503543012')",
    );
    let rows = psql_ok(
        &setup,
        true,
        "postgres",
        "SELECT pan FROM cards ORDER BY id",
    );
    let rows: Vec<&str> = rows.lines().collect();
    assert_eq!(rows[0], "4111 11** **** 1111");
    assert_eq!(rows[1], "5555-55**-****-4444");
    assert_eq!(rows[2], "222100******0009");
    assert_eq!(rows[3], "620000*********0000");
    assert_eq!(
        rows[4], "1748503543012",
        "a timestamp without an issuer prefix stays"
    );
    // float8 prints a whole number this large in exponent notation.
    let float = psql_ok(
        &setup,
        true,
        "postgres",
        "SELECT 4111111111111111::float8, '4111111111111111 0926 123', \
         to_char(4111111111111111, 'FM9,999,999,999,999,999')",
    );
    assert_eq!(
        float.trim_end(),
        "4.11111******1111e+15|411111******1111 0926 123|4,111,11*,***,**1,111"
    );
    // `money` groups its digits in thousands, with the currency sign and cents of the
    // server's locale around them.
    let money = psql_ok(
        &setup,
        true,
        "postgres",
        "SELECT 4111111111111111::numeric::money",
    );
    assert!(
        money.contains("4,111,11*,***,**1,111") || money.contains("4.111.11*.***.**1.111"),
        "{money}"
    );
    // COPY prints the same values in its text rows.
    let copied = psql_ok(
        &setup,
        true,
        "postgres",
        "COPY (SELECT 4111111111111111::float8, \
         to_char(4111111111111111, 'FM9,999,999,999,999,999')) TO STDOUT",
    );
    assert_eq!(
        copied.trim_end(),
        "4.11111******1111e+15\t4,111,11*,***,**1,111"
    );

    // A PAN sent by the client in a statement is masked in the recording too.
    psql_ok(
        &setup,
        true,
        "postgres",
        "INSERT INTO cards VALUES (6, '4012888888881881')",
    );
    setup.node.wait_for_sessions(5);
    let mut store = String::new();
    for file in setup.node.session_files() {
        store.push_str(&std::fs::read_to_string(file).expect("read recording"));
    }
    for pan in [
        "4111111111111111",
        "4111 1111 1111 1111",
        "5555-5555-5555-4444",
        "2221000000000009",
        "6200000000000000000",
        "4012888888881881",
    ] {
        assert!(!store.contains(pan), "recording holds unmasked {pan}");
    }
    assert!(
        store.contains("401288******1881"),
        "the masked INSERT is recorded"
    );
}

/// Returns `text` as PostgreSQL prints a `bytea` holding its bytes: `\x` and lowercase hex.
fn bytea_hex(text: &str) -> String {
    let digits: String = text.bytes().map(|byte| format!("{byte:02x}")).collect();
    format!("\\x{digits}")
}

/// `bytea` values come out of PostgreSQL hex-encoded by default, where a card number is no
/// run of digits. The gateway decodes such runs, masks them, and writes the masked bytes back
/// in hex, in rows, COPY data and recordings alike.
#[test]
fn bytea_hex_output_masked() {
    let setup = pg_setup("bytea_hex_output_masked");
    setup.postgres.admin_sql(
        "CREATE TABLE blobs (id int, data bytea); \
         INSERT INTO blobs VALUES (1, convert_to('card 4111 1111 1111 1111 end', 'UTF8')), \
         (2, convert_to('4012888888881881', 'UTF8')), (3, convert_to('1748503543012', 'UTF8'))",
    );
    let direct = psql_ok(
        &setup,
        false,
        "postgres",
        "SELECT data FROM blobs ORDER BY id",
    );
    let direct: Vec<&str> = direct.lines().collect();
    assert_eq!(direct[0], bytea_hex("card 4111 1111 1111 1111 end"));

    let rows = psql_ok(
        &setup,
        true,
        "postgres",
        "SELECT data FROM blobs ORDER BY id",
    );
    let rows: Vec<&str> = rows.lines().collect();
    assert_eq!(rows[0], bytea_hex("card 4111 11** **** 1111 end"));
    assert_eq!(rows[1], bytea_hex("401288******1881"));
    assert_eq!(rows[2], bytea_hex("1748503543012"), "no issuer prefix");

    // The hex digits are never read as decimal ones, so the output stays valid hex: masking the
    // run below leaves `343131312031312` before the `2a`s, which passes as a card number.
    let plain = psql_ok(
        &setup,
        true,
        "postgres",
        "SELECT convert_to('4111 1111 1111 1111', 'UTF8'), '\\x4111111111111111'::bytea",
    );
    assert_eq!(
        plain.trim_end(),
        format!("{}|\\x4111111111111111", bytea_hex("4111 11** **** 1111"))
    );

    // COPY's text format doubles the backslash.
    let copied = psql_ok(
        &setup,
        true,
        "postgres",
        "COPY (SELECT data FROM blobs WHERE id = 2) TO STDOUT",
    );
    assert_eq!(
        copied.trim_end(),
        format!("\\{}", bytea_hex("401288******1881"))
    );

    // Values over the hold limit (1 MiB) are streamed through the gateway, and masked the same.
    setup.postgres.admin_sql(
        "INSERT INTO blobs VALUES (5, convert_to(repeat('z', 1100000) || ' 4111111111111111 ', 'UTF8'))",
    );
    let digits = |text: &str| bytea_hex(text)[2..].to_string();
    for query in [
        "SELECT data FROM blobs WHERE id = 5",
        "COPY (SELECT data FROM blobs WHERE id = 5) TO STDOUT",
    ] {
        let big = psql_ok(&setup, true, "postgres", query);
        assert!(big.len() > 2_200_000, "{query}: {} bytes", big.len());
        assert!(!big.contains(&digits("4111111111111111")), "{query}");
        assert!(big.contains(&digits(" 411111******1111 ")), "{query}");
    }

    // A hex literal in a statement is masked in the recording.
    let literal = bytea_hex("5555555555554444");
    psql_ok(
        &setup,
        true,
        "postgres",
        &format!("INSERT INTO blobs VALUES (4, '{literal}')"),
    );
    setup.node.wait_for_sessions(6);
    let mut store = String::new();
    for file in setup.node.session_files() {
        store.push_str(&std::fs::read_to_string(file).expect("read recording"));
    }
    let hex_digits = digits;
    for pan in [
        "4111 1111 1111 1111",
        "4012888888881881",
        "5555555555554444",
    ] {
        assert!(
            !store.contains(&hex_digits(pan)),
            "recording holds {pan} in hex"
        );
    }
    assert!(store.contains(&hex_digits("555555******4444")), "{store}");
}

/// A binary COPY sends `bigint` and `numeric` values in their binary forms, where a card
/// number is no run of digits. Each field follows the rule for binary result columns: the
/// hidden digits become zeros and the value keeps its type and width.
#[test]
fn binary_copy_follows_binary_rule() {
    let setup = pg_setup("binary_copy_follows_binary_rule");
    let copy = "COPY (SELECT 4111111111111111::int8, 4111111111111111::numeric, \
                '5555 5555 5555 4444'::text) TO STDOUT (FORMAT binary)";
    // Binary numeric: digit count, weight, sign and scale, then base-10000 digit groups.
    let numeric = |groups: [i16; 4]| {
        let mut bytes = Vec::new();
        for word in [4, 3, 0, 0].into_iter().chain(groups) {
            bytes.extend_from_slice(&i16::to_be_bytes(word));
        }
        bytes
    };

    let run = |through_gateway: bool| {
        let output = psql(&setup, through_gateway, "postgres", &["-c", copy]);
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        output.stdout
    };
    let contains = |haystack: &[u8], needle: &[u8]| {
        haystack
            .windows(needle.len())
            .any(|window| window == needle)
    };

    let direct = run(false);
    let through = run(true);
    assert_eq!(direct.len(), through.len(), "the stream keeps its length");
    assert!(direct.starts_with(b"PGCOPY\n\xff\r\n\0"));

    assert!(contains(&direct, &4_111_111_111_111_111i64.to_be_bytes()));
    assert!(!contains(&through, &4_111_111_111_111_111i64.to_be_bytes()));
    assert!(contains(&through, &4_111_110_000_001_111i64.to_be_bytes()));
    assert!(contains(&direct, &numeric([4111, 1111, 1111, 1111])));
    assert!(!contains(&through, &numeric([4111, 1111, 1111, 1111])));
    assert!(contains(&through, &numeric([4111, 1100, 0, 1111])));
    assert!(contains(&through, b"5555 55** **** 4444"));
}

/// Sizes of one pipelined-denial run: the comment padding each statement carries, the bytes
/// each row brings back, and whether the client reads while it writes.
struct PipelineShape {
    padding: usize,
    row_bytes: usize,
    read_while_writing: bool,
}

/// Builds the pipeline with a denial in the middle: Close + Sync, then 200 Parse/Bind/Execute
/// groups where group 57 is a denied DROP, then Sync, then a plain query.
fn pipeline_script(shape: &PipelineShape) -> Vec<String> {
    let mut script = lines(&["startup rawuser postgres", "read-ready 1"]);
    if shape.read_while_writing {
        script.push("read-in-background 2".to_string());
    }
    script.extend(lines(&["close-statement old", "sync"]));
    let padding = "p".repeat(shape.padding);
    for group in 1..=200 {
        let sql = if group == 57 {
            "DROP TABLE keep_me".to_string()
        } else {
            format!(
                "SELECT {group}, repeat('x', {}) /* {padding} */",
                shape.row_bytes
            )
        };
        script.push(format!("parse - {sql}"));
        script.push("bind - -".to_string());
        script.push("execute -".to_string());
    }
    script.push("sync".to_string());
    script.push(
        if shape.read_while_writing {
            "join"
        } else {
            "read-ready 2"
        }
        .to_string(),
    );
    script.extend(lines(&[
        "query SELECT 'after'",
        "read-ready 1",
        "terminate",
    ]));
    script
}

/// Runs the pipeline and checks what the client received: the replies before the denial in
/// full, the gateway's error, nothing for the rest, one ReadyForQuery, and a working query
/// after it. Returns the messages.
fn run_denied_pipeline(setup: &PgSetup, name: &str, shape: &PipelineShape) -> Vec<Value> {
    setup.postgres.admin_sql("CREATE TABLE keep_me (id int)");
    let output = pg_script_output(setup, name, &pipeline_script(shape), &[]);
    assert!(
        output.status.success(),
        "pg-script: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let messages: Vec<Value> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).expect("pg-script prints JSON lines"))
        .collect();
    let all = tags(&messages);
    // Skip authentication up to the first ReadyForQuery.
    let after_auth = &all[all.find('Z').expect("authenticated") + 1..];
    assert_eq!(after_auth, format!("3Z{}EZTDCZ", "12DC".repeat(56)));

    let error = messages
        .iter()
        .find(|m| m["tag"] == "E")
        .expect("the denial");
    assert_eq!(error["fields"]["C"], "42501");
    assert!(
        error["fields"]["M"]
            .as_str()
            .expect("message")
            .contains("no-drop")
    );
    let rows: Vec<&Value> = messages.iter().filter(|m| m["tag"] == "D").collect();
    assert_eq!(
        rows.len(),
        57,
        "56 groups before the denial and the query after it"
    );
    for (group, row) in (1..=56).zip(&rows) {
        assert_eq!(row["values"][0], group.to_string(), "{row}");
        assert_eq!(row["values"][1]["len"], shape.row_bytes, "{row}");
        assert_eq!(row["values"][1]["all_x"], true, "{row}");
    }
    assert_eq!(
        rows[56]["values"][0], "after",
        "the session is usable after the denial"
    );
    assert_eq!(
        setup
            .postgres
            .admin_sql("SELECT count(*) FROM keep_me")
            .trim(),
        "0",
        "the table still exists"
    );
    messages
}

#[test]
fn pipelined_denial_exact_replies() {
    let setup = pg_setup("pipelined_denial_exact_replies");
    // Each statement carries 4 KB and each row brings 4 KB back, about 800 KB written before
    // the client reads anything.
    let shape = PipelineShape {
        padding: 4000,
        row_bytes: 4000,
        read_while_writing: false,
    };
    run_denied_pipeline(&setup, "pipeline", &shape);

    setup.node.wait_for_sessions(1);
    let recorded = statements(&setup.node);
    let denied: Vec<&Value> = recorded
        .iter()
        .filter(|s| s["outcome"] == "denied")
        .collect();
    assert_eq!(denied.len(), 1);
    assert_eq!(denied[0]["rule"], "no-drop");
    assert_eq!(denied[0]["statement"], "DROP TABLE keep_me");
    let ok = recorded.iter().filter(|s| s["outcome"] == "ok").count();
    assert_eq!(
        ok, 57,
        "56 selects before the denial and the query after it"
    );
}

/// The pipelined denial above, with a client that reads while it writes, as pipelining
/// drivers do. Each row before the denial brings 256 KiB back and each
/// statement carries 16 KB, so replies stream to the client while it is still writing, far
/// more than the sockets buffer either way. A gateway that stopped reading the client while
/// it had replies to deliver would stall both sides. The script's reader and writer then fail
/// after 60 s without progress.
#[test]
fn pipelined_denial_while_client_reads() {
    let setup = pg_setup("pipelined_denial_while_client_reads");
    let shape = PipelineShape {
        padding: 16_000,
        row_bytes: 262_144,
        read_while_writing: true,
    };
    run_denied_pipeline(&setup, "pipeline-reading", &shape);
}

#[test]
fn unnamed_statements_positional() {
    let setup = pg_setup("unnamed_statements_positional");
    let script = lines(&[
        "startup rawuser postgres",
        "read-ready 1",
        "parse - CREATE TABLE t (id int)",
        "bind - -",
        "execute -",
        "parse - SELECT * FROM t",
        "bind - -",
        "execute -",
        "sync",
        "read-ready 1",
        "terminate",
    ]);
    let messages = pg_script(&setup, "positional", &script);
    let all = tags(&messages);
    assert!(all.ends_with("12C12CZ"), "{all}");
    let commands: Vec<&str> = messages
        .iter()
        .filter_map(|m| m["command"].as_str())
        .collect();
    assert_eq!(commands, ["CREATE TABLE", "SELECT 0"]);

    setup.node.wait_for_sessions(1);
    let recorded = statements(&setup.node);
    let texts: Vec<&str> = recorded
        .iter()
        .filter_map(|s| s["statement"].as_str())
        .collect();
    assert_eq!(texts, ["CREATE TABLE t (id int)", "SELECT * FROM t"]);
    assert_eq!(recorded[0]["kind"], "create");
    assert_eq!(recorded[1]["kind"], "select");
}

#[test]
fn startup_bytewise_after_declined_encryption() {
    let setup = pg_setup("startup_bytewise_after_declined_encryption");
    let script = lines(&[
        "gssenc",
        "ssl",
        "startup-bytewise rawuser postgres",
        "read-ready 1",
        "query SELECT 42",
        "read-ready 1",
        "terminate",
    ]);
    let messages = pg_script(&setup, "bytewise", &script);
    assert_eq!(messages[0]["answer"], "N", "GSSENCRequest is declined");
    assert_eq!(
        messages[1]["answer"], "N",
        "SSLRequest is declined without a certificate"
    );
    let row = messages.iter().find(|m| m["tag"] == "D").expect("a row");
    assert_eq!(row["values"][0], "42");

    // A client that gives up on encryption after the GSSENCRequest's `N` sends its startup
    // packet straight away, with no SSLRequest between.
    let script = lines(&[
        "gssenc",
        "startup rawuser postgres",
        "read-ready 1",
        "query SELECT 43",
        "read-ready 1",
        "terminate",
    ]);
    let messages = pg_script(&setup, "gssenc-then-startup", &script);
    assert_eq!(messages[0]["answer"], "N", "GSSENCRequest is declined");
    let row = messages.iter().find(|m| m["tag"] == "D").expect("a row");
    assert_eq!(row["values"][0], "43");
}

#[test]
fn cancel_reaches_only_its_session() {
    let setup = pg_setup("cancel_reaches_only_its_session");
    let cancelled = lines(&[
        "startup rawuser postgres",
        "read-ready 1",
        "query SELECT pg_sleep(30)",
        "cancel-after 300",
        "read-ready 1",
        "terminate",
    ]);
    let bystander = lines(&[
        "startup rawuser postgres",
        "read-ready 1",
        "query SELECT pg_sleep(2)",
        "read-ready 1",
        "terminate",
    ]);
    let (first, second) = std::thread::scope(|scope| {
        let other = scope.spawn(|| pg_script(&setup, "bystander", &bystander));
        let first = pg_script(&setup, "cancelled", &cancelled);
        (first, other.join().expect("bystander thread"))
    });

    let error = first
        .iter()
        .find(|m| m["tag"] == "E")
        .expect("the query was cancelled");
    assert_eq!(error["fields"]["C"], "57014", "query_canceled");
    let start = first.iter().find(|m| m["tag"] == "Z").expect("ready")["ms"]
        .as_u64()
        .expect("ms");
    let cancelled_at = error["ms"].as_u64().expect("ms");
    assert!(
        cancelled_at - start < 1300,
        "cancelled within a second of the request: {first:#?}"
    );
    assert!(
        second.iter().any(|m| m["command"] == "SELECT 1"),
        "the other session's query completes: {second:#?}"
    );
    assert!(!second.iter().any(|m| m["tag"] == "E"));
}

/// The first statement after login may be longer than the 10,000 bytes allowed during login,
/// as a Query and as a Parse.
#[test]
fn long_first_statement_after_login() {
    let setup = pg_setup("long_first_statement_after_login");
    let literal = "x".repeat(20_000);
    let query = format!("SELECT length('{literal}')");
    let output = psql(&setup, true, "postgres", &["-c", &query]);
    assert!(
        output.status.success(),
        "the 20,000-byte query failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "20000");

    let script = vec![
        "startup rawuser postgres".to_string(),
        "read-ready 1".to_string(),
        format!("parse - SELECT length('{literal}')"),
        "bind - -".to_string(),
        "execute -".to_string(),
        "sync".to_string(),
        "read-ready 1".to_string(),
        "terminate".to_string(),
    ];
    let messages = pg_script(&setup, "long-parse", &script);
    let rows: Vec<&Value> = messages.iter().filter(|m| m["tag"] == "D").collect();
    assert_eq!(rows.len(), 1, "{messages:#?}");
    assert_eq!(rows[0]["values"][0], "20000", "{messages:#?}");
}

/// Each statement of a multi-statement query string is recorded with its place in it.
#[test]
fn multi_statement_parts_recorded() {
    let setup = pg_setup("multi_statement_parts_recorded");
    let output = psql_ok(
        &setup,
        true,
        "postgres",
        "SELECT 1; SELECT 2, 3; SELECT 'four'",
    );
    assert_eq!(output.lines().collect::<Vec<_>>(), ["1", "2|3", "four"]);
    let sessions = setup.node.wait_for_sessions(1);
    let parts: Vec<Value> = sessions
        .iter()
        .flatten()
        .filter(|line| line["event"] == "sql.statement")
        .map(|line| serde_json::json!([line["part"], line["parts"], line["rows"]]))
        .collect();
    assert_eq!(
        parts,
        [
            serde_json::json!([1, 3, 1]),
            serde_json::json!([2, 3, 1]),
            serde_json::json!([3, 3, 1])
        ],
        "{sessions:#?}"
    );
}

#[test]
fn big_values_pass_byte_identical() {
    let setup = pg_setup("big_values_pass_byte_identical");
    setup
        .postgres
        .admin_sql("CREATE TABLE big_values (v text); GRANT INSERT ON big_values TO rawuser");
    let size = 20 * 1024 * 1024;
    let daemon_pid = setup.daemon.as_ref().expect("daemon").pid();
    let before = rss_kib(daemon_pid);
    let script = vec![
        "startup rawuser postgres".to_string(),
        "read-ready 1".to_string(),
        format!("query SELECT repeat('x', {size})"),
        // The client reads the 20 MiB row slowly, so the proxy must hold back, not buffer.
        "read-ready-slowly 1 3".to_string(),
        "parse - INSERT INTO big_values (v) VALUES ($1)".to_string(),
        format!("bind - - @{size}"),
        "execute -".to_string(),
        "sync".to_string(),
        "read-ready 1".to_string(),
        "terminate".to_string(),
    ];
    let messages = pg_script(&setup, "big", &script);
    let rows: Vec<&Value> = messages.iter().filter(|m| m["tag"] == "D").collect();
    assert_eq!(rows.len(), 1, "{messages:#?}");
    assert_eq!(rows[0]["values"][0]["len"], size);
    assert_eq!(rows[0]["values"][0]["all_x"], true);
    assert!(
        messages.iter().any(|m| m["command"] == "INSERT 0 1"),
        "the INSERT completed"
    );
    assert_eq!(
        setup
            .postgres
            .admin_sql(&format!(
                "SELECT length(v), v = repeat('x', {size}) FROM big_values"
            ))
            .trim(),
        format!("{size}|t"),
        "the 20 MiB parameter was stored byte for byte"
    );
    // Streaming takes 6-7 MiB here, while holding the 20 MiB row or parameter whole would
    // take more than 20.
    let growth_mib = rss_kib(daemon_pid).saturating_sub(before) / 1024;
    assert!(
        growth_mib < 14,
        "proxy memory grew by {growth_mib} MiB for a slowly read 20 MiB row"
    );
}

/// A client that connects and never finishes its startup is closed after
/// `proxy.login_timeout`, with the reason recorded, and does not wait for `idle_timeout`.
#[test]
fn silent_client_closed_at_login_timeout() {
    let (setup, _) = pg_setup_with(
        "silent_client_closed_at_login_timeout",
        false,
        false,
        "  login_timeout: 2s\n",
    );
    let started = std::time::Instant::now();
    // Half of a startup packet's length, then nothing.
    let silent = pg_script(&setup, "silent", &lines(&["raw 0000", "read-ready 30"]));
    assert!(silent.iter().any(|m| m["eof"] == true), "{silent:#?}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(25),
        "closed after {:?}",
        started.elapsed()
    );
    // A client that logs in within the limit keeps its session past it.
    let slow = pg_script(
        &setup,
        "slow",
        &lines(&[
            "startup rawuser postgres",
            "read-ready 1",
            "sleep 3",
            "query SELECT 7",
            "read-ready 1",
        ]),
    );
    assert!(
        tags(&slow).contains('D'),
        "the query after the limit ran: {slow:#?}"
    );

    let sessions = setup.node.wait_for_sessions(2);
    let reasons: Vec<String> = sessions
        .iter()
        .filter_map(|lines| lines.iter().find(|line| line["event"] == "session.end"))
        .filter(|end| end["outcome"] == "idle_timeout")
        .map(|end| end["reason"].as_str().unwrap_or("").to_string())
        .collect();
    assert_eq!(
        reasons,
        ["the client did not finish logging in within 2s (proxy.login_timeout)"],
        "{sessions:#?}"
    );
}

#[test]
fn bad_input_ends_only_its_session() {
    let setup = pg_setup("bad_input_ends_only_its_session");
    let garbage = pg_script(
        &setup,
        "garbage",
        &lines(&["raw 474554202f20485454502f312e310d0a0d0a", "read-ready 1"]),
    );
    assert!(garbage.iter().any(|m| m["eof"] == true), "{garbage:#?}");
    let huge = pg_script(
        &setup,
        "huge",
        &lines(&[
            "startup rawuser postgres",
            "read-ready 1",
            "raw 517fffffff",
            "read-ready 1",
        ]),
    );
    assert!(huge.iter().any(|m| m["eof"] == true), "{huge:#?}");
    let truncated = pg_script(
        &setup,
        "truncated",
        &lines(&[
            "startup rawuser postgres",
            "read-ready 1",
            "raw 5100000040534545",
        ]),
    );
    assert!(!truncated.is_empty());

    // Another session on the same daemon is unaffected.
    assert_eq!(psql_ok(&setup, true, "postgres", "SELECT 7").trim(), "7");

    let sessions = setup.node.wait_for_sessions(4);
    let reasons: Vec<String> = sessions
        .iter()
        .filter_map(|lines| lines.iter().find(|line| line["event"] == "session.end"))
        .filter(|end| end["outcome"] == "error")
        .map(|end| end["reason"].as_str().unwrap_or("").to_string())
        .collect();
    assert_eq!(
        reasons.len(),
        3,
        "each bad session ends with an error outcome: {sessions:#?}"
    );
    assert!(
        reasons.iter().any(|r| r.contains("startup packet")),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r.contains("2147483647")),
        "{reasons:?}"
    );
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("in the middle of a message")),
        "{reasons:?}"
    );
}

#[test]
fn pgbench_and_copy_through_gateway() {
    let setup = pg_setup("pgbench_and_copy_through_gateway");
    let pgbench = |through_gateway: bool, args: &[&str]| {
        let program = setup.postgres.bin_dir.join("pgbench");
        let mut command = if through_gateway {
            setup.node.in_pod(&setup.pod, &program)
        } else {
            setup.node.in_node(None, &program)
        };
        let output = command
            .args([
                "-h",
                &setup.postgres.addr.ip().to_string(),
                "-U",
                "postgres",
            ])
            .args(args)
            .arg("postgres")
            .env("PGPASSWORD", POSTGRES_PASSWORD)
            .stdin(Stdio::null())
            .output()
            .expect("run pgbench");
        assert!(
            output.status.success(),
            "pgbench {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    // Initialization drops and recreates its tables, which the no-drop rule denies: it runs
    // directly, and the benchmark itself through the gateway.
    pgbench(false, &["-i", "-s", "1", "-q"]);
    for mode in [
        &["-S", "-c", "2", "-t", "200"][..],
        &["-c", "2", "-t", "100"][..],
    ] {
        let report = pgbench(true, mode);
        assert!(
            report.contains("number of failed transactions: 0"),
            "{report}"
        );
    }

    // COPY in and out: 100,000 rows each way, through the gateway and directly, with the
    // same counts and the same exported bytes.
    let input = setup.node.dir.join("copy-in.csv");
    let rows: String = (0..100_000)
        .map(|i| format!("{i},row number {i}\n"))
        .collect();
    std::fs::write(&input, &rows).expect("write copy input");
    let copy = |through_gateway: bool, command: String| {
        let output = psql(&setup, through_gateway, "postgres", &["-c", &command]);
        assert!(
            output.status.success(),
            "{command}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    let mut exports = Vec::new();
    for (through_gateway, table) in [(true, "copied"), (false, "copied_direct")] {
        psql_ok(
            &setup,
            through_gateway,
            "postgres",
            &format!("CREATE TABLE {table} (id int, note text)"),
        );
        let report = copy(
            through_gateway,
            format!(
                "\\copy {table} FROM '{}' WITH (FORMAT csv)",
                input.display()
            ),
        );
        assert_eq!(report.trim(), "COPY 100000", "{table}");
        let exported = setup.node.dir.join(format!("{table}.csv"));
        let report = copy(
            through_gateway,
            format!(
                "\\copy (SELECT * FROM {table} ORDER BY id) TO '{}' WITH (FORMAT csv)",
                exported.display()
            ),
        );
        assert_eq!(report.trim(), "COPY 100000", "{table}");
        exports.push(std::fs::read(exported).expect("read copy output"));
    }
    let count = |table: &str| {
        setup
            .postgres
            .admin_sql(&format!("SELECT count(*) FROM {table}"))
            .trim()
            .to_string()
    };
    assert_eq!(count("copied"), "100000");
    assert_eq!(count("copied"), count("copied_direct"));
    assert!(
        exports[0] == exports[1],
        "the exports through the gateway and directly differ"
    );
    // The input's rows are in id order, as the export is.
    assert!(
        exports[0] == rows.as_bytes(),
        "the export differs from the imported file"
    );
}

/// Runs psql in the pod with `sslmode=verify-full` against the gateway CA (plus `extra`
/// connection options) and asks the server whether its own leg uses TLS.
fn psql_server_ssl(setup: &PgSetup, ca: &Path, user: &str, extra: &str) -> Output {
    let conninfo = format!(
        "host={} port=5432 user={user} dbname=postgres sslmode=verify-full sslrootcert={} {extra}",
        setup.postgres.addr.ip(),
        ca.display()
    );
    setup
        .node
        .in_pod(&setup.pod, setup.postgres.bin_dir.join("psql"))
        .arg(conninfo)
        .args([
            "-X",
            "-A",
            "-t",
            "-c",
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
        ])
        .env("PGPASSWORD", POSTGRES_PASSWORD)
        .stdin(Stdio::null())
        .output()
        .expect("run psql")
}

#[test]
fn client_tls_terminated_verify_full() {
    let (setup, ca) = pg_setup_tls("client_tls_terminated_verify_full", true, false);
    let output = psql(&setup, true, "postgres", &["-c", "SELECT 'over tls'"]);
    assert!(
        output.status.success(),
        "prefer mode works: {}",
        String::from_utf8_lossy(&output.stderr)
    );

    let output = psql_server_ssl(&setup, &ca, "postgres", "");
    assert!(
        output.status.success(),
        "verify-full against the gateway certificate: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    // The server leg is plain text: the server itself reports no TLS.
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "f");

    setup.node.wait_for_sessions(2);
    let startups: Vec<Value> = setup
        .node
        .sessions()
        .into_iter()
        .flatten()
        .filter(|line| line["event"] == "sql.startup")
        .collect();
    assert!(
        startups.iter().all(|startup| startup["client_tls"] == true),
        "{startups:#?}"
    );
    assert!(
        startups
            .iter()
            .all(|startup| startup["upstream_tls"] == false)
    );
}

#[test]
fn both_legs_tls_authentication() {
    let (setup, ca) = pg_setup_tls("both_legs_tls_authentication", true, true);
    let run = |user: &str, extra: &str| psql_server_ssl(&setup, &ca, user, extra);

    // md5 does not bind to the TLS channel, so it works across the terminator as it is.
    let output = run("md5user", "");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&output.stdout).trim(),
        "t",
        "the server leg is encrypted too"
    );

    // SCRAM: the gateway hides SCRAM-SHA-256-PLUS, so a client that does not insist on channel
    // binding authenticates with SCRAM-SHA-256.
    let output = run("postgres", "channel_binding=disable");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );

    // With libpq's default (channel_binding=prefer) over TLS, the client announces that it
    // could bind, and a server on TLS rejects that as a possible downgrade. This is
    // PostgreSQL's protection working as designed; the expected failure documents it.
    let output = run("postgres", "");
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("channel binding"));
}

#[test]
fn direct_tls_with_alpn() {
    let (setup, ca) = pg_setup_tls("direct_tls_with_alpn", true, false);
    let script = lines(&[
        "startup rawuser postgres",
        "read-ready 1",
        "query SELECT 'direct'",
        "read-ready 1",
        "terminate",
    ]);
    let output = pg_script_output(
        &setup,
        "direct",
        &script,
        &["--direct-tls-ca".as_ref(), ca.as_os_str()],
    );
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("\"direct\""), "{stdout}");
}

#[test]
fn protocol_3_2_negotiated_down() {
    let setup = pg_setup("protocol_3_2_negotiated_down");
    let script = lines(&[
        "startup-3.2 rawuser postgres",
        "read-ready 1",
        "query SELECT 32",
        "read-ready 1",
        "terminate",
    ]);
    let messages = pg_script(&setup, "protocol32", &script);
    let all = tags(&messages);
    // PostgreSQL 15 speaks 3.0 and reports it with NegotiateProtocolVersion; the client goes on.
    let server_major = setup.postgres.admin_sql("SHOW server_version_num");
    let server_major: u32 = server_major.trim().parse::<u32>().expect("version number") / 10_000;
    if server_major < 18 {
        assert!(all.contains('v'), "{all}");
    }
    let row = messages.iter().find(|m| m["tag"] == "D").expect("a row");
    assert_eq!(row["values"][0], "32");
}

/// Reads the resident set size of a process in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status =
        std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read process status");
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kib| kib.parse().ok())
        .expect("VmRSS line")
}

#[test]
fn rust_driver_scenario_flat_memory() {
    let setup = pg_setup("rust_driver_scenario_flat_memory");
    let daemon_pid = setup.daemon.as_ref().expect("daemon").pid();
    let before = rss_kib(daemon_pid);
    let copy_mib = 1024;
    let output = setup
        .node
        .in_pod(&setup.pod, TESTPEER)
        .args([
            "pg-driver",
            "--connect",
            &setup.postgres.addr.to_string(),
            "--user",
            "postgres",
        ])
        .args([
            "--password",
            POSTGRES_PASSWORD,
            "--copy-mib",
            &copy_mib.to_string(),
        ])
        .stdin(Stdio::null())
        .output()
        .expect("run pg-driver");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: Value = serde_json::from_slice(&output.stdout).expect("pg-driver prints JSON");
    let after = rss_kib(daemon_pid);

    assert_eq!(report["prepared_rows"], 100);
    assert_eq!(report["pipelined_ok"], 50);
    assert_eq!(report["big_row_len"], 20 * 1024 * 1024);
    assert_eq!(report["big_row_all_x"], true);
    assert_eq!(report["param_length"], 20 * 1024 * 1024);
    assert_eq!(
        report["big_bind_card"], 4_111_110_000_001_111_i64,
        "a card number bound by a streamed Bind comes back masked"
    );
    let big_bind = statements(&setup.node)
        .into_iter()
        .find(|record| {
            record["statement"]
                .as_str()
                .is_some_and(|text| text.contains("::int8 WHERE length($1::text) > 0"))
        })
        .expect("the streamed Bind's statement is recorded");
    // tokio-postgres sends every parameter in binary format, recorded by size.
    assert_eq!(
        big_bind["params"][0]["binary_bytes"],
        20 * 1024 * 1024,
        "the streamed Bind's parameter is recorded: {big_bind}"
    );
    assert_eq!(report["copied_in_rows"], report["sent_rows"]);
    assert_eq!(
        report["copied_out_bytes"], report["sent_bytes"],
        "COPY out returns what went in"
    );
    // 1 GiB went each way and 20 MiB values passed, but the proxy keeps only a few buffers.
    let growth_mib = after.saturating_sub(before) / 1024;
    assert!(
        growth_mib < 48,
        "proxy memory grew by {growth_mib} MiB (before {before} KiB, after {after} KiB)"
    );
}

#[test]
fn fast_path_function_call_judged() {
    let setup = pg_setup("fast_path_function_call_judged");
    // FunctionCall of pg_backend_pid() (OID 2026): no argument formats, no arguments, text result.
    let script = lines(&[
        "startup rawuser postgres",
        "read-ready 1",
        "raw 460000000e000007ea000000000000",
        "read-ready 1",
        "query SELECT 'still usable'",
        "read-ready 1",
        "terminate",
    ]);
    let messages = pg_script(&setup, "fastpath", &script);
    let all = tags(&messages);
    let after_auth = &all[all.find('Z').expect("authenticated") + 1..];
    assert_eq!(
        after_auth, "EZTDCZ",
        "one error and one ReadyForQuery for the call"
    );
    let error = messages
        .iter()
        .find(|m| m["tag"] == "E")
        .expect("the denial");
    assert_eq!(error["fields"]["C"], "42501");
    assert!(
        error["fields"]["M"]
            .as_str()
            .expect("message")
            .contains("no-fast-path")
    );

    setup.node.wait_for_sessions(1);
    let recorded = statements(&setup.node);
    assert_eq!(recorded[0]["kind"], "function_call");
    assert_eq!(recorded[0]["outcome"], "denied");
    assert_eq!(recorded[1]["outcome"], "ok");
}

#[test]
fn denied_statement_beside_unparsable_one() {
    let setup = pg_setup("denied_statement_beside_unparsable_one");
    setup.postgres.admin_sql("CREATE TABLE keep_me (id int)");
    // The SQL parser rejects CHECKPOINT; the DROP beside it must still be judged.
    let output = psql(
        &setup,
        true,
        "postgres",
        &["-c", "DROP TABLE keep_me; CHECKPOINT"],
    );
    assert!(!output.status.success(), "the query must be denied");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("no-drop"), "{stderr}");
    assert_eq!(
        setup
            .postgres
            .admin_sql("SELECT count(*) FROM keep_me")
            .trim(),
        "0",
        "the table still exists"
    );

    // A Unicode-escaped name is the table it spells, with the default escape or another.
    setup
        .postgres
        .admin_sql("CREATE TABLE vault (id int); INSERT INTO vault VALUES (1)");
    for statement in [
        r#"DELETE FROM U&"v\0061ult" WHERE id = 1"#,
        r#"DELETE FROM public.u&"v!0061ult" UESCAPE '!' WHERE id = 1"#,
    ] {
        let output = psql(&setup, true, "postgres", &["-c", statement]);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{statement}: {stderr}");
        assert!(stderr.contains("no-vault-writes"), "{statement}: {stderr}");
    }
    assert_eq!(vault_rows(&setup), "1", "the row is still there");
}

/// Runs a PostgreSQL client program from the server's bin directory in the pod (through the
/// gateway) or in the node (direct), with `args`.
fn pg_program(setup: &PgSetup, through_gateway: bool, program: &str, args: &[&str]) -> Output {
    let program = setup.postgres.bin_dir.join(program);
    let mut command = if through_gateway {
        setup.node.in_pod(&setup.pod, &program)
    } else {
        setup.node.in_node(None, &program)
    };
    command
        .args(args)
        .env("PGCONNECT_TIMEOUT", "10")
        .stdin(Stdio::null())
        .output()
        .expect("run a PostgreSQL client program")
}

/// A base backup copies data files in which card numbers cannot be masked without corrupting
/// them, so the gateway rejects physical replication at startup with a FATAL error naming the
/// reason. The same backup taken directly works, and the rejected session is recorded.
#[test]
fn physical_replication_rejected() {
    let setup = pg_setup("physical_replication_rejected");
    setup.postgres.admin_sql("ALTER ROLE rawuser REPLICATION");
    let host = setup.postgres.addr.ip().to_string();
    let through = setup.node.dir.join("backup-through");
    let direct = setup.node.dir.join("backup-direct");
    let backup_args = |dir: &Path| {
        [
            "-h",
            host.as_str(),
            "-U",
            "rawuser",
            "-X",
            "none",
            "-Ft",
            "-D",
            dir.to_str().expect("UTF-8 path"),
        ]
        .map(str::to_string)
    };

    let args = backup_args(&through);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let output = pg_program(&setup, true, "pg_basebackup", &args);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(stderr.contains("physical replication"), "{stderr}");
    assert!(stderr.contains("redirect.exclude_cgroups"), "{stderr}");
    let written = std::fs::read_dir(&through).map_or(0, |entries| entries.count());
    assert_eq!(written, 0, "no backup file is written");

    let args = backup_args(&direct);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let output = pg_program(&setup, false, "pg_basebackup", &args);
    assert!(
        output.status.success(),
        "direct backup: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(direct.join("base.tar").exists());

    let sessions = setup.node.wait_for_sessions(1);
    let lines = &sessions[0];
    let startup = lines
        .iter()
        .find(|line| line["event"] == "sql.startup")
        .expect("startup recorded");
    assert_eq!(startup["replication"], "physical");
    assert_eq!(startup["database_user"], "rawuser");
    let end = lines
        .iter()
        .find(|line| line["event"] == "session.end")
        .expect("end recorded");
    assert_eq!(end["outcome"], "rejected_unsupported", "{end}");
    assert_eq!(end["bytes"]["from_upstream"], 0, "{end}");
}

/// Arguments of `pg_recvlogical --start` on `slot` as rawuser, writing to standard output,
/// followed by `extra`.
fn recvlogical_args<'a>(host: &'a str, slot: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "-h",
        host,
        "-U",
        "rawuser",
        "-d",
        "postgres",
        "--slot",
        slot,
        "--start",
        "--no-loop",
        "-f",
        "-",
    ];
    args.extend_from_slice(extra);
    args
}

/// Logical decoding passes: its changes arrive as text the masker scans, so a card number
/// inserted into a table comes out of `pg_recvlogical` masked, and the replication commands are
/// recorded.
#[test]
fn logical_replication_masked() {
    let setup = pg_setup("logical_replication_masked");
    setup.postgres.admin_sql("ALTER ROLE rawuser REPLICATION");
    setup.postgres.admin_sql("CREATE TABLE cards (note text)");
    setup
        .postgres
        .admin_sql("SELECT pg_create_logical_replication_slot('cards_slot', 'test_decoding')");
    setup
        .postgres
        .admin_sql("INSERT INTO cards VALUES ('card 5555 5555 5555 4444 on file')");
    let end_position = setup.postgres.admin_sql("SELECT pg_current_wal_lsn()");
    let host = setup.postgres.addr.ip().to_string();

    let output = pg_program(
        &setup,
        true,
        "pg_recvlogical",
        &recvlogical_args(&host, "cards_slot", &["--endpos", end_position.trim()]),
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "pg_recvlogical: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout
            .contains("table public.cards: INSERT: note[text]:'card 5555 55** **** 4444 on file'"),
        "{stdout}"
    );

    let sessions = setup.node.wait_for_sessions(1);
    let lines: Vec<&Value> = sessions.iter().flatten().collect();
    let startup = lines
        .iter()
        .find(|line| line["event"] == "sql.startup")
        .expect("startup recorded");
    assert_eq!(startup["replication"], "logical");
    let start = lines
        .iter()
        .find(|line| line["kind"] == "start_replication")
        .expect("START_REPLICATION recorded");
    assert_eq!(start["outcome"], "ok", "{start}");
    assert_eq!(start["tables"], serde_json::json!([]), "{start}");
    for path in setup.node.session_files() {
        let text = std::fs::read_to_string(&path).expect("read recording");
        assert!(!text.contains("5555 5555 5555 4444"), "{}", path.display());
    }

    // A stream the client cuts off is still recorded, as interrupted.
    let mut streaming = setup
        .node
        .in_pod(&setup.pod, setup.postgres.bin_dir.join("pg_recvlogical"))
        .args(recvlogical_args(&host, "cards_slot", &[]))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start pg_recvlogical");
    gateway_user::testing::wait_until(
        "the stream to start",
        std::time::Duration::from_secs(20),
        || {
            setup
                .node
                .sessions()
                .iter()
                .flatten()
                .filter(|line| line["event"] == "sql.startup")
                .count()
                >= 2
        },
    );
    std::thread::sleep(std::time::Duration::from_millis(500));
    streaming.kill().expect("stop pg_recvlogical");
    streaming.wait().expect("wait for pg_recvlogical");
    let sessions = setup.node.wait_for_sessions(2);
    let interrupted = sessions
        .iter()
        .flatten()
        .find(|line| line["kind"] == "start_replication" && line["outcome"] == "interrupted")
        .unwrap_or_else(|| panic!("the cut stream is recorded: {sessions:#?}"));
    assert_eq!(
        interrupted["tables"],
        serde_json::json!([]),
        "{interrupted}"
    );

    // pgoutput's binary mode sends column values in binary formats the masker cannot read, so
    // the gateway denies it.
    setup
        .postgres
        .admin_sql("CREATE PUBLICATION cards_pub FOR TABLE cards");
    setup
        .postgres
        .admin_sql("SELECT pg_create_logical_replication_slot('binary_slot', 'pgoutput')");
    let output = pg_program(
        &setup,
        true,
        "pg_recvlogical",
        &recvlogical_args(
            &host,
            "binary_slot",
            &[
                "-o",
                "proto_version=1",
                "-o",
                "publication_names=cards_pub",
                "-o",
                "binary=true",
            ],
        ),
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(stderr.contains("gateway:binary-replication"), "{stderr}");
    let sessions = setup.node.wait_for_sessions(3);
    let denied = sessions
        .iter()
        .flatten()
        .find(|line| line["event"] == "sql.statement" && line["outcome"] == "denied")
        .expect("the denial is recorded");
    assert_eq!(denied["kind"], "start_replication", "{denied}");
    assert_eq!(denied["rule"], "gateway:binary-replication", "{denied}");

    // A session started for logical replication may still ask for a base backup or physical
    // streaming, which the walsender would serve: both are denied.
    for command in ["BASE_BACKUP (LABEL 'copy')", "START_REPLICATION 0/0"] {
        let output = pg_program(
            &setup,
            true,
            "psql",
            &[
                &format!("host={host} user=rawuser dbname=postgres replication=database"),
                "-X",
                "-c",
                command,
            ],
        );
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{command}: {stderr}");
        assert!(
            stderr.contains("gateway:physical-replication"),
            "{command}: {stderr}"
        );
    }
}

/// Four clients start a Query of 64 MiB, the most the gateway reads whole, and stall, so the
/// 256 MiB that large statements of all sessions share are in use. A 2 MiB Query and a 2 MiB
/// Parse are then read and dropped with an error, the session goes on, and once the four leave
/// the same Query runs.
#[test]
fn large_statements_share_memory_budget() {
    let setup = pg_setup("large_statements_share_memory_budget");
    // A Query header declaring a 64 MiB body, and the body's first bytes.
    let mut start = String::from("raw 5104000004");
    for byte in b"SELECT 1 -- " {
        start.push_str(&format!("{byte:02x}"));
    }
    let holder_script = setup.node.dir.join("holder.script");
    std::fs::write(
        &holder_script,
        lines(&[
            "startup rawuser postgres",
            "read-ready 1",
            &start,
            "sleep 6000",
        ])
        .join("\n"),
    )
    .expect("write script");
    let mut holders: Vec<std::process::Child> = (0..4)
        .map(|_| {
            setup
                .node
                .in_pod(&setup.pod, TESTPEER)
                .args(["pg-script", "--connect", &setup.postgres.addr.to_string()])
                .arg("--script")
                .arg(&holder_script)
                .stdout(Stdio::null())
                .spawn()
                .expect("start a holder")
        })
        .collect();
    std::thread::sleep(std::time::Duration::from_millis(1500));

    let big = format!("SELECT length('{}')", "x".repeat(2 * 1024 * 1024));
    let query = format!("query {big}");
    let parse = format!("parse - {big}");
    let rejected = pg_script(
        &setup,
        "rejected",
        &lines(&[
            "startup rawuser postgres",
            "read-ready 1",
            &query,
            "read-ready 1",
            &parse,
            "bind - -",
            "execute -",
            "sync",
            "read-ready 1",
            "query SELECT 7",
            "read-ready 1",
        ]),
    );
    let errors: Vec<&Value> = rejected
        .iter()
        .filter(|message| message["tag"] == "E")
        .collect();
    assert_eq!(errors.len(), 2, "{rejected:#?}");
    for error in &errors {
        assert_eq!(error["fields"]["C"], "53200", "{error}");
        let text = error["fields"]["M"].as_str().unwrap_or_default();
        assert!(
            text.contains("statements being read hold 256 MiB"),
            "{text}"
        );
    }
    assert!(tags(&rejected).ends_with("EZEZTDCZ"), "{rejected:#?}");

    for holder in &mut holders {
        holder.kill().expect("stop a holder");
        holder.wait().expect("reap a holder");
    }
    std::thread::sleep(std::time::Duration::from_millis(500));
    let after = pg_script(
        &setup,
        "after",
        &lines(&[
            "startup rawuser postgres",
            "read-ready 1",
            &query,
            "read-ready 1",
        ]),
    );
    let row = after
        .iter()
        .find(|message| message["tag"] == "D")
        .unwrap_or_else(|| panic!("no row: {after:#?}"));
    assert_eq!(row["values"][0], "2097152");

    setup.node.wait_for_sessions(6);
    let dropped: Vec<Value> = statements(&setup.node)
        .into_iter()
        .filter(|statement| statement["rule"] == "gateway:statement-memory")
        .collect();
    assert_eq!(dropped.len(), 2, "{dropped:#?}");
    for statement in &dropped {
        assert_eq!(statement["outcome"], "denied", "{statement}");
    }
    // The Query body is the text and its NUL. The Parse body adds a NUL for the name and a count.
    let texts: Vec<&str> = dropped
        .iter()
        .filter_map(|statement| statement["statement"].as_str())
        .collect();
    assert_eq!(
        texts,
        [
            format!("(a statement of {} bytes, not read)", big.len() + 1),
            format!("(a statement of {} bytes, not read)", big.len() + 4),
        ]
    );
}

/// Texts longer than the SQL parser reads are judged from their words: a DELETE after a long
/// SELECT is denied, and a long list the parser would take seconds and gigabytes for passes to
/// the server, which rejects it.
#[test]
fn long_texts_judged_from_words() {
    let setup = pg_setup("long_texts_judged_from_words");
    setup
        .postgres
        .admin_sql("CREATE TABLE vault (id int); INSERT INTO vault VALUES (1)");
    let padding = "x".repeat(100 * 1024);
    let select = format!("SELECT length('{padding}') AS n");
    assert_eq!(psql_ok(&setup, true, "postgres", &select).trim(), "102400");

    let with_delete = format!("{select}; DELETE FROM vault");
    let output = psql(&setup, true, "postgres", &["-c", &with_delete]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("no-unbounded-delete"), "{stderr}");
    assert_eq!(vault_rows(&setup), "1", "the DELETE did not run");

    let list = format!("SELECT {}1", "1,".repeat(50 * 1024));
    let output = psql(&setup, true, "postgres", &["-c", &list]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("at most 1664 entries"), "{stderr}");
    assert_eq!(psql_ok(&setup, true, "postgres", "SELECT 7").trim(), "7");
}

/// With `standard_conforming_strings` off, a backslash ends a string where the default
/// reading goes on, so a DELETE can hide in what reads as one string. psql splits such text as
/// the server does; a driver sends it whole. Column aliases are masked like values.
#[test]
fn escape_strings_reading_judged() {
    let setup = pg_setup("escape_strings_reading_judged");
    setup
        .postgres
        .admin_sql("CREATE TABLE vault (id int); INSERT INTO vault VALUES (1)");
    let hidden = r"query SELECT 'x\' AS a, ' ; DELETE FROM vault WHERE id = 1; -- '";
    let messages = pg_script(
        &setup,
        "escape-strings",
        &lines(&[
            "startup rawuser postgres",
            "read-ready 1",
            "query SET standard_conforming_strings = off",
            "read-ready 1",
            hidden,
            "read-ready 1",
        ]),
    );
    let denied = messages.iter().any(|message| {
        message["tag"] == "E"
            && message["fields"]["M"]
                .as_str()
                .is_some_and(|text| text.contains("no-vault-writes"))
    });
    assert!(denied, "{messages:#?}");
    assert_eq!(vault_rows(&setup), "1", "the hidden DELETE did not run");

    // With the header on, psql prints the column's name.
    let output = psql(
        &setup,
        true,
        "postgres",
        &[
            "-P",
            "tuples_only=off",
            "-c",
            "SELECT 1 AS \"4111111111111111\"",
        ],
    );
    let header = String::from_utf8_lossy(&output.stdout);
    assert!(header.contains("411111******1111"), "{header}");
    assert!(!header.contains("4111111111111111"), "{header}");
}
