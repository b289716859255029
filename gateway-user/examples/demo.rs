//! The demo behind `cargo xtask demo`: a test node with one pod and one web server. The pod
//! runs an unmodified `curl` against the server; the gateway's eBPF programs redirect the
//! connection into `gatewayd`, which relays it and records the session. The demo prints what
//! each side saw and where the recording is.
//!
//! Needs root and the binaries built next to this example (`cargo xtask demo` does both).

use std::{
    fs,
    io::{BufRead as _, BufReader},
    net::SocketAddr,
    process::Stdio,
};

use gateway_common::Verdict;
use gateway_user::{
    redirect,
    testing::{self, ChildGuard, TestNode},
};

const HTTP_PORT: u16 = 8080;

fn main() -> anyhow::Result<()> {
    let binaries = testing::binary_dir()?;
    let gatewayd = binaries.join("gatewayd");
    anyhow::ensure!(
        gatewayd.exists(),
        "{} not found: build it first (`cargo build`)",
        gatewayd.display()
    );
    let demo_dir = binaries.parent().unwrap_or(&binaries).join("demo");
    fs::create_dir_all(&demo_dir)?;

    let mut node = TestNode::new("gateway-demo");
    node.set_recordings(demo_dir.join("store"));
    let pod = node.add_pod("web-client");
    let server = node.add_server("web", &[]);
    let target = SocketAddr::new(server.addr_v4.into(), HTTP_PORT);

    println!(
        "Test node: pod `{}` at {} (cgroup {})",
        pod.name, pod.addr_v4, pod.cgroup_path
    );
    println!("           server `{}` at {}", server.name, server.addr_v4);

    // The web server: Python's http.server, serving one file.
    let site = node.dir.join("site");
    fs::create_dir_all(&site)?;
    fs::write(site.join("hello.txt"), "hello from the web server\n")?;
    let server_log = node.dir.join("http-server.log");
    let mut http = node
        .in_server(&server, "/usr/bin/python3")
        .args(["-u", "-m", "http.server", &HTTP_PORT.to_string(), "--bind"])
        .arg(server.addr_v4.to_string())
        .arg("--directory")
        .arg(&site)
        .stdout(Stdio::piped())
        .stderr(fs::File::create(&server_log)?)
        .spawn()?;
    let mut first_line = String::new();
    BufReader::new(http.stdout.take().expect("piped stdout")).read_line(&mut first_line)?;
    let _http = ChildGuard(http);

    let targets = format!(
        "  - name: web\n    address: {}\n    port: {HTTP_PORT}\n    class: tcp\n",
        target.ip()
    );
    let config = node.daemon_config("gatewayd.yaml", "", &targets);
    let daemon = node.start_daemon(&gatewayd, &config, None);
    println!(
        "\ngatewayd (pid {}) attached to {} and redirects {target}",
        daemon.pid(),
        node.kubepods.display()
    );

    // Recordings of earlier demo runs stay in the same directory.
    let earlier = node.session_files().len();
    let url = format!("http://{target}/hello.txt");
    println!("\nIn the pod: curl -sS {url}");
    let output = node
        .in_pod(&pod, "curl")
        .args(["-sS", "--max-time", "10", &url])
        .output()?;
    anyhow::ensure!(
        output.status.success(),
        "curl failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    print!(
        "  curl printed: {}",
        String::from_utf8_lossy(&output.stdout)
    );

    let sessions = node.wait_for_sessions(earlier + 1);
    let access = fs::read_to_string(&server_log)?;
    let request_line = access
        .lines()
        .find(|line| line.contains("GET /hello.txt"))
        .unwrap_or("(no request logged)");
    println!("\nThe server logged: {request_line}");
    println!(
        "  The request came from {} (the node's proxy), not from the pod's {}: curl was redirected \
         without knowing it.",
        server.node_side_v4, pod.addr_v4
    );

    let stats = redirect::read_stats(&node.pin_dir())?;
    println!(
        "\nConnect hook: {} redirected, {} passed as no target",
        stats.get(Verdict::Redirected),
        stats.get(Verdict::PassNotTarget)
    );

    let files = node.session_files();
    let recording = files.last().cloned().unwrap_or_default();
    println!("\nSession recording: {}", recording.display());
    for line in sessions.last().into_iter().flatten() {
        println!("  {line}");
    }

    daemon.stop();

    // What an SRE sees afterwards: the session list and a verification of the whole store.
    let gatewayctl = gatewayd.with_file_name("gatewayctl");
    let store = node.recordings();
    for args in [&["list", "--since", "10m"][..], &["verify", "--all"][..]] {
        println!(
            "\n$ gatewayctl sessions --store {} {}",
            store.display(),
            args.join(" ")
        );
        let output = std::process::Command::new(&gatewayctl)
            .arg("sessions")
            .arg("--store")
            .arg(&store)
            .args(args)
            .output()?;
        print!("{}", String::from_utf8_lossy(&output.stdout));
        eprint!("{}", String::from_utf8_lossy(&output.stderr));
        anyhow::ensure!(
            output.status.success(),
            "gatewayctl sessions {} failed",
            args[0]
        );
    }

    let uninstall = std::process::Command::new(&gatewayd)
        .args(["uninstall", "--config"])
        .arg(&config)
        .output()?;
    anyhow::ensure!(uninstall.status.success(), "gatewayd uninstall failed");
    println!(
        "\nStopped gatewayd, removed its eBPF programs and the test node. The recording stays."
    );
    Ok(())
}
