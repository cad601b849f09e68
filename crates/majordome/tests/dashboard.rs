//! The dashboard of a real `majordome up` (fake plugin running): its pages
//! and forms over plain HTTP, as a browser without the script would use
//! them; the sign-in with a token and its cookie; the live event stream;
//! and the whole of it in a real headless Chromium (`tools/e2e/`).

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::http::*;
use serde_json::Value;

/// A form post as a browser sends it, from a page of `address`.
fn form_post(address: &str, path: &str, body: &str, extra: &str) -> (u16, String, Vec<u8>) {
    let headers = format!(
        "Content-Type: application/x-www-form-urlencoded\r\nOrigin: http://{address}\r\n\
         Referer: http://{address}/\r\n{extra}"
    );
    http_with(address, "POST", path, &headers, body.as_bytes())
}

/// The fake plugin's five devices, once the devices service has them all.
fn fake_devices(address: &str) -> Vec<Value> {
    let start = Instant::now();
    loop {
        let (status, _, body) = http(address, "GET", "/api/devices", b"");
        assert_eq!(status, 200);
        let devices: Value = serde_json::from_slice(&body).unwrap();
        let devices = devices["devices"].as_array().cloned().unwrap_or_default();
        if devices.len() >= 5 {
            return devices;
        }
        assert!(start.elapsed() < LIMIT, "the fake devices never came: {devices:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn uuid_of(devices: &[Value], kind: &str) -> String {
    devices.iter().find(|d| d["type"] == kind).unwrap()["uuid"]
        .as_str()
        .unwrap()
        .to_owned()
}

fn header<'h>(head: &'h str, name: &str) -> Option<&'h str> {
    head.lines().find_map(|line| {
        let (key, value) = line.split_once(':')?;
        key.eq_ignore_ascii_case(name).then(|| value.trim())
    })
}

#[test]
fn every_page_renders_and_every_form_works_without_the_script() {
    let (_up, address, _broker, _data) = hub();
    let devices = fake_devices(&address);
    let (switch, thermometer) = (uuid_of(&devices, "switch"), uuid_of(&devices, "temperaturesensor"));
    let client = devices[0]["client"].as_str().unwrap().to_owned();
    let page = |path: &str| {
        let (status, head, body) = http(&address, "GET", path, b"");
        (status, head, String::from_utf8(body).unwrap())
    };

    let (status, head, home) = page("/");
    assert_eq!(status, 200, "{head}");
    assert_eq!(header(&head, "content-type"), Some("text/html; charset=utf-8"));
    assert_eq!(header(&head, "cache-control"), Some("no-store"));
    assert!(
        home.contains("<h2>Living room</h2>") && home.contains("Fake switch"),
        "{home}"
    );
    assert!(home.contains(&format!(r#"data-toggle="{switch}/state""#)));

    let (status, _, device) = page(&format!("/devices/{thermometer}?range=1h"));
    assert_eq!(status, 200);
    assert!(
        device.contains("<svg class=\"chart\"") && device.contains("temperature (°C)"),
        "{device}"
    );
    let (status, _, missing) = page("/devices/no-such-device");
    assert_eq!(status, 404);
    assert!(missing.contains("There is no device no-such-device."), "{missing}");

    let (status, _, plugins) = page("/plugins");
    assert_eq!(status, 200);
    assert!(plugins.contains(&format!(r#"data-client="{client}""#)), "{plugins}");
    let (status, _, plugin) = page(&format!("/plugins/{client}"));
    assert_eq!(status, 200);
    assert!(plugin.contains(r#"name="interval" id="field-interval""#), "{plugin}");
    assert!(plugin.contains("majordome runs"), "the log's start line: {plugin}");
    assert_eq!(page("/plugins/not-an-id").0, 404);
    assert_eq!(page("/plugins/plugin-nothing.nowhere").0, 404);

    let (status, _, scenarios) = page("/scenarios");
    assert_eq!(status, 200);
    assert!(scenarios.contains("No scenario yet.") && scenarios.contains(r#"href="/scenarios" aria-current="page""#));
    let (status, _, missing) = page("/scenarios/nothing");
    assert_eq!(status, 404);
    assert!(
        missing.contains("no scenario &#39;nothing&#39;") || missing.contains("no scenario 'nothing'"),
        "{missing}"
    );
    let json = "Accept: application/json\r\n";
    assert_eq!(form_post(&address, "/ui/scenarios/nothing/run", "", json).0, 404);
    assert_eq!(form_post(&address, "/ui/scenarios/nothing/fly", "", json).0, 404);

    let (status, _, bus) = page("/bus");
    assert_eq!(status, 200);
    assert!(bus.contains(r#"data-stat="devices/requests""#), "{bus}");

    let (status, head, _) = page("/ui/app.js");
    assert_eq!((status, header(&head, "content-type")), (200, Some("text/javascript")));

    // A command without the script: back to the page it came from, saying
    // how it went; the switch then reports its new state.
    let (status, head, _) = form_post(&address, &format!("/ui/devices/{switch}/command"), "command=on", "");
    assert_eq!(status, 303, "{head}");
    let location = header(&head, "location").unwrap();
    assert!(location.starts_with("/?notice="), "{location}");
    let start = Instant::now();
    while !page("/")
        .2
        .contains(r#"aria-checked="true" aria-label="Fake switch on or off""#)
    {
        assert!(start.elapsed() < LIMIT, "the switch never said it is on");
        std::thread::sleep(Duration::from_millis(100));
    }
    // The notice is shown on the page it goes back to.
    let (_, _, said) = page(location);
    assert!(said.contains(r#"<div class="notice" role="status">"#), "{said}");

    // The script's way: JSON, with the status that fits.
    let (status, _, body) = form_post(&address, &format!("/ui/devices/{switch}/command"), "command=fly", json);
    let answer: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!((status, &answer["ok"]), (400, &Value::Bool(false)), "{answer}");
    assert!(
        answer["message"].as_str().unwrap().contains("no command 'fly'"),
        "{answer}"
    );
    let (status, _, _) = form_post(&address, "/ui/devices/nope/command", "command=on", json);
    assert_eq!(status, 404);
    let (status, _, body) = form_post(&address, &format!("/ui/plugins/{client}/config"), "interval=0", json);
    let answer: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(status, 400, "{answer}");
    assert!(
        answer["message"].as_str().unwrap().contains("between 0.05 and 3600"),
        "{answer}"
    );
    let rename = "name=Hall+lamp&room=Hall";
    let (status, _, _) = form_post(&address, &format!("/ui/devices/{switch}/update"), rename, json);
    assert_eq!(status, 200);
    assert!(page("/").2.contains("<h2>Hall</h2>"));

    let (status, _, body) = http(&address, "GET", &format!("/ui/plugins/{client}/log"), b"");
    let log: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(status, 200);
    assert!(log["lines"]
        .as_array()
        .unwrap()
        .iter()
        .any(|l| l.as_str().unwrap().contains("majordome runs")));

    // Another site's page cannot post a form to a local dashboard.
    let evil = "Content-Type: application/x-www-form-urlencoded\r\nOrigin: http://evil.example\r\n";
    let path = format!("/ui/devices/{switch}/command");
    let (status, _, _) = http_with(&address, "POST", &path, evil, b"command=off");
    assert_eq!(status, 401);
}

#[test]
fn where_tokens_are_needed_the_dashboard_signs_in_with_one_into_a_strict_cookie() {
    let (_up, address, _broker, data) = hub_with("[http]\nanonymous_loopback = false\n");
    let token = token(data.path(), "kitchen_tablet", &[]);
    let (status, head, _) = http(&address, "GET", "/", b"");
    assert_eq!((status, header(&head, "location")), (303, Some("/login")), "{head}");
    let (status, _, login) = http(&address, "GET", "/login", b"");
    assert_eq!(status, 200);
    assert!(String::from_utf8(login).unwrap().contains(r#"name="token""#));

    let (status, _, refused) = form_post(&address, "/login", "token=nope", "");
    assert_eq!(status, 401);
    assert!(String::from_utf8(refused).unwrap().contains("That token is not valid"));
    let (status, head, _) = form_post(&address, "/login", &format!("token={token}"), "");
    assert_eq!((status, header(&head, "location")), (303, Some("/")), "{head}");
    let cookie = header(&head, "set-cookie").unwrap().to_owned();
    for attribute in ["HttpOnly", "SameSite=Strict", "Path=/"] {
        assert!(cookie.contains(attribute), "{cookie}");
    }
    let session = format!("Cookie: {}\r\n", cookie.split(';').next().unwrap());

    let (status, _, home) = http_with(&address, "GET", "/", &session, b"");
    assert_eq!(status, 200);
    assert!(String::from_utf8(home).unwrap().contains("Sign out"));
    // The cookie serves the API too, but a change must come from the
    // dashboard's own pages.
    let path = "/ui/devices/nope/command";
    let form = "Content-Type: application/x-www-form-urlencoded\r\n";
    let (status, _, _) = http_with(&address, "POST", path, &format!("{session}{form}"), b"command=on");
    assert_eq!(status, 401);
    let json = format!("{session}Accept: application/json\r\n");
    let (status, _, _) = form_post(&address, path, "command=on", &json);
    assert_eq!(status, 404, "the device is unknown, but the request came in");
    let (status, head, _) = form_post(&address, "/logout", "", &session);
    assert_eq!(status, 303);
    assert!(header(&head, "set-cookie").unwrap().contains("Max-Age=0"));
}

#[test]
fn the_event_stream_follows_the_bus_and_ends_when_up_stops() {
    let (mut up, address, _broker, _data) = hub();
    let mut stream = TcpStream::connect(&address).unwrap();
    stream.set_read_timeout(Some(LIMIT)).unwrap();
    let request = format!("GET /ui/events HTTP/1.1\r\nHost: {address}\r\nAccept: text/event-stream\r\n\r\n");
    stream.write_all(request.as_bytes()).unwrap();
    let mut lines = BufReader::new(stream).lines();
    assert!(lines.next().unwrap().unwrap().starts_with("HTTP/1.1 200"));
    // A fake value arrives as one `data:` line (chunk sizes in between),
    // after the device announcements.
    let event = loop {
        let line = lines.next().expect("the stream ended").unwrap();
        if let Some(data) = line.strip_prefix("data: ") {
            let event: Value = serde_json::from_str(data).unwrap();
            if event["category"].as_str().unwrap().starts_with("event.") && event["data"]["data"]["level"].is_number() {
                break event;
            }
        }
    };
    assert!(
        event["data"]["uuid"].is_string() && event["data"]["data"]["level"].is_number(),
        "{event}"
    );
    // A stream that would go on for ever must not hold `up` at its stop.
    up.signal(libc::SIGTERM);
    let exited = up.wait_exit(LIMIT);
    assert!(exited.is_some_and(|status| status.success()), "{exited:?}");
}

/// The repository's root, where `tools/e2e` is.
fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

#[test]
fn the_dashboard_in_a_real_chromium() {
    let e2e = root().join("tools/e2e");
    let browser = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(
        e2e.join("node_modules/playwright-core").exists() && std::path::Path::new(&browser).exists(),
        "the browser test needs Chromium ({browser}) and playwright-core in tools/e2e: tools/test.sh installs both"
    );
    let (_up, address, _broker, _data) = hub();
    let shots = root().join("target/e2e-screenshots");
    let out = std::process::Command::new("node")
        .arg(e2e.join("dashboard.mjs"))
        .arg(format!("http://{address}"))
        .arg(&shots)
        .current_dir(&e2e)
        .output()
        .expect("node runs");
    let said = String::from_utf8_lossy(&out.stdout);
    println!("{said}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "the browser test failed:\n{said}");
    for page in ["home", "device", "plugins", "plugin", "scenarios", "scenario", "bus"] {
        for size in ["desktop", "phone"] {
            assert!(shots.join(format!("{page}-{size}.png")).exists(), "{page}-{size}.png");
        }
    }
}
