//! `gatewayctl`: the operator's view of a node. `gatewayctl stats` prints the connect hook's
//! verdict counters from the pinned maps; `gatewayctl cert issue` makes a serving certificate
//! for a `kube_api` target from the cluster CA.

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use gateway_common::Verdict;
use gateway_user::{config::DEFAULT_BPFFS_DIR, redirect};

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
    let cli = Cli::parse();
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("gatewayctl: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(command: Command) -> anyhow::Result<()> {
    match command {
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
            Ok(())
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
            Ok(())
        }
    }
}
