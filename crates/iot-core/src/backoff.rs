//! Capped exponential backoff with jitter, for reconnect and retry attempts.
//!
//! The delays come from the `backon` crate: each is the exponential step (doubling from
//! `initial` up to `cap`) plus a random share of up to one more step, so a fleet of
//! devices that lost its broker at the same moment spreads its reconnects over time
//! instead of knocking all at once.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};

/// Delays that double from `initial` to `cap`, each with up to as much again of
/// random jitter (so never more than twice `cap`); restarts after [`Backoff::reset`].
#[derive(Debug)]
pub struct Backoff {
    builder: ExponentialBuilder,
    delays: ExponentialBackoff,
    cap: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(initial: Duration, cap: Duration) -> Self {
        let builder = ExponentialBuilder::default()
            .with_min_delay(initial)
            .with_max_delay(cap)
            .with_jitter()
            .without_max_times();
        Self {
            delays: builder.build(),
            builder,
            cap,
            attempt: 0,
        }
    }

    /// The delay to wait before the next attempt.
    pub fn next_delay(&mut self) -> Duration {
        self.attempt += 1;
        // Without a limit on attempts, the sequence never ends.
        self.delays.next().unwrap_or(self.cap)
    }

    /// How many delays were handed out since the last reset.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// Starts again from the initial delay (after a successful connection).
    pub fn reset(&mut self) {
        self.delays = self.builder.build();
        self.attempt = 0;
    }
}

impl Default for Backoff {
    /// 250–500 ms at first, doubling to 15–30 s.
    fn default() -> Self {
        Self::new(Duration::from_millis(250), Duration::from_secs(15))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_delay_is_its_step_plus_at_most_one_step_of_jitter_and_resets() {
        let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(5));
        for step in [1, 2, 4, 5, 5, 5] {
            let delay = backoff.next_delay();
            let step = Duration::from_secs(step);
            assert!(
                delay >= step && delay < step * 2,
                "{delay:?} outside [{step:?}, 2 × {step:?})"
            );
        }
        assert_eq!(backoff.attempt(), 6);
        backoff.reset();
        assert_eq!(backoff.attempt(), 0);
        assert!(backoff.next_delay() < Duration::from_secs(2));
    }

    #[test]
    fn a_fleet_does_not_reconnect_in_lockstep() {
        // A thousand devices that lost the broker together: their fifth attempts (4 s
        // steps) spread over seconds, not one instant.
        let fifth: Vec<Duration> = (0..1000)
            .map(|_| {
                let mut backoff = Backoff::default();
                (0..5)
                    .map(|_| backoff.next_delay())
                    .last()
                    .unwrap_or_default()
            })
            .collect();
        let earliest = fifth.iter().min().copied().unwrap_or_default();
        let latest = fifth.iter().max().copied().unwrap_or_default();
        assert!(earliest >= Duration::from_secs(4), "{earliest:?}");
        assert!(latest < Duration::from_secs(8), "{latest:?}");
        assert!(
            latest - earliest > Duration::from_secs(3),
            "spread only {:?}",
            latest - earliest
        );
        let distinct: std::collections::BTreeSet<_> = fifth.iter().collect();
        assert!(distinct.len() > 900, "{} distinct delays", distinct.len());
    }
}
