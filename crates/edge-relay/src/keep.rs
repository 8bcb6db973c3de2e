//! Housekeeping of the log, once a second: forwarded messages past `--retention` are
//! deleted, the oldest forwarded ones before their time when the disk budget or the
//! file system needs the room, and the room left goes to the intake
//! ([`crate::intake::Room`]): none when only messages not forwarded yet are left to
//! delete, until they fill less than 90 % of what the log may take again. Also the
//! relay's gauges.
//!
//! What the log may take is the lesser of `--max-disk` and what the file system has:
//! its free space less [`FS_RESERVE`] for the store's own writes, halved (a message is
//! on disk twice, in the journal and in a table, until its journal is dropped). On a
//! file system with less than [`MIN_FREE`] nothing is written but the forwarded mark (a
//! few bytes a burst, which the cloud's release waits for; forwarding goes on): a write
//! there could fail and stop the store.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::intake::Space;
use crate::log::{free_bytes, now_ms, Log};

/// Most messages deleted in one go.
const TRIM: usize = 10_000;
/// From this share of what the log may take on, forwarded messages are deleted early to
/// make room; below it, a full disk counts as having room again.
const RESUME: f64 = 0.9;
/// What the file system keeps free for the store's own writes besides the messages:
/// its memtables flushed to tables (26 MiB at most), a compaction's new table before
/// the old ones go, the version files of a flush or a drop, and the deletions.
pub const FS_RESERVE: u64 = 48 << 20;
/// Below this much free space the relay writes nothing (no deletion, no forwarded mark):
/// the store's deletions and marks are small, but a write that fails stops the store.
pub const MIN_FREE: u64 = 256 << 10;
/// Journal bytes a deletion takes at most (the key of its index entry and framing), to
/// delete no more at once than a nearly full file system takes.
const DELETION_BYTES: u64 = 256;

#[derive(Debug)]
pub struct Keeper {
    log: Log,
    /// The log's folder, whose file system is measured.
    dir: PathBuf,
    retention: Duration,
    max_disk: u64,
    /// Bytes the log may still take (0: full).
    room: watch::Sender<Space>,
    /// Whether the file system had less than [`MIN_FREE`] at the last turn.
    writing_nothing: AtomicBool,
    /// When deleted tables were last dropped though no more were deleted.
    released_again: std::sync::Mutex<Option<std::time::Instant>>,
}

/// How often a full log drops deleted tables that a compaction held before (each drop
/// writes a version of the store).
const RELEASE_AGAIN: Duration = Duration::from_secs(10);

/// What the log may take this turn, and whether the file system is what limits it.
#[derive(Debug, Clone, Copy)]
struct Limit {
    bytes: u64,
    file_system: bool,
}

impl Keeper {
    /// The keeper of `log` in `dir`, and the room it has now for the intake (measured
    /// within a second again by [`Keeper::run`]).
    pub fn new(
        log: Log,
        dir: PathBuf,
        retention: Duration,
        max_disk: u64,
    ) -> anyhow::Result<(Self, crate::intake::Room)> {
        let (room, receiver) = watch::channel(Space::budget(0));
        let keeper = Self {
            log,
            dir,
            retention,
            max_disk,
            room,
            released_again: std::sync::Mutex::new(None),
            writing_nothing: AtomicBool::new(false),
        };
        let free = free_bytes(&keeper.dir)?;
        let used = keeper.log.budget_bytes();
        let limit = keeper.limit(used, free);
        keeper.room.send_replace(Space {
            bytes: if free < MIN_FREE {
                0
            } else {
                limit.bytes.saturating_sub(used)
            },
            file_system: limit.file_system || free < MIN_FREE,
        });
        Ok((keeper, receiver))
    }

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
        let free = free_bytes(&keeper.dir).unwrap_or(u64::MAX);
        if free < MIN_FREE {
            return Ok(());
        }
        keeper.log.sync()
    }

    /// One round: trim, measure, report.
    fn turn(&self) -> anyhow::Result<()> {
        let free = free_bytes(&self.dir)?;
        if free < MIN_FREE {
            return self.write_nothing(free);
        }
        if self.writing_nothing.swap(false, Ordering::AcqRel) {
            tracing::info!(
                free,
                "room on the file system of the log again: writing again"
            );
        }
        let keep_from = now_ms() - i64::try_from(self.retention.as_millis()).unwrap_or(i64::MAX);
        let at_once = self.at_once(free);
        let mut expired = 0;
        loop {
            let deleted = self
                .log
                .trim(at_once, |received_ms| received_ms < keep_from)?;
            expired += deleted;
            // On a nearly full file system one step a turn: its journal writes are
            // buffered, and the free space measured does not show them yet.
            if deleted < at_once as u64 || at_once < TRIM {
                break;
            }
        }
        if expired > 0 {
            metrics::counter!("iot_relay_expired_total").increment(expired);
        }
        self.log.release(false)?;
        // Room is made before the limit is reached: the intake never writes past it,
        // and a message bigger than what is left must not wait for forwarded ones to go.
        let mut used = self.log.budget_bytes();
        let mut limit = self.limit(used, free_bytes(&self.dir)?);
        if used as f64 >= limit.bytes as f64 * RESUME {
            used = self.make_room(used, limit, at_once)?;
            limit = self.limit(used, free_bytes(&self.dir)?);
        }
        let was_full = self.room.borrow().bytes == 0;
        let full = if was_full {
            used as f64 >= limit.bytes as f64 * RESUME
        } else {
            used >= limit.bytes
        };
        if full && self.due_again() {
            // A table being compacted when its messages were deleted is dropped now.
            self.log.release(true)?;
        }
        if full && limit.file_system {
            // Journals of messages since deleted are dropped once every memtable with a
            // write in them is flushed: so that their room comes back now.
            self.log.flush_sealed_journals()?;
        }
        self.room.send_replace(Space {
            bytes: if full {
                0
            } else {
                limit.bytes.saturating_sub(used)
            },
            file_system: limit.file_system,
        });
        self.log.sync()?;
        self.report(used);
        Ok(())
    }

    /// Whether [`RELEASE_AGAIN`] passed since the last forced drop (and notes it).
    fn due_again(&self) -> bool {
        let Ok(mut last) = self.released_again.lock() else {
            return false;
        };
        let due = last.is_none_or(|at| at.elapsed() >= RELEASE_AGAIN);
        if due {
            *last = Some(std::time::Instant::now());
        }
        due
    }

    /// On a file system without [`MIN_FREE`]: no room for the intake, nothing written.
    fn write_nothing(&self, free: u64) -> anyhow::Result<()> {
        if !self.writing_nothing.swap(true, Ordering::AcqRel) {
            tracing::warn!(
                free,
                "the file system of the log is full: writing nothing (no deletion, no forwarded mark) until it has room; forwarding goes on"
            );
        }
        self.room.send_replace(Space {
            bytes: 0,
            file_system: true,
        });
        self.report(self.log.budget_bytes());
        Ok(())
    }

    /// Deletions at once: a nearly full file system takes fewer.
    fn at_once(&self, free: u64) -> usize {
        let fit = (free - MIN_FREE / 2) / DELETION_BYTES;
        TRIM.min(usize::try_from(fit).unwrap_or(TRIM)).max(1)
    }

    /// What the log may take: `--max-disk`, or less when the file system has less room
    /// than that (its free space less [`FS_RESERVE`], halved: a message is on disk
    /// twice until its journal is dropped) on top of what the log takes now.
    fn limit(&self, used: u64, free: u64) -> Limit {
        let file_system = used + free.saturating_sub(FS_RESERVE) / 2;
        if file_system < self.max_disk {
            Limit {
                bytes: file_system,
                file_system: true,
            }
        } else {
            Limit {
                bytes: self.max_disk,
                file_system: false,
            }
        }
    }

    /// Deletes forwarded messages, oldest first, before their retention, until what the
    /// log may take has a fifth free (estimated from the bytes a message takes); drops
    /// the tables they were in, so that the disk gets the room now. Returns the bytes
    /// taken then.
    fn make_room(&self, used: u64, limit: Limit, at_once: usize) -> anyhow::Result<u64> {
        let kept = self.log.kept().max(1);
        let per_message = (self.log.table_bytes() / kept).max(1);
        let target = (limit.bytes as f64 * (RESUME - 0.1)) as u64;
        let mut wanted = used.saturating_sub(target) / per_message + 1;
        let mut deleted = 0;
        while wanted > 0 {
            let step = self
                .log
                .trim(at_once.min(usize::try_from(wanted).unwrap_or(TRIM)), |_| {
                    true
                })?;
            if step == 0 {
                break;
            }
            deleted += step;
            wanted = wanted.saturating_sub(step);
            if at_once < TRIM {
                break;
            }
        }
        if deleted == 0 {
            return Ok(used);
        }
        if limit.file_system {
            tracing::warn!(
                deleted,
                max_disk = self.max_disk,
                "the file system of the log is nearly full: deleted the oldest forwarded messages before their retention (replay requests for them go to the devices)"
            );
        } else {
            tracing::warn!(
                deleted,
                max_disk = self.max_disk,
                "disk budget reached: deleted the oldest forwarded messages before their retention (replay requests for them go to the devices)"
            );
        }
        metrics::counter!("iot_relay_evicted_total").increment(deleted);
        self.log.release(false)?;
        Ok(self.log.budget_bytes())
    }

    fn report(&self, disk: u64) {
        metrics::gauge!("iot_relay_room_bytes").set(self.room.borrow().bytes as f64);
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
