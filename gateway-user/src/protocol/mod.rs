//! Protocol handlers, one per target class. Each takes the accepted client connection and the
//! upstream connection and runs the session to its end.
pub mod kube;
pub mod mysql;
pub mod postgres;
pub mod tcp;

/// Returns, for each of `count` statements sent as one text, its position (from 1) and the
/// count, or `None` for a text of a single statement.
pub(crate) fn statement_parts(count: usize) -> impl Iterator<Item = Option<(u64, u64)>> {
    let total = count as u64;
    (1..=total).map(move |part| (total > 1).then_some((part, total)))
}

/// Makes text of bytes, with U+FFFD for invalid UTF-8 such as a value cut inside a character.
/// Valid bytes are taken without a copy.
pub(crate) fn utf8_text(bytes: Vec<u8>) -> String {
    String::from_utf8(bytes)
        .unwrap_or_else(|error| String::from_utf8_lossy(error.as_bytes()).into_owned())
}
