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
//! - `meta`: `id`, the log's own, made with it (names its messages in the NATS
//!   stream); `forwarded`, the highest sequence number below which everything was
//!   acknowledged by the cloud broker; `first`, the lowest number still kept; `ages`,
//!   once every kept message has its age in `ages`; and the edge broker's packet ids
//!   ([`Log::edge_pkids`]): `edge-pkid/` and a packet id (2 bytes) → the edge session
//!   and [`fingerprint`] of the last message taken under it, at most 65 535 of them,
//!   written in the same batch as the message; `edge-last`, the edge session and the
//!   packet id of the last message taken; `edge-session`, which session of the edge
//!   broker's those are of; `edge-pkids`, once the map holds every message the log has
//!   under a packet id.
//!
//! Deleting the oldest messages writes no tombstones into `messages` and `ages`: it moves
//! `first` on, and the tables wholly below it are dropped as files ([`Log::release`]).
//! A tombstone for each deleted key made every table the store flushed span from the
//! oldest kept key to the newest, so that its compactions rewrote every table kept in
//! between: the disk then held the kept messages twice for a while, past `--max-disk`
//! (du 153 MiB for 128M). Without them the tables' key ranges do not overlap, and what
//! lies below `first` in the one table that straddles it is never read (every read
//! starts at `first`) and goes with that table once `first` passes it.
//!
//! A batch is written with one `fdatasync` ([`Log::append`]): the relay acknowledges a
//! message to the edge broker only once that returned. The forwarded mark is synced as
//! it is written ([`Log::mark_forwarded`]), before the forwarder lets the cloud broker
//! release what it covers ([`crate::forward`]): after a crash nothing is forwarded twice.
//! Deletions ride on the next sync.

use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::Context;
use fjall::{AbstractTree, Database, Keyspace, KeyspaceCreateOptions, PersistMode};
use iot_core::bounds::{check_id, check_seq};
use rumqttc::QoS;

/// Version byte in front of every stored message: 2 since messages keep the edge
/// broker's packet id; 1 (without it) is still read.
const FORMAT: u8 = 2;
/// Most disk the store's journals take (fjall's least setting): a message is written to
/// a journal first, which is dropped once its memtable is flushed to the tables.
/// fjall lets them grow past it: it starts a new journal only at a flush that finds the
/// current one past 64 000 000 bytes, and drops the old one only once every memtable
/// with a write in it is flushed; under a fast stream of large messages its journals
/// took 132 MiB (73 + 59) and the log 192 MiB for a 128M budget. So a batch is written
/// only while they take less than [`JOURNAL_GATE`] ([`Log::wait_for_journals`]).
pub const JOURNAL_RESERVE: u64 = 64 << 20;
/// The journals' disk past which no batch is written until the store flushed them: above
/// fjall's 64 000 000 bytes, so that its current journal reaches the size at which it
/// starts a new one, and one batch (4 MiB) below [`JOURNAL_RESERVE`] plus 2 MiB.
const JOURNAL_GATE: u64 = 62 << 20;
/// How long a batch waits for the journals to be flushed at most; then it is written.
const JOURNAL_PATIENCE: std::time::Duration = std::time::Duration::from_secs(30);
const FORWARDED: &[u8] = b"forwarded";
/// In `meta`: the lowest message number kept (what lies below it is deleted).
const FIRST: &[u8] = b"first";
/// In `meta`: the log's own id, made with it.
const ID: &[u8] = b"id";
/// In `meta`, before the first message number of a run (8 bytes, big-endian): the run's
/// own id, made at random when the relay started ([`Log::run_of`]).
const RUN: &[u8] = b"run/";
/// In `meta` once every kept message has its entry in `ages`.
const AGES: &[u8] = b"ages";
/// In `meta`, before a packet id (2 bytes, big-endian): the edge session (8 bytes) and
/// the [`fingerprint`] (8 bytes) of the last message taken under that packet id.
const EDGE_PKID: &[u8] = b"edge-pkid/";
/// In `meta`: the edge session (8 bytes) and the packet id (2 bytes) of the last message
/// taken under one.
const EDGE_LAST: &[u8] = b"edge-last";
/// In `meta`: the edge broker's session the packet ids are of, counted up each time the
/// relay finds the session gone ([`Log::new_edge_session`]).
const EDGE_SESSION: &[u8] = b"edge-session";
/// In `meta` once [`EDGE_PKID`] holds every message of the log taken under a packet id
/// (a new log; a log of a relay before the map gets it from its last messages).
const EDGE_PKIDS: &[u8] = b"edge-pkids";
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

/// What a copy of a message is known by, with its packet id: a 64-bit xxh3 of the
/// topic's length, the topic and the payload. Kept on disk, so of a fixed algorithm
/// (the standard library's hasher may change between Rust releases).
pub fn fingerprint(topic: &[u8], payload: &[u8]) -> u64 {
    let mut hasher = xxhash_rust::xxh3::Xxh3::new();
    hasher.update(&(topic.len() as u64).to_be_bytes());
    hasher.update(topic);
    hasher.update(payload);
    hasher.digest()
}

/// The edge broker's packet ids of what the log took ([`Log::edge_pkids`]).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct EdgePkids {
    /// The packet id of the last message taken in the current session.
    pub last: Option<u16>,
    /// The last message taken under each packet id: `(packet id, fingerprint)`.
    pub known: Vec<(u16, u64)>,
}

fn edge_pkid_key(pkid: u16) -> Vec<u8> {
    let mut key = EDGE_PKID.to_vec();
    key.extend_from_slice(&pkid.to_be_bytes());
    key
}

fn number_of(key: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(*key.first_chunk::<8>()?))
}

/// What opening the log found.
#[derive(Debug, Default)]
pub struct Opened {
    /// Messages kept, forwarded or not.
    pub messages: u64,
    /// Of them, not forwarded yet.
    pub backlog: u64,
    /// A store that could not be opened, moved aside whole to this folder (the relay starts
    /// with a new one).
    pub set_aside: Option<(PathBuf, String)>,
    /// Damage found and what was done about it, one line each.
    pub damage: Vec<String>,
    /// Messages not forwarded yet that the damage cost (counted where the damaged part
    /// can still be read for its numbers).
    pub lost: u64,
}

/// Moves `path` into the folder `aside` (made if need be); returns where it went.
fn move_into(path: &Path, aside: &Path) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(aside).with_context(|| format!("cannot make {}", aside.display()))?;
    let to = aside.join(path.file_name().unwrap_or_default());
    std::fs::rename(path, &to).with_context(|| {
        format!(
            "the damaged {} cannot be moved aside to {}",
            path.display(),
            to.display()
        )
    })?;
    Ok(to)
}

/// What is wrong with the first damaged journal of `store`, if one is: checked before
/// fjall reads it, which refuses a batch that fails its checksum and, past a damaged
/// length or tag, cuts off the rest as if a crash had torn it.
fn damaged_journal(store: &Path) -> Option<String> {
    for journal in salvage::journal_files(store).ok()? {
        let Ok(read) = salvage::read_journal(&journal, false) else {
            continue;
        };
        if read.is_damaged() {
            return Some(format!(
                "{} is damaged: {} batches fail their checksum, {} bytes cannot be parsed",
                journal.display(),
                read.damaged_batches,
                read.unparsed
            ));
        }
    }
    None
}

/// Whether another process holds the store's lock (a relay running on it).
fn held(store: &Path) -> bool {
    lock_holder(&store.join("lock")).is_some()
}

/// The store is held by another process (another relay on the same `--log-dir`): not
/// damage, nothing of it is touched.
#[derive(Debug)]
pub struct Held {
    /// The store's lock file.
    pub lock: PathBuf,
    /// The process holding it, when `/proc/locks` says.
    pub pid: Option<u32>,
}

impl std::fmt::Display for Held {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let holder = match self.pid {
            Some(pid) => format!("process {pid}"),
            None => "another process".to_string(),
        };
        write!(
            f,
            "the log is in use: {holder} holds its lock {} (another edge-relay on this --log-dir?); not starting, nothing touched",
            self.lock.display()
        )
    }
}

impl std::error::Error for Held {}

/// Whether opening failed because another process holds the store's lock.
fn is_locked(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        matches!(
            cause.downcast_ref::<fjall::Error>(),
            Some(fjall::Error::Locked)
        )
    })
}

/// The process holding a lock on `lock`, from `/proc/locks` (Linux): the line of the
/// file's device and inode.
fn lock_holder(lock: &Path) -> Option<u32> {
    use std::os::unix::fs::MetadataExt;
    let metadata = std::fs::metadata(lock).ok()?;
    let dev = metadata.dev();
    let (major, minor) = (
        ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff),
        (dev & 0xff) | ((dev >> 12) & !0xff),
    );
    let file = format!("{major:02x}:{minor:02x}:{}", metadata.ino());
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    // `1: FLOCK  ADVISORY  WRITE 4242 08:01:1234 0 EOF`
    locks.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let at = fields.iter().position(|field| *field == file)?;
        fields.get(at.checked_sub(1)?)?.parse().ok()
    })
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
    /// The forwarded mark as last written.
    saved_forwarded: Arc<AtomicU64>,
    /// The first kept number when the deleted tables were last dropped.
    released: Arc<AtomicU64>,
    /// The lowest sequence number still kept.
    first: Arc<AtomicU64>,
    /// Stretches of message numbers that cannot be read, `[from, to)`: skipped.
    unreadable: Arc<std::sync::Mutex<Vec<(u64, u64)>>>,
    /// The store's folder.
    store: Arc<PathBuf>,
    /// This log's own id, made when it was ([`Log::id`]).
    id: Arc<str>,
    /// Each run's first message number and id, in order ([`Log::run_of`]).
    runs: Arc<Vec<(u64, Arc<str>)>>,
    /// The edge broker's session the packet ids written are of.
    edge_session: Arc<AtomicU64>,
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
    /// Opens (or creates) the log in `dir`. Damage costs what the damaged part held, and
    /// is said in [`Opened::damage`]:
    /// - a keyspace's `current` file missing or cut short (fjall would take the keyspace
    ///   for a half-made one and delete it): written again from its newest version file;
    /// - a journal fjall cannot recover (a checksum mismatch before its end): moved aside
    ///   to `dir/damaged-<time>`, the store opened from its tables, and the journal's
    ///   intact batches written again: only the damaged batch is lost;
    /// - unreadable blocks of the tables: the store copied without them into a new one,
    ///   the damaged one moved aside;
    /// - a store that still cannot be opened: moved aside whole and a new one started.
    ///
    /// A torn last write is cut off by fjall's own recovery. A store another process
    /// holds is no damage: [`Held`], and nothing is touched.
    pub fn open(dir: &Path) -> anyhow::Result<(Self, Opened)> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create the log folder {}", dir.display()))?;
        let store = dir.join("store");
        let mut opened = Opened::default();
        let aside = dir.join(format!("damaged-{}", now_ms()));
        if store.is_dir() && !held(&store) {
            match salvage::restore_current_files(&store) {
                Ok(said) => opened.damage.extend(said),
                Err(error) => {
                    // fjall would delete the keyspace: everything kept for inspection.
                    move_into(&store, &aside)?;
                    opened.set_aside = Some((aside.clone(), format!("{error:#}")));
                }
            }
        }
        let journal_damage = if store.is_dir() && !held(&store) {
            damaged_journal(&store)
        } else {
            None
        };
        let opening = match journal_damage {
            Some(why) => Err(anyhow::anyhow!(why)),
            None => Self::open_store_guarded(&store),
        };
        let log = match opening {
            Ok(log) => log,
            Err(error) if is_locked(&error) => {
                let lock = store.join("lock");
                let pid = lock_holder(&lock);
                return Err(Held { lock, pid }.into());
            }
            Err(error) => Self::open_damaged(&store, &aside, &error, &mut opened)?,
        };
        let log = log.without_unreadable(&store, &aside, &mut opened)?;
        let log = log.begin_run()?;
        if opened.lost > 0 {
            metrics::counter!("iot_relay_set_aside_total").increment(opened.lost);
        }
        opened.messages = log.kept();
        opened.backlog = log.backlog();
        Ok((log, opened))
    }

    /// A store fjall cannot open: without its journals if that opens (their intact
    /// batches written again), else a new one.
    fn open_damaged(
        store: &Path,
        aside: &Path,
        error: &anyhow::Error,
        opened: &mut Opened,
    ) -> anyhow::Result<Self> {
        let why = format!("{error:#}");
        let journals = salvage::journal_files(store).unwrap_or_default();
        if !journals.is_empty() {
            let mut moved = Vec::new();
            for journal in &journals {
                moved.push(move_into(journal, aside)?);
            }
            if let Ok(log) = Self::open_store(store) {
                log.replay(&moved, aside, &why, opened)?;
                return Ok(log);
            }
        }
        move_into(store, aside)?;
        opened.set_aside = Some((aside.to_path_buf(), why));
        Self::open_store(store)
    }

    /// Writes again what the moved journals' intact batches hold (what is in the
    /// tables already is written again unchanged), and counts the messages of their
    /// damaged batches that the tables do not have.
    fn replay(
        &self,
        journals: &[PathBuf],
        aside: &Path,
        why: &str,
        opened: &mut Opened,
    ) -> anyhow::Result<()> {
        let keyspaces = [&self.messages, &self.readings, &self.ages, &self.meta];
        let (mut written, mut damaged, mut unparsed) = (0, Vec::new(), 0);
        for journal in journals {
            let read = salvage::read_journal(journal, true)?;
            let mut batch = self.db.batch();
            for (id, key, value) in read.items {
                let Some(keyspace) = keyspaces.iter().find(|keyspace| keyspace.id() == id) else {
                    continue;
                };
                match value {
                    Some(value) => batch.insert(keyspace, key, value),
                    None => batch.remove(keyspace, key),
                }
                written += 1;
            }
            batch.commit().context("cannot write to the log")?;
            damaged.extend(read.damaged);
            unparsed += read.unparsed;
        }
        self.sync()?;
        self.load_positions()?;
        let forwarded = self.forwarded();
        let (mut lost, mut unforwarded, mut end) = (0, 0, self.next());
        for (id, key, value) in damaged {
            if id != self.messages.id() || value.is_none() {
                continue;
            }
            let Some(number) = number_of(&key).filter(|_| key.len() == 8) else {
                continue;
            };
            if !self.messages.contains_key(&key).unwrap_or(false) {
                lost += 1;
                unforwarded += u64::from(number >= forwarded);
                // A number near the log's end (a damaged key may read as any number).
                if number < self.next().saturating_add(1 << 20) {
                    end = end.max(number + 1);
                }
            }
        }
        // The damaged byte may fall in an item's own keyspace id or key, which then
        // names no message: the unforwarded messages lost are the numbers missing
        // between the forwarded mark and the last message the journal named.
        let present = self
            .messages
            .range(forwarded.to_be_bytes()..end.to_be_bytes())
            .filter_map(|guard| guard.key().ok())
            .count() as u64;
        let missing = end.saturating_sub(forwarded.max(1)).saturating_sub(present);
        lost += missing.saturating_sub(unforwarded);
        unforwarded = unforwarded.max(missing);
        opened.lost += unforwarded;
        opened.damage.push(format!(
            "the log's journal could not be read ({why}): moved aside to {}; the log opened from its tables and {written} writes of the journal's intact batches, {lost} messages lost with its damaged batches ({unforwarded} of them not forwarded yet){}",
            aside.display(),
            if unparsed > 0 {
                format!(", and {unparsed} bytes of it could not be parsed (what they held is not counted)")
            } else if why.contains("recovery failed") {
                // The store's own recovery stopped on a part this reading took for a
                // torn end: what lay past it is not counted.
                ", and its end could not be parsed (what it held is not counted)".to_string()
            } else {
                String::new()
            }
        ));
        Ok(())
    }

    /// The same log without its unreadable blocks: when the tables have any, what is
    /// readable is copied into a new store and the damaged one moved aside.
    fn without_unreadable(
        self,
        store: &Path,
        aside: &Path,
        opened: &mut Opened,
    ) -> anyhow::Result<Self> {
        let damaged = self
            .unreadable
            .lock()
            .map(|ranges| ranges.clone())
            .unwrap_or_default();
        let index_damaged = self.readings.iter().any(|guard| guard.key().is_err());
        if damaged.is_empty() && !index_damaged {
            return Ok(self);
        }
        let forwarded = self.forwarded();
        let (mut lost, mut unforwarded) = (0, 0);
        for &(from, to) in &damaged {
            lost += to - from;
            unforwarded += to.saturating_sub(from.max(forwarded));
        }
        let rebuilt = store.with_file_name("store.rebuilt");
        if rebuilt.exists() {
            std::fs::remove_dir_all(&rebuilt)
                .with_context(|| format!("cannot remove {}", rebuilt.display()))?;
        }
        let copied = {
            let fresh = Self::open_store(&rebuilt)?;
            let copied = self.copy_into(&fresh, &damaged)?;
            fresh.sync()?;
            copied
        };
        drop(self);
        let moved = move_into(store, aside)?;
        std::fs::rename(&rebuilt, store)
            .with_context(|| format!("cannot move {} to {}", rebuilt.display(), store.display()))?;
        let log = Self::open_store(store)?;
        let ranges: Vec<String> = damaged
            .iter()
            .map(|(from, to)| format!("{from}..{}", to - 1))
            .collect();
        opened.lost += unforwarded;
        opened.damage.push(format!(
            "the log's tables have unreadable blocks (messages {}{}): the {copied} readable messages copied into a new store, the damaged one moved aside to {}; {lost} messages lost ({unforwarded} of them not forwarded yet)",
            if ranges.is_empty() { "none".to_string() } else { ranges.join(", ") },
            if index_damaged { "; the readings index too, made again" } else { "" },
            moved.display()
        ));
        Ok(log)
    }

    /// Copies every readable message into `fresh`, with its index entry, the
    /// forwarded mark and the log's id; returns how many.
    fn copy_into(&self, fresh: &Self, damaged: &[(u64, u64)]) -> anyhow::Result<u64> {
        let mut copied = 0;
        let mut batch = fresh.db.batch();
        let mut bytes = 0;
        for (number, entry) in self.readable(damaged) {
            let value = entry.encode();
            bytes += value.len();
            batch.insert(&fresh.messages, number.to_be_bytes(), value);
            let age = age_value(&entry, number);
            if let (_, index @ [_, ..]) = read_age(&age) {
                batch.insert(&fresh.readings, index, []);
            }
            batch.insert(&fresh.ages, number.to_be_bytes(), age);
            copied += 1;
            if bytes > 4 << 20 {
                batch.commit().context("cannot write the new log")?;
                batch = fresh.db.batch();
                bytes = 0;
            }
        }
        batch.insert(&fresh.meta, FORWARDED, self.forwarded().to_be_bytes());
        batch.insert(&fresh.meta, FIRST, self.first().to_be_bytes());
        // The same messages under the same numbers: the same log, as the cloud knows it.
        batch.insert(&fresh.meta, ID, self.id().as_bytes());
        // The runs, and the edge packet ids as known, whole or not (a fresh store says
        // whole).
        for guard in self.meta.prefix(RUN).chain(self.meta.prefix(EDGE_PKID)) {
            if let Ok((key, value)) = guard.into_inner() {
                batch.insert(&fresh.meta, key, value);
            }
        }
        for key in [EDGE_SESSION, EDGE_LAST] {
            match self.meta.get(key) {
                Ok(Some(value)) => batch.insert(&fresh.meta, key, value),
                _ => batch.remove(&fresh.meta, key),
            }
        }
        if !matches!(self.meta.get(EDGE_PKIDS), Ok(Some(_))) {
            batch.remove(&fresh.meta, EDGE_PKIDS);
        }
        batch.commit().context("cannot write the new log")?;
        Ok(copied)
    }

    /// Every readable message, in order, around the `damaged` ranges.
    fn readable<'a>(
        &'a self,
        damaged: &'a [(u64, u64)],
    ) -> impl Iterator<Item = (u64, Entry)> + 'a {
        let mut at = self.first();
        let mut pending: std::vec::IntoIter<(u64, Entry)> = Vec::new().into_iter();
        std::iter::from_fn(move || loop {
            if let Some(next) = pending.next() {
                return Some(next);
            }
            if at == u64::MAX {
                return None;
            }
            let read = self.read_run(at, 1024, damaged);
            let &(last, _) = read.last()?;
            at = last.saturating_add(1);
            pending = read.into_iter();
        })
    }

    /// Up to `limit` readable messages from `from` on, skipping the `damaged` ranges.
    fn read_run(&self, mut from: u64, limit: usize, damaged: &[(u64, u64)]) -> Vec<(u64, Entry)> {
        let mut read = Vec::new();
        'runs: while read.len() < limit {
            if let Some(&(_, to)) = damaged
                .iter()
                .find(|(start, to)| (*start..*to).contains(&from))
            {
                from = to;
            }
            let stop = damaged
                .iter()
                .map(|(start, _)| *start)
                .filter(|start| *start > from)
                .min()
                .unwrap_or(u64::MAX);
            for guard in self.messages.range(from.to_be_bytes()..stop.to_be_bytes()) {
                let Ok((key, value)) = guard.into_inner() else {
                    break 'runs;
                };
                let (Some(number), Some(entry)) = (number_of(&key), Entry::decode(&value)) else {
                    continue;
                };
                read.push((number, entry));
                if read.len() >= limit {
                    break 'runs;
                }
            }
            if stop == u64::MAX {
                break;
            }
            from = stop;
        }
        read
    }

    /// [`Self::open_store`], with a panic of the store's own recovery (fjall asserts on
    /// some damaged journals rather than returning an error) taken as damage like any
    /// error, so that the journals are set aside and the tables opened without them.
    fn open_store_guarded(store: &Path) -> anyhow::Result<Self> {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| Self::open_store(store)))
            .unwrap_or_else(|panic| {
                let why = panic
                    .downcast_ref::<String>()
                    .map(String::as_str)
                    .or_else(|| panic.downcast_ref::<&str>().copied())
                    .unwrap_or("no message");
                // On one line, as the relay's log says the rest (an assertion's message
                // spans three).
                let why = why.split_whitespace().collect::<Vec<_>>().join(" ");
                Err(anyhow::anyhow!(
                    "the store's recovery failed on damaged files ({why})"
                ))
            })
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
        let log = Self {
            messages: keyspace("messages", 16 << 20)?,
            readings: keyspace("readings", 8 << 20)?,
            ages: keyspace("ages", 1 << 20)?,
            meta: keyspace("meta", 1 << 20)?,
            db,
            next: Arc::new(AtomicU64::new(1)),
            forwarded: Arc::new(AtomicU64::new(0)),
            saved_forwarded: Arc::new(AtomicU64::new(0)),
            released: Arc::new(AtomicU64::new(0)),
            first: Arc::new(AtomicU64::new(1)),
            unreadable: Arc::default(),
            store: Arc::new(store.to_path_buf()),
            id: Arc::from(""),
            runs: Arc::default(),
            edge_session: Arc::default(),
        };
        let (id, made) = log.load_id()?;
        let log = Self {
            id: id.into(),
            ..log
        };
        log.load_positions()?;
        // A relay before ids left its forwarded mark in `meta`: that is no loss.
        if made && !log.is_new() && log.meta.get(FORWARDED)?.is_none() {
            // Its `meta` keyspace gone (deleted, or a damaged store rebuilt without it):
            // the forwarded mark with it. Sent again rather than taken for forwarded.
            tracing::error!(
                messages = log.kept(),
                "the log has messages but no id, forwarded mark or packet ids (its meta keyspace is gone): every message it holds is forwarded again from the first (keyed readings are refused as duplicates, readings without (device, boot, seq) are stored twice); a new id is made"
            );
        }
        let edge_session = log
            .meta
            .get(EDGE_SESSION)
            .context("cannot read the log's edge session")?
            .and_then(|value| number_of(&value))
            .unwrap_or(0);
        log.edge_session.store(edge_session, Ordering::Release);
        if log.is_new() && log.meta.get(EDGE_PKIDS)?.is_none() {
            // Nothing taken yet: the map is whole (it is empty).
            log.meta
                .insert(EDGE_PKIDS, [])
                .context("cannot write to the log")?;
        }
        // A log of a relay before the `ages` index gets it once; a damaged one is
        // copied into a new store first (`without_unreadable`), which writes it.
        let damaged = log
            .unreadable
            .lock()
            .map_or(true, |ranges| !ranges.is_empty());
        if !damaged && log.meta.get(AGES)?.is_none() {
            log.index_ages()?;
        }
        Ok(log)
    }

    /// The log's id from `meta`, made (random, 64 bits) and synced for a new log, or
    /// one of a relay before ids (then `true`): a message's number is unique only within
    /// one log, and a log moved aside starts again from 1.
    fn load_id(&self) -> anyhow::Result<(String, bool)> {
        let kept = self.meta.get(ID).context("cannot read the log's id")?;
        if let Some(id) = kept.and_then(|value| String::from_utf8(value.to_vec()).ok()) {
            return Ok((id, false));
        }
        let id = format!("{:016x}", rand::random::<u64>());
        self.meta
            .insert(ID, id.as_bytes())
            .context("cannot write to the log")?;
        // Before any message is sent under it: another id after a crash would make
        // copies the cloud cannot recognise.
        self.sync()?;
        Ok((id, true))
    }

    /// Reads the first and last message numbers and the forwarded mark, by a scan of
    /// the messages that notes the unreadable ranges on the way.
    fn load_positions(&self) -> anyhow::Result<()> {
        let forwarded = self
            .meta
            .get(FORWARDED)
            .context("cannot read the log's forwarded mark")?
            .and_then(|value| number_of(&value))
            .unwrap_or(0);
        // What lies below it is deleted (it may linger in a table straddling it).
        let kept_from = self
            .meta
            .get(FIRST)
            .context("cannot read the log's first number")?
            .and_then(|value| number_of(&value))
            .unwrap_or(0);
        let (mut first, mut last) = (None, None);
        let mut damaged = Vec::new();
        let mut at = kept_from;
        'scan: loop {
            for guard in self.messages.range(at.to_be_bytes()..) {
                match guard.key() {
                    Ok(key) => {
                        if let Some(number) = number_of(&key) {
                            first.get_or_insert(number);
                            last = Some(number);
                            at = number.saturating_add(1);
                        }
                    }
                    Err(_) => {
                        let resume = self.readable_after(at);
                        damaged.push((at, resume));
                        at = resume;
                        continue 'scan;
                    }
                }
            }
            break;
        }
        let end = damaged.last().map_or(0, |&(_, to)| to);
        let next = last
            .map_or(1, |last| last + 1)
            .max(end)
            .max(forwarded)
            .max(kept_from);
        let first = first
            .unwrap_or(next)
            .min(damaged.first().map_or(u64::MAX, |&(from, _)| from));
        self.next.store(next, Ordering::Release);
        self.forwarded.store(forwarded.min(next), Ordering::Release);
        self.saved_forwarded
            .store(forwarded.min(next), Ordering::Release);
        self.first.store(first, Ordering::Release);
        if let Ok(mut known) = self.unreadable.lock() {
            *known = damaged;
        }
        Ok(())
    }

    /// The first number after `from` from which the messages read again: the end of
    /// the damaged stretch that `from` falls in (reads fail from within it, and succeed
    /// from anywhere past it).
    fn readable_after(&self, from: u64) -> u64 {
        let reads = |number: u64| {
            self.messages
                .range(number.to_be_bytes()..)
                .next()
                .is_none_or(|guard| guard.key().is_ok())
        };
        // Galloping, then bisection: `low` fails, `high` reads.
        let (mut low, mut step) = (from, 1u64);
        let mut high = loop {
            let probe = from.saturating_add(step);
            if probe == u64::MAX || reads(probe) {
                break probe;
            }
            low = probe;
            step = step.saturating_mul(2);
        };
        while high - low > 1 {
            let middle = low + (high - low) / 2;
            if reads(middle) {
                high = middle;
            } else {
                low = middle;
            }
        }
        high
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

    /// The disk the store's journals take (their blocks: a journal file is made 64 MiB
    /// long, with nothing in it).
    pub fn journal_bytes(&self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        salvage::journal_files(&self.store)
            .unwrap_or_default()
            .iter()
            .filter_map(|journal| std::fs::metadata(journal).ok())
            .map(|metadata| metadata.blocks() * 512)
            .sum()
    }

    /// Asks the store to flush every memtable when journals besides the current one are
    /// kept (a memtable with a write in an old journal keeps it), so that they go.
    pub fn flush_sealed_journals(&self) -> anyhow::Result<()> {
        if self.db.journal_count() > 1 {
            for keyspace in [&self.messages, &self.readings, &self.ages, &self.meta] {
                keyspace.rotate_memtable().context("cannot flush the log")?;
            }
        }
        Ok(())
    }

    /// Waits until the journals take less than [`JOURNAL_GATE`], asking the store to
    /// flush every memtable meanwhile (a memtable with a write in an old journal keeps it),
    /// for [`JOURNAL_PATIENCE`] at most. Returns how long it waited.
    pub fn wait_for_journals(&self) -> anyhow::Result<std::time::Duration> {
        let started = std::time::Instant::now();
        let mut asked: Option<std::time::Instant> = None;
        while self.journal_bytes() >= JOURNAL_GATE && started.elapsed() < JOURNAL_PATIENCE {
            if asked.is_none_or(|at| at.elapsed() > std::time::Duration::from_secs(1)) {
                for keyspace in [&self.messages, &self.readings, &self.ages, &self.meta] {
                    keyspace.rotate_memtable().context("cannot flush the log")?;
                }
                asked = Some(std::time::Instant::now());
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        Ok(started.elapsed())
    }

    /// Writes `batch` and syncs it to disk: when this returns `Ok`, every message of it
    /// survives a crash or a power cut. Called by one task at a time.
    pub fn append(&self, batch: &[Entry]) -> anyhow::Result<()> {
        let first = self.next.load(Ordering::Acquire);
        let mut write = self.db.batch().durability(Some(PersistMode::SyncData));
        let mut last = None;
        for (number, entry) in (first..).zip(batch) {
            write.insert(&self.messages, number.to_be_bytes(), entry.encode());
            let age = age_value(entry, number);
            if let (_, index @ [_, ..]) = read_age(&age) {
                write.insert(&self.readings, index, []);
            }
            write.insert(&self.ages, number.to_be_bytes(), age);
            if entry.edge_pkid != 0 && entry.qos != QoS::AtMostOnce {
                let mark = self.edge_mark(fingerprint(entry.topic.as_bytes(), &entry.payload));
                write.insert(&self.meta, edge_pkid_key(entry.edge_pkid), mark);
                last = Some(entry.edge_pkid);
            }
        }
        if let Some(pkid) = last {
            write.insert(&self.meta, EDGE_LAST, self.edge_last(pkid));
        }
        write.commit().context("cannot write to the log")?;
        self.next
            .store(first + batch.len() as u64, Ordering::Release);
        Ok(())
    }

    /// The `edge-pkid/` value of a message of `fingerprint` taken now.
    fn edge_mark(&self, fingerprint: u64) -> [u8; 16] {
        let mut mark = [0; 16];
        mark[..8].copy_from_slice(&self.edge_session.load(Ordering::Acquire).to_be_bytes());
        mark[8..].copy_from_slice(&fingerprint.to_be_bytes());
        mark
    }

    /// The `edge-last` value of packet id `pkid` taken now.
    fn edge_last(&self, pkid: u16) -> [u8; 10] {
        let mut last = [0; 10];
        last[..8].copy_from_slice(&self.edge_session.load(Ordering::Acquire).to_be_bytes());
        last[8..].copy_from_slice(&pkid.to_be_bytes());
        last
    }

    /// The last message taken under each of the edge broker's packet ids in its current
    /// session, `(packet id, fingerprint)`, and the packet id of the last one taken:
    /// what a copy the broker sends again (the same packet id, not acknowledged before
    /// a crash) may be a copy of. MQTT gives a packet id to another message only once
    /// the one before is acknowledged, so the last message under a packet id is the
    /// only one its copies can be of, however many were taken since. `None` when the
    /// log does not know them all (a log of a relay before this map, or one whose map
    /// cannot be read, a damaged block say): see [`Log::save_edge_pkids`].
    pub fn edge_pkids(&self) -> Option<EdgePkids> {
        self.meta.get(EDGE_PKIDS).ok()??;
        let session = self.edge_session.load(Ordering::Acquire);
        let last = self.meta.get(EDGE_LAST).ok()?.and_then(|value| {
            let (of, pkid) = value.split_first_chunk::<8>()?;
            let pkid = u16::from_be_bytes(*pkid.first_chunk::<2>()?);
            (u64::from_be_bytes(*of) == session).then_some(pkid)
        });
        let mut known = Vec::new();
        for guard in self.meta.prefix(EDGE_PKID) {
            let Ok((key, value)) = guard.into_inner() else {
                return None;
            };
            let (Some(pkid), Some((of, print))) = (
                key.get(EDGE_PKID.len()..)
                    .and_then(|id| id.try_into().ok())
                    .map(u16::from_be_bytes),
                value.split_first_chunk::<8>(),
            ) else {
                continue;
            };
            if u64::from_be_bytes(*of) == session {
                if let Some(print) = print.first_chunk::<8>() {
                    known.push((pkid, u64::from_be_bytes(*print)));
                }
            }
        }
        Some(EdgePkids { last, known })
    }

    /// Makes the map of [`Log::edge_pkids`] whole from what a relay before it knew (its
    /// last messages): `pkids` written, and the map said whole.
    pub fn save_edge_pkids(&self, pkids: &EdgePkids) -> anyhow::Result<()> {
        let mut write = self.db.batch().durability(Some(PersistMode::SyncData));
        for &(pkid, print) in &pkids.known {
            write.insert(&self.meta, edge_pkid_key(pkid), self.edge_mark(print));
        }
        if let Some(pkid) = pkids.last {
            write.insert(&self.meta, EDGE_LAST, self.edge_last(pkid));
        }
        write.insert(&self.meta, EDGE_PKIDS, []);
        write.commit().context("cannot write to the log")
    }

    /// The edge broker has lost the relay's session (its packet ids start again): the
    /// packet ids of what the log took name nothing any more. Synced before it returns,
    /// as a relay started again must not take the new session's messages for copies.
    pub fn new_edge_session(&self) -> anyhow::Result<()> {
        let session = self.edge_session.fetch_add(1, Ordering::AcqRel) + 1;
        let mut write = self.db.batch().durability(Some(PersistMode::SyncData));
        write.insert(&self.meta, EDGE_SESSION, session.to_be_bytes());
        write.commit().context("cannot write to the log")
    }

    /// The log's own id, made when the log was: with a message's number, it names the
    /// message beyond this log's life (a log moved aside starts its numbers again).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Starts this run of the relay: an id made at random for the messages it writes
    /// from the next number on, synced before any is. A message's run and number name
    /// it for the cloud ([`Log::run_of`]) however the log's numbers go back: a log
    /// restored from a copy, a virtual machine cloned with its log, a torn end cut off
    /// all give numbers again, each time under a new run.
    fn begin_run(self) -> anyhow::Result<Self> {
        let next = self.next();
        let id = format!("{:016x}", rand::random::<u64>());
        let mut key = RUN.to_vec();
        key.extend_from_slice(&next.to_be_bytes());
        let mut write = self.db.batch().durability(Some(PersistMode::SyncData));
        write.insert(&self.meta, key, id.as_bytes());
        write.commit().context("cannot write to the log")?;
        let mut runs = Vec::new();
        for guard in self.meta.prefix(RUN) {
            let (key, value) = guard.into_inner().context("cannot read the log's runs")?;
            let (Some(from), Ok(id)) = (
                number_of(&key[RUN.len()..]),
                String::from_utf8(value.to_vec()),
            ) else {
                continue;
            };
            runs.push((from, Arc::from(id)));
        }
        Ok(Self {
            runs: Arc::new(runs),
            ..self
        })
    }

    /// The id of the run that wrote message `number`: with the number, what names the
    /// message in the cloud (its `Nats-Msg-Id`). A message of a relay before runs gets
    /// the log's id, as it had then.
    pub fn run_of(&self, number: u64) -> &str {
        let at = self.runs.partition_point(|(from, _)| *from <= number);
        match at.checked_sub(1).and_then(|at| self.runs.get(at)) {
            Some((_, id)) => id,
            None => &self.id,
        }
    }

    /// The next sequence number to be given: every message below it is on disk.
    pub fn next(&self) -> u64 {
        self.next.load(Ordering::Acquire)
    }

    /// Whether no message was ever written to this log (created now, or started again
    /// after the damaged one was moved aside): its numbers start from 1 again.
    pub fn is_new(&self) -> bool {
        self.next() <= 1 && self.forwarded() <= 1
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
    /// of them (but always one). A stretch that cannot be read (a block damaged since
    /// the start) is skipped, said and counted once.
    pub fn read_from(
        &self,
        from: u64,
        limit: usize,
        bytes: usize,
    ) -> anyhow::Result<Vec<(u64, Entry)>> {
        let mut read = Vec::with_capacity(limit.min(1024));
        let mut taken = 0;
        // Below the first kept number lies what was deleted.
        let mut at = from.max(self.first());
        'runs: loop {
            let known = self
                .unreadable
                .lock()
                .map(|ranges| ranges.clone())
                .unwrap_or_default();
            if let Some(&(_, to)) = known.iter().find(|(start, to)| (*start..*to).contains(&at)) {
                at = to;
            }
            let mut seen = 0;
            for guard in self.messages.range(at.to_be_bytes()..).take(limit) {
                if taken >= bytes && !read.is_empty() {
                    break 'runs;
                }
                let (key, value) = match guard.into_inner() {
                    Ok(read) => read,
                    Err(error) if seen == 0 => {
                        // Nothing before it: past the damage, and on.
                        at = self.skip_unreadable(at, &error);
                        continue 'runs;
                    }
                    // What was read first; the damage at the next call.
                    Err(_) => break 'runs,
                };
                seen += 1;
                taken += value.len();
                let Some(number) = number_of(&key) else {
                    continue;
                };
                match Entry::decode(&value) {
                    Some(entry) => read.push((number, entry)),
                    None => {
                        tracing::error!(
                            number,
                            "message {number} of the log is unreadable; skipped"
                        );
                        metrics::counter!("iot_relay_unreadable_total").increment(1);
                    }
                }
            }
            break;
        }
        Ok(read)
    }

    /// Notes the damaged stretch from `from` on, so that reads go past it.
    fn skip_unreadable(&self, from: u64, error: &fjall::Error) -> u64 {
        let to = self.readable_after(from);
        let unforwarded = to.saturating_sub(from.max(self.forwarded()));
        tracing::error!(
            from,
            to = to - 1,
            unforwarded,
            "messages {from} to {} of the log cannot be read ({error}): skipped, {unforwarded} of them not forwarded yet; the next start moves them aside",
            to - 1
        );
        metrics::counter!("iot_relay_unreadable_total").increment(to - from);
        if let Ok(mut known) = self.unreadable.lock() {
            known.push((from, to));
        }
        to
    }

    /// The message `number`, if kept.
    pub fn get(&self, number: u64) -> anyhow::Result<Option<Entry>> {
        let value = self
            .messages
            .get(number.to_be_bytes())
            .context("cannot read the log")?;
        Ok(value.and_then(|value| Entry::decode(&value)))
    }

    /// Records on disk that the cloud broker received everything below `below`: written
    /// and synced before [`Log::forwarded`] says so, so that the forwarder releases, and
    /// the keeper deletes, only what a mark on disk covers. Called by one task at a time.
    /// A few bytes of journal: on a file system without them the store fails like at any
    /// write, and the relay opens it again ([`crate::run`]).
    pub fn mark_forwarded(&self, below: u64) -> anyhow::Result<()> {
        if below <= self.forwarded() {
            return Ok(());
        }
        self.meta
            .insert(FORWARDED, below.to_be_bytes())
            .context("cannot write to the log")?;
        self.db
            .persist(PersistMode::SyncData)
            .context("cannot sync the log")?;
        self.saved_forwarded.fetch_max(below, Ordering::AcqRel);
        self.forwarded.fetch_max(below, Ordering::AcqRel);
        Ok(())
    }

    /// Records in memory that the cloud acknowledged everything below `below`;
    /// [`Log::sync`] writes it. For a cloud that knows a message sent again by its id
    /// (the NATS stream's duplicate window), where a mark a second old costs nothing
    /// twice and a sync per acknowledgement would cost a sync per message.
    pub fn note_forwarded(&self, below: u64) {
        self.forwarded.fetch_max(below, Ordering::AcqRel);
    }

    /// Syncs what was written without a sync of its own (deletions), and the forwarded
    /// mark should it be ahead of the one on disk (a log opened with a mark in memory).
    pub fn sync(&self) -> anyhow::Result<()> {
        let forwarded = self.forwarded();
        if forwarded > self.saved_forwarded.load(Ordering::Acquire) {
            self.meta
                .insert(FORWARDED, forwarded.to_be_bytes())
                .context("cannot write to the log")?;
        }
        self.db
            .persist(PersistMode::SyncData)
            .context("cannot sync the log")?;
        self.saved_forwarded.fetch_max(forwarded, Ordering::AcqRel);
        Ok(())
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
    /// made that long at once, and what it holds is in the memory counted before), or as
    /// they are when past it (by up to a batch: [`JOURNAL_GATE`]).
    pub fn budget_bytes(&self) -> u64 {
        let journals = JOURNAL_RESERVE.max(self.journal_bytes());
        self.table_bytes() + self.db.write_buffer_size() + journals
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
            if !index.is_empty() {
                write.remove(&self.readings, index);
            }
            deleted += 1;
            new_first = number + 1;
        }
        if deleted > 0 {
            write.insert(&self.meta, FIRST, new_first.to_be_bytes());
            write.commit().context("cannot delete from the log")?;
            self.first.store(new_first, Ordering::Release);
        }
        Ok(deleted)
    }

    /// Gives the disk back what was deleted: drops the tables of messages and ages that
    /// lie wholly below the first kept number, as files, without rewriting anything (a
    /// compaction would need room for the kept tables a second time). Only when the first
    /// kept number moved since, unless `again` (a table being compacted then is left).
    pub fn release(&self, again: bool) -> anyhow::Result<()> {
        let first = self.first();
        if !again && self.released.load(Ordering::Acquire) == first {
            return Ok(());
        }
        let below = first.to_be_bytes();
        let tables = |log: &Self| log.messages.table_count() + log.ages.table_count();
        let before = tables(self);
        for keyspace in [&self.messages, &self.ages] {
            keyspace
                .tree
                .drop_range(..below)
                .context("cannot drop the log's deleted tables")?;
        }
        self.released.store(first, Ordering::Release);
        if tables(self) < before {
            // The dropped tables' files go with the store's old versions, which it lets
            // go when a memtable is rotated: on a relay holding the edge back nothing
            // else rotates one (seen: 100 MiB of dropped tables kept on a full file
            // system). `meta` has the first kept number in its memtable, a few bytes.
            self.meta
                .rotate_memtable()
                .context("cannot flush the log")?;
        }
        Ok(())
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

/// Bytes free for an unprivileged writer on the file system of `dir` (what `df` shows
/// as available).
pub fn free_bytes(dir: &Path) -> anyhow::Result<u64> {
    let stat = rustix::fs::statvfs(dir)
        .with_context(|| format!("cannot measure the file system of {}", dir.display()))?;
    Ok(stat.f_bavail.saturating_mul(stat.f_frsize))
}

/// Whether `error` is the store's: a write or sync it failed (the file system full, an
/// I/O error), or a store stopped by such a failure before (fjall refuses every write
/// after one: "poisoned"). The relay opens the log again rather than exiting: what was
/// not written was not acknowledged, and the edge broker sends it again.
pub fn is_store_failure(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        if let Some(error) = cause.downcast_ref::<fjall::Error>() {
            return !matches!(error, fjall::Error::Locked);
        }
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|error| error.kind() == std::io::ErrorKind::StorageFull)
    })
}

/// Milliseconds since 1970, now.
pub fn now_ms() -> i64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(now.as_millis()).unwrap_or(i64::MAX)
}

mod salvage;
#[cfg(test)]
mod tests;
