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
//!
//! Analyses are cached by statement shape: the text with its numbers and quoted strings
//! blanked out, so `... WHERE id = 1` and `... WHERE id = 2` are parsed once. The kind, the
//! tables and the WHERE test never depend on a literal's value. Text the shape scanner is not
//! sure about (backslashes, dollar quotes, prefixed strings, `#` and `/*!` comments) is parsed
//! every time.

use std::{
    collections::HashMap,
    ops::ControlFlow,
    sync::{LazyLock, Mutex, PoisonError},
};

use serde::Serialize;
use sqlparser::{
    ast::{
        CopySource, ObjectName, OnConflictAction, OnInsert, Query, SetExpr, Statement, Use,
        visit_relations,
    },
    dialect::{Dialect, MySqlDialect, PostgreSqlDialect},
    keywords::Keyword,
    parser::Parser,
    tokenizer::{Token, Tokenizer, Word},
};

/// Database dialect to parse with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
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
    /// Other kinds whose effect the statement has, which rules on those kinds match too:
    /// `update` for an upsert (`ON DUPLICATE KEY UPDATE`, `ON CONFLICT ... DO UPDATE`) and
    /// `delete` for MySQL's `REPLACE`, which deletes the row it replaces.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub also_kinds: Vec<String>,
}

impl StatementInfo {
    /// Tells whether the statement is of `kind` or has its effect, ignoring ASCII case.
    pub fn has_kind(&self, kind: &str) -> bool {
        self.kind.eq_ignore_ascii_case(kind)
            || self
                .also_kinds
                .iter()
                .any(|also| also.eq_ignore_ascii_case(kind))
    }
}

/// Longest statement text the cache keeps. Longer texts are parsed every time, so a few huge
/// statements cannot fill the cache's memory.
const SHAPE_TEXT_LIMIT: usize = 8 * 1024;
/// Shapes kept at most; the cache starts over when it is full.
const SHAPE_CACHE_ENTRIES: usize = 4096;

type ShapeCache = HashMap<(SqlDialect, String), Vec<StatementInfo>>;

static SHAPES: LazyLock<Mutex<ShapeCache>> = LazyLock::new(|| Mutex::new(HashMap::new()));

/// Analyses every statement in `text`.
pub fn analyze(text: &str, dialect: SqlDialect) -> Vec<StatementInfo> {
    // MariaDB runs the text of `/*M! ... */` comments as it runs MySQL's `/*! ... */`, which
    // the parser reads as SQL.
    if dialect == SqlDialect::Mysql && (text.contains("/*M!") || text.contains("/*m!")) {
        let rewritten = text.replace("/*M!", "/*!").replace("/*m!", "/*!");
        return analyze(&rewritten, dialect);
    }
    if dialect == SqlDialect::Postgres
        && text.len() <= FULL_PARSE_LIMIT
        && text.contains("&\"")
        && let Some(decoded) = decode_unicode_identifiers(text)
    {
        return analyze_shaped(&decoded, dialect);
    }
    analyze_shaped(text, dialect)
}

/// Analyses `text` through the cache of statement shapes, or from its words alone when it is
/// longer than the parser reads.
fn analyze_shaped(text: &str, dialect: SqlDialect) -> Vec<StatementInfo> {
    if text.len() > FULL_PARSE_LIMIT {
        return analyze_large(text, dialect);
    }
    let Some(key) = shape(text, dialect) else {
        return analyze_uncached(text, dialect);
    };
    let key = (dialect, key);
    let cached = SHAPES
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .get(&key)
        .cloned();
    if let Some(infos) = cached {
        return infos;
    }
    let infos = analyze_uncached(text, dialect);
    let mut shapes = SHAPES.lock().unwrap_or_else(PoisonError::into_inner);
    if shapes.len() >= SHAPE_CACHE_ENTRIES {
        shapes.clear();
    }
    shapes.insert(key, infos.clone());
    infos
}

/// The statement's shape: the text with every number outside a word replaced by `0`, every
/// single-quoted string by `''` and every comment by a space. `None` when the text contains
/// something whose extent this scanner would have to guess.
fn shape(text: &str, dialect: SqlDialect) -> Option<String> {
    let bytes = text.as_bytes();
    if bytes.len() > SHAPE_TEXT_LIMIT || bytes.contains(&b'\\') {
        return None;
    }
    let word_byte = |byte: u8| byte.is_ascii_alphanumeric() || byte == b'_' || byte >= 0x80;
    let mut out = Vec::with_capacity(bytes.len());
    let mut at = 0;
    while at < bytes.len() {
        let byte = bytes[at];
        match byte {
            b'\'' => {
                // A prefix such as E, B, X, N or _utf8 changes how the string is read.
                if at > 0 && word_byte(bytes[at - 1]) {
                    return None;
                }
                // Two quotes in a row inside a string stand for one quote.
                let mut end = at + 1;
                loop {
                    let close = end + bytes[end..].iter().position(|&b| b == b'\'')?;
                    if bytes.get(close + 1) == Some(&b'\'') {
                        end = close + 2;
                    } else {
                        end = close + 1;
                        break;
                    }
                }
                out.extend_from_slice(b"''");
                at = end;
            }
            b'"' | b'`' => {
                // Quoted names are kept as written.
                let close = at + 1 + bytes[at + 1..].iter().position(|&b| b == byte)?;
                out.extend_from_slice(&bytes[at..=close]);
                at = close + 1;
            }
            b'-' if bytes.get(at + 1) == Some(&b'-') => {
                // MySQL reads `1--1` as one minus minus one: only `--` and a space is a
                // comment in both dialects.
                if !bytes.get(at + 2).is_some_and(u8::is_ascii_whitespace) {
                    return None;
                }
                let end = bytes[at..]
                    .iter()
                    .position(|&b| b == b'\n')
                    .map_or(bytes.len(), |offset| at + offset);
                // PostgreSQL also ends the comment at a carriage return, MySQL does not: the
                // parser reads such a text every time.
                if bytes[at..end].contains(&b'\r') {
                    return None;
                }
                out.push(b' ');
                at = end;
            }
            b'/' if bytes.get(at + 1) == Some(&b'*') => {
                // PostgreSQL nests block comments and MySQL runs `/*!` ones: leave both to
                // the parser.
                let body = &bytes[at + 2..];
                if body.first() == Some(&b'!') || body.first() == Some(&b'+') {
                    return None;
                }
                let close = body.windows(2).position(|pair| pair == b"*/")?;
                if body[..close].windows(2).any(|pair| pair == b"/*") {
                    return None;
                }
                out.push(b' ');
                at += 2 + close + 2;
            }
            b'#' if dialect == SqlDialect::Mysql => return None,
            b'$' => {
                // `$1` is a parameter; any other `$` may open a dollar-quoted string.
                let digits = bytes[at + 1..]
                    .iter()
                    .take_while(|b| b.is_ascii_digit())
                    .count();
                if digits == 0 {
                    return None;
                }
                out.extend_from_slice(&bytes[at..=at + digits]);
                at += 1 + digits;
            }
            b'0'..=b'9' => {
                let digits = bytes[at..]
                    .iter()
                    .take_while(|b| b.is_ascii_digit())
                    .count();
                // MySQL names may start with digits (`1table`), and `1e5` or `0x1F` are
                // numbers of other forms: keep them all out of the cache.
                if bytes
                    .get(at + digits)
                    .is_some_and(|&b| word_byte(b) || b == b'$')
                {
                    return None;
                }
                out.push(b'0');
                at += digits;
            }
            _ if word_byte(byte) => {
                let length = bytes[at..]
                    .iter()
                    .take_while(|&&b| word_byte(b) || b == b'$')
                    .count();
                out.extend_from_slice(&bytes[at..at + length]);
                at += length;
            }
            _ => {
                out.push(byte);
                at += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

fn analyze_uncached(text: &str, dialect: SqlDialect) -> Vec<StatementInfo> {
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

/// Rewrites PostgreSQL's Unicode-escaped identifiers as the plain quoted identifiers the server
/// reads: `U&"c\0061rds"` becomes `"cards"`, and `U&"c!0061rds" UESCAPE '!'` too. Returns
/// `None` when the text contains none, or when one of them does not decode, which the server
/// rejects as well.
///
/// The rewrite works on tokens, so a `U&"` inside a string literal or a comment is left as it
/// is.
fn decode_unicode_identifiers(text: &str) -> Option<String> {
    let tokens = Tokenizer::new(&PostgreSqlDialect {}, text)
        .tokenize()
        .ok()?;
    let skip_space = |mut at: usize| {
        while matches!(tokens.get(at), Some(Token::Whitespace(_))) {
            at += 1;
        }
        at
    };
    let mut out = String::with_capacity(text.len());
    let mut decoded_any = false;
    let mut at = 0;
    while at < tokens.len() {
        // The tokenizer reads `U&"..."` as the word `U`, an ampersand and a quoted word, with
        // nothing between them.
        if let (Token::Word(prefix), Some(Token::Ampersand), Some(Token::Word(ident))) =
            (&tokens[at], tokens.get(at + 1), tokens.get(at + 2))
            && prefix.quote_style.is_none()
            && prefix.value.eq_ignore_ascii_case("u")
            && ident.quote_style == Some('"')
        {
            let mut next = at + 3;
            let mut escape = '\\';
            let clause = skip_space(next);
            if let Some(Token::Word(word)) = tokens.get(clause)
                && word.quote_style.is_none()
                && word.value.eq_ignore_ascii_case("uescape")
            {
                let Some(Token::SingleQuotedString(chosen)) = tokens.get(skip_space(clause + 1))
                else {
                    return None;
                };
                let mut chars = chosen.chars();
                let (Some(chosen), None) = (chars.next(), chars.next()) else {
                    return None;
                };
                escape = chosen;
                next = skip_space(clause + 1) + 1;
            }
            let value = unescape_unicode(&ident.value, escape)?;
            let plain = Token::Word(Word {
                value,
                quote_style: Some('"'),
                keyword: Keyword::NoKeyword,
            });
            out.push_str(&plain.to_string());
            decoded_any = true;
            at = next;
            continue;
        }
        out.push_str(&tokens[at].to_string());
        at += 1;
    }
    decoded_any.then_some(out)
}

/// Decodes the escapes of a Unicode-escaped identifier's text: the escape character followed by
/// 4 hex digits, by `+` and 6 hex digits, or by itself. A UTF-16 surrogate pair written as two
/// escapes gives one character. `None` for anything else, as the server rejects it.
fn unescape_unicode(text: &str, escape: char) -> Option<String> {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    let mut high_surrogate: Option<u32> = None;
    while let Some(c) = chars.next() {
        if c != escape {
            if high_surrogate.is_some() {
                return None;
            }
            out.push(c);
            continue;
        }
        if chars.peek() == Some(&escape) {
            chars.next();
            if high_surrogate.is_some() {
                return None;
            }
            out.push(escape);
            continue;
        }
        let width = if chars.peek() == Some(&'+') {
            chars.next();
            6
        } else {
            4
        };
        let mut code = 0u32;
        for _ in 0..width {
            code = code * 16 + chars.next()?.to_digit(16)?;
        }
        match (high_surrogate.take(), code) {
            (None, 0xD800..=0xDBFF) => high_surrogate = Some(code),
            (Some(high), 0xDC00..=0xDFFF) => {
                out.push(char::from_u32(
                    0x10000 + ((high - 0xD800) << 10) + (code - 0xDC00),
                )?);
            }
            (None, code) if code != 0 => out.push(char::from_u32(code)?),
            _ => return None,
        }
    }
    high_surrogate.is_none().then_some(out)
}

/// Returns the statements of MySQL `text` under the `sql_mode` flags that change where
/// literals end, those not already in `infos` (the analysis in the default mode).
///
/// With `ANSI_QUOTES` a double-quoted text is a name, and with `NO_BACKSLASH_ESCAPES` a
/// backslash is a plain character. A session that set `sql_mode` may run in either mode, so
/// rules judge every reading. Readings that do not tokenize are left out, because the server
/// rejects such text in that mode too.
pub fn mysql_mode_readings(text: &str, infos: &[StatementInfo]) -> Vec<StatementInfo> {
    let quotes = text.contains('"');
    let backslashes = text.contains('\\');
    let mut extra: Vec<StatementInfo> = Vec::new();
    for (ansi_quotes, no_backslash_escapes) in [(true, false), (false, true), (true, true)] {
        if (ansi_quotes && !quotes) || (no_backslash_escapes && !backslashes) {
            continue;
        }
        let Some(reread) = reread_mysql(text, ansi_quotes, no_backslash_escapes) else {
            continue;
        };
        add_new_statements(analyze(&reread, SqlDialect::Mysql), infos, &mut extra);
    }
    extra
}

/// Returns the statements of PostgreSQL `text` as read with `standard_conforming_strings` off,
/// where a backslash escapes the next character in every string, those not already in `infos`
/// (the analysis with the setting on). Empty when the text has no backslash.
pub fn postgres_escape_readings(text: &str, infos: &[StatementInfo]) -> Vec<StatementInfo> {
    if !text.contains('\\') {
        return Vec::new();
    }
    let Some(reread) = reread_postgres_escapes(text) else {
        return Vec::new();
    };
    let mut extra = Vec::new();
    add_new_statements(analyze(&reread, SqlDialect::Postgres), infos, &mut extra);
    extra
}

/// Appends to `extra` the statements of another reading that are in neither `infos` nor
/// `extra`. Statements that did not tokenize are left out, because the server rejects such
/// text in that reading too.
fn add_new_statements(
    found: Vec<StatementInfo>,
    infos: &[StatementInfo],
    extra: &mut Vec<StatementInfo>,
) {
    for info in found {
        if info.kind != "unparsed" && !infos.contains(&info) && !extra.contains(&info) {
            extra.push(info);
        }
    }
}

/// Rewrites PostgreSQL `text` as read with `standard_conforming_strings` off into text that
/// reads the same way with it on: in each string whose backslashes escape, `\'` becomes `''`.
/// `E'...'` strings read escapes either way, and bit strings (`B'...'`, `X'...'`) and
/// `U&'...'` never do. `None` when a literal does not end.
fn reread_postgres_escapes(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let word_byte = |b: u8| b.is_ascii_alphanumeric() || b == b'_' || b == b'$' || b >= 0x80;
    let mut out: Vec<u8> = Vec::with_capacity(bytes.len());
    let mut at = 0;
    while at < bytes.len() {
        let byte = bytes[at];
        let next = bytes.get(at + 1).copied();
        match byte {
            b'-' if next == Some(b'-') => {
                let end = bytes[at..]
                    .iter()
                    .position(|&b| b == b'\n' || b == b'\r')
                    .map_or(bytes.len(), |offset| at + offset);
                out.extend_from_slice(&bytes[at..end]);
                at = end;
            }
            b'/' if next == Some(b'*') => {
                let start = at;
                let mut depth = 0;
                loop {
                    let pair = bytes.get(at..at + 2)?;
                    if pair == b"/*" {
                        depth += 1;
                        at += 2;
                    } else if pair == b"*/" {
                        depth -= 1;
                        at += 2;
                        if depth == 0 {
                            break;
                        }
                    } else {
                        at += 1;
                    }
                }
                out.extend_from_slice(&bytes[start..at]);
            }
            b'"' => {
                let close = at + 1 + bytes[at + 1..].iter().position(|&b| b == b'"')?;
                out.extend_from_slice(&bytes[at..=close]);
                at = close + 1;
            }
            b'$' if at == 0 || !word_byte(bytes[at - 1]) => match dollar_tag(bytes, at) {
                Some(tag) => {
                    let body = at + tag.len();
                    let end = body + memchr::memmem::find(&bytes[body..], tag)? + tag.len();
                    out.extend_from_slice(&bytes[at..end]);
                    at = end;
                }
                None => {
                    out.push(byte);
                    at += 1;
                }
            },
            b'\'' => {
                let prefix_start = bytes[..at]
                    .iter()
                    .rposition(|&b| !word_byte(b))
                    .map_or(0, |before| before + 1);
                let prefix = bytes[prefix_start..at].to_ascii_lowercase();
                let unicode = prefix.is_empty()
                    && at >= 2
                    && bytes[at - 1] == b'&'
                    && bytes[at - 2] | 0x20 == b'u';
                let escapes = !(unicode || prefix == b"b" || prefix == b"x");
                let rewrite = escapes && prefix != b"e";
                out.push(byte);
                at += 1;
                loop {
                    let current = *bytes.get(at)?;
                    if escapes && current == b'\\' {
                        let escaped = *bytes.get(at + 1)?;
                        if rewrite && escaped == b'\'' {
                            out.extend_from_slice(b"''");
                        } else {
                            out.extend_from_slice(&[current, escaped]);
                        }
                        at += 2;
                    } else if current == b'\'' && bytes.get(at + 1) == Some(&b'\'') {
                        out.extend_from_slice(b"''");
                        at += 2;
                    } else if current == b'\'' {
                        out.push(current);
                        at += 1;
                        break;
                    } else {
                        out.push(current);
                        at += 1;
                    }
                }
            }
            _ => {
                out.push(byte);
                at += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// Rewrites MySQL `text` as read under `ANSI_QUOTES` and `NO_BACKSLASH_ESCAPES` into text the
/// default mode reads the same way: double-quoted names become backquoted, and backslashes in
/// strings are doubled. `None` when a literal does not end.
fn reread_mysql(text: &str, ansi_quotes: bool, no_backslash_escapes: bool) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out: Vec<u8> = Vec::with_capacity(bytes.len() + 16);
    let mut at = 0;
    while at < bytes.len() {
        let byte = bytes[at];
        match byte {
            b'\'' | b'"' if !(byte == b'"' && ansi_quotes) => {
                // A string: it ends at its quote unless doubled, or escaped by a backslash in
                // the default mode.
                out.push(byte);
                at += 1;
                loop {
                    let current = *bytes.get(at)?;
                    if current == b'\\' {
                        if no_backslash_escapes {
                            out.extend_from_slice(b"\\\\");
                            at += 1;
                        } else {
                            out.extend_from_slice(bytes.get(at..at + 2)?);
                            at += 2;
                        }
                    } else if current == byte && bytes.get(at + 1) == Some(&byte) {
                        out.extend_from_slice(&[byte, byte]);
                        at += 2;
                    } else if current == byte {
                        out.push(byte);
                        at += 1;
                        break;
                    } else {
                        out.push(current);
                        at += 1;
                    }
                }
            }
            b'"' | b'`' => {
                // A name: backquoted in the output, with its own quotes undoubled and
                // backquotes doubled.
                out.push(b'`');
                at += 1;
                loop {
                    let current = *bytes.get(at)?;
                    at += 1;
                    if current == byte && bytes.get(at) == Some(&byte) {
                        at += 1;
                    } else if current == byte {
                        break;
                    }
                    if current == b'`' {
                        out.push(b'`');
                    }
                    out.push(current);
                }
                out.push(b'`');
            }
            b'#' | b'-'
                if byte == b'#'
                    || (bytes.get(at + 1) == Some(&b'-')
                        && bytes.get(at + 2).is_none_or(|b| b.is_ascii_whitespace())) =>
            {
                // A comment to the end of the line: `#`, or `--` and a space.
                let end = bytes[at..]
                    .iter()
                    .position(|&b| b == b'\n')
                    .map_or(bytes.len(), |offset| at + offset);
                out.extend_from_slice(&bytes[at..end]);
                at = end;
            }
            b'/' if bytes.get(at + 1) == Some(&b'*')
                && bytes.get(at + 2) != Some(&b'!')
                && !(matches!(bytes.get(at + 2), Some(b'M' | b'm'))
                    && bytes.get(at + 3) == Some(&b'!')) =>
            {
                // A plain comment. `/*!` and `/*M!` ones contain SQL and are read on.
                let close = at + 2 + bytes[at + 2..].windows(2).position(|pair| pair == b"*/")?;
                out.extend_from_slice(&bytes[at..close + 2]);
                at = close + 2;
            }
            _ => {
                out.push(byte);
                at += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// Runs `work`, the analysis of a text of `len` bytes. A long text is analysed with
/// [`tokio::task::block_in_place`] on a multi-thread runtime, so the runtime hands this
/// thread's other tasks (the heartbeat among them) to another thread meanwhile.
pub fn off_runtime<T>(len: usize, work: impl FnOnce() -> T) -> T {
    const LONG: usize = 1024 * 1024;
    let multi_thread = tokio::runtime::Handle::try_current()
        .is_ok_and(|handle| handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
    if len >= LONG && multi_thread {
        tokio::task::block_in_place(work)
    } else {
        work()
    }
}

/// Maximum length of a text the SQL parser reads. Its syntax tree can take hundreds of bytes per byte of
/// text (a list of a million `1,`) and seconds per megabyte, time in which the daemon's worker
/// threads serve nothing else. Longer texts are analysed by [`analyze_large`].
pub const FULL_PARSE_LIMIT: usize = 16 * 1024;

/// Maximum count of distinct words [`analyze_large`] keeps per statement. A statement with more also gets
/// the kind `unparsed`, so a rule on that kind can deny what was not read whole.
const LARGE_WORD_LIMIT: usize = 4096;

/// Analyses a text too long for the parser from its words, as a statement the parser rejects
/// is analysed (see [`unparsed`]), in one pass and in bounded memory. Strings, numbers and
/// comments are skipped the way the dialect reads them, and statements end at the semicolons
/// outside them.
fn analyze_large(text: &str, dialect: SqlDialect) -> Vec<StatementInfo> {
    let mut lexer = LargeLexer {
        bytes: text.as_bytes(),
        at: 0,
        mysql: dialect == SqlDialect::Mysql,
    };
    let mut infos = Vec::new();
    let mut statement = WordSet::default();
    while let Some(item) = lexer.next_item() {
        match item {
            Lexed::Word(word) => statement.word(word),
            Lexed::Dot => statement.dot(),
            Lexed::Space => {}
            Lexed::Other => statement.break_name(),
            Lexed::End => {
                if let Some(info) = std::mem::take(&mut statement).finish() {
                    infos.push(info);
                }
            }
        }
    }
    if let Some(info) = statement.finish() {
        infos.push(info);
    }
    if infos.is_empty() {
        infos.push(unparsed(&[]));
    }
    infos
}

/// Words of one statement as [`analyze_large`] collects them.
#[derive(Default)]
struct WordSet {
    kind: Option<String>,
    tables: Vec<String>,
    seen: std::collections::HashSet<String>,
    /// The name being read, for dotted names (`payments.cards`), and whether a dot followed it.
    name: Option<String>,
    after_dot: bool,
    capped: bool,
}

impl WordSet {
    fn word(&mut self, word: String) {
        if self.kind.is_none() {
            self.kind = Some(word);
            return;
        }
        let dotted = match self.name.take() {
            Some(head) if self.after_dot => format!("{head}.{word}"),
            _ => word.clone(),
        };
        self.after_dot = false;
        if dotted != word {
            self.add(dotted.clone());
        }
        self.add(word);
        self.name = Some(dotted);
    }

    fn dot(&mut self) {
        if self.after_dot || self.name.is_none() {
            self.break_name();
        } else {
            self.after_dot = true;
        }
    }

    fn break_name(&mut self) {
        self.name = None;
        self.after_dot = false;
    }

    fn add(&mut self, name: String) {
        if self.seen.contains(&name) {
            return;
        }
        if self.seen.len() >= LARGE_WORD_LIMIT {
            self.capped = true;
            return;
        }
        self.seen.insert(name.clone());
        self.tables.push(name);
    }

    fn finish(self) -> Option<StatementInfo> {
        let mut info = from_words(self.kind?, self.tables);
        if self.capped && !info.has_kind("unparsed") {
            info.also_kinds.push("unparsed".to_string());
        }
        Some(info)
    }
}

/// One item of SQL text as [`LargeLexer`] reads it.
enum Lexed {
    /// A name or keyword, lower case, quotes removed.
    Word(String),
    Dot,
    /// Whitespace or a comment.
    Space,
    /// A string, a number or another character.
    Other,
    /// A semicolon.
    End,
}

/// Reads SQL text item by item without building tokens for strings and numbers.
struct LargeLexer<'a> {
    bytes: &'a [u8],
    at: usize,
    mysql: bool,
}

impl LargeLexer<'_> {
    fn next_item(&mut self) -> Option<Lexed> {
        let bytes = self.bytes;
        let start = self.at;
        let byte = *bytes.get(start)?;
        let next = bytes.get(start + 1).copied();
        let word_byte = |b: u8| b.is_ascii_alphanumeric() || b == b'_' || b == b'$' || b >= 0x80;
        let item = match byte {
            b';' => {
                self.at += 1;
                Lexed::End
            }
            b'.' if !next.is_some_and(|b| b.is_ascii_digit()) => {
                self.at += 1;
                Lexed::Dot
            }
            _ if byte.is_ascii_whitespace() => {
                self.at += 1;
                Lexed::Space
            }
            b'-' if next == Some(b'-')
                && (!self.mysql
                    || bytes
                        .get(start + 2)
                        .is_none_or(|b| b.is_ascii_whitespace() || b.is_ascii_control())) =>
            {
                // PostgreSQL ends the comment at either line break. MySQL is read the same
                // way: reading on where it stops would hide what follows.
                self.skip_until_any(start + 2, b"\n\r");
                Lexed::Space
            }
            b'#' if self.mysql => {
                self.skip_until_any(start + 1, b"\n");
                Lexed::Space
            }
            b'/' if next == Some(b'*') => {
                let third = bytes.get(start + 2).copied();
                let executable = self.mysql
                    && (third == Some(b'!')
                        || (matches!(third, Some(b'M' | b'm'))
                            && bytes.get(start + 3) == Some(&b'!')));
                if executable {
                    // MySQL runs the text of `/*!` and `/*M!` comments: read on inside.
                    self.at = start + if third == Some(b'!') { 3 } else { 4 };
                } else {
                    self.skip_block_comment(start + 2);
                }
                Lexed::Space
            }
            b'\'' => {
                // PostgreSQL reads backslash escapes only in E'...' strings.
                let escapes = self.mysql
                    || (start > 0
                        && bytes[start - 1] | 0x20 == b'e'
                        && !(start > 1 && word_byte(bytes[start - 2])));
                self.skip_string(start + 1, b'\'', escapes);
                Lexed::Other
            }
            b'"' if self.mysql => {
                self.skip_string(start + 1, b'"', true);
                Lexed::Other
            }
            b'"' | b'`' => {
                let value = self.quoted_name(start + 1, byte);
                // PostgreSQL's U&"..." names spell characters with escapes.
                let escaped = !self.mysql
                    && start >= 2
                    && bytes[start - 1] == b'&'
                    && bytes[start - 2] | 0x20 == b'u';
                let value = if escaped {
                    let escape = self.uescape_after().unwrap_or('\\');
                    unescape_unicode(&value, escape).unwrap_or(value)
                } else {
                    value
                };
                Lexed::Word(value.to_lowercase())
            }
            b'$' if !self.mysql && (start == 0 || !word_byte(bytes[start - 1])) => {
                self.dollar_quoted(start)
            }
            _ if word_byte(byte) => {
                let length = bytes[start..].iter().take_while(|&&b| word_byte(b)).count();
                self.at = start + length;
                let word = &bytes[start..start + length];
                if is_number(word) {
                    Lexed::Other
                } else {
                    Lexed::Word(String::from_utf8_lossy(word).to_lowercase())
                }
            }
            _ => {
                self.at += 1;
                Lexed::Other
            }
        };
        Some(item)
    }

    /// Returns the escape character of a `UESCAPE 'c'` clause right after the current
    /// position, whitespace aside, without moving past it.
    fn uescape_after(&self) -> Option<char> {
        let rest = &self.bytes[self.at..];
        let skip_space = |from: usize| {
            from + rest[from..]
                .iter()
                .take_while(|b| b.is_ascii_whitespace())
                .count()
        };
        let keyword = skip_space(0);
        if !rest
            .get(keyword..keyword + 7)?
            .eq_ignore_ascii_case(b"uescape")
        {
            return None;
        }
        let quote = skip_space(keyword + 7);
        match rest.get(quote..quote + 3)? {
            [b'\'', escape, b'\''] if escape.is_ascii() => Some(char::from(*escape)),
            _ => None,
        }
    }

    /// Moves past the first of `stops` at or after `from`, or to the end.
    fn skip_until_any(&mut self, from: usize, stops: &[u8]) {
        self.at = self.bytes[from..]
            .iter()
            .position(|b| stops.contains(b))
            .map_or(self.bytes.len(), |offset| from + offset + 1);
    }

    /// Moves past a block comment whose text starts at `from`. PostgreSQL nests them.
    fn skip_block_comment(&mut self, from: usize) {
        let bytes = self.bytes;
        let mut depth = 1;
        let mut at = from;
        while at + 1 < bytes.len() {
            if bytes[at] == b'*' && bytes[at + 1] == b'/' {
                depth -= 1;
                at += 2;
                if depth == 0 {
                    self.at = at;
                    return;
                }
            } else if !self.mysql && bytes[at] == b'/' && bytes[at + 1] == b'*' {
                depth += 1;
                at += 2;
            } else {
                at += 1;
            }
        }
        self.at = bytes.len();
    }

    /// Moves past a string whose text starts at `from`: a doubled quote stands for one, and
    /// with `escapes` a backslash takes the next byte with it.
    fn skip_string(&mut self, from: usize, quote: u8, escapes: bool) {
        let bytes = self.bytes;
        let mut at = from;
        while at < bytes.len() {
            let byte = bytes[at];
            let escaped = escapes && byte == b'\\';
            let doubled = byte == quote && bytes.get(at + 1) == Some(&quote);
            if escaped || doubled {
                at += 2;
            } else if byte == quote {
                self.at = at + 1;
                return;
            } else {
                at += 1;
            }
        }
        self.at = bytes.len();
    }

    /// Reads a quoted name whose text starts at `from`; a doubled quote stands for one.
    fn quoted_name(&mut self, from: usize, quote: u8) -> String {
        let bytes = self.bytes;
        let mut value = Vec::new();
        let mut at = from;
        while at < bytes.len() {
            if bytes[at] == quote && bytes.get(at + 1) == Some(&quote) {
                value.push(quote);
                at += 2;
            } else if bytes[at] == quote {
                at += 1;
                break;
            } else {
                value.push(bytes[at]);
                at += 1;
            }
        }
        self.at = at;
        String::from_utf8_lossy(&value).into_owned()
    }

    /// Reads a `$` at `start`: a parameter (`$1`), or a dollar-quoted string (`$$...$$`,
    /// `$tag$...$tag$`) skipped whole.
    fn dollar_quoted(&mut self, start: usize) -> Lexed {
        let bytes = self.bytes;
        let Some(tag) = dollar_tag(bytes, start) else {
            self.at = start + 1;
            return Lexed::Other;
        };
        let body = start + tag.len();
        self.at = memchr::memmem::find(&bytes[body..], tag)
            .map_or(bytes.len(), |offset| body + offset + tag.len());
        Lexed::Other
    }
}

/// Returns the tag (`$$` or `$name$`) of a PostgreSQL dollar-quoted string that opens at
/// `start`, a `$`. `None` for a parameter (`$1`) or a lone `$`.
fn dollar_tag(bytes: &[u8], start: usize) -> Option<&[u8]> {
    let name_len = bytes[start + 1..]
        .iter()
        .take_while(|b| b.is_ascii_alphanumeric() || **b == b'_')
        .count();
    let end = start + 1 + name_len;
    let opens =
        bytes.get(end) == Some(&b'$') && !bytes.get(start + 1).is_some_and(u8::is_ascii_digit);
    opens.then(|| &bytes[start..=end])
}

/// Tells whether a word-like run of bytes is a number: digits with an optional fraction or
/// exponent, or MySQL's `0x...` and `0b...` literals.
fn is_number(word: &[u8]) -> bool {
    if !word[0].is_ascii_digit() {
        return false;
    }
    if let Some(hex) = word
        .strip_prefix(b"0x")
        .or_else(|| word.strip_prefix(b"0X"))
    {
        return !hex.is_empty() && hex.iter().all(u8::is_ascii_hexdigit);
    }
    if let Some(bits) = word.strip_prefix(b"0b") {
        return !bits.is_empty() && bits.iter().all(|b| matches!(b, b'0' | b'1'));
    }
    let digits = word.iter().take_while(|b| b.is_ascii_digit()).count();
    let rest = &word[digits..];
    match rest.first() {
        None => true,
        Some(b'e' | b'E') => rest[1..].iter().all(u8::is_ascii_digit),
        Some(_) => false,
    }
}

/// PostgreSQL's replication commands, which a walsender session takes besides SQL. Their
/// other words are options and slot names, never tables.
pub const REPLICATION_COMMANDS: [&str; 9] = [
    "identify_system",
    "timeline_history",
    "create_replication_slot",
    "read_replication_slot",
    "alter_replication_slot",
    "drop_replication_slot",
    "start_replication",
    "base_backup",
    "upload_manifest",
];

/// Returns the words of `text` in lower case, as the SQL tokenizer reads them: comments,
/// numbers, strings and punctuation left out, quoted identifiers without their quotes.
pub fn words(text: &str, dialect: SqlDialect) -> Vec<String> {
    let dialect: &dyn Dialect = match dialect {
        SqlDialect::Postgres => &PostgreSqlDialect {},
        SqlDialect::Mysql => &MySqlDialect {},
    };
    let Ok(tokens) = Tokenizer::new(dialect, text).tokenize() else {
        return Vec::new();
    };
    tokens
        .into_iter()
        .filter_map(|token| match token {
            Token::Word(word) => Some(word.value.to_ascii_lowercase()),
            _ => None,
        })
        .collect()
}

/// Describes a statement the parser rejects from its tokens alone.
fn unparsed(tokens: &[&Token]) -> StatementInfo {
    let kind = tokens
        .iter()
        .find_map(|token| match token {
            Token::Word(word) => Some(word.value.to_ascii_lowercase()),
            _ => None,
        })
        .unwrap_or_else(|| "unparsed".to_string());
    if REPLICATION_COMMANDS.contains(&kind.as_str()) {
        return StatementInfo {
            kind,
            tables: Vec::new(),
            has_where: None,
            also_kinds: Vec::new(),
        };
    }
    // Every word after the kind, and every dotted name (`payments.cards`) whole too, so that
    // rules on qualified tables match.
    let mut tables: Vec<String> = Vec::new();
    let mut add = |name: String| {
        if !tables.contains(&name) {
            tables.push(name);
        }
    };
    let mut name: Option<String> = None;
    let mut after_dot = false;
    for token in tokens
        .iter()
        .skip_while(|token| !matches!(token, Token::Word(_)))
        .skip(1)
    {
        match token {
            Token::Word(word) => {
                let word = word.value.to_ascii_lowercase();
                name = match name.take() {
                    Some(head) if after_dot => {
                        let dotted = format!("{head}.{word}");
                        add(dotted.clone());
                        Some(dotted)
                    }
                    _ => Some(word.clone()),
                };
                add(word);
                after_dot = false;
            }
            Token::Period if !after_dot && name.is_some() => after_dot = true,
            _ => {
                name = None;
                after_dot = false;
            }
        }
    }
    from_words(kind, tables)
}

/// Describes a statement by its kind (its first word) and its other words and dotted names,
/// all lower case, each a possible table name.
fn from_words(kind: String, tables: Vec<String>) -> StatementInfo {
    let has_where = matches!(kind.as_str(), "delete" | "update")
        .then(|| tables.iter().any(|word| word == "where"));
    // Any word that names a change of rows may be one, as in an upsert the parser rejects:
    // rules on those kinds match too.
    let mut also_kinds: Vec<String> = Vec::new();
    // MySQL's `LOAD DATA` and `LOAD XML` insert rows, and with `REPLACE` delete the rows they
    // replace.
    if kind == "load" {
        also_kinds.push("insert".to_string());
    }
    for (word, changed) in [
        ("insert", "insert"),
        ("update", "update"),
        ("delete", "delete"),
        ("merge", "merge"),
        ("replace", "delete"),
    ] {
        if tables.iter().any(|table| table == word)
            && changed != kind
            && !also_kinds.iter().any(|k| k == changed)
        {
            also_kinds.push(changed.to_string());
        }
    }
    StatementInfo {
        kind,
        tables,
        has_where,
        also_kinds,
    }
}

/// Returns `name` as the tables of a rule are written: its parts joined by dots, quoted
/// identifiers without their quotes (`` `payments`.`cards` `` gives `payments.cards`).
fn table_name(name: &ObjectName) -> String {
    name.0
        .iter()
        .map(|part| match part.as_ident() {
            Some(ident) => ident.value.clone(),
            None => part.to_string(),
        })
        .collect::<Vec<_>>()
        .join(".")
}

fn describe(statement: &Statement) -> StatementInfo {
    let mut tables = Vec::new();
    let _ = visit_relations(statement, |name| {
        let name = table_name(name);
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
        // A `USE` lists the database it switches to as its table.
        Statement::Use(Use::Object(name) | Use::Database(name) | Use::Schema(name)) => {
            add(table_name(name));
        }
        Statement::Drop { names, .. } => names.iter().for_each(|name| add(table_name(name))),
        Statement::Truncate(truncate) => truncate
            .table_names
            .iter()
            .for_each(|target| add(table_name(&target.name))),
        Statement::Copy {
            source: CopySource::Table {
                table_name: name, ..
            },
            ..
        } => add(table_name(name)),
        _ => {}
    }
    let (kind, mut has_where) = match statement {
        Statement::Query(_) => ("select".to_string(), None),
        Statement::Insert(_) => ("insert".to_string(), None),
        Statement::Update(update) => ("update".to_string(), Some(update.selection.is_some())),
        Statement::Delete(delete) => ("delete".to_string(), Some(delete.selection.is_some())),
        Statement::Drop { .. } => ("drop".to_string(), None),
        Statement::Truncate(_) => ("truncate".to_string(), None),
        other => (first_keyword(other), None),
    };
    let mut also_kinds = match statement {
        // MERGE may insert, update and delete, by its clauses: all three are assumed.
        Statement::Merge(_) => vec!["insert".into(), "update".into(), "delete".into()],
        Statement::Insert(insert) => {
            let mut also = Vec::new();
            let upsert = match &insert.on {
                Some(OnInsert::DuplicateKeyUpdate(_)) => true,
                Some(OnInsert::OnConflict(conflict)) => {
                    matches!(conflict.action, OnConflictAction::DoUpdate(_))
                }
                _ => false,
            };
            if upsert {
                also.push("update".to_string());
            }
            if insert.replace_into {
                also.push("delete".to_string());
            }
            also
        }
        _ => Vec::new(),
    };
    // A query whose WITH clause or body changes rows (`WITH d AS (DELETE ... RETURNING *)
    // SELECT ...`) has those kinds too, and so does a COPY of such a query.
    let changes = match statement {
        Statement::Query(query)
        | Statement::Copy {
            source: CopySource::Query(query),
            ..
        } => query_changes(query),
        _ => Vec::new(),
    };
    for changed in changes {
        if changed != kind && !also_kinds.contains(&changed) {
            also_kinds.push(changed);
        }
    }
    // `EXPLAIN ANALYZE` runs the statement it explains, and `PREPARE ... AS` holds one that
    // `EXECUTE` runs later: both have its kinds and its WHERE test.
    let inner = match statement {
        Statement::Explain {
            analyze,
            options,
            statement: inner,
            ..
        } if *analyze
            || options
                .iter()
                .flatten()
                .any(|option| option.name.value.eq_ignore_ascii_case("analyze")) =>
        {
            Some(describe(inner))
        }
        Statement::Prepare {
            statement: inner, ..
        } => Some(describe(inner)),
        _ => None,
    };
    if let Some(inner) = inner {
        has_where = has_where.or(inner.has_where);
        for changed in std::iter::once(inner.kind).chain(inner.also_kinds) {
            if changed != kind && !also_kinds.contains(&changed) {
                also_kinds.push(changed);
            }
        }
    }
    StatementInfo {
        kind,
        tables,
        has_where,
        also_kinds,
    }
}

/// Returns the kinds of the statements that change rows inside `query`: its body and the
/// queries of its WITH clause.
fn query_changes(query: &Query) -> Vec<String> {
    let mut kinds = Vec::new();
    let mut bodies: Vec<&SetExpr> = vec![&query.body];
    if let Some(with) = &query.with {
        bodies.extend(with.cte_tables.iter().map(|cte| cte.query.body.as_ref()));
    }
    while let Some(body) = bodies.pop() {
        match body {
            SetExpr::Insert(inner)
            | SetExpr::Update(inner)
            | SetExpr::Delete(inner)
            | SetExpr::Merge(inner) => {
                let info = describe(inner);
                kinds.push(info.kind);
                kinds.extend(info.also_kinds);
            }
            SetExpr::Query(inner) => kinds.extend(query_changes(inner)),
            SetExpr::SetOperation { left, right, .. } => {
                bodies.push(left);
                bodies.push(right);
            }
            _ => {}
        }
    }
    kinds
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
    fn upserts_have_update_and_replace_delete() {
        let mysql = analyze(
            "INSERT INTO cards (id) VALUES (2) ON DUPLICATE KEY UPDATE note = 'x'; \
             REPLACE INTO cards (id) VALUES (2); INSERT INTO cards (id) VALUES (3)",
            SqlDialect::Mysql,
        );
        let kinds: Vec<(&str, &[String])> = mysql
            .iter()
            .map(|info| (info.kind.as_str(), info.also_kinds.as_slice()))
            .collect();
        assert_eq!(
            kinds,
            [
                ("insert", &["update".to_string()][..]),
                ("insert", &["delete".to_string()]),
                ("insert", &[]),
            ]
        );
        assert!(mysql[0].has_kind("UPDATE"));
        assert!(!mysql[2].has_kind("update"));
        let postgres = analyze(
            "INSERT INTO cards (id) VALUES (2) ON CONFLICT (id) DO UPDATE SET note = 'x'; \
             INSERT INTO cards (id) VALUES (2) ON CONFLICT DO NOTHING",
            SqlDialect::Postgres,
        );
        assert!(postgres[0].has_kind("update"));
        assert!(!postgres[1].has_kind("update"));
    }

    #[test]
    fn changes_inside_queries_and_unparsed_text_have_kinds() {
        let cases = [
            (
                SqlDialect::Postgres,
                "WITH d AS (DELETE FROM cards WHERE id = 2 RETURNING id) SELECT * FROM d",
                "delete",
            ),
            (
                SqlDialect::Postgres,
                "WITH x AS (SELECT 1) DELETE FROM cards WHERE id = 1",
                "delete",
            ),
            (
                SqlDialect::Postgres,
                "MERGE INTO cards c USING (SELECT 3 AS id) s ON c.id = s.id WHEN MATCHED THEN DELETE",
                "delete",
            ),
            (
                SqlDialect::Mysql,
                "INSERT INTO cards PARTITION (p0) (id) VALUES (1) ON DUPLICATE KEY UPDATE note = 'x'",
                "update",
            ),
        ];
        for (dialect, text, kind) in cases {
            let infos = analyze(text, dialect);
            assert!(infos[0].has_kind(kind), "{text}: {infos:?}");
        }
    }

    #[test]
    fn statements_that_run_others_have_their_kinds() {
        let cases = [
            ("EXPLAIN ANALYZE DELETE FROM cards", "delete", Some(false)),
            (
                "EXPLAIN (ANALYZE, COSTS OFF) UPDATE cards SET pan = '' WHERE id = 1",
                "update",
                Some(true),
            ),
            ("PREPARE p AS DELETE FROM cards", "delete", Some(false)),
            (
                "COPY (DELETE FROM cards RETURNING *) TO STDOUT",
                "delete",
                None,
            ),
        ];
        for (text, kind, has_where) in cases {
            let infos = analyze(text, SqlDialect::Postgres);
            assert!(infos[0].has_kind(kind), "{text}: {infos:?}");
            assert!(
                infos[0].tables.contains(&"cards".to_string()),
                "{text}: {infos:?}"
            );
            if has_where.is_some() {
                assert_eq!(infos[0].has_where, has_where, "{text}");
            }
        }
        // Without ANALYZE, EXPLAIN only plans.
        let infos = analyze("EXPLAIN DELETE FROM cards", SqlDialect::Postgres);
        assert!(!infos[0].has_kind("delete"), "{infos:?}");
        // COPY of a table names it.
        for text in ["COPY secrets TO STDOUT", "COPY cards (id, pan) FROM STDIN"] {
            let infos = analyze(text, SqlDialect::Postgres);
            assert_eq!(infos[0].kind, "copy", "{text}");
            assert_eq!(
                infos[0].tables,
                [text.split(' ').nth(1).unwrap_or_default()],
                "{text}"
            );
        }
    }

    #[test]
    fn mariadb_executable_comments_read() {
        for text in ["/*M! DROP TABLE v14 */", "/*M!100000 DROP TABLE v2 */"] {
            let infos = analyze(text, SqlDialect::Mysql);
            assert_eq!(infos[0].kind, "drop", "{text}");
        }
    }

    #[test]
    fn quoted_table_names_unquoted() {
        let mysql = analyze(
            "DELETE FROM `cards` WHERE id = 1; UPDATE `payments`.`cards` SET note = 'x' WHERE id = 2; \
             DROP TABLE `audit`; TRUNCATE TABLE `log`",
            SqlDialect::Mysql,
        );
        let tables: Vec<&[String]> = mysql.iter().map(|info| info.tables.as_slice()).collect();
        assert_eq!(
            tables,
            [&["cards"][..], &["payments.cards"], &["audit"], &["log"]]
        );
        let postgres = analyze(
            r#"DELETE FROM "public"."cards" WHERE id = 1"#,
            SqlDialect::Postgres,
        );
        assert_eq!(postgres[0].tables, ["public.cards"]);
    }

    #[test]
    fn unicode_escaped_identifiers_decoded() {
        for text in [
            r#"DELETE FROM U&"c\0061rds" WHERE id = 1"#,
            r#"DELETE FROM u&"c!0061rds" UESCAPE '!'"#,
            r#"DELETE FROM "public".U&"\+000063ards""#,
            r#"SELECT 1; DELETE FROM U&"c\0061rds""#,
        ] {
            let infos = analyze(text, SqlDialect::Postgres);
            let delete = infos.last().expect("a statement");
            assert_eq!(delete.kind, "delete", "{text}: {infos:?}");
            assert!(
                delete
                    .tables
                    .iter()
                    .any(|table| table == "cards" || table == "public.cards"),
                "{text}: {infos:?}"
            );
        }
        // In a string literal the same characters are text: the statements after it are read.
        let infos = analyze(
            r#"SELECT 'U&"\0027'; DROP TABLE cards; --"'"#,
            SqlDialect::Postgres,
        );
        assert!(infos.iter().any(|info| info.kind == "drop"), "{infos:?}");
        assert_eq!(
            unescape_unicode(r"d\0061t\\a", '\\').as_deref(),
            Some(r"dat\a")
        );
        assert_eq!(
            unescape_unicode(r"\D83D\DE00", '\\').as_deref(),
            Some("\u{1F600}")
        );
        for bad in [r"\00zz", r"\D83D", r"\D83Dx", r"\0000", r"\+11FFFF"] {
            assert_eq!(unescape_unicode(bad, '\\'), None, "{bad}");
        }
    }

    /// Tells whether `infos` has a DELETE on the table `cards`.
    fn deletes_cards(infos: &[StatementInfo]) -> bool {
        infos
            .iter()
            .any(|info| info.kind == "delete" && info.tables == ["cards"])
    }

    #[test]
    fn mysql_mode_readings_find_hidden_statements() {
        let read = |text: &str| {
            let infos = analyze(text, SqlDialect::Mysql);
            let extra = mysql_mode_readings(text, &infos);
            (infos, extra)
        };

        // With NO_BACKSLASH_ESCAPES the string ends at the second quote, and a DROP follows.
        let (infos, extra) = read(r"SELECT 'a\'; DROP TABLE cards; -- '");
        assert!(infos.iter().all(|info| info.kind != "drop"), "{infos:?}");
        assert!(
            extra
                .iter()
                .any(|info| info.kind == "drop" && info.tables == ["cards"]),
            "{extra:?}"
        );

        // With ANSI_QUOTES a double-quoted text is a name, in which a backslash escapes
        // nothing.
        let (infos, extra) = read(r#"SELECT "a\"; DELETE FROM cards; -- ""#);
        assert!(!deletes_cards(&infos), "{infos:?}");
        assert!(deletes_cards(&extra), "{extra:?}");

        // Text read the same in every mode gives nothing more.
        for text in [
            r#"SELECT "plain" FROM t WHERE name = 'x'"#,
            r"SELECT 'it\'s' FROM t",
            "SELECT `a``b` FROM t /* \" */",
            "SELECT 1",
        ] {
            let (_, extra) = read(text);
            assert!(extra.is_empty(), "{text}: {extra:?}");
        }
    }

    #[test]
    fn postgres_escape_readings_find_hidden_statements() {
        let text = r"SELECT 'x\' AS a, ' ; DELETE FROM cards WHERE id = 3; -- '";
        let infos = analyze(text, SqlDialect::Postgres);
        assert!(infos.iter().all(|info| info.kind != "delete"), "{infos:?}");
        let extra = postgres_escape_readings(text, &infos);
        assert!(deletes_cards(&extra), "{extra:?}");
        // Strings whose backslashes never escape, and text without any, read the same.
        for text in [
            r"SELECT E'a\'b', B'101', $$a\$$ FROM t",
            "SELECT 'plain' FROM t",
            r"SELECT U&'\0041' FROM t",
        ] {
            let infos = analyze(text, SqlDialect::Postgres);
            assert!(postgres_escape_readings(text, &infos).is_empty(), "{text}");
        }
        assert_eq!(
            reread_postgres_escapes(r"SELECT 'it\'s', n'\'', E'\'' -- \'").as_deref(),
            Some(r"SELECT 'it''s', n'''', E'\'' -- \'")
        );
        assert_eq!(reread_postgres_escapes(r"SELECT 'a\'"), None);
    }

    #[test]
    fn mysql_rereading_rewrites_literals() {
        assert_eq!(
            reread_mysql(r"SELECT 'a\', 'b'", false, true).as_deref(),
            Some(r"SELECT 'a\\', 'b'")
        );
        assert_eq!(
            reread_mysql(r#"SELECT "x""y", "a`b" FROM t"#, true, false).as_deref(),
            Some(r#"SELECT `x"y`, `a``b` FROM t"#)
        );
        assert_eq!(reread_mysql(r"SELECT 'a\'", false, false), None);
        // A plain comment that starts with an M is still a comment, quotes and all.
        assert_eq!(
            reread_mysql("/*More ' */ SELECT 1", true, false).as_deref(),
            Some("/*More ' */ SELECT 1")
        );
        assert_eq!(reread_mysql("SELECT 1 /* open", false, false), None);
    }

    /// Pads `statement` past the parser's limit with a list of numbers, so it is read by
    /// `analyze_large`.
    fn long(statement: &str) -> String {
        let numbers = "1,".repeat(FULL_PARSE_LIMIT);
        format!("SELECT {numbers}2; {statement}")
    }

    #[test]
    fn long_texts_read_from_words() {
        let infos = analyze(&long("DELETE FROM payments.cards"), SqlDialect::Postgres);
        assert_eq!(infos.len(), 2, "{infos:?}");
        assert_eq!(infos[0].kind, "select");
        assert_eq!(infos[1].kind, "delete");
        assert_eq!(infos[1].has_where, Some(false));
        for table in ["payments", "cards", "payments.cards"] {
            assert!(infos[1].tables.contains(&table.to_string()), "{infos:?}");
        }

        // Semicolons and words inside strings, comments and quoted names are not statements.
        let hidden = [
            (
                SqlDialect::Postgres,
                "SELECT 'a; DROP TABLE x', $q$; DROP TABLE y$q$ -- ; DROP TABLE z",
            ),
            (
                SqlDialect::Postgres,
                "SELECT E'\\'; DROP TABLE x; --', /* /* */ ; DROP TABLE y */ 1",
            ),
            (
                SqlDialect::Mysql,
                "SELECT 'a\\'; DROP TABLE x; --', \"; DROP TABLE y\" # ; DROP TABLE z",
            ),
        ];
        for (dialect, text) in hidden {
            let infos = analyze(&long(text), dialect);
            assert!(
                infos.iter().all(|info| info.kind != "drop"),
                "{text}: {infos:?}"
            );
        }

        // What the server reads as SQL is read: a statement after a comment that ends at a
        // carriage return, MySQL's executable comments, and quoted and escaped names.
        let seen = [
            (
                SqlDialect::Postgres,
                "SELECT 1 -- x\r; DROP TABLE cards",
                "cards",
            ),
            (SqlDialect::Mysql, "/*!40101 DROP TABLE cards */", "cards"),
            (SqlDialect::Mysql, "/*M! DROP TABLE `cards` */", "cards"),
            (SqlDialect::Postgres, r#"DROP TABLE U&"c\0061rds""#, "cards"),
            (
                SqlDialect::Postgres,
                r#"DROP TABLE U&"c!0061rds" UESCAPE '!'"#,
                "cards",
            ),
            (
                SqlDialect::Postgres,
                r#"DROP TABLE "Payments"."Cards""#,
                "payments.cards",
            ),
        ];
        for (dialect, text, table) in seen {
            let infos = analyze(&long(text), dialect);
            let drop = infos.iter().find(|info| info.kind == "drop");
            assert!(
                drop.is_some_and(|info| info.tables.contains(&table.to_string())),
                "{text}: {infos:?}"
            );
        }
    }

    #[test]
    fn long_texts_bounded_by_word_limit() {
        let columns: Vec<String> = (0..LARGE_WORD_LIMIT + 10)
            .map(|n| format!("c{n}"))
            .collect();
        let text = format!("SELECT {} FROM cards", columns.join(", "));
        assert!(text.len() > FULL_PARSE_LIMIT);
        let infos = analyze(&text, SqlDialect::Postgres);
        assert_eq!(infos[0].kind, "select");
        assert!(infos[0].has_kind("unparsed"), "{:?}", infos[0].also_kinds);
        assert!(infos[0].tables.len() <= LARGE_WORD_LIMIT);

        let numbers = [
            ("1", true),
            ("1e5", true),
            ("0x1F", true),
            ("0b101", true),
            ("1table", false),
            ("0xZZ", false),
        ];
        for (word, number) in numbers {
            assert_eq!(is_number(word.as_bytes()), number, "{word}");
        }
    }

    #[test]
    fn load_data_inserts_and_names_qualified_tables() {
        let infos = analyze(
            "LOAD DATA LOCAL INFILE '/tmp/rows.csv' REPLACE INTO TABLE payments.cards",
            SqlDialect::Mysql,
        );
        assert_eq!(infos[0].kind, "load", "{infos:?}");
        assert!(infos[0].has_kind("insert"), "{infos:?}");
        assert!(infos[0].has_kind("delete"), "{infos:?}");
        assert!(
            infos[0].tables.contains(&"payments.cards".to_string()),
            "{infos:?}"
        );
        let infos = analyze(
            "LOAD XML INFILE '/tmp/rows.xml' INTO TABLE `payments`.`cards`",
            SqlDialect::Mysql,
        );
        assert!(infos[0].has_kind("insert"), "{infos:?}");
        assert!(!infos[0].has_kind("delete"), "{infos:?}");
        assert!(
            infos[0].tables.contains(&"payments.cards".to_string()),
            "{infos:?}"
        );
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
    fn replication_commands_touch_no_table() {
        let infos = analyze(
            "START_REPLICATION SLOT \"cards\" LOGICAL 0/0 (proto_version '1', publication_names 'pub')",
            SqlDialect::Postgres,
        );
        assert_eq!(infos[0].kind, "start_replication");
        assert!(!infos[0].tables.contains(&"cards".to_string()), "{infos:?}");
        let infos = analyze(
            "CREATE_REPLICATION_SLOT s LOGICAL pgoutput",
            SqlDialect::Postgres,
        );
        assert_eq!(infos[0].kind, "create_replication_slot");
        assert!(!infos[0].tables.contains(&"cards".to_string()), "{infos:?}");
        for command in REPLICATION_COMMANDS {
            assert!(
                crate::policy::is_statement_kind(command),
                "{command} can be named in a rule"
            );
        }
    }

    #[test]
    fn analyze_unparsed_words_count_as_tables() {
        let infos = analyze(
            "REINDEX TABLE vault.secrets; CHECKPOINT",
            SqlDialect::Postgres,
        );
        assert_eq!(infos[0].kind, "reindex");
        for table in ["secrets", "vault", "vault.secrets"] {
            assert!(infos[0].tables.contains(&table.to_string()), "{infos:?}");
        }
    }

    #[test]
    fn shape_ends_comments_at_carriage_return() {
        // A cached shape must not hide a statement that follows a comment ended by `\r`.
        let first = analyze("SELECT 2 -- hello", SqlDialect::Postgres);
        assert_eq!(first.len(), 1);
        let hidden = analyze(
            "SELECT 1 -- x\r; DELETE FROM cards WHERE id = 1",
            SqlDialect::Postgres,
        );
        assert!(
            hidden.iter().any(|info| info.kind == "delete"),
            "{hidden:?}"
        );
    }

    #[test]
    fn shape_blanks_literals_only() {
        let shape_pg = |text| shape(text, SqlDialect::Postgres);
        assert_eq!(
            shape_pg("SELECT abalance FROM pgbench_accounts WHERE aid = 91234;").as_deref(),
            Some("SELECT abalance FROM pgbench_accounts WHERE aid = 0;")
        );
        assert_eq!(
            shape_pg("UPDATE t2 SET note = 'it''s 4111 1111' WHERE id = $1 -- why\n").as_deref(),
            Some("UPDATE t2 SET note = '' WHERE id = $1  \n")
        );
        assert_eq!(
            shape_pg("SELECT \"col 7\" /* 12 */ FROM \"t'x\" WHERE v = 1.5").as_deref(),
            Some("SELECT \"col 7\"   FROM \"t'x\" WHERE v = 0.0")
        );
        // Names that differ only in their digits keep their own shapes.
        assert_ne!(shape_pg("DROP TABLE t1"), shape_pg("DROP TABLE t2"));
    }

    #[test]
    fn shape_declines_what_it_cannot_bound() {
        for text in [
            r"SELECT E'a\'b'",
            "SELECT $$ DROP TABLE x $$",
            "SELECT $tag$ x $tag$",
            "SELECT 'unterminated",
            "SELECT 1--1 FROM secrets",
            "SELECT /* /* nested */ */ 1",
            "SELECT /*+ hint */ 1",
            "SELECT X'0F'",
            "SELECT 1.5e3",
        ] {
            assert_eq!(shape(text, SqlDialect::Postgres), None, "{text}");
        }
        for text in [
            "SELECT * FROM 1secrets",
            "SELECT 0x1F",
            "SELECT 1 # comment",
            "SELECT /*!50000 1 */",
            r"SELECT 'a\'b'",
        ] {
            assert_eq!(shape(text, SqlDialect::Mysql), None, "{text}");
        }
    }

    #[test]
    fn cached_analysis_matches_a_fresh_parse() {
        let texts = [
            ("SELECT * FROM cards WHERE id = 1", SqlDialect::Postgres),
            ("SELECT * FROM cards WHERE id = 2", SqlDialect::Postgres),
            ("DELETE FROM cards WHERE pan = '4111'", SqlDialect::Postgres),
            ("DELETE FROM cards", SqlDialect::Postgres),
            ("DROP TABLE audit_2024; SELECT 5", SqlDialect::Postgres),
            ("DROP TABLE audit_2025; SELECT 6", SqlDialect::Postgres),
            ("SELECT 'x' FROM t; CHECKPOINT", SqlDialect::Postgres),
            ("UPDATE `kv` SET v = 'a' WHERE k = 7", SqlDialect::Mysql),
            ("UPDATE `kv` SET v = 'b'", SqlDialect::Mysql),
            ("SELECT * FROM 1secrets", SqlDialect::Mysql),
            ("SELECT * FROM 2secrets", SqlDialect::Mysql),
        ];
        // Twice over, so the second round is served from the cache.
        for _ in 0..2 {
            for (text, dialect) in texts {
                assert_eq!(
                    analyze(text, dialect),
                    analyze_uncached(text, dialect),
                    "{text}"
                );
            }
        }
    }
}
