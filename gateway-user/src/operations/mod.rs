//! The operations endpoint: one HTTP/1.1 listener on a node-local address
//! (`operations.listen`) for probes, scrapers and `gatewayctl status`.
//!
//! - `GET /healthz`: 200 while the daemon's runtime serves requests.
//! - `GET /readyz`: 200 when every readiness check passes, else 503 with one line per failing
//!   check. The checks read the kernel's state on each request: the programs' links are
//!   attached to the pods' cgroup, the heartbeat in `CONFIG` is younger than
//!   `redirect.heartbeat_timeout`, the recorder's writer runs and can write, and no stop signal
//!   has arrived.
//! - `GET /metrics`: the Prometheus text format (version 0.0.4).
//! - `GET /status`: [`DaemonStatus`] as JSON, for `gatewayctl status`.
//!
//! Other paths get 404 and other methods 405. `HEAD` is served like `GET` without a body.
//! The daemon's reconcile loop, not this module, attaches detached programs again.

pub mod metrics;

use std::{
    convert::Infallible,
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt as _, Empty, Full};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric as _},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
    registry::Registry,
};
use serde::{Deserialize, Serialize};
use tokio::{net::TcpListener, sync::Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::{
    approval::Broker,
    config::{Config, FailMode},
    policy::PolicyStore,
    record::Recorder,
    redirect::{self, MapFill, ProgramAttachment, Redirect},
};

/// Connections served at once. Probes and scrapers open a handful, so more wait in the backlog.
const MAX_CONNECTIONS: usize = 32;
/// Time a client gets to send its request headers before the connection is closed.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Time `fetch` waits for the whole response.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(5);

/// Names of the readiness checks, as `/readyz` and `/status` print them.
pub const CHECK_EBPF_ATTACHED: &str = "ebpf_attached";
pub const CHECK_HEARTBEAT: &str = "heartbeat";
pub const CHECK_RECORDER: &str = "recorder";
pub const CHECK_RUNNING: &str = "running";

/// Sources of the endpoint's responses, shared by its connections.
#[derive(Debug)]
pub struct OperationsState {
    pub node: String,
    pub config: Arc<Config>,
    pub redirect: Arc<Redirect>,
    pub recorder: Recorder,
    pub policy: Arc<PolicyStore>,
    pub approvals: Arc<Broker>,
    started: Instant,
    /// Set once a stop signal arrived. The proxy then accepts no new connections while open
    /// sessions drain, so readiness fails.
    stopping: AtomicBool,
    registry: Registry,
}

impl OperationsState {
    /// Builds the state and the metrics registry that `/metrics` encodes.
    pub fn new(
        node: String,
        config: Arc<Config>,
        redirect: Arc<Redirect>,
        recorder: Recorder,
        policy: Arc<PolicyStore>,
        approvals: Arc<Broker>,
    ) -> Self {
        let mut registry = Registry::default();
        metrics::metrics().register(&mut registry);
        registry.register_collector(Box::new(ScrapeTimeValues {
            bpffs: config.redirect.bpffs.clone(),
            recorder: recorder.clone(),
            approvals: Arc::clone(&approvals),
        }));
        Self {
            node,
            config,
            redirect,
            recorder,
            policy,
            approvals,
            started: Instant::now(),
            stopping: AtomicBool::new(false),
            registry,
        }
    }

    /// Marks the daemon as stopping: `/readyz` fails its `running` check from now on.
    pub fn set_stopping(&self) {
        self.stopping.store(true, Ordering::Relaxed);
    }

    /// Runs the readiness checks. Makes `bpf()` system calls, so async callers run it on a
    /// blocking thread.
    pub fn readiness(&self) -> Vec<CheckResult> {
        self.readiness_with(&self.redirect.attachments())
    }

    fn readiness_with(&self, attachments: &[ProgramAttachment]) -> Vec<CheckResult> {
        let detached: Vec<String> = attachments
            .iter()
            .filter(|attachment| !attachment.attached)
            .map(|attachment| {
                format!(
                    "{}: {}",
                    attachment.program,
                    attachment.problem.as_deref().unwrap_or("not attached")
                )
            })
            .collect();
        let attached = CheckResult::new(CHECK_EBPF_ATTACHED, detached.is_empty(), || {
            detached.join("; ")
        });

        let timeout = self.config.redirect.heartbeat_timeout;
        let heartbeat = match self.redirect.heartbeat_age() {
            Ok(Some(age)) => CheckResult::new(CHECK_HEARTBEAT, age < timeout, || {
                format!(
                    "heartbeat is {} ms old, redirect.heartbeat_timeout is {} ms",
                    age.as_millis(),
                    timeout.as_millis()
                )
            }),
            Ok(None) => CheckResult::new(CHECK_HEARTBEAT, false, || {
                "heartbeat was expired for a stop".to_string()
            }),
            Err(error) => CheckResult::new(CHECK_HEARTBEAT, false, || {
                format!(
                    "failed to read the heartbeat: {}",
                    crate::error_chain(&error)
                )
            }),
        };

        let health = self.recorder.health();
        let recorder = if !self.recorder.writer_running() {
            CheckResult::new(CHECK_RECORDER, false, || {
                "the recorder's writer thread has stopped".to_string()
            })
        } else {
            CheckResult::new(CHECK_RECORDER, !health.is_failing(), || health.reason())
        };
        let running = CheckResult::new(
            CHECK_RUNNING,
            !self.stopping.load(Ordering::Relaxed),
            || "gatewayd is stopping and draining its sessions".to_string(),
        );
        vec![attached, heartbeat, recorder, running]
    }

    /// Collects the daemon's status. Makes `bpf()` system calls, like `readiness`.
    pub fn status(&self) -> DaemonStatus {
        let programs = self.redirect.attachments();
        let checks = self.readiness_with(&programs);
        let policy_status = self.policy.status();
        let policy = self.policy.current();
        let health = self.recorder.health();
        DaemonStatus {
            node: self.node.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            pid: std::process::id(),
            uptime_seconds: self.started.elapsed().as_secs(),
            ready: checks.iter().all(|check| check.ok),
            checks,
            cgroup: self.redirect.cgroup.clone(),
            bpffs: self.config.redirect.bpffs.clone(),
            programs,
            maps: redirect::read_map_fills(&self.config.redirect.bpffs),
            targets: self
                .config
                .targets
                .iter()
                .enumerate()
                .map(|(index, target)| TargetStatus {
                    name: target.display_name(),
                    service: target.service.as_ref().map(ToString::to_string),
                    addresses: self.redirect.target_addresses(index as u32),
                    class: target.class.as_str().to_string(),
                })
                .collect(),
            heartbeat: HeartbeatStatus {
                age_ms: self
                    .redirect
                    .heartbeat_age()
                    .ok()
                    .flatten()
                    .map(|age| age.as_millis() as u64),
                interval_ms: self.config.redirect.heartbeat_interval.as_millis() as u64,
                timeout_ms: self.config.redirect.heartbeat_timeout.as_millis() as u64,
            },
            fail_modes: FailModes {
                redirect: fail_mode_name(self.config.redirect.fail_mode).to_string(),
                recording: fail_mode_name(self.recorder.fail_mode()).to_string(),
            },
            policy: PolicyState {
                path: self.config.policy.path.clone(),
                generation: policy_status.generation,
                policies: policy.sources().len(),
                rules: policy.rule_count(),
                reload_error: policy_status.alert.map(|error| crate::error_chain(&error)),
            },
            recorder: RecorderStatus {
                dir: self.recorder.dir().to_path_buf(),
                writer_running: self.recorder.writer_running(),
                failing: health.is_failing(),
                reason: health.is_failing().then(|| health.reason()),
                queue_depth: health.queued(),
                lag_seconds: health.lag().as_secs_f64(),
            },
            approvals_pending: self.approvals.held_count(),
        }
    }

    fn encode_metrics(&self) -> Result<String, std::fmt::Error> {
        let mut text = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut text, &self.registry)?;
        Ok(text)
    }
}

fn fail_mode_name(mode: FailMode) -> &'static str {
    match mode {
        FailMode::Open => "open",
        FailMode::Closed => "closed",
    }
}

/// Outcome of one readiness check.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckResult {
    pub name: String,
    pub ok: bool,
    /// Reason the check failed, absent when it passed.
    pub detail: Option<String>,
}

impl CheckResult {
    fn new(name: &str, ok: bool, detail: impl FnOnce() -> String) -> Self {
        Self {
            name: name.to_string(),
            ok,
            detail: (!ok).then(detail),
        }
    }
}

/// The body of `/status`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DaemonStatus {
    pub node: String,
    pub version: String,
    pub pid: u32,
    pub uptime_seconds: u64,
    pub ready: bool,
    pub checks: Vec<CheckResult>,
    /// The cgroup the programs are attached to.
    pub cgroup: PathBuf,
    pub bpffs: PathBuf,
    pub programs: Vec<ProgramAttachment>,
    pub maps: Vec<MapFill>,
    pub targets: Vec<TargetStatus>,
    pub heartbeat: HeartbeatStatus,
    pub fail_modes: FailModes,
    pub policy: PolicyState,
    pub recorder: RecorderStatus,
    /// Requests held for review now.
    pub approvals_pending: usize,
}

/// One configured target.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TargetStatus {
    pub name: String,
    /// The Service followed, `namespace/name`, for a target named by a Service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// The addresses redirected for it now.
    pub addresses: Vec<SocketAddr>,
    pub class: String,
}

/// The heartbeat in `CONFIG`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HeartbeatStatus {
    /// Age of the heartbeat. Absent when it was expired on purpose or could not be read.
    pub age_ms: Option<u64>,
    pub interval_ms: u64,
    pub timeout_ms: u64,
}

/// The fail modes in force.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FailModes {
    /// `redirect.fail_mode`: what connects do while the heartbeat is stale.
    pub redirect: String,
    /// `recording.fail_mode`: what sessions do while recording fails.
    pub recording: String,
}

/// The access policy in force.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PolicyState {
    /// `policy.path`, absent when `sql_rules` are the policy.
    pub path: Option<PathBuf>,
    /// Successful loads so far, 1 for the first.
    pub generation: u64,
    pub policies: usize,
    pub rules: usize,
    /// Error of the latest reload, while the previous policy stays in force.
    pub reload_error: Option<String>,
}

/// The recorder's state.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RecorderStatus {
    pub dir: PathBuf,
    pub writer_running: bool,
    pub failing: bool,
    pub reason: Option<String>,
    /// Records queued and not yet written.
    pub queue_depth: u64,
    /// Queue wait of the oldest record in the writer's latest batch.
    pub lag_seconds: f64,
}

/// Values read when `/metrics` is scraped, from where they already live.
#[derive(Debug)]
struct ScrapeTimeValues {
    bpffs: PathBuf,
    recorder: Recorder,
    approvals: Arc<Broker>,
}

impl Collector for ScrapeTimeValues {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        // The connect hook counts per CPU in `STATS`. A failed read leaves the metric out
        // rather than reporting a made-up zero.
        match redirect::read_stats(&self.bpffs) {
            Ok(stats) => {
                let redirected = stats.get(gateway_common::Verdict::Redirected)
                    + stats.get(gateway_common::Verdict::RedirectedStale);
                let counter = ConstCounter::new(redirected);
                let metric = encoder.encode_descriptor(
                    "gateway_connections_redirected",
                    "Connects the eBPF hook redirected to the proxy.",
                    None,
                    counter.metric_type(),
                )?;
                counter.encode(metric)?;
            }
            Err(error) => {
                debug!(error = %crate::error_chain(&error), "failed to read the verdict counters for /metrics")
            }
        }

        let pending = ConstGauge::new(self.approvals.held_count() as i64);
        let metric = encoder.encode_descriptor(
            "gateway_approvals_pending",
            "Requests held for review now.",
            None,
            pending.metric_type(),
        )?;
        pending.encode(metric)?;

        let health = self.recorder.health();
        let depth = ConstGauge::new(health.queued() as i64);
        let metric = encoder.encode_descriptor(
            "gateway_recorder_queue_depth",
            "Records queued for the recorder's writer and not yet written.",
            None,
            depth.metric_type(),
        )?;
        depth.encode(metric)?;
        let lag = ConstGauge::new(health.lag().as_secs_f64());
        let metric = encoder.encode_descriptor(
            "gateway_recorder_lag_seconds",
            "Queue wait of the oldest record in the writer's latest batch.",
            None,
            lag.metric_type(),
        )?;
        lag.encode(metric)?;
        let syncs = ConstCounter::new(health.syncs());
        let metric = encoder.encode_descriptor(
            "gateway_recorder_syncs",
            "fdatasync calls on session files and the journal: at most one per file and group-commit window.",
            None,
            syncs.metric_type(),
        )?;
        syncs.encode(metric)?;

        let fills = redirect::read_map_fills(&self.bpffs);
        let mut entries = encoder.encode_descriptor(
            "gateway_ebpf_map_entries",
            "Entries in the CONN and TARGETS maps.",
            None,
            MetricType::Gauge,
        )?;
        for fill in &fills {
            if let Some(count) = fill.entries {
                let labels = [("map", fill.name.as_str())];
                ConstGauge::new(count as i64).encode(entries.encode_family(&labels)?)?;
            }
        }
        let mut capacity = encoder.encode_descriptor(
            "gateway_ebpf_map_capacity",
            "Maximum entries (max_entries) of the CONN and TARGETS maps.",
            None,
            MetricType::Gauge,
        )?;
        for fill in &fills {
            if let Some(max) = fill.capacity {
                let labels = [("map", fill.name.as_str())];
                ConstGauge::new(i64::from(max)).encode(capacity.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

/// Handler of a request, picked from its method and path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    Healthz,
    Readyz,
    Metrics,
    Status,
    NotFound,
    MethodNotAllowed,
}

/// Picks the route for `method` and `path` (without the query string).
pub fn route(method: &Method, path: &str) -> Route {
    let route = match path {
        "/healthz" => Route::Healthz,
        "/readyz" => Route::Readyz,
        "/metrics" => Route::Metrics,
        "/status" => Route::Status,
        _ => return Route::NotFound,
    };
    if method == Method::GET || method == Method::HEAD {
        route
    } else {
        Route::MethodNotAllowed
    }
}

/// Binds the operations listener.
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM.nonblocking(),
        Some(socket2::Protocol::TCP),
    )?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(128)?;
    TcpListener::from_std(socket.into())
}

/// Serves the endpoint on `listener` until `stop` is cancelled.
pub async fn serve(listener: TcpListener, state: Arc<OperationsState>, stop: CancellationToken) {
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "operations endpoint listening");
    }
    loop {
        let permit = tokio::select! {
            () = stop.cancelled() => return,
            permit = Arc::clone(&permits).acquire_owned() => permit.expect("semaphore never closed"),
        };
        let accepted = tokio::select! {
            () = stop.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                warn!(%error, "operations endpoint: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let state = Arc::clone(&state);
        let stop = stop.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let state = Arc::clone(&state);
                async move { Ok::<_, Infallible>(respond(state, request).await) }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            tokio::pin!(connection);
            tokio::select! {
                result = connection.as_mut() => {
                    if let Err(error) = result {
                        debug!(%error, %peer, "operations endpoint: connection ended with an error");
                    }
                }
                () = stop.cancelled() => {}
            }
            drop(permit);
        });
    }
}

type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;

async fn respond<B>(state: Arc<OperationsState>, request: Request<B>) -> Response<Body> {
    let head = request.method() == Method::HEAD;
    let response = match route(request.method(), request.uri().path()) {
        Route::Healthz => text(StatusCode::OK, "ok\n".to_string()),
        Route::Readyz => {
            let checks = on_blocking_thread(&state, OperationsState::readiness).await;
            readiness_response(&checks)
        }
        Route::Metrics => match on_blocking_thread(&state, OperationsState::encode_metrics).await {
            Ok(body) => {
                let mut response = text(StatusCode::OK, body);
                response.headers_mut().insert(
                    header::CONTENT_TYPE,
                    header::HeaderValue::from_static(
                        prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
                    ),
                );
                response
            }
            Err(error) => text(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("failed to encode the metrics: {error}\n"),
            ),
        },
        Route::Status => {
            let status = on_blocking_thread(&state, OperationsState::status).await;
            let body = serde_json::to_string_pretty(&status).expect("status serializes");
            let mut response = text(StatusCode::OK, body + "\n");
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("application/json"),
            );
            response
        }
        Route::NotFound => text(
            StatusCode::NOT_FOUND,
            "not found: the paths are /healthz, /readyz, /metrics and /status\n".to_string(),
        ),
        Route::MethodNotAllowed => {
            let mut response = text(
                StatusCode::METHOD_NOT_ALLOWED,
                "method not allowed: use GET\n".to_string(),
            );
            response
                .headers_mut()
                .insert(header::ALLOW, header::HeaderValue::from_static("GET, HEAD"));
            response
        }
    };
    if head {
        let (parts, _) = response.into_parts();
        return Response::from_parts(parts, Empty::new().boxed());
    }
    response
}

async fn on_blocking_thread<T: Send + 'static>(
    state: &Arc<OperationsState>,
    work: fn(&OperationsState) -> T,
) -> T {
    let state = Arc::clone(state);
    tokio::task::spawn_blocking(move || work(&state))
        .await
        .expect("operations task panicked")
}

/// Builds the `/readyz` response: 200 `ready`, or 503 with one `name: detail` line per failing
/// check.
pub fn readiness_response(checks: &[CheckResult]) -> Response<Body> {
    let failing: Vec<String> = checks
        .iter()
        .filter(|check| !check.ok)
        .map(|check| {
            format!(
                "{}: {}",
                check.name,
                check.detail.as_deref().unwrap_or("failed")
            )
        })
        .collect();
    if failing.is_empty() {
        text(StatusCode::OK, "ready\n".to_string())
    } else {
        text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready\n{}\n", failing.join("\n")),
        )
    }
}

fn text(status: StatusCode, body: String) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::from(body)).boxed());
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// Errors of [`fetch`].
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error(
        "failed to connect to the operations endpoint {addr} (is gatewayd running, with operations.listen set to this address?)"
    )]
    Connect {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("HTTP request to the operations endpoint {addr} failed")]
    Http {
        addr: SocketAddr,
        source: hyper::Error,
    },
    #[error("the operations endpoint {addr} did not answer within {} s", FETCH_TIMEOUT.as_secs())]
    TimedOut { addr: SocketAddr },
}

/// Sends `GET path` to the operations endpoint at `addr` and returns the status and body.
pub async fn fetch(addr: SocketAddr, path: &str) -> Result<(StatusCode, String), FetchError> {
    tokio::time::timeout(FETCH_TIMEOUT, fetch_now(addr, path))
        .await
        .map_err(|_| FetchError::TimedOut { addr })?
}

async fn fetch_now(addr: SocketAddr, path: &str) -> Result<(StatusCode, String), FetchError> {
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|source| FetchError::Connect { addr, source })?;
    let http = |source| FetchError::Http { addr, source };
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(http)?;
    let driver = tokio::spawn(connection);
    let request = Request::get(path)
        .header(header::HOST, addr.to_string())
        .body(Empty::<Bytes>::new())
        .expect("a path and a host make a valid request");
    let response = sender.send_request(request).await.map_err(http)?;
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(http)?
        .to_bytes();
    driver.abort();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_known_paths() {
        assert_eq!(route(&Method::GET, "/healthz"), Route::Healthz);
        assert_eq!(route(&Method::GET, "/readyz"), Route::Readyz);
        assert_eq!(route(&Method::GET, "/metrics"), Route::Metrics);
        assert_eq!(route(&Method::GET, "/status"), Route::Status);
        assert_eq!(route(&Method::HEAD, "/readyz"), Route::Readyz);
    }

    #[test]
    fn route_unknown_path_not_found() {
        for path in ["/", "/healthz/", "/metricsx", "/../status", ""] {
            assert_eq!(route(&Method::GET, path), Route::NotFound, "{path:?}");
        }
        // An unknown path is 404 whatever the method.
        assert_eq!(route(&Method::POST, "/nope"), Route::NotFound);
    }

    #[test]
    fn route_other_methods_not_allowed() {
        for method in [Method::POST, Method::PUT, Method::DELETE, Method::PATCH] {
            assert_eq!(
                route(&method, "/healthz"),
                Route::MethodNotAllowed,
                "{method}"
            );
        }
    }

    async fn body_of(response: Response<Body>) -> String {
        let bytes = response
            .into_body()
            .collect()
            .await
            .expect("body is in memory")
            .to_bytes();
        String::from_utf8(bytes.to_vec()).expect("UTF-8 body")
    }

    #[tokio::test]
    async fn readiness_names_each_failing_check() {
        let checks = vec![
            CheckResult::new(CHECK_EBPF_ATTACHED, false, || {
                "connect4: link 7 is detached".to_string()
            }),
            CheckResult::new(CHECK_HEARTBEAT, true, String::new),
            CheckResult::new(CHECK_RECORDER, false, || "low disk space".to_string()),
        ];
        let response = readiness_response(&checks);
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        let body = body_of(response).await;
        assert!(
            body.contains("ebpf_attached: connect4: link 7 is detached"),
            "{body}"
        );
        assert!(body.contains("recorder: low disk space"), "{body}");
        assert!(!body.contains("heartbeat"), "{body}");
    }

    #[tokio::test]
    async fn readiness_all_passing_is_ok() {
        let checks = vec![
            CheckResult::new(CHECK_EBPF_ATTACHED, true, String::new),
            CheckResult::new(CHECK_HEARTBEAT, true, String::new),
        ];
        let response = readiness_response(&checks);
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(body_of(response).await, "ready\n");
    }

    #[test]
    fn check_detail_only_on_failure() {
        let passed = CheckResult::new(CHECK_HEARTBEAT, true, || "unused".to_string());
        assert_eq!(passed.detail, None);
        let failed = CheckResult::new(CHECK_HEARTBEAT, false, || "stale".to_string());
        assert_eq!(failed.detail.as_deref(), Some("stale"));
    }

    #[test]
    fn metrics_encode_counters_in_text_format() {
        let mut registry = Registry::default();
        metrics::metrics().register(&mut registry);
        metrics::metrics().connection_accepted();
        metrics::metrics().error(metrics::ErrorKind::UpstreamConnect);
        let mut text = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut text, &registry).expect("encode");
        assert!(
            text.contains("# TYPE gateway_connections_accepted_total counter"),
            "{text}"
        );
        let accepted = text
            .lines()
            .find_map(|line| line.strip_prefix("gateway_connections_accepted_total "))
            .expect("accepted sample");
        assert!(accepted.parse::<u64>().expect("integer") >= 1, "{text}");
        assert!(
            text.contains("gateway_errors_total{kind=\"upstream_connect\"}"),
            "{text}"
        );
    }
}
