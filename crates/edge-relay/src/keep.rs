//! Housekeeping of the log, once a second: forwarded messages past `--retention` are
//! deleted, the oldest forwarded ones before their time when the disk budget needs the
//! room, and the room left goes to the intake ([`crate::intake::Room`]): none when only
//! messages not forwarded yet are left to delete, until they fill less than 90 % of the
//! budget again. Also the relay's gauges.

use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::log::{now_ms, Log};

/// Most messages deleted in one go.
const TRIM: usize = 10_000;
/// From this share of the budget on, forwarded messages are deleted early to make room;
/// below it, a full disk counts as having room again.
const RESUME: f64 = 0.9;

#[derive(Debug)]
pub struct Keeper {
    pub log: Log,
    pub retention: Duration,
    pub max_disk: u64,
    /// Bytes the log may still take (0: full).
    pub room: watch::Sender<u64>,
}

impl Keeper {
    /// Keeps the log until `shutdown`; syncs it a last time then.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let mut ticks = tokio::time::interval(Duration::from_secs(1));
        let keeper = std::sync::Arc::new(self);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                _ = ticks.tick() => {}
            }
            let turn = std::sync::Arc::clone(&keeper);
            tokio::task::spawn_blocking(move || turn.turn()).await??;
        }
        keeper.log.sync()
    }

    /// One round: trim, measure, report.
    fn turn(&self) -> anyhow::Result<()> {
        let keep_from = now_ms() - i64::try_from(self.retention.as_millis()).unwrap_or(i64::MAX);
        let mut expired = 0;
        loop {
            let deleted = self.log.trim(TRIM, |received_ms| received_ms < keep_from)?;
            expired += deleted;
            if deleted < TRIM as u64 {
                break;
            }
        }
        if expired > 0 {
            metrics::counter!("iot_relay_expired_total").increment(expired);
        }
        // Room is made before the budget is reached: the intake never writes past it,
        // and a message bigger than what is left must not wait for forwarded ones to go.
        let mut used = self.log.budget_bytes();
        if used as f64 >= self.max_disk as f64 * RESUME {
            used = self.make_room(used)?;
        }
        let was_full = *self.room.borrow() == 0;
        let full = if was_full {
            used as f64 >= self.max_disk as f64 * RESUME
        } else {
            used >= self.max_disk
        };
        self.room.send_replace(if full {
            0
        } else {
            self.max_disk.saturating_sub(used)
        });
        self.log.sync()?;
        self.report(used);
        Ok(())
    }

    /// Deletes forwarded messages, oldest first, before their retention, until the
    /// budget has a tenth free (estimated from the bytes a message takes); compacts so
    /// that the disk gets the room now. Returns the bytes taken then.
    fn make_room(&self, used: u64) -> anyhow::Result<u64> {
        let kept = self.log.kept().max(1);
        let per_message = (self.log.table_bytes() / kept).max(1);
        let target = (self.max_disk as f64 * (RESUME - 0.1)) as u64;
        let mut wanted = used.saturating_sub(target) / per_message + 1;
        let mut deleted = 0;
        while wanted > 0 {
            let step = self.log.trim(TRIM.min(wanted as usize), |_| true)?;
            if step == 0 {
                break;
            }
            deleted += step;
            wanted = wanted.saturating_sub(step);
        }
        if deleted == 0 {
            return Ok(used);
        }
        tracing::warn!(
            deleted,
            max_disk = self.max_disk,
            "disk budget reached: deleted the oldest forwarded messages before their retention (replay requests for them go to the devices)"
        );
        metrics::counter!("iot_relay_evicted_total").increment(deleted);
        self.log.compact()?;
        Ok(self.log.budget_bytes())
    }

    fn report(&self, disk: u64) {
        let backlog = self.log.backlog();
        metrics::gauge!("iot_relay_backlog").set(backlog as f64);
        metrics::gauge!("iot_relay_disk_bytes").set(disk as f64);
        metrics::gauge!("iot_relay_kept").set(self.log.kept() as f64);
        let oldest = match self.log.taken_at(self.log.forwarded().max(1)) {
            Ok(Some((_, received_ms))) if backlog > 0 => {
                (now_ms() - received_ms).max(0) as f64 / 1000.0
            }
            _ => 0.0,
        };
        metrics::gauge!("iot_relay_oldest_unforwarded_seconds").set(oldest);
    }
}
