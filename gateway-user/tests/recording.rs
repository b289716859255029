//! The recording store as an SRE meets it: sessions written through the recorder, then read,
//! exported and verified with the real `gatewayctl`, and tampered with in every way `verify`
//! must catch.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::{
        Arc,
        atomic::{AtomicI64, Ordering},
    },
    time::{Duration, SystemTime},
};

use gateway_user::{
    config::RecordingConfig,
    identity::Subject,
    record::{DIR_MODE, FILE_MODE, Outcome, Recorder, SessionEnd, TargetInfo},
};
use serde_json::{Value, json};

const GATEWAYCTL: &str = env!("CARGO_BIN_EXE_gatewayctl");
const PAN: &str = "4111111111111111";
const PAN_DASHED: &str = "4111-1111-1111-1111";

fn config(dir: &Path) -> RecordingConfig {
    RecordingConfig {
        dir: dir.to_path_buf(),
        min_free_mib: 0,
        ..RecordingConfig::default()
    }
}

fn target(class: &str) -> TargetInfo {
    TargetInfo {
        id: 0,
        name: "payments-db".into(),
        class: class.into(),
        addr: "10.96.0.20:5432".parse().expect("address"),
    }
}

fn end() -> SessionEnd {
    SessionEnd {
        outcome: Outcome::Closed,
        reason: None,
        bytes_from_client: 10,
        bytes_from_upstream: 20,
        duration: Duration::from_millis(15),
    }
}

/// Writes an SQL session and an exec session (with a PAN in each) and stops the recorder.
/// Returns the two session ids.
fn write_store(dir: &Path) -> (String, String) {
    let recorder = Recorder::open(&config(dir), "node-a".into()).expect("open store");
    let subject = Subject {
        cgroup: Some("/kubepods/pod1/c1".into()),
        pid: 42,
        ..Subject::default()
    };
    let client = "10.1.0.2:40000".parse().expect("address");

    let mut sql = recorder
        .start(&subject, client, &target("postgres"))
        .expect("start SQL session");
    for statement in [
        format!("SELECT * FROM cards WHERE pan = '{PAN}'"),
        "DROP TABLE cards".to_string(),
    ] {
        let denied = statement.starts_with("DROP");
        sql.event(
            "sql.statement",
            json!({
                "statement": statement,
                "params": [PAN_DASHED],
                "kind": if denied { "drop" } else { "select" },
                "decision": if denied { "deny" } else { "allow" },
                "rule": if denied { Some("no-drop") } else { None },
                "rows": 1,
                "database_user": "app",
                "database": "shop",
            }),
        )
        .expect("record statement");
    }
    let sql_id = sql.id.clone();
    sql.finish(&end()).expect("finish SQL session");

    let mut exec = recorder
        .start(&subject, client, &target("kube_api"))
        .expect("start exec session");
    exec.event(
        "stream.open",
        json!({ "command": ["sh", "-c", "cat"], "tty": true, "width": 100, "height": 30, "offset_ms": 0 }),
    )
    .expect("record stream open");
    for (offset, stream, data) in [
        (5, "stdin", "echo hi\r"),
        (120, "stdout", "hi\r\n"),
        (250, "stdout", &*format!("card {PAN}\r\n")),
    ] {
        exec.event(
            "stream.frame",
            json!({ "stream": stream, "offset_ms": offset, "data": data }),
        )
        .expect("record frame");
    }
    let exec_id = exec.id.clone();
    exec.finish(&end()).expect("finish exec session");
    recorder.shutdown();
    (sql_id, exec_id)
}

fn gatewayctl(store: &Path, args: &[&str]) -> Output {
    Command::new(GATEWAYCTL)
        .arg("sessions")
        .arg("--store")
        .arg(store)
        .args(args)
        .output()
        .expect("run gatewayctl")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn verify(store: &Path) -> (Option<i32>, String) {
    let output = gatewayctl(store, &["verify", "--all"]);
    let text = format!(
        "{}{}",
        stdout(&output),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.code(), text)
}

fn session_path(store: &Path, id: &str) -> PathBuf {
    let sessions = store.join("sessions");
    for day in fs::read_dir(&sessions).expect("sessions dir").flatten() {
        let path = day.path().join(format!("{id}.jsonl"));
        if path.exists() {
            return path;
        }
    }
    panic!("no file for session {id}");
}

fn journal_segments(store: &Path) -> Vec<PathBuf> {
    let mut paths: Vec<PathBuf> = fs::read_dir(store.join("journal"))
        .expect("journal dir")
        .flatten()
        .map(|entry| entry.path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "jsonl"))
        .collect();
    paths.sort();
    paths
}

/// Reads every file under `dir`, decompressing `.zst` files, into one buffer.
fn all_bytes(dir: &Path) -> Vec<u8> {
    let mut bytes = Vec::new();
    for entry in fs::read_dir(dir).expect("read dir").flatten() {
        let path = entry.path();
        if path.is_dir() {
            bytes.extend(all_bytes(&path));
        } else {
            let data = fs::read(&path).expect("read file");
            if path.extension().is_some_and(|ext| ext == "zst") {
                bytes.extend(zstd::stream::decode_all(&data[..]).expect("zstd file"));
            } else {
                bytes.extend(data);
            }
        }
    }
    bytes
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle.as_bytes())
}

#[test]
fn store_round_trip() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let (sql_id, exec_id) = write_store(dir.path());

    let (code, report) = verify(dir.path());
    assert_eq!(code, Some(0), "{report}");
    assert!(report.contains("PASS: 2 sessions"), "{report}");

    let list = gatewayctl(dir.path(), &["list"]);
    assert!(list.status.success(), "{list:?}");
    let table = stdout(&list);
    assert!(table.starts_with("ID "), "{table}");
    let sql_row = table
        .lines()
        .find(|line| line.starts_with(&sql_id))
        .expect("SQL session listed");
    assert!(sql_row.contains("postgres/payments-db"), "{sql_row}");
    assert!(sql_row.contains("closed"), "{sql_row}");

    let json_list = gatewayctl(dir.path(), &["list", "--json", "--target", "postgres"]);
    let rows: Vec<Value> = stdout(&json_list)
        .lines()
        .map(|line| serde_json::from_str(line).expect("JSON row"))
        .collect();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["id"], sql_id.as_str());
    assert_eq!(rows[0]["requests"], 2);
    assert_eq!(rows[0]["denied"], 1);

    // UUIDv7 ids start with their time, so a short prefix can match both sessions.
    let ambiguous = gatewayctl(dir.path(), &["show", &sql_id[..8]]);
    assert_eq!(ambiguous.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&ambiguous.stderr).contains("matches 2 sessions"),
        "{ambiguous:?}"
    );
    let show = gatewayctl(dir.path(), &["show", &sql_id]);
    assert!(show.status.success(), "{show:?}");
    let text = stdout(&show);
    assert!(text.contains("sql.statement"), "{text}");
    assert!(text.contains("DROP TABLE cards"), "{text}");

    let replay = gatewayctl(dir.path(), &["replay", &sql_id]);
    let transcript = stdout(&replay);
    assert!(transcript.contains("DENIED by no-drop"), "{transcript}");
    assert!(
        transcript.contains("session started: postgres target payments-db at 10.96.0.20:5432"),
        "{transcript}"
    );

    let cast = gatewayctl(dir.path(), &["export", &exec_id, "--format", "asciicast"]);
    assert!(cast.status.success(), "{cast:?}");
    let lines: Vec<Value> = stdout(&cast)
        .lines()
        .map(|line| serde_json::from_str(line).expect("asciicast line is JSON"))
        .collect();
    assert_eq!(lines[0]["version"], 2);
    assert_eq!(lines[0]["width"], 100);
    assert_eq!(lines[0]["command"], "sh -c cat");
    assert_eq!(lines[1], json!([0.005, "i", "echo hi\r"]));
    assert_eq!(lines[2], json!([0.12, "o", "hi\r\n"]));
    assert_eq!(lines.len(), 4);

    let played = gatewayctl(dir.path(), &["replay", &exec_id, "--speed", "10"]);
    assert_eq!(stdout(&played), "hi\r\ncard 411111******1111\r\n");

    // Each read above left an access record naming who read what.
    let journal: Vec<Value> = journal_segments(dir.path())
        .iter()
        .flat_map(|path| {
            fs::read_to_string(path)
                .expect("read journal")
                .lines()
                .map(|line| serde_json::from_str::<Value>(line).expect("journal line"))
                .collect::<Vec<_>>()
        })
        .collect();
    let accesses: Vec<&Value> = journal
        .iter()
        .filter(|record| record["event"] == "access")
        .collect();
    assert_eq!(accesses.len(), 7, "{accesses:#?}");
    assert_eq!(accesses[3]["command"], "sessions show");
    assert_eq!(accesses[3]["read"]["sessions"][0], sql_id.as_str());
    assert_eq!(accesses[3]["uid"], 0);
    let (code, report) = verify(dir.path());
    assert_eq!(
        code,
        Some(0),
        "the access records keep the journal valid: {report}"
    );

    let store = all_bytes(dir.path());
    assert!(!contains(&store, PAN), "a clear PAN reached the store");
    assert!(
        !contains(&store, PAN_DASHED),
        "a clear PAN reached the store"
    );
}

#[test]
fn unknown_session_is_a_clear_error() {
    let dir = tempfile::tempdir().expect("temporary directory");
    write_store(dir.path());
    let output = gatewayctl(dir.path(), &["show", "ffffffff"]);
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("no session matches \"ffffffff\""),
        "{stderr}"
    );

    // An empty id names no session, even where it would be a prefix of every one.
    let empty = gatewayctl(dir.path(), &["show", ""]);
    assert_eq!(empty.status.code(), Some(2), "{empty:?}");
    assert!(
        String::from_utf8_lossy(&empty.stderr).contains("no session matches \"\""),
        "{empty:?}"
    );

    let missing = gatewayctl(Path::new("/nonexistent/store"), &["list"]);
    assert_eq!(missing.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&missing.stderr)
            .contains("no recording store at /nonexistent/store"),
        "{missing:?}"
    );
}

/// A damaged session file is named as such. `list` marks it, and `show` leaves out the lines
/// it cannot read, with a warning. A file with no readable record is an error. A path that
/// cannot be read is skipped with a warning and a failing exit.
#[test]
fn damaged_files_reported_when_read() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let (sql_id, exec_id) = write_store(dir.path());
    edit_lines(&session_path(dir.path(), &sql_id), |lines| {
        lines.insert(2, "not a record".into());
    });
    fs::write(session_path(dir.path(), &exec_id), b"").expect("empty the exec session");

    let listed = gatewayctl(dir.path(), &["list"]);
    assert_eq!(listed.status.code(), Some(0), "{listed:?}");
    let table = stdout(&listed);
    for id in [&sql_id, &exec_id] {
        let row = table
            .lines()
            .find(|line| line.starts_with(id.as_str()))
            .unwrap_or_else(|| panic!("no row for {id}: {table}"));
        assert!(row.ends_with("damaged"), "{row}");
    }
    assert!(
        String::from_utf8_lossy(&listed.stderr).contains("verify --all"),
        "{listed:?}"
    );

    let partial = gatewayctl(dir.path(), &["show", &sql_id]);
    assert_eq!(partial.status.code(), Some(0), "{partial:?}");
    assert!(stdout(&partial).contains("sql.statement"), "{partial:?}");
    let warning = String::from_utf8_lossy(&partial.stderr).into_owned();
    assert!(warning.contains("1 line(s)"), "{warning}");
    assert!(warning.contains(&format!("verify {sql_id}")), "{warning}");

    for command in ["show", "replay"] {
        let empty = gatewayctl(dir.path(), &[command, &exec_id]);
        assert_eq!(empty.status.code(), Some(2), "{command}: {empty:?}");
        assert!(
            String::from_utf8_lossy(&empty.stderr).contains("has no readable records"),
            "{command}: {empty:?}"
        );
    }

    // A directory named like a session file stops neither the listing nor the check of the
    // other files.
    let day = session_path(dir.path(), &sql_id)
        .parent()
        .expect("day directory")
        .to_path_buf();
    fs::create_dir(day.join("00000000-0000-0000-0000-000000000000.jsonl"))
        .expect("create a directory named like a session");
    let listed = gatewayctl(dir.path(), &["list"]);
    assert_eq!(listed.status.code(), Some(2), "{listed:?}");
    assert!(stdout(&listed).contains(sql_id.as_str()), "{listed:?}");
    let stderr = String::from_utf8_lossy(&listed.stderr).into_owned();
    assert!(
        stderr.contains("session 00000000-0000-0000-0000-000000000000 skipped"),
        "{stderr}"
    );
    assert!(
        stderr.contains("1 session file(s) could not be read"),
        "{stderr}"
    );
    // `verify` names the unreadable file and checks the others.
    let (code, report) = verify(dir.path());
    assert_eq!(code, Some(1), "{report}");
    assert!(report.contains("cannot be read"), "{report}");
    assert!(report.contains(&format!("{sql_id}.jsonl")), "{report}");
}

/// `list --since` with a span longer than the calendar can hold lists every session, and
/// `--target` takes a target's name as well as its class.
#[test]
fn list_filters_take_any_span_and_names() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let (sql_id, exec_id) = write_store(dir.path());
    for since in ["300000years", "18446744073709551615s"] {
        let listed = gatewayctl(dir.path(), &["list", "--since", since]);
        assert_eq!(listed.status.code(), Some(0), "{since}: {listed:?}");
        assert!(
            stdout(&listed).contains(sql_id.as_str()),
            "{since}: {listed:?}"
        );
    }
    // Both sessions went to the target named `payments-db`, with different classes.
    let by_name = stdout(&gatewayctl(
        dir.path(),
        &["list", "--target", "payments-db"],
    ));
    assert!(by_name.contains(exec_id.as_str()), "{by_name}");
    assert!(by_name.contains(sql_id.as_str()), "{by_name}");
    let by_class = stdout(&gatewayctl(dir.path(), &["list", "--target", "kube_api"]));
    assert!(by_class.contains(exec_id.as_str()), "{by_class}");
    assert!(!by_class.contains(sql_id.as_str()), "{by_class}");
    let other = gatewayctl(dir.path(), &["list", "--target", "orders-db"]);
    assert!(!stdout(&other).contains(sql_id.as_str()), "{other:?}");
    assert!(
        String::from_utf8_lossy(&other.stderr).contains("no sessions match"),
        "{other:?}"
    );
}

/// Without the store's public key, `verify` names the option that supplies one.
#[test]
fn missing_public_key_named() {
    let dir = tempfile::tempdir().expect("temporary directory");
    write_store(dir.path());
    fs::remove_file(dir.path().join(gateway_user::record::PUBLIC_KEY_FILE))
        .expect("remove the public key");
    let (code, text) = verify(dir.path());
    assert_eq!(code, Some(2), "{text}");
    assert!(text.contains("no public key at"), "{text}");
    assert!(text.contains("--public-key"), "{text}");
}

/// Rewrites line `index` (0-based) of a file with `edit`.
fn edit_lines(path: &Path, edit: impl FnOnce(&mut Vec<String>)) {
    let text = fs::read_to_string(path).expect("read file");
    let mut lines: Vec<String> = text.lines().map(String::from).collect();
    edit(&mut lines);
    let mut out = lines.join("\n");
    out.push('\n');
    fs::write(path, out).expect("write file");
}

/// Each tampering of a fresh store, the finding `verify` must print for it.
#[test]
fn tampering_is_detected_and_named() {
    type Tamper = fn(&Path, &str);
    let cases: Vec<(&str, Tamper, &str)> = vec![
        (
            "byte changed",
            |store, id| {
                edit_lines(&session_path(store, id), |lines| {
                    lines[1] = lines[1].replace("cards", "carts");
                });
            },
            ":3: prev does not match",
        ),
        (
            "record removed",
            |store, id| {
                edit_lines(&session_path(store, id), |lines| {
                    lines.remove(1);
                });
            },
            ":2: seq is 2 where 1 was expected",
        ),
        (
            "records swapped",
            |store, id| {
                edit_lines(&session_path(store, id), |lines| lines.swap(1, 2));
            },
            ":2: seq is 2 where 1 was expected",
        ),
        (
            "file truncated",
            |store, id| {
                edit_lines(&session_path(store, id), |lines| lines.truncate(2));
            },
            "the journal recorded 5: the file was cut",
        ),
        (
            "session file deleted",
            |store, id| fs::remove_file(session_path(store, id)).expect("delete"),
            "is in the journal but its file is missing",
        ),
        (
            "journal edited",
            |store, _| {
                let segment = journal_segments(store)[0].clone();
                edit_lines(&segment, |lines| {
                    lines[2] = lines[2].replace("node-a", "node-b");
                });
            },
            ":4: prev does not match",
        ),
        (
            "checkpoint from another key",
            |store, id| {
                let other = tempfile::tempdir().expect("temporary directory");
                let (other_id, _) = write_store(other.path());
                let foreign: Value = fs::read_to_string(session_path(other.path(), &other_id))
                    .expect("read")
                    .lines()
                    .last()
                    .map(|line| serde_json::from_str(line).expect("JSON"))
                    .expect("last line");
                edit_lines(&session_path(store, id), |lines| {
                    let mut last: Value =
                        serde_json::from_str(lines.last().expect("line")).expect("JSON");
                    last["signature"] = foreign["signature"].clone();
                    last["key_id"] = foreign["key_id"].clone();
                    *lines.last_mut().expect("line") = last.to_string();
                });
            },
            "checkpoint is signed by key",
        ),
        (
            "signature forged under the trusted key id",
            |store, id| {
                let other = tempfile::tempdir().expect("temporary directory");
                let (other_id, _) = write_store(other.path());
                let foreign: Value = fs::read_to_string(session_path(other.path(), &other_id))
                    .expect("read")
                    .lines()
                    .last()
                    .map(|line| serde_json::from_str(line).expect("JSON"))
                    .expect("last line");
                edit_lines(&session_path(store, id), |lines| {
                    let mut last: Value =
                        serde_json::from_str(lines.last().expect("line")).expect("JSON");
                    last["signature"] = foreign["signature"].clone();
                    *lines.last_mut().expect("line") = last.to_string();
                });
            },
            "checkpoint signature is invalid",
        ),
    ];

    for (name, tamper, expected) in cases {
        let dir = tempfile::tempdir().expect("temporary directory");
        let (sql_id, _) = write_store(dir.path());
        let (code, report) = verify(dir.path());
        assert_eq!(code, Some(0), "{name}: fresh store must pass: {report}");

        tamper(dir.path(), &sql_id);
        let (code, report) = verify(dir.path());
        assert_eq!(code, Some(1), "{name}: verify must fail: {report}");
        let failure = report
            .lines()
            .find(|line| line.starts_with("FAIL  "))
            .unwrap_or_default();
        assert!(
            failure.contains(expected),
            "{name}: expected {expected:?} in {report}"
        );
        // A chain broken in the middle is reported there, not also as a cut file.
        if !expected.contains("cut") {
            assert!(!report.contains("the file was cut"), "{name}: {report}");
        }
    }
}

#[test]
fn other_public_key_fails_verification() {
    let dir = tempfile::tempdir().expect("temporary directory");
    write_store(dir.path());
    let other = tempfile::tempdir().expect("temporary directory");
    write_store(other.path());
    let output = gatewayctl(
        dir.path(),
        &[
            "verify",
            "--all",
            "--public-key",
            other
                .path()
                .join("signing.pub")
                .to_str()
                .expect("UTF-8 path"),
        ],
    );
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    assert!(
        stdout(&output).contains("not by the trusted key"),
        "{output:?}"
    );
}

#[test]
fn torn_tail_is_reported_not_failed() {
    let dir = tempfile::tempdir().expect("temporary directory");
    // The first recorder stands for a killed daemon: it must not write on its own afterwards.
    let mut settings = config(dir.path());
    settings.checkpoint_interval = Duration::from_secs(3600);
    let recorder = Recorder::open(&settings, "node-a".into()).expect("open store");
    let mut session = recorder
        .start(
            &Subject::default(),
            "10.1.0.2:40000".parse().expect("address"),
            &target("tcp"),
        )
        .expect("start");
    session
        .event("note", json!({ "text": "before the crash" }))
        .expect("event");
    recorder.flush().expect("flush");
    let path = session.path().to_path_buf();
    // A crash mid-write: half a record at the end, and the daemon never ends the session.
    fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .and_then(|mut file| std::io::Write::write_all(&mut file, b"{\"v\":1,\"seq\":2,\"pr"))
        .expect("append torn bytes");
    std::mem::forget(session);
    std::mem::forget(recorder);

    // The next daemon start accounts for the open session.
    let restarted = Recorder::open(&config(dir.path()), "node-a".into()).expect("reopen store");
    restarted.shutdown();
    let (code, report) = verify(dir.path());
    assert_eq!(code, Some(0), "{report}");
    assert!(
        report.contains("ends with 18 bytes of an unfinished record"),
        "{report}"
    );
    assert!(report.contains("session was abandoned"), "{report}");
}

#[test]
fn retention_prunes_only_expired_days() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let offset_days = Arc::new(AtomicI64::new(-500));
    let clock_offset = Arc::clone(&offset_days);
    let clock = Arc::new(move || {
        let days = clock_offset.load(Ordering::SeqCst);
        let shift = Duration::from_secs(days.unsigned_abs() * 86_400);
        if days < 0 {
            SystemTime::now() - shift
        } else {
            SystemTime::now() + shift
        }
    });
    let mut settings = config(dir.path());
    settings.compress_after = Duration::ZERO;
    let recorder =
        Recorder::open_with_clock(&settings, "node-a".into(), clock).expect("open store");
    let subject = Subject::default();
    let client = "10.1.0.2:40000".parse().expect("address");
    let old = recorder
        .start(&subject, client, &target("tcp"))
        .expect("start old session");
    let old_path = old.finish(&end()).expect("finish");
    offset_days.store(0, Ordering::SeqCst);
    let recent = recorder
        .start(&subject, client, &target("tcp"))
        .expect("start recent session");
    let recent_id = recent.id.clone();
    recent.finish(&end()).expect("finish");
    recorder.flush().expect("flush");
    let recent_path = session_path(dir.path(), &recent_id);
    let recent_bytes = fs::read(&recent_path).expect("read recent session");

    let report = recorder
        .run_retention(SystemTime::now())
        .expect("retention pass");
    recorder.shutdown();

    assert_eq!(report.sessions_pruned, 1);
    assert!(!old_path.exists(), "the expired session must be pruned");
    assert!(!old_path.parent().expect("day dir").exists());
    let compressed = PathBuf::from(format!("{}.zst", recent_path.display()));
    assert!(compressed.exists(), "the recent session must be compressed");
    assert!(!recent_path.exists());
    assert_eq!(
        mode(&compressed),
        FILE_MODE,
        "compressed sessions keep the file mode"
    );
    let kept = zstd::stream::decode_all(&fs::read(&compressed).expect("read")[..]).expect("zstd");
    assert_eq!(
        kept, recent_bytes,
        "the recent session must be kept byte for byte"
    );

    let pruned: Vec<Value> = journal_segments(dir.path())
        .iter()
        .flat_map(|path| {
            fs::read_to_string(path)
                .expect("read")
                .lines()
                .map(|line| serde_json::from_str::<Value>(line).expect("JSON"))
                .collect::<Vec<_>>()
        })
        .filter(|record| record["event"] == "pruned")
        .collect();
    assert_eq!(pruned.len(), 1);
    assert_eq!(pruned[0]["sessions"], 1);

    let (code, report) = verify(dir.path());
    assert_eq!(code, Some(0), "pruned sessions are explained: {report}");
    let show = gatewayctl(dir.path(), &["show", &recent_id]);
    assert!(
        stdout(&show).contains("session.end"),
        "compressed sessions stay readable"
    );
}

fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt as _;
    fs::metadata(path).expect("metadata").permissions().mode() & 0o777
}

/// A reader that closes the pipe early (`gatewayctl ... | head -1`) ends gatewayctl with
/// SIGPIPE, as it ends other tools, without an error message or a panic.
#[test]
fn closed_output_pipe_ends_quietly() {
    use std::os::unix::process::ExitStatusExt as _;

    let dir = tempfile::tempdir().expect("temporary directory");
    let store = dir.path().join("store");
    let (sql_id, _) = write_store(&store);
    for command in [
        &["show", sql_id.as_str()][..],
        &["verify", "--all"],
        &["list"],
    ] {
        let mut child = Command::new(GATEWAYCTL)
            .arg("sessions")
            .arg("--store")
            .arg(&store)
            .args(command)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run gatewayctl");
        drop(child.stdout.take());
        let output = child.wait_with_output().expect("wait for gatewayctl");
        assert_eq!(output.status.signal(), Some(libc::SIGPIPE), "{command:?}");
        assert_eq!(String::from_utf8_lossy(&output.stderr), "", "{command:?}");
    }
}

#[test]
fn store_closed_to_other_users() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let store = dir.path().join("store");
    let (sql_id, _) = write_store(&store);

    let session = session_path(&store, &sql_id);
    assert_eq!(mode(&session), FILE_MODE, "{}", session.display());
    let mut dir_path = session.parent().expect("day directory");
    while dir_path != dir.path() {
        assert_eq!(mode(dir_path), DIR_MODE, "{}", dir_path.display());
        dir_path = dir_path.parent().expect("parent directory");
    }
    let segments = journal_segments(&store);
    assert!(!segments.is_empty(), "the journal has a segment");
    for segment in &segments {
        assert_eq!(mode(segment), FILE_MODE, "{}", segment.display());
    }
    assert_eq!(mode(&store.join("journal")), DIR_MODE);
}

/// Records written in several batches within one group-commit window cost one `fdatasync` of
/// their session file when the window closes, not one per batch.
#[test]
fn one_sync_per_file_and_window() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let config = RecordingConfig {
        group_commit: Duration::from_secs(10),
        ..config(&dir.path().join("store"))
    };
    let recorder = Recorder::open(&config, "node-a".into()).expect("open store");
    let client = "10.1.0.2:40000".parse().expect("address");
    let mut session = recorder
        .start(&Subject::default(), client, &target("postgres"))
        .expect("start session");
    let before = recorder.flush().expect("flush").session_syncs;
    for number in 0..5 {
        session
            .event(
                "sql.statement",
                json!({ "statement": format!("SELECT {number}") }),
            )
            .expect("record statement");
        // Longer than the writer's batching window, so each record is a write of its own.
        std::thread::sleep(Duration::from_millis(40));
    }
    let after = recorder.flush().expect("flush").session_syncs;
    assert_eq!(after - before, 1, "syncs of the one session file written");
    session.finish(&end()).expect("finish session");
    recorder.shutdown();
}

#[test]
fn short_retention_needs_force() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join("gatewayd.yaml");
    fs::write(
        &path,
        "proxy:\n  listen_v4: 127.0.0.1:15001\nrecording:\n  dir: /var/lib/gateway\n  retention_days: 30\n",
    )
    .expect("write config");
    let output = Command::new(env!("CARGO_BIN_EXE_gatewayd"))
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .expect("run gatewayd check");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("recording.retention_days"), "{stderr}");
    assert!(stderr.contains("force_short_retention"), "{stderr}");
}

/// Runs gatewayctl on `store` mounted read-only, in a mount namespace of its own.
fn gatewayctl_read_only(store: &Path, args: &[&str]) -> Output {
    Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-ec"])
        .arg(r#"mount --bind "$1" "$1"; mount -o remount,bind,ro "$1"; store=$1; shift; exec "$@""#)
        .arg("sh")
        .arg(store)
        .arg(GATEWAYCTL)
        .arg("sessions")
        .arg("--store")
        .arg(store)
        .args(args)
        .output()
        .expect("run gatewayctl in a mount namespace")
}

/// An archived copy on read-only media can be verified: the read that cannot be recorded is
/// named on stderr. Reads that show recorded content still reject such a store.
#[test]
fn read_only_store_verified_not_shown() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let store = dir.path().join("store");
    let (sql_id, _) = write_store(&store);
    let journal_before: Vec<Vec<u8>> = journal_segments(&store)
        .iter()
        .map(|path| fs::read(path).expect("journal segment"))
        .collect();

    let output = gatewayctl_read_only(&store, &["verify", "--all"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    assert!(
        stdout(&output).contains("PASS: 2 sessions"),
        "{}",
        stdout(&output)
    );
    assert!(stderr.contains("not recorded"), "{stderr}");
    assert!(stderr.contains("Read-only file system"), "{stderr}");

    let output = gatewayctl_read_only(&store, &["show", &sql_id]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("must be recorded"), "{stderr}");
    assert!(!contains(&output.stdout, "SELECT"), "nothing shown");

    let journal_after: Vec<Vec<u8>> = journal_segments(&store)
        .iter()
        .map(|path| fs::read(path).expect("journal segment"))
        .collect();
    assert_eq!(journal_before, journal_after, "the journal is unchanged");

    // The same store, writable again, records the verify.
    let (code, text) = verify(&store);
    assert_eq!(code, Some(0), "{text}");
    assert!(!text.contains("not recorded"), "{text}");
}

/// Sessions whose files could not be created have their records counted as lost in the
/// journal. `verify` notes them and does not report deleted files.
#[test]
fn sessions_never_written_are_noted() {
    let dir = tempfile::tempdir().expect("temporary directory");
    // 2026-01-15: a fixed day, so that the day directory's name is fixed too.
    let day = SystemTime::UNIX_EPOCH + Duration::from_secs(1_768_435_200);
    // With fail_mode open, sessions go on while their records are lost.
    let settings = RecordingConfig {
        fail_mode: gateway_user::config::FailMode::Open,
        ..config(dir.path())
    };
    let recorder = Recorder::open_with_clock(&settings, "node-a".into(), Arc::new(move || day))
        .expect("open store");
    // A file where the day's directory belongs makes every session file of that day fail.
    let blocker = dir.path().join("sessions").join("2026-01-15");
    fs::write(&blocker, b"").expect("block the day");
    // Past 1,024 sessions waiting for their files, the writer closes the others as they are.
    let mut ids = Vec::new();
    for _ in 0..1100 {
        let mut session = recorder
            .start(
                &Subject::default(),
                "10.1.0.2:40000".parse().expect("address"),
                &target("tcp"),
            )
            .expect("start");
        let _ = session.event("note", json!({ "text": "never written" }));
        ids.push(session.id.clone());
        let _ = session.finish(&end());
    }
    let _ = recorder.flush();
    recorder.shutdown();
    fs::remove_file(&blocker).expect("unblock the day");

    let journal: String = journal_segments(dir.path())
        .iter()
        .map(|path| fs::read_to_string(path).expect("journal segment"))
        .collect();
    let closed_lost = journal
        .lines()
        .filter(|line| line.contains("\"session.closed\"") && line.contains("\"lost\""))
        .count();
    assert!(closed_lost > 0, "no session closed with lost records");
    let (code, report) = verify(dir.path());
    assert_eq!(code, Some(0), "{report}");
    let noted = ids
        .iter()
        .filter(|id| report.contains(&format!("session {id} has no file")))
        .count();
    assert_eq!(noted, closed_lost);
    assert!(!report.contains("was deleted"));
}

/// With `fail_mode: closed`, a session file that cannot be created keeps the store failing,
/// although journal writes still succeed: the session's next event and new sessions are
/// refused until files can be created again.
#[test]
fn closed_mode_refuses_while_files_fail() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let day = SystemTime::UNIX_EPOCH + Duration::from_secs(1_768_435_200);
    let recorder =
        Recorder::open_with_clock(&config(dir.path()), "node-a".into(), Arc::new(move || day))
            .expect("open store");
    let blocker = dir.path().join("sessions").join("2026-01-15");
    fs::write(&blocker, b"").expect("block the day");
    let client = "10.1.0.2:40000".parse().expect("address");

    let mut first = recorder
        .start(&Subject::default(), client, &target("tcp"))
        .expect("the store is healthy until a write fails");
    let _ = recorder.flush();
    // Journal records (the session's `session.opened`, alerts) were written meanwhile.
    assert!(recorder.health().is_failing());
    assert!(first.event("note", json!({ "text": "x" })).is_err());
    assert!(
        recorder
            .start(&Subject::default(), client, &target("tcp"))
            .is_err()
    );
    std::thread::sleep(Duration::from_millis(1500));
    let _ = recorder.flush();
    assert!(
        recorder.health().is_failing(),
        "still failing while files fail"
    );

    fs::remove_file(&blocker).expect("unblock the day");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while recorder.health().is_failing() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        let _ = recorder.flush();
    }
    assert!(
        !recorder.health().is_failing(),
        "healthy once files can be created"
    );
    assert!(
        recorder
            .start(&Subject::default(), client, &target("tcp"))
            .is_ok()
    );
    recorder.shutdown();
}
