//! The Kubernetes API handler end to end: real `kubectl` and `curl` in a pod namespace, every
//! connection redirected by the real eBPF programs into `gatewayd`, and an API server upstream
//! in a server namespace. The serving certificate is made with `gatewayctl cert issue` from
//! the same cluster CA the pod trusts. Needs root; run with `cargo xtask test`.
//!
//! The upstream here is a small HTTP server in this file that returns fixed objects, so each
//! test controls exactly what the API server sends (a PAN split across two watch chunks, a
//! protobuf body) and can see what reached it.

use std::{
    convert::Infallible,
    net::SocketAddr,
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    pin::Pin,
    process::{Output, Stdio},
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::Duration,
};

use base64::Engine as _;
use bytes::Bytes;
use gateway_user::testing::{Pod, Server, TestNode};
use http_body_util::{BodyExt as _, Full, combinators::UnsyncBoxBody};
use hyper::{
    Request, Response,
    body::{Body, Frame, Incoming},
    service::service_fn,
};
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject as _;
use serde_json::Value;

const GATEWAYD: &str = env!("CARGO_BIN_EXE_gatewayd");
const GATEWAYCTL: &str = env!("CARGO_BIN_EXE_gatewayctl");

const PAN: &str = "4111-1111-1111-1111";
const MASKED_PAN: &str = "4111-11**-****-1111";
const API_PORT: u16 = 443;

/// A request as the upstream server saw it.
#[derive(Clone, Debug)]
struct SeenRequest {
    path: String,
    version: http::Version,
    authorization: Option<String>,
    accept_encoding: Option<String>,
    websocket_extensions: Option<String>,
    websocket_protocol: Option<String>,
}

/// The upstream API server: a thread inside the server namespace running a hyper server with
/// TLS from the cluster CA.
struct Upstream {
    seen: Arc<Mutex<Vec<SeenRequest>>>,
}

/// A response body fed from a channel, so a handler can send chunks with pauses between.
struct ChannelBody(tokio::sync::mpsc::Receiver<Bytes>);

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0
            .poll_recv(cx)
            .map(|chunk| chunk.map(|chunk| Ok(Frame::data(chunk))))
    }
}

type TestBody = UnsyncBoxBody<Bytes, Infallible>;

fn full(body: impl Into<Bytes>) -> TestBody {
    Full::new(body.into()).boxed_unsync()
}

fn configmap_json() -> String {
    serde_json::json!({
        "kind": "ConfigMap",
        "apiVersion": "v1",
        "metadata": {"name": "cards", "namespace": "default", "resourceVersion": "7"},
        "data": {"card": PAN, "note": "order 1748503543012"},
    })
    .to_string()
}

/// A ConfigMap in Kubernetes protobuf: the `k8s\0` prefix and a `runtime.Unknown` whose raw
/// message holds the card number as a string field.
fn configmap_protobuf() -> Vec<u8> {
    let mut raw = vec![0x12, PAN.len() as u8];
    raw.extend_from_slice(PAN.as_bytes());
    let type_meta = b"\x0a\x02v1\x12\x09ConfigMap";
    let mut body = b"k8s\0".to_vec();
    body.push(0x0a);
    body.push(type_meta.len() as u8);
    body.extend_from_slice(type_meta);
    body.push(0x12);
    body.push(raw.len() as u8);
    body.extend_from_slice(&raw);
    body
}

async fn serve_request(
    mut request: Request<Incoming>,
    seen: Arc<Mutex<Vec<SeenRequest>>>,
) -> Result<Response<TestBody>, Infallible> {
    let header = |name: http::header::HeaderName| {
        request
            .headers()
            .get(name)
            .map(|value| String::from_utf8_lossy(value.as_bytes()).into_owned())
    };
    seen.lock().expect("seen lock").push(SeenRequest {
        path: request
            .uri()
            .path_and_query()
            .map(|path| path.to_string())
            .unwrap_or_default(),
        version: request.version(),
        authorization: header(http::header::AUTHORIZATION),
        accept_encoding: header(http::header::ACCEPT_ENCODING),
        websocket_extensions: header(http::header::SEC_WEBSOCKET_EXTENSIONS),
        websocket_protocol: header(http::header::SEC_WEBSOCKET_PROTOCOL),
    });
    let accept = header(http::header::ACCEPT).unwrap_or_default();
    // The API server responds to HEAD as to GET, without the content.
    let head = request.method() == http::Method::HEAD;

    let response = match (request.uri().path(), request.uri().query()) {
        ("/api/v1/namespaces/default/configmaps/cards", _) if accept.contains("protobuf") => {
            Response::builder()
                .header("content-type", "application/vnd.kubernetes.protobuf")
                .body(full(configmap_protobuf()))
        }
        ("/api/v1/namespaces/default/configmaps/cards", _) => Response::builder()
            .header("content-type", "application/json")
            .body(full(configmap_json())),
        ("/api/v1/namespaces/default/configmaps", Some(query)) if query.contains("watch=true") => {
            // The card number is cut in the middle, and the halves leave as separate chunks.
            let event = format!(
                "{{\"type\":\"ADDED\",\"object\":{}}}\n",
                configmap_json()
            );
            let cut = event.find(PAN).expect("event holds the PAN") + 7;
            let (first, second) = event.split_at(cut);
            let bookmark = "{\"type\":\"BOOKMARK\",\"object\":{\"kind\":\"ConfigMap\",\"apiVersion\":\"v1\",\"metadata\":{\"resourceVersion\":\"8\"}}}\n";
            let chunks = [first.to_string(), second.to_string(), bookmark.to_string()];
            let (sender, receiver) = tokio::sync::mpsc::channel(4);
            tokio::spawn(async move {
                for chunk in chunks {
                    if sender.send(Bytes::from(chunk)).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
            });
            Response::builder()
                .header("content-type", "application/json")
                .body(ChannelBody(receiver).boxed_unsync())
        }
        // A server that breaks RFC 6455: it accepts the WebSocket upgrade with
        // permessage-deflate whether or not the client offered it.
        ("/api/v1/namespaces/default/pods/app/exec", _) => Response::builder()
            .status(101)
            .header("upgrade", "websocket")
            .header("connection", "Upgrade")
            .header("sec-websocket-protocol", "v5.channel.k8s.io")
            .header("sec-websocket-extensions", "permessage-deflate")
            .body(full(Bytes::new())),
        // Accepts the WebSocket upgrade with the subprotocol named by `choose=`, offered or
        // not, and then closes the connection.
        ("/api/v1/namespaces/default/pods/app/attach", Some(query)) => {
            let chosen = query
                .split('&')
                .find_map(|pair| pair.strip_prefix("choose="))
                .unwrap_or_default()
                .to_string();
            Response::builder()
                .status(101)
                .header("upgrade", "websocket")
                .header("connection", "Upgrade")
                .header("sec-websocket-protocol", chosen)
                .body(full(Bytes::new()))
        }
        // Port-forward over WebSocket, accepted with `v4.channel.k8s.io` as the kubelet does.
        // Each channel's first message is the port (12345, little-endian: the bytes "90").
        // Then channel 0 carries a card number cut across two messages, sent in one write.
        ("/api/v1/namespaces/default/pods/app/portforward", _) => websocket_messages(
            &mut request,
            "v4.channel.k8s.io",
            &[b"\x0090", b"\x0190", b"\x00row 4111 1111 ", b"\x001111 1111 end\n"],
        ),
        // A log followed over WebSocket: binary messages without channels.
        ("/api/v1/namespaces/default/pods/app/log", _) => websocket_messages(
            &mut request,
            "binary.k8s.io",
            &[b"paid with 4111 1111 ", b"1111 1111 end\n"],
        ),
        ("/version", _) => Response::builder()
            .header("content-type", "application/json")
            .body(full(r#"{"major":"1","minor":"32","gitVersion":"v1.32.0"}"#)),
        _ => Response::builder()
            .status(404)
            .header("content-type", "application/json")
            .body(full(
                r#"{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"not found","reason":"NotFound","code":404}"#,
            )),
    };
    let response = response.expect("valid response");
    if head {
        let (parts, _) = response.into_parts();
        return Ok(Response::from_parts(parts, full(Bytes::new())));
    }
    Ok(response)
}

/// Accepts `request`'s WebSocket upgrade with `protocol`, then writes `messages` as binary
/// WebSocket messages in one write and closes the connection.
fn websocket_messages(
    request: &mut Request<Incoming>,
    protocol: &'static str,
    messages: &[&[u8]],
) -> http::Result<Response<TestBody>> {
    let mut frames = Vec::new();
    for payload in messages {
        frames.extend_from_slice(&[0x82, payload.len() as u8]);
        frames.extend_from_slice(payload);
    }
    let upgrade = hyper::upgrade::on(request);
    tokio::spawn(async move {
        let Ok(upgraded) = upgrade.await else {
            return;
        };
        let mut io = TokioIo::new(upgraded);
        let _ = tokio::io::AsyncWriteExt::write_all(&mut io, &frames).await;
        let _ = tokio::io::AsyncWriteExt::shutdown(&mut io).await;
    });
    Response::builder()
        .status(101)
        .header("upgrade", "websocket")
        .header("connection", "Upgrade")
        .header("sec-websocket-protocol", protocol)
        .body(full(Bytes::new()))
}

/// Starts the upstream API server in `server`'s namespace on port 443.
fn start_upstream(server: &Server, cert: &Path, key: &Path) -> Upstream {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let netns = std::fs::File::open(Path::new("/var/run/netns").join(&server.netns))
        .expect("open server namespace");
    let config = {
        let certs = rustls::pki_types::CertificateDer::pem_file_iter(cert)
            .expect("read certificate")
            .collect::<Result<Vec<_>, _>>()
            .expect("parse certificate");
        let key = rustls::pki_types::PrivateKeyDer::from_pem_file(key).expect("read key");
        #[expect(deprecated, reason = "ring is the provider the gateway builds with")]
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .expect("server certificate");
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Arc::new(config)
    };
    let addr = SocketAddr::new(server.addr_v4.into(), API_PORT);
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let thread_seen = Arc::clone(&seen);
    std::thread::spawn(move || {
        // setns changes only this thread's namespace.
        gateway_user::sys::setns_net(netns.as_raw_fd()).expect("enter server namespace");
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .expect("bind upstream");
            ready_tx.send(()).expect("report ready");
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let acceptor = tokio_rustls::TlsAcceptor::from(Arc::clone(&config));
                let seen = Arc::clone(&thread_seen);
                tokio::spawn(async move {
                    let Ok(stream) = acceptor.accept(stream).await else {
                        return;
                    };
                    let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
                    let service =
                        service_fn(move |request| serve_request(request, Arc::clone(&seen)));
                    let io = TokioIo::new(stream);
                    if h2 {
                        let _ = hyper::server::conn::http2::Builder::new(
                            hyper_util::rt::TokioExecutor::new(),
                        )
                        .serve_connection(io, service)
                        .await;
                    } else {
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(io, service)
                            .with_upgrades()
                            .await;
                    }
                });
            }
        });
    });
    ready_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("upstream started");
    Upstream { seen }
}

/// The cluster CA: its certificate and PKCS#8 key as files, as a control plane keeps them.
struct ClusterCa {
    cert: PathBuf,
    key: PathBuf,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

impl ClusterCa {
    fn new(dir: &Path) -> Self {
        let key = rcgen::KeyPair::generate().expect("generate CA key");
        let mut params =
            rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "kubernetes");
        let cert = params.self_signed(&key).expect("self-sign CA");
        let cert_path = dir.join("cluster-ca.crt");
        let key_path = dir.join("cluster-ca.key");
        std::fs::write(&cert_path, cert.pem()).expect("write CA certificate");
        std::fs::write(&key_path, key.serialize_pem()).expect("write CA key");
        Self {
            cert: cert_path,
            key: key_path,
            issuer: rcgen::Issuer::new(params, key),
        }
    }

    /// Issues the API server's own certificate.
    fn issue_apiserver(&self, dir: &Path, names: &[String]) -> (PathBuf, PathBuf) {
        let key = rcgen::KeyPair::generate().expect("generate key");
        let params = rcgen::CertificateParams::new(names.to_vec()).expect("parameters");
        let cert = params.signed_by(&key, &self.issuer).expect("sign");
        let cert_path = dir.join("apiserver.crt");
        let key_path = dir.join("apiserver.key");
        std::fs::write(&cert_path, cert.pem()).expect("write certificate");
        std::fs::write(&key_path, key.serialize_pem()).expect("write key");
        (cert_path, key_path)
    }
}

/// A service-account token bound to `pod` in the real claim layout; the signature is not
/// checked by this upstream.
fn bound_token(pod: &Pod) -> String {
    let engine = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let claims = serde_json::json!({
        "aud": ["https://kubernetes.default.svc"],
        "exp": 4_000_000_000u64,
        "iat": 1_700_000_000u64,
        "iss": "https://kubernetes.default.svc",
        "sub": "system:serviceaccount:default:app",
        "kubernetes.io": {
            "namespace": "default",
            "pod": {"name": pod.name, "uid": pod.uid},
            "serviceaccount": {"name": "app", "uid": "5d0c8c8e-0000-4000-8000-000000000001"},
        },
    });
    format!(
        "{}.{}.{}",
        engine.encode(br#"{"alg":"RS256","kid":"test"}"#),
        engine.encode(claims.to_string()),
        engine.encode(b"signature")
    )
}

struct KubeSetup {
    node: TestNode,
    pod: Pod,
    other_pod: Pod,
    server: Server,
    upstream: Upstream,
    ca: ClusterCa,
    daemon: Option<gateway_user::testing::Daemon>,
}

impl Drop for KubeSetup {
    fn drop(&mut self) {
        if std::thread::panicking()
            && let Some(daemon) = &self.daemon
        {
            eprintln!("gatewayd log:\n{}", daemon.log());
        }
        if let Some(daemon) = self.daemon.take() {
            daemon.stop();
        }
    }
}

/// A node with two pods, an API server at 10.245.0.2:443 and `gatewayd` terminating TLS for
/// it with a certificate from `gatewayctl cert issue`; `rules` is appended to the config.
fn kube_setup(test_name: &str, rules: &str) -> KubeSetup {
    let mut node = TestNode::new(test_name);
    let pod = node.add_pod("app");
    let other_pod = node.add_pod("other");
    let server = node.add_server("apiserver", &[]);
    let server_ip = server.addr_v4.to_string();

    let ca = ClusterCa::new(&node.dir);
    let names = vec![server_ip.clone(), "kubernetes.default.svc".to_string()];
    let (cert, key) = ca.issue_apiserver(&node.dir, &names);
    let upstream = start_upstream(&server, &cert, &key);

    let serving_cert = node.dir.join("gateway-serving.crt");
    let serving_key = node.dir.join("gateway-serving.key");
    let issued = std::process::Command::new(GATEWAYCTL)
        .args(["cert", "issue", "--ca-cert"])
        .arg(&ca.cert)
        .arg("--ca-key")
        .arg(&ca.key)
        .args(["--san", &server_ip, "--san", "kubernetes.default.svc"])
        .arg("--out-cert")
        .arg(&serving_cert)
        .arg("--out-key")
        .arg(&serving_key)
        .output()
        .expect("run gatewayctl cert issue");
    assert!(
        issued.status.success(),
        "gatewayctl cert issue failed: {}",
        String::from_utf8_lossy(&issued.stderr)
    );

    let targets = format!(
        "  - name: kubernetes\n    address: {server_ip}\n    port: {API_PORT}\n    class: kube_api\n\
         \x20   tls:\n      cert: {}\n      key: {}\n\
         \x20   upstream_tls:\n      mode: verify-full\n      ca: {}\n",
        serving_cert.display(),
        serving_key.display(),
        ca.cert.display()
    );
    let config = node.daemon_config("gatewayd.yaml", "", &targets);
    let mut text = std::fs::read_to_string(&config).expect("read config");
    text.push_str(rules);
    std::fs::write(&config, text).expect("write config");
    let daemon = node.start_daemon(Path::new(GATEWAYD), &config, None);
    KubeSetup {
        node,
        pod,
        other_pod,
        server,
        upstream,
        ca,
        daemon: Some(daemon),
    }
}

impl KubeSetup {
    /// Writes a kubeconfig for the API server with `token`, as an in-cluster client would
    /// build it from its service-account volume.
    fn kubeconfig(&self, name: &str, token: &str) -> PathBuf {
        let path = self.node.dir.join(format!("{name}.kubeconfig"));
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: cluster\n  cluster:\n    server: https://{}:{API_PORT}\n    certificate-authority: {}\n\
             users:\n- name: app\n  user:\n    token: {token}\n\
             contexts:\n- name: app\n  context:\n    cluster: cluster\n    user: app\n    namespace: default\n\
             current-context: app\n",
            self.server.addr_v4,
            self.ca.cert.display()
        );
        std::fs::write(&path, text).expect("write kubeconfig");
        path
    }

    /// Runs kubectl with `args` in `pod` (through the gateway) or in the node (direct).
    fn kubectl(&self, pod: Option<&Pod>, token: &str, args: &[&str]) -> Output {
        let kubeconfig = self.kubeconfig("kubectl", token);
        let mut command = match pod {
            Some(pod) => self.node.in_pod(pod, "kubectl"),
            None => self.node.in_node(None, "kubectl"),
        };
        command
            .env("KUBECONFIG", &kubeconfig)
            .env("HOME", &self.node.dir)
            .args(["--request-timeout", "20s"])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run kubectl")
    }

    /// Runs curl in `pod` against the API server with `args`, trusting the cluster CA.
    fn curl(&self, pod: &Pod, args: &[&str]) -> Output {
        self.node
            .in_pod(pod, "curl")
            .args(["-sS", "--max-time", "20", "--cacert"])
            .arg(&self.ca.cert)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run curl")
    }

    /// Sends `request` over TLS from the pod with `openssl s_client` and returns the reply.
    fn raw_tls(&self, request: &[u8]) -> String {
        let server = SocketAddr::new(self.server.addr_v4.into(), API_PORT);
        let mut child = self
            .node
            .in_pod(&self.pod, "openssl")
            .args([
                "s_client",
                "-quiet",
                "-connect",
                &server.to_string(),
                "-CAfile",
            ])
            .arg(&self.ca.cert)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run openssl s_client");
        let mut stdin = child.stdin.take().expect("piped stdin");
        let request = request.to_vec();
        // The server may answer and close before it has read everything.
        let writer = std::thread::spawn(move || {
            use std::io::Write as _;
            let _ = stdin.write_all(&request);
        });
        let output = child.wait_with_output().expect("wait for openssl s_client");
        let _ = writer.join();
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    fn url(&self, path: &str) -> String {
        format!("https://{}:{API_PORT}{path}", self.server.addr_v4)
    }

    fn seen(&self) -> Vec<SeenRequest> {
        self.upstream.seen.lock().expect("seen lock").clone()
    }

    /// Every recorded event, across sessions, after the daemon stopped.
    fn stop_and_read_events(&mut self) -> Vec<Value> {
        if let Some(daemon) = self.daemon.take() {
            daemon.stop();
        }
        self.node.sessions().into_iter().flatten().collect()
    }

    fn recordings_text(&self) -> String {
        self.node
            .session_files()
            .iter()
            .map(|path| std::fs::read_to_string(path).expect("read recording"))
            .collect()
    }
}

fn stdout_of(output: &Output, what: &str) -> String {
    assert!(
        output.status.success(),
        "{what} failed ({:?}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
fn kube_masks_json_protobuf_and_watch() {
    let mut setup = kube_setup("kube_masks_json_protobuf_and_watch", "");
    let token = bound_token(&setup.pod);
    let path = "/api/v1/namespaces/default/configmaps/cards";

    // JSON through the gateway with real kubectl, and direct for comparison.
    let through = stdout_of(
        &setup.kubectl(Some(&setup.pod), &token, &["get", "--raw", path]),
        "kubectl through the gateway",
    );
    let direct = stdout_of(
        &setup.kubectl(None, &token, &["get", "--raw", path]),
        "kubectl direct",
    );
    assert!(direct.contains(PAN), "direct read is unmasked: {direct}");
    assert!(!through.contains(PAN), "PAN leaked: {through}");
    assert_eq!(through.len(), direct.len(), "masking keeps the length");
    let object: Value = serde_json::from_str(&through).expect("masked body is JSON");
    assert_eq!(object["data"]["card"], MASKED_PAN);
    // A 13-digit timestamp passes Luhn but has no card issuer prefix.
    assert_eq!(object["data"]["note"], "order 1748503543012");

    // Protobuf with JSON beside it, as client-go requests it: base64 text is found in JSON
    // strings only, so the gateway requests JSON from the API server.
    let protobuf = setup.curl(
        &setup.pod,
        &[
            "-H",
            &format!("Authorization: Bearer {token}"),
            "-H",
            "Accept: application/vnd.kubernetes.protobuf, application/json",
            &setup.url(path),
        ],
    );
    let body = stdout_of(&protobuf, "curl protobuf or JSON");
    let object: Value = serde_json::from_str(&body).expect("JSON instead of protobuf");
    assert_eq!(object["data"]["card"], MASKED_PAN);
    // Protobuf alone is not acceptable.
    let only_protobuf = setup.curl(
        &setup.pod,
        &[
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-H",
            &format!("Authorization: Bearer {token}"),
            "-H",
            "Accept: application/vnd.kubernetes.protobuf",
            &setup.url(path),
        ],
    );
    assert_eq!(stdout_of(&only_protobuf, "curl protobuf only"), "406");

    // A watch whose event carries the PAN split across two chunks.
    let watch = setup.curl(
        &setup.pod,
        &[
            "-N",
            "-H",
            &format!("Authorization: Bearer {token}"),
            &setup.url("/api/v1/namespaces/default/configmaps?watch=true"),
        ],
    );
    let events = stdout_of(&watch, "curl watch");
    let lines: Vec<Value> = events
        .lines()
        .map(|line| serde_json::from_str(line).expect("watch event is JSON"))
        .collect();
    assert_eq!(lines.len(), 2, "{events}");
    assert_eq!(lines[0]["type"], "ADDED");
    assert_eq!(lines[0]["object"]["data"]["card"], MASKED_PAN);
    assert_eq!(lines[1]["type"], "BOOKMARK");
    assert_eq!(lines[1]["object"]["metadata"]["resourceVersion"], "8");

    // The upstream saw the pod's own token, no compression offer, and HTTP/2 from kubectl.
    let seen = setup.seen();
    let proxied: Vec<&SeenRequest> = seen
        .iter()
        .filter(|request| {
            request
                .path
                .starts_with("/api/v1/namespaces/default/configmaps")
        })
        .collect();
    assert_eq!(proxied.len(), 4, "{seen:#?}");
    for request in &proxied {
        assert_eq!(
            request.authorization.as_deref(),
            Some(format!("Bearer {token}").as_str())
        );
    }
    // The second request is kubectl's direct one, which offers gzip.
    assert_eq!(proxied[1].accept_encoding.as_deref(), Some("gzip"));
    for index in [0, 2, 3] {
        assert_eq!(
            proxied[index].accept_encoding, None,
            "request {index} through the gateway offered compression"
        );
    }
    assert_eq!(proxied[0].version, http::Version::HTTP_2);

    let text = setup.recordings_text();
    let events = setup.stop_and_read_events();
    assert!(!text.contains(PAN), "a recording holds the unmasked PAN");
    // kubectl asks for /version first; the configmap requests follow.
    let requests: Vec<&Value> = events
        .iter()
        .filter(|event| {
            event["event"] == "kube.request" && event["request"]["resource"] == "configmaps"
        })
        .collect();
    // The kubectl GET, the protobuf-or-JSON GET, the protobuf-only one and the watch.
    assert_eq!(requests.len(), 4, "{requests:#?}");
    let get = requests[0];
    assert_eq!(get["request"]["verb"], "get");
    assert_eq!(get["request"]["resource"], "configmaps");
    assert_eq!(get["request"]["namespace"], "default");
    assert_eq!(get["request"]["name"], "cards");
    assert_eq!(get["status"], 200);
    assert_eq!(get["outcome"], "allowed");
    assert_eq!(get["response"]["pans_masked"], 1);
    assert_eq!(get["token"]["pod_uid"], setup.pod.uid.as_str());
    assert_eq!(get["token_pod_mismatch"], false);
    assert_eq!(requests[2]["outcome"], "rejected");
    assert_eq!(requests[2]["status"], 406);
    let watch = requests[3];
    assert_eq!(watch["request"]["verb"], "watch");
    assert_eq!(watch["response"]["complete"], true);
}

const DENY_RULES: &str = "kube_rules:
  - name: no-secret-reads
    verbs: [get, list, watch]
    resources: [secrets]
  - name: no-stolen-tokens
    token_pod_mismatch: true
";

#[test]
fn kube_denies_by_rule_and_stolen_token() {
    let mut setup = kube_setup("kube_denies_by_rule_and_stolen_token", DENY_RULES);
    let token = bound_token(&setup.pod);

    // kubectl prints the gateway's Status as an ordinary Forbidden error.
    let denied = setup.kubectl(
        Some(&setup.pod),
        &token,
        &["get", "--raw", "/api/v1/namespaces/default/secrets/db"],
    );
    assert!(!denied.status.success(), "denied read succeeded");
    let stderr = String::from_utf8_lossy(&denied.stderr);
    assert!(stderr.contains("Error from server (Forbidden)"), "{stderr}");
    assert!(stderr.contains("no-secret-reads"), "{stderr}");

    // The same denial in protobuf when the client prefers it.
    let protobuf = setup.curl(
        &setup.pod,
        &[
            "-o",
            "-",
            "-w",
            "\n%{http_code}",
            "-H",
            "Accept: application/vnd.kubernetes.protobuf, application/json",
            &setup.url("/api/v1/namespaces/default/secrets/db"),
        ],
    );
    let body = stdout_of(&protobuf, "curl protobuf denial");
    assert!(body.starts_with("k8s\0"), "{body:?}");
    assert!(body.ends_with("\n403"), "{body:?}");

    // A token bound to the other pod, used from this one.
    let stolen = bound_token(&setup.other_pod);
    let mismatch = setup.curl(
        &setup.pod,
        &[
            "-w",
            "\n%{http_code}",
            "-H",
            &format!("Authorization: Bearer {stolen}"),
            &setup.url("/api/v1/namespaces/default/configmaps/cards"),
        ],
    );
    let body = stdout_of(&mismatch, "curl with a stolen token");
    assert!(body.ends_with("\n403"), "{body}");
    assert!(body.contains("no-stolen-tokens"), "{body}");

    // The same token as a WebSocket client sends it, in a subprotocol.
    let protocol = format!(
        "Sec-WebSocket-Protocol: base64.binary.k8s.io, base64url.bearer.authorization.k8s.io.{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&stolen)
    );
    let in_protocol = setup.curl(
        &setup.pod,
        &[
            "-w",
            "\n%{http_code}",
            "-H",
            &protocol,
            &setup.url("/api/v1/namespaces/default/configmaps/cards"),
        ],
    );
    let body = stdout_of(&in_protocol, "curl with a stolen token in a subprotocol");
    assert!(body.ends_with("\n403"), "{body}");
    assert!(body.contains("no-stolen-tokens"), "{body}");

    // The same token from its own pod passes.
    let own = setup.curl(
        &setup.other_pod,
        &[
            "-w",
            "\n%{http_code}",
            "-H",
            &format!("Authorization: Bearer {stolen}"),
            &setup.url("/api/v1/namespaces/default/configmaps/cards"),
        ],
    );
    assert!(stdout_of(&own, "curl with its own token").ends_with("\n200"));

    let upstream_paths: Vec<String> = setup.seen().into_iter().map(|seen| seen.path).collect();
    assert!(
        !upstream_paths.iter().any(|path| path.contains("secrets")),
        "a denied request reached the API server: {upstream_paths:?}"
    );

    let events = setup.stop_and_read_events();
    let mismatches: Vec<&Value> = events
        .iter()
        .filter(|event| event["event"] == "token_pod_mismatch")
        .collect();
    assert_eq!(mismatches.len(), 2, "{mismatches:#?}");
    for mismatch in &mismatches {
        assert_eq!(mismatch["token"]["pod_uid"], setup.other_pod.uid.as_str());
    }
    assert_eq!(mismatches[0]["caller_pod_uid"], setup.pod.uid.as_str());
    let denied: Vec<&Value> = events
        .iter()
        .filter(|event| event["event"] == "kube.request" && event["outcome"] == "denied")
        .collect();
    assert_eq!(denied.len(), 4, "{denied:#?}");
    assert_eq!(denied[0]["rule"], "no-secret-reads");
    assert_eq!(denied[0]["status"], 403);
    assert_eq!(denied[2]["rule"], "no-stolen-tokens");
    assert_eq!(denied[3]["rule"], "no-stolen-tokens");
}

#[test]
fn kube_bad_input_ends_only_its_session() {
    let mut setup = kube_setup("kube_bad_input_ends_only_its_session", "");
    let token = bound_token(&setup.pod);
    let server = SocketAddr::new(setup.server.addr_v4.into(), API_PORT);

    // A TLS record header followed by garbage.
    let garbage = setup
        .node
        .in_pod(&setup.pod, "socat")
        .args(["-t", "2", "-", &format!("TCP:{server}")])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write as _;
            child
                .stdin
                .take()
                .expect("piped stdin")
                .write_all(b"\x16\x03\x01\x00\x20not a client hello at all, sorry")?;
            child.wait_with_output()
        })
        .expect("run socat");
    assert!(
        garbage.stdout.is_empty() || garbage.stdout[0] == 0x15,
        "expected nothing or a TLS alert, got {:?}",
        garbage.stdout
    );

    // Malformed HTTP inside TLS: hyper answers 400.
    let malformed = setup.raw_tls(b"GET /version HTTP/1.1\r\nHost\r\n\r\n");
    assert!(malformed.starts_with("HTTP/1.1 400"), "{malformed}");

    // A header block over the limit.
    let mut huge = b"GET /version HTTP/1.1\r\nHost: kubernetes\r\nX-Padding: ".to_vec();
    huge.extend(std::iter::repeat_n(b'a', 2 * 1024 * 1024));
    huge.extend_from_slice(b"\r\n\r\n");
    let oversized = setup.raw_tls(&huge);
    assert!(oversized.starts_with("HTTP/1.1 431"), "{oversized}");

    // An upgrade to a protocol the gateway does not relay.
    let bogus = setup.curl(
        &setup.pod,
        &[
            "--http1.1",
            "-w",
            "\n%{http_code}",
            "-H",
            "Connection: Upgrade",
            "-H",
            "Upgrade: bogus/9",
            "-H",
            &format!("Authorization: Bearer {token}"),
            &setup.url("/api/v1/namespaces/default/pods/web/exec?command=sh"),
        ],
    );
    let body = stdout_of(&bogus, "curl bogus upgrade");
    assert!(body.ends_with("\n400"), "{body}");
    assert!(body.contains("unsupported upgrade protocol"), "{body}");

    // The daemon still serves.
    let after = stdout_of(
        &setup.kubectl(Some(&setup.pod), &token, &["get", "--raw", "/version"]),
        "kubectl after bad input",
    );
    assert!(after.contains("v1.32.0"), "{after}");

    let events = setup.stop_and_read_events();
    let ends: Vec<&Value> = events
        .iter()
        .filter(|event| event["event"] == "session.end")
        .collect();
    assert_eq!(ends.len(), 5, "{ends:#?}");
    let reasons: Vec<String> = ends
        .iter()
        .map(|end| end["reason"].as_str().unwrap_or("").to_string())
        .collect();
    assert!(
        reasons[0].contains("client TLS handshake failed"),
        "{reasons:?}"
    );
    assert!(
        reasons[1].contains("client HTTP connection failed"),
        "{reasons:?}"
    );
    assert!(
        reasons[2].contains("client HTTP connection failed"),
        "{reasons:?}"
    );
    let bogus_request = events
        .iter()
        .find(|event| event["event"] == "kube.request" && event["outcome"] == "rejected")
        .expect("bogus upgrade recorded");
    assert_eq!(bogus_request["status"], 400);
}

/// A client that resets the connection once its response is complete, as a client closing
/// with unread bytes does, ends a closed session, not a failed one.
#[test]
fn client_reset_after_response_is_closed() {
    const TESTPEER: &str = env!("CARGO_BIN_EXE_gateway-testpeer");
    let mut setup = kube_setup("client_reset_after_response_is_closed", "");
    let token = bound_token(&setup.pod);
    let request = format!(
        "GET /version HTTP/1.1\r\nHost: {}:{API_PORT}\r\nAuthorization: Bearer {token}\r\n\r\n",
        setup.server.addr_v4
    );
    let request_file = setup.node.dir.join("version.http");
    std::fs::write(&request_file, request).expect("write request");
    let server = SocketAddr::new(setup.server.addr_v4.into(), API_PORT);
    let output = setup
        .node
        .in_pod(&setup.pod, TESTPEER)
        .args([
            "tls-request",
            "--reset",
            "--connect",
            &server.to_string(),
            "--ca",
        ])
        .arg(&setup.ca.cert)
        .arg("--request")
        .arg(&request_file)
        .stdin(Stdio::null())
        .output()
        .expect("run tls-request");
    let response = stdout_of(&output, "tls-request");
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(response.contains("v1.32.0"), "{response}");

    let events = setup.stop_and_read_events();
    let request = events
        .iter()
        .find(|event| event["event"] == "kube.request")
        .expect("request recorded");
    assert_eq!(request["status"], 200, "{request}");
    let end = events
        .iter()
        .find(|event| event["event"] == "session.end")
        .expect("session end recorded");
    assert_eq!(end["outcome"], "closed", "{end}");
    assert!(
        end["reason"]
            .as_str()
            .is_some_and(|reason| reason.contains("reset the connection after its last response")),
        "{end}"
    );
}

#[test]
fn kube_without_certificate_relays_tls() {
    let mut node = TestNode::new("kube_without_certificate_relays_tls");
    let pod = node.add_pod("app");
    let server = node.add_server("apiserver", &[]);
    let ca = ClusterCa::new(&node.dir);
    let names = vec![
        server.addr_v4.to_string(),
        "kubernetes.default.svc".to_string(),
    ];
    let (cert, key) = ca.issue_apiserver(&node.dir, &names);
    let upstream = start_upstream(&server, &cert, &key);
    let targets = format!(
        "  - name: kubernetes\n    address: {}\n    port: {API_PORT}\n    class: kube_api\n",
        server.addr_v4
    );
    let config = node.daemon_config("gatewayd.yaml", "", &targets);
    let daemon = node.start_daemon(Path::new(GATEWAYD), &config, None);

    // The pod sees the API server's own certificate, unmasked data and all.
    let output = node
        .in_pod(&pod, "curl")
        .args(["-sS", "--max-time", "20", "--cacert"])
        .arg(&ca.cert)
        .args([
            "--resolve",
            &format!("kubernetes.default.svc:{API_PORT}:{}", server.addr_v4),
            &format!("https://kubernetes.default.svc:{API_PORT}/api/v1/namespaces/default/configmaps/cards"),
        ])
        .output()
        .expect("run curl");
    let body = stdout_of(&output, "curl through the TCP relay");
    assert!(body.contains(PAN), "{body}");
    assert_eq!(upstream.seen.lock().expect("seen lock").len(), 1);

    daemon.stop();
    let sessions = node.sessions();
    assert_eq!(sessions.len(), 1);
    let passthrough = sessions[0]
        .iter()
        .find(|event| event["event"] == "kube.passthrough")
        .expect("passthrough event");
    assert_eq!(passthrough["sni"], "kubernetes.default.svc");
    let end = sessions[0]
        .iter()
        .find(|event| event["event"] == "session.end")
        .expect("session end");
    assert!(end["bytes"]["from_upstream"].as_u64().unwrap_or(0) > body.len() as u64);
}

const APISERVER: &str = env!("CARGO_BIN_EXE_gateway-test-apiserver");
/// ClusterIP of the `kubernetes` Service in a default cluster.
const SERVICE_IP: std::net::IpAddr = std::net::IpAddr::V4(std::net::Ipv4Addr::new(10, 96, 0, 1));

/// Issues the gateway's serving certificate from the test API server's cluster CA with
/// `gatewayctl cert issue` and returns the target entry of the daemon config.
fn kube_target_with_issued_cert(node: &TestNode, ca: &gateway_user::testing::TestCa) -> String {
    let ca_cert = &ca.cert_path;
    let ca_key = &ca.key_path;
    let serving_cert = node.dir.join("gateway-serving.crt");
    let serving_key = node.dir.join("gateway-serving.key");
    let issued = std::process::Command::new(GATEWAYCTL)
        .args(["cert", "issue", "--ca-cert"])
        .arg(ca_cert)
        .arg("--ca-key")
        .arg(ca_key)
        .args([
            "--san",
            &SERVICE_IP.to_string(),
            "--san",
            "kubernetes.default.svc",
        ])
        .arg("--out-cert")
        .arg(&serving_cert)
        .arg("--out-key")
        .arg(&serving_key)
        .output()
        .expect("run gatewayctl cert issue");
    assert!(
        issued.status.success(),
        "gatewayctl cert issue failed: {}",
        String::from_utf8_lossy(&issued.stderr)
    );
    format!(
        "  - name: kubernetes\n    address: {SERVICE_IP}\n    port: {API_PORT}\n    class: kube_api\n\
         \x20   tls:\n      cert: {}\n      key: {}\n\
         \x20   upstream_tls:\n      mode: verify-full\n      ca: {}\n",
        serving_cert.display(),
        serving_key.display(),
        ca_cert.display()
    )
}

#[test]
fn kubectl_in_cluster_through_gateway() {
    use gateway_user::testing_apiserver::fixture::{Options, TestApiServer};

    let mut node = TestNode::new("kubectl_in_cluster_through_gateway");
    let pod = node.add_pod("client");
    let server = node.add_server("api", &[SERVICE_IP]);
    let options = Options {
        address: Some(SERVICE_IP),
        seed: vec![
            TestApiServer::seed_pod("default", "default", &pod),
            serde_json::json!({"kind": "ConfigMap", "apiVersion": "v1",
                "metadata": {"name": "cards", "namespace": "default"},
                "data": {"card": PAN}}),
            serde_json::json!({"kind": "Secret", "apiVersion": "v1",
                "metadata": {"name": "keep", "namespace": "default"},
                "data": {"k": "dg=="}}),
        ],
        ..Options::default()
    };
    let api = TestApiServer::start(&node, &server, APISERVER.as_ref(), options);
    let targets = kube_target_with_issued_cert(&node, &api.ca);
    let config = node.daemon_config("gatewayd.yaml", "", &targets);
    let mut text = std::fs::read_to_string(&config).expect("read config");
    text.push_str(
        "kube_rules:\n  - name: keep-the-keep-secret\n    verbs: [delete]\n    resources: [secrets]\n    names: [keep]\n\
         \x20 - name: no-interactive-exec\n    verbs: [create]\n    resources: [pods]\n    subresources: [exec]\n    stdin: true\n    tty: true\n",
    );
    std::fs::write(&config, text).expect("write config");
    let daemon = node.start_daemon(Path::new(GATEWAYD), &config, None);

    let token = api.token_for("default", "default", &pod);
    let service_account = api.service_account_dir("client", &token, "default");
    let home = node.dir.join("home");
    let kubectl = |args: &[&str]| {
        api.kubectl(&node, &pod, &service_account, &home)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run kubectl")
    };
    let ok = |args: &[&str]| {
        let output = kubectl(args);
        assert!(
            output.status.success(),
            "kubectl {args:?} failed: {}\ngatewayd log:\n{}\napiserver log:\n{}",
            String::from_utf8_lossy(&output.stderr),
            daemon.log(),
            api.log()
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    };

    let pods = ok(&["get", "pods"]);
    assert!(
        pods.lines().any(|line| line.starts_with("client ")),
        "{pods}"
    );
    let pods_json: Value =
        serde_json::from_str(&ok(&["get", "pods", "-o", "json"])).expect("pod list JSON");
    assert_eq!(pods_json["items"][0]["metadata"]["uid"], pod.uid.as_str());

    let cards: Value = serde_json::from_str(&ok(&["get", "configmap", "cards", "-o", "json"]))
        .expect("configmap JSON");
    assert_eq!(cards["data"]["card"], MASKED_PAN);

    assert!(
        ok(&[
            "create",
            "configmap",
            "new-card",
            &format!("--from-literal=pan={PAN}")
        ])
        .contains("configmap/new-card created")
    );
    assert!(
        ok(&[
            "create",
            "secret",
            "generic",
            "s1",
            &format!("--from-literal=k={SECRET_VALUE}")
        ])
        .contains("secret/s1 created")
    );
    assert!(ok(&["delete", "secret", "s1"]).contains("secret \"s1\" deleted"));

    let denied = kubectl(&["delete", "secret", "keep"]);
    assert!(!denied.status.success());
    let stderr = String::from_utf8_lossy(&denied.stderr);
    assert!(stderr.contains("Error from server (Forbidden)"), "{stderr}");
    assert!(stderr.contains("keep-the-keep-secret"), "{stderr}");
    assert!(ok(&["get", "secret", "keep", "-o", "name"]).contains("secret/keep"));

    for websockets in TRANSPORTS {
        // kubectl drops `-t` without a terminal, so `script` gives it one.
        let denied_exec = api
            .in_cluster(&node, &pod, &service_account, &home, "script")
            .args(["-qec", "exec kubectl exec -it client -- sh", "/dev/null"])
            .env("KUBECTL_REMOTE_COMMAND_WEBSOCKETS", websockets)
            .stdin(Stdio::piped())
            .output()
            .expect("run kubectl exec -it");
        assert!(!denied_exec.status.success(), "websockets={websockets}");
        // `script` puts kubectl's standard error on the terminal, so on its output.
        let stderr = String::from_utf8_lossy(&denied_exec.stdout);
        assert!(
            stderr.contains("Forbidden") && stderr.contains("no-interactive-exec"),
            "websockets={websockets}: {stderr}"
        );
    }

    daemon.stop();
    let text: String = node
        .session_files()
        .iter()
        .map(|path| std::fs::read_to_string(path).expect("read recording"))
        .collect();
    assert!(!text.contains(PAN), "a recording holds the unmasked PAN");
    // kubectl sends the Secret as protobuf or JSON, and neither form of its value may be recorded.
    for form in [SECRET_VALUE, SECRET_VALUE_BASE64] {
        assert!(!text.contains(form), "a recording holds the Secret's value");
    }
    let events: Vec<Value> = node.sessions().into_iter().flatten().collect();
    let created = |resource: &str| {
        events
            .iter()
            .find(|event| {
                event["event"] == "kube.request"
                    && event["request"]["verb"] == "create"
                    && event["request"]["resource"] == resource
            })
            .unwrap_or_else(|| panic!("no create of {resource} recorded"))
    };
    let secret_create = created("secrets");
    assert_eq!(secret_create["status"], 201);
    let secret_body = &secret_create["request_body"];
    assert!(
        secret_body["withheld"].is_string() || secret_body["text"].is_string(),
        "{secret_body}"
    );
    let create = created("configmaps");
    assert_eq!(create["status"], 201);
    let body = create["request_body"]["text"]
        .as_str()
        .expect("request body text");
    assert!(body.contains(MASKED_PAN), "{body}");
    assert_eq!(create["token_pod_mismatch"], false);
    let delete = events
        .iter()
        .find(|event| {
            event["event"] == "kube.request"
                && event["outcome"] == "denied"
                && event["request"]["verb"] == "delete"
        })
        .expect("denied delete recorded");
    assert_eq!(delete["request"]["verb"], "delete");
    assert_eq!(delete["request"]["name"], "keep");
}

/// Value of the Secret `kubectl_in_cluster_through_gateway` creates, and its base64 form.
const SECRET_VALUE: &str = "gateway-test-secret-value";
const SECRET_VALUE_BASE64: &str = "Z2F0ZXdheS10ZXN0LXNlY3JldC12YWx1ZQ==";

/// A node whose pod runs kubectl in-cluster against the test API server through `gatewayd`.
struct InCluster {
    node: TestNode,
    pod: Pod,
    server: Server,
    api: gateway_user::testing_apiserver::fixture::TestApiServer,
    service_account: PathBuf,
    home: PathBuf,
    daemon: Option<gateway_user::testing::Daemon>,
}

impl InCluster {
    fn new(test_name: &str, rules: &str) -> Self {
        Self::with_policy(test_name, rules, None)
    }

    /// Starts the node like `new`, with the AccessPolicy `policy` (YAML) when given.
    fn with_policy(test_name: &str, rules: &str, policy: Option<&str>) -> Self {
        Self::with_settings(test_name, rules, policy, "", |_| {})
    }

    /// Starts the node like `with_policy`, with `proxy_settings` (indented YAML lines) added
    /// to the daemon config's `proxy` section and the API server's options changed by
    /// `configure_api`.
    fn with_settings(
        test_name: &str,
        rules: &str,
        policy: Option<&str>,
        proxy_settings: &str,
        configure_api: impl FnOnce(&mut gateway_user::testing_apiserver::fixture::Options),
    ) -> Self {
        use gateway_user::testing_apiserver::fixture::{Options, TestApiServer};

        let mut node = TestNode::new(test_name);
        let pod = node.add_pod("client");
        let server = node.add_server("api", &[SERVICE_IP]);
        let mut options = Options {
            address: Some(SERVICE_IP),
            seed: vec![TestApiServer::seed_pod("default", "default", &pod)],
            ..Options::default()
        };
        configure_api(&mut options);
        let api = TestApiServer::start(&node, &server, APISERVER.as_ref(), options);
        let targets = kube_target_with_issued_cert(&node, &api.ca);
        let config = node.daemon_config("gatewayd.yaml", "", &targets);
        let mut text = std::fs::read_to_string(&config).expect("read config");
        text = text.replacen("proxy:\n", &format!("proxy:\n{proxy_settings}"), 1);
        text.push_str(rules);
        if let Some(policy) = policy {
            let policy_dir = node.dir.join("policies");
            std::fs::create_dir_all(&policy_dir).expect("create the policy directory");
            std::fs::write(policy_dir.join("10-test.yaml"), policy).expect("write the policy");
            text.push_str(&format!("policy:\n  path: {}\n", policy_dir.display()));
        }
        std::fs::write(&config, text).expect("write config");
        let daemon = node.start_daemon(Path::new(GATEWAYD), &config, None);
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
            daemon: Some(daemon),
        }
    }

    fn kubectl(&self, args: &[&str]) -> std::process::Command {
        let mut command =
            self.api
                .kubectl(&self.node, &self.pod, &self.service_account, &self.home);
        command.args(args);
        command
    }

    /// Builds a command that runs the shell line `shell` in the pod under `script`, which gives
    /// kubectl a pseudo-terminal, with kubectl's exec transport chosen by `websockets`.
    fn in_terminal(&self, shell: &str, websockets: &str) -> std::process::Command {
        let mut command = self.in_pod("script");
        command
            .args(["-qec", shell, "/dev/null"])
            .env("KUBECTL_REMOTE_COMMAND_WEBSOCKETS", websockets);
        command
    }

    /// curl in the pod, trusting the cluster CA from its service-account volume; `args`
    /// follow curl's own options.
    fn curl(&self, args: &[&str]) -> std::process::Command {
        let script =
            "exec curl -sS --cacert /var/run/secrets/kubernetes.io/serviceaccount/ca.crt \"$@\"";
        let mut command = self.in_pod("sh");
        command.args(["-c", script, "curl"]).args(args);
        command
    }

    /// Builds a command for `program` in the pod with its in-cluster configuration.
    fn in_pod(&self, program: &str) -> std::process::Command {
        self.api.in_cluster(
            &self.node,
            &self.pod,
            &self.service_account,
            &self.home,
            program,
        )
    }

    fn events(&mut self) -> Vec<Value> {
        if let Some(daemon) = self.daemon.take() {
            daemon.stop();
        }
        self.node.sessions().into_iter().flatten().collect()
    }
}

impl Drop for InCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            if let Some(daemon) = &self.daemon {
                eprintln!("gatewayd log:\n{}", daemon.log());
            }
            eprintln!("apiserver log:\n{}", self.api.log());
        }
    }
}

fn stderr_of(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Both exec transports of kubectl 1.32: WebSocket (its default) and SPDY/3.1.
const TRANSPORTS: [&str; 2] = ["true", "false"];

#[test]
fn kubectl_exec_through_gateway() {
    use std::io::{Read as _, Write as _};

    let mut cluster = InCluster::new("kubectl_exec_through_gateway", "");
    for websockets in TRANSPORTS {
        // Piped input comes back through `cat`, masked on its way out.
        let mut child = cluster
            .kubectl(&["exec", "-i", "client", "--", "cat"])
            .env("KUBECTL_REMOTE_COMMAND_WEBSOCKETS", websockets)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start kubectl exec");
        let mut input = format!("card {PAN}\n").into_bytes();
        input.extend((0..100_000u32).map(|i| b'a' + (i % 26) as u8));
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
        assert!(status.success(), "websockets={websockets}: {status}");
        assert_eq!(output.len(), input.len(), "websockets={websockets}");
        let expected = String::from_utf8_lossy(&input).replace(PAN, MASKED_PAN);
        assert!(
            String::from_utf8_lossy(&output) == expected,
            "websockets={websockets}: output is not the masked input"
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
            stderr_of(&exit)
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
            stderr_of(&split)
        );
        assert_eq!(String::from_utf8_lossy(&split.stdout), "out\n");
        assert_eq!(stderr_of(&split), "err\n");

        // A terminal session, typed into through `script`.
        let mut command = cluster.in_terminal(
            "stty rows 30 cols 100; exec kubectl exec -it client -- sh",
            websockets,
        );
        command
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
        assert!(
            lines.iter().any(|line| line.ends_with("30 100")),
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

    let text: String = cluster
        .node
        .session_files()
        .iter()
        .map(|path| std::fs::read_to_string(path).expect("read recording"))
        .collect();
    let events = cluster.events();
    assert!(!text.contains(PAN), "a recording holds the unmasked PAN");
    let opens: Vec<&Value> = events
        .iter()
        .filter(|event| event["event"] == "stream.open")
        .collect();
    assert_eq!(opens.len(), 8, "{opens:#?}");
    assert_eq!(opens[0]["command"], serde_json::json!(["cat"]));
    assert_eq!(opens[0]["transport"], "websocket");
    assert_eq!(opens[4]["transport"], "spdy");
    assert_eq!(opens[3]["tty"], true);
    for open in &opens {
        let protocol = open["stream_protocol"].as_str().unwrap_or_default();
        assert!(
            protocol.ends_with(".channel.k8s.io"),
            "stream.open without the negotiated subprotocol: {open}"
        );
        // kubectl's WebSocket transport negotiates the newest channel protocol.
        if open["transport"] == "websocket" {
            assert_eq!(protocol, "v5.channel.k8s.io", "{open}");
        }
    }
    for stream in ["stdin", "stdout"] {
        let frame = events.iter().find(|event| {
            event["event"] == "stream.frame"
                && event["stream"] == stream
                && event["data"]
                    .as_str()
                    .is_some_and(|data| data.contains(MASKED_PAN))
        });
        assert!(frame.is_some(), "no {stream} frame with the masked PAN");
    }
    let stderr_frame = events.iter().any(|event| {
        event["event"] == "stream.frame" && event["stream"] == "stderr" && event["data"] == "err\n"
    });
    assert!(stderr_frame, "no stderr frame recorded");
    // kubectl closes its connection as soon as it has the exit status: a normal end, however
    // abrupt, keeps both directions' totals and records no error.
    for close in events
        .iter()
        .filter(|event| event["event"] == "stream.close")
    {
        assert!(close["error"].is_null(), "{close}");
        assert!(close["from_client"]["bytes"].is_u64(), "{close}");
        assert!(close["from_server"]["bytes"].is_u64(), "{close}");
    }
    // The terminal's size, set by `stty` before kubectl started, is recorded on both transports.
    for spdy in [false, true] {
        assert!(
            frame_recorded(&events, spdy, "resize", r#""Width":100,"Height":30"#),
            "no resize frame recorded (spdy={spdy})"
        );
    }
}

/// Reads every session file of the node as one text.
fn session_text(node: &TestNode) -> String {
    node.session_files()
        .iter()
        .map(|path| std::fs::read_to_string(path).expect("read recording"))
        .collect()
}

/// Returns whether some recorded `stream.frame` of `stream` contains `text`, among the SPDY
/// frames (those with a `spdy_stream` id) when `spdy` is true, else among the WebSocket ones.
fn frame_recorded(events: &[Value], spdy: bool, stream: &str, text: &str) -> bool {
    events.iter().any(|event| {
        event["event"] == "stream.frame"
            && event["stream"] == stream
            && event["spdy_stream"].is_u64() == spdy
            && event["data"]
                .as_str()
                .is_some_and(|data| data.contains(text))
    })
}

/// A process that prints a PAN in two writes with a pause between them: the API server sends
/// the parts in two frames, and kubectl still gets the PAN masked, on stdout and stderr, over
/// both exec transports. The recording contains only the masked PAN.
#[test]
fn kubectl_exec_split_pan_masked() {
    // The pause must stay under the hold time, which is raised so that a loaded machine
    // cannot stretch it past.
    let mut cluster = InCluster::with_settings(
        "kubectl_exec_split_pan_masked",
        "",
        None,
        "  exec_output_hold: 5s\n",
        |_| {},
    );
    let script = "printf 'out 4111 1111 '; printf 'err 5555 5555 ' >&2; sleep 0.3; \
                  printf '1111 1111\\n'; printf '5555 4444\\n' >&2";
    for websockets in TRANSPORTS {
        let output = cluster
            .kubectl(&["exec", "client", "--", "sh", "-c", script])
            .env("KUBECTL_REMOTE_COMMAND_WEBSOCKETS", websockets)
            .stdin(Stdio::null())
            .output()
            .expect("run kubectl exec");
        assert!(
            output.status.success(),
            "websockets={websockets}: {}",
            stderr_of(&output)
        );
        assert_eq!(
            String::from_utf8_lossy(&output.stdout),
            "out 4111 11** **** 1111\n",
            "websockets={websockets}"
        );
        assert_eq!(
            stderr_of(&output),
            "err 5555 55** **** 4444\n",
            "websockets={websockets}"
        );
    }

    let text = session_text(&cluster.node);
    let events = cluster.events();
    assert!(
        !text.contains("4111 1111 1111 1111"),
        "a recording holds the unmasked stdout PAN"
    );
    assert!(
        !text.contains("5555 5555 5555 4444"),
        "a recording holds the unmasked stderr PAN"
    );
    let transports: Vec<&Value> = events
        .iter()
        .filter(|event| event["event"] == "stream.open")
        .map(|event| &event["transport"])
        .collect();
    assert_eq!(transports, ["websocket", "spdy"]);
    // Each transport records stdout and stderr under their names, SPDY with its stream ids.
    for spdy in [false, true] {
        for (stream, masked) in [
            ("stdout", "4111 11** **** 1111"),
            ("stderr", "5555 55** **** 4444"),
        ] {
            assert!(
                frame_recorded(&events, spdy, stream, masked),
                "spdy={spdy}: no {stream} frame with {masked}"
            );
        }
    }
}

/// Over SPDY, stdout and stderr are separate streams of one connection. Each reaches
/// kubectl's matching output through the gateway, with PANs masked on both.
#[test]
fn kubectl_exec_spdy_stderr_stream() {
    let mut cluster = InCluster::new("kubectl_exec_spdy_stderr_stream", "");
    let script = "echo 'out 4111-1111-1111-1111'; echo 'err 5555-5555-5555-4444' >&2; \
                  echo out-end; echo err-end >&2";
    let output = cluster
        .kubectl(&["exec", "client", "--", "sh", "-c", script])
        .env("KUBECTL_REMOTE_COMMAND_WEBSOCKETS", "false")
        .stdin(Stdio::null())
        .output()
        .expect("run kubectl exec");
    assert!(output.status.success(), "{}", stderr_of(&output));
    assert_eq!(
        String::from_utf8_lossy(&output.stdout),
        "out 4111-11**-****-1111\nout-end\n"
    );
    assert_eq!(stderr_of(&output), "err 5555-55**-****-4444\nerr-end\n");

    let text = session_text(&cluster.node);
    let events = cluster.events();
    assert!(
        !text.contains(PAN),
        "a recording holds the unmasked stdout PAN"
    );
    assert!(
        !text.contains("5555-5555-5555-4444"),
        "a recording holds the unmasked stderr PAN"
    );
    let open = events
        .iter()
        .find(|event| event["event"] == "stream.open")
        .expect("stream opening recorded");
    assert_eq!(open["transport"], "spdy");
    // Each stream's frames are recorded under the stream type kubectl gave it in SYN_STREAM,
    // with their own SPDY stream id.
    let frame_with = |text: &str| {
        events
            .iter()
            .find(|event| {
                event["event"] == "stream.frame"
                    && event["data"]
                        .as_str()
                        .is_some_and(|data| data.contains(text))
            })
            .cloned()
    };
    let stdout_frame = frame_with(MASKED_PAN).expect("stdout PAN frame recorded");
    let stderr_frame = frame_with("5555-55**-****-4444").expect("stderr PAN frame recorded");
    assert_eq!(stdout_frame["stream"], "stdout", "{stdout_frame}");
    assert_eq!(stderr_frame["stream"], "stderr", "{stderr_frame}");
    assert!(stdout_frame["spdy_stream"].is_u64(), "{stdout_frame}");
    assert!(stderr_frame["spdy_stream"].is_u64(), "{stderr_frame}");
    assert_ne!(stdout_frame["spdy_stream"], stderr_frame["spdy_stream"]);
    for event in events
        .iter()
        .filter(|event| event["event"] == "stream.frame")
    {
        assert_ne!(event["stream"], "unknown", "{event}");
    }
    // kubectl may reset the connection at the end, which `stream.close` records as an error,
    // but reading kubectl's header blocks must not have ended the stream.
    let close = events
        .iter()
        .find(|event| event["event"] == "stream.close")
        .expect("stream closing recorded");
    let error = close["error"].as_str().unwrap_or_default();
    assert!(!error.contains("SPDY"), "{close}");
}

/// An API server that compresses a response although the gateway removed `Accept-Encoding`.
/// The gateway cannot scan the body for PANs, so kubectl gets a 502 `Status` in its place,
/// and the request is recorded as failed upstream.
#[test]
fn compressed_response_withheld() {
    let cards = serde_json::json!({
        "kind": "ConfigMap",
        "apiVersion": "v1",
        "metadata": {"name": "cards", "namespace": "default"},
        "data": {"card": PAN},
    });
    let mut cluster =
        InCluster::with_settings("compressed_response_withheld", "", None, "", |options| {
            options.gzip_responses = true;
            options.seed.push(cards);
        });

    let output = cluster
        .kubectl(&[
            "get",
            "--raw",
            "/api/v1/namespaces/default/configmaps/cards",
        ])
        .stdin(Stdio::null())
        .output()
        .expect("run kubectl get --raw");
    let stderr = stderr_of(&output);
    assert!(
        !output.status.success(),
        "the compressed body reached kubectl"
    );
    assert!(stderr.contains("compressed response"), "{stderr}");
    assert!(stderr.contains("withheld"), "{stderr}");
    assert!(
        output.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&output.stdout)
    );

    let text = session_text(&cluster.node);
    let events = cluster.events();
    assert!(!text.contains(PAN), "a recording holds the unmasked PAN");
    let request = events
        .iter()
        .find(|event| event["event"] == "kube.request" && event["request"]["name"] == "cards")
        .expect("request recorded");
    assert_eq!(request["status"], 502, "{request:#}");
    assert_eq!(request["outcome"], "upstream_failed");
    assert!(
        request["error"]
            .as_str()
            .is_some_and(|error| error.contains("compressed")),
        "{request:#}"
    );
}

/// An idle terminal session outlives minutes of silence and is on disk from the moment the
/// upgrade succeeds, not only once it ends.
#[test]
fn kubectl_exec_idle_terminal_recorded_live() {
    use std::io::Write as _;

    let cluster = InCluster::new("kubectl_exec_idle_terminal_recorded_live", "");
    // One idle terminal per transport, side by side, so SPDY is covered without a second wait.
    let mut sessions: Vec<_> = TRANSPORTS
        .iter()
        .map(|websockets| {
            let mut command = cluster.in_terminal("exec kubectl exec -it client -- sh", websockets);
            command
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            let mut child = command.spawn().expect("start kubectl exec -it");
            let stdin = child.stdin.take().expect("piped stdin");
            (*websockets, child, stdin)
        })
        .collect();

    let opened = || -> usize {
        cluster
            .node
            .session_files()
            .iter()
            .map(|path| {
                std::fs::read_to_string(path)
                    .unwrap_or_default()
                    .matches("\"stream.open\"")
                    .count()
            })
            .sum()
    };
    gateway_user::testing::wait_until(
        "a stream.open per session in the recordings",
        Duration::from_secs(30),
        || opened() == sessions.len(),
    );
    for (websockets, child, _) in &mut sessions {
        assert!(
            child.try_wait().expect("poll kubectl").is_none(),
            "websockets={websockets}: the session ended before its recording was checked"
        );
    }

    // Longer than a one- or two-minute idle timeout on any hop would let a session live.
    std::thread::sleep(Duration::from_secs(125));
    for (websockets, child, _) in &mut sessions {
        assert!(
            child.try_wait().expect("poll kubectl").is_none(),
            "websockets={websockets}: the idle session was closed"
        );
    }
    for (websockets, child, mut stdin) in sessions {
        stdin
            .write_all(b"echo $((6*7))\nexit 5\n")
            .expect("type into the terminal");
        let output = child.wait_with_output().expect("wait for kubectl");
        drop(stdin);
        let text = String::from_utf8_lossy(&output.stdout).replace('\r', "");
        assert!(
            text.lines().any(|line| line.trim() == "42"),
            "websockets={websockets}: {text}"
        );
        assert_eq!(
            output.status.code(),
            Some(5),
            "websockets={websockets}: {text}"
        );
    }
}

/// Port-forward with parallel connections over both transports, and a PAN that the forwarded
/// server writes in two pieces: it reaches the client masked.
#[test]
fn kubectl_port_forward_through_gateway() {
    const TESTPEER: &str = env!("CARGO_BIN_EXE_gateway-testpeer");
    // The pause between the PAN's pieces must stay under the hold time, which is raised so
    // that a loaded machine cannot stretch it past.
    let mut cluster = InCluster::with_settings(
        "kubectl_port_forward_through_gateway",
        "",
        None,
        "  exec_output_hold: 5s\n",
        |_| {},
    );
    let mut echo = cluster.node.in_server(&cluster.server, TESTPEER);
    echo.args(["serve", "--listen", "127.0.0.1:8080"])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let _echo = gateway_user::testing::ChildGuard(echo.spawn().expect("start the echo server"));
    let script = cluster.node.dir.join("split-pan.sh");
    std::fs::write(
        &script,
        "#!/bin/sh\nprintf 'card 4111 1111 '\nsleep 0.3\nprintf '1111 1111 end\\n'\n",
    )
    .expect("write the PAN server's script");
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("make the script executable");
    let mut split_pan = cluster.node.in_server(&cluster.server, "socat");
    split_pan
        .args([
            "TCP-LISTEN:8081,bind=127.0.0.1,reuseaddr,fork".to_string(),
            format!("EXEC:{}", script.display()),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let _split_pan =
        gateway_user::testing::ChildGuard(split_pan.spawn().expect("start the PAN server"));

    for (index, websockets) in TRANSPORTS.iter().enumerate() {
        let local_port = 18080 + index;
        let pan_port = 18090 + index;
        let mut forward = cluster.kubectl(&[
            "port-forward",
            "pod/client",
            &format!("{local_port}:8080"),
            &format!("{pan_port}:8081"),
        ]);
        forward
            .env("KUBECTL_PORT_FORWARD_WEBSOCKETS", websockets)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut forward =
            gateway_user::testing::ChildGuard(forward.spawn().expect("start port-forward"));
        let stdout = forward.0.stdout.take().expect("piped stdout");
        let mut lines = std::io::BufRead::lines(std::io::BufReader::new(stdout));
        let ready = format!("Forwarding from 127.0.0.1:{local_port}");
        assert!(
            lines.any(|line| line.is_ok_and(|line| line.contains(&ready))),
            "port-forward did not start"
        );

        let clients: Vec<_> = (0..4)
            .map(|_| {
                cluster
                    .node
                    .in_pod(&cluster.pod, TESTPEER)
                    .args([
                        "client",
                        "--connect",
                        &format!("127.0.0.1:{local_port}"),
                        "--bytes",
                        "300000",
                    ])
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
                "websockets={websockets}: {}",
                stderr_of(&output)
            );
        }

        let received = cluster
            .node
            .in_pod(&cluster.pod, "socat")
            .args(["-u", &format!("TCP:127.0.0.1:{pan_port}"), "STDOUT"])
            .stdin(Stdio::null())
            .output()
            .expect("run socat");
        assert!(received.status.success(), "{}", stderr_of(&received));
        assert_eq!(
            String::from_utf8_lossy(&received.stdout),
            "card 4111 11** **** 1111 end\n",
            "websockets={websockets}"
        );
    }

    // Each forwarded connection is recorded with its port: per transport, four to 8080 and
    // one to 8081.
    let events = cluster.events();
    let ports: Vec<u64> = events
        .iter()
        .filter(|event| event["event"] == "portforward.open")
        .filter_map(|event| event["port"].as_u64())
        .collect();
    assert_eq!(
        ports.iter().filter(|port| **port == 8080).count(),
        8,
        "{ports:?}"
    );
    assert_eq!(
        ports.iter().filter(|port| **port == 8081).count(),
        2,
        "{ports:?}"
    );
    assert_eq!(ports.len(), 10, "{ports:?}");
    assert!(
        !events
            .iter()
            .any(|event| event["event"] == "portforward.unreadable"),
        "a port-forward header block was not read"
    );
}

#[test]
fn kubectl_watch_through_gateway_after_quiet_minute() {
    let cluster = InCluster::new("kubectl_watch_through_gateway_after_quiet_minute", "");
    let mut watch = cluster.kubectl(&["get", "configmaps", "-w", "-o", "name"]);
    watch
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut watch = gateway_user::testing::ChildGuard(watch.spawn().expect("start kubectl -w"));
    let stdout = watch.0.stdout.take().expect("piped stdout");
    let (sender, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)) {
            let Ok(line) = line else { break };
            if sender.send(line).is_err() {
                break;
            }
        }
    });

    // No configmap exists yet, so the watch prints nothing until one is created. Longer than
    // a minute of silence is where proxies with idle or request timeouts cut a watch.
    std::thread::sleep(Duration::from_secs(65));
    assert!(
        lines.try_recv().is_err(),
        "the watch printed before any change"
    );
    let created = cluster
        .kubectl(&["create", "configmap", "late", "--from-literal=a=b"])
        .stdin(Stdio::null())
        .output()
        .expect("run kubectl create");
    assert!(created.status.success(), "{}", stderr_of(&created));
    // The change must reach the watcher within a second of the write; it usually arrives
    // before `kubectl create` has returned.
    let line = lines
        .recv_timeout(Duration::from_secs(1))
        .expect("the watch reports the new configmap within 1 s");
    assert_eq!(line, "configmap/late");
}

/// Returns curl options for a WebSocket upgrade over HTTP/1.1 with bearer `token`, the extra
/// `headers`, and the status code written after the body on a line of its own. The URL
/// follows.
fn websocket_upgrade_args(token: &str, headers: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = ["--http1.1", "-H"].into_iter().map(String::from).collect();
    args.push(format!("Authorization: Bearer {token}"));
    for header in [
        "Connection: Upgrade",
        "Upgrade: websocket",
        "Sec-WebSocket-Version: 13",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
    ]
    .iter()
    .chain(headers)
    {
        args.push("-H".into());
        args.push((*header).to_string());
    }
    args.push("-w".into());
    args.push("\n%{http_code}".into());
    args
}

#[test]
fn websocket_upgrade_refusal_passes_through() {
    let cluster = InCluster::new("websocket_upgrade_refusal_passes_through", "");
    let token = std::fs::read_to_string(cluster.service_account.join("token")).expect("read token");
    let mut args = websocket_upgrade_args(&token, &["Sec-WebSocket-Protocol: bogus.example"]);
    args.push(format!(
        "https://{SERVICE_IP}:{API_PORT}/api/v1/namespaces/default/pods/client/exec?command=true&stdout=true"
    ));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let output = cluster
        .curl(&args)
        .stdin(Stdio::null())
        .output()
        .expect("run curl");
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').expect("body and status code");
    assert_eq!(code, "400", "{text}");
    let status: Value = serde_json::from_str(body).expect("a Status body");
    assert_eq!(status["reason"], "BadRequest");
}

/// A WebSocket extension would compress exec output past the masking, so the client's offer
/// never reaches the API server. A server that accepts an extension all the same gets a 502
/// instead of a relayed stream.
#[test]
fn websocket_extension_not_negotiated() {
    let mut setup = kube_setup("websocket_extension_not_negotiated", "");
    let token = bound_token(&setup.pod);
    let mut args = websocket_upgrade_args(
        &token,
        &[
            "Sec-WebSocket-Protocol: v5.channel.k8s.io",
            "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits",
        ],
    );
    args.push(setup.url("/api/v1/namespaces/default/pods/app/exec?command=date&stdout=true"));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let output = setup.curl(&setup.pod, &args);
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').expect("body and status code");
    assert_eq!(code, "502", "{text}");
    let status: Value = serde_json::from_str(body).expect("a Status body");
    assert_eq!(status["kind"], "Status");
    assert!(
        status["message"]
            .as_str()
            .is_some_and(|message| message.contains("permessage-deflate")),
        "{status}"
    );

    let exec: Vec<SeenRequest> = setup
        .seen()
        .into_iter()
        .filter(|seen| seen.path.contains("/exec"))
        .collect();
    assert_eq!(exec.len(), 1, "{exec:?}");
    assert_eq!(exec[0].websocket_extensions, None, "{exec:?}");

    let events = setup.stop_and_read_events();
    let request = events
        .iter()
        .find(|event| event["event"] == "kube.request" && event["request"]["subresource"] == "exec")
        .expect("the exec request is recorded");
    assert_eq!(request["outcome"], "upstream_failed", "{request}");
    assert!(
        !events.iter().any(|event| event["event"] == "stream.open"),
        "no stream was opened"
    );
}

/// Base64 subprotocols hide card numbers from the scanner: an offer of only those is refused
/// with a Status, and the API server never receives the request.
#[test]
fn websocket_base64_only_offer_refused() {
    let mut setup = kube_setup("websocket_base64_only_offer_refused", "");
    let token = bound_token(&setup.pod);
    let mut args = websocket_upgrade_args(
        &token,
        &["Sec-WebSocket-Protocol: v4.base64.channel.k8s.io, base64.channel.k8s.io"],
    );
    args.push(setup.url("/api/v1/namespaces/default/pods/app/exec?command=date&stdout=true"));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let output = setup.curl(&setup.pod, &args);
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').expect("body and status code");
    assert_eq!(code, "400", "{text}");
    let status: Value = serde_json::from_str(body).expect("a Status body");
    assert_eq!(status["reason"], "BadRequest", "{status}");
    let message = status["message"].as_str().unwrap_or_default();
    assert!(message.contains("v4.base64.channel.k8s.io"), "{status}");
    assert!(message.contains("v5.channel.k8s.io"), "{status}");

    assert!(
        !setup.seen().iter().any(|seen| seen.path.contains("/exec")),
        "the exec request went upstream"
    );
    let events = setup.stop_and_read_events();
    let request = events
        .iter()
        .find(|event| event["event"] == "kube.request" && event["request"]["subresource"] == "exec")
        .expect("the exec request is recorded");
    assert_eq!(request["outcome"], "rejected", "{request}");
}

/// From a mixed offer only the protocols the gateway can scan go upstream, and a server that
/// picks a base64 one anyway gets a 502 instead of a relayed stream.
#[test]
fn websocket_base64_protocols_not_offered() {
    let mut setup = kube_setup("websocket_base64_protocols_not_offered", "");
    let token = bound_token(&setup.pod);
    let attach = |choose: &str| {
        let mut args = websocket_upgrade_args(
            &token,
            &["Sec-WebSocket-Protocol: v4.base64.channel.k8s.io, v5.channel.k8s.io"],
        );
        args.push(setup.url(&format!(
            "/api/v1/namespaces/default/pods/app/attach?stdout=true&choose={choose}"
        )));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let output = setup.curl(&setup.pod, &args);
        String::from_utf8_lossy(&output.stdout).into_owned()
    };

    let accepted = attach("v5.channel.k8s.io");
    assert!(accepted.ends_with("\n101"), "{accepted}");
    let picked_base64 = attach("v4.base64.channel.k8s.io");
    let (body, code) = picked_base64
        .rsplit_once('\n')
        .expect("body and status code");
    assert_eq!(code, "502", "{picked_base64}");
    let status: Value = serde_json::from_str(body).expect("a Status body");
    assert!(
        status["message"]
            .as_str()
            .is_some_and(|message| message.contains("base64")),
        "{status}"
    );

    let offered: Vec<Option<String>> = setup
        .seen()
        .into_iter()
        .filter(|seen| seen.path.contains("/attach"))
        .map(|seen| seen.websocket_protocol)
        .collect();
    assert_eq!(
        offered,
        [
            Some("v5.channel.k8s.io".to_string()),
            Some("v5.channel.k8s.io".to_string())
        ]
    );
    let events = setup.stop_and_read_events();
    let outcomes: Vec<&Value> = events
        .iter()
        .filter(|event| {
            event["event"] == "kube.request" && event["request"]["subresource"] == "attach"
        })
        .map(|event| &event["outcome"])
        .collect();
    assert_eq!(outcomes.len(), 2, "{outcomes:?}");
    assert_eq!(outcomes[1], "upstream_failed", "{outcomes:?}");
}

/// Sends a WebSocket upgrade request for `path` offering `protocol` over TLS from the pod, and
/// returns everything the gateway sent back, decoded lossily.
fn raw_websocket(setup: &KubeSetup, path: &str, protocol: &str) -> String {
    let token = bound_token(&setup.pod);
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {}:{API_PORT}\r\nAuthorization: Bearer {token}\r\n\
         Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Protocol: {protocol}\r\n\r\n",
        setup.server.addr_v4
    );
    setup.raw_tls(request.as_bytes())
}

/// Port-forward over the WebSocket channel protocol `v4.channel.k8s.io`: the port at each
/// channel's start reaches the client unchanged, and a card number cut across two messages of
/// a channel arrives masked.
#[test]
fn websocket_port_forward_masked_across_messages() {
    let setup = kube_setup("websocket_port_forward_masked_across_messages", "");
    let reply = raw_websocket(
        &setup,
        "/api/v1/namespaces/default/pods/app/portforward?ports=12345",
        "v4.channel.k8s.io",
    );
    assert!(reply.starts_with("HTTP/1.1 101"), "{reply:?}");
    // A frame header (0x82, length 3), the channel, and the port's two bytes.
    assert!(reply.contains("\u{3}\u{0}90"), "{reply:?}");
    assert!(reply.contains("\u{3}\u{1}90"), "{reply:?}");
    assert!(reply.contains("4111 11** **** 1111"), "{reply:?}");
    assert!(reply.ends_with(" end\n"), "{reply:?}");
}

/// A pod log followed over WebSocket (`binary.k8s.io`) is one byte stream: a card number cut
/// across two messages arrives masked.
#[test]
fn websocket_log_masked_across_messages() {
    let setup = kube_setup("websocket_log_masked_across_messages", "");
    let reply = raw_websocket(
        &setup,
        "/api/v1/namespaces/default/pods/app/log?follow=true",
        "binary.k8s.io",
    );
    assert!(reply.starts_with("HTTP/1.1 101"), "{reply:?}");
    assert!(reply.contains("paid with "), "{reply:?}");
    assert!(reply.contains("4111 11** **** 1111"), "{reply:?}");
    assert!(reply.ends_with(" end\n"), "{reply:?}");
}

/// Writes to secrets and config maps are held for review: the Kubernetes requests wait in
/// `gatewayctl approvals` until an approver decides or the deadline passes.
const REVIEW_POLICY: &str = "\
apiVersion: gateway.example.dev/v1alpha1
kind: AccessPolicy
metadata:
  name: cluster-writes
spec:
  defaults:
    kube_api:
      action: allow
  rules:
    - name: review-secret-writes
      kube:
        verbs: [create, update, patch, delete]
        resources: [secrets]
      action: review
    - name: review-configmap-writes
      kube:
        verbs: [create]
        resources: [configmaps]
      action: review
      review:
        deadline: 2s
";

impl InCluster {
    fn approvals(&self, args: &[&str]) -> Output {
        std::process::Command::new(GATEWAYCTL)
            .arg("approvals")
            .arg("--socket")
            .arg(self.node.approval_socket())
            .args(args)
            .output()
            .expect("run gatewayctl approvals")
    }

    /// Waits until one request is held and returns it.
    fn wait_held(&self) -> Value {
        let mut held = Vec::new();
        gateway_user::testing::wait_until("a held request", Duration::from_secs(30), || {
            let output = self.approvals(&["list", "--json"]);
            assert!(
                output.status.success(),
                "approvals list: {}",
                stderr_of(&output)
            );
            let listing: Value = serde_json::from_slice(&output.stdout).expect("JSON listing");
            held = listing["requests"].as_array().cloned().unwrap_or_default();
            !held.is_empty()
        });
        assert_eq!(held.len(), 1, "{held:#?}");
        held.remove(0)
    }
}

#[test]
fn kubectl_writes_held_for_approval() {
    let mut cluster =
        InCluster::with_policy("kubectl_writes_held_for_approval", "", Some(REVIEW_POLICY));
    let spawn = |args: &[&str]| {
        cluster
            .kubectl(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start kubectl")
    };

    // Reads are not held.
    let pods = cluster
        .kubectl(&["get", "pods"])
        .output()
        .expect("run kubectl");
    assert!(pods.status.success(), "{}", stderr_of(&pods));

    // An approved write goes through to the API server.
    let approved = spawn(&[
        "create",
        "secret",
        "generic",
        "approved",
        "--from-literal=k=v",
    ]);
    let held = cluster.wait_held();
    assert_eq!(held["rule"], "review-secret-writes");
    assert_eq!(held["summary"], "create secrets -n default");
    let id = held["id"].as_str().expect("request id").to_string();
    let answer = cluster.approvals(&["approve", &id, "--reason", "change 7"]);
    assert!(answer.status.success(), "approve: {}", stderr_of(&answer));
    let output = approved.wait_with_output().expect("wait for kubectl");
    assert!(output.status.success(), "{}", stderr_of(&output));
    assert!(String::from_utf8_lossy(&output.stdout).contains("secret/approved created"));

    // A denied write is Forbidden, naming the rule and the approver's reason.
    let denied = spawn(&[
        "create",
        "secret",
        "generic",
        "denied",
        "--from-literal=k=v",
    ]);
    let id = cluster.wait_held()["id"]
        .as_str()
        .expect("request id")
        .to_string();
    let answer = cluster.approvals(&["deny", &id, "--reason", "not during the freeze"]);
    assert!(answer.status.success(), "deny: {}", stderr_of(&answer));
    let output = denied.wait_with_output().expect("wait for kubectl");
    assert!(!output.status.success());
    let stderr = stderr_of(&output);
    // `kubectl create secret` words the API server's Forbidden Status itself.
    assert!(stderr.contains("secrets is forbidden"), "{stderr}");
    assert!(stderr.contains("review-secret-writes"), "{stderr}");
    assert!(stderr.contains("not during the freeze"), "{stderr}");

    // No verdict: the deadline denies the write.
    let late = cluster
        .kubectl(&["create", "configmap", "late", "--from-literal=k=v"])
        .output()
        .expect("run kubectl");
    assert!(!late.status.success());
    let stderr = stderr_of(&late);
    assert!(stderr.contains("configmaps is forbidden"), "{stderr}");
    assert!(stderr.contains("no approval within 2s"), "{stderr}");

    // Only the approved write reached the API server.
    let secrets = cluster
        .kubectl(&["get", "secrets", "-o", "name"])
        .output()
        .expect("run kubectl");
    let names = String::from_utf8_lossy(&secrets.stdout).into_owned();
    assert!(names.contains("secret/approved"), "{names}");
    assert!(!names.contains("secret/denied"), "{names}");
    let configmaps = cluster
        .kubectl(&["get", "configmaps", "-o", "name"])
        .output()
        .expect("run kubectl");
    assert!(!String::from_utf8_lossy(&configmaps.stdout).contains("configmap/late"));

    // Every hold and every verdict is recorded.
    let events = cluster.events();
    let of = |kind: &str| -> Vec<&Value> {
        events
            .iter()
            .filter(|event| event["event"] == kind)
            .collect()
    };
    assert_eq!(of("approval.requested").len(), 3);
    let verdicts: Vec<&Value> = of("approval.answered")
        .iter()
        .map(|event| &event["verdict"])
        .collect();
    assert_eq!(verdicts, ["approved", "denied", "timed_out"]);
    let outcomes: Vec<(&Value, &Value)> = of("kube.request")
        .iter()
        .filter(|event| event["request"]["verb"] == "create")
        .map(|event| (&event["request"]["resource"], &event["outcome"]))
        .collect();
    assert_eq!(outcomes.len(), 3, "{outcomes:?}");
    assert_eq!(outcomes[0].1, "allowed", "{outcomes:?}");
    assert_eq!(outcomes[1].1, "denied", "{outcomes:?}");
    assert_eq!(outcomes[2].1, "denied", "{outcomes:?}");
}

#[test]
fn kubectl_sees_named_fields_masked() {
    const POLICY: &str = "\
apiVersion: gateway.example.dev/v1alpha1
kind: AccessPolicy
metadata:
  name: cluster
spec:
  defaults:
    kube_api:
      action: allow
      masking:
        fields: [password]
";
    let cluster = InCluster::with_policy("kubectl_sees_named_fields_masked", "", Some(POLICY));
    let created = cluster
        .kubectl(&[
            "create",
            "configmap",
            "db",
            "--from-literal=password=hunter22",
            "--from-literal=user=ada",
        ])
        .output()
        .expect("run kubectl");
    assert!(created.status.success(), "{}", stderr_of(&created));

    let shown = cluster
        .kubectl(&["get", "configmap", "db", "-o", "json"])
        .output()
        .expect("run kubectl");
    assert!(shown.status.success(), "{}", stderr_of(&shown));
    let object: Value = serde_json::from_slice(&shown.stdout).expect("configmap JSON");
    assert_eq!(object["data"]["password"], "********");
    assert_eq!(object["data"]["user"], "ada");

    // A client that prefers protobuf, as client-go can be set to, gets the JSON response with
    // the field masked. One that accepts protobuf only gets a 406.
    let token = std::fs::read_to_string(cluster.service_account.join("token")).expect("read token");
    let bearer = format!("Authorization: Bearer {token}");
    let url = format!("https://{SERVICE_IP}:{API_PORT}/api/v1/namespaces/default/configmaps/db");
    let get = |accept: &str| {
        let output = cluster
            .curl(&[
                "-H",
                &bearer,
                "-H",
                &format!("Accept: {accept}"),
                "-w",
                "\n%{http_code} %{content_type}",
                &url,
            ])
            .stdin(Stdio::null())
            .output()
            .expect("run curl");
        let text = String::from_utf8_lossy(&output.stdout).into_owned();
        let (body, status) = text.rsplit_once('\n').expect("body and status line");
        (body.to_string(), status.to_string())
    };
    let (body, status) = get("application/vnd.kubernetes.protobuf, application/json");
    assert_eq!(status, "200 application/json", "{body}");
    let object: Value = serde_json::from_str(&body).expect("configmap JSON");
    assert_eq!(object["data"]["password"], "********");
    assert_eq!(object["data"]["user"], "ada");

    let (body, status) = get("application/vnd.kubernetes.protobuf");
    assert!(status.starts_with("406 "), "{status}: {body}");
    assert!(!body.contains("hunter22"), "{body}");
    // Masking applies to what flows back: the write itself reached the API server.
    let log = cluster.api.log();
    assert_eq!(
        log.matches("method=POST path=/api/v1/namespaces/default/configmaps status=201")
            .count(),
        1,
        "{log}"
    );
}

/// A card number in a Secret's `data` or a ConfigMap's `binaryData` is base64 in JSON. It comes
/// back masked, still valid base64 of the same length, and the rest of each value unchanged.
#[test]
fn kubectl_sees_base64_values_masked() {
    const POLICY: &str = "\
apiVersion: gateway.example.dev/v1alpha1
kind: AccessPolicy
metadata:
  name: cluster
spec:
  defaults:
    kube_api:
      action: allow
";
    let cluster = InCluster::with_policy("kubectl_sees_base64_values_masked", "", Some(POLICY));
    let engine = base64::engine::general_purpose::STANDARD;
    let run = |args: &[&str]| {
        let output = cluster.kubectl(args).output().expect("run kubectl");
        assert!(output.status.success(), "{args:?}: {}", stderr_of(&output));
        String::from_utf8_lossy(&output.stdout).into_owned()
    };

    run(&[
        "create",
        "secret",
        "generic",
        "card",
        &format!("--from-literal=pan={PAN}"),
        "--from-literal=user=ada",
    ]);
    // Bytes that are not UTF-8 make kubectl put the file into `binaryData`.
    let blob = cluster.home.join("blob.bin");
    let mut content = b"\xff\xfe card ".to_vec();
    content.extend_from_slice(PAN.as_bytes());
    content.extend_from_slice(b" end\n");
    std::fs::write(&blob, &content).expect("write blob");
    run(&[
        "create",
        "configmap",
        "blob",
        &format!("--from-file=blob={}", blob.display()),
    ]);

    let secret: Value =
        serde_json::from_str(&run(&["get", "secret", "card", "-o", "json"])).expect("secret JSON");
    let pan = secret["data"]["pan"].as_str().expect("pan is a string");
    assert_eq!(pan.len(), engine.encode(PAN).len());
    assert_eq!(
        engine.decode(pan).expect("still base64"),
        MASKED_PAN.as_bytes()
    );
    assert_eq!(secret["data"]["user"], engine.encode("ada"));

    let binary_data = run(&[
        "get",
        "configmap",
        "blob",
        "-o",
        "jsonpath={.binaryData.blob}",
    ]);
    let decoded = engine.decode(binary_data.trim()).expect("still base64");
    let mut expected = b"\xff\xfe card ".to_vec();
    expected.extend_from_slice(MASKED_PAN.as_bytes());
    expected.extend_from_slice(b" end\n");
    assert_eq!(decoded, expected);

    // YAML's base64 values are not quoted, so a request that accepts only YAML is refused,
    // and one that also accepts JSON gets JSON.
    let token = std::fs::read_to_string(cluster.service_account.join("token")).expect("read token");
    let bearer = format!("Authorization: Bearer {token}");
    let url = format!("https://{SERVICE_IP}:{API_PORT}/api/v1/namespaces/default/secrets/card");
    let get = |accept: &str| {
        let output = cluster
            .curl(&[
                "-H",
                &bearer,
                "-H",
                &format!("Accept: {accept}"),
                "-w",
                "\n%{http_code}",
                &url,
            ])
            .stdin(Stdio::null())
            .output()
            .expect("run curl");
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    let yaml_only = get("application/yaml");
    assert!(yaml_only.ends_with("\n406"), "{yaml_only}");
    assert!(yaml_only.contains("found in JSON only"), "{yaml_only}");
    let either = get("application/yaml, application/json");
    assert!(either.ends_with("\n200"), "{either}");
    assert!(either.contains("\"kind\":\"Secret\""), "{either}");

    // The writes reached the API server unmasked: masking applies to what flows back.
    let log = cluster.api.log();
    assert_eq!(
        log.matches("method=POST path=/api/v1/namespaces/default/secrets status=201")
            .count(),
        1,
        "{log}"
    );
}

/// A HEAD request gets its status and headers without content, over HTTP/2 and HTTP/1.1,
/// whether the gateway denies it or the API server responds.
#[test]
fn head_requests_answered_without_content() {
    let mut setup = kube_setup("head_requests_answered_without_content", DENY_RULES);
    let token = bound_token(&setup.pod);
    let auth = format!("Authorization: Bearer {token}");
    for version in ["--http2", "--http1.1"] {
        for (path, code) in [
            ("/api/v1/namespaces/default/configmaps/cards", "200"),
            ("/api/v1/namespaces/default/secrets/db", "403"),
        ] {
            let output = setup.curl(
                &setup.pod,
                &[
                    version,
                    "-I",
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{http_code}",
                    "-H",
                    &auth,
                    &setup.url(path),
                ],
            );
            assert_eq!(stdout_of(&output, "curl -I"), code, "{version} {path}");
        }
    }
    // Each is recorded as complete, without an error.
    let events = setup.stop_and_read_events();
    let heads: Vec<&Value> = events
        .iter()
        .filter(|event| event["event"] == "kube.request" && event["method"] == "HEAD")
        .collect();
    assert_eq!(heads.len(), 4, "{heads:#?}");
    for head in heads {
        assert!(head["error"].is_null(), "{head}");
    }
}
