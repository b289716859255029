//! TLS settings of targets: the serving certificate the proxy terminates client TLS with, and
//! how the proxy's own connection to the server is encrypted and verified. Files are read once
//! at start, so a missing or unreadable file stops the daemon with the field named.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use rustls::{
    ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::ring,
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime, pem::PemObject as _},
};
use serde::Deserialize;

/// Serving certificate and key for client-side TLS of a target.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServingTls {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key of the leaf certificate.
    pub key: PathBuf,
}

/// Encryption of the proxy's connection to the server.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum UpstreamTlsMode {
    /// Plain text, whatever the client used.
    #[default]
    Disable,
    /// Encrypted, without checking the server's certificate (libpq's `sslmode=require`).
    Require,
    /// Encrypted, with the certificate checked against `ca` and the server name.
    VerifyFull,
}

/// Upstream TLS settings of a target.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamTls {
    #[serde(default)]
    pub mode: UpstreamTlsMode,
    /// PEM CA certificates for `verify-full`.
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// Name to verify the certificate against; defaults to the target's address, or to
    /// `name.namespace.svc` for a Service target.
    #[serde(default)]
    pub server_name: Option<String>,
}

/// Errors while loading TLS material.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("failed to read {what} from {path}")]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("{path} contains no {what}")]
    Empty { what: &'static str, path: PathBuf },
    #[error("invalid TLS configuration")]
    Rustls(#[from] rustls::Error),
    #[error("upstream_tls.mode is verify-full but upstream_tls.ca is not set")]
    MissingCa,
    #[error("invalid upstream TLS server name {name:?}")]
    ServerName { name: String },
}

/// The ALPN protocol name PostgreSQL 17 clients send for direct TLS.
pub const ALPN_POSTGRESQL: &[u8] = b"postgresql";

#[expect(
    deprecated,
    reason = "ring is used because aws-lc-rs needs cmake and a C toolchain setup the build does not assume; it lacks only the post-quantum key exchange"
)]
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(ring::default_provider())
}

/// Builds the server-side TLS configuration for a target.
pub fn server_config(tls: &ServingTls, alpn: &[&[u8]]) -> Result<Arc<ServerConfig>, TlsError> {
    let certs = read_certs(&tls.cert, "certificates")?;
    let key = PrivateKeyDer::from_pem_file(&tls.key).map_err(|source| TlsError::Read {
        what: "a private key",
        path: tls.key.clone(),
        source,
    })?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    config.alpn_protocols = alpn.iter().map(|protocol| protocol.to_vec()).collect();
    Ok(Arc::new(config))
}

/// Builds the client-side TLS configuration and server name for a target's upstream leg;
/// `None` when the mode is `disable`.
pub fn client_config(
    upstream: &UpstreamTls,
    default_name: String,
) -> Result<Option<(Arc<ClientConfig>, ServerName<'static>)>, TlsError> {
    let name = upstream.server_name.clone().unwrap_or(default_name);
    let server_name =
        ServerName::try_from(name.clone()).map_err(|_| TlsError::ServerName { name })?;
    let builder =
        ClientConfig::builder_with_provider(provider()).with_safe_default_protocol_versions()?;
    let config = match upstream.mode {
        UpstreamTlsMode::Disable => return Ok(None),
        UpstreamTlsMode::Require => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnyCertificate))
            .with_no_client_auth(),
        UpstreamTlsMode::VerifyFull => {
            let ca = upstream.ca.as_ref().ok_or(TlsError::MissingCa)?;
            let mut roots = RootCertStore::empty();
            for cert in read_certs(ca, "CA certificates")? {
                roots.add(cert)?;
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
    };
    Ok(Some((Arc::new(config), server_name)))
}

fn read_certs(path: &Path, what: &'static str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(Iterator::collect::<Result<Vec<_>, _>>)
        .map_err(|source| TlsError::Read {
            what,
            path: path.to_path_buf(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::Empty {
            what,
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

/// Accepts any server certificate, for `upstream_tls.mode: require`, which requests encryption
/// without authentication, as libpq's `sslmode=require` does. Signatures are still checked.
#[derive(Debug)]
struct AcceptAnyCertificate;

impl ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &provider().signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &provider().signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}
