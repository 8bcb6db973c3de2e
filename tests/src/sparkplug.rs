//! Sparkplug B payloads as an edge node sends them, for the tests that play one (the
//! Sparkplug tests on the cloud Mosquitto and on NATS).

use iot_store::sparkplug::proto::{metric::Value, DataType, Metric, Payload};
use prost::Message as _;

/// A payload of `metrics` with `seq`, stamped now.
pub fn encode(seq: Option<u64>, metrics: Vec<Metric>) -> Vec<u8> {
    Payload {
        timestamp: Some(now_ms()),
        metrics,
        seq,
        ..Payload::default()
    }
    .encode_to_vec()
}

/// Data of one metric by alias, as nodes send it after their birth.
pub fn by_alias(seq: u64, alias: u64, value: f64) -> Vec<u8> {
    encode(Some(seq), vec![tag(None, alias, value)])
}

/// The `bdSeq` metric of a birth or death.
pub fn bd_seq(bd_seq: u64) -> Metric {
    Metric {
        name: Some("bdSeq".into()),
        datatype: Some(DataType::Int64.number()),
        value: Some(Value::LongValue(bd_seq)),
        ..Metric::default()
    }
}

/// Milliseconds since 1970, as Sparkplug stamps.
pub fn now_ms() -> u64 {
    u64::try_from(chrono::Utc::now().timestamp_millis()).expect("after 1970")
}

/// A double metric, by name and alias or by alias alone.
pub fn tag(name: Option<String>, alias: u64, value: f64) -> Metric {
    Metric {
        name,
        alias: Some(alias),
        timestamp: Some(now_ms()),
        datatype: Some(DataType::Double.number()),
        value: Some(Value::DoubleValue(value)),
        ..Metric::default()
    }
}
