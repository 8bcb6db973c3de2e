//! The database side of the persister: batches of documents written with unordered
//! `insert_many`, retried with backoff while the database is unreachable, and handed
//! back for acknowledgement only once written.
//!
//! Whether a status is a change, and whether a retained replay is already stored, is
//! decided in the database with one query per batch, so any number of replicas agree:
//! each device's changes are numbered (`_id: {device, change}`), and of two replicas
//! that race for the same number, one insert wins and the other checks again.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::budget::Queued;
use bson::{doc, Document};
use futures_util::TryStreamExt;
use iot_core::backoff::retry;
use iot_core::mqtt::Ack;
use iot_core::ops;
use iot_store::{
    describe, ensure_schema, error_kind, integer, set_retention, Record, READINGS, STATUS,
};
use mongodb::error::{ErrorKind, InsertManyError};
use mongodb::{Collection, Database};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// MongoDB's code for a duplicate key: a reading that is already stored.
pub(crate) const DUPLICATE_KEY: i32 = 11000;

/// A message on its way to the database; `A` is how it is acknowledged (an MQTT
/// packet id by default, a JetStream message's acker with a NATS cloud).
#[derive(Debug)]
pub struct Pending<A = Ack> {
    pub record: Record,
    /// Delivered with the retain flag: a replay of the broker's retained message.
    pub replay: bool,
    /// Sent to the broker once the record is written.
    pub ack: A,
    /// Documents of `record`, and the payload's bytes: what it counts in [`Queued`].
    pub documents: usize,
    pub bytes: usize,
}

/// The persister's metrics (the connection's are common to every service).
pub const METRICS: &[ops::Metric] = &[
    ops::Metric::counter(
        "iot_persister_messages_received_total",
        "Messages received from the cloud broker",
    ),
    ops::Metric::counter(
        "iot_persister_documents_written_total",
        "Documents written: readings, flagged payloads and status changes",
    ),
    ops::Metric::counter(
        "iot_persister_duplicates_total",
        "Readings refused by the database as already stored",
    ),
    ops::Metric::counter(
        "iot_persister_unparsed_total",
        "Messages that could not be read, stored flagged",
    ),
    ops::Metric::counter(
        "iot_persister_ignored_total",
        "Messages with nothing to store (events, texts, topics no ingest rule reads)",
    ),
    ops::Metric::counter(
        "iot_persister_skipped_total",
        "Retained replays already stored and repeated statuses, not stored again",
    ),
    ops::Metric::counter(
        "iot_persister_rejected_total",
        "Documents the database refused for another reason than a duplicate",
    ),
    ops::Metric::counter(
        "iot_persister_status_changes_total",
        "Device status changes stored",
    ),
    ops::Metric::counter("iot_persister_batches_total", "Batches written"),
    ops::Metric::counter(
        "iot_persister_over_budget_total",
        "Reading documents refused: the device's messages expanded past its budget (--device-documents-per-second)",
    ),
    ops::Metric::gauge(
        "iot_persister_queued_documents",
        "Documents handed to the writer and not written yet",
    ),
    ops::Metric::histogram(
        "iot_persister_batch_write_seconds",
        "Time to write one batch, the successful attempt",
    ),
    ops::Metric::counter(
        "iot_persister_database_errors_total",
        "Failed database operations by kind (unreachable, write, other); each is retried",
    ),
    ops::Metric::gauge(
        "iot_persister_buffered",
        "Messages received and not yet written (nor acknowledged)",
    ),
    ops::Metric::gauge(
        "iot_persister_lag_seconds",
        "Age of the oldest message received and not yet written; 0 when none waits",
    ),
    ops::Metric::counter(
        "iot_persister_replay_requests_total",
        "Requests asking a device to send missing readings again",
    ),
    ops::Metric::histogram(
        "iot_persister_delay_seconds",
        "From a reading's device time to its write",
    ),
    ops::Metric::counter(
        "iot_persister_identity_flagged_total",
        "Payloads naming a device their topic does not vouch for (identity mismatch or unverified), stored flagged",
    ),
    ops::Metric::counter(
        "iot_persister_repair_dropped_total",
        "What the repairer let go to stay within its bounds, by what (events, series, ranges, gone)",
    ),
    ops::Metric::gauge(
        "iot_persister_repair_series",
        "Series (device, boot) the repairer follows",
    ),
];

/// A count for the throughput line that is also a Prometheus counter.
#[derive(Debug)]
pub struct Count {
    value: AtomicU64,
    metric: &'static str,
}

impl Count {
    const fn new(metric: &'static str) -> Self {
        Self {
            value: AtomicU64::new(0),
            metric,
        }
    }

    pub fn add(&self, n: u64) {
        self.value.fetch_add(n, Ordering::Relaxed);
        metrics::counter!(self.metric).increment(n);
    }

    pub fn get(&self) -> u64 {
        self.value.load(Ordering::Relaxed)
    }
}

/// Counters for the throughput line and `/metrics`.
#[derive(Debug)]
pub struct Stats {
    /// Messages received.
    pub received: Count,
    /// Documents written.
    pub written: Count,
    pub duplicates: Count,
    /// Messages that could not be read (stored flagged).
    pub unparsed: Count,
    /// Messages with nothing to store (events, texts, topics no rule reads).
    pub ignored: Count,
    /// Retained replays already stored and repeated statuses, not stored again.
    pub skipped: Count,
    /// Documents the database refused for another reason than a duplicate.
    pub rejected: Count,
}

impl Default for Stats {
    fn default() -> Self {
        Self {
            received: Count::new("iot_persister_messages_received_total"),
            written: Count::new("iot_persister_documents_written_total"),
            duplicates: Count::new("iot_persister_duplicates_total"),
            unparsed: Count::new("iot_persister_unparsed_total"),
            ignored: Count::new("iot_persister_ignored_total"),
            skipped: Count::new("iot_persister_skipped_total"),
            rejected: Count::new("iot_persister_rejected_total"),
        }
    }
}

impl Stats {
    /// `in=… written=… duplicates=… unparsed=… ignored=… skipped=… rejected=… buffered=…`
    pub fn line(&self, buffered: usize) -> String {
        format!(
            "in={} written={} duplicates={} unparsed={} ignored={} skipped={} rejected={} buffered={buffered}",
            self.received.get(),
            self.written.get(),
            self.duplicates.get(),
            self.unparsed.get(),
            self.ignored.get(),
            self.skipped.get(),
            self.rejected.get(),
        )
    }
}

/// Writes batches; see the module documentation.
#[derive(Debug)]
pub struct Writer {
    readings: Collection<Document>,
    status: Collection<Document>,
    /// Documents a batch gathers before it is written (one message may go past it).
    batch_size: usize,
    flush_interval: Duration,
    stats: Arc<Stats>,
    /// What is handed over and not written yet; a batch written is taken out of it.
    queued: Arc<Queued>,
    database: Database,
    /// The database's address (password hidden), for log lines.
    address: String,
    retention: Retention,
}

/// How long each collection keeps its documents; `None`: without limit.
#[derive(Debug, Clone, Copy, Default)]
pub struct Retention {
    pub readings: Option<Duration>,
    pub status: Option<Duration>,
}

/// A device's last stored status change.
#[derive(Debug, Clone, Copy, PartialEq)]
struct LastStatus {
    online: bool,
    /// Its number among the device's changes (0 for documents from before numbering).
    change: i64,
}

impl Writer {
    /// A writer into `db` (at `address`, named in log lines), which before its first
    /// write waits until the database answers and has the collections and indexes, with
    /// `retention` applied.
    pub fn new(
        db: &Database,
        address: String,
        retention: Retention,
        (batch_size, flush_interval): (usize, Duration),
        stats: Arc<Stats>,
        queued: Arc<Queued>,
    ) -> Self {
        Self {
            readings: db.collection(READINGS),
            status: db.collection(STATUS),
            batch_size,
            flush_interval,
            queued,
            stats,
            database: db.clone(),
            address,
            retention,
        }
    }

    async fn make_schema(&self) -> anyhow::Result<()> {
        ensure_schema(&self.database).await?;
        for (collection, keep) in [
            (READINGS, self.retention.readings),
            (STATUS, self.retention.status),
        ] {
            if let Some(change) = set_retention(&self.database, collection, keep).await? {
                tracing::info!("retention: {change}");
            }
        }
        Ok(())
    }

    /// Makes the schema, retrying with backoff; false if `stop` came first.
    async fn wait_for_schema(&self, stop: &CancellationToken) -> bool {
        let made = retry(stop, || self.make_schema(), |error, attempt, delay| {
            database_error(error);
            tracing::warn!(
                attempt,
                "MongoDB at {} not ready: {}; retrying in {delay:?} (readings wait at the broker meanwhile)",
                self.address,
                describe(error)
            );
        })
        .await;
        if made.is_some() {
            ops::health().set(DATABASE_CHECK, Ok(()));
        }
        made.is_some()
    }

    /// Writes what arrives on `pending` until it closes, sending the acknowledgements of
    /// each written batch to `written`. Returns how many messages it could not write
    /// before `stop` (the broker still holds those: they were never acknowledged).
    pub async fn run<A: Send + Sync + 'static>(
        self,
        mut pending: mpsc::Receiver<Pending<A>>,
        written: mpsc::UnboundedSender<Vec<A>>,
        stop: CancellationToken,
    ) -> usize {
        if !self.wait_for_schema(&stop).await {
            return pending.len();
        }
        let mut batch: Vec<Pending<A>> = Vec::new();
        loop {
            let Some(first) = pending.recv().await else {
                return 0;
            };
            let mut documents = first.documents;
            batch.push(first);
            let deadline = Instant::now() + self.flush_interval;
            // In documents, not messages: one message may be ten thousand of them.
            while documents < self.batch_size {
                tokio::select! {
                    next = pending.recv() => match next {
                        Some(next) => {
                            documents += next.documents;
                            batch.push(next);
                        }
                        None => break,
                    },
                    () = tokio::time::sleep_until(deadline) => break,
                }
            }
            if !self.write_until_done(&batch, &stop).await {
                return batch.len() + pending.len();
            }
            let bytes = batch.iter().map(|pending| pending.bytes).sum();
            self.queued.written(documents, bytes);
            let acks = batch.drain(..).map(|pending| pending.ack).collect();
            if written.send(acks).is_err() {
                return 0;
            }
        }
    }

    /// Writes one batch, retrying with backoff until it succeeds; false if `stop` came
    /// first. Every reading has its `_id` before the first try, so a retry after a
    /// partial write only meets duplicates (and statuses are checked again).
    async fn write_until_done<A: Sync>(
        &self,
        batch: &[Pending<A>],
        stop: &CancellationToken,
    ) -> bool {
        let timed_write = || async {
            let started = Instant::now();
            self.write(batch).await.map(|()| started.elapsed())
        };
        let took = retry(stop, timed_write, |error, attempt, delay| {
            database_error(error);
            tracing::warn!(
                attempt, held = batch.len(),
                "cannot write to MongoDB: {}; retrying in {delay:?} (nothing is acknowledged meanwhile)",
                describe(error)
            );
        })
        .await;
        let Some(took) = took else {
            return false;
        };
        metrics::counter!("iot_persister_batches_total").increment(1);
        metrics::histogram!("iot_persister_batch_write_seconds").record(took.as_secs_f64());
        ops::health().set(DATABASE_CHECK, Ok(()));
        true
    }

    async fn write<A: Sync>(&self, batch: &[Pending<A>]) -> anyhow::Result<()> {
        // Retained replays of readings without a key: stored already when they equal
        // the newest document of their topic and measurement.
        let replays: Vec<&Document> = batch
            .iter()
            .filter(|pending| pending.replay)
            .flat_map(|pending| pending.record.parts())
            .flat_map(|record| match record {
                Record::Readings {
                    documents,
                    keyed: false,
                } => documents.iter().collect(),
                Record::Unparsed { document } => vec![document],
                _ => Vec::new(),
            })
            .collect();
        let stored = self.newest_of_topics(&replays).await?;
        let mut readings = Vec::new();
        let mut statuses: BTreeMap<&str, Vec<(bool, &Document)>> = BTreeMap::new();
        let records = batch.iter().flat_map(|pending| {
            let check_replay = pending.replay;
            pending
                .record
                .parts()
                .iter()
                .map(move |record| (check_replay, record))
        });
        for (check_replay, record) in records {
            match record {
                Record::Status {
                    device,
                    online,
                    document,
                } => statuses
                    .entry(device.as_str())
                    .or_default()
                    .push((*online, document)),
                Record::Readings {
                    documents,
                    keyed: false,
                } if check_replay => {
                    for document in documents {
                        if is_stored(document, &stored) {
                            self.stats.skipped.add(1);
                        } else {
                            readings.push(document);
                        }
                    }
                }
                Record::Unparsed { document } if check_replay && is_stored(document, &stored) => {
                    self.stats.skipped.add(1);
                }
                Record::Readings { documents, .. } => readings.extend(documents.iter()),
                Record::Unparsed { document } => readings.push(document),
                Record::Nothing { .. } | Record::Several(_) => {}
            }
        }
        // Device times of the readings, for the delay until they are stored.
        let device_times: Vec<i64> = readings
            .iter()
            .filter(|document| !document.contains_key("unparsed"))
            .filter_map(|document| Some(document.get_datetime("ts").ok()?.timestamp_millis()))
            .collect();
        self.insert(&self.readings, readings).await?;
        record_delays(&device_times);
        self.store_changes(statuses).await
    }

    /// The newest stored document of each topic and measurement of `replays` (one query).
    async fn newest_of_topics(
        &self,
        replays: &[&Document],
    ) -> anyhow::Result<HashMap<Series, Document>> {
        if replays.is_empty() {
            return Ok(HashMap::new());
        }
        let topics: Vec<&str> = replays
            .iter()
            .map(|document| document.get_str("topic").unwrap_or_default())
            .collect();
        let pipeline = [
            doc! { "$match": { "topic": { "$in": topics } } },
            doc! { "$sort": { "topic": 1, "received_at": -1 } },
            doc! { "$group": {
                "_id": series_key(),
                "topic": { "$first": "$topic" },
                "measurement": { "$first": "$measurement" },
                "value": { "$first": "$value" },
                "raw": { "$first": "$raw" },
                "raw_base64": { "$first": "$raw_base64" },
            } },
        ];
        let newest: Vec<Document> = self
            .readings
            .aggregate(pipeline)
            .await?
            .try_collect()
            .await?;
        Ok(newest
            .into_iter()
            .filter_map(|document| Some((series_of(&document)?, document)))
            .collect())
    }

    /// Stores each device's statuses that change its last stored one, numbering the
    /// changes; checks all devices in one query, and a device again when another replica
    /// stored a change of it meanwhile.
    async fn store_changes(
        &self,
        mut statuses: BTreeMap<&str, Vec<(bool, &Document)>>,
    ) -> anyhow::Result<()> {
        // Each round settles every device but those another replica raced; a race needs
        // a change stored meanwhile, so rounds end.
        while !statuses.is_empty() {
            let devices: Vec<&str> = statuses.keys().copied().collect();
            let last = self.last_statuses(&devices).await?;
            let mut raced = BTreeMap::new();
            for (device, messages) in statuses {
                let mut last = last.get(device).copied();
                let mut changes = Vec::new();
                let mut stored_from = Vec::new();
                for (index, (online, document)) in messages.iter().enumerate() {
                    if last.is_some_and(|last| last.online == *online) {
                        self.stats.skipped.add(1);
                        continue;
                    }
                    let change = last.map_or(1, |last| last.change + 1);
                    let mut document = (*document).clone();
                    document.insert("_id", doc! { "device": device, "change": change });
                    document.insert("change", change);
                    changes.push(document);
                    stored_from.push(index);
                    last = Some(LastStatus {
                        online: *online,
                        change,
                    });
                }
                if let Some(failed) = self.insert_changes(changes).await? {
                    // Another replica took that number: from that message on, check again.
                    let from = stored_from[failed];
                    raced.insert(device, messages[from..].to_vec());
                }
            }
            statuses = raced;
        }
        Ok(())
    }

    /// Inserts one device's changes in order; the index of the first one whose number
    /// was taken meanwhile, if any (those after it are not inserted).
    async fn insert_changes(&self, changes: Vec<Document>) -> anyhow::Result<Option<usize>> {
        if changes.is_empty() {
            return Ok(None);
        }
        let total = changes.len();
        match self.status.insert_many(changes).ordered(true).await {
            Ok(_) => {
                self.stats.written.add(total as u64);
                metrics::counter!(STATUS_CHANGES).increment(total as u64);
                Ok(None)
            }
            Err(error) => match *error.kind {
                ErrorKind::InsertMany(InsertManyError {
                    write_errors: Some(ref errors),
                    write_concern_error: None,
                    ..
                }) if errors.len() == 1 && errors[0].code == DUPLICATE_KEY => {
                    let failed = errors[0].index;
                    self.stats.written.add(failed as u64);
                    metrics::counter!(STATUS_CHANGES).increment(failed as u64);
                    Ok(Some(failed))
                }
                _ => Err(error.into()),
            },
        }
    }

    /// Each device's last stored status change (one query).
    async fn last_statuses(&self, devices: &[&str]) -> anyhow::Result<HashMap<String, LastStatus>> {
        let pipeline = [
            doc! { "$match": { "device": { "$in": devices } } },
            doc! { "$sort": { "device": 1, "change": -1, "ts": -1 } },
            doc! { "$group": {
                "_id": "$device",
                "status": { "$first": "$status" },
                "change": { "$first": "$change" },
            } },
        ];
        let last: Vec<Document> = self.status.aggregate(pipeline).await?.try_collect().await?;
        Ok(last
            .into_iter()
            .filter_map(|document| {
                let device = document.get_str("_id").ok()?.to_string();
                let online = document.get_str("status").ok()? == "online";
                // Documents from before changes were numbered have none.
                let change = integer(document.get("change")).unwrap_or(0);
                Some((device, LastStatus { online, change }))
            })
            .collect())
    }

    /// Unordered insert; duplicates are expected and counted, other per-document errors
    /// are logged and counted.
    async fn insert(
        &self,
        collection: &Collection<Document>,
        documents: Vec<&Document>,
    ) -> anyhow::Result<()> {
        if documents.is_empty() {
            return Ok(());
        }
        let total = documents.len() as u64;
        let failed = match collection.insert_many(documents).ordered(false).await {
            Ok(_) => Vec::new(),
            Err(error) => match *error.kind {
                ErrorKind::InsertMany(InsertManyError {
                    write_errors: Some(errors),
                    write_concern_error: None,
                    ..
                }) => errors,
                _ => return Err(error.into()),
            },
        };
        let duplicates = failed.iter().filter(|e| e.code == DUPLICATE_KEY).count() as u64;
        for error in failed.iter().filter(|e| e.code != DUPLICATE_KEY) {
            tracing::error!(
                collection = collection.name(),
                code = error.code,
                "document refused: {}",
                error.message
            );
        }
        let rejected = failed.len() as u64 - duplicates;
        let new = total - failed.len() as u64;
        self.stats.written.add(new);
        self.stats.duplicates.add(duplicates);
        self.stats.rejected.add(rejected);
        Ok(())
    }
}

/// Status changes stored.
const STATUS_CHANGES: &str = "iot_persister_status_changes_total";

/// The persister's readiness check on the database.
pub const DATABASE_CHECK: &str = "database";

/// Counts a failed database operation by kind and fails the readiness check with it.
fn database_error(error: &anyhow::Error) {
    metrics::counter!("iot_persister_database_errors_total", "kind" => error_kind(error))
        .increment(1);
    ops::health().set(DATABASE_CHECK, Err(describe(error)));
}

/// Records how long after their device times (milliseconds) readings were stored.
fn record_delays(device_times: &[i64]) {
    let now = bson::DateTime::now().timestamp_millis();
    let histogram = metrics::histogram!("iot_persister_delay_seconds");
    for ts in device_times {
        histogram.record((now - ts).max(0) as f64 / 1000.0);
    }
}

/// A topic and, when the document has one, its measurement.
type Series = (String, Option<String>);

/// The `$group` key of a series: topic and measurement in one string (a topic cannot
/// hold U+0000). A string rather than a compound `_id`, which not every
/// MongoDB-compatible server evaluates (nx-27017 takes it as a constant).
fn series_key() -> Document {
    doc! { "$concat": ["$topic", "\u{0}", { "$ifNull": ["$measurement", ""] }] }
}

fn series_of(document: &Document) -> Option<Series> {
    let topic = document.get_str("topic").ok()?.to_string();
    // Without a measurement: the field is missing, or null after $group.
    let measurement = document.get_str("measurement").ok().map(String::from);
    Some((topic, measurement))
}

/// Whether a retained replay is the newest document already stored for its topic and
/// measurement (same value, or same raw payload).
fn is_stored(document: &Document, newest: &HashMap<Series, Document>) -> bool {
    let Some(last) = series_of(document).and_then(|series| newest.get(&series)) else {
        return false;
    };
    let same = |field: &str| {
        document
            .get(field)
            .is_some_and(|value| last.get(field) == Some(value))
    };
    same("value") || same("raw") || same("raw_base64")
}
