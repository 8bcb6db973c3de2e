//! The cloud side: what is in the log goes on to the cloud broker in order, with its
//! topic, payload and retain flag unchanged, at QoS 2, so that a relay killed at any
//! moment forwards nothing twice, plain values (which the persister cannot tell apart)
//! included:
//!
//! - Each message is published under a packet id that its number in the log gives
//!   ([`message_pid`]): a relay started again sends what was in doubt under the same ids.
//! - The cloud broker (Mosquitto 2.0) keeps a QoS 2 message it received (PUBREC)
//!   unreleased, delivering it to its subscribers only at the PUBREL; a PUBLISH under
//!   the id of one it holds (the same topic and payload) is a duplicate: answered PUBREC
//!   again, not delivered again. The session persists (the relay's client id is fixed,
//!   its session kept).
//! - A message counts as forwarded at its PUBREC, and the forwarded mark is synced to
//!   disk (one sync for the PUBRECs of a burst) before the PUBREL of any message it
//!   covers is written ([`Forwarder::synced`]).
//!
//! So after a crash, everything below the mark on disk was received by the broker and
//! is released now (the relay writes PUBREL for the ids of the [`SPAN`] messages below
//! it, which may still wait; the broker answers PUBCOMP for an id it no longer holds),
//! and nothing from the mark on was released: sent again, it is delivered once. At most
//! [`WINDOW`] messages wait for their PUBCOMP, and no two in flight are [`SPAN`] or more
//! apart, so no two messages the broker may hold share an id.
//!
//! A cloud broker that comes back without the relay's session may have lost what it had
//! accepted since its last save to disk: the relay sends again what it forwarded within
//! `--refill-window` before ([`Forwarder::refill_from`]), once `--refill-delay` has given
//! the broker's subscribers (whose sessions it lost too) time to subscribe again. Replays
//! the relay answers from its log ([`crate::inbound`]) go out on this connection too, at
//! QoS 1 under ids of their own (they are keyed readings: a copy is stored once).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use iot_core::mqtt::encodable;
use rumqttc::{Packet, PubRel, Publish, QoS};
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::accounts::Accounts;
use crate::cloud::{Cloud, Heard};
use crate::log::{now_ms, Log};

/// Publishes waiting for the cloud broker's last answer (PUBCOMP, PUBACK) at most.
pub const WINDOW: usize = 1000;
/// Payload bytes of publishes not released yet at most (but always one message): the
/// window alone would let 1000 messages of 2 MiB, 2 GiB, wait in memory.
pub const WINDOW_BYTES: usize = 64 << 20;
/// Packet ids of the log's messages: 1 to this. Replays take the ids above.
pub const MESSAGE_PIDS: u16 = 60_000;
/// Two messages in flight are less than this far apart in the log. So the messages whose
/// ids the broker may hold after a crash lie within `SPAN` below the mark on disk (received,
/// perhaps not released) and `SPAN` from it on (sent, not released): 2 × `SPAN` numbers,
/// within [`MESSAGE_PIDS`], so their ids differ.
pub const SPAN: u64 = 2 * WINDOW as u64;
const _: () = assert!(2 * SPAN <= MESSAGE_PIDS as u64);
/// The first packet id of replays (QoS 1): apart from the log's messages, so that a
/// replay never stands for a message the broker holds.
const FIRST_REPLAY_PID: u16 = MESSAGE_PIDS + 1;
/// Messages read from the log at once.
const READ: usize = 256;
/// Bytes of messages read from the log at once (but always one message).
const READ_BYTES: usize = 8 << 20;
/// How long a stop waits for the cloud to complete what is in flight.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// The packet id of message `number` of the log.
pub fn message_pid(number: u64) -> u16 {
    // The remainder is below MESSAGE_PIDS.
    (number % u64::from(MESSAGE_PIDS)) as u16 + 1
}

/// A reading answered from the log, to publish as it is.
#[derive(Debug)]
pub struct Replay {
    pub topic: String,
    pub payload: Vec<u8>,
}

/// Where a message of the log stands with the cloud broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Published, not received yet.
    Sent,
    /// Received (PUBREC): forwarded, to be released once the mark says so on disk.
    Received,
    /// Released (PUBREL written), waiting for its PUBCOMP.
    Released,
    /// Complete; or passed over (a message the cloud broker cannot take, too long for
    /// MQTT), which counts as forwarded.
    Done,
}

/// One message of the log in flight, in number order.
#[derive(Debug)]
struct Slot {
    number: u64,
    stage: Stage,
    /// The PUBLISH, until released: written again on a reconnect.
    publish: Option<Publish>,
    /// Its payload bytes, until released.
    bytes: usize,
    /// Released by an earlier run of the relay, as far as this one knows: a PUBREL only.
    resumed: bool,
}

#[derive(Debug)]
pub struct Forwarder {
    cloud: Cloud,
    log: Log,
    /// Told what leaves the log, so that its account's share has room again.
    accounts: Arc<Accounts>,
    /// New messages in the log.
    wake: Arc<Notify>,
    replays: mpsc::Receiver<Replay>,
    /// The log's messages in flight, in number order.
    slots: VecDeque<Slot>,
    /// How many of the first `slots` are received (or further on): the forwarded mark
    /// is the number of the next one.
    received: usize,
    /// Replays in flight: packet id, payload bytes, the PUBLISH.
    replaying: VecDeque<(u16, usize, Publish)>,
    next_replay_pid: u16,
    /// Payload bytes of `slots` not released yet and of `replaying`.
    bytes: usize,
    /// The next message number to publish.
    cursor: u64,
    /// The forwarded mark: everything below it received by the broker (or passed over).
    /// Written to the log with its sync ([`Forwarder::sync_mark`]).
    mark: u64,
    /// The forwarded mark as last synced to disk: messages below it may be released.
    durable: u64,
    /// A sync of the log under way, to the mark it returns.
    syncing: Option<JoinHandle<anyhow::Result<u64>>>,
    /// Whether a connection was made in this run.
    connected_once: bool,
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
        cloud: Cloud,
        log: Log,
        accounts: Arc<Accounts>,
        wake: Arc<Notify>,
        replays: mpsc::Receiver<Replay>,
        (refill_window, refill_delay): (Duration, Duration),
    ) -> Self {
        let durable = log.forwarded();
        let cursor = durable.max(log.first());
        Self {
            cloud,
            log,
            accounts,
            wake,
            replays,
            slots: VecDeque::new(),
            received: 0,
            replaying: VecDeque::new(),
            next_replay_pid: FIRST_REPLAY_PID,
            bytes: 0,
            cursor,
            mark: durable,
            durable,
            syncing: None,
            connected_once: false,
            refill_window,
            refill_delay,
            paused_until: None,
            marks: VecDeque::new(),
        }
    }

    /// Forwards until `shutdown`, then waits a little for what is in flight. An error
    /// is refused credentials or a log that cannot be read or synced.
    pub async fn run(mut self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let mut ticks = tokio::time::interval(Duration::from_secs(1));
        loop {
            // Not while the connection is down: what is in flight goes out again on the
            // next connection, as the broker's answer says.
            if self.paused_until.is_none() && self.cloud.is_connected() {
                self.fill().await?;
            }
            let room = self.has_room() && self.cloud.is_connected();
            tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                synced = until_synced(&mut self.syncing) => {
                    self.syncing = None;
                    self.synced(synced?).await?;
                }
                heard = self.cloud.next() => self.heard(heard?).await?,
                () = pause_ends(self.paused_until) => {
                    tracing::info!("forwarding again after the refill delay");
                    self.paused_until = None;
                }
                replay = self.replays.recv(), if room => {
                    if let Some(replay) = replay {
                        self.send_replay(replay).await;
                    }
                }
                () = self.wake.notified() => {}
                _ = ticks.tick() => {
                    self.keep_mark();
                    // Whatever moved the mark without a burst's end (passed-over messages).
                    self.sync_mark();
                }
            }
        }
        self.finish().await
    }

    /// On the way out: up to [`CLOSE_TIMEOUT`] for what is in flight to complete (its
    /// syncs and releases go on), then a clean disconnect.
    async fn finish(mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + CLOSE_TIMEOUT;
        while self.in_flight() > 0 && self.cloud.is_connected() {
            tokio::select! {
                biased;
                synced = until_synced(&mut self.syncing) => {
                    self.syncing = None;
                    self.synced(synced?).await?;
                }
                heard = self.cloud.next() => self.heard(heard?).await?,
                () = tokio::time::sleep_until(deadline) => break,
            }
        }
        if let Some(syncing) = self.syncing.take() {
            syncing.await.context("the log's sync failed")??;
        }
        // What was received since the last sync: released on the next start.
        self.log.mark_forwarded(self.mark)?;
        if self.in_flight() > 0 {
            tracing::info!(
                in_flight = self.in_flight(),
                "stopping before the cloud completed everything: what it did not receive is sent again on the next start (and taken as the duplicate it is), what it received is released then"
            );
        }
        self.cloud.close().await;
        Ok(())
    }

    /// Publishes and replays waiting for the broker.
    fn in_flight(&self) -> usize {
        self.slots.len() + self.replaying.len()
    }

    /// Whether the window has room for another publish.
    fn has_room(&self) -> bool {
        self.in_flight() < WINDOW && self.bytes < WINDOW_BYTES
    }

    /// Publishes from the log until the window is full or the log is done.
    async fn fill(&mut self) -> anyhow::Result<()> {
        while self.has_room() && self.cloud.is_connected() {
            let want = (WINDOW - self.in_flight()).min(READ);
            let cursor = self.cursor.max(self.log.first());
            // No two in flight SPAN apart (their ids must differ; see the header).
            let limit = self
                .slots
                .front()
                .map_or(u64::MAX, |slot| slot.number + SPAN);
            if cursor >= limit {
                return Ok(());
            }
            let bytes = READ_BYTES.min(WINDOW_BYTES - self.bytes);
            let read = self.log.read_from(cursor, want, bytes)?;
            if read.is_empty() {
                return Ok(());
            }
            let mut packets = Vec::with_capacity(read.len());
            let mut taken = false;
            for (number, entry) in read {
                if number >= limit {
                    break;
                }
                taken = true;
                self.cursor = number + 1;
                let bytes = entry.payload.len();
                self.accounts.forwarding(number, &entry.topic, bytes);
                if let Err(error) = encodable(&entry.topic, QoS::ExactlyOnce, bytes) {
                    tracing::warn!(
                        number,
                        "the cloud broker cannot take message {number}: {error}; passed over"
                    );
                    metrics::counter!("iot_mqtt_publishes_refused_total").increment(1);
                    metrics::counter!("iot_relay_unforwardable_total").increment(1);
                    self.push(number, Stage::Done, None);
                    continue;
                }
                let mut publish = Publish::from_bytes(entry.topic, QoS::ExactlyOnce, entry.payload);
                publish.retain = entry.retain;
                publish.pkid = message_pid(number);
                packets.push(Packet::Publish(publish.clone()));
                self.push(number, Stage::Sent, Some(publish));
            }
            if !taken {
                // What comes next lies past the limit (a stretch of numbers is missing).
                return Ok(());
            }
            if !packets.is_empty() {
                metrics::counter!("iot_mqtt_published_total").increment(packets.len() as u64);
                // Not written: the connection is gone, and they go out again on the next.
                self.cloud.write(packets).await;
            }
            self.settle();
        }
        Ok(())
    }

    fn push(&mut self, number: u64, stage: Stage, publish: Option<Publish>) {
        let bytes = publish.as_ref().map_or(0, |publish| publish.payload.len());
        self.bytes += bytes;
        self.slots.push_back(Slot {
            number,
            stage,
            publish,
            bytes,
            resumed: false,
        });
        self.gauge();
    }

    fn gauge(&self) {
        metrics::gauge!("iot_mqtt_unacknowledged").set(self.in_flight() as f64);
    }

    async fn send_replay(&mut self, replay: Replay) {
        let bytes = replay.payload.len();
        if encodable(&replay.topic, QoS::AtLeastOnce, bytes).is_err() {
            metrics::counter!("iot_mqtt_publishes_refused_total").increment(1);
            return;
        }
        let mut publish = Publish::new(replay.topic, QoS::AtLeastOnce, replay.payload);
        publish.pkid = self.next_replay_pid;
        self.next_replay_pid = self
            .next_replay_pid
            .checked_add(1)
            .unwrap_or(FIRST_REPLAY_PID);
        // Not written: sent again on the next connection, as the broker's answer says.
        self.cloud.write([Packet::Publish(publish.clone())]).await;
        self.replaying.push_back((publish.pkid, bytes, publish));
        self.bytes += bytes;
        metrics::counter!("iot_mqtt_published_total").increment(1);
        metrics::counter!("iot_relay_replayed_total").increment(1);
        self.gauge();
    }

    async fn heard(&mut self, heard: Heard) -> anyhow::Result<()> {
        match heard {
            Heard::Connected {
                session_present: true,
            } => self.resume().await,
            Heard::Connected {
                session_present: false,
            } => {
                self.connected_once = true;
                self.lost_session()?;
            }
            Heard::Packet(Packet::PubRec(rec)) => self.received_by_broker(rec.pkid).await,
            Heard::Packet(Packet::PubComp(comp)) => {
                if let Some(at) = self.find(comp.pkid) {
                    let slot = &mut self.slots[at];
                    if slot.stage == Stage::Released {
                        slot.stage = Stage::Done;
                        if !slot.resumed {
                            metrics::counter!("iot_mqtt_acknowledged_total").increment(1);
                        }
                    }
                }
            }
            Heard::Packet(Packet::PubAck(ack)) => {
                if let Some(at) = self.replaying.iter().position(|(pid, ..)| *pid == ack.pkid) {
                    if let Some((_, bytes, _)) = self.replaying.remove(at) {
                        self.bytes -= bytes;
                    }
                    metrics::counter!("iot_mqtt_acknowledged_total").increment(1);
                    self.gauge();
                }
            }
            Heard::Packet(_) => {}
        }
        if !self.cloud.has_read() {
            // The end of a burst: the mark, and one sync for all it moved; what a mark
            // already on disk covers (a refill sends again below it) is released now.
            self.settle();
            self.release().await;
            self.sync_mark();
        }
        Ok(())
    }

    /// The broker received message `pid` (PUBREC): forwarded, not released yet.
    async fn received_by_broker(&mut self, pid: u16) {
        let Some(at) = self.find(pid) else {
            tracing::debug!(pid, "a PUBREC for no message in flight; ignored");
            return;
        };
        let slot = &mut self.slots[at];
        match slot.stage {
            Stage::Sent => {
                slot.stage = Stage::Received;
                metrics::counter!("iot_relay_forwarded_total").increment(1);
            }
            // Asked again: it waits for this.
            Stage::Released => {
                self.cloud.write([Packet::PubRel(PubRel::new(pid))]).await;
            }
            Stage::Received | Stage::Done => {}
        }
    }

    /// The slot of the message with packet id `pid`, if in flight: the one number of the
    /// ids' cycle from the first slot on (slots span less than a cycle).
    fn find(&self, pid: u16) -> Option<usize> {
        if pid == 0 || pid > MESSAGE_PIDS {
            return None;
        }
        let front = self.slots.front()?.number;
        let cycle = u64::from(MESSAGE_PIDS);
        let number = front + (u64::from(pid) - 1 + cycle - front % cycle) % cycle;
        self.slots
            .binary_search_by_key(&number, |slot| slot.number)
            .ok()
    }

    /// Moves the forwarded mark past the messages received, and lets go of the complete
    /// ones at the front.
    fn settle(&mut self) {
        while self
            .slots
            .get(self.received)
            .is_some_and(|slot| slot.stage != Stage::Sent)
        {
            self.received += 1;
        }
        while self
            .slots
            .front()
            .is_some_and(|slot| slot.stage == Stage::Done)
        {
            self.slots.pop_front();
            self.received -= 1;
        }
        self.gauge();
        // Everything below the first message not received: received, or passed over.
        let mark = self
            .slots
            .get(self.received)
            .map_or(self.cursor, |slot| slot.number);
        self.mark = self.mark.max(mark);
    }

    /// Writes the forwarded mark to the log and syncs it, unless a sync runs (it starts
    /// again when done: what came meanwhile is one more sync, not one each). Both off the
    /// forwarder's task: the write waits for the journal, which the intake's syncs hold.
    fn sync_mark(&mut self) {
        if self.syncing.is_some() || self.mark <= self.durable {
            return;
        }
        let (log, mark) = (self.log.clone(), self.mark);
        self.syncing = Some(tokio::task::spawn_blocking(move || {
            log.mark_forwarded(mark).map(|()| mark)
        }));
    }

    /// The forwarded mark `mark` is on disk: what it covers is released (PUBREL), so that
    /// a relay killed from now on does not send it again.
    async fn synced(&mut self, mark: u64) -> anyhow::Result<()> {
        self.durable = self.durable.max(mark);
        self.release().await;
        self.sync_mark();
        Ok(())
    }

    /// Releases (PUBREL) what was received below the mark on disk. Not written (the
    /// connection is gone): written again on the next connection.
    async fn release(&mut self) {
        let mut releases = Vec::new();
        for slot in &mut self.slots {
            if slot.number >= self.durable {
                break;
            }
            if slot.stage == Stage::Received {
                slot.stage = Stage::Released;
                slot.publish = None;
                self.bytes -= std::mem::take(&mut slot.bytes);
                releases.push(Packet::PubRel(PubRel::new(message_pid(slot.number))));
            }
        }
        if !releases.is_empty() {
            self.cloud.write(releases).await;
        }
    }

    /// Connected with the relay's session kept: what the broker has not completed is
    /// written again, in order (a PUBLISH, marked a duplicate, of what was not released;
    /// a PUBREL of what was). On the first connection of a run, what
    /// the run before may have left received and unreleased is released first: the ids
    /// of the [`SPAN`] messages below the mark on disk.
    async fn resume(&mut self) {
        if !self.connected_once && self.slots.is_empty() {
            let from = self.durable.saturating_sub(SPAN).max(1);
            for number in from..self.durable {
                self.slots.push_back(Slot {
                    number,
                    stage: Stage::Released,
                    publish: None,
                    bytes: 0,
                    resumed: true,
                });
            }
            self.received = self.slots.len();
            if !self.slots.is_empty() {
                tracing::debug!(
                    count = self.slots.len(),
                    "releasing what the cloud broker may hold of the last run"
                );
            }
        }
        self.connected_once = true;
        let mut again = Vec::with_capacity(self.in_flight());
        for slot in &self.slots {
            match (slot.stage, &slot.publish) {
                // Received too: a broker that restarted from a save made before it took
                // the message no longer holds it, and one that does takes it as the
                // duplicate it is.
                (Stage::Sent | Stage::Received, Some(publish)) => {
                    let mut publish = publish.clone();
                    publish.dup = true;
                    again.push(Packet::Publish(publish));
                }
                (Stage::Released, _) => {
                    again.push(Packet::PubRel(PubRel::new(message_pid(slot.number))));
                }
                _ => {}
            }
        }
        for (_, _, publish) in &self.replaying {
            let mut publish = publish.clone();
            publish.dup = true;
            again.push(Packet::Publish(publish));
        }
        if !again.is_empty() {
            self.cloud.write(again).await;
        }
    }

    /// The cloud broker came back without the relay's session: it holds nothing of the
    /// relay's any more. What it had not released (or not received) is sent again from
    /// the log, replays not acknowledged are left to the persister (which asks again);
    /// when the broker may have lost what it had accepted (anything forwarded before, in
    /// this run or an earlier one), after the refill delay and from the start of the
    /// refill window.
    fn lost_session(&mut self) -> anyhow::Result<()> {
        if let Some(slot) = self
            .slots
            .iter()
            .find(|slot| matches!(slot.stage, Stage::Sent | Stage::Received))
        {
            self.cursor = self.cursor.min(slot.number);
        }
        self.slots.clear();
        self.received = 0;
        self.replaying.clear();
        self.bytes = 0;
        self.gauge();
        if self.mark > self.log.first() {
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

    /// Once a second: the forwarded mark, for the refill window.
    fn keep_mark(&mut self) {
        let now = Instant::now();
        self.marks.push_back((now, self.mark));
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

/// The outcome of the sync under way; never without one.
async fn until_synced(
    syncing: &mut Option<JoinHandle<anyhow::Result<u64>>>,
) -> anyhow::Result<u64> {
    match syncing.as_mut() {
        Some(task) => task.await.context("the log's sync failed")?,
        None => std::future::pending().await,
    }
}

/// Ends at `until`; never without one.
async fn pause_ends(until: Option<Instant>) {
    match until {
        Some(until) => tokio::time::sleep_until(until).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests;
