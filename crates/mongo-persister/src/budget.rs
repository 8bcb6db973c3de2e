//! What the persister holds, in documents and bytes rather than messages: one message
//! may be one document or ten thousand (a Sparkplug message carries up to 10 000
//! metrics), so bounds in messages bound nothing.
//!
//! - [`Queued`]: the documents and payload bytes handed to the writer and not written
//!   yet. No message is read from the broker while either is past its bound (the
//!   broker keeps them, unacknowledged); one message may go past it.
//! - [`DeviceBudget`]: how many documents one device's messages may expand into beyond
//!   one a message, per second (a token bucket with a burst of ten seconds' worth, and
//!   never less than a whole Sparkplug birth). A device past it has its readings of that
//!   message refused and counted, its statuses kept; everyone else's go on. A message
//!   that is one document costs nothing, so a backlog drained fast is never refused.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use iot_store::Record;

/// Payload bytes queued for the writer at most (but always one message).
pub const QUEUE_BYTES: usize = 8 << 20;
/// Documents queued for the writer at most, in batches of `--batch-size` (but always
/// one message).
pub const QUEUE_BATCHES: usize = 4;
/// The largest burst of a device's budget is never below one message of the most
/// metrics a Sparkplug message may hold, so that a birth from a quiet device is whole.
pub const LEAST_BURST: f64 = 10_000.0;
/// Seconds of the rate a device may spend at once.
const BURST_SECONDS: f64 = 10.0;
/// Devices idle for this long are forgotten (their bucket is full again anyway).
const FORGET_AFTER: Duration = Duration::from_secs(60);
/// A device past its budget is said in the log once in this long.
const SAY_EVERY: Duration = Duration::from_secs(10);

/// Documents in `record` (all its parts).
pub fn documents(record: &Record) -> usize {
    record
        .parts()
        .iter()
        .map(|part| match part {
            Record::Readings { documents, .. } => documents.len(),
            Record::Unparsed { .. } | Record::Status { .. } => 1,
            Record::Nothing { .. } | Record::Several(_) => 0,
        })
        .sum()
}

/// The documents and payload bytes handed to the writer and not written yet; shared by
/// the reading side (adds) and the writer (takes away once a batch is written).
#[derive(Debug)]
pub struct Queued {
    documents: AtomicUsize,
    bytes: AtomicUsize,
    most_documents: usize,
}

impl Queued {
    pub fn new(batch_size: usize) -> Self {
        Self {
            documents: AtomicUsize::new(0),
            bytes: AtomicUsize::new(0),
            most_documents: batch_size * QUEUE_BATCHES,
        }
    }

    /// Whether another message may be read from the broker.
    pub fn has_room(&self) -> bool {
        self.documents.load(Ordering::Acquire) < self.most_documents
            && self.bytes.load(Ordering::Acquire) < QUEUE_BYTES
    }

    pub fn add(&self, documents: usize, bytes: usize) {
        self.documents.fetch_add(documents, Ordering::AcqRel);
        self.bytes.fetch_add(bytes, Ordering::AcqRel);
        metrics::gauge!("iot_persister_queued_documents")
            .set(self.documents.load(Ordering::Acquire) as f64);
    }

    pub fn written(&self, documents: usize, bytes: usize) {
        self.documents.fetch_sub(documents, Ordering::AcqRel);
        self.bytes.fetch_sub(bytes, Ordering::AcqRel);
        metrics::gauge!("iot_persister_queued_documents")
            .set(self.documents.load(Ordering::Acquire) as f64);
    }
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
    said: Option<Instant>,
}

/// Per device, the documents its messages may expand into beyond one a message; see
/// the module header.
#[derive(Debug)]
pub struct DeviceBudget {
    rate: f64,
    burst: f64,
    buckets: HashMap<String, Bucket>,
    swept: Instant,
}

impl DeviceBudget {
    /// `rate` documents a second beyond one a message; 0: no budget.
    pub fn new(rate: u32) -> Self {
        let rate = f64::from(rate);
        Self {
            rate,
            burst: (rate * BURST_SECONDS).max(LEAST_BURST),
            buckets: HashMap::new(),
            swept: Instant::now(),
        }
    }

    /// Takes what `record` of `device` costs from its budget, or, past it, takes its
    /// readings out of it (statuses stay): how many documents were refused.
    pub fn spend(&mut self, device: &str, record: &mut Record, now: Instant) -> usize {
        if self.rate <= 0.0 {
            return 0;
        }
        let cost = readings(record).saturating_sub(1) as f64;
        if cost == 0.0 {
            return 0;
        }
        self.sweep(now);
        let bucket = self
            .buckets
            .entry(device.to_string())
            .or_insert_with(|| Bucket {
                tokens: self.burst,
                at: now,
                said: None,
            });
        let elapsed = now.saturating_duration_since(bucket.at).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * self.rate).min(self.burst);
        bucket.at = now;
        if bucket.tokens >= cost {
            bucket.tokens -= cost;
            return 0;
        }
        let refused = drop_readings(record);
        if bucket
            .said
            .is_none_or(|said| now.saturating_duration_since(said) >= SAY_EVERY)
        {
            bucket.said = Some(now);
            tracing::warn!(
                device,
                refused,
                rate = self.rate,
                "a message of {device} expands into more documents than its budget has left ({} a second beyond one a message): its {refused} readings are refused, counted in iot_persister_over_budget_total (said once in {SAY_EVERY:?})",
                self.rate
            );
        }
        refused
    }

    /// Forgets the devices idle long enough to have a full bucket again.
    fn sweep(&mut self, now: Instant) {
        if now.saturating_duration_since(self.swept) < FORGET_AFTER {
            return;
        }
        self.swept = now;
        self.buckets
            .retain(|_, bucket| now.saturating_duration_since(bucket.at) < FORGET_AFTER);
    }
}

/// Reading documents of `record` (flagged ones included: they are documents too).
fn readings(record: &Record) -> usize {
    record
        .parts()
        .iter()
        .map(|part| match part {
            Record::Readings { documents, .. } => documents.len(),
            Record::Unparsed { .. } => 1,
            _ => 0,
        })
        .sum()
}

/// Takes the readings out of `record`, statuses kept: how many documents went.
fn drop_readings(record: &mut Record) -> usize {
    let refused = readings(record);
    let why = "refused: past the device's document budget";
    match record {
        Record::Several(parts) => {
            parts.retain(|part| matches!(part, Record::Status { .. }));
        }
        Record::Readings { .. } | Record::Unparsed { .. } => {
            *record = Record::Nothing { why: why.into() };
        }
        Record::Status { .. } | Record::Nothing { .. } => {}
    }
    refused
}

/// Whose budget a message spends: a Sparkplug edge node's (its account, in any group),
/// else the device its documents name, else its topic.
pub fn spender<'a>(topic: &'a str, record: &'a Record) -> &'a str {
    if let Some(rest) = topic.strip_prefix("spBv1.0/") {
        // spBv1.0/<group>/<type>/<node>[/<device>]
        if let Some(node) = rest.split('/').nth(2) {
            return node;
        }
    }
    record
        .parts()
        .iter()
        .find_map(|part| match part {
            Record::Readings { documents, .. } => documents.first()?.get_str("device").ok(),
            Record::Unparsed { document } => document.get_str("device").ok(),
            Record::Status { device, .. } => Some(device.as_str()),
            _ => None,
        })
        .unwrap_or(topic)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bson::doc;

    fn readings_of(count: usize) -> Record {
        Record::Readings {
            documents: (0..count)
                .map(|n| doc! { "device": "d", "n": n as i64 })
                .collect(),
            keyed: false,
        }
    }

    #[test]
    fn one_document_a_message_is_never_refused() {
        let mut budget = DeviceBudget::new(1);
        let now = Instant::now();
        for _ in 0..100_000 {
            let mut record = readings_of(1);
            assert_eq!(budget.spend("d", &mut record, now), 0);
        }
    }

    #[test]
    fn a_whole_birth_passes_then_the_rate_holds_and_others_go_on() {
        let mut budget = DeviceBudget::new(1000);
        let start = Instant::now();
        let mut birth = readings_of(10_000);
        assert_eq!(budget.spend("node", &mut birth, start), 0);
        assert_eq!(documents(&birth), 10_000);
        // The burst of ten seconds' worth is spent: the next big message is refused.
        let mut data = readings_of(10_000);
        assert_eq!(budget.spend("node", &mut data, start), 10_000);
        assert_eq!(documents(&data), 0);
        // Another device has its own budget.
        let mut other = readings_of(500);
        assert_eq!(budget.spend("other", &mut other, start), 0);
        // A second later, a thousand more documents are allowed.
        let later = start + Duration::from_secs(1);
        let mut small = readings_of(1001);
        assert_eq!(budget.spend("node", &mut small, later), 0);
        // The birth left one document of the burst: a message costing two is refused.
        let mut more = readings_of(3);
        assert_eq!(budget.spend("node", &mut more, later), 3);
    }

    #[test]
    fn statuses_of_a_refused_message_are_kept() {
        let mut budget = DeviceBudget::new(1);
        let now = Instant::now();
        let status = Record::Status {
            device: "g/node".into(),
            online: true,
            document: doc! {},
        };
        let mut first = Record::Several(vec![status.clone(), readings_of(10_001)]);
        assert_eq!(budget.spend("node", &mut first, now), 0);
        let mut second = Record::Several(vec![status, readings_of(20)]);
        assert_eq!(budget.spend("node", &mut second, now), 20);
        assert_eq!(documents(&second), 1);
    }

    #[test]
    fn no_budget_refuses_nothing() {
        let mut budget = DeviceBudget::new(0);
        let mut record = readings_of(100_000);
        assert_eq!(budget.spend("d", &mut record, Instant::now()), 0);
    }

    #[test]
    fn a_sparkplug_message_spends_its_nodes_budget() {
        let record = readings_of(3);
        assert_eq!(spender("spBv1.0/g/DDATA/node-1/dev-9", &record), "node-1");
        assert_eq!(spender("spBv1.0/other/NDATA/node-1", &record), "node-1");
        assert_eq!(spender("/sensor/d/temperature", &record), "d");
        let nothing = Record::Nothing { why: "x".into() };
        assert_eq!(spender("a/b", &nothing), "a/b");
    }

    #[test]
    fn the_queue_has_room_until_either_bound() {
        let queued = Queued::new(10);
        assert!(queued.has_room());
        queued.add(39, 0);
        assert!(queued.has_room());
        queued.add(1, 0);
        assert!(!queued.has_room());
        queued.written(40, 0);
        queued.add(1, QUEUE_BYTES);
        assert!(!queued.has_room());
        queued.written(1, QUEUE_BYTES);
        assert!(queued.has_room());
    }
}
