//! The operations endpoint of a real `gatewayd` on a one-machine test node: health,
//! readiness against the kernel's attachment state, the heartbeat and the recorder,
//! Prometheus metrics after real redirected connections, and `gatewayctl status`. The daemon
//! listens on the default 127.0.0.1:15021 inside the node's network namespace, so tests
//! running side by side do not collide. Curl and gatewayctl run in that namespace too. Needs
//! root, so run with `cargo xtask test`.

use std::{
    collections::HashMap,
    net::SocketAddr,
    os::fd::AsFd as _,
    path::Path,
    process::{Output, Stdio},
    time::Duration,
};

use gateway_user::{
    sys,
    testing::{ChildGuard, POSTGRES_PASSWORD, Pod, Postgres, TestNode, wait_until},
};
use serde_json::Value;

const GATEWAYD: &str = env!("CARGO_BIN_EXE_gatewayd");
const GATEWAYCTL: &str = env!("CARGO_BIN_EXE_gatewayctl");
const TESTPEER: &str = env!("CARGO_BIN_EXE_gateway-testpeer");
const ECHO_PORT: u16 = 7000;
/// The default `operations.listen`, inside the node's namespace.
const ENDPOINT: &str = "127.0.0.1:15021";

/// A node with one pod, an echo server as a `tcp` target, and a running daemon.
struct Setup {
    node: TestNode,
    pod: Pod,
    target: SocketAddr,
    daemon: gateway_user::testing::Daemon,
    _echo: ChildGuard,
}

fn start(test_name: &str) -> Setup {
    let mut node = TestNode::new(test_name);
    let pod = node.add_pod("client");
    let server = node.add_server("echo", &[]);
    let target = SocketAddr::new(server.addr_v4.into(), ECHO_PORT);
    let echo = ChildGuard(node.start_echo(Path::new(TESTPEER), &server, &[target]));
    let targets = format!(
        "  - name: echo\n    address: '{}'\n    port: {}\n    class: tcp\n",
        target.ip(),
        target.port()
    );
    let config = node.daemon_config("gatewayd.yaml", "", &targets);
    let daemon = node.start_daemon(Path::new(GATEWAYD), &config, None);
    Setup {
        node,
        pod,
        target,
        daemon,
        _echo: echo,
    }
}

/// An HTTP response as curl received it.
#[derive(Debug)]
struct HttpResponse {
    status: u16,
    content_type: String,
    body: String,
}

/// Sends `method path` to the endpoint with curl from inside the node's namespace. A `HEAD`
/// request prints the headers in place of the body.
fn request(node: &TestNode, method: &str, path: &str) -> HttpResponse {
    let mut command = node.in_node(None, "curl");
    command.args(["-sS", "--max-time", "5"]);
    if method == "HEAD" {
        command.arg("--head");
    } else {
        command.args(["-X", method]);
    }
    let output = command
        .args(["-w", "\n%{content_type}\n%{http_code}"])
        .arg(format!("http://{ENDPOINT}{path}"))
        .stdin(Stdio::null())
        .output()
        .expect("run curl");
    assert!(
        output.status.success(),
        "curl {method} {path} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8(output.stdout).expect("UTF-8 response");
    let (rest, status) = text
        .rsplit_once('\n')
        .expect("curl appends the status code");
    let (body, content_type) = rest
        .rsplit_once('\n')
        .expect("curl appends the content type");
    HttpResponse {
        status: status.parse().expect("numeric status code"),
        content_type: content_type.to_string(),
        body: body.to_string(),
    }
}

/// Parses the Prometheus text format into `series -> value`, where a series is the metric
/// name with its labels exactly as printed (`gateway_errors_total{kind="accept"}`).
fn parse_metrics(text: &str) -> HashMap<String, f64> {
    let mut samples = HashMap::new();
    for line in text.lines() {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("sample line without a value: {line:?}"));
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("sample value is not a number: {line:?}"));
        assert!(
            samples.insert(series.to_string(), value).is_none(),
            "series printed twice: {series}"
        );
    }
    samples
}

fn scrape(node: &TestNode) -> HashMap<String, f64> {
    let response = request(node, "GET", "/metrics");
    assert_eq!(response.status, 200, "{}", response.body);
    parse_metrics(&response.body)
}

fn sample(samples: &HashMap<String, f64>, series: &str) -> f64 {
    *samples
        .get(series)
        .unwrap_or_else(|| panic!("{series} missing from /metrics: {samples:?}"))
}

/// Runs the test client in the pod against `target` and checks its bytes came back intact.
fn run_client(setup: &Setup) {
    let output = setup
        .node
        .in_pod(&setup.pod, TESTPEER)
        .args([
            "client",
            "--greet",
            "--connect",
            &setup.target.to_string(),
            "--bytes",
            "4096",
        ])
        .stdin(Stdio::null())
        .output()
        .expect("run test client");
    assert!(
        output.status.success(),
        "client failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: Value = serde_json::from_slice(&output.stdout).expect("client prints JSON");
    assert_eq!(report["intact"], true, "{report}");
}

fn gatewayctl_status(node: &TestNode) -> Output {
    node.in_node(None, GATEWAYCTL)
        .args(["status", "--json", "--bpffs"])
        .arg(node.pin_dir())
        .stdin(Stdio::null())
        .output()
        .expect("run gatewayctl status")
}

#[test]
fn endpoint_health_metrics_and_status() {
    let setup = start("endpoint_health_metrics_and_status");
    let node = &setup.node;

    let health = request(node, "GET", "/healthz");
    assert_eq!(health.status, 200, "{}", health.body);
    assert_eq!(health.body, "ok\n");
    let head = request(node, "HEAD", "/readyz");
    assert_eq!(head.status, 200, "{}", head.body);
    let ready = request(node, "GET", "/readyz");
    assert_eq!(ready.status, 200, "{}", ready.body);
    assert_eq!(ready.body, "ready\n");

    // Bad input: an unknown path and a method other than GET.
    let missing = request(node, "GET", "/nope");
    assert_eq!(missing.status, 404, "{}", missing.body);
    let post = request(node, "POST", "/healthz");
    assert_eq!(post.status, 405, "{}", post.body);
    let delete = request(node, "DELETE", "/metrics");
    assert_eq!(delete.status, 405, "{}", delete.body);

    let metrics = request(node, "GET", "/metrics");
    assert_eq!(
        metrics.content_type,
        "text/plain; version=0.0.4; charset=utf-8"
    );

    let before = scrape(node);
    run_client(&setup);
    run_client(&setup);
    // The session ends (and its gauge drops) just after the client sees its bytes.
    let mut after = scrape(node);
    wait_until("the sessions to end", Duration::from_secs(10), || {
        after = scrape(node);
        sample(&after, "gateway_connections_active") == 0.0
    });

    let accepted = "gateway_connections_accepted_total";
    let redirected = "gateway_connections_redirected_total";
    assert_eq!(sample(&after, accepted) - sample(&before, accepted), 2.0);
    assert_eq!(
        sample(&after, redirected) - sample(&before, redirected),
        2.0
    );
    assert_eq!(sample(&after, "gateway_approvals_pending"), 0.0);
    assert!(sample(&after, "gateway_recorder_queue_depth") >= 0.0);
    assert!(sample(&after, "gateway_recorder_lag_seconds") >= 0.0);
    // The two sessions' records reach the disk within one group-commit window.
    let syncs = "gateway_recorder_syncs_total";
    wait_until(
        "the sessions' records to be synced",
        Duration::from_secs(10),
        || sample(&scrape(node), syncs) > sample(&before, syncs),
    );
    assert_eq!(
        sample(&after, "gateway_ebpf_map_entries{map=\"TARGETS\"}"),
        1.0
    );
    assert!(sample(&after, "gateway_ebpf_map_capacity{map=\"TARGETS\"}") >= 1.0);
    assert!(sample(&after, "gateway_ebpf_map_capacity{map=\"CONN\"}") >= 1.0);
    // The proxy removes each connection's CONN entry at accept.
    assert_eq!(
        sample(&after, "gateway_ebpf_map_entries{map=\"CONN\"}"),
        0.0
    );
    // No error of any kind was counted on this clean path.
    let errors: Vec<&String> = after
        .keys()
        .filter(|series| series.starts_with("gateway_errors_total"))
        .collect();
    assert!(errors.is_empty(), "unexpected errors: {errors:?}");

    let output = gatewayctl_status(node);
    assert!(
        output.status.success(),
        "gatewayctl status failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let status: Value = serde_json::from_slice(&output.stdout).expect("status prints JSON");
    let daemon = &status["daemon"];
    assert_eq!(daemon["ready"], true, "{status}");
    assert_eq!(daemon["node"], node.node_netns.as_str());
    assert_eq!(daemon["cgroup"], node.kubepods.display().to_string());
    assert_eq!(daemon["fail_modes"]["redirect"], "open");
    assert_eq!(daemon["fail_modes"]["recording"], "closed");
    assert_eq!(daemon["policy"]["generation"], 1);
    assert_eq!(daemon["recorder"]["writer_running"], true);
    assert_eq!(daemon["recorder"]["failing"], false);
    assert_eq!(daemon["targets"][0]["name"], "echo");
    assert_eq!(daemon["targets"][0]["class"], "tcp");
    assert_eq!(
        daemon["targets"][0]["addresses"],
        serde_json::json!([setup.target.to_string()])
    );
    let age = daemon["heartbeat"]["age_ms"]
        .as_u64()
        .expect("heartbeat age");
    let timeout = daemon["heartbeat"]["timeout_ms"]
        .as_u64()
        .expect("heartbeat timeout");
    assert!(
        age < timeout,
        "heartbeat {age} ms old, timeout {timeout} ms"
    );
    let programs = daemon["programs"].as_array().expect("program list");
    assert_eq!(programs.len(), 5, "{status}");
    for program in programs {
        assert_eq!(program["attached"], true, "{program}");
    }
    let pinned = &status["pinned"];
    assert_eq!(
        pinned["redirected"].as_u64(),
        Some(sample(&after, redirected) as u64)
    );
    for program in pinned["programs"].as_array().expect("pinned programs") {
        assert_eq!(program["attached"], true, "{program}");
    }
    let maps = pinned["maps"].as_array().expect("pinned maps");
    let targets_map = maps
        .iter()
        .find(|map| map["name"] == "TARGETS")
        .expect("TARGETS fill");
    assert_eq!(targets_map["entries"], 1);

    // The table names every check, and --config supplies the endpoint and the pin directory.
    let table = node
        .in_node(None, GATEWAYCTL)
        .args(["status", "--config"])
        .arg(&setup.daemon.config_path)
        .stdin(Stdio::null())
        .output()
        .expect("run gatewayctl status");
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(table.status.success(), "{text}");
    for expected in [
        "ebpf_attached",
        "heartbeat",
        "recorder",
        "running",
        "connect4",
        "TARGETS",
        "echo",
        ENDPOINT,
    ] {
        assert!(text.contains(expected), "{expected} missing from:\n{text}");
    }

    // With the daemon gone, status still shows the pins (the programs stay attached) and
    // exits 1 naming the endpoint.
    let Setup { daemon, .. } = setup;
    daemon.stop();
    let output = gatewayctl_status(node);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("daemon unreachable"), "{stderr}");
    assert!(stderr.contains(ENDPOINT), "{stderr}");
    let status: Value = serde_json::from_slice(&output.stdout).expect("status prints JSON");
    assert!(status["daemon"].is_null(), "{status}");
    for program in status["pinned"]["programs"]
        .as_array()
        .expect("pinned programs")
    {
        assert_eq!(program["attached"], true, "{program}");
    }
}

/// Detaches the pinned link of `program` the way `bpftool link detach` does.
fn detach_link(node: &TestNode, program: &str) {
    let pin = node.pin_dir().join("links").join(program);
    let link = sys::bpf_obj_get(&pin).expect("open the pinned link");
    sys::bpf_link_detach(link.as_fd()).expect("detach the link");
}

fn wait_ready(node: &TestNode) {
    wait_until("/readyz to return 200", Duration::from_secs(15), || {
        request(node, "GET", "/readyz").status == 200
    });
}

#[test]
fn readyz_fails_detached_then_heals() {
    let setup = start("readyz_fails_detached_then_heals");
    let node = &setup.node;
    assert_eq!(request(node, "GET", "/readyz").status, 200);

    // A link detached from outside the daemon: readiness names the check and the program.
    detach_link(node, "connect4");
    let response = request(node, "GET", "/readyz");
    assert_eq!(response.status, 503, "{}", response.body);
    assert!(response.body.contains("ebpf_attached"), "{}", response.body);
    assert!(response.body.contains("connect4"), "{}", response.body);
    assert!(response.body.contains("detached"), "{}", response.body);

    // The daemon attaches it again on its heartbeat loop, logs it, and redirects again.
    wait_ready(node);
    let log = setup.daemon.log();
    assert!(
        log.contains("attached it again") && log.contains("connect4"),
        "{log}"
    );
    let before = scrape(node);
    run_client(&setup);
    let after = scrape(node);
    let redirected = "gateway_connections_redirected_total";
    assert_eq!(
        sample(&after, redirected) - sample(&before, redirected),
        1.0
    );
    assert_eq!(
        sample(
            &after,
            "gateway_ebpf_reattachments_total{program=\"connect4\"}"
        ),
        1.0
    );

    // A link pin removed from outside: the kernel drops the link, and the daemon pins a new one.
    let pin = node.pin_dir().join("links").join("sock_ops");
    std::fs::remove_file(&pin).expect("remove the sock_ops pin");
    let response = request(node, "GET", "/readyz");
    assert_eq!(response.status, 503, "{}", response.body);
    assert!(response.body.contains("ebpf_attached"), "{}", response.body);
    assert!(response.body.contains("sock_ops"), "{}", response.body);
    wait_ready(node);
    assert!(pin.exists(), "the daemon pins the new sock_ops link");
    run_client(&setup);
}

/// Sums every sample whose series starts with `prefix`, so a test can ignore the labels it
/// does not fix.
fn sum_series(samples: &HashMap<String, f64>, prefix: &str) -> f64 {
    samples
        .iter()
        .filter(|(series, _)| series.starts_with(prefix))
        .map(|(_, value)| value)
        .sum()
}

/// Runs one SQL text with psql in the pod, through the gateway.
fn psql_in_pod(node: &TestNode, pod: &Pod, postgres: &Postgres, sql: &str) -> Output {
    node.in_pod(pod, postgres.bin_dir.join("psql"))
        .arg(format!(
            "host={} port={} user=postgres dbname=postgres connect_timeout=10",
            postgres.addr.ip(),
            postgres.addr.port()
        ))
        .args(["-X", "-A", "-t", "-c", sql])
        .env("PGPASSWORD", POSTGRES_PASSWORD)
        .stdin(Stdio::null())
        .output()
        .expect("run psql")
}

#[test]
fn metrics_count_decisions_and_masking() {
    let mut node = TestNode::new("metrics_count_decisions_and_masking");
    let pod = node.add_pod("app");
    let server = node.add_server("db", &[]);
    let postgres = node.start_postgres(&server);
    let targets = format!(
        "  - name: payments-db\n    address: {}\n    port: 5432\n    class: postgres\n",
        server.addr_v4
    );
    let config = node.daemon_config("gatewayd.yaml", "", &targets);
    let mut text = std::fs::read_to_string(&config).expect("read config");
    text.push_str("sql_rules:\n  - name: no-drop\n    statement_kinds: [drop]\n");
    std::fs::write(&config, text).expect("write config");
    let daemon = node.start_daemon(Path::new(GATEWAYD), &config, None);
    postgres.admin_sql(
        "CREATE TABLE cards (id int, pan text); \
         INSERT INTO cards VALUES (1, '4111 1111 1111 1111'), (2, '5555-5555-5555-4444')",
    );
    let before = scrape(&node);

    // Two PANs masked in the result rows, one allowed statement.
    let select = psql_in_pod(&node, &pod, &postgres, "SELECT pan FROM cards ORDER BY id");
    assert!(
        select.status.success(),
        "{}",
        String::from_utf8_lossy(&select.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&select.stdout),
        "4111 11** **** 1111\n5555-55**-****-4444\n"
    );
    // One denied statement.
    let drop = psql_in_pod(&node, &pod, &postgres, "DROP TABLE cards");
    assert!(!drop.status.success(), "the DROP must be denied");
    // A PAN the client sends reaches the server, and is masked in the recording.
    let insert = psql_in_pod(
        &node,
        &pod,
        &postgres,
        "INSERT INTO cards VALUES (3, '4012888888881881')",
    );
    assert!(
        insert.status.success(),
        "{}",
        String::from_utf8_lossy(&insert.stderr)
    );
    node.wait_for_sessions(3);

    let after = scrape(&node);
    let delta = |prefix: &str| sum_series(&after, prefix) - sum_series(&before, prefix);
    assert_eq!(
        delta("gateway_requests_total{class=\"postgres\",decision=\"allow\""),
        2.0
    );
    assert_eq!(
        delta("gateway_requests_total{class=\"postgres\",decision=\"deny\""),
        1.0
    );
    // Two PANs in the rows and one in the recorded INSERT text.
    assert_eq!(delta("gateway_masked_values_total"), 3.0);
    assert_eq!(delta("gateway_connections_accepted_total"), 3.0);
    daemon.stop();
}

#[test]
fn readyz_names_failing_recorder() {
    let mut node = TestNode::new("readyz_names_failing_recorder");
    let _pod = node.add_pod("client");
    let config = node.daemon_config("gatewayd.yaml", "", "  []\n");
    // Free space below recording.min_free_mib makes the store count as failing. No disk has
    // 100 TiB free, so the check trips on its first run.
    let text = std::fs::read_to_string(&config).expect("read config");
    let text = text.replacen("recording:\n", "recording:\n  min_free_mib: 104857600\n", 1);
    std::fs::write(&config, text).expect("write config");
    let daemon = node.start_daemon(Path::new(GATEWAYD), &config, None);

    let mut response = request(&node, "GET", "/readyz");
    wait_until("/readyz to fail", Duration::from_secs(10), || {
        response = request(&node, "GET", "/readyz");
        response.status == 503
    });
    assert!(response.body.contains("recorder"), "{}", response.body);
    assert!(
        response.body.contains("low disk space"),
        "{}",
        response.body
    );
    assert!(
        !response.body.contains("ebpf_attached"),
        "{}",
        response.body
    );
    assert!(!response.body.contains("heartbeat"), "{}", response.body);

    // Liveness is not readiness: the daemon still serves /healthz.
    assert_eq!(request(&node, "GET", "/healthz").status, 200);
    daemon.stop();
}

#[test]
fn readyz_fails_stale_heartbeat() {
    let mut node = TestNode::new("readyz_fails_stale_heartbeat");
    let _pod = node.add_pod("client");
    // A long interval leaves seconds between the daemon's heartbeats for the check to see the
    // stale one the test writes.
    let config = node.daemon_config(
        "gatewayd.yaml",
        "  heartbeat_interval: 5s\n  heartbeat_timeout: 10s\n",
        "  []\n",
    );
    let daemon = node.start_daemon(Path::new(GATEWAYD), &config, None);
    assert_eq!(request(&node, "GET", "/readyz").status, 200);

    // Write a heartbeat 20 s old into the pinned CONFIG map, as a daemon that stopped
    // refreshing it would leave it.
    let pin = node.pin_dir().join("maps").join(gateway_common::MAP_CONFIG);
    let data = aya::maps::MapData::from_pin(&pin).expect("open the pinned CONFIG map");
    let mut map: aya::maps::Array<aya::maps::MapData, gateway_common::RedirectConfig> =
        aya::maps::Array::try_from(aya::maps::Map::Array(data)).expect("CONFIG is an array");
    let mut value = map.get(&0, 0).expect("read CONFIG");
    value.heartbeat_ns = sys::monotonic_ns().saturating_sub(20_000_000_000).max(1);
    map.set(0, value, 0).expect("write CONFIG");

    let response = request(&node, "GET", "/readyz");
    assert_eq!(response.status, 503, "{}", response.body);
    assert!(
        response.body.contains("heartbeat: heartbeat is"),
        "{}",
        response.body
    );
    assert!(
        response
            .body
            .contains("redirect.heartbeat_timeout is 10000 ms"),
        "{}",
        response.body
    );
    assert!(
        !response.body.contains("ebpf_attached"),
        "{}",
        response.body
    );

    // The daemon's next heartbeat makes it ready again.
    wait_ready(&node);
    daemon.stop();
}
