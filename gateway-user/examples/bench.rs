//! The benchmarks behind `cargo xtask bench`, on a test node with release binaries:
//!
//! 1. connect hook cost on connects that are not redirected: a connect-and-close loop from a
//!    pod to a non-target port, with the programs attached and detached, as a ratio;
//! 2. relay throughput: 100 MiB echoed through the proxy and directly, as a ratio;
//! 3. proxy memory per idle connection: the daemon's resident set before and after holding
//!    many idle proxied connections;
//! 4. PostgreSQL through the handler (masking on) and directly, from the same pod's network
//!    namespace in a cgroup without the hooks: `pgbench -S` and the TPC-B-like
//!    default, with 1 and 8 clients, as TPS ratios, the latency one simple query gains, and the
//!    gateway's CPU time per transaction, which other load on the machine moves less than it
//!    moves the ratios;
//! 5. the Kubernetes API handler (TLS both legs, masking on): GETs of a 50 KiB ConfigMap list
//!    from the test API server on one kept-alive connection, through the gateway and directly,
//!    as the p50 and p99 latency the gateway adds.
//! 6. MySQL (MariaDB) through the handler and directly, as for PostgreSQL: a point-select loop over 8
//!    connections from `gateway-testpeer mysql-raw`, as a ratio of queries per second.
//!
//! The connect and throughput figures are medians of several rounds, and the others come from
//! one round each. Results depend on the machine; the README lists the ones measured and where.

use std::{
    io::{BufRead as _, BufReader},
    net::SocketAddr,
    path::Path,
    process::{Child, Command, Stdio},
    time::Duration,
};

use gateway_user::testing::{self, ChildGuard, Pod, TestNode};
use serde_json::Value;

const TARGET_PORT: u16 = 7000;
const OTHER_PORT: u16 = 7001;
/// First of the discard ports, one per connect round (see `connect_hook`).
const DISCARD_PORT: u16 = 7100;
const SINK_TARGET_PORT: u16 = 7003;
const SINK_OTHER_PORT: u16 = 7004;
const CONNECTS_PER_ROUND: u64 = 3000;
const ROUNDS: usize = 5;
const THROUGHPUT_BYTES: u64 = 100 * 1024 * 1024;
const THROUGHPUT_ROUNDS: usize = 3;
const IDLE_CONNECTIONS: usize = 1000;
/// Sections `bench -- SECTION...` can pick, in the order they run.
const SECTIONS: [&str; 6] = [
    "connect",
    "throughput",
    "memory",
    "pgbench",
    "mysql",
    "kube",
];

fn main() -> anyhow::Result<()> {
    let binaries = testing::binary_dir()?;
    let gatewayd = binaries.join("gatewayd");
    let testpeer = binaries.join("gateway-testpeer");

    // `bench -- SECTION...` runs only the named sections; no argument runs them all.
    let chosen: Vec<String> = std::env::args().skip(1).collect();
    if let Some(unknown) = chosen
        .iter()
        .find(|name| !SECTIONS.contains(&name.as_str()))
    {
        anyhow::bail!(
            "unknown benchmark section {unknown:?}; the sections are: {}",
            SECTIONS.join(", ")
        );
    }
    let wants = |section: &str| chosen.is_empty() || chosen.iter().any(|name| name == section);

    let mut node = TestNode::new("gateway-bench");
    // The daemon logs as it does when installed, not with the tests' debug lines.
    node.set_daemon_log("info");
    let pod = node.add_pod("bench-client");
    let server = node.add_server("bench-server", &[]);
    // Thousands of short connects leave TIME_WAIT sockets, and in a nearly full port range each
    // connect searches for a free port, which swamps the hook's cost. So the pod's namespace
    // reuses TIME_WAIT ports and gets a wider range.
    sysctl_in(&pod.netns, "net.ipv4.tcp_tw_reuse=1")?;
    sysctl_in(&pod.netns, "net.ipv4.ip_local_port_range=1024 65000")?;

    let target = SocketAddr::new(server.addr_v4.into(), TARGET_PORT);
    let other = SocketAddr::new(server.addr_v4.into(), OTHER_PORT);
    let discard: Vec<SocketAddr> = (0..2 * ROUNDS as u16)
        .map(|round| SocketAddr::new(server.addr_v4.into(), DISCARD_PORT + round))
        .collect();
    let mut discard_args = vec!["--discard".to_string()];
    for addr in &discard {
        discard_args.extend(["--listen".to_string(), addr.to_string()]);
    }
    let discard_args: Vec<&str> = discard_args.iter().map(String::as_str).collect();
    let _echo = ChildGuard(start_server(
        &node,
        &testpeer,
        &server,
        &[
            "--listen",
            &target.to_string(),
            "--listen",
            &other.to_string(),
        ],
    )?);
    let sink_target = SocketAddr::new(server.addr_v4.into(), SINK_TARGET_PORT);
    let sink_other = SocketAddr::new(server.addr_v4.into(), SINK_OTHER_PORT);
    let _sink = ChildGuard(start_server(
        &node,
        &testpeer,
        &server,
        &[
            "--sink",
            "--listen",
            &sink_target.to_string(),
            "--listen",
            &sink_other.to_string(),
        ],
    )?);
    let _discard = ChildGuard(start_server(&node, &testpeer, &server, &discard_args)?);

    let database = node.add_server("bench-db", &[]);
    let postgres = node.start_postgres(&database);
    let mysql_server = node.add_server("bench-mysql", &[]);
    let mariadb = node.start_mariadb(&mysql_server);
    let targets = format!(
        "  - name: bench-mysql\n    address: {mysql}\n    port: {mysql_port}\n    class: mysql\n  - name: bench\n    address: {ip}\n    port: {TARGET_PORT}\n    class: tcp\n  - name: bench-sink\n    address: {ip}\n    port: {SINK_TARGET_PORT}\n    class: tcp\n  - name: bench-mysql-relay\n    address: '{mysql6}'\n    port: {mysql_port}\n    class: tcp\n  - name: bench-db\n    address: {db}\n    port: 5432\n    class: postgres\n  - name: bench-db-relay\n    address: '{db6}'\n    port: 5432\n    class: tcp\n",
        ip = target.ip(),
        db = postgres.addr.ip(),
        db6 = database.addr_v6,
        mysql = mariadb.addr.ip(),
        mysql6 = mysql_server.addr_v6,
        mysql_port = mariadb.addr.port(),
    );
    let config = node.daemon_config("gatewayd.yaml", "", &targets);

    // 1. Connect hook cost.
    if wants("connect") {
        connect_hook(&node, &gatewayd, &testpeer, &pod, &discard, &config)?;
    }

    // 2. Relay throughput, and 3. memory per idle connection, with the daemon running.
    let daemon = node.start_daemon(&gatewayd, &config, None);
    if wants("throughput") {
        relay_throughput(
            &node,
            &testpeer,
            &pod,
            sink_other,
            sink_target,
            other,
            target,
        )?;
    }
    if wants("memory") {
        idle_memory(&node, &testpeer, &pod, &daemon, target)?;
    }
    if wants("pgbench") {
        pgbench_comparison(
            &node,
            &pod,
            &postgres,
            database.addr_v6.into(),
            daemon.pid(),
        )?;
    }
    if wants("mysql") {
        let relay_addr = SocketAddr::new(mysql_server.addr_v6.into(), mariadb.addr.port());
        mysql_point_selects(&node, &testpeer, &pod, &mariadb, relay_addr, daemon.pid())?;
    }
    daemon.stop();
    uninstall(&gatewayd, &config)?;

    if wants("kube") {
        kube_comparison(&mut node, &binaries, &pod)?;
    }
    Ok(())
}

/// Times connects that are not redirected with the programs attached and detached.
fn connect_hook(
    node: &TestNode,
    gatewayd: &Path,
    testpeer: &Path,
    pod: &Pod,
    discard: &[SocketAddr],
    config: &Path,
) -> anyhow::Result<()> {
    let mut detached = Vec::new();
    let mut attached = Vec::new();
    // Each run connects to a port of its own. A closed connection leaves its port in
    // TIME_WAIT for a minute, and a connect to the same address and port must search past
    // those, which in earlier runs made some rounds ten to fifty times slower than others.
    let mut ports = discard.iter().copied();
    let mut next = || ports.next().expect("two discard ports per round");
    for round in 0..ROUNDS {
        // Alternate which state goes first, so warm-up falls on both.
        if round % 2 == 0 {
            detached.push(connect_loop(node, testpeer, pod, next())?);
        }
        let daemon = node.start_daemon(gatewayd, config, None);
        attached.push(connect_loop(node, testpeer, pod, next())?);
        daemon.stop();
        uninstall(gatewayd, config)?;
        if round % 2 == 1 {
            detached.push(connect_loop(node, testpeer, pod, next())?);
        }
    }
    let rounds = |values: &[f64]| {
        let micros: Vec<String> = values
            .iter()
            .map(|ns| format!("{:.1}", ns / 1000.0))
            .collect();
        micros.join(", ")
    };
    eprintln!("connect rounds, detached: {} us", rounds(&detached));
    eprintln!("connect rounds, attached: {} us", rounds(&attached));
    let detached_ns = median(&mut detached);
    let attached_ns = median(&mut attached);
    println!("connect+close, not redirected ({CONNECTS_PER_ROUND} per round, median of {ROUNDS}):");
    println!(
        "  programs detached: {:.1} us per connect",
        detached_ns / 1000.0
    );
    println!(
        "  programs attached: {:.1} us per connect",
        attached_ns / 1000.0
    );
    println!(
        "  ratio attached/detached: {:.3}",
        attached_ns / detached_ns
    );

    Ok(())
}

/// Times 100 MiB sent one way and echoed both ways, through the relay and directly.
fn relay_throughput(
    node: &TestNode,
    testpeer: &Path,
    pod: &Pod,
    sink_other: SocketAddr,
    sink_target: SocketAddr,
    other: SocketAddr,
    target: SocketAddr,
) -> anyhow::Result<()> {
    let mib = THROUGHPUT_BYTES as f64 / (1024.0 * 1024.0);
    let mut direct = Vec::new();
    let mut proxied = Vec::new();
    for _ in 0..THROUGHPUT_ROUNDS {
        direct.push(upload_ms(node, testpeer, pod, sink_other)?);
        proxied.push(upload_ms(node, testpeer, pod, sink_target)?);
    }
    let direct_ms = median(&mut direct);
    let proxied_ms = median(&mut proxied);
    println!("\n100 MiB sent one way (median of {THROUGHPUT_ROUNDS}):");
    println!(
        "  direct:  {direct_ms:.0} ms ({:.0} MiB/s)",
        mib / (direct_ms / 1000.0)
    );
    println!(
        "  proxied: {proxied_ms:.0} ms ({:.0} MiB/s)",
        mib / (proxied_ms / 1000.0)
    );
    println!(
        "  throughput ratio proxied/direct: {:.3}",
        direct_ms / proxied_ms
    );

    let mut direct = Vec::new();
    let mut proxied = Vec::new();
    for _ in 0..THROUGHPUT_ROUNDS {
        direct.push(echo_ms(node, testpeer, pod, other)?);
        proxied.push(echo_ms(node, testpeer, pod, target)?);
    }
    let direct_ms = median(&mut direct);
    let proxied_ms = median(&mut proxied);
    println!("\n100 MiB echoed both ways, every byte checked (median of {THROUGHPUT_ROUNDS}):");
    println!(
        "  direct:  {direct_ms:.0} ms ({:.0} MiB/s each way)",
        mib / (direct_ms / 1000.0)
    );
    println!(
        "  proxied: {proxied_ms:.0} ms ({:.0} MiB/s each way)",
        mib / (proxied_ms / 1000.0)
    );
    println!(
        "  throughput ratio proxied/direct: {:.3}",
        direct_ms / proxied_ms
    );

    Ok(())
}

/// Measures the daemon's resident set before and after many idle proxied connections.
fn idle_memory(
    node: &TestNode,
    testpeer: &Path,
    pod: &Pod,
    daemon: &testing::Daemon,
    target: SocketAddr,
) -> anyhow::Result<()> {
    let before = rss_kib(daemon.pid())?;
    let sessions_before = node.session_files().len();
    let mut holder = node
        .in_pod(pod, testpeer)
        .args([
            "hold",
            "--connect",
            &target.to_string(),
            "--count",
            &IDLE_CONNECTIONS.to_string(),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    let mut line = String::new();
    BufReader::new(holder.stdout.take().expect("piped stdout")).read_line(&mut line)?;
    anyhow::ensure!(
        line.trim() == "ready",
        "holder failed to open its connections"
    );
    gateway_user::testing::wait_until("idle sessions to start", Duration::from_secs(60), || {
        node.session_files().len() >= sessions_before + IDLE_CONNECTIONS
    });
    std::thread::sleep(Duration::from_millis(500));
    let after = rss_kib(daemon.pid())?;
    drop(holder.stdin.take());
    holder.wait()?;
    let per_connection = (after.saturating_sub(before)) as f64 / IDLE_CONNECTIONS as f64;
    println!("\nproxy memory with {IDLE_CONNECTIONS} idle connections:");
    println!("  resident set before: {before} KiB, after: {after} KiB");
    println!("  per idle connection: {per_connection:.1} KiB");
    Ok(())
}

/// ClusterIP the test API server answers on in the Kubernetes benchmark.
const KUBE_SERVICE_IP: std::net::Ipv4Addr = std::net::Ipv4Addr::new(10, 96, 0, 1);
/// ConfigMaps in the listed namespace, about 1 KiB each, so the list is about 50 KiB.
const KUBE_CONFIGMAPS: usize = 50;
/// GETs per path and round, all on one connection.
const KUBE_REQUESTS: usize = 1000;

/// Times GETs of a 50 KiB list through the Kubernetes handler and directly, and prints the
/// added p50 and p99 latency.
fn kube_comparison(node: &mut TestNode, binaries: &Path, pod: &Pod) -> anyhow::Result<()> {
    use gateway_user::testing_apiserver::fixture::{Options, TestApiServer};

    let server = node.add_server("bench-api", &[KUBE_SERVICE_IP.into()]);
    let mut seed = vec![TestApiServer::seed_pod("default", "default", pod)];
    for index in 0..KUBE_CONFIGMAPS {
        seed.push(serde_json::json!({
            "kind": "ConfigMap", "apiVersion": "v1",
            "metadata": {"name": format!("bench-{index}"), "namespace": "default"},
            "data": {"payload": "x".repeat(900)},
        }));
    }
    let api = TestApiServer::start(
        node,
        &server,
        &binaries.join("gateway-test-apiserver"),
        Options {
            address: Some(KUBE_SERVICE_IP.into()),
            seed,
            ..Options::default()
        },
    );

    let serving_cert = node.dir.join("bench-serving.crt");
    let serving_key = node.dir.join("bench-serving.key");
    let issued = Command::new(binaries.join("gatewayctl"))
        .args(["cert", "issue", "--ca-cert"])
        .arg(&api.ca_cert)
        .arg("--ca-key")
        .arg(&api.ca.key_path)
        .args(["--san", &KUBE_SERVICE_IP.to_string(), "--out-cert"])
        .arg(&serving_cert)
        .arg("--out-key")
        .arg(&serving_key)
        .output()?;
    anyhow::ensure!(
        issued.status.success(),
        "gatewayctl cert issue failed: {}",
        String::from_utf8_lossy(&issued.stderr)
    );
    let targets = format!(
        "  - name: kubernetes\n    address: {KUBE_SERVICE_IP}\n    port: 443\n    class: kube_api\n\
         \x20   tls:\n      cert: {}\n      key: {}\n\
         \x20   upstream_tls:\n      mode: verify-full\n      ca: {}\n",
        serving_cert.display(),
        serving_key.display(),
        api.ca_cert.display()
    );
    let config = node.daemon_config("gatewayd-kube.yaml", "", &targets);
    let gatewayd = binaries.join("gatewayd");
    let daemon = node.start_daemon(&gatewayd, &config, None);

    let token = api.token_for("default", "default", pod);
    let url = format!("https://{KUBE_SERVICE_IP}/api/v1/namespaces/default/configmaps");
    let curl_config = node.dir.join("bench-curl.conf");
    let mut text = format!(
        "silent\nshow-error\ncacert = \"{}\"\nheader = \"Authorization: Bearer {token}\"\n\
         header = \"Accept: application/json\"\n\
         write-out = \"%{{size_download}} %{{time_starttransfer}} %{{time_total}}\\n\"\n",
        api.ca_cert.display()
    );
    // `output` applies to one URL, so each URL gets its own.
    for _ in 0..KUBE_REQUESTS {
        text.push_str(&format!("url = \"{url}\"\noutput = /dev/null\n"));
    }
    std::fs::write(&curl_config, text)?;

    // curl runs every URL of its config on one kept-alive connection. The first transfer
    // carries the TLS handshake, so it is left out.
    let timings = |through_gateway: bool| -> anyhow::Result<(Vec<f64>, f64)> {
        let mut command = if through_gateway {
            node.in_pod(pod, "curl")
        } else {
            node.in_node(None, "curl")
        };
        let output = command
            .arg("--http1.1")
            .arg("-K")
            .arg(&curl_config)
            .stdin(Stdio::null())
            .output()?;
        anyhow::ensure!(
            output.status.success(),
            "curl failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let mut times = Vec::new();
        let mut size = 0.0;
        for line in String::from_utf8_lossy(&output.stdout).lines().skip(1) {
            let fields: Vec<f64> = line
                .split_whitespace()
                .filter_map(|field| field.parse().ok())
                .collect();
            anyhow::ensure!(
                fields.len() == 3,
                "unexpected curl output line {:?}",
                line.chars().take(80).collect::<String>()
            );
            size = fields[0];
            anyhow::ensure!(size > 40_000.0, "the list is only {size} bytes");
            times.push(fields[2] * 1000.0);
        }
        Ok((times, size))
    };
    let (mut direct, size) = timings(false)?;
    let before = sched_stats(daemon.pid())?;
    let (mut proxied, _) = timings(true)?;
    let used = sched_stats(daemon.pid())? - before;
    let slow: Vec<String> = proxied
        .iter()
        .enumerate()
        .filter(|(_, ms)| **ms > 2.0)
        .map(|(index, ms)| format!("#{index} {ms:.1}"))
        .collect();
    eprintln!("gateway requests over 2 ms: {}", slow.join(", "));
    let (direct_p50, direct_p99) = (percentile(&mut direct, 0.5), percentile(&mut direct, 0.99));
    let (proxied_p50, proxied_p99) = (
        percentile(&mut proxied, 0.5),
        percentile(&mut proxied, 0.99),
    );
    println!(
        "\nKubernetes API, GET of a {size}-byte ConfigMap list, {} requests on one HTTP/1.1 connection, masking on:",
        KUBE_REQUESTS - 1
    );
    println!("  direct:  p50 {direct_p50:.3} ms, p99 {direct_p99:.3} ms");
    println!(
        "  gateway: p50 {proxied_p50:.3} ms, p99 {proxied_p99:.3} ms, {:.0} us CPU and {:.1} thread runs per request",
        used.cpu_ns as f64 / 1000.0 / KUBE_REQUESTS as f64,
        used.runs as f64 / KUBE_REQUESTS as f64
    );
    println!(
        "  added:   p50 {:.3} ms, p99 {:.3} ms",
        proxied_p50 - direct_p50,
        proxied_p99 - direct_p99
    );

    daemon.stop();
    uninstall(&gatewayd, &config)?;
    Ok(())
}

/// Returns the value below which `fraction` of `values` lie (nearest rank).
fn percentile(values: &mut [f64], fraction: f64) -> f64 {
    values.sort_by(f64::total_cmp);
    let rank = ((values.len() as f64 * fraction).ceil() as usize).clamp(1, values.len());
    values[rank - 1]
}

/// Seconds each pgbench run lasts.
const PGBENCH_SECONDS: u32 = 10;

/// Route of a pgbench run to the server.
#[derive(Clone, Copy)]
enum PgbenchPath {
    /// From the pod's network namespace, in a cgroup the hooks are not attached to: the path
    /// the workload takes without the gateway.
    Direct,
    /// From the node namespace, one link shorter than any pod's path.
    NodeDirect,
    /// From the pod, through the PostgreSQL handler.
    Handler,
    /// From the pod, through the byte relay (the server's IPv6 address is a `tcp` target).
    Relay,
    /// From the pod, through pgbouncer on the node (a port that is not redirected).
    Pgbouncer,
}

/// Listening address of pgbouncer in the node namespace: the node's end of the pod's link.
const PGBOUNCER_ADDR: ([u8; 4], u16) = ([10, 244, 0, 1], 6432);
const PGBOUNCER: &str = "/usr/sbin/pgbouncer";

/// pgbouncer in session mode between the pod and the server, as a reference for what a
/// mature PostgreSQL proxy keeps on the same machine and path. Runs as `postgres`, since it
/// refuses to run as root.
struct Pgbouncer {
    child: ChildGuard,
    pid_file: std::path::PathBuf,
}

impl Pgbouncer {
    fn start(node: &TestNode, postgres: &testing::Postgres) -> anyhow::Result<Self> {
        let dir = node.dir.join("pgbouncer");
        std::fs::create_dir_all(&dir)?;
        let (ip, port) = PGBOUNCER_ADDR;
        let config = dir.join("pgbouncer.ini");
        let pid_file = dir.join("pgbouncer.pid");

        std::fs::write(
            &config,
            format!(
                "[databases]\npostgres = host={host} port={server_port} dbname=postgres user=postgres password={password}\n\
                 [pgbouncer]\nlisten_addr = {addr}\nlisten_port = {port}\nunix_socket_dir =\n\
                 auth_type = any\npool_mode = session\nmax_client_conn = 64\ndefault_pool_size = 16\n\
                 logfile = {log}\npidfile = {pid}\n",
                host = postgres.addr.ip(),
                server_port = postgres.addr.port(),
                password = testing::POSTGRES_PASSWORD,
                addr = std::net::Ipv4Addr::from(ip),
                log = dir.join("pgbouncer.log").display(),
                pid = pid_file.display(),
            ),
        )?;
        let chown = Command::new("chown")
            .args(["-R", "postgres"])
            .arg(&dir)
            .status()?;
        anyhow::ensure!(chown.success(), "chown of {} failed", dir.display());

        let child = node
            .in_node(None, "runuser")
            .args(["-u", "postgres", "--", PGBOUNCER])
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let child = ChildGuard(child);
        testing::wait_until(
            "pgbouncer writes its pid file",
            Duration::from_secs(10),
            || pid_file.exists(),
        );
        Ok(Self { child, pid_file })
    }

    fn pid(&self) -> anyhow::Result<u32> {
        Ok(std::fs::read_to_string(&self.pid_file)?.trim().parse()?)
    }
}

impl Drop for Pgbouncer {
    fn drop(&mut self) {
        // runuser does not pass SIGKILL on, so pgbouncer itself is stopped first.
        if let Ok(pid) = self.pid() {
            let _ = Command::new("kill").arg(pid.to_string()).status();
        }
        let _ = self.child.0.wait();
    }
}

/// Runs pgbench directly, through the handler and through the plain relay, and prints the
/// ratios. The relay row separates the cost of the extra hop from the handler's own.
fn pgbench_comparison(
    node: &TestNode,
    pod: &Pod,
    postgres: &testing::Postgres,
    relay_addr: std::net::IpAddr,
    gatewayd: u32,
) -> anyhow::Result<()> {
    let program = postgres.bin_dir.join("pgbench");
    let pgbouncer = if Path::new(PGBOUNCER).exists() {
        Some(Pgbouncer::start(node, postgres)?)
    } else {
        eprintln!("{PGBOUNCER} is missing (`cargo xtask setup` installs it); no reference row");
        None
    };
    // Returns TPS, average latency in ms, and the gateway's CPU time in us and thread runs,
    // per transaction.
    let run = |path: PgbenchPath, args: &[&str]| -> anyhow::Result<(f64, f64, f64, f64)> {
        let (mut command, host) = match path {
            PgbenchPath::Direct => (unredirected(node, pod, &program), postgres.addr.ip()),
            PgbenchPath::NodeDirect => (node.in_node(None, &program), postgres.addr.ip()),
            PgbenchPath::Handler => (node.in_pod(pod, &program), postgres.addr.ip()),
            PgbenchPath::Relay => (node.in_pod(pod, &program), relay_addr),
            PgbenchPath::Pgbouncer => (
                node.in_pod(pod, &program),
                std::net::Ipv4Addr::from(PGBOUNCER_ADDR.0).into(),
            ),
        };
        let measured = match (path, &pgbouncer) {
            (PgbenchPath::Pgbouncer, Some(pgbouncer)) => pgbouncer.pid()?,
            _ => gatewayd,
        };
        if let PgbenchPath::Pgbouncer = path {
            command.args(["-p", &PGBOUNCER_ADDR.1.to_string()]);
        }
        let before = sched_stats(measured)?;
        let output = command
            .args(["-h", &host.to_string(), "-U", "postgres"])
            .args(args)
            .arg("postgres")
            .env("PGPASSWORD", testing::POSTGRES_PASSWORD)
            .stdin(Stdio::null())
            .output()?;
        anyhow::ensure!(
            output.status.success(),
            "pgbench failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let used = sched_stats(measured)? - before;
        let text = String::from_utf8_lossy(&output.stdout).into_owned();
        let number_after = |prefix: &str| -> f64 {
            text.lines()
                .find_map(|line| line.trim().strip_prefix(prefix))
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|value| value.parse().ok())
                .unwrap_or(0.0)
        };
        let transactions = number_after("number of transactions actually processed: ").max(1.0);
        let gateway_cpu_us = used.cpu_ns as f64 / 1000.0 / transactions;
        // A redirected direct run would cost the gateway tens of us per transaction.
        if matches!(path, PgbenchPath::Direct) && transactions > 1000.0 {
            anyhow::ensure!(
                gateway_cpu_us < 2.0,
                "the direct run went through the gateway ({gateway_cpu_us:.1} us of its CPU per transaction)"
            );
        }
        Ok((
            number_after("tps = "),
            number_after("latency average = "),
            gateway_cpu_us,
            used.runs as f64 / transactions,
        ))
    };

    run(PgbenchPath::Direct, &["-i", "-s", "4", "-q"])?;
    println!("\npgbench, {PGBENCH_SECONDS} s per run, masking on:");
    let seconds = PGBENCH_SECONDS.to_string();
    for (name, mode) in [("select-only (-S)", Some("-S")), ("TPC-B-like", None)] {
        for clients in ["1", "8"] {
            let mut args = vec!["-c", clients, "-j", clients, "-T", seconds.as_str()];
            args.extend(mode);
            let (direct_tps, direct_latency, _, _) = run(PgbenchPath::Direct, &args)?;
            let (node_tps, _, _, _) = run(PgbenchPath::NodeDirect, &args)?;
            let (proxied_tps, proxied_latency, proxied_cpu, proxied_runs) =
                run(PgbenchPath::Handler, &args)?;
            let (relay_tps, relay_latency, relay_cpu, relay_runs) = run(PgbenchPath::Relay, &args)?;
            println!(
                "  {name:<17} {clients} client(s): direct {direct_tps:.0} tps, handler {proxied_tps:.0} tps (ratio {:.3}, +{:.0} us, {proxied_cpu:.1} us CPU, {proxied_runs:.2} runs), relay {relay_tps:.0} tps (ratio {:.3}, +{:.0} us, {relay_cpu:.1} us CPU, {relay_runs:.2} runs)",
                proxied_tps / direct_tps,
                (proxied_latency - direct_latency) * 1000.0,
                relay_tps / direct_tps,
                (relay_latency - direct_latency) * 1000.0
            );
            println!(
                "  {:<17} {clients} client(s): from the node namespace {node_tps:.0} tps; handler/node {:.3}, relay/node {:.3}",
                "",
                proxied_tps / node_tps,
                relay_tps / node_tps
            );
            if pgbouncer.is_some() {
                let (tps, latency, cpu, runs) = run(PgbenchPath::Pgbouncer, &args)?;
                println!(
                    "  {:<17} {clients} client(s): pgbouncer {tps:.0} tps (ratio {:.3}, +{:.0} us, {cpu:.1} us CPU, {runs:.2} runs)",
                    "",
                    tps / direct_tps,
                    (latency - direct_latency) * 1000.0
                );
            }
        }
    }
    Ok(())
}

/// Seconds each point-select run lasts.
const POINT_SELECT_SECONDS: u64 = 10;
/// Rows of the point-select table; the loop picks keys from 1 to this.
const POINT_SELECT_ROWS: usize = 1000;

/// Runs the point-select loop directly, through the MySQL handler and through the byte relay
/// (`relay_addr`, the server's IPv6 address as a `tcp` target), and prints the ratios and the
/// gateway's CPU time per query.
fn mysql_point_selects(
    node: &TestNode,
    testpeer: &Path,
    pod: &Pod,
    mariadb: &testing::Mariadb,
    relay_addr: SocketAddr,
    gatewayd: u32,
) -> anyhow::Result<()> {
    let values: Vec<String> = (1..=POINT_SELECT_ROWS)
        .map(|key| format!("({key}, 'value {key}')"))
        .collect();
    mariadb.admin_sql(&format!(
        "CREATE TABLE payments.kv (k INT PRIMARY KEY, v VARCHAR(32)); \
         INSERT INTO payments.kv VALUES {};",
        values.join(", ")
    ));
    let seconds = POINT_SELECT_SECONDS.to_string();
    // Returns queries per second and the gateway's CPU time per query in us.
    let run = |mut command: Command, addr: SocketAddr| -> anyhow::Result<(f64, f64)> {
        let before = sched_stats(gatewayd)?;
        let report = run_json(
            command
                .args(["mysql-raw", "--connect", &addr.to_string()])
                .args(["--scenario", "point-select", "--seconds", &seconds]),
        )?;
        let used = sched_stats(gatewayd)? - before;
        let queries = report["queries"].as_f64().unwrap_or(0.0).max(1.0);
        Ok((
            report["qps"].as_f64().unwrap_or(0.0),
            used.cpu_ns as f64 / 1000.0 / queries,
        ))
    };
    let (direct, direct_cpu) = run(unredirected(node, pod, testpeer), mariadb.addr)?;
    // A redirected direct run would cost the gateway tens of us per query.
    anyhow::ensure!(
        direct_cpu < 2.0,
        "the direct run went through the gateway ({direct_cpu:.1} us of its CPU per query)"
    );
    let (node_direct, _) = run(node.in_node(None, testpeer), mariadb.addr)?;
    let (proxied, proxied_cpu) = run(node.in_pod(pod, testpeer), mariadb.addr)?;
    let (relayed, relayed_cpu) = run(node.in_pod(pod, testpeer), relay_addr)?;
    println!(
        "
MySQL point selects, 8 connections, {POINT_SELECT_SECONDS} s per run, masking on:"
    );
    println!(
        "  direct {direct:.0} q/s, handler {proxied:.0} q/s (ratio {:.3}, {proxied_cpu:.1} us CPU), relay {relayed:.0} q/s (ratio {:.3}, {relayed_cpu:.1} us CPU)",
        proxied / direct,
        relayed / direct
    );
    println!(
        "  from the node namespace {node_direct:.0} q/s; handler/node {:.3}, relay/node {:.3}",
        proxied / node_direct,
        relayed / node_direct
    );
    Ok(())
}

/// Builds a command that runs in `pod`'s network namespace but in the bench's own cgroup, which
/// the hooks are not attached to, so it reaches servers as the pod would without the gateway.
fn unredirected(node: &TestNode, pod: &Pod, program: impl AsRef<std::ffi::OsStr>) -> Command {
    node.command_in(&pod.netns, None, program)
}

fn start_server(
    node: &TestNode,
    testpeer: &Path,
    server: &gateway_user::testing::Server,
    args: &[&str],
) -> anyhow::Result<Child> {
    let mut child = node
        .in_server(server, testpeer)
        .arg("serve")
        .args(args)
        .stdout(Stdio::piped())
        .spawn()?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("piped stdout")).read_line(&mut line)?;
    anyhow::ensure!(line.trim() == "listening", "test server failed to start");
    Ok(child)
}

fn connect_loop(
    node: &TestNode,
    testpeer: &Path,
    pod: &Pod,
    addr: SocketAddr,
) -> anyhow::Result<f64> {
    let report = run_json(node.in_pod(pod, testpeer).args([
        "connect-loop",
        "--connect",
        &addr.to_string(),
        "--count",
        &CONNECTS_PER_ROUND.to_string(),
    ]))?;
    anyhow::ensure!(report["failures"] == 0, "connects failed: {report}");
    Ok(report["elapsed_ns"].as_f64().unwrap_or(0.0) / CONNECTS_PER_ROUND as f64)
}

fn echo_ms(node: &TestNode, testpeer: &Path, pod: &Pod, addr: SocketAddr) -> anyhow::Result<f64> {
    let report = run_json(node.in_pod(pod, testpeer).args([
        "client",
        "--connect",
        &addr.to_string(),
        "--bytes",
        &THROUGHPUT_BYTES.to_string(),
    ]))?;
    anyhow::ensure!(report["intact"] == true, "echo corrupted: {report}");
    Ok(report["elapsed_ms"].as_f64().unwrap_or(0.0))
}

fn upload_ms(node: &TestNode, testpeer: &Path, pod: &Pod, addr: SocketAddr) -> anyhow::Result<f64> {
    let report = run_json(node.in_pod(pod, testpeer).args([
        "upload",
        "--connect",
        &addr.to_string(),
        "--bytes",
        &THROUGHPUT_BYTES.to_string(),
    ]))?;
    anyhow::ensure!(
        report["received"] == THROUGHPUT_BYTES,
        "upload lost bytes: {report}"
    );
    Ok(report["elapsed_ms"].as_f64().unwrap_or(0.0))
}

fn run_json(command: &mut Command) -> anyhow::Result<Value> {
    let output = command.stdin(Stdio::null()).output()?;
    anyhow::ensure!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(serde_json::from_slice(&output.stdout)?)
}

fn uninstall(gatewayd: &Path, config: &Path) -> anyhow::Result<()> {
    let output = Command::new(gatewayd)
        .args(["uninstall", "--config"])
        .arg(config)
        .output()?;
    anyhow::ensure!(
        output.status.success(),
        "uninstall failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}

fn sysctl_in(netns: &str, setting: &str) -> anyhow::Result<()> {
    let status = Command::new("ip")
        .args(["netns", "exec", netns, "sysctl", "-qw", setting])
        .status()?;
    anyhow::ensure!(status.success(), "sysctl {setting} in {netns} failed");
    Ok(())
}

/// CPU use of all threads of a process, from the scheduler's statistics.
#[derive(Clone, Copy, Default)]
struct SchedStats {
    /// Time on a CPU, in nanoseconds.
    cpu_ns: u64,
    /// Times a thread was put on a CPU: wake-ups and preemptions.
    runs: u64,
}

impl std::ops::Sub for SchedStats {
    type Output = Self;

    fn sub(self, earlier: Self) -> Self {
        Self {
            cpu_ns: self.cpu_ns - earlier.cpu_ns,
            runs: self.runs - earlier.runs,
        }
    }
}

/// Reads `/proc/PID/task/*/schedstat`: time on CPU, time waiting, and runs, per thread.
fn sched_stats(pid: u32) -> anyhow::Result<SchedStats> {
    let mut total = SchedStats::default();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let schedstat = std::fs::read_to_string(task?.path().join("schedstat"))?;
        let fields: Vec<u64> = schedstat
            .split_whitespace()
            .map(str::parse)
            .collect::<Result<_, _>>()?;
        total.cpu_ns += fields.first().copied().unwrap_or(0);
        total.runs += fields.get(2).copied().unwrap_or(0);
    }
    Ok(total)
}

fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|line| line.starts_with("VmRSS:"))
        .ok_or_else(|| anyhow::anyhow!("no VmRSS in /proc/{pid}/status"))?;
    Ok(line.split_whitespace().nth(1).unwrap_or("0").parse()?)
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}
