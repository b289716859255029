//! Access decisions.
//!
//! Policies are `AccessPolicy` objects (`spec`: YAML types and their checks, `load`: files,
//! directories and reloading, `eval`: the ordered rule list and [`Policy::decide`]). The
//! protocol handlers build a [`Subject`], a [`Target`] and a [`Request`] and act on the
//! returned [`Decision`]; holding a request for review is the `approval` module's part.
//!
//! The configuration file's `sql_rules` predate policies. [`policy_from_sql_rules`] turns them
//! into an equivalent policy (one deny rule each, mode `enforce`) for daemons without a
//! `policy.path`; [`judge_sql`] still evaluates them directly for handlers not yet moved over.
//! The Kubernetes API handler's `kube_rules` (deny only) are judged by [`judge_kube`].

pub mod eval;
mod index;
pub mod load;
pub mod spec;

pub use eval::{
    Decision as PolicyDecision, ExecAttributes, KubeRequest, MaskSettings, Policy, PolicySource,
    Request, ReviewSettings, Subject, Target,
};
pub use load::{PolicyError, PolicyStatus, PolicyStore, load_path};
pub use spec::{API_VERSION, Action, KIND, Mode, ReviewScope};

use serde::Deserialize;

use crate::sql::StatementInfo;

/// A rule that denies the statements it matches. Every condition given must hold.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SqlRule {
    /// Name shown to the client and written to the recording.
    pub name: String,
    /// Statement kinds the rule matches (`drop`, `delete`, ...); empty matches every kind.
    #[serde(default)]
    pub statement_kinds: Vec<String>,
    /// Tables the rule matches (any of them); empty matches every table.
    #[serde(default)]
    pub tables: Vec<String>,
    /// Matches only DELETE and UPDATE statements without a WHERE clause.
    #[serde(default)]
    pub without_where: bool,
}

/// Statement kinds a rule may name: what `sql::analyze` reports for parsed statements, the
/// first keyword of the SQL commands PostgreSQL and MySQL have beyond those, and the gateway's
/// own `function_call`, `unparsed` and `empty`.
pub const STATEMENT_KINDS: &[&str] = &[
    "select",
    "insert",
    "update",
    "delete",
    "merge",
    "drop",
    "truncate",
    "create",
    "alter",
    "grant",
    "revoke",
    "copy",
    "call",
    "do",
    "set",
    "show",
    "begin",
    "start",
    "commit",
    "rollback",
    "savepoint",
    "release",
    "prepare",
    "execute",
    "deallocate",
    "explain",
    "analyze",
    "vacuum",
    "reindex",
    "cluster",
    "checkpoint",
    "lock",
    "listen",
    "notify",
    "unlisten",
    "discard",
    "reset",
    "comment",
    "security",
    "refresh",
    "import",
    "load",
    "declare",
    "fetch",
    "move",
    "close",
    "values",
    "with",
    "table",
    "use",
    "replace",
    "rename",
    "optimize",
    "flush",
    "kill",
    "install",
    "uninstall",
    "handler",
    "function_call",
    "unparsed",
    "empty",
];

/// Tells whether a rule may name statement kind `kind` (lower case): one of
/// [`STATEMENT_KINDS`] or a PostgreSQL replication command.
pub fn is_statement_kind(kind: &str) -> bool {
    STATEMENT_KINDS.contains(&kind) || crate::sql::REPLICATION_COMMANDS.contains(&kind)
}

/// Lists every statement kind a rule may name, for error messages.
pub fn statement_kinds_list() -> String {
    STATEMENT_KINDS
        .iter()
        .chain(&crate::sql::REPLICATION_COMMANDS)
        .copied()
        .collect::<Vec<_>>()
        .join(", ")
}

impl SqlRule {
    /// Checks the rule's fields; returns the first problem as (field, message).
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if self.name.trim().is_empty() {
            return Err(("name", "must not be empty: denials quote it".to_string()));
        }
        if let Some(kind) = self
            .statement_kinds
            .iter()
            .find(|kind| !is_statement_kind(&kind.to_ascii_lowercase()))
        {
            return Err((
                "statement_kinds",
                format!(
                    "unknown statement kind {kind:?}; known kinds: {}",
                    statement_kinds_list()
                ),
            ));
        }
        if self.statement_kinds.is_empty() && self.tables.is_empty() && !self.without_where {
            return Err((
                "statement_kinds",
                "the rule has no condition and would deny every statement; name kinds, tables or without_where".to_string(),
            ));
        }
        Ok(())
    }
}

/// Outcome of judging a statement.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    Allow,
    Deny { rule: String },
}

impl SqlRule {
    fn matches(&self, statement: &StatementInfo) -> bool {
        let kind_matches = self.statement_kinds.is_empty()
            || self
                .statement_kinds
                .iter()
                .any(|kind| statement.has_kind(kind));
        let table_matches = self.tables.is_empty()
            || statement.tables.iter().any(|table| {
                self.tables
                    .iter()
                    .any(|wanted| table_name_matches(table, wanted))
            });
        let where_matches = !self.without_where || statement.has_where == Some(false);
        kind_matches && table_matches && where_matches
    }
}

/// Compares a table named in a statement with one named in a rule, ignoring ASCII case. A
/// rule naming `cards` also matches `public.cards`.
pub(crate) fn table_name_matches(table: &str, wanted: &str) -> bool {
    table.eq_ignore_ascii_case(wanted)
        || table
            .rsplit('.')
            .next()
            .is_some_and(|bare| bare.eq_ignore_ascii_case(wanted))
}

/// Builds the policy equivalent to the configuration's `sql_rules`: a policy named
/// `config-sql-rules`, mode `enforce`, with one deny rule per SQL rule, in order, for the
/// `postgres` and `mysql` classes.
pub fn policy_from_sql_rules(rules: &[SqlRule]) -> Policy {
    if rules.is_empty() {
        return Policy::default();
    }
    let rules = rules
        .iter()
        .map(|rule| spec::RuleSpec {
            name: rule.name.clone(),
            subjects: None,
            targets: Some(spec::TargetMatch {
                classes: vec![
                    crate::config::TargetClass::Postgres,
                    crate::config::TargetClass::Mysql,
                ],
                names: Vec::new(),
            }),
            kube: None,
            sql: Some(spec::SqlMatch {
                statement_kinds: rule
                    .statement_kinds
                    .iter()
                    .map(|kind| kind.to_ascii_lowercase())
                    .collect(),
                tables: rule.tables.clone(),
                without_where: rule.without_where,
            }),
            token_pod_mismatch: None,
            action: Action::Deny,
            review: None,
            masking: None,
        })
        .collect();
    let object = spec::AccessPolicySpec {
        api_version: spec::ApiVersion,
        kind: spec::Kind,
        metadata: spec::Metadata {
            name: "config-sql-rules".to_string(),
            namespace: None,
            labels: Default::default(),
            annotations: Default::default(),
        },
        spec: spec::PolicyBody {
            mode: Mode::Enforce,
            defaults: spec::ClassDefaults::default(),
            rules,
        },
    };
    Policy::build(vec![("config file sql_rules".to_string(), object)])
        .expect("config validation keeps sql_rule names unique")
}

/// Judges one statement against the rules in order.
pub fn judge_sql(rules: &[SqlRule], statement: &StatementInfo) -> Decision {
    match rules.iter().find(|rule| rule.matches(statement)) {
        Some(rule) => Decision::Deny {
            rule: rule.name.clone(),
        },
        None => Decision::Allow,
    }
}

/// A rule that denies the Kubernetes API requests it matches. Every condition given must hold;
/// an empty list matches any value.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct KubeRule {
    /// Name shown to the client in the `Forbidden` status and written to the recording.
    pub name: String,
    /// Verbs as the API server derives them (`get`, `list`, `watch`, `create`, ...).
    #[serde(default)]
    pub verbs: Vec<String>,
    /// API groups; `""` is the core group.
    #[serde(default)]
    pub groups: Vec<String>,
    /// Resources, such as `pods` or `secrets`.
    #[serde(default)]
    pub resources: Vec<String>,
    /// Subresources, such as `exec`, `attach`, `portforward` or `log`.
    #[serde(default)]
    pub subresources: Vec<String>,
    #[serde(default)]
    pub namespaces: Vec<String>,
    /// Object names.
    #[serde(default)]
    pub names: Vec<String>,
    /// Matches only exec and attach requests whose `stdin` parameter equals this value.
    #[serde(default)]
    pub stdin: Option<bool>,
    /// Matches only exec and attach requests whose `tty` parameter equals this value.
    #[serde(default)]
    pub tty: Option<bool>,
    /// Matches only requests whose bearer token was issued for a pod other than the caller.
    #[serde(default)]
    pub token_pod_mismatch: Option<bool>,
}

/// Verbs a Kubernetes rule may name: the API server's request verbs.
pub const KUBE_VERBS: &[&str] = &[
    "get",
    "list",
    "watch",
    "create",
    "update",
    "patch",
    "delete",
    "deletecollection",
    "proxy",
    // Verbs of non-resource requests (`/healthz`, `/version`) are the lowercase HTTP method.
    "post",
    "put",
    "head",
    "options",
];

/// The attributes of one Kubernetes API request that rules can match.
#[derive(Clone, Copy, Debug, Default)]
pub struct KubeRequestFacts<'a> {
    pub verb: &'a str,
    pub group: &'a str,
    pub resource: &'a str,
    pub subresource: &'a str,
    pub namespace: &'a str,
    pub name: &'a str,
    /// The `stdin` parameter of an exec or attach request; `None` for other requests.
    pub stdin: Option<bool>,
    /// The `tty` parameter of an exec or attach request; `None` for other requests.
    pub tty: Option<bool>,
    /// Whether the bearer token names a pod other than the caller; `None` when either side is
    /// unknown.
    pub token_pod_mismatch: Option<bool>,
}

impl KubeRule {
    /// Checks the rule's fields; returns the first problem as (field, message).
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if self.name.trim().is_empty() {
            return Err(("name", "must not be empty: denials quote it".to_string()));
        }
        if let Some(verb) = self
            .verbs
            .iter()
            .find(|verb| !KUBE_VERBS.contains(&verb.as_str()))
        {
            return Err((
                "verbs",
                format!(
                    "unknown verb {verb:?}; known verbs: {}",
                    KUBE_VERBS.join(", ")
                ),
            ));
        }
        let has_condition = !(self.verbs.is_empty()
            && self.groups.is_empty()
            && self.resources.is_empty()
            && self.subresources.is_empty()
            && self.namespaces.is_empty()
            && self.names.is_empty())
            || self.stdin.is_some()
            || self.tty.is_some()
            || self.token_pod_mismatch.is_some();
        if !has_condition {
            return Err((
                "verbs",
                "the rule has no condition and would deny every request; name verbs, resources \
                 or another attribute"
                    .to_string(),
            ));
        }
        Ok(())
    }

    fn matches(&self, request: &KubeRequestFacts<'_>) -> bool {
        let listed = |values: &[String], value: &str| {
            values.is_empty() || values.iter().any(|wanted| wanted == value)
        };
        let flag = |wanted: Option<bool>, actual: Option<bool>| {
            wanted.is_none_or(|wanted| actual == Some(wanted))
        };
        listed(&self.verbs, request.verb)
            && listed(&self.groups, request.group)
            && listed(&self.resources, request.resource)
            && listed(&self.subresources, request.subresource)
            && listed(&self.namespaces, request.namespace)
            && listed(&self.names, request.name)
            && flag(self.stdin, request.stdin)
            && flag(self.tty, request.tty)
            && flag(self.token_pod_mismatch, request.token_pod_mismatch)
    }
}

/// Judges one Kubernetes API request against the rules in order.
// NOTE: rules only deny for now. `review` (holding a request for a human approval) belongs
// here once the AccessPolicy module replaces the configuration file's rules.
pub fn judge_kube(rules: &[KubeRule], request: &KubeRequestFacts<'_>) -> Decision {
    match rules.iter().find(|rule| rule.matches(request)) {
        Some(rule) => Decision::Deny {
            rule: rule.name.clone(),
        },
        None => Decision::Allow,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sql::{SqlDialect, analyze};

    fn rules() -> Vec<SqlRule> {
        serde_yaml::from_str(
            "- name: no-drop\n  statement_kinds: [drop]\n\
             - name: no-unbounded-delete\n  statement_kinds: [delete, update]\n  without_where: true\n\
             - name: no-secrets\n  tables: [secrets]\n",
        )
        .expect("valid rules")
    }

    fn decide(sql: &str) -> Decision {
        judge_sql(&rules(), &analyze(sql, SqlDialect::Postgres)[0])
    }

    #[test]
    fn rules_deny_and_allow() {
        assert_eq!(
            decide("DROP TABLE t"),
            Decision::Deny {
                rule: "no-drop".into()
            }
        );
        assert_eq!(
            decide("DELETE FROM t"),
            Decision::Deny {
                rule: "no-unbounded-delete".into()
            }
        );
        assert_eq!(decide("DELETE FROM t WHERE id = 1"), Decision::Allow);
        assert_eq!(
            decide("SELECT * FROM public.secrets"),
            Decision::Deny {
                rule: "no-secrets".into()
            }
        );
        assert_eq!(decide("SELECT 1"), Decision::Allow);
    }

    #[test]
    fn sql_rules_policy_decides_alike() {
        let policy = policy_from_sql_rules(&rules());
        let subject = Subject::unknown();
        for class in [
            crate::config::TargetClass::Postgres,
            crate::config::TargetClass::Mysql,
        ] {
            let target = Target {
                class,
                name: "db".to_string(),
            };
            for sql in [
                "DROP TABLE t",
                "DELETE FROM t",
                "DELETE FROM t WHERE id = 1",
                "SELECT * FROM public.secrets",
                "SELECT 1",
            ] {
                let statement = &analyze(sql, SqlDialect::Postgres)[0];
                let decision = policy.decide(&subject, &target, Request::Sql(statement));
                let expected = judge_sql(&rules(), statement);
                match expected {
                    Decision::Allow => assert_eq!(decision.action, Action::Allow, "{sql}"),
                    Decision::Deny { rule } => {
                        assert_eq!(decision.action, Action::Deny, "{sql}");
                        assert_eq!(decision.rule, rule, "{sql}");
                        assert_eq!(decision.mode, Mode::Enforce, "{sql}");
                    }
                }
            }
        }
    }

    fn kube_rules() -> Vec<KubeRule> {
        serde_yaml::from_str(
            "- name: no-interactive-exec\n  verbs: [create]\n  resources: [pods]\n  subresources: [exec]\n  stdin: true\n  tty: true\n\
             - name: no-stolen-tokens\n  token_pod_mismatch: true\n\
             - name: no-secret-writes\n  verbs: [create, update, patch]\n  resources: [secrets]\n",
        )
        .expect("valid rules")
    }

    #[test]
    fn kube_rules_deny_and_allow() {
        let rules = kube_rules();
        let exec = KubeRequestFacts {
            verb: "create",
            resource: "pods",
            subresource: "exec",
            namespace: "default",
            name: "web",
            stdin: Some(true),
            tty: Some(true),
            ..KubeRequestFacts::default()
        };
        assert_eq!(
            judge_kube(&rules, &exec),
            Decision::Deny {
                rule: "no-interactive-exec".into()
            }
        );
        let batch_exec = KubeRequestFacts {
            tty: Some(false),
            ..exec
        };
        assert_eq!(judge_kube(&rules, &batch_exec), Decision::Allow);
        let stolen = KubeRequestFacts {
            verb: "list",
            resource: "pods",
            token_pod_mismatch: Some(true),
            ..KubeRequestFacts::default()
        };
        assert_eq!(
            judge_kube(&rules, &stolen),
            Decision::Deny {
                rule: "no-stolen-tokens".into()
            }
        );
        let unknown_token = KubeRequestFacts {
            token_pod_mismatch: None,
            ..stolen
        };
        assert_eq!(judge_kube(&rules, &unknown_token), Decision::Allow);
        let secret = KubeRequestFacts {
            verb: "create",
            resource: "secrets",
            ..KubeRequestFacts::default()
        };
        assert_eq!(
            judge_kube(&rules, &secret),
            Decision::Deny {
                rule: "no-secret-writes".into()
            }
        );
    }

    #[test]
    fn kube_rule_validation() {
        let rules = kube_rules();
        assert!(rules.iter().all(|rule| rule.validate().is_ok()));
        let empty: KubeRule = serde_yaml::from_str("name: everything\n").expect("valid YAML");
        assert_eq!(empty.validate().map_err(|(field, _)| field), Err("verbs"));
        let typo: KubeRule =
            serde_yaml::from_str("name: typo\nverbs: [craete]\n").expect("valid YAML");
        assert_eq!(typo.validate().map_err(|(field, _)| field), Err("verbs"));
    }
}
