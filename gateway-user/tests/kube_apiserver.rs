//! The stand-in Kubernetes API server against real kubectl 1.32 and curl, run from a pod
//! namespace with an in-cluster configuration. These tests keep the stand-in honest: the
//! gateway's Kubernetes tests rely on it behaving as kubectl expects.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{IpAddr, Ipv4Addr},
    path::PathBuf,
    process::{Command, Output, Stdio},
    sync::mpsc,
    time::Duration,
};

use gateway_user::{
    testing::{ChildGuard, Pod, Server, TestNode},
    testing_apiserver::fixture::{KUBECTL, Options, TestApiServer},
};
use serde_json::{Value, json};

const APISERVER: &str = env!("CARGO_BIN_EXE_gateway-test-apiserver");
/// ClusterIP of the `kubernetes` Service in a default cluster.
const SERVICE_IP: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 96, 0, 1));

/// A node with one pod and the API server, and kubectl set up in the pod.
struct Cluster {
    node: TestNode,
    pod: Pod,
    server: Server,
    api: TestApiServer,
    service_account: PathBuf,
    home: PathBuf,
}

impl Cluster {
    fn new(test_name: &str, configure: impl FnOnce(&mut Options)) -> Self {
        assert!(
            std::path::Path::new(KUBECTL).exists(),
            "kubectl 1.32 is missing at {KUBECTL}: these tests run it (it is not a Debian package \
             that `cargo xtask setup` can install)"
        );
        let mut node = TestNode::new(test_name);
        let pod = node.add_pod("client");
        let server = node.add_server("api", &[SERVICE_IP]);
        let mut options = Options {
            address: Some(SERVICE_IP),
            seed: vec![
                TestApiServer::seed_pod("default", "default", &pod),
                json!({"kind": "ConfigMap", "apiVersion": "v1",
                       "metadata": {"name": "settings", "namespace": "default", "labels": {"tier": "web"}},
                       "data": {"color": "blue", "size": "10"}}),
            ],
            ..Options::default()
        };
        configure(&mut options);
        let api = TestApiServer::start(&node, &server, APISERVER.as_ref(), options);
        let token = api.token_for("default", "default", &pod);
        let service_account = api.service_account_dir("client", &token, "default");
        let home = node.dir.join("home");
        Self {
            node,
            pod,
            server,
            api,
            service_account,
            home,
        }
    }

    fn kubectl(&self, args: &[&str]) -> Command {
        let mut command =
            self.api
                .kubectl(&self.node, &self.pod, &self.service_account, &self.home);
        command.args(args);
        command
    }

    /// Runs kubectl to completion with no input.
    fn run(&self, args: &[&str]) -> Output {
        self.kubectl(args)
            .stdin(Stdio::null())
            .output()
            .expect("run kubectl")
    }

    /// Runs kubectl and expects success; returns its standard output.
    fn ok(&self, args: &[&str]) -> String {
        let output = self.run(args);
        assert!(
            output.status.success(),
            "kubectl {args:?} failed with {}: {}\nserver log:\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr),
            self.api.log()
        );
        String::from_utf8(output.stdout).expect("kubectl prints UTF-8")
    }

    /// Runs curl in the pod against the server with the pod's token and CA.
    fn curl(&self, args: &[&str]) -> Output {
        let script = "exec curl -sS --cacert /var/run/secrets/kubernetes.io/serviceaccount/ca.crt \
                      \"$@\"";
        let mut command = self.api.in_cluster(
            &self.node,
            &self.pod,
            &self.service_account,
            &self.home,
            "sh",
        );
        command.args(["-c", script, "curl"]).args(args);
        command.stdin(Stdio::null()).output().expect("run curl")
    }

    fn url(&self, path: &str) -> String {
        format!("https://{}:{}{path}", self.api.address, self.api.port)
    }

    fn token(&self) -> String {
        std::fs::read_to_string(self.service_account.join("token")).expect("read token")
    }
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn kubectl_get_pods_prints_table() {
    let cluster = Cluster::new("kube_get_pods", |_| {});
    // kubectl requests aggregated discovery first; the plain JSON reply makes it fall back to
    // the legacy documents.
    let verbose = cluster.run(&["get", "pods", "-v=8"]);
    assert!(verbose.status.success(), "{}", stderr(&verbose));
    assert!(
        stderr(&verbose).contains("g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList"),
        "{}",
        stderr(&verbose)
    );

    let text = cluster.ok(&["get", "pods"]);
    let mut lines = text.lines();
    let header: Vec<&str> = lines
        .next()
        .expect("a header line")
        .split_whitespace()
        .collect();
    assert_eq!(header, ["NAME", "READY", "STATUS", "RESTARTS", "AGE"]);
    let row: Vec<&str> = lines
        .next()
        .expect("one pod row")
        .split_whitespace()
        .collect();
    assert_eq!(row[..4], ["client", "1/1", "Running", "0"]);
    assert_eq!(lines.next(), None, "only one pod exists");
}

#[test]
fn kubectl_get_json_and_selectors() {
    let cluster = Cluster::new("kube_get_json", |_| {});
    let list: Value = serde_json::from_str(&cluster.ok(&["get", "configmaps", "-o", "json"]))
        .expect("kubectl prints JSON");
    assert_eq!(list["kind"], "List");
    assert_eq!(list["items"][0]["metadata"]["name"], "settings");
    assert_eq!(list["items"][0]["data"]["color"], "blue");

    let one: Value =
        serde_json::from_str(&cluster.ok(&["get", "configmap", "settings", "-o", "json"]))
            .expect("kubectl prints JSON");
    assert_eq!(one["kind"], "ConfigMap");
    assert_eq!(one["apiVersion"], "v1");
    assert!(one["metadata"]["resourceVersion"].as_str().is_some());

    let selected = cluster.ok(&["get", "cm", "-l", "tier=web", "-o", "name"]);
    assert_eq!(selected.trim(), "configmap/settings");
    let none = cluster.run(&["get", "cm", "-l", "tier=db"]);
    assert!(none.status.success());
    assert!(
        stderr(&none).contains("No resources found in default namespace."),
        "{}",
        stderr(&none)
    );
}

#[test]
fn kubectl_create_and_delete_secret() {
    let cluster = Cluster::new("kube_secret", |_| {});
    let created = cluster.ok(&[
        "create",
        "secret",
        "generic",
        "db-password",
        "--from-literal=password=hunter2",
    ]);
    assert_eq!(created.trim(), "secret/db-password created");

    let secret: Value =
        serde_json::from_str(&cluster.ok(&["get", "secret", "db-password", "-o", "json"]))
            .expect("kubectl prints JSON");
    assert_eq!(secret["type"], "Opaque");
    assert_eq!(secret["data"]["password"], "aHVudGVyMg==");

    let again = cluster.run(&[
        "create",
        "secret",
        "generic",
        "db-password",
        "--from-literal=password=x",
    ]);
    assert_eq!(again.status.code(), Some(1));
    assert!(
        stderr(&again)
            .contains("error: failed to create secret secrets \"db-password\" already exists"),
        "{}",
        stderr(&again)
    );

    let deleted = cluster.ok(&["delete", "secret", "db-password"]);
    assert_eq!(deleted.trim(), "secret \"db-password\" deleted");
    let missing = cluster.run(&["get", "secret", "db-password"]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(
        stderr(&missing)
            .contains("Error from server (NotFound): secrets \"db-password\" not found"),
        "{}",
        stderr(&missing)
    );
}

#[test]
fn bad_token_and_forbidden_rules() {
    let cluster = Cluster::new("kube_auth", |options| {
        options.rules = Some(json!([
            {"users": ["system:serviceaccount:default:default"], "verbs": ["get", "list", "watch"], "resources": ["*"]}
        ]));
    });
    assert!(cluster.ok(&["get", "pods"]).contains("client"));

    let forbidden = cluster.run(&["create", "configmap", "x", "--from-literal=a=b"]);
    assert_eq!(forbidden.status.code(), Some(1));
    assert!(
        stderr(&forbidden).contains(
            "error: failed to create configmap: configmaps is forbidden: User \"system:serviceaccount:default:default\" cannot create resource \"configmaps\" in API group \"\" in the namespace \"default\""
        ),
        "{}",
        stderr(&forbidden)
    );

    // A token signed by another key.
    let other = gateway_user::testing_apiserver::token::TokenIssuer::generate().expect("key");
    let foreign = other.mint(
        &gateway_user::testing_apiserver::token::BoundToken::for_pod(
            "default",
            "default",
            &cluster.pod.name,
            &cluster.pod.uid,
        ),
    );
    let output = cluster.curl(&[
        "-H",
        &format!("Authorization: Bearer {foreign}"),
        "-w",
        "\n%{http_code}",
        &cluster.url("/api/v1/namespaces/default/pods"),
    ]);
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').expect("body and status code");
    assert_eq!(code, "401", "{text}");
    let status: Value = serde_json::from_str(body).expect("a Status body");
    assert_eq!(status["kind"], "Status");
    assert_eq!(status["reason"], "Unauthorized");

    // A valid token for a pod UID that does not exist.
    let stale = cluster.api.issuer.mint(
        &gateway_user::testing_apiserver::token::BoundToken::for_pod(
            "default",
            "default",
            &cluster.pod.name,
            "00000000-0000-0000-0000-000000000000",
        ),
    );
    let output = cluster.curl(&[
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "-H",
        &format!("Authorization: Bearer {stale}"),
        &cluster.url("/api/v1/namespaces/default/pods"),
    ]);
    assert_eq!(String::from_utf8_lossy(&output.stdout), "401");

    // No token at all: anonymous may read the version but not the API.
    let output = cluster.curl(&[
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        &cluster.url("/version"),
    ]);
    assert_eq!(String::from_utf8_lossy(&output.stdout), "200");
    let output = cluster.curl(&[
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        &cluster.url("/api/v1/pods"),
    ]);
    assert_eq!(String::from_utf8_lossy(&output.stdout), "403");
}

#[test]
fn bad_requests_get_status_errors() {
    let cluster = Cluster::new("kube_bad_input", |_| {});
    let auth = format!("Authorization: Bearer {}", cluster.token());
    let cases: [(&[&str], &str, &str); 4] = [
        (
            &[
                "-X",
                "POST",
                "-H",
                "Content-Type: application/json",
                "--data",
                "{not json",
            ],
            "/api/v1/namespaces/default/configmaps",
            "400",
        ),
        (
            &[
                "-X",
                "POST",
                "-H",
                "Content-Type: application/json",
                "--data",
                r#"{"kind":"Secret","apiVersion":"v1","metadata":{"name":"a"}}"#,
            ],
            "/api/v1/namespaces/default/configmaps",
            "400",
        ),
        (
            &[
                "-X",
                "POST",
                "-H",
                "Content-Type: application/json",
                "--data",
                r#"{"kind":"ConfigMap","apiVersion":"v1","metadata":{"name":"Bad_Name"}}"#,
            ],
            "/api/v1/namespaces/default/configmaps",
            "422",
        ),
        (
            &[],
            "/api/v1/namespaces/default/configmaps?labelSelector=a%20in%20b",
            "400",
        ),
    ];
    for (extra, path, code) in cases {
        let mut args = vec!["-H", &auth, "-w", "\n%{http_code}"];
        args.extend_from_slice(extra);
        let url = cluster.url(path);
        args.push(&url);
        let output = cluster.curl(&args);
        let text = String::from_utf8_lossy(&output.stdout).into_owned();
        let (body, status_code) = text.rsplit_once('\n').expect("body and status code");
        assert_eq!(status_code, code, "{path}: {text}");
        let status: Value = serde_json::from_str(body).expect("a Status body");
        assert_eq!(status["kind"], "Status", "{path}");
        assert_eq!(status["code"].as_u64(), code.parse().ok(), "{path}");
    }
}

/// Splits a protobuf message into (field number, payload) for length-delimited fields.
fn proto_fields(mut bytes: &[u8]) -> Vec<(u64, Vec<u8>)> {
    fn varint(bytes: &mut &[u8]) -> u64 {
        let mut value = 0;
        let mut shift = 0;
        loop {
            let byte = bytes[0];
            *bytes = &bytes[1..];
            value |= u64::from(byte & 0x7f) << shift;
            if byte < 0x80 {
                return value;
            }
            shift += 7;
        }
    }
    let mut fields = Vec::new();
    while !bytes.is_empty() {
        let tag = varint(&mut bytes);
        match tag & 7 {
            2 => {
                let len = varint(&mut bytes) as usize;
                fields.push((tag >> 3, bytes[..len].to_vec()));
                bytes = &bytes[len..];
            }
            0 => {
                varint(&mut bytes);
            }
            other => panic!("unexpected wire type {other}"),
        }
    }
    fields
}

#[test]
fn configmap_protobuf_get_and_list() {
    let cluster = Cluster::new("kube_protobuf", |_| {});
    let auth = format!("Authorization: Bearer {}", cluster.token());
    let accept = "Accept: application/vnd.kubernetes.protobuf, application/json";

    let output = cluster.curl(&[
        "-H",
        &auth,
        "-H",
        accept,
        "-D",
        "/dev/stderr",
        &cluster.url("/api/v1/namespaces/default/configmaps/settings"),
    ]);
    assert!(
        stderr(&output)
            .to_ascii_lowercase()
            .contains("content-type: application/vnd.kubernetes.protobuf"),
        "{}",
        stderr(&output)
    );
    let body = output.stdout;
    assert_eq!(&body[..4], b"k8s\0");
    let unknown = proto_fields(&body[4..]);
    let type_meta = proto_fields(&unknown[0].1);
    assert_eq!(type_meta[1], (2, b"ConfigMap".to_vec()));
    let config_map = proto_fields(&unknown[1].1);
    let metadata = proto_fields(&config_map[0].1);
    assert_eq!(metadata[0], (1, b"settings".to_vec()));
    let entries: Vec<(Vec<u8>, Vec<u8>)> = config_map[1..]
        .iter()
        .filter(|(field, _)| *field == 2)
        .map(|(_, entry)| {
            let kv = proto_fields(entry);
            (kv[0].1.clone(), kv[1].1.clone())
        })
        .collect();
    assert_eq!(
        entries,
        [
            (b"color".to_vec(), b"blue".to_vec()),
            (b"size".to_vec(), b"10".to_vec())
        ]
    );

    let output = cluster.curl(&[
        "-H",
        &auth,
        "-H",
        accept,
        &cluster.url("/api/v1/namespaces/default/configmaps"),
    ]);
    let body = output.stdout;
    assert_eq!(&body[..4], b"k8s\0");
    let unknown = proto_fields(&body[4..]);
    assert_eq!(
        proto_fields(&unknown[0].1)[1],
        (2, b"ConfigMapList".to_vec())
    );
    let list = proto_fields(&unknown[1].1);
    let items: Vec<_> = list.iter().filter(|(field, _)| *field == 2).collect();
    assert_eq!(items.len(), 1);

    // Protobuf alone, for a resource served only as JSON, is not acceptable.
    let output = cluster.curl(&[
        "-H",
        &auth,
        "-H",
        "Accept: application/vnd.kubernetes.protobuf",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        &cluster.url("/api/v1/namespaces/default/pods"),
    ]);
    assert_eq!(String::from_utf8_lossy(&output.stdout), "406");
}

/// Starts `command` with its standard output read line by line on a thread.
fn spawn_lines(mut command: Command) -> (ChildGuard, mpsc::Receiver<String>) {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the command");
    let stdout = child.stdout.take().expect("piped stdout");
    let (sender, receiver) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if sender.send(line).is_err() {
                break;
            }
        }
    });
    (ChildGuard(child), receiver)
}

/// Waits for a line containing `needle`, failing after a generous timeout.
fn wait_for_line(lines: &mpsc::Receiver<String>, needle: &str) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) if line.contains(needle) => return line,
            Ok(_) => {}
            Err(error) => panic!("no line containing {needle:?}: {error}"),
        }
    }
}

#[test]
fn kubectl_watch_sees_changes() {
    let cluster = Cluster::new("kube_watch", |_| {});
    let (_watch, lines) = spawn_lines(cluster.kubectl(&["get", "configmaps", "-w"]));
    let header = wait_for_line(&lines, "NAME");
    assert_eq!(
        header.split_whitespace().collect::<Vec<_>>(),
        ["NAME", "DATA", "AGE"]
    );
    let first = wait_for_line(&lines, "settings");
    assert_eq!(first.split_whitespace().nth(1), Some("2"));

    cluster.ok(&["create", "configmap", "fresh", "--from-literal=a=b"]);
    let added = wait_for_line(&lines, "fresh");
    assert_eq!(added.split_whitespace().nth(1), Some("1"));
    cluster.ok(&["delete", "configmap", "settings"]);
    // kubectl -w prints a deleted object once more as its last state.
    wait_for_line(&lines, "settings");
}

#[test]
fn watch_stream_sends_events_and_bookmarks() {
    let cluster = Cluster::new("kube_watch_raw", |options| {
        options.bookmark_interval = Duration::from_millis(200);
    });
    let auth = format!("Authorization: Bearer {}", cluster.token());
    let list = cluster.curl(&[
        "-H",
        &auth,
        &cluster.url("/api/v1/namespaces/default/configmaps"),
    ]);
    let list: Value = serde_json::from_slice(&list.stdout).expect("a ConfigMapList");
    let version = list["metadata"]["resourceVersion"]
        .as_str()
        .expect("list resourceVersion")
        .to_string();
    cluster.ok(&["create", "configmap", "later", "--from-literal=k=v"]);

    // From the list's version: the create above comes first, then bookmarks until the
    // timeout ends the response.
    let output = cluster.curl(&[
        "-N",
        "-H",
        &auth,
        &cluster.url(&format!(
            "/api/v1/namespaces/default/configmaps?watch=true&resourceVersion={version}&allowWatchBookmarks=true&timeoutSeconds=1"
        )),
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    let events: Vec<Value> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).expect("one JSON event per line"))
        .collect();
    assert_eq!(events[0]["type"], "ADDED");
    assert_eq!(events[0]["object"]["metadata"]["name"], "later");
    let bookmarks: Vec<&Value> = events
        .iter()
        .filter(|event| event["type"] == "BOOKMARK")
        .collect();
    assert!(!bookmarks.is_empty(), "no BOOKMARK in {events:?}");
    assert_eq!(bookmarks[0]["object"]["kind"], "ConfigMap");
    assert_eq!(
        bookmarks[0]["object"]["metadata"]["resourceVersion"],
        events[0]["object"]["metadata"]["resourceVersion"]
    );

    // A watch on one object's path gets events of that object only.
    let output = cluster.curl(&[
        "-N",
        "-H",
        &auth,
        &cluster.url("/api/v1/namespaces/default/configmaps/later?watch=true&timeoutSeconds=1"),
    ]);
    let names: Vec<Value> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|line| {
            let event: Value = serde_json::from_str(line).expect("one JSON event per line");
            event["object"]["metadata"]["name"].clone()
        })
        .collect();
    assert_eq!(names, [json!("later")]);

    // A resourceVersion that is not a number is a bad request.
    let output = cluster.curl(&[
        "-H",
        &auth,
        "-w",
        "\n%{http_code}",
        &cluster.url("/api/v1/namespaces/default/configmaps?watch=true&resourceVersion=abc"),
    ]);
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(text.ends_with("\n400"), "{text}");
}

const TESTPEER: &str = env!("CARGO_BIN_EXE_gateway-testpeer");

/// Both transports kubectl 1.32 has for exec and port-forward: WebSocket (its default) and
/// SPDY/3.1.
const TRANSPORTS: [&str; 2] = ["true", "false"];

/// Returns the request methods the server logged for a pod subresource, oldest first: GET
/// for WebSocket, POST for SPDY.
fn exec_methods(log: &str, subresource: &str) -> Vec<String> {
    log.lines()
        .filter(|line| line.contains(&format!("/pods/client/{subresource} ")))
        .filter_map(|line| line.split("method=").nth(1))
        .filter_map(|rest| rest.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

#[test]
fn kubectl_exec_pipes_stdin_and_exit_code() {
    let cluster = Cluster::new("kube_exec", |_| {});
    for websockets in TRANSPORTS {
        let expected_method = if websockets == "true" { "GET" } else { "POST" };

        let mut child = cluster
            .kubectl(&["exec", "-i", "client", "--", "cat"])
            .env("KUBECTL_REMOTE_COMMAND_WEBSOCKETS", websockets)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start kubectl exec");
        let input: Vec<u8> = (0..200_000u32).map(|i| b'a' + (i % 26) as u8).collect();
        let mut stdin = child.stdin.take().expect("piped stdin");
        let writer = {
            let input = input.clone();
            std::thread::spawn(move || stdin.write_all(&input))
        };
        let mut output = Vec::new();
        child
            .stdout
            .take()
            .expect("piped stdout")
            .read_to_end(&mut output)
            .expect("read exec output");
        writer.join().expect("writer thread").expect("write stdin");
        let status = child.wait().expect("wait for kubectl");
        let mut errors = String::new();
        child
            .stderr
            .take()
            .expect("piped stderr")
            .read_to_string(&mut errors)
            .expect("read stderr");
        assert!(
            status.success(),
            "websockets={websockets}: {status}: {errors}"
        );
        assert_eq!(output.len(), input.len(), "websockets={websockets}");
        assert!(
            output == input,
            "websockets={websockets}: output differs from input"
        );

        let exit = cluster
            .kubectl(&["exec", "client", "--", "sh", "-c", "exit 3"])
            .env("KUBECTL_REMOTE_COMMAND_WEBSOCKETS", websockets)
            .stdin(Stdio::null())
            .output()
            .expect("run kubectl exec");
        assert_eq!(
            exit.status.code(),
            Some(3),
            "websockets={websockets}: {}",
            stderr(&exit)
        );

        let split = cluster
            .kubectl(&["exec", "client", "--", "sh", "-c", "echo out; echo err >&2"])
            .env("KUBECTL_REMOTE_COMMAND_WEBSOCKETS", websockets)
            .stdin(Stdio::null())
            .output()
            .expect("run kubectl exec");
        assert!(
            split.status.success(),
            "websockets={websockets}: {}",
            stderr(&split)
        );
        assert_eq!(String::from_utf8_lossy(&split.stdout), "out\n");
        assert_eq!(stderr(&split), "err\n");

        let methods = exec_methods(&cluster.api.log(), "exec");
        assert_eq!(
            methods[methods.len() - 3..],
            [expected_method; 3],
            "websockets={websockets}"
        );
    }

    let missing = cluster.run(&["exec", "nosuchpod", "--", "true"]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(
        stderr(&missing).contains("Error from server (NotFound): pods \"nosuchpod\" not found"),
        "{}",
        stderr(&missing)
    );
}

#[test]
fn websocket_upgrade_failure_is_not_101() {
    let cluster = Cluster::new("kube_ws_fail", |_| {});
    let auth = format!("Authorization: Bearer {}", cluster.token());
    let output = cluster.curl(&[
        "--http1.1",
        "-H",
        &auth,
        "-H",
        "Connection: Upgrade",
        "-H",
        "Upgrade: websocket",
        "-H",
        "Sec-WebSocket-Version: 13",
        "-H",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        "-H",
        "Sec-WebSocket-Protocol: bogus.example",
        "-w",
        "\n%{http_code}",
        &cluster.url("/api/v1/namespaces/default/pods/client/exec?command=true&stdout=true"),
    ]);
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').expect("body and status code");
    assert_eq!(code, "400", "{text}");
    let status: Value = serde_json::from_str(body).expect("a Status body");
    assert_eq!(status["reason"], "BadRequest");

    // A plain request with no upgrade at all.
    let output = cluster.curl(&[
        "-H",
        &auth,
        "-X",
        "POST",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        &cluster.url("/api/v1/namespaces/default/pods/client/exec?command=true&stdout=true"),
    ]);
    assert_eq!(String::from_utf8_lossy(&output.stdout), "400");
}

#[test]
fn kubectl_port_forward_parallel_connections() {
    let cluster = Cluster::new("kube_port_forward", |_| {});
    let mut echo = cluster.node.in_server(&cluster.server, TESTPEER);
    echo.args(["serve", "--listen", "127.0.0.1:8080"])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let _echo = ChildGuard(echo.spawn().expect("start the echo server"));

    for (index, websockets) in TRANSPORTS.iter().enumerate() {
        let local_port = 18080 + index;
        let mut forward =
            cluster.kubectl(&["port-forward", "pod/client", &format!("{local_port}:8080")]);
        forward.env("KUBECTL_PORT_FORWARD_WEBSOCKETS", websockets);
        let (_forward, lines) = spawn_lines(forward);
        wait_for_line(&lines, &format!("Forwarding from 127.0.0.1:{local_port}"));

        let clients: Vec<_> = (0..4)
            .map(|_| {
                let mut client = cluster.node.in_pod(&cluster.pod, TESTPEER);
                client.args([
                    "client",
                    "--connect",
                    &format!("127.0.0.1:{local_port}"),
                    "--bytes",
                    "300000",
                ]);
                client
                    .stdin(Stdio::null())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .expect("start a client")
            })
            .collect();
        for client in clients {
            let output = client.wait_with_output().expect("wait for a client");
            assert!(
                output.status.success(),
                "websockets={websockets}: {}\nserver log:\n{}",
                stderr(&output),
                cluster.api.log()
            );
        }
        let methods = exec_methods(&cluster.api.log(), "portforward");
        let expected = if *websockets == "true" { "GET" } else { "POST" };
        assert_eq!(methods.last().map(String::as_str), Some(expected));
    }
}

#[test]
fn kubectl_exec_terminal_with_resize() {
    let cluster = Cluster::new("kube_exec_tty", |_| {});
    for websockets in TRANSPORTS {
        // `script` gives kubectl a terminal of 30 rows and 100 columns. kubectl sends that
        // size on the resize channel, and the remote shell reads it back with `stty size`.
        let mut command = cluster.api.in_cluster(
            &cluster.node,
            &cluster.pod,
            &cluster.service_account,
            &cluster.home,
            "script",
        );
        command
            .args([
                "-qec",
                "stty rows 30 cols 100; exec kubectl exec -it client -- sh",
                "/dev/null",
            ])
            .env("KUBECTL_REMOTE_COMMAND_WEBSOCKETS", websockets)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command.spawn().expect("start kubectl exec -it");
        let mut stdin = child.stdin.take().expect("piped stdin");
        stdin
            .write_all(b"stty size; echo $((6*7)); tty\nexit 4\n")
            .expect("type into the terminal");
        let output = child.wait_with_output().expect("wait for kubectl");
        drop(stdin);

        let text = String::from_utf8_lossy(&output.stdout).replace('\r', "");
        let lines: Vec<&str> = text.lines().map(str::trim).collect();
        // The shell's prompt may precede a line of output.
        assert!(
            lines.iter().any(|line| line.ends_with("30 100")),
            "websockets={websockets}: {text}"
        );
        assert!(
            lines
                .iter()
                .any(|line| line.ends_with("42") && !line.contains('*')),
            "websockets={websockets}: {text}"
        );
        assert!(
            lines.iter().any(|line| line.starts_with("/dev/pts/")),
            "websockets={websockets}: no terminal in {text}"
        );
        assert_eq!(
            output.status.code(),
            Some(4),
            "websockets={websockets}: {text}"
        );
    }
}

#[test]
fn watch_event_split_across_chunks_and_http2() {
    let cluster = Cluster::new("kube_watch_split", |options| {
        options.split_watch_after = Some("4111-1111".to_string());
    });
    let auth = format!("Authorization: Bearer {}", cluster.token());
    cluster.ok(&[
        "create",
        "configmap",
        "card",
        "--from-literal=number=4111-1111-1111-1111",
    ]);

    // curl's trace shows each chunk of the HTTP/1.1 response as it is received.
    let trace = cluster.node.dir.join("watch-trace.txt");
    let output = cluster.curl(&[
        "--http1.1",
        "-N",
        "--trace-ascii",
        trace.to_str().expect("UTF-8 path"),
        "-H",
        &auth,
        &cluster.url("/api/v1/namespaces/default/configmaps?watch=true&fieldSelector=metadata.name%3Dcard&timeoutSeconds=1"),
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    let event: Value = serde_json::from_slice(&output.stdout).expect("one whole JSON event");
    assert_eq!(event["object"]["data"]["number"], "4111-1111-1111-1111");
    let trace = std::fs::read_to_string(&trace).expect("read the curl trace");
    let received: Vec<&str> = trace
        .lines()
        .filter(|line| line.starts_with("<= Recv data"))
        .collect();
    assert!(
        received.len() >= 2,
        "the event came in {} read(s): {trace}",
        received.len()
    );

    // The same server speaks HTTP/2 when the client offers it.
    let output = cluster.curl(&[
        "--http2",
        "-o",
        "/dev/null",
        "-w",
        "%{http_version}",
        "-H",
        &auth,
        &cluster.url("/api/v1/namespaces/default/pods"),
    ]);
    assert_eq!(String::from_utf8_lossy(&output.stdout), "2");
}

#[test]
fn malformed_peers_leave_server_serving() {
    let cluster = Cluster::new("kube_malformed", |_| {});
    let target = format!("{}:{}", cluster.api.address, cluster.api.port);
    // Not TLS at all, then TLS carrying a request line that is not HTTP.
    let mut garbage = cluster.node.in_pod(&cluster.pod, "sh");
    garbage
        .args([
            "-c",
            "printf 'GARBAGE\\r\\n\\r\\n' | socat -t1 - TCP:$0; \
             printf 'NOT HTTP AT ALL\\r\\n\\r\\n' | socat -t1 - OPENSSL:$0,verify=0",
            &target,
        ])
        .stdin(Stdio::null());
    let output = garbage.output().expect("run socat");
    let answer = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        answer.contains("400"),
        "no 400 for a malformed request: {answer}"
    );

    // A header block of 800 KiB, more than the server reads, is not served. The real server
    // returns 431, but this one leaves the request unanswered (see the module's NOTE), so curl
    // gives up after its time limit.
    let auth = format!("Authorization: Bearer {}", cluster.token());
    let huge = cluster.node.dir.join("huge-header.txt");
    let lines: String = (0..200)
        .map(|index| format!("X-Filler-{index}: {}\n", "a".repeat(4096)))
        .collect();
    std::fs::write(&huge, lines).expect("write the header file");
    let huge = format!("@{}", huge.display());
    let output = cluster.curl(&[
        "--http1.1",
        "--max-time",
        "5",
        "-H",
        &auth,
        "-H",
        &huge,
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        &cluster.url("/api/v1/namespaces/default/pods"),
    ]);
    let code = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        code == "431" || code == "000",
        "oversized headers got {code}: {}",
        stderr(&output)
    );

    assert!(cluster.ok(&["get", "pods"]).contains("client"));
}

#[test]
fn configmap_protobuf_watch_frames() {
    let cluster = Cluster::new("kube_protobuf_watch", |_| {});
    let auth = format!("Authorization: Bearer {}", cluster.token());
    let output = cluster.curl(&[
        "-N",
        "-H",
        &auth,
        "-H",
        "Accept: application/vnd.kubernetes.protobuf, application/json",
        "-D",
        "/dev/stderr",
        &cluster.url("/api/v1/namespaces/default/configmaps?watch=true&timeoutSeconds=1"),
    ]);
    assert!(
        stderr(&output)
            .to_ascii_lowercase()
            .contains("content-type: application/vnd.kubernetes.protobuf;stream=watch"),
        "{}",
        stderr(&output)
    );

    // One frame: a 4-byte length, then the enveloped WatchEvent of the seeded ConfigMap.
    let body = output.stdout;
    let length = u32::from_be_bytes([body[0], body[1], body[2], body[3]]) as usize;
    assert_eq!(body.len(), 4 + length, "exactly one event frame");
    let message = &body[4..];
    assert_eq!(&message[..4], b"k8s\0");
    let unknown = proto_fields(&message[4..]);
    assert_eq!(proto_fields(&unknown[0].1)[1], (2, b"WatchEvent".to_vec()));
    let event = proto_fields(&unknown[1].1);
    assert_eq!(event[0], (1, b"ADDED".to_vec()));
    let raw = &proto_fields(&event[1].1)[0].1;
    assert_eq!(&raw[..4], b"k8s\0");
    let object = proto_fields(&raw[4..]);
    assert_eq!(proto_fields(&object[0].1)[1], (2, b"ConfigMap".to_vec()));
    let metadata = proto_fields(&proto_fields(&object[1].1)[0].1);
    assert_eq!(metadata[0], (1, b"settings".to_vec()));
}
