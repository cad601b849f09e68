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
