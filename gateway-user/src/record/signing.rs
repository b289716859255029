//! The ed25519 key that signs checkpoint records.
//!
//! The private key is a PKCS#8 PEM file (`openssl genpkey -algorithm ed25519` writes one); the
//! daemon generates it when the file is absent. The public key is written as a PEM
//! SubjectPublicKeyInfo (`openssl pkey -pubout` reads and writes the same form), so an auditor
//! can keep a copy away from the node and pass it to `gatewayctl sessions verify --public-key`.

use std::{
    fs,
    io::Write as _,
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
};

use base64::{Engine as _, engine::general_purpose::STANDARD as BASE64};
use ring::{
    rand::SystemRandom,
    signature::{ED25519, Ed25519KeyPair, KeyPair as _, UnparsedPublicKey},
};
use sha2::{Digest as _, Sha256};

/// DER prefix of an ed25519 SubjectPublicKeyInfo; the 32 key bytes follow it (RFC 8410).
const SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

/// Errors loading or creating keys.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("failed to read key file {path}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("failed to write key file {path}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "invalid key file {path}: {reason} (expected an ed25519 key in PEM: `openssl genpkey -algorithm ed25519` writes a private key, `openssl pkey -pubout` its public key)"
    )]
    Invalid { path: PathBuf, reason: String },
}

/// The checkpoint signing key.
pub struct SigningKey {
    pair: Ed25519KeyPair,
    public: PublicKey,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey")
            .field("key_id", &self.public.id())
            .finish_non_exhaustive()
    }
}

/// An ed25519 public key that checks checkpoint signatures.
#[derive(Clone, PartialEq, Eq)]
pub struct PublicKey([u8; 32]);

impl std::fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PublicKey({})", self.id())
    }
}

impl SigningKey {
    /// Loads the key at `path`, or generates one there (mode 0600) when the file does not
    /// exist. Either way the public key is written to `public_path` when that file is missing
    /// or contains another key.
    pub fn load_or_generate(path: &Path, public_path: &Path) -> Result<Self, KeyError> {
        let key = match fs::read(path) {
            Ok(text) => Self::from_pem(path, &text)?,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                let key = Self::generate(path)?;
                tracing::info!(path = %path.display(), key_id = %key.public.id(), "generated a new checkpoint signing key");
                key
            }
            Err(source) => {
                return Err(KeyError::Read {
                    path: path.to_path_buf(),
                    source,
                });
            }
        };
        let pem = key.public.to_pem();
        if fs::read_to_string(public_path).ok().as_deref() != Some(pem.as_str()) {
            fs::write(public_path, pem).map_err(|source| KeyError::Write {
                path: public_path.to_path_buf(),
                source,
            })?;
        }
        Ok(key)
    }

    fn generate(path: &Path) -> Result<Self, KeyError> {
        let invalid = |reason: String| KeyError::Invalid {
            path: path.to_path_buf(),
            reason,
        };
        let document = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
            .map_err(|_| invalid("the system random generator failed".into()))?;
        let pem = pem_encode("PRIVATE KEY", document.as_ref());
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).map_err(|source| KeyError::Write {
                path: path.to_path_buf(),
                source,
            })?;
        }
        let file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .and_then(|mut file| file.write_all(pem.as_bytes()).map(|()| file))
            .map_err(|source| KeyError::Write {
                path: path.to_path_buf(),
                source,
            })?;
        file.sync_all().map_err(|source| KeyError::Write {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_pem(path, pem.as_bytes())
    }

    fn from_pem(path: &Path, text: &[u8]) -> Result<Self, KeyError> {
        let invalid = |reason: &str| KeyError::Invalid {
            path: path.to_path_buf(),
            reason: reason.to_string(),
        };
        let der = pem_decode(text, "PRIVATE KEY").ok_or_else(|| invalid("no PRIVATE KEY block"))?;
        // `maybe_unchecked` also takes PKCS#8 v1 files, which carry no public key (OpenSSL
        // writes those); ring derives the public key itself.
        let pair = Ed25519KeyPair::from_pkcs8_maybe_unchecked(&der)
            .map_err(|error| invalid(&format!("not an ed25519 PKCS#8 key ({error})")))?;
        let public = PublicKey(
            pair.public_key()
                .as_ref()
                .try_into()
                .map_err(|_| invalid("public key is not 32 bytes"))?,
        );
        Ok(Self { pair, public })
    }

    pub fn public(&self) -> &PublicKey {
        &self.public
    }

    /// Signs `message` and returns the signature in base64.
    pub fn sign(&self, message: &[u8]) -> String {
        BASE64.encode(self.pair.sign(message).as_ref())
    }
}

impl PublicKey {
    /// Reads a PEM SubjectPublicKeyInfo file.
    pub fn from_file(path: &Path) -> Result<Self, KeyError> {
        let text = fs::read(path).map_err(|source| KeyError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let invalid = |reason: &str| KeyError::Invalid {
            path: path.to_path_buf(),
            reason: reason.to_string(),
        };
        let der = pem_decode(&text, "PUBLIC KEY").ok_or_else(|| invalid("no PUBLIC KEY block"))?;
        Self::from_spki(&der).ok_or_else(|| invalid("not an ed25519 public key"))
    }

    fn from_spki(der: &[u8]) -> Option<Self> {
        let key = der.strip_prefix(&SPKI_PREFIX[..])?;
        Some(Self(key.try_into().ok()?))
    }

    /// Parses the base64 form that journal records carry.
    pub fn from_base64(text: &str) -> Option<Self> {
        let bytes = BASE64.decode(text).ok()?;
        Some(Self(bytes.try_into().ok()?))
    }

    pub fn to_base64(&self) -> String {
        BASE64.encode(self.0)
    }

    /// Short id written beside each signature: the first 8 bytes of the key's SHA-256, in hex.
    pub fn id(&self) -> String {
        super::hex(&Sha256::digest(self.0)[..8])
    }

    pub fn to_pem(&self) -> String {
        let mut der = SPKI_PREFIX.to_vec();
        der.extend_from_slice(&self.0);
        pem_encode("PUBLIC KEY", &der)
    }

    /// Checks a base64 signature over `message`.
    pub fn verify(&self, message: &[u8], signature: &str) -> bool {
        let Ok(signature) = BASE64.decode(signature) else {
            return false;
        };
        UnparsedPublicKey::new(&ED25519, self.0)
            .verify(message, &signature)
            .is_ok()
    }
}

fn pem_encode(label: &str, der: &[u8]) -> String {
    let body = BASE64.encode(der);
    let mut text = format!("-----BEGIN {label}-----\n");
    for line in body.as_bytes().chunks(64) {
        text.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
        text.push('\n');
    }
    text.push_str(&format!("-----END {label}-----\n"));
    text
}

fn pem_decode(text: &[u8], label: &str) -> Option<Vec<u8>> {
    let text = std::str::from_utf8(text).ok()?;
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let start = text.find(&begin)? + begin.len();
    let stop = start + text[start..].find(&end)?;
    let body: String = text[start..stop].split_whitespace().collect();
    BASE64.decode(body).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_key_signs_and_reloads() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let key_path = dir.path().join("signing.key");
        let pub_path = dir.path().join("signing.pub");
        let key = SigningKey::load_or_generate(&key_path, &pub_path).expect("generate key");
        let signature = key.sign(b"checkpoint");

        let public = PublicKey::from_file(&pub_path).expect("read public key");
        assert_eq!(&public, key.public());
        assert!(public.verify(b"checkpoint", &signature));
        assert!(!public.verify(b"checkpoint!", &signature));

        let again = SigningKey::load_or_generate(&key_path, &pub_path).expect("reload key");
        assert_eq!(again.public(), key.public());
        let mode = fs::metadata(&key_path).expect("key metadata");
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
            0o600
        );
    }

    #[test]
    fn other_key_fails_verification() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let first = SigningKey::load_or_generate(&dir.path().join("a"), &dir.path().join("a.pub"))
            .expect("first key");
        let second = SigningKey::load_or_generate(&dir.path().join("b"), &dir.path().join("b.pub"))
            .expect("second key");
        let signature = second.sign(b"m");
        assert!(!first.public().verify(b"m", &signature));
        assert_ne!(first.public().id(), second.public().id());
    }

    #[test]
    fn garbage_key_file_is_rejected() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let path = dir.path().join("bad.key");
        fs::write(&path, "not a key").expect("write file");
        let error = SigningKey::load_or_generate(&path, &dir.path().join("bad.pub"))
            .expect_err("garbage must be rejected");
        assert!(
            error.to_string().contains("no PRIVATE KEY block"),
            "{error}"
        );
    }
}
