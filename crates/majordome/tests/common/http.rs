//! HTTP for the gateway's and dashboard's tests: one exchange per fresh
//! connection, spoken by hand so every byte is the test's.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use super::{last_word, run, wait_for_service, Process};

/// How long an answer may take.
pub const LIMIT: Duration = Duration::from_secs(30);

/// One HTTP/1.1 exchange on a fresh connection: (status, headers, body).
pub fn http(address: &str, method: &str, path: &str, body: &[u8]) -> (u16, String, Vec<u8>) {
    http_with(address, method, path, "", body)
}

/// The same with `extra` header lines (each ending in CRLF; a
/// `Content-Type` there replaces JSON's).
pub fn http_with(address: &str, method: &str, path: &str, extra: &str, body: &[u8]) -> (u16, String, Vec<u8>) {
    let content_type = if extra.to_ascii_lowercase().contains("content-type:") {
        ""
    } else {
        "Content-Type: application/json\r\n"
    };
    let mut stream = TcpStream::connect(address).unwrap();
    stream.set_read_timeout(Some(LIMIT)).unwrap();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {address}\r\n{content_type}{extra}\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).unwrap();
    stream.write_all(body).unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).unwrap();
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").expect("a header end");
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    let mut body = raw[split + 4..].to_vec();
    if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        body = unchunk(&body);
    }
    (status, head, body)
}

fn unchunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let end = data.windows(2).position(|w| w == b"\r\n").unwrap();
        let size = usize::from_str_radix(std::str::from_utf8(&data[..end]).unwrap().trim(), 16).unwrap();
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&data[end + 2..end + 2 + size]);
        data = &data[end + 2 + size + 2..];
    }
}

/// `majordome token create` in `data`: the token.
pub fn token(data: &std::path::Path, name: &str, permissions: &[&str]) -> String {
    let mut args = vec!["token", "create", name, "--data", data.to_str().unwrap()];
    for rule in permissions {
        args.extend(["--permissions", rule]);
    }
    let out = run(&args);
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// `up` with the fake plugin; the HTTP address and the broker.
pub fn hub() -> (Process, String, String, tempfile::TempDir) {
    hub_with("")
}

/// The same with `toml` as the configuration file.
pub fn hub_with(toml: &str) -> (Process, String, String, tempfile::TempDir) {
    let (up, lines, data) = hub_lines(toml);
    (
        up,
        lines[8].rsplit("http://").next().unwrap().trim().to_owned(),
        last_word(&lines[0]),
        data,
    )
}

/// `up` and the lines of its banner (broker 0, publishers 2, HTTP 8).
pub fn hub_lines(toml: &str) -> (Process, Vec<String>, tempfile::TempDir) {
    let data = tempfile::tempdir().unwrap();
    std::fs::write(data.path().join("majordome.toml"), toml).unwrap();
    let (up, lines) = Process::up(data.path(), &[], 9);
    wait_for_service(&last_word(&lines[0]), "devices", "200");
    (up, lines, data)
}
