//! `majordome state …` and `majordome titanic …` as a user types them,
//! against `majordome up` on free ports and a fresh data folder.

mod common;

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::Duration;

use common::*;

const LIMIT: Duration = Duration::from_secs(20);

struct Up {
    _process: Process,
    broker: String,
    state: String,
    _data: tempfile::TempDir,
}

fn up() -> Up {
    let data = tempfile::tempdir().unwrap();
    let (process, lines) = Process::up(data.path(), &["--no-autostart"], 8);
    let last = |i: usize| last_word(&lines[i]);
    assert!(lines[7].contains("database"), "{lines:?}");
    assert!(lines[7].ends_with("majordome.db"), "{lines:?}");
    Up {
        _process: process,
        broker: last(0),
        state: last(4),
        _data: data,
    }
}

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn state_set_show_watch_and_delete() {
    let up = up();
    let at = ["--endpoint", up.state.as_str()];
    // A watcher first: it prints the snapshot, then changes.
    let mut watch = majordome()
        .args(["state", "watch", "/device/", "--count", "2"])
        .args(at)
        .env("MAJORDOME_LOG", "error")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // It says so on stderr once it holds its snapshot.
    let mut ready = String::new();
    BufReader::new(watch.stderr.take().unwrap())
        .read_line(&mut ready)
        .unwrap();
    assert!(ready.contains("watching for changes"), "{ready}");

    let out = run(&[&["state", "set", "/device/lamp/level", "42"][..], &at].concat());
    assert!(out.status.success(), "{out:?}");
    assert!(
        stdout(&out).starts_with("/device/lamp/level stored at sequence "),
        "{out:?}"
    );
    let out = run(&[&["state", "set", "/variable/mode", "away", "--ttl", "3600"][..], &at].concat());
    assert!(out.status.success(), "{out:?}");

    let out = run(&[&["state", "/device/"][..], &at].concat());
    assert_eq!(stdout(&out), "/device/lamp/level 42\n");
    assert!(stderr(&out).contains("1 keys under /device/"), "{out:?}");
    let out = run(&[&["state", "--json"][..], &at].concat());
    let all: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(all["keys"]["/variable/mode"]["value"], "away");
    assert_eq!(all["keys"]["/variable/mode"]["properties"]["ttl"], "3600");

    let out = run(&[&["state", "delete", "/device/lamp/level"][..], &at].concat());
    assert!(stdout(&out).contains("deleted at sequence"), "{out:?}");
    let out = run(&[&["state", "/device/"][..], &at].concat());
    assert_eq!(stdout(&out), "");

    // The watcher saw the set and the delete of its subtree, not the rest.
    let mut watch = Process {
        child: watch,
        endpoint: String::new(),
    };
    assert!(watch.wait_exit(LIMIT).expect("watch exits after --count").success());
    let mut lines = String::new();
    std::io::Read::read_to_string(&mut watch.child.stdout.take().unwrap(), &mut lines).unwrap();
    assert_eq!(lines, "/device/lamp/level 42\n/device/lamp/level (deleted)\n");

    // Errors a user can make: one line, exit 1.
    let out = run(&[&["state", "set", "/x", ""][..], &at].concat());
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).starts_with("error: an empty value deletes the key"),
        "{out:?}"
    );
    let out = run(&[&["state", "set", "/x", "1", "--ttl=-1"][..], &at].concat());
    assert_eq!(out.status.code(), Some(1));
    let out = run(&["state", "--endpoint", "tcp://127.0.0.1:1"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).starts_with("error: "), "{out:?}");
    assert_eq!(stderr(&out).lines().count(), 1, "{out:?}");
}

#[test]
fn titanic_request_reply_list_close() {
    let up = up();
    let at = ["--broker", up.broker.as_str()];
    wait_for_service(&up.broker, "titanic.request", "200");
    let out = run(&[&["titanic", "request", "echo", "ping.get", r#"{"n": 1}"#][..], &at].concat());
    assert!(out.status.success(), "{out:?}");
    let uuid = stdout(&out).trim().to_owned();
    assert_eq!(uuid.len(), 32, "{out:?}");
    let out = run(&[&["titanic", "reply", &uuid, "--wait", "20"][..], &at].concat());
    assert!(out.status.success(), "{out:?}");
    assert_eq!(stdout(&out), "ping.result {\"n\":1}\n");

    // A service nobody runs: pending, exit code 2, listed as pending.
    let out = run(&[&["titanic", "request", "nobody", "--raw", "hello"][..], &at].concat());
    let pending = stdout(&out).trim().to_owned();
    let out = run(&[&["titanic", "reply", &pending][..], &at].concat());
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(stderr(&out).contains("pending"), "{out:?}");
    let out = run(&[&["titanic", "list", "--json"][..], &at].concat());
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let states: Vec<(String, String)> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["uuid"].as_str().unwrap().to_owned(),
                e["state"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert!(states.contains(&(pending.clone(), "pending".into())), "{states:?}");
    assert!(states.contains(&(uuid.clone(), "done".into())), "{states:?}");

    let out = run(&[&["titanic", "close", &uuid][..], &at].concat());
    assert!(out.status.success(), "{out:?}");
    let out = run(&[&["titanic", "reply", &uuid][..], &at].concat());
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("no request"), "{out:?}");
    let out = run(&[&["titanic", "request", "echo", "x.get", "{bad"][..], &at].concat());
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).starts_with("error: the JSON argument is not valid JSON"),
        "{out:?}"
    );
}
