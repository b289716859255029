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
//! - `hold --connect ADDR --count N`: opens N idle connections, prints `ready`, and holds them
//!   until its standard input closes.

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
    }
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
