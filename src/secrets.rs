//! Secrets sealed at rest: XChaCha20-Poly1305 with a host key kept in a
//! file of its own (0600, beside the state database, never in it). Each
//! secret is sealed with a fresh random nonce and its group and name as
//! associated data, so a sealed value moved to another name (by someone
//! with the database but not the key) does not open.

use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use zeroize::Zeroizing;

use crate::store::SealedSecret;

const KEY_BYTES: usize = 32;
const NONCE_BYTES: usize = 24;
/// The largest secret value.
pub const MAX_SECRET_BYTES: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("the secret key file {path}: {source}")]
    KeyFile {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the secret key file {path} {why}")]
    BadKeyFile { path: String, why: String },
    #[error(
        "secret {0} does not open with this host's key (a different key, or a damaged record)"
    )]
    DoesNotOpen(String),
    #[error("reading random bytes: {0}")]
    Random(#[source] std::io::Error),
}

pub struct Sealer {
    cipher: XChaCha20Poly1305,
}

fn random<const N: usize>() -> Result<[u8; N], SecretError> {
    let mut bytes = [0u8; N];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(SecretError::Random)?;
    Ok(bytes)
}

fn slot(group: &str, name: &str) -> Vec<u8> {
    format!("capsule-secret\0{group}\0{name}").into_bytes()
}

impl Sealer {
    /// The key in `path`, made (32 random bytes, 0600) if the file does not
    /// exist. A key file anyone else can read or write, that is not a
    /// regular file of ours, or of the wrong size is refused.
    pub fn open_or_create(path: &Path) -> Result<Sealer, SecretError> {
        let shown = path.display().to_string();
        let key_file = |source| SecretError::KeyFile {
            path: shown.clone(),
            source,
        };
        let bad = |why: &str| SecretError::BadKeyFile {
            path: shown.clone(),
            why: why.to_string(),
        };
        let key: Zeroizing<[u8; KEY_BYTES]> = match std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)
        {
            Ok(mut f) => {
                let meta = f.metadata().map_err(key_file)?;
                if !meta.is_file() {
                    return Err(bad("is not a regular file"));
                }
                if meta.uid() != nix::unistd::Uid::effective().as_raw() {
                    return Err(bad("belongs to another user"));
                }
                if meta.permissions().mode() & 0o077 != 0 {
                    return Err(bad("can be read or written by others (chmod 600 it)"));
                }
                let mut key = Zeroizing::new([0u8; KEY_BYTES]);
                let mut rest = Vec::new();
                f.read_exact(&mut key[..])
                    .map_err(|_| bad("is shorter than a key"))?;
                f.read_to_end(&mut rest).map_err(key_file)?;
                if !rest.is_empty() {
                    return Err(bad("is longer than a key"));
                }
                key
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let key = Zeroizing::new(random::<KEY_BYTES>()?);
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(path)
                    .map_err(key_file)?;
                f.write_all(&key[..])
                    .and_then(|_| f.sync_all())
                    .map_err(key_file)?;
                key
            }
            Err(e) => return Err(key_file(e)),
        };
        Ok(Sealer {
            cipher: XChaCha20Poly1305::new(key.as_ref().into()),
        })
    }

    pub fn seal(&self, group: &str, name: &str, value: &[u8]) -> Result<SealedSecret, SecretError> {
        let nonce = random::<NONCE_BYTES>()?;
        let sealed = self
            .cipher
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: value,
                    aad: &slot(group, name),
                },
            )
            .map_err(|_| SecretError::DoesNotOpen(format!("{group}/{name}")))?;
        Ok(SealedSecret {
            nonce: nonce.to_vec(),
            sealed,
        })
    }

    pub fn open(
        &self,
        group: &str,
        name: &str,
        secret: &SealedSecret,
    ) -> Result<Zeroizing<Vec<u8>>, SecretError> {
        let fails = || SecretError::DoesNotOpen(format!("{group}/{name}"));
        if secret.nonce.len() != NONCE_BYTES {
            return Err(fails());
        }
        self.cipher
            .decrypt(
                XNonce::from_slice(&secret.nonce),
                Payload {
                    msg: &secret.sealed,
                    aad: &slot(group, name),
                },
            )
            .map(Zeroizing::new)
            .map_err(|_| fails())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_secret_opens_only_with_its_key_and_in_its_place() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret.key");
        let sealer = Sealer::open_or_create(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let sealed = sealer.seal("team", "API_KEY", b"hunter2").unwrap();
        assert!(!sealed.sealed.windows(7).any(|w| w == b"hunter2"));
        assert_eq!(
            &sealer.open("team", "API_KEY", &sealed).unwrap()[..],
            b"hunter2"
        );
        // The same key, read back from its file.
        let again = Sealer::open_or_create(&path).unwrap();
        assert_eq!(
            &again.open("team", "API_KEY", &sealed).unwrap()[..],
            b"hunter2"
        );
        // Moved to another name or group: refused.
        assert!(sealer.open("team", "OTHER", &sealed).is_err());
        assert!(sealer.open("other", "API_KEY", &sealed).is_err());
        // Damaged: refused.
        let mut damaged = SealedSecret {
            nonce: sealed.nonce.clone(),
            sealed: sealed.sealed.clone(),
        };
        damaged.sealed[0] ^= 1;
        assert!(sealer.open("team", "API_KEY", &damaged).is_err());
        damaged.nonce.truncate(3);
        assert!(sealer.open("team", "API_KEY", &damaged).is_err());
        // Another key: refused.
        let other = Sealer::open_or_create(&dir.path().join("other.key")).unwrap();
        let err = other.open("team", "API_KEY", &sealed).unwrap_err();
        assert!(err.to_string().contains("does not open"), "{err}");
    }

    #[test]
    fn a_key_file_others_can_read_or_of_the_wrong_size_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret.key");
        drop(Sealer::open_or_create(&path).unwrap());
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = Sealer::open_or_create(&path).err().unwrap();
        assert!(err.to_string().contains("chmod 600"), "{err}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::write(&path, [1u8; 5]).unwrap();
        let err = Sealer::open_or_create(&path).err().unwrap();
        assert!(err.to_string().contains("shorter"), "{err}");
        std::fs::write(&path, [1u8; 40]).unwrap();
        let err = Sealer::open_or_create(&path).err().unwrap();
        assert!(err.to_string().contains("longer"), "{err}");
        let link = dir.path().join("link.key");
        std::os::unix::fs::symlink(&path, &link).unwrap();
        assert!(Sealer::open_or_create(&link).is_err());
    }
}
