//! `iot-store`: the MongoDB side of the pipeline, shared by `mongo-persister` and
//! `readings` (and linked by no other binary): the settings that build the client, the
//! collections and their indexes, and what each MQTT message becomes ([`ingest`]).
//!
//! Collections of the database (`iot` by default):
//! - `readings`: one document per measurement: `topic`, `value` (double), `ts` (device
//!   time when the payload has one, else receive time), `received_at`, and when known
//!   `device`, `measurement`, `unit`, `boot`, `seq`. A reading with `device`, `boot` and
//!   `seq` has the `_id` `{device, boot, seq}`, so a redelivered copy is refused as a
//!   duplicate. A payload that cannot be read is kept here too, flagged
//!   `unparsed: true` with its `raw` text (or `raw_base64`), cut at [`MAX_RAW`] bytes.
//! - `status`: one document per change of a device's status (`online` / `offline`),
//!   numbered per device: `_id` `{device, change}` and `change` from 1, so that
//!   persister replicas that race to store the same change cannot both succeed.
//! - `repairs`: the persister's replay requests for missing readings, one document per
//!   range and attempt (`outcome: "asked"`), and ranges recorded as `lost` (the device no
//!   longer has them) or `unanswered`.

pub mod ingest;

use std::borrow::Cow;
use std::time::Duration;

use anyhow::Context;
use base64::Engine;
use bson::{doc, oid::ObjectId, Bson, Document};
use chrono::{DateTime, Utc};
use futures_util::TryStreamExt;
use mongodb::options::{ClientOptions, IndexOptions};
use mongodb::{Client, Database, IndexModel};

use iot_core::config::parse_positive_seconds;

pub use ingest::Mapping;

/// Readings, parsed or flagged.
pub const READINGS: &str = "readings";
/// Device status changes.
pub const STATUS: &str = "status";
/// The persister's replay requests and their outcomes (lost, unanswered).
pub const REPAIRS: &str = "repairs";
/// A `repairs` record of a replay request (`outcome: "asked"`): the `ranges` asked for
/// (sorted), their span as `from`–`to`, and who asked when; `None` without ranges. The
/// persister and `readings gaps --repair` each give it an `_id` of their own.
pub fn asked_record(
    id: Document,
    device: &str,
    boot: &str,
    ranges: &[(u64, u64)],
    attempt: i64,
    by: &str,
    at: bson::DateTime,
) -> Option<Document> {
    let (from, to) = (ranges.first()?.0, ranges.last()?.1);
    let ranges: Vec<Vec<i64>> = ranges
        .iter()
        .map(|&(from, to)| vec![from as i64, to as i64])
        .collect();
    Some(doc! {
        "_id": id, "device": device, "boot": boot, "from": from as i64, "to": to as i64,
        "ranges": ranges, "attempt": attempt, "outcome": "asked", "at": at, "by": by,
    })
}

/// The most of a payload kept in a flagged document, in bytes.
pub const MAX_RAW: usize = 64 * 1024;

/// Where the data lives; builds its own client.
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "MongoDB")]
pub struct MongoSettings {
    /// Connection string; credentials in it are never logged
    #[arg(
        long = "mongodb-uri",
        env = "MONGODB_URI",
        default_value = "mongodb://localhost:27017",
        hide_env_values = true
    )]
    pub uri: String,
    /// Database name
    #[arg(
        long = "mongodb-database",
        env = "MONGODB_DATABASE",
        default_value = "iot"
    )]
    pub database: String,
    /// Seconds to wait for a reachable server before an operation fails
    #[arg(long = "mongodb-timeout", value_name = "SECONDS", env = "MONGODB_TIMEOUT", default_value = "5", value_parser = parse_positive_seconds)]
    pub timeout: Duration,
}

impl MongoSettings {
    /// A handle on the database. Connecting is lazy: a server that is down shows up as
    /// an error of the first operation, after [`MongoSettings::timeout`].
    pub async fn database(&self, app_name: &str) -> anyhow::Result<Database> {
        let mut options = ClientOptions::parse(&self.uri).await.with_context(|| {
            format!(
                "MONGODB_URI {} is not a valid connection string",
                self.redacted_uri()
            )
        })?;
        options.app_name = Some(app_name.to_string());
        options.server_selection_timeout = Some(self.timeout);
        options.connect_timeout = Some(self.timeout);
        let client = Client::with_options(options).context("cannot set up the MongoDB client")?;
        Ok(client.database(&self.database))
    }

    /// The connection string without its password, for logs and errors.
    pub fn redacted_uri(&self) -> String {
        redact(&self.uri)
    }
}

/// `mongodb://user:secret@host/` -> `mongodb://user:***@host/`.
pub fn redact(uri: &str) -> String {
    let Some((scheme, rest)) = uri.split_once("://") else {
        return uri.to_string();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => {
            let user = rest[..at].split(':').next().unwrap_or_default();
            format!("{scheme}://{user}:***{}", &rest[at..])
        }
        None => uri.to_string(),
    }
}

/// An error on one line for a log or a terminal. When no server answered, the driver's
/// topology dump is replaced by a short sentence.
pub fn describe(error: &anyhow::Error) -> String {
    let unreachable = error.chain().any(|cause| {
        cause
            .downcast_ref::<mongodb::error::Error>()
            .is_some_and(|error| {
                matches!(
                    error.kind.as_ref(),
                    mongodb::error::ErrorKind::ServerSelection { .. }
                )
            })
    });
    if !unreachable {
        return format!("{error:#}");
    }
    let contexts: Vec<String> = error
        .chain()
        .take_while(|cause| cause.downcast_ref::<mongodb::error::Error>().is_none())
        .map(ToString::to_string)
        .collect();
    let reason = "no MongoDB server answered in time (is it running, and is MONGODB_URI right?)";
    if contexts.is_empty() {
        reason.to_string()
    } else {
        format!("{}: {reason}", contexts.join(": "))
    }
}

/// The kind of a failed database operation, for metrics: `unreachable` (no server
/// answered), `write` (a write refused), `other`.
pub fn error_kind(error: &anyhow::Error) -> &'static str {
    let kind = error
        .chain()
        .find_map(|cause| cause.downcast_ref::<mongodb::error::Error>())
        .map(|error| error.kind.as_ref());
    match kind {
        Some(mongodb::error::ErrorKind::ServerSelection { .. }) => "unreachable",
        Some(
            mongodb::error::ErrorKind::Io(_)
            | mongodb::error::ErrorKind::ConnectionPoolCleared { .. },
        ) => "unreachable",
        Some(
            mongodb::error::ErrorKind::Write(_)
            | mongodb::error::ErrorKind::InsertMany(_)
            | mongodb::error::ErrorKind::BulkWrite(_),
        ) => "write",
        _ => "other",
    }
}

/// A stored whole number: int64 as written, int32 where a server narrowed a small one
/// (nx-27017 does), or a double without a fraction; `None` for anything else.
pub fn integer(value: Option<&Bson>) -> Option<i64> {
    match value? {
        Bson::Int64(number) => Some(*number),
        Bson::Int32(number) => Some(i64::from(*number)),
        Bson::Double(number) if number.fract() == 0.0 => Some(*number as i64),
        _ => None,
    }
}

/// The field a retention counts from: when the persister stored the document. Not the
/// device's `ts`, so that a device whose clock is years behind does not see its
/// readings removed as soon as they are stored.
pub const RETENTION_FIELD: &str = "received_at";

/// Parses a retention: a duration such as `30d`, `12h` or `90m`, at most 68 years
/// (MongoDB keeps a TTL in a 32-bit number of seconds).
pub fn parse_retention(value: &str) -> Result<Duration, String> {
    let keep = humantime::parse_duration(value.trim())
        .map_err(|_| "expected a duration such as 30d, 12h or 90m".to_string())?;
    if keep.as_secs() == 0 || keep.as_secs() > i32::MAX as u64 {
        return Err("expected at least 1 second and at most 68 years".into());
    }
    Ok(keep)
}

/// A retention as it is written: the largest of days, hours, minutes and seconds that
/// divides it (`365d`, `12h`, `90m`).
pub fn format_retention(keep: Duration) -> String {
    let seconds = keep.as_secs();
    let (unit, length) = [("d", 86_400), ("h", 3_600), ("m", 60), ("s", 1)]
        .into_iter()
        .find(|(_, length)| seconds % length == 0)
        .unwrap_or(("s", 1));
    format!("{}{unit}", seconds / length)
}

/// Keeps the documents of `collection` for `keep` after they were stored, through a TTL
/// index on [`RETENTION_FIELD`] (MongoDB's TTL monitor removes expired documents about
/// once a minute); `None` removes such an index. A changed `keep` changes the index in
/// place (`collMod`); a server that ignores that (a stand-in) gets it made again.
/// Returns what changed, for the log.
pub async fn set_retention(
    db: &Database,
    collection: &str,
    keep: Option<Duration>,
) -> anyhow::Result<Option<String>> {
    let current = retention(db, collection).await?;
    let coll = db.collection::<Document>(collection);
    let what = match (current, keep) {
        (None, None) => return Ok(None),
        (Some((_, had)), Some(keep)) if had.as_secs() == keep.as_secs() => return Ok(None),
        (Some((name, _)), None) => {
            coll.drop_index(name.clone())
                .await
                .with_context(|| format!("cannot drop the TTL index {collection}.{name}"))?;
            format!("{collection}: kept without limit (the TTL index is dropped)")
        }
        (Some((name, _)), Some(keep)) => {
            db.run_command(doc! {
                "collMod": collection,
                "index": { "keyPattern": { RETENTION_FIELD: 1 }, "expireAfterSeconds": keep.as_secs() as i64 },
            })
            .await
            .with_context(|| format!("cannot change the TTL index {collection}.{name}"))?;
            if retention(db, collection)
                .await?
                .map(|(_, now)| now.as_secs())
                != Some(keep.as_secs())
            {
                coll.drop_index(name.clone())
                    .await
                    .with_context(|| format!("cannot drop the TTL index {collection}.{name}"))?;
                create_ttl(db, collection, keep).await?;
            }
            format!("{collection}: kept {}", format_retention(keep))
        }
        (None, Some(keep)) => {
            create_ttl(db, collection, keep).await?;
            format!("{collection}: kept {}", format_retention(keep))
        }
    };
    Ok(Some(what))
}

async fn create_ttl(db: &Database, collection: &str, keep: Duration) -> anyhow::Result<()> {
    let name = format!("{RETENTION_FIELD}_ttl");
    let model = IndexModel::builder()
        .keys(doc! { RETENTION_FIELD: 1 })
        .options(
            IndexOptions::builder()
                .name(name.clone())
                .expire_after(keep)
                .build(),
        )
        .build();
    db.collection::<Document>(collection)
        .create_index(model)
        .await
        .with_context(|| format!("cannot create the TTL index {collection}.{name}"))?;
    Ok(())
}

/// The TTL index of `collection` on [`RETENTION_FIELD`], if any: its name and time.
pub async fn retention(
    db: &Database,
    collection: &str,
) -> anyhow::Result<Option<(String, Duration)>> {
    let indexes: Vec<IndexModel> = db
        .collection::<Document>(collection)
        .list_indexes()
        .await
        .with_context(|| format!("cannot list the indexes of {collection}"))?
        .try_collect()
        .await
        .with_context(|| format!("cannot list the indexes of {collection}"))?;
    Ok(indexes.into_iter().find_map(|index| {
        let options = index.options?;
        let keep = options.expire_after?;
        let on_field = index.keys.len() == 1 && index.keys.contains_key(RETENTION_FIELD);
        on_field.then(|| (options.name.unwrap_or_default(), keep))
    }))
}

/// Creates the collections and the indexes the queries need, when missing.
pub async fn ensure_schema(db: &Database) -> anyhow::Result<()> {
    let existing = db
        .list_collection_names()
        .await
        .context("cannot list the collections")?;
    for name in [READINGS, STATUS, REPAIRS] {
        if !existing.iter().any(|collection| collection == name) {
            db.create_collection(name)
                .await
                .with_context(|| format!("cannot create the collection {name}"))?;
        }
    }
    let indexes = [
        // latest, range and stats: by topic, newest first.
        (READINGS, doc! { "topic": 1, "ts": -1 }, "topic_ts"),
        // latest, range and stats by device and measurement, devices.
        (
            READINGS,
            doc! { "device": 1, "measurement": 1, "ts": -1 },
            "device_measurement_ts",
        ),
        // gap checks: a device's readings in sequence.
        (
            READINGS,
            doc! { "device": 1, "boot": 1, "seq": 1 },
            "device_boot_seq",
        ),
        // status: each device's history, newest first.
        (STATUS, doc! { "device": 1, "ts": -1 }, "device_ts"),
        // the persister's check of each device's last change.
        (STATUS, doc! { "device": 1, "change": -1 }, "device_change"),
        // readings gaps: the repairs of a device's boot.
        (
            REPAIRS,
            doc! { "device": 1, "boot": 1, "from": 1 },
            "device_boot_from",
        ),
    ];
    for (collection, keys, name) in indexes {
        let model = IndexModel::builder()
            .keys(keys)
            .options(IndexOptions::builder().name(name.to_string()).build())
            .build();
        db.collection::<Document>(collection)
            .create_index(model)
            .await
            .with_context(|| format!("cannot create the index {collection}.{name}"))?;
    }
    Ok(())
}

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
}

impl Record {
    /// What a message received at `received_at` becomes under the built-in mapping
    /// (`ingest/default.toml`).
    pub fn from_message(topic: &str, payload: &[u8], received_at: DateTime<Utc>) -> Record {
        Mapping::builtin().read(topic, payload, received_at)
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

    #[test]
    fn retentions_read_and_print_in_whole_units() {
        let keep = parse_retention("365d").expect("a year");
        assert_eq!(keep.as_secs(), 365 * 86_400);
        assert_eq!(format_retention(keep), "365d");
        assert_eq!(
            format_retention(parse_retention("12h").expect("hours")),
            "12h"
        );
        assert_eq!(
            format_retention(parse_retention("90m").expect("minutes")),
            "90m"
        );
        assert!(parse_retention("0s").is_err());
        assert!(parse_retention("100years").is_err());
        assert!(parse_retention("soon").is_err());
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact("mongodb://app:s3cret@db:27017/iot?authSource=admin"),
            "mongodb://app:***@db:27017/iot?authSource=admin"
        );
        assert_eq!(
            redact("mongodb://localhost:27017"),
            "mongodb://localhost:27017"
        );
    }
}
