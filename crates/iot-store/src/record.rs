//! What one MQTT message becomes in the database ([`Record`]), and the flagged document
//! of a payload that cannot be read. [`ingest`](crate::ingest) makes records; the
//! persister's writer stores them.

use std::borrow::Cow;

use base64::Engine;
use bson::{doc, oid::ObjectId, Document};

/// The most of a payload kept in a flagged document, in bytes.
pub const MAX_RAW: usize = 64 * 1024;

/// What one MQTT message becomes in the database.
#[derive(Debug, Clone, PartialEq)]
pub enum Record {
    /// Readings for `readings`, one document per measurement; `keyed` when they are one
    /// reading named by `device`, `boot` and `seq` (its `_id`).
    Readings {
        documents: Vec<Document>,
        keyed: bool,
    },
    /// A payload that cannot be read, flagged, for `readings`.
    Unparsed { document: Document },
    /// A device status for `status`.
    Status {
        device: String,
        online: bool,
        document: Document,
    },
    /// Nothing to store (an event, a text, a topic no rule reads); `why`, for the log.
    Nothing { why: Cow<'static, str> },
    /// One message that is several of the above: a Sparkplug birth (the status and
    /// the values), a node's death (its devices' statuses too).
    Several(Vec<Record>),
}

impl Record {
    /// The records this one holds: itself, or those of [`Record::Several`].
    pub fn parts(&self) -> &[Record] {
        match self {
            Record::Several(records) => records,
            single => std::slice::from_ref(single),
        }
    }
}

/// `text` cut on a character boundary at or below `bytes`.
pub(crate) fn cut(text: &str, bytes: usize) -> &str {
    let mut end = text.len().min(bytes);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// A flagged document of a payload that is not a reading: its raw text (or base64
/// when it is not UTF-8) cut at [`MAX_RAW`] bytes, its full size, and `error`, why.
pub(crate) fn unparsed(
    topic: &str,
    payload: &[u8],
    received: bson::DateTime,
    error: &str,
) -> Document {
    let mut document = doc! {
        "_id": ObjectId::new(),
        "topic": topic,
        "ts": received,
        "received_at": received,
        "unparsed": true,
        "error": error,
        "raw_size": payload.len() as i64,
    };
    let kept = &payload[..payload.len().min(MAX_RAW)];
    match std::str::from_utf8(payload) {
        Ok(text) => {
            document.insert("raw", cut(text, MAX_RAW));
        }
        Err(_) => {
            document.insert(
                "raw_base64",
                base64::engine::general_purpose::STANDARD.encode(kept),
            );
        }
    }
    if payload.len() > MAX_RAW {
        document.insert("raw_truncated", true);
    }
    document
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Mapping;
    use bson::doc;
    use chrono::{DateTime, Utc};

    fn at() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2026-11-24T10:00:00.5Z")
            .expect("valid")
            .with_timezone(&Utc)
    }

    #[test]
    fn a_plain_number_is_a_reading_at_receive_time() {
        let Record::Readings { documents, keyed } =
            Record::from_message("/sensor/temperature", b"23.41", at())
        else {
            panic!("not a reading");
        };
        let [document] = &documents[..] else {
            panic!("one document: {documents:?}");
        };
        assert!(!keyed);
        assert_eq!(document.get_f64("value"), Ok(23.41));
        assert_eq!(document.get_str("topic"), Ok("/sensor/temperature"));
        assert_eq!(
            document.get_datetime("ts"),
            Ok(&bson::DateTime::from_chrono(at()))
        );
        assert!(document.get_object_id("_id").is_ok());
    }

    #[test]
    fn a_json_reading_is_keyed_by_device_boot_and_seq_with_device_time() {
        let payload = br#"{"device":"temp-0001","boot":"k3x9q2","seq":42,"ts":"2026-11-24T09:59:59.000Z","value":23.41,"unit":"C"}"#;
        let Record::Readings { documents, keyed } =
            Record::from_message("/sensor/temperature", payload, at())
        else {
            panic!("not a reading");
        };
        let [document] = &documents[..] else {
            panic!("one document: {documents:?}");
        };
        assert!(keyed);
        assert_eq!(
            document.get_document("_id"),
            Ok(&doc! { "device": "temp-0001", "boot": "k3x9q2", "seq": 42_i64 })
        );
        assert_eq!(document.get_i64("seq"), Ok(42));
        assert_eq!(document.get_str("unit"), Ok("C"));
        assert_eq!(
            document.get_datetime("ts").map(|t| t.timestamp_millis()),
            Ok(at().timestamp_millis() - 1500)
        );
        assert_eq!(
            document.get_datetime("received_at"),
            Ok(&bson::DateTime::from_chrono(at()))
        );
    }

    #[test]
    fn anything_else_is_kept_flagged_and_bounded() {
        let Record::Unparsed { document } = Record::from_message("/sensor/x", b"{broken", at())
        else {
            panic!("not flagged");
        };
        assert_eq!(document.get_bool("unparsed"), Ok(true));
        assert_eq!(document.get_str("raw"), Ok("{broken"));
        assert!(document.get("value").is_none());

        let Record::Unparsed { document } = Record::from_message("/sensor/x", &[0xff, 0x00], at())
        else {
            panic!("not flagged");
        };
        assert_eq!(document.get_str("raw_base64"), Ok("/wA="));

        let big = "é".repeat(MAX_RAW);
        let Record::Unparsed { document } = Record::from_message("/sensor/x", big.as_bytes(), at())
        else {
            panic!("not flagged");
        };
        assert!(document
            .get_str("raw")
            .is_ok_and(|raw| raw.len() <= MAX_RAW));
        assert_eq!(document.get_bool("raw_truncated"), Ok(true));
        assert_eq!(document.get_i64("raw_size"), Ok(big.len() as i64));
    }

    #[test]
    fn status_messages_name_their_device() {
        let Record::Status { device, online, .. } =
            Record::from_message("/device/status", b"offline", at())
        else {
            panic!("not a status");
        };
        assert_eq!((device.as_str(), online), ("/device/status", false));
        let payload = br#"{"device":"dev-7","status":"online"}"#;
        let Record::Status { device, online, .. } =
            Record::from_message("/device/status", payload, at())
        else {
            panic!("not a status");
        };
        assert_eq!((device.as_str(), online), ("dev-7", true));
        assert!(matches!(
            Record::from_message("/device/status", b"rebooting", at()),
            Record::Unparsed { .. }
        ));
    }

    /// The flagged document of a message, or a panic saying what it became.
    fn flagged(topic: &str, payload: &[u8]) -> Document {
        match Record::from_message(topic, payload, at()) {
            Record::Unparsed { document } => document,
            other => panic!(
                "{topic} {}: not flagged: {other:?}",
                String::from_utf8_lossy(payload)
            ),
        }
    }

    /// The `_id` of a keyed reading, or a panic.
    fn key(topic: &str, payload: &[u8]) -> Document {
        match Record::from_message(topic, payload, at()) {
            Record::Readings {
                documents,
                keyed: true,
            } => documents[0].get_document("_id").expect("a key").clone(),
            other => panic!("{topic}: not keyed: {other:?}"),
        }
    }

    #[test]
    fn the_topic_names_the_device_and_a_payload_claiming_another_is_flagged() {
        let forged = br#"{"device":"temp-0001","boot":"b1","seq":7,"value":99.99}"#;
        let document = flagged("/sensor/evil/temperature", forged);
        assert_eq!(document.get_str("identity"), Ok("mismatch"));
        assert_eq!(document.get_str("topic_device"), Ok("evil"));
        assert_eq!(document.get_str("claimed_device"), Ok("temp-0001"));
        assert!(
            document.get_object_id("_id").is_ok(),
            "never the claimed key"
        );
        assert!(document.get("device").is_none() && document.get("value").is_none());

        let own = doc! { "device": "evil", "boot": "b1", "seq": 7_i64 };
        let honest = br#"{"device":"evil","boot":"b1","seq":7,"value":1.0}"#;
        assert_eq!(key("/sensor/evil/temperature", honest), own);
        // Without a device of its own, the reading is the topic's device's.
        let anonymous = br#"{"boot":"b1","seq":7,"value":1.0}"#;
        assert_eq!(key("/sensor/evil/temperature", anonymous), own);
        // Deeper topics are the device's too, never read by the catch-all.
        let document = flagged("/sensor/evil/a/b", forged);
        assert_eq!(document.get_str("identity"), Ok("mismatch"));

        // The seed's topics, which only service accounts write: the payload names it.
        assert_eq!(
            key("/sensor/temperature", forged),
            doc! { "device": "temp-0001", "boot": "b1", "seq": 7_i64 }
        );
        // A topic no rule binds: a claimed device is not believed.
        let document = flagged("/plant/line-1", forged);
        assert_eq!(document.get_str("identity"), Ok("unverified"));

        // The same for a status.
        let document = flagged(
            "/device/evil/status",
            br#"{"device":"temp-0001","status":"offline"}"#,
        );
        assert_eq!(document.get_str("identity"), Ok("mismatch"));
        let Record::Status { device, online, .. } =
            Record::from_message("/device/evil/status", b"offline", at())
        else {
            panic!("not a status");
        };
        assert_eq!((device.as_str(), online), ("evil", false));
    }

    #[test]
    fn ids_and_seqs_outside_their_bounds_are_flagged() {
        let long = "d".repeat(65_530);
        let with = |device: &str, boot: &str, seq: &str| {
            format!(r#"{{"device":"{device}","boot":"{boot}","seq":{seq},"value":1.5}}"#)
        };
        for (topic, payload) in [
            ("/sensor/temperature", with(&long, "b", "1")),
            ("/sensor/temperature", with(&"d".repeat(129), "b", "1")),
            ("/sensor/temperature", with("d", &"b".repeat(129), "1")),
            ("/sensor/temperature", with("d", "b/c", "1")),
            ("/sensor/temperature", with("d+", "b", "1")),
            ("/sensor/temperature", with("d", "b", "0")),
            ("/sensor/temperature", with("d", "b", "9007199254740993")),
            (
                "/sensor/temperature",
                with("d", "b", "18446744073709551615"),
            ),
        ] {
            let document = flagged(topic, payload.as_bytes());
            assert!(document.get_str("error").is_ok(), "{document:?}");
        }
        // A status's device, from the payload where the topic names none.
        let status = format!(r#"{{"device":"{}","status":"online"}}"#, "d".repeat(129));
        flagged("/device/status", status.as_bytes());
        let topic = format!("/sensor/{long}/temperature");
        flagged(&topic, b"21.5");
        flagged(&format!("/sensor/d/{}", "m".repeat(129)), b"21.5");
        // A preset's measurement names as stored: the topic's part and the payload's
        // path together, at most 128 bytes, though each is shorter.
        let shelly = Mapping::load(&["shelly".to_string()], chrono_tz::Tz::UTC).expect("preset");
        let topic = format!("shellies/plug/{}", "m".repeat(100));
        let long = format!(r#"{{"{}":21.5}}"#, "p".repeat(40));
        assert!(matches!(
            shelly.read(&topic, long.as_bytes(), at()),
            Record::Unparsed { .. }
        ));
        assert!(matches!(
            shelly.read(&topic, br#"{"p":21.5}"#, at()),
            Record::Readings { .. }
        ));
        assert_eq!(
            key(
                "/sensor/temperature",
                with("d", "b", "9007199254740992").as_bytes()
            ),
            doc! { "device": "d", "boot": "b", "seq": 9_007_199_254_740_992_i64 }
        );
    }
}
