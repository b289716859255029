//! The policy decision for the statements of one MySQL command, and holding them for review.
//!
//! Every statement of a command is decided. A `deny` in enforce mode denies the whole command,
//! so nothing of it runs. Each `review` in enforce mode, with a rule not yet approved for the
//! session, is put up on the approvals broker in turn while the command waits. The client
//! sees a slow query. The classic protocol carries one command at a time, so nothing else of
//! the session moves meanwhile. An approval lets the command through (and, with scope
//! `session`, every later statement matching the same rule); a denial or a timeout denies it.
//! Audit-mode decisions that would have blocked or held are recorded as `policy.audit` events
//! and let through.

use std::collections::HashSet;

use serde_json::json;

use super::{Session, record_event};
use crate::{
    approval::HoldRequest,
    operations::metrics::metrics,
    policy::{Action, PolicyDecision, Request, ReviewScope},
    sql::StatementInfo,
};

/// The rule that denies a command, the statement it matched, and the reason.
#[derive(Clone, Debug)]
pub(super) struct Denial {
    pub rule: String,
    pub statement: StatementInfo,
    /// For held statements: who denied it and why, or that the review deadline passed.
    pub detail: Option<String>,
}

/// Rules approved with scope `session` in this session.
#[derive(Debug, Default)]
pub(super) struct SessionApprovals {
    rules: HashSet<String>,
}

impl Session<'_> {
    /// Decides the statements of one command and waits while a review is pending. `masked_text` is
    /// the statement text for recordings and for the approver.
    pub(super) async fn judge(
        &mut self,
        infos: &[StatementInfo],
        masked_text: &str,
    ) -> Option<Denial> {
        let context = self.context;
        let policy = context.policy.current();
        let mut reviews: Vec<(PolicyDecision, &StatementInfo)> = Vec::new();
        // A `USE` in a text of several statements changes the database for those after it.
        let mut database = self.login.database.clone();
        for info in infos {
            if info.kind == "use"
                && let Some(used) = info.tables.first()
            {
                database.clone_from(used);
            }
            let judged = with_database(info, &database);
            let decision = policy.decide(&context.subject, &context.target, Request::Sql(&judged));
            metrics().request_decided(context.target.class, &decision);
            if decision.audit_only() {
                record_event(
                    self.record,
                    "policy.audit",
                    json!({
                        "rule": decision.rule,
                        "policy": decision.policy,
                        "mode": decision.mode,
                        "would": decision.action,
                        "statement": masked_text,
                        "kind": info.kind,
                    }),
                );
                continue;
            }
            match decision.enforced() {
                Action::Allow => {}
                Action::Deny => {
                    return Some(Denial {
                        rule: decision.rule,
                        statement: info.clone(),
                        detail: None,
                    });
                }
                Action::Review => {
                    let approved = self.approvals.rules.contains(&decision.rule);
                    let listed = reviews
                        .iter()
                        .any(|(review, _)| review.rule == decision.rule);
                    if !approved && !listed {
                        reviews.push((decision, info));
                    }
                }
            }
        }

        for (decision, info) in reviews {
            if let Some((rule, detail)) = self.hold(decision, masked_text).await {
                return Some(Denial {
                    rule,
                    statement: info.clone(),
                    detail: Some(detail),
                });
            }
        }
        None
    }

    /// Puts one statement up for review and waits for the verdict. Returns the rule and the
    /// reason when it is denied.
    async fn hold(
        &mut self,
        decision: PolicyDecision,
        masked_text: &str,
    ) -> Option<(String, String)> {
        let context = self.context;
        let review = decision
            .review
            .clone()
            .unwrap_or_else(|| (&crate::policy::spec::ReviewSpec::default()).into());
        let session = self
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
            summary: masked_text.to_string(),
            deadline: review.deadline,
            scope: review.scope,
            forbid_self_approval: review.forbid_self_approval,
        });
        record_event(
            self.record,
            "approval.requested",
            json!({
                "id": pending.id,
                "rule": decision.rule,
                "policy": decision.policy,
                "statement": masked_text,
                "scope": review.scope,
                "forbid_self_approval": review.forbid_self_approval,
                "expires_at": pending.info.expires_at,
            }),
        );

        // NOTE: the client is not read while its command is held, so a client that
        // disconnects or is killed with KILL QUERY from another connection keeps the request
        // listed until an approver decides or its deadline passes.
        let counters = self.counters;
        let answer = pending.wait_keeping_alive(|| counters.touch()).await;

        record_event(
            self.record,
            "approval.answered",
            answer.event_fields(&decision.rule),
        );
        match answer
            .denial_reason(review.deadline)
            .map(|reason| crate::mask::masked_text(reason, &context.mask))
        {
            None => {
                if review.scope == ReviewScope::Session {
                    self.approvals.rules.insert(decision.rule);
                }
                None
            }
            Some(detail) => Some((decision.rule, detail)),
        }
    }
}

/// Returns `info` for the policy to judge: each table named without a database is also named
/// in `database`, the session's current one, so that a rule on `payments.cards` matches
/// `cards` while `payments` is in use. Rules on the bare name match either way.
fn with_database(info: &StatementInfo, database: &str) -> StatementInfo {
    let mut judged = info.clone();
    if database.is_empty() {
        return judged;
    }
    for table in &info.tables {
        if !table.contains('.') {
            judged.tables.push(format!("{database}.{table}"));
        }
    }
    judged
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bare_tables_named_in_current_database() {
        let info = StatementInfo {
            kind: "select".into(),
            tables: vec!["cards".into(), "audit.log".into()],
            has_where: None,
            also_kinds: Vec::new(),
        };
        let judged = with_database(&info, "payments");
        assert_eq!(judged.tables, ["cards", "audit.log", "payments.cards"]);
        assert_eq!(with_database(&info, "").tables, info.tables);
    }
}
