//! The cloud side over NATS JetStream, when `--cloud-broker` holds `nats://` addresses:
//! what is in the log is published, in order, into the stream on `iot.telemetry.<site>`
//! with its topic, QoS and retain flag as headers, and counts as forwarded once the
//! stream acknowledged it (stored on a majority of its replicas).
//!
//! Each message carries `Nats-Msg-Id` = site, the run that wrote it
//! ([`crate::log::Log::run_of`]) and its number ([`iot_core::nats::message_id`]):
//! whatever is sent again (after a failed
//! acknowledgement, a reconnect to another node, or a relay killed before its
//! forwarded mark reached the disk) is refused by the stream as a duplicate within its
//! duplicate window, and acknowledged as stored. So there is no refill: a JetStream
//! cluster with three replicas does not lose what it acknowledged with one node.
//!
//! A full stream refuses new messages (`discard new`), and the relay keeps them in its
//! log meanwhile. nats-server before 2.10.5 takes a message at the limit and removes
//! the stream's oldest instead (nats-io/nats-server#4775), so there the relay reads the
//! stream's bytes once a second ([`watch_stream`]) and holds its log while they, with
//! what it published since, would come within a tenth of the stream's `max_bytes`,
//! each relay taking at most its share of the room between two reads ([`Room::fits`]).
//!
//! Readings the relay answers to replay requests from its log ([`crate::inbound_nats`])
//! go into the stream too, on the same subject but without a message id: a reading
//! asked again (its first answer lost) must not be refused as a copy; they are keyed
//! readings, and the database refuses a second one.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::context::PublishError;
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::{self, publish::PublishAck};
use futures_util::stream::{FuturesOrdered, FuturesUnordered, StreamExt};
use iot_core::backoff::Backoff;
use iot_core::nats::{self, NatsSettings};
use tokio::sync::{mpsc, watch, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::forward::{Replay, WINDOW, WINDOW_BYTES};
use crate::log::{Entry, Log};

/// Messages read from the log at once.
const READ: usize = 256;
/// Bytes of messages read from the log at once (but always one message).
const READ_BYTES: usize = 8 << 20;
/// How long a stop waits for the stream to acknowledge what is in flight.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the stream's acknowledgement of one publish is waited for: a node that
/// died with it is given up on within this, and the message sent again (to another).
const ACK_TIMEOUT: Duration = Duration::from_secs(5);

/// How often the stream's bytes are read, on servers that need it ([`Room`]).
const ROOM_EVERY: Duration = Duration::from_secs(1);
/// Bytes a message takes in the stream beyond its payload and topic, at most: the
/// subject, the headers and the store's record (an estimate on the safe side).
const STORED_OVERHEAD: usize = 256;

/// What the stream has room for, as the relay last read it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Room {
    /// Not read yet: nothing is published before it is (the stream may be full).
    Unknown,
    /// The server refuses past the stream's limit by itself, or the stream has none.
    Unbounded,
    /// The stream held `bytes` of its `max_bytes` when read (read number `read`), from
    /// `sites` subjects (the sites whose messages wait in it). See [`Room::fits`].
    Bytes {
        bytes: u64,
        max: u64,
        sites: u64,
        read: u64,
    },
}

impl Room {
    /// The room of a stream holding `bytes` of `max_bytes` (`-1`: no limit) from
    /// `sites` subjects, on a server that does (`holds`) or does not keep to its limit.
    pub fn of(holds: bool, max_bytes: i64, bytes: u64, sites: u64, read: u64) -> Self {
        match u64::try_from(max_bytes) {
            Ok(max) if max > 0 && !holds => Room::Bytes {
                bytes,
                max,
                sites,
                read,
            },
            _ => Room::Unbounded,
        }
    }

    /// Whether a message taking `stored` bytes in the stream may go, this relay having
    /// published `sent` bytes since the read. A tenth of `max_bytes` is kept free, and
    /// each relay takes, between two reads, at most its share of the room left: the
    /// room split among the sites in the stream and one more (a site not in it yet), as
    /// every relay reads the same bytes and none knows what the others send. Into a
    /// stream that was empty, with nothing sent since, one message up to `max_bytes`
    /// goes whatever its size (else one larger than the share would wait for ever).
    pub fn fits(&self, sent: u64, stored: u64) -> bool {
        match *self {
            Room::Unknown => false,
            Room::Unbounded => true,
            Room::Bytes {
                bytes, max, sites, ..
            } => {
                if bytes + sent == 0 {
                    return stored <= max;
                }
                let room = (max - max / 10).saturating_sub(bytes);
                sent + stored <= room / (sites.max(1) + 1)
            }
        }
    }

    /// The stream's bytes and the limit the relays keep it within, when bounded.
    fn fill(&self) -> Option<(u64, u64)> {
        match *self {
            Room::Bytes { bytes, max, .. } => Some((bytes, max - max / 10)),
            _ => None,
        }
    }
}

/// One publish waiting for its acknowledgement: the message's number, its payload's
/// bytes, and the acknowledgement.
type InFlight = Pin<
    Box<dyn std::future::Future<Output = (u64, usize, Result<PublishAck, PublishError>)> + Send>,
>;

/// Publishes the log into the stream; see the module documentation.
pub struct NatsForwarder {
    client: async_nats::Client,
    js: jetstream::Context,
    log: Log,
    /// Told what leaves the log, so that its account's share has room again.
    accounts: Arc<crate::accounts::Accounts>,
    /// New messages in the log.
    wake: Arc<Notify>,
    subject: String,
    site: String,
    /// The next message number to publish.
    cursor: u64,
    in_flight: FuturesOrdered<InFlight>,
    /// Payload bytes of `in_flight`.
    in_flight_bytes: usize,
    /// After a failure, nothing is published before this.
    held_until: Option<Instant>,
    backoff: Backoff,
    /// Whether the forwarded mark moved since the last sync.
    marked: bool,
    /// `--refill-window`: what the stream's duplicate window should cover at least.
    refill_window: Duration,
    /// Failures in a row since the last acknowledgement or the last try of another node.
    failing: u32,
    /// Readings answered from the log, to publish.
    replays: mpsc::Receiver<Replay>,
    /// Replays waiting for the stream's acknowledgement (a failed one is asked again).
    replaying: FuturesUnordered<Pin<Box<dyn std::future::Future<Output = ()> + Send>>>,
    /// The stream's room as [`watch_stream`] last read it.
    room: watch::Receiver<Room>,
    room_sender: Option<watch::Sender<Room>>,
    /// The read of the room that `sent` counts from, and the bytes published since
    /// (each message's estimate in the stream).
    room_read: u64,
    sent: u64,
    /// Whether the relay said it holds its log for the stream's room.
    held_for_room: bool,
}

impl std::fmt::Debug for NatsForwarder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsForwarder")
            .field("subject", &self.subject)
            .field("cursor", &self.cursor)
            .field("in_flight", &self.in_flight.len())
            .finish_non_exhaustive()
    }
}

impl NatsForwarder {
    /// Connects (in the background: a cluster that is down is waited for) as the
    /// relay of `site`.
    pub async fn start(
        settings: &NatsSettings,
        site: &str,
        log: Log,
        accounts: Arc<crate::accounts::Accounts>,
        wake: Arc<Notify>,
        refill_window: Duration,
        replays: mpsc::Receiver<Replay>,
    ) -> anyhow::Result<Self> {
        let client = settings.connect(&format!("edge-relay-{site}")).await?;
        let js = jetstream::ContextBuilder::new()
            .timeout(ACK_TIMEOUT)
            .max_ack_inflight(WINDOW)
            .build(client.clone());
        let cursor = log.forwarded().max(log.first());
        let (room_sender, room) = watch::channel(Room::Unknown);
        Ok(Self {
            client,
            js,
            log,
            accounts,
            wake,
            subject: nats::site_subject(site),
            site: site.to_string(),
            cursor,
            in_flight: FuturesOrdered::new(),
            in_flight_bytes: 0,
            held_until: None,
            backoff: Backoff::new(Duration::from_millis(100), Duration::from_secs(5)),
            marked: false,
            refill_window,
            failing: 0,
            replays,
            replaying: FuturesUnordered::new(),
            room,
            room_sender: Some(room_sender),
            room_read: 0,
            sent: 0,
            held_for_room: false,
        })
    }

    /// The connection, for what the relay reads from NATS.
    pub fn client(&self) -> async_nats::Client {
        self.client.clone()
    }

    /// Forwards until `shutdown`, then waits a little for what is in flight. An error is
    /// a log that cannot be read or written.
    pub async fn run(mut self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let room_sender = self.room_sender.take().context("run once")?;
        let checked = tokio::spawn(watch_stream(
            self.js.clone(),
            self.client.clone(),
            self.refill_window,
            room_sender,
        ));
        let mut ticks = tokio::time::interval(Duration::from_secs(1));
        loop {
            if self.held_until.is_none() {
                self.fill().await?;
            }
            tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                Some((number, bytes, acked)) = self.in_flight.next() => {
                    self.in_flight_bytes -= bytes;
                    self.acked(number, acked)?;
                }
                () = hold_ends(self.held_until) => self.held_until = None,
                () = self.wake.notified() => {}
                Ok(()) = self.room.changed() => {}
                Some(replay) = self.replays.recv(), if self.replaying.len() < WINDOW => self.send_replay(replay).await,
                Some(()) = self.replaying.next() => {}
                _ = ticks.tick() => self.sync_mark()?,
            }
        }
        checked.abort();
        let deadline = Instant::now() + CLOSE_TIMEOUT;
        while let Ok(Some((number, bytes, acked))) =
            tokio::time::timeout_at(deadline, self.in_flight.next()).await
        {
            self.in_flight_bytes -= bytes;
            if acked.is_err() {
                break;
            }
            self.acked(number, acked)?;
        }
        if !self.in_flight.is_empty() {
            tracing::info!(
                in_flight = self.in_flight.len(),
                "stopping with publishes the stream has not acknowledged: sent again on the next start (the stream knows them by their ids)"
            );
        }
        self.log.sync()?;
        // What was published and not flushed yet goes out before the connection closes.
        nats::flush_before_stop(&self.client).await;
        Ok(())
    }

    /// Publishes from the cursor while the window has room.
    async fn fill(&mut self) -> anyhow::Result<()> {
        let max_payload = self.client.server_info().max_payload;
        while self.in_flight.len() < WINDOW
            && self.in_flight_bytes < WINDOW_BYTES
            && self.cursor < self.log.next()
        {
            let room = WINDOW - self.in_flight.len();
            let bytes = READ_BYTES.min(WINDOW_BYTES - self.in_flight_bytes);
            let read = self.log.read_from(self.cursor, READ.min(room), bytes)?;
            let Some(&(last, _)) = read.last() else {
                return Ok(());
            };
            for (number, entry) in read {
                let stored = (entry.payload.len() + entry.topic.len() + STORED_OVERHEAD) as u64;
                if !self.has_room(stored) {
                    // From this message on when the stream has room.
                    self.cursor = number;
                    return Ok(());
                }
                self.accounts
                    .forwarding(number, &entry.topic, entry.payload.len());
                // A server that never answered has max_payload 0: it is not known yet.
                if max_payload > 0 && entry.payload.len() + 1024 > max_payload {
                    tracing::warn!(
                        number,
                        bytes = entry.payload.len(),
                        max_payload,
                        "the NATS cluster cannot take message {number} (its max_payload); passed over"
                    );
                    metrics::counter!("iot_relay_unforwardable_total").increment(1);
                    // Counted forwarded with the next acknowledgement after it.
                    continue;
                }
                self.sent += stored;
                let bytes = entry.payload.len();
                let publish = self.message(number, entry);
                match self.js.send_publish(self.subject.clone(), publish).await {
                    Ok(ack) => {
                        self.in_flight
                            .push_back(Box::pin(async move { (number, bytes, ack.await) }));
                        self.in_flight_bytes += bytes;
                    }
                    Err(error) => {
                        self.failed(&error.to_string());
                        return Ok(());
                    }
                }
            }
            self.cursor = last + 1;
        }
        Ok(())
    }

    /// Whether the stream has room for a message taking `stored` bytes there ([`Room`]);
    /// says when the log is held for room, and when it goes on.
    fn has_room(&mut self, stored: u64) -> bool {
        let room = *self.room.borrow_and_update();
        if let Room::Bytes { read, .. } = room {
            if read != self.room_read {
                // What is still in flight may not be in the bytes read.
                self.room_read = read;
                self.sent = self.in_flight_bytes as u64;
            }
        }
        let fits = room.fits(self.sent, stored);
        // Said once the stream is half way to the limit and the relay waits for its
        // share, and again when below a quarter: not at every second's share.
        if let Some((bytes, limit)) = room.fill() {
            if !fits && !self.held_for_room && bytes >= limit / 2 {
                tracing::warn!(
                    stream_bytes = bytes,
                    limit,
                    "the NATS stream is filling up (this nats-server would remove its oldest messages past its max_bytes: nats-io/nats-server#4775): publishing only a share of the room left each second, the rest held in the log until the persisters catch up"
                );
                metrics::gauge!("iot_relay_held_for_stream_room").set(1.0);
                self.held_for_room = true;
            } else if self.held_for_room && bytes < limit / 4 {
                tracing::info!(stream_bytes = bytes, "the NATS stream has room again");
                metrics::gauge!("iot_relay_held_for_stream_room").set(0.0);
                self.held_for_room = false;
            }
        }
        fits
    }

    /// Publishes a reading answered from the log, at QoS 1 as on MQTT, with no message
    /// id (see the module documentation).
    async fn send_replay(&mut self, replay: Replay) {
        let headers = nats::mqtt_headers(&replay.topic, 1, false);
        let publish = PublishMessage::build()
            .payload(replay.payload.into())
            .headers(headers);
        match self.js.send_publish(self.subject.clone(), publish).await {
            Ok(ack) => {
                metrics::counter!("iot_relay_replayed_total").increment(1);
                self.replaying.push(Box::pin(async move {
                    if let Err(error) = ack.await {
                        tracing::debug!("a replayed reading not acknowledged by the stream ({error}): the persister asks again");
                    }
                }));
            }
            Err(error) => tracing::debug!(
                "a replayed reading not published ({error}): the persister asks again"
            ),
        }
    }

    /// The stream's message of log message `number`.
    fn message(&self, number: u64, entry: Entry) -> PublishMessage {
        let headers = nats::mqtt_headers(&entry.topic, entry.qos as u8, entry.retain);
        PublishMessage::build()
            .payload(entry.payload)
            .headers(headers)
            .message_id(nats::message_id(
                &self.site,
                self.log.run_of(number),
                number,
            ))
    }

    /// The stream's answer to the oldest publish in flight.
    fn acked(
        &mut self,
        number: u64,
        acked: Result<PublishAck, PublishError>,
    ) -> anyhow::Result<()> {
        match acked {
            Ok(_) => {
                self.log.note_forwarded(number + 1);
                self.marked = true;
                self.failing = 0;
                metrics::counter!("iot_relay_forwarded_total").increment(1);
                if self.backoff.attempt() > 0 {
                    tracing::info!("the NATS stream acknowledges again");
                    self.backoff.reset();
                }
            }
            Err(error) => self.failed(&error.to_string()),
        }
        Ok(())
    }

    /// A publish failed (no stream yet, a full stream, a node gone, a timeout): what is in
    /// flight is given up, and sent again from the forwarded mark after a delay. What the
    /// stream already had is refused there as a duplicate and acknowledged.
    fn failed(&mut self, why: &str) {
        let delay = self.backoff.next_delay();
        if self.backoff.attempt() == 1 {
            tracing::warn!(
                in_flight = self.in_flight.len(),
                "publishing into the NATS stream failed: {why}; sending again from message {} in {delay:?}",
                self.log.forwarded().max(self.log.first())
            );
        } else {
            tracing::debug!(
                attempt = self.backoff.attempt(),
                "publishing into the NATS stream failed again: {why}"
            );
        }
        self.in_flight = FuturesOrdered::new();
        self.in_flight_bytes = 0;
        self.cursor = self.log.forwarded().max(self.log.first());
        self.held_until = Some(Instant::now() + delay);
        self.failing += 1;
        if self.failing >= nats::FAILURES_BEFORE_ANOTHER_NODE {
            self.failing = 0;
            nats::try_another_node(&self.client);
        }
    }

    /// Once a second: the forwarded mark to disk if it moved, so that a relay killed now
    /// sends again at most a second's worth, well within the stream's duplicate window.
    fn sync_mark(&mut self) -> anyhow::Result<()> {
        if std::mem::take(&mut self.marked) {
            self.log.sync()?;
        }
        Ok(())
    }
}

/// Ends at `until`; never without one.
async fn hold_ends(until: Option<Instant>) {
    match until {
        Some(until) => tokio::time::sleep_until(until).await,
        None => std::future::pending().await,
    }
}

/// Says whether the stream is there, and warns when its duplicate window is shorter
/// than `--refill-window`, what this relay's settings say it may send again. Then
/// tells `room` the stream's room ([`Room`]): once if the server keeps to the stream's
/// limit by itself, else read again every [`ROOM_EVERY`].
async fn watch_stream(
    js: jetstream::Context,
    client: async_nats::Client,
    refill_window: Duration,
    room: watch::Sender<Room>,
) {
    let mut backoff = Backoff::default();
    let mut stream = loop {
        match js.get_stream(nats::STREAM).await.context("stream info") {
            Ok(stream) => break stream,
            Err(error) => {
                let delay = backoff.next_delay();
                if backoff.attempt() == 1 {
                    tracing::warn!(
                        "the NATS stream {} is not there yet ({error:#}); messages wait in the log until a persister makes it",
                        nats::STREAM
                    );
                }
                tokio::time::sleep(delay).await;
            }
        }
    };
    let info = stream.cached_info();
    if info.config.duplicate_window < refill_window {
        tracing::warn!(
            stream = nats::STREAM,
            duplicate_window = ?info.config.duplicate_window,
            refill_window = ?refill_window,
            "the NATS stream's duplicate window is shorter than --refill-window: a message sent again after it is stored twice when it has no (device, boot, seq); raise the persister's --nats-duplicate-window"
        );
    } else {
        tracing::info!(
            stream = nats::STREAM,
            replicas = info.config.num_replicas,
            duplicate_window = ?info.config.duplicate_window,
            "publishing into the NATS stream"
        );
    }
    // Connected by now (the stream answered): the server's INFO is in.
    let version = client.server_info().version;
    let holds = nats::holds_max_bytes(&version);
    if !holds {
        tracing::info!(
            version,
            max_bytes = info.config.max_bytes,
            "this nats-server removes a full stream's oldest messages (nats-io/nats-server#4775, fixed in 2.10.5): a tenth of the stream's max_bytes is kept free, this relay publishing a share of the room left each second"
        );
    }
    let mut read = 0u64;
    let mut info = info.clone();
    loop {
        read += 1;
        let now = Room::of(
            holds,
            info.config.max_bytes,
            info.state.bytes,
            info.state.subjects_count,
            read,
        );
        // A stream without a limit may get one (a persister started with other flags).
        if room.send(now).is_err() || holds {
            return;
        }
        tokio::time::sleep(ROOM_EVERY).await;
        // A read that fails (no leader for a moment) keeps the last room.
        while let Err(error) = stream.info().await.map(|new| info = new.clone()) {
            tracing::debug!("cannot read the NATS stream's bytes: {error}");
            tokio::time::sleep(ROOM_EVERY).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_server_before_2_10_5_keeps_a_tenth_of_the_stream_free() {
        let room = |bytes, sites| Room::of(false, 1000, bytes, sites, 7);
        assert_eq!(
            room(300, 1),
            Room::Bytes {
                bytes: 300,
                max: 1000,
                sites: 1,
                read: 7
            }
        );
        // 600 left below 900, split between the one site in the stream and one more.
        assert!(room(300, 1).fits(0, 300));
        assert!(!room(300, 1).fits(0, 301));
        assert!(!room(300, 1).fits(200, 101));
        // No site in the stream counts as one: two new relays at once stay within it.
        assert!(room(300, 0).fits(0, 300));
        assert!(!room(300, 0).fits(0, 301));
        // Three sites: a quarter each.
        assert!(room(300, 3).fits(0, 150));
        assert!(!room(300, 3).fits(0, 151));
        // Full: nothing goes.
        assert!(!room(900, 1).fits(0, 1));
        assert_eq!(room(900, 1).fill(), Some((900, 900)));
        assert_eq!(Room::Unbounded.fill(), None);
        // One message larger than any share goes into an empty stream, up to the limit.
        assert!(room(0, 0).fits(0, 1000));
        assert!(!room(0, 0).fits(0, 1001));
        assert!(!room(0, 0).fits(1, 1000));
        // A server that keeps to the limit, or a stream without one: nothing held.
        assert_eq!(Room::of(true, 1000, 999, 1, 1), Room::Unbounded);
        assert_eq!(Room::of(false, -1, 999, 1, 1), Room::Unbounded);
        assert_eq!(Room::of(false, 0, 999, 1, 1), Room::Unbounded);
        assert!(Room::Unbounded.fits(u64::MAX / 2, 1));
        assert!(!Room::Unknown.fits(0, 1));
    }
}
