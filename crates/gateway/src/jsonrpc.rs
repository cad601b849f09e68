//! JSON-RPC 2.0 as agorpc spoke it, without I/O: a body in, the calls it
//! holds out (each checked as the specification says), and their answers
//! back into a body. What a method does is the caller's ([`crate::rpc`]).

use serde_json::{json, Map, Value};

/// The specification's codes, and agorpc's own.
pub mod code {
    /// Not JSON at all.
    pub const PARSE_ERROR: i64 = -32700;
    /// JSON, but not a request.
    pub const INVALID_REQUEST: i64 = -32600;
    pub const METHOD_NOT_FOUND: i64 = -32601;
    pub const INVALID_PARAMS: i64 = -32602;
    pub const INTERNAL_ERROR: i64 = -32603;
    /// agorpc: `getevent` found nothing before its deadline.
    pub const NO_EVENT: i64 = -32000;
    /// agorpc: the bus answered with an error (its identifier in `data`).
    pub const BUS_ERROR: i64 = -31999;
}

/// An error object.
#[derive(Debug, Clone, PartialEq)]
pub struct RpcError {
    pub code: i64,
    pub message: String,
    pub data: Option<Value>,
    /// agorpc puts the bus's error identifier (`error.not.found`) beside
    /// the code.
    pub identifier: Option<String>,
}

impl RpcError {
    pub fn new(code: i64, message: impl Into<String>) -> RpcError {
        RpcError {
            code,
            message: message.into(),
            data: None,
            identifier: None,
        }
    }

    pub fn invalid_params(message: impl Into<String>) -> RpcError {
        RpcError::new(code::INVALID_PARAMS, message)
    }

    fn to_json(&self) -> Value {
        let mut error = json!({"code": self.code, "message": self.message});
        if let Some(data) = &self.data {
            error["data"] = data.clone();
        }
        if let Some(identifier) = &self.identifier {
            error["identifier"] = identifier.clone().into();
        }
        error
    }
}

/// One call of a body, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct Call {
    /// `None` for a notification: it is carried out, and not answered.
    pub id: Option<Value>,
    pub method: String,
    /// An object or an array; `Null` when absent.
    pub params: Value,
}

/// What a body holds.
#[derive(Debug)]
pub enum Body {
    /// One request (or notification), or one that was not valid (answered
    /// with its error, id null when it could not be read).
    Single(Result<Call, (Value, RpcError)>),
    /// A batch: each entry checked on its own.
    Batch(Vec<Result<Call, (Value, RpcError)>>),
    /// Nothing that can be carried out: answered with this error alone.
    Broken(RpcError),
}

/// The most calls in one batch.
pub const MAX_BATCH: usize = 100;

/// Reads a body.
pub fn parse(body: &[u8]) -> Body {
    let value: Value = match serde_json::from_slice(body) {
        Ok(value) => value,
        Err(e) => return Body::Broken(RpcError::new(code::PARSE_ERROR, format!("not JSON: {e}"))),
    };
    match value {
        Value::Array(entries) if entries.is_empty() => {
            Body::Broken(RpcError::new(code::INVALID_REQUEST, "an empty batch"))
        }
        Value::Array(entries) if entries.len() > MAX_BATCH => Body::Broken(RpcError::new(
            code::INVALID_REQUEST,
            format!("a batch of {} calls; at most {MAX_BATCH}", entries.len()),
        )),
        Value::Array(entries) => Body::Batch(entries.into_iter().map(check).collect()),
        other => Body::Single(check(other)),
    }
}

/// Checks one request object.
fn check(value: Value) -> Result<Call, (Value, RpcError)> {
    let Value::Object(mut object) = value else {
        return Err((
            Value::Null,
            RpcError::new(code::INVALID_REQUEST, "a request is a JSON object"),
        ));
    };
    // The id, when it is a valid one, is echoed even in an error.
    let id = object.remove("id");
    // An integer past 64 bits reads as a float that is not the number
    // sent: it could not be echoed as it came, and a client matches its
    // answers by id.
    let overflowed = matches!(&id, Some(Value::Number(n))
        if n.is_f64() && n.as_f64().is_some_and(|f| f.fract() == 0.0 && f.abs() >= 9.2e18));
    let echo = match &id {
        Some(v @ (Value::String(_) | Value::Number(_) | Value::Null)) if !overflowed => v.clone(),
        _ => Value::Null,
    };
    let invalid = |message: &str| Err((echo.clone(), RpcError::new(code::INVALID_REQUEST, message)));
    if let Some(Value::Array(_) | Value::Object(_) | Value::Bool(_)) = id {
        return invalid("`id` is a string, a number or null");
    }
    if overflowed {
        return invalid("`id` is an integer past 64 bits, which cannot be echoed exactly: send it as a string");
    }
    if object.get("jsonrpc") != Some(&Value::String("2.0".into())) {
        return invalid("`jsonrpc` must be \"2.0\"");
    }
    let method = match object.remove("method") {
        Some(Value::String(method)) => method,
        _ => return invalid("`method` is a string"),
    };
    let params = match object.remove("params") {
        None => Value::Null,
        Some(params @ (Value::Object(_) | Value::Array(_))) => params,
        Some(_) => return invalid("`params` is an object or an array"),
    };
    Ok(Call { id, method, params })
}

/// A response object for `id`.
pub fn response(id: Value, outcome: Result<Value, RpcError>) -> Value {
    match outcome {
        Ok(result) => json!({"jsonrpc": "2.0", "result": result, "id": id}),
        Err(error) => json!({"jsonrpc": "2.0", "error": error.to_json(), "id": id}),
    }
}

/// The named parameters of a call (`params` absent counts as none); a
/// call by position is refused, as agorpc's methods all take names.
pub fn named(params: &Value) -> Result<Map<String, Value>, RpcError> {
    match params {
        Value::Null => Ok(Map::new()),
        Value::Object(map) => Ok(map.clone()),
        _ => Err(RpcError::invalid_params("parameters are given by name (an object)")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn single(body: &str) -> Result<Call, (Value, RpcError)> {
        match parse(body.as_bytes()) {
            Body::Single(call) => call,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn requests_and_notifications_are_read() {
        let call = single(r#"{"jsonrpc": "2.0", "method": "message", "params": {"content": {}}, "id": 7}"#).unwrap();
        assert_eq!((call.id, call.method.as_str()), (Some(json!(7)), "message"));
        let note = single(r#"{"jsonrpc": "2.0", "method": "call"}"#).unwrap();
        assert_eq!((note.id, note.params), (None, Value::Null));
        // Every 64-bit integer, and a fraction, come back as they were sent.
        for id in ["18446744073709551615", "-9223372036854775808", "1.5"] {
            let call = single(&format!(r#"{{"jsonrpc": "2.0", "method": "m", "id": {id}}}"#)).unwrap();
            assert_eq!(call.id.unwrap().to_string(), id);
        }
    }

    #[test]
    fn each_error_of_the_specification() {
        assert!(matches!(parse(b"{oops"), Body::Broken(e) if e.code == code::PARSE_ERROR));
        assert!(matches!(parse(b"[]"), Body::Broken(e) if e.code == code::INVALID_REQUEST));
        for (body, id) in [
            (r#"1"#, Value::Null),
            (r#"{"method": "x", "id": 1}"#, json!(1)),
            (r#"{"jsonrpc": "1.0", "method": "x", "id": "a"}"#, json!("a")),
            (r#"{"jsonrpc": "2.0", "method": 5, "id": 2}"#, json!(2)),
            (r#"{"jsonrpc": "2.0", "method": "x", "params": 3, "id": 3}"#, json!(3)),
            (r#"{"jsonrpc": "2.0", "method": "x", "id": [1]}"#, Value::Null),
            // Was: answered with id 1.2345678901234568e22, not the id sent.
            (
                r#"{"jsonrpc": "2.0", "method": "x", "id": 12345678901234567890123}"#,
                Value::Null,
            ),
        ] {
            let (echo, error) = single(body).unwrap_err();
            assert_eq!((echo, error.code), (id, code::INVALID_REQUEST), "{body}");
        }
        let Body::Batch(entries) = parse(br#"[1, {"jsonrpc": "2.0", "method": "m", "id": 1}]"#) else {
            panic!()
        };
        assert!(entries[0].is_err() && entries[1].is_ok());
        let big = format!(
            "[{}]",
            vec![r#"{"jsonrpc": "2.0", "method": "m"}"#; MAX_BATCH + 1].join(",")
        );
        assert!(matches!(parse(big.as_bytes()), Body::Broken(e) if e.code == code::INVALID_REQUEST));
    }

    #[test]
    fn responses_carry_the_id_and_agorpc_s_identifier() {
        assert_eq!(
            response(json!(1), Ok(json!({"a": 1}))),
            json!({"jsonrpc": "2.0", "result": {"a": 1}, "id": 1})
        );
        let mut error = RpcError::new(code::BUS_ERROR, "no such device");
        error.identifier = Some("error.device.invalid".into());
        assert_eq!(
            response(Value::Null, Err(error)),
            json!({"jsonrpc": "2.0", "id": null,
                   "error": {"code": -31999, "message": "no such device", "identifier": "error.device.invalid"}})
        );
    }
}
