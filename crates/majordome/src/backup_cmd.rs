//! `majordome backup` and `majordome restore`.

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
