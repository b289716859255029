//! Subjects named from the cluster: `gatewayd` watches its node's pods on the test API server
//! and names each redirected connection after its Pod. It does so with either kubelet cgroup
//! layout, for a pod that appears while its first connection waits, and while the API server
//! is down.
//! Needs root, so run it with `cargo xtask test`.

use std::{
    net::SocketAddr,
    path::Path,
    process::Stdio,
    time::{Duration, Instant},
};

use gateway_user::{
    testing::{CgroupLayout, ChildGuard, Daemon, Pod, TestNode, wait_until},
    testing_apiserver::fixture::{Options, TestApiServer},
};
use serde_json::{Value, json};

const GATEWAYD: &str = env!("CARGO_BIN_EXE_gatewayd");
const TESTPEER: &str = env!("CARGO_BIN_EXE_gateway-testpeer");
const APISERVER: &str = env!("CARGO_BIN_EXE_gateway-test-apiserver");
const ECHO_PORT: u16 = 7000;

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
        .expect("run test client");
    assert!(output.status.success(), "client: {output:?}");
}

fn subjects(node: &TestNode) -> Vec<Value> {
    node.sessions()
        .into_iter()
        .filter_map(|lines| lines.first().map(|start| start["subject"].clone()))
        .collect()
}

/// A test node whose daemon names pods from the test API server.
struct Cluster {
    node: TestNode,
    api: Option<TestApiServer>,
    daemon: Daemon,
    target: SocketAddr,
    _echo: ChildGuard,
}

/// Builds the seed object of `pod` in namespace `payments`, scheduled on `node`, with labels.
fn payments_pod(node: &TestNode, pod: &Pod) -> Value {
    let mut object = TestApiServer::seed_pod("payments", "payments-api", pod);
    object["spec"]["nodeName"] = json!(node.node_netns);
    object["metadata"]["labels"] = json!({ "app": "payments", "tier": "api" });
    object
}

/// Starts an echo target, the test API server with the namespace `payments` and `options`,
/// and `gatewayd` reading the cluster through a kubeconfig, waiting up to `wait` for a pod the
/// watch has not delivered yet.
fn start_cluster(mut node: TestNode, mut options: Options, wait: &str) -> Cluster {
    let echo = node.add_server("echo", &[]);
    let target = SocketAddr::new(echo.addr_v4.into(), ECHO_PORT);
    let echo_child = ChildGuard(node.start_echo(Path::new(TESTPEER), &echo, &[target]));

    let api_server = node.add_server("apiserver", &[]);
    options.port = 6443;
    options.seed.insert(
        0,
        json!({
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": { "name": "payments" },
        }),
    );
    let api = TestApiServer::start(&node, &api_server, Path::new(APISERVER), options);

    // gatewayd reads the cluster with a service-account token of its own.
    let kubeconfig = api.kubeconfig("gateway-system", "gatewayd");
    let targets = format!(
        "  - name: echo\n    address: '{}'\n    port: {ECHO_PORT}\n    class: tcp\n",
        target.ip()
    );
    let config = node.daemon_config("gatewayd.yaml", "", &targets);
    let mut text = std::fs::read_to_string(&config).expect("read config");
    text.push_str(&format!(
        "identity:\n  cluster: true\n  kubeconfig: {}\n  wait: {wait}\n",
        kubeconfig.display()
    ));
    std::fs::write(&config, text).expect("write config");
    let daemon = node.start_daemon(Path::new(GATEWAYD), &config, None);
    Cluster {
        node,
        api: Some(api),
        daemon,
        target,
        _echo: echo_child,
    }
}

/// Checks that `subject` names the pod of [`payments_pod`].
fn assert_payments_pod(subject: &Value, node: &TestNode) {
    assert_eq!(subject["namespace"], "payments", "{subject:#}");
    assert_eq!(subject["pod"], "payments-api-0", "{subject:#}");
    assert_eq!(subject["service_account"], "payments-api", "{subject:#}");
    assert_eq!(subject["labels"]["tier"], "api", "{subject:#}");
    assert_eq!(subject["node"], node.node_netns.as_str(), "{subject:#}");
    assert_eq!(subject["identity_source"], "cluster", "{subject:#}");
}

#[test]
fn pods_named_from_the_cluster() {
    let mut node = TestNode::new("pods_named_from_the_cluster");
    let known = node.add_pod("payments-api-0");
    let stranger = node.add_pod("stranger");

    // The API server lists the first pod on this node and does not know the second one.
    let seed = vec![payments_pod(&node, &known)];
    let mut cluster = start_cluster(
        node,
        Options {
            seed,
            ..Options::default()
        },
        "3s",
    );
    let node = &cluster.node;
    connect(node, &known, cluster.target);
    connect(node, &stranger, cluster.target);
    node.wait_for_sessions(2);
    let named = subjects(node);
    assert_payments_pod(&named[0], node);
    assert!(named[0].get("identity_stale").is_none(), "{named:#?}");
    assert!(
        named[1].get("namespace").is_none(),
        "a pod the cluster does not list stays unknown: {named:#?}"
    );

    // The API server goes away: known pods keep their names, marked stale once the watch
    // has failed.
    drop(cluster.api.take());
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let before = node.session_files().len();
        connect(node, &known, cluster.target);
        node.wait_for_sessions(before + 1);
        let last = subjects(node).pop().expect("a session");
        assert_eq!(
            last["pod"], "payments-api-0",
            "known pods keep their names: {last}"
        );
        if last["identity_stale"] == true {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the identity was never marked stale:\n{}",
            cluster.daemon.log()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(
        cluster.daemon.log().contains("pod watch failed"),
        "the outage is logged:\n{}",
        cluster.daemon.log()
    );
    cluster.daemon.stop();
}

#[test]
fn pods_named_in_cgroupfs_layout() {
    let mut node = TestNode::with_layout("pods_named_in_cgroupfs_layout", CgroupLayout::Cgroupfs);
    let pod = node.add_pod("payments-api-0");
    assert!(
        pod.cgroup_path
            .contains(&format!("/kubepods/besteffort/pod{}/", pod.uid)),
        "{}",
        pod.cgroup_path
    );
    let seed = vec![payments_pod(&node, &pod)];
    let cluster = start_cluster(
        node,
        Options {
            seed,
            ..Options::default()
        },
        "3s",
    );
    connect(&cluster.node, &pod, cluster.target);
    cluster.node.wait_for_sessions(1);
    assert_payments_pod(&subjects(&cluster.node)[0], &cluster.node);
    cluster.daemon.stop();
}

#[test]
fn pod_created_after_its_connection() {
    let mut node = TestNode::new("pod_created_after_its_connection");
    let pod = node.add_pod("payments-api-0");

    // The pod's process connects before the API server has the Pod, as when the watch lags
    // behind the kubelet.
    let late_seed = vec![payments_pod(&node, &pod)];
    let cluster = start_cluster(
        node,
        Options {
            late_seed,
            ..Options::default()
        },
        "20s",
    );
    let node = &cluster.node;
    let client = node
        .in_pod(&pod, TESTPEER)
        .args([
            "client",
            "--greet",
            "--connect",
            &cluster.target.to_string(),
            "--bytes",
            "16",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the test client");
    wait_until("the client's connection", Duration::from_secs(10), || {
        let sockets = std::process::Command::new("ip")
            .args([
                "netns",
                "exec",
                &pod.netns,
                "ss",
                "-Htn",
                "state",
                "established",
            ])
            .output()
            .expect("run ss");
        !sockets.stdout.is_empty()
    });
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        node.session_files().is_empty(),
        "the session waits for the pod"
    );

    cluster.api.as_ref().expect("API server").create_late_seed();
    let output = client.wait_with_output().expect("wait for the test client");
    assert!(output.status.success(), "client: {output:?}");
    node.wait_for_sessions(1);
    assert_payments_pod(&subjects(node)[0], node);
    cluster.daemon.stop();
}
