//! Tokens for HTTP clients, `tokens.toml` in the data folder: each made by
//! `majordome token create NAME`, shown once, kept as its SHA-256, and
//! standing for the identity NAME (whose `[permissions.NAME]` apply, or
//! the rules given when it was made). A token reads `<id>.<secret>`: the
//! id finds its entry, the secret proves it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use serde::{Deserialize, Serialize};

use crate::users::{
    check_name, digest, hex, load_toml, new_secret, same, save_owner_only, stamp, unhex, Stamp, UsersError,
};
use crate::Rules;

/// The tokens file's name in the data folder.
pub const FILE_NAME: &str = "tokens.toml";

/// One token of the file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    /// The identity it stands for.
    pub identity: String,
    /// The SHA-256 of its secret, in hex.
    pub sha256: String,
    /// When it was made (RFC 3339, UTC).
    pub created: String,
    /// Rules of its own, given when it was made; else the identity's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rules: Option<Rules>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    tokens: BTreeMap<String, Entry>,
}

/// The tokens file of a data folder, read whole.
#[derive(Debug)]
pub struct Tokens {
    path: PathBuf,
    file: File,
}

impl Tokens {
    pub fn path(data: &Path) -> PathBuf {
        data.join(FILE_NAME)
    }

    /// Reads the tokens of `data`; no file is no token.
    pub fn load(data: &Path) -> Result<Tokens, UsersError> {
        let path = Tokens::path(data);
        Ok(Tokens {
            file: load_toml(&path)?,
            path,
        })
    }

    /// Makes a token for `identity`, with `rules` of its own if given;
    /// returns its id and the token itself (to be shown once).
    pub fn create(&mut self, identity: &str, rules: Option<Rules>) -> Result<(String, String), UsersError> {
        check_name(identity)?;
        let id = new_secret()[..8].to_owned();
        let secret = new_secret();
        self.file.tokens.insert(
            id.clone(),
            Entry {
                identity: identity.to_owned(),
                sha256: hex(&digest(secret.as_bytes())),
                created: jiff::Timestamp::now()
                    .round(jiff::Unit::Second)
                    .unwrap_or_default()
                    .to_string(),
                rules,
            },
        );
        Ok((id.clone(), format!("{id}.{secret}")))
    }

    /// Forgets the token `id`.
    pub fn revoke(&mut self, id: &str) -> Result<(), UsersError> {
        self.file
            .tokens
            .remove(id)
            .map(|_| ())
            .ok_or_else(|| UsersError::Unknown(id.to_owned()))
    }

    pub fn entries(&self) -> impl Iterator<Item = (&str, &Entry)> {
        self.file.tokens.iter().map(|(id, entry)| (id.as_str(), entry))
    }

    pub fn is_empty(&self) -> bool {
        self.file.tokens.is_empty()
    }

    /// Writes the file, owner-only, replaced whole.
    pub fn save(&self) -> Result<(), UsersError> {
        save_owner_only(
            &self.path,
            "# Made by `majordome token`: each token is kept as the SHA-256 of its secret and was shown once.",
            &self.file,
        )
    }
}

/// Who a valid token stands for.
#[derive(Debug, Clone, PartialEq)]
pub struct Bearer {
    pub identity: String,
    pub rules: Option<Rules>,
}

/// What the gateway checks tokens against: the file, read again when it
/// changes.
pub struct TokenCheck {
    path: PathBuf,
    cached: Mutex<(Option<Stamp>, BTreeMap<String, Entry>)>,
}

impl TokenCheck {
    pub fn new(data: &Path) -> TokenCheck {
        TokenCheck {
            path: Tokens::path(data),
            cached: Mutex::default(),
        }
    }

    /// Who `token` stands for, if it is valid.
    pub fn verify(&self, token: &str) -> Option<Bearer> {
        let (id, secret) = token.split_once('.')?;
        let mut cached = self.cached.lock().unwrap_or_else(PoisonError::into_inner);
        let stamp = stamp(&self.path);
        if stamp != cached.0 || stamp.is_none() {
            match Tokens::load(self.path.parent().unwrap_or(Path::new("."))) {
                Ok(tokens) => *cached = (stamp, tokens.file.tokens),
                Err(e) => tracing::warn!("{e}; tokens are checked against those read before"),
            }
        }
        let entry = cached.1.get(id)?;
        let expected = unhex(&entry.sha256)?;
        same(&expected, &digest(secret.as_bytes())).then(|| Bearer {
            identity: entry.identity.clone(),
            rules: entry.rules.clone(),
        })
    }

    /// Whether any token exists.
    pub fn any(&self) -> bool {
        Tokens::load(self.path.parent().unwrap_or(Path::new("."))).is_ok_and(|t| !t.is_empty())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_stands_for_its_identity_until_revoked() {
        let dir = tempfile::tempdir().unwrap();
        let check = TokenCheck::new(dir.path());
        assert!(!check.any());
        let mut tokens = Tokens::load(dir.path()).unwrap();
        let (id, token) = tokens.create("panel", None).unwrap();
        tokens.save().unwrap();
        assert!(!std::fs::read_to_string(Tokens::path(dir.path()))
            .unwrap()
            .contains(token.split_once('.').unwrap().1));
        assert_eq!(check.verify(&token).map(|b| b.identity), Some("panel".to_owned()));
        assert_eq!(check.verify(&format!("{id}.wrong")), None);
        assert_eq!(check.verify("garbage"), None);
        assert!(matches!(tokens.create("Not A Name", None), Err(UsersError::BadName(_))));
        tokens.revoke(&id).unwrap();
        tokens.save().unwrap();
        assert_eq!(check.verify(&token), None);
    }
}
