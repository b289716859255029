//! Developer and CI tasks: `cargo xtask setup | test | demo | bench | fuzz | ci | image`.
//!
//! `setup` installs, only where missing, what building and testing need on a Debian machine:
//! Debian packages (LLVM 22 for bpf-linker, iproute2, the database servers and clients the
//! tests drive), the nightly `rust-src` component the eBPF build uses, and bpf-linker. Every
//! other task runs it first, so a fresh clone needs nothing else.
//!
//! This crate depends on nothing of the workspace, so it builds before the eBPF toolchain
//! exists.

use std::{
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Command, ExitCode, Stdio},
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

mod image;

#[derive(Debug, Parser)]
#[command(
    name = "xtask",
    about = "Build, test and demo tasks for the node gateway"
)]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Debug, Subcommand)]
enum Task {
    /// Install the missing toolchain parts and Debian packages (idempotent).
    Setup,
    /// Set up, then run every test, the namespace tests included (needs root).
    Test,
    /// Set up, then redirect an unmodified client on a test node and show its recording.
    Demo,
    /// Set up, then run the benchmarks: connect hook, relay, memory, PostgreSQL, MySQL and
    /// the Kubernetes API.
    Bench {
        /// Run only these sections (connect, throughput, memory, pgbench, mysql, kube); the
        /// criterion benchmarks run only when no section is named.
        sections: Vec<String>,
    },
    /// Run the CI checks: format check, clippy with warnings denied, a short fuzz run, `test`.
    Ci,
    /// Run each fuzz target for a bounded time (installs cargo-fuzz if missing).
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 30)]
        seconds: u64,
    },
    /// Build the gatewayd image with podman, making stand-ins for base images that cannot be
    /// pulled.
    ///
    /// Needs root, podman and debootstrap. It is not part of `test` or `ci`, because a first
    /// build takes tens of minutes.
    Image(image::ImageOptions),
}

/// Debian packages the build and the tests need, with what each is for.
const DEBIAN_PACKAGES: &[(&str, &str)] = &[
    ("llvm-22-dev", "bpf-linker links against LLVM 22"),
    (
        "libpolly-22-dev",
        "LLVM 22's static libraries reference Polly",
    ),
    ("zlib1g-dev", "linking bpf-linker"),
    ("libzstd-dev", "linking bpf-linker"),
    ("iproute2", "`ip` builds the test node's namespaces"),
    ("util-linux", "`unshare` and `mount` in the tests"),
    (
        "curl",
        "HTTP client in the Kubernetes, operations and benchmark runs",
    ),
    (
        "openssl",
        "raw TLS clients and certificate checks in the Kubernetes handler tests",
    ),
    ("socat", "raw TCP client in the Kubernetes handler tests"),
    ("postgresql", "PostgreSQL server for the database tests"),
    ("postgresql-client", "psql and pgbench"),
    ("mariadb-server", "MariaDB server for the database tests"),
    ("mariadb-client", "the mysql client"),
    (
        "pgbouncer",
        "a reference PostgreSQL proxy in `cargo xtask bench`",
    ),
];

/// bpf-linker release that builds against LLVM 22 with the toolchains used here.
const BPF_LINKER_VERSION: &str = "0.13.0";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Task::Setup => setup(),
        Task::Test => setup().and_then(|()| test()),
        Task::Demo => setup().and_then(|()| demo()),
        Task::Bench { sections } => setup().and_then(|()| bench(&sections)),
        Task::Ci => setup().and_then(|()| ci()),
        Task::Fuzz { seconds } => setup().and_then(|()| fuzz(seconds)),
        Task::Image(options) => image::build_image(&options),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("xtask: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace root")
        .to_path_buf()
}

/// Runs a command, failing with its name when it cannot start or exits non-zero.
fn run(command: &mut Command) -> anyhow::Result<()> {
    let description = format!("{command:?}");
    let status = command
        .status()
        .with_context(|| format!("failed to start {description}"))?;
    if !status.success() {
        bail!("{description} failed with {status}");
    }
    Ok(())
}

fn cargo() -> Command {
    let mut command = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    command.current_dir(workspace_root());
    command
}

fn is_root() -> bool {
    // `id -u` avoids an unsafe geteuid() call in a crate that has no other need for libc.
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|output| String::from_utf8_lossy(&output.stdout).trim() == "0")
}

fn setup() -> anyhow::Result<()> {
    install_debian_packages()?;
    install_rust_src()?;
    install_bpf_linker()?;
    check_kubectl()?;
    eprintln!(
        "xtask: setup checked: the Debian packages, nightly rust-src, bpf-linker and kubectl are in place"
    );
    Ok(())
}

/// Oldest kubectl minor version the Kubernetes tests are written against.
const KUBECTL_MIN_MINOR: u32 = 32;
/// The kubectl the Kubernetes tests and the demo run.
const KUBECTL: &str = "/usr/bin/kubectl";

/// Checks that kubectl 1.32 or newer is installed. Debian's archive only has kubectl 1.20, so
/// setup cannot install it; the tests drive the real client and need this one.
fn check_kubectl() -> anyhow::Result<()> {
    let output = Command::new(KUBECTL)
        .args(["version", "--client", "-o", "json"])
        .output();
    let minor = output.ok().and_then(|output| {
        let report: serde_json::Value = serde_json::from_slice(&output.stdout).ok()?;
        report["clientVersion"]["minor"]
            .as_str()?
            .trim_end_matches('+')
            .parse::<u32>()
            .ok()
    });
    match minor {
        Some(minor) if minor >= KUBECTL_MIN_MINOR => Ok(()),
        Some(minor) => bail!(
            "{KUBECTL} is kubectl 1.{minor}; the Kubernetes tests need 1.{KUBECTL_MIN_MINOR} or \
             newer (from the Kubernetes package repository, pkgs.k8s.io)"
        ),
        None => bail!(
            "{KUBECTL} is missing; the Kubernetes tests need kubectl 1.{KUBECTL_MIN_MINOR} or newer, \
             which Debian's archive does not carry: install it from the Kubernetes package \
             repository (pkgs.k8s.io)"
        ),
    }
}

fn install_debian_packages() -> anyhow::Result<()> {
    let missing: Vec<&str> = DEBIAN_PACKAGES
        .iter()
        .map(|(name, _)| *name)
        .filter(|name| !debian_package_installed(name))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root() {
        bail!(
            "missing Debian packages: {}; run `cargo xtask setup` as root or install them with apt-get",
            missing.join(" ")
        );
    }
    eprintln!("xtask: installing Debian packages: {}", missing.join(" "));
    run(Command::new("apt-get").args(["update", "-qq"]))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

fn debian_package_installed(name: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", name])
        .output()
        .is_ok_and(|output| {
            String::from_utf8_lossy(&output.stdout).contains("install ok installed")
        })
}

fn install_rust_src() -> anyhow::Result<()> {
    let installed = Command::new("rustup")
        .args(["component", "list", "--installed", "--toolchain", "nightly"])
        .output()
        .context("failed to run rustup; the eBPF build needs rustup with a nightly toolchain")?;
    let listing = String::from_utf8_lossy(&installed.stdout);
    if installed.status.success() && listing.lines().any(|line| line.starts_with("rust-src")) {
        return Ok(());
    }
    if !installed.status.success() {
        eprintln!("xtask: installing the nightly toolchain");
        run(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
        ]))?;
    }
    eprintln!("xtask: adding rust-src to the nightly toolchain");
    run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))
}

fn install_bpf_linker() -> anyhow::Result<()> {
    let present = Command::new("bpf-linker")
        .arg("--version")
        .output()
        .is_ok_and(|output| output.status.success());
    if present {
        return Ok(());
    }
    eprintln!("xtask: building bpf-linker {BPF_LINKER_VERSION} against LLVM 22");
    run(
        Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION])
            .args(["--no-default-features", "--features", "llvm-22"])
            .env("LLVM_PREFIX", LLVM_PREFIX),
    )
}

fn require_root(task: &str) -> anyhow::Result<()> {
    if !is_root() {
        bail!(
            "`cargo xtask {task}` creates network namespaces, cgroups and eBPF links: run it as root"
        );
    }
    Ok(())
}

fn test() -> anyhow::Result<()> {
    require_root("test")?;
    let mut child = cargo()
        .args([
            "test",
            "--features",
            "gateway-user/testing",
            "--no-fail-fast",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .context("failed to start cargo test")?;

    // Echo cargo's output and add up its per-binary "test result" lines, so the run ends with
    // one total instead of the last binary's count (often a doc-test binary with none).
    let (mut passed, mut failed) = (0u64, 0u64);
    let stdout = child.stdout.take().expect("piped stdout");
    for line in BufReader::new(stdout).lines() {
        let line = line.context("failed to read cargo test output")?;
        println!("{line}");
        if let Some(counts) = line.strip_prefix("test result: ") {
            passed += count_before(counts, " passed");
            failed += count_before(counts, " failed");
        }
    }
    let status = child.wait().context("failed to wait for cargo test")?;
    println!("{passed} passed, {failed} failed");
    if !status.success() {
        bail!("cargo test failed with {status}");
    }
    Ok(())
}

/// Reads the number just before `label` in a libtest summary such as
/// `ok. 12 passed; 0 failed; 0 ignored`.
fn count_before(summary: &str, label: &str) -> u64 {
    summary
        .split(';')
        .find(|part| part.ends_with(label))
        .and_then(|part| part.trim_end_matches(label).rsplit(' ').next())
        .and_then(|number| number.parse().ok())
        .unwrap_or(0)
}

fn ci() -> anyhow::Result<()> {
    run(cargo().args(["fmt", "--all", "--check"]))?;
    run(cargo().args([
        "clippy",
        "--all-targets",
        "--features",
        "gateway-user/testing",
        "--",
        "-D",
        "warnings",
    ]))?;
    // A short run proves the fuzz targets build and hold on fresh input; longer runs are
    // `cargo xtask fuzz --seconds N`. The tests come last so their total closes the output.
    fuzz(10)?;
    test()
}

/// Fuzz targets under `fuzz/`: the PostgreSQL frame reader, startup parser and row masking,
/// and the MySQL packet reader with its row masking.
const FUZZ_TARGETS: &[&str] = &["pg_frames", "pg_startup", "pg_rows", "mysql_packets"];

fn fuzz(seconds: u64) -> anyhow::Result<()> {
    let present = Command::new("cargo")
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|output| output.status.success());
    if !present {
        eprintln!("xtask: installing cargo-fuzz");
        run(Command::new("cargo").args(["install", "cargo-fuzz", "--locked"]))?;
    }
    for target in FUZZ_TARGETS {
        eprintln!("xtask: fuzzing {target} for {seconds} s");
        // cargo-fuzz needs nightly; `rustup run` picks it whatever cargo runs this task.
        run(Command::new("rustup")
            .args(["run", "nightly", "cargo", "fuzz", "run", target, "--"])
            .arg(format!("-max_total_time={seconds}"))
            .current_dir(workspace_root())
            .env_remove("CARGO")
            .env_remove("RUSTUP_TOOLCHAIN"))?;
    }
    Ok(())
}

fn demo() -> anyhow::Result<()> {
    require_root("demo")?;
    run_example("demo", false, &[])
}

fn bench(sections: &[String]) -> anyhow::Result<()> {
    require_root("bench")?;
    run_example("bench", true, sections)?;
    if !sections.is_empty() {
        return Ok(());
    }
    run(cargo().args([
        "bench",
        "--quiet",
        "--package",
        "gateway-user",
        "--bench",
        "recording",
    ]))
}

/// Builds the binaries an example drives, then runs the example with the same profile.
fn run_example(name: &str, release: bool, args: &[String]) -> anyhow::Result<()> {
    let profile: &[&str] = if release { &["--release"] } else { &[] };
    // Not quiet: the first build takes minutes, and cargo's progress shows it is not stuck.
    eprintln!("xtask: building the gateway's binaries (a few minutes the first time)");
    run(cargo()
        .args(["build", "--features", "gateway-user/testing", "--bins"])
        .args(profile))?;
    // Not quiet either: the example itself compiles for a minute or more the first time.
    eprintln!("xtask: building and starting the {name} example");
    run(cargo()
        .args(["run", "--features", "gateway-user/testing"])
        .args(["--package", "gateway-user", "--example", name])
        .args(profile)
        .arg("--")
        .args(args))
}
