//! The `AccessPolicy` object as written in YAML, and the checks each part passes while it is
//! read. Checks run inside deserialization (`try_from`), so a rejected value is reported with
//! the line and the field path that serde_yaml and serde_path_to_error attach to it.

use std::{collections::BTreeMap, time::Duration};

use serde::Deserialize;

use super::{is_statement_kind, statement_kinds_list};
use crate::config::TargetClass;

/// API group and version of every `AccessPolicy` object.
pub const API_VERSION: &str = "gateway.example.dev/v1alpha1";
/// The only kind this loader reads.
pub const KIND: &str = "AccessPolicy";
/// Time a held request waits for an answer when its rule sets no deadline.
pub const DEFAULT_REVIEW_DEADLINE: Duration = Duration::from_secs(300);
/// Maximum deadline a rule may set. A held database statement keeps its transaction and locks
/// open while it waits, so a day is already far beyond what a client should be kept waiting.
pub const MAX_REVIEW_DEADLINE: Duration = Duration::from_secs(24 * 3600);

/// One `AccessPolicy` object.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AccessPolicySpec {
    pub api_version: ApiVersion,
    pub kind: Kind,
    pub metadata: Metadata,
    pub spec: PolicyBody,
}

/// `apiVersion`, accepted only when it is [`API_VERSION`].
#[derive(Clone, Debug)]
pub struct ApiVersion;

impl<'de> Deserialize<'de> for ApiVersion {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        if text == API_VERSION {
            Ok(Self)
        } else {
            Err(serde::de::Error::custom(format!(
                "unsupported apiVersion {text:?}: expected {API_VERSION}"
            )))
        }
    }
}

/// `kind`, accepted only when it is [`KIND`].
#[derive(Clone, Debug)]
pub struct Kind;

impl<'de> Deserialize<'de> for Kind {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        if text == KIND {
            Ok(Self)
        } else {
            Err(serde::de::Error::custom(format!(
                "unsupported kind {text:?}: expected {KIND}"
            )))
        }
    }
}

/// `metadata`: the name, plus the labels and annotations Kubernetes tooling adds.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metadata {
    #[serde(deserialize_with = "non_empty_name")]
    pub name: String,
    /// Accepted so that objects copied from a cluster load; not used for decisions.
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
}

/// `spec` of an `AccessPolicy`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyBody {
    #[serde(default)]
    pub mode: Mode,
    /// Decision per target class when no rule matches.
    #[serde(default)]
    pub defaults: ClassDefaults,
    #[serde(default)]
    pub rules: Vec<RuleSpec>,
}

/// Whether decisions are carried out.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Decide and record what would have happened, but let every request through.
    Audit,
    /// Carry decisions out.
    #[default]
    Enforce,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Audit => "audit",
            Self::Enforce => "enforce",
        }
    }
}

/// What a rule or default does with a request.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Allow,
    Deny,
    /// Hold the request until a person approves or denies it.
    Review,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Allow => "allow",
            Self::Deny => "deny",
            Self::Review => "review",
        }
    }
}

/// `spec.defaults`: one optional entry per target class.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClassDefaults {
    #[serde(default)]
    pub kube_api: Option<DefaultSpec>,
    #[serde(default)]
    pub postgres: Option<DefaultSpec>,
    #[serde(default)]
    pub mysql: Option<DefaultSpec>,
    #[serde(default)]
    pub tcp: Option<DefaultSpec>,
}

impl ClassDefaults {
    pub fn get(&self, class: TargetClass) -> Option<&DefaultSpec> {
        match class {
            TargetClass::KubeApi => self.kube_api.as_ref(),
            TargetClass::Postgres => self.postgres.as_ref(),
            TargetClass::Mysql => self.mysql.as_ref(),
            TargetClass::Tcp => self.tcp.as_ref(),
        }
    }
}

/// The default of one target class.
#[derive(Clone, Debug, Deserialize)]
#[serde(try_from = "DefaultSpecFields")]
pub struct DefaultSpec {
    pub action: Action,
    pub review: Option<ReviewSpec>,
    pub masking: Option<MaskingSpec>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DefaultSpecFields {
    action: Action,
    #[serde(default)]
    review: Option<ReviewSpec>,
    #[serde(default)]
    masking: Option<MaskingSpec>,
}

impl TryFrom<DefaultSpecFields> for DefaultSpec {
    type Error = String;

    fn try_from(fields: DefaultSpecFields) -> Result<Self, String> {
        check_review(fields.action, fields.review.as_ref())?;
        Ok(Self {
            action: fields.action,
            review: fields.review,
            masking: fields.masking,
        })
    }
}

/// One rule of `spec.rules`. Every condition given must hold for the rule to match; a missing
/// condition matches anything.
#[derive(Clone, Debug, Deserialize)]
#[serde(try_from = "RuleFields")]
pub struct RuleSpec {
    pub name: String,
    pub subjects: Option<SubjectMatch>,
    pub targets: Option<TargetMatch>,
    pub kube: Option<KubeMatch>,
    pub sql: Option<SqlMatch>,
    pub token_pod_mismatch: Option<bool>,
    pub action: Action,
    pub review: Option<ReviewSpec>,
    pub masking: Option<MaskingSpec>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RuleFields {
    name: String,
    #[serde(default)]
    subjects: Option<SubjectMatch>,
    #[serde(default)]
    targets: Option<TargetMatch>,
    #[serde(default)]
    kube: Option<KubeMatch>,
    #[serde(default)]
    sql: Option<SqlMatch>,
    #[serde(default)]
    token_pod_mismatch: Option<bool>,
    action: Action,
    #[serde(default)]
    review: Option<ReviewSpec>,
    #[serde(default)]
    masking: Option<MaskingSpec>,
}

impl TryFrom<RuleFields> for RuleSpec {
    type Error = String;

    fn try_from(fields: RuleFields) -> Result<Self, String> {
        if fields.name.trim().is_empty() {
            return Err("rule name must not be empty: denials and recordings quote it".into());
        }
        if fields.kube.is_some() && fields.sql.is_some() {
            return Err(format!(
                "rule {:?} sets both `kube` and `sql`, so no request can match it: split it into two rules",
                fields.name
            ));
        }
        if let Some(targets) = &fields.targets {
            let sql_only = fields.sql.is_some();
            let kube_only = fields.kube.is_some();
            let classes = &targets.classes;
            if sql_only
                && !classes.is_empty()
                && !classes
                    .iter()
                    .any(|class| matches!(class, TargetClass::Postgres | TargetClass::Mysql))
            {
                return Err(format!(
                    "rule {:?} matches SQL statements but its target classes include no database (postgres, mysql)",
                    fields.name
                ));
            }
            if kube_only && !classes.is_empty() && !classes.contains(&TargetClass::KubeApi) {
                return Err(format!(
                    "rule {:?} matches Kubernetes requests but its target classes do not include kube_api",
                    fields.name
                ));
            }
        }
        check_review(fields.action, fields.review.as_ref())
            .map_err(|message| format!("rule {:?}: {message}", fields.name))?;
        Ok(Self {
            name: fields.name,
            subjects: fields.subjects,
            targets: fields.targets,
            kube: fields.kube,
            sql: fields.sql,
            token_pod_mismatch: fields.token_pod_mismatch,
            action: fields.action,
            review: fields.review,
            masking: fields.masking,
        })
    }
}

fn check_review(action: Action, review: Option<&ReviewSpec>) -> Result<(), String> {
    if review.is_some() && action != Action::Review {
        return Err(format!(
            "`review` settings are only valid with `action: review`, not `action: {}`",
            action.as_str()
        ));
    }
    Ok(())
}

/// `subjects`: who made the connection. All fields given must match.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(try_from = "SubjectFields")]
pub struct SubjectMatch {
    /// Pod namespaces, any of them.
    pub namespaces: Vec<String>,
    /// Service accounts as `namespace/name`, any of them.
    pub service_accounts: Vec<(String, String)>,
    pub selector: Option<LabelSelector>,
    /// `true` matches only subjects whose pod is not known; `false` only known ones.
    pub unknown: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct SubjectFields {
    #[serde(default)]
    namespaces: Vec<String>,
    #[serde(default)]
    service_accounts: Vec<String>,
    #[serde(default)]
    selector: Option<LabelSelector>,
    #[serde(default)]
    unknown: Option<bool>,
}

impl TryFrom<SubjectFields> for SubjectMatch {
    type Error = String;

    fn try_from(fields: SubjectFields) -> Result<Self, String> {
        let mut service_accounts = Vec::new();
        for account in &fields.service_accounts {
            let parsed = account
                .split_once('/')
                .filter(|(namespace, name)| {
                    !namespace.is_empty() && !name.is_empty() && !name.contains('/')
                })
                .or_else(|| {
                    // Also accept the user name the API server gives a service account.
                    let rest = account.strip_prefix("system:serviceaccount:")?;
                    rest.split_once(':')
                        .filter(|(namespace, name)| !namespace.is_empty() && !name.is_empty())
                })
                .ok_or_else(|| {
                    format!(
                        "invalid service account {account:?}: expected namespace/name or system:serviceaccount:namespace:name"
                    )
                })?;
            service_accounts.push((parsed.0.to_string(), parsed.1.to_string()));
        }
        let known_fields = !fields.namespaces.is_empty()
            || !service_accounts.is_empty()
            || fields.selector.is_some();
        if fields.unknown == Some(true) && known_fields {
            return Err(
                "`unknown: true` matches only subjects without a known pod, so it cannot be combined with namespaces, serviceAccounts or selector"
                    .into(),
            );
        }
        if !fields.namespaces.is_empty() && !service_accounts.is_empty() {
            let disjoint = service_accounts
                .iter()
                .all(|(namespace, _)| !fields.namespaces.contains(namespace));
            if disjoint {
                return Err(
                    "no service account in serviceAccounts lives in one of the listed namespaces, so the rule can never match"
                        .into(),
                );
            }
        }
        Ok(Self {
            namespaces: fields.namespaces,
            service_accounts,
            selector: fields.selector,
            unknown: fields.unknown,
        })
    }
}

/// A Kubernetes label selector: `matchLabels` and `matchExpressions`, all of which must hold.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(try_from = "SelectorFields")]
pub struct LabelSelector {
    pub match_labels: BTreeMap<String, String>,
    pub match_expressions: Vec<SelectorRequirement>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct SelectorFields {
    #[serde(default)]
    match_labels: BTreeMap<String, String>,
    #[serde(default)]
    match_expressions: Vec<SelectorRequirement>,
}

/// One `matchExpressions` entry.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SelectorRequirement {
    pub key: String,
    pub operator: SelectorOperator,
    #[serde(default)]
    pub values: Vec<String>,
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
pub enum SelectorOperator {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

impl TryFrom<SelectorFields> for LabelSelector {
    type Error = String;

    /// Rejects selectors that no label set can satisfy, and malformed requirements.
    fn try_from(fields: SelectorFields) -> Result<Self, String> {
        for key in fields.match_labels.keys() {
            check_label_key(key)?;
        }
        for requirement in &fields.match_expressions {
            let key = &requirement.key;
            check_label_key(key)?;
            match requirement.operator {
                SelectorOperator::In | SelectorOperator::NotIn if requirement.values.is_empty() => {
                    return Err(format!(
                        "matchExpressions for key {key:?}: operator {:?} needs at least one value",
                        requirement.operator
                    ));
                }
                SelectorOperator::Exists | SelectorOperator::DoesNotExist
                    if !requirement.values.is_empty() =>
                {
                    return Err(format!(
                        "matchExpressions for key {key:?}: operator {:?} takes no values",
                        requirement.operator
                    ));
                }
                _ => {}
            }
        }
        if let Some(reason) = contradiction(&fields.match_labels, &fields.match_expressions) {
            return Err(format!(
                "impossible selector: {reason}, so it can never match"
            ));
        }
        Ok(Self {
            match_labels: fields.match_labels,
            match_expressions: fields.match_expressions,
        })
    }
}

/// Finds a pair of requirements on one key that no label set satisfies together.
fn contradiction(
    labels: &BTreeMap<String, String>,
    expressions: &[SelectorRequirement],
) -> Option<String> {
    // Collect, per key, the allowed values (None = any value) and whether it must be absent.
    let mut required: BTreeMap<&str, Option<Vec<&str>>> = BTreeMap::new();
    let mut absent: BTreeMap<&str, ()> = BTreeMap::new();
    let mut excluded: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (key, value) in labels {
        required.insert(key, Some(vec![value.as_str()]));
    }
    for requirement in expressions {
        let key = requirement.key.as_str();
        let values: Vec<&str> = requirement.values.iter().map(String::as_str).collect();
        match requirement.operator {
            SelectorOperator::In => {
                let entry = required.entry(key).or_insert(None);
                let narrowed = match entry.take() {
                    None => values,
                    Some(previous) => previous
                        .into_iter()
                        .filter(|value| values.contains(value))
                        .collect(),
                };
                if narrowed.is_empty() {
                    return Some(format!(
                        "key {key:?} has no value allowed by every requirement"
                    ));
                }
                *entry = Some(narrowed);
            }
            SelectorOperator::Exists => {
                required.entry(key).or_insert(None);
            }
            SelectorOperator::DoesNotExist => {
                absent.insert(key, ());
            }
            SelectorOperator::NotIn => excluded.entry(key).or_default().extend(values),
        }
    }
    for (key, allowed) in &required {
        if absent.contains_key(key) {
            return Some(format!("key {key:?} is both required and required absent"));
        }
        if let (Some(allowed), Some(excluded)) = (allowed, excluded.get(key))
            && allowed.iter().all(|value| excluded.contains(value))
        {
            return Some(format!(
                "every value allowed for key {key:?} is also excluded"
            ));
        }
    }
    None
}

/// Checks a label key's syntax: an optional DNS-subdomain prefix and `/`, then a name of at
/// most 63 characters of alphanumerics, `-`, `_` and `.` that starts and ends alphanumeric.
fn check_label_key(key: &str) -> Result<(), String> {
    let name = match key.rsplit_once('/') {
        Some((prefix, name)) => {
            let prefix_ok = !prefix.is_empty()
                && prefix.len() <= 253
                && prefix.bytes().all(|byte| {
                    byte.is_ascii_lowercase() || byte.is_ascii_digit() || b"-.".contains(&byte)
                });
            if !prefix_ok {
                return Err(format!(
                    "invalid label key {key:?}: the prefix must be a DNS subdomain"
                ));
            }
            name
        }
        None => key,
    };
    let valid = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || b"-_.".contains(&byte))
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name.as_bytes()[name.len() - 1].is_ascii_alphanumeric();
    if valid {
        Ok(())
    } else {
        Err(format!(
            "invalid label key {key:?}: a name is 1-63 alphanumerics, '-', '_' or '.', starting and ending alphanumeric"
        ))
    }
}

/// `targets`: which targets a rule covers. All fields given must match.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetMatch {
    #[serde(default)]
    pub classes: Vec<TargetClass>,
    /// Target names as in the daemon configuration (`targets[].name`, else `address:port`).
    #[serde(default)]
    pub names: Vec<String>,
}

/// `kube`: attributes of a Kubernetes API request, as the API server attributes it.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KubeMatch {
    /// `get`, `list`, `watch`, `create`, `update`, `patch`, `delete`, `deletecollection`, or `*`.
    #[serde(default)]
    pub verbs: Vec<String>,
    /// API groups; `""` is the core group.
    #[serde(default)]
    pub groups: Vec<String>,
    #[serde(default)]
    pub resources: Vec<String>,
    #[serde(default)]
    pub subresources: Vec<String>,
    #[serde(default)]
    pub namespaces: Vec<String>,
    #[serde(default)]
    pub names: Vec<String>,
    /// For exec and attach: whether stdin is attached.
    #[serde(default)]
    pub stdin: Option<bool>,
    /// For exec and attach: whether a terminal is allocated.
    #[serde(default)]
    pub tty: Option<bool>,
    /// For exec: the program run, matched against the command's first word or its base name.
    #[serde(default)]
    pub commands: Vec<String>,
}

/// `sql`: attributes of one SQL statement.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(try_from = "SqlFields")]
pub struct SqlMatch {
    pub statement_kinds: Vec<String>,
    pub tables: Vec<String>,
    pub without_where: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct SqlFields {
    #[serde(default)]
    statement_kinds: Vec<String>,
    #[serde(default)]
    tables: Vec<String>,
    #[serde(default)]
    without_where: bool,
}

impl TryFrom<SqlFields> for SqlMatch {
    type Error = String;

    fn try_from(fields: SqlFields) -> Result<Self, String> {
        if let Some(kind) = fields
            .statement_kinds
            .iter()
            .find(|kind| !is_statement_kind(&kind.to_ascii_lowercase()))
        {
            return Err(format!(
                "unknown statement kind {kind:?}; known kinds: {}",
                statement_kinds_list()
            ));
        }
        if fields.without_where {
            let can_lack_where = fields.statement_kinds.is_empty()
                || fields.statement_kinds.iter().any(|kind| {
                    kind.eq_ignore_ascii_case("delete") || kind.eq_ignore_ascii_case("update")
                });
            if !can_lack_where {
                return Err(
                    "withoutWhere matches only DELETE and UPDATE statements, but statementKinds lists neither"
                        .into(),
                );
            }
        }
        Ok(Self {
            statement_kinds: fields
                .statement_kinds
                .iter()
                .map(|kind| kind.to_ascii_lowercase())
                .collect(),
            tables: fields.tables,
            without_where: fields.without_where,
        })
    }
}

/// `review`: how a held request waits.
#[derive(Clone, Debug, Deserialize)]
#[serde(try_from = "ReviewFields")]
pub struct ReviewSpec {
    pub deadline: Duration,
    pub scope: ReviewScope,
    pub forbid_self_approval: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ReviewFields {
    #[serde(default, with = "humantime_serde")]
    deadline: Option<Duration>,
    #[serde(default)]
    scope: ReviewScope,
    #[serde(default)]
    forbid_self_approval: bool,
}

impl TryFrom<ReviewFields> for ReviewSpec {
    type Error = String;

    fn try_from(fields: ReviewFields) -> Result<Self, String> {
        let deadline = fields.deadline.unwrap_or(DEFAULT_REVIEW_DEADLINE);
        if deadline.is_zero() || deadline > MAX_REVIEW_DEADLINE {
            return Err(format!(
                "deadline {} is out of range: use more than zero and at most {}",
                humantime::format_duration(deadline),
                humantime::format_duration(MAX_REVIEW_DEADLINE)
            ));
        }
        Ok(Self {
            deadline,
            scope: fields.scope,
            forbid_self_approval: fields.forbid_self_approval,
        })
    }
}

impl Default for ReviewSpec {
    fn default() -> Self {
        Self {
            deadline: DEFAULT_REVIEW_DEADLINE,
            scope: ReviewScope::Request,
            forbid_self_approval: false,
        }
    }
}

/// What one approval covers.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ReviewScope {
    /// Only the held request; the next one that matches is held again.
    #[default]
    Request,
    /// Every later request of the same session that matches the same rule.
    Session,
}

impl ReviewScope {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Request => "request",
            Self::Session => "session",
        }
    }
}

/// `masking`: how card numbers are masked in what the target sends back.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MaskingSpec {
    /// Digits that stay readable: `first6_last4` (the default), `last4` or `none`.
    #[serde(default)]
    pub keep: KeepDigits,
    /// Fields or columns whose whole value is masked, PAN or not (`cvv`, `card_number`).
    #[serde(default)]
    pub fields: Vec<String>,
}

/// `masking.keep`.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq, serde::Serialize)]
pub enum KeepDigits {
    #[default]
    #[serde(rename = "first6_last4")]
    FirstSixLastFour,
    #[serde(rename = "last4")]
    LastFour,
    #[serde(rename = "none")]
    Nothing,
}

impl KeepDigits {
    pub fn to_mask_keep(self) -> crate::mask::Keep {
        match self {
            Self::FirstSixLastFour => crate::mask::Keep::FirstSixLastFour,
            Self::LastFour => crate::mask::Keep::LastFour,
            Self::Nothing => crate::mask::Keep::Nothing,
        }
    }
}

fn non_empty_name<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<String, D::Error> {
    let name = String::deserialize(deserializer)?;
    if name.trim().is_empty() {
        return Err(serde::de::Error::custom("metadata.name must not be empty"));
    }
    Ok(name)
}
