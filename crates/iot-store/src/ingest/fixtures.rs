//! The firmware documentation's messages of `tests/fixtures/ingest/` and what each
//! must become, for the unit tests beside the mapping and the end-to-end tests (feature
//! `fixtures`). The format: `tests/fixtures/ingest/README.md`.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde_json::Value;

/// The fixture files, by preset.
const FILES: &[(&str, &str)] = &[
    (
        "tasmota",
        include_str!("../../../../tests/fixtures/ingest/tasmota.json"),
    ),
    (
        "zigbee2mqtt",
        include_str!("../../../../tests/fixtures/ingest/zigbee2mqtt.json"),
    ),
    (
        "esphome",
        include_str!("../../../../tests/fixtures/ingest/esphome.json"),
    ),
    (
        "shelly",
        include_str!("../../../../tests/fixtures/ingest/shelly.json"),
    ),
    (
        "homeassistant",
        include_str!("../../../../tests/fixtures/ingest/homeassistant.json"),
    ),
];

/// Every preset, in the order a persister that reads them all lists them.
pub const ALL_PRESETS: [&str; 6] = [
    "tasmota",
    "zigbee2mqtt",
    "shelly",
    "homeassistant",
    "esphome",
    "default",
];

/// One message a device publishes, and what the persister must make of it.
#[derive(Debug, Clone)]
pub struct Message {
    pub preset: &'static str,
    pub topic: String,
    pub payload: Vec<u8>,
    pub expect: Expect,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Expect {
    /// Not stored, counted as ignored.
    Nothing,
    /// Stored flagged.
    Flagged,
    /// A status change of `device`.
    Status { device: String, online: bool },
    /// Readings of `device`: measurement -> (value, unit), at device time `ts` (None:
    /// the time it was received).
    Readings {
        device: Option<String>,
        ts: Option<DateTime<Utc>>,
        readings: BTreeMap<String, (f64, Option<String>)>,
    },
}

/// Every fixture message, preset by preset, in file order.
pub fn messages() -> Vec<Message> {
    FILES
        .iter()
        .flat_map(|(preset, text)| {
            let file: Value = serde_json::from_str(text).expect("fixture JSON");
            let messages = file["messages"].as_array().cloned().unwrap_or_default();
            messages
                .into_iter()
                .map(move |message| parse(preset, &message))
        })
        .collect()
}

fn parse(preset: &'static str, message: &Value) -> Message {
    let topic = message["topic"].as_str().expect("topic").to_string();
    let payload = match (message.get("payload"), message.get("payload_hex")) {
        (Some(Value::String(text)), _) => text.as_bytes().to_vec(),
        (_, Some(Value::String(hex))) => (0..hex.len())
            .step_by(2)
            .map(|at| u8::from_str_radix(&hex[at..at + 2], 16).expect("hex"))
            .collect(),
        _ => panic!("a fixture without payload: {message}"),
    };
    let expect = match &message["expect"] {
        Value::String(word) if word == "nothing" => Expect::Nothing,
        Value::String(word) if word == "flagged" => Expect::Flagged,
        Value::Object(want) if want.contains_key("status") => Expect::Status {
            device: want["device"].as_str().expect("device").to_string(),
            online: want["status"] == "online",
        },
        Value::Object(want) => Expect::Readings {
            device: want["device"].as_str().map(String::from),
            ts: want.get("ts").map(|ts| {
                DateTime::parse_from_rfc3339(ts.as_str().expect("ts"))
                    .expect("an RFC 3339 time")
                    .with_timezone(&Utc)
            }),
            readings: want["readings"]
                .as_object()
                .expect("readings")
                .iter()
                .map(|(name, pair)| {
                    let value = pair[0].as_f64().expect("value");
                    (name.clone(), (value, pair[1].as_str().map(String::from)))
                })
                .collect(),
        },
        other => panic!("unknown expectation {other}"),
    };
    Message {
        preset,
        topic,
        payload,
        expect,
    }
}

/// A changed topic layout of every preset that takes one, as `--ingest` (and
/// `scripts/add-device --preset`) take it: the owners' own layouts of the fixtures.
pub const LAYOUTS: [(&str, &str); 5] = [
    (
        "tasmota",
        "tasmota:fulltopic=emoncms/ch2i/factory/%topic%/%prefix%/",
    ),
    ("esphome", "esphome:topic_prefix=home/{device}"),
    ("zigbee2mqtt", "zigbee2mqtt:base_topic=home/zigbee"),
    ("homeassistant", "homeassistant:base_topic=ha/statestream"),
    ("shelly", "shelly:topic_prefix=home/{device}"),
];

/// `message` as a device laid out as [`LAYOUTS`] says publishes it: its topic moved,
/// and a device its preset names by the base topic moved with it.
pub fn laid_out(message: &Message) -> Message {
    let mut moved = message.clone();
    let topic = message.topic.as_str();
    let root = |from: &str, to: &str, text: &str| match text.strip_prefix(from) {
        Some(rest) if rest.is_empty() || rest.starts_with('/') => format!("{to}{rest}"),
        _ => text.to_string(),
    };
    moved.topic = match message.preset {
        "tasmota" => {
            let levels: Vec<&str> = topic.splitn(3, '/').collect();
            match levels.as_slice() {
                [prefix @ ("tele" | "stat" | "cmnd"), device, rest @ ..] => {
                    let mut moved = format!("emoncms/ch2i/factory/{device}/{prefix}");
                    for level in rest {
                        moved.push('/');
                        moved.push_str(level);
                    }
                    moved
                }
                _ => topic.to_string(),
            }
        }
        "esphome" => format!("home/{topic}"),
        "shelly" if !topic.starts_with("shellies/") => format!("home/{topic}"),
        "zigbee2mqtt" => root("zigbee2mqtt", "home/zigbee", topic),
        "homeassistant" => root("homeassistant", "ha/statestream", topic),
        _ => topic.to_string(),
    };
    if message.preset == "zigbee2mqtt" {
        let device = |device: &mut String| *device = root("zigbee2mqtt", "home/zigbee", device);
        match &mut moved.expect {
            Expect::Status { device: named, .. } => device(named),
            Expect::Readings {
                device: Some(named),
                ..
            } => device(named),
            _ => {}
        }
    }
    moved
}
