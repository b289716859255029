//! The demo's transcript, step by step: what `cargo xtask demo` shows must keep happening.
//! Needs root, so run it with `cargo xtask test`.

use std::path::Path;

use gateway_user::testing::demo::{DemoPaths, run};

#[test]
fn demo_transcript_shows_each_step() {
    let store = tempfile::tempdir().expect("temporary directory");
    let binaries = Path::new(env!("CARGO_BIN_EXE_gatewayd"))
        .parent()
        .expect("binary directory")
        .to_path_buf();
    let paths = DemoPaths {
        binaries,
        store: store.path().join("store"),
    };
    let mut transcript = Vec::new();
    let result = run(&paths, &mut transcript);
    let text = String::from_utf8_lossy(&transcript).into_owned();
    if let Err(error) = result {
        panic!("the demo failed: {error:#}\ntranscript so far:\n{text}");
    }

    let step = |title: &str| -> &str {
        let start = text
            .find(&format!("== {title}"))
            .unwrap_or_else(|| panic!("no step {title:?} in:\n{text}"));
        let rest = &text[start..];
        let end = rest[3..].find("\n== ").map_or(rest.len(), |end| end + 3);
        &rest[..end]
    };

    let select = step("psql in payments-api-0: SELECT");
    assert!(select.contains("4111 11** **** 1111"), "{select}");
    assert!(select.contains("5555-55**-****-4444"), "{select}");
    assert!(
        !text.contains("4111 1111 1111 1111"),
        "a clear PAN in:\n{text}"
    );

    let drop = step("psql in payments-api-0: DROP");
    assert!(
        drop.contains("statement matches rule \"no-drop\""),
        "{drop}"
    );
    assert!(drop.contains("still there, with 2 rows"), "{drop}");

    let pods = step("kubectl in payments-api-0: get pods");
    assert!(pods.contains("payments-api-0"), "{pods}");
    assert!(pods.contains("intruder"), "{pods}");

    let secret = step("kubectl in payments-api-0: create secret");
    assert!(secret.contains("review-secret-writes"), "{secret}");
    assert!(secret.contains("approved"), "{secret}");
    assert!(secret.contains("secret/db-password created"), "{secret}");

    let exec = step("kubectl in payments-api-0: exec -it");
    assert!(exec.contains("Forbidden"), "{exec}");
    assert!(exec.contains("no-interactive-exec"), "{exec}");

    let stolen = step("kubectl in intruder");
    assert!(stolen.contains("Forbidden"), "{stolen}");
    assert!(stolen.contains("no-stolen-tokens"), "{stolen}");
    assert!(
        stolen.contains("The recording holds 1 token_pod_mismatch event"),
        "{stolen}"
    );

    // The session list counts the intruder's one request, and its denial.
    let intruder = text
        .lines()
        .find(|line| line.contains("payments/intruder"))
        .unwrap_or_else(|| panic!("no intruder session listed in:\n{text}"));
    let columns: Vec<&str> = intruder.split_whitespace().collect();
    assert_eq!(
        columns[columns.len() - 3..],
        ["1", "1", "closed"],
        "{intruder}"
    );

    assert!(text.contains("PASS"), "verify did not pass:\n{text}");
}
