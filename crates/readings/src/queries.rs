//! The queries over `readings` and `status`, one function each. Every one is a find or
//! an aggregation of standard stages and operators, read into [`Rows`] by
//! [`aggregate_rows`] where the documents are the rows.

use bson::{doc, Bson, Document};
use chrono::{DateTime, Utc};
use futures_util::TryStreamExt;
use mongodb::Database;
use serde_json::Value;

use iot_core::payload::format_time;
use iot_store::{format_retention, integer, retention, READINGS, STATUS};

use crate::cli::{Bucket, Series, Window};
use crate::output::{Field, Rows};

use Field::{Plain, Raw, Rounded};

/// Runs `pipeline` on `collection`; each result document is one row.
async fn aggregate_rows(
    db: &Database,
    collection: &str,
    pipeline: impl IntoIterator<Item = Document>,
    columns: &[(&'static str, Field)],
    empty: String,
) -> anyhow::Result<Rows> {
    let documents: Vec<Document> = db
        .collection::<Document>(collection)
        .aggregate(pipeline)
        .await?
        .try_collect()
        .await?;
    Ok(Rows::from_documents(columns, &documents, empty))
}

/// `latest`: the newest value of every series (topic, device, measurement). Groups are
/// keyed by one string (fields joined by U+0000), not a compound `_id`, which not every
/// MongoDB-compatible server evaluates.
pub async fn latest(db: &Database) -> anyhow::Result<Rows> {
    let pipeline = [
        doc! { "$match": { "value": { "$exists": true } } },
        doc! { "$sort": { "topic": 1, "ts": -1 } },
        doc! { "$group": {
            "_id": { "$concat": ["$topic", "\u{0}", { "$ifNull": ["$device", ""] }, "\u{0}", { "$ifNull": ["$measurement", ""] }] },
            "topic": { "$first": "$topic" },
            "device": { "$first": "$device" },
            "measurement": { "$first": "$measurement" },
            "value": { "$first": "$value" },
            "unit": { "$first": "$unit" },
            "ts": { "$first": "$ts" },
        } },
        doc! { "$sort": { "topic": 1, "device": 1, "measurement": 1 } },
    ];
    let columns = [
        ("topic", Plain("topic")),
        ("device", Plain("device")),
        ("measurement", Plain("measurement")),
        ("value", Plain("value")),
        ("unit", Plain("unit")),
        ("ts", Plain("ts")),
    ];
    aggregate_rows(
        db,
        READINGS,
        pipeline,
        &columns,
        "no readings stored yet".into(),
    )
    .await
}

/// `range`: one series' readings in the window, oldest first, at most `limit`.
pub async fn range(
    db: &Database,
    series: &Series,
    window: &Window,
    limit: u32,
) -> anyhow::Result<Rows> {
    let until = window.until();
    let mut filter = series.filter();
    filter.insert("ts", time_range(window.since, until));
    let documents: Vec<Document> = db
        .collection::<Document>(READINGS)
        .find(filter)
        .sort(doc! { "ts": 1 })
        .limit(i64::from(limit))
        .await?
        .try_collect()
        .await?;
    let columns = [
        ("ts", Plain("ts")),
        ("value", Plain("value")),
        ("unit", Plain("unit")),
        ("device", Plain("device")),
        ("measurement", Plain("measurement")),
        ("seq", Plain("seq")),
        ("raw", Raw),
    ];
    Ok(Rows::from_documents(
        &columns,
        &documents,
        nothing_on(&series.describe(), window.since, until),
    ))
}

/// `stats`: count, min, average and max per bucket of `every`. A reading's bucket is
/// its time in milliseconds since 1970 divided by the width, rounded down (`$dateDiff`,
/// `$divide`, `$floor`): plain arithmetic that every server evaluates alike, where
/// `$dateTrunc`'s `binSize` is ignored by some MongoDB-compatible servers (nx-27017
/// answers one-second buckets) and counts from 2000-01-01 on MongoDB. The bucket's
/// start is made from its number here.
pub async fn stats(
    db: &Database,
    series: &Series,
    window: &Window,
    every: Bucket,
) -> anyhow::Result<Rows> {
    let until = window.until();
    let mut filter = series.filter();
    filter.insert("ts", time_range(window.since, until));
    filter.insert("value", doc! { "$exists": true });
    let epoch = bson::DateTime::from_millis(0);
    let millis =
        doc! { "$dateDiff": { "startDate": epoch, "endDate": "$ts", "unit": "millisecond" } };
    let pipeline = [
        doc! { "$match": filter },
        doc! { "$group": {
            "_id": { "$floor": { "$divide": [millis, every.millis] } },
            "count": { "$sum": 1 },
            "min": { "$min": "$value" },
            "avg": { "$avg": "$value" },
            "max": { "$max": "$value" },
        } },
        doc! { "$sort": { "_id": 1 } },
    ];
    let mut documents: Vec<Document> = db
        .collection::<Document>(READINGS)
        .aggregate(pipeline)
        .await?
        .try_collect()
        .await?;
    for document in &mut documents {
        let start = integer(document.get("_id"))
            .and_then(|number| number.checked_mul(every.millis))
            .map_or(Bson::Null, |millis| {
                Bson::DateTime(bson::DateTime::from_millis(millis))
            });
        document.insert("bucket", start);
    }
    let columns = [
        ("bucket", Plain("bucket")),
        ("count", Plain("count")),
        ("min", Plain("min")),
        ("avg", Rounded("avg")),
        ("max", Plain("max")),
    ];
    Ok(Rows::from_documents(
        &columns,
        &documents,
        nothing_on(&series.describe(), window.since, until),
    ))
}

/// `status`: every device's newest status and since when.
pub async fn status(db: &Database) -> anyhow::Result<Rows> {
    let pipeline = [
        doc! { "$sort": { "device": 1, "ts": -1 } },
        doc! { "$group": {
            "_id": "$device",
            "status": { "$first": "$status" },
            "since": { "$first": "$ts" },
        } },
        doc! { "$sort": { "_id": 1 } },
    ];
    let columns = [
        ("device", Plain("_id")),
        ("status", Plain("status")),
        ("since", Plain("since")),
    ];
    aggregate_rows(
        db,
        STATUS,
        pipeline,
        &columns,
        "no device status stored yet".into(),
    )
    .await
}

/// `info`: documents per collection and how long they are kept.
pub async fn info(db: &Database) -> anyhow::Result<Rows> {
    let mut rows = Vec::new();
    for collection in [READINGS, STATUS] {
        let documents = db
            .collection::<Document>(collection)
            .count_documents(doc! {})
            .await?;
        let kept = match retention(db, collection).await? {
            Some((_, keep)) => format_retention(keep),
            None => "without limit".to_string(),
        };
        rows.push(vec![
            Value::from(collection),
            Value::from(documents),
            Value::from(kept),
        ]);
    }
    Ok(Rows {
        columns: vec!["collection", "documents", "kept"],
        rows,
        empty: String::new(),
        trouble: false,
    })
}

/// `devices`: each device with its measurements, the time of its newest reading, and
/// its status: one pass over the readings grouped by device and measurement, one over
/// the status changes.
pub async fn devices(db: &Database) -> anyhow::Result<Rows> {
    let pipeline = [
        doc! { "$match": { "device": { "$exists": true }, "value": { "$exists": true } } },
        doc! { "$group": {
            "_id": { "$concat": ["$device", "\u{0}", { "$ifNull": ["$measurement", ""] }] },
            "device": { "$first": "$device" },
            "measurement": { "$first": "$measurement" },
            "last": { "$max": "$ts" },
        } },
    ];
    let series: Vec<Document> = db
        .collection::<Document>(READINGS)
        .aggregate(pipeline)
        .await?
        .try_collect()
        .await?;
    let status_pipeline = [
        doc! { "$sort": { "device": 1, "ts": -1 } },
        doc! { "$group": { "_id": "$device", "status": { "$first": "$status" }, "since": { "$first": "$ts" } } },
    ];
    let statuses: Vec<Document> = db
        .collection::<Document>(STATUS)
        .aggregate(status_pipeline)
        .await?
        .try_collect()
        .await?;
    Ok(device_rows(&series, &statuses))
}

/// The rows of `devices` from its two aggregations.
fn device_rows(series: &[Document], statuses: &[Document]) -> Rows {
    #[derive(Default)]
    struct Device {
        measurements: std::collections::BTreeSet<String>,
        last: Option<bson::DateTime>,
        status: Option<String>,
    }
    let mut found: std::collections::BTreeMap<String, Device> = Default::default();
    for document in series {
        let Ok(device) = document.get_str("device") else {
            continue;
        };
        let entry = found.entry(device.to_string()).or_default();
        if let Ok(measurement) = document.get_str("measurement") {
            entry.measurements.insert(measurement.to_string());
        }
        if let Ok(last) = document.get_datetime("last") {
            entry.last = entry.last.max(Some(*last));
        }
    }
    for document in statuses {
        let (Ok(device), Ok(status)) = (document.get_str("_id"), document.get_str("status")) else {
            continue;
        };
        found.entry(device.to_string()).or_default().status = Some(status.to_string());
    }
    let rows = found
        .into_iter()
        .map(|(device, found)| {
            vec![
                Value::from(device),
                found.status.map_or(Value::Null, Value::from),
                Value::from(found.measurements.into_iter().collect::<Vec<_>>().join(" ")),
                found.last.map_or(Value::Null, |last| {
                    Value::from(format_time(last.to_chrono()))
                }),
            ]
        })
        .collect();
    Rows {
        columns: vec!["device", "status", "measurements", "last_seen"],
        rows,
        empty: "no devices stored yet".into(),
        trouble: false,
    }
}

fn nothing_on(series: &str, since: DateTime<Utc>, until: DateTime<Utc>) -> String {
    format!(
        "no readings on {series} from {} to {}",
        format_time(since),
        format_time(until)
    )
}

fn time_range(since: DateTime<Utc>, until: DateTime<Utc>) -> Document {
    doc! { "$gte": bson::DateTime::from_chrono(since), "$lt": bson::DateTime::from_chrono(until) }
}
