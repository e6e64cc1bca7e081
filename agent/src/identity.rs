//! The agent's long-lived key pair and the peer id derived from it.
//!
//! An [`Identity`] is a self-signed ECDSA P-256 certificate and its private key,
//! created once by `concord init` and kept in a PEM file that is never
//! overwritten. Peers name each other by [`PeerId`]: the SHA-256 of the
//! certificate's SubjectPublicKeyInfo. The id depends on the public key only, so a
//! peer cannot claim another's id without its private key, and re-issuing the
//! certificate for the same key keeps the id.
//!
//! ```
//! use concord_agent::identity::{Identity, PeerId};
//!
//! let identity = Identity::generate()?;
//! let text = identity.peer_id().to_string();
//! assert_eq!(text.parse::<PeerId>()?, identity.peer_id());
//! # Ok::<(), concord_agent::identity::IdentityError>(())
//! ```

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use data_encoding::{BASE32_NOPAD, BASE32_NOPAD_NOCASE, DecodeKind};
use pem::{EncodeConfig, LineEnding, Pem, encode_many_config};
use rcgen::{CertificateParams, KeyPair, PKCS_ECDSA_P256_SHA256};
use ring::digest::{SHA256, digest};
use rustls::crypto::ring::default_provider;
use rustls::pki_types::pem::{self as pem_section, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::sign::CertifiedKey;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The subject alternative name put in every agent certificate.
///
/// Peers are authenticated by [`PeerId`], never by name; the name only keeps
/// the certificate well formed.
pub const CERT_SUBJECT_ALT_NAME: &str = "concord";

/// The number of bytes in a [`PeerId`].
pub const PEER_ID_BYTES: usize = 32;

/// The number of characters in the text form of a [`PeerId`].
pub const PEER_ID_CHARS: usize = (PEER_ID_BYTES * 8).div_ceil(5);

/// The largest identity file [`Identity::load`] reads; real ones are under 1 KiB.
pub const IDENTITY_FILE_BYTES_MAX: u64 = 64 * 1024;

/// How much of a rejected peer id string an error message quotes.
const PEER_ID_INPUT_QUOTE_CHARS_MAX: usize = 80;

/// What can go wrong creating, storing, loading or naming an identity.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// Generating the key pair or self-signing the certificate failed.
    #[error("cannot generate identity: {0}")]
    Generate(#[source] rcgen::Error),
    /// A certificate could not be parsed as X.509 DER.
    #[error("malformed certificate: {0}")]
    Certificate(#[source] webpki::Error),
    /// `save` refused to replace an existing identity file.
    #[error("identity file {} already exists; refusing to overwrite a key", path.display())]
    AlreadyExists {
        /// The file that already exists.
        path: PathBuf,
    },
    /// Reading, writing or syncing the identity file failed.
    #[error("identity file {}: {source}", path.display())]
    Io {
        /// The file being accessed.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The identity file is larger than [`IDENTITY_FILE_BYTES_MAX`].
    #[error("identity file {} is larger than {max} bytes", path.display())]
    FileTooLarge {
        /// The file being loaded.
        path: PathBuf,
        /// The size limit in bytes.
        max: u64,
    },
    /// The identity file lacks a PEM section or holds a malformed one.
    #[error("identity file {} has no valid {section}: {source}", path.display())]
    Pem {
        /// The file being loaded.
        path: PathBuf,
        /// The PEM section that is missing or malformed.
        section: &'static str,
        /// The underlying error.
        #[source]
        source: pem_section::Error,
    },
    /// The identity file's certificate or key is unusable, or they do not belong together.
    #[error("identity file {} holds an unusable certificate or key: {source}", path.display())]
    InvalidKey {
        /// The file being loaded.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A peer id string does not have exactly [`PEER_ID_CHARS`] characters.
    #[error("invalid peer id {input:?}: expected {PEER_ID_CHARS} characters, got {len}")]
    PeerIdLength {
        /// The rejected string, shortened if very long.
        input: String,
        /// Its length in characters.
        len: usize,
    },
    /// A peer id string has a character outside the base32 alphabet `a-z2-7`.
    #[error("invalid peer id {input:?}: {character:?} at position {position} is not base32")]
    PeerIdCharacter {
        /// The rejected string.
        input: String,
        /// The offending character.
        character: char,
        /// Its position, counting characters from zero.
        position: usize,
    },
    /// A peer id string's last character sets bits beyond the 32 bytes (not canonical).
    #[error("invalid peer id {input:?}: last character is not canonical")]
    PeerIdNotCanonical {
        /// The rejected string.
        input: String,
    },
}

/// The identity of a peer: the SHA-256 of its certificate's SubjectPublicKeyInfo.
///
/// Its text form (`Display`, `FromStr`, serde) is 52 lowercase RFC 4648 base32
/// characters without padding; that is what operators copy into config files.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PeerId([u8; PEER_ID_BYTES]);

impl PeerId {
    /// Wraps raw id bytes; use [`peer_id_of`] to derive them from a certificate.
    pub const fn from_bytes(bytes: [u8; PEER_ID_BYTES]) -> PeerId {
        PeerId(bytes)
    }

    /// The raw 32 bytes of the id.
    pub const fn as_bytes(&self) -> &[u8; PEER_ID_BYTES] {
        &self.0
    }
}

impl fmt::Display for PeerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&BASE32_NOPAD.encode(&self.0).to_ascii_lowercase())
    }
}

impl fmt::Debug for PeerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for PeerId {
    type Err = IdentityError;

    /// Parses the base32 text form; upper-case letters are accepted too.
    fn from_str(s: &str) -> Result<PeerId, IdentityError> {
        let len = s.chars().count();
        if len != PEER_ID_CHARS {
            return Err(IdentityError::PeerIdLength {
                input: quote_input(s),
                len,
            });
        }
        // The last character carries bits beyond the 32 bytes; they must be zero so
        // that each id has exactly one text form (the codec checks them).
        let bytes = BASE32_NOPAD_NOCASE.decode(s.as_bytes()).map_err(|e| {
            if e.kind == DecodeKind::Trailing {
                return IdentityError::PeerIdNotCanonical {
                    input: quote_input(s),
                };
            }
            let at = (0..=e.position.min(s.len()))
                .rev()
                .find(|i| s.is_char_boundary(*i))
                .unwrap_or(0);
            IdentityError::PeerIdCharacter {
                input: quote_input(s),
                character: s[at..].chars().next().unwrap_or('?'),
                position: s[..at].chars().count(),
            }
        })?;
        let bytes = <[u8; PEER_ID_BYTES]>::try_from(bytes.as_slice()).map_err(|_| {
            IdentityError::PeerIdLength {
                input: quote_input(s),
                len,
            }
        })?;
        Ok(PeerId(bytes))
    }
}

impl Serialize for PeerId {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for PeerId {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<PeerId, D::Error> {
        struct PeerIdVisitor;

        impl serde::de::Visitor<'_> for PeerIdVisitor {
            type Value = PeerId;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "a peer id of {PEER_ID_CHARS} base32 characters")
            }

            fn visit_str<E: serde::de::Error>(self, value: &str) -> Result<PeerId, E> {
                value.parse().map_err(E::custom)
            }
        }

        deserializer.deserialize_str(PeerIdVisitor)
    }
}

/// Shortens a rejected input so that an error message stays readable.
fn quote_input(input: &str) -> String {
    if input.chars().count() <= PEER_ID_INPUT_QUOTE_CHARS_MAX {
        return input.to_owned();
    }
    let mut quoted: String = input.chars().take(PEER_ID_INPUT_QUOTE_CHARS_MAX).collect();
    quoted.push('…');
    quoted
}

/// Derives the [`PeerId`] of the key that `cert` certifies.
///
/// Call it on the end-entity certificate a peer presented; it fails only if the
/// certificate is not well-formed X.509.
pub fn peer_id_of(cert: &CertificateDer<'_>) -> Result<PeerId, IdentityError> {
    let cert = webpki::EndEntityCert::try_from(cert).map_err(IdentityError::Certificate)?;
    let spki = cert.subject_public_key_info();
    let hash = digest(&SHA256, spki.as_ref());
    let mut bytes = [0u8; PEER_ID_BYTES];
    bytes.copy_from_slice(hash.as_ref());
    Ok(PeerId(bytes))
}

/// This agent's certificate, private key and the [`PeerId`] they imply.
///
/// `Debug` shows the peer id only, never the key.
pub struct Identity {
    cert: CertificateDer<'static>,
    key: PrivatePkcs8KeyDer<'static>,
    peer_id: PeerId,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("peer_id", &self.peer_id)
            .finish_non_exhaustive()
    }
}

impl Clone for Identity {
    fn clone(&self) -> Identity {
        Identity {
            cert: self.cert.clone(),
            key: self.key.clone_key(),
            peer_id: self.peer_id,
        }
    }
}

impl Identity {
    /// Creates a fresh ECDSA P-256 key and a self-signed certificate for it.
    ///
    /// Call it once per agent (`concord init`), then [`save`](Identity::save) it.
    pub fn generate() -> Result<Identity, IdentityError> {
        let key_pair =
            KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(IdentityError::Generate)?;
        let params = CertificateParams::new(vec![CERT_SUBJECT_ALT_NAME.to_owned()])
            .map_err(IdentityError::Generate)?;
        let cert = params
            .self_signed(&key_pair)
            .map_err(IdentityError::Generate)?;
        let cert = cert.der().clone();
        let key = PrivatePkcs8KeyDer::from(key_pair.serialize_der());
        let peer_id = peer_id_of(&cert)?;
        Ok(Identity { cert, key, peer_id })
    }

    /// Writes the certificate and private key as PEM to a new file at `path`.
    ///
    /// The file is created with mode 0600 and fsynced, as is its directory. An
    /// existing file is never replaced: that would destroy a key peers have pinned.
    pub fn save(&self, path: &Path) -> Result<(), IdentityError> {
        let io_error = |source| IdentityError::Io {
            path: path.to_owned(),
            source,
        };
        let mut options = OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut file = options.open(path).map_err(|source| {
            if source.kind() == io::ErrorKind::AlreadyExists {
                IdentityError::AlreadyExists {
                    path: path.to_owned(),
                }
            } else {
                io_error(source)
            }
        })?;

        let written = write_pem(&mut file, &self.cert, &self.key).and_then(|()| file.sync_all());
        if let Err(source) = written {
            // The file is ours and incomplete; leaving it would block the next attempt.
            drop(file);
            let _ = fs::remove_file(path);
            return Err(io_error(source));
        }
        sync_parent_dir(path).map_err(io_error)
    }

    /// Reads an identity written by [`save`](Identity::save).
    ///
    /// Errors name the file. The key must match the certificate.
    pub fn load(path: &Path) -> Result<Identity, IdentityError> {
        let io_error = |source| IdentityError::Io {
            path: path.to_owned(),
            source,
        };
        let file = File::open(path).map_err(io_error)?;
        warn_if_readable_by_others(path, &file);
        let mut pem_bytes = Vec::new();
        file.take(IDENTITY_FILE_BYTES_MAX + 1)
            .read_to_end(&mut pem_bytes)
            .map_err(io_error)?;
        if pem_bytes.len() as u64 > IDENTITY_FILE_BYTES_MAX {
            return Err(IdentityError::FileTooLarge {
                path: path.to_owned(),
                max: IDENTITY_FILE_BYTES_MAX,
            });
        }

        let pem_error = |section| {
            move |source| IdentityError::Pem {
                path: path.to_owned(),
                section,
                source,
            }
        };
        let cert = CertificateDer::from_pem_slice(&pem_bytes).map_err(pem_error("CERTIFICATE"))?;
        let key =
            PrivatePkcs8KeyDer::from_pem_slice(&pem_bytes).map_err(pem_error("PRIVATE KEY"))?;

        let invalid =
            |source: Box<dyn std::error::Error + Send + Sync>| IdentityError::InvalidKey {
                path: path.to_owned(),
                source,
            };
        let peer_id = peer_id_of(&cert).map_err(|e| invalid(Box::new(e)))?;
        let certified = CertifiedKey::from_der(
            vec![cert.clone()],
            PrivateKeyDer::Pkcs8(key.clone_key()),
            &default_provider(),
        )
        .map_err(|e| invalid(Box::new(e)))?;
        certified.keys_match().map_err(|e| invalid(Box::new(e)))?;

        Ok(Identity { cert, key, peer_id })
    }

    /// The id peers know this agent by.
    pub fn peer_id(&self) -> PeerId {
        self.peer_id
    }

    /// The self-signed certificate presented in TLS handshakes.
    pub fn cert(&self) -> &CertificateDer<'static> {
        &self.cert
    }

    /// The PKCS#8 private key; hand it only to TLS configuration.
    pub fn key(&self) -> &PrivatePkcs8KeyDer<'static> {
        &self.key
    }
}

fn write_pem(
    file: &mut File,
    cert: &CertificateDer<'_>,
    key: &PrivatePkcs8KeyDer<'_>,
) -> io::Result<()> {
    let sections = [
        Pem::new("CERTIFICATE", cert.as_ref()),
        Pem::new("PRIVATE KEY", key.secret_pkcs8_der()),
    ];
    let text = encode_many_config(
        &sections,
        EncodeConfig::new().set_line_ending(LineEnding::LF),
    );
    file.write_all(text.as_bytes())
}

/// Makes the new directory entry durable, not just the file's contents.
fn sync_parent_dir(path: &Path) -> io::Result<()> {
    #[cfg(unix)]
    {
        let parent = match path.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent,
            _ => Path::new("."),
        };
        File::open(parent)?.sync_all()?;
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

fn warn_if_readable_by_others(path: &Path, file: &File) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(metadata) = file.metadata() {
            let mode = metadata.permissions().mode();
            if mode & 0o077 != 0 {
                tracing::warn!(
                    path = %path.display(),
                    mode = format_args!("{:o}", mode & 0o777),
                    "identity file is accessible to other users; it should be mode 0600",
                );
            }
        }
    }
    #[cfg(not(unix))]
    let _ = (path, file);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_id_text_round_trips() -> Result<(), IdentityError> {
        for bytes in [[0u8; 32], [0xff; 32], core::array::from_fn(|i| i as u8)] {
            let id = PeerId::from_bytes(bytes);
            let text = id.to_string();
            assert_eq!(text.len(), PEER_ID_CHARS);
            assert!(
                text.bytes()
                    .all(|b| b.is_ascii_lowercase() || (b'2'..=b'7').contains(&b))
            );
            assert_eq!(text.parse::<PeerId>()?, id);
            assert_eq!(text.to_uppercase().parse::<PeerId>()?, id);
            assert_eq!(format!("{id:?}"), text);
        }
        Ok(())
    }

    #[test]
    fn peer_id_matches_rfc4648_base32() -> Result<(), IdentityError> {
        // "foobar" in RFC 4648 base32 is MZXW6YTBOI; the id starts with those bytes.
        let mut bytes = [0u8; 32];
        bytes[..6].copy_from_slice(b"foobar");
        let text = PeerId::from_bytes(bytes).to_string();
        assert!(text.starts_with("mzxw6ytboi"), "{text}");
        Ok(())
    }

    #[test]
    fn peer_id_parse_errors_name_the_input() {
        let short = "abc";
        let err = short.parse::<PeerId>().expect_err("too short");
        assert!(matches!(err, IdentityError::PeerIdLength { len: 3, .. }));
        assert!(err.to_string().contains("\"abc\""), "{err}");

        let bad_char = format!("{}1", "a".repeat(PEER_ID_CHARS - 1));
        let err = bad_char.parse::<PeerId>().expect_err("bad character");
        assert!(
            matches!(
                err,
                IdentityError::PeerIdCharacter {
                    character: '1',
                    position,
                    ..
                } if position == PEER_ID_CHARS - 1
            ),
            "{err}"
        );
        assert!(err.to_string().contains(&bad_char), "{err}");

        // The last character carries one data bit; 'b' sets a padding bit.
        let not_canonical = format!("{}b", "a".repeat(PEER_ID_CHARS - 1));
        let err = not_canonical.parse::<PeerId>().expect_err("not canonical");
        assert!(
            matches!(err, IdentityError::PeerIdNotCanonical { .. }),
            "{err}"
        );

        let huge = "x".repeat(10_000);
        let err = huge.parse::<PeerId>().expect_err("too long");
        assert!(err.to_string().len() < 300, "{err}");
    }

    #[test]
    fn peer_id_serde_uses_the_text_form() -> Result<(), Box<dyn std::error::Error>> {
        let id = Identity::generate()?.peer_id();
        let json = serde_json::to_string(&id)?;
        assert_eq!(json, format!("\"{id}\""));
        assert_eq!(serde_json::from_str::<PeerId>(&json)?, id);
        assert!(serde_json::from_str::<PeerId>("\"nope\"").is_err());
        Ok(())
    }

    #[test]
    fn peer_id_is_stable_and_distinct() -> Result<(), IdentityError> {
        let a = Identity::generate()?;
        let b = Identity::generate()?;
        assert_ne!(a.peer_id(), b.peer_id());
        assert_eq!(peer_id_of(a.cert())?, a.peer_id());
        assert!(matches!(
            peer_id_of(&CertificateDer::from(vec![1, 2, 3])),
            Err(IdentityError::Certificate(_))
        ));
        Ok(())
    }

    #[test]
    fn save_then_load_round_trips() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("identity.pem");
        let identity = Identity::generate()?;
        identity.save(&path)?;

        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(fs::metadata(&path)?.permissions().mode() & 0o777, 0o600);
        }

        let loaded = Identity::load(&path)?;
        assert_eq!(loaded.peer_id(), identity.peer_id());
        assert_eq!(loaded.cert(), identity.cert());
        assert_eq!(
            loaded.key().secret_pkcs8_der(),
            identity.key().secret_pkcs8_der()
        );
        Ok(())
    }

    #[test]
    fn save_refuses_to_overwrite() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("identity.pem");
        let first = Identity::generate()?;
        first.save(&path)?;

        let err = Identity::generate()?
            .save(&path)
            .expect_err("overwrite must fail");
        assert!(matches!(err, IdentityError::AlreadyExists { .. }), "{err}");
        assert_eq!(Identity::load(&path)?.peer_id(), first.peer_id());
        Ok(())
    }

    #[test]
    fn load_errors_name_the_file() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let missing = dir.path().join("missing.pem");
        let err = Identity::load(&missing).expect_err("missing file");
        assert!(err.to_string().contains("missing.pem"), "{err}");

        let garbage = dir.path().join("garbage.pem");
        fs::write(&garbage, "not pem at all")?;
        let err = Identity::load(&garbage).expect_err("no sections");
        assert!(matches!(err, IdentityError::Pem { .. }), "{err}");
        assert!(err.to_string().contains("garbage.pem"), "{err}");

        // A certificate paired with someone else's key is refused.
        let a = Identity::generate()?;
        let b = Identity::generate()?;
        let mixed = dir.path().join("mixed.pem");
        let mut file = File::create(&mixed)?;
        write_pem(&mut file, a.cert(), b.key())?;
        drop(file);
        let err = Identity::load(&mixed).expect_err("mismatched key");
        assert!(matches!(err, IdentityError::InvalidKey { .. }), "{err}");
        assert!(err.to_string().contains("mixed.pem"), "{err}");
        Ok(())
    }
}
