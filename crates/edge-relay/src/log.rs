//! The relay's on-disk log, in fjall (an LSM-tree store; chosen by `bench/log-store.sh`,
//! see docs/benchmarks.md): every message taken from the edge broker under a sequence
//! number of the relay's own, until it is forwarded and past its retention.
//!
//! Four keyspaces:
//! - `messages`: sequence number (8 bytes, big-endian, so keys sort in order) → the
//!   message as [`Entry::encode`] writes it: its topic, payload, QoS, retain flag and
//!   when the relay took it.
//! - `readings`: `device NUL boot NUL seq sequence-number` → nothing, for each message
//!   that is a JSON reading of a device its topic vouches for, with a boot and a seq
//!   (ids within `iot_core::bounds`; [`Entry::reading_key`]), so a replay request is
//!   answered by a range scan. A device account's reading that names another device is
//!   not indexed: it cannot answer for the genuine one. The sequence number is part of
//!   the key, so two copies of one reading both stay.
//! - `ages`: sequence number → when the relay took the message (8 bytes) and its
//!   `readings` key if it has one: what retention, the disk budget's trimming and the
//!   refill window need to know of a message, so that they never read its payload
//!   (messages may be 2 MiB each; reading them to learn their age took gigabytes).
//!   Written in the same batch as the message. A log of relays before it (no `ages`
//!   mark in `meta`) has its index built once when opened.
//! - `meta`: `forwarded`, the highest sequence number below which everything was
//!   acknowledged by the cloud broker; `ages`, once every kept message has its age
//!   in `ages`.
//!
//! A batch is written with one `fdatasync` ([`Log::append`]): the relay acknowledges a
//! message to the edge broker only once that returned. Everything else (the forwarded
//! mark, deletions) rides on the next sync: after a crash a few messages are forwarded
//! again, never lost.

use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::Context;
use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};
use iot_core::bounds::{check_id, check_seq};
use rumqttc::QoS;

/// Version byte in front of every stored message: 2 since messages keep the edge
/// broker's packet id; 1 (without it) is still read.
const FORMAT: u8 = 2;
/// Most disk the store's journals take (fjall's least setting): a message is written to
/// a journal first, which is dropped once its memtable is flushed to the tables.
pub const JOURNAL_RESERVE: u64 = 64 << 20;
const FORWARDED: &[u8] = b"forwarded";
/// In `meta` once every kept message has its entry in `ages`.
const AGES: &[u8] = b"ages";
/// Most messages (or, whichever comes first, [`INDEX_BYTES`] of them) read at once while
/// the `ages` index of an older log is built.
const INDEX_BATCH: usize = 1000;
const INDEX_BYTES: usize = 16 << 20;

/// One message as the relay keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub topic: String,
    pub payload: bytes::Bytes,
    pub qos: QoS,
    pub retain: bool,
    /// When the relay took it from the edge broker, milliseconds since 1970.
    pub received_ms: i64,
    /// The packet id the edge broker delivered it under (0 for QoS 0, and in messages of
    /// format 1): by it a relay started again knows the broker's copies of what it had
    /// written and could not acknowledge.
    pub edge_pkid: u16,
}

impl Entry {
    /// `FORMAT, flags (bit 0 retain, bits 1-2 QoS), received_ms (8 bytes), edge packet id
    /// (2 bytes), topic length (2 bytes), topic, payload`; format 1 had no packet id.
    pub fn encode(&self) -> Vec<u8> {
        let mut value = Vec::with_capacity(14 + self.topic.len() + self.payload.len());
        value.push(FORMAT);
        value.push(u8::from(self.retain) | ((self.qos as u8) << 1));
        value.extend_from_slice(&self.received_ms.to_be_bytes());
        value.extend_from_slice(&self.edge_pkid.to_be_bytes());
        // The topic came in an MQTT packet, whose topic length is 16 bits.
        let length = u16::try_from(self.topic.len()).unwrap_or(u16::MAX);
        value.extend_from_slice(&length.to_be_bytes());
        value.extend_from_slice(&self.topic.as_bytes()[..usize::from(length)]);
        value.extend_from_slice(&self.payload);
        value
    }

    /// Reads what [`Entry::encode`] wrote; `None` for anything else.
    pub fn decode(value: &[u8]) -> Option<Self> {
        let (&[format, flags], rest) = value.split_first_chunk::<2>()?;
        let (received, rest) = rest.split_first_chunk::<8>()?;
        let (edge_pkid, rest) = match format {
            1 => (0, rest),
            FORMAT => {
                let (pkid, rest) = rest.split_first_chunk::<2>()?;
                (u16::from_be_bytes(*pkid), rest)
            }
            _ => return None,
        };
        let (length, rest) = rest.split_first_chunk::<2>()?;
        let length = usize::from(u16::from_be_bytes(*length));
        if rest.len() < length {
            return None;
        }
        let (topic, payload) = rest.split_at(length);
        let qos = match flags >> 1 {
            0 => QoS::AtMostOnce,
            1 => QoS::AtLeastOnce,
            2 => QoS::ExactlyOnce,
            _ => return None,
        };
        Some(Self {
            topic: String::from_utf8(topic.to_vec()).ok()?,
            payload: bytes::Bytes::copy_from_slice(payload),
            qos,
            retain: flags & 1 == 1,
            received_ms: i64::from_be_bytes(*received),
            edge_pkid,
        })
    }

    /// `(device, boot, seq)` when the payload is a JSON reading with a `boot` and a `seq`
    /// within their bounds, of a device its topic vouches for ([`vouched_device`]):
    /// what a replay request asks for.
    pub fn reading_key(&self) -> Option<(String, String, u64)> {
        #[derive(serde::Deserialize)]
        struct Key {
            device: Option<String>,
            boot: String,
            seq: u64,
        }
        let first = self
            .payload
            .iter()
            .find(|byte| !byte.is_ascii_whitespace())?;
        if *first != b'{' {
            return None;
        }
        let key: Key = serde_json::from_slice(&self.payload).ok()?;
        let device = match (vouched_device(&self.topic)?, key.device) {
            (Vouch::Topic(bound), Some(claimed)) if bound != claimed => return None,
            (Vouch::Topic(bound), _) => bound.to_string(),
            (Vouch::Payload, Some(claimed)) => claimed,
            (Vouch::Payload, None) => return None,
        };
        check_id("device", &device).ok()?;
        check_id("boot", &key.boot).ok()?;
        check_seq(key.seq).ok()?;
        Some((device, key.boot, key.seq))
    }
}

/// Who names the device of a reading on a topic.
#[derive(Debug, PartialEq, Eq)]
enum Vouch<'a> {
    /// The topic: `/sensor/DEVICE/...`, which the edge broker's ACL lets only DEVICE's
    /// account write.
    Topic(&'a str),
    /// The payload: the project's own sensors' topics, which only service accounts write.
    Payload,
}

/// Whose readings a topic may carry, as the persister's default mapping reads them; none
/// for other topics. The log answers a replay request only with readings so vouched
/// for: a device account's copy naming another device's key (which the persister
/// flags, never stores as that device) must not stand in for the genuine reading, or the
/// genuine device would never be asked.
fn vouched_device(topic: &str) -> Option<Vouch<'_>> {
    if topic == iot_core::topics::TEMPERATURE || topic == iot_core::topics::PRESSURE {
        return Some(Vouch::Payload);
    }
    let device = topic.strip_prefix("/sensor/")?.split('/').next()?;
    let deeper = topic.len() > "/sensor/".len() + device.len();
    (deeper && !device.is_empty()).then_some(Vouch::Topic(device))
}

/// The index key of reading `(device, boot, seq)` kept as message `number`.
fn index_key(device: &str, boot: &str, seq: u64, number: u64) -> Vec<u8> {
    let mut key = index_prefix(device, boot);
    key.extend_from_slice(&seq.to_be_bytes());
    key.extend_from_slice(&number.to_be_bytes());
    key
}

fn index_prefix(device: &str, boot: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(device.len() + boot.len() + 18);
    key.extend_from_slice(device.as_bytes());
    key.push(0);
    key.extend_from_slice(boot.as_bytes());
    key.push(0);
    key
}

/// The `ages` entry of `entry`: when it was taken, then its `readings` key if any.
fn age_value(entry: &Entry, number: u64) -> Vec<u8> {
    let mut value = entry.received_ms.to_be_bytes().to_vec();
    if let Some((device, boot, seq)) = entry.reading_key() {
        value.extend_from_slice(&index_key(&device, &boot, seq, number));
    }
    value
}

/// What an `ages` entry holds: when the message was taken (0, so that it expires,
/// if unreadable) and its `readings` key, if any.
fn read_age(value: &[u8]) -> (i64, &[u8]) {
    match value.split_first_chunk::<8>() {
        Some((received, index)) => (i64::from_be_bytes(*received), index),
        None => (0, &[]),
    }
}

fn number_of(key: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(*key.first_chunk::<8>()?))
}

/// What opening the log found.
#[derive(Debug)]
pub struct Opened {
    /// Messages kept, forwarded or not.
    pub messages: u64,
    /// Of them, not forwarded yet.
    pub backlog: u64,
    /// A store that could not be opened, moved aside to this folder (the relay starts
    /// with a new one).
    pub set_aside: Option<(PathBuf, String)>,
}

/// The log; cheap to clone (every clone is the same store).
#[derive(Clone)]
pub struct Log {
    db: Database,
    messages: Keyspace,
    readings: Keyspace,
    ages: Keyspace,
    meta: Keyspace,
    /// The next sequence number to give.
    next: Arc<AtomicU64>,
    /// Everything below this was acknowledged by the cloud broker.
    forwarded: Arc<AtomicU64>,
    /// The lowest sequence number still kept.
    first: Arc<AtomicU64>,
}

impl std::fmt::Debug for Log {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Log")
            .field("next", &self.next)
            .field("forwarded", &self.forwarded)
            .finish_non_exhaustive()
    }
}

impl Log {
    /// Opens (or creates) the log in `dir`. A store that cannot be opened (damaged
    /// beyond what fjall's recovery repairs by itself: a torn last write is cut off and
    /// the rest kept) is moved aside, whole, to `dir/damaged-<time>` and a new one
    /// started, so the edge keeps flowing; what that store held is not forwarded.
    pub fn open(dir: &Path) -> anyhow::Result<(Self, Opened)> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create the log folder {}", dir.display()))?;
        let store = dir.join("store");
        let (log, set_aside) = match Self::open_store(&store) {
            Ok(log) => (log, None),
            Err(error) => {
                let why = format!("{error:#}");
                let aside = dir.join(format!("damaged-{}", now_ms() / 1000));
                std::fs::rename(&store, &aside).with_context(|| {
                    format!(
                        "the log {} cannot be opened ({why}) nor moved aside",
                        store.display()
                    )
                })?;
                let log = Self::open_store(&store)?;
                (log, Some((aside, why)))
            }
        };
        let messages = log.messages.len().context("cannot count the log")? as u64;
        let opened = Opened {
            messages,
            backlog: log.backlog(),
            set_aside,
        };
        Ok((log, opened))
    }

    fn open_store(store: &Path) -> anyhow::Result<Self> {
        // Memory does not grow with the backlog: at most 16 + 8 + 1 + 1 MiB of memtables and
        // a 16 MiB block cache; journals (64 MiB at most, fjall's least) are dropped
        // once their memtables are on disk.
        let db = Database::builder(store)
            .cache_size(16 << 20)
            .max_journaling_size(JOURNAL_RESERVE)
            .open()
            .with_context(|| format!("cannot open the log {}", store.display()))?;
        let keyspace = |name: &str, memtable: u64| {
            db.keyspace(name, || {
                KeyspaceCreateOptions::default().max_memtable_size(memtable)
            })
            .with_context(|| format!("cannot open the log's {name}"))
        };
        let messages = keyspace("messages", 16 << 20)?;
        let readings = keyspace("readings", 8 << 20)?;
        let ages = keyspace("ages", 1 << 20)?;
        let meta = keyspace("meta", 1 << 20)?;
        let first_key = |guard: Option<fjall::Guard>| -> anyhow::Result<Option<u64>> {
            match guard {
                Some(guard) => Ok(number_of(&guard.key()?)),
                None => Ok(None),
            }
        };
        let last = first_key(messages.last_key_value())?;
        let first = first_key(messages.first_key_value())?;
        let forwarded = meta
            .get(FORWARDED)?
            .and_then(|value| number_of(&value))
            .unwrap_or(0);
        let next = last.map_or(1, |last| last + 1).max(forwarded);
        let log = Self {
            db,
            messages,
            readings,
            ages,
            meta,
            next: Arc::new(AtomicU64::new(next)),
            forwarded: Arc::new(AtomicU64::new(forwarded.min(next))),
            first: Arc::new(AtomicU64::new(first.unwrap_or(next))),
        };
        if log.meta.get(AGES)?.is_none() {
            log.index_ages()?;
        }
        Ok(log)
    }

    /// Builds the `ages` index of a log written by a relay before it (once: the mark
    /// `ages` in `meta` says it is done), reading its messages once, a few at a time.
    fn index_ages(&self) -> anyhow::Result<()> {
        let mut indexed = 0;
        let mut write = self.db.batch();
        let (mut count, mut bytes) = (0, 0);
        for guard in self.messages.iter() {
            let (key, value) = guard.into_inner().context("cannot read the log")?;
            let Some(number) = number_of(&key) else {
                continue;
            };
            let age = Entry::decode(&value).map_or_else(
                // Unreadable: its age unknown, it goes first.
                || 0i64.to_be_bytes().to_vec(),
                |entry| age_value(&entry, number),
            );
            write.insert(&self.ages, key, age);
            (count, bytes) = (count + 1, bytes + value.len());
            if count >= INDEX_BATCH || bytes >= INDEX_BYTES {
                write.commit().context("cannot write to the log")?;
                write = self.db.batch();
                indexed += count;
                (count, bytes) = (0, 0);
            }
        }
        indexed += count;
        write.insert(&self.meta, AGES, []);
        write
            .durability(Some(PersistMode::SyncData))
            .commit()
            .context("cannot write to the log")?;
        if indexed > 0 {
            tracing::info!(
                indexed,
                "indexed the ages of a log written by an earlier relay (once)"
            );
        }
        Ok(())
    }

    /// Writes `batch` and syncs it to disk: when this returns `Ok`, every message of it
    /// survives a crash or a power cut. Called by one task at a time.
    pub fn append(&self, batch: &[Entry]) -> anyhow::Result<()> {
        let first = self.next.load(Ordering::Acquire);
        let mut write = self.db.batch().durability(Some(PersistMode::SyncData));
        for (number, entry) in (first..).zip(batch) {
            write.insert(&self.messages, number.to_be_bytes(), entry.encode());
            let age = age_value(entry, number);
            if let (_, index @ [_, ..]) = read_age(&age) {
                write.insert(&self.readings, index, []);
            }
            write.insert(&self.ages, number.to_be_bytes(), age);
        }
        write.commit().context("cannot write to the log")?;
        self.next
            .store(first + batch.len() as u64, Ordering::Release);
        Ok(())
    }

    /// The next sequence number to be given: every message below it is on disk.
    pub fn next(&self) -> u64 {
        self.next.load(Ordering::Acquire)
    }

    /// Everything below this was acknowledged by the cloud broker.
    pub fn forwarded(&self) -> u64 {
        self.forwarded.load(Ordering::Acquire)
    }

    /// Messages on disk not acknowledged by the cloud broker yet.
    pub fn backlog(&self) -> u64 {
        self.next().saturating_sub(self.forwarded().max(1))
    }

    /// Up to `limit` messages from number `from` on, in order, and no more than `bytes`
    /// of them (but always one).
    pub fn read_from(
        &self,
        from: u64,
        limit: usize,
        bytes: usize,
    ) -> anyhow::Result<Vec<(u64, Entry)>> {
        let mut read = Vec::with_capacity(limit.min(1024));
        let mut taken = 0;
        for guard in self.messages.range(from.to_be_bytes()..).take(limit) {
            if taken >= bytes && !read.is_empty() {
                break;
            }
            let (key, value) = guard.into_inner().context("cannot read the log")?;
            taken += value.len();
            let Some(number) = number_of(&key) else {
                continue;
            };
            match Entry::decode(&value) {
                Some(entry) => read.push((number, entry)),
                None => {
                    tracing::error!(number, "message {number} of the log is unreadable; skipped");
                    metrics::counter!("iot_relay_unreadable_total").increment(1);
                }
            }
        }
        Ok(read)
    }

    /// The message `number`, if kept.
    pub fn get(&self, number: u64) -> anyhow::Result<Option<Entry>> {
        let value = self
            .messages
            .get(number.to_be_bytes())
            .context("cannot read the log")?;
        Ok(value.and_then(|value| Entry::decode(&value)))
    }

    /// Records that the cloud broker acknowledged everything below `below` (written with
    /// the next sync).
    pub fn mark_forwarded(&self, below: u64) -> anyhow::Result<()> {
        let previous = self.forwarded.fetch_max(below, Ordering::AcqRel);
        if below > previous {
            self.meta
                .insert(FORWARDED, below.to_be_bytes())
                .context("cannot write to the log")?;
        }
        Ok(())
    }

    /// Syncs what was written without a sync of its own (the forwarded mark, deletions).
    pub fn sync(&self) -> anyhow::Result<()> {
        self.db
            .persist(PersistMode::SyncData)
            .context("cannot sync the log")
    }

    /// The numbers of the kept readings `(device, boot, from..=to)`, at most `limit`, in
    /// `seq` order: `(seq, message number)`.
    pub fn readings(
        &self,
        device: &str,
        boot: &str,
        (from, to): (u64, u64),
        limit: usize,
    ) -> anyhow::Result<Vec<(u64, u64)>> {
        let prefix = index_prefix(device, boot);
        let mut start = prefix.clone();
        start.extend_from_slice(&from.to_be_bytes());
        let mut end = prefix.clone();
        end.extend_from_slice(&to.to_be_bytes());
        end.extend_from_slice(&u64::MAX.to_be_bytes());
        let mut found = Vec::new();
        for guard in self
            .readings
            .range::<Vec<u8>, _>((Bound::Included(start), Bound::Included(end)))
            .take(limit)
        {
            let key = guard.key().context("cannot read the log's index")?;
            let tail = &key[prefix.len()..];
            if let (Some(seq), Some(number)) = (number_of(tail), tail.get(8..).and_then(number_of))
            {
                found.push((seq, number));
            }
        }
        Ok(found)
    }

    /// Bytes the store takes on disk now.
    pub fn disk_bytes(&self) -> u64 {
        self.db.disk_space().unwrap_or(0)
    }

    /// What the store takes on disk besides its journals.
    pub fn table_bytes(&self) -> u64 {
        let journals = self.db.journal_disk_space().unwrap_or(0);
        self.disk_bytes().saturating_sub(journals)
    }

    /// What counts against `--max-disk`: the tables, what waits in memory to be flushed
    /// to them, and the journals at their most ([`JOURNAL_RESERVE`]; a journal file is
    /// made that long at once, and what it holds is in the memory counted before).
    pub fn budget_bytes(&self) -> u64 {
        self.table_bytes() + self.db.write_buffer_size() + JOURNAL_RESERVE
    }

    /// The lowest number still kept.
    pub fn first(&self) -> u64 {
        self.first.load(Ordering::Acquire)
    }

    /// When the relay took the first message kept from number `from` on: its number
    /// and time, from the `ages` index (no payload is read).
    pub fn taken_at(&self, from: u64) -> anyhow::Result<Option<(u64, i64)>> {
        let Some(guard) = self.ages.range(from.to_be_bytes()..).next() else {
            return Ok(None);
        };
        let (key, value) = guard.into_inner().context("cannot read the log's ages")?;
        Ok(number_of(&key).map(|number| (number, read_age(&value).0)))
    }

    /// Deletes forwarded messages from the oldest on, while `drop(received_ms)` says so
    /// of when the relay took them, at most `limit` of them; returns how many it
    /// deleted. Reads only the `ages` index, never a message.
    pub fn trim(&self, limit: usize, mut drop: impl FnMut(i64) -> bool) -> anyhow::Result<u64> {
        let forwarded = self.forwarded();
        let from = self.first();
        // Only forwarded messages are deleted: none of the rest is read.
        let limit =
            limit.min(usize::try_from(forwarded.saturating_sub(from)).unwrap_or(usize::MAX));
        if limit == 0 {
            return Ok(0);
        }
        let mut write = self.db.batch();
        let mut deleted = 0;
        let mut new_first = from;
        for guard in self.ages.range(from.to_be_bytes()..).take(limit) {
            let (key, value) = guard.into_inner().context("cannot read the log's ages")?;
            let Some(number) = number_of(&key) else {
                continue;
            };
            let (received_ms, index) = read_age(&value);
            if number >= forwarded || !drop(received_ms) {
                break;
            }
            write.remove(&self.messages, key.clone());
            write.remove(&self.ages, key);
            if !index.is_empty() {
                write.remove(&self.readings, index);
            }
            deleted += 1;
            new_first = number + 1;
        }
        if deleted > 0 {
            write.commit().context("cannot delete from the log")?;
            self.first.store(new_first, Ordering::Release);
        }
        Ok(deleted)
    }
}

impl Log {
    /// Writes deletions out and compacts, so that their room is given back to the disk
    /// now: for a disk budget that is full (without new writes, fjall would not compact).
    pub fn compact(&self) -> anyhow::Result<()> {
        for keyspace in [&self.messages, &self.readings, &self.ages] {
            keyspace
                .rotate_memtable_and_wait()
                .context("cannot flush the log")?;
            keyspace.major_compact().context("cannot compact the log")?;
        }
        Ok(())
    }

    /// Messages kept, forwarded or not (from the sequence numbers: an estimate when
    /// unreadable ones were skipped).
    pub fn kept(&self) -> u64 {
        self.next().saturating_sub(self.first())
    }
}

/// Milliseconds since 1970, now.
pub fn now_ms() -> i64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(now.as_millis()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests;
