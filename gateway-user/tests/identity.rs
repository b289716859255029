//! Subjects named from the cluster: `gatewayd` watches its node's pods on the test API server
//! and names each redirected connection after its Pod, and keeps doing so while the API
//! server is down. Needs root, so run it with `cargo xtask test`.

use std::{
    net::SocketAddr,
    path::Path,
    process::Stdio,
    time::{Duration, Instant},
};

use gateway_user::{
    testing::{ChildGuard, Pod, TestNode},
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

#[test]
fn pods_named_from_the_cluster() {
    let mut node = TestNode::new("pods_named_from_the_cluster");
    let known = node.add_pod("payments-api-0");
    let stranger = node.add_pod("stranger");
    let echo = node.add_server("echo", &[]);
    let target = SocketAddr::new(echo.addr_v4.into(), ECHO_PORT);
    let _echo = ChildGuard(node.start_echo(Path::new(TESTPEER), &echo, &[target]));

    // The API server lists the first pod on this node and does not know the second one.
    let api_server = node.add_server("apiserver", &[]);
    let mut pod = TestApiServer::seed_pod("payments", "payments-api", &known);
    pod["spec"]["nodeName"] = json!(node.node_netns);
    pod["metadata"]["labels"] = json!({ "app": "payments", "tier": "api" });
    let api = TestApiServer::start(
        &node,
        &api_server,
        Path::new(APISERVER),
        Options {
            port: 6443,
            seed: vec![
                json!({
                    "apiVersion": "v1",
                    "kind": "Namespace",
                    "metadata": { "name": "payments" },
                }),
                pod,
            ],
            ..Options::default()
        },
    );

    // gatewayd reads the cluster through a kubeconfig with a service-account token.
    let token = api.token_for("payments", "payments-api", &known);
    let kubeconfig = node.dir.join("kubeconfig.yaml");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: https://{}:{}\n    certificate-authority: {}\nusers:\n- name: gatewayd\n  user:\n    token: {token}\ncontexts:\n- name: test\n  context:\n    cluster: test\n    user: gatewayd\ncurrent-context: test\n",
            api.address,
            api.port,
            api.ca_cert.display()
        ),
    )
    .expect("write kubeconfig");
    let targets = format!(
        "  - name: echo\n    address: '{}'\n    port: {ECHO_PORT}\n    class: tcp\n",
        target.ip()
    );
    let config = node.daemon_config("gatewayd.yaml", "", &targets);
    let mut text = std::fs::read_to_string(&config).expect("read config");
    text.push_str(&format!(
        "identity:\n  cluster: true\n  kubeconfig: {}\n  wait: 3s\n",
        kubeconfig.display()
    ));
    std::fs::write(&config, text).expect("write config");
    let daemon = node.start_daemon(Path::new(GATEWAYD), &config, None);

    connect(&node, &known, target);
    connect(&node, &stranger, target);
    node.wait_for_sessions(2);
    let named = subjects(&node);
    assert_eq!(named[0]["namespace"], "payments", "{named:#?}");
    assert_eq!(named[0]["pod"], "payments-api-0");
    assert_eq!(named[0]["service_account"], "payments-api");
    assert_eq!(named[0]["labels"]["tier"], "api");
    assert_eq!(named[0]["node"], node.node_netns.as_str());
    assert_eq!(named[0]["identity_source"], "cluster");
    assert!(named[0].get("identity_stale").is_none());
    assert!(
        named[1].get("namespace").is_none(),
        "a pod the cluster does not list stays unknown: {named:#?}"
    );

    // The API server goes away: known pods keep their names, marked stale once the watch
    // has failed.
    drop(api);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let before = node.session_files().len();
        connect(&node, &known, target);
        node.wait_for_sessions(before + 1);
        let last = subjects(&node).pop().expect("a session");
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
            daemon.log()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(
        daemon.log().contains("pod watch failed"),
        "the outage is logged:\n{}",
        daemon.log()
    );
    daemon.stop();
}
