//! What each identity may do: the `[permissions]` tables of
//! `majordome.toml`, one per identity, plus `[permissions."*"]` for the
//! identities that have none.
//!
//! ```toml
//! [permissions.kitchen_panel]
//! call = ["devices", "history", "manager/client.list.get"]  # service, or service/action
//! publish = []                                               # event categories
//! read = ["/device/"]                                        # Clone keys
//! write = []
//! serve = []                                                 # services its workers may serve
//! ```
//!
//! Each entry is a pattern where `*` stands for any run of characters
//! (`manager/*.get`, `/device/*/temperature`); a Clone entry ending in `/`
//! covers the subtree. In a table, what is not listed is refused. Without
//! any table for it, an identity may do everything (as Mosquitto treats an
//! authenticated user without an ACL), except what is never anybody's: to
//! serve the hub's own services (checked by the broker), and, for a plugin
//! the manager started, to serve any service but its own or to speak for
//! another plugin (checked by the forwarder). The hub and, with
//! `loopback = "trusted"`, anonymous local clients are never checked.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{is_plugin_identity, Who};

/// What one identity may do. Each list holds patterns (`*` for any run of
/// characters).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct Rules {
    /// Services it may call, as `service` (every action) or
    /// `service/action` (the Domogik dialect's action).
    pub call: Vec<String>,
    /// Event categories it may publish (`device.update`, `plugin.*`).
    pub publish: Vec<String>,
    /// Clone keys or subtrees it may read.
    pub read: Vec<String>,
    /// Clone keys or subtrees it may write (and so read: a write is
    /// acknowledged by its update coming back).
    pub write: Vec<String>,
    /// Services its workers may serve.
    pub serve: Vec<String>,
}

/// The permissions of every identity.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Policy {
    tables: BTreeMap<String, Rules>,
}

/// A refusal, with the words that explain it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("permission denied: '{identity}' may not {what}{hint}")]
pub struct Denied {
    pub identity: String,
    pub what: String,
    hint: String,
}

/// The table name of the identities that have none of their own.
pub const ANYONE: &str = "*";

impl Policy {
    /// A policy from tables by identity name.
    pub fn new(tables: BTreeMap<String, Rules>) -> Policy {
        Policy { tables }
    }

    /// This policy with `rules` as `name`'s table (a token's own rules).
    pub fn with_table(&self, name: &str, rules: Rules) -> Policy {
        let mut tables = self.tables.clone();
        tables.insert(name.to_owned(), rules);
        Policy { tables }
    }

    /// The names of its tables (identities, and `*`).
    pub fn tables(&self) -> impl Iterator<Item = &str> {
        self.tables.keys().map(String::as_str)
    }

    /// The table of `name`, else `*`'s; a plugin without a table of its
    /// own keeps the plugins' rules (`*` is for users).
    fn rules(&self, name: &str) -> Option<&Rules> {
        match self.tables.get(name) {
            Some(rules) => Some(rules),
            None if is_plugin_identity(name) => None,
            None => self.tables.get(ANYONE),
        }
    }

    /// May `who` call `service` (with the Domogik `action`, if any)?
    pub fn may_call(&self, who: Who<'_>, service: &str, action: Option<&str>) -> Result<(), Denied> {
        let Who::Named(name) = who else { return Ok(()) };
        let Some(rules) = self.rules(name) else { return Ok(()) };
        let allowed = rules.call.iter().any(|pattern| match pattern.split_once('/') {
            Some((on, what)) => matches(on, service) && action.is_some_and(|a| matches(what, a)),
            None => matches(pattern, service),
        });
        let what = match action {
            Some(action) => format!("call {service}/{action}"),
            None => format!("call {service}"),
        };
        self.verdict(allowed, name, what, "call")
    }

    /// May `who` serve `service`? (The hub's own names are refused to any
    /// other peer before this is asked.)
    pub fn may_serve(&self, who: Who<'_>, service: &str) -> Result<(), Denied> {
        let Who::Named(name) = who else { return Ok(()) };
        let allowed = match self.tables.get(name) {
            Some(rules) => rules.serve.iter().any(|p| matches(p, service)),
            // A plugin serves the service named as it is, and no other.
            None if is_plugin_identity(name) => service == name,
            None => self
                .tables
                .get(ANYONE)
                .is_none_or(|r| r.serve.iter().any(|p| matches(p, service))),
        };
        self.verdict(allowed, name, format!("serve {service}"), "serve")
    }

    /// May `who` publish an event of `category`?
    pub fn may_publish(&self, who: Who<'_>, category: &str) -> Result<(), Denied> {
        let Who::Named(name) = who else { return Ok(()) };
        let Some(rules) = self.rules(name) else { return Ok(()) };
        let allowed = rules.publish.iter().any(|p| matches(p, category));
        self.verdict(allowed, name, format!("publish {category}"), "publish")
    }

    /// May `who` read `key` (a Clone key, or a subtree ending in `/`)?
    pub fn may_read(&self, who: Who<'_>, key: &str) -> Result<(), Denied> {
        let Who::Named(name) = who else { return Ok(()) };
        let Some(rules) = self.rules(name) else { return Ok(()) };
        // What it may write, it may read: a write is acknowledged by its
        // own update coming back.
        let allowed = rules.read.iter().chain(&rules.write).any(|p| covers(p, key));
        let shown = if key.is_empty() { "/" } else { key };
        self.verdict(allowed, name, format!("read {shown}"), "read")
    }

    /// May `who` read every key that starts with `prefix` (an ICANHAZ?
    /// subtree, "" for all)? Only entries that stand for a prefix grant
    /// it: one ending in `/` (a subtree), or in a single trailing `*`.
    pub fn may_read_prefix(&self, who: Who<'_>, prefix: &str) -> Result<(), Denied> {
        let Who::Named(name) = who else { return Ok(()) };
        let Some(rules) = self.rules(name) else { return Ok(()) };
        let allowed = rules
            .read
            .iter()
            .chain(&rules.write)
            .filter_map(|entry| prefix_of(entry))
            .any(|covered| prefix.starts_with(covered));
        let shown = if prefix.is_empty() { "everything" } else { prefix };
        self.verdict(allowed, name, format!("read {shown}"), "read")
    }

    /// May `who` follow the Clone updates? Only an identity that may read
    /// every key: libzmq 4.3 cannot filter what one subscriber gets safely
    /// (its `XPUB_MANUAL` loses track of which connection subscribed).
    pub fn may_follow_all(&self, who: Who<'_>) -> Result<(), Denied> {
        self.may_read_prefix(who, "")
    }

    /// May `who` write the Clone key `key`?
    pub fn may_write(&self, who: Who<'_>, key: &str) -> Result<(), Denied> {
        let Who::Named(name) = who else { return Ok(()) };
        let allowed = match self.rules(name) {
            Some(rules) => rules.write.iter().any(|p| covers(p, key)),
            // A plugin writes under its own subtree only.
            None if is_plugin_identity(name) => key.starts_with(&format!("/plugin/{name}/")),
            None => true,
        };
        self.verdict(allowed, name, format!("write {key}"), "write")
    }

    fn verdict(&self, allowed: bool, name: &str, what: String, list: &str) -> Result<(), Denied> {
        if allowed {
            return Ok(());
        }
        let table = if self.tables.contains_key(name) { name } else { ANYONE };
        let hint = if self.tables.contains_key(name) || self.tables.contains_key(ANYONE) {
            format!(
                " (not in `{list}` of [permissions.{}] in majordome.toml)",
                quoted(table)
            )
        } else {
            String::new()
        };
        Err(Denied {
            identity: name.to_owned(),
            what,
            hint,
        })
    }
}

fn quoted(table: &str) -> String {
    if table.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
        table.to_owned()
    } else {
        format!("\"{table}\"")
    }
}

/// The prefix an entry stands for, if it stands for one: `/device/`, or
/// `/device/lamp*`; `*` alone is everything.
fn prefix_of(entry: &str) -> Option<&str> {
    let (head, star) = match entry.strip_suffix('*') {
        Some(head) => (head, true),
        None => (entry, false),
    };
    (!head.contains('*') && (star || head.ends_with('/'))).then_some(head)
}

/// Whether the Clone `pattern` covers `key`: a pattern ending in `/` covers
/// its subtree (and a subtree inside it); any other must match whole.
fn covers(pattern: &str, key: &str) -> bool {
    if pattern.ends_with('/') {
        // `/device/` covers `/device/x` and `/device/`; a request for a
        // wider subtree (`/`, or "" for all) is not covered.
        matches(&format!("{pattern}*"), key)
    } else {
        matches(pattern, key)
    }
}

/// A wildcard match where `*` stands for any run of characters.
pub fn matches(pattern: &str, text: &str) -> bool {
    let Some((head, rest)) = pattern.split_once('*') else {
        return pattern == text;
    };
    let Some(mut left) = text.strip_prefix(head) else {
        return false;
    };
    let parts: Vec<&str> = rest.split('*').collect();
    let (last, middle) = parts.split_last().expect("split yields one part at least");
    for part in middle {
        match left.find(part) {
            Some(at) => left = &left[at + part.len()..],
            None => return false,
        }
    }
    left.len() >= last.len() && left.ends_with(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(text: &str) -> Policy {
        toml::from_str(text).unwrap()
    }

    #[test]
    fn wildcards_match_runs_of_characters() {
        assert!(matches("manager", "manager"));
        assert!(!matches("manager", "managers"));
        assert!(matches("*.get", "client.list.get"));
        assert!(matches("plugin.*.do", "plugin.stop.do"));
        assert!(!matches("plugin.*.do", "plugin.stop.get"));
        assert!(matches("*", ""));
        assert!(matches("a*b*c", "abc"));
        assert!(!matches("a*bc*c", "abc"));
    }

    #[test]
    fn the_hub_and_local_clients_are_never_refused() {
        let p = policy("[nobody]\n");
        for who in [Who::Hub, Who::Local] {
            assert!(p.may_call(who, "manager", Some("plugin.stop.do")).is_ok());
            assert!(p.may_serve(who, "anything").is_ok());
            assert!(p.may_publish(who, "plugin.status").is_ok());
            assert!(p.may_write(who, "/x").is_ok());
        }
    }

    #[test]
    fn a_table_allows_what_it_lists_and_nothing_else() {
        let p = policy(
            r#"
            [panel]
            call = ["devices", "manager/client.list.get", "history/*.get"]
            read = ["/device/"]
            "#,
        );
        let panel = Who::Named("panel");
        assert!(p.may_call(panel, "devices", Some("device.command.do")).is_ok());
        assert!(p.may_call(panel, "manager", Some("client.list.get")).is_ok());
        assert!(p.may_call(panel, "history", Some("history.get")).is_ok());
        let denied = p.may_call(panel, "manager", Some("plugin.stop.do")).unwrap_err();
        assert_eq!(
            denied.to_string(),
            "permission denied: 'panel' may not call manager/plugin.stop.do (not in `call` of [permissions.panel] \
             in majordome.toml)"
        );
        // A plain MDP request has no action: only a whole-service entry.
        assert!(p.may_call(panel, "manager", None).is_err());
        assert!(p.may_publish(panel, "device.update").is_err());
        assert!(p.may_read(panel, "/device/").is_ok());
        assert!(p.may_read(panel, "/device/a/temperature").is_ok());
        assert!(p.may_read(panel, "").is_err(), "the whole tree is wider than /device/");
        assert!(p.may_read(panel, "/plugin/").is_err());
        assert!(p.may_write(panel, "/device/a").is_err());
        assert!(p.may_serve(panel, "panel-ui").is_err());
        // Prefixes (snapshots): only entries that stand for a prefix.
        assert!(p.may_read_prefix(panel, "/device/").is_ok());
        assert!(p.may_read_prefix(panel, "/device/lamp").is_ok());
        assert!(p.may_read_prefix(panel, "/dev").is_err());
        assert!(p.may_read_prefix(panel, "").is_err());
        assert!(p.may_follow_all(panel).is_err());
        let exact = policy("[panel]\nread = [\"/device/lamp\", \"/a/*/b\", \"/plugin/x*\"]\n");
        assert!(
            exact.may_read_prefix(panel, "/device/lamp").is_err(),
            "would cover /device/lamp2"
        );
        assert!(exact.may_read_prefix(panel, "/a/").is_err());
        assert!(exact.may_read_prefix(panel, "/plugin/xy").is_ok());
        assert!(exact.may_read(panel, "/device/lamp").is_ok());
        let everything = policy("[panel]\nread = [\"*\"]\n");
        assert!(everything.may_follow_all(panel).is_ok());
        assert!(p.may_follow_all(Who::Local).is_ok());
    }

    #[test]
    fn without_a_table_an_identity_may_do_everything_unless_star_says_otherwise() {
        let open = policy("");
        let bob = Who::Named("bob");
        assert!(open.may_call(bob, "manager", Some("plugin.stop.do")).is_ok());
        assert!(open.may_serve(bob, "plugin-zwave.box").is_ok());
        let closed = policy("[\"*\"]\ncall = [\"*/*.get\"]\n");
        assert!(closed.may_call(bob, "manager", Some("client.list.get")).is_ok());
        let denied = closed.may_call(bob, "manager", Some("plugin.stop.do")).unwrap_err();
        assert!(denied.to_string().contains("[permissions.\"*\"]"), "{denied}");
    }

    #[test]
    fn a_plugin_serves_its_own_service_only_and_writes_its_own_subtree() {
        // `*` is for users: a plugin keeps its own rules.
        let p = policy("[\"*\"]\ncall = []\npublish = []\nwrite = [\"*\"]\nserve = [\"*\"]\n");
        let fake = Who::Named("plugin-fake.box");
        assert!(p.may_serve(fake, "plugin-fake.box").is_ok());
        assert!(p.may_serve(fake, "plugin-other.box").is_err());
        assert!(p.may_write(fake, "/plugin/plugin-fake.box/x").is_ok());
        assert!(p.may_write(fake, "/device/x").is_err());
        assert!(p.may_call(fake, "config", Some("config.get")).is_ok());
    }
}
