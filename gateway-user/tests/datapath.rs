//! The redirect data path on a one-machine test node: real eBPF programs on the real kernel,
//! a real `gatewayd`, and unmodified clients in pod namespaces dialing servers in server
//! namespaces. Needs root; run with `cargo xtask test`.

use std::{
    net::{IpAddr, SocketAddr},
    path::Path,
    process::{Child, Stdio},
    time::Duration,
};

use gateway_common::Verdict;
use gateway_user::{
    redirect,
    sys::AttachType,
    testing::{ChildGuard, Pod, Server, TestNode},
};
use serde_json::Value;

const GATEWAYD: &str = env!("CARGO_BIN_EXE_gatewayd");
const TESTPEER: &str = env!("CARGO_BIN_EXE_gateway-testpeer");
const ECHO_PORT: u16 = 7000;

/// Starts the echo server in `server`, listening on every address given.
fn start_echo(node: &TestNode, server: &Server, addrs: &[SocketAddr]) -> Child {
    node.start_echo(Path::new(TESTPEER), server, addrs)
}

/// A test node with one pod and one echo server whose first address is a `tcp` target.
struct EchoSetup {
    node: TestNode,
    pod: Pod,
    server: Server,
    target: SocketAddr,
    config: std::path::PathBuf,
    _echo: ChildGuard,
}

/// Builds an `EchoSetup`: the echo server also listens on `extra_listen` ports of its IPv4
/// address, and `redirect_extra` goes into the daemon configuration's `redirect` section.
fn echo_setup(test_name: &str, extra_listen: &[u16], redirect_extra: &str) -> EchoSetup {
    let mut node = TestNode::new(test_name);
    let pod = node.add_pod("client");
    let server = node.add_server("echo", &[]);
    let target = SocketAddr::new(server.addr_v4.into(), ECHO_PORT);
    let mut listen = vec![target];
    listen.extend(
        extra_listen
            .iter()
            .map(|port| SocketAddr::new(server.addr_v4.into(), *port)),
    );
    let echo = ChildGuard(start_echo(&node, &server, &listen));
    let config = node.daemon_config("gatewayd.yaml", redirect_extra, &tcp_target(target, "echo"));
    EchoSetup {
        node,
        pod,
        server,
        target,
        config,
        _echo: echo,
    }
}

/// Runs the test client in `pod` against `addr` and returns its JSON report.
fn run_client(node: &TestNode, pod: &Pod, addr: SocketAddr, bytes: u64) -> Value {
    let output = node
        .in_pod(pod, TESTPEER)
        .args([
            "client",
            "--greet",
            "--connect",
            &addr.to_string(),
            "--bytes",
            &bytes.to_string(),
        ])
        .stdin(Stdio::null())
        .output()
        .expect("run test client");
    assert!(
        output.status.success(),
        "client in pod {} to {addr} failed: {}",
        pod.name,
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("client prints JSON")
}

/// Runs the test client and returns whether the connection succeeded.
fn client_connects(node: &TestNode, pod: &Pod, addr: SocketAddr) -> Option<Value> {
    let output = node
        .in_pod(pod, TESTPEER)
        .args([
            "client",
            "--greet",
            "--connect",
            &addr.to_string(),
            "--bytes",
            "16",
        ])
        .stdin(Stdio::null())
        .output()
        .expect("run test client");
    if output.status.success() {
        Some(serde_json::from_slice(&output.stdout).expect("client prints JSON"))
    } else {
        None
    }
}

fn tcp_target(addr: SocketAddr, name: &str) -> String {
    format!(
        "  - name: {name}\n    address: '{}'\n    port: {}\n    class: tcp\n",
        addr.ip(),
        addr.port()
    )
}

fn greeting_peer(report: &Value) -> IpAddr {
    let greeting = report["greeting"].as_str().expect("greeting line");
    let addr: SocketAddr = greeting
        .strip_prefix("PEER ")
        .expect("greeting starts with PEER")
        .parse()
        .expect("greeting holds an address");
    match addr.ip() {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        ip => ip,
    }
}

fn stats(node: &TestNode) -> redirect::Stats {
    redirect::read_stats(&node.pin_dir()).expect("read verdict counters")
}

#[test]
fn redirects_bytes_intact_both_ways() {
    let EchoSetup {
        node,
        pod,
        server,
        target,
        config,
        _echo,
    } = echo_setup("redirects_bytes_intact_both_ways", &[], "");
    let daemon = node.start_daemon(Path::new(GATEWAYD), &config, None);

    for size in [1u64, 64 * 1024, 100 * 1024 * 1024] {
        let report = run_client(&node, &pod, target, size);
        assert_eq!(report["intact"], true, "size {size}: {report}");
        assert_eq!(report["received"], size, "size {size}: {report}");
        // getpeername returns the server the application dialed, not the proxy.
        assert_eq!(
            report["peer"],
            target.to_string(),
            "size {size}: getpeername"
        );
        // The server's peer is the node, so the connection went through the proxy.
        assert_eq!(
            greeting_peer(&report),
            IpAddr::V4(server.node_side_v4),
            "size {size}"
        );
    }

    let sessions = node.wait_for_sessions(3);
    assert_eq!(sessions.len(), 3);
    for lines in &sessions {
        assert_eq!(lines[0]["event"], "session.start");
        assert_eq!(lines[0]["subject"]["cgroup"], pod.cgroup_path.as_str());
        assert_eq!(lines[0]["subject"]["pod_uid"], pod.uid.as_str());
        assert_eq!(lines[0]["target"]["addr"], target.to_string());
        assert_eq!(lines[1]["outcome"], "closed");
    }
    let last_end = &sessions[2][1];
    // The greeting line plus the echoed bytes.
    assert_eq!(last_end["bytes"]["from_client"], 100 * 1024 * 1024);
    assert!(stats(&node).get(Verdict::Redirected) >= 3);

    // On a hybrid host (cgroup v1 controllers beside cgroup2) the daemon warns at start.
    let mounts = gateway_user::cgroup::find_mounts(Path::new("/proc/self/mountinfo"))
        .expect("cgroup2 mount");
    assert_eq!(
        daemon.log().contains("hybrid cgroup host"),
        !mounts.v1.is_empty(),
        "hybrid warning must match the mounts:\n{}",
        daemon.log()
    );
    daemon.stop();
}

#[test]
fn non_target_and_host_netns_pass() {
    let EchoSetup {
        node,
        pod,
        server,
        target,
        config,
        _echo,
    } = echo_setup("non_target_and_host_netns_pass", &[ECHO_PORT + 1], "");
    let other = SocketAddr::new(server.addr_v4.into(), ECHO_PORT + 1);
    let daemon = node.start_daemon(Path::new(GATEWAYD), &config, None);

    // Another port on the same server is no target, so the server's peer is the pod itself.
    let report = run_client(&node, &pod, other, 1024);
    assert_eq!(report["intact"], true);
    assert_eq!(greeting_peer(&report), IpAddr::V4(pod.addr_v4));
    assert!(stats(&node).get(Verdict::PassNotTarget) >= 1);

    // A process in the pods' cgroup but in the node's (host) network namespace dials the target
    // and is not redirected either.
    let output = node
        .in_node(Some(&pod.cgroup), TESTPEER)
        .args([
            "client",
            "--greet",
            "--connect",
            &target.to_string(),
            "--bytes",
            "1024",
        ])
        .stdin(Stdio::null())
        .output()
        .expect("run client in the node namespace");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: Value = serde_json::from_slice(&output.stdout).expect("client prints JSON");
    assert_eq!(report["intact"], true);
    assert_eq!(stats(&node).get(Verdict::PassHostNetns), 1);
    assert_eq!(stats(&node).get(Verdict::Redirected), 0);
    assert!(
        node.session_files().is_empty(),
        "nothing was proxied, so nothing is recorded"
    );
    daemon.stop();
}

#[test]
fn proxy_upstream_not_redirected_again() {
    let EchoSetup {
        node,
        pod,
        server,
        target,
        config,
        _echo,
    } = echo_setup("proxy_upstream_not_redirected_again", &[], "");
    // The daemon runs inside the pods' cgroup, so its upstream connect to the target address
    // runs the connect hook too. Only its socket mark keeps it from looping.
    let daemon_cgroup = node.kubepods.join("gatewayd.scope");
    std::fs::create_dir_all(&daemon_cgroup).expect("create daemon cgroup");
    let daemon = node.start_daemon(Path::new(GATEWAYD), &config, Some(&daemon_cgroup));

    let report = run_client(&node, &pod, target, 4096);
    assert_eq!(report["intact"], true, "{report}");
    assert_eq!(greeting_peer(&report), IpAddr::V4(server.node_side_v4));
    let counters = stats(&node);
    assert_eq!(
        counters.get(Verdict::Redirected),
        1,
        "only the pod's connect is redirected"
    );
    assert_eq!(
        counters.get(Verdict::PassMarked),
        1,
        "the proxy's own connect passes by its mark"
    );
    assert_eq!(node.wait_for_sessions(1).len(), 1);
    daemon.stop();
}

#[test]
fn ipv6_and_mapped_ipv4_redirected() {
    let mut node = TestNode::new("ipv6_and_mapped_ipv4_redirected");
    let pod = node.add_pod("client");
    let server = node.add_server("echo", &[]);
    let target_v4 = SocketAddr::new(server.addr_v4.into(), ECHO_PORT);
    let target_v6 = SocketAddr::new(server.addr_v6.into(), ECHO_PORT);
    let _echo = ChildGuard(start_echo(&node, &server, &[target_v4, target_v6]));
    let targets = format!(
        "{}{}",
        tcp_target(target_v4, "echo-v4"),
        tcp_target(target_v6, "echo-v6")
    );
    let config = node.daemon_config("gatewayd.yaml", "", &targets);
    let daemon = node.start_daemon(Path::new(GATEWAYD), &config, None);

    let report = run_client(&node, &pod, target_v6, 64 * 1024);
    assert_eq!(report["intact"], true, "{report}");
    assert_eq!(report["peer"], target_v6.to_string());
    let node_side_v6: IpAddr = "fd00:245:0::1".parse().expect("valid address");
    assert_eq!(
        greeting_peer(&report),
        node_side_v6,
        "IPv6 went through the proxy"
    );

    // An IPv6 socket dialing the IPv4 target in mapped form is matched as IPv4.
    let mapped: SocketAddr = format!("[::ffff:{}]:{ECHO_PORT}", server.addr_v4)
        .parse()
        .expect("valid address");
    let report = run_client(&node, &pod, mapped, 64 * 1024);
    assert_eq!(report["intact"], true, "{report}");
    assert_eq!(
        report["peer"],
        mapped.to_string(),
        "getpeername keeps the mapped form"
    );
    assert_eq!(greeting_peer(&report), IpAddr::V4(server.node_side_v4));

    let sessions = node.wait_for_sessions(2);
    let names: Vec<&str> = sessions
        .iter()
        .map(|lines| lines[0]["target"]["name"].as_str().expect("target name"))
        .collect();
    assert_eq!(names, ["echo-v6", "echo-v4"]);
    daemon.stop();
}

#[test]
fn two_pods_told_apart() {
    let mut node = TestNode::new("two_pods_told_apart");
    let first = node.add_pod("first");
    let second = node.add_pod("second");
    let server = node.add_server("echo", &[]);
    let target = SocketAddr::new(server.addr_v4.into(), ECHO_PORT);
    let _echo = ChildGuard(start_echo(&node, &server, &[target]));
    let config = node.daemon_config("gatewayd.yaml", "", &tcp_target(target, "echo"));
    // The first pod is named by a static identity file; the second matches no entry.
    let identities = node.dir.join("identities.yaml");
    std::fs::write(
        &identities,
        format!(
            "subjects:\n  - cgroup: '*pod{}*'\n    namespace: payments\n    pod: api-0\n    \
             service_account: payments-api\n    labels: {{app: api}}\n",
            first.uid.replace('-', "_")
        ),
    )
    .expect("write identity file");
    let mut text = std::fs::read_to_string(&config).expect("read config");
    text.push_str(&format!(
        "identity:\n  static_file: {}\n",
        identities.display()
    ));
    std::fs::write(&config, text).expect("write config");
    let daemon = node.start_daemon(Path::new(GATEWAYD), &config, None);

    run_client(&node, &first, target, 10);
    run_client(&node, &second, target, 20);
    let sessions = node.wait_for_sessions(2);

    let subject = |lines: &Vec<Value>| lines[0]["subject"].clone();
    assert_eq!(subject(&sessions[0])["cgroup"], first.cgroup_path.as_str());
    assert_eq!(subject(&sessions[1])["cgroup"], second.cgroup_path.as_str());
    assert_eq!(subject(&sessions[0])["pod_uid"], first.uid.as_str());
    assert_eq!(subject(&sessions[1])["pod_uid"], second.uid.as_str());
    assert_eq!(subject(&sessions[0])["comm"], "gateway-testpee");
    assert_eq!(
        sessions[0][0]["origin"]["addr"]
            .as_str()
            .map(|a| a.starts_with(&first.addr_v4.to_string())),
        Some(true)
    );
    assert_eq!(sessions[1][1]["bytes"]["from_client"], 20);
    assert_eq!(subject(&sessions[0])["namespace"], "payments");
    assert_eq!(subject(&sessions[0])["pod"], "api-0");
    assert_eq!(subject(&sessions[0])["service_account"], "payments-api");
    assert_eq!(subject(&sessions[0])["labels"]["app"], "api");
    assert_eq!(subject(&sessions[0])["identity_source"], "static");
    assert!(subject(&sessions[1]).get("namespace").is_none());
    daemon.stop();
}

#[test]
fn excluded_cgroup_goes_direct() {
    let mut node = TestNode::new("excluded_cgroup_goes_direct");
    let pod = node.add_pod("exempt");
    let server = node.add_server("echo", &[]);
    let target = SocketAddr::new(server.addr_v4.into(), ECHO_PORT);
    let _echo = ChildGuard(start_echo(&node, &server, &[target]));
    // Excluding the pod's slice covers its container cgroup below it.
    let pod_slice = pod
        .cgroup
        .parent()
        .expect("container cgroup has a pod parent");
    let redirect_extra = format!("  exclude_cgroups: ['{}']\n", pod_slice.display());
    let config = node.daemon_config(
        "gatewayd.yaml",
        &redirect_extra,
        &tcp_target(target, "echo"),
    );
    let daemon = node.start_daemon(Path::new(GATEWAYD), &config, None);

    let report = run_client(&node, &pod, target, 100);
    assert_eq!(greeting_peer(&report), IpAddr::V4(pod.addr_v4));
    assert_eq!(stats(&node).get(Verdict::PassExcludedCgroup), 1);
    daemon.stop();
}

/// Settings that make the heartbeat go stale quickly.
const FAST_HEARTBEAT: &str = "  heartbeat_interval: 100ms\n  heartbeat_timeout: 500ms\n";
const STALE_WAIT: Duration = Duration::from_millis(1200);

#[test]
fn fail_open_goes_direct_when_stale() {
    let EchoSetup {
        node,
        pod,
        server,
        target,
        config,
        _echo,
    } = echo_setup(
        "fail_open_goes_direct_when_stale",
        &[],
        &format!("  fail_mode: open\n{FAST_HEARTBEAT}"),
    );

    // A crash: the heartbeat just stops.
    let daemon = node.start_daemon(Path::new(GATEWAYD), &config, None);
    let report = run_client(&node, &pod, target, 10);
    assert_eq!(
        greeting_peer(&report),
        IpAddr::V4(server.node_side_v4),
        "proxied while alive"
    );
    daemon.kill();
    std::thread::sleep(STALE_WAIT);
    let report =
        client_connects(&node, &pod, target).expect("direct connect after a stale heartbeat");
    assert_eq!(
        greeting_peer(&report),
        IpAddr::V4(pod.addr_v4),
        "direct once stale"
    );
    assert_eq!(stats(&node).get(Verdict::PassStaleHeartbeat), 1);

    // A graceful stop expires the heartbeat at once: no wait, no refused connects.
    let daemon = node.start_daemon(Path::new(GATEWAYD), &config, None);
    let report = run_client(&node, &pod, target, 10);
    assert_eq!(
        greeting_peer(&report),
        IpAddr::V4(server.node_side_v4),
        "proxied after restart"
    );
    assert!(daemon.stop().success());
    let report = client_connects(&node, &pod, target).expect("direct connect right after SIGTERM");
    assert_eq!(greeting_peer(&report), IpAddr::V4(pod.addr_v4));
}

#[test]
fn fail_closed_restart_adopts_uninstall() {
    let EchoSetup {
        node,
        pod,
        server,
        target,
        config,
        _echo,
    } = echo_setup(
        "fail_closed_restart_adopts_uninstall",
        &[],
        &format!("  fail_mode: closed\n{FAST_HEARTBEAT}"),
    );

    let daemon = node.start_daemon(Path::new(GATEWAYD), &config, None);
    assert!(
        daemon.log().contains("adopted=false"),
        "first start installs"
    );
    let link_pin = node.pin_dir().join("links").join("connect4");
    let link_before = std::fs::metadata(&link_pin).expect("connect4 link is pinned");
    daemon.kill();
    std::thread::sleep(STALE_WAIT);

    // Closed: with the daemon gone, a connect to the target fails instead of going direct.
    assert!(
        client_connects(&node, &pod, target).is_none(),
        "connect must fail while the proxy is down"
    );
    assert!(stats(&node).get(Verdict::RedirectedStale) >= 1);

    // Restart while a pod keeps connecting: every attempt either fails or is proxied; none
    // may reach the server directly.
    let stop = std::sync::atomic::AtomicBool::new(false);
    let (peers, daemon) = std::thread::scope(|scope| {
        let probe = scope.spawn(|| {
            let mut peers = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if let Some(report) = client_connects(&node, &pod, target) {
                    peers.push(greeting_peer(&report));
                }
            }
            peers
        });
        std::thread::sleep(Duration::from_millis(200));
        let daemon = node.start_daemon(Path::new(GATEWAYD), &config, None);
        std::thread::sleep(Duration::from_millis(500));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        (probe.join().expect("probe thread"), daemon)
    });
    assert!(
        !peers.is_empty(),
        "some connects succeed once the daemon is back"
    );
    assert!(
        peers
            .iter()
            .all(|peer| *peer == IpAddr::V4(server.node_side_v4)),
        "a connect bypassed the proxy during the restart: {peers:?}"
    );
    assert!(
        daemon.log().contains("adopted=true"),
        "restart adopts the pinned links:\n{}",
        daemon.log()
    );
    let link_after = std::fs::metadata(&link_pin).expect("connect4 link still pinned");
    assert_eq!(
        std::os::unix::fs::MetadataExt::ino(&link_before),
        std::os::unix::fs::MetadataExt::ino(&link_after),
        "the same link object is kept"
    );
    assert!(daemon.stop().success());

    // Uninstall: no pins, no programs on the cgroup, and connects go direct again.
    let output = std::process::Command::new(GATEWAYD)
        .args(["uninstall", "--config"])
        .arg(&config)
        .output()
        .expect("run gatewayd uninstall");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(String::from_utf8_lossy(&output.stdout).contains("removed 5 link(s) and 6 map(s)"));
    assert!(!node.pin_dir().exists(), "the pin directory is gone");
    assert_nothing_attached(&node, "after uninstall");
    let report = client_connects(&node, &pod, target).expect("direct connect after uninstall");
    assert_eq!(greeting_peer(&report), IpAddr::V4(pod.addr_v4));

    // Uninstalling again finds nothing and succeeds.
    let again = std::process::Command::new(GATEWAYD)
        .args(["uninstall", "--config"])
        .arg(&config)
        .output()
        .expect("run gatewayd uninstall again");
    assert!(again.status.success());
}

#[test]
fn exclusive_ancestor_rejected() {
    let node = TestNode::new("exclusive_ancestor_rejected");
    // Someone attached a connect4 program to the parent of the pods cgroup in exclusive mode.
    let pins = node.bpffs.join("other");
    std::fs::create_dir_all(&pins).expect("create pin directory");
    let mut ebpf = aya::EbpfLoader::new()
        .default_map_pin_directory(&pins)
        .load(redirect::EBPF_OBJECT)
        .expect("load eBPF object");
    let program: &mut aya::programs::CgroupSockAddr = ebpf
        .program_mut("connect4")
        .expect("connect4 program")
        .try_into()
        .expect("cgroup_sock_addr program");
    program.load().expect("verifier accepts connect4");
    let parent = std::fs::File::open(&node.cgroup_root).expect("open parent cgroup");
    let program_fd = program.fd().expect("program fd");
    gateway_user::sys::bpf_prog_attach(
        std::os::fd::AsFd::as_fd(&parent),
        std::os::fd::AsFd::as_fd(program_fd),
        AttachType::Inet4Connect,
        0,
    )
    .expect("exclusive attach");

    let config = node.daemon_config("gatewayd.yaml", "", "  []\n");
    let output = node
        .in_node(None, GATEWAYD)
        .args(["run", "--config"])
        .arg(&config)
        .output()
        .expect("run gatewayd");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "gatewayd must refuse to start");
    assert!(stderr.contains("exclusive"), "{stderr}");
    assert!(
        stderr.contains(&node.cgroup_root.display().to_string()),
        "{stderr}"
    );

    gateway_user::sys::bpf_prog_detach(
        std::os::fd::AsFd::as_fd(&parent),
        std::os::fd::AsFd::as_fd(program_fd),
        AttachType::Inet4Connect,
    )
    .expect("detach the exclusive program");
}

#[test]
fn missing_cgroup2_reported() {
    let node = TestNode::new("missing_cgroup2_reported");
    let config = node.daemon_config("gatewayd.yaml", "", "  []\n");
    // A private mount namespace without the cgroup2 mount: the daemon must report it, not panic.
    let script = format!(
        "umount -l '{}' && exec '{GATEWAYD}' run --config '{}'",
        node.unified.display(),
        config.display()
    );
    let output = std::process::Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .output()
        .expect("run unshare");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("no cgroup2 filesystem is mounted"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// Adds `setting` (`key: value`) to the `proxy` section of the daemon configuration at `config`.
fn add_proxy_setting(config: &Path, setting: &str) {
    let text = std::fs::read_to_string(config).expect("read config");
    let anchor = "  drain_timeout: 2s\n";
    assert!(
        text.contains(anchor),
        "no proxy section to extend in {text}"
    );
    let text = text.replace(anchor, &format!("{anchor}  {setting}\n"));
    std::fs::write(config, text).expect("write config");
}

#[test]
fn connection_limit_resets_excess() {
    let EchoSetup {
        node,
        pod,
        server: _,
        target,
        config,
        _echo,
    } = echo_setup("connection_limit_resets_excess", &[], "");
    add_proxy_setting(&config, "max_connections: 1");
    let daemon = node.start_daemon(Path::new(GATEWAYD), &config, None);

    let mut holder = node
        .in_pod(&pod, TESTPEER)
        .args(["hold", "--connect", &target.to_string(), "--count", "1"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn holder");
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(holder.stdout.as_mut().expect("piped stdout")),
        &mut line,
    )
    .expect("read holder output");
    assert_eq!(line.trim(), "ready");
    // Wait until the proxy has accepted the held connection.
    gateway_user::testing::wait_until("the held session to start", Duration::from_secs(10), || {
        !node.session_files().is_empty()
    });

    assert!(
        client_connects(&node, &pod, target).is_none(),
        "over the limit: reset"
    );
    drop(holder.stdin.take());
    holder.wait().expect("holder exits");
    node.wait_for_sessions(1);
    assert!(
        client_connects(&node, &pod, target).is_some(),
        "under the limit again"
    );
    assert!(
        daemon.log().contains("connection limit reached"),
        "{}",
        daemon.log()
    );
    daemon.stop();
}

#[test]
fn worker_threads_setting_applies() {
    let setup = echo_setup("worker_threads_setting_applies", &[], "");
    // One more than the default, so the default cannot pass for the setting.
    let threads = std::thread::available_parallelism().map_or(1, usize::from) + 1;
    add_proxy_setting(&setup.config, &format!("worker_threads: {threads}"));
    let daemon = setup
        .node
        .start_daemon(Path::new(GATEWAYD), &setup.config, None);

    let report = client_connects(&setup.node, &setup.pod, setup.target)
        .expect("a session through the proxy");
    assert_eq!(report["intact"], true, "{report}");
    // Blocking-pool threads carry the workers' name, so the daemon's own report is the check.
    let log = daemon.log();
    assert!(log.contains(&format!("worker_threads={threads}")), "{log}");
    daemon.stop();
}

#[test]
fn sigterm_drains_then_closes() {
    let EchoSetup {
        node,
        pod,
        server: _,
        target,
        config,
        _echo,
    } = echo_setup("sigterm_drains_then_closes", &[], "");
    let daemon = node.start_daemon(Path::new(GATEWAYD), &config, None);

    let mut holder = node
        .in_pod(&pod, TESTPEER)
        .args(["hold", "--connect", &target.to_string(), "--count", "1"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn holder");
    gateway_user::testing::wait_until("the held session to start", Duration::from_secs(10), || {
        !node.session_files().is_empty()
    });

    // The held connection outlives the 2 s drain, so the daemon closes it and records why.
    let started = std::time::Instant::now();
    assert!(daemon.stop().success(), "graceful stop exits 0");
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "the daemon waited for the drain"
    );
    let sessions = node.wait_for_sessions(1);
    assert_eq!(sessions[0][1]["outcome"], "shutdown");
    drop(holder.stdin.take());
    let _ = holder.wait();
}

/// Asserts that no program is attached to any of the gateway's hooks on the pods' cgroup.
fn assert_nothing_attached(node: &TestNode, when: &str) {
    for hook in [
        AttachType::Inet4Connect,
        AttachType::Inet6Connect,
        AttachType::SockOps,
        AttachType::Inet4Getpeername,
        AttachType::Inet6Getpeername,
    ] {
        let count = redirect::attached_program_count(&node.kubepods, hook).expect("query cgroup");
        assert_eq!(count, 0, "{hook:?} attached {when}");
    }
}

/// A program the verifier rejects stops the start before any hook changes: without
/// CAP_PERFMON the kernel refuses connect4's pointer arithmetic, and the programs loaded before
/// it must not stay attached with no proxy behind them.
#[test]
fn rejected_program_attaches_nothing() {
    let EchoSetup {
        node,
        pod,
        server,
        target,
        config,
        _echo,
    } = echo_setup("rejected_program_attaches_nothing", &[], "");

    let output = node
        .in_node(None, "setpriv")
        .args([
            "--bounding-set",
            "-perfmon,-sys_admin",
            GATEWAYD,
            "run",
            "--config",
        ])
        .arg(&config)
        .stdin(Stdio::null())
        .output()
        .expect("run gatewayd without CAP_PERFMON");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "gatewayd started: {stderr}");
    assert!(stderr.contains("connect4"), "{stderr}");

    assert_nothing_attached(&node, "by a start that failed");
    let links = node.pin_dir().join("links");
    let pinned: Vec<_> = std::fs::read_dir(&links)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|entry| entry.file_name())
                .collect()
        })
        .unwrap_or_default();
    assert!(
        pinned.is_empty(),
        "links pinned by a start that failed: {pinned:?}"
    );

    // A start with every capability then installs from scratch and proxies.
    let daemon = node.start_daemon(Path::new(GATEWAYD), &config, None);
    assert!(daemon.log().contains("adopted=false"), "{}", daemon.log());
    let report = client_connects(&node, &pod, target).expect("proxied connect");
    assert_eq!(greeting_peer(&report), IpAddr::V4(server.node_side_v4));
    assert!(daemon.stop().success());
}
