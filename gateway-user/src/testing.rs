//! A Kubernetes node on one machine, for tests: network namespaces for the node, its pods and
//! the servers they dial, joined by veth pairs, with each pod's processes in a cgroup v2
//! directory laid out the way the kubelet lays them out with the systemd driver
//! (`kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod<UID>.slice/
//! cri-containerd-<ID>.scope`), or with the cgroupfs driver when the node is created with
//! [`CgroupLayout::Cgroupfs`] (`kubepods/besteffort/pod<UID>/<ID>`).
//!
//! Addresses (the same in every test node; namespaces keep them apart):
//! - node: `10.244.255.1` and `fd00:244:ff::1` on its loopback, the redirect address;
//! - pod N: `10.244.N.2/24` and `fd00:244:N::2/64`, its gateway the node at `.1`/`::1`;
//! - server N: `10.245.N.2/24` and `fd00:245:N::2/64`, plus any service addresses given.
//!
//! Safety of the host: forwarding is switched on only inside the node namespace, every
//! namespace gets unreachable default routes (IPv4 and IPv6), and nothing is connected to the
//! machine's own namespace, so no packet can leave for the real network.
//!
//! Names derive from the test name; a node left behind by a crashed run with the same name is
//! removed first. Everything is removed on drop, unless the test panicked and
//! `GATEWAY_TEST_KEEP=1` is set, in which case the commands to enter the namespaces are printed.

use std::{
    collections::hash_map::DefaultHasher,
    fs,
    hash::{Hash as _, Hasher as _},
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::{AsRawFd as _, OwnedFd},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use crate::{cgroup, sys};

pub mod demo;
mod mariadb;
pub use mariadb::{MARIADB_PASSWORD, MARIADB_PORT, Mariadb};

/// The node's redirect address (IPv4).
pub const NODE_PROXY_V4: Ipv4Addr = Ipv4Addr::new(10, 244, 255, 1);
/// The node's redirect address (IPv6).
pub const NODE_PROXY_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x244, 0xff, 0, 0, 0, 0, 1);
/// Port the test daemon's proxy listens on.
pub const PROXY_PORT: u16 = 15001;

/// Environment variable that keeps a failed test's namespaces for inspection.
const KEEP_ENV: &str = "GATEWAY_TEST_KEEP";

/// A pod: its network namespace and its container's cgroup.
#[derive(Clone, Debug)]
pub struct Pod {
    pub name: String,
    pub netns: String,
    pub uid: String,
    /// The container cgroup's directory.
    pub cgroup: PathBuf,
    /// The container cgroup's path relative to the cgroup2 mount, as recordings show it.
    pub cgroup_path: String,
    pub addr_v4: Ipv4Addr,
    pub addr_v6: Ipv6Addr,
}

/// A server namespace.
#[derive(Clone, Debug)]
pub struct Server {
    pub name: String,
    pub netns: String,
    pub addr_v4: Ipv4Addr,
    pub addr_v6: Ipv6Addr,
    /// Address the node uses towards this server, and so the peer address the server gets for a
    /// proxied connection.
    pub node_side_v4: Ipv4Addr,
}

/// A running `gatewayd` inside the node.
#[derive(Debug)]
pub struct Daemon {
    child: Child,
    pub config_path: PathBuf,
    pub log_path: PathBuf,
}

impl Daemon {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM and waits for the daemon to exit.
    pub fn stop(mut self) -> std::process::ExitStatus {
        let _ = sys::kill(self.child.id(), libc::SIGTERM);
        self.child.wait().expect("wait for gatewayd")
    }

    /// Kills the daemon with SIGKILL, as a crash would, leaving its pins behind.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Naming scheme of the kubelet's pod cgroups, after its `cgroupDriver` setting.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CgroupLayout {
    /// `kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod<UID>.slice/...`
    Systemd,
    /// `kubepods/besteffort/pod<UID>/<container id>`
    Cgroupfs,
}

/// One test node with its pods and servers.
#[derive(Debug)]
pub struct TestNode {
    pub name: String,
    /// Short id used in namespace names.
    pub id: String,
    pub node_netns: String,
    /// The cgroup2 mount.
    pub unified: PathBuf,
    /// This test's top cgroup; `kubepods.slice` (or `kubepods`) is below it.
    pub cgroup_root: PathBuf,
    pub layout: CgroupLayout,
    /// The pods cgroup the daemon attaches to.
    pub kubepods: PathBuf,
    /// Scratch directory: configs, logs, recordings, and the bpffs mount.
    pub dir: PathBuf,
    /// A bpffs mounted for this test alone.
    pub bpffs: PathBuf,
    /// Recording directory of the daemon; inside `dir` unless set with `set_recordings`.
    recordings: Option<PathBuf>,
    /// `GATEWAY_LOG` of the daemons this node starts.
    daemon_log: String,
    pods: Vec<Pod>,
    servers: Vec<Server>,
}

impl TestNode {
    /// Creates the node namespace, the test's cgroups and a private bpffs.
    pub fn new(test_name: &str) -> Self {
        Self::with_layout(test_name, CgroupLayout::Systemd)
    }

    /// Creates the node like [`new`](Self::new), with pod cgroups named after `layout`.
    pub fn with_layout(test_name: &str, layout: CgroupLayout) -> Self {
        let id = short_id(test_name);
        let mounts = cgroup::find_mounts(Path::new("/proc/self/mountinfo"))
            .expect("the test node needs a cgroup2 mount");
        let unified = mounts.unified;
        let cgroup_root = unified.join(format!("gw-test-{id}"));
        let dir = std::env::temp_dir().join(format!("gw-test-{id}"));
        let node = Self {
            name: test_name.to_string(),
            node_netns: format!("gw-{id}-node"),
            kubepods: cgroup_root.join(match layout {
                CgroupLayout::Systemd => "kubepods.slice",
                CgroupLayout::Cgroupfs => "kubepods",
            }),
            layout,
            bpffs: dir.join("bpffs"),
            id,
            unified,
            cgroup_root,
            dir,
            recordings: None,
            daemon_log: "info,gateway_user=debug".to_string(),
            pods: Vec::new(),
            servers: Vec::new(),
        };
        node.remove_leftovers();

        fs::create_dir_all(&node.dir).expect("create the test directory");
        fs::create_dir_all(&node.bpffs).expect("create the bpffs mount point");
        sys::mount_bpffs(&node.bpffs).expect("mount a private bpffs");
        fs::create_dir_all(node.besteffort()).expect("create the kubepods cgroups");

        let ns = &node.node_netns;
        ip(&["netns", "add", ns]);
        ip(&["-n", ns, "link", "set", "lo", "up"]);
        ip(&[
            "-n",
            ns,
            "addr",
            "add",
            &format!("{NODE_PROXY_V4}/32"),
            "dev",
            "lo",
        ]);
        ip(&[
            "-n",
            ns,
            "-6",
            "addr",
            "add",
            &format!("{NODE_PROXY_V6}/128"),
            "dev",
            "lo",
            "nodad",
        ]);
        unreachable_defaults(ns);
        // Forwarding between pods and servers, in the node namespace only.
        run_in_netns(ns, &["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        run_in_netns(ns, &["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"]);
        node
    }

    /// Returns the cgroup of the best-effort QoS class, parent of the pods' cgroups.
    fn besteffort(&self) -> PathBuf {
        match self.layout {
            CgroupLayout::Systemd => self.kubepods.join("kubepods-besteffort.slice"),
            CgroupLayout::Cgroupfs => self.kubepods.join("besteffort"),
        }
    }

    /// Adds a pod with the given name; its container cgroup is created below the kubepods
    /// cgroup, named after the node's layout.
    pub fn add_pod(&mut self, name: &str) -> Pod {
        let index = self.pods.len() as u8;
        let netns = format!("gw-{}-p{index}", self.id);
        let uid = pod_uid(&self.id, index);
        let container = match self.layout {
            CgroupLayout::Systemd => self
                .besteffort()
                .join(format!(
                    "kubepods-besteffort-pod{}.slice",
                    uid.replace('-', "_")
                ))
                .join(format!(
                    "cri-containerd-{}.scope",
                    container_id(&self.id, index)
                )),
            CgroupLayout::Cgroupfs => self
                .besteffort()
                .join(format!("pod{uid}"))
                .join(container_id(&self.id, index)),
        };
        fs::create_dir_all(&container).expect("create the pod's container cgroup");

        let addr_v4 = Ipv4Addr::new(10, 244, index, 2);
        let addr_v6 = Ipv6Addr::new(0xfd00, 0x244, u16::from(index), 0, 0, 0, 0, 2);
        self.link_namespace(
            &netns,
            &format!("vp{index}"),
            (10, 244, index),
            (0x244, u16::from(index)),
        );

        let pod = Pod {
            name: name.to_string(),
            netns,
            uid,
            cgroup_path: cgroup::display_path(&self.unified, &container),
            cgroup: container,
            addr_v4,
            addr_v6,
        };
        self.pods.push(pod.clone());
        pod
    }

    /// Adds a server namespace; `service_addrs` are extra addresses on its loopback (like
    /// Service ClusterIPs), routed to it from the node.
    pub fn add_server(&mut self, name: &str, service_addrs: &[IpAddr]) -> Server {
        let index = self.servers.len() as u8;
        let netns = format!("gw-{}-s{index}", self.id);
        self.link_namespace(
            &netns,
            &format!("vs{index}"),
            (10, 245, index),
            (0x245, u16::from(index)),
        );
        let addr_v4 = Ipv4Addr::new(10, 245, index, 2);
        let addr_v6 = Ipv6Addr::new(0xfd00, 0x245, u16::from(index), 0, 0, 0, 0, 2);
        for service in service_addrs {
            match service {
                IpAddr::V4(v4) => {
                    ip(&[
                        "-n",
                        &netns,
                        "addr",
                        "add",
                        &format!("{v4}/32"),
                        "dev",
                        "lo",
                    ]);
                    ip(&[
                        "-n",
                        &self.node_netns,
                        "route",
                        "add",
                        &format!("{v4}/32"),
                        "via",
                        &addr_v4.to_string(),
                    ]);
                }
                IpAddr::V6(v6) => {
                    ip(&[
                        "-n",
                        &netns,
                        "-6",
                        "addr",
                        "add",
                        &format!("{v6}/128"),
                        "dev",
                        "lo",
                        "nodad",
                    ]);
                    ip(&[
                        "-n",
                        &self.node_netns,
                        "-6",
                        "route",
                        "add",
                        &format!("{v6}/128"),
                        "via",
                        &addr_v6.to_string(),
                    ]);
                }
            }
        }
        let server = Server {
            name: name.to_string(),
            netns,
            addr_v4,
            addr_v6,
            node_side_v4: Ipv4Addr::new(10, 245, index, 1),
        };
        self.servers.push(server.clone());
        server
    }

    /// Creates namespace `netns` joined to the node by a veth pair: `eth0` inside, `node_if` on
    /// the node, with `/24` and `/64` subnets numbered by `v4` and `v6`.
    fn link_namespace(&self, netns: &str, node_if: &str, v4: (u8, u8, u8), v6: (u16, u16)) {
        let node = &self.node_netns;
        let (a, b, c) = v4;
        let (g, h) = v6;
        ip(&["netns", "add", netns]);
        ip(&["-n", netns, "link", "set", "lo", "up"]);
        ip(&[
            "-n", node, "link", "add", node_if, "type", "veth", "peer", "name", "eth0", "netns",
            netns,
        ]);
        ip(&[
            "-n",
            node,
            "addr",
            "add",
            &format!("{a}.{b}.{c}.1/24"),
            "dev",
            node_if,
        ]);
        ip(&[
            "-n",
            node,
            "-6",
            "addr",
            "add",
            &format!("fd00:{g:x}:{h:x}::1/64"),
            "dev",
            node_if,
            "nodad",
        ]);
        ip(&["-n", node, "link", "set", node_if, "up"]);
        ip(&[
            "-n",
            netns,
            "addr",
            "add",
            &format!("{a}.{b}.{c}.2/24"),
            "dev",
            "eth0",
        ]);
        ip(&[
            "-n",
            netns,
            "-6",
            "addr",
            "add",
            &format!("fd00:{g:x}:{h:x}::2/64"),
            "dev",
            "eth0",
            "nodad",
        ]);
        ip(&["-n", netns, "link", "set", "eth0", "up"]);
        // Everything test-made is in 10.0.0.0/8 and fd00::/8, reached through the node; the
        // rest is unreachable.
        ip(&[
            "-n",
            netns,
            "route",
            "add",
            "10.0.0.0/8",
            "via",
            &format!("{a}.{b}.{c}.1"),
        ]);
        ip(&[
            "-n",
            netns,
            "-6",
            "route",
            "add",
            "fd00::/8",
            "via",
            &format!("fd00:{g:x}:{h:x}::1"),
        ]);
        unreachable_defaults(netns);
    }

    /// Builds a command that runs in `netns` (and, when given, in `cgroup`): the child joins
    /// the cgroup first, then the namespace, so no `ip netns exec` remount is involved.
    pub fn command_in(
        &self,
        netns: &str,
        cgroup: Option<&Path>,
        program: impl AsRef<std::ffi::OsStr>,
    ) -> Command {
        let netns_file: OwnedFd = fs::File::open(Path::new("/var/run/netns").join(netns))
            .unwrap_or_else(|error| panic!("open network namespace {netns}: {error}"))
            .into();
        let procs: Option<OwnedFd> = cgroup.map(|dir| {
            fs::OpenOptions::new()
                .write(true)
                .open(dir.join("cgroup.procs"))
                .unwrap_or_else(|error| panic!("open {}/cgroup.procs: {error}", dir.display()))
                .into()
        });
        let mut command = Command::new(program);
        sys::pre_exec(&mut command, move || {
            if let Some(procs) = &procs {
                sys::join_cgroup(procs.as_raw_fd())?;
            }
            sys::setns_net(netns_file.as_raw_fd())
        });
        command
    }

    /// Builds a command that runs in a pod: its network namespace and container cgroup.
    pub fn in_pod(&self, pod: &Pod, program: impl AsRef<std::ffi::OsStr>) -> Command {
        self.command_in(&pod.netns, Some(&pod.cgroup), program)
    }

    /// Builds a command that runs in a server's namespace.
    pub fn in_server(&self, server: &Server, program: impl AsRef<std::ffi::OsStr>) -> Command {
        self.command_in(&server.netns, None, program)
    }

    /// Builds a command that runs in the node's namespace, the host network namespace of this
    /// node.
    pub fn in_node(&self, cgroup: Option<&Path>, program: impl AsRef<std::ffi::OsStr>) -> Command {
        self.command_in(&self.node_netns, cgroup, program)
    }

    /// Writes a daemon configuration for this node: redirect addresses on the node, pins in the
    /// private bpffs, recordings in the test directory, attached to this test's kubepods cgroup.
    /// `extra` is appended as YAML (targets, redirect settings).
    pub fn daemon_config(&self, file_name: &str, redirect_extra: &str, targets: &str) -> PathBuf {
        let text = format!(
            "node_name: {name}\n\
             proxy:\n  listen_v4: {v4}:{port}\n  listen_v6: '[{v6}]:{port}'\n  drain_timeout: 2s\n\
             redirect:\n  cgroup: {cgroup}\n  bpffs: {bpffs}\n{redirect_extra}\
             recording:\n  dir: {recordings}\n\
             approvals:\n  socket: {approvals}\n\
             targets:\n{targets}",
            name = self.node_netns,
            v4 = NODE_PROXY_V4,
            v6 = NODE_PROXY_V6,
            port = PROXY_PORT,
            cgroup = self.kubepods.display(),
            bpffs = self.pin_dir().display(),
            recordings = self.recordings().display(),
            approvals = self.approval_socket().display(),
        );
        let path = self.dir.join(file_name);
        fs::write(&path, text).expect("write daemon config");
        path
    }

    /// Returns the daemon's approvals socket, inside the test directory so that parallel test
    /// daemons do not share the default path.
    pub fn approval_socket(&self) -> PathBuf {
        self.dir.join("state").join("approvals.sock")
    }

    /// Returns the daemon's pin directory inside the private bpffs.
    pub fn pin_dir(&self) -> PathBuf {
        self.bpffs.join("gateway")
    }

    pub fn recordings(&self) -> PathBuf {
        self.recordings
            .clone()
            .unwrap_or_else(|| self.dir.join("store"))
    }

    /// Keeps recordings in `dir`, which outlives the node (the demo shows them afterwards).
    pub fn set_recordings(&mut self, dir: PathBuf) {
        self.recordings = Some(dir);
    }

    /// Sets the log filter (`GATEWAY_LOG`) of the daemons started from now on. Tests log the
    /// gateway's own debug lines; benchmarks use the daemon's default, `info`.
    pub fn set_daemon_log(&mut self, filter: &str) {
        self.daemon_log = filter.to_string();
    }

    /// Starts `gatewayd run` in the node namespace, inside `cgroup` when given, and waits until
    /// it reports ready.
    pub fn start_daemon(&self, gatewayd: &Path, config: &Path, cgroup: Option<&Path>) -> Daemon {
        let log_path = self.dir.join("gatewayd.log");
        let ready = self.dir.join("gatewayd.ready");
        let _ = fs::remove_file(&ready);
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .expect("open daemon log");
        let child = self
            .in_node(cgroup, gatewayd)
            .arg("run")
            .arg("--config")
            .arg(config)
            .arg("--ready-file")
            .arg(&ready)
            .env("GATEWAY_LOG", &self.daemon_log)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn gatewayd");
        let mut daemon = Daemon {
            child,
            config_path: config.to_path_buf(),
            log_path,
        };

        let deadline = Instant::now() + Duration::from_secs(30);
        while !ready.exists() {
            if let Ok(Some(status)) = daemon.child.try_wait() {
                panic!(
                    "gatewayd exited with {status} before it was ready:\n{}",
                    daemon.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "gatewayd not ready after 30 s:\n{}",
                daemon.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        daemon
    }

    /// Starts `gateway-testpeer serve --greet` in `server`, listening on every address given,
    /// and waits until it listens.
    pub fn start_echo(&self, testpeer: &Path, server: &Server, addrs: &[SocketAddr]) -> Child {
        let mut command = self.in_server(server, testpeer);
        command.arg("serve").arg("--greet");
        for addr in addrs {
            command.arg("--listen").arg(addr.to_string());
        }
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn echo server");
        let mut stdout = std::io::BufReader::new(child.stdout.take().expect("piped stdout"));
        let mut line = String::new();
        std::io::BufRead::read_line(&mut stdout, &mut line).expect("read echo server output");
        assert_eq!(line.trim(), "listening", "echo server did not start");
        child
    }

    /// Lists the session recordings written so far, oldest first.
    pub fn session_files(&self) -> Vec<PathBuf> {
        let mut files = Vec::new();
        let Ok(days) = fs::read_dir(self.recordings().join("sessions")) else {
            return files;
        };
        for day in days.flatten() {
            if let Ok(entries) = fs::read_dir(day.path()) {
                files.extend(entries.flatten().map(|entry| entry.path()));
            }
        }
        // Session ids are UUIDv7, so names sort by creation time.
        files.sort_by(|a, b| a.file_name().cmp(&b.file_name()));
        files
    }

    /// Reads every recording as parsed JSON lines.
    pub fn sessions(&self) -> Vec<Vec<serde_json::Value>> {
        self.session_files()
            .iter()
            .map(|path| {
                fs::read_to_string(path)
                    .expect("read recording")
                    .lines()
                    .map(|line| serde_json::from_str(line).expect("recording line is JSON"))
                    .collect()
            })
            .collect()
    }

    /// Waits until `count` recordings have their `session.end` line.
    pub fn wait_for_sessions(&self, count: usize) -> Vec<Vec<serde_json::Value>> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let sessions = self.sessions();
            let ended = sessions
                .iter()
                .filter(|lines| lines.iter().any(|line| line["event"] == "session.end"))
                .count();
            if ended >= count {
                return sessions;
            }
            assert!(
                Instant::now() < deadline,
                "expected {count} finished recordings, found {ended}: {sessions:#?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn remove_leftovers(&self) {
        // Processes first, so namespaces and cgroups can go.
        kill_cgroup_tree(&self.cgroup_root);
        if let Ok(list) = Command::new("ip").args(["netns", "list"]).output() {
            let prefix = format!("gw-{}-", self.id);
            for line in String::from_utf8_lossy(&list.stdout).lines() {
                let name = line.split_whitespace().next().unwrap_or("");
                if name.starts_with(&prefix) {
                    let _ = Command::new("ip").args(["netns", "del", name]).status();
                }
            }
        }
        remove_cgroup_tree(&self.cgroup_root);
        if self.bpffs.exists() {
            // Lazy unmount: pins in it go with it.
            let _ = Command::new("umount").arg("-l").arg(&self.bpffs).status();
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        if std::thread::panicking() {
            if std::env::var_os(KEEP_ENV).is_some_and(|value| value == "1") {
                eprintln!("test node of {} kept for inspection:", self.name);
                eprintln!("  node:    ip netns exec {} bash", self.node_netns);
                for pod in &self.pods {
                    eprintln!(
                        "  pod {}: ip netns exec {} bash   (cgroup {})",
                        pod.name,
                        pod.netns,
                        pod.cgroup.display()
                    );
                }
                for server in &self.servers {
                    eprintln!(
                        "  server {}: ip netns exec {} bash",
                        server.name, server.netns
                    );
                }
                eprintln!("  files:   {}", self.dir.display());
                return;
            }
            eprintln!(
                "test node of {} removed; rerun with {KEEP_ENV}=1 to keep its namespaces ({}) and files ({})",
                self.name,
                self.node_netns,
                self.dir.display()
            );
        }
        self.remove_leftovers();
    }
}

/// Runs `ip` with the arguments and panics with its output on failure.
pub fn ip(args: &[&str]) {
    let output = Command::new("ip")
        .args(args)
        .output()
        .expect("run ip (iproute2)");
    check_output(&format!("ip {}", args.join(" ")), &output);
}

fn run_in_netns(netns: &str, command: &[&str]) {
    let output = Command::new("ip")
        .args(["netns", "exec", netns])
        .args(command)
        .output()
        .expect("run ip netns exec");
    check_output(
        &format!("ip netns exec {netns} {}", command.join(" ")),
        &output,
    );
}

fn check_output(what: &str, output: &Output) {
    assert!(
        output.status.success(),
        "{what} failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
}

fn unreachable_defaults(netns: &str) {
    ip(&["-n", netns, "route", "add", "unreachable", "default"]);
    ip(&["-n", netns, "-6", "route", "add", "unreachable", "default"]);
}

/// Names a test's namespaces and cgroups. The checkout's path goes into the hash so that two
/// checkouts of the project can run the same test at once; within one checkout the name stays
/// the same, so leftovers of an aborted run are found and removed.
fn short_id(test_name: &str) -> String {
    let mut hasher = DefaultHasher::new();
    env!("CARGO_MANIFEST_DIR").hash(&mut hasher);
    test_name.hash(&mut hasher);
    format!("{:08x}", hasher.finish() as u32)
}

fn pod_uid(id: &str, index: u8) -> String {
    format!("{id}-0000-4000-8000-{index:012x}")
}

fn container_id(id: &str, index: u8) -> String {
    format!("{id}{index:056x}")
}

/// Kills every process in the cgroups below `root`.
fn kill_cgroup_tree(root: &Path) {
    if !root.exists() {
        return;
    }
    // cgroup.kill (Linux 5.14) kills the whole subtree at once.
    let _ = fs::write(root.join("cgroup.kill"), "1");
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline && cgroup_has_processes(root) {
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn cgroup_has_processes(dir: &Path) -> bool {
    if fs::read_to_string(dir.join("cgroup.procs")).is_ok_and(|procs| !procs.trim().is_empty()) {
        return true;
    }
    fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .filter(|entry| entry.file_type().is_ok_and(|kind| kind.is_dir()))
                .any(|entry| cgroup_has_processes(&entry.path()))
        })
        .unwrap_or(false)
}

/// Removes a cgroup directory tree, deepest first (cgroup directories are removed with rmdir).
fn remove_cgroup_tree(dir: &Path) {
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|kind| kind.is_dir()) {
                remove_cgroup_tree(&entry.path());
            }
        }
    }
    let _ = fs::remove_dir(dir);
}

/// Waits for a TCP listener to accept on `addr` from inside `netns`, by trying `connect`
/// through the test peer.
pub fn wait_until<F: FnMut() -> bool>(what: &str, timeout: Duration, mut condition: F) {
    let deadline = Instant::now() + timeout;
    while !condition() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Reads a child's stdout to the end and returns it with the exit status.
pub fn output_of(command: &mut Command) -> io::Result<Output> {
    command.stdin(Stdio::null()).output()
}

/// Socket address helper for test configs.
pub fn sockaddr(ip: impl Into<IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

/// A child process that is killed and reaped when the guard is dropped.
#[derive(Debug)]
pub struct ChildGuard(pub Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Returns the directory of the workspace binaries when called from an example, which runs from
/// `target/<profile>/examples/`.
pub fn binary_dir() -> io::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let examples = exe.parent().unwrap_or(Path::new("."));
    Ok(examples.parent().unwrap_or(examples).to_path_buf())
}

/// A PostgreSQL server from Debian's packages, running in a server namespace.
#[derive(Debug)]
pub struct Postgres {
    pub addr: SocketAddr,
    /// Directory of its Unix socket, for setup commands that bypass the network.
    pub socket_dir: PathBuf,
    pub bin_dir: PathBuf,
    pub log_path: PathBuf,
    /// The server process, read from `postmaster.pid` once it accepts connections.
    server_pid: Option<u32>,
    _server: ChildGuard,
}

impl Drop for Postgres {
    /// Stops the server itself: killing `runuser` does not reach it, and it would otherwise
    /// run on until it notices its data directory is gone, up to a minute later.
    fn drop(&mut self) {
        let pid = self.server_pid;
        // A server that already stopped may have left a number now used by another process.
        let is_postgres = |pid: u32| {
            fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|comm| comm.trim() == "postgres")
        };
        if let Some(pid) = pid.filter(|&pid| is_postgres(pid)) {
            // SIGQUIT is PostgreSQL's immediate shutdown, which suits data a test throws away.
            let _ = sys::kill(pid, libc::SIGQUIT);
        }
    }
}

/// Password of the `postgres` superuser and of `md5user` in the test cluster.
pub const POSTGRES_PASSWORD: &str = "gateway-test-secret";

impl Postgres {
    /// Runs `psql` as the `postgres` OS user over the Unix socket, for setup; panics on error.
    pub fn admin_sql(&self, sql: &str) -> String {
        let output = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(self.bin_dir.join("psql"))
            .arg("-h")
            .arg(&self.socket_dir)
            .args([
                "-U",
                "postgres",
                "-d",
                "postgres",
                "-X",
                "-q",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-c",
                sql,
            ])
            .output()
            .expect("run psql");
        check_output(&format!("psql -c {sql}"), &output);
        String::from_utf8_lossy(&output.stdout).into_owned()
    }
}

impl TestNode {
    /// Creates a PostgreSQL cluster in the test directory and starts it in `server`'s
    /// namespace, listening on the server's IPv4 and IPv6 addresses at port 5432.
    ///
    /// Host authentication: `rawuser` is trusted (for raw protocol tests), `md5user` uses md5,
    /// everyone else SCRAM-SHA-256 with `POSTGRES_PASSWORD`.
    pub fn start_postgres(&self, server: &Server) -> Postgres {
        self.start_postgres_with_tls(server, None)
    }

    /// Like `start_postgres`, and with `tls` (certificate and key files) the server also
    /// accepts TLS.
    pub fn start_postgres_with_tls(
        &self,
        server: &Server,
        tls: Option<(&Path, &Path)>,
    ) -> Postgres {
        let bin_dir = postgres_bin_dir();
        let data = self.dir.join("pgdata");
        let socket_dir = self.dir.join("pgsock");
        let password_file = self.dir.join("pgpassword");
        fs::create_dir_all(&socket_dir).expect("create socket directory");
        fs::create_dir_all(&data).expect("create data directory");
        fs::write(&password_file, POSTGRES_PASSWORD).expect("write password file");
        let status = Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(&socket_dir)
            .arg(&data)
            .arg(&password_file)
            .status()
            .expect("run chown");
        assert!(status.success(), "chown for postgres failed");

        let output = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(bin_dir.join("initdb"))
            .arg("-D")
            .arg(&data)
            .args([
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--no-sync",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
            ])
            .arg(format!("--pwfile={}", password_file.display()))
            .output()
            .expect("run initdb");
        check_output("initdb", &output);
        fs::write(
            data.join("pg_hba.conf"),
            "local all all trust\n\
             host replication rawuser 0.0.0.0/0 trust\n\
             host all rawuser 0.0.0.0/0 trust\n\
             host all rawuser ::/0 trust\n\
             host all md5user 0.0.0.0/0 md5\n\
             host all md5user ::/0 md5\n\
             host all all 0.0.0.0/0 scram-sha-256\n\
             host all all ::/0 scram-sha-256\n",
        )
        .expect("write pg_hba.conf");

        let mut tls_args = Vec::new();
        if let Some((cert, key)) = tls {
            // PostgreSQL wants its key owned by itself and unreadable to others.
            for (source, name) in [(cert, "server.crt"), (key, "server.key")] {
                let target = data.join(name);
                fs::copy(source, &target).expect("copy TLS file into the data directory");
                let status = Command::new("chown")
                    .arg("postgres:postgres")
                    .arg(&target)
                    .status()
                    .expect("run chown");
                assert!(status.success(), "chown of {name} failed");
                let status = Command::new("chmod")
                    .arg("600")
                    .arg(&target)
                    .status()
                    .expect("run chmod");
                assert!(status.success(), "chmod of {name} failed");
            }
            tls_args = vec!["-c".to_string(), "ssl=on".to_string()];
        }
        let log_path = self.dir.join("postgres.log");
        let log = fs::File::create(&log_path).expect("create postgres log");
        let child = self
            .in_server(server, "runuser")
            .args(["-u", "postgres", "--"])
            .arg(bin_dir.join("postgres"))
            .arg("-D")
            .arg(&data)
            .args([
                "-p",
                "5432",
                "-c",
                "fsync=off",
                "-c",
                "max_connections=50",
                "-c",
                "wal_level=logical",
            ])
            .args(&tls_args)
            .arg("-c")
            .arg(format!(
                "listen_addresses={},{}",
                server.addr_v4, server.addr_v6
            ))
            .arg("-c")
            .arg(format!("unix_socket_directories={}", socket_dir.display()))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn postgres");
        let mut postgres = Postgres {
            addr: SocketAddr::new(server.addr_v4.into(), 5432),
            socket_dir: socket_dir.clone(),
            bin_dir,
            log_path: log_path.clone(),
            server_pid: None,
            _server: ChildGuard(child),
        };
        // The socket appears before recovery ends; wait until a query succeeds.
        wait_until(
            "postgres to accept connections",
            Duration::from_secs(30),
            || {
                Command::new("runuser")
                    .args(["-u", "postgres", "--"])
                    .arg(postgres.bin_dir.join("psql"))
                    .arg("-h")
                    .arg(&socket_dir)
                    .args([
                        "-U", "postgres", "-d", "postgres", "-X", "-q", "-c", "SELECT 1",
                    ])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|status| status.success())
            },
        );
        postgres.server_pid = fs::read_to_string(data.join("postmaster.pid"))
            .ok()
            .and_then(|text| text.lines().next()?.trim().parse().ok());
        postgres.admin_sql(
            "CREATE ROLE rawuser LOGIN SUPERUSER; \
             CREATE ROLE md5user LOGIN SUPERUSER",
        );
        // md5 needs the password stored as an md5 hash, which this setting makes.
        postgres.admin_sql(&format!(
            "SET password_encryption = 'md5'; ALTER ROLE md5user PASSWORD '{POSTGRES_PASSWORD}'"
        ));
        postgres
    }
}

/// Finds the newest PostgreSQL server binaries Debian installed.
pub fn postgres_bin_dir() -> PathBuf {
    let mut versions: Vec<PathBuf> = fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL is installed (cargo xtask setup installs it)")
        .flatten()
        .map(|entry| entry.path().join("bin"))
        .filter(|bin| bin.join("postgres").exists())
        .collect();
    versions.sort();
    versions
        .pop()
        .expect("a PostgreSQL server under /usr/lib/postgresql")
}

/// Returns the config lines that give a target TLS: a serving certificate the gateway issues
/// from `gateway_ca` for `server_ip` when `client_tls` is set, and verified upstream TLS
/// trusting `database_ca` when `upstream_tls` is set.
pub fn target_tls_lines(
    gateway_ca: &TestCa,
    database_ca: &TestCa,
    server_ip: &str,
    client_tls: bool,
    upstream_tls: bool,
) -> String {
    let mut lines = String::new();
    if client_tls {
        let (cert, key) = gateway_ca.issue("gateway-serving", &[server_ip.to_string()]);
        lines.push_str(&format!(
            "    tls:\n      cert: {}\n      key: {}\n",
            cert.display(),
            key.display()
        ));
    }
    if upstream_tls {
        lines.push_str(&format!(
            "    upstream_tls:\n      mode: verify-full\n      ca: {}\n",
            database_ca.cert_path.display()
        ));
    }
    lines
}

/// A certificate authority for tests: issues server certificates for the names and addresses
/// a test needs, written as PEM files.
#[derive(Debug)]
pub struct TestCa {
    /// The CA certificate, for clients to trust.
    pub cert_path: PathBuf,
    /// The CA's PKCS#8 private key, `<name>-ca.key` beside the certificate, for tools that
    /// issue from the CA themselves (`gatewayctl cert issue`).
    pub key_path: PathBuf,
    dir: PathBuf,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

impl TestCa {
    /// Creates a CA named `name` with its files in `dir`.
    pub fn new(dir: &Path, name: &str) -> Self {
        let key = rcgen::KeyPair::generate().expect("generate CA key");
        let mut params =
            rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let cert = params.self_signed(&key).expect("self-sign CA");
        let cert_path = dir.join(format!("{name}-ca.pem"));
        fs::write(&cert_path, cert.pem()).expect("write CA certificate");
        let key_path = dir.join(format!("{name}-ca.key"));
        fs::write(&key_path, key.serialize_pem()).expect("write CA key");
        Self {
            cert_path,
            key_path,
            dir: dir.to_path_buf(),
            issuer: rcgen::Issuer::new(params, key),
        }
    }

    /// Issues a server certificate for `names` (DNS names or IP addresses) and returns the
    /// paths of its certificate and key.
    pub fn issue(&self, file_name: &str, names: &[String]) -> (PathBuf, PathBuf) {
        let key = rcgen::KeyPair::generate().expect("generate server key");
        let mut params = rcgen::CertificateParams::new(names.to_vec()).expect("server parameters");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, file_name);
        let cert = params
            .signed_by(&key, &self.issuer)
            .expect("sign server certificate");
        let cert_path = self.dir.join(format!("{file_name}.crt"));
        let key_path = self.dir.join(format!("{file_name}.key"));
        fs::write(&cert_path, cert.pem()).expect("write certificate");
        fs::write(&key_path, key.serialize_pem()).expect("write key");
        (cert_path, key_path)
    }
}
