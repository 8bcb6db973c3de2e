//! Capped exponential backoff with jitter, for reconnect and retry attempts.
//!
//! The delays come from the `backon` crate: each is the exponential step (doubling from
//! `initial` up to `cap`) plus a random share of up to one more step, so a fleet of
//! devices that lost its broker at the same moment spreads its reconnects over time
//! instead of knocking all at once. [`retry`] runs an operation until it succeeds with
//! these delays between its attempts.

use std::future::Future;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use tokio_util::sync::CancellationToken;

/// Delays that double from `initial` to `cap`, each with up to as much again of
/// random jitter (so never more than twice `cap`); restarts after [`Backoff::reset`].
#[derive(Debug)]
pub struct Backoff {
    builder: ExponentialBuilder,
    delays: ExponentialBackoff,
    cap: Duration,
    attempt: u32,
    /// The short delays of [`Backoff::starting`] and how many attempts are left to them.
    eager: Option<(ExponentialBackoff, u32)>,
}

/// Attempts of [`Backoff::starting`] with its short delays: about a minute.
const EAGER_ATTEMPTS: u32 = 40;

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
            eager: None,
        }
    }

    /// For a connection never made yet: 1–2 s between attempts for about a minute, then
    /// the [`Backoff::default`] delays, which [`Backoff::reset`] also goes back to. A
    /// service started together with its broker (the native stack, compose) reaches it
    /// within 2 s of its listening, instead of after a delay grown to 30 s while it
    /// started; a broker lost later is waited for with the full backoff.
    pub fn starting() -> Self {
        let second = Duration::from_secs(1);
        let eager = ExponentialBuilder::default()
            .with_min_delay(second)
            .with_max_delay(second)
            .with_jitter()
            .without_max_times()
            .build();
        Self {
            eager: Some((eager, EAGER_ATTEMPTS)),
            ..Self::default()
        }
    }

    /// The delay to wait before the next attempt.
    pub fn next_delay(&mut self) -> Duration {
        self.attempt += 1;
        if let Some((delays, left)) = &mut self.eager {
            *left -= 1;
            let delay = delays.next().unwrap_or(self.cap);
            if *left == 0 {
                self.eager = None;
            }
            return delay;
        }
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
        self.eager = None;
    }
}

impl Default for Backoff {
    /// 250–500 ms at first, doubling to 15–30 s.
    fn default() -> Self {
        Self::new(Duration::from_millis(250), Duration::from_secs(15))
    }
}

/// Runs `attempt` until it succeeds, waiting a [`Backoff::default`] delay after each
/// failure, which `failed` hears of first (the error, the attempt's number from 1, the
/// delay before the next); `None` when `stop` is cancelled during a wait.
pub async fn retry<T, E, F, Fut>(
    stop: &CancellationToken,
    mut attempt: F,
    mut failed: impl FnMut(&E, u32, Duration),
) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let mut backoff = Backoff::default();
    loop {
        match attempt().await {
            Ok(value) => return Some(value),
            Err(error) => {
                let delay = backoff.next_delay();
                failed(&error, backoff.attempt(), delay);
                tokio::select! {
                    () = stop.cancelled() => return None,
                    () = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn retry_tries_again_after_each_failure_until_it_succeeds_or_stops() {
        let stop = CancellationToken::new();
        let mut tries = 0;
        let mut heard = Vec::new();
        let answer = retry(
            &stop,
            || {
                tries += 1;
                let outcome = if tries < 3 { Err(tries) } else { Ok("done") };
                async move { outcome }
            },
            |error, attempt, delay| heard.push((*error, attempt, delay)),
        )
        .await;
        assert_eq!(answer, Some("done"));
        assert_eq!(tries, 3);
        assert_eq!(
            heard.iter().map(|h| (h.0, h.1)).collect::<Vec<_>>(),
            [(1, 1), (2, 2)]
        );
        assert!(heard[1].2 >= Duration::from_millis(500), "{heard:?}");

        stop.cancel();
        let never: Option<()> = retry(&stop, || async { Err::<(), _>("down") }, |_, _, _| {}).await;
        assert_eq!(never, None, "stopped during the first wait");
    }

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
    fn a_connection_never_made_is_tried_every_one_to_two_seconds_for_a_minute() {
        let mut backoff = Backoff::starting();
        let eager: Vec<Duration> = (0..EAGER_ATTEMPTS).map(|_| backoff.next_delay()).collect();
        assert!(
            eager
                .iter()
                .all(|delay| *delay >= Duration::from_secs(1) && *delay < Duration::from_secs(2)),
            "{eager:?}"
        );
        let total: Duration = eager.iter().sum();
        assert!(total >= Duration::from_secs(40) && total < Duration::from_secs(80));
        assert!(
            backoff.next_delay() < Duration::from_millis(500),
            "then the default's"
        );
        backoff.reset();
        for _ in 0..6 {
            backoff.next_delay();
        }
        assert!(
            backoff.next_delay() >= Duration::from_secs(15),
            "after a connection, a lost broker gets the full backoff"
        );
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
