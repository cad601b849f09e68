//! `majordome up` as one hub: the first part that fails stops all of it,
//! with a message naming the part and a non-zero exit code, rather than
//! running on without it.

mod common;

use std::io::Read;
use std::process::Stdio;
use std::time::Duration;

use common::*;

#[test]
fn a_part_that_fails_stops_the_whole_hub_and_says_which() {
    let data = tempfile::tempdir().unwrap();
    for part in ["events-stats", "devices"] {
        let mut child = majordome()
            .args(["up", "--no-autostart", "--data", data.path().to_str().unwrap()])
            .args(["--bind", "tcp://127.0.0.1:0", "--pub-bind", "tcp://127.0.0.1:0"])
            .args(["--sub-bind", "tcp://127.0.0.1:0", "--state-bind", "tcp://127.0.0.1:0"])
            .args(["--http-bind", "127.0.0.1:0"])
            .env("MAJORDOME_LOG", "off")
            .env("MAJORDOME_TEST_FAIL_PART", part)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stderr = child.stderr.take().unwrap();
        let mut up = Process {
            child,
            endpoint: String::new(),
        };
        let status = up.wait_exit(Duration::from_secs(20)).expect("up stops by itself");
        let mut said = String::new();
        stderr.read_to_string(&mut said).unwrap();
        assert_eq!(status.code(), Some(1), "{said}");
        assert!(
            said.contains(&format!("the {part} part stopped")) && said.contains("failed on purpose"),
            "{said}"
        );
    }
}

/// `majordome.toml` in the data folder is what `up` runs with, flags win
/// over it, and `config show` says where each value came from.
#[test]
fn up_reads_majordome_toml_and_flags_override_it() {
    let data = tempfile::tempdir().unwrap();
    let file = data.path().join("majordome.toml");
    std::fs::write(
        &file,
        "# every port free, from the file alone\n\
         [listen]\n\
         broker = \"tcp://127.0.0.1:0\"\n\
         publish = \"tcp://127.0.0.1:0\"\n\
         subscribe = \"tcp://127.0.0.1:0\"\n\
         state = \"tcp://127.0.0.1:0\"\n\
         \n\
         [http]\n\
         bind = \"127.0.0.1:0\"\n\
         \n\
         [broker]\n\
         liveness = 7\n\
         heartbeat_interval = \"250ms\"\n\
         \n\
         [plugins]\n\
         autostart = false\n",
    )
    .unwrap();
    let folder = data.path().to_str().unwrap();
    let out = run(&["config", "show", "--data", folder, "--liveness", "9"]);
    assert!(out.status.success(), "{out:?}");
    let shown = String::from_utf8_lossy(&out.stdout);
    let line = |key: &str| {
        shown
            .lines()
            .find(|l| l.starts_with(&format!("{key} = ")))
            .unwrap_or_else(|| panic!("no {key} in {shown}"))
            .to_owned()
    };
    assert!(line("liveness").ends_with("# --liveness"), "{shown}");
    assert!(line("liveness").starts_with("liveness = 9 "), "{shown}");
    assert!(line("heartbeat_interval").contains("\"250ms\""), "{shown}");
    assert!(
        line("heartbeat_interval").ends_with(&format!("# {}", file.display())),
        "{shown}"
    );
    assert!(line("request_timeout").ends_with("# default"), "{shown}");

    // `up` with no port flag at all: the file's port 0 is what it binds.
    let (up, lines) = Process::start_reading(&["up", "--data", folder], 12);
    let broker = last_word(&lines[0]);
    assert!(
        !broker.ends_with(":0") && broker.starts_with("tcp://127.0.0.1:"),
        "{lines:?}"
    );
    assert!(lines[8].contains("http://127.0.0.1:"), "{lines:?}");
    assert!(lines[10].contains("started: none"), "{lines:?}");
    assert!(
        lines[11].contains("configuration") && lines[11].ends_with("majordome.toml"),
        "{lines:?}"
    );
    let out = run(&["call", "echo", "ping.get", "{}", "--broker", &broker]);
    assert!(out.status.success(), "{out:?}");
    drop(up);
}

/// A file that says something majordome does not know is refused before
/// anything starts, with the line and the key.
#[test]
fn a_bad_configuration_file_is_refused_with_its_line_and_key() {
    let data = tempfile::tempdir().unwrap();
    let file = data.path().join("mine.toml");
    std::fs::write(&file, "data = \"x\"\n\n[broker]\nhearbeat_interval = \"1s\"\n").unwrap();
    let out = run(&["up", "--config", file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("line 4") && said.contains("hearbeat_interval"), "{said}");
    assert!(said.contains("mine.toml"), "{said}");
    std::fs::write(&file, "[events]\nhigh_water_mark = 0\n").unwrap();
    let out = run(&["up", "--config", file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("events.high_water_mark = 0") && said.contains("must be above 0"),
        "{said}"
    );
}

/// A bind beyond loopback with nobody who could log in is refused, unless
/// the configuration says, in so many words, that anyone may come in (for
/// old peers that cannot log in). With a user, see `security.rs`.
#[test]
fn listening_beyond_loopback_is_refused_unless_allowed() {
    let out = run(&["broker", "--bind", "tcp://0.0.0.0:0"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let error = String::from_utf8_lossy(&out.stderr);
    assert!(
        error.contains("refusing to listen on tcp://0.0.0.0:0")
            && error.contains("allow_network_without_credentials = true under [listen]"),
        "{error}"
    );
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("open.toml");
    std::fs::write(&file, "[listen]\nallow_network_without_credentials = true\n").unwrap();
    let broker = Process::start_listening(&[
        "broker",
        "--bind",
        "tcp://0.0.0.0:0",
        "--config",
        file.to_str().unwrap(),
    ]);
    let port = broker.endpoint.rsplit(':').next().unwrap().to_owned();
    assert_eq!(
        mdp_request(&format!("tcp://127.0.0.1:{port}"), "mmi.service", &["echo"]),
        strings(&["404"])
    );
}

/// A DEALER that sent READY `config` to `up` used to receive every
/// `config.set`, answer "stored" and feed plugins its values. The names of
/// the hub's own services are now served by its own workers only.
#[test]
fn a_stranger_cannot_serve_the_hub_s_own_services() {
    let data = tempfile::tempdir().unwrap();
    let (_up, lines) = Process::up(data.path(), &["--no-autostart"], 1);
    let broker = last_word(&lines[0]);
    wait_for_service(&broker, "config", "200");
    for name in ["config", "dbmgr", "manager", "titanic.request", "state"] {
        let stranger = socket(zmq::DEALER, &broker);
        send(&stranger, &frames(&[b"", b"MDPW01", b"\x01", name.as_bytes()]));
        let answer = recv(&stranger, Duration::from_secs(20));
        assert_eq!(answer, frames(&[b"", b"MDPW01", b"\x05"]), "{name}");
    }
    assert_eq!(stats(&broker)["dropped"]["reserved_service"], 5);
    // The real config service still answers, and a plugin's name is free.
    let reply = mdp_request(
        &broker,
        "config",
        &["config.get", r#"{"name": "fake", "host": "box", "key": "configured"}"#],
    );
    assert_eq!(reply[0], "config.result");
    let _plugin = raw_worker(&broker, "plugin-mine.box");
}
