//! Repairs gaps in what devices sent (the replay protocol of `iot_core::replay`).
//!
//! Every `(device, boot)` whose readings carry a `seq` is followed as ranges of
//! numbers seen. A boot counts from 1, so what is missing before the first reading
//! heard is a hole too, unless readings before it were stored when this run began
//! (an earlier run's, whose holes were its own to ask for). A hole that lasts `--repair-after` is checked against the database
//! (another replica may have stored it), and what is missing there is asked of the
//! device on `/replay/<device>/request`, again with backoff while it stays missing,
//! a bounded number of requests per second. Asks are recorded in the `repairs`
//! collection, one document per series and `--repair-after` window, whose `_id` lets
//! only one replica ask in each window; the others leave out what was asked within
//! `--repair-after` (it may still be on its way). Ranges a device answers it no
//! longer has (`/replay/<device>/gone`) are recorded there as lost and not asked for
//! again, but only where they were asked of that device's boot: an answer for
//! anything else is not believed.
//!
//! Everything a device controls here is bounded, so one account cannot starve the
//! others: the queue in front of the repairer ([`SEEN_QUEUE`], what does not fit is
//! dropped and counted), series followed ([`MAX_SERIES`] in all, [`MAX_SERIES_PER_DEVICE`]
//! each, the least recently heard let go first), `seq` ranges per series
//! ([`MAX_RANGES`], the oldest holes given up first) and in all ([`MAX_TOTAL_RANGES`]),
//! new series checked against the
//! database in batched queries, and devices served in turn: each second at most one
//! series of each device is checked and asked for, starting after the device served
//! last, so one device's holes never hold up another's.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use bson::{doc, Document};
use futures_util::TryStreamExt;
use iot_core::replay::{Ranges, MAX_PER_REQUEST};
use iot_store::repairs::{self, GivenUp};
use iot_store::{describe, integer, READINGS, REPAIRS};
use mongodb::error::{ErrorKind, WriteFailure};
use mongodb::{Collection, Database};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::writer::DUPLICATE_KEY;

/// What the connection may queue for the repairer; more is dropped and counted.
pub const SEEN_QUEUE: usize = 10_000;
/// Series followed at once, all devices together.
pub const MAX_SERIES: usize = 10_000;
/// Series (boots) followed at once for one device.
pub const MAX_SERIES_PER_DEVICE: usize = 16;
/// Disjoint `seq` ranges kept per series (so at most one fewer holes): a persister
/// replica of a shared subscription sees every other reading of a stream, one range
/// each, until it looks its holes up in the database `--repair-after` later.
pub const MAX_RANGES: usize = 8192;
/// Ranges kept over all series: past it, the least recently heard series go.
pub const MAX_TOTAL_RANGES: usize = 1_000_000;
/// The most requests sent in one second, all devices together.
const REQUESTS_PER_SECOND: usize = 20;
/// The most series checked against the database in one second (one per device).
const CHECKS_PER_SECOND: usize = 50;
/// New series whose first stored `seq` is looked up in one query, once a second.
const FLOORS_PER_SECOND: usize = 200;
/// Requests for one hole before it is given up (and recorded as unanswered).
const MAX_ATTEMPTS: u32 = 8;
/// The longest wait between two requests for one hole.
const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// A series without holes that heard nothing for this long is forgotten (a boot that
/// ended); its readings are in the database.
const FORGET_AFTER: Duration = Duration::from_secs(600);

/// What the persister tells the repairer.
#[derive(Debug)]
pub enum Seen {
    /// A reading named by device, boot and seq arrived.
    Reading {
        device: String,
        boot: String,
        seq: u64,
    },
    /// The device says it no longer has these ranges.
    Gone { device: String, ranges: Ranges },
}

/// Hands `seen` to the repairer, or drops and counts it when its queue is full.
pub fn offer(queue: &mpsc::Sender<Seen>, seen: Seen) {
    if let Err(mpsc::error::TrySendError::Full(_)) = queue.try_send(seen) {
        dropped("events", 1);
    }
}

fn dropped(what: &'static str, count: u64) {
    metrics::counter!("iot_persister_repair_dropped_total", "what" => what).increment(count);
}

/// A request for the persister to publish.
#[derive(Debug)]
pub struct Request {
    pub device: String,
    pub ranges: Ranges,
}

/// A hole in a series and where its repair stands.
#[derive(Debug, Clone)]
struct Hole {
    to: u64,
    noticed: Instant,
    attempts: u32,
    next_try: Instant,
}

/// One `(device, boot)`: the `seq` ranges seen (sorted, disjoint, ends included) and
/// its holes by first `seq`.
#[derive(Debug, Default)]
struct Series {
    seen: Vec<(u64, u64)>,
    holes: BTreeMap<u64, Hole>,
    /// Whether the database was asked where the series stands below what this run
    /// heard (see [`Series::floor`]): until then its holes are not asked for.
    floored: bool,
    /// When a reading of it last arrived.
    last_seen: Option<Instant>,
}

impl Series {
    /// Adds `from..=to` to what is seen, merging it with the ranges it touches. Past
    /// [`MAX_RANGES`], the lowest hole is given up (counted): it is the oldest, the
    /// least likely to be still in the device's buffer.
    fn see(&mut self, from: u64, to: u64) {
        self.last_seen = Some(Instant::now());
        // The first range that ends at or after the one before `from`.
        let start = self
            .seen
            .partition_point(|&(_, end)| end.saturating_add(1) < from);
        let (mut low, mut high) = (from, to);
        let mut end = start;
        while let Some(&(next_from, next_to)) = self.seen.get(end) {
            if next_from > high.saturating_add(1) {
                break;
            }
            low = low.min(next_from);
            high = high.max(next_to);
            end += 1;
        }
        self.seen.splice(start..end, [(low, high)]);
        if self.seen.len() > MAX_RANGES {
            let (_, to) = self.seen.remove(1);
            self.seen[0].1 = to;
            dropped("ranges", 1);
        }
        if self.seen.first().is_some_and(|&(from, _)| from == 1) {
            // Nothing below the first reading: no need to look it up.
            self.floored = true;
        }
    }
    /// Sets aside what lies below the series' first stored reading, `first_stored`,
    /// when that reading is older than what this run heard: those before it are not
    /// this run's to repair (an earlier run, or another replica, stored them and asked
    /// for what they missed; a retention may have removed some since). When this run
    /// heard the first stored reading itself, nothing was stored before it: the boot
    /// started at 1, so `1..first` is a hole like any other (the device's first
    /// readings were published while nothing carried them).
    fn floor(&mut self, first_stored: u64) {
        let first_heard = self.seen.first().map(|&(from, _)| from);
        if first_stored > 1 && first_heard.is_some_and(|heard| first_stored < heard) {
            self.see(1, first_stored - 1);
        }
        self.floored = true;
    }
    /// The holes now: below the first range (from seq 1) and between ranges; a hole
    /// keeps its history while it stays, shrinks as readings arrive.
    fn update_holes(&mut self, now: Instant) {
        let mut holes = BTreeMap::new();
        let mut next = 1;
        for &(from, to) in &self.seen {
            if from > next {
                // The part of an older hole that remains keeps its history.
                let old = self
                    .holes
                    .range(..=from - 1)
                    .next_back()
                    .filter(|(_, hole)| hole.to >= next)
                    .map(|(_, hole)| hole.clone());
                let hole = match old {
                    Some(old) => Hole {
                        to: from - 1,
                        ..old
                    },
                    None => Hole {
                        to: from - 1,
                        noticed: now,
                        attempts: 0,
                        next_try: now,
                    },
                };
                holes.insert(next, hole);
            }
            next = to.saturating_add(1);
        }
        self.holes = holes;
    }
}

/// The series of one device, by boot.
#[derive(Debug, Default)]
struct Device {
    boots: HashMap<String, Series>,
}

/// A hole's span in one series that is due: from its oldest due hole to its last,
/// at most one request's worth.
#[derive(Debug)]
struct Due {
    device: String,
    boot: String,
    from: u64,
    to: u64,
}

/// Follows series and asks for what is missing; see the module documentation.
#[derive(Debug)]
pub struct Repairer {
    after: Duration,
    readings: Collection<Document>,
    repairs: Collection<Document>,
    client_id: String,
    devices: BTreeMap<String, Device>,
    /// Series followed, over all devices.
    series: usize,
    /// Ranges kept over all series, as of the last tick plus those added since.
    ranges: usize,
    /// The device served last: the next turn starts after it.
    cursor: Option<String>,
}

impl Repairer {
    pub fn new(db: &Database, after: Duration, client_id: String) -> Self {
        Self {
            after,
            readings: db.collection(READINGS),
            repairs: db.collection(REPAIRS),
            client_id,
            devices: BTreeMap::new(),
            series: 0,
            ranges: 0,
            cursor: None,
        }
    }

    /// Follows what `seen` says and sends requests to `requests` until `stop`.
    pub async fn run(
        mut self,
        mut seen: mpsc::Receiver<Seen>,
        requests: mpsc::UnboundedSender<Request>,
        stop: CancellationToken,
    ) {
        let mut ticks = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                event = seen.recv() => match event {
                    Some(Seen::Reading { device, boot, seq }) => self.see(device, boot, seq),
                    Some(Seen::Gone { device, ranges }) => {
                        if let Err(error) = self.record_lost(&device, &ranges).await {
                            tracing::warn!("cannot record lost readings of {device}: {}", describe(&error));
                        }
                    }
                    None => return,
                },
                _ = ticks.tick() => {
                    match self.tick().await {
                        Ok(asked) => {
                            for request in asked {
                                if requests.send(request).is_err() {
                                    return;
                                }
                            }
                        }
                        Err(error) => tracing::warn!("cannot check for gaps: {}", describe(&error)),
                    }
                }
            }
        }
    }

    /// A reading of `(device, boot)`; past [`MAX_TOTAL_RANGES`], the least recently
    /// heard series make room.
    fn see(&mut self, device: String, boot: String, seq: u64) {
        let series = self.series_mut(device, boot);
        let before = series.seen.len();
        series.see(seq, seq);
        let after = series.seen.len();
        self.ranges = (self.ranges + after).saturating_sub(before);
        if self.ranges > MAX_TOTAL_RANGES {
            self.let_go_of_oldest();
        }
    }

    fn count_ranges(&self) -> usize {
        self.devices
            .values()
            .flat_map(|device| device.boots.values())
            .map(|series| series.seen.len())
            .sum()
    }

    /// The series of `(device, boot)`, followed from now on if it was not: within the
    /// bounds, the device's (then everyone's) least recently heard series make room.
    fn series_mut(&mut self, device: String, boot: String) -> &mut Series {
        let known = self
            .devices
            .get(&device)
            .is_some_and(|known| known.boots.contains_key(&boot));
        if !known {
            if self.series >= MAX_SERIES {
                self.let_go_of_oldest();
            }
            let boots = &mut self.devices.entry(device.clone()).or_default().boots;
            if boots.len() >= MAX_SERIES_PER_DEVICE {
                let oldest = boots
                    .iter()
                    .min_by_key(|(_, series)| series.last_seen)
                    .map(|(boot, _)| boot.clone());
                if let Some(series) = oldest.and_then(|oldest| boots.remove(&oldest)) {
                    self.ranges = self.ranges.saturating_sub(series.seen.len());
                    self.series -= 1;
                    dropped("series", 1);
                }
            }
            self.series += 1;
            metrics::gauge!("iot_persister_repair_series").set(self.series as f64);
        }
        let boots = &mut self.devices.entry(device).or_default().boots;
        boots.entry(boot).or_default()
    }

    /// Lets go of the series heard from least recently until a tenth of each bound
    /// ([`MAX_SERIES`], [`MAX_TOTAL_RANGES`]) is free again: all at once, so that a flood
    /// of new series costs one sort per thousand, not one per series.
    fn let_go_of_oldest(&mut self) {
        let mut heard: Vec<(Option<Instant>, &String, &String, usize)> =
            self.devices
                .iter()
                .flat_map(|(device, known)| {
                    known.boots.iter().map(move |(boot, series)| {
                        (series.last_seen, device, boot, series.seen.len())
                    })
                })
                .collect();
        heard.sort_unstable_by_key(|(last_seen, ..)| *last_seen);
        let (mut series, mut ranges) = (heard.len(), heard.iter().map(|entry| entry.3).sum());
        let mut gone = Vec::new();
        for (_, device, boot, length) in heard {
            if series <= MAX_SERIES - MAX_SERIES / 10
                && ranges <= MAX_TOTAL_RANGES - MAX_TOTAL_RANGES / 10
            {
                break;
            }
            gone.push((device.clone(), boot.clone()));
            series -= 1;
            ranges -= length;
        }
        for (device, boot) in &gone {
            if let Some(known) = self.devices.get_mut(device) {
                known.boots.remove(boot);
            }
        }
        self.devices.retain(|_, device| !device.boots.is_empty());
        (self.series, self.ranges) = (series, ranges);
        dropped("series", gone.len() as u64);
    }

    /// Ranges the device says it no longer has, believed only where this device's boot
    /// was asked for them (by any replica): recorded as lost, never asked for again.
    /// The rest of the answer is not believed (another account's claim, or a range
    /// nobody asked for) and changes nothing.
    async fn record_lost(&mut self, device: &str, gone: &Ranges) -> anyhow::Result<()> {
        let Some((first, last)) = span(&gone.ranges) else {
            return Ok(());
        };
        let claimed = merge(gone.ranges.clone());
        let asked = self.asked(device, &gone.boot, first, last, None).await?;
        let lost = intersect(&claimed, &merge(asked));
        let (believed, claimed_count) = (numbers(&lost), numbers(&claimed));
        if believed < claimed_count {
            dropped("gone", claimed_count - believed);
            tracing::warn!(
                device,
                boot = gone.boot,
                ranges = ?claimed,
                "an answer of readings gone for ranges never asked of this device: not believed"
            );
        }
        for &(from, to) in &lost {
            if let Some(series) = self
                .devices
                .get_mut(device)
                .and_then(|known| known.boots.get_mut(&gone.boot))
            {
                series.see(from, to);
            }
            tracing::warn!(
                device,
                boot = gone.boot,
                from,
                to,
                "readings lost for good: the device no longer has them"
            );
            let document = repairs::given_up(
                GivenUp::Lost,
                device,
                &gone.boot,
                (from, to),
                bson::DateTime::now(),
            );
            insert_once(&self.repairs, document).await?;
        }
        Ok(())
    }

    /// Checks the holes that lasted, and returns the requests to send.
    async fn tick(&mut self) -> anyhow::Result<Vec<Request>> {
        let now = Instant::now();
        self.forget(now);
        self.floor().await?;
        let mut asked = Vec::new();
        for due in self.due(now) {
            if asked.len() == REQUESTS_PER_SECOND {
                break;
            }
            self.cursor = Some(due.device.clone());
            if let Some(request) = self.repair(due, now).await? {
                asked.push(request);
            }
        }
        Ok(asked)
    }

    /// Lets go of series without holes that heard nothing for [`FORGET_AFTER`].
    fn forget(&mut self, now: Instant) {
        let mut forgotten = 0;
        for device in self.devices.values_mut() {
            device.boots.retain(|_, series| {
                let keep = !series.holes.is_empty()
                    || series
                        .last_seen
                        .is_none_or(|last| now.duration_since(last) < FORGET_AFTER);
                forgotten += usize::from(!keep);
                keep
            });
        }
        self.devices.retain(|_, device| !device.boots.is_empty());
        self.series -= forgotten;
        self.ranges = self.count_ranges();
        metrics::gauge!("iot_persister_repair_series").set(self.series as f64);
    }

    /// The devices in turn, starting after the one served last.
    fn in_turn(&self) -> impl Iterator<Item = (&String, &Device)> {
        let served = |(device, _): &(&String, &Device)| {
            self.cursor.as_ref().is_some_and(|cursor| *device <= cursor)
        };
        let devices = self.devices.iter();
        devices
            .clone()
            .skip_while(served)
            .chain(devices.take_while(served))
    }

    /// Looks up, for new series that started above 1, their first stored reading, and
    /// sets aside what lies below it when an earlier run stored it ([`Series::floor`]):
    /// up to [`FLOORS_PER_SECOND`] series, one per device in turn, in one query. A
    /// series with nothing stored yet is looked up again next time.
    async fn floor(&mut self) -> anyhow::Result<()> {
        let wanted: Vec<(String, String)> = self
            .in_turn()
            .filter_map(|(device, known)| {
                let boot = known
                    .boots
                    .iter()
                    .find(|(_, series)| !series.floored)
                    .map(|(boot, _)| boot)?;
                Some((device.clone(), boot.clone()))
            })
            .take(FLOORS_PER_SECOND)
            .collect();
        if wanted.is_empty() {
            return Ok(());
        }
        for ((device, boot), first) in self.first_stored(&wanted).await? {
            if let Some(series) = self
                .devices
                .get_mut(&device)
                .and_then(|known| known.boots.get_mut(&boot))
            {
                series.floor(first);
            }
        }
        Ok(())
    }

    /// What is due now: one span per device in turn, of its series whose oldest due
    /// hole waits longest, at most [`CHECKS_PER_SECOND`].
    fn due(&mut self, now: Instant) -> Vec<Due> {
        let after = self.after;
        let is_due = |hole: &Hole| now >= hole.noticed + after && now >= hole.next_try;
        for device in self.devices.values_mut() {
            for series in device.boots.values_mut().filter(|series| series.floored) {
                series.update_holes(now);
            }
        }
        self.in_turn()
            .filter_map(|(device, known)| {
                known
                    .boots
                    .iter()
                    .filter(|(_, series)| series.floored)
                    .filter_map(|(boot, series)| {
                        let mut ready = series.holes.iter().filter(|(_, hole)| is_due(hole));
                        let (&from, first) = ready.next()?;
                        let last = ready.next_back().map_or(first.to, |(_, hole)| hole.to);
                        Some((first.noticed, boot, from, last))
                    })
                    .min_by_key(|(noticed, ..)| *noticed)
                    .map(|(_, boot, from, last)| Due {
                        device: device.clone(),
                        boot: boot.clone(),
                        from,
                        to: last.min(from + MAX_PER_REQUEST - 1),
                    })
            })
            .take(CHECKS_PER_SECOND)
            .collect()
    }

    /// Checks one due span against the database and returns the request for what is
    /// still missing there, if any is to be asked now.
    async fn repair(&mut self, due: Due, now: Instant) -> anyhow::Result<Option<Request>> {
        let Due {
            device,
            boot,
            from,
            to,
        } = due;
        let stored = self.stored(&device, &boot, from, to).await?;
        let after = self.after;
        let Some(series) = self
            .devices
            .get_mut(&device)
            .and_then(|known| known.boots.get_mut(&boot))
        else {
            return Ok(None);
        };
        for &seq in &stored {
            series.see(seq, seq);
        }
        // What is still missing (another replica may have stored the rest).
        series.update_holes(now);
        let (missing, given_up, attempt) = next_attempts(series, from, to, now, after);
        for &(from, to) in &given_up {
            tracing::warn!(
                device,
                boot,
                from,
                to,
                "no answer to {MAX_ATTEMPTS} replay requests: giving up on these readings"
            );
            let document = repairs::given_up(
                GivenUp::Unanswered,
                &device,
                &boot,
                (from, to),
                bson::DateTime::now(),
            );
            insert_once(&self.repairs, document).await?;
            series.see(from, to);
        }
        let Some((first, last)) = span(&missing) else {
            return Ok(None);
        };
        // What another replica asked for within --repair-after may still be on its
        // way (its replicas' shares of one stream overlap): not asked again now.
        let since = bson::DateTime::from_millis(
            bson::DateTime::now().timestamp_millis() - self.after.as_millis() as i64,
        );
        let recently = self.asked(&device, &boot, first, last, Some(since)).await?;
        let missing = subtract(&missing, &recently);
        let at = bson::DateTime::now();
        let attempt = i64::from(attempt);
        let window = self.window(at);
        let Some(document) = repairs::asked(
            &device,
            &boot,
            window,
            &missing,
            attempt,
            &self.client_id,
            at,
        ) else {
            return Ok(None);
        };
        // One request per series and --repair-after window, whichever replica's
        // record goes in first; the others find its ranges recently asked.
        if !insert_once(&self.repairs, document).await? {
            return Ok(None);
        }
        metrics::counter!("iot_persister_replay_requests_total").increment(1);
        tracing::info!(device, boot, ranges = ?missing, attempt, "asking the device for missing readings");
        Ok(Some(Request {
            device,
            ranges: Ranges {
                boot,
                ranges: missing,
            },
        }))
    }

    /// The `--repair-after` window a time falls in: the replicas' shared clock for "one
    /// request per series at a time".
    fn window(&self, at: bson::DateTime) -> i64 {
        at.timestamp_millis() / (self.after.as_millis() as i64).max(1)
    }

    /// The ranges of the series within `from..=to` asked for by any replica (since
    /// `since`, when given), sorted by start.
    async fn asked(
        &self,
        device: &str,
        boot: &str,
        from: u64,
        to: u64,
        since: Option<bson::DateTime>,
    ) -> anyhow::Result<Vec<(u64, u64)>> {
        let mut filter = doc! {
            "device": device, "boot": boot, "outcome": "asked",
            "from": { "$lte": to as i64 }, "to": { "$gte": from as i64 },
        };
        if let Some(since) = since {
            filter.insert("at", doc! { "$gte": since });
        }
        let documents: Vec<Document> = self
            .repairs
            .find(filter)
            .projection(doc! { "_id": 0, "ranges": 1 })
            .await?
            .try_collect()
            .await?;
        let mut ranges: Vec<(u64, u64)> = documents
            .iter()
            .filter_map(|document| document.get_array("ranges").ok())
            .flatten()
            .filter_map(|range| {
                let range = range.as_array()?;
                Some((seq_of(range.first())?, seq_of(range.get(1))?))
            })
            .collect();
        ranges.sort_unstable();
        Ok(ranges)
    }

    /// The lowest `seq` stored of each of `series` that has any, in one query.
    async fn first_stored(
        &self,
        series: &[(String, String)],
    ) -> anyhow::Result<Vec<((String, String), u64)>> {
        let any: Vec<Document> = series
            .iter()
            .map(|(device, boot)| doc! { "device": device, "boot": boot })
            .collect();
        let devices: Vec<&str> = series.iter().map(|(device, _)| device.as_str()).collect();
        // Grouped by one string, not by a document of two fields: nx-27017 (the
        // embedded server) keeps an `_id` document's field paths as literal text.
        let pipeline = [
            doc! { "$match": { "device": { "$in": devices }, "$or": any, "seq": { "$exists": true } } },
            doc! { "$group": {
                "_id": { "$concat": ["$device", "\u{0}", "$boot"] },
                "device": { "$first": "$device" },
                "boot": { "$first": "$boot" },
                "first": { "$min": "$seq" },
            } },
        ];
        let documents: Vec<Document> = self
            .readings
            .aggregate(pipeline)
            .await?
            .try_collect()
            .await?;
        Ok(documents
            .iter()
            .filter_map(|document| {
                let device = document.get_str("device").ok()?.to_string();
                let boot = document.get_str("boot").ok()?.to_string();
                Some(((device, boot), seq_of(document.get("first"))?))
            })
            .collect())
    }

    /// The `seq` numbers of the series stored in `from..=to`.
    async fn stored(
        &self,
        device: &str,
        boot: &str,
        from: u64,
        to: u64,
    ) -> anyhow::Result<Vec<u64>> {
        let filter = doc! { "device": device, "boot": boot, "seq": { "$gte": from as i64, "$lte": to as i64 } };
        let documents: Vec<Document> = self
            .readings
            .find(filter)
            .projection(doc! { "_id": 0, "seq": 1 })
            .await?
            .try_collect()
            .await?;
        Ok(documents
            .iter()
            .filter_map(|document| seq_of(document.get("seq")))
            .collect())
    }
}

/// A range of `seq` numbers, both ends included.
type Span = (u64, u64);

/// The due holes of `series` within `from..=to` take their next attempt: those still
/// to ask (the ranges, and the highest attempt among them) and those given up.
fn next_attempts(
    series: &mut Series,
    from: u64,
    to: u64,
    now: Instant,
    after: Duration,
) -> (Vec<Span>, Vec<Span>, u32) {
    let (mut missing, mut given_up, mut attempt) = (Vec::new(), Vec::new(), 0);
    for (&hole_from, hole) in series.holes.range_mut(from..=to) {
        if now < hole.noticed + after || now < hole.next_try {
            continue;
        }
        hole.attempts += 1;
        hole.next_try = now
            + after
                .saturating_mul(1 << hole.attempts.min(10))
                .min(MAX_BACKOFF);
        let range = (hole_from, hole.to.min(to));
        if hole.attempts > MAX_ATTEMPTS {
            given_up.push(range);
        } else {
            attempt = attempt.max(hole.attempts);
            missing.push(range);
        }
    }
    (missing, given_up, attempt)
}

/// A stored `seq` (or range end): an integer of either width, not negative.
fn seq_of(value: Option<&bson::Bson>) -> Option<u64> {
    u64::try_from(integer(value)?).ok()
}

/// The first and last `seq` of sorted ranges, when there are any.
fn span(ranges: &[(u64, u64)]) -> Option<(u64, u64)> {
    Some((ranges.first()?.0, ranges.last()?.1))
}

/// `ranges` (sorted, disjoint) without what `covered` (sorted by start) covers.
fn subtract(ranges: &[(u64, u64)], covered: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut left = Vec::new();
    for &(from, to) in ranges {
        let mut next = from;
        for &(cover_from, cover_to) in covered {
            if cover_to < next || cover_from > to {
                continue;
            }
            if cover_from > next {
                left.push((next, cover_from - 1));
            }
            next = cover_to.saturating_add(1);
            if next > to {
                break;
            }
        }
        if next <= to {
            left.push((next, to));
        }
    }
    left
}

/// How many `seq` numbers disjoint ranges hold.
fn numbers(ranges: &[Span]) -> u64 {
    ranges.iter().map(|(from, to)| to - from + 1).sum()
}

/// Ranges sorted by start, overlapping or touching ones merged.
fn merge(mut ranges: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    ranges.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
    for (from, to) in ranges {
        match merged.last_mut() {
            Some(last) if from <= last.1.saturating_add(1) => last.1 = last.1.max(to),
            _ => merged.push((from, to)),
        }
    }
    merged
}

/// What `ranges` and `within` (each sorted, disjoint) have in common.
fn intersect(ranges: &[(u64, u64)], within: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut common = Vec::new();
    for &(from, to) in ranges {
        for &(inner_from, inner_to) in within {
            let (low, high) = (from.max(inner_from), to.min(inner_to));
            if low <= high {
                common.push((low, high));
            }
        }
    }
    merge(common)
}

/// Inserts `document`; false when its `_id` was there already.
async fn insert_once(
    collection: &Collection<Document>,
    document: Document,
) -> anyhow::Result<bool> {
    match collection.insert_one(document).await {
        Ok(_) => Ok(true),
        Err(error) => match *error.kind {
            ErrorKind::Write(WriteFailure::WriteError(ref failure))
                if failure.code == DUPLICATE_KEY =>
            {
                Ok(false)
            }
            _ => Err(error.into()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seen_ranges_merge_and_holes_keep_their_history() {
        let mut series = Series::default();
        for seq in [1, 2, 3, 7, 8, 12] {
            series.see(seq, seq);
        }
        assert_eq!(series.seen, [(1, 3), (7, 8), (12, 12)]);
        let start = Instant::now();
        series.update_holes(start);
        let holes: Vec<(u64, u64)> = series
            .holes
            .iter()
            .map(|(from, hole)| (*from, hole.to))
            .collect();
        assert_eq!(holes, [(4, 6), (9, 11)]);
        series.holes.get_mut(&4).expect("hole").attempts = 2;
        series.see(4, 4);
        series.update_holes(start + Duration::from_secs(5));
        let hole = series.holes.get(&5).expect("what is left of the hole");
        assert_eq!((hole.to, hole.attempts, hole.noticed), (6, 2, start));
        series.see(5, 6);
        series.see(9, 11);
        series.update_holes(start);
        assert!(series.holes.is_empty());
        assert_eq!(series.seen, [(1, 12)]);
        // A range over several, and one inside another.
        series.see(20, 30);
        series.see(40, 50);
        series.see(25, 45);
        series.see(41, 42);
        assert_eq!(series.seen, [(1, 12), (20, 50)]);
        series.see(13, 19);
        assert_eq!(series.seen, [(1, 50)]);
    }

    #[test]
    fn ranges_asked_by_another_replica_are_taken_out() {
        let ranges = [(1, 10), (20, 30), (40, 40)];
        assert_eq!(subtract(&ranges, &[]), ranges);
        assert_eq!(
            subtract(&ranges, &[(0, 2), (5, 6), (9, 25), (40, 40)]),
            [(3, 4), (7, 8), (26, 30)]
        );
        // Overlapping covers, and one covering everything.
        assert_eq!(
            subtract(&ranges, &[(2, 5), (4, 8)]),
            [(1, 1), (9, 10), (20, 30), (40, 40)]
        );
        assert!(subtract(&ranges, &[(0, u64::MAX)]).is_empty());
    }

    /// A repairer whose database is never reached (the client connects lazily).
    fn repairer() -> Repairer {
        let options = mongodb::options::ClientOptions::builder()
            .hosts(vec![mongodb::options::ServerAddress::Tcp {
                host: "127.0.0.1".into(),
                port: Some(9),
            }])
            .build();
        let client = mongodb::Client::with_options(options).expect("a client");
        Repairer::new(
            &client.database("unused"),
            Duration::from_secs(10),
            "t".into(),
        )
    }

    #[tokio::test]
    async fn series_are_bounded_per_device_and_in_all() {
        let mut repairer = repairer();
        // One device with random boots keeps only its most recent ones.
        for boot in 0..1000 {
            repairer.see("hostile".into(), format!("b{boot}"), 5);
        }
        let boots = &repairer.devices["hostile"].boots;
        assert_eq!(boots.len(), MAX_SERIES_PER_DEVICE);
        assert!(boots.contains_key("b999") && !boots.contains_key("b0"));
        // Many devices: never more than MAX_SERIES, the honest one heard last kept.
        for device in 0..MAX_SERIES + 500 {
            repairer
                .series_mut(format!("d{device}"), "b".into())
                .see(1, 1);
        }
        repairer.see("honest".into(), "b".into(), 3);
        let total: usize = repairer.devices.values().map(|d| d.boots.len()).sum();
        assert_eq!(total, repairer.series);
        assert!(total <= MAX_SERIES, "{total}");
        assert!(repairer.devices.contains_key("honest"));
        // A series of holes every other seq keeps at most MAX_RANGES ranges, the
        // newest holes kept.
        let last = 2 * MAX_RANGES as u64 + 101;
        for seq in (1..=last).step_by(2) {
            repairer.see("gappy".into(), "b".into(), seq);
        }
        let series = &repairer.devices["gappy"].boots["b"];
        assert_eq!(series.seen.len(), MAX_RANGES);
        assert_eq!(series.seen.last(), Some(&(last, last)));
        assert!(series.floored, "seen from 1: nothing to look up");
        assert!(repairer.ranges <= MAX_TOTAL_RANGES);
        assert!(repairer.count_ranges() <= MAX_TOTAL_RANGES);
    }

    #[tokio::test]
    async fn ranges_are_bounded_over_all_series() {
        let mut repairer = repairer();
        // Devices each with a hole every other seq, up to their series' bound: past
        // the bound over all, the least recently heard series go.
        let devices = MAX_TOTAL_RANGES / MAX_RANGES + 2;
        for device in 0..devices {
            for seq in (1..=2 * MAX_RANGES as u64).step_by(2) {
                repairer.see(format!("d{device}"), "b".into(), seq);
            }
        }
        assert!(repairer.count_ranges() <= MAX_TOTAL_RANGES);
        assert!(repairer.devices.contains_key(&format!("d{}", devices - 1)));
        assert!(!repairer.devices.contains_key("d0"));
    }

    #[tokio::test]
    async fn devices_are_served_in_turn() {
        let mut repairer = repairer();
        for device in ["a", "b", "c"] {
            repairer.series_mut(device.into(), "b".into()).see(1, 1);
        }
        let order = |repairer: &Repairer| -> Vec<String> {
            repairer
                .in_turn()
                .map(|(device, _)| device.clone())
                .collect()
        };
        assert_eq!(order(&repairer), ["a", "b", "c"]);
        repairer.cursor = Some("a".into());
        assert_eq!(order(&repairer), ["b", "c", "a"]);
        repairer.cursor = Some("c".into());
        assert_eq!(order(&repairer), ["a", "b", "c"]);
        // A device served last that has since gone still leaves the rest in turn.
        repairer.cursor = Some("bb".into());
        assert_eq!(order(&repairer), ["c", "a", "b"]);
    }

    #[test]
    fn only_asked_ranges_are_believed_gone() {
        let asked = merge(vec![(10, 20), (15, 30), (40, 45)]);
        assert_eq!(asked, [(10, 30), (40, 45)]);
        assert_eq!(
            intersect(&[(1, 12), (25, 42), (50, 60)], &asked),
            [(10, 12), (25, 30), (40, 42)]
        );
        assert!(intersect(&[(6, 9)], &[]).is_empty());
    }

    fn holes(series: &Series) -> Vec<(u64, u64)> {
        series
            .holes
            .iter()
            .map(|(from, hole)| (*from, hole.to))
            .collect()
    }

    #[test]
    fn what_is_below_the_first_reading_heard_is_a_hole_unless_stored_before() {
        let now = Instant::now();
        // The boot's first readings were published while nothing carried them: the
        // first stored is the first this run heard, 1-4 are missing.
        let mut series = Series::default();
        series.see(5, 9);
        series.floor(5);
        series.update_holes(now);
        assert!(series.floored);
        assert_eq!(holes(&series), [(1, 4)]);
        // The same when the reading heard is not written yet but a later one is
        // (another replica's).
        let mut series = Series::default();
        series.see(5, 5);
        series.floor(7);
        series.update_holes(now);
        assert_eq!(holes(&series), [(1, 4)]);
        // A run that hears the boot from the middle: an earlier run stored it from 100
        // (what came before was its to ask for, or a retention removed it); what lies
        // between is checked against the database before it is asked for.
        let mut series = Series::default();
        series.see(500, 510);
        series.floor(100);
        series.update_holes(now);
        assert_eq!(holes(&series), [(100, 499)]);
        // Stored from 1 by an earlier run: nothing set aside, all checked.
        let mut series = Series::default();
        series.see(500, 510);
        series.floor(1);
        series.update_holes(now);
        assert_eq!(holes(&series), [(1, 499)]);
    }

    #[tokio::test]
    async fn a_hole_below_the_first_reading_is_due_like_any_other() {
        let mut repairer = repairer();
        for seq in 3..=20 {
            repairer.see("late".into(), "b".into(), seq);
        }
        // Nothing is due before the database said where the series stands.
        let now = Instant::now();
        assert!(repairer.due(now + Duration::from_secs(60)).is_empty());
        repairer
            .devices
            .get_mut("late")
            .expect("followed")
            .boots
            .get_mut("b")
            .expect("the boot")
            .floor(3);
        assert!(repairer.due(now).is_empty(), "not before --repair-after");
        let due = repairer.due(now + repairer.after);
        assert_eq!(due.len(), 1);
        assert_eq!((due[0].from, due[0].to), (1, 2));
    }

    #[test]
    fn a_series_that_starts_late_has_a_hole_from_one_until_floored() {
        let mut series = Series::default();
        series.see(5000, 5001);
        series.update_holes(Instant::now());
        assert_eq!(series.holes.keys().copied().collect::<Vec<_>>(), [1]);
    }
}
