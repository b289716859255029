//! Evaluation: the loaded policies as one ordered rule list, and [`Policy::decide`], the call
//! the protocol handlers make per request.
//!
//! Order: policies in the order they were loaded (files by path, then objects in file order),
//! rules in the order written. The first rule whose every condition is met decides. When none
//! does, the first policy that sets a default for the target's class decides, and without one
//! the request is allowed. A rule's mode is the mode of the policy it belongs to.

use std::{collections::BTreeMap, fmt, time::Duration};

use serde::Serialize;

use super::spec::{
    AccessPolicySpec, Action, KeepDigits, KubeMatch, LabelSelector, MaskingSpec, Mode, ReviewScope,
    ReviewSpec, RuleSpec, SelectorOperator, SqlMatch, SubjectMatch,
};
use crate::{config::TargetClass, sql::StatementInfo};

/// The caller of a request, in the terms policy matches on.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Subject {
    /// Pod namespace; `None` when the pod is not known (the subject is `unknown`).
    pub namespace: Option<String>,
    pub service_account: Option<String>,
    pub pod: Option<String>,
    pub labels: BTreeMap<String, String>,
    /// uid of the connecting process as the connect hook saw it; compared with the approver's
    /// uid when a rule forbids self-approval.
    pub uid: Option<u32>,
    /// Set when the request carries a bearer token bound to a different pod than the caller.
    pub token_pod_mismatch: bool,
}

impl Subject {
    /// A subject whose pod is not known.
    pub fn unknown() -> Self {
        Self::default()
    }

    /// Parses `namespace/service-account` (the `gatewayctl policy test --subject` form);
    /// `unknown` gives the unknown subject.
    pub fn parse(text: &str) -> Result<Self, String> {
        if text == "unknown" {
            return Ok(Self::unknown());
        }
        match text.split_once('/') {
            Some((namespace, account))
                if !namespace.is_empty() && !account.is_empty() && !account.contains('/') =>
            {
                Ok(Self {
                    namespace: Some(namespace.to_string()),
                    service_account: Some(account.to_string()),
                    ..Self::default()
                })
            }
            _ => Err(format!(
                "invalid subject {text:?}: expected namespace/service-account or unknown"
            )),
        }
    }

    pub fn is_unknown(&self) -> bool {
        self.namespace.is_none()
    }
}

impl fmt::Display for Subject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.namespace, &self.service_account) {
            (Some(namespace), Some(account)) => write!(f, "{namespace}/{account}"),
            (Some(namespace), None) => write!(f, "{namespace}/?"),
            _ => f.write_str("unknown"),
        }
    }
}

/// The target a request goes to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Target {
    pub class: TargetClass,
    /// Target name from the configuration (or `address:port`).
    pub name: String,
}

/// A Kubernetes API request, attributed the way the API server does it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct KubeRequest {
    pub verb: String,
    /// API group; empty for the core group.
    pub group: String,
    pub resource: String,
    pub subresource: String,
    pub namespace: String,
    pub name: String,
    /// For exec and attach requests.
    pub exec: Option<ExecAttributes>,
}

/// The options of an exec or attach request.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ExecAttributes {
    pub stdin: bool,
    pub tty: bool,
    /// The command and its arguments (exec only).
    pub command: Vec<String>,
}

/// One request to judge.
#[derive(Clone, Copy, Debug)]
pub enum Request<'a> {
    Kube(&'a KubeRequest),
    Sql(&'a StatementInfo),
}

/// Settings of a held request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ReviewSettings {
    #[serde(with = "humantime_serde")]
    pub deadline: Duration,
    pub scope: ReviewScope,
    pub forbid_self_approval: bool,
}

impl From<&ReviewSpec> for ReviewSettings {
    fn from(spec: &ReviewSpec) -> Self {
        Self {
            deadline: spec.deadline,
            scope: spec.scope,
            forbid_self_approval: spec.forbid_self_approval,
        }
    }
}

/// Masking that applies to what flows back.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct MaskSettings {
    pub keep: KeepDigits,
    /// Fields or columns masked whole.
    pub fields: Vec<String>,
}

impl From<&MaskingSpec> for MaskSettings {
    fn from(spec: &MaskingSpec) -> Self {
        Self {
            keep: spec.keep,
            fields: spec.fields.clone(),
        }
    }
}

/// The outcome of [`Policy::decide`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Decision {
    /// The action of the matching rule or default, whatever the mode.
    pub action: Action,
    /// Name of the matching rule, or `default/<class>` for a class default, or
    /// `default/allow` when nothing matched and no default is set.
    pub rule: String,
    /// Name of the policy the rule or default comes from; `None` for the built-in allow.
    pub policy: Option<String>,
    pub mode: Mode,
    /// Present when `action` is `review`.
    pub review: Option<ReviewSettings>,
    pub mask: MaskSettings,
}

impl Decision {
    /// The action to carry out: `allow` in audit mode, else `action`.
    pub fn enforced(&self) -> Action {
        match self.mode {
            Mode::Audit => Action::Allow,
            Mode::Enforce => self.action,
        }
    }

    /// Whether the decision would have blocked or held the request but the mode let it pass.
    pub fn audit_only(&self) -> bool {
        self.mode == Mode::Audit && self.action != Action::Allow
    }
}

/// One rule, ready to evaluate.
#[derive(Clone, Debug)]
struct CompiledRule {
    policy: usize,
    spec: RuleSpec,
    /// Bit per target class (see `class_bit`); all bits when the rule names no class.
    classes: u8,
    review: Option<ReviewSettings>,
    mask: Option<MaskSettings>,
}

/// A default of one target class.
#[derive(Clone, Debug)]
struct CompiledDefault {
    policy: usize,
    action: Action,
    review: Option<ReviewSettings>,
    mask: Option<MaskSettings>,
}

/// Origin of a loaded policy, for listings and messages.
#[derive(Clone, Debug, Serialize)]
pub struct PolicySource {
    pub name: String,
    pub file: String,
    pub mode: Mode,
    pub rules: usize,
}

/// The loaded policies, evaluated as one.
#[derive(Clone, Debug, Default)]
pub struct Policy {
    sources: Vec<PolicySource>,
    rules: Vec<CompiledRule>,
    defaults: [Option<CompiledDefault>; 4],
    index: super::index::RuleIndex,
}

fn class_index(class: TargetClass) -> usize {
    match class {
        TargetClass::KubeApi => 0,
        TargetClass::Postgres => 1,
        TargetClass::Mysql => 2,
        TargetClass::Tcp => 3,
    }
}

fn class_bit(class: TargetClass) -> u8 {
    1 << class_index(class)
}

impl Policy {
    /// Combines policies in evaluation order. `file` names each policy's source. Fails when
    /// two policies share a name, two rules of one policy share a name, or two policies set a
    /// default for the same class.
    pub fn build(policies: Vec<(String, AccessPolicySpec)>) -> Result<Self, String> {
        let mut built = Self::default();
        for (file, policy) in policies {
            let index = built.sources.len();
            let name = policy.metadata.name.clone();
            if let Some(other) = built.sources.iter().find(|source| source.name == name) {
                return Err(format!(
                    "policy name {name:?} is used twice (also in {}): names must be unique",
                    other.file
                ));
            }
            let body = policy.spec;
            let mut seen = std::collections::HashSet::new();
            for rule in &body.rules {
                if !seen.insert(rule.name.as_str()) {
                    return Err(format!(
                        "policy {name:?}: rule name {:?} is used twice",
                        rule.name
                    ));
                }
            }
            for class in [
                TargetClass::KubeApi,
                TargetClass::Postgres,
                TargetClass::Mysql,
                TargetClass::Tcp,
            ] {
                let Some(default) = body.defaults.get(class) else {
                    continue;
                };
                let slot = &mut built.defaults[class_index(class)];
                if let Some(existing) = slot {
                    return Err(format!(
                        "policy {name:?}: a default for {class} is already set by policy {:?}; set it in one policy only",
                        built.sources[existing.policy].name
                    ));
                }
                *slot = Some(CompiledDefault {
                    policy: index,
                    action: default.action,
                    review: review_settings(default.action, default.review.as_ref()),
                    mask: default.masking.as_ref().map(MaskSettings::from),
                });
            }
            built.sources.push(PolicySource {
                name,
                file,
                mode: body.mode,
                rules: body.rules.len(),
            });
            for rule in body.rules {
                let classes = match &rule.targets {
                    Some(targets) if !targets.classes.is_empty() => targets
                        .classes
                        .iter()
                        .fold(0, |bits, class| bits | class_bit(*class)),
                    _ => u8::MAX,
                };
                let position = u32::try_from(built.rules.len())
                    .map_err(|_| "more than 2^32 rules".to_string())?;
                built.index.add(position, &rule);
                built.rules.push(CompiledRule {
                    policy: index,
                    classes,
                    review: review_settings(rule.action, rule.review.as_ref()),
                    mask: rule.masking.as_ref().map(MaskSettings::from),
                    spec: rule,
                });
            }
        }
        Ok(built)
    }

    /// The policies in evaluation order.
    pub fn sources(&self) -> &[PolicySource] {
        &self.sources
    }

    pub fn rule_count(&self) -> usize {
        self.rules.len()
    }

    /// Decides one request.
    pub fn decide(&self, subject: &Subject, target: &Target, request: Request<'_>) -> Decision {
        let bit = class_bit(target.class);
        let matched = self
            .index
            .first(subject, request, |position| {
                let rule = &self.rules[position as usize];
                rule.classes & bit != 0
                    && rule_matches_target(&rule.spec, target)
                    && rule_matches_subject(&rule.spec, subject)
                    && rule_matches_request(&rule.spec, request)
            })
            .map(|position| &self.rules[position as usize]);
        if let Some(rule) = matched {
            return Decision {
                action: rule.spec.action,
                rule: rule.spec.name.clone(),
                policy: Some(self.sources[rule.policy].name.clone()),
                mode: self.sources[rule.policy].mode,
                review: rule.review.clone(),
                mask: rule
                    .mask
                    .clone()
                    .unwrap_or_else(|| self.class_mask(target.class)),
            };
        }
        self.default_decision(target.class)
    }

    /// The masking for a session to `target` from `subject`: that of the first rule that
    /// matches subject and target and sets masking, else the class default's, else the
    /// built-in default (first six and last four digits readable).
    pub fn session_mask(&self, subject: &Subject, target: &Target) -> MaskSettings {
        let bit = class_bit(target.class);
        self.rules
            .iter()
            .filter(|rule| rule.mask.is_some() && rule.classes & bit != 0)
            .find(|rule| {
                rule_matches_target(&rule.spec, target) && rule_matches_subject(&rule.spec, subject)
            })
            .and_then(|rule| rule.mask.clone())
            .unwrap_or_else(|| self.class_mask(target.class))
    }

    fn class_mask(&self, class: TargetClass) -> MaskSettings {
        self.defaults[class_index(class)]
            .as_ref()
            .and_then(|default| default.mask.clone())
            .unwrap_or_default()
    }

    fn default_decision(&self, class: TargetClass) -> Decision {
        match &self.defaults[class_index(class)] {
            Some(default) => Decision {
                action: default.action,
                rule: format!("default/{class}"),
                policy: Some(self.sources[default.policy].name.clone()),
                mode: self.sources[default.policy].mode,
                review: default.review.clone(),
                mask: default.mask.clone().unwrap_or_default(),
            },
            None => Decision {
                action: Action::Allow,
                rule: "default/allow".to_string(),
                policy: None,
                mode: Mode::Enforce,
                review: None,
                mask: MaskSettings::default(),
            },
        }
    }
}

fn review_settings(action: Action, spec: Option<&ReviewSpec>) -> Option<ReviewSettings> {
    (action == Action::Review).then(|| {
        spec.map(ReviewSettings::from)
            .unwrap_or_else(|| (&ReviewSpec::default()).into())
    })
}

fn rule_matches_target(rule: &RuleSpec, target: &Target) -> bool {
    match &rule.targets {
        Some(targets) if !targets.names.is_empty() => targets.names.contains(&target.name),
        _ => true,
    }
}

fn rule_matches_subject(rule: &RuleSpec, subject: &Subject) -> bool {
    if let Some(wanted) = rule.token_pod_mismatch
        && wanted != subject.token_pod_mismatch
    {
        return false;
    }
    match &rule.subjects {
        Some(subjects) => subject_matches(subjects, subject),
        None => true,
    }
}

fn subject_matches(wanted: &SubjectMatch, subject: &Subject) -> bool {
    if let Some(unknown) = wanted.unknown
        && unknown != subject.is_unknown()
    {
        return false;
    }
    if !wanted.namespaces.is_empty() {
        let Some(namespace) = &subject.namespace else {
            return false;
        };
        if !wanted.namespaces.iter().any(|wanted| wanted == namespace) {
            return false;
        }
    }
    if !wanted.service_accounts.is_empty() {
        let (Some(namespace), Some(account)) = (&subject.namespace, &subject.service_account)
        else {
            return false;
        };
        let listed = wanted
            .service_accounts
            .iter()
            .any(|(wanted_namespace, wanted_account)| {
                wanted_namespace == namespace && wanted_account == account
            });
        if !listed {
            return false;
        }
    }
    match &wanted.selector {
        // A selector needs pod labels, which an unknown subject does not have.
        Some(selector) => !subject.is_unknown() && selector_matches(selector, &subject.labels),
        None => true,
    }
}

fn selector_matches(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    let labels_match = selector
        .match_labels
        .iter()
        .all(|(key, value)| labels.get(key) == Some(value));
    labels_match
        && selector.match_expressions.iter().all(|requirement| {
            let value = labels.get(&requirement.key);
            match requirement.operator {
                SelectorOperator::In => {
                    value.is_some_and(|value| requirement.values.contains(value))
                }
                SelectorOperator::NotIn => {
                    value.is_none_or(|value| !requirement.values.contains(value))
                }
                SelectorOperator::Exists => value.is_some(),
                SelectorOperator::DoesNotExist => value.is_none(),
            }
        })
}

fn rule_matches_request(rule: &RuleSpec, request: Request<'_>) -> bool {
    match request {
        Request::Kube(kube) => {
            rule.sql.is_none()
                && rule
                    .kube
                    .as_ref()
                    .is_none_or(|wanted| kube_matches(wanted, kube))
        }
        Request::Sql(statement) => {
            rule.kube.is_none()
                && rule
                    .sql
                    .as_ref()
                    .is_none_or(|wanted| sql_matches(wanted, statement))
        }
    }
}

/// `*` in any list matches every value, as in Kubernetes RBAC rules.
fn listed(list: &[String], value: &str) -> bool {
    list.is_empty() || list.iter().any(|item| item == "*" || item == value)
}

fn kube_matches(wanted: &KubeMatch, request: &KubeRequest) -> bool {
    if !(listed(&wanted.verbs, &request.verb)
        && listed(&wanted.groups, &request.group)
        && listed(&wanted.resources, &request.resource)
        && listed(&wanted.subresources, &request.subresource)
        && listed(&wanted.namespaces, &request.namespace)
        && listed(&wanted.names, &request.name))
    {
        return false;
    }
    let needs_exec = wanted.stdin.is_some() || wanted.tty.is_some() || !wanted.commands.is_empty();
    if !needs_exec {
        return true;
    }
    let Some(exec) = &request.exec else {
        return false;
    };
    if wanted.stdin.is_some_and(|stdin| stdin != exec.stdin)
        || wanted.tty.is_some_and(|tty| tty != exec.tty)
    {
        return false;
    }
    wanted.commands.is_empty()
        || exec.command.first().is_some_and(|program| {
            let base = program.rsplit('/').next().unwrap_or(program);
            wanted
                .commands
                .iter()
                .any(|command| command == program || command == base)
        })
}

fn sql_matches(wanted: &SqlMatch, statement: &StatementInfo) -> bool {
    let kind_matches = wanted.statement_kinds.is_empty()
        || wanted
            .statement_kinds
            .iter()
            .any(|kind| statement.has_kind(kind));
    let table_matches = wanted.tables.is_empty()
        || statement.tables.iter().any(|table| {
            wanted
                .tables
                .iter()
                .any(|wanted| super::table_name_matches(table, wanted))
        });
    let where_matches = !wanted.without_where || statement.has_where == Some(false);
    kind_matches && table_matches && where_matches
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sql::{SqlDialect, analyze};

    impl Policy {
        /// Finds the first matching rule by trying every rule in order, without the index.
        fn decide_linear(
            &self,
            subject: &Subject,
            target: &Target,
            request: Request<'_>,
        ) -> String {
            let bit = class_bit(target.class);
            self.rules
                .iter()
                .find(|rule| {
                    rule.classes & bit != 0
                        && rule_matches_target(&rule.spec, target)
                        && rule_matches_subject(&rule.spec, subject)
                        && rule_matches_request(&rule.spec, request)
                })
                .map_or_else(
                    || self.default_decision(target.class).rule,
                    |rule| rule.spec.name.clone(),
                )
        }
    }

    /// Rules drawing their conditions from small value sets, so that many overlap.
    fn overlapping_policy() -> Policy {
        let namespaces = ["prod", "dev"];
        let tables = ["cards", "public.cards", "Users"];
        let kinds = ["select", "delete", "update"];
        let mut text = String::from(
            "apiVersion: gateway.example.dev/v1alpha1\nkind: AccessPolicy\nmetadata: {name: p}\nspec:\n  rules:\n",
        );
        for index in 0..240usize {
            let namespace = namespaces[index % 2];
            let table = tables[index % 3];
            let kind = kinds[(index / 3) % 3];
            let rule = match index % 8 {
                0 => format!(
                    "{{name: r{index}, subjects: {{namespaces: [{namespace}]}}, sql: {{tables: ['{table}']}}, action: deny}}"
                ),
                1 => format!(
                    "{{name: r{index}, sql: {{tables: ['{table}'], statementKinds: [{kind}]}}, action: deny}}"
                ),
                2 => format!(
                    "{{name: r{index}, subjects: {{serviceAccounts: [{namespace}/api]}}, action: review}}"
                ),
                3 => format!(
                    "{{name: r{index}, subjects: {{selector: {{matchLabels: {{app: a{}}}}}}}, action: deny}}",
                    index % 3
                ),
                4 => format!(
                    "{{name: r{index}, sql: {{statementKinds: [{kind}], withoutWhere: {}}}, action: deny}}",
                    index % 16 == 4 && kind != "select"
                ),
                5 => format!(
                    "{{name: r{index}, kube: {{verbs: [get, create], resources: [secrets]}}, action: deny}}"
                ),
                6 => format!(
                    "{{name: r{index}, kube: {{verbs: ['{}']}}, action: deny}}",
                    if index % 16 == 6 { "*" } else { "delete" }
                ),
                _ => format!(
                    "{{name: r{index}, subjects: {{unknown: {}}}, action: allow}}",
                    index % 16 == 7
                ),
            };
            text.push_str(&format!("    - {rule}\n"));
        }
        let objects = super::super::load::parse_objects(std::path::Path::new("p.yaml"), &text)
            .expect("policy parses");
        Policy::build(objects).expect("policy builds")
    }

    #[test]
    fn index_agrees_with_linear_scan() {
        let policy = overlapping_policy();
        let mut subjects = vec![Subject::unknown()];
        for namespace in ["prod", "dev", "other"] {
            for account in ["api", "web"] {
                for app in ["a0", "a1", "a2", "zz"] {
                    subjects.push(Subject {
                        namespace: Some(namespace.into()),
                        service_account: Some(account.into()),
                        labels: [("app".to_string(), app.to_string())].into(),
                        ..Subject::default()
                    });
                }
            }
        }
        let statements: Vec<StatementInfo> = [
            "SELECT * FROM cards",
            "DELETE FROM public.cards WHERE id = 1",
            "DELETE FROM CARDS",
            "UPDATE users SET a = 1",
            "SELECT * FROM other.users",
            "INSERT INTO t VALUES (1)",
            // An upsert also matches rules on `update`, through the index too.
            "INSERT INTO cards (id) VALUES (1) ON CONFLICT (id) DO UPDATE SET id = 2",
        ]
        .iter()
        .map(|sql| analyze(sql, SqlDialect::Postgres).remove(0))
        .collect();
        let kubes: Vec<KubeRequest> = [
            ("get", "secrets"),
            ("delete", "pods"),
            ("list", "secrets"),
            ("create", "secrets"),
        ]
        .iter()
        .map(|(verb, resource)| KubeRequest {
            verb: (*verb).into(),
            resource: (*resource).into(),
            ..KubeRequest::default()
        })
        .collect();
        let database = Target {
            class: TargetClass::Postgres,
            name: "db".into(),
        };
        let api = Target {
            class: TargetClass::KubeApi,
            name: "api".into(),
        };
        let mut compared = 0;
        for subject in &subjects {
            for statement in &statements {
                let request = Request::Sql(statement);
                assert_eq!(
                    policy.decide(subject, &database, request).rule,
                    policy.decide_linear(subject, &database, request),
                    "{subject:?} {statement:?}"
                );
                compared += 1;
            }
            for kube in &kubes {
                let request = Request::Kube(kube);
                assert_eq!(
                    policy.decide(subject, &api, request).rule,
                    policy.decide_linear(subject, &api, request),
                    "{subject:?} {kube:?}"
                );
                compared += 1;
            }
        }
        assert_eq!(compared, subjects.len() * 11);
    }
}
