//! The `backup` part: a copy of the database on a schedule, kept in
//! rotation in `backups/` of the data folder (see `majordome_store::backup`).

use std::path::Path;
use std::time::{Duration, SystemTime};

use majordome_net::Shutdown;
use majordome_store::backup;

use crate::config::Backup;

/// After a failed backup, the next try waits this long (or `every`, when
/// shorter): a full disk is not fixed by trying again at once.
const RETRY_AFTER: Duration = Duration::from_secs(60);

/// Makes a backup whenever the newest one is `every` old (at once when
/// there is none), keeping the newest `keep`, until `stop`. A backup that
/// fails is logged and tried again later: the hub keeps serving.
pub(crate) fn run(database: &Path, data: &Path, settings: &Backup, stop: &Shutdown) {
    let folder = backup::folder(data);
    backup::remove_partials(&folder);
    let mut not_before = SystemTime::UNIX_EPOCH;
    loop {
        let newest = backup::list(&folder)
            .last()
            .and_then(|path| std::fs::metadata(path).and_then(|m| m.modified()).ok());
        let due = newest
            .map_or(SystemTime::UNIX_EPOCH, |made| made + settings.every)
            .max(not_before);
        let wait = due.duration_since(SystemTime::now()).unwrap_or(Duration::ZERO);
        if stop.wait_timeout(wait) {
            return;
        }
        match backup::backup(database, &backup::new_backup_path(&folder)) {
            Ok(report) => {
                tracing::info!(
                    path = %report.path.display(),
                    bytes = report.bytes,
                    took_ms = report.took.as_millis() as u64,
                    "backup written"
                );
                match backup::rotate(&folder, settings.keep) {
                    Ok(removed) => {
                        for path in removed {
                            tracing::debug!(path = %path.display(), "old backup removed");
                        }
                    }
                    Err(e) => tracing::warn!("cannot remove old backups: {e}"),
                }
                not_before = SystemTime::UNIX_EPOCH;
            }
            Err(e) => {
                let retry = RETRY_AFTER.min(settings.every);
                tracing::warn!("backup failed: {e}; trying again in {} s", retry.as_secs_f64());
                not_before = SystemTime::now() + retry;
            }
        }
    }
}
