//! `readings`: command-line queries over the stored readings.
//!
//! `latest`, `range`, `stats`, `devices`, `status`, `gaps` and `info`, printed as an
//! aligned table, JSON or CSV. A series is a topic, or a device and measurement.
//! Only standard MongoDB query and aggregation stages are used (`$dateTrunc` needs
//! MongoDB 5 or newer), so it runs against any MongoDB 6+ server.

use std::io::Write;

use anyhow::Context;
use bson::{doc, Bson, Document};
use chrono::{DateTime, Utc};
use clap::{Parser, Subcommand};
use futures_util::TryStreamExt;
use std::time::Duration;

use iot_core::bounds::{check_id, check_seq};
use iot_core::config::{BrokerSettings, CloudBroker};
use iot_core::mqtt::Connection;
use iot_core::payload::format_time;
use iot_core::replay::{self, Ranges, MAX_RANGES};
use iot_store::{
    asked_record, describe, format_retention, integer, retention, MongoSettings, READINGS, REPAIRS,
    STATUS,
};
use mongodb::Database;
use rumqttc::QoS;
use serde_json::Value;

/// Queries over the readings stored by mongo-persister.
#[derive(Debug, Clone, Parser)]
#[command(name = "readings", version)]
pub struct Cli {
    #[command(subcommand)]
    pub query: Query,
    /// Output form
    #[arg(
        long,
        global = true,
        env = "READINGS_FORMAT",
        value_enum,
        default_value = "table"
    )]
    pub format: OutputFormat,
    #[command(flatten)]
    pub mongo: MongoSettings,
}

/// How results are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    /// Aligned columns for people
    Table,
    /// A JSON array of objects
    Json,
    /// Comma-separated values with a header line
    Csv,
}

#[derive(Debug, Clone, Subcommand)]
pub enum Query {
    /// The last value of every series (topic, device and measurement)
    Latest,
    /// One series' readings in a time range, oldest first
    Range {
        #[command(flatten)]
        series: Series,
        /// Start: a duration back from now (30s, 10m, 2h, 7d) or an RFC 3339 time
        #[arg(long, default_value = "1h", value_parser = parse_time)]
        since: DateTime<Utc>,
        /// End (exclusive), in the same forms [default: now]
        #[arg(long, value_parser = parse_time)]
        until: Option<DateTime<Utc>>,
        /// Most readings printed
        #[arg(long, default_value = "1000")]
        limit: u32,
    },
    /// Count, min, average and max of one series per time bucket
    Stats {
        #[command(flatten)]
        series: Series,
        /// Start: a duration back from now (30s, 10m, 2h, 7d) or an RFC 3339 time
        #[arg(long, default_value = "1h", value_parser = parse_time)]
        since: DateTime<Utc>,
        /// End (exclusive), in the same forms [default: now]
        #[arg(long, value_parser = parse_time)]
        until: Option<DateTime<Utc>>,
        /// Bucket width: a whole number of seconds, minutes, hours or days (30s, 1m, 1h, 1d)
        #[arg(long, default_value = "1m", value_parser = parse_bucket)]
        every: Bucket,
    },
    /// Every device: its measurements, when it was last heard from, its status
    Devices,
    /// Every device's status and since when
    Status,
    /// What is stored: documents per collection and how long they are kept
    Info,
    /// Missing and duplicate sequence numbers per device and boot; exits 1 when there
    /// are any, 0 when there are none, 2 when the query fails (like diff)
    Gaps {
        /// Only readings since: a duration back from now (30s, 10m, 2h, 7d) or an RFC
        /// 3339 time [default: every stored reading, and each boot must start at seq 1]
        #[arg(long, value_parser = parse_time)]
        since: Option<DateTime<Utc>>,
        /// Only this device
        #[arg(long)]
        device: Option<String>,
        /// Report a gap only once a reading after it was received this long ago (10s,
        /// 1m): on a live stream with persister replicas, another replica's batch may
        /// still be on its way [default: every gap]
        #[arg(long, value_parser = parse_time)]
        settle: Option<DateTime<Utc>>,
        /// Ask each device with missing readings to send them again, through the cloud
        /// broker (as the persister does by itself for recent gaps); needs the
        /// persister's broker user, the only one that may ask
        #[arg(long)]
        repair: bool,
        #[command(flatten)]
        broker: CloudBroker,
    },
}

/// Which readings: a topic, a device, a measurement, or several of these together.
#[derive(Debug, Clone, clap::Args)]
#[group(skip)]
#[command(group(clap::ArgGroup::new("series").required(true).multiple(true).args(["topic", "device"])))]
pub struct Series {
    /// Topic, e.g. /sensor/temperature or tele/plug_1/SENSOR
    #[arg(long)]
    pub topic: Option<String>,
    /// Device, e.g. temp-0001 or living_room (readings devices lists them)
    #[arg(long)]
    pub device: Option<String>,
    /// Measurement of the device or topic, e.g. temperature or BME280.Temperature
    #[arg(long, requires = "series")]
    pub measurement: Option<String>,
}

impl Series {
    fn filter(&self) -> Document {
        let mut filter = Document::new();
        for (field, value) in [
            ("topic", &self.topic),
            ("device", &self.device),
            ("measurement", &self.measurement),
        ] {
            if let Some(value) = value {
                filter.insert(field, value);
            }
        }
        filter
    }

    fn describe(&self) -> String {
        [
            self.topic.as_deref(),
            self.device.as_deref(),
            self.measurement.as_deref(),
        ]
        .into_iter()
        .flatten()
        .collect::<Vec<_>>()
        .join(" ")
    }
}

impl Cli {
    /// The command line, with the MongoDB flags accepted after the query too
    /// (`readings latest --mongodb-uri …`).
    pub fn command() -> clap::Command {
        <Self as clap::CommandFactory>::command()
            .mut_arg("uri", |arg| arg.global(true))
            .mut_arg("database", |arg| arg.global(true))
            .mut_arg("timeout", |arg| arg.global(true))
    }
}

/// Parses `10m`-style durations back from now, or RFC 3339 times.
pub fn parse_time(value: &str) -> Result<DateTime<Utc>, String> {
    if let Ok(time) = DateTime::parse_from_rfc3339(value) {
        return Ok(time.with_timezone(&Utc));
    }
    let ago = humantime::parse_duration(value).map_err(|_| {
        format!("expected a duration such as 10m or 2h, or an RFC 3339 time, not {value:?}")
    })?;
    let ago = chrono::Duration::from_std(ago).map_err(|_| "duration too long".to_string())?;
    Utc::now()
        .checked_sub_signed(ago)
        .ok_or_else(|| "duration too long".to_string())
}

/// A bucket width as `$dateTrunc` takes it: a unit and a whole number of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bucket {
    pub unit: &'static str,
    pub size: i64,
}

/// Parses `30s`, `1m`, `90m`, `1h`, `1d` into the largest unit that divides it.
pub fn parse_bucket(value: &str) -> Result<Bucket, String> {
    let duration = humantime::parse_duration(value)
        .map_err(|_| format!("expected a duration such as 30s, 1m or 1h, not {value:?}"))?;
    if duration.subsec_nanos() != 0 || duration.is_zero() {
        return Err("expected a whole number of seconds, at least 1s".into());
    }
    let seconds = duration.as_secs() as i64;
    let unit = [
        ("day", 86_400),
        ("hour", 3_600),
        ("minute", 60),
        ("second", 1),
    ]
    .into_iter()
    .find(|(_, length)| seconds % length == 0)
    .unwrap_or(("second", 1));
    Ok(Bucket {
        unit: unit.0,
        size: seconds / unit.1,
    })
}

/// Rows of named columns, printable in every [`OutputFormat`].
#[derive(Debug, Clone, PartialEq)]
pub struct Rows {
    pub columns: Vec<&'static str>,
    pub rows: Vec<Vec<Value>>,
    /// What an empty result says in a table.
    pub empty: String,
    /// Whether the answer is bad news (`gaps` found missing or duplicate readings).
    pub trouble: bool,
}

/// Runs the query and prints the result to stdout. `Ok(false)`: `gaps` found some.
pub async fn run(cli: Cli) -> anyhow::Result<bool> {
    let db = cli.mongo.database("readings").await?;
    let failed = || format!("query on {} failed", cli.mongo.redacted_uri());
    // `gaps --repair` asks again for what the one pass over the readings found.
    let (rows, found) = match &cli.query {
        Query::Gaps {
            since,
            device,
            settle,
            repair: true,
            ..
        } => {
            let (rows, found) = gaps(&db, *since, device.as_deref(), *settle)
                .await
                .with_context(failed)?;
            (rows, Some(found))
        }
        query_of_cli => (query(&db, query_of_cli).await.with_context(failed)?, None),
    };
    {
        let mut out = std::io::stdout().lock();
        print(&rows, cli.format, &mut out)?;
        out.flush().context("cannot write to stdout")?;
    }
    if let (Some(found), Query::Gaps { broker, .. }) = (found, &cli.query) {
        ask_again(&found, broker, &db).await?;
    }
    Ok(!rows.trouble)
}

/// Runs one query.
pub async fn query(db: &Database, query: &Query) -> anyhow::Result<Rows> {
    use Field::{Plain, Raw, Rounded};
    let readings = db.collection::<Document>(READINGS);
    match query {
        Query::Latest => {
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
            let documents: Vec<Document> =
                readings.aggregate(pipeline).await?.try_collect().await?;
            let columns = [
                ("topic", Plain("topic")),
                ("device", Plain("device")),
                ("measurement", Plain("measurement")),
                ("value", Plain("value")),
                ("unit", Plain("unit")),
                ("ts", Plain("ts")),
            ];
            Ok(Rows::from_documents(
                &columns,
                &documents,
                "no readings stored yet".into(),
            ))
        }
        Query::Range {
            series,
            since,
            until,
            limit,
        } => {
            let until = until.unwrap_or_else(Utc::now);
            let mut filter = series.filter();
            filter.insert("ts", time_range(*since, until));
            let documents: Vec<Document> = readings
                .find(filter)
                .sort(doc! { "ts": 1 })
                .limit(i64::from(*limit))
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
                nothing_on(&series.describe(), *since, until),
            ))
        }
        Query::Stats {
            series,
            since,
            until,
            every,
        } => {
            let until = until.unwrap_or_else(Utc::now);
            let mut filter = series.filter();
            filter.insert("ts", time_range(*since, until));
            filter.insert("value", doc! { "$exists": true });
            let pipeline = [
                doc! { "$match": filter },
                doc! { "$group": {
                    "_id": { "$dateTrunc": { "date": "$ts", "unit": every.unit, "binSize": every.size } },
                    "count": { "$sum": 1 },
                    "min": { "$min": "$value" },
                    "avg": { "$avg": "$value" },
                    "max": { "$max": "$value" },
                } },
                doc! { "$sort": { "_id": 1 } },
            ];
            let documents: Vec<Document> =
                readings.aggregate(pipeline).await?.try_collect().await?;
            let columns = [
                ("bucket", Plain("_id")),
                ("count", Plain("count")),
                ("min", Plain("min")),
                ("avg", Rounded("avg")),
                ("max", Plain("max")),
            ];
            Ok(Rows::from_documents(
                &columns,
                &documents,
                nothing_on(&series.describe(), *since, until),
            ))
        }
        Query::Devices => devices(db).await,
        Query::Gaps {
            since,
            device,
            settle,
            ..
        } => {
            let (rows, _) = gaps(db, *since, device.as_deref(), *settle).await?;
            Ok(rows)
        }
        Query::Status => {
            let pipeline = [
                doc! { "$sort": { "device": 1, "ts": -1 } },
                doc! { "$group": {
                    "_id": "$device",
                    "status": { "$first": "$status" },
                    "since": { "$first": "$ts" },
                } },
                doc! { "$sort": { "_id": 1 } },
            ];
            let status = db.collection::<Document>(STATUS);
            let documents: Vec<Document> = status.aggregate(pipeline).await?.try_collect().await?;
            let columns = [
                ("device", Plain("_id")),
                ("status", Plain("status")),
                ("since", Plain("since")),
            ];
            Ok(Rows::from_documents(
                &columns,
                &documents,
                "no device status stored yet".into(),
            ))
        }
        Query::Info => {
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
    }
}

/// Each device with its measurements, the time of its newest reading, and its status:
/// one pass over the readings grouped by device and measurement, one over the status
/// changes. Groups are keyed by one string (fields joined by U+0000), not a compound
/// `_id`, which not every MongoDB-compatible server evaluates.
async fn devices(db: &Database) -> anyhow::Result<Rows> {
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
    #[derive(Default)]
    struct Device {
        measurements: std::collections::BTreeSet<String>,
        last: Option<bson::DateTime>,
        status: Option<String>,
    }
    let mut found: std::collections::BTreeMap<String, Device> = Default::default();
    for document in &series {
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
    for document in &statuses {
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
    Ok(Rows {
        columns: vec!["device", "status", "measurements", "last_seen"],
        rows,
        empty: "no devices stored yet".into(),
        trouble: false,
    })
}

/// What `gaps` found for one boot of one device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootGaps {
    pub device: String,
    pub boot: String,
    pub first: i64,
    pub last: i64,
    pub stored: u64,
    /// Missing sequence numbers, as inclusive ranges.
    pub missing: Vec<(i64, i64)>,
    pub duplicates: u64,
}

impl BootGaps {
    /// How many numbers are missing; saturates rather than wraps on stored numbers at
    /// the ends of i64 (written by something else than the persister, which keeps `seq`
    /// within 1..=2^53).
    pub fn missing_count(&self) -> i64 {
        self.missing
            .iter()
            .map(|&(from, to)| to.saturating_sub(from).saturating_add(1))
            .fold(0, i64::saturating_add)
    }
}

/// Gaps and duplicates in `(device, boot, seq)` triples sorted by all three, fed one at
/// a time. Within a boot, every number between the first and the last stored must be
/// there, and with `from_one` the boot must start at 1 (a sensor counts from 1 on every
/// start); what comes after a boot's last stored number cannot be seen.
#[derive(Debug)]
pub struct GapFinder {
    found: Vec<BootGaps>,
    /// Per boot of `found`, the highest `seq` of a settled reading (see `push_received`).
    settled: Vec<Option<i64>>,
    from_one: bool,
}

impl GapFinder {
    pub fn new(from_one: bool) -> Self {
        Self {
            found: Vec::new(),
            settled: Vec::new(),
            from_one,
        }
    }

    /// A settled reading (`push_received` with `settled`).
    pub fn push(&mut self, device: &str, boot: &str, seq: i64) {
        self.push_received(device, boot, seq, true);
    }

    /// A reading; `settled` when received long enough ago that what comes before it
    /// would be stored by now. A gap counts only below a settled reading.
    pub fn push_received(&mut self, device: &str, boot: &str, seq: i64, settled: bool) {
        match self.found.last_mut() {
            Some(current) if current.device == device && current.boot == boot => {
                current.stored += 1;
                if seq == current.last {
                    current.duplicates += 1;
                } else {
                    // Sorted, so seq > last: last + 1 cannot pass i64::MAX.
                    if seq - 1 > current.last {
                        current.missing.push((current.last + 1, seq - 1));
                    }
                    current.last = seq;
                }
            }
            _ => {
                let missing = if self.from_one && seq > 1 {
                    vec![(1, seq - 1)]
                } else {
                    Vec::new()
                };
                self.found.push(BootGaps {
                    device: device.to_string(),
                    boot: boot.to_string(),
                    first: seq,
                    last: seq,
                    stored: 1,
                    missing,
                    duplicates: 0,
                });
                self.settled.push(None);
            }
        }
        if settled {
            // Numbers come sorted: the last settled one is the highest.
            if let Some(last) = self.settled.last_mut() {
                *last = Some(seq);
            }
        }
    }

    /// Each boot, without the gaps that no settled reading comes after.
    pub fn finish(mut self) -> Vec<BootGaps> {
        for (gaps, settled) in self.found.iter_mut().zip(&self.settled) {
            gaps.missing
                .retain(|&(_, to)| settled.is_some_and(|settled| to < settled));
        }
        self.found
    }
}

/// Ranges listed at most in one cell; the count column has them all.
const RANGES_SHOWN: usize = 10;

/// `gaps`: its rows, with what the persister did about each boot, and the boots found.
async fn gaps(
    db: &Database,
    since: Option<DateTime<Utc>>,
    device: Option<&str>,
    settle: Option<DateTime<Utc>>,
) -> anyhow::Result<(Rows, Vec<BootGaps>)> {
    let found = find_stored_gaps(db, since, device, settle).await?;
    let repairs = repair_states(db, &found).await?;
    let mut rows = gap_rows(&found);
    rows.columns.push("repair");
    for (row, boot) in rows.rows.iter_mut().zip(&found) {
        let state = repairs.get(&(boot.device.clone(), boot.boot.clone()));
        row.push(Value::from(state.cloned().unwrap_or_default()));
    }
    Ok((rows, found))
}

/// One pass over the readings with `device` and `seq` (since `since`, of `device`),
/// sorted, keeping only a summary per boot; with `settle`, readings received after it
/// are not settled.
async fn find_stored_gaps(
    db: &Database,
    since: Option<DateTime<Utc>>,
    device: Option<&str>,
    settle: Option<DateTime<Utc>>,
) -> anyhow::Result<Vec<BootGaps>> {
    let mut filter = doc! { "device": { "$exists": true }, "seq": { "$exists": true } };
    if let Some(since) = since {
        filter.insert("ts", doc! { "$gte": bson::DateTime::from_chrono(since) });
    }
    if let Some(device) = device {
        filter.insert("device", device);
    }
    let mut cursor = db
        .collection::<Document>(READINGS)
        .find(filter)
        .projection(doc! { "_id": 0, "device": 1, "boot": 1, "seq": 1, "received_at": 1 })
        .sort(doc! { "device": 1, "boot": 1, "seq": 1 })
        .await?;
    let settle = settle.map(bson::DateTime::from_chrono);
    let mut gaps = GapFinder::new(since.is_none());
    while let Some(document) = cursor.try_next().await? {
        let text = |key: &str| document.get_str(key).unwrap_or_default();
        let Some(seq) = integer(document.get("seq")) else {
            continue;
        };
        let settled = match (settle, document.get_datetime("received_at")) {
            (Some(settle), Ok(received)) => *received <= settle,
            _ => true,
        };
        gaps.push_received(text("device"), text("boot"), seq, settled);
    }
    Ok(gaps.finish())
}

/// `readings gaps --repair`: asks every device with missing readings to send them
/// again (a replay request per boot, on the cloud broker), says so on stderr, and
/// records the asks in `repairs` as the persister does (so `readings gaps` shows them,
/// and the persister's replicas do not ask for the same readings at once).
async fn ask_again(found: &[BootGaps], broker: &CloudBroker, db: &Database) -> anyhow::Result<()> {
    let asks: Vec<(String, Ranges)> = found
        .iter()
        .filter(|gaps| !gaps.missing.is_empty())
        .filter(|gaps| {
            // Ids no device account could have sent (too long, not one topic level).
            let fine = check_id("device", &gaps.device).and(check_id("boot", &gaps.boot));
            if let Err(why) = &fine {
                eprintln!("readings: not asking {:.128}: {why}", gaps.device);
            }
            fine.is_ok()
        })
        .map(|gaps| {
            let ranges = gaps
                .missing
                .iter()
                .filter_map(|&(from, to)| {
                    Some((u64::try_from(from).ok()?, u64::try_from(to).ok()?))
                })
                .filter(|&(from, to)| check_seq(from).and(check_seq(to)).is_ok())
                .take(MAX_RANGES)
                .collect();
            (
                gaps.device.clone(),
                Ranges {
                    boot: gaps.boot.clone(),
                    ranges,
                },
            )
        })
        .collect();
    if asks.is_empty() {
        eprintln!("readings: nothing missing, nothing to ask for");
        return Ok(());
    }
    let settings = BrokerSettings::from(broker.clone());
    let client_id = format!("readings-repair-{}", std::process::id());
    let options = settings
        .mqtt_options(&client_id, true)
        .context("cannot set up the broker connection")?;
    let mut connection = Connection::start(&settings, options);
    for (device, ranges) in &asks {
        connection
            .publish(
                &replay::request_topic(device),
                QoS::AtLeastOnce,
                false,
                ranges.encode(),
            )
            .await?;
        let count: u64 = ranges.ranges.iter().map(|(from, to)| to - from + 1).sum();
        eprintln!(
            "readings: asked {device} (boot {}) to send {count} reading(s) again",
            ranges.boot
        );
    }
    if !connection
        .wait_acknowledged(Duration::from_secs(10))
        .await?
    {
        anyhow::bail!(
            "the cloud broker at {} did not take the requests",
            settings.address()
        );
    }
    connection.close(Duration::from_secs(5)).await?;
    let at = bson::DateTime::now();
    let records: Vec<Document> = asks
        .iter()
        .filter_map(|(device, asked)| {
            let id = doc! { "device": device, "boot": &asked.boot, "by": &client_id };
            asked_record(id, device, &asked.boot, &asked.ranges, 1, &client_id, at)
        })
        .collect();
    if !records.is_empty() {
        if let Err(error) = db
            .collection::<Document>(REPAIRS)
            .insert_many(records)
            .await
        {
            eprintln!(
                "readings: warning: the requests went out, but recording them in {REPAIRS} failed: {}",
                describe(&anyhow::Error::from(error))
            );
        }
    }
    Ok(())
}

/// What the persister did about each boot with missing readings (the `repairs`
/// collection): `lost 41-60` (the device no longer had them), `unanswered …`, or
/// `asked N×, last <time>`; nothing when it never asked (not yet, or repairs are off).
async fn repair_states(
    db: &Database,
    found: &[BootGaps],
) -> anyhow::Result<std::collections::HashMap<(String, String), String>> {
    let mut states = std::collections::HashMap::new();
    for gaps in found.iter().filter(|gaps| !gaps.missing.is_empty()) {
        let repairs: Vec<Document> = db
            .collection::<Document>(REPAIRS)
            .find(doc! { "device": &gaps.device, "boot": &gaps.boot })
            .sort(doc! { "from": 1 })
            .await?
            .try_collect()
            .await?;
        let range = |document: &Document| {
            let (from, to) = (
                integer(document.get("from")).unwrap_or(0),
                integer(document.get("to")).unwrap_or(0),
            );
            if from == to {
                from.to_string()
            } else {
                format!("{from}-{to}")
            }
        };
        let of = |outcome: &str| -> Vec<&Document> {
            repairs
                .iter()
                .filter(|document| document.get_str("outcome") == Ok(outcome))
                .collect()
        };
        let mut parts = Vec::new();
        let lost = of("lost");
        if !lost.is_empty() {
            parts.push(format!(
                "lost {}",
                lost.iter().map(|d| range(d)).collect::<Vec<_>>().join(", ")
            ));
        }
        let unanswered = of("unanswered");
        if !unanswered.is_empty() {
            parts.push(format!(
                "unanswered {}",
                unanswered
                    .iter()
                    .map(|d| range(d))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        let asked = of("asked");
        if let Some(last) = asked.iter().filter_map(|d| d.get_datetime("at").ok()).max() {
            parts.push(format!(
                "asked {}×, last {}",
                asked.len(),
                format_time(last.to_chrono())
            ));
        }
        states.insert((gaps.device.clone(), gaps.boot.clone()), parts.join("; "));
    }
    Ok(states)
}

fn gap_rows(found: &[BootGaps]) -> Rows {
    let ranges = |gaps: &BootGaps| {
        let mut shown: Vec<String> = gaps
            .missing
            .iter()
            .take(RANGES_SHOWN)
            .map(|&(from, to)| {
                if from == to {
                    from.to_string()
                } else {
                    format!("{from}-{to}")
                }
            })
            .collect();
        if gaps.missing.len() > RANGES_SHOWN {
            shown.push(format!("and {} more", gaps.missing.len() - RANGES_SHOWN));
        }
        shown.join(", ")
    };
    Rows {
        columns: vec![
            "device",
            "boot",
            "first",
            "last",
            "stored",
            "missing",
            "duplicates",
            "missing seq",
        ],
        rows: found
            .iter()
            .map(|gaps| {
                vec![
                    Value::from(gaps.device.clone()),
                    Value::from(gaps.boot.clone()),
                    Value::from(gaps.first),
                    Value::from(gaps.last),
                    Value::from(gaps.stored),
                    Value::from(gaps.missing_count()),
                    Value::from(gaps.duplicates),
                    Value::from(ranges(gaps)),
                ]
            })
            .collect(),
        empty: "no readings with device and seq stored".into(),
        trouble: found
            .iter()
            .any(|gaps| !gaps.missing.is_empty() || gaps.duplicates > 0),
    }
}

/// How a column is read from a result document.
enum Field {
    /// The field as it is.
    Plain(&'static str),
    /// A number rounded to the two decimals of the readings.
    Rounded(&'static str),
    /// The raw payload of a flagged document (`raw` or `raw_base64`).
    Raw,
}

impl Rows {
    fn from_documents(
        columns: &[(&'static str, Field)],
        documents: &[Document],
        empty: String,
    ) -> Rows {
        let value = |document: &Document, field: &Field| match field {
            Field::Plain(name) => json(document.get(name)),
            Field::Rounded(name) => match document.get(name) {
                Some(Bson::Double(number)) => {
                    json(Some(&Bson::Double((number * 100.0).round() / 100.0)))
                }
                other => json(other),
            },
            Field::Raw => json(document.get("raw").or_else(|| document.get("raw_base64"))),
        };
        Rows {
            columns: columns.iter().map(|(name, _)| *name).collect(),
            rows: documents
                .iter()
                .map(|document| {
                    columns
                        .iter()
                        .map(|(_, field)| value(document, field))
                        .collect()
                })
                .collect(),
            empty,
            trouble: false,
        }
    }
}

fn nothing_on(topic: &str, since: DateTime<Utc>, until: DateTime<Utc>) -> String {
    format!(
        "no readings on {topic} from {} to {}",
        format_time(since),
        format_time(until)
    )
}

fn time_range(since: DateTime<Utc>, until: DateTime<Utc>) -> Document {
    doc! { "$gte": bson::DateTime::from_chrono(since), "$lt": bson::DateTime::from_chrono(until) }
}

/// A stored value as JSON: dates as RFC 3339 text, numbers as numbers, absent as null.
fn json(value: Option<&Bson>) -> Value {
    match value {
        None | Some(Bson::Null) => Value::Null,
        Some(Bson::DateTime(time)) => Value::String(format_time(time.to_chrono())),
        Some(Bson::Double(number)) => {
            serde_json::Number::from_f64(*number).map_or(Value::Null, Value::Number)
        }
        Some(Bson::Int32(number)) => Value::from(*number),
        Some(Bson::Int64(number)) => Value::from(*number),
        Some(Bson::String(text)) => date_text(text).unwrap_or_else(|| Value::String(text.clone())),
        Some(other) => Value::String(other.to_string()),
    }
}

/// Some MongoDB-compatible servers return `$dateTrunc` as extended-JSON text
/// (`{"$date":"…"}`) instead of a date; read it as the date it names.
fn date_text(text: &str) -> Option<Value> {
    let inner = text.strip_prefix("{\"$date\":\"")?.strip_suffix("\"}")?;
    let time = DateTime::parse_from_rfc3339(inner).ok()?;
    Some(Value::String(format_time(time.with_timezone(&Utc))))
}

/// Prints `rows` in `format`.
pub fn print(rows: &Rows, format: OutputFormat, out: &mut impl Write) -> anyhow::Result<()> {
    match format {
        OutputFormat::Json => {
            let objects: Vec<serde_json::Map<String, Value>> = rows
                .rows
                .iter()
                .map(|row| {
                    rows.columns
                        .iter()
                        .map(|c| c.to_string())
                        .zip(row.iter().cloned())
                        .collect()
                })
                .collect();
            serde_json::to_writer_pretty(&mut *out, &objects)?;
            writeln!(out)?;
        }
        OutputFormat::Csv => {
            let mut writer = csv::Writer::from_writer(&mut *out);
            writer.write_record(&rows.columns)?;
            for row in &rows.rows {
                writer.write_record(row.iter().map(cell))?;
            }
            writer.flush()?;
        }
        OutputFormat::Table if rows.rows.is_empty() => writeln!(out, "{}", rows.empty)?,
        OutputFormat::Table => {
            let mut table = comfy_table::Table::new();
            table.load_preset(comfy_table::presets::NOTHING);
            table.set_header(&rows.columns);
            for row in &rows.rows {
                table.add_row(row.iter().map(cell));
            }
            for (index, column) in table.column_iter_mut().enumerate() {
                if rows
                    .rows
                    .iter()
                    .all(|row| row[index].is_number() || row[index].is_null())
                {
                    column.set_cell_alignment(comfy_table::CellAlignment::Right);
                }
            }
            writeln!(
                out,
                "{}",
                table
                    .to_string()
                    .lines()
                    .map(str::trim_end)
                    .collect::<Vec<_>>()
                    .join("\n")
            )?;
        }
    }
    Ok(())
}

/// A value as a table or CSV cell: text without quotes, null as empty.
fn cell(value: &Value) -> String {
    match value {
        Value::Null => String::new(),
        Value::String(text) => text.clone(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_series_is_a_topic_or_a_device_and_measurement() {
        let parse = |args: &[&str]| {
            Cli::command()
                .try_get_matches_from(std::iter::once("readings").chain(args.iter().copied()))
        };
        assert!(parse(&["range"]).is_err(), "a series is needed");
        assert!(
            parse(&["range", "--measurement", "temperature"]).is_err(),
            "a measurement of what?"
        );
        assert!(parse(&["stats", "--topic", "/sensor/pressure"]).is_ok());
        let matches = parse(&[
            "range",
            "--device",
            "living_room",
            "--measurement",
            "temperature",
        ])
        .expect("parses");
        let cli =
            <Cli as clap::FromArgMatches>::from_arg_matches(&matches).expect("a command line");
        let Query::Range { series, .. } = cli.query else {
            panic!("not range");
        };
        assert_eq!(
            series.filter(),
            doc! { "device": "living_room", "measurement": "temperature" }
        );
        assert_eq!(series.describe(), "living_room temperature");
    }

    #[test]
    fn durations_and_times_parse() {
        let before = Utc::now();
        let since = parse_time("10m").expect("10m");
        assert!((before - since).num_seconds() >= 599 && (before - since).num_seconds() <= 601);
        assert!(parse_time("7d").is_ok());
        assert_eq!(
            parse_time("2026-11-24T10:00:00+01:00").map(format_time),
            Ok("2026-11-24T09:00:00.000Z".to_string())
        );
        assert!(parse_time("yesterday").is_err());
    }

    #[test]
    fn buckets_use_the_largest_whole_unit() {
        assert_eq!(
            parse_bucket("1m"),
            Ok(Bucket {
                unit: "minute",
                size: 1
            })
        );
        assert_eq!(
            parse_bucket("90s"),
            Ok(Bucket {
                unit: "second",
                size: 90
            })
        );
        assert_eq!(
            parse_bucket("2h"),
            Ok(Bucket {
                unit: "hour",
                size: 2
            })
        );
        assert_eq!(
            parse_bucket("1d"),
            Ok(Bucket {
                unit: "day",
                size: 1
            })
        );
        assert!(parse_bucket("1500ms").is_err());
        assert!(parse_bucket("0s").is_err());
    }

    fn sample() -> Rows {
        Rows {
            columns: vec!["topic", "value"],
            rows: vec![
                vec![Value::from("/sensor/pressure"), Value::from(1001.5)],
                vec![Value::from("/sensor/temperature"), Value::Null],
            ],
            empty: "nothing".into(),
            trouble: false,
        }
    }

    fn printed(rows: &Rows, format: OutputFormat) -> String {
        let mut out = Vec::new();
        print(rows, format, &mut out).expect("prints");
        String::from_utf8(out).expect("utf-8")
    }

    #[test]
    fn the_three_formats() {
        let table = printed(&sample(), OutputFormat::Table);
        assert!(
            table
                .lines()
                .next()
                .is_some_and(|header| header.contains("topic") && header.contains("value")),
            "{table}"
        );
        assert!(
            table.contains("/sensor/pressure") && table.contains("1001.5"),
            "{table}"
        );
        assert_eq!(
            printed(&sample(), OutputFormat::Csv),
            "topic,value\n/sensor/pressure,1001.5\n/sensor/temperature,\n"
        );
        let json: Value =
            serde_json::from_str(&printed(&sample(), OutputFormat::Json)).expect("json");
        assert_eq!(json[0]["value"], 1001.5);
        assert_eq!(json[1]["value"], Value::Null);
    }

    #[test]
    fn an_empty_result_says_so() {
        let empty = Rows {
            rows: vec![],
            ..sample()
        };
        assert_eq!(printed(&empty, OutputFormat::Table), "nothing\n");
        assert_eq!(printed(&empty, OutputFormat::Json).trim(), "[]");
        assert_eq!(printed(&empty, OutputFormat::Csv), "topic,value\n");
    }

    /// [`GapFinder`] over a whole sorted list.
    fn find_gaps(sorted: Vec<(String, String, i64)>, from_one: bool) -> Vec<BootGaps> {
        let mut gaps = GapFinder::new(from_one);
        for (device, boot, seq) in &sorted {
            gaps.push(device, boot, *seq);
        }
        gaps.finish()
    }

    fn triples(device: &str, boot: &str, seqs: &[i64]) -> Vec<(String, String, i64)> {
        seqs.iter()
            .map(|&seq| (device.to_string(), boot.to_string(), seq))
            .collect()
    }

    #[test]
    fn gaps_are_counted_within_each_boot() {
        let sorted = [
            triples("pres-0001", "a", &[1, 2, 3, 3, 6, 7, 9]),
            triples("pres-0001", "b", &[1, 2]), // a restart: seq back to 1 under a new boot
            triples("temp-0001", "a", &[4, 5]),
        ]
        .concat();
        let found = find_gaps(sorted.clone(), true);
        assert_eq!(found.len(), 3);
        assert_eq!(found[0].missing, [(4, 5), (8, 8)]);
        assert_eq!((found[0].stored, found[0].duplicates), (7, 1));
        assert_eq!(found[0].missing_count(), 3);
        assert!(found[1].missing.is_empty() && found[1].duplicates == 0);
        assert_eq!(found[2].missing, [(1, 3)], "a boot starts at 1");
        // With --since the readings before the window are not seen: no leading gap.
        assert!(find_gaps(sorted, false)[2].missing.is_empty());
    }

    #[test]
    fn gaps_at_the_ends_of_the_numbers_neither_wrap_nor_panic() {
        let top = iot_core::bounds::MAX_SEQ as i64;
        let sorted = [
            triples("d", "bound", &[1, top - 2, top]),
            triples("d", "ends", &[i64::MIN, -1, 1, i64::MAX - 1, i64::MAX]),
        ]
        .concat();
        let found = find_gaps(sorted, true);
        assert_eq!(found[0].missing, [(2, top - 3), (top - 1, top - 1)]);
        assert_eq!(found[0].missing_count(), top - 3);
        assert_eq!(
            found[1].missing,
            [(i64::MIN + 1, -2), (0, 0), (2, i64::MAX - 2)]
        );
        assert_eq!(found[1].missing_count(), i64::MAX, "saturated, not wrapped");
        assert_eq!((found[1].first, found[1].last), (i64::MIN, i64::MAX));
    }

    #[test]
    fn a_gap_counts_only_below_a_settled_reading() {
        // 1-3 and 7 received long ago; 5 and 9 just now (5's neighbours may be on
        // their way); another boot with nothing settled yet.
        let mut gaps = GapFinder::new(true);
        for (seq, settled) in [
            (1, true),
            (2, true),
            (3, true),
            (5, false),
            (7, true),
            (9, false),
        ] {
            gaps.push_received("d", "a", seq, settled);
        }
        gaps.push_received("d", "b", 3, false);
        let found = gaps.finish();
        assert_eq!(
            found[0].missing,
            [(4, 4), (6, 6)],
            "8 is below no settled reading"
        );
        assert_eq!((found[0].first, found[0].last, found[0].stored), (1, 9, 6));
        assert_eq!(found[1].missing, [], "1-2 of boot b may still come");
    }

    #[test]
    fn gap_rows_are_trouble_only_with_gaps_or_duplicates() {
        let clean = gap_rows(&find_gaps(triples("d", "a", &[1, 2, 3]), true));
        assert!(!clean.trouble);
        assert_eq!(clean.rows[0][5], 0);
        let holes: Vec<i64> = (1..=40).filter(|n| n % 3 != 0).collect();
        let gappy = gap_rows(&find_gaps(triples("d", "a", &holes), true));
        assert!(gappy.trouble);
        assert_eq!(gappy.rows[0][5], 13);
        let ranges = gappy.rows[0][7].as_str().expect("text");
        assert!(
            ranges.starts_with("3, 6, 9") && ranges.ends_with("and 3 more"),
            "{ranges}"
        );
        assert!(!gap_rows(&[]).trouble);
    }

    #[test]
    fn extended_json_dates_are_read_as_dates() {
        assert_eq!(
            json(Some(&Bson::String(
                r#"{"$date":"2026-11-25T03:50:00Z"}"#.into()
            ))),
            Value::from("2026-11-25T03:50:00.000Z")
        );
    }
}
