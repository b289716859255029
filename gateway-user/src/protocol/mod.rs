//! Protocol handlers, one per target class. Each takes the accepted client connection and the
//! upstream connection and runs the session to its end.
pub mod kube;
pub mod mysql;
pub mod postgres;
pub mod tcp;

/// Makes text of bytes, with U+FFFD for invalid UTF-8 such as a value cut inside a character.
/// Valid bytes are taken without a copy.
pub(crate) fn utf8_text(bytes: Vec<u8>) -> String {
    String::from_utf8(bytes)
        .unwrap_or_else(|error| String::from_utf8_lossy(error.as_bytes()).into_owned())
}
