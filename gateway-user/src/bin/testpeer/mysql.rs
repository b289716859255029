//! `mysql-raw`: a raw MySQL client for protocol tests. It logs in without a password (an
//! account with none, so no hashing is needed), runs one scenario and prints one JSON object
//! with what the server sent. It writes packets itself, so tests can choose exact payload
//! sizes and send malformed input.

use std::{
    io::{Read as _, Write as _},
    net::{Shutdown, SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use serde_json::{Value, json};

const MAX_PACKET_LEN: usize = 0xff_ffff;

const CLIENT_LONG_FLAG: u32 = 1 << 2;
const CLIENT_CONNECT_WITH_DB: u32 = 1 << 3;
const CLIENT_PROTOCOL_41: u32 = 1 << 9;
const CLIENT_TRANSACTIONS: u32 = 1 << 13;
const CLIENT_SECURE_CONNECTION: u32 = 1 << 15;
const CLIENT_MULTI_STATEMENTS: u32 = 1 << 16;
const CLIENT_MULTI_RESULTS: u32 = 1 << 17;
const CLIENT_PS_MULTI_RESULTS: u32 = 1 << 18;
const CLIENT_PLUGIN_AUTH: u32 = 1 << 19;
const CLIENT_DEPRECATE_EOF: u32 = 1 << 24;
const SERVER_MORE_RESULTS_EXISTS: u16 = 0x0008;

const COM_QUERY: u8 = 0x03;
const COM_STMT_PREPARE: u8 = 0x16;
const COM_STMT_EXECUTE: u8 = 0x17;
const COM_STMT_SEND_LONG_DATA: u8 = 0x18;
const COM_STMT_CLOSE: u8 = 0x19;
const COM_QUIT: u8 = 0x01;
/// `MYSQL_TYPE_VAR_STRING`, `MYSQL_TYPE_BLOB`, `MYSQL_TYPE_LONGLONG` and `MYSQL_TYPE_LONG`.
const TYPE_VAR_STRING: u8 = 253;
const TYPE_BLOB: u8 = 252;
const TYPE_LONGLONG: u8 = 8;
const TYPE_LONG: u8 = 3;

/// One packet as it came off the wire.
struct Packet {
    seq: u8,
    body: Vec<u8>,
}

struct Client {
    stream: TcpStream,
    deprecate_eof: bool,
    /// Sizes of every packet read since the last command.
    packet_sizes: Vec<usize>,
    /// Packet sizes of the last row read, for checking continuation framing.
    row_packets: Vec<usize>,
}

/// One result of a command: an OK, an ERR, or a result set.
#[derive(Debug)]
enum Answer {
    Ok {
        affected_rows: u64,
    },
    Err {
        code: u16,
        message: String,
    },
    Rows {
        columns: Vec<(String, u8, u16)>,
        rows: Vec<Vec<Option<Vec<u8>>>>,
    },
}

impl Client {
    fn read_packet(&mut self) -> std::io::Result<Packet> {
        let mut header = [0u8; 4];
        self.stream.read_exact(&mut header)?;
        let len =
            usize::from(header[0]) | usize::from(header[1]) << 8 | usize::from(header[2]) << 16;
        let mut body = vec![0u8; len];
        self.stream.read_exact(&mut body)?;
        self.packet_sizes.push(len);
        Ok(Packet {
            seq: header[3],
            body,
        })
    }

    /// Reads a payload, joining continuation packets.
    fn read_payload(&mut self) -> std::io::Result<Packet> {
        let first = self.read_packet()?;
        let mut body = first.body;
        let mut last = body.len();
        while last == MAX_PACKET_LEN {
            let next = self.read_packet()?;
            last = next.body.len();
            body.extend_from_slice(&next.body);
        }
        Ok(Packet {
            seq: first.seq,
            body,
        })
    }

    fn write_payload(&mut self, seq: u8, payload: &[u8]) -> std::io::Result<u8> {
        let mut seq = seq;
        let mut rest = payload;
        loop {
            let len = rest.len().min(MAX_PACKET_LEN);
            let header = (len as u32).to_le_bytes();
            self.stream
                .write_all(&[header[0], header[1], header[2], seq])?;
            self.stream.write_all(&rest[..len])?;
            rest = &rest[len..];
            if len < MAX_PACKET_LEN {
                return Ok(seq);
            }
            seq = seq.wrapping_add(1);
        }
    }

    fn login(
        addr: SocketAddr,
        user: &str,
        database: &str,
        deprecate_eof: bool,
    ) -> anyhow::Result<Self> {
        let stream = TcpStream::connect(addr)?;
        stream.set_nodelay(true)?;
        let mut client = Self {
            stream,
            deprecate_eof,
            packet_sizes: Vec::new(),
            row_packets: Vec::new(),
        };
        let greeting = client.read_payload()?;
        anyhow::ensure!(
            greeting.body.first() == Some(&10),
            "no protocol 10 greeting"
        );
        let mut caps = CLIENT_LONG_FLAG
            | CLIENT_CONNECT_WITH_DB
            | CLIENT_PROTOCOL_41
            | CLIENT_TRANSACTIONS
            | CLIENT_SECURE_CONNECTION
            | CLIENT_MULTI_STATEMENTS
            | CLIENT_MULTI_RESULTS
            | CLIENT_PS_MULTI_RESULTS
            | CLIENT_PLUGIN_AUTH;
        if deprecate_eof {
            caps |= CLIENT_DEPRECATE_EOF;
        }
        let mut response = caps.to_le_bytes().to_vec();
        response.extend_from_slice(&(1u32 << 30).to_le_bytes());
        response.push(45);
        response.extend_from_slice(&[0; 23]);
        response.extend_from_slice(user.as_bytes());
        response.push(0);
        response.push(0); // empty auth response
        response.extend_from_slice(database.as_bytes());
        response.push(0);
        response.extend_from_slice(b"mysql_native_password\0");
        client.write_payload(1, &response)?;
        loop {
            let reply = client.read_payload()?;
            match reply.body.first() {
                Some(0x00) => return Ok(client),
                Some(0xff) => anyhow::bail!("login failed: {}", err_message(&reply.body)),
                // An auth switch or more data: the account has no password, so the reply is empty.
                _ => {
                    client.write_payload(reply.seq.wrapping_add(1), &[])?;
                }
            }
        }
    }

    fn command(&mut self, payload: &[u8]) -> std::io::Result<()> {
        self.packet_sizes.clear();
        self.write_payload(0, payload)?;
        Ok(())
    }

    fn query(&mut self, sql: &[u8]) -> anyhow::Result<Vec<Answer>> {
        let mut payload = vec![COM_QUERY];
        payload.extend_from_slice(sql);
        self.command(&payload)?;
        self.read_answers(false)
    }

    /// Reads the results chained by `SERVER_MORE_RESULTS_EXISTS`.
    fn read_answers(&mut self, binary: bool) -> anyhow::Result<Vec<Answer>> {
        let mut answers = Vec::new();
        loop {
            let first = self.read_payload()?;
            let (answer, status) = match first.body[0] {
                0x00 => {
                    let mut at = 1;
                    let affected_rows = lenenc(&first.body, &mut at).unwrap_or(0);
                    lenenc(&first.body, &mut at);
                    let status = u16::from_le_bytes([first.body[at], first.body[at + 1]]);
                    (Answer::Ok { affected_rows }, status)
                }
                0xff => {
                    answers.push(Answer::Err {
                        code: u16::from_le_bytes([first.body[1], first.body[2]]),
                        message: err_message(&first.body),
                    });
                    return Ok(answers);
                }
                _ => {
                    let mut at = 0;
                    let count = lenenc(&first.body, &mut at).unwrap_or(0);
                    let mut columns = Vec::new();
                    for _ in 0..count {
                        let definition = self.read_payload()?;
                        columns.push(column(&definition.body));
                    }
                    if !self.deprecate_eof {
                        self.read_payload()?;
                    }
                    let mut rows = Vec::new();
                    let status = loop {
                        let before = self.packet_sizes.len();
                        let row = self.read_payload()?;
                        if row.body[0] == 0xfe && row.body.len() < MAX_PACKET_LEN {
                            let mut at = 1;
                            let status = if self.deprecate_eof {
                                lenenc(&row.body, &mut at);
                                lenenc(&row.body, &mut at);
                                u16::from_le_bytes([row.body[at], row.body[at + 1]])
                            } else {
                                u16::from_le_bytes([row.body[3], row.body[4]])
                            };
                            break status;
                        }
                        if row.body[0] == 0xff {
                            answers.push(Answer::Rows { columns, rows });
                            answers.push(Answer::Err {
                                code: u16::from_le_bytes([row.body[1], row.body[2]]),
                                message: err_message(&row.body),
                            });
                            return Ok(answers);
                        }
                        self.row_packets = self.packet_sizes[before..].to_vec();
                        rows.push(if binary {
                            binary_row(&row.body, &columns)?
                        } else {
                            text_row(&row.body)
                        });
                    };
                    (Answer::Rows { columns, rows }, status)
                }
            };
            answers.push(answer);
            if status & SERVER_MORE_RESULTS_EXISTS == 0 {
                return Ok(answers);
            }
        }
    }

    /// Prepares `sql` and returns the statement id and parameter count.
    fn prepare(&mut self, sql: &str) -> anyhow::Result<Result<(u32, u16), Answer>> {
        let mut payload = vec![COM_STMT_PREPARE];
        payload.extend_from_slice(sql.as_bytes());
        self.command(&payload)?;
        let reply = self.read_payload()?;
        if reply.body[0] == 0xff {
            return Ok(Err(Answer::Err {
                code: u16::from_le_bytes([reply.body[1], reply.body[2]]),
                message: err_message(&reply.body),
            }));
        }
        let id = u32::from_le_bytes(reply.body[1..5].try_into()?);
        let columns = u16::from_le_bytes([reply.body[5], reply.body[6]]);
        let params = u16::from_le_bytes([reply.body[7], reply.body[8]]);
        for count in [params, columns] {
            if count == 0 {
                continue;
            }
            for _ in 0..count {
                self.read_payload()?;
            }
            if !self.deprecate_eof {
                self.read_payload()?;
            }
        }
        Ok(Ok((id, params)))
    }

    /// Executes statement `id` with `params` (type, value; `None` for a parameter sent as
    /// long data). With `bind_types` false the server reuses the previous execute's types.
    fn execute(
        &mut self,
        id: u32,
        params: &[(u8, Option<Vec<u8>>)],
        bind_types: bool,
    ) -> anyhow::Result<Vec<Answer>> {
        let mut payload = vec![COM_STMT_EXECUTE];
        payload.extend_from_slice(&id.to_le_bytes());
        payload.push(0);
        payload.extend_from_slice(&1u32.to_le_bytes());
        if !params.is_empty() {
            payload.extend(std::iter::repeat_n(0u8, params.len().div_ceil(8)));
            payload.push(u8::from(bind_types));
            if bind_types {
                for (column_type, _) in params {
                    payload.extend_from_slice(&[*column_type, 0]);
                }
            }
            for (column_type, value) in params {
                let Some(value) = value else { continue };
                if *column_type == TYPE_LONGLONG {
                    payload.extend_from_slice(value);
                } else {
                    put_lenenc(&mut payload, value.len() as u64);
                    payload.extend_from_slice(value);
                }
            }
        }
        self.command(&payload)?;
        self.read_answers(true)
    }
}

fn err_message(body: &[u8]) -> String {
    let start = if body.get(3) == Some(&b'#') { 9 } else { 3 };
    String::from_utf8_lossy(body.get(start..).unwrap_or_default()).into_owned()
}

fn lenenc(data: &[u8], at: &mut usize) -> Option<u64> {
    let first = *data.get(*at)?;
    *at += 1;
    let width = match first {
        0xfb => return None,
        0xfc => 2,
        0xfd => 3,
        0xfe => 8,
        _ => return Some(u64::from(first)),
    };
    let mut bytes = [0u8; 8];
    bytes[..width].copy_from_slice(data.get(*at..*at + width)?);
    *at += width;
    Some(u64::from_le_bytes(bytes))
}

fn put_lenenc(out: &mut Vec<u8>, value: u64) {
    match value {
        0..=0xfa => out.push(value as u8),
        0xfb..=0xffff => {
            out.push(0xfc);
            out.extend_from_slice(&(value as u16).to_le_bytes());
        }
        0x1_0000..=0xff_ffff => {
            out.push(0xfd);
            out.extend_from_slice(&(value as u32).to_le_bytes()[..3]);
        }
        _ => {
            out.push(0xfe);
            out.extend_from_slice(&value.to_le_bytes());
        }
    }
}

/// Name, type and flags of a column definition.
fn column(body: &[u8]) -> (String, u8, u16) {
    let mut at = 0;
    let mut name = String::new();
    for index in 0..6 {
        let len = lenenc(body, &mut at).unwrap_or(0) as usize;
        if index == 4 {
            name = String::from_utf8_lossy(&body[at..at + len]).into_owned();
        }
        at += len;
    }
    lenenc(body, &mut at);
    at += 6;
    let flags = u16::from_le_bytes([body[at + 1], body[at + 2]]);
    (name, body[at], flags)
}

fn text_row(body: &[u8]) -> Vec<Option<Vec<u8>>> {
    let mut at = 0;
    let mut values = Vec::new();
    while at < body.len() {
        match lenenc(body, &mut at) {
            None => values.push(None),
            Some(len) => {
                let len = len as usize;
                values.push(Some(body[at..at + len].to_vec()));
                at += len;
            }
        }
    }
    values
}

fn binary_row(body: &[u8], columns: &[(String, u8, u16)]) -> anyhow::Result<Vec<Option<Vec<u8>>>> {
    let bitmap_len = (columns.len() + 7 + 2) / 8;
    let mut at = 1 + bitmap_len;
    let mut values = Vec::new();
    for (index, (_, column_type, _)) in columns.iter().enumerate() {
        let bit = index + 2;
        if body[1 + bit / 8] & (1 << (bit % 8)) != 0 {
            values.push(None);
            continue;
        }
        let len = match *column_type {
            1 => 1,
            2 | 13 => 2,
            3 | 4 | 9 => 4,
            5 | 8 => 8,
            7 | 10 | 11 | 12 => {
                let len = usize::from(body[at]);
                at += 1;
                len
            }
            _ => lenenc(body, &mut at).unwrap_or(0) as usize,
        };
        values.push(Some(body[at..at + len].to_vec()));
        at += len;
    }
    Ok(values)
}

/// Converts results to JSON: text values as strings, binary INT and BIGINT values as numbers.
fn answers_json(answers: &[Answer]) -> Value {
    Value::Array(
        answers
            .iter()
            .map(|answer| match answer {
                Answer::Ok { affected_rows } => json!({ "ok": affected_rows }),
                Answer::Err { code, message } => json!({ "error": code, "message": message }),
                Answer::Rows { columns, rows } => {
                    let rows: Vec<Value> = rows
                        .iter()
                        .map(|row| {
                            Value::Array(
                                row.iter()
                                    .zip(columns)
                                    .map(|(value, (_, column_type, flags))| match value {
                                        None => Value::Null,
                                        Some(bytes) if *column_type == TYPE_LONGLONG && bytes.len() == 8 => {
                                            let raw: [u8; 8] = bytes[..].try_into().expect("8 bytes");
                                            if flags & 0x20 != 0 {
                                                json!(u64::from_le_bytes(raw))
                                            } else {
                                                json!(i64::from_le_bytes(raw))
                                            }
                                        }
                                        Some(bytes) if *column_type == TYPE_LONG && bytes.len() == 4 => {
                                            let raw: [u8; 4] = bytes[..].try_into().expect("4 bytes");
                                            json!(i32::from_le_bytes(raw))
                                        }
                                        Some(bytes) if bytes.len() > 256 => {
                                            json!({ "bytes": bytes.len(), "all_x": bytes.iter().all(|&b| b == b'x') })
                                        }
                                        Some(bytes) => Value::String(String::from_utf8_lossy(bytes).into_owned()),
                                    })
                                    .collect(),
                            )
                        })
                        .collect();
                    json!({ "rows": rows })
                }
            })
            .collect(),
    )
}

/// Sends the greeting's answer as given and reports how the connection ends.
fn bad_handshake(addr: SocketAddr, bytes: &[u8], close_write: bool) -> anyhow::Result<Value> {
    let stream = TcpStream::connect(addr)?;
    let mut client = Client {
        stream,
        deprecate_eof: false,
        packet_sizes: Vec::new(),
        row_packets: Vec::new(),
    };
    client.read_payload()?;
    client.stream.write_all(bytes)?;
    if close_write {
        client.stream.shutdown(Shutdown::Write)?;
    }
    client
        .stream
        .set_read_timeout(Some(Duration::from_secs(20)))?;
    let mut rest = Vec::new();
    let closed = match client.stream.read_to_end(&mut rest) {
        Ok(_) => true,
        Err(error) => error.kind() == std::io::ErrorKind::ConnectionReset,
    };
    Ok(json!({ "closed": closed, "bytes_after": rest.len() }))
}

pub fn run(
    addr: SocketAddr,
    user: &str,
    database: &str,
    scenario: &str,
    deprecate_eof: bool,
    seconds: u64,
) -> anyhow::Result<()> {
    let result = match scenario {
        "sizes" => sizes(addr, user, database, deprecate_eof)?,
        "prepared" => prepared(addr, user, database, deprecate_eof)?,
        "results" => {
            let mut client = Client::login(addr, user, database, deprecate_eof)?;
            let call = client.query(b"CALL four_results()")?;
            let after = client.query(b"SELECT 42")?;
            let multi = client.query(b"SELECT 1; SELECT 2, 3; SELECT 'four'")?;
            json!({
                "call": answers_json(&call),
                "after": answers_json(&after),
                "multi": answers_json(&multi),
            })
        }
        "binary-rows" => {
            let mut client = Client::login(addr, user, database, deprecate_eof)?;
            let (id, _) = client
                .prepare("SELECT id, card_text, card_number, note FROM cards ORDER BY id")?
                .map_err(|answer| anyhow::anyhow!("prepare failed: {answer:?}"))?;
            let rows = client.execute(id, &[], true)?;
            json!({ "answers": answers_json(&rows) })
        }
        "denied" => {
            let mut client = Client::login(addr, user, database, deprecate_eof)?;
            let drop = client.query(b"DROP TABLE cards")?;
            let after = client.query(b"SELECT COUNT(*) FROM cards")?;
            let multi = client.query(b"SELECT 1; DROP TABLE cards")?;
            let prepare = match client.prepare("DROP TABLE cards")? {
                Ok(_) => json!("prepared"),
                Err(answer) => answers_json(&[answer]),
            };
            let last = client.query(b"SELECT COUNT(*) FROM cards")?;
            json!({
                "drop": answers_json(&drop),
                "after": answers_json(&after),
                "multi": answers_json(&multi),
                "prepare": prepare,
                "last": answers_json(&last),
            })
        }
        "mode-hidden-drop" => {
            // With ANSI_QUOTES a backslash ends a double-quoted name, so the server runs the
            // DROP that the default mode reads as part of a string. The mysql client would
            // split the text as the server does, but a driver sends it whole.
            let mut client = Client::login(addr, user, database, deprecate_eof)?;
            let set = client.query(b"SET sql_mode = 'ANSI_QUOTES'")?;
            let hidden = client.query(br#"SELECT 1 AS "a\"; DROP TABLE scratch; -- ""#)?;
            json!({ "set": answers_json(&set), "hidden": answers_json(&hidden) })
        }
        "garbage-handshake" => {
            // A packet whose payload is no handshake response: no protocol 4.1 flag.
            bad_handshake(
                addr,
                &[6, 0, 0, 1, b'h', b'e', b'l', b'l', b'o', b'!'],
                false,
            )?
        }
        "too-long" => {
            // A full-size packet header where a handshake response of a few bytes belongs.
            bad_handshake(addr, &[0xff, 0xff, 0xff, 1, 0, 0], false)?
        }
        "eof-mid-packet" => bad_handshake(addr, &[100, 0, 0, 1, 1, 2, 3, 4, 5], true)?,
        "session-commands" => session_commands(addr, user, database, deprecate_eof)?,
        "abandon" => {
            // Requests an 8 MB row, reads the first packet of the result, then resets the connection
            // while the rest is still on its way.
            let mut client = Client::login(addr, user, database, deprecate_eof)?;
            let mut payload = vec![COM_QUERY];
            payload.extend_from_slice(ABANDONED_QUERY.as_bytes());
            client.command(&payload)?;
            let first = client.read_packet()?;
            socket2::SockRef::from(&client.stream).set_linger(Some(Duration::ZERO))?;
            json!({ "first_packet_bytes": first.body.len() })
        }
        "point-select" => point_select(addr, user, database, seconds)?,
        "statement-budget" => {
            // Four clients each start a statement of several 16 MiB packets and stop sending,
            // so the gateway's whole budget for large statements is in use. A 2 MiB query is
            // then rejected, and it runs once the four leave.
            let mut holders = Vec::new();
            for _ in 0..4 {
                let mut holder = Client::login(addr, user, database, deprecate_eof)?;
                let mut start = vec![0xff, 0xff, 0xff, 0, COM_QUERY];
                start.extend_from_slice(&[b' '; 4096]);
                holder.stream.write_all(&start)?;
                holders.push(holder);
            }
            std::thread::sleep(Duration::from_millis(500));
            let mut client = Client::login(addr, user, database, deprecate_eof)?;
            let query = format!("SELECT LENGTH('{}') AS n", "x".repeat(2 * 1024 * 1024));
            let rejected = client.query(query.as_bytes())?;
            drop(holders);
            std::thread::sleep(Duration::from_millis(1000));
            let after = client.query(query.as_bytes())?;
            json!({ "rejected": answers_json(&rejected), "after": answers_json(&after) })
        }
        other => anyhow::bail!("unknown scenario {other:?}"),
    };
    println!("{result}");
    Ok(())
}

/// The query of the `abandon` scenario.
const ABANDONED_QUERY: &str = "SELECT REPEAT('x', 8000000) AS big";

/// Payload sizes of the issue both ways. Client to server: a COM_QUERY whose payload is
/// exactly N bytes. Server to client: a row whose payload is exactly N bytes.
fn sizes(
    addr: SocketAddr,
    user: &str,
    database: &str,
    deprecate_eof: bool,
) -> anyhow::Result<Value> {
    let mut client = Client::login(addr, user, database, deprecate_eof)?;
    let mut results = Vec::new();
    for size in [16_777_214usize, 16_777_215, 16_777_216, 33_554_430] {
        let prefix = b"SELECT LENGTH('";
        let suffix = b"')";
        let filler = size - 1 - prefix.len() - suffix.len();
        let mut sql = prefix.to_vec();
        sql.extend(std::iter::repeat_n(b'x', filler));
        sql.extend_from_slice(suffix);
        let sent = client.query(&sql)?;
        let length = match sent.first() {
            Some(Answer::Rows { rows, .. }) => rows
                .first()
                .and_then(|row| row.first().cloned().flatten())
                .map(|value| String::from_utf8_lossy(&value).into_owned()),
            other => Some(format!("{other:?}")),
        };

        // A text row is the value's length-encoded size, then the value.
        let value_len = if size - 4 < 0x100_0000 {
            size - 4
        } else {
            size - 9
        };
        let received = client.query(format!("SELECT REPEAT('x', {value_len})").as_bytes())?;
        let row_packets = client.row_packets.clone();
        let (row_len, all_x) = match received.first() {
            Some(Answer::Rows { rows, .. }) => {
                let value = rows
                    .first()
                    .and_then(|row| row.first().cloned().flatten())
                    .unwrap_or_default();
                (value.len(), value.iter().all(|&b| b == b'x'))
            }
            _ => (0, false),
        };
        results.push(json!({
            "size": size,
            "query_filler": filler,
            "server_length": length,
            "row_value_len": row_len,
            "row_value_expected": value_len,
            "row_all_x": all_x,
            "row_packets": row_packets,
        }));
    }
    client.command(&[COM_QUIT])?;
    Ok(Value::Array(results))
}

/// A 20 MiB parameter, types kept across executes, and SEND_LONG_DATA in three chunks.
fn prepared(
    addr: SocketAddr,
    user: &str,
    database: &str,
    deprecate_eof: bool,
) -> anyhow::Result<Value> {
    let mut client = Client::login(addr, user, database, deprecate_eof)?;
    let (id, params) = client
        .prepare("SELECT LENGTH(?), ? + 0")?
        .map_err(|answer| anyhow::anyhow!("prepare failed: {answer:?}"))?;
    let big = vec![b'x'; 20 * 1024 * 1024];
    let first = client.execute(
        id,
        &[
            (TYPE_VAR_STRING, Some(big)),
            (TYPE_LONGLONG, Some(7i64.to_le_bytes().to_vec())),
        ],
        true,
    )?;
    // No types this time: the server and the gateway reuse the first execute's.
    let second = client.execute(
        id,
        &[
            (TYPE_VAR_STRING, Some(b"card 4111111111111111".to_vec())),
            (
                TYPE_LONGLONG,
                Some(4_111_111_111_111_111i64.to_le_bytes().to_vec()),
            ),
        ],
        false,
    )?;

    // Parameter 0 in three chunks, 5 MiB, 1 byte and 7 MiB.
    let chunks = [5 * 1024 * 1024, 1, 7 * 1024 * 1024];
    for chunk in chunks {
        let mut payload = vec![COM_STMT_SEND_LONG_DATA];
        payload.extend_from_slice(&id.to_le_bytes());
        payload.extend_from_slice(&0u16.to_le_bytes());
        payload.extend(std::iter::repeat_n(b'y', chunk));
        client.command(&payload)?;
    }
    let long = client.execute(
        id,
        &[
            (TYPE_BLOB, None),
            (TYPE_LONGLONG, Some(1i64.to_le_bytes().to_vec())),
        ],
        true,
    )?;
    client.command(&[
        COM_STMT_CLOSE,
        id as u8,
        (id >> 8) as u8,
        (id >> 16) as u8,
        (id >> 24) as u8,
    ])?;
    let after = client.query(b"SELECT 'still usable'")?;
    Ok(json!({
        "params": params,
        "big": answers_json(&first),
        "reused_types": answers_json(&second),
        "long_data": answers_json(&long),
        "long_data_expected": chunks.iter().sum::<usize>(),
        "after": answers_json(&after),
    }))
}

/// COM_PING, COM_INIT_DB, COM_CHANGE_USER, COM_RESET_CONNECTION and COM_STATISTICS, each
/// followed by a query that shows the session still works.
fn session_commands(
    addr: SocketAddr,
    user: &str,
    database: &str,
    deprecate_eof: bool,
) -> anyhow::Result<Value> {
    let mut client = Client::login(addr, user, database, deprecate_eof)?;
    let mut steps = serde_json::Map::new();
    let mut simple = |client: &mut Client, name: &str, payload: &[u8]| -> anyhow::Result<()> {
        client.command(payload)?;
        let reply = client.read_payload()?;
        let first = reply.body.first().copied().unwrap_or(0);
        steps.insert(
            name.to_string(),
            json!(match first {
                0x00 => "ok".to_string(),
                0xff => format!("error: {}", err_message(&reply.body)),
                _ => format!("{} bytes", reply.body.len()),
            }),
        );
        let check = client.query(b"SELECT DATABASE(), CURRENT_USER()")?;
        steps.insert(format!("{name}_then"), answers_json(&check));
        Ok(())
    };
    simple(&mut client, "ping", &[0x0e])?;
    let mut init_db = vec![0x02];
    init_db.extend_from_slice(b"mysql");
    simple(&mut client, "init_db", &init_db)?;
    simple(&mut client, "statistics", &[0x09])?;
    simple(&mut client, "reset_connection", &[0x1f])?;

    // COM_CHANGE_USER back to `user` on `database`; an auth switch gets an empty answer.
    let mut change = vec![0x11];
    change.extend_from_slice(user.as_bytes());
    change.push(0);
    change.push(0);
    change.extend_from_slice(database.as_bytes());
    change.push(0);
    change.extend_from_slice(&45u16.to_le_bytes());
    change.extend_from_slice(b"mysql_native_password\0");
    client.command(&change)?;
    let outcome = loop {
        let reply = client.read_payload()?;
        match reply.body.first() {
            Some(0x00) => break "ok".to_string(),
            Some(0xff) => break format!("error: {}", err_message(&reply.body)),
            _ => {
                client.write_payload(reply.seq.wrapping_add(1), &[])?;
            }
        }
    };
    steps.insert("change_user".to_string(), json!(outcome));
    let check = client.query(b"SELECT DATABASE(), CURRENT_USER()")?;
    steps.insert("change_user_then".to_string(), answers_json(&check));

    // A second client names a plugin the account does not use, so the server sends an auth
    // switch request, and the client leaves instead of responding.
    let mut leaver = Client::login(addr, user, database, deprecate_eof)?;
    let mut change = vec![0x11];
    change.extend_from_slice(user.as_bytes());
    change.extend_from_slice(&[0, 0]);
    change.extend_from_slice(database.as_bytes());
    change.push(0);
    change.extend_from_slice(&45u16.to_le_bytes());
    change.extend_from_slice(b"client_ed25519\0");
    leaver.command(&change)?;
    let reply = leaver.read_payload()?;
    steps.insert(
        "change_user_left_after".to_string(),
        json!(format!("{:#04x}", reply.body.first().copied().unwrap_or(0))),
    );
    drop(leaver);
    Ok(Value::Object(steps))
}

/// Point selects over 8 connections for `seconds`; prints the total and the rate.
fn point_select(
    addr: SocketAddr,
    user: &str,
    database: &str,
    seconds: u64,
) -> anyhow::Result<Value> {
    const CONNECTIONS: usize = 8;
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let mut workers = Vec::new();
    for worker in 0..CONNECTIONS {
        let user = user.to_string();
        let database = database.to_string();
        workers.push(std::thread::spawn(move || -> anyhow::Result<u64> {
            let mut client = Client::login(addr, &user, &database, true)?;
            let mut done = 0u64;
            while Instant::now() < deadline {
                let key = (done as usize * 7 + worker) % 1000 + 1;
                let answers =
                    client.query(format!("SELECT v FROM kv WHERE k = {key}").as_bytes())?;
                anyhow::ensure!(
                    matches!(answers.first(), Some(Answer::Rows { rows, .. }) if rows.len() == 1),
                    "point select returned no row"
                );
                done += 1;
            }
            client.command(&[COM_QUIT])?;
            Ok(done)
        }));
    }
    let mut total = 0;
    for worker in workers {
        total += worker
            .join()
            .map_err(|_| anyhow::anyhow!("worker panicked"))??;
    }
    let elapsed = started.elapsed().as_secs_f64();
    Ok(json!({ "queries": total, "seconds": elapsed, "qps": total as f64 / elapsed }))
}

/// A scenario run with mysql_async, an ordinary Rust driver: text and binary result rows,
/// cached prepared statements, 20 MiB values both ways, a procedure's result sets, and a denied
/// statement followed by a working one. Prints one JSON object with what each step returned.
pub mod driver {
    use std::net::SocketAddr;

    use mysql_async::{Conn, OptsBuilder, Row, prelude::*};
    use serde_json::{Value, json};

    const BIG: usize = 20 * 1024 * 1024;

    /// Options of `login` beyond the account and the query.
    pub struct LoginOptions<'a> {
        /// Require TLS, trusting this CA certificate.
        pub tls_ca: Option<&'a std::path::Path>,
        /// Account to change to with COM_CHANGE_USER after the query.
        pub change_user: Option<&'a str>,
        /// Let the server switch the client to mysql_clear_password.
        pub enable_cleartext_plugin: bool,
    }

    /// Logs in, runs `query` in text mode and prints `{"rows": [...]}`. A server error prints
    /// `{"error": {"code", "state", "message"}}`, and any other failure `{"failure": "..."}`.
    /// With `change_user`, the connection then changes to that account (same password) and
    /// runs `query` again, and the outcome goes under `"change_user"`. After a failed change,
    /// `"then"` contains the outcome of one more `SELECT 1`.
    pub fn login(
        addr: SocketAddr,
        user: &str,
        password: &str,
        query: &str,
        options: LoginOptions<'_>,
    ) -> anyhow::Result<()> {
        let LoginOptions {
            tls_ca,
            change_user,
            enable_cleartext_plugin,
        } = options;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let mut opts = OptsBuilder::default()
            .ip_or_hostname(addr.ip().to_string())
            .tcp_port(addr.port())
            .user(Some(user))
            .pass(Some(password))
            .prefer_socket(false)
            .enable_cleartext_plugin(enable_cleartext_plugin);
        if let Some(ca) = tls_ca {
            let ssl = mysql_async::SslOpts::default()
                .with_root_certs(vec![ca.to_path_buf().into()])
                .with_disable_built_in_roots(true);
            opts = opts.ssl_opts(ssl);
        }
        let output = runtime.block_on(async {
            let mut conn = match Conn::new(opts).await {
                Ok(conn) => conn,
                Err(error) => return error_json(error),
            };
            let mut output = match conn.query::<Row, _>(query).await {
                Ok(rows) => rows_json(rows),
                Err(error) => return error_json(error),
            };
            if let Some(user) = change_user {
                let change = mysql_async::ChangeUserOpts::default()
                    .with_user(Some(user.to_string()))
                    .with_pass(Some(password.to_string()));
                let after = match conn.change_user(change).await {
                    Ok(()) => match conn.query::<Row, _>(query).await {
                        Ok(rows) => rows_json(rows),
                        Err(error) => error_json(error),
                    },
                    Err(error) => {
                        // Shows whether the connection still runs commands after the failure.
                        let mut failed = error_json(error);
                        failed["then"] = match conn.query::<Row, _>("SELECT 1").await {
                            Ok(rows) => rows_json(rows),
                            Err(error) => error_json(error),
                        };
                        failed
                    }
                };
                output["change_user"] = after;
            }
            let _ = conn.disconnect().await;
            output
        });
        println!("{output}");
        Ok(())
    }

    fn rows_json(rows: Vec<Row>) -> Value {
        let rows: Vec<Vec<Option<String>>> = rows
            .into_iter()
            .map(|row| {
                row.unwrap()
                    .into_iter()
                    .map(|value| match value {
                        mysql_async::Value::NULL => None,
                        mysql_async::Value::Bytes(bytes) => {
                            Some(String::from_utf8_lossy(&bytes).into_owned())
                        }
                        other => Some(other.as_sql(true)),
                    })
                    .collect()
            })
            .collect();
        json!({ "rows": rows })
    }

    fn error_json(error: mysql_async::Error) -> Value {
        match error {
            mysql_async::Error::Server(error) => json!({
                "error": { "code": error.code, "state": error.state, "message": error.message }
            }),
            other => json!({ "failure": other.to_string() }),
        }
    }

    pub fn run(addr: SocketAddr, user: &str, password: &str) -> anyhow::Result<()> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let result = runtime.block_on(scenario(addr, user, password))?;
        println!("{result}");
        Ok(())
    }

    async fn scenario(addr: SocketAddr, user: &str, password: &str) -> anyhow::Result<Value> {
        let opts = OptsBuilder::default()
            .ip_or_hostname(addr.ip().to_string())
            .tcp_port(addr.port())
            .user(Some(user))
            .pass(Some(password))
            .db_name(Some("payments"))
            .prefer_socket(false);
        let mut conn = Conn::new(opts).await?;

        // Text rows carry numbers as text, and a masked number is no longer one.
        let text_rows: Vec<(i32, String, Option<String>, String)> = conn
            .query("SELECT id, card_text, card_number, note FROM cards ORDER BY id")
            .await?;
        let binary_rows: Vec<(i32, String, Option<i64>, String)> = conn
            .exec(
                "SELECT id, card_text, card_number, note FROM cards WHERE id >= ? ORDER BY id",
                (1,),
            )
            .await?;
        // The driver caches the statement, so the second call is an execute alone.
        let mut reused = Vec::new();
        for id in [2, 5] {
            let note: Option<String> = conn
                .exec_first("SELECT note FROM cards WHERE id = ?", (id,))
                .await?;
            reused.push(note);
        }

        let big_param: Option<i64> = conn
            .exec_first("SELECT LENGTH(?)", ("x".repeat(BIG),))
            .await?;
        let big_value: Option<Vec<u8>> = conn
            .exec_first("SELECT REPEAT('x', ?)", (BIG as i64,))
            .await?;
        let big_value = big_value.unwrap_or_default();

        let mut sets = Vec::new();
        let mut call = conn.query_iter("CALL four_results()").await?;
        while !call.is_empty() {
            let rows: Vec<Row> = call.collect().await?;
            sets.push(rows.len());
        }
        drop(call);
        let after_call: Option<i64> = conn.query_first("SELECT 42").await?;

        let denied = match conn.query_drop("DROP TABLE cards").await {
            Ok(()) => json!("ran"),
            Err(mysql_async::Error::Server(error)) => {
                json!({ "code": error.code, "state": error.state, "message": error.message })
            }
            Err(other) => return Err(other.into()),
        };
        let after_denied: Option<i64> = conn
            .query_first(
                "SELECT COUNT(*) FROM information_schema.tables \
                 WHERE table_schema = 'payments' AND table_name = 'cards'",
            )
            .await?;
        conn.disconnect().await?;

        Ok(json!({
            "text_rows": text_rows,
            "binary_rows": binary_rows,
            "reused": reused,
            "big_param": big_param,
            "big_value_len": big_value.len(),
            "big_value_all_x": big_value.iter().all(|&b| b == b'x'),
            "call_sets": sets,
            "after_call": after_call,
            "denied": denied,
            "after_denied": after_denied,
        }))
    }
}
