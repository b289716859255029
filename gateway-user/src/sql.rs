//! SQL statement analysis for the database handlers: what kind each statement is, which tables
//! it touches, and whether a DELETE or UPDATE is limited by a WHERE clause. Parsing uses the
//! `sqlparser` crate with the dialect of the database at hand.
//!
//! Text that does not parse (a dialect extension the parser lacks, or a truncated statement) is
//! reported as one statement of kind `unparsed`, so the caller can still record and judge it.

use std::ops::ControlFlow;

use serde::Serialize;
use sqlparser::{
    ast::{Statement, visit_relations},
    dialect::{Dialect, MySqlDialect, PostgreSqlDialect},
    parser::Parser,
};

/// Database dialect to parse with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SqlDialect {
    Postgres,
    Mysql,
}

/// One analysed statement.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct StatementInfo {
    /// Lower-case statement kind: `select`, `insert`, `update`, `delete`, `drop`, `create`, ...,
    /// or `unparsed`.
    pub kind: String,
    /// Tables and other relations the statement names, as written (schema-qualified if so).
    pub tables: Vec<String>,
    /// For DELETE and UPDATE: whether a WHERE clause limits the rows. `None` for other kinds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub has_where: Option<bool>,
}

/// Analyses every statement in `text`.
pub fn analyze(text: &str, dialect: SqlDialect) -> Vec<StatementInfo> {
    let dialect: &dyn Dialect = match dialect {
        SqlDialect::Postgres => &PostgreSqlDialect {},
        SqlDialect::Mysql => &MySqlDialect {},
    };
    match Parser::parse_sql(dialect, text) {
        Ok(statements) if !statements.is_empty() => statements.iter().map(describe).collect(),
        Ok(_) => Vec::new(),
        Err(_) => vec![StatementInfo {
            kind: "unparsed".to_string(),
            tables: Vec::new(),
            has_where: None,
        }],
    }
}

fn describe(statement: &Statement) -> StatementInfo {
    let mut tables = Vec::new();
    let _ = visit_relations(statement, |name| {
        let name = name.to_string();
        if !tables.contains(&name) {
            tables.push(name);
        }
        ControlFlow::<()>::Continue(())
    });
    // DROP and TRUNCATE name their tables outside the places `visit_relations` walks.
    let mut add = |name: String| {
        if !tables.contains(&name) {
            tables.push(name);
        }
    };
    match statement {
        Statement::Drop { names, .. } => names.iter().for_each(|name| add(name.to_string())),
        Statement::Truncate(truncate) => truncate
            .table_names
            .iter()
            .for_each(|target| add(target.name.to_string())),
        _ => {}
    }
    let (kind, has_where) = match statement {
        Statement::Query(_) => ("select".to_string(), None),
        Statement::Insert(_) => ("insert".to_string(), None),
        Statement::Update(update) => ("update".to_string(), Some(update.selection.is_some())),
        Statement::Delete(delete) => ("delete".to_string(), Some(delete.selection.is_some())),
        Statement::Drop { .. } => ("drop".to_string(), None),
        Statement::Truncate(_) => ("truncate".to_string(), None),
        other => (first_keyword(other), None),
    };
    StatementInfo {
        kind,
        tables,
        has_where,
    }
}

/// Lower-case first keyword of the statement as sqlparser prints it (`CREATE TABLE ...` gives
/// `create`).
fn first_keyword(statement: &Statement) -> String {
    let text = statement.to_string();
    text.split_whitespace()
        .next()
        .unwrap_or("unknown")
        .to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn analyze_kinds_and_tables() {
        let infos = analyze(
            "SELECT * FROM accounts a JOIN cards c ON a.id = c.account; DROP TABLE audit; \
             DELETE FROM cards; UPDATE cards SET pan = NULL WHERE id = 1",
            SqlDialect::Postgres,
        );
        assert_eq!(infos.len(), 4);
        assert_eq!(infos[0].kind, "select");
        assert_eq!(infos[0].tables, ["accounts", "cards"]);
        assert_eq!(infos[1].kind, "drop");
        assert_eq!(infos[1].tables, ["audit"]);
        assert_eq!(infos[2].kind, "delete");
        assert_eq!(infos[2].has_where, Some(false));
        assert_eq!(infos[3].kind, "update");
        assert_eq!(infos[3].has_where, Some(true));
    }

    #[test]
    fn analyze_create_keyword() {
        let infos = analyze(
            "CREATE TABLE t (id int); TRUNCATE cards",
            SqlDialect::Postgres,
        );
        assert_eq!(infos[0].kind, "create");
        assert_eq!(infos[1].kind, "truncate");
        assert_eq!(infos[1].tables, ["cards"]);
    }

    #[test]
    fn analyze_unparsed_text() {
        let infos = analyze("SELEC broken (", SqlDialect::Postgres);
        assert_eq!(infos.len(), 1);
        assert_eq!(infos[0].kind, "unparsed");
    }
}
