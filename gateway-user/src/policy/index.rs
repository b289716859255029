//! A rule index that keeps [`super::Policy::decide`] from trying every rule.
//!
//! Each rule is filed under one condition it cannot match without (its key): a service
//! account, a namespace, a table, a pod label, a kube resource, a statement kind or a kube
//! verb, in that order of preference, because earlier ones usually narrow more. Rules with none
//! of these are filed as `always`. A request looks up its own values under each field and
//! walks the union of the lists found, in rule order, so the first rule that matches in full is
//! still the first in the policy.

use std::collections::HashMap;

use super::{
    eval::{Request, Subject},
    spec::RuleSpec,
};

/// Rule positions in policy order.
type Positions = Vec<u32>;

#[derive(Clone, Debug, Default)]
pub(super) struct RuleIndex {
    always: Positions,
    /// namespace -> service account -> rules.
    service_accounts: HashMap<String, HashMap<String, Positions>>,
    namespaces: HashMap<String, Positions>,
    /// Lower-case table names as rules write them.
    tables: HashMap<String, Positions>,
    /// label key -> value -> rules.
    labels: HashMap<String, HashMap<String, Positions>>,
    kube_resources: HashMap<String, Positions>,
    /// Lower-case statement kinds.
    statement_kinds: HashMap<String, Positions>,
    kube_verbs: HashMap<String, Positions>,
}

impl RuleIndex {
    /// Files rule number `position`; positions must be added in increasing order.
    pub(super) fn add(&mut self, position: u32, rule: &RuleSpec) {
        let push = |map: &mut HashMap<String, Positions>,
                    values: &mut dyn Iterator<Item = String>| {
            for value in values {
                let list = map.entry(value).or_default();
                if list.last() != Some(&position) {
                    list.push(position);
                }
            }
        };

        if let Some(subjects) = &rule.subjects {
            if !subjects.service_accounts.is_empty() {
                for (namespace, account) in &subjects.service_accounts {
                    let list = self
                        .service_accounts
                        .entry(namespace.clone())
                        .or_default()
                        .entry(account.clone())
                        .or_default();
                    if list.last() != Some(&position) {
                        list.push(position);
                    }
                }
                return;
            }
            if !subjects.namespaces.is_empty() {
                push(
                    &mut self.namespaces,
                    &mut subjects.namespaces.iter().cloned(),
                );
                return;
            }
        }
        if let Some(sql) = &rule.sql
            && !sql.tables.is_empty()
        {
            push(
                &mut self.tables,
                &mut sql.tables.iter().map(|table| table.to_ascii_lowercase()),
            );
            return;
        }
        if let Some((key, value)) = rule
            .subjects
            .as_ref()
            .and_then(|subjects| subjects.selector.as_ref())
            .and_then(|selector| selector.match_labels.iter().next())
        {
            self.labels
                .entry(key.clone())
                .or_default()
                .entry(value.clone())
                .or_default()
                .push(position);
            return;
        }
        if let Some(kube) = &rule.kube
            && !kube.resources.is_empty()
            && !kube.resources.iter().any(|resource| resource == "*")
        {
            push(
                &mut self.kube_resources,
                &mut kube.resources.iter().cloned(),
            );
            return;
        }
        if let Some(sql) = &rule.sql
            && !sql.statement_kinds.is_empty()
        {
            push(
                &mut self.statement_kinds,
                &mut sql
                    .statement_kinds
                    .iter()
                    .map(|kind| kind.to_ascii_lowercase()),
            );
            return;
        }
        if let Some(kube) = &rule.kube
            && !kube.verbs.is_empty()
            && !kube.verbs.iter().any(|verb| verb == "*")
        {
            push(&mut self.kube_verbs, &mut kube.verbs.iter().cloned());
            return;
        }
        self.always.push(position);
    }

    /// Calls `check` on every rule that may match, in policy order, until it returns true;
    /// returns that rule's position.
    pub(super) fn first(
        &self,
        subject: &Subject,
        request: Request<'_>,
        mut check: impl FnMut(u32) -> bool,
    ) -> Option<u32> {
        let mut lists: Vec<&[u32]> = Vec::with_capacity(8);
        lists.push(&self.always);
        if let Some(namespace) = &subject.namespace {
            if let Some(list) = self.namespaces.get(namespace) {
                lists.push(list);
            }
            if let Some(account) = &subject.service_account
                && let Some(list) = self
                    .service_accounts
                    .get(namespace)
                    .and_then(|accounts| accounts.get(account))
            {
                lists.push(list);
            }
            for (key, value) in &subject.labels {
                if let Some(list) = self.labels.get(key).and_then(|values| values.get(value)) {
                    lists.push(list);
                }
            }
        }
        match request {
            Request::Sql(statement) => {
                for kind in std::iter::once(&statement.kind).chain(&statement.also_kinds) {
                    if let Some(list) = self.statement_kinds.get(kind.to_ascii_lowercase().as_str())
                    {
                        lists.push(list);
                    }
                }
                if !self.tables.is_empty() {
                    for table in &statement.tables {
                        let table = table.to_ascii_lowercase();
                        if let Some(list) = self.tables.get(&table) {
                            lists.push(list);
                        }
                        if let Some((_, bare)) = table.rsplit_once('.')
                            && let Some(list) = self.tables.get(bare)
                        {
                            lists.push(list);
                        }
                    }
                }
            }
            Request::Kube(kube) => {
                if let Some(list) = self.kube_resources.get(&kube.resource) {
                    lists.push(list);
                }
                if let Some(list) = self.kube_verbs.get(&kube.verb) {
                    lists.push(list);
                }
            }
        }

        // Merge the sorted lists, trying each position once, lowest first.
        let mut heads = vec![0usize; lists.len()];
        loop {
            let mut lowest: Option<u32> = None;
            for (list, head) in lists.iter().zip(&heads) {
                if let Some(&position) = list.get(*head) {
                    lowest = Some(lowest.map_or(position, |lowest| lowest.min(position)));
                }
            }
            let position = lowest?;
            for (list, head) in lists.iter().zip(heads.iter_mut()) {
                if list.get(*head) == Some(&position) {
                    *head += 1;
                }
            }
            if check(position) {
                return Some(position);
            }
        }
    }
}
