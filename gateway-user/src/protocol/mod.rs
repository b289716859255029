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

/// Maximum length of a text that each part of a text of several statements records in full. The parts after
/// the first of a longer text refer to the first instead, so that a text of thousands of short
/// statements is not held and recorded once per statement.
const PART_TEXT_LIMIT: usize = 256;

/// Returns the text to record with `part` of a text of several statements: `text` itself for
/// the first part and for short texts, else a reference to the first part.
pub(crate) fn part_text(text: &str, part: Option<(u64, u64)>) -> String {
    match part {
        Some((number, count)) if number > 1 && text.len() > PART_TEXT_LIMIT => {
            format!("(statement {number} of {count}; the text is recorded with statement 1)")
        }
        _ => text.to_string(),
    }
}

/// Completes once `limit` has passed unless `logged_in` is set by then; never completes after
/// that.
pub(crate) async fn login_deadline(
    logged_in: &std::sync::atomic::AtomicBool,
    limit: std::time::Duration,
) {
    tokio::time::sleep(limit).await;
    if logged_in.load(std::sync::atomic::Ordering::Acquire) {
        std::future::pending::<()>().await;
    }
}

/// Memory all sessions of both SQL handlers together may hold in large statements being read
/// whole: those of 64 KiB or more. Four statements at the 64 MiB limit fit at once. Past it, a
/// statement is read and dropped, and the client gets an error, so a few pods cannot make the
/// daemon hold gigabytes.
pub(crate) const LARGE_STATEMENT_BUDGET: usize = 256 * 1024 * 1024;
/// Length from which a statement counts against [`LARGE_STATEMENT_BUDGET`]. Shorter ones are
/// outside it: 16,384 sessions (the default `proxy.max_connections`) each holding one just
/// under this length take 1 GiB.
pub(crate) const LARGE_STATEMENT: usize = 64 * 1024;
/// The rule recorded for a statement dropped because the budget was in use.
pub(crate) const LARGE_STATEMENT_RULE: &str = "gateway:statement-memory";

/// The bytes of [`LARGE_STATEMENT_BUDGET`] still free, as semaphore permits.
static LARGE_STATEMENTS: std::sync::LazyLock<tokio::sync::Semaphore> =
    std::sync::LazyLock::new(|| tokio::sync::Semaphore::new(LARGE_STATEMENT_BUDGET));

/// Reserves `bytes` of the budget for large statements while a statement of that length is
/// read and judged. The returned permit gives them back when dropped.
///
/// Returns `Ok(None)` for a statement under [`LARGE_STATEMENT`], which needs no reservation.
/// When the budget cannot spare the bytes, logs the rejection and returns the message for the
/// client.
pub(crate) fn reserve_statement_memory(
    bytes: usize,
) -> Result<Option<tokio::sync::SemaphorePermit<'static>>, String> {
    if bytes < LARGE_STATEMENT {
        return Ok(None);
    }
    let permits = u32::try_from(bytes).unwrap_or(u32::MAX);
    if let Ok(permit) = LARGE_STATEMENTS.try_acquire_many(permits) {
        return Ok(Some(permit));
    }
    let in_use = LARGE_STATEMENT_BUDGET - LARGE_STATEMENTS.available_permits();
    tracing::warn!(
        bytes,
        in_use,
        "large statement rejected: memory budget in use"
    );
    Err(format!(
        "gateway: a statement of {bytes} bytes was not run: statements being read hold {} MiB of the gateway's {} MiB for large statements; retry later",
        in_use / (1024 * 1024),
        LARGE_STATEMENT_BUDGET / (1024 * 1024)
    ))
}

/// Makes text of bytes, with U+FFFD for invalid UTF-8 such as a value cut inside a character.
/// Valid bytes are taken without a copy.
pub(crate) fn utf8_text(bytes: Vec<u8>) -> String {
    String::from_utf8(bytes)
        .unwrap_or_else(|error| String::from_utf8_lossy(error.as_bytes()).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_text_recorded_with_first_part() {
        let long = "DO 1;".repeat(100);
        assert_eq!(part_text(&long, Some((1, 100))), long);
        assert_eq!(
            part_text(&long, Some((2, 100))),
            "(statement 2 of 100; the text is recorded with statement 1)"
        );
        assert_eq!(part_text("DO 1; DO 2", Some((2, 2))), "DO 1; DO 2");
        assert_eq!(part_text(&long, None), long);
    }
}
