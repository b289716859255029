//! The Kubernetes API handler, for targets of class `kube_api`.
//!
//! With a serving certificate, the gateway terminates the pod's TLS (ALPN `h2` and
//! `http/1.1`), serves HTTP with hyper and sends each request on to the API server over its
//! own TLS connection, which verifies the cluster CA. The client's `Authorization` header goes
//! upstream unchanged, so the API server authenticates and authorizes the pod as before.
//! Per request the handler attributes the request (`attribution`) and reads the bearer token's
//! claims (`token`) to check them against the calling pod. It then judges the request against
//! the rules, returns a denial as a `Status` (`status`), masks PANs in the response (`body`)
//! and records the request.
//! Upgrades (exec, attach, port-forward) go upstream over HTTP/1.1 and their streams are
//! relayed frame by frame (`upgrade`).
//!
//! Without a serving certificate the pod's TLS cannot be opened: the connection is relayed as
//! TCP and the recording holds the server name from the ClientHello and the byte counts.
//!
//! No timeout limits a request or an upgraded stream: watches, `logs -f` and idle `exec -it`
//! sessions stay open as long as both ends do. Only the wait for a request's headers is
//! limited.

mod access;
pub mod attribution;
pub mod body;
pub mod fields;
pub mod sni;
pub mod status;
pub mod token;
pub mod upgrade;
pub mod upstream;

use std::{
    convert::Infallible,
    io,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, header};
use http_body_util::{BodyExt as _, Full, Limited, combinators::UnsyncBoxBody};
use hyper::{body::Incoming, server::conn as server_conn, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::{Value, json};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};
use tokio_rustls::TlsAcceptor;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{debug, warn};

use self::{
    attribution::RequestInfo,
    body::{CountedBody, MaskedBody, RequestLog, ResponseCounts},
    status::Status,
    token::TokenSubject,
    upgrade::{Direction, Framing, StreamContext},
    upstream::{TrackedExecutor, Upstream, UpstreamBody, UpstreamSettings},
};
use crate::{
    identity::Subject,
    mask::{MaskPolicy, StreamMasker, mask_in_place},
    policy::{Decision, KubeRequestFacts, KubeRule, judge_kube},
    protocol::tcp::RelayResult,
    record::{Fields, Outcome, SessionRecord},
};

/// The session recording, shared by the session's requests and streams.
pub type Recording = Arc<Mutex<SessionRecord>>;

/// Largest request header block accepted, the same as Go's `http.DefaultMaxHeaderBytes`
/// that the API server serves with. Larger ones get `431` and end the connection.
pub const MAX_HEADER_BYTES: usize = 1024 * 1024;
/// Time a client has to send a request's headers once it starts one.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest request body of a mutating request the gateway buffers for the recording: the API
/// server's own limit (`--max-request-body-bytes` defaults to 3 MiB), so a body the gateway
/// refuses would have been refused upstream too.
pub const MAX_REQUEST_BODY: usize = 3 * 1024 * 1024;
/// Bytes of a request body kept in the recording.
const MAX_RECORDED_BODY: usize = 64 * 1024;
/// Time allowed for a client's ClientHello on a target relayed as TCP.
const CLIENT_HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// Everything a Kubernetes API session needs from the proxy.
#[derive(Debug)]
pub struct KubeContext {
    pub rules: Arc<Vec<KubeRule>>,
    /// The AccessPolicy and approvals broker, with the subject and target in policy terms.
    pub access: Option<KubeAccess>,
    pub mask: MaskPolicy,
    /// JSON fields masked whole in responses, lowercase (the policy's `masking.fields`).
    pub masked_fields: Vec<String>,
    /// Serving configuration with ALPN `h2` and `http/1.1`; `None` relays the target as TCP.
    pub server_tls: Option<Arc<rustls::ServerConfig>>,
    pub upstream: UpstreamSettings,
    /// The pod that made the connection.
    pub subject: Subject,
    /// Idle timeout of the TCP relay used without a serving certificate.
    pub idle_timeout: Duration,
    /// Time the client gets to finish the TLS handshake (`proxy.login_timeout`).
    pub login_timeout: Duration,
    /// Maximum time exec and attach output that may start a PAN is held back
    /// (`proxy.exec_output_hold`).
    pub exec_output_hold: Duration,
}

/// What the handler needs to ask the AccessPolicy and hold requests for review.
#[derive(Clone, Debug)]
pub struct KubeAccess {
    pub policy: Arc<crate::policy::PolicyStore>,
    pub approvals: Arc<crate::approval::Broker>,
    pub subject: crate::policy::Subject,
    pub target: crate::policy::Target,
}

/// Runs one client connection to its end.
pub async fn run(
    client: TcpStream,
    upstream: TcpStream,
    context: KubeContext,
    record: Recording,
    force_close: CancellationToken,
) -> RelayResult {
    let Some(server_tls) = context.server_tls.clone() else {
        return relay_without_certificate(client, upstream, &context, &record, force_close).await;
    };

    let counters = Arc::new(ByteCounters::default());
    let tasks = TaskTracker::new();
    let responses = Arc::new(ResponseCounts::default());
    let session = Arc::new(Session {
        upstream: Upstream::new(context.upstream.clone(), upstream, tasks.clone()),
        context,
        record,
        tasks: tasks.clone(),
        force_close: force_close.clone(),
        responses: Arc::clone(&responses),
    });

    let served = tokio::select! {
        result = serve(session, client, server_tls, &counters) => result,
        () = force_close.cancelled() => Err(SessionError::Shutdown),
    };

    // Upgraded streams, HTTP/2 streams and upstream connections still hold the recording.
    // The upstream connections end now that the session (and so their senders) is gone, and
    // upgraded streams end with their peers or with `force_close`.
    tasks.close();
    tasks.wait().await;

    let (outcome, reason) = match served {
        Ok(()) => (Outcome::Closed, None),
        Err(SessionError::Shutdown) => (Outcome::Shutdown, None),
        // A client that closes with unread bytes in its socket (TLS records it did not need,
        // for one) sends a reset, which is no failure once every response was sent.
        Err(SessionError::ClientHttp(error)) if is_reset(&error) && responses.all_finished() => (
            Outcome::Closed,
            Some("the client reset the connection after its last response".to_string()),
        ),
        Err(error) => (Outcome::Error, Some(crate::error_chain(&error))),
    };
    RelayResult {
        outcome,
        reason,
        bytes_from_client: counters.from_client.load(Ordering::Relaxed),
        bytes_from_upstream: counters.to_client.load(Ordering::Relaxed),
    }
}

/// Tells whether `error` comes from the client resetting the connection.
fn is_reset(error: &hyper::Error) -> bool {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(current) = cause {
        if let Some(io) = current.downcast_ref::<io::Error>()
            && matches!(
                io.kind(),
                io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
            )
        {
            return true;
        }
        cause = current.source();
    }
    false
}

/// Reason a session ended early.
#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("client TLS handshake failed")]
    ClientTls(#[source] io::Error),
    #[error("client HTTP connection failed")]
    ClientHttp(#[source] hyper::Error),
    #[error("the daemon is shutting down")]
    Shutdown,
}

/// State shared by the requests of one session.
#[derive(Debug)]
struct Session {
    context: KubeContext,
    record: Recording,
    upstream: Upstream,
    /// Upgraded streams and HTTP/2 tasks of the session.
    tasks: TaskTracker,
    force_close: CancellationToken,
    /// Responses started and finished on the client connection.
    responses: Arc<ResponseCounts>,
}

/// Terminates TLS and serves HTTP on the client connection until it closes.
async fn serve(
    session: Arc<Session>,
    client: TcpStream,
    server_tls: Arc<rustls::ServerConfig>,
    counters: &Arc<ByteCounters>,
) -> Result<(), SessionError> {
    let client = CountingIo {
        inner: client,
        counters: Arc::clone(counters),
    };
    let limit = session.context.login_timeout;
    let stream = tokio::time::timeout(limit, TlsAcceptor::from(server_tls).accept(client))
        .await
        .unwrap_or_else(|_| {
            Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!(
                    "the client did not finish the TLS handshake within {} (proxy.login_timeout)",
                    humantime::format_duration(limit)
                ),
            ))
        })
        .map_err(SessionError::ClientTls)?;
    let h2 = stream.get_ref().1.alpn_protocol() == Some(upstream::ALPN_H2);
    let server_name = stream.get_ref().1.server_name().map(str::to_string);
    record_event(
        &session.record,
        "kube.tls",
        json!({ "alpn": if h2 { "h2" } else { "http/1.1" }, "sni": server_name }),
    );

    let io = TokioIo::new(stream);
    let executor = TrackedExecutor(session.tasks.clone());
    let service = service_fn(move |request| {
        let session = Arc::clone(&session);
        async move {
            session.responses.start();
            let counts = Arc::clone(&session.responses);
            let head = request.method() == http::Method::HEAD;
            let mut response = handle(session, request).await;
            if head {
                response = without_content(response, h2).await;
            }
            Ok::<_, Infallible>(response.map(|body| CountedBody::new(body, counts).boxed_unsync()))
        }
    });
    let result = if h2 {
        server_conn::http2::Builder::new(executor)
            .timer(TokioTimer::new())
            .max_header_list_size(MAX_HEADER_BYTES as u32)
            .serve_connection(io, service)
            .await
    } else {
        server_conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_READ_TIMEOUT)
            .max_buf_size(MAX_HEADER_BYTES)
            .serve_connection(io, service)
            .with_upgrades()
            .await
    };
    result.map_err(SessionError::ClientHttp)
}

/// Response body sent to the client.
type ClientBody = UnsyncBoxBody<Bytes, hyper::Error>;

fn full_body(bytes: Bytes) -> ClientBody {
    Full::new(bytes)
        .map_err(|never: Infallible| match never {})
        .boxed_unsync()
}

/// Returns the response to a HEAD request without content. Its body is read to the end first,
/// so its record is complete. Over HTTP/2 the `Content-Length` of the content a GET would get
/// goes too, because the HTTP/2 layer resets a stream whose data falls short of it.
async fn without_content(response: Response<ClientBody>, h2: bool) -> Response<ClientBody> {
    let (mut parts, body) = response.into_parts();
    if let Err(error) = body.collect().await {
        debug!(%error, "body of a HEAD response failed");
    }
    if h2 {
        parts.headers.remove(header::CONTENT_LENGTH);
    }
    Response::from_parts(parts, full_body(Bytes::new()))
}

/// Handles one request: attribute, check, decide, forward, mask, record.
async fn handle(session: Arc<Session>, request: Request<Incoming>) -> Response<ClientBody> {
    let started = Instant::now();
    let (parts, body) = request.into_parts();
    let info = attribution::attribute(&parts.method, parts.uri.path(), parts.uri.query());
    // Every token the request carries is checked: the API server may authenticate it by any
    // of them, the WebSocket subprotocol's included.
    let mut tokens: Vec<TokenSubject> = parts
        .headers
        .get_all(header::AUTHORIZATION)
        .iter()
        .filter_map(|value| token::decode_bearer(value.as_bytes()))
        .collect();
    tokens.extend(
        parts
            .headers
            .get_all(header::SEC_WEBSOCKET_PROTOCOL)
            .iter()
            .flat_map(|value| token::decode_websocket_bearer(value.as_bytes())),
    );
    let checks: Vec<Option<bool>> = tokens
        .iter()
        .map(|token| token_pod_mismatch(Some(token), &session.context.subject))
        .collect();
    let mismatch = if checks.contains(&Some(true)) {
        Some(true)
    } else if checks.contains(&Some(false)) {
        Some(false)
    } else {
        None
    };
    let token = checks
        .iter()
        .position(|check| *check == mismatch)
        .or((!tokens.is_empty()).then_some(0))
        .map(|index| tokens.swap_remove(index));
    if mismatch == Some(true) {
        record_event(
            &session.record,
            "token_pod_mismatch",
            json!({
                "token": token,
                "caller_pod_uid": session.context.subject.pod_uid,
                "caller_namespace": session.context.subject.namespace,
                "caller_pod": session.context.subject.pod,
                "request": &info,
            }),
        );
    }

    let mut fields = json!({
        "method": parts.method.as_str(),
        "http_version": format!("{:?}", parts.version),
        "request": &info,
        "token": token,
        "token_pod_mismatch": mismatch,
    });
    let mut log = RequestLog::new(Arc::clone(&session.record), Value::Null, started);
    if let Some(reason) = attribution::unclear_path(parts.uri.path()) {
        *log.fields_mut() = fields;
        log.outcome = "rejected";
        let status = Status {
            code: StatusCode::BAD_REQUEST,
            reason: "BadRequest",
            message: format!(
                "the gateway rejects request paths with {reason}: {:?}; send the path in its plain form",
                parts.uri.path()
            ),
            name: String::new(),
            group: String::new(),
            kind: String::new(),
        };
        return status_response(&status, &parts.headers, log);
    }

    let exec = info.exec.as_ref();
    let facts = KubeRequestFacts {
        verb: &info.verb,
        group: &info.group,
        resource: &info.resource,
        subresource: &info.subresource,
        namespace: &info.namespace,
        name: &info.name,
        stdin: exec.map(|exec| exec.stdin),
        tty: exec.map(|exec| exec.tty),
        token_pod_mismatch: mismatch,
    };
    // The one place a Kubernetes request is decided: the configuration's rules, then the
    // AccessPolicy, which may hold the request for review.
    let denial = match judge_kube(&session.context.rules, &facts) {
        Decision::Deny { rule } => Some((rule, None)),
        Decision::Allow => match &session.context.access {
            Some(access) => {
                access::decide(access, &session.record, &info, mismatch == Some(true)).await
            }
            None => None,
        },
    };
    if let Some((rule, detail)) = denial {
        fields["rule"] = json!(rule);
        if let Some(detail) = &detail {
            fields["reason"] = json!(detail);
        }
        *log.fields_mut() = fields;
        log.outcome = "denied";
        let mut status = forbidden(&info, &rule);
        if let Some(detail) = detail {
            status.message = format!("{} ({detail})", status.message);
        }
        return status_response(&status, &parts.headers, log);
    }

    if let Some(protocol) = upgrade_protocol(&parts) {
        *log.fields_mut() = fields;
        return match protocol {
            Ok(framing) => upgrade(session, parts, body, info, framing, log).await,
            Err(offered) => {
                log.outcome = "rejected";
                let status = Status {
                    code: StatusCode::BAD_REQUEST,
                    reason: "BadRequest",
                    message: format!(
                        "unsupported upgrade protocol {offered:?}: the gateway relays websocket and SPDY/3.1 upgrades"
                    ),
                    name: info.name.clone(),
                    group: info.group.clone(),
                    kind: info.resource.clone(),
                };
                status_response(&status, &parts.headers, log)
            }
        };
    }

    // Mutating requests are read whole, so the recording can hold their (masked) body.
    let mutating =
        matches!(info.verb.as_str(), "create" | "update" | "patch") && !info.is_connect();
    let upstream_body: UpstreamBody = if mutating {
        match Limited::new(body, MAX_REQUEST_BODY).collect().await {
            Ok(collected) => {
                let bytes = collected.to_bytes();
                fields["request_body"] = if info.group.is_empty() && info.resource == "secrets" {
                    recorded_secret_body(&bytes, &session.context.mask)
                } else {
                    recorded_write_body(&bytes, &session.context.mask)
                };
                Full::new(bytes)
                    .map_err(|never: Infallible| match never {})
                    .boxed_unsync()
            }
            Err(error) => {
                *log.fields_mut() = fields;
                log.outcome = "rejected";
                let too_large = error.is::<http_body_util::LengthLimitError>();
                let status = if too_large {
                    Status {
                        code: StatusCode::PAYLOAD_TOO_LARGE,
                        reason: "RequestEntityTooLarge",
                        message: format!("request body exceeds the {MAX_REQUEST_BODY}-byte limit"),
                        name: info.name.clone(),
                        group: info.group.clone(),
                        kind: info.resource.clone(),
                    }
                } else {
                    Status {
                        code: StatusCode::BAD_REQUEST,
                        reason: "BadRequest",
                        message: format!("failed to read the request body: {error}"),
                        name: info.name.clone(),
                        group: info.group.clone(),
                        kind: info.resource.clone(),
                    }
                };
                return status_response(&status, &parts.headers, log);
            }
        }
    } else {
        body.boxed_unsync()
    };
    *log.fields_mut() = fields;

    let h2 = session.upstream.uses_h2().await;
    let mut upstream_request = upstream_request(&parts, upstream_body, h2, false, &session);
    let named_fields = !session.context.masked_fields.is_empty();
    {
        let accept: Vec<&str> = parts
            .headers
            .get_all(header::ACCEPT)
            .iter()
            .filter_map(|value| value.to_str().ok())
            .collect();
        match fields::json_accept(&accept) {
            fields::AcceptChoice::Unchanged => {}
            fields::AcceptChoice::Rewritten(json) => {
                let headers = upstream_request.headers_mut();
                headers.remove(header::ACCEPT);
                if let Ok(json) = HeaderValue::from_str(&json) {
                    headers.insert(header::ACCEPT, json);
                }
            }
            fields::AcceptChoice::Unacceptable => {
                log.outcome = "rejected";
                log.error = Some("the request accepts no JSON response".into());
                let status = Status {
                    code: StatusCode::NOT_ACCEPTABLE,
                    reason: "NotAcceptable",
                    message: format!(
                        "gateway: card numbers in base64 values{} are found in JSON only, and the request accepts none of {}; add application/json to Accept",
                        if named_fields {
                            " and named fields"
                        } else {
                            ""
                        },
                        accept.join(", ")
                    ),
                    name: info.name.clone(),
                    group: info.group.clone(),
                    kind: info.resource.clone(),
                };
                return status_response(&status, &parts.headers, log);
            }
        }
    }
    match session.upstream.send(upstream_request).await {
        Ok(response) => client_response(response, &session, &parts.headers, log),
        Err(error) => {
            log.outcome = "upstream_failed";
            log.error = Some(crate::error_chain(&error));
            warn!(error = %crate::error_chain(&error), "request to the API server failed");
            let status = Status::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "ServiceUnavailable",
                format!("gateway: {}", crate::error_chain(&error)),
            );
            status_response(&status, &parts.headers, log)
        }
    }
}

/// Compares the pod a bound token was issued for with the pod that made the connection.
/// `None` when either is unknown (an unbound token, a caller outside a pod).
fn token_pod_mismatch(token: Option<&TokenSubject>, subject: &Subject) -> Option<bool> {
    let token_pod = token?.pod_uid.as_deref()?;
    let caller_pod = subject.pod_uid.as_deref()?;
    Some(!token_pod.eq_ignore_ascii_case(caller_pod))
}

fn forbidden(info: &RequestInfo, rule: &str) -> Status {
    let resource = if info.subresource.is_empty() {
        info.resource.clone()
    } else {
        format!("{}/{}", info.resource, info.subresource)
    };
    let object = match (resource.is_empty(), info.name.is_empty()) {
        (true, _) => format!("{} {}", info.verb, info.path),
        (false, true) => resource.clone(),
        (false, false) => format!("{resource} {:?}", info.name),
    };
    Status {
        code: StatusCode::FORBIDDEN,
        reason: "Forbidden",
        message: format!("{object} is forbidden: denied by node gateway rule {rule:?}"),
        name: info.name.clone(),
        group: info.group.clone(),
        kind: info.resource.clone(),
    }
}

/// Builds a response from a `Status` the gateway makes itself and records the request.
fn status_response(
    status: &Status,
    request: &HeaderMap,
    mut log: RequestLog,
) -> Response<ClientBody> {
    let (content_type, body) = status.encode(request);
    log.status = status.code.as_u16();
    log.response_bytes = body.len() as u64;
    log.mark_complete();
    log.write();
    let mut response = Response::new(full_body(body));
    *response.status_mut() = status.code;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, content_type);
    response
}

/// Headers that belong to one connection and are never forwarded (RFC 9110 section 7.6.1),
/// plus `Accept-Encoding`, removed so the API server responds uncompressed and every body
/// can be scanned.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "transfer-encoding",
    "upgrade",
];

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Headers named in `Connection` are hop-by-hop too.
    let named: Vec<String> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(|name| name.trim().to_ascii_lowercase())
        .filter(|name| !name.is_empty())
        .collect();
    for name in HOP_BY_HOP
        .iter()
        .copied()
        .chain(named.iter().map(String::as_str))
    {
        headers.remove(name);
    }
}

/// Builds the request sent upstream: same method, path, query and headers (the
/// `Authorization` header included), minus hop-by-hop headers and `Accept-Encoding`.
fn upstream_request(
    request: &http::request::Parts,
    body: UpstreamBody,
    h2: bool,
    upgrade: bool,
    session: &Session,
) -> Request<UpstreamBody> {
    let path = request
        .uri
        .path_and_query()
        .map_or("/", |path| path.as_str());
    let authority = request
        .uri
        .authority()
        .map(|authority| authority.as_str().to_string())
        .or_else(|| {
            request
                .headers
                .get(header::HOST)
                .and_then(|host| host.to_str().ok())
                .map(str::to_string)
        })
        .unwrap_or_else(|| session.context.upstream.addr.to_string());

    let mut headers = request.headers.clone();
    let upgrade_headers = if upgrade {
        (
            headers.get(header::UPGRADE).cloned(),
            headers.get(header::CONNECTION).cloned(),
        )
    } else {
        (None, None)
    };
    strip_hop_by_hop(&mut headers);
    headers.remove(header::ACCEPT_ENCODING);
    if let (Some(upgrade), Some(_)) = upgrade_headers {
        headers.insert(header::UPGRADE, upgrade);
        headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    }

    let mut builder = Request::builder().method(request.method.clone());
    if h2 {
        headers.remove(header::HOST);
        builder = builder
            .uri(format!("https://{authority}{path}"))
            .version(http::Version::HTTP_2);
    } else {
        if !headers.contains_key(header::HOST)
            && let Ok(host) = HeaderValue::from_str(&authority)
        {
            headers.insert(header::HOST, host);
        }
        builder = builder.uri(path).version(http::Version::HTTP_11);
    }
    let mut upstream = builder
        .body(body)
        .expect("method and URI come from a parsed request");
    *upstream.headers_mut() = headers;
    upstream
}

/// Turns the API server's response into the client's, with the body masked.
fn client_response(
    response: Response<Incoming>,
    session: &Session,
    request: &HeaderMap,
    mut log: RequestLog,
) -> Response<ClientBody> {
    let (mut parts, body) = response.into_parts();
    log.status = parts.status.as_u16();

    // `Accept-Encoding` was removed, so a compressed body means a server that ignores it;
    // it could not be scanned, so it is not passed on.
    let encoding = parts
        .headers
        .get(header::CONTENT_ENCODING)
        .map(|value| value.as_bytes().to_ascii_lowercase());
    if encoding.is_some_and(|encoding| encoding != b"identity") {
        log.outcome = "upstream_failed";
        log.error = Some("the API server sent a compressed body, which cannot be scanned".into());
        let status = Status::new(
            StatusCode::BAD_GATEWAY,
            "InternalError",
            "gateway: the API server sent a compressed response although none was requested; it was withheld because it could not be scanned for card numbers".into(),
        );
        return status_response(&status, request, log);
    }

    strip_hop_by_hop(&mut parts.headers);
    // Named fields are masked in JSON bodies, and base64 values in JSON or protobuf. The request
    // accepts those only (see `fields::json_accept`), so a body in another format comes from a
    // server that ignored `Accept`, and is withheld like a compressed one.
    let content_type = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    if fields::unreadable_response(&content_type) {
        log.outcome = "upstream_failed";
        log.error = Some(format!(
            "the API server responded in {content_type}, which cannot be masked"
        ));
        let status = Status::new(
            StatusCode::BAD_GATEWAY,
            "InternalError",
            format!(
                "gateway: the API server responded in {content_type} although it was not requested; it was withheld because card numbers could not be masked in it"
            ),
        );
        return status_response(&status, request, log);
    }
    let json = content_type.contains("json");
    let fields = (json && !session.context.masked_fields.is_empty()).then(|| {
        fields::FieldMasker::new(
            &session.context.masked_fields,
            session.context.mask.mask_char,
        )
    });
    // JSON carries byte fields (a Secret's `data`, a ConfigMap's `binaryData`) in base64, so
    // a card number there is decoded to be found. Protobuf carries them as they are.
    let mut masker = StreamMasker::new(session.context.mask.clone());
    if json {
        masker = masker.with_base64();
    }
    let body = MaskedBody::new(body, masker, log).with_fields(fields);
    Response::from_parts(parts, body.boxed_unsync())
}

/// Reads the requested upgrade: `Ok` with the framing for WebSocket and SPDY/3.1,
/// `Err` with the offered protocol for anything else, `None` for requests that are no
/// upgrade. HTTP/2 has no `Upgrade`, so only HTTP/1.1 requests are upgrades.
fn upgrade_protocol(request: &http::request::Parts) -> Option<Result<Framing, String>> {
    if request.version != http::Version::HTTP_11 {
        return None;
    }
    let connection_upgrade = request
        .headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .any(|token| token.trim().eq_ignore_ascii_case("upgrade"));
    let offered = request.headers.get(header::UPGRADE)?;
    if !connection_upgrade {
        return None;
    }
    let offered = String::from_utf8_lossy(offered.as_bytes()).into_owned();
    if offered.eq_ignore_ascii_case("websocket") {
        let (scannable, _) = websocket_offer(&request.headers);
        let channels = scannable
            .iter()
            .any(|protocol| is_channel_protocol(protocol));
        Some(Ok(Framing::WebSocket { channels }))
    } else if offered.eq_ignore_ascii_case("SPDY/3.1") {
        Some(Ok(Framing::Spdy))
    } else {
        Some(Err(offered))
    }
}

/// Splits the client's WebSocket subprotocol offer into the protocols whose frames the gateway
/// can scan and the base64 ones (`base64.channel.k8s.io`, `v4.base64.channel.k8s.io`,
/// `base64.binary.k8s.io`). Those carry the stream's bytes base64-encoded, where a card number
/// is no longer a run of digits, so they are never offered upstream.
fn websocket_offer(headers: &HeaderMap) -> (Vec<String>, Vec<String>) {
    headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(str::trim)
        .filter(|protocol| !protocol.is_empty())
        .map(str::to_string)
        .partition(|protocol| !is_base64_protocol(protocol))
}

/// Tells whether WebSocket subprotocol `protocol` is a base64 variant: one of its dot-separated
/// labels is `base64`.
fn is_base64_protocol(protocol: &str) -> bool {
    protocol
        .split('.')
        .any(|label| label.eq_ignore_ascii_case("base64"))
}

/// Tells whether WebSocket subprotocol `protocol` starts each payload with a stream byte: the
/// Kubernetes channel protocols and the port-forward one.
fn is_channel_protocol(protocol: &str) -> bool {
    !is_base64_protocol(protocol)
        && (protocol.ends_with("channel.k8s.io") || protocol == "portforward.k8s.io")
}

/// Sends an upgrade request upstream on a connection of its own. A `101` from the server is
/// passed on and the two upgraded streams are relayed; any other response (a WebSocket upgrade
/// an older server refuses, an authorization failure) goes to the client as it is, so kubectl
/// can fall back to SPDY.
async fn upgrade(
    session: Arc<Session>,
    mut request: http::request::Parts,
    body: Incoming,
    info: RequestInfo,
    framing: Framing,
    mut log: RequestLog,
) -> Response<ClientBody> {
    let Some(client_upgrade) = request.extensions.remove::<hyper::upgrade::OnUpgrade>() else {
        log.outcome = "rejected";
        log.error = Some("the connection cannot be upgraded".into());
        let status = Status::new(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "the connection cannot be upgraded".into(),
        );
        return status_response(&status, &request.headers, log);
    };
    let (scannable, base64) = websocket_offer(&request.headers);
    if matches!(framing, Framing::WebSocket { .. }) && !base64.is_empty() && scannable.is_empty() {
        let offered = base64.join(", ");
        log.outcome = "rejected";
        log.error = Some(format!(
            "the client offered only base64 WebSocket subprotocols ({offered})"
        ));
        let status = Status {
            code: StatusCode::BAD_REQUEST,
            reason: "BadRequest",
            message: format!(
                "gateway: the offered WebSocket subprotocols ({offered}) carry base64-encoded data, which cannot be scanned for card numbers; offer one without base64, such as v5.channel.k8s.io"
            ),
            name: info.name.clone(),
            group: info.group.clone(),
            kind: info.resource.clone(),
        };
        return status_response(&status, &request.headers, log);
    }
    // A WebSocket extension such as permessage-deflate would compress the frames, which
    // could then not be scanned, so none is offered upstream, nor any base64 subprotocol.
    let mut upstream_request =
        upstream_request(&request, body.boxed_unsync(), false, true, &session);
    upstream_request
        .headers_mut()
        .remove(header::SEC_WEBSOCKET_EXTENSIONS);
    // The remaining names came from valid header values, so joined they are one too.
    if matches!(framing, Framing::WebSocket { .. })
        && !base64.is_empty()
        && let Ok(value) = HeaderValue::from_str(&scannable.join(", "))
    {
        upstream_request
            .headers_mut()
            .insert(header::SEC_WEBSOCKET_PROTOCOL, value);
    }
    let mut response = match session.upstream.send_upgrade(upstream_request).await {
        Ok(response) => response,
        Err(error) => {
            log.outcome = "upstream_failed";
            log.error = Some(crate::error_chain(&error));
            let status = Status::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "ServiceUnavailable",
                format!("gateway: {}", crate::error_chain(&error)),
            );
            return status_response(&status, &request.headers, log);
        }
    };
    if response.status() != StatusCode::SWITCHING_PROTOCOLS {
        return client_response(response, &session, &request.headers, log);
    }
    if let Some(extensions) = response.headers().get(header::SEC_WEBSOCKET_EXTENSIONS) {
        // RFC 6455 forbids an extension the client did not offer. Frames it compresses could
        // not be scanned, so the stream is rejected instead of relayed.
        let extensions = String::from_utf8_lossy(extensions.as_bytes()).into_owned();
        log.outcome = "upstream_failed";
        log.error = Some(format!(
            "the server accepted the upgrade with WebSocket extension {extensions:?}, which was not offered"
        ));
        let status = Status::new(
            StatusCode::BAD_GATEWAY,
            "BadGateway",
            format!(
                "gateway: the API server accepted WebSocket extension {extensions:?}, whose frames cannot be scanned"
            ),
        );
        return status_response(&status, &request.headers, log);
    }

    let chosen = response
        .headers()
        .get(header::SEC_WEBSOCKET_PROTOCOL)
        .map(|value| String::from_utf8_lossy(value.as_bytes()).into_owned());
    if let Some(chosen) = chosen.filter(|chosen| is_base64_protocol(chosen)) {
        // Only a server that breaks RFC 6455 picks a subprotocol that was not offered.
        log.outcome = "upstream_failed";
        log.error = Some(format!(
            "the server accepted the upgrade with WebSocket subprotocol {chosen:?}, which was not offered"
        ));
        let status = Status::new(
            StatusCode::BAD_GATEWAY,
            "BadGateway",
            format!(
                "gateway: the API server chose WebSocket subprotocol {chosen:?}, whose base64 data cannot be scanned"
            ),
        );
        return status_response(&status, &request.headers, log);
    }

    let upstream_upgrade = hyper::upgrade::on(&mut response);
    log.status = 101;
    log.mark_complete();
    log.write();
    let protocol = response
        .headers()
        .get(header::SEC_WEBSOCKET_PROTOCOL)
        .or_else(|| response.headers().get("x-stream-protocol-version"))
        .and_then(|value| value.to_str().ok())
        .unwrap_or("")
        .to_string();
    let record_frames = matches!(info.subresource.as_str(), "exec" | "attach");
    // The server's choice of subprotocol decides how the WebSocket messages are read.
    let framing = match framing {
        Framing::WebSocket { .. } if protocol == upgrade::SPDY_TUNNEL_PROTOCOL => {
            Framing::SpdyInWebSocket
        }
        Framing::WebSocket { .. } if !protocol.is_empty() => Framing::WebSocket {
            channels: is_channel_protocol(&protocol),
        },
        other => other,
    };
    record_event(
        &session.record,
        "stream.open",
        json!({
            "subresource": info.subresource,
            "namespace": info.namespace,
            "pod": info.name,
            "command": info.exec.as_ref().map(|exec| &exec.command),
            "container": info.exec.as_ref().map(|exec| &exec.container),
            "tty": info.exec.as_ref().map(|exec| exec.tty),
            "stdin": info.exec.as_ref().map(|exec| exec.stdin),
            "transport": match framing {
                Framing::Spdy => "spdy",
                Framing::WebSocket { .. } | Framing::SpdyInWebSocket => "websocket",
            },
            // Not `protocol`: every session record carries that key for the target class.
            "stream_protocol": protocol,
        }),
    );

    let context = StreamContext {
        framing,
        mask: session.context.mask.clone(),
        record: Arc::clone(&session.record),
        record_frames,
        exec_output_hold: session.context.exec_output_hold,
        // The kubelet starts each port-forward channel with the port, whatever channel
        // protocol was chosen (`v4.channel.k8s.io` in practice).
        port_prefix: framing == Framing::WebSocket { channels: true }
            && info.subresource == "portforward",
        byte_stream: framing == Framing::WebSocket { channels: false }
            && protocol == "binary.k8s.io",
        opened: Instant::now(),
        spdy_streams: upgrade::spdy::StreamNames::default(),
    };
    let force_close = session.force_close.clone();
    session.tasks.spawn(async move {
        let (client, server) = match tokio::try_join!(client_upgrade, upstream_upgrade) {
            Ok(streams) => streams,
            Err(error) => {
                record_event(
                    &context.record,
                    "stream.close",
                    json!({ "error": format!("upgrade failed: {error}") }),
                );
                return;
            }
        };
        let relay = relay_upgraded(TokioIo::new(client), TokioIo::new(server), &context);
        tokio::select! {
            () = relay => {}
            () = force_close.cancelled() => {
                record_event(
                    &context.record,
                    "stream.close",
                    json!({ "error": "closed because the daemon is shutting down" }),
                );
            }
        }
    });

    let (mut parts, _) = response.into_parts();
    // The 101 keeps `Upgrade` and `Connection`, because they belong to this hop's response.
    let upgrade_header = parts.headers.get(header::UPGRADE).cloned();
    strip_hop_by_hop(&mut parts.headers);
    if let Some(upgrade_header) = upgrade_header {
        parts.headers.insert(header::UPGRADE, upgrade_header);
        parts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    }
    Response::from_parts(parts, full_body(Bytes::new()))
}

async fn relay_upgraded<C, S>(client: C, server: S, context: &StreamContext)
where
    C: AsyncRead + AsyncWrite + Unpin,
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (client_read, client_write) = tokio::io::split(client);
    let (server_read, server_write) = tokio::io::split(server);
    let to_server = upgrade::pump(client_read, server_write, Direction::ToServer, context);
    let to_client = upgrade::pump(server_read, client_write, Direction::ToClient, context);
    tokio::pin!(to_server, to_client);
    // A direction that ends cleanly half-closes its destination and the other goes on. One
    // that fails (a malformed frame) ends the whole stream: both connections are dropped, so
    // neither peer waits on a stream that can no longer be relayed.
    let (to_server, to_client) = tokio::select! {
        result = &mut to_server => {
            let other = if result.is_ok() { Some(to_client.await) } else { None };
            (Some(result), other)
        }
        result = &mut to_client => {
            let other = if result.is_ok() { Some(to_server.await) } else { None };
            (other, Some(result))
        }
    };

    let error = [&to_server, &to_client]
        .iter()
        .find_map(|result| match result {
            Some(Err(error)) => Some(crate::error_chain(error)),
            _ => None,
        });
    let totals = |result: &Option<Result<upgrade::DirectionTotals, _>>| match result {
        Some(Ok(totals)) => json!({
            "bytes": totals.bytes,
            "frames": totals.frames,
            "pans_masked": totals.pans_masked,
            "abrupt_end": totals.abrupt_end,
        }),
        _ => Value::Null,
    };
    record_event(
        &context.record,
        "stream.close",
        json!({
            "duration_ms": context.opened.elapsed().as_millis() as u64,
            "from_client": totals(&to_server),
            "from_server": totals(&to_client),
            "error": error,
        }),
    );
}

/// Prepares a request body for the recording: masked, cut at `MAX_RECORDED_BODY`.
fn recorded_body(bytes: &[u8], mask: &MaskPolicy) -> Value {
    let kept = &bytes[..bytes.len().min(MAX_RECORDED_BODY)];
    let mut copy = kept.to_vec();
    // A PAN cut by the limit at the end is masked as far as it is kept. JSON strings in
    // base64 are decoded as in responses.
    mask_in_place(&mut copy, mask);
    crate::mask::mask_base64_strings(&mut copy, mask);
    json!({
        "bytes": bytes.len(),
        "truncated": bytes.len() > kept.len(),
        "text": String::from_utf8_lossy(&copy),
    })
}

/// Placeholder recorded for each value left out of a Secret write.
const WITHHELD: &str = "(withheld)";

/// Returns the recorded form of the body of a write to a Secret, which never contains its
/// values. A JSON object keeps its structure and the names of its keys, with the values of
/// `data`, `stringData` and the annotations (`kubectl apply` copies the whole object into
/// one) replaced. Any other body (protobuf, YAML, a JSON patch) is left out whole.
fn recorded_secret_body(bytes: &[u8], mask: &MaskPolicy) -> Value {
    let Ok(Value::Object(mut object)) = serde_json::from_slice::<Value>(bytes) else {
        // kubectl sends protobuf for built-in types such as Secrets.
        let form = if bytes.starts_with(b"k8s\0") {
            "protobuf"
        } else {
            "not a JSON object"
        };
        return json!({
            "bytes": bytes.len(),
            "withheld": format!("the Secret's body is {form}, so it is left out; only JSON objects are recorded, without their values"),
        });
    };
    for key in ["data", "stringData"] {
        withhold_values(object.get_mut(key));
    }
    withhold_values(
        object
            .get_mut("metadata")
            .and_then(|metadata| metadata.get_mut("annotations")),
    );
    let mut recorded = recorded_body(Value::Object(object).to_string().as_bytes(), mask);
    recorded["bytes"] = json!(bytes.len());
    recorded
}

/// Annotation in which `kubectl apply` keeps a copy of the whole object.
const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// Returns the recorded form of a write's body. A JSON object with `binaryData` (a ConfigMap,
/// or a patch of one) has those values withheld, and the copy `kubectl apply` keeps in an
/// annotation: base64 hides a card number from the masker.
fn recorded_write_body(bytes: &[u8], mask: &MaskPolicy) -> Value {
    if !bytes.windows(12).any(|window| window == b"\"binaryData\"") {
        return recorded_body(bytes, mask);
    }
    let Ok(Value::Object(mut object)) = serde_json::from_slice::<Value>(bytes) else {
        return recorded_body(bytes, mask);
    };
    withhold_values(object.get_mut("binaryData"));
    if let Some(copy) = object
        .get_mut("metadata")
        .and_then(|metadata| metadata.get_mut("annotations"))
        .and_then(|annotations| annotations.get_mut(LAST_APPLIED))
    {
        *copy = json!(WITHHELD);
    }
    let mut recorded = recorded_body(Value::Object(object).to_string().as_bytes(), mask);
    recorded["bytes"] = json!(bytes.len());
    recorded
}

/// Replaces every value of a JSON object, or the whole value when it is not an object.
fn withhold_values(value: Option<&mut Value>) {
    match value {
        Some(Value::Object(values)) => {
            for value in values.values_mut() {
                *value = json!(WITHHELD);
            }
        }
        Some(Value::Null) | None => {}
        Some(other) => *other = json!(WITHHELD),
    }
}

/// Relays a target whose TLS cannot be terminated, recording the ClientHello's server name.
async fn relay_without_certificate(
    client: TcpStream,
    upstream: TcpStream,
    context: &KubeContext,
    record: &Recording,
    force_close: CancellationToken,
) -> RelayResult {
    let server_name =
        match tokio::time::timeout(CLIENT_HELLO_TIMEOUT, peek_server_name(&client)).await {
            Ok(Ok(name)) => name,
            Ok(Err(error)) => Err(format!("failed to read the ClientHello: {error}")),
            Err(_) => Err("no complete ClientHello within the timeout".to_string()),
        };
    let (sni, note) = match server_name {
        Ok(name) => (name, None),
        Err(note) => (None, Some(note)),
    };
    record_event(
        record,
        "kube.passthrough",
        json!({
            "reason": "no serving certificate is configured for this target, so its TLS is relayed unopened: requests are neither attributed nor masked",
            "sni": sni,
            "note": note,
        }),
    );
    crate::protocol::tcp::relay(client, upstream, context.idle_timeout, force_close).await
}

/// Peeks at the client's first TLS record and returns its server name, without consuming
/// anything, so the relay passes the ClientHello on untouched.
async fn peek_server_name(client: &TcpStream) -> io::Result<Result<Option<String>, String>> {
    let mut buffer = vec![0u8; 512];
    loop {
        let peeked = client.peek(&mut buffer).await?;
        if peeked == 0 {
            return Ok(Err("the client closed before sending a ClientHello".into()));
        }
        match sni::parse_client_hello(&buffer[..peeked]) {
            sni::ClientHello::Parsed { server_name } => return Ok(Ok(server_name)),
            sni::ClientHello::NotTls => {
                return Ok(Err("the client did not start with a TLS ClientHello".into()));
            }
            sni::ClientHello::Incomplete => {
                let wanted = sni::first_record_len(&buffer[..peeked]).unwrap_or(buffer.len() * 2);
                if wanted > buffer.len() {
                    buffer.resize(wanted, 0);
                } else {
                    // The record is not all here yet: wait for more bytes.
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        }
    }
}

/// Writes one event to the session recording.
pub(crate) fn record_event(record: &Recording, event: &'static str, fields: impl Into<Fields>) {
    // Queues the event for the recorder's writer thread; no disk I/O happens here.
    let mut record = record
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Err(error) = record.event(event, fields) {
        warn!(error = %crate::error_chain(&error), session = %record.id, "failed to write a session event");
    } else {
        debug!(session = %record.id, event, "session event recorded");
    }
}

/// Bytes moved on the client connection, counted below TLS.
#[derive(Debug, Default)]
struct ByteCounters {
    from_client: AtomicU64,
    to_client: AtomicU64,
}

/// The client socket with its bytes counted.
#[derive(Debug)]
struct CountingIo {
    inner: TcpStream,
    counters: Arc<ByteCounters>,
}

impl AsyncRead for CountingIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.inner).poll_read(cx, buf);
        let read = buf.filled().len() - before;
        self.counters
            .from_client
            .fetch_add(read as u64, Ordering::Relaxed);
        result
    }
}

impl AsyncWrite for CountingIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(written)) = result {
            self.counters
                .to_client
                .fetch_add(written as u64, Ordering::Relaxed);
        }
        result
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn websocket_offer_sets_base64_apart() {
        let mut headers = HeaderMap::new();
        headers.append(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static("v4.base64.channel.k8s.io, v5.channel.k8s.io"),
        );
        headers.append(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static("BASE64.binary.k8s.io,binary.k8s.io"),
        );
        let (scannable, base64) = websocket_offer(&headers);
        assert_eq!(scannable, ["v5.channel.k8s.io", "binary.k8s.io"]);
        assert_eq!(base64, ["v4.base64.channel.k8s.io", "BASE64.binary.k8s.io"]);
    }

    #[test]
    fn channel_protocols_named() {
        for protocol in [
            "channel.k8s.io",
            "v4.channel.k8s.io",
            "v5.channel.k8s.io",
            "portforward.k8s.io",
        ] {
            assert!(is_channel_protocol(protocol), "{protocol}");
        }
        for protocol in [
            "base64.channel.k8s.io",
            "v4.base64.channel.k8s.io",
            "binary.k8s.io",
            "SPDY/3.1+portforward.k8s.io",
        ] {
            assert!(!is_channel_protocol(protocol), "{protocol}");
        }
    }

    #[test]
    fn secret_body_keeps_keys_not_values() {
        let body = json!({
            "kind": "Secret",
            "metadata": {
                "name": "db",
                "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{\"data\":{\"password\":\"aHVudGVyMjI=\"}}"},
            },
            "data": {"password": "aHVudGVyMjI="},
            "stringData": {"token": "hunter22"},
            "type": "Opaque",
        });
        let recorded = recorded_secret_body(body.to_string().as_bytes(), &MaskPolicy::default());
        let text = recorded["text"].as_str().expect("recorded text");
        assert!(!text.contains("aHVudGVyMjI="), "{text}");
        assert!(!text.contains("hunter22"), "{text}");
        let recorded_json: Value = serde_json::from_str(text).expect("recorded JSON");
        assert_eq!(recorded_json["data"]["password"], WITHHELD);
        assert_eq!(recorded_json["stringData"]["token"], WITHHELD);
        assert_eq!(
            recorded_json["metadata"]["annotations"]["kubectl.kubernetes.io/last-applied-configuration"],
            WITHHELD
        );
        assert_eq!(recorded_json["metadata"]["name"], "db");
        assert_eq!(recorded["bytes"], body.to_string().len());
    }

    #[test]
    fn binary_data_withheld_from_recorded_writes() {
        let body = json!({
            "kind": "ConfigMap",
            "metadata": {
                "name": "blobs",
                "annotations": {LAST_APPLIED: "{\"binaryData\":{\"card\":\"NDExMTExMTExMTExMTExMQ==\"}}"},
            },
            "data": {"note": "plain"},
            "binaryData": {"card": "NDExMTExMTExMTExMTExMQ=="},
        });
        let recorded = recorded_write_body(body.to_string().as_bytes(), &MaskPolicy::default());
        let text = recorded["text"].as_str().expect("recorded text");
        assert!(!text.contains("NDExMTExMTExMTExMTExMQ=="), "{text}");
        let recorded_json: Value = serde_json::from_str(text).expect("recorded JSON");
        assert_eq!(recorded_json["binaryData"]["card"], WITHHELD);
        assert_eq!(
            recorded_json["metadata"]["annotations"][LAST_APPLIED],
            WITHHELD
        );
        assert_eq!(recorded_json["data"]["note"], "plain");
        assert_eq!(recorded["bytes"], body.to_string().len());

        // A body without binaryData is recorded as it came, masked.
        let plain = br#"{"data":{"card":"4111111111111111"}}"#;
        let recorded = recorded_write_body(plain, &MaskPolicy::default());
        assert_eq!(recorded["text"], r#"{"data":{"card":"411111******1111"}}"#);

        // A card number in base64 is masked in its decoded form, as in responses.
        let encoded = br#"{"data":{"b64":"NDExMTExMTExMTExMTExMQ=="}}"#;
        let recorded = recorded_write_body(encoded, &MaskPolicy::default());
        assert_eq!(
            recorded["text"],
            r#"{"data":{"b64":"NDExMTExKioqKioqMTExMQ=="}}"#
        );
    }

    #[test]
    fn secret_body_not_json_withheld() {
        for body in [
            &b"\x6b\x38\x73\x00\x0a\x0c\x0a\x02v1"[..],
            br#"[{"op":"replace","path":"/data/password","value":"aHVudGVyMjI="}]"#,
            b"apiVersion: v1\nkind: Secret\ndata:\n  password: aHVudGVyMjI=\n",
        ] {
            let recorded = recorded_secret_body(body, &MaskPolicy::default());
            assert!(recorded.get("text").is_none(), "{recorded}");
            assert!(recorded["withheld"].is_string(), "{recorded}");
            assert_eq!(recorded["bytes"], body.len());
        }
    }
}
