//! `gatewayctl policy` and `gatewayctl approvals`.

use std::{collections::BTreeMap, path::Path, path::PathBuf};

use anyhow::{Context as _, bail};
use clap::Subcommand;
use gateway_user::{
    approval::{self, HeldInfo, SocketRequest, SocketResponse},
    config::TargetClass,
    policy::{self, ExecAttributes, KubeRequest, Request, Subject, Target},
    sql::{SqlDialect, analyze},
};

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Validate the AccessPolicy objects in a file or directory.
    Check {
        /// File or directory of AccessPolicy YAML.
        path: PathBuf,
    },
    /// Decide one described request against a policy, without traffic.
    Test {
        /// File or directory of AccessPolicy YAML.
        #[arg(long)]
        policy: PathBuf,
        /// The caller: `namespace/service-account`, or `unknown`.
        #[arg(long)]
        subject: String,
        /// Pod labels of the caller, `key=value`; repeat for more.
        #[arg(long = "label", value_name = "KEY=VALUE")]
        labels: Vec<String>,
        /// Treat the request as carrying a token bound to another pod.
        #[arg(long)]
        token_pod_mismatch: bool,
        /// A Kubernetes request in kubectl's words, such as `create secrets -n prod`,
        /// `delete deployments.apps/web -n prod` or `exec web -n prod -it -- sh`.
        #[arg(long, conflicts_with = "sql", required_unless_present = "sql")]
        kube: Option<String>,
        /// An SQL text; every statement in it is decided.
        #[arg(long)]
        sql: Option<String>,
        /// Target class for `--sql`.
        #[arg(long, value_enum, default_value = "postgres")]
        database: Database,
        /// Target name, as in the daemon configuration (`targets[].name`).
        #[arg(long, default_value = "")]
        target: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum Database {
    Postgres,
    Mysql,
}

#[derive(Debug, Subcommand)]
pub enum ApprovalsCommand {
    /// List the held requests.
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Approve a held request; it then runs.
    Approve {
        id: String,
        /// Why, for the recording.
        #[arg(long)]
        reason: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Deny a held request; the client gets the protocol's permission error with the reason.
    Deny {
        id: String,
        /// Why; shown to the client and recorded.
        #[arg(long)]
        reason: String,
        #[arg(long)]
        json: bool,
    },
}

pub fn run_policy(command: PolicyCommand) -> anyhow::Result<()> {
    match command {
        PolicyCommand::Check { path } => {
            let loaded = policy::load_path(&path)?;
            for source in loaded.sources() {
                println!(
                    "{}: policy {:?}, mode {}, {} rule(s)",
                    source.file,
                    source.name,
                    source.mode.as_str(),
                    source.rules
                );
            }
            println!(
                "valid: {} polic{}, {} rule(s)",
                loaded.sources().len(),
                if loaded.sources().len() == 1 {
                    "y"
                } else {
                    "ies"
                },
                loaded.rule_count()
            );
            Ok(())
        }
        PolicyCommand::Test {
            policy: path,
            subject,
            labels,
            token_pod_mismatch,
            kube,
            sql,
            database,
            target,
            json,
        } => {
            let loaded = policy::load_path(&path)?;
            let mut subject = Subject::parse(&subject).map_err(anyhow::Error::msg)?;
            subject.labels = parse_labels(&labels)?;
            subject.token_pod_mismatch = token_pod_mismatch;

            let mut results = Vec::new();
            if let Some(kube) = kube {
                let request = parse_kube(&kube)?;
                let target = Target {
                    class: TargetClass::KubeApi,
                    name: target,
                };
                let decision = loaded.decide(&subject, &target, Request::Kube(&request));
                results.push((kube, decision));
            } else if let Some(sql) = sql {
                let (class, dialect) = match database {
                    Database::Postgres => (TargetClass::Postgres, SqlDialect::Postgres),
                    Database::Mysql => (TargetClass::Mysql, SqlDialect::Mysql),
                };
                let target = Target {
                    class,
                    name: target,
                };
                let statements = analyze(&sql, dialect);
                if statements.is_empty() {
                    bail!(
                        "--sql contains no statement: give at least one, such as \"DELETE FROM cards\""
                    );
                }
                for statement in &statements {
                    let decision = loaded.decide(&subject, &target, Request::Sql(statement));
                    let label = format!("{} {}", statement.kind, statement.tables.join(","));
                    results.push((label.trim_end().to_string(), decision));
                }
            }

            if json {
                let list: Vec<serde_json::Value> = results
                    .iter()
                    .map(|(request, decision)| {
                        serde_json::json!({ "request": request, "decision": decision })
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&list)?);
                return Ok(());
            }
            for (request, decision) in &results {
                println!("request:  {request}");
                println!("decision: {}", decision.action.as_str());
                println!("rule:     {}", decision.rule);
                println!(
                    "policy:   {}",
                    decision
                        .policy
                        .as_deref()
                        .unwrap_or("(none: built-in allow)")
                );
                println!("mode:     {}", decision.mode.as_str());
                if decision.audit_only() {
                    println!("enforced: allow (audit mode records the decision only)");
                }
                if let Some(review) = &decision.review {
                    println!(
                        "review:   deadline {}, scope {}, self-approval {}",
                        humantime::format_duration(review.deadline),
                        review.scope.as_str(),
                        if review.forbid_self_approval {
                            "forbidden"
                        } else {
                            "allowed"
                        }
                    );
                }
            }
            Ok(())
        }
    }
}

fn parse_labels(labels: &[String]) -> anyhow::Result<BTreeMap<String, String>> {
    labels
        .iter()
        .map(|label| {
            label
                .split_once('=')
                .map(|(key, value)| (key.to_string(), value.to_string()))
                .with_context(|| format!("invalid --label {label:?}: expected KEY=VALUE"))
        })
        .collect()
}

/// Parses a kubectl-like description: `VERB RESOURCE[.GROUP][/NAME] [NAME] [-n NAMESPACE]
/// [--subresource SUB]`, or `exec|attach POD [-n NAMESPACE] [-i] [-t] [-- COMMAND...]`.
fn parse_kube(text: &str) -> anyhow::Result<KubeRequest> {
    let words: Vec<&str> = text.split_whitespace().collect();
    let (words, command) = match words.iter().position(|word| *word == "--") {
        Some(at) => (&words[..at], words[at + 1..].to_vec()),
        None => (&words[..], Vec::new()),
    };
    let mut positional = Vec::new();
    let mut request = KubeRequest::default();
    let (mut stdin, mut tty) = (false, false);
    let mut index = 0;
    while index < words.len() {
        let word = words[index];
        match word {
            "-n" | "--namespace" => {
                index += 1;
                request.namespace = words
                    .get(index)
                    .with_context(|| format!("{word} needs a namespace"))?
                    .to_string();
            }
            "--subresource" => {
                index += 1;
                request.subresource = words
                    .get(index)
                    .context("--subresource needs a value")?
                    .to_string();
            }
            "-i" | "--stdin" => stdin = true,
            "-t" | "--tty" => tty = true,
            "-it" | "-ti" => (stdin, tty) = (true, true),
            _ if word.starts_with('-') => bail!("unknown option {word:?} in --kube"),
            _ => positional.push(word),
        }
        index += 1;
    }
    let Some((verb, rest)) = positional.split_first() else {
        bail!("--kube is empty: expected a verb and a resource, such as `create secrets -n prod`");
    };
    if matches!(*verb, "exec" | "attach") {
        let pod = rest
            .first()
            .with_context(|| format!("{verb} needs a pod name"))?;
        request.verb = "create".into();
        request.resource = "pods".into();
        request.subresource = (*verb).into();
        request.name = pod
            .trim_start_matches("pod/")
            .trim_start_matches("pods/")
            .into();
        request.exec = Some(ExecAttributes {
            stdin,
            tty,
            command: command.iter().map(|word| (*word).to_string()).collect(),
        });
        return Ok(request);
    }
    let resource = rest
        .first()
        .with_context(|| format!("{verb} needs a resource, such as `{verb} secrets -n prod`"))?;
    let (resource, name) = match resource.split_once('/') {
        Some((resource, name)) => (resource, name.to_string()),
        None => (
            *resource,
            rest.get(1)
                .map(|name| (*name).to_string())
                .unwrap_or_default(),
        ),
    };
    let (resource, group) = resource.split_once('.').unwrap_or((resource, ""));
    request.verb = (*verb).into();
    request.resource = resource.into();
    request.group = group.into();
    request.name = name;
    Ok(request)
}

pub fn run_approvals(socket: &Path, command: ApprovalsCommand) -> anyhow::Result<()> {
    let (request, json) = match command {
        ApprovalsCommand::List { json } => (SocketRequest::List, json),
        ApprovalsCommand::Approve { id, reason, json } => {
            (SocketRequest::Approve { id, reason }, json)
        }
        ApprovalsCommand::Deny { id, reason, json } => {
            if reason.trim().is_empty() {
                bail!("--reason must not be empty: the client and the recording show it");
            }
            (SocketRequest::Deny { id, reason }, json)
        }
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let response: SocketResponse = runtime.block_on(approval::call(socket, &request))?;
    if let Some(error) = response.error {
        bail!("{error}");
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&response)?);
        return Ok(());
    }
    match request {
        SocketRequest::List => print_table(response.requests.as_deref().unwrap_or_default()),
        SocketRequest::Approve { .. } | SocketRequest::Deny { .. } => {
            let verb = if matches!(request, SocketRequest::Approve { .. }) {
                "approved"
            } else {
                "denied"
            };
            let answered = response.answered.context("response names no request")?;
            let who = response
                .approver
                .map(|approver| match approver.name {
                    Some(name) => format!("{name} (uid {})", approver.uid),
                    None => format!("uid {}", approver.uid),
                })
                .unwrap_or_default();
            println!(
                "{verb} {} (rule {}, session {}) as {who}",
                answered.id, answered.rule, answered.session
            );
        }
    }
    Ok(())
}

/// Maximum statement length shown in the table. `--json` shows it whole.
const SUMMARY_COLUMN_CHARS: usize = 60;

fn print_table(requests: &[HeldInfo]) {
    if requests.is_empty() {
        println!("no held requests");
        return;
    }
    let rows: Vec<[String; 7]> = requests
        .iter()
        .map(|held| {
            let mut summary: String = held.summary.chars().take(SUMMARY_COLUMN_CHARS).collect();
            if held.summary.chars().count() > SUMMARY_COLUMN_CHARS {
                summary.push_str("...");
            }
            [
                held.id.clone(),
                held.subject.clone(),
                held.target.clone(),
                held.rule.clone(),
                held.scope.as_str().to_string(),
                held.expires_at.clone(),
                summary.replace('\n', " "),
            ]
        })
        .collect();
    let header = [
        "ID", "SUBJECT", "TARGET", "RULE", "SCOPE", "EXPIRES", "REQUEST",
    ];
    let mut widths = header.map(str::len);
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut text = String::new();
        for (index, cell) in cells.iter().enumerate() {
            if index + 1 == cells.len() {
                text.push_str(cell);
            } else {
                text.push_str(&format!("{cell:<width$}   ", width = widths[index]));
            }
        }
        println!("{text}");
    };
    line(header.to_vec());
    for row in &rows {
        line(row.iter().map(String::as_str).collect());
    }
}
