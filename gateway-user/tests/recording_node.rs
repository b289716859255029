//! The recording store under a real `gatewayd` on a test node: a crash during heavy traffic,
//! a full disk in both recording fail modes, and a clear-text PAN search over a whole run's
//! store. Needs root; run with `cargo xtask test`.

use std::{
    fs,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use gateway_user::testing::{ChildGuard, Pod, Postgres, TestNode};
use serde_json::Value;

const GATEWAYD: &str = env!("CARGO_BIN_EXE_gatewayd");
const GATEWAYCTL: &str = env!("CARGO_BIN_EXE_gatewayctl");
const TESTPEER: &str = env!("CARGO_BIN_EXE_gateway-testpeer");
const ECHO_PORT: u16 = 7000;

/// A tmpfs mounted for the test's store, unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(path: &Path, size: &str) -> Self {
        fs::create_dir_all(path).expect("create mount point");
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(path)
            .status()
            .expect("run mount");
        assert!(status.success(), "mount tmpfs at {}", path.display());
        Self(path.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Replaces the `recording:` section the test node writes with `dir` plus `extra` settings.
fn set_recording(config: &Path, dir: &Path, extra: &str) {
    let text = fs::read_to_string(config).expect("read config");
    let old = format!("recording:\n  dir: {}\n", dir.display());
    assert!(
        text.contains(&old),
        "config has no recording section: {text}"
    );
    let new = format!("recording:\n  dir: {}\n{extra}", dir.display());
    fs::write(config, text.replace(&old, &new)).expect("write config");
}

fn verify(store: &Path) -> Output {
    Command::new(GATEWAYCTL)
        .args(["sessions", "--store"])
        .arg(store)
        .args(["verify", "--all"])
        .output()
        .expect("run gatewayctl verify")
}

fn journal_records(store: &Path) -> Vec<Value> {
    let mut paths: Vec<PathBuf> = fs::read_dir(store.join("journal"))
        .expect("journal dir")
        .flatten()
        .map(|entry| entry.path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "jsonl"))
        .collect();
    paths.sort();
    paths
        .iter()
        .flat_map(|path| {
            let text = fs::read_to_string(path).expect("read journal");
            text.lines()
                .filter_map(|line| serde_json::from_str::<Value>(line).ok())
                .collect::<Vec<_>>()
        })
        .collect()
}

fn echo_client(node: &TestNode, pod: &Pod, addr: SocketAddr) -> Output {
    node.in_pod(pod, TESTPEER)
        .args([
            "client",
            "--greet",
            "--connect",
            &addr.to_string(),
            "--bytes",
            "64",
        ])
        .stdin(Stdio::null())
        .output()
        .expect("run test client")
}

fn wait_until(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn crash_mid_traffic_keeps_store_verifiable() {
    let node = TestNode::new("crash_mid_traffic_keeps_store_verifiable");
    let mut node = node;
    let pod = node.add_pod("client");
    let server = node.add_server("echo", &[]);
    let target = SocketAddr::new(server.addr_v4.into(), ECHO_PORT);
    let _echo = ChildGuard(node.start_echo(Path::new(TESTPEER), &server, &[target]));
    let targets = format!(
        "  - name: echo\n    address: '{}'\n    port: {ECHO_PORT}\n    class: tcp\n",
        target.ip()
    );
    let config = node.daemon_config("gatewayd.yaml", "", &targets);
    let store = node.recordings();

    let daemon = node.start_daemon(Path::new(GATEWAYD), &config, None);
    let loops: Vec<ChildGuard> = (0..2)
        .map(|_| {
            ChildGuard(
                node.in_pod(&pod, TESTPEER)
                    .args([
                        "connect-loop",
                        "--connect",
                        &target.to_string(),
                        "--count",
                        "1000000",
                    ])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .expect("spawn connect loop"),
            )
        })
        .collect();
    // A count, not a rate: on a loaded machine the loops are slow, and any crash mid-traffic
    // will do.
    wait_until("sessions to be recorded", Duration::from_secs(90), || {
        node.session_files().len() >= 50
    });
    daemon.kill();
    drop(loops);

    let daemon = node.start_daemon(Path::new(GATEWAYD), &config, None);
    let output = echo_client(&node, &pod, target);
    assert!(output.status.success(), "client after restart: {output:?}");
    let status = daemon.stop();
    assert!(status.success(), "gatewayd exit: {status}");

    let report = verify(&store);
    let text = String::from_utf8_lossy(&report.stdout);
    assert_eq!(report.status.code(), Some(0), "{text}");
    assert!(!text.contains("FAIL  "), "{text}");

    let journal = journal_records(&store);
    let starts: Vec<&Value> = journal
        .iter()
        .filter(|record| record["event"] == "journal.start" && record["reason"] == "daemon_start")
        .collect();
    assert_eq!(starts.len(), 2, "one journal segment per daemon run");
    assert_eq!(starts[1]["previous"]["segment"], starts[0]["segment"]);
    let opened = journal
        .iter()
        .filter(|r| r["event"] == "session.opened")
        .count();
    let ended = journal
        .iter()
        .filter(|r| r["event"] == "session.closed" || r["event"] == "session.abandoned")
        .count();
    assert_eq!(
        opened, ended,
        "every session the crash cut off is accounted for"
    );
    assert!(opened >= 51, "{opened} sessions");
}

/// A test node with PostgreSQL as a target and the store on a small tmpfs.
struct DiskSetup {
    postgres: Postgres,
    pod: Pod,
    store: PathBuf,
    config: PathBuf,
    _tmpfs: Tmpfs,
    node: TestNode,
}

fn disk_setup(test_name: &str, fail_mode: &str) -> DiskSetup {
    let mut node = TestNode::new(test_name);
    let pod = node.add_pod("app");
    let server = node.add_server("db", &[]);
    let postgres = node.start_postgres(&server);
    let store = node.dir.join("small-store");
    let tmpfs = Tmpfs::mount(&store, "4m");
    node.set_recordings(store.clone());
    let targets = format!(
        "  - name: payments-db\n    address: {}\n    port: 5432\n    class: postgres\n",
        postgres.addr.ip()
    );
    let config = node.daemon_config("gatewayd.yaml", "", &targets);
    let mut text = fs::read_to_string(&config).expect("read config");
    text.push_str("sql_rules:\n  - name: no-drop\n    statement_kinds: [drop]\n");
    fs::write(&config, text).expect("write config");
    set_recording(
        &config,
        &store,
        &format!("  fail_mode: {fail_mode}\n  min_free_mib: 1\n"),
    );
    DiskSetup {
        postgres,
        pod,
        store,
        config,
        _tmpfs: tmpfs,
        node,
    }
}

impl DiskSetup {
    fn psql(&self, sql: &str) -> Output {
        let conninfo = format!(
            "host={} port=5432 user=postgres dbname=postgres sslmode=disable connect_timeout=10",
            self.postgres.addr.ip()
        );
        self.node
            .in_pod(&self.pod, self.postgres.bin_dir.join("psql"))
            .args([&conninfo, "-X", "-A", "-t", "-c", sql])
            .env("PGPASSWORD", gateway_user::testing::POSTGRES_PASSWORD)
            .stdin(Stdio::null())
            .output()
            .expect("run psql")
    }

    /// Fills the store's tmpfs until `leave` bytes are free (at most).
    fn fill(&self, leave: u64) -> PathBuf {
        let path = self.store.join("filler");
        let free = gateway_user::sys::available_bytes(&self.store).expect("statvfs");
        let size = free.saturating_sub(leave);
        let mut file = fs::File::create(&path).expect("create filler");
        let block = vec![0u8; 64 * 1024];
        let mut written = 0;
        while written < size {
            let chunk = block.len().min((size - written) as usize);
            if std::io::Write::write_all(&mut file, &block[..chunk]).is_err() {
                break;
            }
            written += chunk as u64;
        }
        path
    }
}

#[test]
fn disk_full_closed_refuses_then_resumes() {
    let setup = disk_setup("disk_full_closed_refuses_then_resumes", "closed");
    let daemon = setup
        .node
        .start_daemon(Path::new(GATEWAYD), &setup.config, None);
    let output = setup.psql("SELECT 1");
    assert!(
        output.status.success(),
        "psql before the disk fills: {output:?}"
    );

    // A session open when the store starts failing must end rather than run unrecorded.
    let conninfo = format!(
        "host={} port=5432 user=postgres dbname=postgres sslmode=disable",
        setup.postgres.addr.ip()
    );
    let mut sleeper = ChildGuard(
        setup
            .node
            .in_pod(&setup.pod, setup.postgres.bin_dir.join("psql"))
            .args([&conninfo, "-X", "-c", "SELECT pg_sleep(120)"])
            .env("PGPASSWORD", gateway_user::testing::POSTGRES_PASSWORD)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn psql"),
    );
    wait_until("the long query to run", Duration::from_secs(10), || {
        setup
            .postgres
            .admin_sql("SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'SELECT pg_sleep%'")
            .trim()
            == "1"
    });

    let filler = setup.fill(256 * 1024);
    let mut sleeper_status = None;
    wait_until("the open session to end", Duration::from_secs(15), || {
        sleeper_status = sleeper.0.try_wait().expect("poll psql");
        sleeper_status.is_some()
    });
    assert!(
        !sleeper_status.expect("psql exited").success(),
        "the long query must not complete"
    );
    let mut refusal = String::new();
    wait_until(
        "new sessions to be refused",
        Duration::from_secs(10),
        || {
            let output = setup.psql("SELECT 1");
            refusal = String::from_utf8_lossy(&output.stderr).into_owned();
            !output.status.success()
        },
    );
    assert!(
        refusal.contains("the node gateway cannot record this session"),
        "psql must print the gateway's reason: {refusal}"
    );
    assert!(refusal.contains("low disk space"), "{refusal}");

    fs::remove_file(&filler).expect("remove filler");
    wait_until(
        "sessions to be accepted again",
        Duration::from_secs(10),
        || setup.psql("SELECT 1").status.success(),
    );
    daemon.stop();

    let ended: Vec<Value> = setup
        .node
        .sessions()
        .into_iter()
        .flatten()
        .filter(|record| record["event"] == "session.end")
        .collect();
    let cut: Vec<&Value> = ended
        .iter()
        .filter(|end| end["outcome"] == "recording_failed")
        .collect();
    assert_eq!(
        cut.len(),
        1,
        "the open session's end names the reason: {ended:#?}"
    );
    assert!(
        cut[0]["reason"]
            .as_str()
            .is_some_and(|reason| reason.contains("low disk space")),
        "{cut:#?}"
    );

    let journal = journal_records(&setup.store);
    let alerts: Vec<&str> = journal
        .iter()
        .filter(|record| record["event"] == "alert")
        .filter_map(|record| record["kind"].as_str())
        .collect();
    assert_eq!(alerts, ["disk_low", "recording_resumed"]);
    let report = verify(&setup.store);
    assert_eq!(
        report.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&report.stdout)
    );
}

#[test]
fn disk_full_open_keeps_traffic() {
    let setup = disk_setup("disk_full_open_keeps_traffic", "open");
    let daemon = setup
        .node
        .start_daemon(Path::new(GATEWAYD), &setup.config, None);
    let filler = setup.fill(0);

    // With no space at all, queries keep working; their records are lost and counted.
    for round in 0..5 {
        let output = setup.psql("SELECT 'still served'");
        assert!(
            output.status.success(),
            "psql round {round} on a full disk: {output:?}"
        );
        assert_eq!(
            String::from_utf8_lossy(&output.stdout).trim(),
            "still served"
        );
    }

    fs::remove_file(&filler).expect("remove filler");
    wait_until(
        "the alert to reach the journal",
        Duration::from_secs(10),
        || {
            journal_records(&setup.store)
                .iter()
                .any(|record| record["event"] == "alert" && record["kind"] == "recording_resumed")
        },
    );
    let output = setup.psql("SELECT 1");
    assert!(
        output.status.success(),
        "psql after space returns: {output:?}"
    );
    daemon.stop();

    let journal = journal_records(&setup.store);
    let kinds: Vec<&str> = journal
        .iter()
        .filter(|record| record["event"] == "alert")
        .filter_map(|record| record["kind"].as_str())
        .collect();
    assert!(
        kinds.contains(&"disk_low") || kinds.contains(&"recording_failed"),
        "the full disk raised an alert: {kinds:?}"
    );
    let report = verify(&setup.store);
    assert_eq!(
        report.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&report.stdout)
    );
}

/// Every file under `dir`, decompressed where compressed, as one buffer.
fn read_tree(dir: &Path) -> Vec<u8> {
    let mut bytes = Vec::new();
    for entry in fs::read_dir(dir).expect("read dir").flatten() {
        let path = entry.path();
        if path.is_dir() {
            bytes.extend(read_tree(&path));
        } else if let Ok(data) = fs::read(&path) {
            if path.extension().is_some_and(|ext| ext == "zst") {
                bytes.extend(zstd::stream::decode_all(&data[..]).expect("zstd file"));
            } else {
                bytes.extend(data);
            }
        }
    }
    bytes
}

#[test]
fn real_sessions_read_back_without_pans() {
    let setup = disk_setup("real_sessions_read_back_without_pans", "closed");
    let daemon = setup
        .node
        .start_daemon(Path::new(GATEWAYD), &setup.config, None);
    let pans = [
        "4111111111111111",
        "4111-1111-1111-1111",
        "5555 5555 5555 4444",
        "2221000000000009",
    ];
    let statements = [
        "CREATE TABLE cards (id int, pan text)".to_string(),
        format!(
            "INSERT INTO cards VALUES (1, '{}'), (2, '{}')",
            pans[0], pans[1]
        ),
        "SELECT pan FROM cards ORDER BY id".to_string(),
        format!("DO $$ BEGIN RAISE NOTICE 'card {}'; END $$", pans[2]),
        format!("SELECT 1/0 AS \"{}\"", pans[3]),
        "DROP TABLE cards".to_string(),
    ];
    for statement in &statements {
        let output = setup.psql(statement);
        let denied = statement.starts_with("DROP") || statement.contains("1/0");
        assert_eq!(
            output.status.success(),
            !denied,
            "{statement}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let rows = setup.psql("SELECT pan FROM cards ORDER BY id");
    assert_eq!(
        String::from_utf8_lossy(&rows.stdout).trim(),
        "411111******1111\n4111-11**-****-1111",
        "the client sees masked rows"
    );
    let log = daemon.log();
    daemon.stop();

    let store = read_tree(&setup.store);
    for pan in pans {
        let digits: String = pan.chars().filter(char::is_ascii_digit).collect();
        for form in [pan, digits.as_str()] {
            assert!(
                !store
                    .windows(form.len())
                    .any(|window| window == form.as_bytes()),
                "{form} reached the store in clear"
            );
            assert!(
                !log.contains(form),
                "{form} reached the daemon log in clear"
            );
        }
    }

    let gatewayctl = |args: &[&str]| {
        Command::new(GATEWAYCTL)
            .args(["sessions", "--store"])
            .arg(&setup.store)
            .args(args)
            .output()
            .expect("run gatewayctl")
    };
    let list = gatewayctl(&["list", "--json", "--target", "postgres"]);
    let rows: Vec<Value> = String::from_utf8_lossy(&list.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).expect("JSON row"))
        .collect();
    assert_eq!(rows.len(), statements.len() + 1, "one session per psql run");
    assert!(
        rows.iter().all(|row| row["outcome"] == "closed"),
        "{rows:#?}"
    );
    let denied: u64 = rows.iter().filter_map(|row| row["denied"].as_u64()).sum();
    assert_eq!(denied, 1, "the DROP is denied by the rule: {rows:#?}");

    let insert = rows[1]["id"].as_str().expect("session id");
    let transcript = gatewayctl(&["replay", insert]);
    let text = String::from_utf8_lossy(&transcript.stdout);
    assert!(
        text.contains(
            "INSERT INTO cards VALUES (1, '411111******1111'), (2, '4111-11**-****-1111')"
        ),
        "{text}"
    );
    let report = verify(&setup.store);
    assert_eq!(
        report.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&report.stdout)
    );
}
