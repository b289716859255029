//! `pods/exec` and `pods/portforward`. Commands run, and forwarded ports are reached, in the
//! server's own network namespace, so the pod in the URL only has to exist.
//!
//! Exec is served over WebSocket, with `v5.channel.k8s.io` or `v4.channel.k8s.io`. Each
//! binary message starts with its channel: 0 stdin, 1 stdout, 2 stderr, 3 status, 4 resize,
//! and in v5 255 closes a channel. Exec is also served over SPDY/3.1, where
//! `X-Stream-Protocol-Version` is v5 or v4 and each channel is a stream named by its
//! `streamType` header. The status channel carries a `Status` whose `NonZeroExitCode`
//! cause gives kubectl the exit code.
//!
//! Port-forward is served over SPDY (`portforward.k8s.io`: an `error` and a `data` stream
//! per connection, paired by `requestID`) and over WebSocket with the SPDY stream tunneled
//! inside (`SPDY/3.1+portforward.k8s.io`, what kubectl 1.32 uses by default).
//!
//! A WebSocket upgrade the server cannot serve gets a plain 400 `Status`, never 101, so
//! kubectl falls back to SPDY.

use std::{collections::HashMap, sync::Arc, time::Duration};

use bytes::Bytes;
use futures_util::{SinkExt as _, StreamExt as _};
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Empty};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _},
    sync::{Mutex, mpsc},
};
use tokio_tungstenite::{
    WebSocketStream,
    tungstenite::{
        Message,
        handshake::derive_accept_key,
        protocol::{CloseFrame, Role, frame::coding::CloseCode},
    },
};

use super::{
    ApiServer,
    api::{Body, Query, RequestInfo},
    spdy::{FLAG_FIN, Frame, FrameReader, FrameWriter},
    status::ApiError,
    store,
};

/// How long the server waits for the client to open the streams it announced, the real
/// server's default stream creation timeout.
const STREAM_CREATION_TIMEOUT: Duration = Duration::from_secs(30);
/// Read size for process output and forwarded connections.
const CHUNK: usize = 32 * 1024;

const WS_EXEC_PROTOCOLS: &[&str] = &["v5.channel.k8s.io", "v4.channel.k8s.io"];
const SPDY_EXEC_PROTOCOLS: &[&str] = &["v5.channel.k8s.io", "v4.channel.k8s.io"];
const WS_PORT_FORWARD_PROTOCOL: &str = "SPDY/3.1+portforward.k8s.io";
const SPDY_PORT_FORWARD_PROTOCOL: &str = "portforward.k8s.io";

const CHANNEL_STDIN: u8 = 0;
const CHANNEL_STDOUT: u8 = 1;
const CHANNEL_STDERR: u8 = 2;
const CHANNEL_STATUS: u8 = 3;
const CHANNEL_RESIZE: u8 = 4;
const CHANNEL_CLOSE: u8 = 255;

/// The exec parameters of the query.
#[derive(Clone, Debug)]
struct ExecOptions {
    command: Vec<String>,
    stdin: bool,
    stdout: bool,
    stderr: bool,
    tty: bool,
}

fn exec_options(query: &Query, pod: &Value, pod_name: &str) -> Result<ExecOptions, ApiError> {
    let options = ExecOptions {
        command: query.all("command"),
        stdin: query.flag("stdin")?,
        stdout: query.flag("stdout")?,
        stderr: query.flag("stderr")?,
        tty: query.flag("tty")?,
    };
    if options.command.is_empty() {
        return Err(ApiError::bad_request(
            "you must specify at least 1 command".to_string(),
        ));
    }
    if !(options.stdin || options.stdout || options.stderr) {
        return Err(ApiError::bad_request(
            "you must specify at least one of stdin, stdout, stderr".to_string(),
        ));
    }
    check_container(query, pod, pod_name)?;
    Ok(options)
}

fn check_container(query: &Query, pod: &Value, pod_name: &str) -> Result<(), ApiError> {
    let Some(container) = query.get("container").filter(|name| !name.is_empty()) else {
        return Ok(());
    };
    let known = pod
        .pointer("/spec/containers")
        .and_then(Value::as_array)
        .is_some_and(|containers| {
            containers
                .iter()
                .any(|c| c.get("name").and_then(Value::as_str) == Some(container))
        });
    if known {
        Ok(())
    } else {
        Err(ApiError::bad_request(format!(
            "container {container} is not valid for pod {pod_name}"
        )))
    }
}

/// The upgrade a request names.
enum Upgrade {
    WebSocket { key: String, offered: Vec<String> },
    Spdy { offered: Vec<String> },
}

fn header_values(headers: &HeaderMap, name: &str) -> Vec<String> {
    headers
        .get_all(name)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|text| text.split(','))
        .map(|part| part.trim().to_string())
        .filter(|part| !part.is_empty())
        .collect()
}

fn requested_upgrade(request: &Request<Incoming>) -> Result<Upgrade, ApiError> {
    let headers = request.headers();
    let upgrade = header_values(headers, "upgrade");
    let connection_upgrade = header_values(headers, "connection")
        .iter()
        .any(|value| value.eq_ignore_ascii_case("upgrade"));
    if request.version() != http::Version::HTTP_11 || !connection_upgrade {
        return Err(ApiError::bad_request(
            "Upgrade request required: exec and port-forward need an HTTP/1.1 upgrade to WebSocket or SPDY/3.1".to_string(),
        ));
    }
    if upgrade
        .iter()
        .any(|value| value.eq_ignore_ascii_case("websocket"))
    {
        let key = headers
            .get("sec-websocket-key")
            .and_then(|value| value.to_str().ok())
            .ok_or_else(|| ApiError::bad_request("missing Sec-WebSocket-Key".to_string()))?
            .to_string();
        if headers
            .get("sec-websocket-version")
            .and_then(|value| value.to_str().ok())
            != Some("13")
        {
            return Err(ApiError::bad_request(
                "unsupported Sec-WebSocket-Version: only 13 is served".to_string(),
            ));
        }
        return Ok(Upgrade::WebSocket {
            key,
            offered: header_values(headers, "sec-websocket-protocol"),
        });
    }
    if upgrade
        .iter()
        .any(|value| value.eq_ignore_ascii_case("SPDY/3.1"))
    {
        return Ok(Upgrade::Spdy {
            offered: header_values(headers, "x-stream-protocol-version"),
        });
    }
    Err(ApiError::bad_request(format!(
        "unsupported upgrade {upgrade:?}: expected websocket or SPDY/3.1"
    )))
}

/// Picks the first protocol of the client's list that the server serves.
fn choose(offered: &[String], served: &[&'static str]) -> Option<&'static str> {
    offered
        .iter()
        .find_map(|protocol| served.iter().find(|s| **s == protocol.as_str()).copied())
}

fn switching(headers: &[(&str, String)]) -> Response<Body> {
    let mut response = Response::builder().status(StatusCode::SWITCHING_PROTOCOLS);
    for (name, value) in headers {
        response = response.header(*name, value);
    }
    response
        .body(Empty::new().boxed())
        .expect("upgrade headers are valid")
}

fn existing_pod(server: &ApiServer, info: &RequestInfo) -> Result<(Value, String), ApiError> {
    let pods = store::resource("pods").expect("pods is served");
    let name = info.name.clone().unwrap_or_default();
    let pod = server
        .store
        .get(pods, info.namespace.as_deref().unwrap_or_default(), &name)?;
    if pod.pointer("/status/phase").and_then(Value::as_str) != Some("Running") {
        return Err(ApiError::bad_request(format!("pod {name} is not running")));
    }
    Ok((pod, name))
}

pub async fn handle_exec(
    server: Arc<ApiServer>,
    mut request: Request<Incoming>,
    info: &RequestInfo,
    query: &Query,
) -> Result<Response<Body>, ApiError> {
    let (pod, pod_name) = existing_pod(&server, info)?;
    let options = exec_options(query, &pod, &pod_name)?;
    let upgrade = requested_upgrade(&request)?;
    let on_upgrade = hyper::upgrade::on(&mut request);
    tracing::info!(pod = %pod_name, command = ?options.command, tty = options.tty, "exec");

    match upgrade {
        Upgrade::WebSocket { key, offered } => {
            let protocol = choose(&offered, WS_EXEC_PROTOCOLS).ok_or_else(|| {
                ApiError::bad_request(format!(
                    "none of the WebSocket subprotocols {offered:?} is served; expected one of {WS_EXEC_PROTOCOLS:?}"
                ))
            })?;
            tokio::spawn(async move {
                match on_upgrade.await {
                    Ok(upgraded) => {
                        let ws = WebSocketStream::from_raw_socket(
                            TokioIo::new(upgraded),
                            Role::Server,
                            None,
                        )
                        .await;
                        websocket_exec(ws, protocol == "v5.channel.k8s.io", options).await;
                    }
                    Err(error) => tracing::info!(error = %error, "exec upgrade failed"),
                }
            });
            Ok(switching(&[
                ("connection", "Upgrade".to_string()),
                ("upgrade", "websocket".to_string()),
                ("sec-websocket-accept", derive_accept_key(key.as_bytes())),
                ("sec-websocket-protocol", protocol.to_string()),
            ]))
        }
        Upgrade::Spdy { offered } => {
            let protocol = choose(&offered, SPDY_EXEC_PROTOCOLS).ok_or_else(|| {
                ApiError::bad_request(format!(
                    "none of the stream protocols {offered:?} is served; expected one of {SPDY_EXEC_PROTOCOLS:?}"
                ))
            })?;
            tokio::spawn(async move {
                match on_upgrade.await {
                    Ok(upgraded) => {
                        let (read, write) = tokio::io::split(TokioIo::new(upgraded));
                        if let Err(error) = spdy_exec(read, write, options).await {
                            tracing::info!(error = %error, "SPDY exec session failed");
                        }
                    }
                    Err(error) => tracing::info!(error = %error, "exec upgrade failed"),
                }
            });
            Ok(switching(&[
                ("connection", "Upgrade".to_string()),
                ("upgrade", "SPDY/3.1".to_string()),
                ("x-stream-protocol-version", protocol.to_string()),
            ]))
        }
    }
}

pub async fn handle_port_forward(
    server: Arc<ApiServer>,
    mut request: Request<Incoming>,
    info: &RequestInfo,
    _query: &Query,
) -> Result<Response<Body>, ApiError> {
    let (_pod, pod_name) = existing_pod(&server, info)?;
    let upgrade = requested_upgrade(&request)?;
    let on_upgrade = hyper::upgrade::on(&mut request);
    tracing::info!(pod = %pod_name, "port-forward");

    match upgrade {
        Upgrade::WebSocket { key, offered } => {
            // NOTE: the older WebSocket port-forward protocol (`v4.channel.k8s.io` with a
            // `ports` query) is not served; kubectl 1.32 tunnels SPDY instead.
            if !offered.iter().any(|p| p == WS_PORT_FORWARD_PROTOCOL) {
                return Err(ApiError::bad_request(format!(
                    "none of the WebSocket subprotocols {offered:?} is served; expected {WS_PORT_FORWARD_PROTOCOL}"
                )));
            }
            tokio::spawn(async move {
                match on_upgrade.await {
                    Ok(upgraded) => {
                        let ws = WebSocketStream::from_raw_socket(
                            TokioIo::new(upgraded),
                            Role::Server,
                            None,
                        )
                        .await;
                        let tunnel = websocket_tunnel(ws);
                        let (read, write) = tokio::io::split(tunnel);
                        if let Err(error) = spdy_port_forward(read, write).await {
                            tracing::info!(error = %error, "port-forward session failed");
                        }
                    }
                    Err(error) => tracing::info!(error = %error, "port-forward upgrade failed"),
                }
            });
            Ok(switching(&[
                ("connection", "Upgrade".to_string()),
                ("upgrade", "websocket".to_string()),
                ("sec-websocket-accept", derive_accept_key(key.as_bytes())),
                (
                    "sec-websocket-protocol",
                    WS_PORT_FORWARD_PROTOCOL.to_string(),
                ),
            ]))
        }
        Upgrade::Spdy { offered } => {
            if !offered.iter().any(|p| p == SPDY_PORT_FORWARD_PROTOCOL) {
                return Err(ApiError::bad_request(format!(
                    "none of the stream protocols {offered:?} is served; expected {SPDY_PORT_FORWARD_PROTOCOL}"
                )));
            }
            tokio::spawn(async move {
                match on_upgrade.await {
                    Ok(upgraded) => {
                        let (read, write) = tokio::io::split(TokioIo::new(upgraded));
                        if let Err(error) = spdy_port_forward(read, write).await {
                            tracing::info!(error = %error, "port-forward session failed");
                        }
                    }
                    Err(error) => tracing::info!(error = %error, "port-forward upgrade failed"),
                }
            });
            Ok(switching(&[
                ("connection", "Upgrade".to_string()),
                ("upgrade", "SPDY/3.1".to_string()),
                (
                    "x-stream-protocol-version",
                    SPDY_PORT_FORWARD_PROTOCOL.to_string(),
                ),
            ]))
        }
    }
}

/// Input to a running command.
#[derive(Debug)]
enum Input {
    Stdin(Bytes),
    StdinEnd,
    Resize { width: u16, height: u16 },
}

/// Output of a running command, by channel.
#[derive(Debug)]
struct Output {
    channel: u8,
    data: Bytes,
}

/// Parses the resize messages of the resize channel: JSON `{"Width":W,"Height":H}`
/// objects, one or more back to back.
fn parse_resizes(data: &[u8]) -> Vec<Input> {
    serde_json::Deserializer::from_slice(data)
        .into_iter::<Value>()
        .filter_map(Result::ok)
        .filter_map(|value| {
            Some(Input::Resize {
                width: u16::try_from(value.get("Width")?.as_u64()?).ok()?,
                height: u16::try_from(value.get("Height")?.as_u64()?).ok()?,
            })
        })
        .collect()
}

/// Builds the final `Status` of an exec, as the status channel carries it.
fn exit_status(result: std::io::Result<std::process::ExitStatus>, command: &[String]) -> Value {
    use std::os::unix::process::ExitStatusExt as _;
    let status = match result {
        Ok(status) => status,
        Err(error) => {
            return json!({
                "metadata": {},
                "status": "Failure",
                "message": format!("Internal error occurred: error executing command in container: failed to exec {command:?}: {error}"),
                "reason": "InternalError",
                "details": {"causes": [{"message": error.to_string()}]},
                "code": 500,
            });
        }
    };
    let code = status
        .code()
        .or_else(|| status.signal().map(|signal| 128 + signal))
        .unwrap_or(1);
    if code == 0 {
        return json!({"metadata": {}, "status": "Success"});
    }
    json!({
        "metadata": {},
        "status": "Failure",
        "message": format!("command terminated with non-zero exit code: error executing command {command:?}, exit code {code}"),
        "reason": "NonZeroExitCode",
        "details": {"causes": [{"reason": "ExitCode", "message": code.to_string()}]},
    })
}

/// Runs the command with its standard streams wired to `input` and `output`, and returns its
/// final `Status` once it has exited and all its output was handed on.
async fn run_command(
    options: ExecOptions,
    input: mpsc::Receiver<Input>,
    output: mpsc::Sender<Output>,
) -> Value {
    if options.tty {
        return run_in_terminal(options, input, output).await;
    }
    let piped = |wanted: bool| {
        if wanted {
            std::process::Stdio::piped()
        } else {
            std::process::Stdio::null()
        }
    };
    let mut command = tokio::process::Command::new(&options.command[0]);
    command
        .args(&options.command[1..])
        .stdin(piped(options.stdin))
        .stdout(piped(options.stdout))
        .stderr(piped(options.stderr))
        .kill_on_drop(true);
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(error) => return exit_status(Err(error), &options.command),
    };

    let stdin = child.stdin.take();
    let input_task = tokio::spawn(feed_input(input, stdin, None));
    let mut readers = Vec::new();
    if let Some(pipe) = child.stdout.take() {
        readers.push(tokio::spawn(pump_output(
            pipe,
            CHANNEL_STDOUT,
            output.clone(),
        )));
    }
    if let Some(pipe) = child.stderr.take() {
        readers.push(tokio::spawn(pump_output(
            pipe,
            CHANNEL_STDERR,
            output.clone(),
        )));
    }
    drop(output);

    let result = child.wait().await;
    for reader in readers {
        let _ = reader.await;
    }
    input_task.abort();
    exit_status(result, &options.command)
}

/// Runs the command on a new pseudo-terminal as its session leader: the terminal is its
/// stdin, stdout and stderr, its output goes to the stdout channel, and resize messages set
/// the terminal's window size.
async fn run_in_terminal(
    options: ExecOptions,
    input: mpsc::Receiver<Input>,
    output: mpsc::Sender<Output>,
) -> Value {
    let spawned = (|| -> std::io::Result<_> {
        let (controller, terminal) = crate::sys::open_pty()?;
        let mut command = std::process::Command::new(&options.command[0]);
        command
            .args(&options.command[1..])
            .env("TERM", "xterm")
            .stdin(terminal.try_clone()?)
            .stdout(terminal.try_clone()?)
            .stderr(terminal);
        crate::sys::pre_exec(&mut command, crate::sys::become_terminal_session_leader);
        let mut command = tokio::process::Command::from(command);
        command.kill_on_drop(true);
        let child = command.spawn()?;
        // The command (and with it the parent's copies of the terminal) is dropped here, so
        // reads from the controller end with an error once the child's side closes.
        Ok((child, controller))
    })();
    let (mut child, controller) = match spawned {
        Ok(spawned) => spawned,
        Err(error) => return exit_status(Err(error), &options.command),
    };

    let resize_handle = controller.try_clone();
    let writer = controller
        .try_clone()
        .map(|fd| tokio::fs::File::from_std(std::fs::File::from(fd)));
    let reader = tokio::fs::File::from_std(std::fs::File::from(controller));
    let input_task = tokio::spawn(feed_input(input, writer.ok(), resize_handle.ok()));
    let output_task = tokio::spawn(pump_output(reader, CHANNEL_STDOUT, output));

    let result = child.wait().await;
    let _ = output_task.await;
    input_task.abort();
    exit_status(result, &options.command)
}

/// Writes stdin data to the command until the client closes stdin, and applies resizes to
/// `terminal` when the command runs on one.
async fn feed_input(
    mut input: mpsc::Receiver<Input>,
    mut stdin: Option<impl AsyncWrite + Unpin>,
    terminal: Option<std::os::fd::OwnedFd>,
) {
    use std::os::fd::AsFd as _;
    while let Some(message) = input.recv().await {
        match message {
            Input::Stdin(data) => {
                if let Some(pipe) = stdin.as_mut()
                    && (pipe.write_all(&data).await.is_err() || pipe.flush().await.is_err())
                {
                    stdin = None;
                }
            }
            Input::StdinEnd => stdin = None,
            Input::Resize { width, height } => {
                if let Some(terminal) = &terminal
                    && let Err(error) = crate::sys::set_window_size(terminal.as_fd(), width, height)
                {
                    tracing::info!(error = %error, "terminal resize failed");
                }
            }
        }
    }
}

async fn pump_output(mut pipe: impl AsyncRead + Unpin, channel: u8, output: mpsc::Sender<Output>) {
    let mut buffer = vec![0u8; CHUNK];
    loop {
        match pipe.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(read) => {
                let data = Bytes::copy_from_slice(&buffer[..read]);
                if output.send(Output { channel, data }).await.is_err() {
                    return;
                }
            }
        }
    }
}

async fn websocket_exec<S>(ws: WebSocketStream<S>, v5: bool, options: ExecOptions)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sink, mut stream) = ws.split();
    let (input_tx, input_rx) = mpsc::channel(64);
    let (output_tx, mut output_rx) = mpsc::channel(64);

    let reader = tokio::spawn(async move {
        while let Some(Ok(message)) = stream.next().await {
            let data = match message {
                Message::Binary(data) => data,
                Message::Close(_) => break,
                _ => continue,
            };
            let Some((&channel, payload)) = data.split_first() else {
                continue;
            };
            let inputs = match channel {
                CHANNEL_STDIN => vec![Input::Stdin(Bytes::copy_from_slice(payload))],
                CHANNEL_RESIZE => parse_resizes(payload),
                CHANNEL_CLOSE if v5 && payload.first() == Some(&CHANNEL_STDIN) => {
                    vec![Input::StdinEnd]
                }
                _ => Vec::new(),
            };
            for input in inputs {
                if input_tx.send(input).await.is_err() {
                    return;
                }
            }
        }
        let _ = input_tx.send(Input::StdinEnd).await;
    });

    let command = options.command.clone();
    let runner = tokio::spawn(run_command(options, input_rx, output_tx));
    while let Some(Output { channel, data }) = output_rx.recv().await {
        let mut message = Vec::with_capacity(1 + data.len());
        message.push(channel);
        message.extend_from_slice(&data);
        if sink.send(Message::Binary(message.into())).await.is_err() {
            break;
        }
    }
    let status = runner
        .await
        .unwrap_or_else(|error| exit_status(Err(std::io::Error::other(error)), &command));
    let mut message = vec![CHANNEL_STATUS];
    message.extend_from_slice(&serde_json::to_vec(&status).expect("JSON values serialize"));
    let _ = sink.send(Message::Binary(message.into())).await;
    // gorilla/websocket, under kubectl, reports a close without a status code as an error.
    let _ = sink.send(normal_close()).await;
    reader.abort();
}

fn normal_close() -> Message {
    Message::Close(Some(CloseFrame {
        code: CloseCode::Normal,
        reason: "".into(),
    }))
}

type SharedWriter<W> = Arc<Mutex<FrameWriter<W>>>;

/// Stream ids of an exec session, by `streamType`.
#[derive(Debug, Default)]
struct ExecStreams {
    error: Option<u32>,
    stdin: Option<u32>,
    stdout: Option<u32>,
    stderr: Option<u32>,
    resize: Option<u32>,
}

impl ExecStreams {
    fn complete(&self, options: &ExecOptions) -> bool {
        self.error.is_some()
            && (!options.stdin || self.stdin.is_some())
            && (!options.stdout || self.stdout.is_some())
            && (!options.stderr || options.tty || self.stderr.is_some())
            && (!options.tty || self.resize.is_some())
    }
}

fn stream_type(headers: &[(String, String)]) -> Option<&str> {
    headers
        .iter()
        .find(|(name, _)| name == "streamtype")
        .map(|(_, value)| value.as_str())
}

async fn spdy_exec<R, W>(read: R, write: W, options: ExecOptions) -> std::io::Result<()>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let mut reader = FrameReader::new(read);
    let writer: SharedWriter<W> = Arc::new(Mutex::new(FrameWriter::new(write)));
    let mut streams = ExecStreams::default();
    let mut last_stream = 0;

    // Accept streams until every one the query announced is open.
    let deadline = tokio::time::Instant::now() + STREAM_CREATION_TIMEOUT;
    while !streams.complete(&options) {
        let frame = tokio::time::timeout_at(deadline, reader.read_frame())
            .await
            .map_err(|_| std::io::Error::other("timed out waiting for the client's streams"))??;
        match frame {
            None => return Ok(()),
            Some(Frame::SynStream {
                stream_id, headers, ..
            }) => {
                last_stream = stream_id;
                writer.lock().await.syn_reply(stream_id, &[]).await?;
                let slot = match stream_type(&headers) {
                    Some("error") => &mut streams.error,
                    Some("stdin") => &mut streams.stdin,
                    Some("stdout") => &mut streams.stdout,
                    Some("stderr") => &mut streams.stderr,
                    Some("resize") => &mut streams.resize,
                    other => {
                        tracing::info!(stream_type = ?other, "unexpected SPDY stream type");
                        continue;
                    }
                };
                *slot = Some(stream_id);
            }
            Some(Frame::Ping { id }) => writer.lock().await.ping(id).await?,
            Some(Frame::GoAway) => return Ok(()),
            Some(_) => {}
        }
    }

    let (input_tx, input_rx) = mpsc::channel(64);
    let (output_tx, mut output_rx) = mpsc::channel(64);
    let stdin_stream = streams.stdin;
    let resize_stream = streams.resize;
    let ping_writer = writer.clone();
    let frame_reader = tokio::spawn(async move {
        while let Ok(Some(frame)) = reader.read_frame().await {
            let inputs = match frame {
                Frame::Data {
                    stream_id,
                    flags,
                    data,
                } if Some(stream_id) == stdin_stream => {
                    let mut inputs = Vec::new();
                    if !data.is_empty() {
                        inputs.push(Input::Stdin(data));
                    }
                    if flags & FLAG_FIN != 0 {
                        inputs.push(Input::StdinEnd);
                    }
                    inputs
                }
                Frame::Data {
                    stream_id, data, ..
                } if Some(stream_id) == resize_stream => parse_resizes(&data),
                Frame::RstStream { stream_id } if Some(stream_id) == stdin_stream => {
                    vec![Input::StdinEnd]
                }
                Frame::Ping { id } => {
                    let _ = ping_writer.lock().await.ping(id).await;
                    Vec::new()
                }
                Frame::GoAway => break,
                _ => Vec::new(),
            };
            for input in inputs {
                if input_tx.send(input).await.is_err() {
                    return;
                }
            }
        }
        let _ = input_tx.send(Input::StdinEnd).await;
    });

    let command = options.command.clone();
    let runner = tokio::spawn(run_command(options, input_rx, output_tx));
    while let Some(Output { channel, data }) = output_rx.recv().await {
        let stream = if channel == CHANNEL_STDOUT {
            streams.stdout
        } else {
            streams.stderr
        };
        if let Some(stream) = stream {
            writer.lock().await.data(stream, &data, false).await?;
        }
    }
    let status = runner
        .await
        .unwrap_or_else(|error| exit_status(Err(std::io::Error::other(error)), &command));

    let mut writer = writer.lock().await;
    for stream in [streams.stdout, streams.stderr].into_iter().flatten() {
        writer.data(stream, &[], true).await?;
    }
    if let Some(error_stream) = streams.error {
        let body = serde_json::to_vec(&status).expect("JSON values serialize");
        writer.data(error_stream, &body, true).await?;
    }
    writer.go_away(last_stream).await?;
    writer.shutdown().await?;
    frame_reader.abort();
    Ok(())
}

/// Carries a byte stream in the binary messages of a WebSocket, as kubectl's tunneling
/// transport does for port-forward: each message is the next piece of the stream.
fn websocket_tunnel<S>(ws: WebSocketStream<S>) -> tokio::io::DuplexStream
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (ours, theirs) = tokio::io::duplex(256 * 1024);
    let (mut from_spdy, mut to_spdy) = tokio::io::split(theirs);
    let (mut sink, mut stream) = ws.split();
    tokio::spawn(async move {
        while let Some(Ok(message)) = stream.next().await {
            let data = match message {
                Message::Binary(data) => data,
                Message::Close(_) => break,
                _ => continue,
            };
            if to_spdy.write_all(&data).await.is_err() {
                break;
            }
        }
        let _ = to_spdy.shutdown().await;
    });
    tokio::spawn(async move {
        let mut buffer = vec![0u8; CHUNK];
        loop {
            match from_spdy.read(&mut buffer).await {
                Ok(0) | Err(_) => break,
                Ok(read) => {
                    let message = Message::Binary(Bytes::copy_from_slice(&buffer[..read]));
                    if sink.send(message).await.is_err() {
                        return;
                    }
                }
            }
        }
        let _ = sink.send(normal_close()).await;
    });
    ours
}

/// One forwarded connection: its streams, once both are open.
#[derive(Debug, Default)]
struct ForwardPair {
    error: Option<u32>,
    data: Option<u32>,
    port: u16,
}

async fn spdy_port_forward<R, W>(read: R, write: W) -> std::io::Result<()>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let mut reader = FrameReader::new(read);
    let writer: SharedWriter<W> = Arc::new(Mutex::new(FrameWriter::new(write)));
    let mut pairs: HashMap<String, ForwardPair> = HashMap::new();
    let mut data_streams: HashMap<u32, mpsc::Sender<Option<Bytes>>> = HashMap::new();

    while let Some(frame) = reader.read_frame().await? {
        match frame {
            Frame::SynStream {
                stream_id, headers, ..
            } => {
                writer.lock().await.syn_reply(stream_id, &[]).await?;
                let header = |name: &str| {
                    headers
                        .iter()
                        .find(|(key, _)| key == name)
                        .map(|(_, value)| value.clone())
                        .unwrap_or_default()
                };
                let request_id = header("requestid");
                let port: u16 = match header("port").parse() {
                    Ok(port) => port,
                    Err(_) => {
                        tracing::info!(port = %header("port"), "port-forward stream with an invalid port");
                        continue;
                    }
                };
                let pair = pairs.entry(request_id.clone()).or_default();
                pair.port = port;
                match stream_type(&headers) {
                    Some("error") => pair.error = Some(stream_id),
                    Some("data") => pair.data = Some(stream_id),
                    other => {
                        tracing::info!(stream_type = ?other, "unexpected port-forward stream type");
                    }
                }
                if let (Some(error), Some(data)) = (pair.error, pair.data) {
                    let port = pair.port;
                    pairs.remove(&request_id);
                    let (sender, receiver) = mpsc::channel(64);
                    data_streams.insert(data, sender);
                    tokio::spawn(forward_connection(
                        writer.clone(),
                        port,
                        error,
                        data,
                        receiver,
                    ));
                }
            }
            Frame::Data {
                stream_id,
                flags,
                data,
            } => {
                if let Some(sender) = data_streams.get(&stream_id) {
                    if !data.is_empty() {
                        let _ = sender.send(Some(data)).await;
                    }
                    if flags & FLAG_FIN != 0 {
                        let _ = sender.send(None).await;
                        data_streams.remove(&stream_id);
                    }
                }
            }
            Frame::RstStream { stream_id } => {
                if let Some(sender) = data_streams.remove(&stream_id) {
                    let _ = sender.send(None).await;
                }
            }
            Frame::Ping { id } => writer.lock().await.ping(id).await?,
            Frame::GoAway => break,
            Frame::Ignored => {}
        }
    }
    Ok(())
}

/// Connects to `port` on the loopback and copies both ways between it and the data stream.
/// A failed connect is reported on the error stream, as the kubelet reports it.
async fn forward_connection<W>(
    writer: SharedWriter<W>,
    port: u16,
    error_stream: u32,
    data_stream: u32,
    mut from_client: mpsc::Receiver<Option<Bytes>>,
) where
    W: AsyncWrite + Unpin + Send + 'static,
{
    let connection = match tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
        Ok(connection) => connection,
        Err(error) => {
            let message = format!(
                "error forwarding port {port} to pod: failed to connect to localhost:{port}: {error}"
            );
            let mut writer = writer.lock().await;
            let _ = writer.data(error_stream, message.as_bytes(), true).await;
            let _ = writer.data(data_stream, &[], true).await;
            return;
        }
    };
    let (mut tcp_read, mut tcp_write) = connection.into_split();
    let upstream = tokio::spawn(async move {
        while let Some(Some(data)) = from_client.recv().await {
            if tcp_write.write_all(&data).await.is_err() {
                return;
            }
        }
        let _ = tcp_write.shutdown().await;
    });
    let mut buffer = vec![0u8; CHUNK];
    loop {
        match tcp_read.read(&mut buffer).await {
            Ok(0) | Err(_) => break,
            Ok(read) => {
                if writer
                    .lock()
                    .await
                    .data(data_stream, &buffer[..read], false)
                    .await
                    .is_err()
                {
                    upstream.abort();
                    return;
                }
            }
        }
    }
    let mut writer = writer.lock().await;
    let _ = writer.data(data_stream, &[], true).await;
    let _ = writer.data(error_stream, &[], true).await;
    drop(writer);
    let _ = upstream.await;
}
