//! The Kafka API's users: a credentials file (`kafka_api.sasl.credentials_file`) that
//! holds, per user and SCRAM mechanism, the salt, the iteration count, StoredKey and
//! ServerKey (RFC 5802) — never a password. `weir kafka-user add` makes an entry from
//! a password read from stdin or a file; PLAIN is checked against the SCRAM entry.
//!
//! The file is TOML, rewritten whole (temporary file, fsync, rename) with mode 0600:
//! ```toml
//! [users.dashboard.SCRAM-SHA-256]
//! salt = "base64"
//! iterations = 4096
//! stored_key = "base64"
//! server_key = "base64"
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use serde::{Deserialize, Serialize};

use crate::core::sasl::{Mechanism, SCRAM_ITERATIONS_MAX, SCRAM_ITERATIONS_MIN};
use crate::core::sasl_server::{ScramCredential, PASSWORD_BYTES_MAX};

/// The longest user name, and its alphabet: `a-z A-Z 0-9 . _ - @` (the principal
/// `User:NAME` appears in ACLs and logs).
pub const USERNAME_BYTES_MAX: usize = 255;
/// Users one file may hold.
pub const USERS_MAX: usize = 10_000;
/// The largest credentials file read.
const FILE_BYTES_MAX: u64 = 16 << 20;
/// Salt bytes of a new entry.
const SALT_BYTES: usize = 32;
/// PBKDF2 rounds of a new entry (Kafka's default).
pub const ITERATIONS_DEFAULT: u32 = 4096;

pub fn is_username(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= USERNAME_BYTES_MAX
        && name.bytes().all(|byte| byte.is_ascii_alphanumeric() || b"._-@".contains(&byte))
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CredentialsError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: {why}")]
    Invalid { path: PathBuf, why: String },
    #[error("{0:?} is not a user name (1..=255 of a-z A-Z 0-9 . _ - @)")]
    BadName(String),
    #[error("the password is empty or longer than {PASSWORD_BYTES_MAX} bytes")]
    BadPassword,
    #[error("--iterations must be within {SCRAM_ITERATIONS_MIN}..={SCRAM_ITERATIONS_MAX}")]
    BadIterations,
    #[error("no system randomness for a salt")]
    Randomness,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileText {
    #[serde(default)]
    users: BTreeMap<String, UserText>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct UserText {
    #[serde(rename = "SCRAM-SHA-256", default, skip_serializing_if = "Option::is_none")]
    scram_sha_256: Option<EntryText>,
    #[serde(rename = "SCRAM-SHA-512", default, skip_serializing_if = "Option::is_none")]
    scram_sha_512: Option<EntryText>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct EntryText {
    salt: String,
    iterations: u32,
    stored_key: String,
    server_key: String,
}

impl EntryText {
    fn of(credential: &ScramCredential) -> EntryText {
        EntryText {
            salt: BASE64.encode(&credential.salt),
            iterations: credential.iterations,
            stored_key: BASE64.encode(&credential.stored_key),
            server_key: BASE64.encode(&credential.server_key),
        }
    }

    fn credential(&self, mechanism: Mechanism) -> Result<ScramCredential, String> {
        let decode = |field: &str, text: &str| BASE64.decode(text).map_err(|_| format!("{field} is not base64"));
        let credential = ScramCredential {
            salt: decode("salt", &self.salt)?,
            iterations: self.iterations,
            stored_key: decode("stored_key", &self.stored_key)?,
            server_key: decode("server_key", &self.server_key)?,
        };
        if !credential.fits(mechanism) {
            return Err(format!(
                "not a {} credential (key lengths of its hash, a salt, iterations within \
                 {SCRAM_ITERATIONS_MIN}..={SCRAM_ITERATIONS_MAX})",
                mechanism.name()
            ));
        }
        Ok(credential)
    }
}

/// The loaded users, looked up by name and mechanism.
#[derive(Default)]
pub struct Credentials {
    users: BTreeMap<String, (Option<ScramCredential>, Option<ScramCredential>)>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.debug_struct("Credentials").field("users", &self.users.len()).finish()
    }
}

fn read_text(path: &Path) -> Result<Option<FileText>, CredentialsError> {
    let io_error = |source| CredentialsError::Io { path: path.to_owned(), source };
    match std::fs::metadata(path) {
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(io_error(error)),
        Ok(metadata) if metadata.len() > FILE_BYTES_MAX => {
            return Err(CredentialsError::Invalid {
                path: path.to_owned(),
                why: format!("larger than {FILE_BYTES_MAX} bytes"),
            })
        }
        Ok(_) => {}
    }
    let text = std::fs::read_to_string(path).map_err(io_error)?;
    toml::from_str(&text)
        .map(Some)
        .map_err(|error| CredentialsError::Invalid { path: path.to_owned(), why: error.message().to_owned() })
}

impl Credentials {
    /// Reads and checks every entry of the file.
    pub fn load(path: &Path) -> Result<Credentials, CredentialsError> {
        let invalid = |why: String| CredentialsError::Invalid { path: path.to_owned(), why };
        let Some(text) = read_text(path)? else {
            return Err(CredentialsError::Io { path: path.to_owned(), source: std::io::ErrorKind::NotFound.into() });
        };
        if text.users.len() > USERS_MAX {
            return Err(invalid(format!("more than {USERS_MAX} users")));
        }
        let mut users = BTreeMap::new();
        for (name, user) in text.users {
            if !is_username(&name) {
                return Err(invalid(format!("{name:?} is not a user name (1..=255 of a-z A-Z 0-9 . _ - @)")));
            }
            let entry = |entry: &Option<EntryText>, mechanism: Mechanism| {
                entry
                    .as_ref()
                    .map(|entry| entry.credential(mechanism))
                    .transpose()
                    .map_err(|why| invalid(format!("users.{name}.{}: {why}", mechanism.name())))
            };
            let sha256 = entry(&user.scram_sha_256, Mechanism::ScramSha256)?;
            let sha512 = entry(&user.scram_sha_512, Mechanism::ScramSha512)?;
            users.insert(name, (sha256, sha512));
        }
        Ok(Credentials { users })
    }

    /// `user`'s credential for a SCRAM `mechanism`.
    pub fn lookup(&self, user: &str, mechanism: Mechanism) -> Option<ScramCredential> {
        let (sha256, sha512) = self.users.get(user)?;
        match mechanism {
            Mechanism::ScramSha256 => sha256.clone(),
            Mechanism::ScramSha512 => sha512.clone(),
            Mechanism::Plain => None,
        }
    }

    pub fn len(&self) -> usize {
        self.users.len()
    }

    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.users.keys().map(String::as_str)
    }
}

/// Writes the file whole: a temporary file (0600) beside it, fsync, rename.
fn write_text(path: &Path, text: &FileText) -> Result<(), CredentialsError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let io_error = |source| CredentialsError::Io { path: path.to_owned(), source };
    let body = toml::to_string(text)
        .map_err(|error| CredentialsError::Invalid { path: path.to_owned(), why: error.to_string() })?;
    let temporary = path.with_extension("tmp");
    let _ = std::fs::remove_file(&temporary);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(crate::certs::KEY_FILE_MODE)
        .open(&temporary)
        .map_err(io_error)?;
    file.write_all(
        b"# weir's Kafka API users (kafka_api.sasl.credentials_file): SCRAM credentials, no passwords.\n\
          # Made by `weir kafka-user add NAME --credentials FILE` (docs/KAFKA_API.md).\n",
    )
    .map_err(io_error)?;
    file.write_all(body.as_bytes()).map_err(io_error)?;
    file.sync_all().map_err(io_error)?;
    std::fs::rename(&temporary, path).map_err(io_error)?;
    if let Some(directory) = path.parent().filter(|parent| !parent.as_os_str().is_empty()) {
        std::fs::File::open(directory).and_then(|directory| directory.sync_all()).map_err(io_error)?;
    }
    Ok(())
}

/// Adds `name` (or replaces its entries) with SCRAM-SHA-256 and SCRAM-SHA-512
/// credentials of `password`, each with a fresh random salt. The file is made if
/// missing. Returns whether the user existed.
pub fn add_user(path: &Path, name: &str, password: &[u8], iterations: u32) -> Result<bool, CredentialsError> {
    if !is_username(name) {
        return Err(CredentialsError::BadName(name.to_owned()));
    }
    if password.is_empty() || password.len() > PASSWORD_BYTES_MAX {
        return Err(CredentialsError::BadPassword);
    }
    if !(SCRAM_ITERATIONS_MIN..=SCRAM_ITERATIONS_MAX).contains(&iterations) {
        return Err(CredentialsError::BadIterations);
    }
    let mut text = read_text(path)?.unwrap_or_default();
    let derive = |mechanism| {
        let mut salt = [0u8; SALT_BYTES];
        rustls::crypto::ring::default_provider()
            .secure_random
            .fill(&mut salt)
            .map_err(|_| CredentialsError::Randomness)?;
        Ok::<_, CredentialsError>(EntryText::of(&ScramCredential::derive(mechanism, password, &salt, iterations)))
    };
    let user = UserText {
        scram_sha_256: Some(derive(Mechanism::ScramSha256)?),
        scram_sha_512: Some(derive(Mechanism::ScramSha512)?),
    };
    let existed = text.users.insert(name.to_owned(), user).is_some();
    write_text(path, &text)?;
    Ok(existed)
}

/// Removes `name`; whether it was there.
pub fn remove_user(path: &Path, name: &str) -> Result<bool, CredentialsError> {
    let Some(mut text) = read_text(path)? else { return Ok(false) };
    let existed = text.users.remove(name).is_some();
    if existed {
        write_text(path, &text)?;
    }
    Ok(existed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn added_users_load_and_verify_their_password_and_nothing_stores_it() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("users.toml");
        assert!(!add_user(&path, "dashboard", b"correct horse", 4096).unwrap());
        assert!(!add_user(&path, "alarms", b"battery staple", 4096).unwrap());
        assert!(add_user(&path, "alarms", b"new staple", 4096).unwrap(), "replaced");
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(!text.contains("correct horse") && !text.contains("staple"), "{text}");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        let credentials = Credentials::load(&path).unwrap();
        assert_eq!(credentials.names().collect::<Vec<_>>(), ["alarms", "dashboard"]);
        for mechanism in [Mechanism::ScramSha256, Mechanism::ScramSha512] {
            let stored = credentials.lookup("dashboard", mechanism).unwrap();
            assert!(stored.verify_password(mechanism, b"correct horse"));
            assert!(!stored.verify_password(mechanism, b"correct horsE"));
            assert!(credentials.lookup("alarms", mechanism).unwrap().verify_password(mechanism, b"new staple"));
        }
        assert!(credentials.lookup("nobody", Mechanism::ScramSha256).is_none());
        assert!(remove_user(&path, "alarms").unwrap());
        assert!(!remove_user(&path, "alarms").unwrap());
        assert_eq!(Credentials::load(&path).unwrap().len(), 1);
    }

    #[test]
    fn bad_names_passwords_and_files_are_refused_with_the_reason() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("users.toml");
        assert!(matches!(add_user(&path, "User:x", b"pw", 4096), Err(CredentialsError::BadName(_))));
        assert!(matches!(add_user(&path, "x", b"", 4096), Err(CredentialsError::BadPassword)));
        assert!(matches!(add_user(&path, "x", b"pw", 1), Err(CredentialsError::BadIterations)));
        assert!(matches!(Credentials::load(&path), Err(CredentialsError::Io { .. })));
        std::fs::write(&path, "[users.x.SCRAM-SHA-256]\nsalt = \"c2FsdA==\"\niterations = 4096\nstored_key = \"AA==\"\nserver_key = \"AA==\"\n").unwrap();
        let error = Credentials::load(&path).unwrap_err().to_string();
        assert!(error.contains("users.x.SCRAM-SHA-256") && error.contains("key lengths"), "{error}");
        std::fs::write(&path, "[users.x]\npassword = \"hunter2\"\n").unwrap();
        assert!(matches!(Credentials::load(&path), Err(CredentialsError::Invalid { .. })));
    }
}
