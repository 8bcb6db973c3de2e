//! The cloud side: what is in the log goes on to the cloud broker at QoS 1, in order,
//! with its topic, payload and retain flag unchanged; a message counts as forwarded once
//! the cloud broker acknowledged it (PUBACKs come in the order of the publishes).
//!
//! A cloud broker that comes back without the relay's session may have lost what it had
//! accepted since its last save to disk: the relay sends again what it forwarded within
//! `--refill-window` before ([`Forwarder::refill_from`]), once `--refill-delay` has given
//! the broker's subscribers (whose sessions it lost too) time to subscribe again. Replays
//! the relay answers from its log ([`crate::inbound`]) go out on this connection too.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use iot_core::mqtt::{Connection, Event, Unencodable};
use rumqttc::QoS;
use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::log::{now_ms, Log};

/// Publishes waiting for the cloud broker's acknowledgement at most.
pub const WINDOW: usize = 1000;
/// Payload bytes waiting for the cloud broker's acknowledgement at most (but always one
/// message): the window alone would let 1000 messages of 2 MiB, 2 GiB, wait in memory.
pub const WINDOW_BYTES: usize = 64 << 20;
/// Messages read from the log at once.
const READ: usize = 256;
/// Bytes of messages read from the log at once (but always one message).
const READ_BYTES: usize = 8 << 20;
/// How long a stop waits for the cloud to acknowledge what is in flight.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// A reading answered from the log, to publish as it is.
#[derive(Debug)]
pub struct Replay {
    pub topic: String,
    pub payload: Vec<u8>,
}

/// What waits for an acknowledgement, in publish order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sent {
    /// Message number of the log.
    Message(u64),
    /// A replay answered from the log.
    Replay,
    /// A message the cloud broker cannot take (too long for MQTT): passed over.
    Skipped(u64),
}

#[derive(Debug)]
pub struct Forwarder {
    connection: Connection,
    log: Log,
    /// New messages in the log.
    wake: Arc<Notify>,
    replays: mpsc::Receiver<Replay>,
    /// With the payload bytes of each.
    sent: VecDeque<(Sent, usize)>,
    /// Payload bytes of `sent`.
    sent_bytes: usize,
    /// The next message number to publish.
    cursor: u64,
    refill_window: Duration,
    refill_delay: Duration,
    /// Nothing is forwarded before this: the cloud broker came back without the relay's
    /// session, and its subscribers have not subscribed again yet.
    paused_until: Option<Instant>,
    /// `(when, forwarded mark then)`, one a second for the refill window.
    marks: VecDeque<(Instant, u64)>,
}

impl Forwarder {
    pub fn new(
        connection: Connection,
        log: Log,
        wake: Arc<Notify>,
        replays: mpsc::Receiver<Replay>,
        (refill_window, refill_delay): (Duration, Duration),
    ) -> Self {
        let cursor = log.forwarded().max(log.first());
        Self {
            connection,
            log,
            wake,
            replays,
            sent: VecDeque::new(),
            sent_bytes: 0,
            cursor,
            refill_window,
            refill_delay,
            paused_until: None,
            marks: VecDeque::new(),
        }
    }

    /// Forwards until `shutdown`, then waits a little for what is in flight. An error
    /// is refused credentials or a log that cannot be read.
    pub async fn run(mut self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let mut ticks = tokio::time::interval(Duration::from_secs(1));
        loop {
            // Not while the connection is down: what is published meanwhile would go out
            // first on the next connection, before a refill delay.
            if self.paused_until.is_none() && self.connection.is_connected() {
                self.fill().await?;
            }
            tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                () = pause_ends(self.paused_until) => {
                    tracing::info!("forwarding again after the refill delay");
                    self.paused_until = None;
                }
                event = self.connection.recv() => self.heard(event?)?,
                replay = self.replays.recv(), if self.sent.len() < WINDOW => {
                    if let Some(replay) = replay {
                        self.send_replay(replay).await?;
                    }
                }
                () = self.wake.notified() => {}
                _ = ticks.tick() => self.keep_mark(),
            }
        }
        let deadline = Instant::now() + CLOSE_TIMEOUT;
        while !self.sent.is_empty() {
            match tokio::time::timeout_at(deadline, self.connection.recv()).await {
                Ok(event) => self.heard(event?)?,
                Err(_) => break,
            }
        }
        if !self.sent.is_empty() {
            tracing::info!(
                in_flight = self.sent.len(),
                "stopping before the cloud acknowledged everything: those are sent again on the next start"
            );
        }
        self.connection.close(Duration::from_secs(1)).await
    }

    /// Publishes from the log until the window is full or the log is done.
    async fn fill(&mut self) -> anyhow::Result<()> {
        while self.sent.len() < WINDOW && self.sent_bytes < WINDOW_BYTES {
            let want = (WINDOW - self.sent.len()).min(READ);
            let cursor = self.cursor.max(self.log.first());
            let bytes = READ_BYTES.min(WINDOW_BYTES - self.sent_bytes);
            let read = self.log.read_from(cursor, want, bytes)?;
            let Some(&(last, _)) = read.last() else {
                return Ok(());
            };
            for (number, entry) in read {
                let bytes = entry.payload.len();
                let published = self
                    .connection
                    .publish(
                        &entry.topic,
                        QoS::AtLeastOnce,
                        entry.retain,
                        entry.payload.to_vec(),
                    )
                    .await;
                match published {
                    Ok(()) => self.push(Sent::Message(number), bytes),
                    Err(error) if error.is::<Unencodable>() => {
                        tracing::warn!(
                            number,
                            "the cloud broker cannot take message {number}: {error}; passed over"
                        );
                        metrics::counter!("iot_relay_unforwardable_total").increment(1);
                        self.push(Sent::Skipped(number), 0);
                    }
                    Err(error) => return Err(error),
                }
            }
            self.cursor = last + 1;
            self.settle()?;
        }
        Ok(())
    }

    async fn send_replay(&mut self, replay: Replay) -> anyhow::Result<()> {
        let bytes = replay.payload.len();
        match self
            .connection
            .publish(&replay.topic, QoS::AtLeastOnce, false, replay.payload)
            .await
        {
            Ok(()) => {
                self.push(Sent::Replay, bytes);
                metrics::counter!("iot_relay_replayed_total").increment(1);
                Ok(())
            }
            Err(error) if error.is::<Unencodable>() => Ok(()),
            Err(error) => Err(error),
        }
    }

    fn heard(&mut self, event: Event) -> anyhow::Result<()> {
        match event {
            Event::Acked => {
                match self.pop() {
                    Some(Sent::Message(number)) => {
                        self.log.mark_forwarded(number + 1)?;
                        metrics::counter!("iot_relay_forwarded_total").increment(1);
                    }
                    Some(Sent::Skipped(number)) => self.log.mark_forwarded(number + 1)?,
                    Some(Sent::Replay) | None => {}
                }
                self.settle()?;
            }
            Event::Connected {
                session_present: false,
                forgotten,
            } => self.lost_session(forgotten)?,
            Event::Connected { .. }
            | Event::Subscribed(_)
            | Event::Message { .. }
            | Event::Unsubscribed => {}
        }
        Ok(())
    }

    /// The cloud broker came back without the relay's session: the `forgotten` publishes
    /// it had not acknowledged, or that were still queued (the connection does not send
    /// them, see [`iot_core::mqtt::Unconfirmed::Forget`]), are sent again from the log;
    /// when the broker may have lost what it had accepted (anything forwarded before, in
    /// this run or an earlier one), after the refill delay and from the start of the
    /// refill window.
    fn lost_session(&mut self, forgotten: u64) -> anyhow::Result<()> {
        let mut again = self.cursor;
        let mut left = forgotten;
        while left > 0 {
            match self.pop() {
                Some(Sent::Message(number)) => {
                    again = again.min(number);
                    left -= 1;
                }
                // Not a publish: read and passed over again.
                Some(Sent::Skipped(number)) => again = again.min(number),
                // A replay request asked again (the persister repeats it).
                Some(Sent::Replay) => left -= 1,
                None => break,
            }
        }
        self.cursor = again;
        self.settle()?;
        if self.log.forwarded() > self.log.first() {
            let from = self.refill_from()?;
            let count = self.cursor.saturating_sub(from);
            tracing::warn!(
                from,
                count,
                window = ?self.refill_window,
                delay = ?self.refill_delay,
                "the cloud broker came back without this relay's session (it lost its state): after the refill delay (for its subscribers to subscribe again), sending again what was forwarded within the refill window"
            );
            self.paused_until = Some(Instant::now() + self.refill_delay);
            metrics::counter!("iot_relay_refills_total").increment(1);
            metrics::counter!("iot_relay_refilled_total").increment(count);
            self.cursor = self.cursor.min(from);
        }
        Ok(())
    }

    fn push(&mut self, sent: Sent, bytes: usize) {
        self.sent.push_back((sent, bytes));
        self.sent_bytes += bytes;
    }

    fn pop(&mut self) -> Option<Sent> {
        let (sent, bytes) = self.sent.pop_front()?;
        self.sent_bytes -= bytes;
        Some(sent)
    }

    /// Messages passed over at the front count as forwarded.
    fn settle(&mut self) -> anyhow::Result<()> {
        while let Some(&(Sent::Skipped(number), _)) = self.sent.front() {
            self.pop();
            self.log.mark_forwarded(number + 1)?;
        }
        Ok(())
    }

    /// Once a second: the forwarded mark, for the refill window.
    fn keep_mark(&mut self) {
        let now = Instant::now();
        self.marks.push_back((now, self.log.forwarded()));
        while self
            .marks
            .front()
            .is_some_and(|(when, _)| now.duration_since(*when) > self.refill_window)
        {
            self.marks.pop_front();
        }
    }

    /// Where a refill starts: the forwarded mark of `--refill-window` ago (what the cloud
    /// acknowledged since), and no later than the first message the relay took within the
    /// window (for a relay that restarted meanwhile and has no marks of before).
    fn refill_from(&self) -> anyhow::Result<u64> {
        let by_mark = match self.marks.front() {
            Some(&(when, mark))
                if Instant::now().duration_since(when) + Duration::from_secs(2)
                    >= self.refill_window =>
            {
                mark
            }
            _ => self.log.first(),
        };
        let since = now_ms() - i64::try_from(self.refill_window.as_millis()).unwrap_or(i64::MAX);
        let by_time = self.first_taken_since(since)?;
        Ok(by_mark.min(by_time).max(self.log.first()))
    }

    /// The first message number taken at or after `since_ms`, by bisection over the
    /// kept messages (their times only grow with their numbers).
    fn first_taken_since(&self, since_ms: i64) -> anyhow::Result<u64> {
        let (mut low, mut high) = (self.log.first(), self.log.next());
        while low < high {
            let middle = low + (high - low) / 2;
            match self.log.taken_at(middle)? {
                Some((number, received_ms)) if received_ms < since_ms => low = number + 1,
                _ => high = middle,
            }
        }
        Ok(low)
    }
}

/// Ends at `until`; never without one.
async fn pause_ends(until: Option<Instant>) {
    match until {
        Some(until) => tokio::time::sleep_until(until).await,
        None => std::future::pending().await,
    }
}
