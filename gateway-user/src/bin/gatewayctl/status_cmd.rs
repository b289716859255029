//! `gatewayctl status`: what the pinned maps and links show, plus the daemon's own view from
//! its operations endpoint (`GET /status`).
//!
//! The pinned objects are read first, so they are printed even when the daemon is down. The
//! command then exits 1 and prints why the daemon could not be reached.

use std::{net::SocketAddr, path::PathBuf};

use anyhow::Context as _;
use clap::{Args, ValueEnum};
use gateway_user::{
    config::{Config, DEFAULT_BPFFS_DIR, DEFAULT_OPERATIONS_LISTEN},
    operations::{self, DaemonStatus},
    redirect::{self, MapFill, PinLayout, ProgramAttachment},
};
use serde::Serialize;

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Daemon configuration. Its `operations.listen` and `redirect.bpffs` become the defaults
    /// of --endpoint and --bpffs.
    #[arg(long, short, env = "GATEWAY_CONFIG")]
    config: Option<PathBuf>,
    /// Operations endpoint of the daemon, IP:PORT [default: 127.0.0.1:15021].
    #[arg(long)]
    endpoint: Option<SocketAddr>,
    /// Pin directory of the gateway's maps and links [default: /sys/fs/bpf/gateway].
    #[arg(long)]
    bpffs: Option<PathBuf>,
    /// Output format.
    #[arg(long, short, value_enum, default_value = "table")]
    output: OutputFormat,
    /// Print JSON, the same as `-o json`.
    #[arg(long, conflicts_with = "output")]
    json: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum OutputFormat {
    Table,
    Json,
}

/// The JSON output of `gatewayctl status`.
#[derive(Debug, Serialize)]
struct StatusReport {
    /// State of the pinned links and maps, read without the daemon.
    pinned: PinnedState,
    /// The daemon's status, absent when it could not be reached.
    daemon: Option<DaemonStatus>,
    /// Reason the daemon could not be reached.
    daemon_error: Option<String>,
    endpoint: SocketAddr,
}

#[derive(Debug, Serialize)]
struct PinnedState {
    bpffs: PathBuf,
    programs: Vec<ProgramAttachment>,
    maps: Vec<MapFill>,
    /// Connects redirected by the hook, from the `STATS` map.
    redirected: Option<u64>,
}

/// Runs `gatewayctl status` and returns false when the daemon could not be reached.
pub fn run(args: StatusArgs) -> anyhow::Result<bool> {
    let config = match &args.config {
        Some(path) => Some(Config::load(path)?),
        None => None,
    };
    let endpoint = match (args.endpoint, &config) {
        (Some(endpoint), _) => endpoint,
        (None, Some(config)) => config.operations.listen.with_context(|| {
            format!(
                "{} sets operations.listen: null, so the daemon serves no status; give \
                 --endpoint",
                args.config
                    .as_ref()
                    .map_or(String::new(), |path| path.display().to_string())
            )
        })?,
        (None, None) => DEFAULT_OPERATIONS_LISTEN,
    };
    let bpffs = args
        .bpffs
        .clone()
        .or_else(|| config.as_ref().map(|config| config.redirect.bpffs.clone()))
        .unwrap_or_else(|| PathBuf::from(DEFAULT_BPFFS_DIR));

    let pinned = read_pinned(bpffs);
    let (daemon, daemon_error) = match fetch_status(endpoint) {
        Ok(status) => (Some(status), None),
        Err(error) => (None, Some(format!("{error:#}"))),
    };
    let reachable = daemon.is_some();
    let report = StatusReport {
        pinned,
        daemon,
        daemon_error,
        endpoint,
    };

    if args.json || args.output == OutputFormat::Json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_table(&report);
    }
    if let Some(error) = &report.daemon_error {
        eprintln!("gatewayctl: daemon unreachable: {error}");
    }
    Ok(reachable)
}

fn read_pinned(bpffs: PathBuf) -> PinnedState {
    let pins = PinLayout::new(&bpffs);
    PinnedState {
        programs: redirect::check_attachments(&pins, None),
        maps: redirect::read_map_fills(&bpffs),
        redirected: redirect::read_stats(&bpffs).ok().map(|stats| {
            stats.get(gateway_common::Verdict::Redirected)
                + stats.get(gateway_common::Verdict::RedirectedStale)
        }),
        bpffs,
    }
}

fn fetch_status(endpoint: SocketAddr) -> anyhow::Result<DaemonStatus> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (code, body) = runtime.block_on(operations::fetch(endpoint, "/status"))?;
    anyhow::ensure!(
        code.is_success(),
        "GET /status on {endpoint} returned {code}: {}",
        body.trim()
    );
    serde_json::from_str(&body)
        .with_context(|| format!("GET /status on {endpoint} returned invalid JSON"))
}

fn print_table(report: &StatusReport) {
    let pinned = &report.pinned;
    println!("PINNED ({})", pinned.bpffs.display());
    println!(
        "  {:<14} {:<14} {:<9} {:<8} {:<8} PROBLEM",
        "PROGRAM", "HOOK", "ATTACHED", "LINK", "PROG"
    );
    for program in &pinned.programs {
        println!(
            "  {:<14} {:<14} {:<9} {:<8} {:<8} {}",
            program.program,
            program.hook,
            yes_no(program.attached),
            optional(program.link_id),
            optional(program.program_id),
            program.problem.as_deref().unwrap_or("")
        );
    }
    println!("  {:<14} {:<10} {:<10} ERROR", "MAP", "ENTRIES", "CAPACITY");
    for map in &pinned.maps {
        println!(
            "  {:<14} {:<10} {:<10} {}",
            map.name,
            optional(map.entries),
            optional(map.capacity),
            map.error.as_deref().unwrap_or("")
        );
    }
    println!("  redirected connects: {}", optional(pinned.redirected));

    let Some(daemon) = &report.daemon else {
        println!("\nDAEMON ({}): unreachable", report.endpoint);
        return;
    };
    println!("\nDAEMON ({})", report.endpoint);
    println!("  node:       {}", daemon.node);
    println!(
        "  version:    {} (pid {}, up {} s)",
        daemon.version, daemon.pid, daemon.uptime_seconds
    );
    println!("  ready:      {}", yes_no(daemon.ready));
    for check in &daemon.checks {
        let state = if check.ok { "ok" } else { "FAILED" };
        println!(
            "    {:<14} {:<7} {}",
            check.name,
            state,
            check.detail.as_deref().unwrap_or("")
        );
    }
    println!("  cgroup:     {}", daemon.cgroup.display());
    println!(
        "  heartbeat:  {} (interval {} ms, timeout {} ms)",
        daemon
            .heartbeat
            .age_ms
            .map_or_else(|| "expired".to_string(), |age| format!("{age} ms old")),
        daemon.heartbeat.interval_ms,
        daemon.heartbeat.timeout_ms
    );
    println!(
        "  fail modes: redirect {}, recording {}",
        daemon.fail_modes.redirect, daemon.fail_modes.recording
    );
    let policy = &daemon.policy;
    println!(
        "  policy:     generation {}, {} policies, {} rules from {}{}",
        policy.generation,
        policy.policies,
        policy.rules,
        policy.path.as_ref().map_or_else(
            || "sql_rules".to_string(),
            |path| path.display().to_string()
        ),
        policy
            .reload_error
            .as_ref()
            .map_or_else(String::new, |error| format!(" (reload failed: {error})"))
    );
    let recorder = &daemon.recorder;
    println!(
        "  recorder:   {} in {}, queue {} records, lag {:.3} s{}",
        if recorder.failing || !recorder.writer_running {
            "FAILING"
        } else {
            "writing"
        },
        recorder.dir.display(),
        recorder.queue_depth,
        recorder.lag_seconds,
        recorder
            .reason
            .as_ref()
            .map_or_else(String::new, |reason| format!(": {reason}"))
    );
    println!("  approvals:  {} pending", daemon.approvals_pending);
    println!("  {:<24} {:<10} ADDRESSES", "TARGET", "CLASS");
    for target in &daemon.targets {
        let addresses: Vec<String> = target.addresses.iter().map(ToString::to_string).collect();
        let addresses = if addresses.is_empty() {
            "none yet".to_string()
        } else {
            addresses.join(", ")
        };
        println!("  {:<24} {:<10} {addresses}", target.name, target.class);
    }
}

fn yes_no(value: bool) -> &'static str {
    if value { "yes" } else { "no" }
}

fn optional<T: std::fmt::Display>(value: Option<T>) -> String {
    value.map_or_else(|| "-".to_string(), |value| value.to_string())
}
