//! `majordome backup`, `majordome restore` and `majordome user`: the
//! commands that work on the data folder itself.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Result;
use majordome_hub::Override;
use majordome_store::backup;

use crate::cli::ConfigArgs;
use crate::commands::load_config;

/// The data folder and backup settings as `up` would take them.
fn settings(config: &ConfigArgs, data: Option<PathBuf>) -> Result<majordome_hub::HubConfig> {
    let overrides: Vec<Override> = data
        .map(|data| Override::new("data", "--data", data.display().to_string()))
        .into_iter()
        .collect();
    Ok(load_config(config, &overrides)?.config)
}

pub fn backup(file: Option<&Path>, config: &ConfigArgs, data: Option<PathBuf>) -> Result<ExitCode> {
    let config = settings(config, data)?;
    let database = majordome_store::database_path(&config.data);
    let folder = backup::folder(&config.data);
    let target = file.map_or_else(|| backup::new_backup_path(&folder), Path::to_owned);
    let report = backup::backup(&database, &target)?;
    println!(
        "backed up {} to {} ({:.1} MiB, checked, in {:.2} s)",
        database.display(),
        report.path.display(),
        report.bytes as f64 / (1024.0 * 1024.0),
        report.took.as_secs_f64()
    );
    if file.is_none() && config.backup.keep > 0 {
        for removed in backup::rotate(&folder, config.backup.keep)? {
            println!("removed the old backup {}", removed.display());
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub fn restore(file: &Path, config: &ConfigArgs, data: Option<PathBuf>) -> Result<ExitCode> {
    let config = settings(config, data)?;
    let report = backup::restore(&config.data, file)?;
    println!("restored {} from {}", report.database.display(), file.display());
    for path in &report.set_aside {
        println!("the files it replaced are kept as {}", path.display());
    }
    Ok(ExitCode::SUCCESS)
}

pub fn user(command: crate::cli::UserCommand, config: &ConfigArgs, data: Option<PathBuf>) -> Result<ExitCode> {
    use crate::cli::UserCommand;
    use majordome_access::Users;
    let config = settings(config, data)?;
    let mut users = Users::load(&config.data)?;
    let path = Users::path(&config.data);
    let shown = |name: &str, secret: &str| {
        println!("{secret}");
        eprintln!(
            "This is {name}'s secret; it is shown this once and kept only as a hash in {}. A client logs in with \
             MAJORDOME_USER={name} MAJORDOME_PASSWORD=<the secret> (PLAIN: sent NOT encrypted).",
            path.display()
        );
    };
    match command {
        UserCommand::Add { name } => {
            let secret = users.add(&name)?;
            users.save()?;
            shown(&name, &secret);
            if !config.permissions.tables().any(|t| t == name) {
                let anyone = config
                    .permissions
                    .tables()
                    .any(|t| t == majordome_access::policy::ANYONE);
                eprintln!(
                    "{name} has no [permissions.{name}] in the configuration file, so {}.",
                    if anyone {
                        "the permissions of [permissions.\"*\"] apply"
                    } else {
                        "it may do everything a local client may"
                    }
                );
            }
        }
        UserCommand::Reset { name } => {
            let secret = users.reset(&name)?;
            users.save()?;
            shown(&name, &secret);
        }
        UserCommand::Remove { name } => {
            users.remove(&name)?;
            users.save()?;
            println!("removed {name}");
        }
        UserCommand::List => {
            if users.is_empty() {
                println!("no user in {} (`majordome user add NAME` makes one)", path.display());
            }
            for (name, entry) in users.entries() {
                let table = if config.permissions.tables().any(|t| t == name) {
                    format!("[permissions.{name}]")
                } else if config
                    .permissions
                    .tables()
                    .any(|t| t == majordome_access::policy::ANYONE)
                {
                    "[permissions.\"*\"]".to_owned()
                } else {
                    "every permission".to_owned()
                };
                println!("{name}\tsince {}\t{table}", entry.created);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub fn token(command: crate::cli::TokenCommand, config: &ConfigArgs, data: Option<PathBuf>) -> Result<ExitCode> {
    use crate::cli::TokenCommand;
    use majordome_access::tokens::Tokens;
    let config = settings(config, data)?;
    let mut tokens = Tokens::load(&config.data)?;
    match command {
        TokenCommand::Create { name, permissions } => {
            let rules = if permissions.is_empty() {
                None
            } else {
                let mut rules = majordome_access::Rules::default();
                for rule in &permissions {
                    let Some((kind, pattern)) = rule.split_once('=') else {
                        anyhow::bail!("--permissions {rule:?}: write KIND=PATTERN, e.g. call=devices");
                    };
                    let list = match kind {
                        "call" => &mut rules.call,
                        "publish" => &mut rules.publish,
                        "read" => &mut rules.read,
                        "write" => &mut rules.write,
                        "serve" => &mut rules.serve,
                        other => anyhow::bail!(
                            "--permissions {rule:?}: {other:?} is not a kind; the kinds are call, publish, read, write, serve"
                        ),
                    };
                    list.push(pattern.to_owned());
                }
                Some(rules)
            };
            let (id, token) = tokens.create(&name, rules)?;
            tokens.save()?;
            println!("{token}");
            eprintln!(
                "This is token {id} for {name}, shown this once and kept only as a hash in {}. HTTP clients send \
                 `Authorization: Bearer <token>`.",
                Tokens::path(&config.data).display()
            );
        }
        TokenCommand::List => {
            if tokens.is_empty() {
                println!("no token (`majordome token create NAME` makes one)");
            }
            for (id, entry) in tokens.entries() {
                let rules = match &entry.rules {
                    Some(rules) => serde_json::to_string(rules)?,
                    None => format!("[permissions.{}]", entry.identity),
                };
                println!("{id}\t{}\tsince {}\t{rules}", entry.identity, entry.created);
            }
        }
        TokenCommand::Revoke { id } => {
            tokens.revoke(&id)?;
            tokens.save()?;
            println!("revoked token {id}");
        }
    }
    Ok(ExitCode::SUCCESS)
}
