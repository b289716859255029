//! The policy decision for each client statement, and holding statements for review.
//!
//! Every statement of a message is decided. A `deny` in enforce mode denies the whole message
//! at once. Each `review` in enforce mode, with a rule not yet approved for the session, is
//! put up on the approvals broker in turn, and the frontend pump waits for the answer: the
//! client simply sees a slow query. An approval lets the message through (and, with scope
//! `session`, every later statement matching the same rule); a denial or a timeout denies it.
//! Audit-mode decisions that would have blocked or held are recorded as `policy.audit` events
//! and let through.

use crate::operations::metrics::metrics;
use std::collections::HashSet;

use serde_json::json;
use tokio::io::{AsyncWriteExt as _, BufWriter};

use super::{
    PumpContext, Replication, SessionEnd, WriteHalf, parse_bool, record_event, server_error,
};
use crate::{
    approval::HoldRequest,
    policy::{Action, PolicyDecision, Request, ReviewScope},
    sql::StatementInfo,
};

/// The rule that denies a message, and the reason.
#[derive(Clone, Debug)]
pub(super) struct Denial {
    pub rule: String,
    /// For held statements: who denied it and why, or that the review deadline passed.
    pub detail: Option<String>,
}

/// Name under which the gateway's own denial of binary logical replication is recorded.
pub(super) const BINARY_REPLICATION_RULE: &str = "gateway:binary-replication";

/// Name under which the gateway's own denial of physical replication commands is recorded.
pub(super) const PHYSICAL_REPLICATION_RULE: &str = "gateway:physical-replication";

/// Denies the replication commands whose data cannot be masked: a base backup or a physical
/// `START_REPLICATION`, which a walsender runs even in a session started for logical
/// replication, and binary logical replication.
fn replication_denial(infos: &[StatementInfo], command: &str) -> Option<Denial> {
    let physical = infos.iter().any(|info| match info.kind.as_str() {
        "base_backup" | "upload_manifest" => true,
        "start_replication" => !is_logical_start(command),
        _ => false,
    });
    if physical {
        return Some(Denial {
            rule: PHYSICAL_REPLICATION_RULE.to_string(),
            detail: Some(
                "base backups and physical replication copy data files and WAL in which card \
                 numbers cannot be masked without corrupting them; connect replicas from a \
                 cgroup listed in redirect.exclude_cgroups"
                    .to_string(),
            ),
        });
    }
    let binary = infos.iter().any(|info| info.kind == "start_replication") && asks_binary(command);
    binary.then(|| Denial {
        rule: BINARY_REPLICATION_RULE.to_string(),
        detail: Some(
            "binary logical replication sends column values in binary formats that cannot be \
             scanned for card numbers; subscribe with binary = false"
                .to_string(),
        ),
    })
}

/// Tells whether `START_REPLICATION [SLOT name] LOGICAL ...` requests logical replication: the
/// word after the optional slot is `LOGICAL`, where a physical one has `PHYSICAL`, a position
/// or nothing. Words are read as the SQL tokenizer reads them, so comments cannot pose as one.
fn is_logical_start(command: &str) -> bool {
    let words = crate::sql::words(command, crate::sql::SqlDialect::Postgres);
    let Some(start) = words.iter().position(|word| word == "start_replication") else {
        return false;
    };
    let mut rest = words[start + 1..].iter();
    let mut word = rest.next();
    if word.is_some_and(|word| word == "slot") {
        rest.next();
        word = rest.next();
    }
    word.is_some_and(|word| word == "logical")
}

/// Tells whether a `START_REPLICATION ... LOGICAL` command asks the output plugin for binary
/// column values: an option `binary` that is true or has no value.
fn asks_binary(command: &str) -> bool {
    let Some(open) = command.find('(') else {
        return false;
    };
    let options = command[open + 1..]
        .trim_end()
        .trim_end_matches(';')
        .trim_end();
    let options = options.strip_suffix(')').unwrap_or(options);
    split_options(options).iter().any(|option| {
        let (name, value) = option_parts(option.trim());
        if !name.eq_ignore_ascii_case("binary") {
            return false;
        }
        value.is_empty() || parse_bool(value.trim_matches('\'')) == Some(true)
    })
}

/// Splits one option into its name (unquoted) and its value, which may follow the name
/// without a space (`binary'true'`).
fn option_parts(option: &str) -> (&str, &str) {
    if let Some(quoted) = option.strip_prefix('"') {
        return match quoted.split_once('"') {
            Some((name, value)) => (name, value.trim()),
            None => (quoted, ""),
        };
    }
    let end = option
        .find(|c: char| !(c.is_alphanumeric() || c == '_'))
        .unwrap_or(option.len());
    (&option[..end], option[end..].trim())
}

/// Splits a replication command's option list at the commas outside quotes.
fn split_options(options: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut start = 0;
    let mut quote = None;
    for (index, byte) in options.bytes().enumerate() {
        match (quote, byte) {
            (None, b'\'' | b'"') => quote = Some(byte),
            (Some(open), _) if byte == open => quote = None,
            (None, b',') => {
                parts.push(&options[start..index]);
                start = index + 1;
            }
            _ => {}
        }
    }
    parts.push(&options[start..]);
    parts
}

/// Rules approved with scope `session` in this session.
#[derive(Debug, Default)]
pub(super) struct SessionApprovals {
    rules: HashSet<String>,
}

/// Decides the statements of one message and waits while a review is pending. `shown` is
/// the masked statement text for recordings and for the approver.
pub(super) async fn judge(
    approvals: &mut SessionApprovals,
    infos: &[StatementInfo],
    shown: &str,
    pump: &PumpContext<'_>,
    upstream: &mut BufWriter<WriteHalf>,
) -> Result<Option<Denial>, SessionEnd> {
    if pump.startup.replication != Replication::None
        && let Some(denial) = replication_denial(infos, shown)
    {
        return Ok(Some(denial));
    }
    let context = pump.context;
    let policy = context.policy.current();
    let mut reviews: Vec<PolicyDecision> = Vec::new();
    for info in infos {
        let decision = policy.decide(&context.subject, &context.target, Request::Sql(info));
        metrics().request_decided(context.target.class, &decision);
        if decision.audit_only() {
            record_event(
                pump.record,
                "policy.audit",
                json!({
                    "rule": decision.rule,
                    "policy": decision.policy,
                    "mode": decision.mode,
                    "would": decision.action,
                    "statement": shown,
                    "kind": info.kind,
                }),
            );
            continue;
        }
        match decision.enforced() {
            Action::Allow => {}
            Action::Deny => {
                return Ok(Some(Denial {
                    rule: decision.rule,
                    detail: None,
                }));
            }
            Action::Review => {
                let approved = approvals.rules.contains(&decision.rule);
                let listed = reviews.iter().any(|review| review.rule == decision.rule);
                if !approved && !listed {
                    reviews.push(decision);
                }
            }
        }
    }

    for decision in reviews {
        if let Some(denial) = hold(approvals, decision, shown, pump, upstream).await? {
            return Ok(Some(denial));
        }
    }
    Ok(None)
}

/// Puts one statement up for review and waits for the verdict.
async fn hold(
    approvals: &mut SessionApprovals,
    decision: PolicyDecision,
    shown: &str,
    pump: &PumpContext<'_>,
    upstream: &mut BufWriter<WriteHalf>,
) -> Result<Option<Denial>, SessionEnd> {
    let context = pump.context;
    // Statements pipelined before this one go to the server now, so their results are not
    // held back with it.
    upstream.flush().await.map_err(server_error)?;

    let review = decision
        .review
        .clone()
        .unwrap_or_else(|| (&crate::policy::spec::ReviewSpec::default()).into());
    let session = pump
        .record
        .lock()
        .expect("recording lock poisoned")
        .id
        .clone();
    let pending = context.approvals.hold(HoldRequest {
        session,
        subject: context.subject.to_string(),
        subject_uid: context.subject.uid,
        target: context.target.name.clone(),
        rule: decision.rule.clone(),
        policy: decision.policy.clone(),
        summary: shown.to_string(),
        deadline: review.deadline,
        scope: review.scope,
        forbid_self_approval: review.forbid_self_approval,
    });
    record_event(
        pump.record,
        "approval.requested",
        json!({
            "id": pending.id,
            "rule": decision.rule,
            "policy": decision.policy,
            "statement": shown,
            "scope": review.scope,
            "forbid_self_approval": review.forbid_self_approval,
            "expires_at": pending.info.expires_at,
        }),
    );

    // NOTE: the client is not read while its statement is held, so a client that disconnects
    // or sends a CancelRequest (which reaches an idle server) keeps the request listed until
    // it is answered or its deadline passes.
    let counters = pump.counters;
    let answer = pending.wait_keeping_alive(|| counters.touch()).await;

    record_event(
        pump.record,
        "approval.answered",
        answer.event_fields(&decision.rule),
    );
    Ok(
        match answer
            .denial_reason(review.deadline)
            .map(|reason| crate::mask::masked_text(reason, &pump.context.mask))
        {
            None => {
                if review.scope == ReviewScope::Session {
                    approvals.rules.insert(decision.rule);
                }
                None
            }
            Some(detail) => Some(Denial {
                rule: decision.rule,
                detail: Some(detail),
            }),
        },
    )
}

#[cfg(test)]
mod tests {
    use super::{asks_binary, is_logical_start};

    #[test]
    fn logical_start_told_from_physical() {
        for command in [
            "START_REPLICATION SLOT \"s\" LOGICAL 0/0 (proto_version '1')",
            "start_replication slot logical logical 0/0",
            "START_REPLICATION\tSLOT s LOGICAL 1/A",
        ] {
            assert!(is_logical_start(command), "{command}");
        }
        for command in [
            "START_REPLICATION 0/1000000",
            "START_REPLICATION PHYSICAL 0/0 TIMELINE 1",
            "START_REPLICATION SLOT logical PHYSICAL 0/0",
            "START_REPLICATION SLOT s 0/0",
            "/* LOGICAL */ START_REPLICATION 0/0",
            "START_REPLICATION /* LOGICAL */ 0/0",
        ] {
            assert!(!is_logical_start(command), "{command}");
        }
    }

    #[test]
    fn binary_option_detected() {
        for command in [
            "START_REPLICATION SLOT \"s\" LOGICAL 0/0 (proto_version '2', publication_names '\"p\"', binary 'true')",
            "START_REPLICATION SLOT s LOGICAL 0/0 (\"binary\" 'on')",
            "START_REPLICATION SLOT s LOGICAL 0/0 (binary)",
            "START_REPLICATION SLOT s LOGICAL 0/0 (proto_version '1', BINARY 't');",
            "START_REPLICATION SLOT s LOGICAL 0/0 (binary'true')",
            "START_REPLICATION SLOT s LOGICAL 0/0 (\"binary\"'on')",
        ] {
            assert!(asks_binary(command), "{command}");
        }
        for command in [
            "START_REPLICATION SLOT s LOGICAL 0/0",
            "START_REPLICATION SLOT s LOGICAL 0/0 (binary 'false')",
            "START_REPLICATION SLOT s LOGICAL 0/0 (publication_names 'binary, x')",
            "START_REPLICATION SLOT s LOGICAL 0/0 (\"include-xids\" '0', binary 'off')",
        ] {
            assert!(!asks_binary(command), "{command}");
        }
    }
}
