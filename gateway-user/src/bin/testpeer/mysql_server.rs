//! `mysql-sha2-server`: a MySQL 8 stand-in that authenticates with `caching_sha2_password`,
//! because no MySQL server can be installed on the test machines and MariaDB has no such
//! plugin. Accounts named with `--clear-password-account` use `mysql_clear_password` and
//! accounts named with `--sha256-account` use `sha256_password` instead (see below). It
//! follows the server side of caching_sha2_password as MySQL 8.0 documents it
//! ("Caching_sha2_password information" in the MySQL source documentation):
//!
//! - the greeting is a protocol 10 handshake naming `caching_sha2_password`, with a fresh
//!   20-byte nonce;
//! - a client naming another plugin gets an auth switch request to this one, with the same
//!   nonce;
//! - the client's 32-byte scramble is `SHA256(password) XOR SHA256(SHA256(SHA256(password)) ||
//!   nonce)`. When the account's `SHA256(SHA256(password))` is in the cache and the scramble
//!   matches it, the server sends fast-auth success (`0x01 0x03`) and OK;
//! - otherwise it requests full authentication (`0x01 0x04`). Over TLS the client then sends the
//!   password in clear text, NUL-terminated. Without TLS it may first request the RSA public
//!   key (`0x02`, to which the server sends `0x01` and the PEM), then sends the password, NUL-terminated,
//!   XOR-ed with the nonce and encrypted with RSA-OAEP (SHA-1, as OpenSSL's
//!   `RSA_PKCS1_OAEP_PADDING`). A correct password fills the cache;
//! - a failure is ERR 1045, SQLSTATE 28000.
//!
//! The other two plugins, as MySQL documents them ("Authentication Methods"):
//!
//! - a client naming another plugin gets an auth switch request with the same nonce, which
//!   `mysql_clear_password` ignores;
//! - `mysql_clear_password`: the client sends the password in clear text, NUL-terminated;
//! - `sha256_password`: over TLS the client sends the password in clear text, NUL-terminated.
//!   Without TLS it may first request the RSA public key (`0x01`, sent as in
//!   caching_sha2_password), then sends the RSA-encrypted password as above. A client naming
//!   the plugin in its handshake response sends its first response there.
//!
//! `COM_CHANGE_USER` runs the same exchange, its scramble made with the greeting's nonce.
//! After the login it replies to `COM_QUERY` for `SELECT 1`, `SELECT @@name, ...` (the settings
//! drivers read at connect), `SELECT CURRENT_USER()` and `SELECT card` (one row containing the
//! test card number 4111 1111 1111 1111), plus `COM_PING` and `COM_QUIT`. A `COM_QUERY` of
//! several of those statements, separated by `;`, gets one result set each, flagged
//! `SERVER_MORE_RESULTS_EXISTS` on all but the last. All of them go out in a single write, so
//! that they reach the gateway in one read, and the server then prints
//! `{"statements": N, "bytes": B}` on standard output.
//!
//! Where it differs from MySQL 8: full authentication compares `SHA256(SHA256(password))`
//! instead of the salted multi-round hash in `mysql.user`, every account has the one password,
//! an unknown account is rejected without going through the exchange, and a failed
//! `COM_CHANGE_USER` closes the connection.
//!
//! Each login attempt prints one JSON line on standard output. It names the account, its
//! plugin, how it authenticated (`fast`, `full-tls`, `full-rsa`, `clear`, `sha256-tls` or
//! `sha256-rsa`) and whether it was switched from another plugin. It lists the forms of
//! authentication data the server received, in order (`scramble`, `empty`, `key-request`,
//! `rsa` or `clear-text`). It ends with whether the connection was TLS, the result, and the
//! error that broke the exchange off, if one did. Passwords are never printed.

use std::{
    collections::HashMap,
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::Path,
    sync::{Arc, Mutex},
};

use gateway_user::tls::{ServingTls, server_config};
use ring::rand::SecureRandom as _;
use rsa::{
    Oaep, RsaPrivateKey, RsaPublicKey,
    pkcs8::{EncodePublicKey as _, LineEnding},
};
use serde_json::json;
use sha2::{Digest as _, Sha256};

const CLIENT_LONG_PASSWORD: u32 = 1;
const CLIENT_FOUND_ROWS: u32 = 1 << 1;
const CLIENT_LONG_FLAG: u32 = 1 << 2;
const CLIENT_CONNECT_WITH_DB: u32 = 1 << 3;
const CLIENT_PROTOCOL_41: u32 = 1 << 9;
const CLIENT_SSL: u32 = 1 << 11;
const CLIENT_TRANSACTIONS: u32 = 1 << 13;
const CLIENT_SECURE_CONNECTION: u32 = 1 << 15;
const CLIENT_MULTI_STATEMENTS: u32 = 1 << 16;
const CLIENT_MULTI_RESULTS: u32 = 1 << 17;
const CLIENT_PLUGIN_AUTH: u32 = 1 << 19;
const CLIENT_CONNECT_ATTRS: u32 = 1 << 20;
const CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA: u32 = 1 << 21;
const CLIENT_DEPRECATE_EOF: u32 = 1 << 24;

/// Capabilities the server offers, `CLIENT_SSL` aside.
const SERVER_CAPABILITIES: u32 = CLIENT_LONG_PASSWORD
    | CLIENT_FOUND_ROWS
    | CLIENT_LONG_FLAG
    | CLIENT_CONNECT_WITH_DB
    | CLIENT_PROTOCOL_41
    | CLIENT_TRANSACTIONS
    | CLIENT_SECURE_CONNECTION
    | CLIENT_MULTI_STATEMENTS
    | CLIENT_MULTI_RESULTS
    | CLIENT_PLUGIN_AUTH
    | CLIENT_CONNECT_ATTRS
    | CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA
    | CLIENT_DEPRECATE_EOF;

const PLUGIN: &str = "caching_sha2_password";
const CLEAR_PASSWORD_PLUGIN: &str = "mysql_clear_password";
const SHA256_PLUGIN: &str = "sha256_password";
const NONCE_LEN: usize = 20;
const SSL_REQUEST_LEN: usize = 32;
/// `SERVER_STATUS_AUTOCOMMIT`.
const STATUS_AUTOCOMMIT: u16 = 0x0002;
/// `SERVER_MORE_RESULTS_EXISTS`: another result set of the same query follows.
const STATUS_MORE_RESULTS: u16 = 0x0008;
/// `utf8mb4_0900_ai_ci`, MySQL 8's default collation.
const COLLATION: u8 = 255;
/// Byte after `0x01` (AuthMoreData) in the plugin's own packets.
const FAST_AUTH_SUCCESS: u8 = 0x03;
const PERFORM_FULL_AUTHENTICATION: u8 = 0x04;
/// The client's request for the RSA public key in caching_sha2_password.
const REQUEST_PUBLIC_KEY: u8 = 0x02;
/// The client's request for the RSA public key in sha256_password.
const SHA256_REQUEST_PUBLIC_KEY: u8 = 0x01;
const ACCESS_DENIED: u16 = 1045;
/// The card number `SELECT card` returns, a Visa test number.
const TEST_PAN: &str = "4111111111111111";

const COM_QUIT: u8 = 0x01;
const COM_QUERY: u8 = 0x03;
const COM_PING: u8 = 0x0e;
const COM_CHANGE_USER: u8 = 0x11;

/// State shared by all connections.
struct Server {
    /// `SHA256(SHA256(password))`, the same for every account.
    stored: [u8; 32],
    accounts: Vec<String>,
    /// Plugin of each account that does not use caching_sha2_password.
    plugins: HashMap<String, &'static str>,
    /// Fast-auth cache: `SHA256(SHA256(password))` by `user@host`, filled by full logins.
    cache: Mutex<HashMap<String, [u8; 32]>>,
    private_key: RsaPrivateKey,
    public_pem: String,
    tls: Option<Arc<rustls::ServerConfig>>,
}

/// Accounts of the server and the plugin each authenticates with.
pub struct Accounts {
    pub caching_sha2: Vec<String>,
    pub clear_password: Vec<String>,
    pub sha256: Vec<String>,
}

/// Runs the server until killed.
pub fn run(
    listen: SocketAddr,
    accounts: Accounts,
    password: &str,
    tls: Option<(&Path, &Path)>,
) -> anyhow::Result<()> {
    let tls = match tls {
        Some((cert, key)) => Some(server_config(
            &ServingTls {
                cert: cert.to_path_buf(),
                key: key.to_path_buf(),
            },
            &[],
        )?),
        None => None,
    };
    let mut rng = rsa::rand_core::OsRng;
    let private_key = RsaPrivateKey::new(&mut rng, 2048)?;
    let public_pem = RsaPublicKey::from(&private_key).to_public_key_pem(LineEnding::LF)?;
    let mut plugins = HashMap::new();
    for account in &accounts.clear_password {
        plugins.insert(account.clone(), CLEAR_PASSWORD_PLUGIN);
    }
    for account in &accounts.sha256 {
        plugins.insert(account.clone(), SHA256_PLUGIN);
    }
    let mut names = accounts.caching_sha2;
    names.extend(accounts.clear_password);
    names.extend(accounts.sha256);
    let server = Arc::new(Server {
        stored: sha256(&sha256(password.as_bytes())),
        accounts: names,
        plugins,
        cache: Mutex::new(HashMap::new()),
        private_key,
        public_pem,
        tls,
    });
    let listener = TcpListener::bind(listen)?;
    // The tests wait for this line before they connect.
    println!("{}", json!({ "listening": listen.to_string() }));
    std::io::stdout().flush()?;
    for (id, stream) in listener.incoming().enumerate() {
        let Ok(stream) = stream else { continue };
        let server = Arc::clone(&server);
        std::thread::spawn(move || {
            if let Err(error) = server.connection(stream, id as u32 + 1) {
                eprintln!("mysql-sha2-server: connection {}: {error:#}", id + 1);
            }
        });
    }
    Ok(())
}

fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

/// Facts of one connection that authentication needs.
struct Session {
    peer: String,
    nonce: [u8; NONCE_LEN],
    tls: bool,
    /// Capabilities the client chose in its handshake response.
    capabilities: u32,
}

/// Prints a login attempt as one JSON line.
fn report(login: &Login, tls: bool) -> anyhow::Result<()> {
    println!(
        "{}",
        json!({
            "user": login.user,
            "plugin": login.plugin,
            "method": login.method,
            "switched": login.switched,
            "received": login.received,
            "tls": tls,
            "accepted": login.accepted,
            "error": login.error,
        })
    );
    std::io::stdout().flush()?;
    Ok(())
}

/// Result of the authentication exchange.
struct Login {
    user: String,
    plugin: &'static str,
    method: &'static str,
    /// The client named another plugin and was switched to this one.
    switched: bool,
    /// Forms of the authentication data received, in order (see `password_form`).
    received: Vec<&'static str>,
    accepted: bool,
    /// Error that broke the exchange off, such as the client closing the connection.
    error: Option<String>,
    deprecate_eof: bool,
}

impl Server {
    fn connection(&self, stream: TcpStream, connection_id: u32) -> anyhow::Result<()> {
        let peer = stream.peer_addr()?.ip().to_string();
        let nonce = new_nonce()?;
        let mut capabilities = SERVER_CAPABILITIES;
        if self.tls.is_some() {
            capabilities |= CLIENT_SSL;
        }
        let mut io = Packets {
            stream: Connection::Plain(stream),
            seq: 0,
            batch: None,
        };
        io.write(&greeting(connection_id, capabilities, &nonce))?;

        let mut response = io.read()?;
        let mut tls = false;
        if response.len() == SSL_REQUEST_LEN && read_u32(&response, 0) & CLIENT_SSL != 0 {
            let Some(config) = &self.tls else {
                anyhow::bail!(
                    "SSL request received, but TLS was not offered: start the server with --tls-cert and --tls-key"
                );
            };
            let connection = rustls::ServerConnection::new(Arc::clone(config))?;
            let Connection::Plain(plain) = std::mem::replace(&mut io.stream, Connection::Moving)
            else {
                anyhow::bail!("TLS requested twice");
            };
            io.stream = Connection::Tls(Box::new(rustls::StreamOwned::new(connection, plain)));
            tls = true;
            response = io.read()?;
        }
        let parsed = parse_response(&response)?;
        let session = Session {
            peer,
            nonce,
            tls,
            capabilities: parsed.capabilities,
        };
        let login = self.authenticate(&mut io, parsed, &session);
        report(&login, tls)?;
        if !login.accepted {
            return Ok(());
        }
        self.commands(&mut io, login, &session)
    }

    /// Runs the connection phase after the handshake response, up to and including the OK or ERR.
    /// The same exchange follows COM_CHANGE_USER, whose scramble is made with the nonce of the
    /// greeting. An exchange broken off by an I/O error returns a login that is not accepted
    /// and names the error.
    fn authenticate(&self, io: &mut Packets, parsed: Response, session: &Session) -> Login {
        let plugin = self.plugins.get(&parsed.user).copied().unwrap_or(PLUGIN);
        let mut login = Login {
            user: parsed.user.clone(),
            plugin,
            method: "none",
            switched: false,
            received: Vec::new(),
            accepted: false,
            error: None,
            deprecate_eof: session.capabilities & CLIENT_DEPRECATE_EOF != 0,
        };
        if let Err(error) = self.exchange(io, parsed, session, &mut login) {
            login.accepted = false;
            login.error = Some(format!("{error:#}"));
        }
        login
    }

    /// Runs the exchange for the account's plugin, filling in `login`.
    fn exchange(
        &self,
        io: &mut Packets,
        parsed: Response,
        session: &Session,
        login: &mut Login,
    ) -> anyhow::Result<()> {
        let mut data = parsed.auth_response;
        login.received.push(data_form(&parsed.plugin, &data));
        if parsed.capabilities & CLIENT_PLUGIN_AUTH != 0 && parsed.plugin != login.plugin {
            let mut switch = vec![0xfe];
            switch.extend_from_slice(login.plugin.as_bytes());
            switch.push(0);
            switch.extend_from_slice(&session.nonce);
            switch.push(0);
            io.write(&switch)?;
            login.switched = true;
            data = io.read()?;
            login.received.push(data_form(login.plugin, &data));
        }
        let known = self.accounts.contains(&parsed.user);
        if data.is_empty() || data[..] == [0] {
            login.method = "empty";
            return self.deny(io, login, &session.peer, false);
        }
        if !known {
            return self.deny(io, login, &session.peer, true);
        }
        match login.plugin {
            CLEAR_PASSWORD_PLUGIN => {
                login.method = "clear";
                self.finish(io, login, session, until_nul(&data))
            }
            SHA256_PLUGIN => self.sha256_password(io, data, session, login),
            _ => self.caching_sha2_password(io, data, session, login),
        }
    }

    /// Sends ERR 1045 for `login`.
    fn deny(
        &self,
        io: &mut Packets,
        login: &Login,
        peer: &str,
        used_password: bool,
    ) -> anyhow::Result<()> {
        io.write(&access_denied(&login.user, peer, used_password))
    }

    /// Compares `password` with the accounts' password, sends OK or ERR, and on success fills
    /// the fast-auth cache.
    fn finish(
        &self,
        io: &mut Packets,
        login: &mut Login,
        session: &Session,
        password: Vec<u8>,
    ) -> anyhow::Result<()> {
        if sha256(&sha256(&password)) != self.stored {
            return self.deny(io, login, &session.peer, true);
        }
        let account = format!("{}@{}", login.user, session.peer);
        self.cache
            .lock()
            .expect("cache lock")
            .insert(account, self.stored);
        login.accepted = true;
        io.write(&ok_packet(STATUS_AUTOCOMMIT))
    }

    /// Reads an RSA-encrypted password: the cipher text of the password, NUL-terminated and
    /// XOR-ed with the nonce. Returns `None` when `answer` is not such cipher text.
    fn decrypt_password(&self, answer: &[u8], nonce: &[u8], user: &str) -> Option<Vec<u8>> {
        // The cipher text is as long as the key's modulus, or the login fails.
        if answer.len() != 256 {
            eprintln!(
                "mysql-sha2-server: {user}: answer of {} bytes is no RSA cipher text of 256 bytes",
                answer.len()
            );
            return None;
        }
        let mut plain = self
            .private_key
            .decrypt(Oaep::new::<sha1::Sha1>(), answer)
            .ok()?;
        for (i, byte) in plain.iter_mut().enumerate() {
            *byte ^= nonce[i % NONCE_LEN];
        }
        Some(until_nul(&plain))
    }

    /// Sends `0x01` and the PEM public key.
    fn send_public_key(&self, io: &mut Packets) -> anyhow::Result<()> {
        let mut key = vec![0x01];
        key.extend_from_slice(self.public_pem.as_bytes());
        io.write(&key)
    }

    fn sha256_password(
        &self,
        io: &mut Packets,
        mut answer: Vec<u8>,
        session: &Session,
        login: &mut Login,
    ) -> anyhow::Result<()> {
        if session.tls {
            login.method = "sha256-tls";
            return self.finish(io, login, session, until_nul(&answer));
        }
        login.method = "sha256-rsa";
        if answer[..] == [SHA256_REQUEST_PUBLIC_KEY] {
            self.send_public_key(io)?;
            answer = io.read()?;
            login.received.push(password_form(&answer));
        }
        match self.decrypt_password(&answer, &session.nonce, &login.user) {
            Some(password) => self.finish(io, login, session, password),
            None => self.deny(io, login, &session.peer, true),
        }
    }

    fn caching_sha2_password(
        &self,
        io: &mut Packets,
        scramble: Vec<u8>,
        session: &Session,
        login: &mut Login,
    ) -> anyhow::Result<()> {
        let peer = session.peer.as_str();
        let nonce = &session.nonce;
        if scramble.len() != 32 {
            return self.deny(io, login, peer, true);
        }

        let account = format!("{}@{peer}", login.user);
        let cached = self
            .cache
            .lock()
            .expect("cache lock")
            .get(&account)
            .copied();
        if let Some(digest) = cached
            && scramble_matches(&scramble, &digest, nonce)
        {
            login.method = "fast";
            login.accepted = true;
            io.write(&[0x01, FAST_AUTH_SUCCESS])?;
            io.write(&ok_packet(STATUS_AUTOCOMMIT))?;
            return Ok(());
        }

        io.write(&[0x01, PERFORM_FULL_AUTHENTICATION])?;
        let mut answer = io.read()?;
        login.received.push(password_form(&answer));
        if session.tls {
            login.method = "full-tls";
            return self.finish(io, login, session, until_nul(&answer));
        }
        login.method = "full-rsa";
        if answer[..] == [REQUEST_PUBLIC_KEY] {
            self.send_public_key(io)?;
            answer = io.read()?;
            login.received.push(password_form(&answer));
        }
        match self.decrypt_password(&answer, nonce, &login.user) {
            Some(password) => self.finish(io, login, session, password),
            None => self.deny(io, login, peer, true),
        }
    }

    fn commands(
        &self,
        io: &mut Packets,
        mut login: Login,
        session: &Session,
    ) -> anyhow::Result<()> {
        let peer = &session.peer;
        loop {
            io.seq = 0;
            let command = match io.read() {
                Ok(command) => command,
                Err(error) if is_eof(&error) => return Ok(()),
                Err(error) => return Err(error),
            };
            match command.first() {
                Some(&COM_QUIT) | None => return Ok(()),
                Some(&COM_PING) => io.write(&ok_packet(STATUS_AUTOCOMMIT))?,
                Some(&COM_CHANGE_USER) => {
                    // NOTE: whether MySQL 8 responds to COM_CHANGE_USER with an auth switch carrying
                    // a fresh nonce, instead of checking a scramble made with the greeting's
                    // nonce, is unverified. mysql_async handles either answer.
                    let parsed = parse_change_user(&command[1..], session.capabilities)?;
                    login = self.authenticate(io, parsed, session);
                    report(&login, session.tls)?;
                    // A failed change of user leaves no account to run commands as.
                    if !login.accepted {
                        return Ok(());
                    }
                }
                Some(&COM_QUERY) => {
                    let sql = String::from_utf8_lossy(&command[1..]).to_string();
                    let user = format!("{}@{peer}", login.user);
                    query(io, &sql, &user, login.deprecate_eof)?;
                }
                Some(other) => io.write(&err_packet(
                    1047,
                    "08S01",
                    &format!("unknown command 0x{other:02x}"),
                ))?,
            }
        }
    }
}

/// Returns the bytes before the first NUL.
fn until_nul(data: &[u8]) -> Vec<u8> {
    data.split(|&b| b == 0).next().unwrap_or_default().to_vec()
}

/// Names the form of the first authentication data for `plugin`: `scramble` for the hashing
/// plugins, the password's form for the others (see `password_form`).
fn data_form(plugin: &str, data: &[u8]) -> &'static str {
    match plugin {
        CLEAR_PASSWORD_PLUGIN | SHA256_PLUGIN => password_form(data),
        _ if data.is_empty() || data == [0] => "empty",
        _ => "scramble",
    }
}

/// Names the form of a password response: `empty`, `key-request` (`0x01` or `0x02`), `rsa`
/// (256 bytes, the test key's cipher text) or `clear-text`.
fn password_form(data: &[u8]) -> &'static str {
    match data {
        [] | [0] => "empty",
        [SHA256_REQUEST_PUBLIC_KEY] | [REQUEST_PUBLIC_KEY] => "key-request",
        _ if data.len() == 256 => "rsa",
        _ => "clear-text",
    }
}

fn is_eof(error: &anyhow::Error) -> bool {
    error
        .downcast_ref::<std::io::Error>()
        .is_some_and(|error| error.kind() == std::io::ErrorKind::UnexpectedEof)
}

/// Checks a fast-auth scramble against the cached `SHA256(SHA256(password))`: XOR-ing the
/// scramble with `SHA256(digest || nonce)` gives `SHA256(password)`, whose SHA-256 must be the
/// cached digest.
fn scramble_matches(scramble: &[u8], digest: &[u8; 32], nonce: &[u8]) -> bool {
    let mut mask_input = digest.to_vec();
    mask_input.extend_from_slice(nonce);
    let mask = sha256(&mask_input);
    let candidate: Vec<u8> = scramble.iter().zip(mask).map(|(s, m)| s ^ m).collect();
    sha256(&candidate) == *digest
}

/// Replies to the statements of one `COM_QUERY`. A text of several statements gets its replies
/// in one write, reported on standard output. An unsupported statement ends it with an ERR, as
/// a failing statement ends a multi-statement query in MySQL.
fn query(io: &mut Packets, sql: &str, user: &str, deprecate_eof: bool) -> anyhow::Result<()> {
    let statements: Vec<&str> = sql
        .split(';')
        .map(str::trim)
        .filter(|statement| !statement.is_empty())
        .collect();
    let several = statements.len() > 1;
    if several {
        io.batch = Some(Vec::new());
    }
    for (index, statement) in statements.iter().enumerate() {
        let more = index + 1 < statements.len();
        match answer_query(statement, user) {
            Some((columns, row)) => write_result(io, &columns, &row, deprecate_eof, more)?,
            None => {
                io.write(&err_packet(
                    1064,
                    "42000",
                    "the test server runs only SELECT 1, SELECT card, \
                     SELECT CURRENT_USER() and SELECT @@name",
                ))?;
                break;
            }
        }
    }
    if several {
        let bytes = io.send_batch()?;
        println!(
            "{}",
            json!({ "statements": statements.len(), "bytes": bytes })
        );
        std::io::stdout().flush()?;
    }
    Ok(())
}

/// Returns the column names and the one row for a supported query.
fn answer_query(sql: &str, user: &str) -> Option<(Vec<String>, Vec<Option<String>>)> {
    let lower = sql.trim_end_matches(';').to_ascii_lowercase();
    match lower.as_str() {
        "select 1" => return Some((vec!["1".into()], vec![Some("1".into())])),
        "select card" => return Some((vec!["card".into()], vec![Some(TEST_PAN.into())])),
        "select current_user()" => {
            return Some((vec!["CURRENT_USER()".into()], vec![Some(user.into())]));
        }
        _ => {}
    }
    let variables = lower.strip_prefix("select ")?;
    let mut columns = Vec::new();
    let mut row = Vec::new();
    for name in variables.split(',').map(str::trim) {
        let value = match name.strip_prefix("@@")? {
            "max_allowed_packet" => Some("67108864".to_string()),
            "wait_timeout" => Some("28800".to_string()),
            _ => None,
        };
        columns.push(name.to_string());
        row.push(value);
    }
    Some((columns, row))
}

/// Writes a text result set of VARCHAR columns with one row. With `more`, its end marks that
/// another result set follows.
fn write_result(
    io: &mut Packets,
    columns: &[String],
    row: &[Option<String>],
    deprecate_eof: bool,
    more: bool,
) -> anyhow::Result<()> {
    let status = if more {
        STATUS_AUTOCOMMIT | STATUS_MORE_RESULTS
    } else {
        STATUS_AUTOCOMMIT
    };
    let mut count = Vec::new();
    put_lenenc(&mut count, columns.len() as u64);
    io.write(&count)?;
    for name in columns {
        let mut column = Vec::new();
        for text in ["def", "", "", "", name, name] {
            put_lenenc(&mut column, text.len() as u64);
            column.extend_from_slice(text.as_bytes());
        }
        column.push(0x0c);
        column.extend_from_slice(&u16::from(COLLATION).to_le_bytes());
        column.extend_from_slice(&256u32.to_le_bytes());
        column.push(253); // MYSQL_TYPE_VAR_STRING
        column.extend_from_slice(&0u16.to_le_bytes());
        column.push(0);
        column.extend_from_slice(&[0, 0]);
        io.write(&column)?;
    }
    if !deprecate_eof {
        io.write(&eof_packet(STATUS_AUTOCOMMIT))?;
    }
    let mut values = Vec::new();
    for value in row {
        match value {
            Some(text) => {
                put_lenenc(&mut values, text.len() as u64);
                values.extend_from_slice(text.as_bytes());
            }
            None => values.push(0xfb),
        }
    }
    io.write(&values)?;
    if deprecate_eof {
        let mut end = ok_packet(status);
        end[0] = 0xfe;
        io.write(&end)
    } else {
        io.write(&eof_packet(status))
    }
}

/// Packet framing on one connection, with the sequence id of the next packet.
struct Packets {
    stream: Connection,
    seq: u8,
    /// While set, written packets gather here until `send_batch`.
    batch: Option<Vec<u8>>,
}

/// The client connection, before and after TLS starts.
enum Connection {
    Plain(TcpStream),
    Tls(Box<rustls::StreamOwned<rustls::ServerConnection, TcpStream>>),
    /// Only while the socket moves into TLS.
    Moving,
}

impl Read for Connection {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Self::Plain(stream) => stream.read(buf),
            Self::Tls(stream) => stream.read(buf),
            Self::Moving => Err(std::io::ErrorKind::NotConnected.into()),
        }
    }
}

impl Write for Connection {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Self::Plain(stream) => stream.write(buf),
            Self::Tls(stream) => stream.write(buf),
            Self::Moving => Err(std::io::ErrorKind::NotConnected.into()),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Self::Plain(stream) => stream.flush(),
            Self::Tls(stream) => stream.flush(),
            Self::Moving => Ok(()),
        }
    }
}

impl Packets {
    /// Reads one payload and checks its sequence id. Payloads of 16 MiB or more are rejected,
    /// because the test clients send none.
    fn read(&mut self) -> anyhow::Result<Vec<u8>> {
        let mut header = [0u8; 4];
        self.stream.read_exact(&mut header)?;
        let len =
            usize::from(header[0]) | usize::from(header[1]) << 8 | usize::from(header[2]) << 16;
        anyhow::ensure!(
            header[3] == self.seq,
            "packet sequence id {} where {} was expected",
            header[3],
            self.seq
        );
        anyhow::ensure!(
            len < 0xff_ffff,
            "packet of {len} bytes is longer than the test server reads"
        );
        self.seq = self.seq.wrapping_add(1);
        let mut body = vec![0u8; len];
        self.stream.read_exact(&mut body)?;
        Ok(body)
    }

    fn write(&mut self, payload: &[u8]) -> anyhow::Result<()> {
        let len = (payload.len() as u32).to_le_bytes();
        let header = [len[0], len[1], len[2], self.seq];
        self.seq = self.seq.wrapping_add(1);
        if let Some(batch) = &mut self.batch {
            batch.extend_from_slice(&header);
            batch.extend_from_slice(payload);
            return Ok(());
        }
        self.stream.write_all(&header)?;
        self.stream.write_all(payload)?;
        self.stream.flush()?;
        Ok(())
    }

    /// Sends the gathered packets in one write and stops gathering. Returns their size.
    fn send_batch(&mut self) -> anyhow::Result<usize> {
        let batch = self.batch.take().unwrap_or_default();
        self.stream.write_all(&batch)?;
        self.stream.flush()?;
        Ok(batch.len())
    }
}

/// Returns 20 random bytes without NUL or `$`, as MySQL's nonces are.
fn new_nonce() -> anyhow::Result<[u8; NONCE_LEN]> {
    let mut nonce = [0u8; NONCE_LEN];
    ring::rand::SystemRandom::new()
        .fill(&mut nonce)
        .map_err(|_| anyhow::anyhow!("no random bytes"))?;
    for byte in &mut nonce {
        *byte = 0x21 + *byte % 0x5e;
        if *byte == b'$' {
            *byte = b'%';
        }
    }
    Ok(nonce)
}

fn greeting(connection_id: u32, capabilities: u32, nonce: &[u8; NONCE_LEN]) -> Vec<u8> {
    let caps = capabilities.to_le_bytes();
    let mut out = vec![10];
    out.extend_from_slice(b"8.0.36-gateway-test\0");
    out.extend_from_slice(&connection_id.to_le_bytes());
    out.extend_from_slice(&nonce[..8]);
    out.push(0);
    out.extend_from_slice(&caps[..2]);
    out.push(COLLATION);
    out.extend_from_slice(&STATUS_AUTOCOMMIT.to_le_bytes());
    out.extend_from_slice(&caps[2..]);
    out.push(NONCE_LEN as u8 + 1);
    out.extend_from_slice(&[0; 10]);
    // MAX(13, 21 - 8) bytes: the rest of the nonce and its NUL.
    out.extend_from_slice(&nonce[8..]);
    out.push(0);
    out.extend_from_slice(PLUGIN.as_bytes());
    out.push(0);
    out
}

/// Fields of a handshake response 4.1.
struct Response {
    capabilities: u32,
    user: String,
    auth_response: Vec<u8>,
    plugin: String,
}

fn parse_response(data: &[u8]) -> anyhow::Result<Response> {
    anyhow::ensure!(data.len() > SSL_REQUEST_LEN, "handshake response too short");
    let capabilities = read_u32(data, 0);
    anyhow::ensure!(
        capabilities & CLIENT_PROTOCOL_41 != 0,
        "pre-4.1 handshake response"
    );

    let mut at = SSL_REQUEST_LEN;
    let user = cstr(data, &mut at)?;
    let auth_len = if capabilities & CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA != 0 {
        lenenc(data, &mut at)? as usize
    } else {
        let len = *data
            .get(at)
            .ok_or_else(|| anyhow::anyhow!("no auth length"))?;
        at += 1;
        usize::from(len)
    };
    let auth_response = data
        .get(at..at + auth_len)
        .ok_or_else(|| anyhow::anyhow!("auth response cut short"))?
        .to_vec();
    at += auth_len;

    if capabilities & CLIENT_CONNECT_WITH_DB != 0 && at < data.len() {
        cstr(data, &mut at)?;
    }
    let mut plugin = String::new();
    if capabilities & CLIENT_PLUGIN_AUTH != 0 && at < data.len() {
        plugin = cstr(data, &mut at)?;
    }
    Ok(Response {
        capabilities,
        user,
        auth_response,
        plugin,
    })
}

/// Parses the body of COM_CHANGE_USER (after the command byte) into the fields a handshake
/// response has: user, auth response, database, character set, plugin name.
fn parse_change_user(data: &[u8], capabilities: u32) -> anyhow::Result<Response> {
    let mut at = 0;
    let user = cstr(data, &mut at)?;
    let auth_len = if capabilities & CLIENT_SECURE_CONNECTION != 0 {
        let len = *data
            .get(at)
            .ok_or_else(|| anyhow::anyhow!("COM_CHANGE_USER without auth length"))?;
        at += 1;
        usize::from(len)
    } else {
        data[at..].iter().position(|&b| b == 0).unwrap_or(0)
    };
    let auth_response = data
        .get(at..at + auth_len)
        .ok_or_else(|| anyhow::anyhow!("COM_CHANGE_USER auth response cut short"))?
        .to_vec();
    at += auth_len;
    if capabilities & CLIENT_SECURE_CONNECTION == 0 {
        at += 1;
    }
    cstr(data, &mut at)?;
    let mut plugin = String::new();
    if at + 2 <= data.len() {
        at += 2;
        if capabilities & CLIENT_PLUGIN_AUTH != 0 && at < data.len() {
            plugin = cstr(data, &mut at)?;
        }
    }
    Ok(Response {
        capabilities,
        user,
        auth_response,
        plugin,
    })
}

fn read_u32(data: &[u8], at: usize) -> u32 {
    let mut bytes = [0u8; 4];
    let end = data.len().min(at + 4);
    bytes[..end - at].copy_from_slice(&data[at..end]);
    u32::from_le_bytes(bytes)
}

fn cstr(data: &[u8], at: &mut usize) -> anyhow::Result<String> {
    let rest = data.get(*at..).unwrap_or_default();
    let end = rest
        .iter()
        .position(|&b| b == 0)
        .ok_or_else(|| anyhow::anyhow!("string without NUL"))?;
    *at += end + 1;
    Ok(String::from_utf8_lossy(&rest[..end]).into_owned())
}

fn lenenc(data: &[u8], at: &mut usize) -> anyhow::Result<u64> {
    let first = *data
        .get(*at)
        .ok_or_else(|| anyhow::anyhow!("no length-encoded integer"))?;
    let width = match first {
        0xfc => 2,
        0xfd => 3,
        0xfe => 8,
        _ => {
            *at += 1;
            return Ok(u64::from(first));
        }
    };
    let bytes = data
        .get(*at + 1..*at + 1 + width)
        .ok_or_else(|| anyhow::anyhow!("length-encoded integer cut short"))?;
    *at += 1 + width;
    Ok(bytes
        .iter()
        .rev()
        .fold(0u64, |value, &b| value << 8 | u64::from(b)))
}

fn put_lenenc(out: &mut Vec<u8>, value: u64) {
    if value < 0xfb {
        out.push(value as u8);
    } else if value <= 0xffff {
        out.push(0xfc);
        out.extend_from_slice(&(value as u16).to_le_bytes());
    } else {
        out.push(0xfe);
        out.extend_from_slice(&value.to_le_bytes());
    }
}

fn ok_packet(status: u16) -> Vec<u8> {
    let mut out = vec![0x00, 0, 0];
    out.extend_from_slice(&status.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out
}

fn eof_packet(status: u16) -> Vec<u8> {
    let mut out = vec![0xfe, 0, 0];
    out.extend_from_slice(&status.to_le_bytes());
    out
}

fn err_packet(code: u16, sqlstate: &str, message: &str) -> Vec<u8> {
    let mut out = vec![0xff];
    out.extend_from_slice(&code.to_le_bytes());
    out.push(b'#');
    out.extend_from_slice(sqlstate.as_bytes());
    out.extend_from_slice(message.as_bytes());
    out
}

/// ERR 1045 in MySQL's wording.
fn access_denied(user: &str, host: &str, used_password: bool) -> Vec<u8> {
    let using = if used_password { "YES" } else { "NO" };
    err_packet(
        ACCESS_DENIED,
        "28000",
        &format!("Access denied for user '{user}'@'{host}' (using password: {using})"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Computes the client's fast-auth scramble from the documented formula.
    fn client_scramble(password: &[u8], nonce: &[u8]) -> Vec<u8> {
        let hash = sha256(password);
        let mut input = sha256(&hash).to_vec();
        input.extend_from_slice(nonce);
        let mask = sha256(&input);
        hash.iter().zip(mask).map(|(h, m)| h ^ m).collect()
    }

    #[test]
    fn scramble_checked_against_cache() {
        let nonce = new_nonce().expect("nonce");
        let digest = sha256(&sha256(b"secret"));
        assert!(scramble_matches(
            &client_scramble(b"secret", &nonce),
            &digest,
            &nonce
        ));
        assert!(!scramble_matches(
            &client_scramble(b"wrong", &nonce),
            &digest,
            &nonce
        ));
        let other = new_nonce().expect("nonce");
        assert!(!scramble_matches(
            &client_scramble(b"secret", &other),
            &digest,
            &nonce
        ));
    }
}
