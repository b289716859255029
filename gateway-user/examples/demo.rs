//! The demo behind `cargo xtask demo`: a payments pod and an intruder pod on one test node,
//! PostgreSQL with a table of card numbers, and the test Kubernetes API server. Unmodified
//! `psql` and `kubectl` run in the pods while `gatewayd` masks, denies, holds for approval and
//! records. The transcript prints the result of each step (see `gateway_user::testing::demo`).
//!
//! Needs root and the binaries built next to this example (`cargo xtask demo` does both).

use std::fs;

use gateway_user::testing::{self, demo};

fn main() -> anyhow::Result<()> {
    let binaries = testing::binary_dir()?;
    let demo_dir = binaries.parent().unwrap_or(&binaries).join("demo");
    fs::create_dir_all(&demo_dir)?;
    // Each run starts with an empty store, so its counts and listings are its own.
    let store = demo_dir.join("store");
    if store.exists() {
        fs::remove_dir_all(&store)?;
    }
    let paths = demo::DemoPaths { binaries, store };
    demo::run(&paths, &mut std::io::stdout())
}
