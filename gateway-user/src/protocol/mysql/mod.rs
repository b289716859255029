//! MySQL handler for targets of class `mysql`: negotiates the connection phase on each leg,
//! passes authentication through, records each statement, enforces the SQL rules, and masks
//! card numbers in what the server sends back. MariaDB servers speak the same protocol.
//!
//! After authentication the classic protocol is strictly request and response: the client
//! sends one command, the server sends its whole response, and only then comes the next command.
//! The session therefore runs as one loop that reads a command, judges and forwards it, and
//! relays the server's whole answer, so a response is always paired with the command it
//! answers. A client that sends its next command early only waits in the socket buffer.
//!
//! A denied statement never reaches the server: the client gets an ERR packet (error 1142,
//! SQLSTATE 42000, naming the rule) in place of the server's answer, and the connection stays
//! usable because nothing on the server leg changed. A statement held for review (`judge`)
//! waits before it is sent, and is then sent or denied the same way.

mod auth;
pub mod handshake;
mod judge;
pub mod packet;
mod replies;
pub mod rows;

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex, atomic::Ordering},
    time::{Duration, Instant},
};

use bytes::Bytes;
use serde_json::{Value, json};
use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, BufWriter},
    net::TcpStream,
};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use self::{
    handshake::{
        CLIENT_DEPRECATE_EOF, CLIENT_PROTOCOL_41, CLIENT_SSL, ClientLogin, Greeting,
        SSL_REQUEST_LEN,
    },
    packet::{
        AUTH_LIMIT, COMMAND_LIMIT, EOF_HEADER, ERR_HEADER, FieldReader, Header, Limit, NULL_MARKER,
        OK_HEADER, PIECE_LEN, PacketError, PacketReader, Payload, is_eof,
    },
    rows::{Column, ParamTypes, RowMasker},
};
use super::tcp::{Counters, RelayResult, idle};
use crate::{
    mask::{MaskPolicy, StreamMasker, mask_in_place},
    policy::PolicyStore,
    record::{Fields, Outcome, SessionRecord},
    sql::{SqlDialect, StatementInfo, analyze},
};

/// Largest command the proxy reads whole to judge or record it (COM_QUERY, COM_STMT_PREPARE,
/// COM_STMT_EXECUTE). Statements are judged before they run, so they cannot be streamed; 64 MiB
/// is far above any hand-written statement while bounding what one client can make the proxy
/// hold. Larger parameter values go through COM_STMT_SEND_LONG_DATA, which is streamed.
pub const STATEMENT_HOLD_LIMIT: usize = 64 * 1024 * 1024;
const STATEMENT_LIMIT: Limit = Limit {
    max: STATEMENT_HOLD_LIMIT,
    phase: "statement inspection",
};
/// Error code of the ERR for a statement over the budget: `ER_OUT_OF_RESOURCES`.
const OUT_OF_RESOURCES: u16 = 1041;

/// Largest server payload other than a row that the proxy reads whole: OK, ERR and EOF
/// packets, column definitions, column counts. 16 MiB leaves room for a long error message or
/// session state list while bounding memory.
const CONTROL_LIMIT: Limit = Limit {
    max: 16 * 1024 * 1024,
    phase: "response",
};
/// Maximum length of a statement text or parameter value in a recording. Longer ones are cut
/// and marked, because the recording is an audit trail and not a data copy.
const RECORDED_TEXT_LIMIT: usize = 4096;

/// Error code and SQLSTATE of the gateway's denials: `ER_TABLEACCESS_DENIED_ERROR`, the code
/// MySQL itself uses when a privilege is missing for a statement.
const DENIED_CODE: u16 = 1142;
const DENIED_SQLSTATE: &str = "42000";
/// Error code and SQLSTATE for commands the gateway does not relay: `ER_UNKNOWN_COM_ERROR`.
const UNKNOWN_COMMAND_CODE: u16 = 1047;
const UNKNOWN_COMMAND_SQLSTATE: &str = "08S01";
/// Error code for sessions the gateway ends during authentication: `ER_HANDSHAKE_ERROR`.
const HANDSHAKE_ERROR_CODE: u16 = 1043;

/// Server status flags in OK and EOF packets.
const SERVER_MORE_RESULTS_EXISTS: u16 = 0x0008;
/// Status flags: the session's `sql_mode` has `NO_BACKSLASH_ESCAPES`, or `ANSI_QUOTES` (this
/// one MariaDB's only).
const SERVER_STATUS_NO_BACKSLASH_ESCAPES: u16 = 0x0200;
const SERVER_STATUS_ANSI_QUOTES: u16 = 0x8000;
const SERVER_STATUS_CURSOR_EXISTS: u16 = 0x0040;

/// Command bytes (`enum_server_command`).
const COM_QUIT: u8 = 0x01;
const COM_INIT_DB: u8 = 0x02;
const COM_QUERY: u8 = 0x03;
const COM_FIELD_LIST: u8 = 0x04;
const COM_REFRESH: u8 = 0x07;
const COM_STATISTICS: u8 = 0x09;
const COM_PROCESS_INFO: u8 = 0x0a;
const COM_PROCESS_KILL: u8 = 0x0c;
const COM_DEBUG: u8 = 0x0d;
const COM_PING: u8 = 0x0e;
const COM_CHANGE_USER: u8 = 0x11;
const COM_STMT_PREPARE: u8 = 0x16;
const COM_STMT_EXECUTE: u8 = 0x17;
const COM_STMT_SEND_LONG_DATA: u8 = 0x18;
const COM_STMT_CLOSE: u8 = 0x19;
const COM_STMT_RESET: u8 = 0x1a;
const COM_SET_OPTION: u8 = 0x1b;
const COM_STMT_FETCH: u8 = 0x1c;
const COM_RESET_CONNECTION: u8 = 0x1f;

/// Inputs of a MySQL session from the rest of the daemon.
#[derive(Clone, Debug)]
pub struct MysqlContext {
    pub policy: Arc<PolicyStore>,
    /// Broker on which statements held for review wait for an approver.
    pub approvals: Arc<crate::approval::Broker>,
    /// The caller and the target in the policy's terms.
    pub subject: crate::policy::Subject,
    pub target: crate::policy::Target,
    pub mask: MaskPolicy,
    /// Result columns masked whole, by lowercase name (the policy's `masking.fields`).
    pub masked_columns: Vec<String>,
    pub idle_timeout: Duration,
    /// Time the client gets to finish its handshake and authentication
    /// (`proxy.login_timeout`).
    pub login_timeout: Duration,
    /// Serving certificate for client TLS; without one, `CLIENT_SSL` is not offered.
    pub server_tls: Option<Arc<rustls::ServerConfig>>,
    /// TLS for the server leg, with the name to verify; `None` for plain text.
    pub upstream_tls: Option<(
        Arc<rustls::ClientConfig>,
        rustls::pki_types::ServerName<'static>,
    )>,
}

type Recording = Arc<Mutex<SessionRecord>>;

/// One leg's byte stream, plain or TLS.
trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}
type BoxStream = Box<dyn Stream>;
type Reader = PacketReader<tokio::io::ReadHalf<BoxStream>>;
type Writer = BufWriter<tokio::io::WriteHalf<BoxStream>>;

/// Reason a session stopped early.
#[derive(Debug)]
enum SessionEnd {
    Idle,
    /// The client had not finished its handshake and authentication in
    /// `proxy.login_timeout`.
    LoginTimeout,
    Shutdown,
    /// Ended by the protocol itself: failed authentication, or a case the gateway refuses.
    Closed(String),
    Failed {
        side: &'static str,
        error: PacketError,
    },
}

fn client_error(error: impl Into<PacketError>) -> SessionEnd {
    SessionEnd::Failed {
        side: "client",
        error: error.into(),
    }
}

fn server_error(error: impl Into<PacketError>) -> SessionEnd {
    SessionEnd::Failed {
        side: "server",
        error: error.into(),
    }
}

/// Runs a MySQL session to its end.
pub async fn run(
    client: TcpStream,
    upstream: TcpStream,
    context: MysqlContext,
    record: Recording,
    force_close: CancellationToken,
) -> RelayResult {
    let counters = Arc::new(Counters::new());
    let logged_in = std::sync::atomic::AtomicBool::new(false);
    let result = tokio::select! {
        result = session(client, upstream, &context, &record, &counters, &logged_in) => result,
        () = idle(&counters, context.idle_timeout) => Err(SessionEnd::Idle),
        () = super::login_deadline(&logged_in, context.login_timeout) => Err(SessionEnd::LoginTimeout),
        () = force_close.cancelled() => Err(SessionEnd::Shutdown),
    };

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
        Err(SessionEnd::Closed(reason)) => (Outcome::Closed, Some(reason)),
        Err(SessionEnd::Failed { side, error }) => {
            warn!(%error, side, "mysql session ended on an error");
            (Outcome::Error, Some(format!("{side}: {error}")))
        }
    };
    RelayResult {
        outcome,
        reason,
        bytes_from_client: counters.from_client.load(Ordering::Relaxed),
        bytes_from_upstream: counters.from_upstream.load(Ordering::Relaxed),
    }
}

/// Reads one connection-phase packet without reading past it, since after an SSL request the
/// next bytes belong to the TLS handshake. `None` on a clean end of stream.
async fn read_exact_packet<R: AsyncRead + Unpin>(
    stream: &mut R,
    counter: &std::sync::atomic::AtomicU64,
) -> Result<Option<Payload>, PacketError> {
    let mut header = [0u8; 4];
    let first = stream.read(&mut header[..1]).await?;
    if first == 0 {
        return Ok(None);
    }
    stream
        .read_exact(&mut header[1..])
        .await
        .map_err(|error| eof_as(error, 1, 4))?;
    let len = usize::from(header[0]) | usize::from(header[1]) << 8 | usize::from(header[2]) << 16;
    if len >= AUTH_LIMIT.max {
        return Err(PacketError::TooLong {
            length: len,
            limit: AUTH_LIMIT.max,
            phase: AUTH_LIMIT.phase,
        });
    }
    let mut body = vec![0u8; len];
    stream
        .read_exact(&mut body)
        .await
        .map_err(|error| eof_as(error, 4, len + 4))?;
    counter.fetch_add(len as u64 + 4, Ordering::Relaxed);
    Ok(Some(Payload {
        data: Bytes::from(body),
        first_seq: header[3],
        last_seq: header[3],
    }))
}

fn eof_as(error: std::io::Error, received: usize, expected: usize) -> PacketError {
    if error.kind() == std::io::ErrorKind::UnexpectedEof {
        PacketError::UnexpectedEof { received, expected }
    } else {
        error.into()
    }
}

async fn session(
    client: TcpStream,
    mut upstream: TcpStream,
    context: &MysqlContext,
    record: &Recording,
    counters: &Counters,
    logged_in: &std::sync::atomic::AtomicBool,
) -> Result<(), SessionEnd> {
    // The server speaks first.
    let Some(greeting) = read_exact_packet(&mut upstream, &counters.from_upstream)
        .await
        .map_err(server_error)?
    else {
        return Err(server_error(PacketError::UnexpectedEof {
            received: 0,
            expected: 4,
        }));
    };
    counters.touch();
    let mut client: BoxStream = Box::new(client);
    if greeting.data.first() == Some(&ERR_HEADER) {
        // Too many connections, a blocked host: pass the server's refusal on.
        let _ = packet::write_payload(&mut client, greeting.first_seq, &greeting.data).await;
        let _ = client.flush().await;
        return Err(SessionEnd::Closed(format!(
            "the server refused the connection: {}",
            err_summary(&greeting.data, &context.mask)
        )));
    }
    let parsed = Greeting::parse(&greeting.data).map_err(server_error)?;
    let offer = handshake::client_offer(parsed.capabilities, context.server_tls.is_some());
    packet::write_payload(&mut client, 0, &parsed.with_capabilities(offer))
        .await
        .map_err(client_error)?;
    client.flush().await.map_err(client_error)?;

    // The client replies with an SSL request or its handshake response.
    let Some(first) = read_exact_packet(&mut client, &counters.from_client)
        .await
        .map_err(client_error)?
    else {
        return Ok(());
    };
    counters.touch();
    let client_caps = handshake::response_capabilities(&first.data).map_err(client_error)?;
    if client_caps & CLIENT_PROTOCOL_41 == 0 {
        return Err(client_error(PacketError::Malformed {
            packet: "handshake response",
            reason: "pre-4.1 handshake responses are not supported",
        }));
    }
    let client_tls = client_caps & CLIENT_SSL != 0;
    let response = if client_tls {
        if first.data.len() != SSL_REQUEST_LEN {
            return Err(client_error(PacketError::Malformed {
                packet: "SSL request",
                reason: "CLIENT_SSL set in a handshake response that is not 32 bytes long",
            }));
        }
        let Some(config) = &context.server_tls else {
            return Err(client_error(PacketError::Malformed {
                packet: "SSL request",
                reason: "TLS requested, but the gateway offered none: no serving certificate is configured for this target",
            }));
        };
        let stream = TlsAcceptor::from(Arc::clone(config))
            .accept(client)
            .await
            .map_err(client_error)?;
        client = Box::new(stream);
        let Some(response) = read_exact_packet(&mut client, &counters.from_client)
            .await
            .map_err(client_error)?
        else {
            return Ok(());
        };
        response
    } else {
        first
    };
    let response_caps = handshake::response_capabilities(&response.data).map_err(client_error)?;
    let request = handshake::parse_response(&response.data).map_err(client_error)?;
    let legs = auth::Legs {
        client_tls,
        upstream_tls: context.upstream_tls.is_some(),
    };
    let startup = |login: &ClientLogin, authenticated: bool| {
        record_event(
            record,
            "sql.startup",
            json!({
                "database_user": login.user,
                "database": login.database,
                "auth_plugin": login.auth_plugin,
                "server_auth_plugin": parsed.auth_plugin,
                "client_tls": legs.client_tls,
                "upstream_tls": legs.upstream_tls,
                "authenticated": authenticated,
            }),
        );
    };
    // A client naming mysql_clear_password or sha256_password may have put its password in
    // the handshake response itself, so it is checked before anything reaches the server.
    if let Some(message) =
        auth::check_client_data(&request.login.auth_plugin, request.auth_data, legs)
    {
        let error = packet::err_payload(HANDSHAKE_ERROR_CODE, "08S01", &message);
        packet::write_payload(&mut client, response.last_seq.wrapping_add(1), &error)
            .await
            .map_err(client_error)?;
        client.flush().await.map_err(client_error)?;
        startup(&request.login, false);
        return Err(SessionEnd::Closed(message));
    }
    let login = request.login;
    let chosen = handshake::server_choice(response_caps, offer, context.upstream_tls.is_some());

    // The server leg: an SSL request of its own when its TLS is on, then the response.
    let mut server: BoxStream = Box::new(upstream);
    let mut server_seq = 1u8;
    if let Some((config, server_name)) = &context.upstream_tls {
        if parsed.capabilities & CLIENT_SSL == 0 {
            return Err(server_error(PacketError::Malformed {
                packet: "server greeting",
                reason: "the server does not offer TLS, but upstream_tls requires it",
            }));
        }
        let request = handshake::rewrite_response(&response.data[..SSL_REQUEST_LEN], chosen)
            .map_err(client_error)?;
        packet::write_payload(&mut server, server_seq, &request)
            .await
            .map_err(server_error)?;
        server.flush().await.map_err(server_error)?;
        let stream = TlsConnector::from(Arc::clone(config))
            .connect(server_name.clone(), server)
            .await
            .map_err(server_error)?;
        server = Box::new(stream);
        server_seq = 2;
    }
    let rewritten = handshake::rewrite_response(&response.data, chosen).map_err(client_error)?;
    packet::write_payload(&mut server, server_seq, &rewritten)
        .await
        .map_err(server_error)?;
    server.flush().await.map_err(server_error)?;

    let (client_read, client_write) = tokio::io::split(client);
    let (server_read, server_write) = tokio::io::split(server);
    let mut session = Session {
        context,
        record,
        counters,
        client: PacketReader::new(client_read),
        to_client: BufWriter::new(client_write),
        server: PacketReader::new(server_read),
        to_server: BufWriter::new(server_write),
        deprecate_eof: chosen & CLIENT_DEPRECATE_EOF != 0,
        capabilities: chosen,
        login,
        client_tls,
        upstream_tls: context.upstream_tls.is_some(),
        statements: HashMap::new(),
        last_prepared: None,
        approvals: judge::SessionApprovals::default(),
        mode_readings: false,
    };
    // The client's sequence ids run ahead of the server's by the SSL request each leg sent.
    let seq_offset = response.first_seq.wrapping_sub(server_seq);
    let plugin = session.login.auth_plugin.clone();
    let authenticated = session.relay_auth(server_seq, seq_offset, plugin).await?;
    startup(&session.login, authenticated.is_accepted());
    if let Some(reason) = authenticated.failure() {
        return Err(SessionEnd::Closed(reason));
    }
    logged_in.store(true, std::sync::atomic::Ordering::Release);
    session.commands().await
}

/// End of an authentication exchange.
#[derive(Debug)]
enum AuthOutcome {
    Accepted,
    /// The server sent ERR. Both legs are back in the command phase, or closing.
    Rejected(String),
    /// The gateway ended the exchange with its own ERR, or the client left, while the server
    /// still waits for the client, so the server leg cannot be used again.
    Aborted(String),
}

impl AuthOutcome {
    fn is_accepted(&self) -> bool {
        matches!(self, Self::Accepted)
    }

    /// Returns the reason the login did not succeed, if it did not.
    fn failure(self) -> Option<String> {
        match self {
            Self::Accepted => None,
            Self::Rejected(reason) | Self::Aborted(reason) => Some(reason),
        }
    }
}

/// A prepared statement, by the id the server gave it.
#[derive(Debug, Default)]
struct Prepared {
    /// Statement text, masked and cut to `RECORDED_TEXT_LIMIT`.
    text: String,
    info: StatementInfo,
    param_count: usize,
    /// Parameter types from the last execute that bound them.
    param_types: ParamTypes,
    /// Bytes sent per parameter with COM_STMT_SEND_LONG_DATA since the last execute or reset.
    long_data: Vec<(u16, u64)>,
    /// Result columns from the last execute, for COM_STMT_FETCH on a cursor.
    columns: Vec<Column>,
}

/// A statement waiting for the server's answer.
#[derive(Debug)]
struct Pending {
    text: String,
    info: StatementInfo,
    params: Vec<Value>,
    started: Instant,
    rows: u64,
    /// Position (from 1) and count of the statements in a text of several statements.
    part: Option<(u64, u64)>,
}

impl Pending {
    fn new(text: String, info: StatementInfo, params: Vec<Value>) -> Self {
        Self {
            text,
            info,
            params,
            started: Instant::now(),
            rows: 0,
            part: None,
        }
    }
}

/// End of a result set or of a command's answer, as OK and EOF packets report it.
#[derive(Clone, Copy, Debug, Default)]
struct Status {
    flags: u16,
    affected_rows: u64,
}

/// Fields of one session after the connection phase.
struct Session<'a> {
    context: &'a MysqlContext,
    record: &'a Recording,
    counters: &'a Counters,
    client: Reader,
    to_client: Writer,
    server: Reader,
    to_server: Writer,
    /// Result sets end with an OK packet instead of an EOF packet (the same on both legs).
    deprecate_eof: bool,
    /// Capabilities both legs agreed on, which shape COM_CHANGE_USER.
    capabilities: u32,
    login: ClientLogin,
    client_tls: bool,
    upstream_tls: bool,
    statements: HashMap<u32, Prepared>,
    /// Id of the statement prepared last, which MariaDB lets commands name as `0xffffffff`.
    last_prepared: Option<u32>,
    /// Rules approved for the rest of the session.
    approvals: judge::SessionApprovals,
    /// Whether rules judge each text in every reading `sql_mode` allows: set once a statement
    /// names `sql_mode` or the server reports one of those modes, and kept.
    mode_readings: bool,
}

impl Session<'_> {
    /// Tells whether OK packets carry their info and session state as length-encoded strings.
    fn session_track(&self) -> bool {
        self.capabilities & handshake::CLIENT_SESSION_TRACK != 0
    }

    /// Returns the prepared statement a command names: `0xffffffff` stands for the one
    /// prepared last, as MariaDB reads it.
    fn statement_id(&self, id: u32) -> u32 {
        match (id, self.last_prepared) {
            (u32::MAX, Some(last)) => last,
            _ => id,
        }
    }

    /// Reads a whole client payload under `limit`; `None` when the client closed cleanly.
    async fn read_client(&mut self, limit: Limit) -> Result<Option<Payload>, SessionEnd> {
        let payload = self
            .client
            .read_payload(limit)
            .await
            .map_err(client_error)?;
        if let Some(payload) = &payload {
            self.count(true, payload.data.len());
        }
        Ok(payload)
    }

    /// Reads a whole server payload under `limit` and checks its sequence id.
    async fn read_server(
        &mut self,
        limit: Limit,
        expected: &mut u8,
    ) -> Result<Payload, SessionEnd> {
        let payload = self
            .server
            .read_payload(limit)
            .await
            .map_err(server_error)?
            .ok_or_else(|| {
                SessionEnd::Closed(
                    "the server closed the connection in the middle of a response".into(),
                )
            })?;
        self.count(false, payload.data.len());
        check_seq(payload.first_seq, *expected).map_err(server_error)?;
        *expected = payload.last_seq.wrapping_add(1);
        Ok(payload)
    }

    fn count(&self, from_client: bool, payload_len: usize) {
        let wire = payload_len + 4 * (payload_len / packet::MAX_PACKET_LEN + 1);
        let counter = if from_client {
            &self.counters.from_client
        } else {
            &self.counters.from_upstream
        };
        counter.fetch_add(wire as u64, Ordering::Relaxed);
        self.counters.touch();
    }

    async fn send_client(&mut self, seq: u8, payload: &[u8]) -> Result<(), SessionEnd> {
        packet::write_payload(&mut self.to_client, seq, payload)
            .await
            .map_err(client_error)?;
        Ok(())
    }

    async fn send_server(&mut self, seq: u8, payload: &[u8]) -> Result<(), SessionEnd> {
        packet::write_payload(&mut self.to_server, seq, payload)
            .await
            .map_err(server_error)?;
        Ok(())
    }

    /// Relays the authentication exchange after a handshake response or COM_CHANGE_USER, from
    /// the server's next packet (sequence id `server_seq + 1`) until its OK or ERR. Client
    /// sequence ids are the server's plus `offset`. `plugin` is the plugin the client named,
    /// until the server switches to another one. The client's responses are checked as the
    /// `auth` module describes before they are forwarded.
    async fn relay_auth(
        &mut self,
        server_seq: u8,
        offset: u8,
        mut plugin: String,
    ) -> Result<AuthOutcome, SessionEnd> {
        let legs = auth::Legs {
            client_tls: self.client_tls,
            upstream_tls: self.upstream_tls,
        };
        let mut expected = server_seq.wrapping_add(1);
        // Set once caching_sha2_password full authentication starts with no TLS on either leg,
        // where the password may only travel RSA encrypted.
        let mut rsa_only = false;
        loop {
            let reply = self.read_server(AUTH_LIMIT, &mut expected).await?;
            let client_seq = reply.first_seq.wrapping_add(offset);
            let data = &reply.data;
            match data.first() {
                Some(&OK_HEADER) => {
                    let mut masked = data.to_vec();
                    replies::mask_ok(&mut masked, self.session_track(), &self.context.mask);
                    self.send_client(client_seq, &masked).await?;
                    self.to_client.flush().await.map_err(client_error)?;
                    return Ok(AuthOutcome::Accepted);
                }
                Some(&ERR_HEADER) => {
                    let summary = err_summary(data, &self.context.mask);
                    let mut masked = data.to_vec();
                    replies::mask_err(&mut masked, &self.context.mask);
                    self.send_client(client_seq, &masked).await?;
                    self.to_client.flush().await.map_err(client_error)?;
                    return Ok(AuthOutcome::Rejected(format!(
                        "the server rejected the login: {summary}"
                    )));
                }
                Some(&auth::AUTH_SWITCH_HEADER) => {
                    plugin = auth::switch_plugin(data).unwrap_or_default();
                }
                _ => {}
            }
            // caching_sha2_password: 0x01 0x03 is fast-auth success (the OK follows), 0x01 0x04
            // requests full authentication, where the client sends the password in clear text
            // over TLS and RSA encrypted without it. Both legs must agree on TLS for that to
            // reach the server intact and never cross a plain leg in clear text.
            // NOTE: tests/mysql_sha2.rs runs these steps with mysql_async and the mariadb CLI
            // against gateway-testpeer's caching_sha2_password server. It covers the fast path,
            // full authentication over TLS on both legs and with the RSA key exchange on
            // neither, a wrong password, a password in clear text without TLS, and this
            // rejection at login and in COM_CHANGE_USER. No real MySQL 8 server has run them,
            // because none can be installed on the test machines.
            if data[..] == [0x01, 0x03] {
                self.send_client(client_seq, data).await?;
                continue;
            }
            if data[..] == [0x01, 0x04] && self.client_tls != self.upstream_tls {
                let message = "caching_sha2_password full authentication needs TLS on both legs of the gateway or on neither; set the target's tls and upstream_tls alike";
                let error = packet::err_payload(HANDSHAKE_ERROR_CODE, "08S01", message);
                self.send_client(client_seq, &error).await?;
                self.to_client.flush().await.map_err(client_error)?;
                return Ok(AuthOutcome::Aborted(message.to_string()));
            }
            if data[..] == [0x01, 0x04] {
                rsa_only = !self.client_tls;
            }
            // Auth switch, more data or an RSA public key: the client answers.
            self.send_client(client_seq, data).await?;
            self.to_client.flush().await.map_err(client_error)?;
            let Some(answer) = self.read_client(AUTH_LIMIT).await? else {
                return Ok(AuthOutcome::Aborted(
                    "the client left during authentication".to_string(),
                ));
            };
            check_seq(answer.first_seq, client_seq.wrapping_add(1)).map_err(client_error)?;
            let rejection = if rsa_only && auth::is_clear_text_password(&answer.data) {
                Some(auth::clear_text_without_tls(auth::CACHING_SHA2_PASSWORD))
            } else {
                auth::check_client_data(&plugin, &answer.data, legs)
            };
            if let Some(message) = rejection {
                let error = packet::err_payload(HANDSHAKE_ERROR_CODE, "08S01", &message);
                self.send_client(answer.first_seq.wrapping_add(1), &error)
                    .await?;
                self.to_client.flush().await.map_err(client_error)?;
                return Ok(AuthOutcome::Aborted(message));
            }
            let server_seq = answer.first_seq.wrapping_sub(offset);
            self.send_server(server_seq, &answer.data).await?;
            self.to_server.flush().await.map_err(server_error)?;
            expected = server_seq.wrapping_add(1);
        }
    }

    /// Runs the command phase until the client quits or leaves.
    async fn commands(&mut self) -> Result<(), SessionEnd> {
        loop {
            self.to_client.flush().await.map_err(client_error)?;
            let Some(header) = self
                .client
                .read_header(COMMAND_LIMIT, 0)
                .await
                .map_err(client_error)?
            else {
                self.to_server.shutdown().await.map_err(server_error)?;
                return Ok(());
            };
            check_seq(header.seq, 0).map_err(client_error)?;
            if header.len == 0 {
                return Err(client_error(PacketError::Malformed {
                    packet: "command",
                    reason: "empty command packet",
                }));
            }
            let command = self.client.peek(1).await.map_err(client_error)?[0];
            if command == COM_STMT_SEND_LONG_DATA {
                self.send_long_data(header).await?;
                continue;
            }
            // A statement of several packets may reach the 64 MiB limit, so it takes that much
            // from the budget. A single packet takes its length.
            let bytes = if header.continues() {
                STATEMENT_HOLD_LIMIT
            } else {
                header.len
            };
            let _budget = match super::reserve_statement_memory(bytes) {
                Ok(permit) => permit,
                Err(message) => {
                    self.reject_large_statement(header, &message).await?;
                    continue;
                }
            };
            // NOTE: a COM_STMT_EXECUTE whose inline parameters pass 64 MiB ends the session,
            // because it is read whole to record its parameters. Clients send larger values
            // with COM_STMT_SEND_LONG_DATA, which streams.
            let payload = self
                .client
                .read_payload_after(header, STATEMENT_LIMIT)
                .await
                .map_err(client_error)?;
            self.count(true, payload.data.len());
            match command {
                COM_QUIT => {
                    self.send_server(0, &payload.data).await?;
                    self.to_server.flush().await.map_err(server_error)?;
                    return Ok(());
                }
                COM_QUERY => self.query(payload).await?,
                COM_STMT_PREPARE => self.prepare(payload).await?,
                COM_STMT_EXECUTE => self.execute(payload).await?,
                COM_STMT_CLOSE => {
                    if let Ok(id) = FieldReader::new(&payload.data[1..], "COM_STMT_CLOSE").u32() {
                        let id = self.statement_id(id);
                        self.statements.remove(&id);
                    }
                    // No answer comes for COM_STMT_CLOSE.
                    self.send_server(0, &payload.data).await?;
                    self.to_server.flush().await.map_err(server_error)?;
                }
                COM_STMT_RESET => {
                    if let Ok(id) = FieldReader::new(&payload.data[1..], "COM_STMT_RESET").u32()
                        && let Some(statement) = self.statements.get_mut(&self.statement_id(id))
                    {
                        statement.long_data.clear();
                    }
                    self.forward_simple(payload).await?;
                }
                COM_STMT_FETCH => self.fetch(payload).await?,
                COM_INIT_DB => self.init_db(payload).await?,
                COM_CHANGE_USER => self.change_user(payload).await?,
                COM_RESET_CONNECTION => {
                    self.statements.clear();
                    self.last_prepared = None;
                    self.forward_simple(payload).await?;
                }
                COM_PING | COM_STATISTICS | COM_PROCESS_KILL | COM_DEBUG | COM_REFRESH
                | COM_SET_OPTION => self.forward_simple(payload).await?,
                COM_PROCESS_INFO => {
                    let seq = payload.last_seq;
                    self.send_server(0, &payload.data).await?;
                    self.to_server.flush().await.map_err(server_error)?;
                    self.relay_results(seq, false, VecDeque::new(), None)
                        .await?;
                }
                COM_FIELD_LIST => self.field_list(payload).await?,
                other => {
                    // Replication, COM_STMT_BULK_EXECUTE and retired commands change the
                    // protocol in ways the gateway does not follow, so they stop here.
                    debug!(command = other, "unsupported mysql command rejected");
                    let message =
                        format!("command 0x{other:02x} is not supported through the gateway");
                    let error = packet::err_payload(
                        UNKNOWN_COMMAND_CODE,
                        UNKNOWN_COMMAND_SQLSTATE,
                        &message,
                    );
                    self.send_client(payload.last_seq.wrapping_add(1), &error)
                        .await?;
                }
            }
        }
    }

    /// Reads a large command that does not fit the memory budget in pieces, dropping them,
    /// then replies with an ERR carrying `message` and records it. The session goes on.
    async fn reject_large_statement(
        &mut self,
        first: Header,
        message: &str,
    ) -> Result<(), SessionEnd> {
        let (total, header) = self
            .read_command_pieces(first, STATEMENT_LIMIT, false)
            .await?;
        let error = packet::err_payload(OUT_OF_RESOURCES, "HY000", message);
        self.send_client(header.seq.wrapping_add(1), &error).await?;
        let pending = Pending::new(
            format!("(a statement of {total} bytes, not read)"),
            StatementInfo {
                kind: "unknown".to_string(),
                ..StatementInfo::default()
            },
            Vec::new(),
        );
        self.record_statement(&pending, "denied", Some(super::LARGE_STATEMENT_RULE));
        Ok(())
    }

    /// Replies to a denied command with the gateway's ERR packet and records it.
    async fn deny(
        &mut self,
        payload: &Payload,
        pending: Pending,
        denial: &judge::Denial,
    ) -> Result<(), SessionEnd> {
        let mut message = format!(
            "permission denied by the gateway: statement matches rule \"{}\"",
            denial.rule
        );
        if let Some(detail) = &denial.detail {
            message.push_str(": ");
            message.push_str(detail);
        }
        let error = packet::err_payload(DENIED_CODE, DENIED_SQLSTATE, &message);
        self.send_client(payload.last_seq.wrapping_add(1), &error)
            .await?;
        self.record_statement(&pending, "denied", Some(&denial.rule));
        Ok(())
    }

    /// Returns the statements rules judge for `text`: `infos`, and once `mode_readings` is set,
    /// those of the text's other readings (see [`crate::sql::mysql_mode_readings`]).
    fn judged_statements<'i>(
        &mut self,
        text: &str,
        infos: &'i [StatementInfo],
    ) -> std::borrow::Cow<'i, [StatementInfo]> {
        const SQL_MODE: &[u8] = b"sql_mode";
        let bytes = text.as_bytes();
        // Only the underscores are compared with their neighbours: memchr finds them fast.
        self.mode_readings = self.mode_readings
            || memchr::memchr_iter(b'_', bytes).any(|underscore| {
                underscore >= 3
                    && bytes
                        .get(underscore - 3..underscore + 5)
                        .is_some_and(|word| word.eq_ignore_ascii_case(SQL_MODE))
            });
        if !self.mode_readings {
            return std::borrow::Cow::Borrowed(infos);
        }
        let extra =
            crate::sql::off_runtime(text.len(), || crate::sql::mysql_mode_readings(text, infos));
        if extra.is_empty() {
            return std::borrow::Cow::Borrowed(infos);
        }
        std::borrow::Cow::Owned(infos.iter().cloned().chain(extra).collect())
    }

    async fn query(&mut self, payload: Payload) -> Result<(), SessionEnd> {
        let text = &payload.data[1..];
        let text_read = String::from_utf8_lossy(text);
        let infos = crate::sql::off_runtime(text.len(), || analyze(&text_read, SqlDialect::Mysql));
        let masked_text = recorded_text(text, &self.context.mask);
        let judged = self.judged_statements(&text_read, &infos);
        if let Some(denial) = self.judge(&judged, &masked_text).await {
            let pending = Pending::new(masked_text, denial.statement.clone(), Vec::new());
            return self.deny(&payload, pending, &denial).await;
        }
        // `USE db` as a statement changes the database like COM_INIT_DB does.
        let used_database = used_database(&infos);
        let infos = statements_or_empty(infos);
        let parts = super::statement_parts(infos.len());
        let pending = infos
            .into_iter()
            .zip(parts)
            .map(|(info, part)| Pending {
                part,
                ..Pending::new(super::part_text(&masked_text, part), info, Vec::new())
            })
            .collect();
        self.send_server(0, &payload.data).await?;
        self.to_server.flush().await.map_err(server_error)?;
        let succeeded = self
            .relay_results(payload.last_seq, false, pending, None)
            .await?;
        if succeeded && let Some(database) = used_database {
            self.login.database = database;
        }
        Ok(())
    }

    async fn prepare(&mut self, payload: Payload) -> Result<(), SessionEnd> {
        let text = &payload.data[1..];
        let text_read = String::from_utf8_lossy(text);
        let infos = crate::sql::off_runtime(text.len(), || analyze(&text_read, SqlDialect::Mysql));
        let masked_text = recorded_text(text, &self.context.mask);
        let info = statements_or_empty(infos.clone())
            .into_iter()
            .next()
            .unwrap_or_default();
        let judged = self.judged_statements(&text_read, &infos);
        if let Some(denial) = self.judge(&judged, &masked_text).await {
            let pending = Pending::new(masked_text, denial.statement.clone(), Vec::new());
            return self.deny(&payload, pending, &denial).await;
        }
        self.send_server(0, &payload.data).await?;
        self.to_server.flush().await.map_err(server_error)?;

        let mut expected = payload.last_seq.wrapping_add(1);
        let reply = self.read_server(CONTROL_LIMIT, &mut expected).await?;
        if reply.data.first() == Some(&ERR_HEADER) {
            let pending = Pending::new(masked_text, info, Vec::new());
            return self.forward_error(reply, Some(pending), None).await;
        }
        // OK: status 0x00, statement id u32, columns u16, parameters u16, filler, warnings.
        let mut reader = FieldReader::new(&reply.data, "COM_STMT_PREPARE response");
        reader.u8().map_err(server_error)?;
        let id = reader.u32().map_err(server_error)?;
        let columns = usize::from(reader.u16().map_err(server_error)?);
        let params = usize::from(reader.u16().map_err(server_error)?);
        self.send_client(reply.first_seq, &reply.data).await?;
        for count in [params, columns] {
            if count == 0 {
                continue;
            }
            for _ in 0..count {
                let definition = self.read_server(CONTROL_LIMIT, &mut expected).await?;
                let mut masked = definition.data.to_vec();
                replies::mask_column_definition(&mut masked, &self.context.mask);
                self.send_client(definition.first_seq, &masked).await?;
            }
            if !self.deprecate_eof {
                let eof = self.read_server(CONTROL_LIMIT, &mut expected).await?;
                self.send_client(eof.first_seq, &eof.data).await?;
            }
        }
        self.last_prepared = Some(id);
        self.statements.insert(
            id,
            Prepared {
                text: masked_text,
                info,
                param_count: params,
                ..Prepared::default()
            },
        );
        Ok(())
    }

    async fn execute(&mut self, payload: Payload) -> Result<(), SessionEnd> {
        let body = &payload.data[1..];
        let id = FieldReader::new(body, "COM_STMT_EXECUTE")
            .u32()
            .map_err(client_error)?;
        let id = self.statement_id(id);
        let mask = self.context.mask.clone();
        let pending = match self.statements.get_mut(&id) {
            Some(statement) => {
                let params = rows::execute_params(
                    body,
                    statement.param_count,
                    &mut statement.param_types,
                    &statement.long_data,
                    &mask,
                    |text| recorded_text(text, &mask),
                )
                .map_err(client_error)?;
                statement.long_data.clear();
                Pending::new(statement.text.clone(), statement.info.clone(), params)
            }
            // A statement prepared before a COM_CHANGE_USER or not through this session: the
            // server rejects it, and the recording shows the id.
            None => Pending::new(
                format!("unknown prepared statement {id}"),
                StatementInfo::default(),
                Vec::new(),
            ),
        };
        self.send_server(0, &payload.data).await?;
        self.to_server.flush().await.map_err(server_error)?;
        self.relay_results(payload.last_seq, true, VecDeque::from([pending]), Some(id))
            .await?;
        Ok(())
    }

    /// Streams COM_STMT_SEND_LONG_DATA to the server. It has no answer, and its data is
    /// recorded by size on the execute that uses it.
    /// Reads a command from the client piece by piece, through its continuation packets up to
    /// `limit` bytes, without holding it whole. Each packet is written to the server when
    /// `forward` is set, else dropped. Returns the command's length and its last header.
    async fn read_command_pieces(
        &mut self,
        first: Header,
        limit: Limit,
        forward: bool,
    ) -> Result<(usize, Header), SessionEnd> {
        let mut header = first;
        let mut total = 0usize;
        loop {
            if forward {
                self.to_server
                    .write_all(&header.encode())
                    .await
                    .map_err(server_error)?;
            }
            let mut left = header.len;
            while left > 0 {
                let piece = self.client.read_piece(left).await.map_err(client_error)?;
                left -= piece.len();
                if forward {
                    self.to_server
                        .write_all(&piece)
                        .await
                        .map_err(server_error)?;
                }
            }
            total += header.len;
            if !header.continues() {
                break;
            }
            header = self
                .client
                .read_continuation(header, limit, total)
                .await
                .map_err(client_error)?;
        }
        self.count(true, total);
        Ok((total, header))
    }

    async fn send_long_data(&mut self, first: Header) -> Result<(), SessionEnd> {
        // Command byte, statement id u32, parameter id u16.
        const PREFIX: usize = 7;
        let prefix = self
            .client
            .peek(PREFIX.min(first.len))
            .await
            .map_err(client_error)?;
        let (total, _) = self.read_command_pieces(first, COMMAND_LIMIT, true).await?;
        if prefix.len() == PREFIX {
            let mut reader = FieldReader::new(&prefix[1..], "COM_STMT_SEND_LONG_DATA");
            let id = self.statement_id(reader.u32().map_err(client_error)?);
            let param = reader.u16().map_err(client_error)?;
            if let Some(statement) = self.statements.get_mut(&id) {
                let bytes = (total - PREFIX) as u64;
                match statement.long_data.iter_mut().find(|(p, _)| *p == param) {
                    Some((_, sent)) => *sent += bytes,
                    None => statement.long_data.push((param, bytes)),
                }
            }
        }
        if self.client.buffered() == 0 {
            self.to_server.flush().await.map_err(server_error)?;
        }
        Ok(())
    }

    async fn fetch(&mut self, payload: Payload) -> Result<(), SessionEnd> {
        let id = FieldReader::new(&payload.data[1..], "COM_STMT_FETCH")
            .u32()
            .map_err(client_error)?;
        let id = self.statement_id(id);
        let columns = self
            .statements
            .get(&id)
            .map(|statement| statement.columns.clone())
            .unwrap_or_default();
        self.send_server(0, &payload.data).await?;
        self.to_server.flush().await.map_err(server_error)?;
        let mut expected = payload.last_seq.wrapping_add(1);
        // Rows until EOF (or ERR, already forwarded): the cursor's columns came with the
        // execute, and the fetch itself is not a statement of its own in the recording.
        let _terminator = self.relay_rows(&mut expected, &columns, true, None).await?;
        Ok(())
    }

    async fn init_db(&mut self, payload: Payload) -> Result<(), SessionEnd> {
        let database = String::from_utf8_lossy(&payload.data[1..]).into_owned();
        let info = StatementInfo {
            kind: "use".to_string(),
            tables: Vec::new(),
            has_where: None,
            also_kinds: Vec::new(),
        };
        let pending = Pending::new(format!("USE {database}"), info.clone(), Vec::new());
        if let Some(denial) = self.judge(std::slice::from_ref(&info), &pending.text).await {
            return self.deny(&payload, pending, &denial).await;
        }
        if self.forward_simple_pending(payload, Some(pending)).await? {
            self.login.database = database;
        }
        Ok(())
    }

    async fn change_user(&mut self, payload: Payload) -> Result<(), SessionEnd> {
        let request = handshake::parse_change_user(&payload.data[1..], self.capabilities)
            .map_err(client_error)?;
        let legs = auth::Legs {
            client_tls: self.client_tls,
            upstream_tls: self.upstream_tls,
        };
        let rejection =
            auth::check_client_data(&request.login.auth_plugin, request.auth_data, legs);
        let ClientLogin {
            user,
            database,
            auth_plugin,
        } = request.login;
        let outcome = if let Some(message) = rejection {
            // NOTE: no integration test reaches this branch, because the test clients name a
            // clear-text plugin in COM_CHANGE_USER only after a login that needs upstream_tls.
            // Unit tests cover the parsing and the check it relies on.
            // The server has not seen the command, but the session still ends like the other
            // rejections during authentication, because the client asked to leave the account
            // the server leg is still logged in as.
            let error = packet::err_payload(HANDSHAKE_ERROR_CODE, "08S01", &message);
            self.send_client(payload.last_seq.wrapping_add(1), &error)
                .await?;
            self.to_client.flush().await.map_err(client_error)?;
            AuthOutcome::Aborted(message)
        } else {
            self.send_server(0, &payload.data).await?;
            self.to_server.flush().await.map_err(server_error)?;
            self.relay_auth(payload.last_seq, 0, auth_plugin).await?
        };
        record_event(
            self.record,
            "sql.change_user",
            json!({
                "database_user": user,
                "database": database,
                "outcome": if outcome.is_accepted() { "ok" } else { "error" },
            }),
        );
        if let AuthOutcome::Aborted(reason) = outcome {
            // The server still waits for the rest of the exchange and would read the next
            // command as authentication data, so the session ends here.
            return Err(SessionEnd::Closed(reason));
        }
        if outcome.is_accepted() {
            self.login.user = user;
            self.login.database = database;
        }
        // The server forgets prepared statements on COM_CHANGE_USER whatever the outcome.
        self.statements.clear();
        self.last_prepared = None;
        Ok(())
    }

    async fn field_list(&mut self, payload: Payload) -> Result<(), SessionEnd> {
        self.send_server(0, &payload.data).await?;
        self.to_server.flush().await.map_err(server_error)?;
        let mut expected = payload.last_seq.wrapping_add(1);
        loop {
            let reply = self.read_server(CONTROL_LIMIT, &mut expected).await?;
            let first = reply.data.first().copied().unwrap_or(0);
            if first == ERR_HEADER {
                return self.forward_error(reply, None, None).await;
            }
            if is_eof(first, reply.data.len()) {
                self.send_client(reply.first_seq, &reply.data).await?;
                return Ok(());
            }
            let mut masked = reply.data.to_vec();
            replies::mask_column_definition(&mut masked, &self.context.mask);
            self.send_client(reply.first_seq, &masked).await?;
        }
    }

    /// Forwards a command whose answer is one packet (OK, ERR, EOF or a status string).
    async fn forward_simple(&mut self, payload: Payload) -> Result<(), SessionEnd> {
        self.forward_simple_pending(payload, None).await.map(|_| ())
    }

    /// Like `forward_simple`, recording `pending` with the outcome. Returns whether the server
    /// answered without an error.
    async fn forward_simple_pending(
        &mut self,
        payload: Payload,
        pending: Option<Pending>,
    ) -> Result<bool, SessionEnd> {
        self.send_server(0, &payload.data).await?;
        self.to_server.flush().await.map_err(server_error)?;
        let mut expected = payload.last_seq.wrapping_add(1);
        let reply = self.read_server(CONTROL_LIMIT, &mut expected).await?;
        if reply.data.first() == Some(&ERR_HEADER) {
            self.forward_error(reply, pending, None).await?;
            return Ok(false);
        }
        // COM_STATISTICS answers with a bare text, which may quote anything.
        let mut data = reply.data.to_vec();
        if data.first() == Some(&OK_HEADER) && data.len() >= 7 {
            replies::mask_ok(&mut data, self.session_track(), &self.context.mask);
        } else {
            mask_in_place(&mut data, &self.context.mask);
        }
        self.send_client(reply.first_seq, &data).await?;
        if let Some(pending) = pending {
            self.record_statement(&pending, "ok", None);
        }
        Ok(true)
    }

    /// Forwards an ERR packet with its message masked, recording `pending` as failed and the
    /// statements in `rest` as not executed.
    async fn forward_error(
        &mut self,
        reply: Payload,
        pending: Option<Pending>,
        rest: Option<VecDeque<Pending>>,
    ) -> Result<(), SessionEnd> {
        let code = err_code(&reply.data);
        if let Some(pending) = pending {
            self.record_statement(&pending, "error", code.map(|c| c.to_string()).as_deref());
        }
        for pending in rest.into_iter().flatten() {
            self.record_statement(&pending, "not_executed", None);
        }
        let mut data = reply.data.to_vec();
        replies::mask_err(&mut data, &self.context.mask);
        self.send_client(reply.first_seq, &data).await
    }

    /// Relays the answer to a command that returns result sets: one or more of OK, ERR or a
    /// result set, chained by `SERVER_MORE_RESULTS_EXISTS`. `last_seq` is the command's last
    /// sequence id. Each statement in `pending` takes one answer in order, except that a CALL
    /// takes its procedure's result sets up to the OK that ends it. Returns whether the answer
    /// ended without an ERR.
    async fn relay_results(
        &mut self,
        last_seq: u8,
        binary: bool,
        mut pending: VecDeque<Pending>,
        statement_id: Option<u32>,
    ) -> Result<bool, SessionEnd> {
        let result = self
            .relay_results_of(last_seq, binary, &mut pending, statement_id)
            .await;
        if result.is_err() {
            // The session ends here. Statements still waiting for their results are recorded
            // as interrupted, so a query whose client went away is not lost.
            for statement in pending {
                self.record_statement(&statement, "interrupted", None);
            }
        }
        result
    }

    /// Relays the results for [`relay_results`](Self::relay_results), taking each statement
    /// from `pending` as its result completes.
    async fn relay_results_of(
        &mut self,
        last_seq: u8,
        binary: bool,
        pending: &mut VecDeque<Pending>,
        statement_id: Option<u32>,
    ) -> Result<bool, SessionEnd> {
        let mut expected = last_seq.wrapping_add(1);
        loop {
            let first = self.read_server(CONTROL_LIMIT, &mut expected).await?;
            let status = match first.data.first().copied() {
                None => {
                    return Err(server_error(PacketError::Malformed {
                        packet: "response",
                        reason: "empty payload where a result was expected",
                    }));
                }
                Some(OK_HEADER) => {
                    let status = parse_ok(&first.data).map_err(server_error)?;
                    let mut masked = first.data.to_vec();
                    replies::mask_ok(&mut masked, self.session_track(), &self.context.mask);
                    self.send_client(first.first_seq, &masked).await?;
                    if let Some(mut statement) = pending.pop_front() {
                        statement.rows += status.affected_rows;
                        self.record_statement(&statement, "ok", None);
                    }
                    status
                }
                Some(ERR_HEADER) => {
                    let failed = pending.pop_front();
                    self.forward_error(first, failed, Some(std::mem::take(pending)))
                        .await?;
                    return Ok(false);
                }
                Some(NULL_MARKER) => {
                    return Err(server_error(PacketError::Malformed {
                        packet: "response",
                        reason: "LOCAL INFILE request, but the gateway did not offer CLIENT_LOCAL_FILES",
                    }));
                }
                Some(_) => {
                    let count = FieldReader::new(&first.data, "column count")
                        .lenenc()
                        .map_err(server_error)?
                        .unwrap_or(0);
                    self.send_client(first.first_seq, &first.data).await?;
                    let mut columns = Vec::new();
                    for _ in 0..count {
                        let definition = self.read_server(CONTROL_LIMIT, &mut expected).await?;
                        columns.push(
                            rows::parse_column(&definition.data, &self.context.masked_columns)
                                .map_err(server_error)?,
                        );
                        let mut masked = definition.data.to_vec();
                        replies::mask_column_definition(&mut masked, &self.context.mask);
                        self.send_client(definition.first_seq, &masked).await?;
                    }
                    if let Some(id) = statement_id
                        && let Some(statement) = self.statements.get_mut(&id)
                    {
                        statement.columns.clone_from(&columns);
                    }
                    let mut cursor = false;
                    if !self.deprecate_eof {
                        let eof = self.read_server(CONTROL_LIMIT, &mut expected).await?;
                        let first_byte = eof.data.first().copied().unwrap_or(0);
                        if !is_eof(first_byte, eof.data.len()) {
                            return Err(server_error(PacketError::Malformed {
                                packet: "result set",
                                reason: "column definitions not followed by EOF",
                            }));
                        }
                        let status = parse_eof(&eof.data).map_err(server_error)?;
                        self.send_client(eof.first_seq, &eof.data).await?;
                        // A cursor sends its rows later, on COM_STMT_FETCH.
                        cursor = status.flags & SERVER_STATUS_CURSOR_EXISTS != 0;
                    }
                    let statement = pending.front_mut();
                    let status = if cursor {
                        Status {
                            flags: 0,
                            affected_rows: 0,
                        }
                    } else {
                        match self
                            .relay_rows(&mut expected, &columns, binary, statement)
                            .await?
                        {
                            Ok(status) => status,
                            Err(code) => {
                                // An ERR ended the rows and the answer.
                                let failed = pending.pop_front();
                                if let Some(failed) = failed {
                                    let code = code.map(|code| code.to_string());
                                    self.record_statement(&failed, "error", code.as_deref());
                                }
                                for rest in pending.drain(..) {
                                    self.record_statement(&rest, "not_executed", None);
                                }
                                return Ok(false);
                            }
                        }
                    };
                    let in_call = pending.front().is_some_and(|p| p.info.kind == "call");
                    if !in_call && let Some(statement) = pending.pop_front() {
                        self.record_statement(&statement, "ok", None);
                    }
                    status
                }
            };
            if status.flags & (SERVER_STATUS_NO_BACKSLASH_ESCAPES | SERVER_STATUS_ANSI_QUOTES) != 0
            {
                self.mode_readings = true;
            }
            if status.flags & SERVER_MORE_RESULTS_EXISTS == 0 {
                for statement in pending.drain(..) {
                    self.record_statement(&statement, "not_executed", None);
                }
                return Ok(true);
            }
            // Let the client see each result set as soon as it is complete.
            if self.server.buffered() == 0 {
                self.to_client.flush().await.map_err(client_error)?;
            }
        }
    }

    /// Relays rows with masking until the EOF or OK that ends them, counting them on
    /// `statement`. Returns the terminator's status, or the error code when an ERR ended the
    /// rows (the ERR is forwarded).
    async fn relay_rows(
        &mut self,
        expected: &mut u8,
        columns: &[Column],
        binary: bool,
        mut statement: Option<&mut Pending>,
    ) -> Result<Result<Status, Option<u16>>, SessionEnd> {
        let mut masker = RowMasker::new(columns.to_vec(), binary, self.context.mask.clone());
        let mut out = Vec::new();
        loop {
            let header = self
                .server
                .read_header(COMMAND_LIMIT, 0)
                .await
                .map_err(server_error)?
                .ok_or_else(|| {
                    SessionEnd::Closed(
                        "the server closed the connection in the middle of a result set".into(),
                    )
                })?;
            check_seq(header.seq, *expected).map_err(server_error)?;
            // A long OK, EOF or ERR (a large session state list or message) is still read whole:
            // only rows are streamed.
            let whole = header.len < PIECE_LEN
                || (!header.continues()
                    && matches!(
                        self.server.peek(1).await.map_err(server_error)?[0],
                        EOF_HEADER | ERR_HEADER
                    ));
            if whole {
                let body = self
                    .server
                    .read_body(header.len)
                    .await
                    .map_err(server_error)?;
                self.count(false, header.len);
                *expected = header.seq.wrapping_add(1);
                let first = body.first().copied().unwrap_or(0);
                if is_eof(first, body.len()) {
                    let status = if self.deprecate_eof {
                        parse_ok(&body)
                    } else {
                        parse_eof(&body)
                    }
                    .map_err(server_error)?;
                    let mut body = body.to_vec();
                    if self.deprecate_eof {
                        replies::mask_ok(&mut body, self.session_track(), &self.context.mask);
                    }
                    self.send_client(header.seq, &body).await?;
                    return Ok(Ok(status));
                }
                if first == ERR_HEADER {
                    let code = err_code(&body);
                    let payload = Payload {
                        data: body,
                        first_seq: header.seq,
                        last_seq: header.seq,
                    };
                    self.forward_error(payload, None, None).await?;
                    return Ok(Err(code));
                }
                out.clear();
                masker.feed(&body, &mut out);
                masker.finish(&mut out);
                self.to_client
                    .write_all(&header.encode())
                    .await
                    .map_err(client_error)?;
                self.to_client.write_all(&out).await.map_err(client_error)?;
            } else {
                // A large row, possibly over several packets: streamed, masked column by column.
                self.stream_row(header, &mut masker, expected).await?;
            }
            if let Some(statement) = statement.as_deref_mut() {
                statement.rows += 1;
            }
            if self.server.buffered() == 0 {
                self.to_client.flush().await.map_err(client_error)?;
            }
        }
    }

    async fn stream_row(
        &mut self,
        first: Header,
        masker: &mut RowMasker,
        expected: &mut u8,
    ) -> Result<(), SessionEnd> {
        let mut header = first;
        let mut total = 0usize;
        let mut out = Vec::with_capacity(PIECE_LEN + 64);
        // Masked bytes lag the input by the masker's carry, so packet boundaries are kept by
        // writing each packet's header once its length in output is reached.
        let mut pending_out: Vec<u8> = Vec::new();
        let mut packets: VecDeque<Header> = VecDeque::from([header]);
        let mut written_in_packet = 0usize;
        let mut header_written = false;
        loop {
            let mut left = header.len;
            while left > 0 {
                let piece = self.server.read_piece(left).await.map_err(server_error)?;
                left -= piece.len();
                out.clear();
                masker.feed(&piece, &mut out);
                pending_out.extend_from_slice(&out);
                self.write_row_bytes(
                    &mut pending_out,
                    &mut packets,
                    &mut written_in_packet,
                    &mut header_written,
                )
                .await?;
            }
            total += header.len;
            *expected = header.seq.wrapping_add(1);
            if !header.continues() {
                break;
            }
            header = self
                .server
                .read_continuation(header, COMMAND_LIMIT, total)
                .await
                .map_err(server_error)?;
            packets.push_back(header);
        }
        out.clear();
        masker.finish(&mut out);
        pending_out.extend_from_slice(&out);
        self.write_row_bytes(
            &mut pending_out,
            &mut packets,
            &mut written_in_packet,
            &mut header_written,
        )
        .await?;
        self.count(false, total);
        Ok(())
    }

    /// Writes masked row bytes to the client, putting each packet header of the row in front of
    /// its bytes, so the client sees the server's packet boundaries unchanged.
    async fn write_row_bytes(
        &mut self,
        bytes: &mut Vec<u8>,
        packets: &mut VecDeque<Header>,
        written_in_packet: &mut usize,
        header_written: &mut bool,
    ) -> Result<(), SessionEnd> {
        let mut offset = 0;
        while let Some(&current) = packets.front() {
            if !*header_written {
                self.to_client
                    .write_all(&current.encode())
                    .await
                    .map_err(client_error)?;
                *header_written = true;
            }
            let take = (current.len - *written_in_packet).min(bytes.len() - offset);
            self.to_client
                .write_all(&bytes[offset..offset + take])
                .await
                .map_err(client_error)?;
            offset += take;
            *written_in_packet += take;
            if *written_in_packet < current.len {
                break;
            }
            packets.pop_front();
            *written_in_packet = 0;
            *header_written = false;
            if packets.is_empty() {
                break;
            }
        }
        bytes.drain(..offset);
        Ok(())
    }

    fn record_statement(&self, pending: &Pending, outcome: &str, detail: Option<&str>) {
        let mut fields = Fields::new();
        fields
            .str("database_user", &self.login.user)
            .str("database", &self.login.database)
            .str("statement", &pending.text)
            .str("kind", &pending.info.kind)
            .strs("tables", &pending.info.tables)
            .values("params", &pending.params)
            .str("outcome", outcome)
            .u64("duration_us", pending.started.elapsed().as_micros() as u64);
        if let Some((part, parts)) = pending.part {
            fields.u64("part", part).u64("parts", parts);
        }
        if !pending.info.also_kinds.is_empty() {
            fields.strs("also_kinds", &pending.info.also_kinds);
        }
        match outcome {
            "ok" => {
                fields.u64("rows", pending.rows).str("decision", "allow");
            }
            "denied" => {
                fields.str("decision", "deny").opt_str("rule", detail);
            }
            "error" => {
                fields.opt_str("error_code", detail);
            }
            _ => {
                fields.str("decision", "allow");
            }
        }
        record_event(self.record, "sql.statement", fields);
    }
}

fn check_seq(received: u8, expected: u8) -> Result<(), PacketError> {
    if received == expected {
        Ok(())
    } else {
        Err(PacketError::Sequence { received, expected })
    }
}

fn statements_or_empty(infos: Vec<StatementInfo>) -> Vec<StatementInfo> {
    if infos.is_empty() {
        vec![StatementInfo {
            kind: "empty".to_string(),
            ..StatementInfo::default()
        }]
    } else {
        infos
    }
}

/// Returns the database the last `USE` among `infos` switches to.
fn used_database(infos: &[StatementInfo]) -> Option<String> {
    infos
        .iter()
        .rev()
        .find(|info| info.kind == "use")
        .and_then(|info| info.tables.first().cloned())
}

/// Reads the status of an OK packet (also the `0xfe` OK that ends a result set under
/// `CLIENT_DEPRECATE_EOF`): header, affected rows, last insert id, status flags, warnings.
fn parse_ok(data: &[u8]) -> Result<Status, PacketError> {
    let mut reader = FieldReader::new(data, "OK packet");
    reader.u8()?;
    let affected_rows = reader.lenenc()?.unwrap_or(0);
    reader.lenenc()?;
    let flags = if reader.remaining() >= 2 {
        reader.u16()?
    } else {
        0
    };
    Ok(Status {
        flags,
        affected_rows,
    })
}

/// Reads the status of an EOF packet: `0xfe`, warnings `u16`, status flags `u16`.
fn parse_eof(data: &[u8]) -> Result<Status, PacketError> {
    let mut reader = FieldReader::new(data, "EOF packet");
    reader.u8()?;
    reader.u16()?;
    Ok(Status {
        flags: reader.u16()?,
        affected_rows: 0,
    })
}

fn err_code(data: &[u8]) -> Option<u16> {
    let mut reader = FieldReader::new(data, "ERR packet");
    reader.u8().ok()?;
    reader.u16().ok()
}

/// An ERR packet as `error CODE: message`, masked, for a recorded reason.
fn err_summary(data: &[u8], mask: &MaskPolicy) -> String {
    let code = err_code(data).unwrap_or(0);
    let mut message = data.get(3..).unwrap_or_default();
    if message.first() == Some(&b'#') && message.len() >= 6 {
        message = &message[6..];
    }
    format!("error {code}: {}", recorded_text(message, mask))
}

/// Masks and cuts a text for a recording.
fn recorded_text(text: &[u8], mask: &MaskPolicy) -> String {
    // Masked as a stream, so a number across the cut is judged with its digits after it.
    let window = &text[..text.len().min(RECORDED_TEXT_LIMIT + 64)];
    let mut masker = StreamMasker::new(mask.clone());
    let mut out = Vec::with_capacity(window.len());
    masker.feed(window, &mut out);
    masker.finish(&mut out);
    out.truncate(RECORDED_TEXT_LIMIT);
    let mut masked_text = super::utf8_text(out);
    if text.len() > RECORDED_TEXT_LIMIT {
        masked_text.push_str(&format!("... ({} bytes in all)", text.len()));
    }
    masked_text
}

fn record_event(record: &Recording, event: &'static str, fields: impl Into<Fields>) {
    // NOTE: this writes to the session file on the async thread, as the PostgreSQL handler
    // does, until the recorder's own writer task takes the events over.
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
    fn ok_and_eof_status_parsed() {
        let ok = [0x00, 0x05, 0x00, 0x08, 0x00, 0x00, 0x00];
        let status = parse_ok(&ok).expect("valid OK");
        assert_eq!(status.affected_rows, 5);
        assert_eq!(status.flags, SERVER_MORE_RESULTS_EXISTS);
        let eof = [0xfe, 0x00, 0x00, 0x40, 0x00];
        let status = parse_eof(&eof).expect("valid EOF");
        assert_eq!(status.flags, SERVER_STATUS_CURSOR_EXISTS);
    }

    #[test]
    fn recorded_text_masked_and_cut() {
        let policy = MaskPolicy::default();
        assert_eq!(
            recorded_text(b"SELECT '4111111111111111'", &policy),
            "SELECT '411111******1111'"
        );
        let mut long = vec![b'x'; RECORDED_TEXT_LIMIT - 8];
        long.extend_from_slice(b"4111111111111111");
        let masked_text = recorded_text(&long, &policy);
        assert!(masked_text.contains("411111**"), "{masked_text}");
        assert!(!masked_text.contains("41111111"), "{masked_text}");
        assert!(
            masked_text.ends_with(&format!("({} bytes in all)", long.len())),
            "{masked_text}"
        );
    }

    #[test]
    fn use_statement_database_read() {
        let used = |text: &str| used_database(&analyze(text, SqlDialect::Mysql));
        assert_eq!(used("USE payments").as_deref(), Some("payments"));
        assert_eq!(used(" use `odd``name` ;").as_deref(), Some("odd`name"));
        assert_eq!(used("/* x */ USE payments").as_deref(), Some("payments"));
        assert_eq!(
            used("SELECT 1; USE payments; SELECT 2").as_deref(),
            Some("payments")
        );
        assert_eq!(used("SELECT 1"), None);
    }

    #[test]
    fn err_summary_drops_sqlstate() {
        let error = packet::err_payload(1045, "28000", "Access denied for user 'x'");
        assert_eq!(
            err_summary(&error, &MaskPolicy::default()),
            "error 1045: Access denied for user 'x'"
        );
    }
}
