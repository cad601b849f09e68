//! The HTTP gateway of a real `majordome up` (fake plugin running), over
//! real HTTP: the JSON-RPC conformance table, metrics, status, errors.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::http::*;
use common::*;
use serde_json::{json, Value};

fn rpc(address: &str, body: &Value) -> Value {
    let (status, head, body) = http(address, "POST", "/jsonrpc", body.to_string().as_bytes());
    assert_eq!(status, 200, "{head}");
    serde_json::from_slice(&body).unwrap()
}

fn request(method: &str, params: Value, id: Value) -> Value {
    json!({"jsonrpc": "2.0", "method": method, "params": params, "id": id})
}

/// The fake plugin's switch, once the devices service has it.
fn fake_switch(http: &str) -> String {
    let start = Instant::now();
    loop {
        let reply = rpc(
            http,
            &request("message", json!({"content": {"command": "inventory"}}), json!(1)),
        );
        // ago's inventory: devices by uuid.
        let found = reply["result"]["devices"]
            .as_object()
            .into_iter()
            .flat_map(|m| m.values())
            .find_map(|d| {
                (d["type"] == "switch" && d["client"].as_str().is_some_and(|c| c.starts_with("plugin-fake.")))
                    .then(|| d["uuid"].as_str().unwrap().to_owned())
            });
        if let Some(uuid) = found {
            return uuid;
        }
        assert!(start.elapsed() < LIMIT, "no fake switch: {reply}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn json_rpc_conformance() {
    let (_up, http, _broker, _data) = hub();
    let error_of = |body: &Value| {
        let reply = rpc(&http, body);
        (reply["error"]["code"].as_i64(), reply["id"].clone())
    };
    // The specification's errors.
    let (status, _, body) = self::http(&http, "POST", "/jsonrpc", b"{not json");
    let reply: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        (status, reply["error"]["code"].as_i64(), reply["id"].clone()),
        (200, Some(-32700), Value::Null)
    );
    assert_eq!(error_of(&json!([])), (Some(-32600), Value::Null));
    assert_eq!(error_of(&json!(7)), (Some(-32600), Value::Null));
    assert_eq!(
        error_of(&json!({"jsonrpc": "1.0", "method": "call", "id": 3})),
        (Some(-32600), json!(3))
    );
    assert_eq!(
        error_of(&json!({"jsonrpc": "2.0", "method": 1, "id": 4})),
        (Some(-32600), json!(4))
    );
    assert_eq!(
        error_of(&request("nope", json!({}), json!(5))),
        (Some(-32601), json!(5))
    );
    assert_eq!(
        error_of(&request("message", json!({}), json!(6))),
        (Some(-32602), json!(6))
    );
    assert_eq!(
        error_of(&request("call", json!({"action": "ping.get"}), json!(7))),
        (Some(-32602), json!(7))
    );
    assert_eq!(
        error_of(&request("call", json!([1, 2]), json!(8))),
        (Some(-32602), json!(8))
    );

    // `call` reaches any service; its failure is -31999 with an identifier.
    let echo = rpc(
        &http,
        &request(
            "call",
            json!({"service": "echo", "action": "ping.get", "data": {"n": 1}}),
            json!("a"),
        ),
    );
    assert_eq!(echo, json!({"jsonrpc": "2.0", "result": {"n": 1}, "id": "a"}));
    let nobody = rpc(
        &http,
        &request(
            "call",
            json!({"service": "nobody", "action": "x.get", "timeout": 1}),
            json!(9),
        ),
    );
    assert_eq!(nobody["error"]["code"], -31999, "{nobody}");
    assert_eq!(nobody["error"]["identifier"], "error.no_worker", "{nobody}");

    // agorpc's `message`: the inventory, a command and its result, an
    // unknown device.
    let switch = fake_switch(&http);
    let on = rpc(
        &http,
        &request(
            "message",
            json!({"content": {"uuid": switch, "command": "on"}}),
            json!(10),
        ),
    );
    assert!(
        on["result"]["identifier"]
            .as_str()
            .is_some_and(|i| i.starts_with("success")),
        "{on}"
    );
    let unknown = rpc(
        &http,
        &request(
            "message",
            json!({"content": {"uuid": "no-such", "command": "on"}}),
            json!(11),
        ),
    );
    assert_eq!(unknown["error"]["code"], -31999, "{unknown}");
    assert_eq!(unknown["error"]["identifier"], "error.device.invalid", "{unknown}");

    // Batches: answers in order, none for a notification, an invalid entry
    // answered alone; notifications only: no body at all.
    let batch = json!([
        request("call", json!({"service": "echo", "action": "a.get", "data": {"i": 1}}), json!(1)),
        {"jsonrpc": "2.0", "method": "call", "params": {"service": "echo", "action": "b.get"}},
        {"foo": "bar"},
        request("call", json!({"service": "echo", "action": "c.get", "data": {"i": 3}}), json!(3)),
    ]);
    let replies = rpc(&http, &batch);
    let ids: Vec<Value> = replies.as_array().unwrap().iter().map(|r| r["id"].clone()).collect();
    assert_eq!(ids, vec![json!(1), Value::Null, json!(3)], "{replies}");
    assert_eq!(replies[1]["error"]["code"], -32600);
    assert_eq!(replies[2]["result"], json!({"i": 3}));
    let notes = json!([{"jsonrpc": "2.0", "method": "call", "params": {"service": "echo", "action": "x.get"}}]);
    let (status, _, body) = self::http(&http, "POST", "/jsonrpc", notes.to_string().as_bytes());
    assert_eq!((status, body.len()), (204, 0));
}

#[test]
fn metrics_status_and_http_errors() {
    let (_up, http, broker, _data) = hub();
    let out = run(&["call", "echo", "ping.get", "{}", "--broker", &broker]);
    assert!(out.status.success(), "{out:?}");
    // The manager says the fake plugin is alive within a few seconds.
    let start = Instant::now();
    let metrics = loop {
        let (status, head, body) = self::http(&http, "GET", "/metrics", b"");
        assert_eq!(status, 200, "{head}");
        assert!(head.contains("openmetrics-text"), "{head}");
        let text = String::from_utf8(body).unwrap();
        if text.contains("status=\"alive\"") {
            break text;
        }
        assert!(start.elapsed() < LIMIT, "{text}");
        std::thread::sleep(Duration::from_millis(200));
    };
    for wanted in [
        "# TYPE majordome_service_requests counter",
        "majordome_service_requests_total{service=\"echo\"}",
        "# TYPE majordome_service_latency_seconds histogram",
        "majordome_service_latency_seconds_bucket{le=\"+Inf\",service=\"echo\"} 1",
        "majordome_service_workers{service=\"devices\"} 1",
        "majordome_broker_workers ",
        "majordome_events_messages ",
        "majordome_state_keys ",
        "majordome_client_status{client=\"plugin-fake.",
    ] {
        assert!(metrics.contains(wanted), "{wanted} not in:\n{metrics}");
    }
    assert!(metrics
        .lines()
        .filter(|l| !l.starts_with('#'))
        .all(|l| l.starts_with("majordome_")));

    let (status, _, body) = self::http(&http, "GET", "/api/status", b"");
    let status_json: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(status, 200);
    assert!(status_json["broker"]["services"]["echo"].is_object(), "{status_json}");
    assert!(
        status_json["clients"].as_object().is_some_and(|c| !c.is_empty()),
        "{status_json}"
    );

    let (status, _, body) = self::http(&http, "GET", "/no/such/route", b"");
    let error: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!((status, error["error"]["code"].as_str()), (404, Some("not_found")));
    // Was: a known route with another method answered 405 with no body.
    let (status, head, body) = self::http(&http, "DELETE", "/api/status", b"");
    let error: Value = serde_json::from_slice(&body).unwrap_or_else(|_| panic!("{head}"));
    assert_eq!(
        (status, error["error"]["code"].as_str()),
        (405, Some("method_not_allowed"))
    );
    assert!(head.to_ascii_lowercase().contains("allow: get"), "{head}");
    let big = vec![b' '; 2 * 1024 * 1024];
    let (status, _, _) = self::http(&http, "POST", "/jsonrpc", &big);
    assert_eq!(status, 413);
}

#[test]
fn the_gateway_runs_alone_against_a_running_hub_and_beyond_loopback_only_with_tokens() {
    let (_up, _http, broker, data) = hub();
    // Its own configuration: the data folder (where tokens are) is the
    // hub's, which has none yet.
    let file = data.path().join("gateway.toml");
    std::fs::write(&file, format!("data = {:?}\n", data.path().to_str().unwrap())).unwrap();
    let config = file.to_str().unwrap();
    let alone = ["gateway", "--broker", &broker, "--config", config, "--http-bind"];
    let (_gateway, lines) = Process::start_reading(&[&alone[..], &["127.0.0.1:0"]].concat(), 1);
    let http = lines[0].rsplit("http://").next().unwrap().trim().to_owned();
    let ping = request(
        "call",
        json!({"service": "echo", "action": "ping.get", "data": {}}),
        json!(1),
    );
    assert_eq!(rpc(&http, &ping)["result"], json!({}));
    let out = run(&[&alone[..], &["0.0.0.0:0"]].concat());
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("refusing to serve HTTP on 0.0.0.0:0") && said.contains("token create"),
        "{said}"
    );
    // With a token, it serves the network, and only to tokens.
    let admin = token(data.path(), "admin", &[]);
    let (_open, lines) = Process::start_reading(&[&alone[..], &["0.0.0.0:0"]].concat(), 1);
    let port = lines[0].rsplit(':').next().unwrap().trim().to_owned();
    let address = format!("127.0.0.1:{port}");
    let (status, _, _) = self::http(&address, "POST", "/jsonrpc", ping.to_string().as_bytes());
    assert_eq!(status, 401, "no anonymous clients beyond loopback");
    let (status, _, echoed) = rpc_as(&address, &admin, &ping);
    assert_eq!((status, echoed["result"].clone()), (200, json!({})));
}

#[test]
fn json_rpc_subscriptions_deliver_events_and_time_out_as_agorpc_did() {
    let (_up, http, _broker, _data) = hub_with("[http]\ngetevent_timeout = \"1s\"\n");
    let switch = fake_switch(&http);
    let subscribed = rpc(&http, &request("subscribe", json!({}), json!(1)));
    let uuid = subscribed["result"].as_str().unwrap().to_owned();
    let on = rpc(
        &http,
        &request(
            "message",
            json!({"content": {"uuid": switch, "command": "on"}}),
            json!(2),
        ),
    );
    assert!(on["result"].is_object(), "{on}");
    // The switch says so on the bus; the subscription hands it on, one
    // event per getevent, the subject under `event`.
    let start = Instant::now();
    loop {
        assert!(start.elapsed() < LIMIT, "the switch's event never came");
        let got = rpc(&http, &request("getevent", json!({"uuid": uuid}), json!(3)));
        if got["error"]["code"] == -32000 {
            continue;
        }
        let event = &got["result"];
        assert!(event["event"].is_string(), "{got}");
        if event["event"] == "event.device.statechanged" && event["uuid"] == switch.as_str() {
            break;
        }
    }
    // Nothing more happens: after its timeout getevent says -32000.
    let quiet = loop {
        let got = rpc(&http, &request("getevent", json!({"uuid": uuid}), json!(4)));
        if got.get("error").is_some() {
            break got;
        }
        assert!(start.elapsed() < LIMIT, "events never stopped coming");
    };
    assert_eq!(quiet["error"]["code"], -32000, "{quiet}");
    let gone = rpc(&http, &request("unsubscribe", json!({"uuid": uuid}), json!(5)));
    assert_eq!(gone["result"], "success");
    let unknown = rpc(&http, &request("getevent", json!({"uuid": uuid}), json!(6)));
    assert_eq!(unknown["error"]["code"], -32602, "{unknown}");
}

fn rpc_as(address: &str, token: &str, body: &Value) -> (u16, String, Value) {
    let header = format!("Authorization: Bearer {token}\r\n");
    let (status, head, body) = http_with(address, "POST", "/jsonrpc", &header, body.to_string().as_bytes());
    (status, head, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

#[test]
fn tokens_stand_for_identities_and_their_permissions() {
    let (_up, http, _broker, data) = hub_with("[http]\nanonymous_loopback = false\n");
    let echo_only = token(data.path(), "panel", &["call=echo"]);
    let everything = token(data.path(), "admin", &[]);
    let call = request(
        "call",
        json!({"service": "echo", "action": "ping.get", "data": {"n": 2}}),
        json!(1),
    );
    // No token, or a wrong one: 401, and how to get one.
    let (status, head, body) = self::http(&http, "POST", "/jsonrpc", call.to_string().as_bytes());
    let said: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        (status, said["error"]["code"].as_str()),
        (401, Some("unauthorized")),
        "{head}"
    );
    assert!(head.to_ascii_lowercase().contains("www-authenticate: bearer"), "{head}");
    assert!(said["error"]["message"]
        .as_str()
        .unwrap()
        .contains("majordome token create"));
    let (status, _, _) = rpc_as(&http, "0000.nope", &call);
    assert_eq!(status, 401);
    let (status, _, _) = self::http(&http, "GET", "/metrics", b"");
    assert_eq!(status, 401);
    // A token gets in, with its identity's permissions.
    let (status, _, echoed) = rpc_as(&http, &echo_only, &call);
    assert_eq!((status, echoed["result"].clone()), (200, json!({"n": 2})), "{echoed}");
    let inventory = request("message", json!({"content": {"command": "inventory"}}), json!(2));
    let (_, _, refused) = rpc_as(&http, &echo_only, &inventory);
    assert_eq!(refused["error"]["code"], -31999, "{refused}");
    assert_eq!(refused["error"]["identifier"], "error.forbidden", "{refused}");
    let (_, _, allowed) = rpc_as(&http, &everything, &inventory);
    assert!(allowed["result"]["devices"].is_object(), "{allowed}");
    let header = format!("Authorization: Bearer {everything}\r\n");
    let (status, _, _) = http_with(&http, "GET", "/metrics", &header, b"");
    assert_eq!(status, 200);
    // Revoked: out at once, no restart.
    let id = echo_only.split_once('.').unwrap().0;
    let out = run(&["token", "revoke", id, "--data", data.path().to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}");
    let (status, _, _) = rpc_as(&http, &echo_only, &call);
    assert_eq!(status, 401);
}

type Ws = tungstenite::WebSocket<TcpStream>;

fn ws_connect(http: &str) -> Ws {
    let stream = TcpStream::connect(http).unwrap();
    stream.set_read_timeout(Some(LIMIT)).unwrap();
    let (socket, _) = tungstenite::client(format!("ws://{http}/api/websocket"), stream).unwrap();
    socket
}

/// A WebSocket session past its login with `token`.
fn ws_login(http: &str, token: &str) -> Ws {
    let mut socket = ws_connect(http);
    assert_eq!(ws_next(&mut socket)["type"], "auth_required");
    ws_send(&mut socket, &json!({"type": "auth", "access_token": token}));
    assert_eq!(ws_next(&mut socket)["type"], "auth_ok");
    socket
}

fn ws_send(socket: &mut Ws, value: &Value) {
    socket.send(tungstenite::Message::text(value.to_string())).unwrap();
}

fn ws_next(socket: &mut Ws) -> Value {
    loop {
        match socket.read().unwrap() {
            tungstenite::Message::Text(text) => return serde_json::from_str(&text).unwrap(),
            tungstenite::Message::Close(frame) => panic!("closed: {frame:?}"),
            _ => continue,
        }
    }
}

/// The reply to command `id`, skipping events.
fn ws_result(socket: &mut Ws, id: u64) -> Value {
    loop {
        let message = ws_next(socket);
        if message["id"] == id && message["type"] != "event" {
            return message;
        }
    }
}

#[test]
fn a_websocket_session_in_home_assistant_s_shape() {
    let (_up, http, _broker, data) = hub();
    let admin = token(data.path(), "admin", &[]);
    // A bad token: auth_invalid, then the end.
    let mut refused = ws_connect(&http);
    assert_eq!(ws_next(&mut refused)["type"], "auth_required");
    ws_send(&mut refused, &json!({"type": "auth", "access_token": "0000.wrong"}));
    assert_eq!(ws_next(&mut refused)["type"], "auth_invalid");
    assert!(matches!(refused.read(), Ok(tungstenite::Message::Close(Some(frame))) if u16::from(frame.code) == 1008));

    let switch = fake_switch(&http);
    let mut socket = ws_login(&http, &admin);
    ws_send(&mut socket, &json!({"id": 1, "type": "ping"}));
    assert_eq!(ws_next(&mut socket), json!({"id": 1, "type": "pong"}));
    ws_send(&mut socket, &json!({"id": 2, "type": "get_states"}));
    let states = ws_result(&mut socket, 2);
    assert_eq!(states["success"], true, "{states}");
    let entry = states["result"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["entity_id"] == switch.as_str())
        .cloned();
    let entry = entry.unwrap_or_else(|| panic!("no switch in {states}"));
    assert_eq!(entry["attributes"]["type"], "switch");
    assert!(
        entry["last_changed"].as_str().is_some_and(|t| t.contains('T')),
        "{entry}"
    );
    ws_send(
        &mut socket,
        &json!({"id": 3, "type": "subscribe_events", "event_type": "event.device"}),
    );
    assert_eq!(ws_result(&mut socket, 3)["success"], true);
    ws_send(
        &mut socket,
        &json!({"id": 4, "type": "call_service", "domain": "device", "service": "on", "target": {"entity_id": switch}}),
    );
    let done = ws_result(&mut socket, 4);
    assert_eq!(done["success"], true, "{done}");
    // The switch's new state arrives as an event of subscription 3.
    loop {
        let message = ws_next(&mut socket);
        if message["type"] == "event" && message["event"]["data"]["uuid"] == switch.as_str() {
            assert_eq!(message["id"], 3);
            assert_eq!(message["event"]["event_type"], "event.device.statechanged");
            break;
        }
    }
    ws_send(
        &mut socket,
        &json!({"id": 5, "type": "call", "service": "echo", "action": "ping.get", "data": {"x": 1}}),
    );
    assert_eq!(ws_result(&mut socket, 5)["result"], json!({"x": 1}));
    ws_send(
        &mut socket,
        &json!({"id": 6, "type": "unsubscribe_events", "subscription": 3}),
    );
    assert_eq!(ws_result(&mut socket, 6)["success"], true);
    ws_send(&mut socket, &json!({"id": 7, "type": "frobnicate"}));
    let unknown = ws_result(&mut socket, 7);
    assert_eq!(
        (unknown["success"].clone(), unknown["error"]["code"].clone()),
        (json!(false), json!("unknown_command"))
    );
    // A token without the permission is refused per command.
    let echo_only = token(data.path(), "panel", &["call=echo"]);
    let mut limited = ws_login(&http, &echo_only);
    ws_send(&mut limited, &json!({"id": 1, "type": "get_states"}));
    let denied = ws_result(&mut limited, 1);
    assert_eq!(denied["error"]["code"], "unauthorized", "{denied}");
}

/// Was: a session kept its identity after its token was revoked, for as
/// long as it stayed open.
#[test]
fn a_websocket_session_ends_when_its_token_is_revoked() {
    let (_up, http, _broker, data) = hub();
    let watcher = token(data.path(), "watcher", &[]);
    let mut socket = ws_login(&http, &watcher);
    ws_send(
        &mut socket,
        &json!({"id": 1, "type": "subscribe_events", "event_type": "event."}),
    );
    assert_eq!(ws_result(&mut socket, 1)["success"], true);
    let id = watcher.split_once('.').unwrap().0;
    let out = run(&["token", "revoke", id, "--data", data.path().to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}");
    // Events may still be on their way; then the session says why it ends.
    let revoked = Instant::now();
    loop {
        match socket.read().expect("the session ends with a close frame") {
            tungstenite::Message::Text(text) => {
                let message: Value = serde_json::from_str(&text).unwrap();
                if message["type"] == "event" {
                    assert!(revoked.elapsed() < LIMIT, "events still come after the revoke");
                    continue;
                }
                assert_eq!(message["type"], "auth_invalid", "{message}");
                assert_eq!(message["message"], "the token was revoked");
            }
            tungstenite::Message::Close(Some(frame)) => {
                assert_eq!(u16::from(frame.code), 1008);
                break;
            }
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn a_websocket_client_that_does_not_read_is_closed_with_a_reason() {
    let (_up, lines, data) = hub_lines("");
    let http = lines[8].rsplit("http://").next().unwrap().trim().to_owned();
    let publish_at = last_word(&lines[2]);
    let admin = token(data.path(), "admin", &[]);
    let mut socket = ws_login(&http, &admin);
    ws_send(
        &mut socket,
        &json!({"id": 1, "type": "subscribe_events", "event_type": "flood"}),
    );
    assert_eq!(ws_result(&mut socket, 1)["success"], true);
    // Events of 16 KiB, as fast as a publisher can, while this client
    // reads nothing: its queue (256) and the sockets' buffers fill.
    let publisher = majordome_net::context().socket(zmq::PUB).unwrap();
    publisher.set_sndhwm(0).unwrap();
    publisher.connect(&publish_at).unwrap();
    let payload = json!({"blob": "x".repeat(16 * 1024)}).to_string();
    let start = Instant::now();
    let slow = loop {
        for _ in 0..200 {
            // Domogik's msg_id shape: category, time, 0_1.
            publisher.send(&b"flood.1_0.0_1"[..], zmq::SNDMORE).unwrap();
            publisher.send(payload.as_bytes(), 0).unwrap();
        }
        let (_, _, body) = self::http(&http, "GET", "/metrics", b"");
        let metrics = String::from_utf8(body).unwrap();
        let counted = metrics
            .lines()
            .find(|l| l.starts_with("majordome_http_websocket_slow_clients_total"))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|n| n.parse::<f64>().ok())
            .unwrap_or(0.0);
        if counted >= 1.0 {
            break counted;
        }
        assert!(start.elapsed() < LIMIT, "the client was never found slow");
    };
    assert_eq!(slow, 1.0);
    // Reading now: what was queued, then the close, and why.
    let reason = loop {
        match socket.read() {
            Ok(tungstenite::Message::Close(Some(frame))) => break frame,
            Ok(_) => continue,
            Err(e) => panic!("no close frame: {e}"),
        }
    };
    assert_eq!(u16::from(reason.code), 1008);
    assert!(reason.reason.contains("too slow"), "{reason:?}");
}

fn get_json(http: &str, path: &str) -> (u16, Value) {
    let (status, _, body) = self::http(http, "GET", path, b"");
    (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

fn send_json(http: &str, method: &str, path: &str, body: &Value) -> (u16, Value) {
    let (status, _, body) = self::http(http, method, path, body.to_string().as_bytes());
    (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

#[test]
fn rest_routes_answer_with_the_status_that_fits() {
    let (_up, http, _broker, data) = hub();
    let switch = fake_switch(&http);
    // The document lists every route of protocols.md.
    let (status, document) = get_json(&http, "/api/openapi.json");
    assert_eq!((status, document["openapi"].as_str()), (200, Some("3.1.0")));
    for path in [
        "/api/status",
        "/api/clients",
        "/api/devices",
        "/api/devices/{uuid}",
        "/api/devices/{uuid}/command",
        "/api/state",
        "/api/history/{uuid}/{quantity}",
        "/api/scenarios",
        "/api/scenarios/{name}",
        "/api/scenarios/{name}/run",
        "/api/config/{name}",
        "/jsonrpc",
    ] {
        assert!(document["paths"][path].is_object(), "{path} not in the document");
    }
    let (status, devices) = get_json(&http, "/api/devices");
    assert_eq!(status, 200);
    assert!(devices["devices"].as_array().is_some_and(|d| d.len() >= 5), "{devices}");
    let (status, device) = get_json(&http, &format!("/api/devices/{switch}"));
    assert_eq!((status, device["type"].as_str()), (200, Some("switch")), "{device}");
    let (status, missing) = get_json(&http, "/api/devices/no-such-device");
    assert_eq!(
        (status, missing["error"]["code"].as_str()),
        (404, Some("not_found")),
        "{missing}"
    );
    let path = format!("/api/devices/{switch}/command");
    let (status, done) = send_json(&http, "POST", &path, &json!({"command": "on"}));
    assert_eq!(status, 200, "{done}");
    assert!(
        done["identifier"].as_str().is_some_and(|i| i.starts_with("success")),
        "{done}"
    );
    let (status, bad) = send_json(&http, "POST", &path, &json!({"nothing": 1}));
    assert_eq!(
        (status, bad["error"]["code"].as_str()),
        (400, Some("bad_body")),
        "{bad}"
    );
    let (status, unknown) = send_json(&http, "POST", &path, &json!({"command": "fly"}));
    assert!(status == 400 || status == 404, "{status} {unknown}");
    assert!(unknown["error"]["message"].as_str().is_some_and(|m| !m.is_empty()));

    let (status, state) = get_json(&http, "/api/state?prefix=/device/");
    assert_eq!(status, 200, "{state}");
    assert!(state["keys"]
        .as_object()
        .is_some_and(|k| k.keys().all(|key| key.starts_with("/device/"))));
    let (status, _) = get_json(&http, "/api/state?prefix=device");
    assert_eq!(status, 400);
    let (status, history) = get_json(&http, &format!("/api/history/{switch}/state?last=5"));
    assert_eq!(status, 200, "{history}");

    let (status, config) = get_json(&http, "/api/config/fake");
    assert_eq!(status, 200, "{config}");
    let (status, set) = send_json(&http, "PUT", "/api/config/fake", &json!({"interval": 2}));
    assert_eq!(status, 200, "{set}");
    let (status, refused) = send_json(&http, "PUT", "/api/config/fake", &json!({"interval": 0}));
    assert_eq!(status, 400, "{refused}");
    assert!(
        refused["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("interval")),
        "{refused}"
    );

    // Scenarios: made, refused twice over, read, changed, run, deleted.
    let body = json!({"name": "evening", "actions": [{"action": "log", "message": "hello"}]});
    let (status, made) = send_json(&http, "POST", "/api/scenarios", &body);
    assert_eq!((status, &made["name"]), (200, &json!("evening")), "{made}");
    let (status, taken) = send_json(&http, "POST", "/api/scenarios", &body);
    assert_eq!(
        (status, taken["error"]["code"].as_str()),
        (409, Some("exists")),
        "{taken}"
    );
    let bad = json!({"name": "x", "triggers": [{"trigger": "cron", "cron": "soon"}]});
    let (status, refused) = send_json(&http, "POST", "/api/scenarios", &bad);
    assert_eq!(status, 400, "{refused}");
    assert!(
        refused["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("triggers[0].cron: "),
        "{refused}"
    );
    let (status, one) = get_json(&http, "/api/scenarios/evening");
    assert_eq!(
        (status, &one["scenario"]["actions"][0]["message"]),
        (200, &json!("hello")),
        "{one}"
    );
    let (status, missing) = get_json(&http, "/api/scenarios/nothing");
    assert_eq!(
        (status, missing["error"]["code"].as_str()),
        (404, Some("not_found")),
        "{missing}"
    );
    let changed = json!({"actions": [{"action": "log", "message": "good evening"}]});
    assert_eq!(send_json(&http, "PUT", "/api/scenarios/evening", &changed).0, 200);
    assert_eq!(
        send_json(&http, "POST", "/api/scenarios/evening/run", &json!({})).0,
        200
    );
    let (status, list) = get_json(&http, "/api/scenarios");
    assert_eq!(
        (status, &list["scenarios"][0]["actions"][0]["message"]),
        (200, &json!("good evening"))
    );
    assert_eq!(send_json(&http, "DELETE", "/api/scenarios/evening", &json!({})).0, 200);
    assert_eq!(send_json(&http, "DELETE", "/api/scenarios/evening", &json!({})).0, 404);

    // A token without the permission: 403.
    let limited = token(data.path(), "panel", &["call=echo"]);
    let header = format!("Authorization: Bearer {limited}\r\n");
    let (status, _, body) = http_with(&http, "GET", "/api/devices", &header, b"");
    let refused: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        (status, refused["error"]["code"].as_str()),
        (403, Some("forbidden")),
        "{refused}"
    );
}

/// schemathesis (installed by tools/test.sh) reads /api/openapi.json,
/// calls every route with what the document allows and more, and checks
/// each answer against the document: no 5xx, documented statuses,
/// content types and bodies. The checks that judge how strict validation
/// is (a semantically wrong but schema-valid request, like an unknown
/// device, is rightly refused) are left out.
#[test]
fn the_openapi_document_holds_for_every_route() {
    let (_up, http, _broker, _data) = hub();
    let out = std::process::Command::new("schemathesis")
        .args([
            "run",
            &format!("http://{http}/api/openapi.json"),
            "--checks",
            "all",
            "--exclude-checks",
            "positive_data_acceptance,negative_data_rejection",
            "--max-examples",
            "25",
            "--seed",
            "1",
        ])
        .env("SCHEMATHESIS_HOOKS", "")
        .output()
        .expect("schemathesis runs (tools/test.sh installs it)");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{said}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(said.contains("passed"), "{said}");
}

/// One raw HTTP/1.1 request, as written; the status.
fn raw_status(address: &str, request: &str) -> u16 {
    let mut stream = TcpStream::connect(address).unwrap();
    stream.set_read_timeout(Some(LIMIT)).unwrap();
    stream.write_all(request.as_bytes()).unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).unwrap();
    String::from_utf8_lossy(&raw)
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap()
}

/// A page of another site open in a browser on the hub's machine must not
/// drive the hub as a local client: not by a cross-site POST, not through
/// DNS rebinding, not as text/plain.
#[test]
fn another_site_s_page_cannot_act_as_a_local_client() {
    let (_up, http, _broker, _data) = hub();
    let body = r#"{"jsonrpc": "2.0", "method": "call", "params": {"service": "echo", "action": "x.get"}, "id": 1}"#;
    let post = |host: &str, extra: &str, kind: &str| {
        format!(
            "POST /jsonrpc HTTP/1.1\r\nHost: {host}\r\n{extra}Content-Type: {kind}\r\nContent-Length: {}\r\n\
             Connection: close\r\n\r\n{body}",
            body.len()
        )
    };
    assert_eq!(
        raw_status(&http, &post(&http, "", "application/json")),
        200,
        "a local client"
    );
    let port = http.rsplit(':').next().unwrap();
    assert_eq!(
        raw_status(&http, &post(&format!("localhost:{port}"), "", "application/json")),
        200
    );
    assert_eq!(
        raw_status(
            &http,
            &post(&http, "Origin: http://evil.example\r\n", "application/json")
        ),
        401,
        "a cross-site request"
    );
    assert_eq!(
        raw_status(&http, &post("evil.example", "", "application/json")),
        401,
        "DNS rebinding"
    );
    assert_eq!(
        raw_status(&http, &post(&http, "", "text/plain")),
        415,
        "a simple cross-site POST"
    );
}

#[test]
fn a_narrow_token_sees_only_what_it_may() {
    let (_up, http, _broker, data) = hub();
    let narrow = token(data.path(), "panel", &["call=echo", "read=/device/"]);
    let header = format!("Authorization: bearer {narrow}\r\n");
    let (status, _, body) = http_with(&http, "GET", "/api/status", &header, b"");
    let status_json: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(status, 200, "a lower-case scheme is a bearer token too");
    assert!(
        status_json["clients"].is_null() && status_json["devices"].is_null(),
        "{status_json}"
    );
    let (_, _, body) = http_with(&http, "GET", "/metrics", &header, b"");
    let metrics = String::from_utf8(body).unwrap();
    assert!(!metrics.contains("majordome_client_status"), "{metrics}");
    // Events carry every device's values: not for a narrow reader.
    let (_, _, refused) = rpc_as(&http, &narrow, &request("subscribe", json!({}), json!(1)));
    assert_eq!(refused["error"]["identifier"], "error.forbidden", "{refused}");
    // A subscription is its owner's alone.
    let admin = token(data.path(), "admin", &[]);
    let (_, _, opened) = rpc_as(&http, &admin, &request("subscribe", json!({}), json!(2)));
    let uuid = opened["result"].as_str().unwrap().to_owned();
    let other = token(data.path(), "other", &[]);
    let (_, _, stolen) = rpc_as(&http, &other, &request("getevent", json!({"uuid": uuid}), json!(3)));
    assert_eq!(stolen["error"]["code"], -32602, "{stolen}");
    let (_, _, closed) = rpc_as(&http, &other, &request("unsubscribe", json!({"uuid": uuid}), json!(4)));
    assert_eq!(closed["error"]["code"], -32602, "{closed}");
    let (_, _, mine) = rpc_as(&http, &admin, &request("unsubscribe", json!({"uuid": uuid}), json!(5)));
    assert_eq!(mine["result"], "success", "{mine}");
}

/// Connections are bounded: beyond `max_connections`, the next waits to be
/// accepted until one closes (it is not refused, nor does it cost the hub).
#[test]
fn connections_beyond_the_bound_wait_for_one_to_close() {
    let (_up, http, _broker, _data) = hub_with("[http]\nmax_connections = 2\n");
    let first = TcpStream::connect(&http).unwrap();
    let _second = TcpStream::connect(&http).unwrap();
    let mut third = TcpStream::connect(&http).unwrap();
    third.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    let request = format!("GET /api/status HTTP/1.1\r\nHost: {http}\r\nConnection: close\r\n\r\n");
    third.write_all(request.as_bytes()).unwrap();
    let mut answer = Vec::new();
    assert!(
        third.read_to_end(&mut answer).is_err() && answer.is_empty(),
        "answered beyond the bound"
    );
    drop(first);
    third.set_read_timeout(Some(LIMIT)).unwrap();
    third.read_to_end(&mut answer).unwrap();
    assert!(
        String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
}
