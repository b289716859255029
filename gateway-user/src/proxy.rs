//! The node-local proxy: accepts redirected connections on the redirect addresses, recovers
//! each one's original destination and subject, opens the upstream connection with the
//! gateway's socket mark, and hands both to the handler for the target's class.
//!
//! Limits: at most `max_connections` sessions at once, an idle timeout per session and a
//! connect timeout upstream. Connections over the limit are reset at accept, so clients fail
//! fast instead of hanging.
//! Shutdown: `shutdown()` stops accepting, open sessions get `drain_timeout` to finish, then
//! the remaining ones are closed and recorded as such.

use std::{
    io,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Instant,
};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::{
    net::{TcpListener, TcpSocket, TcpStream},
    sync::Semaphore,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{Instrument as _, debug, error, info, info_span, warn};

use crate::{
    config::{Config, FailMode, TargetConfig},
    identity::{Identity, Subject},
    mask::MaskPolicy,
    operations::metrics::{ErrorKind, metrics},
    protocol,
    protocol::{
        mysql::MysqlContext,
        postgres::{PostgresContext, cancel::CancelRegistry},
        tcp::RelayResult,
    },
    record::SessionRecord,
    record::{Outcome, Recorder, SessionEnd, TargetInfo},
    redirect::{Redirect, socket_addr_of},
};

/// Listen backlog of the redirect sockets: connects that arrive while the accept loop is busy
/// wait here rather than being refused.
const LISTEN_BACKLOG: i32 = 1024;

/// Errors while setting up the proxy.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error(
        "failed to listen on redirect address {addr} (check that the address is assigned to this node)"
    )]
    Listen { addr: SocketAddr, source: io::Error },
    /// A target's TLS certificate, key or CA could not be loaded.
    #[error(
        "invalid TLS settings in {field} (check the certificate, key and CA file paths and that they hold PEM)"
    )]
    Tls {
        field: String,
        source: crate::tls::TlsError,
    },
}

/// TLS configurations of one target, built once at start.
#[derive(Debug)]
pub struct TargetTls {
    server: Option<Arc<rustls::ServerConfig>>,
    upstream: Option<(
        Arc<rustls::ClientConfig>,
        rustls::pki_types::ServerName<'static>,
    )>,
    /// The upstream configuration with the Kubernetes API handler's ALPN offers.
    kube_upstream: Option<protocol::kube::upstream::UpstreamTls>,
}

/// Loads every target's TLS material, in configuration order; run before anything is
/// attached, so a bad file stops the daemon before it changes the node.
pub fn load_target_tls(config: &Config) -> Result<Vec<TargetTls>, ProxyError> {
    let mut loaded = Vec::with_capacity(config.targets.len());
    for (index, target) in config.targets.iter().enumerate() {
        let tls_error = |field: &str| {
            let field = format!("targets[{index}].{field}");
            move |source| ProxyError::Tls { field, source }
        };
        // MySQL clients start TLS inside the protocol and send no ALPN.
        let alpn: &[&[u8]] = match target.class {
            crate::config::TargetClass::KubeApi => &[
                protocol::kube::upstream::ALPN_H2,
                protocol::kube::upstream::ALPN_HTTP1,
            ],
            crate::config::TargetClass::Postgres => &[crate::tls::ALPN_POSTGRESQL],
            _ => &[],
        };
        let server = match &target.tls {
            Some(serving) => {
                Some(crate::tls::server_config(serving, alpn).map_err(tls_error("tls"))?)
            }
            None => None,
        };
        let upstream =
            crate::tls::client_config(&target.upstream_tls, target.default_server_name())
                .map_err(tls_error("upstream_tls"))?;
        let kube_upstream = match (&upstream, target.class) {
            (Some((config, name)), crate::config::TargetClass::KubeApi) => Some(
                protocol::kube::upstream::UpstreamTls::new(config, name.clone()),
            ),
            _ => None,
        };
        loaded.push(TargetTls {
            server,
            upstream,
            kube_upstream,
        });
    }
    Ok(loaded)
}

/// The running proxy, shared by its accept loops and sessions.
#[derive(Debug)]
pub struct Proxy {
    config: Arc<Config>,
    redirect: Arc<Redirect>,
    identity: Arc<Identity>,
    recorder: Recorder,
    permits: Arc<Semaphore>,
    sessions: TaskTracker,
    /// Cancelled to stop accepting.
    stop_accepting: CancellationToken,
    /// Cancelled when the drain deadline passes; open sessions then end.
    force_close: CancellationToken,
    /// Connections reset because the limit was reached, for rate-limited logging.
    rejected_limit: AtomicU64,
    /// Connections with no `CONN` entry, for rate-limited logging.
    rejected_unknown: AtomicU64,
    /// Cancel keys of the live PostgreSQL sessions.
    postgres_cancels: Arc<CancelRegistry>,
    access: Access,
    kube_rules: Arc<Vec<crate::policy::KubeRule>>,
    /// Per target, in configuration order.
    target_tls: Vec<TargetTls>,
}

/// The access policy and the approvals broker, shared by every session.
#[derive(Clone, Debug)]
pub struct Access {
    pub policy: Arc<crate::policy::PolicyStore>,
    pub approvals: Arc<crate::approval::Broker>,
}

impl Proxy {
    pub fn new(
        config: Arc<Config>,
        redirect: Arc<Redirect>,
        identity: Arc<Identity>,
        recorder: Recorder,
        target_tls: Vec<TargetTls>,
        access: Access,
    ) -> Arc<Self> {
        Arc::new(Self {
            target_tls,
            postgres_cancels: Arc::new(CancelRegistry::default()),
            access,
            kube_rules: Arc::new(config.kube_rules.clone()),
            permits: Arc::new(Semaphore::new(config.proxy.max_connections)),
            config,
            redirect,
            identity,
            recorder,
            sessions: TaskTracker::new(),
            stop_accepting: CancellationToken::new(),
            force_close: CancellationToken::new(),
            rejected_limit: AtomicU64::new(0),
            rejected_unknown: AtomicU64::new(0),
        })
    }

    /// Binds every configured redirect address.
    pub fn bind(&self) -> Result<Vec<TcpListener>, ProxyError> {
        let mut listeners = Vec::new();
        let addrs = [
            self.config.proxy.listen_v4.map(SocketAddr::V4),
            self.config.proxy.listen_v6.map(SocketAddr::V6),
        ];
        for addr in addrs.into_iter().flatten() {
            let listener =
                bind_listener(addr).map_err(|source| ProxyError::Listen { addr, source })?;
            info!(%addr, "proxy listening");
            listeners.push(listener);
        }
        Ok(listeners)
    }

    /// Runs one accept loop per listener until `shutdown` is called.
    pub fn serve(self: &Arc<Self>, listeners: Vec<TcpListener>) -> TaskTracker {
        let loops = TaskTracker::new();
        for listener in listeners {
            let proxy = Arc::clone(self);
            loops.spawn(async move { proxy.accept_loop(listener).await });
        }
        loops.close();
        loops
    }

    async fn accept_loop(self: Arc<Self>, listener: TcpListener) {
        loop {
            let accepted = tokio::select! {
                () = self.stop_accepting.cancelled() => return,
                accepted = listener.accept() => accepted,
            };
            let (client, peer) = match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // EMFILE and the like: back off briefly instead of spinning.
                    metrics().error(ErrorKind::Accept);
                    warn!(%error, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            let local = match client.local_addr() {
                Ok(local) => local,
                Err(error) => {
                    warn!(%error, %peer, "accepted socket has no local address");
                    continue;
                }
            };
            let peer = unmap(peer);
            let local = unmap(local);
            metrics().connection_accepted();

            let Ok(permit) = Arc::clone(&self.permits).try_acquire_owned() else {
                self.reject_over_limit(client, peer, local);
                continue;
            };
            let proxy = Arc::clone(&self);
            let span = info_span!("session", client = %peer);
            self.sessions.spawn(
                async move {
                    proxy.handle(client, peer, local).await;
                    drop(permit);
                }
                .instrument(span),
            );
        }
    }

    fn reject_over_limit(&self, client: TcpStream, peer: SocketAddr, local: SocketAddr) {
        // Free the entry the kernel left for this connection.
        let _ = self.redirect.take_original(peer, local);
        // Linger 0 turns the close into a reset, which the client sees at once.
        let _ = client.set_zero_linger();
        metrics().error(ErrorKind::ConnectionLimit);
        let count = self.rejected_limit.fetch_add(1, Ordering::Relaxed) + 1;
        if count.is_power_of_two() {
            warn!(
                %peer,
                max_connections = self.config.proxy.max_connections,
                rejected_total = count,
                "connection limit reached, resetting new connections"
            );
        }
    }

    /// Stops accepting and lets open sessions drain until the deadline, then closes them.
    pub async fn shutdown(&self, accept_loops: TaskTracker) {
        self.stop_accepting.cancel();
        accept_loops.wait().await;
        self.sessions.close();
        let open = self.sessions.len();
        info!(open_sessions = open, drain_timeout = ?self.config.proxy.drain_timeout, "draining sessions");
        if tokio::time::timeout(self.config.proxy.drain_timeout, self.sessions.wait())
            .await
            .is_err()
        {
            warn!(
                open_sessions = self.sessions.len(),
                "drain deadline passed, closing remaining sessions"
            );
            self.force_close.cancel();
            self.sessions.wait().await;
        }
        info!("all sessions closed");
    }

    async fn handle(&self, client: TcpStream, peer: SocketAddr, local: SocketAddr) {
        let started = Instant::now();
        let Some(orig) = self.redirect.take_original(peer, local) else {
            // Someone dialed the proxy port directly, or the entry was evicted.
            metrics().error(ErrorKind::NoOriginalDestination);
            let count = self.rejected_unknown.fetch_add(1, Ordering::Relaxed) + 1;
            if count.is_power_of_two() {
                warn!(%peer, %local, rejected_total = count, "no original destination for connection; closing it");
            }
            let _ = client.set_zero_linger();
            return;
        };
        let _active = metrics().connection_opened();
        let destination = socket_addr_of(orig.orig_addr, orig.orig_port);
        let target = self.target_info(orig.target_id, orig.class, destination);

        let identity = Arc::clone(&self.identity);
        let mut subject = tokio::task::spawn_blocking(move || identity.resolve(&orig))
            .await
            .unwrap_or_else(|_| Subject::default());
        self.identity.complete(&mut subject).await;

        let recorder = self.recorder.clone();
        let (record_subject, record_target) = (subject.clone(), target.clone());
        let record = tokio::task::spawn_blocking(move || {
            recorder.start(&record_subject, peer, &record_target)
        })
        .await;
        let record = match record {
            Ok(Ok(record)) => record,
            Ok(Err(error)) => {
                // No session runs unrecorded: a store that fails with `fail_mode: closed`
                // refuses it, and so does a recorder that stopped.
                metrics().error(ErrorKind::RecordingStart);
                error!(error = %crate::error_chain(&error), %peer, %destination, "cannot record session, refusing it");
                self.refuse(client, orig.class, &error.to_string()).await;
                return;
            }
            Err(join_error) => {
                error!(%join_error, "recording task failed, refusing session");
                return;
            }
        };
        debug!(session = %record.id, %destination, cgroup = ?subject.cgroup, "session started");

        let record = Arc::new(std::sync::Mutex::new(record));
        self.record_policy_alert(&record);
        let end = match self.connect_upstream(destination).await {
            Ok(upstream) => {
                let handler = self.run_handler(
                    client,
                    upstream,
                    orig.class,
                    orig.target_id,
                    &record,
                    (&subject, &target),
                );
                let result = if self.recorder.fail_mode() == FailMode::Closed {
                    // With recording failing and `fail_mode: closed`, sessions end.
                    let health = Arc::clone(self.recorder.health());
                    tokio::select! {
                        result = handler => result,
                        () = health.wait_failing() => RelayResult {
                            outcome: Outcome::RecordingFailed,
                            reason: Some(format!("recording failed: {}", health.reason())),
                            bytes_from_client: 0,
                            bytes_from_upstream: 0,
                        },
                    }
                } else {
                    handler.await
                };
                SessionEnd {
                    outcome: result.outcome,
                    reason: result.reason,
                    bytes_from_client: result.bytes_from_client,
                    bytes_from_upstream: result.bytes_from_upstream,
                    duration: started.elapsed(),
                }
            }
            Err(error) => {
                metrics().error(ErrorKind::UpstreamConnect);
                let _ = client.set_zero_linger();
                SessionEnd {
                    outcome: Outcome::UpstreamFailed,
                    reason: Some(format!("connect to {destination} failed: {error}")),
                    bytes_from_client: 0,
                    bytes_from_upstream: 0,
                    duration: started.elapsed(),
                }
            }
        };

        // The access log: one event per session, fields only.
        let session_id = record
            .lock()
            .map(|record| record.id.clone())
            .unwrap_or_default();
        info!(
            session = %session_id,
            client.addr = %peer,
            client.cgroup = subject.cgroup.as_deref().unwrap_or("unknown"),
            client.pid = subject.pid,
            target.name = %target.name,
            target.addr = %destination,
            target.class = %target.class,
            outcome = ?end.outcome,
            reason = end.reason.as_deref().unwrap_or(""),
            bytes.from_client = end.bytes_from_client,
            bytes.from_upstream = end.bytes_from_upstream,
            duration_ms = end.duration.as_millis() as u64,
            "session ended"
        );
        let record = match Arc::try_unwrap(record) {
            Ok(record) => record
                .into_inner()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
            Err(_) => {
                error!("session recording still shared after the handler ended; end record lost");
                return;
            }
        };
        let session_id = record.id.clone();
        match tokio::task::spawn_blocking(move || record.finish(&end)).await {
            Ok(Ok(_)) => {}
            Ok(Err(error)) => {
                error!(error = %crate::error_chain(&error), session = %session_id, "failed to write the end of the session recording")
            }
            Err(join_error) => error!(%join_error, session = %session_id, "recording task failed"),
        }
    }

    /// Refuses a session in the target protocol's own way where the handler has one.
    async fn refuse(&self, client: TcpStream, class: u8, reason: &str) {
        match gateway_common::TargetClass::try_from(class) {
            Ok(gateway_common::TargetClass::Postgres) => {
                let message = format!("the node gateway cannot record this session: {reason}");
                protocol::postgres::refuse(client, &message).await;
            }
            // NOTE: the Kubernetes API and MySQL refusals (a 503 Status, an ERR packet) come
            // with their handlers; until then the connection is reset.
            _ => {
                let _ = client.set_zero_linger();
            }
        }
    }

    /// Runs the handler of the target's class.
    async fn run_handler(
        &self,
        client: TcpStream,
        upstream: TcpStream,
        class: u8,
        target_id: u32,
        record: &Arc<std::sync::Mutex<SessionRecord>>,
        (subject, target): (&Subject, &TargetInfo),
    ) -> RelayResult {
        let destination = target.addr;
        let tls = self.target_tls.get(target_id as usize);
        match gateway_common::TargetClass::try_from(class) {
            Ok(gateway_common::TargetClass::Postgres) => {
                let SessionAccess {
                    subject: policy_subject,
                    target: policy_target,
                    mask,
                    masked_names,
                } = self.session_access(
                    subject,
                    crate::config::TargetClass::Postgres,
                    &target.name,
                );
                let context = PostgresContext {
                    policy: Arc::clone(&self.access.policy),
                    approvals: Arc::clone(&self.access.approvals),
                    subject: policy_subject,
                    target: policy_target,
                    mask,
                    masked_columns: masked_names,
                    cancels: Arc::clone(&self.postgres_cancels),
                    upstream_addr: destination,
                    mark: self.config.redirect.mark,
                    idle_timeout: self.config.proxy.idle_timeout,
                    login_timeout: self.config.proxy.login_timeout,
                    server_tls: tls.and_then(|tls| tls.server.clone()),
                    upstream_tls: tls.and_then(|tls| tls.upstream.clone()),
                };
                protocol::postgres::run(
                    client,
                    upstream,
                    context,
                    Arc::clone(record),
                    self.force_close.clone(),
                )
                .await
            }
            Ok(gateway_common::TargetClass::KubeApi) => {
                let SessionAccess {
                    subject: policy_subject,
                    target: policy_target,
                    mask,
                    masked_names,
                } = self.session_access(subject, crate::config::TargetClass::KubeApi, &target.name);
                let context = protocol::kube::KubeContext {
                    rules: Arc::clone(&self.kube_rules),
                    access: Some(protocol::kube::KubeAccess {
                        policy: Arc::clone(&self.access.policy),
                        approvals: Arc::clone(&self.access.approvals),
                        subject: policy_subject,
                        target: policy_target,
                    }),
                    mask,
                    masked_fields: masked_names,
                    server_tls: tls.and_then(|tls| tls.server.clone()),
                    upstream: protocol::kube::upstream::UpstreamSettings {
                        addr: destination,
                        mark: self.config.redirect.mark,
                        connect_timeout: self.config.proxy.connect_timeout,
                        tls: tls.and_then(|tls| tls.kube_upstream.clone()),
                    },
                    subject: subject.clone(),
                    idle_timeout: self.config.proxy.idle_timeout,
                    login_timeout: self.config.proxy.login_timeout,
                    exec_output_hold: self.config.proxy.exec_output_hold,
                };
                protocol::kube::run(
                    client,
                    upstream,
                    context,
                    Arc::clone(record),
                    self.force_close.clone(),
                )
                .await
            }
            Ok(gateway_common::TargetClass::Mysql) => {
                let SessionAccess {
                    subject: policy_subject,
                    target: policy_target,
                    mask,
                    masked_names,
                } = self.session_access(subject, crate::config::TargetClass::Mysql, &target.name);
                let context = MysqlContext {
                    policy: Arc::clone(&self.access.policy),
                    approvals: Arc::clone(&self.access.approvals),
                    subject: policy_subject,
                    target: policy_target,
                    mask,
                    masked_columns: masked_names,
                    idle_timeout: self.config.proxy.idle_timeout,
                    login_timeout: self.config.proxy.login_timeout,
                    server_tls: tls.and_then(|tls| tls.server.clone()),
                    upstream_tls: tls.and_then(|tls| tls.upstream.clone()),
                };
                protocol::mysql::run(
                    client,
                    upstream,
                    context,
                    Arc::clone(record),
                    self.force_close.clone(),
                )
                .await
            }
            // Plain TCP targets: relay their bytes.
            _ => {
                protocol::tcp::relay(
                    client,
                    upstream,
                    self.config.proxy.idle_timeout,
                    self.force_close.clone(),
                )
                .await
            }
        }
    }

    /// Records the policy alert, while a reload has failed, at the start of each session.
    fn record_policy_alert(&self, record: &Arc<std::sync::Mutex<SessionRecord>>) {
        let Some(alert) = self.access.policy.status().alert else {
            return;
        };
        let mut record = record.lock().expect("recording lock poisoned");
        let fields = serde_json::json!({
            "alert": "policy_reload_failed",
            "error": alert.to_string(),
        });
        if let Err(error) = record.event("policy.alert", fields) {
            warn!(error = %crate::error_chain(&error), session = %record.id, "failed to write a session event");
        }
    }

    /// Resolves `subject` and the target `name` of `class` in policy terms, with the masking
    /// the current policy sets for their sessions.
    fn session_access(
        &self,
        subject: &Subject,
        class: crate::config::TargetClass,
        name: &str,
    ) -> SessionAccess {
        let subject = policy_subject(subject);
        let target = crate::policy::Target {
            class,
            name: name.to_string(),
        };
        let settings = self.access.policy.current().session_mask(&subject, &target);
        SessionAccess {
            mask: MaskPolicy {
                keep: settings.keep.to_mask_keep(),
                ..MaskPolicy::default()
            },
            masked_names: settings
                .fields
                .iter()
                .map(|name| name.to_lowercase())
                .collect(),
            subject,
            target,
        }
    }

    fn target_info(&self, target_id: u32, class: u8, destination: SocketAddr) -> TargetInfo {
        let configured: Option<&TargetConfig> = self.config.targets.get(target_id as usize);
        let class_name = match gateway_common::TargetClass::try_from(class) {
            Ok(gateway_common::TargetClass::KubeApi) => "kube_api",
            Ok(gateway_common::TargetClass::Postgres) => "postgres",
            Ok(gateway_common::TargetClass::Mysql) => "mysql",
            Ok(gateway_common::TargetClass::Tcp) | Err(_) => "tcp",
        };
        TargetInfo {
            id: target_id,
            name: configured.map_or_else(|| destination.to_string(), TargetConfig::display_name),
            class: class_name.to_string(),
            addr: destination,
        }
    }

    /// Connects to the original destination with the gateway's mark.
    async fn connect_upstream(&self, destination: SocketAddr) -> io::Result<TcpStream> {
        connect_marked(
            destination,
            self.config.redirect.mark,
            self.config.proxy.connect_timeout,
        )
        .await
    }
}

/// Connects to `destination` with socket mark `mark`, so the connect hook lets the connection
/// through even if the daemon runs inside the pods' cgroup. Handlers that open more than the
/// one upstream connection the proxy made for them use it too.
pub(crate) async fn connect_marked(
    destination: SocketAddr,
    mark: u32,
    connect_timeout: std::time::Duration,
) -> io::Result<TcpStream> {
    let domain = Domain::for_address(destination);
    let socket = Socket::new(domain, Type::STREAM.nonblocking(), Some(Protocol::TCP))?;
    socket.set_mark(mark)?;
    socket.set_tcp_nodelay(true)?;
    let socket = TcpSocket::from_std_stream(socket.into());
    match tokio::time::timeout(connect_timeout, socket.connect(destination)).await {
        Ok(result) => result,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "timed out after {}",
                humantime::format_duration(connect_timeout)
            ),
        )),
    }
}

fn bind_listener(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = Socket::new(
        Domain::for_address(addr),
        Type::STREAM.nonblocking(),
        Some(Protocol::TCP),
    )?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_reuse_address(true)?;
    socket.set_tcp_nodelay(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    TcpListener::from_std(socket.into())
}

/// Folds an IPv4-mapped IPv6 address onto IPv4.
fn unmap(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), v6.port()),
            None => addr,
        },
        SocketAddr::V4(_) => addr,
    }
}

/// Converts the subject to the terms policy matches on. A subject no identity source named
/// (no static file entry, not delivered by the pod watch) is `unknown` to policy.
fn policy_subject(subject: &Subject) -> crate::policy::Subject {
    crate::policy::Subject {
        namespace: subject.namespace.clone(),
        service_account: subject.service_account.clone(),
        pod: subject.pod.clone(),
        labels: subject.labels.clone(),
        uid: Some(subject.uid),
        ..crate::policy::Subject::unknown()
    }
}

/// A session's subject and target in the AccessPolicy's terms, and the masking it gets.
struct SessionAccess {
    subject: crate::policy::Subject,
    target: crate::policy::Target,
    mask: MaskPolicy,
    /// Columns or JSON fields masked whole, lowercase (the policy's `masking.fields`).
    masked_names: Vec<String>,
}
