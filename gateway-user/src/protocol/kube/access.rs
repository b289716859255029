//! The AccessPolicy decision for one Kubernetes API request, and holding it for review.
//!
//! A `deny` in enforce mode denies the request. A `review` in enforce mode puts the request up
//! on the approvals broker and waits: the client simply sees a slow response, as kubectl does
//! for a slow API server. An approval lets the request through; a denial or no answer by the
//! deadline denies it, and the `Forbidden` Status carries who denied it and why. Audit-mode
//! decisions that would have blocked or held are recorded as `policy.audit` events.

use crate::operations::metrics::metrics;
use serde_json::json;

use super::{KubeAccess, Recording, attribution::RequestInfo, record_event};
use crate::{
    approval::HoldRequest,
    policy::{Action, ExecAttributes, KubeRequest, Request},
};

/// Decides `info`; returns the rule and an optional reason when the request is denied.
pub(super) async fn decide(
    access: &KubeAccess,
    record: &Recording,
    info: &RequestInfo,
    token_pod_mismatch: bool,
) -> Option<(String, Option<String>)> {
    let request = KubeRequest {
        verb: info.verb.clone(),
        group: info.group.clone(),
        resource: info.resource.clone(),
        subresource: info.subresource.clone(),
        namespace: info.namespace.clone(),
        name: info.name.clone(),
        exec: info.exec.as_ref().map(|exec| ExecAttributes {
            stdin: exec.stdin,
            tty: exec.tty,
            command: exec.command.clone(),
        }),
    };
    let mut subject = access.subject.clone();
    subject.token_pod_mismatch = token_pod_mismatch;
    let decision =
        access
            .policy
            .current()
            .decide(&subject, &access.target, Request::Kube(&request));
    metrics().request_decided(access.target.class, &decision);
    let summary = summary(info);
    if decision.audit_only() {
        record_event(
            record,
            "policy.audit",
            json!({
                "rule": decision.rule,
                "policy": decision.policy,
                "mode": decision.mode,
                "would": decision.action,
                "request": summary,
            }),
        );
        return None;
    }
    match decision.enforced() {
        Action::Allow => None,
        Action::Deny => Some((decision.rule, None)),
        Action::Review => {
            let review = decision
                .review
                .clone()
                .unwrap_or_else(|| (&crate::policy::spec::ReviewSpec::default()).into());
            let session = record.lock().expect("recording lock poisoned").id.clone();
            let pending = access.approvals.hold(HoldRequest {
                session,
                subject: subject.to_string(),
                subject_uid: subject.uid,
                target: access.target.name.clone(),
                rule: decision.rule.clone(),
                policy: decision.policy.clone(),
                summary: summary.clone(),
                deadline: review.deadline,
                scope: review.scope,
                forbid_self_approval: review.forbid_self_approval,
            });
            record_event(
                record,
                "approval.requested",
                json!({
                    "id": pending.id,
                    "rule": decision.rule,
                    "policy": decision.policy,
                    "request": summary,
                    "scope": review.scope,
                    "forbid_self_approval": review.forbid_self_approval,
                    "expires_at": pending.info.expires_at,
                }),
            );
            // NOTE: a review with scope `session` is asked again for each request, because an
            // HTTP client's requests do not share a session the way a database connection's do.
            let answer = pending.wait().await;
            record_event(
                record,
                "approval.answered",
                answer.event_fields(&decision.rule),
            );
            answer
                .denial_reason(review.deadline)
                .map(|detail| (decision.rule, Some(detail)))
        }
    }
}

/// Describes a request for approvers: `create secrets -n prod db-password`.
fn summary(info: &RequestInfo) -> String {
    let resource = if info.subresource.is_empty() {
        info.resource.clone()
    } else {
        format!("{}/{}", info.resource, info.subresource)
    };
    let mut text = format!("{} {resource}", info.verb);
    if !info.namespace.is_empty() {
        text.push_str(&format!(" -n {}", info.namespace));
    }
    if !info.name.is_empty() {
        text.push_str(&format!(" {}", info.name));
    }
    if let Some(exec) = &info.exec
        && !exec.command.is_empty()
    {
        text.push_str(&format!(" -- {}", exec.command.join(" ")));
    }
    text
}
