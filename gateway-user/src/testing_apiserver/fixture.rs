//! Test helpers around the stand-in API server: starting it in a test server namespace,
//! minting tokens for pods, and running kubectl in a pod the way it runs in a real one.
//! kubectl gets the in-cluster configuration from `KUBERNETES_SERVICE_HOST`/`PORT` and the
//! service-account files at `/var/run/secrets/kubernetes.io/serviceaccount`. Those files
//! are bind-mounted in a mount namespace of the kubectl process alone, so the machine's own
//! `/run` is never changed.

use std::{
    fs,
    net::IpAddr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use serde_json::Value;

use super::token::{BoundToken, TokenIssuer};
use crate::testing::{ChildGuard, Pod, Server, TestCa, TestNode, wait_until};

/// Where pods find their service-account token, CA and namespace.
pub const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
/// kubectl as the test machines install it.
pub const KUBECTL: &str = "/usr/bin/kubectl";

/// Settings of a test API server.
#[derive(Clone, Debug)]
pub struct Options {
    /// Address the server listens on and its certificate names; the server namespace's own
    /// address when unset.
    pub address: Option<IpAddr>,
    pub port: u16,
    /// Objects created at start (pods for the tokens, configmaps, ...).
    pub seed: Vec<Value>,
    /// Objects created when the test calls [`TestApiServer::create_late_seed`].
    pub late_seed: Vec<Value>,
    /// Allow rules (see [`super::Rule`]); allow-all when `None`.
    pub rules: Option<Value>,
    pub bookmark_interval: Duration,
    /// Watch events containing this text are sent as two chunks split right after it.
    pub split_watch_after: Option<String>,
    /// Accept bound tokens whose pod is not in the store.
    pub skip_bound_pod_check: bool,
    /// Compress every complete response body with gzip, whatever the request accepts.
    pub gzip_responses: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            address: None,
            port: 443,
            seed: Vec::new(),
            late_seed: Vec::new(),
            rules: None,
            bookmark_interval: super::DEFAULT_BOOKMARK_INTERVAL,
            split_watch_after: None,
            skip_bound_pod_check: false,
            gzip_responses: false,
        }
    }
}

/// A running `gateway-test-apiserver`.
#[derive(Debug)]
pub struct TestApiServer {
    pub address: IpAddr,
    pub port: u16,
    /// CA that signed the serving certificate; pods trust it as the cluster CA.
    pub ca_cert: PathBuf,
    /// The cluster CA itself, to issue more certificates for the server's names (such as a
    /// TLS-terminating gateway's serving certificate).
    pub ca: TestCa,
    pub issuer: TokenIssuer,
    pub log_path: PathBuf,
    dir: PathBuf,
    child: ChildGuard,
}

impl TestApiServer {
    /// Starts the server binary `binary` in `server`'s namespace and waits until it listens.
    pub fn start(node: &TestNode, server: &Server, binary: &Path, options: Options) -> Self {
        let address = options.address.unwrap_or(IpAddr::V4(server.addr_v4));
        let dir = node.dir.join(format!("apiserver-{}", server.name));
        fs::create_dir_all(&dir).expect("create the API server directory");

        let ca = TestCa::new(&dir, "cluster");
        let names = vec![
            address.to_string(),
            server.addr_v4.to_string(),
            "kubernetes".to_string(),
            "kubernetes.default".to_string(),
            "kubernetes.default.svc".to_string(),
            "kubernetes.default.svc.cluster.local".to_string(),
        ];
        let (cert, key) = ca.issue("apiserver", &names);
        let issuer = TokenIssuer::generate().expect("generate the token signing key");
        let signing_key = dir.join("sa.key");
        fs::write(&signing_key, issuer.private_key_pem()).expect("write the signing key");
        let seed = dir.join("seed.json");
        fs::write(
            &seed,
            serde_json::to_vec(&options.seed).expect("seed objects serialize"),
        )
        .expect("write the seed objects");
        let log_path = dir.join("apiserver.log");
        let log = fs::File::create(&log_path).expect("create the API server log");

        let mut command = node.in_server(server, binary);
        command
            .arg("--listen")
            .arg(crate::testing::sockaddr(address, options.port).to_string())
            .arg("--tls-cert")
            .arg(&cert)
            .arg("--tls-key")
            .arg(&key)
            .arg("--service-account-key")
            .arg(&signing_key)
            .arg("--seed")
            .arg(&seed)
            .arg("--bookmark-interval")
            .arg(format!("{}ms", options.bookmark_interval.as_millis()))
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone the log file"))
            .stderr(log);
        if let Some(text) = &options.split_watch_after {
            command.arg("--split-watch-events-after").arg(text);
        }
        if !options.late_seed.is_empty() {
            let path = dir.join("late-seed.json");
            fs::write(
                &path,
                serde_json::to_vec(&options.late_seed).expect("late seed objects serialize"),
            )
            .expect("write the late seed objects");
            command.arg("--late-seed").arg(path);
        }
        if options.skip_bound_pod_check {
            command.arg("--skip-bound-pod-check");
        }
        if options.gzip_responses {
            command.arg("--gzip-responses");
        }
        if let Some(rules) = &options.rules {
            let path = dir.join("rules.json");
            fs::write(&path, serde_json::to_vec(rules).expect("rules serialize"))
                .expect("write the rules");
            command.arg("--authorization").arg(path);
        }
        let mut child = ChildGuard(command.spawn().expect("start gateway-test-apiserver"));

        wait_until(
            "the test API server to listen",
            Duration::from_secs(10),
            || {
                if let Ok(Some(status)) = child.0.try_wait() {
                    panic!(
                        "gateway-test-apiserver exited with {status}: {}",
                        fs::read_to_string(&log_path).unwrap_or_default()
                    );
                }
                fs::read_to_string(&log_path).is_ok_and(|text| text.contains("listening"))
            },
        );
        Self {
            address,
            port: options.port,
            ca_cert: ca.cert_path.clone(),
            ca,
            issuer,
            log_path,
            dir,
            child,
        }
    }

    /// Mints a token for service account `service_account` bound to `pod` in `namespace`,
    /// as the kubelet would request it for the pod's projected volume.
    pub fn token_for(&self, namespace: &str, service_account: &str, pod: &Pod) -> String {
        self.issuer.mint(&BoundToken::for_pod(
            namespace,
            service_account,
            &pod.name,
            &pod.uid,
        ))
    }

    /// Creates the `late_seed` objects of [`Options`] now and waits until the server has
    /// stored them.
    pub fn create_late_seed(&self) {
        const CREATED: &str = "late seed objects created";
        let before = self.log().matches(CREATED).count();
        crate::sys::kill(self.child.0.id(), libc::SIGUSR1).expect("signal the test API server");
        wait_until("the late seed objects", Duration::from_secs(10), || {
            let log = self.log();
            assert!(!log.contains("late seed objects rejected"), "{log}");
            log.matches(CREATED).count() > before
        });
    }

    /// Writes a kubeconfig for a client outside the pods (such as gatewayd's own watches) that
    /// authenticates with a token of service account `namespace/service_account`, and returns
    /// its path.
    pub fn kubeconfig(&self, namespace: &str, service_account: &str) -> PathBuf {
        let token = self.issuer.mint(&BoundToken {
            namespace: namespace.to_string(),
            service_account: service_account.to_string(),
            service_account_uid: uuid::Uuid::now_v7().to_string(),
            pod: None,
            node: None,
            lifetime: Duration::from_secs(3600),
        });
        let path = self.dir.join(format!("kubeconfig-{service_account}.yaml"));
        let text = format!(
            "apiVersion: v1\nkind: Config\n\
             clusters:\n- name: test\n  cluster:\n    server: https://{}\n    certificate-authority: {}\n\
             users:\n- name: {service_account}\n  user:\n    token: {token}\n\
             contexts:\n- name: test\n  context:\n    cluster: test\n    user: {service_account}\n\
             current-context: test\n",
            crate::testing::sockaddr(self.address, self.port),
            self.ca_cert.display()
        );
        fs::write(&path, text).expect("write the kubeconfig");
        path
    }

    /// Builds the seed object of `pod` in `namespace`, with its UID, so its tokens verify.
    pub fn seed_pod(namespace: &str, service_account: &str, pod: &Pod) -> Value {
        super::seed_pod(namespace, &pod.name, &pod.uid, service_account)
    }

    /// Writes a service-account directory (`token`, `ca.crt`, `namespace`) named `name` and
    /// returns its path.
    pub fn service_account_dir(&self, name: &str, token: &str, namespace: &str) -> PathBuf {
        let dir = self.dir.join(format!("sa-{name}"));
        fs::create_dir_all(&dir).expect("create the service-account directory");
        fs::write(dir.join("token"), token).expect("write the token");
        fs::copy(&self.ca_cert, dir.join("ca.crt")).expect("copy the cluster CA");
        fs::write(dir.join("namespace"), namespace).expect("write the namespace");
        dir
    }

    /// Returns the server's log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Builds a kubectl command that runs in `pod` with the in-cluster configuration of
    /// `service_account_dir` pointing at this server. `home` keeps kubectl's discovery cache
    /// apart per test.
    pub fn kubectl(
        &self,
        node: &TestNode,
        pod: &Pod,
        service_account_dir: &Path,
        home: &Path,
    ) -> Command {
        self.in_cluster(node, pod, service_account_dir, home, KUBECTL)
    }

    /// Builds a command for `program` in `pod` with the in-cluster environment and the
    /// service-account files of `service_account_dir`, pointing at this server's address.
    pub fn in_cluster(
        &self,
        node: &TestNode,
        pod: &Pod,
        service_account_dir: &Path,
        home: &Path,
        program: &str,
    ) -> Command {
        fs::create_dir_all(home).expect("create the kubectl home directory");
        // A private mount namespace with a fresh tmpfs on /run, so that the bind mount of the
        // service-account directory is seen by this process tree alone.
        let script = format!(
            "set -e; mount --make-rprivate /; mount -t tmpfs tmpfs /run; \
             mkdir -p {SERVICE_ACCOUNT_DIR}; mount --bind \"$GATEWAY_SA_DIR\" {SERVICE_ACCOUNT_DIR}; \
             exec \"$@\""
        );
        let mut command = node.in_pod(pod, "unshare");
        command
            .args(["-m", "sh", "-c", &script, "sh", program])
            .env("GATEWAY_SA_DIR", service_account_dir)
            .env("KUBERNETES_SERVICE_HOST", self.address.to_string())
            .env("KUBERNETES_SERVICE_PORT", self.port.to_string())
            .env("HOME", home)
            .env_remove("KUBECONFIG");
        command
    }
}
