//! Many simulated devices in one process: their ids, their topics, and a pace that
//! spreads their publishes evenly over time.
//!
//! `--devices N` gives device ids counted up from `--device` (`temp-0001`,
//! `temp-0002`, ...); a topic containing `{device}` gives every device a topic of its
//! own. [`Pacer`] hands out publish slots at a fixed rate, so N devices on a 3 s interval
//! publish one after another every 3/N s instead of all at once at each tick, and says
//! so when the process cannot keep up.

use std::time::Duration;

use tokio::time::Instant;

/// The placeholder of a topic template, replaced by each device's id.
pub const DEVICE_PLACEHOLDER: &str = "{device}";

/// `count` device ids, the first being `first`. Its trailing number counts up and keeps
/// its width (`temp-0001`, `temp-0002`, ...); an id without one gets `-2`, `-3`, ...
/// after the first.
pub fn device_ids(first: &str, count: usize) -> Vec<String> {
    let digits = first.len() - first.trim_end_matches(|c: char| c.is_ascii_digit()).len();
    let (stem, number) = first.split_at(first.len() - digits);
    // Counting on from the number, unless there is none or it would pass u64::MAX.
    match number
        .parse::<u64>()
        .ok()
        .filter(|start| start.checked_add(count as u64).is_some())
    {
        Some(start) => (0..count as u64)
            .map(|offset| format!("{stem}{:0digits$}", start + offset))
            .collect(),
        None => std::iter::once(first.to_string())
            .chain((2..=count).map(|n| format!("{first}-{n}")))
            .take(count)
            .collect(),
    }
}

/// The topic of `device`: `template` with `{device}` replaced.
pub fn device_topic(template: &str, device: &str) -> String {
    template.replace(DEVICE_PLACEHOLDER, device)
}

/// Whether `template` gives each device a topic of its own.
pub fn has_placeholder(template: &str) -> bool {
    template.contains(DEVICE_PLACEHOLDER)
}

/// How far behind its schedule a [`Pacer`] may fall before it gives up catching up.
const MAX_LAG: Duration = Duration::from_secs(1);

/// Publish slots at a fixed period (zero: as fast as possible).
///
/// Slots are due at `start + k × period`, so timer granularity (about a millisecond)
/// never lowers the rate: slots that came due during one sleep are handed out at once.
/// A process that falls more than a second behind does not burst to catch up: the pacer
/// counts the slots it skipped forward over and carries on from now.
#[derive(Debug)]
pub struct Pacer {
    period: Duration,
    start: Instant,
    /// Slots handed out since `start`.
    slots: u32,
    /// Slots given up on because the process could not keep the rate.
    skipped: u64,
}

impl Pacer {
    pub fn new(period: Duration) -> Self {
        Self {
            period,
            start: Instant::now(),
            slots: 0,
            skipped: 0,
        }
    }

    /// Waits for the next slot.
    pub async fn next(&mut self) {
        if self.period.is_zero() {
            // Let the rest of the runtime (the MQTT event loop) breathe.
            tokio::task::yield_now().await;
            return;
        }
        let due = self.due();
        let now = Instant::now();
        if due > now {
            tokio::time::sleep_until(due).await;
        } else if now - due > MAX_LAG {
            let behind = ((now - due).as_secs_f64() / self.period.as_secs_f64()) as u64;
            self.skipped += behind;
            self.start = now;
            self.slots = 0;
        }
        self.slots += 1;
        if self.slots == u32::MAX {
            self.start = self.due();
            self.slots = 0;
        }
    }

    /// Slots skipped so far because the process fell more than a second behind.
    pub fn skipped(&self) -> u64 {
        self.skipped
    }

    fn due(&self) -> Instant {
        self.start + self.period * self.slots
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_count_up_from_the_first_keeping_its_width() {
        assert_eq!(
            device_ids("temp-0001", 3),
            ["temp-0001", "temp-0002", "temp-0003"]
        );
        assert_eq!(device_ids("pres-0998", 3)[2], "pres-1000");
        assert_eq!(device_ids("x9", 2), ["x9", "x10"]);
        assert_eq!(device_ids("boiler", 3), ["boiler", "boiler-2", "boiler-3"]);
        assert_eq!(device_ids("temp-0001", 1), ["temp-0001"]);
    }

    #[test]
    fn ids_with_more_digits_than_a_u64_still_differ() {
        let ids = device_ids("d-99999999999999999999999", 2);
        assert_eq!(ids.len(), 2);
        assert_ne!(ids[0], ids[1]);
    }

    #[test]
    fn ids_near_the_largest_u64_do_not_overflow() {
        let first = format!("d{}", u64::MAX - 1);
        let ids = device_ids(&first, 3);
        assert_eq!(
            ids,
            [first.clone(), format!("{first}-2"), format!("{first}-3")]
        );
        assert!(device_ids("boiler", 0).is_empty());
    }

    #[test]
    fn templates_give_each_device_its_topic() {
        assert!(has_placeholder("/sensor/{device}/temperature"));
        assert!(!has_placeholder("/sensor/temperature"));
        assert_eq!(
            device_topic("/sensor/{device}/temperature", "temp-0002"),
            "/sensor/temp-0002/temperature"
        );
        assert_eq!(
            device_topic("/sensor/temperature", "temp-0002"),
            "/sensor/temperature"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn slots_come_at_the_period_and_sub_millisecond_rates_hold() {
        let start = Instant::now();
        let mut pacer = Pacer::new(Duration::from_micros(100));
        for _ in 0..10_000 {
            pacer.next().await;
        }
        // 10 000 slots of 100 µs: the last one is due at 0.9999 s.
        let elapsed = start.elapsed();
        assert!(
            elapsed >= Duration::from_micros(999_900) && elapsed < Duration::from_millis(1010),
            "{elapsed:?}"
        );
        assert_eq!(pacer.skipped(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_process_skips_forward_instead_of_bursting() {
        let mut pacer = Pacer::new(Duration::from_millis(10));
        pacer.next().await;
        tokio::time::advance(Duration::from_secs(3)).await;
        pacer.next().await;
        assert!(
            (290..=300).contains(&pacer.skipped()),
            "{}",
            pacer.skipped()
        );
        // Back on schedule: the next slot is a period away, not due at once.
        let before = Instant::now();
        pacer.next().await;
        assert_eq!(before.elapsed(), Duration::from_millis(10));
    }
}
