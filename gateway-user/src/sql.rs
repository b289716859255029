//! SQL statement analysis for the database handlers: what kind each statement is, which tables
//! it touches, and whether a DELETE or UPDATE is limited by a WHERE clause. Parsing uses the
//! `sqlparser` crate with the dialect of the database at hand.
//!
//! Text that does not parse as a whole (a command or dialect extension the parser lacks) is
//! split into statements at the semicolons the tokenizer finds, and each one is parsed on its
//! own. A statement that still does not parse is judged by its tokens. Its kind is its first
//! keyword and every word in it counts as a possible table name, so a rule naming a kind or a
//! table still matches it. Text that cannot even be tokenized is one statement of kind
//! `unparsed`.

use std::ops::ControlFlow;

use serde::Serialize;
use sqlparser::{
    ast::{Statement, visit_relations},
    dialect::{Dialect, MySqlDialect, PostgreSqlDialect},
    parser::Parser,
    tokenizer::{Token, Tokenizer},
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
    if let Ok(statements) = Parser::parse_sql(dialect, text) {
        return statements.iter().map(describe).collect();
    }
    let Ok(tokens) = Tokenizer::new(dialect, text).tokenize() else {
        return vec![unparsed(&[])];
    };

    // One statement per run of tokens between semicolons, each parsed alone.
    let mut infos = Vec::new();
    for statement_tokens in tokens.split(|token| *token == Token::SemiColon) {
        let words: Vec<&Token> = statement_tokens
            .iter()
            .filter(|token| !matches!(token, Token::Whitespace(_)))
            .collect();
        if words.is_empty() {
            continue;
        }
        let piece: String = statement_tokens.iter().map(ToString::to_string).collect();
        match Parser::parse_sql(dialect, &piece) {
            Ok(statements) => infos.extend(statements.iter().map(describe)),
            Err(_) => infos.push(unparsed(&words)),
        }
    }
    if infos.is_empty() {
        infos.push(unparsed(&[]));
    }
    infos
}

/// Describes a statement the parser rejects from its tokens alone.
fn unparsed(tokens: &[&Token]) -> StatementInfo {
    let mut words = tokens.iter().filter_map(|token| match token {
        Token::Word(word) => Some(word.value.to_ascii_lowercase()),
        _ => None,
    });
    let kind = words.next().unwrap_or_else(|| "unparsed".to_string());
    let mut tables: Vec<String> = Vec::new();
    for word in words {
        if !tables.contains(&word) {
            tables.push(word);
        }
    }
    let has_where = matches!(kind.as_str(), "delete" | "update")
        .then(|| tables.iter().any(|word| word == "where"));
    StatementInfo {
        kind,
        tables,
        has_where,
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
    fn analyze_unparsed_statement_keeps_kind() {
        let infos = analyze("SELEC broken (", SqlDialect::Postgres);
        assert_eq!(infos.len(), 1);
        assert_eq!(infos[0].kind, "selec");
    }

    #[test]
    fn analyze_splits_when_one_part_fails() {
        // The parser rejects CHECKPOINT, which must not hide the DROP beside it.
        let infos = analyze("DROP TABLE keep_me; CHECKPOINT", SqlDialect::Postgres);
        assert_eq!(infos.len(), 2, "{infos:?}");
        assert_eq!(infos[0].kind, "drop");
        assert_eq!(infos[0].tables, ["keep_me"]);
        assert_eq!(infos[1].kind, "checkpoint");
    }

    #[test]
    fn analyze_semicolon_inside_string_not_split() {
        let infos = analyze("SELECT 'a;b' FROM t; CHECKPOINT", SqlDialect::Postgres);
        assert_eq!(infos.len(), 2, "{infos:?}");
        assert_eq!(infos[0].kind, "select");
        assert_eq!(infos[0].tables, ["t"]);
    }

    #[test]
    fn analyze_unparsed_words_count_as_tables() {
        let infos = analyze("REINDEX TABLE secrets; CHECKPOINT", SqlDialect::Postgres);
        assert_eq!(infos[0].kind, "reindex");
        assert!(
            infos[0].tables.contains(&"secrets".to_string()),
            "{infos:?}"
        );
    }
}
