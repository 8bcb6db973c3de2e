//! The documents of the `repairs` collection, built here and nowhere else: a replay
//! request (`outcome: "asked"`) and the ranges given up (`lost`: the device no longer
//! has them; `unanswered`: it never answered). The persister and
//! `readings gaps --repair` write them; `readings gaps` reads them.

use bson::{doc, Document};

/// A request of the persister's: one per device boot and `--repair-after` window
/// (`window`, the time divided by that length), whichever replica's goes in first.
/// `None` without ranges.
pub fn asked(
    device: &str,
    boot: &str,
    window: i64,
    ranges: &[(u64, u64)],
    attempt: i64,
    by: &str,
    at: bson::DateTime,
) -> Option<Document> {
    let id = doc! { "device": device, "boot": boot, "window": window };
    asked_with(id, device, boot, ranges, attempt, by, at)
}

/// A request of `readings gaps --repair` (`by` names the run), a first attempt.
pub fn asked_by_hand(
    device: &str,
    boot: &str,
    ranges: &[(u64, u64)],
    by: &str,
    at: bson::DateTime,
) -> Option<Document> {
    let id = doc! { "device": device, "boot": boot, "by": by };
    asked_with(id, device, boot, ranges, 1, by, at)
}

/// The ranges asked for (sorted), their span as `from`–`to`, and who asked when.
fn asked_with(
    id: Document,
    device: &str,
    boot: &str,
    ranges: &[(u64, u64)],
    attempt: i64,
    by: &str,
    at: bson::DateTime,
) -> Option<Document> {
    let (from, to) = (ranges.first()?.0, ranges.last()?.1);
    let ranges: Vec<Vec<i64>> = ranges
        .iter()
        .map(|&(from, to)| vec![from as i64, to as i64])
        .collect();
    Some(doc! {
        "_id": id, "device": device, "boot": boot, "from": from as i64, "to": to as i64,
        "ranges": ranges, "attempt": attempt, "outcome": "asked", "at": at, "by": by,
    })
}

/// Why a range is asked for no more.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GivenUp {
    /// The device answered that it no longer has the readings.
    Lost,
    /// The device never answered the requests.
    Unanswered,
}

impl GivenUp {
    /// The `outcome` stored.
    pub fn outcome(self) -> &'static str {
        match self {
            GivenUp::Lost => "lost",
            GivenUp::Unanswered => "unanswered",
        }
    }
}

/// A range given up: one document per range and reason, whichever replica's goes in
/// first.
pub fn given_up(
    why: GivenUp,
    device: &str,
    boot: &str,
    (from, to): (u64, u64),
    at: bson::DateTime,
) -> Document {
    let (from, to) = (from as i64, to as i64);
    let mut id = doc! { "device": device, "boot": boot, "from": from, "to": to };
    id.insert(why.outcome(), true);
    doc! {
        "_id": id, "device": device, "boot": boot, "from": from, "to": to,
        "outcome": why.outcome(), "at": at,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_spans_its_ranges_and_names_who_asked() {
        let at = bson::DateTime::from_millis(1_000);
        let document =
            asked("d", "b", 7, &[(3, 4), (9, 12)], 2, "persister-1", at).expect("ranges");
        assert_eq!(
            document.get_document("_id"),
            Ok(&doc! { "device": "d", "boot": "b", "window": 7_i64 })
        );
        assert_eq!(
            (document.get_i64("from"), document.get_i64("to")),
            (Ok(3), Ok(12))
        );
        assert_eq!(document.get_str("outcome"), Ok("asked"));
        assert_eq!(document.get_i64("attempt"), Ok(2));
        assert!(asked("d", "b", 7, &[], 1, "p", at).is_none());
        let by_hand = asked_by_hand("d", "b", &[(1, 1)], "readings-repair-9", at).expect("one");
        assert_eq!(
            by_hand.get_document("_id"),
            Ok(&doc! { "device": "d", "boot": "b", "by": "readings-repair-9" })
        );
        assert_eq!(by_hand.get_i64("attempt"), Ok(1));
    }

    #[test]
    fn a_range_given_up_is_keyed_by_the_range_and_the_reason() {
        let at = bson::DateTime::from_millis(1_000);
        let lost = given_up(GivenUp::Lost, "d", "b", (5, 9), at);
        assert_eq!(
            lost.get_document("_id"),
            Ok(&doc! { "device": "d", "boot": "b", "from": 5_i64, "to": 9_i64, "lost": true })
        );
        assert_eq!(lost.get_str("outcome"), Ok("lost"));
        let unanswered = given_up(GivenUp::Unanswered, "d", "b", (5, 9), at);
        assert_eq!(unanswered.get_str("outcome"), Ok("unanswered"));
        assert_ne!(lost.get("_id"), unanswered.get("_id"));
    }
}
