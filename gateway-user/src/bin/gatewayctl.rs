//! `gatewayctl`: the operator's view of a node.
//!
//! - `gatewayctl stats` prints the connect hook's verdict counters from the pinned maps.
//! - `gatewayctl status` prints the attached programs, the maps' fill and the daemon's state.
//! - `gatewayctl sessions list | show | replay | export | verify` reads and verifies the
//!   recordings.
//! - `gatewayctl policy check PATH` validates AccessPolicy files; `gatewayctl policy test`
//!   decides a described request without traffic.
//! - `gatewayctl cert issue` makes a serving certificate for a `kube_api` target from the
//!   cluster CA.
//! - `gatewayctl approvals list | approve ID | deny ID --reason TEXT` answers held requests on
//!   the daemon's approvals socket.

#[path = "gatewayctl/policy_cmd.rs"]
mod policy_cmd;
#[path = "gatewayctl/status_cmd.rs"]
mod status_cmd;

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use gateway_common::Verdict;
use gateway_user::{
    cli::sessions::SessionsArgs,
    config::{DEFAULT_APPROVAL_SOCKET, DEFAULT_BPFFS_DIR},
    redirect,
};

#[derive(Debug, Parser)]
#[command(name = "gatewayctl", version, about = "Inspect a node gateway")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print how many connects the hook redirected or let pass, by reason.
    Stats {
        /// Pin directory of the gateway's maps.
        #[arg(long, default_value = DEFAULT_BPFFS_DIR)]
        bpffs: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show the attached programs, pinned maps, heartbeat, fail modes, policy and recorder.
    /// Exits 1 when the daemon's operations endpoint cannot be reached.
    Status(status_cmd::StatusArgs),
    /// List, show, replay, export and verify session recordings.
    Sessions(SessionsArgs),
    /// Validate AccessPolicy files or decide a described request.
    #[command(subcommand)]
    Policy(policy_cmd::PolicyCommand),
    /// List and answer requests held for review.
    Approvals {
        /// The daemon's approvals socket (`approvals.socket` in its configuration).
        #[arg(long, env = "GATEWAY_APPROVAL_SOCKET", default_value = DEFAULT_APPROVAL_SOCKET, global = true)]
        socket: PathBuf,
        #[command(subcommand)]
        command: policy_cmd::ApprovalsCommand,
    },
    /// Manage serving certificates.
    #[command(subcommand)]
    Cert(CertCommand),
}

#[derive(Debug, Subcommand)]
enum CertCommand {
    /// Issue a serving certificate for the API server's names and addresses, signed by the
    /// cluster CA, so the gateway can terminate the TLS of pods that trust that CA.
    Issue {
        /// PEM certificate of the cluster CA (kubeadm: /etc/kubernetes/pki/ca.crt).
        #[arg(long)]
        ca_cert: PathBuf,
        /// PEM PKCS#8 private key of the cluster CA.
        #[arg(long)]
        ca_key: PathBuf,
        /// DNS name or IP address to certify; repeat for each (kubernetes.default.svc,
        /// the Service ClusterIP, ...).
        #[arg(long = "san", required = true)]
        sans: Vec<String>,
        /// Where to write the certificate (PEM).
        #[arg(long)]
        out_cert: PathBuf,
        /// Where to write the new private key (PEM, mode 0600).
        #[arg(long)]
        out_key: PathBuf,
        /// Validity in days.
        #[arg(long, default_value_t = gateway_user::cert::DEFAULT_VALIDITY_DAYS)]
        days: u32,
        /// Replace existing output files.
        #[arg(long)]
        force: bool,
    },
}

const VERDICTS: [(Verdict, &str); 10] = [
    (Verdict::Redirected, "redirected"),
    (Verdict::RedirectedStale, "redirected_stale_heartbeat"),
    (Verdict::PassNotTarget, "pass_not_target"),
    (Verdict::PassHostNetns, "pass_host_netns"),
    (Verdict::PassMarked, "pass_marked"),
    (Verdict::PassExcludedCgroup, "pass_excluded_cgroup"),
    (Verdict::PassAlreadyProxy, "pass_already_proxy"),
    (Verdict::PassStaleHeartbeat, "pass_stale_heartbeat"),
    (Verdict::PassDisabled, "pass_disabled"),
    (Verdict::PassNotTcp, "pass_not_tcp"),
];

fn main() -> ExitCode {
    // A reader of the output that goes away (`gatewayctl ... | head`) ends the process with
    // SIGPIPE, so a pipeline under `set -o pipefail` does not take a cut-off report for a
    // finished one.
    gateway_user::sys::default_sigpipe();
    let cli = Cli::parse();
    match run(cli.command) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(error) => {
            eprintln!("gatewayctl: {error:#}");
            ExitCode::from(2)
        }
    }
}

/// Runs a command; returns false when it ran but its check failed (`sessions verify`,
/// `policy check`, `status` with the daemon unreachable). Exit status: 0 success, 1 check
/// failed, 2 error.
fn run(command: Command) -> anyhow::Result<bool> {
    match command {
        Command::Sessions(args) => gateway_user::cli::sessions::run(args),
        Command::Status(args) => status_cmd::run(args),
        Command::Stats { bpffs, json } => {
            let stats = redirect::read_stats(&bpffs)?;
            if json {
                let object: serde_json::Map<String, serde_json::Value> = VERDICTS
                    .iter()
                    .map(|(verdict, name)| ((*name).to_string(), stats.get(*verdict).into()))
                    .collect();
                println!("{}", serde_json::Value::Object(object));
            } else {
                for (verdict, name) in VERDICTS {
                    println!("{name:<28} {}", stats.get(verdict));
                }
            }
            Ok(true)
        }
        Command::Policy(command) => {
            // An invalid policy is what `policy check` looks for: exit 1, like a failed verify.
            let checking = matches!(command, policy_cmd::PolicyCommand::Check { .. });
            match policy_cmd::run_policy(command) {
                Ok(()) => Ok(true),
                Err(error) if checking => {
                    eprintln!("gatewayctl: {error:#}");
                    Ok(false)
                }
                Err(error) => Err(error),
            }
        }
        Command::Approvals { socket, command } => {
            policy_cmd::run_approvals(&socket, command).map(|()| true)
        }
        Command::Cert(CertCommand::Issue {
            ca_cert,
            ca_key,
            sans,
            out_cert,
            out_key,
            days,
            force,
        }) => {
            gateway_user::cert::issue(&gateway_user::cert::IssueRequest {
                ca_cert: &ca_cert,
                ca_key: &ca_key,
                sans: &sans,
                out_cert: &out_cert,
                out_key: &out_key,
                validity_days: days,
                overwrite: force,
            })?;
            println!("wrote {} and {}", out_cert.display(), out_key.display());
            Ok(true)
        }
    }
}
