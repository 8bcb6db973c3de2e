//! Repairs gaps in what devices sent (the replay protocol of `iot_core::replay`).
//!
//! Every `(device, boot)` whose readings carry a `seq` is followed as ranges of
//! numbers seen. A hole that lasts `--repair-after` is checked against the database
//! (another replica may have stored it), and what is missing there is asked of the
//! device on `/replay/<device>/request`, again with backoff while it stays missing,
//! a bounded number of requests per second. Asks are recorded in the `repairs`
//! collection, one document per series and `--repair-after` window, whose `_id` lets
//! only one replica ask in each window; the others leave out what was asked within
//! `--repair-after` (it may still be on its way). Ranges a device answers it no
//! longer has (`/replay/<device>/gone`) are recorded there as lost and not asked for
//! again.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use bson::{doc, Document};
use futures_util::TryStreamExt;
use iot_core::replay::{Ranges, MAX_PER_REQUEST};
use iot_store::{asked_record, describe, integer, READINGS, REPAIRS};
use mongodb::error::{ErrorKind, WriteFailure};
use mongodb::{Collection, Database};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::writer::DUPLICATE_KEY;

/// The most requests sent in one second, all devices together.
const REQUESTS_PER_SECOND: usize = 20;
/// The most holes checked against the database in one second.
const CHECKS_PER_SECOND: usize = 50;
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
    /// The device no longer has these ranges.
    Gone { device: String, ranges: Ranges },
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
    /// Whether what lies below the first stored reading was set aside: readings before
    /// it are not this run's to repair (an earlier run stored them, or a retention
    /// removed them).
    floored: bool,
    /// When a reading of it last arrived.
    last_seen: Option<Instant>,
}

impl Series {
    /// Adds `from..=to` to what is seen, merging it with the ranges it touches.
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

/// Follows series and asks for what is missing; see the module documentation.
#[derive(Debug)]
pub struct Repairer {
    after: Duration,
    readings: Collection<Document>,
    repairs: Collection<Document>,
    client_id: String,
    series: HashMap<(String, String), Series>,
}

impl Repairer {
    pub fn new(db: &Database, after: Duration, client_id: String) -> Self {
        Self {
            after,
            readings: db.collection(READINGS),
            repairs: db.collection(REPAIRS),
            client_id,
            series: HashMap::new(),
        }
    }

    /// Follows what `seen` says and sends requests to `requests` until `stop`.
    pub async fn run(
        mut self,
        mut seen: mpsc::UnboundedReceiver<Seen>,
        requests: mpsc::UnboundedSender<Request>,
        stop: CancellationToken,
    ) {
        let mut ticks = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                event = seen.recv() => match event {
                    Some(Seen::Reading { device, boot, seq }) => {
                        self.series.entry((device, boot)).or_default().see(seq, seq);
                    }
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

    /// Ranges the device no longer has: recorded as lost, never asked for again.
    async fn record_lost(&mut self, device: &str, gone: &Ranges) -> anyhow::Result<()> {
        let series = self
            .series
            .entry((device.to_string(), gone.boot.clone()))
            .or_default();
        for &(from, to) in &gone.ranges {
            series.see(from, to);
            tracing::warn!(
                device,
                boot = gone.boot,
                from,
                to,
                "readings lost for good: the device no longer has them"
            );
            let document = doc! {
                "_id": { "device": device, "boot": &gone.boot, "from": from as i64, "to": to as i64, "lost": true },
                "device": device, "boot": &gone.boot, "from": from as i64, "to": to as i64,
                "outcome": "lost", "at": bson::DateTime::now(),
            };
            insert_once(&self.repairs, document).await?;
        }
        Ok(())
    }

    /// Checks the holes that lasted, and returns the requests to send.
    async fn tick(&mut self) -> anyhow::Result<Vec<Request>> {
        let now = Instant::now();
        self.series.retain(|_, series| {
            !series.holes.is_empty()
                || series
                    .last_seen
                    .is_none_or(|last| now.duration_since(last) < FORGET_AFTER)
        });
        let unfloored: Vec<(String, String)> = self
            .series
            .iter()
            .filter(|(_, series)| !series.floored)
            .map(|(key, _)| key.clone())
            .collect();
        for key in unfloored {
            if let Some(first) = self.first_stored(&key.0, &key.1).await? {
                if let Some(series) = self.series.get_mut(&key) {
                    if first > 1 {
                        series.see(1, first - 1);
                    }
                    series.floored = true;
                }
            }
        }
        // One span per series: from its oldest hole due to the last one, at most one
        // request's worth, checked against the database in one query.
        let after = self.after;
        let is_due = move |hole: &Hole| now >= hole.noticed + after && now >= hole.next_try;
        let mut due = Vec::new();
        for ((device, boot), series) in &mut self.series {
            if !series.floored {
                continue;
            }
            series.update_holes(now);
            let mut ready = series.holes.iter().filter(|(_, hole)| is_due(hole));
            if let Some((&from, first)) = ready.next() {
                let last = ready.next_back().map_or(first.to, |(_, hole)| hole.to);
                due.push((
                    device.clone(),
                    boot.clone(),
                    from,
                    last.min(from + MAX_PER_REQUEST - 1),
                ));
            }
        }
        let mut asked = Vec::new();
        for (device, boot, from, to) in due.into_iter().take(CHECKS_PER_SECOND) {
            if asked.len() == REQUESTS_PER_SECOND {
                break;
            }
            let stored = self.stored(&device, &boot, from, to).await?;
            let Some(series) = self.series.get_mut(&(device.clone(), boot.clone())) else {
                continue;
            };
            for &seq in &stored {
                series.see(seq, seq);
            }
            // What is still missing (another replica may have stored the rest).
            series.update_holes(now);
            let mut missing = Vec::new();
            let mut attempt = 0;
            let mut given_up = Vec::new();
            for (&hole_from, hole) in series.holes.range_mut(from..=to) {
                if !is_due(hole) {
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
            for &(from, to) in &given_up {
                tracing::warn!(
                    device,
                    boot,
                    from,
                    to,
                    "no answer to {MAX_ATTEMPTS} replay requests: giving up on these readings"
                );
                let document = doc! {
                    "_id": { "device": &device, "boot": &boot, "from": from as i64, "to": to as i64, "unanswered": true },
                    "device": &device, "boot": &boot, "from": from as i64, "to": to as i64,
                    "outcome": "unanswered", "at": bson::DateTime::now(),
                };
                insert_once(&self.repairs, document).await?;
                series.see(from, to);
            }
            let Some((first, last)) = span(&missing) else {
                continue;
            };
            // What another replica asked for within --repair-after may still be on its
            // way (its replicas' shares of one stream overlap): not asked again now.
            let recently = self.recently_asked(&device, &boot, first, last).await?;
            let missing = subtract(&missing, &recently);
            let at = bson::DateTime::now();
            let id = doc! { "device": &device, "boot": &boot, "window": self.window(at) };
            let Some(document) = asked_record(
                id,
                &device,
                &boot,
                &missing,
                i64::from(attempt),
                &self.client_id,
                at,
            ) else {
                continue;
            };
            // One request per series and --repair-after window, whichever replica's
            // record goes in first; the others find its ranges recently asked.
            if !insert_once(&self.repairs, document).await? {
                continue;
            }
            metrics::counter!("iot_persister_replay_requests_total").increment(1);
            tracing::info!(device, boot, ranges = ?missing, attempt, "asking the device for missing readings");
            asked.push(Request {
                device,
                ranges: Ranges {
                    boot,
                    ranges: missing,
                },
            });
        }
        Ok(asked)
    }

    /// The `--repair-after` window a time falls in: the replicas' shared clock for "one
    /// request per series at a time".
    fn window(&self, at: bson::DateTime) -> i64 {
        at.timestamp_millis() / (self.after.as_millis() as i64).max(1)
    }

    /// The ranges of the series within `from..=to` that were asked for less than
    /// `--repair-after` ago, by any replica.
    async fn recently_asked(
        &self,
        device: &str,
        boot: &str,
        from: u64,
        to: u64,
    ) -> anyhow::Result<Vec<(u64, u64)>> {
        let since = bson::DateTime::from_millis(
            bson::DateTime::now().timestamp_millis() - self.after.as_millis() as i64,
        );
        let filter = doc! {
            "device": device, "boot": boot, "outcome": "asked",
            "from": { "$lte": to as i64 }, "to": { "$gte": from as i64 }, "at": { "$gte": since },
        };
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

    /// The lowest `seq` of the series stored, if any is.
    async fn first_stored(&self, device: &str, boot: &str) -> anyhow::Result<Option<u64>> {
        let first = self
            .readings
            .find_one(doc! { "device": device, "boot": boot, "seq": { "$exists": true } })
            .sort(doc! { "seq": 1 })
            .projection(doc! { "_id": 0, "seq": 1 })
            .await?;
        Ok(first.and_then(|document| seq_of(document.get("seq"))))
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

    #[test]
    fn a_series_that_starts_late_has_a_hole_from_one_until_floored() {
        let mut series = Series::default();
        series.see(5000, 5001);
        series.update_holes(Instant::now());
        assert_eq!(series.holes.keys().copied().collect::<Vec<_>>(), [1]);
    }
}
