//! Approvals: requests a policy sends to `review` wait here until a person answers them on
//! the daemon's local socket, or until their deadline passes, which counts as a denial.
//!
//! The socket speaks one JSON object per line: the client sends one request (`list`,
//! `approve` or `deny`) and reads one response. Who answers is taken from the socket's peer
//! credentials (`SO_PEERCRED`), never from the request. Access is by file mode: the socket is
//! owned by root with mode 0600, or 0660 with the configured group.
//!
//! Self-approval: when a rule forbids it, an approver whose uid equals the uid of the process
//! that made the held connection (as the connect hook saw it) is refused. That uid is the one
//! identity a node-local approver and a pod's process share; the pod's service account is not
//! comparable with a local user.
//!
//! The protocol handlers own what happens to the held request itself (waiting, then running or
//! failing it) and record the answer; this module only brokers.

use std::{
    collections::HashMap,
    fs, io,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
    sync::oneshot,
};
use tracing::{info, warn};

use crate::policy::ReviewScope;

/// Maximum length of a request line on the socket. A request is an id and a reason.
const MAX_REQUEST_BYTES: u64 = 64 * 1024;
/// Maximum length of a reason. Longer ones are rejected so that recordings stay readable.
pub const MAX_REASON_CHARS: usize = 1024;
/// Time a client gets to send its request line.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors of the approvals socket.
#[derive(Debug, thiserror::Error)]
pub enum ApprovalError {
    #[error("failed to set up approvals socket {path}")]
    Socket { path: PathBuf, source: io::Error },
    #[error("approvals socket {path} is in use by a running daemon")]
    InUse { path: PathBuf },
    #[error("group {group:?} not found in /etc/group")]
    UnknownGroup { group: String },
}

/// A request a handler puts up for review.
#[derive(Clone, Debug)]
pub struct HoldRequest {
    pub session: String,
    /// The subject as `namespace/service-account` or `unknown`.
    pub subject: String,
    /// uid of the process behind the held connection.
    pub subject_uid: Option<u32>,
    pub target: String,
    pub rule: String,
    pub policy: Option<String>,
    /// The request as shown to the approver: a masked SQL text or a kube request line.
    pub summary: String,
    pub deadline: Duration,
    pub scope: ReviewScope,
    pub forbid_self_approval: bool,
}

/// A held request as listed on the socket.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct HeldInfo {
    pub id: String,
    pub session: String,
    pub subject: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub subject_uid: Option<u32>,
    pub target: String,
    pub rule: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub policy: Option<String>,
    pub summary: String,
    pub scope: ReviewScope,
    pub forbid_self_approval: bool,
    /// RFC 3339 UTC times.
    pub requested_at: String,
    pub expires_at: String,
}

/// The person who answered, from the socket's peer credentials.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Approver {
    pub uid: u32,
    /// User name from `/etc/passwd`; `None` when the uid has no entry there.
    pub name: Option<String>,
}

/// Outcome of a held request.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Approved,
    Denied,
    /// No answer by the deadline: a denial.
    TimedOut,
}

/// The answer a handler gets back.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Answer {
    pub id: String,
    pub verdict: Verdict,
    pub approver: Option<Approver>,
    pub reason: Option<String>,
    /// RFC 3339 UTC time of the answer or the timeout.
    pub answered_at: String,
}

impl Answer {
    /// Builds the fields of the `approval.answered` event for the request held by `rule`.
    pub fn event_fields(&self, rule: &str) -> serde_json::Value {
        serde_json::json!({
            "id": self.id,
            "rule": rule,
            "verdict": self.verdict,
            "approver_uid": self.approver.as_ref().map(|approver| approver.uid),
            "approver_name": self.approver.as_ref().and_then(|approver| approver.name.clone()),
            "reason": self.reason,
            "answered_at": self.answered_at,
        })
    }

    /// Returns why the held request is denied, for the client's error: who denied it and why,
    /// or that no verdict came within `deadline`. `None` when it was approved.
    pub fn denial_reason(&self, deadline: std::time::Duration) -> Option<String> {
        match self.verdict {
            Verdict::Approved => None,
            Verdict::Denied => {
                let approver = match &self.approver {
                    Some(Approver {
                        name: Some(name),
                        uid,
                    }) => format!("{name} (uid {uid})"),
                    Some(Approver { name: None, uid }) => format!("uid {uid}"),
                    None => "an approver".to_string(),
                };
                let reason = self.reason.clone().unwrap_or_default();
                Some(format!("denied by {approver}: {reason}"))
            }
            Verdict::TimedOut => Some(format!(
                "no approval within {}",
                humantime::format_duration(deadline)
            )),
        }
    }
}

struct Entry {
    info: HeldInfo,
    subject_uid: Option<u32>,
    reply: oneshot::Sender<Answer>,
}

/// The held requests of this daemon.
#[derive(Default)]
pub struct Broker {
    held: Mutex<HashMap<String, Entry>>,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let count = self.held.lock().map(|held| held.len()).unwrap_or(0);
        f.debug_struct("Broker").field("held", &count).finish()
    }
}

/// A request waiting for its answer. Dropping it withdraws the request.
#[derive(Debug)]
pub struct Pending {
    pub id: String,
    pub info: HeldInfo,
    broker: Arc<Broker>,
    deadline: Duration,
    reply: Option<oneshot::Receiver<Answer>>,
}

fn now_text() -> String {
    Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true)
}

impl Broker {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Lists `request` for review and returns the handle to wait on.
    pub fn hold(self: &Arc<Self>, request: HoldRequest) -> Pending {
        let (sender, receiver) = oneshot::channel();
        let requested: DateTime<Utc> = Utc::now();
        let expires = requested
            + chrono::Duration::from_std(request.deadline).unwrap_or(chrono::Duration::MAX);
        let mut held = self.held.lock().expect("approval broker lock poisoned");
        let id = loop {
            // The random tail of a UUIDv7: short enough to type, unique among held requests.
            let candidate = uuid::Uuid::now_v7().simple().to_string()[20..].to_string();
            if !held.contains_key(&candidate) {
                break candidate;
            }
        };
        let info = HeldInfo {
            id: id.clone(),
            session: request.session,
            subject: request.subject,
            subject_uid: request.subject_uid,
            target: request.target,
            rule: request.rule,
            policy: request.policy,
            summary: request.summary,
            scope: request.scope,
            forbid_self_approval: request.forbid_self_approval,
            requested_at: requested.to_rfc3339_opts(SecondsFormat::Millis, true),
            expires_at: expires.to_rfc3339_opts(SecondsFormat::Millis, true),
        };
        held.insert(
            id.clone(),
            Entry {
                info: info.clone(),
                subject_uid: request.subject_uid,
                reply: sender,
            },
        );
        info!(id = %id, session = %info.session, rule = %info.rule, "request held for review");
        Pending {
            id,
            info,
            broker: Arc::clone(self),
            deadline: request.deadline,
            reply: Some(receiver),
        }
    }

    /// Returns how many requests are held now.
    pub fn held_count(&self) -> usize {
        self.held.lock().map(|held| held.len()).unwrap_or(0)
    }

    /// The held requests, oldest first.
    pub fn list(&self) -> Vec<HeldInfo> {
        let held = self.held.lock().expect("approval broker lock poisoned");
        let mut list: Vec<HeldInfo> = held.values().map(|entry| entry.info.clone()).collect();
        list.sort_by(|a, b| a.requested_at.cmp(&b.requested_at).then(a.id.cmp(&b.id)));
        list
    }

    /// Answers held request `id` and returns what it was.
    pub fn answer(
        &self,
        id: &str,
        approver: Approver,
        approve: bool,
        reason: Option<String>,
    ) -> Result<HeldInfo, String> {
        let mut held = self.held.lock().expect("approval broker lock poisoned");
        let Some(entry) = held.get(id) else {
            return Err(format!(
                "no held request with id {id:?}: it was answered, timed out or never existed (see `gatewayctl approvals list`)"
            ));
        };
        if approve && entry.info.forbid_self_approval && entry.subject_uid == Some(approver.uid) {
            return Err(format!(
                "self-approval refused: uid {} made the held connection, and rule {:?} forbids its approval by the same uid; ask another approver",
                approver.uid, entry.info.rule
            ));
        }
        let entry = held.remove(id).expect("entry was found above");
        let answer = Answer {
            id: id.to_string(),
            verdict: if approve {
                Verdict::Approved
            } else {
                Verdict::Denied
            },
            approver: Some(approver),
            reason,
            answered_at: now_text(),
        };
        info!(id, verdict = ?answer.verdict, approver_uid = answer.approver.as_ref().map(|a| a.uid), "held request answered");
        // The handler may have gone (its session closed) between the lookup and now.
        let _ = entry.reply.send(answer);
        Ok(entry.info)
    }
}

/// Interval at which a held session is marked active while it waits, so that its idle timeout
/// does not close it while a person decides.
const KEEPALIVE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

impl Pending {
    /// Waits for the verdict like [`wait`](Self::wait), calling `keepalive` every second
    /// meanwhile and once at the end.
    pub async fn wait_keeping_alive(self, keepalive: impl Fn()) -> Answer {
        let wait = self.wait();
        tokio::pin!(wait);
        let mut ticks = tokio::time::interval(KEEPALIVE_INTERVAL);
        let answer = loop {
            tokio::select! {
                answer = &mut wait => break answer,
                _ = ticks.tick() => keepalive(),
            }
        };
        keepalive();
        answer
    }

    /// Waits for the answer; no answer within the deadline is [`Verdict::TimedOut`].
    pub async fn wait(mut self) -> Answer {
        let receiver = self.reply.take().expect("wait is called once");
        let answer = tokio::time::timeout(self.deadline, receiver).await;
        match answer {
            Ok(Ok(answer)) => answer,
            // Timed out, or the broker dropped the entry without an answer.
            _ => Answer {
                id: self.id.clone(),
                verdict: Verdict::TimedOut,
                approver: None,
                reason: Some(format!(
                    "no answer within {}",
                    humantime::format_duration(self.deadline)
                )),
                answered_at: now_text(),
            },
        }
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if let Ok(mut held) = self.broker.held.lock() {
            held.remove(&self.id);
        }
    }
}

/// A request on the socket.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase", deny_unknown_fields)]
pub enum SocketRequest {
    List,
    Approve {
        id: String,
        #[serde(default)]
        reason: Option<String>,
    },
    Deny {
        id: String,
        reason: String,
    },
}

/// The response to a [`SocketRequest`].
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct SocketResponse {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// For `list`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests: Option<Vec<HeldInfo>>,
    /// For `approve` and `deny`: the request answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answered: Option<HeldInfo>,
    /// For `approve` and `deny`: who answered, as the daemon saw it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approver: Option<Approver>,
}

/// Binds the approvals socket at `path` (owned by root, mode 0600, or 0660 with `group`) and
/// serves it until the returned task is aborted.
pub fn serve(
    broker: Arc<Broker>,
    path: &Path,
    group: Option<&str>,
) -> Result<tokio::task::JoinHandle<()>, ApprovalError> {
    let socket_error = |source| ApprovalError::Socket {
        path: path.to_path_buf(),
        source,
    };
    let gid = match group {
        Some(group) => Some(group_id(group).ok_or_else(|| ApprovalError::UnknownGroup {
            group: group.to_string(),
        })?),
        None => None,
    };
    let dir = path.parent().unwrap_or(Path::new("/"));
    fs::create_dir_all(dir).map_err(socket_error)?;
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(ApprovalError::InUse {
                path: path.to_path_buf(),
            });
        }
        fs::remove_file(path).map_err(socket_error)?;
    }

    // Bind under a temporary name and move the socket into place once its mode is set, so it
    // is never reachable with the default mode.
    let file_name = path
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_else(|| "approvals.sock".to_string());
    let staging = dir.join(format!(".{file_name}.{}", std::process::id()));
    let _ = fs::remove_file(&staging);
    let listener = UnixListener::bind(&staging).map_err(socket_error)?;
    let mode = if gid.is_some() { 0o660 } else { 0o600 };
    fs::set_permissions(&staging, fs::Permissions::from_mode(mode)).map_err(socket_error)?;
    std::os::unix::fs::chown(&staging, Some(0), gid).map_err(socket_error)?;
    fs::rename(&staging, path).map_err(socket_error)?;
    info!(path = %path.display(), mode = format!("{mode:o}"), "approvals socket listening");

    Ok(tokio::spawn(async move {
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(error) => {
                    warn!(%error, "approvals socket accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let broker = Arc::clone(&broker);
            tokio::spawn(async move {
                if let Err(error) = serve_client(stream, &broker).await {
                    warn!(%error, "approvals client failed");
                }
            });
        }
    }))
}

async fn serve_client(stream: UnixStream, broker: &Broker) -> io::Result<()> {
    let credentials = stream.peer_cred()?;
    let approver = Approver {
        uid: credentials.uid(),
        name: user_name(credentials.uid()),
    };
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut reader = BufReader::new(read.take(MAX_REQUEST_BYTES));
    let read = tokio::time::timeout(CLIENT_TIMEOUT, reader.read_line(&mut line)).await;
    let response = match read {
        Err(_) => error_response("timed out waiting for the request line".into()),
        Ok(Err(error)) => error_response(format!("failed to read the request: {error}")),
        Ok(Ok(_)) if !line.ends_with('\n') => error_response(format!(
            "request line missing its newline or longer than {MAX_REQUEST_BYTES} bytes"
        )),
        Ok(Ok(_)) => match serde_json::from_str::<SocketRequest>(&line) {
            Ok(request) => handle(request, broker, approver),
            Err(error) => error_response(format!("invalid request: {error}")),
        },
    };
    let mut text = serde_json::to_string(&response).map_err(io::Error::other)?;
    text.push('\n');
    write.write_all(text.as_bytes()).await?;
    write.shutdown().await
}

fn error_response(message: String) -> SocketResponse {
    SocketResponse {
        error: Some(message),
        ..SocketResponse::default()
    }
}

fn handle(request: SocketRequest, broker: &Broker, approver: Approver) -> SocketResponse {
    let (id, approve, reason) = match request {
        SocketRequest::List => {
            return SocketResponse {
                requests: Some(broker.list()),
                ..SocketResponse::default()
            };
        }
        SocketRequest::Approve { id, reason } => (id, true, reason),
        SocketRequest::Deny { id, reason } => (id, false, Some(reason)),
    };
    if let Some(reason) = &reason {
        if reason.chars().count() > MAX_REASON_CHARS {
            return error_response(format!(
                "reason is longer than {MAX_REASON_CHARS} characters"
            ));
        }
        if reason.trim().is_empty() && !approve {
            return error_response("a denial needs a non-empty reason".into());
        }
    }
    match broker.answer(&id, approver.clone(), approve, reason) {
        Ok(info) => SocketResponse {
            answered: Some(info),
            approver: Some(approver),
            ..SocketResponse::default()
        },
        Err(message) => error_response(message),
    }
}

/// Sends one request to the approvals socket at `path` and returns the response.
pub async fn call(path: &Path, request: &SocketRequest) -> anyhow::Result<SocketResponse> {
    use anyhow::Context as _;
    let stream = UnixStream::connect(path).await.with_context(|| {
        format!(
            "failed to connect to the approvals socket {} (is gatewayd running, and are you root or in its approvals group?)",
            path.display()
        )
    })?;
    let (read, mut write) = stream.into_split();
    let mut text = serde_json::to_string(request)?;
    text.push('\n');
    write.write_all(text.as_bytes()).await?;
    write.shutdown().await?;
    let mut line = String::new();
    BufReader::new(read).read_line(&mut line).await?;
    serde_json::from_str(&line)
        .with_context(|| format!("invalid response from the approvals socket: {line:?}"))
}

/// Looks up a user name in `/etc/passwd`.
// NOTE: users known only to NSS sources other than /etc/passwd (LDAP, sssd) show as uid only.
fn user_name(uid: u32) -> Option<String> {
    let passwd = fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|line| {
        let mut fields = line.split(':');
        let name = fields.next()?;
        let entry_uid: u32 = fields.nth(1)?.parse().ok()?;
        (entry_uid == uid).then(|| name.to_string())
    })
}

/// Looks up a group id in `/etc/group`; a number is taken as the gid itself.
fn group_id(group: &str) -> Option<u32> {
    if let Ok(gid) = group.parse() {
        return Some(gid);
    }
    let groups = fs::read_to_string("/etc/group").ok()?;
    groups.lines().find_map(|line| {
        let mut fields = line.split(':');
        let name = fields.next()?;
        let gid: u32 = fields.nth(1)?.parse().ok()?;
        (name == group).then_some(gid)
    })
}
