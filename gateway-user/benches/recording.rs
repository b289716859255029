//! Recording store figures: records per second through the writer with group commit, the
//! time a handler's `event` call takes (what recording adds to a proxied request), and
//! `verify` speed. The store is a temporary directory on the disk holding the system's temp
//! dir. Run with `cargo bench -p gateway-user --bench recording`; `cargo xtask bench` runs it.

use std::time::{Duration, Instant};

use gateway_user::{
    config::RecordingConfig,
    identity::Subject,
    record::{Outcome, Recorder, SessionEnd, TargetInfo, verify},
};
use serde_json::json;

/// Sessions writing at once.
const SESSIONS: usize = 16;
/// Records written in the throughput run.
const RECORDS: usize = 400_000;
/// Records timed one by one in the latency run, spread over a paced interval.
const LATENCY_RECORDS: usize = 50_000;

fn main() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let config = RecordingConfig {
        dir: dir.path().to_path_buf(),
        min_free_mib: 0,
        ..RecordingConfig::default()
    };
    let recorder = Recorder::open(&config, "bench-node".into())?;
    let target = TargetInfo {
        id: 0,
        name: "db".into(),
        class: "postgres".into(),
        addr: "10.96.0.20:5432".parse()?,
    };
    let client = "10.1.0.2:40000".parse()?;
    let mut sessions = (0..SESSIONS)
        .map(|_| recorder.start(&Subject::default(), client, &target))
        .collect::<Result<Vec<_>, _>>()?;
    recorder.flush()?;

    // Throughput: queue as fast as possible, then wait until all is written and synced. The
    // records' fields are built beforehand: building them is the handlers' work, not the
    // writer's.
    let fields: Vec<_> = (0..RECORDS)
        .map(|index| json!({ "text": "SELECT balance FROM accounts WHERE id = $1", "params": [index], "rows": 1, "decision": "allow" }))
        .collect();
    let started = Instant::now();
    for (index, fields) in fields.into_iter().enumerate() {
        sessions[index % SESSIONS].event("sql.statement", fields)?;
    }
    let queued = started.elapsed();
    let stats = recorder.flush()?;
    let elapsed = started.elapsed();
    println!(
        "writer throughput: {RECORDS} records in {:.2} s = {:.0} records/s ({} lost; queueing took {:.2} s)",
        elapsed.as_secs_f64(),
        RECORDS as f64 / elapsed.as_secs_f64(),
        stats.lost,
        queued.as_secs_f64()
    );

    // Latency: the cost of one `event` call while the writer works, paced at about 20,000
    // records per second, a busy node's rate.
    let mut durations = Vec::with_capacity(LATENCY_RECORDS);
    let pace = Duration::from_micros(50);
    let mut next = Instant::now();
    for index in 0..LATENCY_RECORDS {
        while Instant::now() < next {
            std::hint::spin_loop();
        }
        next += pace;
        let call = Instant::now();
        sessions[index % SESSIONS].event(
            "sql.statement",
            json!({ "text": "UPDATE accounts SET balance = balance - $1 WHERE id = $2", "params": [index, 7], "rows": 1, "decision": "allow" }),
        )?;
        durations.push(call.elapsed());
    }
    durations.sort();
    let percentile =
        |p: f64| durations[((durations.len() as f64 * p) as usize).min(durations.len() - 1)];
    println!(
        "event call: p50 {:.1} us, p99 {:.1} us, max {:.1} us",
        percentile(0.50).as_secs_f64() * 1e6,
        percentile(0.99).as_secs_f64() * 1e6,
        durations.last().copied().unwrap_or_default().as_secs_f64() * 1e6
    );

    for session in sessions {
        session.finish(&SessionEnd {
            outcome: Outcome::Closed,
            reason: None,
            bytes_from_client: 0,
            bytes_from_upstream: 0,
            duration: Duration::ZERO,
        })?;
    }
    recorder.shutdown();

    // Verify speed, with the files in the page cache as after a recent write.
    let key = gateway_user::record::signing::PublicKey::from_file(
        &dir.path().join(gateway_user::record::PUBLIC_KEY_FILE),
    )?;
    let started = Instant::now();
    let report = verify::verify_store(dir.path(), None, &key, |_, _| {})?;
    let elapsed = started.elapsed();
    anyhow::ensure!(report.passed(), "verify failed: {:?}", report.failures);
    println!(
        "verify: {:.1} MiB, {} records in {:.2} s = {:.0} MB/s",
        report.bytes as f64 / (1024.0 * 1024.0),
        report.records,
        elapsed.as_secs_f64(),
        report.bytes as f64 / 1e6 / elapsed.as_secs_f64()
    );
    Ok(())
}
