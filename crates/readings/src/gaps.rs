//! `readings gaps`: one sorted pass over the keyed readings finds, per device and
//! boot, the `seq` numbers missing and stored twice; the `repairs` collection says what
//! the persister did about them.

use std::collections::HashMap;

use bson::{doc, Document};
use chrono::{DateTime, Utc};
use futures_util::TryStreamExt;
use mongodb::Database;
use serde_json::Value;

use iot_core::payload::format_time;
use iot_store::{integer, READINGS, REPAIRS};

use crate::output::Rows;

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
pub async fn gaps(
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

/// What the persister did about each boot with missing readings (the `repairs`
/// collection): `lost 41-60` (the device no longer had them), `unanswered …`, or
/// `asked N×, last <time>`; nothing when it never asked (not yet, or repairs are off).
async fn repair_states(
    db: &Database,
    found: &[BootGaps],
) -> anyhow::Result<HashMap<(String, String), String>> {
    let mut states = HashMap::new();
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
