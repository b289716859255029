//! A stand-in for kube-apiserver, for tests only: no real API server can be installed on the
//! test machines, and the gateway's Kubernetes handler and real kubectl need a peer that
//! behaves like one. Run it as `gateway-test-apiserver` inside a test server namespace.
//!
//! What it implements:
//! - TLS (rustls) with ALPN `h2` and `http/1.1`; HTTP/1.1 and HTTP/2 through hyper.
//! - Bearer tokens as bound service-account JWTs (ES256), checked for signature, issuer,
//!   audience and time, and for a bound pod that still exists with the UID in the token.
//!   A bad token gets 401, and a request without one is `system:anonymous`.
//! - Authorization: allow-all for service accounts, or the allow rules of a JSON file.
//! - Legacy discovery (`/api`, `/api/v1`, `/apis` with no groups, `/version`). kubectl 1.32
//!   requests aggregated discovery first and falls back when the reply is plain JSON.
//! - core/v1 pods, configmaps, secrets, serviceaccounts and namespaces in memory: get, list
//!   (label and field selectors, `limit`/`continue`), watch, create, update, merge patch,
//!   delete and deletecollection. One `resourceVersion` counter orders all changes, and
//!   errors are real `Status` objects. Table responses are sent as kubectl requests them,
//!   and protobuf for ConfigMap get, list and watch.
//! - Watch: one event per chunk (a JSON line or a protobuf frame), flushed at once, BOOKMARK
//!   events on request, ending only at `timeoutSeconds` or when the client leaves. A test
//!   knob splits events that contain a given text into two chunks.
//! - A test knob that gzip-compresses every complete response body, even for a client that
//!   did not accept gzip.
//! - `pods/exec` over WebSocket (`v5.channel.k8s.io`, `v4.channel.k8s.io`) and SPDY/3.1, and
//!   `pods/portforward`, running real commands (on a pseudo-terminal with resize for
//!   `tty=true`) and connecting to real loopback ports in the server's own namespace: the
//!   pod named in the URL only has to exist and be Running.
//!
//! What it does not: API groups other than core/v1, admission, defaulting beyond what the
//! store fills in, graceful deletion, finalizers, server-side apply, JSON patch, protobuf
//! request bodies other than Secret, ConfigMap and Namespace, YAML, and consistent
//! pagination snapshots.
//!
//! NOTE: a request whose header block exceeds hyper's read buffer (about 400 KiB) is left
//! unanswered over TLS instead of getting the 431 the real server sends; the cause is not
//! yet known.

pub mod api;
mod discovery;
mod exec;
pub mod fixture;
pub mod proto;
mod select;
mod spdy;
pub mod status;
pub mod store;
mod table;
pub mod token;
mod watch;

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context as _;
use hyper::service::service_fn;
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _};
use serde::Deserialize;
use serde_json::Value;

use self::{api::RequestInfo, store::Store, token::TokenVerifier};

/// Interval between BOOKMARK events of a watch that allows them; the real server sends one
/// about every minute.
pub const DEFAULT_BOOKMARK_INTERVAL: Duration = Duration::from_secs(60);

/// Startup settings of the server.
#[derive(Clone, Debug)]
pub struct Config {
    pub listen: Vec<SocketAddr>,
    pub tls_cert: PathBuf,
    pub tls_key: PathBuf,
    /// PEM PKCS#8 P-256 key the service-account tokens are signed with.
    pub service_account_key: PathBuf,
    /// JSON array of objects to create at start (each with `kind` and `metadata`).
    pub seed: Option<PathBuf>,
    /// JSON array of objects to create when the process receives SIGUSR1, like a pod that is
    /// scheduled while a test runs.
    pub late_seed: Option<PathBuf>,
    /// JSON array of [`Rule`]s. Without it, every service account may do everything.
    pub authorization: Option<PathBuf>,
    pub bookmark_interval: Duration,
    /// Whether a bound token's pod must exist with the token's pod UID.
    pub check_bound_pods: bool,
    /// Test knob: a watch event containing this text is sent as two chunks, split right
    /// after it, to exercise readers of chunk boundaries. A real server splits only at
    /// its own buffer sizes.
    pub split_watch_after: Option<String>,
    /// Test knob: every response body of known length is sent gzip-compressed, whatever the
    /// request's `Accept-Encoding`. HTTP allows only the encodings that header accepts
    /// (RFC 9110 section 12.5.3), so this stands for a server, or a proxy in front of it,
    /// that ignores the header.
    pub gzip_responses: bool,
}

/// An allow rule: `users` may use `verbs` on `resources` (`pods`, `pods/exec`) in
/// `namespaces`. `"*"` matches anything in each list.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    pub users: Vec<String>,
    pub verbs: Vec<String>,
    pub resources: Vec<String>,
    #[serde(default = "any")]
    pub namespaces: Vec<String>,
}

fn any() -> Vec<String> {
    vec!["*".to_string()]
}

impl Rule {
    fn allows(&self, user: &str, info: &RequestInfo) -> bool {
        let matches = |list: &[String], value: &str| list.iter().any(|v| v == "*" || v == value);
        let resource = match &info.subresource {
            Some(sub) => format!("{}/{sub}", info.resource.name),
            None => info.resource.name.to_string(),
        };
        matches(&self.users, user)
            && matches(&self.verbs, info.verb)
            && matches(&self.resources, &resource)
            && info
                .namespace
                .as_deref()
                .is_none_or(|namespace| matches(&self.namespaces, namespace))
    }
}

/// The server's shared state.
#[derive(Debug)]
pub struct ApiServer {
    pub store: Store,
    verifier: TokenVerifier,
    rules: Option<Vec<Rule>>,
    bookmark_interval: Duration,
    check_bound_pods: bool,
    split_watch_after: Option<String>,
    gzip_responses: bool,
}

impl ApiServer {
    /// Builds the state from `config`: loads the key, the rules and the seed objects.
    pub fn new(config: &Config) -> anyhow::Result<Self> {
        let issuer = token::TokenIssuer::load(&config.service_account_key)?;
        let rules = match &config.authorization {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("read authorization rules {}", path.display()))?;
                Some(
                    serde_json::from_str(&text)
                        .with_context(|| format!("parse authorization rules {}", path.display()))?,
                )
            }
            None => None,
        };
        let server = Self {
            store: Store::new(),
            verifier: issuer.verifier(),
            rules,
            bookmark_interval: config.bookmark_interval,
            check_bound_pods: config.check_bound_pods,
            split_watch_after: config.split_watch_after.clone(),
            gzip_responses: config.gzip_responses,
        };
        if let Some(path) = &config.seed {
            server.seed(path)?;
        }
        Ok(server)
    }

    fn seed(&self, path: &std::path::Path) -> anyhow::Result<()> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("read seed objects {}", path.display()))?;
        let objects: Vec<Value> = serde_json::from_str(&text)
            .with_context(|| format!("parse seed objects {}", path.display()))?;
        for object in objects {
            let kind = object
                .get("kind")
                .and_then(Value::as_str)
                .unwrap_or_default();
            let resource = store::RESOURCES
                .iter()
                .find(|resource| resource.kind == kind)
                .with_context(|| format!("seed object of unknown kind {kind:?}"))?;
            let namespace = object
                .pointer("/metadata/namespace")
                .and_then(Value::as_str)
                .unwrap_or(if resource.namespaced { "default" } else { "" })
                .to_string();
            // A seed may fix a pod's UID so that tokens minted for it stay valid.
            let uid = object
                .pointer("/metadata/uid")
                .and_then(Value::as_str)
                .map(str::to_string);
            self.store
                .create_with_uid(resource, &namespace, object, uid)
                .map_err(|error| anyhow::anyhow!("seed object rejected: {}", error.message))?;
        }
        Ok(())
    }
}

#[expect(
    deprecated,
    reason = "ring, as in the gateway's own TLS settings: aws-lc-rs needs a C toolchain setup the build does not assume"
)]
fn ring_provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn tls_config(config: &Config) -> anyhow::Result<rustls::ServerConfig> {
    let certs = CertificateDer::pem_file_iter(&config.tls_cert)
        .with_context(|| format!("read certificate {}", config.tls_cert.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("parse certificate {}", config.tls_cert.display()))?;
    let key = PrivateKeyDer::from_pem_file(&config.tls_key)
        .with_context(|| format!("read key {}", config.tls_key.display()))?;
    let mut tls = rustls::ServerConfig::builder_with_provider(ring_provider())
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("TLS certificate and key do not match")?;
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(tls)
}

/// Serves until the process is stopped.
pub async fn serve(config: Config) -> anyhow::Result<()> {
    let server = Arc::new(ApiServer::new(&config)?);
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls_config(&config)?));
    let mut listeners = Vec::new();
    for address in &config.listen {
        let listener = tokio::net::TcpListener::bind(address)
            .await
            .with_context(|| format!("listen on {address}"))?;
        tracing::info!(address = %address, "listening");
        listeners.push(listener);
    }

    let mut tasks = tokio::task::JoinSet::new();
    if let Some(path) = config.late_seed.clone() {
        let server = server.clone();
        let mut signal =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1())
                .context("listen for SIGUSR1")?;
        tasks.spawn(async move {
            while signal.recv().await.is_some() {
                match server.seed(&path) {
                    Ok(()) => tracing::info!(path = %path.display(), "late seed objects created"),
                    Err(error) => {
                        tracing::error!(path = %path.display(), error = format!("{error:#}"), "late seed objects rejected");
                    }
                }
            }
        });
    }
    for listener in listeners {
        let server = server.clone();
        let acceptor = acceptor.clone();
        tasks.spawn(async move {
            loop {
                let (stream, peer) = match listener.accept().await {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        tracing::warn!(error = %error, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                // The real API server is written in Go, whose TCP connections disable Nagle's
                // algorithm by default.
                if let Err(error) = stream.set_nodelay(true) {
                    tracing::warn!(peer = %peer, error = %error, "TCP_NODELAY not set");
                }
                let server = server.clone();
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let tls = match acceptor.accept(stream).await {
                        Ok(tls) => tls,
                        Err(error) => {
                            tracing::info!(peer = %peer, error = %error, "TLS handshake failed");
                            return;
                        }
                    };
                    let service = service_fn(move |request| {
                        let server = server.clone();
                        async move { Ok::<_, std::convert::Infallible>(server.handle(request).await) }
                    });
                    let builder = auto::Builder::new(TokioExecutor::new());
                    if let Err(error) = builder
                        .serve_connection_with_upgrades(TokioIo::new(tls), service)
                        .await
                    {
                        tracing::info!(peer = %peer, error = %error, "connection ended with an error");
                    }
                });
            }
        });
    }
    // Listener tasks loop forever, so one that ends has panicked.
    if let Some(result) = tasks.join_next().await {
        result.context("listener task")?;
    }
    Ok(())
}

/// Builds a pod object for a seed file: one container named `main`, with a fixed UID so
/// that tokens bound to it verify.
pub fn seed_pod(namespace: &str, name: &str, uid: &str, service_account: &str) -> Value {
    serde_json::json!({
        "kind": "Pod",
        "apiVersion": "v1",
        "metadata": {"name": name, "namespace": namespace, "uid": uid, "labels": {"app": name}},
        "spec": {
            "serviceAccountName": service_account,
            "containers": [{"name": "main", "image": "registry.example/test:1"}],
        },
    })
}
