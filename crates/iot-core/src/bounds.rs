//! Bounds on what a device controls: the ids that name its readings and become topic
//! levels of replay requests, and the numbers that order them. A value outside is
//! never used as a key or in a topic: the persister stores the message flagged instead.
//!
//! - A device id or a boot: 1 to [`MAX_ID_BYTES`] bytes of UTF-8, no control
//!   characters, and none of MQTT's `/`, `+`, `#` (a device id is one topic level).
//! - A measurement name: at most [`MAX_ID_BYTES`] bytes.
//! - A `seq`: 1 to [`MAX_SEQ`], 2^53, the largest whole number every JSON reader and a
//!   MongoDB double hold exactly (so `seq + 1` can never wrap in a 64-bit count).

/// The longest device id, boot or measurement name, in bytes.
pub const MAX_ID_BYTES: usize = 128;
/// The largest `seq` a reading may carry: 2^53.
pub const MAX_SEQ: u64 = 1 << 53;

/// Why `value`, a device's `what` (`device`, `boot`), cannot name a reading.
pub fn check_id(what: &str, value: &str) -> Result<(), String> {
    if value.is_empty() {
        return Err(format!("{what} is empty"));
    }
    check_name(what, value)?;
    if let Some(c) = value
        .chars()
        .find(|c| c.is_control() || matches!(c, '/' | '+' | '#'))
    {
        return Err(format!(
            "{what} holds {c:?}, which cannot be in a topic level"
        ));
    }
    Ok(())
}

/// Why `seq` cannot number a reading.
pub fn check_seq(seq: u64) -> Result<(), String> {
    if (1..=MAX_SEQ).contains(&seq) {
        Ok(())
    } else {
        Err(format!("seq {seq} is outside 1..={MAX_SEQ}"))
    }
}

/// Why a name (a measurement, or a device as a topic gives it) is too long to store.
pub fn check_name(what: &str, value: &str) -> Result<(), String> {
    if value.len() > MAX_ID_BYTES {
        return Err(format!(
            "{what} is {} bytes long, more than {MAX_ID_BYTES}",
            value.len()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_bounded_topic_levels() {
        assert!(check_id("device", "temp-0001").is_ok());
        assert!(check_id("device", "wärme 1 (ü)").is_ok());
        assert!(check_id("device", &"x".repeat(MAX_ID_BYTES)).is_ok());
        for bad in [
            String::new(),
            "x".repeat(MAX_ID_BYTES + 1),
            "a/b".into(),
            "a+".into(),
            "#".into(),
            "a\nb".into(),
            "a\0b".into(),
        ] {
            assert!(check_id("device", &bad).is_err(), "{bad:?}");
        }
        assert!(check_id("boot", &"é".repeat(65)).is_err());
    }

    #[test]
    fn seqs_run_from_one_to_two_to_the_53rd() {
        assert!(check_seq(1).is_ok());
        assert!(check_seq(MAX_SEQ).is_ok());
        assert!(check_seq(0).is_err());
        assert!(check_seq(MAX_SEQ + 1).is_err());
        assert!(check_seq(u64::MAX).is_err());
        assert!(check_name("measurement", &"m".repeat(129)).is_err());
    }
}
