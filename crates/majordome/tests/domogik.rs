//! What Domogik's own code expects of `majordome up`, in the exact frames
//! its `domogik-mq` library sends and reads (read from its source, not
//! copied): `MQSyncReq` is a REQ socket sending `MDPC01 | service |
//! timeout | action | JSON` and reading `MDPC01 | service | action | JSON`;
//! `MQPub` sends `<category>.<time with '_'>.0_1 | JSON` from a PUB socket;
//! `MQAsyncSub` subscribes by category prefix.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use serde_json::{json, Value};

const LIMIT: Duration = Duration::from_secs(20);

/// One request as `MQSyncReq.request(service, msg.get(), timeout)` sends
/// it; returns (action, data) of the reply as it reads them.
fn sync_request(broker: &str, service: &str, timeout: &str, action: &str, data: Value) -> (String, Value) {
    let req = socket(zmq::REQ, broker);
    send(&req, &strings(&["MDPC01", service, timeout, action, &data.to_string()]));
    let reply = recv(&req, LIMIT);
    assert_eq!(reply.len(), 4, "MDPC01, service, action, JSON: {reply:?}");
    assert_eq!(&reply[..2], &strings(&["MDPC01", service])[..]);
    let action = String::from_utf8(reply[2].to_vec()).unwrap();
    (action, serde_json::from_slice(&reply[3]).unwrap())
}

/// `MQPub.send_event(category, content)`.
fn domogik_event(category: &str, content: &Value) -> Vec<Bytes> {
    let time = format!("{:.6}", majordome_client::unix_now()).replace('.', "_");
    strings(&[&format!("{category}.{time}.0_1"), &content.to_string()])
}

/// The next message on a raw SUB socket whose category and JSON satisfy
/// `accept`.
fn next_domogik_event(sub: &zmq::Socket, category: &str, accept: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + LIMIT;
    while let Some(message) = try_recv(sub, deadline.saturating_duration_since(Instant::now())) {
        let id = String::from_utf8_lossy(&message[0]).into_owned();
        assert!(id.ends_with(".0_1"), "Domogik's message id: {id}");
        let content: Value = serde_json::from_slice(&message[1]).unwrap();
        if id.starts_with(&format!("{category}.")) && accept(&content) {
            return content;
        }
    }
    panic!("no {category} came");
}

#[test]
fn domogik_s_manager_config_and_device_requests_get_the_shapes_its_code_reads() {
    let data = tempfile::tempdir().unwrap();
    let (_up, lines) = Process::up(data.path(), &[], 4);
    let broker = last_word(&lines[0]);
    wait_for_service(&broker, "manager", "200");

    // admin/views/clients.py: `client_list[client]['type']` for each key.
    let (action, list) = sync_request(&broker, "manager", "10", "client.list.get", json!({}));
    assert_eq!(action, "client.list.result");
    let fake = list
        .as_object()
        .unwrap()
        .keys()
        .find(|id| id.starts_with("plugin-fake."))
        .cloned()
        .unwrap_or_else(|| panic!("the shipped fake plugin is listed: {list}"));
    for (id, client) in list.as_object().unwrap() {
        for field in [
            "type",
            "host",
            "name",
            "status",
            "package_id",
            "xpl_source",
            "configured",
        ] {
            assert!(client.get(field).is_some(), "{id} has {field}: {client}");
        }
    }
    let host = list[&fake]["host"].as_str().unwrap().to_owned();
    // get_client_detail(client_id): `detaila[client_id]`.
    let (_, detail) = sync_request(&broker, "manager", "10", "client.detail.get", json!({}));
    assert_eq!(detail[&fake]["package_id"], "plugin-fake");
    assert!(detail[&fake]["data"].is_object());
    // get_client_history(client_id): by type, name and host.
    let (_, history) = sync_request(
        &broker,
        "manager",
        "10",
        "client.history.get",
        json!({"host": host, "type": "plugin", "name": "fake"}),
    );
    assert!(history["history"].is_array(), "{history}");

    // Plugin.check_configured: Query asks `admin` for `configured` with
    // QUERY_CONFIG_WAIT (15 s); anything but true stops the plugin. The
    // fake plugin has a manifest with defaults for every key.
    let (action, configured) = sync_request(
        &broker,
        "admin",
        "15",
        "config.get",
        json!({"type": "plugin", "name": "fake", "host": host, "key": "configured"}),
    );
    assert_eq!(action, "config.result");
    assert_eq!(
        (&configured["status"], &configured["value"]),
        (&json!(true), &json!(true))
    );

    // Plugin.get_device_list: `device.get` to `admin`, then
    // get_sensors(devices) reads each device's sensors and their ids.
    let created = mdp_request(
        &broker,
        "devices",
        &[
            "device.create.do",
            &json!({"client": "plugin-diskfree.darkstar", "id": "disk", "type": "temperaturesensor"}).to_string(),
        ],
    );
    let created: Value = serde_json::from_slice(&created[1]).unwrap();
    let uuid = created["uuid"].as_str().unwrap().to_owned();
    let (action, devices) = sync_request(
        &broker,
        "admin",
        "10",
        "device.get",
        json!({"type": "plugin", "name": "diskfree", "host": "darkstar"}),
    );
    assert_eq!(action, "device.result");
    assert_eq!(devices["status"], true, "{devices}");
    let device = &devices["devices"][0];
    assert_eq!(device["client_id"], "plugin-diskfree.darkstar");
    for field in [
        "id",
        "name",
        "device_type_id",
        "xpl_stats",
        "xpl_commands",
        "sensors",
        "commands",
    ] {
        assert!(device.get(field).is_some(), "{field} in {device}");
    }
    let sensor = device["sensors"]["temperature"]["id"].as_i64().unwrap();

    // MQPub.send_event('client.sensor', {sensor_id: value, "atTimestamp"}),
    // then an MQAsyncSub on 'device-stats' hears it stored.
    let sub = socket(zmq::SUB, &last_word(&lines[3]));
    sub.set_subscribe(b"device-stats").unwrap();
    sub.set_subscribe(b"device.update").unwrap();
    let publisher = socket(zmq::PUB, &last_word(&lines[2]));
    let at = (majordome_client::unix_now() - 5.0).floor();
    let values = json!({sensor.to_string(): "16.6875", "atTimestamp": format!("{at}")});
    // A PUB sends nothing before its connection is up: publish until the
    // value is stored (the device's value is set once, whatever the count).
    let stored = loop {
        send(&publisher, &domogik_event("client.sensor", &values));
        let found = try_recv(&sub, Duration::from_millis(200)).and_then(|message| {
            let content: Value = serde_json::from_slice(&message[1]).ok()?;
            (content["sensor_id"] == sensor).then_some(content)
        });
        if let Some(content) = found {
            break content;
        }
    };
    assert_eq!(stored["device_id"], uuid.as_str());
    assert_eq!(stored["stored_value"], "16.6875");
    assert_eq!(stored["timestamp"], at);

    // A device changed: `device.update` with device_id and client_id, on
    // which a Domogik plugin reloads its device list.
    let renamed = mdp_request(
        &broker,
        "devices",
        &["device.update.do", &json!({"uuid": uuid, "name": "Disk"}).to_string()],
    );
    assert_eq!(renamed[0], "device.update.result");
    let update = next_domogik_event(&sub, "device.update", |c| c["device_id"] == uuid.as_str());
    assert_eq!(update["client_id"], "plugin-diskfree.darkstar");
}

/// The zguide's `mdclient2` pipelines 100,000 requests before reading any
/// reply; majordome answered only 16,000–20,000 of them with its default
/// settings (the rest rejected or expired, which RFC 7 cannot say). The
/// same shape, smaller: 20,000 plain requests sent at once, then read.
#[test]
fn regression_a_pipelining_rfc7_client_gets_every_reply_with_the_defaults() {
    let broker = Process::broker(&[]);
    let worker = raw_worker(&broker.endpoint, "echo");
    let echo = std::thread::spawn(move || {
        for _ in 0..20_000 {
            let (client, body) = next_request(&worker, LIMIT);
            let body: Vec<&str> = body.iter().map(|f| std::str::from_utf8(f).unwrap()).collect();
            send_reply(&worker, &client, &body);
        }
    });
    let client = socket(zmq::DEALER, &broker.endpoint);
    client.set_rcvhwm(0).unwrap();
    for i in 0..20_000 {
        send(&client, &strings(&["", "MDPC01", "echo", &format!("{i}")]));
    }
    for i in 0..20_000 {
        let reply = recv(&client, LIMIT);
        assert_eq!(reply[3], format!("{i}"), "replies in order, none lost");
    }
    echo.join().unwrap();
}
