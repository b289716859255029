//! Serving certificates for `kube_api` targets. Pods verify the API server against the
//! cluster CA in their service-account volume, so the gateway can terminate their TLS only
//! with a certificate that CA signed for the API server's names and addresses.
//! `gatewayctl cert issue` makes one from the CA's certificate and key.

use std::{
    fs,
    io::Write as _,
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
};

use chrono::{Datelike as _, Utc};
use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// Default validity of an issued certificate, one year like kubeadm's API server
/// certificate.
pub const DEFAULT_VALIDITY_DAYS: u32 = 365;

/// What to issue.
#[derive(Debug)]
pub struct IssueRequest<'a> {
    pub ca_cert: &'a Path,
    pub ca_key: &'a Path,
    /// DNS names and IP addresses, such as `kubernetes.default.svc` and `10.96.0.1`.
    pub sans: &'a [String],
    pub out_cert: &'a Path,
    pub out_key: &'a Path,
    pub validity_days: u32,
    /// Replace existing output files.
    pub overwrite: bool,
}

/// Errors while issuing a certificate.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("failed to read {path}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "invalid CA key in {path}: expected an unencrypted PKCS#8 PEM key (`BEGIN PRIVATE KEY`); convert a PKCS#1 RSA key with `openssl pkcs8 -topk8 -nocrypt -in KEY -out KEY.pk8`"
    )]
    CaKey { path: PathBuf, source: rcgen::Error },
    #[error("invalid CA certificate in {path}: expected a PEM certificate")]
    CaCert { path: PathBuf, source: rcgen::Error },
    #[error("at least one --san is required: the API server's DNS names and IP addresses")]
    NoSans,
    #[error("invalid subject alternative name {name:?}")]
    San { name: String, source: rcgen::Error },
    #[error("validity must be between 1 and 3650 days, got {days}")]
    Validity { days: u32 },
    #[error("{path} already exists; pass --force to replace it")]
    Exists { path: PathBuf },
    #[error("failed to generate or sign the certificate")]
    Sign(#[source] rcgen::Error),
    #[error("failed to write {path}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Issues a serving certificate with a new ECDSA P-256 key, signed by the CA, and writes
/// both as PEM. The key file is created with mode 0600.
pub fn issue(request: &IssueRequest<'_>) -> Result<(), CertError> {
    if request.sans.is_empty() {
        return Err(CertError::NoSans);
    }
    if !(1..=3650).contains(&request.validity_days) {
        return Err(CertError::Validity {
            days: request.validity_days,
        });
    }
    if !request.overwrite {
        for path in [request.out_cert, request.out_key] {
            if path.exists() {
                return Err(CertError::Exists {
                    path: path.to_path_buf(),
                });
            }
        }
    }

    let read = |path: &Path| {
        fs::read_to_string(path).map_err(|source| CertError::Read {
            path: path.to_path_buf(),
            source,
        })
    };
    let ca_key_pem = read(request.ca_key)?;
    let ca_cert_pem = read(request.ca_cert)?;
    // NOTE: the ring backend reads PKCS#8 keys only; kubeadm writes its CA key as PKCS#1, which
    // needs the conversion the error message gives.
    let ca_key = KeyPair::from_pem(&ca_key_pem).map_err(|source| CertError::CaKey {
        path: request.ca_key.to_path_buf(),
        source,
    })?;
    let issuer =
        Issuer::from_ca_cert_pem(&ca_cert_pem, ca_key).map_err(|source| CertError::CaCert {
            path: request.ca_cert.to_path_buf(),
            source,
        })?;

    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(CertError::Sign)?;
    for name in request.sans {
        let san = CertificateParams::new(vec![name.clone()]).map_err(|source| CertError::San {
            name: name.clone(),
            source,
        })?;
        params.subject_alt_names.extend(san.subject_alt_names);
    }
    let mut subject = DistinguishedName::new();
    subject.push(DnType::CommonName, "kube-apiserver (node gateway)");
    params.distinguished_name = subject;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let today = Utc::now().date_naive();
    let until = today + chrono::Days::new(u64::from(request.validity_days));
    params.not_before = rcgen::date_time_ymd(today.year(), today.month() as u8, today.day() as u8);
    params.not_after = rcgen::date_time_ymd(until.year(), until.month() as u8, until.day() as u8);

    let key = KeyPair::generate().map_err(CertError::Sign)?;
    let cert = params.signed_by(&key, &issuer).map_err(CertError::Sign)?;

    write_file(request.out_key, key.serialize_pem().as_bytes(), 0o600)?;
    write_file(request.out_cert, cert.pem().as_bytes(), 0o644)?;
    Ok(())
}

fn write_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), CertError> {
    let write_error = |source| CertError::Write {
        path: path.to_path_buf(),
        source,
    };
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .map_err(write_error)?;
    file.write_all(contents).map_err(write_error)?;
    file.sync_all().map_err(write_error)
}
