//! `cargo xtask image`: builds the gatewayd image from `daemonset/Containerfile` with podman.
//!
//! The Containerfile starts from `docker.io/library/rust:1.95-bookworm` and
//! `gcr.io/distroless/cc-debian12`. A base image that podman already has is used as it is, and
//! a missing one is pulled. Only when the pull fails does this task build a local stand-in
//! under the same name, from `daemonset/standin/`: a Debian bookworm root made by debootstrap,
//! plus, for the Rust image, copies of this machine's Rust 1.95 and nightly toolchains. Each
//! stand-in carries the label `org.opencontainers.image.description` saying what it is.
//!
//! Every podman build here runs with `--network=host`, so podman creates no bridge network and
//! turns on no IP forwarding.

use std::{
    fs,
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context as _, bail};

use crate::{run, workspace_root};

/// Base image of the builder stage; keep in step with `daemonset/Containerfile`.
const RUST_IMAGE: &str = "docker.io/library/rust:1.95-bookworm";
/// Rust release of `RUST_IMAGE`, the toolchain its stand-in copies from this machine.
const RUST_VERSION: &str = "1.95.0";
/// Base image of the runtime stage; keep in step with `daemonset/Containerfile`.
const RUNTIME_IMAGE: &str = "gcr.io/distroless/cc-debian12";
/// The debootstrap root both stand-ins start from.
const DEBIAN_STANDIN_IMAGE: &str = "localhost/standin/debian:bookworm";
const DEBIAN_MIRROR: &str = "http://deb.debian.org/debian";

/// Links that rustup-init creates in `$CARGO_HOME/bin`, all pointing at the rustup binary.
const RUSTUP_PROXIES: &[&str] = &[
    "cargo",
    "cargo-clippy",
    "cargo-fmt",
    "cargo-miri",
    "clippy-driver",
    "rls",
    "rust-analyzer",
    "rust-gdb",
    "rust-gdbgui",
    "rust-lldb",
    "rustc",
    "rustdoc",
    "rustfmt",
];

/// APT sources of the official debian:bookworm image. debootstrap writes only the release
/// itself, without the updates and security suites (LLVM 22 comes from bookworm-security).
const DEBIAN_SOURCES: &str = "\
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
";

/// Options of `cargo xtask image`.
#[derive(Debug, clap::Args)]
pub struct ImageOptions {
    /// Name and tag of the built image.
    #[arg(long, default_value = "node-gateway:0.1.0")]
    tag: String,
    /// OCI runtime for podman (its `--runtime` option), for example `runc` on a host where
    /// crun rejects the cgroup layout.
    #[arg(long)]
    runtime: Option<String>,
    /// CA bundle mounted over the builder's /etc/ssl/certs/ca-certificates.crt during RUN
    /// steps, for networks whose TLS proxy re-signs crates.io's certificate.
    #[arg(long)]
    ca_bundle: Option<PathBuf>,
    /// Directory for the debootstrap root and the toolchain copy [default: image-standins
    /// under the cargo target directory].
    #[arg(long)]
    work_dir: Option<PathBuf>,
}

/// Makes sure both base images exist, then builds the gatewayd image and prints how long the
/// build took.
pub fn build_image(options: &ImageOptions) -> anyhow::Result<()> {
    let podman = Podman {
        runtime: options.runtime.clone(),
    };
    podman.check()?;
    let work_dir = match &options.work_dir {
        Some(dir) => dir.clone(),
        None => target_dir().join("image-standins"),
    };
    fs::create_dir_all(&work_dir)
        .with_context(|| format!("failed to create {}", work_dir.display()))?;

    if !podman.has_or_pulls(RUST_IMAGE)? {
        build_rust_standin(&podman, &work_dir)?;
    }
    if !podman.has_or_pulls(RUNTIME_IMAGE)? {
        build_runtime_standin(&podman, &work_dir)?;
    }

    let root = workspace_root();
    let mut build = podman.command();
    build.args(["build", "--network=host", "--file"]);
    build.arg(root.join("daemonset/Containerfile"));
    build.args(["--tag", &options.tag]);
    if let Some(bundle) = &options.ca_bundle {
        let bundle = fs::canonicalize(bundle)
            .with_context(|| format!("CA bundle {} not found", bundle.display()))?;
        build.arg("--volume").arg(format!(
            "{}:/etc/ssl/certs/ca-certificates.crt:ro",
            bundle.display()
        ));
    }
    build.arg(&root);
    eprintln!(
        "xtask: building {} from daemonset/Containerfile",
        options.tag
    );
    let started = Instant::now();
    run(&mut build)?;
    eprintln!(
        "xtask: built {} in {:.0} s",
        options.tag,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The podman command line, with the runtime chosen on the command line.
struct Podman {
    runtime: Option<String>,
}

impl Podman {
    fn command(&self) -> Command {
        let mut command = Command::new("podman");
        if let Some(runtime) = &self.runtime {
            command.args(["--runtime", runtime]);
        }
        command
    }

    fn check(&self) -> anyhow::Result<()> {
        let present = self
            .command()
            .arg("--version")
            .output()
            .is_ok_and(|output| output.status.success());
        if !present {
            bail!("podman is missing; install it with `apt-get install podman`");
        }
        Ok(())
    }

    fn has_image(&self, name: &str) -> bool {
        self.command()
            .args(["image", "exists", name])
            .status()
            .is_ok_and(|status| status.success())
    }

    /// Returns whether podman has `name`, pulling it first if missing. A failed pull is
    /// reported and returns false, so the caller builds a stand-in.
    fn has_or_pulls(&self, name: &str) -> anyhow::Result<bool> {
        if self.has_image(name) {
            eprintln!("xtask: using {name} from podman's local storage");
            return Ok(true);
        }
        eprintln!("xtask: pulling {name}");
        let status = self
            .command()
            .args(["pull", "--quiet", name])
            .stdout(Stdio::null())
            .status()
            .context("failed to start podman pull")?;
        if status.success() {
            return Ok(true);
        }
        eprintln!("xtask: pulling {name} failed ({status}); building a local stand-in");
        Ok(false)
    }
}

/// Returns the cargo target directory, where the stand-ins' work files go by default.
fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

fn standin_dir() -> PathBuf {
    workspace_root().join("daemonset/standin")
}

/// Imports a debootstrap root of Debian bookworm as `DEBIAN_STANDIN_IMAGE`, unless podman has
/// it already.
fn import_debian_root(podman: &Podman, work_dir: &Path) -> anyhow::Result<()> {
    if podman.has_image(DEBIAN_STANDIN_IMAGE) {
        return Ok(());
    }
    let root = work_dir.join("bookworm-root");
    // The marker is written once debootstrap succeeds, so a root without it is from a run
    // that stopped early and is made again.
    let complete = work_dir.join("bookworm-root.complete");
    if !complete.exists() {
        if root.exists() {
            fs::remove_dir_all(&root)
                .with_context(|| format!("failed to remove {}", root.display()))?;
        }
        eprintln!("xtask: debootstrap bookworm into {}", root.display());
        run(Command::new("debootstrap")
            .args(["--variant=minbase", "bookworm"])
            .arg(&root)
            .arg(DEBIAN_MIRROR))
        .context("debootstrap failed; install it with `apt-get install debootstrap`")?;
        fs::write(&complete, "")?;
    }

    let sources_list = root.join("etc/apt/sources.list");
    if sources_list.exists() {
        fs::remove_file(&sources_list)?;
    }
    fs::write(
        root.join("etc/apt/sources.list.d/debian.sources"),
        DEBIAN_SOURCES,
    )?;
    // Like the official image: no package lists or downloaded packages.
    remove_dir_contents(&root.join("var/lib/apt/lists"))?;
    remove_dir_contents(&root.join("var/cache/apt/archives"))?;

    eprintln!(
        "xtask: importing {} as {DEBIAN_STANDIN_IMAGE}",
        root.display()
    );
    let mut tar = Command::new("tar")
        .arg("-C")
        .arg(&root)
        .args(["-c", "."])
        .stdout(Stdio::piped())
        .spawn()
        .context("failed to start tar")?;
    let tar_output = tar.stdout.take().expect("piped stdout");
    let import = podman
        .command()
        .args(["import", "--quiet", "-", DEBIAN_STANDIN_IMAGE])
        .stdin(tar_output)
        .stdout(Stdio::null())
        .status()
        .context("failed to start podman import")?;
    let tar_status = tar.wait().context("failed to wait for tar")?;
    if !tar_status.success() || !import.success() {
        bail!(
            "importing {} failed: tar {tar_status}, podman import {import}",
            root.display()
        );
    }
    Ok(())
}

fn remove_dir_contents(dir: &Path) -> anyhow::Result<()> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Ok(());
    };
    for entry in entries {
        let path = entry?.path();
        if path.is_dir() {
            fs::remove_dir_all(&path)?;
        } else {
            fs::remove_file(&path)?;
        }
    }
    Ok(())
}

/// Builds the stand-in for `RUST_IMAGE`: the Debian root, build packages, and this machine's
/// Rust `RUST_VERSION` (the default toolchain) and nightly with rust-src, laid out under
/// /usr/local as the official image has them.
///
/// The official image has no nightly toolchain, and the Containerfile installs one from
/// static.rust-lang.org. The stand-in carries it because this task is for machines that
/// cannot reach that server either. The Containerfile skips the download when a nightly
/// with rust-src is present.
fn build_rust_standin(podman: &Podman, work_dir: &Path) -> anyhow::Result<()> {
    import_debian_root(podman, work_dir)?;

    let context = work_dir.join("rust-context");
    if context.exists() {
        fs::remove_dir_all(&context)
            .with_context(|| format!("failed to remove {}", context.display()))?;
    }
    let toolchains = context.join("rustup/toolchains");
    fs::create_dir_all(&toolchains)?;
    let host = host_triple()?;
    for toolchain in [RUST_VERSION, "nightly"] {
        copy_toolchain(toolchain, &toolchains.join(format!("{toolchain}-{host}")))?;
    }
    let nightly_src = toolchains.join(format!("nightly-{host}/lib/rustlib/src/rust/library"));
    if !nightly_src.is_dir() {
        bail!(
            "the nightly toolchain has no rust-src; run `rustup component add rust-src \
             --toolchain nightly` (or `cargo xtask setup`)"
        );
    }
    fs::write(
        context.join("rustup/settings.toml"),
        format!(
            "version = \"12\"\ndefault_toolchain = \"{RUST_VERSION}-{host}\"\n\
             profile = \"minimal\"\n\n[overrides]\n"
        ),
    )?;

    let cargo_bin = context.join("cargo/bin");
    fs::create_dir_all(&cargo_bin)?;
    let rustup = which("rustup")?;
    fs::copy(&rustup, cargo_bin.join("rustup"))
        .with_context(|| format!("failed to copy {}", rustup.display()))?;
    for proxy in RUSTUP_PROXIES {
        symlink("rustup", cargo_bin.join(proxy))?;
    }

    eprintln!("xtask: building the stand-in {RUST_IMAGE}");
    run(podman
        .command()
        .args(["build", "--network=host", "--file"])
        .arg(standin_dir().join("rust-bookworm.Containerfile"))
        .args(["--tag", RUST_IMAGE])
        .arg(&context))
}

/// Builds the stand-in for `RUNTIME_IMAGE` from the Debian root. Its build context is an empty
/// directory: everything comes from Debian's archive.
fn build_runtime_standin(podman: &Podman, work_dir: &Path) -> anyhow::Result<()> {
    import_debian_root(podman, work_dir)?;
    let context = work_dir.join("empty-context");
    fs::create_dir_all(&context)?;
    eprintln!("xtask: building the stand-in {RUNTIME_IMAGE}");
    run(podman
        .command()
        .args(["build", "--network=host", "--file"])
        .arg(standin_dir().join("distroless-cc.Containerfile"))
        .args(["--tag", RUNTIME_IMAGE])
        .arg(&context))
}

/// Copies a rustup toolchain's directory without its HTML documentation (about 0.8 GB),
/// which the official image does not install either.
fn copy_toolchain(toolchain: &str, destination: &Path) -> anyhow::Result<()> {
    let output = Command::new("rustc")
        .arg(format!("+{toolchain}"))
        .args(["--print", "sysroot"])
        .output()
        .context("failed to run rustc")?;
    if !output.status.success() {
        bail!("toolchain {toolchain} is not installed; run `rustup toolchain install {toolchain}`");
    }
    let sysroot = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
    let sysroot = fs::canonicalize(&sysroot)
        .with_context(|| format!("toolchain directory {} not found", sysroot.display()))?;
    eprintln!("xtask: copying {} for the stand-in", sysroot.display());
    run(Command::new("cp")
        .args(["-a", "--reflink=auto"])
        .arg(&sysroot)
        .arg(destination))?;

    // NOTE: rustup still lists rust-docs as installed, from the channel manifest it keeps.
    let docs = destination.join("share/doc");
    if docs.exists() {
        fs::remove_dir_all(&docs)?;
    }
    Ok(())
}

fn host_triple() -> anyhow::Result<String> {
    let output = Command::new("rustc")
        .arg("-vV")
        .output()
        .context("failed to run rustc -vV")?;
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .find_map(|line| line.strip_prefix("host: "))
        .map(str::to_owned)
        .context("rustc -vV printed no host line")
}

fn which(program: &str) -> anyhow::Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
        .with_context(|| format!("{program} not found in PATH"))
}
