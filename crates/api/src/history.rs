//! The history service (`history`): stored values over time.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{ApiError, Fields, Message};

/// One request to the history service, read once.
#[derive(Debug, Clone, PartialEq)]
pub enum HistoryRequest {
    /// `history.get` (also Domogik's `sensor_history.get`).
    Get(HistoryQuery),
    /// `stats.get`: rows, writes, queries.
    Stats,
}

/// What `history.get` asks for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct HistoryQuery {
    /// The device's uuid (Domogik's `sensor_id` is taken too).
    pub uuid: String,
    /// Which of its values; may be left out when it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantity: Option<String>,
    pub range: Range,
}

/// The values wanted: the last N, or a period, maybe in buckets.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum Range {
    /// `last` (or Domogik's `number`); 100 when not said.
    Last(u64),
    /// `from` (unix seconds) to `to` (now when not said), with `bucket`
    /// seconds (or `minute`…`year`) for min/avg/max per bucket.
    Period {
        from: f64,
        to: Option<f64>,
        bucket: Option<f64>,
    },
}

/// The length of a named interval, in seconds.
pub fn interval_seconds(name: &str) -> Option<f64> {
    Some(match name {
        "minute" => 60.0,
        "hour" => 3600.0,
        "day" => 86_400.0,
        "week" => 7.0 * 86_400.0,
        "month" => 30.0 * 86_400.0,
        "year" => 365.0 * 86_400.0,
        _ => return None,
    })
}

/// Buckets one answer may ask for, at most.
pub const MAX_BUCKETS: f64 = 100_000.0;

impl HistoryRequest {
    /// The actions, for the error that lists them.
    pub const ACTIONS: &'static str = "history.get, sensor_history.get, stats.get";

    pub fn parse(message: &Message) -> Result<HistoryRequest, ApiError> {
        let action = message.action.as_str();
        match action {
            "history.get" | "sensor_history.get" => {
                let fields = Fields::of(action, &message.data)?;
                Ok(HistoryRequest::Get(HistoryQuery::read(&fields)?))
            }
            "stats.get" => Ok(HistoryRequest::Stats),
            other => Err(ApiError::UnknownAction {
                service: "history",
                action: other.to_owned(),
                known: Self::ACTIONS.to_owned(),
            }),
        }
    }
}

impl HistoryQuery {
    fn read(fields: &Fields<'_>) -> Result<HistoryQuery, ApiError> {
        let uuid = match fields.value("uuid").or_else(|| fields.value("sensor_id")) {
            Some(Value::String(s)) if !s.is_empty() => s.clone(),
            Some(Value::Number(n)) => n.to_string(),
            _ => return Err(fields.needs("'uuid' (the device's; Domogik's 'sensor_id' is accepted too)")),
        };
        let quantity = fields.optional_text("quantity")?;
        let from = fields.number("from")?;
        let mode = fields.optional_text("mode")?;
        let range = match mode.as_deref() {
            Some("period") | None if mode.is_some() || from.is_some() => {
                let from = from.ok_or_else(|| fields.invalid("from", "is needed by a period (unix seconds)"))?;
                let to = fields.number("to")?;
                if let Some(to) = to {
                    if !(from.is_finite() && to.is_finite() && from < to) {
                        return Err(fields.invalid("from", format!("({from}) must come before 'to' ({to})")));
                    }
                }
                let bucket = match fields.value("bucket").or_else(|| fields.value("interval")) {
                    None => None,
                    Some(Value::String(name)) => Some(
                        interval_seconds(name)
                            .or_else(|| name.parse::<f64>().ok())
                            .ok_or_else(|| {
                                fields.invalid(
                                    "bucket",
                                    format!("'{name}' is an unknown interval: minute, hour, day, week, month, year or seconds"),
                                )
                            })?,
                    ),
                    Some(Value::Number(n)) => n.as_f64(),
                    Some(other) => {
                        return Err(fields.invalid("bucket", format!("must be seconds or an interval name, not {other}")))
                    }
                };
                if let Some(bucket) = bucket {
                    if !(bucket.is_finite() && bucket > 0.0) {
                        return Err(
                            fields.invalid("bucket", format!("must be a positive number of seconds, not {bucket}"))
                        );
                    }
                }
                Range::Period { from, to, bucket }
            }
            Some("last") | None => {
                let count = match fields.number("last")? {
                    Some(count) => Some(count),
                    None => fields.number("number")?,
                }
                .unwrap_or(100.0);
                if !(count.is_finite() && count >= 1.0) {
                    return Err(fields.invalid("last", format!("must be at least 1, not {count}")));
                }
                Range::Last(count as u64)
            }
            Some(other) => return Err(fields.invalid("mode", format!("'{other}' is an unknown mode: last or period"))),
        };
        Ok(HistoryQuery { uuid, quantity, range })
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn query(data: Value) -> Result<HistoryQuery, ApiError> {
        match HistoryRequest::parse(&Message::new("history.get", data))? {
            HistoryRequest::Get(query) => Ok(query),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn last_and_periods_as_domogik_and_majordome_ask() {
        assert_eq!(query(json!({"uuid": "u"})).unwrap().range, Range::Last(100));
        assert_eq!(
            query(json!({"sensor_id": 12, "number": "5"})).unwrap().range,
            Range::Last(5)
        );
        let period = query(json!({"uuid": "u", "from": 10, "to": 20, "interval": "minute"})).unwrap();
        assert_eq!(
            period.range,
            Range::Period {
                from: 10.0,
                to: Some(20.0),
                bucket: Some(60.0)
            }
        );
        for (bad, field) in [
            (json!({"uuid": "u", "last": 0}), "last"),
            (json!({"uuid": "u", "from": 20, "to": 10}), "from"),
            (json!({"uuid": "u", "from": "soon"}), "from"),
            (json!({"uuid": "u", "mode": "period"}), "from"),
            (json!({"uuid": "u", "from": 1, "bucket": "fortnight"}), "bucket"),
            (json!({"uuid": "u", "mode": "sideways"}), "mode"),
        ] {
            assert_eq!(query(bad.clone()).unwrap_err().field(), Some(field), "{bad}");
        }
        assert!(query(json!({})).unwrap_err().to_string().contains("needs 'uuid'"));
    }
}
