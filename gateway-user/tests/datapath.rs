//! The redirect data path on a one-machine test node: real eBPF programs on the real kernel,
//! a real `gatewayd`, and unmodified clients in pod namespaces dialing servers in server
//! namespaces. Needs root; run with `cargo xtask test`.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::Path,
    process::{Child, Stdio},
    time::Duration,
};

use gateway_common::Verdict;
use gateway_user::{
    redirect,
    sys::AttachType,
    testing::{Pod, Server, TestNode},
};
use serde_json::Value;

const GATEWAYD: &str = env!("CARGO_BIN_EXE_gatewayd");
const TESTPEER: &str = env!("CARGO_BIN_EXE_gateway-testpeer");
const ECHO_PORT: u16 = 7000;

/// Starts the echo server in `server`, listening on every address given.
fn start_echo(node: &TestNode, server: &Server, addrs: &[SocketAddr]) -> Child {
    let mut command = node.in_server(server, TESTPEER);
    command.arg("serve").arg("--greet");
    for addr in addrs {
        command.arg("--listen").arg(addr.to_string());
    }
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn echo server");
    // Wait for its "listening" line.
    let mut stdout = std::io::BufReader::new(child.stdout.take().expect("piped stdout"));
    let mut line = String::new();
    std::io::BufRead::read_line(&mut stdout, &mut line).expect("read echo server output");
    assert_eq!(line.trim(), "listening", "echo server did not start");
    child
}

struct EchoGuard(Child);

impl Drop for EchoGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs the test client in `pod` against `addr` and returns its JSON report.
fn run_client(node: &TestNode, pod: &Pod, addr: SocketAddr, bytes: u64) -> Value {
    let output = node
        .in_pod(pod, TESTPEER)
        .args(["client", "--greet", "--connect", &addr.to_string(), "--bytes", &bytes.to_string()])
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
        .args(["client", "--greet", "--connect", &addr.to_string(), "--bytes", "16"])
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
    let mut node = TestNode::new("redirects_bytes_intact_both_ways");
    let pod = node.add_pod("client");
    let server = node.add_server("echo", &[]);
    let target = SocketAddr::new(server.addr_v4.into(), ECHO_PORT);
    let _echo = EchoGuard(start_echo(&node, &server, &[target]));
    let config = node.daemon_config("gatewayd.yaml", "", &tcp_target(target, "echo"));
    let daemon = node.start_daemon(Path::new(GATEWAYD), &config, None);

    for size in [1u64, 64 * 1024, 100 * 1024 * 1024] {
        let report = run_client(&node, &pod, target, size);
        assert_eq!(report["intact"], true, "size {size}: {report}");
        assert_eq!(report["received"], size, "size {size}: {report}");
        // The application sees the server it dialed, not the proxy.
        assert_eq!(report["peer"], target.to_string(), "size {size}: getpeername");
        // The server sees the node, so the connection went through the proxy.
        assert_eq!(greeting_peer(&report), IpAddr::V4(server.node_side_v4), "size {size}");
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
    daemon.stop();
}
