//! `gatewayd`: the node daemon.
//!
//! - `gatewayd run --config FILE` attaches the redirect programs and runs the proxy.
//! - `gatewayd check` validates a configuration and probes the kernel, changing nothing.
//! - `gatewayd uninstall` detaches the programs and removes their pins.

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use gateway_user::{config::Config, daemon, redirect};
use tracing_subscriber::EnvFilter;

#[derive(Debug, Parser)]
#[command(
    name = "gatewayd",
    version,
    about = "Node gateway daemon: eBPF redirect, proxy and session recording"
)]
struct Cli {
    /// Log format on stderr.
    #[arg(long, value_enum, default_value = "text", global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Attach the redirect programs and run the proxy until SIGTERM.
    Run {
        /// Configuration file (YAML).
        #[arg(long, short, env = "GATEWAY_CONFIG")]
        config: PathBuf,
        /// File to create once the daemon is ready; it contains the daemon's pid.
        #[arg(long)]
        ready_file: Option<PathBuf>,
    },
    /// Validate a configuration and probe the kernel, changing nothing.
    Check {
        /// Configuration file (YAML).
        #[arg(long, short, env = "GATEWAY_CONFIG")]
        config: PathBuf,
    },
    /// Detach the redirect programs and remove their pinned links and maps.
    Uninstall {
        /// Configuration file; its `redirect.bpffs` names the pin directory.
        #[arg(long, short, env = "GATEWAY_CONFIG", conflicts_with = "bpffs")]
        config: Option<PathBuf>,
        /// Pin directory, when no configuration file is at hand.
        #[arg(long)]
        bpffs: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("gatewayd: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Run { config, ready_file } => {
            let config = Config::load(&config)?;
            let mut runtime = tokio::runtime::Builder::new_multi_thread();
            if let Some(threads) = config.proxy.worker_threads {
                runtime.worker_threads(threads);
            }
            let runtime = runtime.enable_all().build()?;
            runtime.block_on(daemon::run(config, daemon::RunOptions { ready_file }))
        }
        Command::Check { config } => {
            let config = Config::load(&config)?;
            let policy_summary = match &config.policy.path {
                Some(path) => {
                    let policy = gateway_user::policy::load_path(path)?;
                    format!(
                        "{} polic{} with {} rule(s) from {}",
                        policy.sources().len(),
                        if policy.sources().len() == 1 {
                            "y"
                        } else {
                            "ies"
                        },
                        policy.rule_count(),
                        path.display()
                    )
                }
                None => format!("{} sql_rules entries", config.sql_rules.len()),
            };
            let mounts =
                gateway_user::cgroup::find_mounts(std::path::Path::new(redirect::MOUNTINFO))?;
            let cgroup = redirect::configured_cgroup(&mounts, &config)?;
            gateway_user::proxy::load_target_tls(&config)?;
            redirect::probe_kernel()?;
            println!("configuration valid: {} target(s)", config.targets.len());
            println!("access policy: {policy_summary}");
            println!("cgroup2 mount: {}", mounts.unified.display());
            if !mounts.v1.is_empty() {
                println!(
                    "warning: hybrid cgroup host ({} cgroup v1 mounts beside cgroup2)",
                    mounts.v1.len()
                );
            }
            println!("attach cgroup: {}", cgroup.display());
            let needed = daemon::open_files_needed(config.proxy.max_connections);
            if let Ok(limit) = gateway_user::sys::nofile_hard_limit()
                && limit < needed
            {
                println!(
                    "warning: the open files limit here is {limit}, below the {needed} that proxy.max_connections ({}) sessions need; lower proxy.max_connections or raise the limit",
                    config.proxy.max_connections
                );
            }
            println!("kernel: all needed eBPF program types, maps and helpers are available");
            let follows_services = config.targets.iter().any(|target| target.service.is_some());
            let in_pod = std::env::var_os("KUBERNETES_SERVICE_HOST").is_some();
            if follows_services && config.identity.kubeconfig.is_none() && !in_pod {
                println!(
                    "warning: service targets read their addresses from the API server, but \
                     identity.kubeconfig is not set and this is not a pod (KUBERNETES_SERVICE_HOST \
                     is unset): `run` will fail to start"
                );
            }
            Ok(())
        }
        Command::Uninstall { config, bpffs } => {
            let dir = match (config, bpffs) {
                (Some(config), _) => Config::load(&config)?.redirect.bpffs,
                (None, Some(dir)) => dir,
                (None, None) => PathBuf::from(gateway_user::config::DEFAULT_BPFFS_DIR),
            };
            if !dir.exists() {
                println!("nothing to remove: {} does not exist", dir.display());
                return Ok(());
            }
            let removed = redirect::uninstall(&dir)?;
            println!(
                "removed {} link(s) and {} map(s) from {}",
                removed.links.len(),
                removed.maps.len(),
                dir.display()
            );
            Ok(())
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_env("GATEWAY_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}
