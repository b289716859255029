//! Targets named by a Service: `gatewayd` reads the Service and its EndpointSlices from the
//! test API server and redirects connects to the cluster IP and to each endpoint, and follows
//! endpoints added later. Needs root, so run it with `cargo xtask test`.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::Path,
    process::Stdio,
    time::Duration,
};

use gateway_user::{
    testing::{ChildGuard, Pod, TestNode, wait_until},
    testing_apiserver::fixture::{Options, TestApiServer},
};
use serde_json::{Value, json};

const GATEWAYD: &str = env!("CARGO_BIN_EXE_gatewayd");
const TESTPEER: &str = env!("CARGO_BIN_EXE_gateway-testpeer");
const APISERVER: &str = env!("CARGO_BIN_EXE_gateway-test-apiserver");

const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 30);
/// A second endpoint of the Service, added while the daemon runs.
const LATER_ENDPOINT: Ipv4Addr = Ipv4Addr::new(10, 97, 0, 5);
const SERVICE_PORT: u16 = 7000;
const ENDPOINT_PORT: u16 = 17000;

/// Connects from `pod` to `target` and checks that the echo server replied.
fn connect(node: &TestNode, pod: &Pod, target: SocketAddr) {
    let output = node
        .in_pod(pod, TESTPEER)
        .args([
            "client",
            "--greet",
            "--connect",
            &target.to_string(),
            "--bytes",
            "16",
        ])
        .stdin(Stdio::null())
        .output()
        .expect("run the test client");
    assert!(output.status.success(), "client to {target}: {output:?}");
}

/// Returns the original destination of each recorded session, oldest first.
fn recorded_destinations(node: &TestNode) -> Vec<String> {
    node.sessions()
        .into_iter()
        .filter_map(|lines| {
            let start = lines.first()?;
            assert_eq!(start["target"]["name"], "default/echo:7000", "{start}");
            start["target"]["addr"].as_str().map(str::to_string)
        })
        .collect()
}

fn endpoint_slice(name: &str, address: &str) -> Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name,
            "namespace": "default",
            "labels": { "kubernetes.io/service-name": "echo" },
        },
        "addressType": "IPv4",
        "ports": [{ "name": "echo", "port": ENDPOINT_PORT, "protocol": "TCP" }],
        "endpoints": [{ "addresses": [address], "conditions": { "ready": true } }],
    })
}

#[test]
fn service_target_follows_endpoints() {
    let mut node = TestNode::new("service_target_follows_endpoints");
    let pod = node.add_pod("app");
    let echo = node.add_server(
        "echo",
        &[IpAddr::V4(CLUSTER_IP), IpAddr::V4(LATER_ENDPOINT)],
    );
    let cluster_ip = SocketAddr::new(CLUSTER_IP.into(), SERVICE_PORT);
    let endpoint = SocketAddr::new(echo.addr_v4.into(), ENDPOINT_PORT);
    let later_endpoint = SocketAddr::new(LATER_ENDPOINT.into(), ENDPOINT_PORT);
    let _echo = ChildGuard(node.start_echo(
        Path::new(TESTPEER),
        &echo,
        &[cluster_ip, endpoint, later_endpoint],
    ));

    let api_server = node.add_server("apiserver", &[]);
    let service = json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": { "name": "echo", "namespace": "default" },
        "spec": {
            "clusterIP": CLUSTER_IP.to_string(),
            "clusterIPs": [CLUSTER_IP.to_string()],
            "ports": [{ "name": "echo", "port": SERVICE_PORT, "targetPort": ENDPOINT_PORT, "protocol": "TCP" }],
        },
    });
    let api = TestApiServer::start(
        &node,
        &api_server,
        Path::new(APISERVER),
        Options {
            port: 6443,
            seed: vec![service, endpoint_slice("echo-a", &echo.addr_v4.to_string())],
            late_seed: vec![endpoint_slice("echo-b", &LATER_ENDPOINT.to_string())],
            ..Options::default()
        },
    );

    let kubeconfig = api.kubeconfig("gateway-system", "gatewayd");
    let targets = format!(
        "  - service: default/echo\n    port: {SERVICE_PORT}\n    class: tcp\nidentity:\n  kubeconfig: {}\n",
        kubeconfig.display()
    );
    let config = node.daemon_config("gatewayd.yaml", "", &targets);
    let daemon = node.start_daemon(Path::new(GATEWAYD), &config, None);
    wait_until(
        "the Service's addresses in the targets map",
        Duration::from_secs(20),
        || daemon.log().contains("Service target addresses updated"),
    );

    // The cluster IP and the listed endpoint are redirected; the endpoint not listed yet is
    // reached directly.
    connect(&node, &pod, cluster_ip);
    connect(&node, &pod, endpoint);
    connect(&node, &pod, later_endpoint);
    node.wait_for_sessions(2);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        recorded_destinations(&node),
        [cluster_ip.to_string(), endpoint.to_string()]
    );

    // A new EndpointSlice adds its endpoint.
    api.create_late_seed();
    wait_until("the new endpoint", Duration::from_secs(20), || {
        daemon.log().contains(&format!("{later_endpoint}"))
    });
    connect(&node, &pod, later_endpoint);
    node.wait_for_sessions(3);
    assert_eq!(
        recorded_destinations(&node).last(),
        Some(&later_endpoint.to_string())
    );
    daemon.stop();
}
