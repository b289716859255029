//! `gateway-testpeer`: the client and server the namespace tests and benchmarks run inside pods
//! and servers. It is an ordinary, unmodified TCP program: nothing in it depends on the
//! gateway.
//!
//! - `serve --listen ADDR... [--greet | --discard | --sink]`: echo server; with `--greet` it first
//!   sends `PEER <addr>\n`, the client address it sees; with `--discard` it closes every
//!   connection at once; with `--sink` it reads to the end and reports the byte count.
//! - `client --connect ADDR --bytes N [--greet]`: sends N bytes of a fixed pseudo-random
//!   stream while reading the echo, checks every byte, and prints one JSON object.
//! - `upload --connect ADDR --bytes N`: sends N bytes one way to a `--sink` server, timed.
//! - `connect-loop --connect ADDR --count N`: N connect-and-close rounds, timed.
//! - `hold --connect ADDR --count N`: opens N idle connections, prints `ready`, and keeps them
//!   open until its standard input closes.
//! - `tls-request --connect ADDR --ca FILE --request FILE [--reset]`: one HTTP/1.1 request
//!   over TLS, its response printed, then a close or, with `--reset`, a TCP reset.
//! - `pg-script --connect ADDR --script FILE`: a raw PostgreSQL client for protocol tests.
//! - `pg-driver --connect ADDR ...`: a tokio-postgres scenario (prepared statements,
//!   pipelining, 20 MiB values, COPY both ways).
//! - `mysql-raw --connect ADDR --scenario NAME`: a raw MySQL client for protocol tests and the
//!   point-select benchmark (see `mysql`).
//! - `mysql-driver --connect ADDR ...`: a mysql_async scenario (text and binary rows, cached
//!   prepared statements, 20 MiB values, a procedure's result sets, a denied statement).
//! - `mysql-sha2-server --listen ADDR --account NAME... --password-file FILE`: a MySQL 8
//!   stand-in that authenticates with `caching_sha2_password`, or with `mysql_clear_password`
//!   or `sha256_password` for the accounts named so (see `mysql_server`).
//! - `mysql-login --connect ADDR ...`: one mysql_async login and query, printed as JSON.

#[path = "testpeer/mysql.rs"]
mod mysql;
#[path = "testpeer/mysql_server.rs"]
mod mysql_server;

use std::{
    io::{self, BufRead as _, BufReader, Read as _, Write as _},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    time::{Duration, Instant},
};

use clap::{Parser, Subcommand};
use serde_json::json;

#[derive(Debug, Parser)]
#[command(
    name = "gateway-testpeer",
    about = "TCP client and echo server for the gateway's tests"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    Serve {
        #[arg(long, required = true)]
        listen: Vec<SocketAddr>,
        #[arg(long)]
        greet: bool,
        /// Close each connection as soon as it is accepted (for connect benchmarks).
        #[arg(long, conflicts_with = "greet")]
        discard: bool,
        /// Read each connection to its end, then send `RECEIVED <count>` (for throughput).
        #[arg(long, conflicts_with_all = ["greet", "discard"])]
        sink: bool,
    },
    /// Send N bytes one way to a `--sink` server and time it until the server confirms.
    Upload {
        #[arg(long)]
        connect: SocketAddr,
        #[arg(long)]
        bytes: u64,
    },
    Client {
        #[arg(long)]
        connect: SocketAddr,
        #[arg(long)]
        bytes: u64,
        #[arg(long)]
        greet: bool,
    },
    ConnectLoop {
        #[arg(long)]
        connect: SocketAddr,
        #[arg(long)]
        count: u64,
    },
    Hold {
        #[arg(long)]
        connect: SocketAddr,
        #[arg(long)]
        count: usize,
    },
    /// Send one HTTP/1.1 request over TLS and print the response (see `tls_request`).
    TlsRequest {
        #[arg(long)]
        connect: SocketAddr,
        /// CA certificate that signed the server's certificate.
        #[arg(long)]
        ca: std::path::PathBuf,
        /// File holding the request's bytes.
        #[arg(long)]
        request: std::path::PathBuf,
        /// Close with a TCP reset after the response.
        #[arg(long)]
        reset: bool,
    },
    /// Run a script of raw PostgreSQL frontend messages (see `pg_script`) and print every
    /// backend message as a JSON line.
    PgScript {
        #[arg(long)]
        connect: SocketAddr,
        /// Script file, one command per line.
        #[arg(long)]
        script: std::path::PathBuf,
        /// Start TLS at once, without SSLRequest (PostgreSQL 17's direct TLS), trusting this CA.
        #[arg(long)]
        direct_tls_ca: Option<std::path::PathBuf>,
    },
    /// Run a fixed scenario with the tokio-postgres driver (see `pg_driver`) and print one JSON
    /// object with what each step returned.
    PgDriver {
        #[arg(long)]
        connect: SocketAddr,
        #[arg(long)]
        user: String,
        #[arg(long)]
        password: String,
        /// MiB to COPY in and back out.
        #[arg(long, default_value_t = 64)]
        copy_mib: usize,
    },
    /// Log in to a MySQL server as a user without a password, run a scenario (`sizes`,
    /// `prepared`, `results`, `binary-rows`, `denied`, `garbage-handshake`, `too-long`,
    /// `eof-mid-packet`, `point-select`) and print one JSON object.
    MysqlRaw {
        #[arg(long)]
        connect: SocketAddr,
        #[arg(long, default_value = "rawuser")]
        user: String,
        #[arg(long, default_value = "payments")]
        database: String,
        #[arg(long)]
        scenario: String,
        /// Ask for CLIENT_DEPRECATE_EOF (result sets end with OK instead of EOF).
        #[arg(long)]
        deprecate_eof: bool,
        /// Duration of `point-select`, in seconds.
        #[arg(long, default_value_t = 5)]
        seconds: u64,
    },
    /// Run a fixed scenario with the mysql_async driver (see `mysql::driver`) and print one
    /// JSON object with what each step returned.
    MysqlDriver {
        #[arg(long)]
        connect: SocketAddr,
        #[arg(long)]
        user: String,
        #[arg(long)]
        password: String,
    },
    /// Serve MySQL logins with caching_sha2_password until killed, printing one JSON line per
    /// login attempt.
    MysqlSha2Server {
        #[arg(long)]
        listen: SocketAddr,
        /// Account names, which all share one password.
        #[arg(long, required = true)]
        account: Vec<String>,
        /// Account that authenticates with mysql_clear_password instead, with the same password.
        #[arg(long)]
        clear_password_account: Vec<String>,
        /// Account that authenticates with sha256_password instead, with the same password.
        #[arg(long)]
        sha256_account: Vec<String>,
        /// File whose first line is the accounts' password.
        #[arg(long)]
        password_file: std::path::PathBuf,
        /// PEM certificate chain. With `--tls-key`, the server offers TLS.
        #[arg(long, requires = "tls_key")]
        tls_cert: Option<std::path::PathBuf>,
        #[arg(long, requires = "tls_cert")]
        tls_key: Option<std::path::PathBuf>,
    },
    /// Log in with mysql_async, run `--query`, and print one JSON object: the rows, or the
    /// server's error.
    MysqlLogin {
        #[arg(long)]
        connect: SocketAddr,
        #[arg(long)]
        user: String,
        /// File whose first line is the password.
        #[arg(long)]
        password_file: std::path::PathBuf,
        #[arg(long, default_value = "SELECT 1")]
        query: String,
        /// Require TLS, trusting this CA certificate (PEM).
        #[arg(long)]
        tls_ca: Option<std::path::PathBuf>,
        /// After the query, change to this account with COM_CHANGE_USER and run it again.
        #[arg(long)]
        change_user: Option<String>,
        /// Let the server switch the client to mysql_clear_password, which sends the password
        /// in clear text (mysql_async's `enable_cleartext_plugin`).
        #[arg(long)]
        enable_cleartext_plugin: bool,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Serve {
            listen,
            greet,
            discard,
            sink,
        } => serve(&listen, greet, discard, sink),
        Command::Upload { connect, bytes } => upload(connect, bytes),
        Command::Client {
            connect,
            bytes,
            greet,
        } => client(connect, bytes, greet),
        Command::ConnectLoop { connect, count } => connect_loop(connect, count),
        Command::Hold { connect, count } => hold(connect, count),
        Command::TlsRequest {
            connect,
            ca,
            request,
            reset,
        } => tls_request(connect, &ca, &request, reset),
        Command::PgScript {
            connect,
            script,
            direct_tls_ca,
        } => pg_script::run(connect, &script, direct_tls_ca.as_deref()),
        Command::PgDriver {
            connect,
            user,
            password,
            copy_mib,
        } => pg_driver::run(connect, &user, &password, copy_mib),
        Command::MysqlRaw {
            connect,
            user,
            database,
            scenario,
            deprecate_eof,
            seconds,
        } => mysql::run(connect, &user, &database, &scenario, deprecate_eof, seconds),
        Command::MysqlDriver {
            connect,
            user,
            password,
        } => mysql::driver::run(connect, &user, &password),
        Command::MysqlSha2Server {
            listen,
            account,
            clear_password_account,
            sha256_account,
            password_file,
            tls_cert,
            tls_key,
        } => mysql_server::run(
            listen,
            mysql_server::Accounts {
                caching_sha2: account,
                clear_password: clear_password_account,
                sha256: sha256_account,
            },
            &read_password(&password_file)?,
            tls_cert.as_deref().zip(tls_key.as_deref()),
        ),
        Command::MysqlLogin {
            connect,
            user,
            password_file,
            query,
            tls_ca,
            change_user,
            enable_cleartext_plugin,
        } => mysql::driver::login(
            connect,
            &user,
            &read_password(&password_file)?,
            &query,
            mysql::driver::LoginOptions {
                tls_ca: tls_ca.as_deref(),
                change_user: change_user.as_deref(),
                enable_cleartext_plugin,
            },
        ),
    }
}

/// Reads a password from the first line of `path`, so it stays off command lines.
fn read_password(path: &std::path::Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(path)
        .map_err(|error| anyhow::anyhow!("failed to read {}: {error}", path.display()))?;
    Ok(text.lines().next().unwrap_or_default().to_string())
}

fn serve(addrs: &[SocketAddr], greet: bool, discard: bool, sink: bool) -> anyhow::Result<()> {
    let mut handles = Vec::new();
    for addr in addrs {
        let listener = TcpListener::bind(addr)?;
        handles.push(std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                if discard {
                    drop(stream);
                    continue;
                }
                std::thread::spawn(move || {
                    if sink {
                        let _ = drain(stream);
                        return;
                    }
                    let _ = echo(stream, greet);
                });
            }
        }));
    }
    println!("listening");
    io::stdout().flush()?;
    for handle in handles {
        let _ = handle.join();
    }
    Ok(())
}

fn echo(mut stream: TcpStream, greet: bool) -> io::Result<()> {
    if greet {
        let peer = stream.peer_addr()?;
        stream.write_all(format!("PEER {peer}\n").as_bytes())?;
    }
    let mut reader = stream.try_clone()?;
    io::copy(&mut reader, &mut stream)?;
    stream.shutdown(Shutdown::Write)
}

fn drain(mut stream: TcpStream) -> io::Result<()> {
    let mut reader = stream.try_clone()?;
    let count = io::copy(&mut reader, &mut io::sink())?;
    stream.write_all(format!("RECEIVED {count}\n").as_bytes())?;
    stream.shutdown(Shutdown::Write)
}

fn upload(addr: SocketAddr, total: u64) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut stream = TcpStream::connect(addr)?;
    let block = vec![0x5a_u8; BLOCK];
    let mut left = total;
    while left > 0 {
        let step = left.min(BLOCK as u64) as usize;
        stream.write_all(&block[..step])?;
        left -= step as u64;
    }
    stream.shutdown(Shutdown::Write)?;
    let mut reply = String::new();
    BufReader::new(&stream).read_line(&mut reply)?;
    let received: u64 = reply
        .trim()
        .strip_prefix("RECEIVED ")
        .and_then(|count| count.parse().ok())
        .unwrap_or(0);
    println!(
        "{}",
        json!({ "sent": total, "received": received, "elapsed_ms": started.elapsed().as_secs_f64() * 1000.0 })
    );
    Ok(())
}

/// Block size of the client's pattern stream and of its reads and writes.
const BLOCK: usize = 64 * 1024;

/// The fixed byte stream clients send: xorshift64 output, so any corruption, loss or
/// reordering shows up as a mismatch.
struct Pattern(u64);

impl Pattern {
    fn new() -> Self {
        Self(0x9e37_79b9_7f4a_7c15)
    }

    fn fill(&mut self, buffer: &mut [u8]) {
        for chunk in buffer.chunks_mut(8) {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            let bytes = self.0.to_le_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
    }
}

fn client(addr: SocketAddr, total: u64, greet: bool) -> anyhow::Result<()> {
    let started = Instant::now();
    let stream = TcpStream::connect(addr)?;
    let peer = stream.peer_addr()?;
    let local = stream.local_addr()?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut greeting = None;
    if greet {
        let mut line = String::new();
        reader.read_line(&mut line)?;
        greeting = Some(line.trim_end().to_string());
    }

    let mut writer = stream.try_clone()?;
    let sender = std::thread::spawn(move || -> io::Result<()> {
        let mut pattern = Pattern::new();
        let mut block = vec![0u8; BLOCK];
        let mut left = total;
        while left > 0 {
            pattern.fill(&mut block);
            let step = left.min(BLOCK as u64) as usize;
            writer.write_all(&block[..step])?;
            left -= step as u64;
        }
        writer.shutdown(Shutdown::Write)
    });

    // The echo must be the same stream, block by block, whatever the read sizes.
    let mut expected = Pattern::new();
    let mut block = vec![0u8; BLOCK];
    let mut block_pos = BLOCK;
    let mut received: u64 = 0;
    let mut intact = true;
    let mut buffer = vec![0u8; BLOCK];
    loop {
        let read = reader.read(&mut buffer)?;
        if read == 0 {
            break;
        }
        let mut data = &buffer[..read];
        while !data.is_empty() {
            if block_pos == BLOCK {
                expected.fill(&mut block);
                block_pos = 0;
            }
            let step = data.len().min(BLOCK - block_pos);
            if data[..step] != block[block_pos..block_pos + step] {
                intact = false;
            }
            block_pos += step;
            data = &data[step..];
        }
        received += read as u64;
    }
    sender.join().expect("sender thread")?;

    let output = json!({
        "peer": peer.to_string(),
        "local": local.to_string(),
        "greeting": greeting,
        "sent": total,
        "received": received,
        "intact": intact && received == total,
        "elapsed_ms": started.elapsed().as_millis() as u64,
    });
    println!("{output}");
    Ok(())
}

fn connect_loop(addr: SocketAddr, count: u64) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut failures = 0u64;
    for _ in 0..count {
        match TcpStream::connect(addr) {
            Ok(stream) => drop(stream),
            Err(_) => failures += 1,
        }
    }
    let elapsed = started.elapsed();
    println!(
        "{}",
        json!({ "count": count, "failures": failures, "elapsed_ns": elapsed.as_nanos() as u64 })
    );
    Ok(())
}

fn hold(addr: SocketAddr, count: usize) -> anyhow::Result<()> {
    let mut streams = Vec::with_capacity(count);
    for _ in 0..count {
        streams.push(TcpStream::connect(addr)?);
    }
    println!("ready");
    io::stdout().flush()?;
    let mut line = String::new();
    let _ = io::stdin().read_line(&mut line);
    drop(streams);
    std::thread::sleep(Duration::from_millis(10));
    Ok(())
}

/// Starts TLS on `tcp` with ALPN protocol `alpn`, verifying the server against `ca` and its
/// IP address.
#[expect(
    deprecated,
    reason = "the gateway uses the ring provider too; see its tls module"
)]
fn tls_client(
    tcp: TcpStream,
    addr: SocketAddr,
    ca: &std::path::Path,
    alpn: &[u8],
) -> anyhow::Result<rustls::StreamOwned<rustls::ClientConnection, TcpStream>> {
    use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject as _};
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca)? {
        roots.add(cert?)?;
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![alpn.to_vec()];
    let name = ServerName::from(addr.ip());
    let connection = rustls::ClientConnection::new(std::sync::Arc::new(config), name)?;
    Ok(rustls::StreamOwned::new(connection, tcp))
}

/// Sends the HTTP/1.1 request in `request` over TLS (ALPN `http/1.1`), reads one response with
/// a `Content-Length` body, prints it, and closes. With `reset` the close is a TCP reset
/// (`SO_LINGER` of zero), as clients that close with unread data produce.
fn tls_request(
    addr: SocketAddr,
    ca: &std::path::Path,
    request: &std::path::Path,
    reset: bool,
) -> anyhow::Result<()> {
    let request = std::fs::read(request)?;
    let tcp = TcpStream::connect(addr)?;
    let socket = tcp.try_clone()?;
    let mut stream = tls_client(tcp, addr, ca, b"http/1.1")?;
    stream.write_all(&request)?;
    stream.flush()?;

    let mut response = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        let read = stream.read(&mut buf)?;
        anyhow::ensure!(
            read > 0,
            "the connection closed before the response was complete"
        );
        response.extend_from_slice(&buf[..read]);
        let Some(head_end) = response.windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        let head = String::from_utf8_lossy(&response[..head_end]).to_ascii_lowercase();
        let length: usize = head
            .lines()
            .find_map(|line| line.strip_prefix("content-length:"))
            .ok_or_else(|| anyhow::anyhow!("the response has no Content-Length"))?
            .trim()
            .parse()?;
        if response.len() >= head_end + 4 + length {
            break;
        }
    }
    std::io::stdout().write_all(&response)?;

    if reset {
        socket2::SockRef::from(&socket).set_linger(Some(Duration::ZERO))?;
    }
    Ok(())
}

/// A raw PostgreSQL frontend driven by a script, for tests that need exact control over the
/// messages (pipelines, cancel requests, malformed input). Commands, one per line:
///
/// - `startup USER DATABASE` (sent whole), `startup-bytewise USER DATABASE` (one byte per
///   write) or `startup-3.2 USER DATABASE` (asking for protocol 3.2), `gssenc` and `ssl` (the requests, reading the one-byte answer);
/// - `query SQL`, `parse NAME SQL`, `bind PORTAL STATEMENT [PARAM...]` where a parameter
///   `@N` stands for N bytes of `x`, `execute PORTAL`, `close-statement NAME`, `sync`, `flush`;
/// - `repeat N` ... `end` repeats the lines between, with `{i}` replaced by 1..=N;
/// - `raw HEX` sends bytes as given; `read-ready N` reads until N ReadyForQuery messages, and
///   `read-ready-slowly N MS` does so pausing MS after every 64 KiB;
/// - `read-in-background N` starts a thread that reads until N ReadyForQuery messages while
///   the script goes on writing, as a pipelining driver does, and `join` waits for it (plain
///   TCP only). Both directions then give up after 60 s without progress, so a proxy that
///   stops reading while it has replies to deliver fails the script instead of hanging it;
/// - `cancel-after MS` sleeps, then sends a CancelRequest with this session's key on a new
///   connection; `sleep MS`; `terminate`.
mod pg_script {
    use std::{
        io::{self, Read as _, Write as _},
        net::{SocketAddr, TcpStream},
        time::{Duration, Instant},
    };

    use serde_json::json;

    /// How long a background reader, and the writes beside it, wait for the other side.
    const STALL_LIMIT: Duration = Duration::from_secs(60);

    /// A byte stream the script talks over: plain TCP or TLS.
    trait Stream: io::Read + io::Write {}
    impl<T: io::Read + io::Write> Stream for T {}

    pub fn run(
        addr: SocketAddr,
        script: &std::path::Path,
        direct_tls_ca: Option<&std::path::Path>,
    ) -> anyhow::Result<()> {
        let text = std::fs::read_to_string(script)?;
        let lines = expand(text.lines().map(str::to_string).collect());
        let tcp = TcpStream::connect(addr)?;
        tcp.set_nodelay(true)?;
        // The socket a background reader reads from; TLS state cannot be shared between threads.
        let reader_socket = match direct_tls_ca {
            Some(_) => None,
            None => Some(tcp.try_clone()?),
        };
        let mut background: Option<std::thread::JoinHandle<io::Result<()>>> = None;
        let mut stream: Box<dyn Stream> = match direct_tls_ca {
            Some(ca) => Box::new(super::tls_client(tcp, addr, ca, b"postgresql")?),
            None => Box::new(tcp),
        };
        let started = Instant::now();
        let mut backend_key: Option<Vec<u8>> = None;
        let mut pending_cancel: Option<(Duration, std::thread::JoinHandle<()>)> = None;
        for line in lines {
            let (command, rest) = line.split_once(' ').unwrap_or((line.as_str(), ""));
            match command {
                "" => {}
                "startup" | "startup-bytewise" | "startup-3.2" => {
                    let (user, database) = rest.split_once(' ').unwrap_or((rest, rest));
                    let version: u32 = if command == "startup-3.2" {
                        196_610
                    } else {
                        196_608
                    };
                    let mut body = version.to_be_bytes().to_vec();
                    for (key, value) in [("user", user), ("database", database)] {
                        body.extend_from_slice(key.as_bytes());
                        body.push(0);
                        body.extend_from_slice(value.as_bytes());
                        body.push(0);
                    }
                    body.push(0);
                    let packet = untagged(&body);
                    if command != "startup-bytewise" {
                        stream.write_all(&packet)?;
                    } else {
                        for byte in packet {
                            stream.write_all(&[byte])?;
                            std::thread::sleep(Duration::from_millis(2));
                        }
                    }
                }
                "gssenc" | "ssl" => {
                    let code: u32 = if command == "ssl" {
                        80_877_103
                    } else {
                        80_877_104
                    };
                    stream.write_all(&untagged(&code.to_be_bytes()))?;
                    let mut answer = [0u8; 1];
                    stream.read_exact(&mut answer)?;
                    println!(
                        "{}",
                        json!({ "answer": char::from(answer[0]).to_string(), "to": command })
                    );
                }
                "query" => stream.write_all(&tagged(b'Q', &cstr(rest)))?,
                "parse" => {
                    let (name, sql) = rest.split_once(' ').unwrap_or((rest, ""));
                    let name = if name == "-" { "" } else { name };
                    let mut body = cstr(name);
                    body.extend(cstr(sql));
                    body.extend_from_slice(&0i16.to_be_bytes());
                    stream.write_all(&tagged(b'P', &body))?;
                }
                "bind" => {
                    let mut parts = rest.split(' ');
                    let portal = parts.next().unwrap_or("-");
                    let statement = parts.next().unwrap_or("-");
                    let params: Vec<Vec<u8>> = parts.map(param_value).collect();
                    let mut body = cstr(if portal == "-" { "" } else { portal });
                    body.extend(cstr(if statement == "-" { "" } else { statement }));
                    body.extend_from_slice(&0i16.to_be_bytes());
                    body.extend_from_slice(&(params.len() as i16).to_be_bytes());
                    for param in &params {
                        body.extend_from_slice(&(param.len() as i32).to_be_bytes());
                        body.extend_from_slice(param);
                    }
                    body.extend_from_slice(&0i16.to_be_bytes());
                    stream.write_all(&tagged(b'B', &body))?;
                }
                "execute" => {
                    let mut body = cstr(if rest == "-" || rest.is_empty() {
                        ""
                    } else {
                        rest
                    });
                    body.extend_from_slice(&0i32.to_be_bytes());
                    stream.write_all(&tagged(b'E', &body))?;
                }
                "close-statement" => {
                    let mut body = vec![b'S'];
                    body.extend(cstr(if rest == "-" { "" } else { rest }));
                    stream.write_all(&tagged(b'C', &body))?;
                }
                "sync" => stream.write_all(&tagged(b'S', &[]))?,
                "flush" => stream.write_all(&tagged(b'H', &[]))?,
                "terminate" => stream.write_all(&tagged(b'X', &[]))?,
                "raw" => stream.write_all(&hex(rest))?,
                "sleep" => std::thread::sleep(Duration::from_millis(rest.parse()?)),
                "cancel-after" => {
                    let delay = Duration::from_millis(rest.parse()?);
                    let key = backend_key
                        .clone()
                        .ok_or_else(|| anyhow::anyhow!("no BackendKeyData yet"))?;
                    let handle = std::thread::spawn(move || {
                        std::thread::sleep(delay);
                        let mut body = 80_877_102u32.to_be_bytes().to_vec();
                        body.extend_from_slice(&key);
                        if let Ok(mut cancel) = TcpStream::connect(addr) {
                            let _ = cancel.write_all(&untagged(&body));
                            let mut rest = Vec::new();
                            let _ = cancel.read_to_end(&mut rest);
                        }
                    });
                    pending_cancel = Some((delay, handle));
                }
                "read-ready" | "read-ready-slowly" => {
                    // `read-ready-slowly N MS` sleeps MS after every 64 KiB it reads.
                    let (count, pause) = rest.split_once(' ').unwrap_or((rest, "0"));
                    let wanted: usize = count.parse()?;
                    let pause = Duration::from_millis(pause.parse()?);
                    let mut seen = 0;
                    while seen < wanted {
                        let Some((tag, body)) = read_message(stream.as_mut(), pause)? else {
                            println!("{}", json!({ "eof": true }));
                            break;
                        };
                        if tag == b'K' {
                            backend_key = Some(body.clone());
                        }
                        if tag == b'Z' {
                            seen += 1;
                        }
                        println!("{}", describe(tag, &body, started));
                    }
                }
                "read-in-background" => {
                    let expected_ready: usize = rest.parse()?;
                    let mut socket = reader_socket
                        .as_ref()
                        .ok_or_else(|| anyhow::anyhow!("read-in-background needs plain TCP"))?
                        .try_clone()?;
                    socket.set_read_timeout(Some(STALL_LIMIT))?;
                    socket.set_write_timeout(Some(STALL_LIMIT))?;
                    background = Some(std::thread::spawn(move || {
                        let mut seen = 0;
                        while seen < expected_ready {
                            let Some((tag, body)) = read_message(&mut socket, Duration::ZERO)?
                            else {
                                println!("{}", json!({ "eof": true }));
                                break;
                            };
                            if tag == b'Z' {
                                seen += 1;
                            }
                            println!("{}", describe(tag, &body, started));
                        }
                        Ok(())
                    }));
                }
                "join" => {
                    let handle = background
                        .take()
                        .ok_or_else(|| anyhow::anyhow!("join without read-in-background"))?;
                    handle
                        .join()
                        .map_err(|_| anyhow::anyhow!("the background reader panicked"))??;
                }
                other => anyhow::bail!("unknown script command {other:?}"),
            }
        }
        if let Some((_, handle)) = pending_cancel {
            let _ = handle.join();
        }
        Ok(())
    }

    /// Expands `repeat N` ... `end` blocks.
    fn expand(lines: Vec<String>) -> Vec<String> {
        let mut out = Vec::new();
        let mut index = 0;
        while index < lines.len() {
            let line = lines[index].trim().to_string();
            if let Some(count) = line.strip_prefix("repeat ") {
                let count: usize = count.trim().parse().unwrap_or(0);
                let end = lines[index..]
                    .iter()
                    .position(|l| l.trim() == "end")
                    .map_or(lines.len(), |p| index + p);
                let body = &lines[index + 1..end];
                for i in 1..=count {
                    out.extend(body.iter().map(|l| l.trim().replace("{i}", &i.to_string())));
                }
                index = end + 1;
            } else {
                out.push(line);
                index += 1;
            }
        }
        out
    }

    fn param_value(spec: &str) -> Vec<u8> {
        match spec.strip_prefix('@').and_then(|n| n.parse::<usize>().ok()) {
            Some(len) => vec![b'x'; len],
            None => spec.as_bytes().to_vec(),
        }
    }

    fn cstr(text: &str) -> Vec<u8> {
        let mut bytes = text.as_bytes().to_vec();
        bytes.push(0);
        bytes
    }

    fn tagged(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        out.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
        out.extend_from_slice(body);
        out
    }

    fn untagged(body: &[u8]) -> Vec<u8> {
        let mut out = (body.len() as u32 + 4).to_be_bytes().to_vec();
        out.extend_from_slice(body);
        out
    }

    fn hex(text: &str) -> Vec<u8> {
        let digits: Vec<u8> = text.bytes().filter(u8::is_ascii_hexdigit).collect();
        digits
            .chunks(2)
            .filter_map(|pair| u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok())
            .collect()
    }

    fn read_message(stream: &mut dyn Stream, pause: Duration) -> io::Result<Option<(u8, Vec<u8>)>> {
        let mut header = [0u8; 5];
        match stream.read_exact(&mut header) {
            Ok(()) => {}
            // A reset counts as the end too: a proxy that closes with unread input resets.
            Err(error)
                if matches!(
                    error.kind(),
                    io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset
                ) =>
            {
                return Ok(None);
            }
            Err(error) => return Err(error),
        }
        let len = u32::from_be_bytes(header[1..].try_into().expect("4 bytes")) as usize;
        let mut body = vec![0u8; len.saturating_sub(4)];
        for chunk in body.chunks_mut(64 * 1024) {
            stream.read_exact(chunk)?;
            if !pause.is_zero() {
                std::thread::sleep(pause);
            }
        }
        Ok(Some((header[0], body)))
    }

    /// Describes one backend message as a JSON line: the tag, and for the common ones what a
    /// test needs.
    fn describe(tag: u8, body: &[u8], started: Instant) -> serde_json::Value {
        let tag_text = char::from(tag).to_string();
        let ms = started.elapsed().as_millis() as u64;
        match tag {
            b'C' => {
                json!({ "tag": tag_text, "command": String::from_utf8_lossy(body.strip_suffix(b"\0").unwrap_or(body)), "ms": ms })
            }
            b'E' | b'N' => {
                let mut fields = serde_json::Map::new();
                for field in body.split(|&b| b == 0).filter(|f| !f.is_empty()) {
                    fields.insert(
                        char::from(field[0]).to_string(),
                        json!(String::from_utf8_lossy(&field[1..])),
                    );
                }
                json!({ "tag": tag_text, "fields": fields, "ms": ms })
            }
            b'D' => {
                let mut values = Vec::new();
                let count = i16::from_be_bytes([body[0], body[1]]).max(0) as usize;
                let mut offset = 2;
                for _ in 0..count {
                    let len =
                        i32::from_be_bytes(body[offset..offset + 4].try_into().expect("4 bytes"));
                    offset += 4;
                    if len < 0 {
                        values.push(serde_json::Value::Null);
                    } else {
                        let value = &body[offset..offset + len as usize];
                        if value.len() > 256 {
                            values.push(json!({ "len": value.len(), "all_x": value.iter().all(|&b| b == b'x') }));
                        } else {
                            values.push(json!(String::from_utf8_lossy(value)));
                        }
                        offset += len as usize;
                    }
                }
                json!({ "tag": tag_text, "values": values, "ms": ms })
            }
            b'Z' => json!({ "tag": tag_text, "status": char::from(body[0]).to_string(), "ms": ms }),
            _ => json!({ "tag": tag_text, "len": body.len(), "ms": ms }),
        }
    }
}

/// A scenario run with tokio-postgres, an ordinary Rust driver: prepared statements, a
/// pipeline of concurrent queries, a 20 MiB row and parameter, and COPY in and out.
mod pg_driver {
    use std::net::SocketAddr;

    use futures_util::{SinkExt as _, StreamExt as _, future::join_all};
    use serde_json::json;

    /// Size of the big row and the big parameter.
    const BIG_VALUE: usize = 20 * 1024 * 1024;

    pub fn run(
        addr: SocketAddr,
        user: &str,
        password: &str,
        copy_mib: usize,
    ) -> anyhow::Result<()> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        runtime.block_on(scenario(addr, user, password, copy_mib))
    }

    async fn scenario(
        addr: SocketAddr,
        user: &str,
        password: &str,
        copy_mib: usize,
    ) -> anyhow::Result<()> {
        let mut config = tokio_postgres::Config::new();
        config
            .host(addr.ip().to_string())
            .port(addr.port())
            .user(user)
            .password(password)
            .dbname("postgres");
        let (client, connection) = config.connect(tokio_postgres::NoTls).await?;
        let connection = tokio::spawn(connection);

        client
            .batch_execute("CREATE TABLE driver_rows (id int, note text); CREATE TABLE driver_copy (id int, note text)")
            .await?;
        let insert = client
            .prepare("INSERT INTO driver_rows VALUES ($1, $2)")
            .await?;
        for id in 0..100i32 {
            client
                .execute(&insert, &[&id, &format!("note {id}")])
                .await?;
        }
        let prepared_rows: i64 = client
            .query_one("SELECT count(*) FROM driver_rows", &[])
            .await?
            .get(0);

        // tokio-postgres sends concurrent queries as one pipeline on the connection.
        let queries = (0..50i32).map(|i| {
            let client = &client;
            async move {
                client
                    .query_one("SELECT $1::int + 1", &[&i])
                    .await
                    .map(|row| row.get::<_, i32>(0) == i + 1)
            }
        });
        let pipelined_ok = join_all(queries)
            .await
            .into_iter()
            .filter(|result| matches!(result, Ok(true)))
            .count();

        let big_row: String = client
            .query_one(&format!("SELECT repeat('x', {BIG_VALUE})"), &[])
            .await?
            .get(0);
        let big_param = "y".repeat(BIG_VALUE);
        let param_length: i32 = client
            .query_one("SELECT length($1::text)", &[&big_param])
            .await?
            .get(0);
        // A Bind over the gateway's hold limit with a binary result: the card number must come
        // back masked like one bound by a small Bind.
        let big_bind_card: i64 = client
            .query_one(
                "SELECT 4111111111111111::int8 WHERE length($1::text) > 0",
                &[&big_param],
            )
            .await?
            .get(0);

        let sink = client.copy_in("COPY driver_copy FROM STDIN").await?;
        futures_util::pin_mut!(sink);
        let line_count_per_chunk = 16 * 1024;
        let mut chunk = String::new();
        let mut sent_bytes = 0usize;
        let mut sent_rows = 0u64;
        while sent_bytes < copy_mib * 1024 * 1024 {
            chunk.clear();
            for _ in 0..line_count_per_chunk {
                chunk.push_str(&format!("{sent_rows}\trow {sent_rows} of the copy test\n"));
                sent_rows += 1;
            }
            sent_bytes += chunk.len();
            sink.send(bytes::Bytes::from(chunk.clone())).await?;
        }
        let copied_in = sink.finish().await?;

        let stream = client.copy_out("COPY driver_copy TO STDOUT").await?;
        futures_util::pin_mut!(stream);
        let mut copied_out_bytes = 0usize;
        while let Some(data) = stream.next().await {
            copied_out_bytes += data?.len();
        }

        drop(client);
        let _ = connection.await;
        println!(
            "{}",
            json!({
                "prepared_rows": prepared_rows,
                "pipelined_ok": pipelined_ok,
                "big_row_len": big_row.len(),
                "big_row_all_x": big_row.bytes().all(|b| b == b'x'),
                "param_length": param_length,
                "big_bind_card": big_bind_card,
                "copied_in_rows": copied_in,
                "sent_rows": sent_rows,
                "sent_bytes": sent_bytes,
                "copied_out_bytes": copied_out_bytes,
            })
        );
        Ok(())
    }
}
