//! The database as an unlucky user meets it: a damaged write-ahead log
//! after a crash is caught before anything opens it, with the way back; a
//! backup made while majordome runs restores what it held; a restore is
//! refused while majordome runs.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;

const LIMIT: Duration = Duration::from_secs(30);

/// `majordome up` with no plugin; returns it and the Clone snapshot endpoint.
fn up(data: &Path, extra: &[&str]) -> (Process, String) {
    let (process, lines) = Process::up(data, &[&["--no-autostart"], extra].concat(), 7);
    assert!(lines[4].contains("state: snapshots"), "{lines:?}");
    (process, last_word(&lines[4]))
}

fn set(state: &str, key: &str, value: &str) {
    let out = run(&["state", "set", key, value, "--endpoint", state]);
    assert!(out.status.success(), "{out:?}");
}

/// The keys under `/db/` and their values.
fn keys(state: &str) -> serde_json::Value {
    let out = run(&["state", "/db/", "--endpoint", state, "--json"]);
    assert!(out.status.success(), "{out:?}");
    let all: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    all["keys"].clone()
}

fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn a_damaged_log_stops_up_with_the_way_back_and_a_backup_brings_the_data_back() {
    let data = tempfile::tempdir().unwrap();
    let data_arg = data.path().to_str().unwrap();
    let (mut first, state) = up(data.path(), &[]);
    for n in 0..10 {
        set(&state, &format!("/db/before/{n}"), "kept");
    }
    // A backup on demand while majordome runs: it holds the ten keys.
    let out = run(&["backup", "--data", data_arg]);
    assert!(out.status.success(), "{out:?}");
    assert!(text(&out).contains("checked"), "{}", text(&out));
    for n in 0..30 {
        set(&state, &format!("/db/after/{n}"), "acknowledged");
    }
    // A restore while majordome runs is refused, and changes nothing.
    let backups = majordome_store::backup::list(&data.path().join("backups"));
    let latest = backups.last().expect("a backup").to_str().unwrap().to_owned();
    let out = run(&["restore", &latest, "--data", data_arg]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out).contains("majordome is running on the data folder"),
        "{}",
        text(&out)
    );

    first.signal(libc::SIGKILL);
    first.wait_exit(LIMIT).expect("killed");
    // The crash left the last writes in the log; damage a frame in its middle.
    let wal = data.path().join("majordome.db-wal");
    let mut bytes = std::fs::read(&wal).expect("a write-ahead log after kill -9");
    let page = u32::from_be_bytes(bytes[8..12].try_into().unwrap()) as usize;
    let frames = (bytes.len() - 32) / (24 + page);
    assert!(frames > 10, "{frames} frames");
    let at = 32 + (frames / 2) * (24 + page) + 24 + page / 2;
    for byte in &mut bytes[at..at + 64] {
        *byte ^= 0xa5;
    }
    std::fs::write(&wal, &bytes).unwrap();

    let out = run(&[&up_args(data.path())[..], &["--no-autostart"]].concat());
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let message = text(&out);
    assert!(
        message.contains("majordome.db is damaged")
            && message.contains("committed transaction(s) after that point would be lost")
            && message.contains("majordome restore ")
            && message.contains("Nothing was started or changed"),
        "{message}"
    );
    assert_eq!(std::fs::read(&wal).unwrap(), bytes, "the log was left as it was");

    // The way back, as the message says.
    let restore_from = message
        .split("majordome restore ")
        .nth(1)
        .and_then(|rest| rest.split('`').next())
        .expect("the backup to restore")
        .to_owned();
    let out = run(&["restore", &restore_from, "--data", data_arg]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("the files it replaced are kept as"),
        "{}",
        text(&out)
    );
    let (_again, state) = up(data.path(), &[]);
    let keys = keys(&state);
    let keys = keys.as_object().expect("keys");
    assert!(keys.contains_key("/db/before/9"), "{keys:?}");
    assert!(keys.len() >= 10, "{keys:?}");
}

/// Scheduled backups run beside the writes; `kill -9` in the middle loses
/// no acknowledged write, and the backups left are whole.
#[test]
fn kill_9_with_backups_running_loses_nothing() {
    let data = tempfile::tempdir().unwrap();
    std::fs::write(
        data.path().join("majordome.toml"),
        "[backup]\nevery = \"50ms\"\nkeep = 3\n",
    )
    .unwrap();
    let (mut first, state) = up(data.path(), &[]);
    for n in 0..40 {
        set(&state, &format!("/db/k{n}"), &format!("v{n}"));
    }
    first.signal(libc::SIGKILL);
    first.wait_exit(LIMIT).expect("killed");
    let backups = majordome_store::backup::list(&data.path().join("backups"));
    assert!(!backups.is_empty() && backups.len() <= 3, "{backups:?}");
    for backup in &backups {
        majordome_store::check::check(backup).unwrap_or_else(|e| panic!("{}: {e}", backup.display()));
    }
    let (_again, state) = up(data.path(), &[]);
    let keys = keys(&state);
    for n in 0..40 {
        assert_eq!(keys[format!("/db/k{n}")]["value"], format!("v{n}"), "{keys}");
    }
}
