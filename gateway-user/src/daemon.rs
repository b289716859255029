//! The daemon's life cycle: start the redirect, bind the proxy and the operations endpoint,
//! keep the heartbeat going, attach programs again that were detached from outside, and stop
//! cleanly.
//!
//! Signals: SIGTERM and SIGINT start a graceful stop. The proxy stops accepting, drains open
//! sessions until `proxy.drain_timeout`, then closes the rest. A second signal during the drain
//! stops at once.
//! The eBPF programs stay attached across a stop, so a restarted daemon takes over without a
//! gap. With `fail_mode: open` a graceful stop expires the heartbeat, so new connects go direct
//! at once rather than into a closed port.

use std::{collections::HashMap, path::PathBuf, sync::Arc};

use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::{
    approval::Broker,
    config::{Config, FailMode},
    identity::Identity,
    operations::{
        OperationsState,
        metrics::{ErrorKind, metrics},
    },
    policy::{PolicyStore, policy_from_sql_rules},
    proxy::Proxy,
    record::Recorder,
    redirect::{ProgramAttachment, Redirect},
};

/// Options of `gatewayd run` beyond the configuration file.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// File created once the programs are attached and the proxy listens, for supervisors and
    /// tests that need to wait for readiness.
    pub ready_file: Option<PathBuf>,
}

/// Returns the open files `max_connections` sessions may need: two sockets, two pipes of the
/// byte relay and a recording file each, and a reserve for the daemon's own files.
pub fn open_files_needed(max_connections: usize) -> u64 {
    (max_connections as u64)
        .saturating_mul(5)
        .saturating_add(1024)
}

/// Runs the daemon until SIGTERM or SIGINT.
pub async fn run(config: Config, options: RunOptions) -> anyhow::Result<()> {
    let config = Arc::new(config);
    match crate::sys::raise_nofile_limit() {
        Ok(limit) => {
            info!(open_files_limit = limit, "raised the open files limit");
            let needed = open_files_needed(config.proxy.max_connections);
            if limit < needed {
                warn!(
                    open_files_limit = limit,
                    max_connections = config.proxy.max_connections,
                    needed,
                    "the open files limit is below what proxy.max_connections sessions may need (up to 5 each: two sockets, two relay pipes, a recording file); once it is reached, new connections and recordings fail. Lower proxy.max_connections or raise the limit (LimitNOFILE, the container runtime's nofile ulimit)"
                );
            }
        }
        Err(error) => warn!(%error, "failed to raise the open files limit"),
    }
    // A DaemonSet passes the node's name through the downward API as NODE_NAME.
    let node = config
        .node_name
        .clone()
        .or_else(|| {
            std::env::var("NODE_NAME")
                .ok()
                .filter(|name| !name.is_empty())
        })
        .unwrap_or_else(hostname);

    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;

    let target_tls = crate::proxy::load_target_tls(&config)?;
    // Policy errors stop the start before anything is attached.
    let (access, access_tasks) = start_access(&config)?;
    let redirect = {
        let config = Arc::clone(&config);
        tokio::task::spawn_blocking(move || Redirect::start(&config)).await??
    };
    let redirect = Arc::new(redirect);
    let identity = match &config.identity.static_file {
        Some(path) => Identity::with_static_file(
            redirect.mounts.unified.clone(),
            redirect.cgroup.clone(),
            path,
        )?,
        None => Identity::new(redirect.mounts.unified.clone(), redirect.cgroup.clone()),
    };
    let mut identity = identity;
    if config.identity.cluster {
        let settings = crate::identity::cluster::ClusterSettings {
            kubeconfig: config.identity.kubeconfig.clone(),
            node: node.clone(),
        };
        let cache = crate::identity::cluster::start(&settings).await?;
        identity.set_cluster(cache, config.identity.wait);
        info!(node = %node, "watching this node's pods for subject identities");
    }
    let identity = Arc::new(identity);
    if config.targets.iter().any(|target| target.service.is_some()) {
        let client =
            crate::identity::cluster::client(config.identity.kubeconfig.as_deref()).await?;
        let services = crate::targets::start(&config, &client, &redirect);
        info!(services, "following Service targets in the cluster");
    }
    let recorder = {
        let recording = config.recording.clone();
        let node = node.clone();
        tokio::task::spawn_blocking(move || Recorder::open(&recording, node)).await??
    };
    let operations_access = access.clone();
    let proxy = Proxy::new(
        Arc::clone(&config),
        Arc::clone(&redirect),
        identity,
        recorder.clone(),
        target_tls,
        access,
    );
    let listeners = proxy.bind()?;
    let operations_stop = CancellationToken::new();
    let mut operations_state = None;
    if let Some(addr) = config.operations.listen {
        let listener = crate::operations::bind(addr).map_err(|error| {
            anyhow::anyhow!(
                "failed to listen on operations.listen {addr}: {error} (pick a free port, or \
                 set operations.listen: null to turn the endpoint off)"
            )
        })?;
        let state = Arc::new(OperationsState::new(
            node.clone(),
            Arc::clone(&config),
            Arc::clone(&redirect),
            recorder.clone(),
            operations_access.policy,
            operations_access.approvals,
        ));
        tokio::spawn(crate::operations::serve(
            listener,
            Arc::clone(&state),
            operations_stop.clone(),
        ));
        operations_state = Some(state);
    }

    let heartbeat = tokio::spawn(heartbeat_loop(
        Arc::clone(&redirect),
        config.redirect.heartbeat_interval,
    ));
    let accept_loops = proxy.serve(listeners);

    if let Some(path) = &options.ready_file {
        std::fs::write(path, format!("{}\n", std::process::id()))?;
    }
    info!(
        node = %node,
        targets = config.targets.len(),
        fail_mode = ?config.redirect.fail_mode,
        recordings = %config.recording.dir.display(),
        worker_threads = tokio::runtime::Handle::current().metrics().num_workers(),
        "gatewayd ready"
    );

    tokio::select! {
        _ = terminate.recv() => info!(signal = "SIGTERM", "stopping"),
        _ = interrupt.recv() => info!(signal = "SIGINT", "stopping"),
    }
    if let Some(state) = &operations_state {
        state.set_stopping();
    }

    if config.redirect.fail_mode == FailMode::Open {
        heartbeat.abort();
        if let Err(error) = redirect.expire_heartbeat() {
            warn!(error = %crate::error_chain(&error), "failed to expire the heartbeat; new connects go direct once it times out");
        }
    }
    let drain = proxy.shutdown(accept_loops);
    tokio::select! {
        () = drain => {}
        _ = terminate.recv() => warn!("second signal: stopping without waiting for open sessions"),
        _ = interrupt.recv() => warn!("second signal: stopping without waiting for open sessions"),
    }
    heartbeat.abort();
    operations_stop.cancel();
    tokio::task::spawn_blocking(move || recorder.shutdown()).await?;
    for task in access_tasks {
        task.abort();
    }
    let _ = std::fs::remove_file(&config.approvals.socket);
    if let Some(path) = &options.ready_file {
        let _ = std::fs::remove_file(path);
    }
    info!("gatewayd stopped; eBPF programs stay attached (remove them with `gatewayd uninstall`)");
    Ok(())
}

/// Loads the access policy (from `policy.path`, else from `sql_rules`), starts watching its
/// files, and opens the approvals socket. Returns the shared state and the tasks to stop.
fn start_access(
    config: &Config,
) -> anyhow::Result<(crate::proxy::Access, Vec<tokio::task::JoinHandle<()>>)> {
    let mut tasks = Vec::new();
    let policy = match &config.policy.path {
        Some(path) => {
            let store = Arc::new(PolicyStore::load(path)?);
            let policy = store.current();
            info!(path = %path.display(), policies = policy.sources().len(), rules = policy.rule_count(), "access policy loaded");
            tasks.push(tokio::spawn(
                Arc::clone(&store).watch(config.policy.reload_interval),
            ));
            store
        }
        None => Arc::new(PolicyStore::fixed(policy_from_sql_rules(&config.sql_rules))),
    };
    let approvals = Broker::new();
    tasks.push(crate::approval::serve(
        Arc::clone(&approvals),
        &config.approvals.socket,
        config.approvals.group.as_deref(),
    )?);
    Ok((crate::proxy::Access { policy, approvals }, tasks))
}

/// Refreshes the heartbeat every `interval` and attaches programs again that were detached
/// from outside the daemon.
async fn heartbeat_loop(redirect: Arc<Redirect>, interval: std::time::Duration) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failures: u64 = 0;
    let mut detached_checks = HashMap::new();
    loop {
        ticker.tick().await;
        let redirect = Arc::clone(&redirect);
        let result = tokio::task::spawn_blocking(move || {
            let heartbeat = redirect.heartbeat();
            reattach_detached(&redirect, &mut detached_checks);
            (heartbeat, detached_checks)
        })
        .await;
        match result {
            Ok((heartbeat, checks)) => {
                detached_checks = checks;
                match heartbeat {
                    Ok(()) => failures = 0,
                    Err(error) => {
                        failures += 1;
                        metrics().error(ErrorKind::Heartbeat);
                        if failures.is_power_of_two() {
                            error!(error = %crate::error_chain(&error), consecutive_failures = failures, "heartbeat update failed");
                        }
                    }
                }
            }
            Err(join_error) => {
                error!(%join_error, "heartbeat task failed");
                detached_checks = HashMap::new();
            }
        }
    }
}

/// Attaches again every program found detached on two checks in a row. Waiting one interval
/// leaves room for another `gatewayd` that is replacing a pin (it removes the old pin before it
/// pins the new link), and gives `/readyz` at least one interval in which it reports the
/// detachment.
fn reattach_detached(redirect: &Redirect, detached_checks: &mut HashMap<String, u64>) {
    let detached: Vec<ProgramAttachment> = redirect
        .attachments()
        .into_iter()
        .filter(|attachment| !attachment.attached)
        .collect();
    let names: Vec<&str> = detached
        .iter()
        .map(|attachment| attachment.program.as_str())
        .collect();
    let due = count_detached_checks(&names, detached_checks);

    for attachment in detached
        .iter()
        .filter(|attachment| due.contains(&attachment.program))
    {
        match redirect.reattach(&attachment.program) {
            Ok(()) => {
                detached_checks.remove(&attachment.program);
                metrics().program_reattached(&attachment.program);
                warn!(
                    program = %attachment.program,
                    hook = %attachment.hook,
                    problem = attachment.problem.as_deref().unwrap_or(""),
                    cgroup = %redirect.cgroup.display(),
                    "eBPF program was detached from outside gatewayd; attached it again"
                );
            }
            Err(error) => {
                metrics().error(ErrorKind::Reattach);
                // The first attempt is the second check, so this logs attempts 1, 2, 4, 8, ...
                let attempts = detached_checks
                    .get(&attachment.program)
                    .map_or(1, |checks| checks.saturating_sub(1));
                if attempts.is_power_of_two() {
                    error!(
                        program = %attachment.program,
                        error = %crate::error_chain(&error),
                        attempts,
                        "failed to attach a detached eBPF program again; retrying on the next heartbeat"
                    );
                }
            }
        }
    }
}

/// Updates how many checks in a row each program was found detached (`detached` lists this
/// check's programs) and returns the programs detached on at least two checks in a row.
fn count_detached_checks(
    detached: &[&str],
    detached_checks: &mut HashMap<String, u64>,
) -> Vec<String> {
    detached_checks.retain(|program, _| detached.contains(&program.as_str()));
    let mut due = Vec::new();
    for program in detached {
        let checks = detached_checks.entry((*program).to_string()).or_insert(0);
        *checks += 1;
        if *checks >= 2 {
            due.push((*program).to_string());
        }
    }
    due
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_string())
        .unwrap_or_else(|_| "unknown".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reattach_waits_for_second_check() {
        let mut checks = HashMap::new();
        assert!(count_detached_checks(&["connect4"], &mut checks).is_empty());
        assert_eq!(
            count_detached_checks(&["connect4", "sock_ops"], &mut checks),
            vec!["connect4".to_string()]
        );
        assert_eq!(
            count_detached_checks(&["connect4", "sock_ops"], &mut checks),
            vec!["connect4".to_string(), "sock_ops".to_string()]
        );
    }

    #[test]
    fn reattach_count_resets_when_attached() {
        let mut checks = HashMap::new();
        count_detached_checks(&["connect6"], &mut checks);
        // Attached again on the next check, for example by another gatewayd replacing the pin.
        assert!(count_detached_checks(&[], &mut checks).is_empty());
        assert!(checks.is_empty());
        assert!(count_detached_checks(&["connect6"], &mut checks).is_empty());
    }
}
