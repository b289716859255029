//! `gatewayctl sessions`: list, show, replay, export and verify the node's recordings.
//!
//! Every command first writes an `access` record into the journal: the real uid and its user
//! name, the command, and the sessions it reads. A command that cannot write it fails before
//! reading, so reading audit records is itself audited.

use std::{
    io::{IsTerminal as _, Write as _},
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, bail};
use chrono::{DateTime, NaiveDate, Utc};
use clap::{Args, Subcommand, ValueEnum};
use serde_json::{Map, Value, json};

use crate::{
    config::DEFAULT_RECORDING_DIR,
    record::{
        Fields, PUBLIC_KEY_FILE,
        journal::{Journal, Writer},
        read::{self, SessionFile, Summary},
        signing::PublicKey,
        verify,
    },
};

/// `gatewayctl sessions` and its options.
#[derive(Debug, Args)]
pub struct SessionsArgs {
    /// Recording store of the node (`recording.dir` in the daemon's config).
    #[arg(long, global = true, env = "GATEWAY_STORE", default_value = DEFAULT_RECORDING_DIR)]
    pub store: PathBuf,
    #[command(subcommand)]
    pub command: SessionsCommand,
}

#[derive(Debug, Subcommand)]
pub enum SessionsCommand {
    /// List sessions, oldest first.
    List {
        /// Only sessions that started within this long before now (e.g. `2h`, `7d`).
        #[arg(long, value_parser = humantime::parse_duration)]
        since: Option<Duration>,
        /// Only sessions that started before this time (RFC 3339, e.g. `2026-12-01T00:00:00Z`).
        #[arg(long, value_parser = parse_time)]
        until: Option<DateTime<Utc>>,
        /// Only sessions of pods in this namespace.
        #[arg(long)]
        namespace: Option<String>,
        /// Only sessions of this pod (name, UID or cgroup path).
        #[arg(long)]
        pod: Option<String>,
        /// Only sessions to this target: a target name from the daemon's configuration, or a
        /// class (`postgres`, `mysql`, `kube_api`, `tcp`).
        #[arg(long)]
        target: Option<String>,
        /// Print JSON lines instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Print a session's records in order.
    Show {
        /// Session id, or a unique prefix of it.
        id: String,
        /// Print the records as stored (JSON lines).
        #[arg(long)]
        json: bool,
    },
    /// Play an exec or attach session back with its timing, or print an SQL session's
    /// statements with their outcomes.
    Replay {
        /// Session id, or a unique prefix of it.
        id: String,
        /// Playback speed factor; 2 plays twice as fast.
        #[arg(long, default_value_t = 1.0)]
        speed: f64,
        /// Maximum pause between two frames, whatever the recorded gap (e.g. `2s`).
        #[arg(long, value_parser = humantime::parse_duration, default_value = "2s")]
        idle_limit: Duration,
    },
    /// Write a session to standard output in another format.
    Export {
        /// Session id, or a unique prefix of it.
        id: String,
        /// `asciicast` (v2, for terminal players) or `jsonl` (the records as stored).
        #[arg(long, value_enum)]
        format: ExportFormat,
    },
    /// Check hash chains, signed checkpoints and the journal. Exits 0 when nothing was
    /// tampered with, 1 when tampering was found, 2 when the check could not run (a missing
    /// store or key, an unknown id).
    Verify {
        /// Session id or unique prefix; checks only that session (and the journal).
        id: Option<String>,
        /// Check every session in the store.
        #[arg(long, conflicts_with = "id")]
        all: bool,
        /// Trusted public key (PEM). Defaults to the key in the store, which an intruder with
        /// write access to the store could have replaced, so keep a copy elsewhere and pass it.
        #[arg(long)]
        public_key: Option<PathBuf>,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum ExportFormat {
    Asciicast,
    Jsonl,
}

fn parse_time(text: &str) -> Result<DateTime<Utc>, String> {
    DateTime::parse_from_rfc3339(text)
        .map(|time| time.with_timezone(&Utc))
        .map_err(|error| {
            format!("invalid time {text:?} ({error}); use RFC 3339, e.g. 2026-12-01T00:00:00Z")
        })
}

/// Runs a `gatewayctl sessions` command; returns false when `verify` found tampering.
pub fn run(args: SessionsArgs) -> anyhow::Result<bool> {
    let store = args.store;
    if !store.join(crate::record::SESSIONS_DIR).is_dir() {
        bail!(
            "no recording store at {}: pass --store with the daemon's recording.dir",
            store.display()
        );
    }
    match args.command {
        SessionsCommand::List {
            since,
            until,
            namespace,
            pod,
            target,
            json,
        } => {
            record_access(
                &store,
                "list",
                json!({
                    "since": since.map(|d| humantime::format_duration(d).to_string()),
                    "until": until.map(|t| t.to_rfc3339()),
                    "namespace": namespace, "pod": pod, "target": target,
                }),
            )?;
            let filter = Filter {
                since: since.map(since_cutoff),
                until,
                namespace,
                pod,
                target,
            };
            list(&store, &filter, json)?;
            Ok(true)
        }
        SessionsCommand::Show { id, json } => {
            let session = read::find_session(&store, &id)?;
            record_access(&store, "show", json!({ "sessions": [session.id] }))?;
            show(&session, json)?;
            Ok(true)
        }
        SessionsCommand::Replay {
            id,
            speed,
            idle_limit,
        } => {
            if !(speed > 0.0 && speed.is_finite()) {
                bail!("invalid --speed {speed}: it must be a positive number");
            }
            let session = read::find_session(&store, &id)?;
            record_access(&store, "replay", json!({ "sessions": [session.id] }))?;
            replay(&session, speed, idle_limit)?;
            Ok(true)
        }
        SessionsCommand::Export { id, format } => {
            let session = read::find_session(&store, &id)?;
            record_access(
                &store,
                "export",
                json!({ "sessions": [session.id], "format": format!("{format:?}").to_lowercase() }),
            )?;
            export(&session, format)?;
            Ok(true)
        }
        SessionsCommand::Verify {
            id,
            all,
            public_key,
            json,
        } => {
            if id.is_none() && !all {
                bail!("name a session id to verify, or pass --all");
            }
            let session = id.map(|id| read::find_session(&store, &id)).transpose()?;
            let key_given = public_key.is_some();
            let key_path = public_key.unwrap_or_else(|| store.join(PUBLIC_KEY_FILE));
            if !key_given && !key_path.exists() {
                bail!(
                    "no public key at {}: the daemon writes it there when it opens the store; pass --public-key with a copy of the node's key kept elsewhere",
                    key_path.display()
                );
            }
            let key = PublicKey::from_file(&key_path)?;
            let recorded = record_access(
                &store,
                "verify",
                json!({
                    "sessions": session.as_ref().map_or_else(|| json!("all"), |s| json!([s.id])),
                    "public_key": key.id(),
                }),
            );
            // An archived copy is often on read-only media. Verifying shows no recorded content,
            // only whether the chains hold, so it runs there. Reads that show content do not.
            if let Err(error) = recorded {
                if !cannot_write(&error) {
                    return Err(error);
                }
                eprintln!(
                    "note: this verify is not recorded in the store's journal, which cannot be written here ({}); verifying anyway",
                    error.root_cause()
                );
            }
            let report = verify::verify_store(
                &store,
                session.as_ref(),
                &key,
                progress_printer("verifying sessions"),
            )?;
            print_report(&report, &key_path, json);
            Ok(report.passed())
        }
    }
}

/// Returns the start time `since` before now. A span reaching past the earliest time chrono
/// can hold gives that earliest time, so every session is listed.
fn since_cutoff(since: Duration) -> DateTime<Utc> {
    chrono::TimeDelta::from_std(since)
        .ok()
        .and_then(|span| Utc::now().checked_sub_signed(span))
        .unwrap_or(DateTime::<Utc>::MIN_UTC)
}

/// Writes the `access` record for a read; fails when it cannot be written.
fn record_access(store: &Path, command: &str, what: Value) -> anyhow::Result<()> {
    let uid = crate::sys::real_uid();
    let mut fields = Map::new();
    fields.insert("uid".into(), json!(uid));
    fields.insert("user".into(), json!(user_name(uid)));
    fields.insert("command".into(), json!(format!("sessions {command}")));
    fields.insert("read".into(), what);
    let node = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_string())
        .unwrap_or_else(|_| "unknown".into());
    let mut journal = Journal::open(store, &node, Writer::Cli).with_context(|| {
        format!(
            "cannot record this read in the journal under {}; reads of recordings must be recorded",
            store.display()
        )
    })?;
    journal
        .append(&[("access", Fields::journal_from_value(fields.into()))], None)
        .and_then(|_| journal.sync())
        .with_context(|| format!("cannot record this read in the journal under {}; reads of recordings must be recorded", store.display()))?;
    Ok(())
}

/// Tells whether `error` comes from a store this process may not write: a read-only file system
/// or missing write permission.
fn cannot_write(error: &anyhow::Error) -> bool {
    error
        .chain()
        .filter_map(|cause| cause.downcast_ref::<std::io::Error>())
        .any(|io| {
            matches!(
                io.kind(),
                std::io::ErrorKind::ReadOnlyFilesystem | std::io::ErrorKind::PermissionDenied
            )
        })
}

/// Looks the user name of `uid` up in `/etc/passwd`.
fn user_name(uid: u32) -> Option<String> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|line| {
        let mut fields = line.split(':');
        let name = fields.next()?;
        let id: u32 = fields.nth(1)?.parse().ok()?;
        (id == uid).then(|| name.to_string())
    })
}

struct Filter {
    since: Option<DateTime<Utc>>,
    until: Option<DateTime<Utc>>,
    namespace: Option<String>,
    pod: Option<String>,
    target: Option<String>,
}

impl Filter {
    fn matches(&self, summary: &Summary) -> bool {
        let start = read::start_time(summary);
        if let Some(since) = self.since
            && start.is_none_or(|start| start < since)
        {
            return false;
        }
        if let Some(until) = self.until
            && start.is_none_or(|start| start > until)
        {
            return false;
        }
        if let Some(namespace) = &self.namespace
            && summary.namespace.as_deref() != Some(namespace.as_str())
        {
            return false;
        }
        if let Some(pod) = &self.pod
            && !summary
                .pod
                .as_deref()
                .is_some_and(|value| value == pod || value.contains(pod.as_str()))
        {
            return false;
        }
        if let Some(target) = &self.target
            && summary.target_class != *target
            && summary.target != *target
        {
            return false;
        }
        true
    }
}

fn list(store: &Path, filter: &Filter, json: bool) -> anyhow::Result<()> {
    let from = filter.since.map(|since| since.date_naive());
    let to: Option<NaiveDate> = filter.until.map(|until| until.date_naive());
    let files = read::session_files(store, from, to)?;
    let mut progress = progress_printer("reading sessions");
    let total = files.len() as u64;
    let mut rows = Vec::new();
    let mut unreadable = 0;
    for (index, file) in files.iter().enumerate() {
        progress(index as u64, total);
        let bytes = match read::read_bytes(&file.path) {
            Ok(bytes) => bytes,
            Err(error) => {
                eprintln!("warning: session {} skipped: {error}", file.id);
                unreadable += 1;
                continue;
            }
        };
        let (records, skipped) = read::parse_records_counted(&bytes);
        let mut summary = read::summarize(&file.id, &records);
        summary.damaged = skipped > 0 || summary.start.is_empty();
        if filter.matches(&summary) {
            rows.push(summary);
        }
    }
    progress(total, total);

    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    if json {
        for row in &rows {
            writeln!(out, "{}", serde_json::to_string(row)?)?;
        }
        return Ok(());
    }
    writeln!(
        out,
        "{:<36}  {:<19}  {:>9}  {:<28}  {:<20}  {:<28}  {:>8}  {:>6}  OUTCOME",
        "ID", "START", "DURATION", "POD", "SERVICE ACCOUNT", "TARGET", "REQUESTS", "DENIED"
    )?;
    for row in &rows {
        let pod = match (&row.namespace, &row.pod) {
            (Some(namespace), Some(pod)) => format!("{namespace}/{pod}"),
            (None, Some(pod)) => pod.clone(),
            _ => "-".into(),
        };
        let start = read::start_time(row)
            .map(|time| time.format("%Y-%m-%d %H:%M:%S").to_string())
            .unwrap_or_else(|| "-".into());
        let duration = row
            .duration_ms
            .map(format_duration_ms)
            .unwrap_or_else(|| "-".into());
        writeln!(
            out,
            "{:<36}  {:<19}  {:>9}  {:<28}  {:<20}  {:<28}  {:>8}  {:>6}  {}",
            row.id,
            start,
            duration,
            truncate(&pod, 28),
            truncate(row.service_account.as_deref().unwrap_or("-"), 20),
            truncate(&format!("{}/{}", row.target_class, row.target), 28),
            row.requests,
            row.denied,
            if row.damaged { "damaged" } else { &row.outcome }
        )?;
    }
    if rows.is_empty() {
        eprintln!("no sessions match");
    }
    if rows.iter().any(|row| row.damaged) {
        eprintln!(
            "sessions marked damaged have records that cannot be read; `gatewayctl sessions verify --all` reports what changed"
        );
    }
    if unreadable > 0 {
        bail!("{unreadable} session file(s) could not be read; see the warnings above");
    }
    Ok(())
}

fn format_duration_ms(ms: u64) -> String {
    if ms < 1000 {
        format!("{ms}ms")
    } else if ms < 60_000 {
        format!("{:.1}s", ms as f64 / 1000.0)
    } else {
        format!("{}m{:02}s", ms / 60_000, (ms % 60_000) / 1000)
    }
}

fn truncate(text: &str, width: usize) -> String {
    if text.chars().count() <= width {
        return text.to_string();
    }
    let kept: String = text.chars().take(width - 1).collect();
    format!("{kept}…")
}

fn show(session: &SessionFile, json: bool) -> anyhow::Result<()> {
    let bytes = read::read_bytes(&session.path)?;
    let records = readable_records(session, &bytes)?;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    if json {
        // The lines as stored, also those that cannot be parsed.
        let (lines, _) = crate::record::journal::split_lines(&bytes);
        for line in lines {
            out.write_all(line)?;
        }
        return Ok(());
    }
    for record in &records {
        writeln!(out, "{}", describe(record))?;
    }
    Ok(())
}

/// Parses a session's records for reading. A file with no readable record is an error, and
/// lines that cannot be parsed are left out with a warning, since either means the file was
/// damaged.
fn readable_records(session: &SessionFile, bytes: &[u8]) -> anyhow::Result<Vec<Value>> {
    let (records, skipped) = read::parse_records_counted(bytes);
    let id = &session.id;
    if records.is_empty() {
        bail!(
            "session {id} has no readable records: its file {} is empty or damaged; `gatewayctl sessions verify {id}` reports what changed",
            session.path.display()
        );
    }
    if skipped > 0 {
        eprintln!(
            "warning: {skipped} line(s) of session {id} cannot be read and are left out; `gatewayctl sessions verify {id}` reports what changed"
        );
    }
    Ok(records)
}

/// Formats a record as one readable line: time, seq, event, then its own fields.
fn describe(record: &Value) -> String {
    let time = record["time"].as_str().unwrap_or("-");
    let seq = record["seq"].as_u64().unwrap_or_default();
    let event = record["event"].as_str().unwrap_or("-");
    let mut details = Vec::new();
    if let Some(map) = record.as_object() {
        for (key, value) in map {
            if matches!(
                key.as_str(),
                "v" | "seq"
                    | "prev"
                    | "time"
                    | "event"
                    | "session"
                    | "node"
                    | "protocol"
                    | "signature"
            ) {
                continue;
            }
            let text = match value {
                Value::String(text) => format!("{text:?}"),
                other => other.to_string(),
            };
            details.push(format!("{key}={text}"));
        }
    }
    format!("{time} {seq:>5} {event:<16} {}", details.join(" "))
}

fn replay(session: &SessionFile, speed: f64, idle_limit: Duration) -> anyhow::Result<()> {
    let records = readable_records(session, &read::read_bytes(&session.path)?)?;
    let frames: Vec<&Value> = records
        .iter()
        .filter(|r| r["event"] == "stream.frame")
        .collect();
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    if frames.is_empty() {
        // Not a terminal session: print the request transcript.
        for record in &records {
            if let Some(line) = transcript_line(record) {
                writeln!(out, "{line}")?;
            }
        }
        return Ok(());
    }
    let mut last_offset = 0u64;
    for frame in frames {
        let offset = frame["offset_ms"].as_u64().unwrap_or(last_offset);
        let wait = Duration::from_millis(offset.saturating_sub(last_offset)).min(idle_limit);
        std::thread::sleep(wait.div_f64(speed));
        last_offset = offset;
        if cast_event_type(frame) != Some("o") {
            continue;
        }
        out.write_all(frame["data"].as_str().unwrap_or_default().as_bytes())?;
        out.flush()?;
    }
    Ok(())
}

/// Formats a request record as a transcript line: time, request, and its outcome.
fn transcript_line(record: &Value) -> Option<String> {
    let time = record["time"].as_str().unwrap_or("-");
    match record["event"].as_str()? {
        "sql.statement" => {
            let outcome = match record["decision"].as_str() {
                Some("deny") => {
                    format!("DENIED by {}", record["rule"].as_str().unwrap_or("policy"))
                }
                _ => match record["error_code"].as_str() {
                    Some(code) => format!("ERROR {code}"),
                    None => match record["rows"].as_u64() {
                        Some(rows) => format!("ok, {rows} rows"),
                        None => "ok".into(),
                    },
                },
            };
            Some(format!(
                "{time}  {}@{}  {}\n    -> {outcome}",
                record["database_user"].as_str().unwrap_or("?"),
                record["database"].as_str().unwrap_or("?"),
                record["statement"].as_str().unwrap_or_default()
            ))
        }
        "kube.request" => {
            let request = &record["request"];
            let mut outcome = format!(
                "{} {}",
                record["status"],
                record["outcome"].as_str().unwrap_or("?")
            );
            if let Some(rule) = record["rule"].as_str() {
                outcome.push_str(&format!(" by {rule}"));
            }
            if record["token_pod_mismatch"] == true {
                outcome.push_str(", token of another pod");
            }
            Some(format!(
                "{time}  {} {}  -> {outcome}",
                request["verb"].as_str().unwrap_or("?"),
                request["path"]
                    .as_str()
                    .or_else(|| request["resource"].as_str())
                    .unwrap_or("?"),
            ))
        }
        "approval.requested" => Some(format!(
            "{time}  held for approval {} by rule {}",
            record["id"].as_str().unwrap_or("?"),
            record["rule"].as_str().unwrap_or("?")
        )),
        "approval.answered" => Some(format!(
            "{time}  approval {} {} by {} ({})",
            record["id"].as_str().unwrap_or("?"),
            record["verdict"].as_str().unwrap_or("?"),
            record["approver_name"].as_str().unwrap_or("?"),
            record["reason"].as_str().unwrap_or("no reason given")
        )),
        "session.start" => {
            let target = &record["target"];
            Some(format!(
                "{time}  session started: {} target {} at {}",
                target["class"].as_str().unwrap_or("?"),
                target["name"].as_str().unwrap_or("?"),
                target["addr"].as_str().unwrap_or("?")
            ))
        }
        "session.end" => Some(format!(
            "{time}  session ended: {}",
            record["outcome"].as_str().unwrap_or("?")
        )),
        _ => None,
    }
}

fn export(session: &SessionFile, format: ExportFormat) -> anyhow::Result<()> {
    let bytes = read::read_bytes(&session.path)?;
    let records = readable_records(session, &bytes)?;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    match format {
        ExportFormat::Jsonl => {
            // The lines as stored, also those that cannot be parsed.
            let (lines, _) = crate::record::journal::split_lines(&bytes);
            for line in lines {
                out.write_all(line)?;
            }
        }
        ExportFormat::Asciicast => {
            for line in asciicast(&records)? {
                writeln!(out, "{line}")?;
            }
        }
    }
    Ok(())
}

/// Converts an exec or attach session into asciicast v2 lines: a header, then `[seconds,
/// "o" | "i", data]` events with times relative to the stream's start, and `[seconds, "r",
/// "COLSxROWS"]` where the terminal was resized. The header takes the first size the client
/// sent. WebSocket and SPDY recordings name their streams alike, so both export the same way
/// (see [`cast_event_type`]).
pub fn asciicast(records: &[Value]) -> anyhow::Result<Vec<String>> {
    let open = records.iter().find(|r| r["event"] == "stream.open");
    let frames: Vec<&Value> = records
        .iter()
        .filter(|r| r["event"] == "stream.frame")
        .collect();
    if open.is_none() && frames.is_empty() {
        bail!(
            "this session has no terminal stream (exec or attach) to export as asciicast; use --format jsonl"
        );
    }
    let start = records
        .first()
        .and_then(|r| r["time"].as_str())
        .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
        .map_or(0, |t| t.timestamp());
    // A terminal that reported no size (0x0) gets the usual 80x24, which players can show.
    let first_size = frames
        .iter()
        .filter_map(|frame| terminal_size(frame))
        .find(|&(width, height)| width > 0 && height > 0);
    let width = open
        .and_then(|o| o["width"].as_u64())
        .filter(|&width| width > 0)
        .or(first_size.map(|(width, _)| width))
        .unwrap_or(80);
    let height = open
        .and_then(|o| o["height"].as_u64())
        .filter(|&height| height > 0)
        .or(first_size.map(|(_, height)| height))
        .unwrap_or(24);
    let mut header = json!({ "version": 2, "width": width, "height": height, "timestamp": start });
    if let Some(command) = open.map(|o| &o["command"]).filter(|c| !c.is_null()) {
        let text = match command {
            Value::Array(parts) => parts
                .iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join(" "),
            other => other.as_str().unwrap_or_default().to_string(),
        };
        header["command"] = json!(text);
    }
    let base = open.and_then(|o| o["offset_ms"].as_u64()).unwrap_or(0);
    let mut lines = vec![header.to_string()];
    for frame in frames {
        let seconds = frame["offset_ms"]
            .as_u64()
            .unwrap_or(base)
            .saturating_sub(base) as f64
            / 1000.0;
        if let Some((width, height)) = terminal_size(frame) {
            lines.push(json!([seconds, "r", format!("{width}x{height}")]).to_string());
            continue;
        }
        let Some(kind) = cast_event_type(frame) else {
            continue;
        };
        lines.push(json!([seconds, kind, frame["data"].as_str().unwrap_or_default()]).to_string());
    }
    Ok(lines)
}

/// Returns the columns and rows of a recorded `resize` frame, which contains the JSON kubectl
/// sends (`{"Width":100,"Height":30}`), or `None` for other frames and unreadable sizes.
fn terminal_size(frame: &Value) -> Option<(u64, u64)> {
    if frame["stream"] != "resize" {
        return None;
    }
    let size: Value = serde_json::from_str(frame["data"].as_str()?).ok()?;
    Some((size["Width"].as_u64()?, size["Height"].as_u64()?))
}

/// Returns the asciicast event type of a recorded frame: `o` (output) for stdout and stderr,
/// `i` (input) for stdin. Other streams return `None`, because a terminal does not show them:
/// `error` carries the exit status, `resize` the terminal size, `unknown` a stream of no known
/// type.
fn cast_event_type(frame: &Value) -> Option<&'static str> {
    match frame["stream"].as_str()? {
        "stdout" | "stderr" => Some("o"),
        "stdin" => Some("i"),
        _ => None,
    }
}

fn print_report(report: &verify::Report, key_path: &Path, json: bool) {
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(report).unwrap_or_default()
        );
        return;
    }
    for finding in &report.failures {
        println!("FAIL  {}", format_finding(finding));
    }
    for finding in &report.notes {
        println!("note  {}", format_finding(finding));
    }
    let verdict = if report.passed() { "PASS" } else { "FAIL" };
    println!(
        "{verdict}: {}, {}, {:.1} MiB checked with key {}; {}, {}",
        count(report.sessions, "session"),
        count(report.records, "record"),
        report.bytes as f64 / (1024.0 * 1024.0),
        key_path.display(),
        count(report.failures.len() as u64, "failure"),
        count(report.notes.len() as u64, "note")
    );
}

/// Formats `n` with `noun`, adding an `s` unless `n` is 1.
fn count(n: u64, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

fn format_finding(finding: &verify::Finding) -> String {
    match finding.line {
        Some(line) => format!("{}:{line}: {}", finding.file, finding.message),
        None => format!("{}: {}", finding.file, finding.message),
    }
}

/// Returns a callback printing `label done/total` on standard error when it is a terminal,
/// and doing nothing when it is not.
fn progress_printer(label: &'static str) -> impl FnMut(u64, u64) {
    let terminal = std::io::stderr().is_terminal();
    let mut last = std::time::Instant::now();
    move |done, total| {
        if !terminal || total < 100 {
            return;
        }
        if done == total {
            eprint!("\r\x1b[K");
        } else if last.elapsed() >= Duration::from_millis(200) {
            last = std::time::Instant::now();
            eprint!("\r{label}: {done}/{total}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transcript_of_kube_requests() {
        let allowed = json!({
            "event": "kube.request",
            "time": "2026-01-02T03:04:05Z",
            "outcome": "allowed",
            "status": 200,
            "request": {"verb": "list", "path": "/api/v1/namespaces/default/pods", "resource": "pods"},
            "token_pod_mismatch": false,
        });
        assert_eq!(
            transcript_line(&allowed).as_deref(),
            Some("2026-01-02T03:04:05Z  list /api/v1/namespaces/default/pods  -> 200 allowed")
        );
        let denied = json!({
            "event": "kube.request",
            "time": "2026-01-02T03:04:06Z",
            "outcome": "denied",
            "rule": "no-stolen-tokens",
            "status": 403,
            "request": {"verb": "get", "path": "/api/v1/namespaces/payments/secrets/db"},
            "token_pod_mismatch": true,
        });
        let answered = json!({
            "event": "approval.answered",
            "time": "2026-01-02T03:04:07Z",
            "id": "46e44c54386a",
            "verdict": "approved",
            "approver_name": "root",
            "reason": "change 4711",
        });
        assert_eq!(
            transcript_line(&answered).as_deref(),
            Some("2026-01-02T03:04:07Z  approval 46e44c54386a approved by root (change 4711)")
        );
        assert_eq!(
            transcript_line(&denied).as_deref(),
            Some(
                "2026-01-02T03:04:06Z  get /api/v1/namespaces/payments/secrets/db  -> 403 denied by no-stolen-tokens, token of another pod"
            )
        );
    }

    /// Records of an exec session with one frame per stream, each with `extra` fields.
    fn exec_records(extra: &dyn Fn(u64) -> Value) -> Vec<Value> {
        let mut records = vec![json!({
            "event": "stream.open",
            "time": "2026-01-02T03:04:05Z",
            "offset_ms": 1000,
            "command": ["sh"],
        })];
        let frames = [
            ("stdin", "ls\r"),
            ("resize", r#"{"Width":100,"Height":30}"#),
            ("stdout", "file\r\n"),
            ("stderr", "warning\r\n"),
            ("error", r#"{"status":"Success"}"#),
            ("unknown", "other"),
        ];
        for (index, (stream, data)) in (1..).zip(frames) {
            let mut frame = json!({
                "event": "stream.frame",
                "stream": stream,
                "offset_ms": 1000 + 500 * index,
                "data": data,
            });
            if let (Value::Object(fields), Value::Object(more)) = (&mut frame, extra(index)) {
                fields.extend(more);
            }
            records.push(frame);
        }
        records
    }

    /// SPDY frames carry their stream id besides the name. Both transports export the same
    /// events, and only for the streams a terminal shows.
    #[test]
    fn asciicast_same_for_both_transports() {
        let websocket = asciicast(&exec_records(&|_| json!({}))).expect("export WebSocket");
        let spdy = asciicast(&exec_records(
            &|index| json!({ "spdy_stream": 2 * index + 1 }),
        ))
        .expect("export SPDY");
        assert_eq!(websocket, spdy);

        let events: Vec<Value> = spdy[1..]
            .iter()
            .map(|line| serde_json::from_str(line).expect("asciicast event"))
            .collect();
        assert_eq!(
            events,
            [
                json!([0.5, "i", "ls\r"]),
                json!([1.0, "r", "100x30"]),
                json!([1.5, "o", "file\r\n"]),
                json!([2.0, "o", "warning\r\n"]),
            ]
        );
        let header: Value = serde_json::from_str(&spdy[0]).expect("asciicast header");
        assert_eq!(header["command"], "sh");
        assert_eq!(header["width"], 100, "the first size sets the header's");
        assert_eq!(header["height"], 30);
    }

    /// A terminal that reported 0x0 gets 80x24 in the header, or its first real size.
    #[test]
    fn asciicast_zero_size_replaced() {
        let header_of = |records: &[Value]| -> Value {
            let cast = asciicast(records).expect("export");
            serde_json::from_str(&cast[0]).expect("asciicast header")
        };
        let mut records = exec_records(&|_| json!({}));
        records.insert(
            1,
            json!({
                "event": "stream.frame",
                "stream": "resize",
                "offset_ms": 1100,
                "data": r#"{"Width":0,"Height":0}"#,
            }),
        );
        let header = header_of(&records);
        assert_eq!(
            (&header["width"], &header["height"]),
            (&json!(100), &json!(30))
        );

        records[0]["width"] = json!(0);
        records[0]["height"] = json!(0);
        records.retain(|record| record["data"] != r#"{"Width":100,"Height":30}"#);
        let header = header_of(&records);
        assert_eq!(
            (&header["width"], &header["height"]),
            (&json!(80), &json!(24))
        );
    }
}
