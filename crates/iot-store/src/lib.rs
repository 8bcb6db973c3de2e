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
mod record;
pub mod repairs;
pub mod sparkplug;

use std::time::Duration;

use anyhow::Context;
use bson::{doc, Bson, Document};
use futures_util::TryStreamExt;
use mongodb::options::{ClientOptions, IndexOptions};
use mongodb::{Client, Database, IndexModel};

use iot_core::config::parse_positive_seconds;

pub use ingest::Mapping;
pub use record::{Record, MAX_RAW};

/// Readings, parsed or flagged.
pub const READINGS: &str = "readings";
/// Device status changes.
pub const STATUS: &str = "status";
/// The persister's replay requests and their outcomes (lost, unanswered).
pub const REPAIRS: &str = "repairs";
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

#[cfg(test)]
mod tests {
    use super::*;

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
