//! The database side of the persister: batches of documents written with unordered
//! `insert_many`, retried with backoff while the database is unreachable, and handed
//! back for acknowledgement only once written.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bson::{doc, Document};
use iot_core::backoff::Backoff;
use iot_core::store::{describe, Record, READINGS, STATUS};
use mongodb::error::{ErrorKind, InsertManyError};
use mongodb::options::FindOneOptions;
use mongodb::{Collection, Database};
use rumqttc::Publish;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// MongoDB's code for a duplicate key: a reading that is already stored.
const DUPLICATE_KEY: i32 = 11000;

/// A message on its way to the database.
#[derive(Debug)]
pub struct Pending {
    pub record: Record,
    /// Delivered with the retain flag: a replay of the broker's retained message.
    pub replay: bool,
    /// Acknowledged once the record is written.
    pub publish: Publish,
}

/// Counters for the throughput line.
#[derive(Debug, Default)]
pub struct Stats {
    pub received: AtomicU64,
    pub written: AtomicU64,
    pub duplicates: AtomicU64,
    /// Messages that were not readings (stored flagged).
    pub unparsed: AtomicU64,
    /// Retained replays already stored and repeated statuses, not stored again.
    pub skipped: AtomicU64,
    /// Documents the database refused for another reason than a duplicate.
    pub rejected: AtomicU64,
}

impl Stats {
    /// `in=… written=… duplicates=… unparsed=… skipped=… rejected=… buffered=…`
    pub fn line(&self, buffered: usize) -> String {
        let get = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        format!(
            "in={} written={} duplicates={} unparsed={} skipped={} rejected={} buffered={buffered}",
            get(&self.received),
            get(&self.written),
            get(&self.duplicates),
            get(&self.unparsed),
            get(&self.skipped),
            get(&self.rejected),
        )
    }
}

/// Writes batches; see the module documentation.
#[derive(Debug)]
pub struct Writer {
    readings: Collection<Document>,
    status: Collection<Document>,
    batch_size: usize,
    flush_interval: Duration,
    stats: Arc<Stats>,
    /// Last stored status per device: only changes are stored.
    last_status: HashMap<String, bool>,
}

impl Writer {
    pub fn new(
        db: &Database,
        batch_size: usize,
        flush_interval: Duration,
        stats: Arc<Stats>,
    ) -> Self {
        Self {
            readings: db.collection(READINGS),
            status: db.collection(STATUS),
            batch_size,
            flush_interval,
            stats,
            last_status: HashMap::new(),
        }
    }

    /// Writes what arrives on `pending` until it closes, sending the messages of each
    /// written batch to `written`. Returns how many messages it could not write before
    /// `stop` (the broker still holds those: they were never acknowledged).
    pub async fn run(
        mut self,
        mut pending: mpsc::Receiver<Pending>,
        written: mpsc::UnboundedSender<Vec<Publish>>,
        stop: CancellationToken,
    ) -> usize {
        let mut batch: Vec<Pending> = Vec::with_capacity(self.batch_size);
        loop {
            let Some(first) = pending.recv().await else {
                return 0;
            };
            batch.push(first);
            let deadline = Instant::now() + self.flush_interval;
            while batch.len() < self.batch_size {
                tokio::select! {
                    next = pending.recv() => match next {
                        Some(next) => batch.push(next),
                        None => break,
                    },
                    () = tokio::time::sleep_until(deadline) => break,
                }
            }
            if !self.write_until_done(&batch, &stop).await {
                return batch.len() + pending.len();
            }
            let publishes = batch.drain(..).map(|pending| pending.publish).collect();
            if written.send(publishes).is_err() {
                return 0;
            }
        }
    }

    /// Writes one batch, retrying with backoff until it succeeds; false if `stop` came
    /// first. Every document has its `_id` before the first try, so a retry after a
    /// partial write only meets duplicates.
    async fn write_until_done(&mut self, batch: &[Pending], stop: &CancellationToken) -> bool {
        let mut backoff = Backoff::default();
        loop {
            match self.write(batch).await {
                Ok(()) => return true,
                Err(error) => {
                    let delay = backoff.next_delay();
                    tracing::warn!(
                        attempt = backoff.attempt(), held = batch.len(),
                        "cannot write to MongoDB: {}; retrying in {delay:?} (nothing is acknowledged meanwhile)",
                        describe(&error)
                    );
                    tokio::select! {
                        () = stop.cancelled() => return false,
                        () = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }

    async fn write(&mut self, batch: &[Pending]) -> anyhow::Result<()> {
        let mut readings = Vec::new();
        let mut statuses = Vec::new();
        let mut changes = HashMap::new();
        for pending in batch {
            match &pending.record {
                Record::Status {
                    device,
                    online,
                    document,
                } => {
                    let last = match changes.get(device).or(self.last_status.get(device)) {
                        Some(last) => Some(*last),
                        None => self.stored_status(device).await?,
                    };
                    if last == Some(*online) {
                        self.stats.skipped.fetch_add(1, Ordering::Relaxed);
                    } else {
                        changes.insert(device.clone(), *online);
                        statuses.push(document.clone());
                    }
                }
                Record::Reading {
                    document,
                    keyed: false,
                }
                | Record::Unparsed { document }
                    if pending.replay && self.is_stored_replay(document).await? =>
                {
                    self.stats.skipped.fetch_add(1, Ordering::Relaxed);
                }
                Record::Reading { document, .. } | Record::Unparsed { document } => {
                    readings.push(document.clone())
                }
            }
        }
        self.insert(&self.readings, readings).await?;
        self.insert(&self.status, statuses).await?;
        self.last_status.extend(changes);
        Ok(())
    }

    /// Unordered insert; duplicates are expected and counted, other per-document errors
    /// are logged and counted.
    async fn insert(
        &self,
        collection: &Collection<Document>,
        documents: Vec<Document>,
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
        self.stats.written.fetch_add(new, Ordering::Relaxed);
        self.stats
            .duplicates
            .fetch_add(duplicates, Ordering::Relaxed);
        self.stats.rejected.fetch_add(rejected, Ordering::Relaxed);
        Ok(())
    }

    /// The device's last stored status, if any.
    async fn stored_status(&self, device: &str) -> anyhow::Result<Option<bool>> {
        let options = FindOneOptions::builder().sort(doc! { "ts": -1 }).build();
        let last = self
            .status
            .find_one(doc! { "device": device })
            .with_options(options)
            .await?;
        Ok(last.and_then(|doc| doc.get_str("status").ok().map(|status| status == "online")))
    }

    /// Whether a retained replay is the newest document already stored for its topic
    /// (same value, or same raw payload).
    async fn is_stored_replay(&self, document: &Document) -> anyhow::Result<bool> {
        let topic = document.get_str("topic").unwrap_or_default();
        let options = FindOneOptions::builder()
            .sort(doc! { "received_at": -1 })
            .build();
        let Some(last) = self
            .readings
            .find_one(doc! { "topic": topic })
            .with_options(options)
            .await?
        else {
            return Ok(false);
        };
        let same =
            |field: &str| document.get(field).is_some() && document.get(field) == last.get(field);
        Ok(same("value") || same("raw") || same("raw_base64"))
    }
}
