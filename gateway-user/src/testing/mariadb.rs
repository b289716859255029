//! A MariaDB server from Debian's packages for the MySQL handler's tests: its own data
//! directory under the test directory, run as the `mysql` user inside a server namespace.

use std::{
    fs,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use super::{ChildGuard, Server, TestNode, check_output, wait_until};

/// Password of the `gateway` (mysql_native_password) and `eduser` (ed25519) accounts.
pub const MARIADB_PASSWORD: &str = "gateway-test-secret";
/// Port MariaDB listens on in its namespace.
pub const MARIADB_PORT: u16 = 3306;

/// A MariaDB server running in a server namespace.
#[derive(Debug)]
pub struct Mariadb {
    pub addr: SocketAddr,
    /// Its Unix socket, for setup commands that bypass the network.
    pub socket: PathBuf,
    pub log_path: PathBuf,
    _server: ChildGuard,
}

impl Mariadb {
    /// Runs `mariadb` as root over the Unix socket, for setup; panics on error. Returns the
    /// tab-separated output without column names.
    pub fn admin_sql(&self, sql: &str) -> String {
        let output = Command::new("mariadb")
            .arg("--no-defaults")
            .arg(format!("--socket={}", self.socket.display()))
            .args(["-u", "root", "--batch", "--skip-column-names", "-e", sql])
            .output()
            .expect("run mariadb");
        check_output(&format!("mariadb -e {sql}"), &output);
        String::from_utf8_lossy(&output.stdout).into_owned()
    }
}

impl TestNode {
    /// Creates a MariaDB data directory in the test directory and starts `mariadbd` in
    /// `server`'s namespace on port 3306, with `max_allowed_packet` at its 1 GiB maximum so
    /// tests can send payloads of any size the protocol allows.
    ///
    /// Accounts, each with every privilege: `gateway` (mysql_native_password,
    /// `MARIADB_PASSWORD`), `rawuser` (no password, for raw protocol tests) and `eduser`
    /// (ed25519, `MARIADB_PASSWORD`). The database `payments` exists.
    pub fn start_mariadb(&self, server: &Server) -> Mariadb {
        self.start_mariadb_with_tls(server, None)
    }

    /// Like `start_mariadb`, and with `tls` (certificate and key files) the server also
    /// accepts TLS.
    pub fn start_mariadb_with_tls(&self, server: &Server, tls: Option<(&Path, &Path)>) -> Mariadb {
        let data = self.dir.join("mariadb-data");
        let run_dir = self.dir.join("mariadb-run");
        // A temporary directory of its own: the bootstrap's temporary tables in the shared
        // /tmp have been seen to vanish while other tests ran.
        let tmp_dir = self.dir.join("mariadb-tmp");
        fs::create_dir_all(&data).expect("create data directory");
        fs::create_dir_all(&run_dir).expect("create run directory");
        fs::create_dir_all(&tmp_dir).expect("create temporary directory");
        let status = Command::new("chown")
            .args(["-R", "mysql:mysql"])
            .arg(&data)
            .arg(&run_dir)
            .arg(&tmp_dir)
            .status()
            .expect("run chown");
        assert!(status.success(), "chown for mysql failed");

        let output = Command::new("mariadb-install-db")
            .arg("--no-defaults")
            .arg("--user=mysql")
            .arg(format!("--datadir={}", data.display()))
            .args(["--skip-test-db", "--auth-root-authentication-method=socket"])
            .env("TMPDIR", &tmp_dir)
            .output()
            .expect("run mariadb-install-db");
        check_output("mariadb-install-db", &output);

        let mut tls_args = Vec::new();
        if let Some((cert, key)) = tls {
            // The server reads them as the mysql user.
            for (source, name, option) in [
                (cert, "server.crt", "--ssl-cert"),
                (key, "server.key", "--ssl-key"),
            ] {
                let target = run_dir.join(name);
                fs::copy(source, &target).expect("copy TLS file into the run directory");
                let status = Command::new("chown")
                    .arg("mysql:mysql")
                    .arg(&target)
                    .status()
                    .expect("run chown");
                assert!(status.success(), "chown of {name} failed");
                tls_args.push(format!("{option}={}", target.display()));
            }
        }
        let socket = run_dir.join("mariadb.sock");
        let log_path = self.dir.join("mariadb.log");
        // mariadbd itself drops to the mysql user, so the guard below stops the server and
        // not a wrapper that would leave it running.
        let child = self
            .in_server(server, "mariadbd")
            .args(["--no-defaults", "--user=mysql"])
            .arg(format!("--datadir={}", data.display()))
            .arg(format!("--tmpdir={}", tmp_dir.display()))
            .arg(format!("--socket={}", socket.display()))
            .arg(format!(
                "--pid-file={}",
                run_dir.join("mariadb.pid").display()
            ))
            .arg(format!("--log-error={}", log_path.display()))
            .arg(format!("--port={MARIADB_PORT}"))
            // Every address of the server namespace, IPv4 and IPv6.
            .arg("--bind-address=*")
            .args([
                "--skip-name-resolve",
                "--max-allowed-packet=1G",
                "--innodb-buffer-pool-size=64M",
                "--innodb-flush-log-at-trx-commit=0",
                "--max-connections=100",
            ])
            .args(&tls_args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn mariadbd");
        let mariadb = Mariadb {
            addr: SocketAddr::new(server.addr_v4.into(), MARIADB_PORT),
            socket: socket.clone(),
            log_path,
            _server: ChildGuard(child),
        };
        wait_until(
            "mariadb to accept connections",
            Duration::from_secs(60),
            || {
                Command::new("mariadb")
                    .arg("--no-defaults")
                    .arg(format!("--socket={}", socket.display()))
                    .args(["-u", "root", "-e", "SELECT 1"])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|status| status.success())
            },
        );
        mariadb.admin_sql(&format!(
            "INSTALL SONAME 'auth_ed25519';
             CREATE USER 'gateway'@'%' IDENTIFIED VIA mysql_native_password USING PASSWORD('{MARIADB_PASSWORD}');
             CREATE USER 'rawuser'@'%';
             CREATE USER 'eduser'@'%' IDENTIFIED VIA ed25519 USING PASSWORD('{MARIADB_PASSWORD}');
             GRANT ALL ON *.* TO 'gateway'@'%', 'rawuser'@'%', 'eduser'@'%';
             CREATE DATABASE payments;"
        ));
        mariadb
    }
}
