//! Builds the eBPF programs (`gateway-ebpf`) for the BPF target with the nightly toolchain and
//! bpf-linker, so the daemon embeds them and a plain `cargo build` is enough.

use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let metadata = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("gateway-user has no parent directory")?
        .join("gateway-ebpf");
    let root_dir = metadata
        .to_str()
        .ok_or_else(|| anyhow!("path {} is not UTF-8", metadata.display()))?;
    let package = Package {
        name: "gateway-ebpf",
        root_dir,
        ..Default::default()
    };
    // aya-build passes the nested cargo's progress lines on as build warnings; a quiet nested
    // build keeps real warnings and errors visible.
    // SAFETY: build scripts run single-threaded, so nothing reads the environment concurrently.
    unsafe { std::env::set_var("CARGO_TERM_QUIET", "true") };
    aya_build::build_ebpf([package], Toolchain::default()).context(
        "building the eBPF programs failed; run `cargo xtask setup` to install the nightly \
         rust-src component and bpf-linker",
    )
}
