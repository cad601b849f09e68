//! The users file, `users.toml` in the data folder: one entry per identity
//! made with `majordome user add`, holding the SHA-256 of its secret. The
//! secrets are made here (192 random bits), shown once and never stored:
//! for a secret that long a fast hash is as safe as a slow one, and the
//! ZAP handler checks a password at every connection without cost. The
//! file is written whole (a temporary file, synced, then renamed) and
//! readable by its owner only.
//!
//! [`Credentials`] is what the ZAP handler asks: the file's users (read
//! again when the file changes, so `majordome user add` needs no restart)
//! plus the secrets the hub issues for the run (its own clients, the
//! plugins it starts).

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError, RwLock};
use std::time::SystemTime;

use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The users file's name in the data folder.
pub const FILE_NAME: &str = "users.toml";

/// Bytes of randomness in a secret (shown as twice as many hex digits).
const SECRET_BYTES: usize = 24;

/// Why the users file could not be read, written or changed.
#[derive(Debug, thiserror::Error)]
pub enum UsersError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path} is not a valid users file: {why}")]
    Invalid { path: PathBuf, why: String },
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error(
        "'{0}' is not a valid user name: use 1 to 32 lower-case letters, digits and '_', starting with a letter \
         ('majordome' is the hub's own)"
    )]
    BadName(String),
    #[error("there is already a user '{0}' (`majordome user reset {0}` gives it a new secret)")]
    Exists(String),
    #[error("there is no user '{0}'")]
    Unknown(String),
}

/// One identity of the file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    /// The SHA-256 of the secret, in hex.
    pub sha256: String,
    /// When the secret was made (RFC 3339, UTC).
    pub created: String,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    users: BTreeMap<String, Entry>,
}

/// The users file of a data folder, read whole.
#[derive(Debug)]
pub struct Users {
    path: PathBuf,
    file: File,
}

impl Users {
    /// Where the users file of `data` is.
    pub fn path(data: &Path) -> PathBuf {
        data.join(FILE_NAME)
    }

    /// Reads the users file of `data`; none yet is no user.
    pub fn load(data: &Path) -> Result<Users, UsersError> {
        let path = Users::path(data);
        Ok(Users {
            file: load_toml(&path)?,
            path,
        })
    }

    /// Adds `name` with a new secret, which it returns (to be shown once).
    pub fn add(&mut self, name: &str) -> Result<String, UsersError> {
        check_name(name)?;
        if self.file.users.contains_key(name) {
            return Err(UsersError::Exists(name.to_owned()));
        }
        Ok(self.set_secret(name))
    }

    /// Gives `name` a new secret, which it returns; the old one stops
    /// working for new connections.
    pub fn reset(&mut self, name: &str) -> Result<String, UsersError> {
        if !self.file.users.contains_key(name) {
            return Err(UsersError::Unknown(name.to_owned()));
        }
        Ok(self.set_secret(name))
    }

    fn set_secret(&mut self, name: &str) -> String {
        let secret = new_secret();
        self.file.users.insert(
            name.to_owned(),
            Entry {
                sha256: hex(&digest(secret.as_bytes())),
                created: jiff::Timestamp::now()
                    .round(jiff::Unit::Second)
                    .unwrap_or_default()
                    .to_string(),
            },
        );
        secret
    }

    /// Removes `name`.
    pub fn remove(&mut self, name: &str) -> Result<(), UsersError> {
        self.file
            .users
            .remove(name)
            .map(|_| ())
            .ok_or_else(|| UsersError::Unknown(name.to_owned()))
    }

    /// The users, by name.
    pub fn entries(&self) -> impl Iterator<Item = (&str, &Entry)> {
        self.file.users.iter().map(|(name, entry)| (name.as_str(), entry))
    }

    /// Whether there is no user.
    pub fn is_empty(&self) -> bool {
        self.file.users.is_empty()
    }

    /// Writes the file: readable by its owner only, replaced whole.
    pub fn save(&self) -> Result<(), UsersError> {
        save_owner_only(
            &self.path,
            "# Made by `majordome user`: each secret is kept as its SHA-256 and was shown once.",
            &self.file,
        )
    }
}

/// Reads a TOML file of this folder's kind; none is its default (empty).
pub(crate) fn load_toml<T: Default + serde::de::DeserializeOwned>(path: &Path) -> Result<T, UsersError> {
    match std::fs::read_to_string(path) {
        Ok(text) => toml::from_str(&text).map_err(|e| UsersError::Invalid {
            path: path.to_owned(),
            why: e.to_string(),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(T::default()),
        Err(source) => Err(UsersError::Read {
            path: path.to_owned(),
            source,
        }),
    }
}

/// Writes `content` as TOML after the `header` comment line: a temporary
/// file readable by its owner only (`mode` applies only to a file it
/// creates, so the permissions are set again), synced, then renamed over
/// `path`.
pub(crate) fn save_owner_only<T: Serialize>(path: &Path, header: &str, content: &T) -> Result<(), UsersError> {
    let write_error = |source| UsersError::Write {
        path: path.to_owned(),
        source,
    };
    if let Some(folder) = path.parent() {
        std::fs::create_dir_all(folder).map_err(write_error)?;
    }
    let text = format!(
        "{header}\n{}",
        toml::to_string(content).map_err(|e| write_error(std::io::Error::other(e)))?
    );
    let temporary = path.with_extension("toml.tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&temporary)
        .map_err(write_error)?;
    file.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .map_err(write_error)?;
    file.write_all(text.as_bytes()).map_err(write_error)?;
    file.sync_all().map_err(write_error)?;
    std::fs::rename(&temporary, path).map_err(write_error)?;
    Ok(())
}

/// Whether `name` may be a user's: `[a-z][a-z0-9_]{0,31}`, not the hub's.
pub fn check_name(name: &str) -> Result<(), UsersError> {
    let mut chars = name.chars();
    let valid = name.len() <= 32
        && chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && name != crate::HUB_IDENTITY;
    if valid {
        Ok(())
    } else {
        Err(UsersError::BadName(name.to_owned()))
    }
}

/// A new secret: 192 random bits in hex.
pub fn new_secret() -> String {
    let mut bytes = [0u8; SECRET_BYTES];
    rand::rng().fill_bytes(&mut bytes);
    hex(&bytes)
}

pub(crate) fn digest(secret: &[u8]) -> [u8; 32] {
    Sha256::digest(secret).into()
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub(crate) fn unhex(text: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    if text.len() != 64 {
        return None;
    }
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// Compares two digests in a time that does not depend on where they
/// differ.
pub(crate) fn same(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// What tells a version of a file apart: its modification time, length
/// and inode (the files are replaced by a rename, so a new version has a
/// new inode even within one tick of the clock).
pub(crate) type Stamp = (SystemTime, u64, u64);

/// The stamp of the file at `path`, if there is one.
pub(crate) fn stamp(path: &Path) -> Option<Stamp> {
    use std::os::unix::fs::MetadataExt;
    let metadata = std::fs::metadata(path).ok()?;
    Some((
        metadata.modified().unwrap_or(SystemTime::UNIX_EPOCH),
        metadata.len(),
        metadata.ino(),
    ))
}

/// The file as last read, and what told it apart.
#[derive(Default)]
struct Cached {
    stamp: Option<Stamp>,
    digests: HashMap<String, [u8; 32]>,
}

/// What the ZAP handler checks a login against: the users file of the
/// data folder and the secrets issued for this run.
pub struct Credentials {
    path: PathBuf,
    cached: Mutex<Cached>,
    issued: RwLock<HashMap<String, [u8; 32]>>,
}

impl Credentials {
    /// The credentials of the data folder `data`.
    pub fn new(data: &Path) -> Credentials {
        let credentials = Credentials {
            path: Users::path(data),
            cached: Mutex::default(),
            issued: RwLock::default(),
        };
        credentials.refresh(&mut credentials.cached.lock().unwrap_or_else(PoisonError::into_inner));
        credentials
    }

    /// Makes a secret for `identity`, good until this process ends or
    /// [`Credentials::revoke`]; returns it.
    pub fn issue(&self, identity: &str) -> String {
        let secret = new_secret();
        self.issued
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(identity.to_owned(), digest(secret.as_bytes()));
        secret
    }

    /// Forgets what [`Credentials::issue`] made for `identity`.
    pub fn revoke(&self, identity: &str) {
        self.issued
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(identity);
    }

    /// Whether `password` is `user`'s secret.
    pub fn verify(&self, user: &str, password: &[u8]) -> bool {
        let given = digest(password);
        if let Some(expected) = self.issued.read().unwrap_or_else(PoisonError::into_inner).get(user) {
            return same(expected, &given);
        }
        let mut cached = self.cached.lock().unwrap_or_else(PoisonError::into_inner);
        self.refresh(&mut cached);
        cached.digests.get(user).is_some_and(|expected| same(expected, &given))
    }

    /// Whether the users file names `user`.
    pub fn knows(&self, user: &str) -> bool {
        let mut cached = self.cached.lock().unwrap_or_else(PoisonError::into_inner);
        self.refresh(&mut cached);
        cached.digests.contains_key(user)
    }

    /// Whether the users file names anybody.
    pub fn has_users(&self) -> bool {
        let mut cached = self.cached.lock().unwrap_or_else(PoisonError::into_inner);
        self.refresh(&mut cached);
        !cached.digests.is_empty()
    }

    /// Reads the file again if it changed since last time (a `stat` per
    /// login).
    fn refresh(&self, cached: &mut Cached) {
        let stamp = stamp(&self.path);
        if stamp == cached.stamp && stamp.is_some() {
            return;
        }
        let data = self.path.parent().unwrap_or(Path::new("."));
        match Users::load(data) {
            Ok(users) => {
                // A name `user add` would refuse (the hub's, a plugin's) is
                // nobody's, even written in by hand.
                cached.digests = users
                    .entries()
                    .filter(|(name, _)| check_name(name).is_ok())
                    .filter_map(|(name, entry)| Some((name.to_owned(), unhex(&entry.sha256)?)))
                    .collect();
                cached.stamp = stamp;
            }
            // Keep what was read last: a half-edited file does not lock
            // everybody out.
            Err(e) => tracing::warn!("{e}; logins use the users read before"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_user_added_can_log_in_with_the_secret_shown_once_and_no_other() {
        let dir = tempfile::tempdir().unwrap();
        let credentials = Credentials::new(dir.path());
        assert!(!credentials.has_users());
        let mut users = Users::load(dir.path()).unwrap();
        let secret = users.add("alice").unwrap();
        users.save().unwrap();
        assert_eq!(secret.len(), 2 * SECRET_BYTES);
        let text = std::fs::read_to_string(Users::path(dir.path())).unwrap();
        assert!(!text.contains(&secret), "the secret itself is never stored");
        let mode = std::fs::metadata(Users::path(dir.path())).unwrap().permissions();
        assert_eq!(std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777, 0o600);
        // Read again without a restart.
        assert!(credentials.verify("alice", secret.as_bytes()));
        assert!(!credentials.verify("alice", b"wrong"));
        assert!(!credentials.verify("bob", secret.as_bytes()));
        assert!(credentials.has_users());
    }

    #[test]
    fn names_are_checked_and_duplicates_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut users = Users::load(dir.path()).unwrap();
        for bad in ["", "Alice", "1x", "a.b", "a-b", "majordome", &"x".repeat(33)] {
            assert!(matches!(users.add(bad), Err(UsersError::BadName(_))), "{bad:?}");
        }
        users.add("bob").unwrap();
        assert!(matches!(users.add("bob"), Err(UsersError::Exists(_))));
        assert!(matches!(users.remove("carol"), Err(UsersError::Unknown(_))));
    }

    #[test]
    fn a_reset_secret_replaces_the_old_one_and_a_removed_user_is_gone() {
        let dir = tempfile::tempdir().unwrap();
        let credentials = Credentials::new(dir.path());
        let mut users = Users::load(dir.path()).unwrap();
        let first = users.add("bob").unwrap();
        users.save().unwrap();
        assert!(credentials.verify("bob", first.as_bytes()));
        let second = users.reset("bob").unwrap();
        users.save().unwrap();
        assert!(credentials.verify("bob", second.as_bytes()));
        assert!(!credentials.verify("bob", first.as_bytes()));
        users.remove("bob").unwrap();
        users.save().unwrap();
        assert!(!credentials.verify("bob", second.as_bytes()));
    }

    #[test]
    fn issued_secrets_live_as_long_as_the_process_unless_revoked() {
        let dir = tempfile::tempdir().unwrap();
        let credentials = Credentials::new(dir.path());
        let secret = credentials.issue("plugin-fake.box");
        assert!(credentials.verify("plugin-fake.box", secret.as_bytes()));
        assert!(!credentials.verify("plugin-fake.box", b"guess"));
        credentials.revoke("plugin-fake.box");
        assert!(!credentials.verify("plugin-fake.box", secret.as_bytes()));
    }
}
