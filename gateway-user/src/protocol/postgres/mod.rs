//! PostgreSQL handler for targets of class `postgres`: speaks the v3 protocol in both directions,
//! records each statement, enforces the access policy (allow, deny, or hold for review), and
//! masks card numbers in what the server sends back.
//!
//! The session runs as two pumps over one shared state: the frontend pump reads the client and
//! writes the server, the backend pump the other way round. Each statement the client sends is
//! queued under its synchronization point (a Sync, or a simple Query, each of which the server
//! completes with exactly one ReadyForQuery), and the backend pump pairs the server's completions
//! and errors with that queue to finish each statement's record.
//!
//! A denied statement is not dropped but replaced, for the server, by a statement that fails to
//! parse. The server then fails at the same point of the pipeline, rolls back the same implicit
//! transaction, skips the rest until Sync and sends one ReadyForQuery, exactly as if the real
//! statement had failed. The backend pump swaps that syntax error for the gateway's own
//! ErrorResponse (SQLSTATE 42501, naming the rule), so the client sees the results owed before
//! it, the denial, and nothing after it until Sync.
//!
//! A statement held for review (see `judge`) stops the frontend pump before it is forwarded:
//! the client sees a slow query, and the statement then runs or is denied as above.

mod bind;
pub mod cancel;
pub mod codec;
mod judge;
mod refuse;
pub mod rows;

pub use refuse::refuse;

use std::{
    collections::{HashMap, VecDeque},
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::{BufMut as _, Bytes, BytesMut};
use serde_json::{Value, json};
use tokio::{
    io::{AsyncRead, AsyncReadExt as _},
    io::{AsyncWrite, AsyncWriteExt as _, BufWriter},
    net::TcpStream,
};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use self::{
    cancel::CancelRegistry,
    codec::{BodyReader, CodecError, FrameReader, Header},
    rows::RowMasker,
};
use super::tcp::{Counters, RelayResult, idle};
use crate::{
    approval::Broker,
    mask::{MaskPolicy, StreamMasker, mask_in_place, mask_in_place_with_hex},
    policy::{PolicyStore, Subject as PolicySubject, Target as PolicyTarget},
    record::{Fields, Outcome, SessionRecord},
    sql::{SqlDialect, StatementInfo, analyze},
};

/// Largest Query or Parse the proxy reads whole to judge it. Statements are judged before they
/// run, so they cannot be streamed; 64 MiB is far above any hand-written statement while
/// bounding what one client can make the proxy hold.
pub const STATEMENT_HOLD_LIMIT: usize = 64 * 1024 * 1024;
/// Maximum length of a statement text or parameter value in a recording. Longer ones are cut
/// and marked, because the recording is an audit trail and not a data copy.
const RECORDED_TEXT_LIMIT: usize = 4096;
/// SQLSTATE of the gateway's denials: `insufficient_privilege`.
const DENIED_SQLSTATE: &str = "42501";
/// SQLSTATE of the error for a statement the gateway had no memory to read: `out_of_memory`.
const OUT_OF_MEMORY_SQLSTATE: &str = "53200";

/// Inputs of a PostgreSQL session from the rest of the daemon.
#[derive(Clone, Debug)]
pub struct PostgresContext {
    pub policy: Arc<PolicyStore>,
    pub approvals: Arc<Broker>,
    /// The caller and the target, in the terms policy matches on.
    pub subject: PolicySubject,
    pub target: PolicyTarget,
    pub mask: MaskPolicy,
    /// Result columns masked whole, by lowercase name (the policy's `masking.fields`).
    pub masked_columns: Vec<String>,
    pub cancels: Arc<CancelRegistry>,
    /// Server address of this session's upstream connection, for routing cancel requests.
    pub upstream_addr: SocketAddr,
    /// Socket mark for connections the handler opens itself (cancel forwarding).
    pub mark: u32,
    pub idle_timeout: Duration,
    /// Time the client gets to finish its startup and authentication (`proxy.login_timeout`).
    pub login_timeout: Duration,
    /// Serving certificate for client TLS; without one, SSLRequest is declined.
    pub server_tls: Option<Arc<rustls::ServerConfig>>,
    /// TLS for the server leg, with the name to verify; `None` for plain text.
    pub upstream_tls: Option<(
        Arc<rustls::ClientConfig>,
        rustls::pki_types::ServerName<'static>,
    )>,
}

/// A statement waiting for the server's response.
#[derive(Debug)]
struct Pending {
    /// Statement text, masked and cut to `RECORDED_TEXT_LIMIT`.
    text: String,
    info: StatementInfo,
    /// Parameter values, masked and cut.
    params: Vec<Value>,
    started: Instant,
    /// Set when the statement was denied: the rule's name.
    denied_by: Option<String>,
    /// Result column format codes from Bind; empty for simple queries, whose formats come
    /// from RowDescription.
    result_formats: Vec<i16>,
    /// Position (from 1) and count of the statements in a query string of several statements.
    part: Option<(u64, u64)>,
}

/// Statements between two synchronization points.
#[derive(Debug, Default)]
struct SyncPoint {
    statements: VecDeque<Pending>,
    /// The text that makes the server fail in place of a denied statement, when one was denied.
    denial_marker: Option<String>,
    /// The gateway error to send in place of the server's error for the marker.
    denial_error: Option<Bytes>,
}

#[derive(Debug, Default)]
struct Shared {
    /// Closed synchronization points in the order the server responds to them, then the open one.
    syncs: VecDeque<SyncPoint>,
}

impl Pending {
    /// A statement about to be sent to the server.
    fn new(
        text: String,
        info: StatementInfo,
        params: Vec<Value>,
        result_formats: Vec<i16>,
    ) -> Self {
        Self {
            text,
            info,
            params,
            started: Instant::now(),
            denied_by: None,
            result_formats,
            part: None,
        }
    }

    /// A statement denied by `rule`, which the server only sees as a stand-in.
    fn denied(text: String, info: StatementInfo, rule: &str) -> Self {
        Self {
            denied_by: Some(rule.to_string()),
            ..Self::new(text, info, Vec::new(), Vec::new())
        }
    }
}

impl Shared {
    /// Queues a denied statement at the open synchronization point and returns the stand-in
    /// text to send the server in its place.
    fn deny(&mut self, pending: Pending, denial: &judge::Denial, session_token: &str) -> String {
        let error = denial_error(&denial.rule, denial.detail.as_deref());
        self.deny_with(pending, error, session_token)
    }

    /// Like [`Shared::deny`], with `error` as the ErrorResponse the client gets.
    fn deny_with(&mut self, pending: Pending, error: Bytes, session_token: &str) -> String {
        let marker = denial_marker(session_token);
        let point = self.open();
        point.statements.push_back(pending);
        point.denial_marker = Some(marker.clone());
        point.denial_error = Some(error);
        marker
    }

    fn open(&mut self) -> &mut SyncPoint {
        if self.syncs.is_empty() {
            self.syncs.push_back(SyncPoint::default());
        }
        self.syncs.back_mut().expect("one sync point exists")
    }

    /// Closes the open synchronization point (a Sync or Query went upstream).
    fn close(&mut self) {
        self.open();
        self.syncs.push_back(SyncPoint::default());
    }
}

/// References both pumps of a session share.
#[derive(Clone, Copy)]
struct PumpContext<'a> {
    context: &'a PostgresContext,
    record: &'a Recording,
    counters: &'a Counters,
    shared: &'a Mutex<Shared>,
    /// Set by the backend pump at the first ReadyForQuery; until then client messages are
    /// held to the authentication size limit.
    authenticated: &'a AtomicBool,
    /// Set once the server reports `standard_conforming_strings` off or a statement names that
    /// setting: rules then also judge each text as read with backslash escapes in strings.
    escape_readings: &'a AtomicBool,
    startup: &'a StartupInfo,
    session_token: &'a str,
}

/// Session facts from the startup packet, written into every statement record.
#[derive(Clone, Default)]
pub struct StartupInfo {
    pub user: String,
    pub database: String,
    /// The `replication` startup parameter, which turns the session into a walsender.
    pub replication: Replication,
    /// The whole StartupMessage, length included, to forward to the server.
    pub packet: Bytes,
}

/// Replication mode a client asks for in its startup packet.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Replication {
    /// An ordinary session.
    #[default]
    None,
    /// `replication=database`: logical decoding, whose changes arrive as rows the masker can
    /// scan.
    Logical,
    /// `replication=true`: base backups and WAL streaming, which carry the server's data files
    /// and WAL records byte for byte.
    Physical,
}

impl Replication {
    /// Reads the parameter's value as the server does: `database`, or a boolean. A value the
    /// server would reject is left to it.
    fn from_parameter(value: &str) -> Self {
        if value == "database" {
            return Self::Logical;
        }
        match parse_bool(value) {
            Some(true) => Self::Physical,
            _ => Self::None,
        }
    }

    fn name(self) -> Option<&'static str> {
        match self {
            Self::None => None,
            Self::Logical => Some("logical"),
            Self::Physical => Some("physical"),
        }
    }
}

/// Parses a boolean the way PostgreSQL reads settings: any case, `on`, `off`, `1`, `0`, and
/// prefixes of `true`, `false`, `yes` and `no`.
pub(super) fn parse_bool(value: &str) -> Option<bool> {
    let value = value.trim().to_ascii_lowercase();
    let prefix_of = |word: &str| !value.is_empty() && word.starts_with(value.as_str());
    match value.as_str() {
        "on" | "1" => Some(true),
        "of" | "off" | "0" => Some(false),
        _ if prefix_of("true") || prefix_of("yes") => Some(true),
        _ if prefix_of("false") || prefix_of("no") => Some(false),
        _ => None,
    }
}

/// Message of the FATAL error that rejects a physical replication session.
const PHYSICAL_REPLICATION_REJECTED: &str = "gateway: physical replication (pg_basebackup, \
    pg_receivewal, standbys) is rejected, because it copies data files and WAL in which card \
    numbers cannot be masked without corrupting them; connect replicas from a cgroup listed in \
    redirect.exclude_cgroups";

type Recording = Arc<Mutex<SessionRecord>>;

/// Runs a PostgreSQL session to its end.
pub async fn run(
    client: TcpStream,
    upstream: TcpStream,
    context: PostgresContext,
    record: Recording,
    force_close: CancellationToken,
) -> RelayResult {
    let counters = Arc::new(Counters::new());
    let session_token = uuid::Uuid::now_v7().simple().to_string();
    let authenticated = AtomicBool::new(false);
    let result = tokio::select! {
        result = session(client, upstream, &context, &record, &counters, &session_token, &authenticated) => result,
        () = idle(&counters, context.idle_timeout) => Err(SessionEnd::Idle),
        () = super::login_deadline(&authenticated, context.login_timeout) => Err(SessionEnd::LoginTimeout),
        () = force_close.cancelled() => Err(SessionEnd::Shutdown),
    };
    context.cancels.forget_session(&session_token);

    let (outcome, reason) = match result {
        Ok(()) => (Outcome::Closed, None),
        Err(SessionEnd::Idle) => (
            Outcome::IdleTimeout,
            Some(format!(
                "no bytes either way for {}",
                humantime::format_duration(context.idle_timeout)
            )),
        ),
        Err(SessionEnd::Shutdown) => (
            Outcome::Shutdown,
            Some("closed by the proxy: drain deadline passed during shutdown".to_string()),
        ),
        Err(SessionEnd::LoginTimeout) => (
            Outcome::IdleTimeout,
            Some(format!(
                "the client did not finish logging in within {} (proxy.login_timeout)",
                humantime::format_duration(context.login_timeout)
            )),
        ),
        Err(SessionEnd::Failed { side, error }) => {
            warn!(%error, side, "postgres session ended on an error");
            (Outcome::Error, Some(format!("{side}: {error}")))
        }
        Err(SessionEnd::Cancel(reason)) => (Outcome::Closed, Some(reason)),
        Err(SessionEnd::Rejected(reason)) => {
            info!(reason, "postgres session rejected");
            (Outcome::RejectedUnsupported, Some(reason))
        }
    };
    RelayResult {
        outcome,
        reason,
        bytes_from_client: counters.from_client.load(Ordering::Relaxed),
        bytes_from_upstream: counters.from_upstream.load(Ordering::Relaxed),
    }
}

/// Reason a session stopped early.
#[derive(Debug)]
enum SessionEnd {
    Idle,
    /// The client had not finished its startup and authentication in `proxy.login_timeout`.
    LoginTimeout,
    Shutdown,
    /// A cancel-request connection, which ends after forwarding (or dropping) its request.
    Cancel(String),
    /// A session the gateway does not proxy, for the reason given, which the client received too.
    Rejected(String),
    Failed {
        side: &'static str,
        error: CodecError,
    },
}

fn client_error(error: impl Into<CodecError>) -> SessionEnd {
    SessionEnd::Failed {
        side: "client",
        error: error.into(),
    }
}

fn server_error(error: impl Into<CodecError>) -> SessionEnd {
    SessionEnd::Failed {
        side: "server",
        error: error.into(),
    }
}

/// The reading half of a leg, plain or TLS.
type ReadHalf = Box<dyn AsyncRead + Unpin + Send>;
/// The writing half of a leg, plain or TLS.
type WriteHalf = Box<dyn AsyncWrite + Unpin + Send>;

/// First byte of a TLS handshake record: a client starting TLS directly (PostgreSQL 17's
/// `sslnegotiation=direct`) sends it where a startup packet's length would be.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

async fn session(
    client: TcpStream,
    upstream: TcpStream,
    context: &PostgresContext,
    record: &Recording,
    counters: &Counters,
    session_token: &str,
    authenticated: &AtomicBool,
) -> Result<(), SessionEnd> {
    let mut first = [0u8; 1];
    let peeked = client.peek(&mut first).await.map_err(client_error)?;
    if peeked == 0 {
        return Ok(());
    }

    let (client_read, mut client_write, client_tls, first_packet) =
        if first[0] == TLS_HANDSHAKE_RECORD {
            let Some(config) = &context.server_tls else {
                return Err(client_error(CodecError::Malformed {
                    message: "startup",
                    reason: "direct TLS, but no serving certificate is configured for this target",
                }));
            };
            let stream = TlsAcceptor::from(Arc::clone(config))
                .accept(client)
                .await
                .map_err(client_error)?;
            // Direct TLS must carry the `postgresql` ALPN, so a TLS connection meant for another
            // protocol is never taken for PostgreSQL.
            if stream.get_ref().1.alpn_protocol() != Some(crate::tls::ALPN_POSTGRESQL) {
                return Err(client_error(CodecError::Malformed {
                    message: "startup",
                    reason: "direct TLS without the postgresql ALPN protocol",
                }));
            }
            let (read, write) = tokio::io::split(stream);
            (
                Box::new(read) as ReadHalf,
                Box::new(write) as WriteHalf,
                true,
                None,
            )
        } else {
            match negotiate(client, context, counters).await? {
                Negotiated::Plain(stream, packet) => {
                    let (read, write) = stream.into_split();
                    (
                        Box::new(read) as ReadHalf,
                        Box::new(write) as WriteHalf,
                        false,
                        Some(packet),
                    )
                }
                Negotiated::Tls(stream) => {
                    let (read, write) = tokio::io::split(*stream);
                    (
                        Box::new(read) as ReadHalf,
                        Box::new(write) as WriteHalf,
                        true,
                        None,
                    )
                }
                Negotiated::Done => return Ok(()),
            }
        };

    let mut client_reader = FrameReader::new(client_read);
    let Some(startup) = startup(
        &mut client_reader,
        &mut client_write,
        context,
        counters,
        first_packet,
    )
    .await?
    else {
        return Ok(());
    };
    if startup.replication == Replication::Physical {
        record_startup(record, &startup, client_tls, None);
        let error = refuse::fatal("0A000", PHYSICAL_REPLICATION_REJECTED);
        client_write.write_all(&error).await.map_err(client_error)?;
        client_write.shutdown().await.map_err(client_error)?;
        return Err(SessionEnd::Rejected(
            "physical replication: data files and WAL cannot be masked".to_string(),
        ));
    }
    let (upstream_read, upstream_write, upstream_tls) = connect_server(upstream, context).await?;
    let mut upstream_writer = BufWriter::new(upstream_write);
    upstream_writer
        .write_all(&startup.packet)
        .await
        .map_err(server_error)?;
    upstream_writer.flush().await.map_err(server_error)?;
    record_startup(record, &startup, client_tls, Some(upstream_tls));

    let shared = Arc::new(Mutex::new(Shared::default()));
    let escape_readings = AtomicBool::new(false);
    let _unanswered = RecordUnanswered {
        shared: &shared,
        record,
        startup: &startup,
    };
    let pump = PumpContext {
        context,
        record,
        counters,
        shared: &shared,
        authenticated,
        escape_readings: &escape_readings,
        startup: &startup,
        session_token,
    };
    let frontend = frontend(client_reader, upstream_writer, &pump);
    let backend = backend(
        FrameReader::new(upstream_read),
        BufWriter::new(client_write),
        &pump,
    );
    tokio::try_join!(frontend, backend).map(|_| ())
}

/// Records the `sql.startup` event. `upstream_tls` is `None` when no server leg was opened.
fn record_startup(
    record: &Recording,
    startup: &StartupInfo,
    client_tls: bool,
    upstream_tls: Option<bool>,
) {
    record_event(
        record,
        "sql.startup",
        json!({
            "database_user": startup.user,
            "database": startup.database,
            "replication": startup.replication.name(),
            "client_tls": client_tls,
            "upstream_tls": upstream_tls,
        }),
    );
}

/// Outcome of the plain-text start of a connection.
enum Negotiated {
    /// No TLS: the connection and the first packet that is not an encryption request.
    Plain(TcpStream, Bytes),
    /// The client asked for TLS and the handshake is done.
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
    /// The connection ended (a cancel request, or the client left).
    Done,
}

/// Handles the encryption requests that may open a connection. GSSENCRequest is declined with
/// `N` (the client goes on with SSLRequest or in plain text); SSLRequest is accepted with `S`
/// and a TLS handshake when the target has a serving certificate, and declined otherwise.
async fn negotiate(
    mut client: TcpStream,
    context: &PostgresContext,
    counters: &Counters,
) -> Result<Negotiated, SessionEnd> {
    loop {
        let Some(body) = read_startup_exact(&mut client)
            .await
            .map_err(client_error)?
        else {
            return Ok(Negotiated::Done);
        };
        counters
            .from_client
            .fetch_add(body.len() as u64 + 4, Ordering::Relaxed);
        counters.touch();
        match startup_code(&body) {
            codec::GSSENC_REQUEST_CODE => {
                client.write_all(b"N").await.map_err(client_error)?;
            }
            codec::SSL_REQUEST_CODE => match &context.server_tls {
                Some(config) => {
                    client.write_all(b"S").await.map_err(client_error)?;
                    let stream = TlsAcceptor::from(Arc::clone(config))
                        .accept(client)
                        .await
                        .map_err(client_error)?;
                    return Ok(Negotiated::Tls(Box::new(stream)));
                }
                None => client.write_all(b"N").await.map_err(client_error)?,
            },
            _ => return Ok(Negotiated::Plain(client, body)),
        }
    }
}

/// Reads one untagged startup packet without reading past it, since the bytes after an
/// SSLRequest belong to the TLS handshake. Returns its body (code included).
async fn read_startup_exact(client: &mut TcpStream) -> Result<Option<Bytes>, CodecError> {
    let mut length = [0u8; 4];
    match client.read_exact(&mut length).await {
        Ok(_) => {}
        Err(error) if error.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(error) => return Err(error.into()),
    }
    let declared = i32::from_be_bytes(length);
    if declared < 8 || declared as u32 > codec::MAX_STARTUP_LEN {
        return Err(CodecError::InvalidLength {
            length: i64::from(declared),
            reason: "a startup packet is 8 to 10000 bytes long",
        });
    }
    let mut body = vec![0u8; declared as usize - 4];
    client
        .read_exact(&mut body)
        .await
        .map_err(|error| match error.kind() {
            std::io::ErrorKind::UnexpectedEof => CodecError::UnexpectedEof {
                received: 4,
                expected: declared as usize,
            },
            _ => error.into(),
        })?;
    Ok(Some(Bytes::from(body)))
}

fn startup_code(body: &[u8]) -> u32 {
    u32::from_be_bytes(
        body[..4]
            .try_into()
            .expect("startup bodies are at least 4 bytes"),
    )
}

/// Handles the startup packet (after any TLS): a CancelRequest is routed to the session it
/// names, a StartupMessage is parsed and returned for forwarding. `first` is a packet already
/// read during negotiation. Returns `None` when the connection ends here.
async fn startup(
    client: &mut FrameReader<ReadHalf>,
    client_write: &mut WriteHalf,
    context: &PostgresContext,
    counters: &Counters,
    first: Option<Bytes>,
) -> Result<Option<StartupInfo>, SessionEnd> {
    let body = match first {
        Some(body) => body,
        None => {
            let Some(body) = client.read_startup().await.map_err(client_error)? else {
                return Ok(None);
            };
            counters
                .from_client
                .fetch_add(body.len() as u64 + 4, Ordering::Relaxed);
            counters.touch();
            body
        }
    };
    match startup_code(&body) {
        codec::CANCEL_REQUEST_CODE => {
            let outcome = context.cancels.forward(&body, context.mark).await;
            Err(SessionEnd::Cancel(outcome))
        }
        codec::PROTOCOL_3_0..=codec::PROTOCOL_3_2 => {
            let mut info = parse_startup(&body[4..]).map_err(client_error)?;
            let mut packet = BytesMut::with_capacity(body.len() + 4);
            packet.put_u32(body.len() as u32 + 4);
            packet.put_slice(&body);
            info.packet = packet.freeze();
            Ok(Some(info))
        }
        codec::SSL_REQUEST_CODE | codec::GSSENC_REQUEST_CODE => {
            Err(client_error(CodecError::Malformed {
                message: "startup packet",
                reason: "encryption requested inside an encrypted connection",
            }))
        }
        other => {
            let message = format!(
                "unsupported frontend protocol {}.{}: the gateway speaks 3.0 to 3.2",
                other >> 16,
                other & 0xffff
            );
            let error = codec::error_response("08P01", &message);
            let _ = client_write.write_all(&error).await;
            let _ = client_write.flush().await;
            Err(client_error(CodecError::Malformed {
                message: "startup packet",
                reason: "unsupported protocol version",
            }))
        }
    }
}

/// Opens the server leg: plain, or TLS after an SSLRequest the server must accept, as the
/// target's `upstream_tls` says. Returns the halves and whether the leg is encrypted.
async fn connect_server(
    mut upstream: TcpStream,
    context: &PostgresContext,
) -> Result<(ReadHalf, WriteHalf, bool), SessionEnd> {
    let Some((config, server_name)) = &context.upstream_tls else {
        let (read, write) = upstream.into_split();
        return Ok((Box::new(read), Box::new(write), false));
    };
    let mut request = BytesMut::with_capacity(8);
    request.put_u32(8);
    request.put_u32(codec::SSL_REQUEST_CODE);
    upstream.write_all(&request).await.map_err(server_error)?;
    let mut answer = [0u8; 1];
    upstream
        .read_exact(&mut answer)
        .await
        .map_err(server_error)?;
    if answer[0] != b'S' {
        return Err(server_error(CodecError::Malformed {
            message: "SSLRequest response",
            reason: "the server does not accept TLS, but upstream_tls requires it",
        }));
    }
    let stream = TlsConnector::from(Arc::clone(config))
        .connect(server_name.clone(), upstream)
        .await
        .map_err(server_error)?;
    let (read, write) = tokio::io::split(stream);
    Ok((Box::new(read), Box::new(write), true))
}

impl std::fmt::Debug for StartupInfo {
    /// Shows the user and database but only the packet's length: its other parameters are the
    /// client's and may carry anything.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StartupInfo")
            .field("user", &self.user)
            .field("database", &self.database)
            .field("replication", &self.replication)
            .field("packet_len", &self.packet.len())
            .finish()
    }
}

/// Parses the parameters of a StartupMessage body (after the protocol version).
pub fn parse_startup(body: &[u8]) -> Result<StartupInfo, CodecError> {
    let mut reader = BodyReader::new(body, "StartupMessage");
    let mut info = StartupInfo::default();
    loop {
        let key = reader.cstr()?;
        if key.is_empty() {
            break;
        }
        let value = String::from_utf8_lossy(reader.cstr()?).into_owned();
        match key {
            b"user" => info.user = value,
            b"database" => info.database = value,
            b"replication" => info.replication = Replication::from_parameter(&value),
            _ => {}
        }
    }
    if info.database.is_empty() {
        info.database.clone_from(&info.user);
    }
    Ok(info)
}

/// A bound portal: its statement's name, masked parameters and result formats.
#[derive(Clone, Debug, Default)]
struct Portal {
    statement: Vec<u8>,
    params: Vec<Value>,
    result_formats: Vec<i16>,
}

/// Client-side state of the extended query protocol.
#[derive(Debug, Default)]
struct Frontend {
    /// Prepared statements by name (the unnamed one under ""): masked text and analysis.
    statements: HashMap<Vec<u8>, (String, StatementInfo)>,
    /// Portals by name.
    portals: HashMap<Vec<u8>, Portal>,
    /// After a denial, messages are dropped until the next Sync.
    discarding: bool,
    /// Approvals that cover the rest of the session.
    review: judge::SessionApprovals,
}

async fn frontend(
    mut client: FrameReader<ReadHalf>,
    mut upstream: BufWriter<WriteHalf>,
    pump: &PumpContext<'_>,
) -> Result<(), SessionEnd> {
    let PumpContext {
        counters,
        authenticated,
        ..
    } = *pump;
    let mut state = Frontend::default();
    loop {
        // The client sends its first statement only after the first ReadyForQuery, and the
        // backend pump marks the session authenticated before passing that on.
        let limit = || {
            if authenticated.load(Ordering::Acquire) {
                codec::MAX_MESSAGE_LEN
            } else {
                codec::MAX_AUTH_MESSAGE_LEN
            }
        };
        let Some(header) = client
            .read_header_within(limit)
            .await
            .map_err(client_error)?
        else {
            upstream.shutdown().await.map_err(server_error)?;
            return Ok(());
        };
        counters
            .from_client
            .fetch_add(header.body_len as u64 + 5, Ordering::Relaxed);
        counters.touch();

        let inspect = matches!(header.tag, b'Q' | b'P' | b'B' | b'E' | b'C' | b'S' | b'F');
        if inspect && (header.is_held() || matches!(header.tag, b'Q' | b'P')) {
            if header.body_len > STATEMENT_HOLD_LIMIT {
                return Err(client_error(CodecError::InvalidLength {
                    length: header.body_len as i64,
                    reason: "statement longer than the 64 MiB the gateway inspects",
                }));
            }
            // Query and Parse draw on the budget for large statements. Other messages read
            // whole here are at most the 1 MiB hold limit, and larger ones stream.
            let statement_bytes = if matches!(header.tag, b'Q' | b'P') {
                header.body_len
            } else {
                0
            };
            let (forward, _budget) = match super::reserve_statement_memory(statement_bytes) {
                Ok(budget) => {
                    let body = client.read_body(header).await.map_err(client_error)?;
                    let forward =
                        frontend_message(&mut state, header.tag, body, pump, &mut upstream).await?;
                    (forward, budget)
                }
                Err(message) => {
                    skip_body(&mut client, header).await?;
                    (
                        reject_large_statement(&mut state, header, &message, pump),
                        None,
                    )
                }
            };
            if let Some(message) = forward {
                upstream.write_all(&message).await.map_err(server_error)?;
            }
        } else if state.discarding {
            skip_body(&mut client, header).await?;
        } else if header.tag == b'B' {
            // A Bind over the hold limit streams through, read on the way for its portal.
            copy_bind(
                &mut client,
                &mut upstream,
                header,
                &mut state,
                &pump.context.mask,
            )
            .await?;
        } else {
            copy_body(&mut client, &mut upstream, header).await?;
        }

        if header.tag == b'X' {
            upstream.flush().await.map_err(server_error)?;
            return Ok(());
        }
        // Pipelined messages are batched into one write; flush once the client pauses.
        if client.buffered() == 0 {
            upstream.flush().await.map_err(server_error)?;
        }
    }
}

/// Returns the statements rules judge for `text`: `infos`, and once the session may read
/// strings with backslash escapes, those of that reading too (see
/// [`crate::sql::postgres_escape_readings`]).
fn judged_statements<'i>(
    text: &str,
    infos: &'i [StatementInfo],
    pump: &PumpContext<'_>,
) -> std::borrow::Cow<'i, [StatementInfo]> {
    const SETTING: &[u8] = b"standard_conforming_strings";
    let bytes = text.as_bytes();
    let names_setting = memchr::memchr_iter(b'_', bytes).any(|underscore| {
        underscore >= 8
            && bytes
                .get(underscore - 8..underscore - 8 + SETTING.len())
                .is_some_and(|word| word.eq_ignore_ascii_case(SETTING))
    });
    if names_setting {
        pump.escape_readings.store(true, Ordering::Release);
    }
    if !pump.escape_readings.load(Ordering::Acquire) {
        return std::borrow::Cow::Borrowed(infos);
    }
    let extra = crate::sql::off_runtime(text.len(), || {
        crate::sql::postgres_escape_readings(text, infos)
    });
    if extra.is_empty() {
        return std::borrow::Cow::Borrowed(infos);
    }
    std::borrow::Cow::Owned(infos.iter().cloned().chain(extra).collect())
}

/// Rejects a Query or Parse whose body was dropped because the budget for large statements
/// could not hold it. The client gets `message` (SQLSTATE 53200, out of memory) as for a
/// denial, and the recording shows it denied by the budget's rule. Returns what to send
/// upstream in its place.
fn reject_large_statement(
    state: &mut Frontend,
    header: Header,
    message: &str,
    pump: &PumpContext<'_>,
) -> Option<Bytes> {
    // After an error in a pipeline, everything up to Sync is dropped anyway.
    if state.discarding {
        return None;
    }
    let pending = Pending::denied(
        format!("(a statement of {} bytes, not read)", header.body_len),
        StatementInfo {
            kind: "unknown".to_string(),
            ..StatementInfo::default()
        },
        super::LARGE_STATEMENT_RULE,
    );
    let error = codec::error_response(OUT_OF_MEMORY_SQLSTATE, message);
    let mut shared = pump.shared.lock().expect("session state lock poisoned");
    let marker = shared.deny_with(pending, error, pump.session_token);
    if header.tag == b'Q' {
        shared.close();
        return Some(marker_query(&marker));
    }
    // A Parse: the unnamed statement of the marker, which the server rejects, then nothing
    // until Sync.
    state.discarding = true;
    let mut replacement = BytesMut::new();
    replacement.put_u8(0);
    replacement.put_slice(marker.as_bytes());
    replacement.put_u8(0);
    replacement.put_i16(0);
    Some(codec::frame(b'P', &replacement))
}

/// Judges and tracks one inspected client message and returns what to send upstream instead:
/// the message itself, a replacement, or nothing. A statement held for review waits here, after
/// everything before it was flushed to `upstream`.
async fn frontend_message(
    state: &mut Frontend,
    tag: u8,
    body: Bytes,
    pump: &PumpContext<'_>,
    upstream: &mut BufWriter<WriteHalf>,
) -> Result<Option<Bytes>, SessionEnd> {
    let PumpContext {
        context,
        shared,
        session_token,
        ..
    } = *pump;
    if state.discarding && tag != b'S' {
        return Ok(None);
    }
    let original = codec::frame(tag, &body);
    match tag {
        b'Q' => {
            let mut reader = BodyReader::new(&body, "Query");
            let text = String::from_utf8_lossy(reader.cstr().map_err(client_error)?);
            let infos =
                crate::sql::off_runtime(text.len(), || analyze(&text, SqlDialect::Postgres));
            let shown = recorded_text(text.as_bytes(), &context.mask);
            let judged = judged_statements(&text, &infos, pump);
            let denial = judge::judge(&mut state.review, &judged, &shown, pump, upstream).await?;
            let mut shared = shared.lock().expect("session state lock poisoned");
            if let Some(denial) = denial {
                let info = infos.first().cloned().unwrap_or_default();
                let marker = shared.deny(
                    Pending::denied(shown, info, &denial.rule),
                    &denial,
                    session_token,
                );
                shared.close();
                return Ok(Some(marker_query(&marker)));
            }
            let point = shared.open();
            let infos = statements_or_unparsed(infos);
            let parts = super::statement_parts(infos.len());
            for (info, part) in infos.into_iter().zip(parts) {
                point.statements.push_back(Pending {
                    part,
                    ..Pending::new(super::part_text(&shown, part), info, Vec::new(), Vec::new())
                });
            }
            shared.close();
            Ok(Some(original))
        }
        b'P' => {
            let mut reader = BodyReader::new(&body, "Parse");
            let name = reader.cstr().map_err(client_error)?.to_vec();
            let text = reader.cstr().map_err(client_error)?;
            let text_read = String::from_utf8_lossy(text);
            let infos =
                crate::sql::off_runtime(text.len(), || analyze(&text_read, SqlDialect::Postgres));
            let shown = recorded_text(text, &context.mask);
            let info = statements_or_unparsed(infos.clone())
                .into_iter()
                .next()
                .unwrap_or_default();
            let judged = judged_statements(&text_read, &infos, pump);
            if let Some(denial) =
                judge::judge(&mut state.review, &judged, &shown, pump, upstream).await?
            {
                let mut shared = shared.lock().expect("session state lock poisoned");
                let marker = shared.deny(
                    Pending::denied(shown, info, &denial.rule),
                    &denial,
                    session_token,
                );
                state.discarding = true;
                let mut replacement = BytesMut::new();
                replacement.put_slice(&name);
                replacement.put_u8(0);
                replacement.put_slice(marker.as_bytes());
                replacement.put_u8(0);
                replacement.put_i16(0);
                return Ok(Some(codec::frame(b'P', &replacement)));
            }
            state.statements.insert(name, (shown, info));
            Ok(Some(original))
        }
        b'B' => {
            let mut reader = BodyReader::new(&body, "Bind");
            let portal = reader.cstr().map_err(client_error)?.to_vec();
            let statement = reader.cstr().map_err(client_error)?.to_vec();
            let params = bind_params(&mut reader, &context.mask).map_err(client_error)?;
            let count = reader.i16().map_err(client_error)?.max(0) as usize;
            let mut result_formats = Vec::with_capacity(count);
            for _ in 0..count {
                result_formats.push(reader.i16().map_err(client_error)?);
            }
            state.portals.insert(
                portal,
                Portal {
                    statement,
                    params,
                    result_formats,
                },
            );
            Ok(Some(original))
        }
        b'E' => {
            let mut reader = BodyReader::new(&body, "Execute");
            let portal = reader.cstr().map_err(client_error)?;
            let Portal {
                statement,
                params,
                result_formats,
            } = state.portals.get(portal).cloned().unwrap_or_default();
            let (text, info) = state
                .statements
                .get(&statement)
                .cloned()
                .unwrap_or_default();
            let mut shared = shared.lock().expect("session state lock poisoned");
            shared
                .open()
                .statements
                .push_back(Pending::new(text, info, params, result_formats));
            Ok(Some(original))
        }
        b'C' => {
            let mut reader = BodyReader::new(&body, "Close");
            let kind = reader.u8().map_err(client_error)?;
            let name = reader.cstr().map_err(client_error)?;
            if kind == b'S' {
                state.statements.remove(name);
            } else {
                state.portals.remove(name);
            }
            Ok(Some(original))
        }
        b'S' => {
            state.discarding = false;
            shared.lock().expect("session state lock poisoned").close();
            Ok(Some(original))
        }
        b'F' => {
            // FunctionCall (the fast-path interface, used by libpq's large objects) runs a
            // function by OID with no SQL text. It is judged as kind `function_call`, and like
            // a Query it ends with one ReadyForQuery.
            let mut reader = BodyReader::new(&body, "FunctionCall");
            let oid = reader.i32().map_err(client_error)? as u32;
            let info = StatementInfo {
                kind: "function_call".to_string(),
                ..StatementInfo::default()
            };
            let text = format!("function call (oid {oid})");
            let denial = judge::judge(
                &mut state.review,
                std::slice::from_ref(&info),
                &text,
                pump,
                upstream,
            )
            .await?;
            let mut shared = shared.lock().expect("session state lock poisoned");
            if let Some(denial) = denial {
                let marker = shared.deny(
                    Pending::denied(text, info, &denial.rule),
                    &denial,
                    session_token,
                );
                shared.close();
                return Ok(Some(marker_query(&marker)));
            }
            shared
                .open()
                .statements
                .push_back(Pending::new(text, info, Vec::new(), Vec::new()));
            shared.close();
            Ok(Some(original))
        }
        _ => Ok(Some(original)),
    }
}

fn statements_or_unparsed(infos: Vec<StatementInfo>) -> Vec<StatementInfo> {
    if infos.is_empty() {
        // An empty query string still gets one answer (EmptyQueryResponse).
        vec![StatementInfo {
            kind: "empty".to_string(),
            ..StatementInfo::default()
        }]
    } else {
        infos
    }
}

/// Text that PostgreSQL rejects with a syntax error quoting it, unique to this session.
fn denial_marker(session_token: &str) -> String {
    format!("gateway_denied_{session_token}")
}

/// Encodes a Query of the stand-in text.
fn marker_query(marker: &str) -> Bytes {
    let mut body = marker.as_bytes().to_vec();
    body.push(0);
    codec::frame(b'Q', &body)
}

/// Encodes the gateway's denial. `detail` gives the reason a held statement was not approved.
fn denial_error(rule: &str, detail: Option<&str>) -> Bytes {
    let mut message =
        format!("permission denied by the gateway: statement matches rule \"{rule}\"");
    if let Some(detail) = detail {
        message.push_str(": ");
        message.push_str(detail);
    }
    codec::error_response(DENIED_SQLSTATE, &message)
}

/// Reads Bind's parameters as recorded values: text values masked and cut, binary ones by size.
fn bind_params(reader: &mut BodyReader<'_>, mask: &MaskPolicy) -> Result<Vec<Value>, CodecError> {
    let format_count = reader.i16()?.max(0) as usize;
    let mut formats = Vec::with_capacity(format_count);
    for _ in 0..format_count {
        formats.push(reader.i16()?);
    }
    let count = reader.i16()?.max(0) as usize;
    let mut params = Vec::with_capacity(count);
    for index in 0..count {
        let len = reader.i32()?;
        if len < 0 {
            params.push(Value::Null);
            continue;
        }
        let value = reader.bytes(len as usize)?;
        // One format code applies to all parameters; none means text.
        let format = match formats.len() {
            0 => 0,
            1 => formats[0],
            _ => formats.get(index).copied().unwrap_or(0),
        };
        if format == 0 {
            params.push(Value::String(recorded_text(value, mask)));
        } else {
            // Binary values are recorded by size only, so nothing of them needs masking.
            params.push(json!({ "binary_bytes": value.len() }));
        }
    }
    Ok(params)
}

/// Masks and cuts a text for a recording.
fn recorded_text(text: &[u8], mask: &MaskPolicy) -> String {
    recorded_prefix(
        &text[..text.len().min(RECORDED_PREFIX_LEN)],
        text.len(),
        mask,
    )
}

/// Bytes of a value a recording needs: what it shows, and 64 more so a number across the cut
/// is still recognized and masked.
const RECORDED_PREFIX_LEN: usize = RECORDED_TEXT_LIMIT + 64;

/// Masks and cuts a text for a recording from its first `RECORDED_PREFIX_LEN` bytes (`prefix`)
/// and its full length.
fn recorded_prefix(prefix: &[u8], total: usize, mask: &MaskPolicy) -> String {
    let mut copy = prefix[..prefix.len().min(RECORDED_TEXT_LIMIT)].to_vec();
    if total > RECORDED_TEXT_LIMIT {
        // Mask with the digits after the cut in view, so a number across it is still caught.
        let mut window = prefix.to_vec();
        mask_in_place_with_hex(&mut window, mask);
        copy.copy_from_slice(&window[..RECORDED_TEXT_LIMIT]);
    } else {
        mask_in_place_with_hex(&mut copy, mask);
    }
    let mut shown = super::utf8_text(copy);
    if total > RECORDED_TEXT_LIMIT {
        shown.push_str(&format!("... ({total} bytes in all)"));
    }
    shown
}

/// Copies a streamed Bind upstream and tracks its portal like a Bind read whole.
async fn copy_bind<W: AsyncWrite + Unpin>(
    from: &mut FrameReader<ReadHalf>,
    to: &mut W,
    header: Header,
    state: &mut Frontend,
    mask: &MaskPolicy,
) -> Result<(), SessionEnd> {
    to.write_all(&header.encode()).await.map_err(server_error)?;
    let mut scanner = bind::BindScanner::new(RECORDED_PREFIX_LEN);
    let mut left = header.body_len;
    while left > 0 {
        let piece = from.read_piece(left).await.map_err(client_error)?;
        left -= piece.len();
        scanner.feed(&piece);
        to.write_all(&piece).await.map_err(server_error)?;
    }
    if !scanner.is_complete() {
        // The server rejects it too; the portal stays unknown.
        return Ok(());
    }
    let params = scanner.params(|prefix, total| recorded_prefix(prefix, total, mask));
    state.portals.insert(
        std::mem::take(&mut scanner.portal),
        Portal {
            statement: std::mem::take(&mut scanner.statement),
            params,
            result_formats: std::mem::take(&mut scanner.result_formats),
        },
    );
    Ok(())
}

async fn skip_body(client: &mut FrameReader<ReadHalf>, header: Header) -> Result<(), SessionEnd> {
    let mut left = header.body_len;
    while left > 0 {
        left -= client.read_piece(left).await.map_err(client_error)?.len();
    }
    Ok(())
}

async fn copy_body<W: AsyncWrite + Unpin>(
    from: &mut FrameReader<ReadHalf>,
    to: &mut W,
    header: Header,
) -> Result<(), SessionEnd> {
    to.write_all(&header.encode()).await.map_err(server_error)?;
    let mut left = header.body_len;
    while left > 0 {
        let piece = from.read_piece(left).await.map_err(client_error)?;
        left -= piece.len();
        to.write_all(&piece).await.map_err(server_error)?;
    }
    Ok(())
}

/// Server-side state: result column formats for masking.
#[derive(Debug, Default)]
struct Backend {
    /// Format code per column of the current result (0 text, 1 binary), from RowDescription.
    column_formats: Vec<i16>,
    /// Whether each column of the current result is masked whole, from RowDescription.
    whole_columns: Vec<bool>,
    /// Statements completed by the messages read since the last flush to the client.
    completed: Vec<Completed>,
    /// Whether a binary COPY out is under way, from CopyOutResponse to CopyDone.
    copy_binary: bool,
}

/// A statement whose outcome is known, waiting to be recorded. Records are written after the
/// replies that complete them are flushed, so building them does not delay the client.
#[derive(Debug)]
struct Completed {
    pending: Pending,
    outcome: &'static str,
    rows: Option<u64>,
    /// The denying rule, or the SQLSTATE of an error.
    detail: Option<String>,
    duration_us: u64,
}

impl Completed {
    fn new(
        pending: Pending,
        outcome: &'static str,
        rows: Option<u64>,
        detail: Option<String>,
    ) -> Self {
        let duration_us = pending.started.elapsed().as_micros() as u64;
        Self {
            pending,
            outcome,
            rows,
            detail,
            duration_us,
        }
    }
}

/// Records, when the session ends, the statements the server never completed: a streaming
/// `START_REPLICATION` or a COPY the client broke off, or a pipeline cut by a closed
/// connection. Declared before the pumps, so it drops after them and after their own records.
struct RecordUnanswered<'a> {
    shared: &'a Mutex<Shared>,
    record: &'a Recording,
    startup: &'a StartupInfo,
}

impl Drop for RecordUnanswered<'_> {
    fn drop(&mut self) {
        let mut shared = self
            .shared
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for point in std::mem::take(&mut shared.syncs) {
            for pending in point.statements {
                let completed = match pending.denied_by.clone() {
                    Some(rule) => Completed::new(pending, "denied", None, Some(rule)),
                    None => Completed::new(pending, "interrupted", None, None),
                };
                record_statement(self.record, self.startup, &completed);
            }
        }
    }
}

/// Backend pump state whose completed statements are recorded after each flush, and also on
/// drop, when the session ends on an error or is cancelled between a read and the flush.
struct RecordCompleted<'a> {
    state: Backend,
    record: &'a Recording,
    startup: &'a StartupInfo,
}

impl RecordCompleted<'_> {
    fn record(&mut self) {
        for completed in self.state.completed.drain(..) {
            record_statement(self.record, self.startup, &completed);
        }
    }
}

impl Drop for RecordCompleted<'_> {
    fn drop(&mut self) {
        self.record();
    }
}

async fn backend(
    mut upstream: FrameReader<ReadHalf>,
    mut client: BufWriter<WriteHalf>,
    pump: &PumpContext<'_>,
) -> Result<(), SessionEnd> {
    let PumpContext {
        context,
        counters,
        record,
        startup,
        ..
    } = *pump;
    let mut guard = RecordCompleted {
        state: Backend::default(),
        record,
        startup,
    };
    loop {
        let state = &mut guard.state;
        let Some(header) = upstream
            .read_header(codec::MAX_MESSAGE_LEN)
            .await
            .map_err(server_error)?
        else {
            client.flush().await.map_err(client_error)?;
            client.shutdown().await.map_err(client_error)?;
            return Ok(());
        };
        counters
            .from_upstream
            .fetch_add(header.body_len as u64 + 5, Ordering::Relaxed);
        counters.touch();

        if !header.is_held() {
            // Large rows and copy data stream through with per-column masking.
            stream_to_client(&mut upstream, &mut client, header, state, &context.mask).await?;
        } else {
            let body = upstream.read_body(header).await.map_err(server_error)?;
            let out = backend_message(state, header.tag, body, pump).map_err(server_error)?;
            client.write_all(&out).await.map_err(client_error)?;
        }
        if upstream.buffered() == 0 {
            client.flush().await.map_err(client_error)?;
            guard.record();
        }
    }
}

fn backend_message(
    state: &mut Backend,
    tag: u8,
    body: Bytes,
    pump: &PumpContext<'_>,
) -> Result<Bytes, CodecError> {
    let PumpContext {
        context,
        shared,
        authenticated,
        session_token,
        ..
    } = *pump;
    match tag {
        b'D' => {
            let mut body = body.to_vec();
            let formats = bind_formats(shared).unwrap_or_else(|| state.column_formats.clone());
            rows::mask_data_row_with(&mut body, &formats, &state.whole_columns, &context.mask)?;
            Ok(codec::frame(tag, &body))
        }
        b'R' if !authenticated.load(Ordering::Acquire) => {
            Ok(codec::frame(tag, &without_channel_binding(&body)))
        }
        b'T' => {
            (state.column_formats, state.whole_columns) =
                rows::row_description(&body, &context.masked_columns)?;
            let mut body = body.to_vec();
            rows::mask_column_names(&mut body, &context.mask)?;
            Ok(codec::frame(tag, &body))
        }
        b'S' => {
            // ParameterStatus: a setting's name and value, each ending in NUL. The value may
            // echo what a client set (`application_name`).
            let mut body = body.to_vec();
            if let Some(end) = body.iter().position(|&byte| byte == 0) {
                let (name, value) = body.split_at_mut(end);
                if name == b"standard_conforming_strings" && value.starts_with(b"\0off") {
                    pump.escape_readings.store(true, Ordering::Release);
                }
                mask_in_place(value, &context.mask);
            }
            Ok(codec::frame(tag, &body))
        }
        b'H' => {
            // CopyOutResponse: the overall format comes first, 1 for binary.
            state.copy_binary = body.first() == Some(&1);
            Ok(codec::frame(tag, &body))
        }
        b'd' => {
            // PostgreSQL sends one row per CopyData message, so a message is masked on its own
            // and keeps its length. Messages over the hold limit are streamed.
            let mut body = body.to_vec();
            // In logical replication, XLogData (`w`, then three 8-byte positions) carries one
            // pgoutput message, whose row changes are masked value by value.
            let row_change = pump.startup.replication == Replication::Logical
                && body.first() == Some(&b'w')
                && body.len() > 25
                && rows::mask_pgoutput(&mut body[25..], &context.mask).is_some();
            if row_change {
                return Ok(codec::frame(tag, &body));
            }
            if state.copy_binary {
                rows::mask_copy_binary(&mut body, &context.mask);
            } else {
                // Text and CSV rows print values as result rows do, exponents and money too.
                crate::mask::mask_formatted_numbers(&mut body, &context.mask);
                mask_in_place_with_hex(&mut body, &context.mask);
            }
            Ok(codec::frame(tag, &body))
        }
        b'c' => {
            state.copy_binary = false;
            Ok(codec::frame(tag, &body))
        }
        // NoticeResponse and NotificationResponse (a NOTIFY payload) may quote data.
        b'N' | b'A' => {
            let mut body = body.to_vec();
            mask_in_place_with_hex(&mut body, &context.mask);
            Ok(codec::frame(tag, &body))
        }
        b'K' => {
            context
                .cancels
                .register(&body, context.upstream_addr, session_token);
            Ok(codec::frame(tag, &body))
        }
        b'C' | b'I' | b's' | b'V' => {
            state.copy_binary = false;
            // FunctionCallResponse: the result's length and value, in the format the call
            // asked for, which the binary rules cover as well as text.
            let body = if tag == b'V' && body.len() > 4 {
                let mut body = body.to_vec();
                rows::mask_value(&mut body[4..], true, &context.mask);
                Bytes::from(body)
            } else {
                body
            };
            let rows = if tag == b'C' {
                command_rows(&body)
            } else {
                None
            };
            let mut shared = shared.lock().expect("session state lock poisoned");
            if let Some(pending) = shared
                .syncs
                .front_mut()
                .and_then(|point| point.statements.pop_front())
            {
                state
                    .completed
                    .push(Completed::new(pending, "ok", rows, None));
            }
            Ok(codec::frame(tag, &body))
        }
        b'E' => {
            state.copy_binary = false;
            let fields = codec::error_fields(&body);
            let message = fields
                .iter()
                .find(|(code, _)| *code == b'M')
                .map(|(_, value)| *value)
                .unwrap_or_default();
            let sqlstate = fields
                .iter()
                .find(|(code, _)| *code == b'C')
                .map(|(_, value)| String::from_utf8_lossy(value).into_owned());
            let mut shared = shared.lock().expect("session state lock poisoned");
            if let Some(point) = shared.syncs.front_mut() {
                let is_our_marker = point
                    .denial_marker
                    .as_ref()
                    .is_some_and(|marker| contains(message, marker.as_bytes()));
                if is_our_marker {
                    // The server failed on our stand-in: the denied statement is the last one
                    // queued at this point, and earlier ones have completed.
                    let error = point
                        .denial_error
                        .take()
                        .unwrap_or_else(|| denial_error("unknown", None));
                    point.denial_marker = None;
                    if let Some(pending) = point.statements.pop_back() {
                        let rule = pending.denied_by.clone().unwrap_or_default();
                        state
                            .completed
                            .push(Completed::new(pending, "denied", None, Some(rule)));
                    }
                    point.statements.clear();
                    return Ok(error);
                }
                if let Some(pending) = point.statements.pop_front() {
                    state
                        .completed
                        .push(Completed::new(pending, "error", None, sqlstate));
                }
            }
            drop(shared);
            let mut body = body.to_vec();
            mask_in_place_with_hex(&mut body, &context.mask);
            Ok(codec::frame(tag, &body))
        }
        b'Z' => {
            if !authenticated.swap(true, Ordering::AcqRel) {
                // The first ReadyForQuery ends authentication; no statement was queued yet.
                return Ok(codec::frame(tag, &body));
            }
            let mut shared = shared.lock().expect("session state lock poisoned");
            // The open point stays, because this ReadyForQuery ends the oldest closed one.
            if shared.syncs.len() > 1
                && let Some(point) = shared.syncs.pop_front()
            {
                for pending in point.statements {
                    let outcome = if pending.denied_by.is_some() {
                        "denied"
                    } else {
                        "not_executed"
                    };
                    let rule = pending.denied_by.clone();
                    state
                        .completed
                        .push(Completed::new(pending, outcome, None, rule));
                }
            }
            Ok(codec::frame(tag, &body))
        }
        _ => Ok(codec::frame(tag, &body)),
    }
}

/// SASL mechanism that binds authentication to the server's TLS channel.
const SCRAM_PLUS: &[u8] = b"SCRAM-SHA-256-PLUS";
/// AuthenticationSASL: the request code followed by the offered mechanisms.
const AUTH_SASL: i32 = 10;

/// Removes `SCRAM-SHA-256-PLUS` from an AuthenticationSASL offer. Channel binding ties the
/// exchange to the server's TLS channel, which is the proxy's and never the client's, so a
/// client choosing it would always fail. Without the offer it uses plain SCRAM-SHA-256.
/// Other authentication messages are returned unchanged.
fn without_channel_binding(body: &[u8]) -> Bytes {
    let mut reader = BodyReader::new(body, "AuthenticationSASL");
    if reader.i32().ok() != Some(AUTH_SASL) {
        return Bytes::copy_from_slice(body);
    }
    let mut out = BytesMut::with_capacity(body.len());
    out.put_i32(AUTH_SASL);
    while let Ok(mechanism) = reader.cstr() {
        if mechanism.is_empty() {
            break;
        }
        if mechanism != SCRAM_PLUS {
            out.put_slice(mechanism);
            out.put_u8(0);
        }
    }
    out.put_u8(0);
    out.freeze()
}

/// Result formats the executing statement's Bind asked for, when it asked for any.
fn bind_formats(shared: &Mutex<Shared>) -> Option<Vec<i16>> {
    let shared = shared.lock().expect("session state lock poisoned");
    let pending = shared.syncs.front()?.statements.front()?;
    (!pending.result_formats.is_empty()).then(|| pending.result_formats.clone())
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty()
        && haystack
            .windows(needle.len())
            .any(|window| window == needle)
}

/// Reads the row count at the end of a CommandComplete tag (`SELECT 5`, `INSERT 0 1`).
fn command_rows(body: &[u8]) -> Option<u64> {
    let tag = body.strip_suffix(b"\0").unwrap_or(body);
    let last = tag.rsplit(|&b| b == b' ').next()?;
    std::str::from_utf8(last).ok()?.parse().ok()
}

async fn stream_to_client(
    upstream: &mut FrameReader<ReadHalf>,
    client: &mut BufWriter<WriteHalf>,
    header: Header,
    state: &mut Backend,
    mask: &MaskPolicy,
) -> Result<(), SessionEnd> {
    client
        .write_all(&header.encode())
        .await
        .map_err(client_error)?;
    let mut left = header.body_len;
    let mut out = Vec::new();
    match header.tag {
        b'D' => {
            let mut masker = RowMasker::new(state.column_formats.clone(), mask.clone())
                .with_whole_columns(state.whole_columns.clone());
            while left > 0 {
                let piece = upstream.read_piece(left).await.map_err(server_error)?;
                left -= piece.len();
                out.clear();
                masker.feed(&piece, &mut out).map_err(server_error)?;
                client.write_all(&out).await.map_err(client_error)?;
            }
            out.clear();
            masker.finish(&mut out).map_err(server_error)?;
            client.write_all(&out).await.map_err(client_error)?;
        }
        _ => {
            // CopyData, notices and errors larger than the hold limit: scanned as one stream.
            let mut masker = StreamMasker::new(mask.clone()).with_hex();
            while left > 0 {
                let piece = upstream.read_piece(left).await.map_err(server_error)?;
                left -= piece.len();
                out.clear();
                masker.feed(&piece, &mut out);
                client.write_all(&out).await.map_err(client_error)?;
            }
            out.clear();
            masker.finish(&mut out);
            client.write_all(&out).await.map_err(client_error)?;
        }
    }
    Ok(())
}

fn record_statement(record: &Recording, startup: &StartupInfo, completed: &Completed) {
    let Completed {
        pending,
        outcome,
        rows,
        detail,
        duration_us,
    } = completed;
    let mut fields = Fields::new();
    fields
        .str("database_user", &startup.user)
        .str("database", &startup.database)
        .str("statement", &pending.text)
        .str("kind", &pending.info.kind)
        .strs("tables", &pending.info.tables)
        .values("params", &pending.params)
        .str("outcome", outcome)
        .u64("duration_us", *duration_us);
    if let Some((part, parts)) = pending.part {
        fields.u64("part", part).u64("parts", parts);
    }
    if !pending.info.also_kinds.is_empty() {
        fields.strs("also_kinds", &pending.info.also_kinds);
    }
    if let Some(rows) = rows {
        fields.u64("rows", *rows);
    }
    match *outcome {
        "denied" => {
            fields
                .str("decision", "deny")
                .opt_str("rule", detail.as_deref());
        }
        "error" => {
            fields.opt_str("error_code", detail.as_deref());
        }
        _ => {
            fields.str("decision", "allow");
        }
    }
    record_event(record, "sql.statement", fields);
}

fn record_event(record: &Recording, event: &'static str, fields: impl Into<Fields>) {
    // Queues the event for the recorder's writer thread; no disk I/O happens here.
    let mut record = record.lock().expect("recording lock poisoned");
    if let Err(error) = record.event(event, fields) {
        warn!(error = %crate::error_chain(&error), session = %record.id, "failed to write a session event");
    } else {
        debug!(session = %record.id, event, "session event recorded");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replication_parameter_read_as_server() {
        for value in ["true", "ON", "1", "yes", "t", "y", "tRu"] {
            assert_eq!(
                Replication::from_parameter(value),
                Replication::Physical,
                "{value}"
            );
        }
        for value in ["false", "off", "0", "no", "f", "n", "of", "o", "", "maybe"] {
            assert_eq!(
                Replication::from_parameter(value),
                Replication::None,
                "{value}"
            );
        }
        assert_eq!(
            Replication::from_parameter("database"),
            Replication::Logical
        );
    }

    #[test]
    fn startup_reads_replication() {
        let body = b"user\0app\0database\0shop\0replication\0database\0\0";
        let info = parse_startup(body).expect("valid startup");
        assert_eq!(info.replication, Replication::Logical);
        let info = parse_startup(b"user\0app\0\0").expect("valid startup");
        assert_eq!(info.replication, Replication::None);
    }

    #[test]
    fn sasl_offer_loses_channel_binding() {
        let mut body = 10i32.to_be_bytes().to_vec();
        body.extend_from_slice(b"SCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0");
        let mut expected = 10i32.to_be_bytes().to_vec();
        expected.extend_from_slice(b"SCRAM-SHA-256\0\0");
        assert_eq!(&without_channel_binding(&body)[..], &expected[..]);
    }

    #[test]
    fn other_auth_messages_unchanged() {
        let body = [0, 0, 0, 5, 1, 2, 3, 4];
        assert_eq!(&without_channel_binding(&body)[..], &body[..]);
    }

    #[test]
    fn command_rows_from_tags() {
        assert_eq!(command_rows(b"SELECT 5\0"), Some(5));
        assert_eq!(command_rows(b"INSERT 0 12\0"), Some(12));
        assert_eq!(command_rows(b"CREATE TABLE\0"), None);
    }

    #[test]
    fn startup_params_parsed() {
        let body = b"user\0alice\0database\0payments\0application_name\0psql\0\0";
        let info = parse_startup(body).expect("valid startup");
        assert_eq!(info.user, "alice");
        assert_eq!(info.database, "payments");
    }

    #[test]
    fn startup_database_defaults_to_user() {
        let info = parse_startup(b"user\0bob\0\0").expect("valid startup");
        assert_eq!(info.database, "bob");
    }

    #[test]
    fn startup_unterminated_rejected() {
        assert!(parse_startup(b"user\0bob").is_err());
    }
}
