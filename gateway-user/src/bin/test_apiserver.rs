//! `gateway-test-apiserver`: the test stand-in for kube-apiserver (see the library module
//! `testing_apiserver` for what it implements). Tests run it inside a server namespace.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::Parser;
use gateway_user::testing_apiserver::{self, Config};

#[derive(Debug, Parser)]
#[command(
    name = "gateway-test-apiserver",
    about = "Kubernetes API server stand-in for the gateway's tests"
)]
struct Cli {
    /// Address to listen on; repeat for more.
    #[arg(long, required = true)]
    listen: Vec<SocketAddr>,
    /// Serving certificate chain (PEM).
    #[arg(long)]
    tls_cert: PathBuf,
    /// Serving private key (PEM).
    #[arg(long)]
    tls_key: PathBuf,
    /// Service-account token signing key (PEM PKCS#8, P-256); tokens are verified with it.
    #[arg(long)]
    service_account_key: PathBuf,
    /// File holding a JSON array of objects to create at start.
    #[arg(long)]
    seed: Option<PathBuf>,
    /// File holding a JSON array of objects to create each time the process receives SIGUSR1.
    #[arg(long)]
    late_seed: Option<PathBuf>,
    /// File holding a JSON array of allow rules; without it every service account may do
    /// everything.
    #[arg(long)]
    authorization: Option<PathBuf>,
    /// Interval between watch BOOKMARK events, e.g. `60s` or `500ms`.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "60s")]
    bookmark_interval: Duration,
    /// Accept bound tokens whose pod does not exist in the store.
    #[arg(long)]
    skip_bound_pod_check: bool,
    /// Send each watch event that contains TEXT as two chunks, split right after TEXT.
    #[arg(long, value_name = "TEXT")]
    split_watch_events_after: Option<String>,
    /// Compress every response body of known length with gzip, even when the request's
    /// Accept-Encoding does not allow it.
    #[arg(long)]
    gzip_responses: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    let cli = Cli::parse();
    testing_apiserver::serve(Config {
        listen: cli.listen,
        tls_cert: cli.tls_cert,
        tls_key: cli.tls_key,
        service_account_key: cli.service_account_key,
        seed: cli.seed,
        late_seed: cli.late_seed,
        authorization: cli.authorization,
        bookmark_interval: cli.bookmark_interval,
        check_bound_pods: !cli.skip_bound_pod_check,
        split_watch_after: cli.split_watch_events_after,
        gzip_responses: cli.gzip_responses,
    })
    .await
}
