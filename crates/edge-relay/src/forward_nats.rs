//! The cloud side over NATS JetStream, when `--cloud-broker` holds `nats://` addresses:
//! what is in the log is published, in order, into the stream on `iot.telemetry.<site>`
//! with its topic, QoS and retain flag as headers, and counts as forwarded once the
//! stream acknowledged it (stored on a majority of its replicas).
//!
//! Each message carries `Nats-Msg-Id` = site, the log's own id and the message's
//! number ([`iot_core::nats::message_id`]): whatever is sent again (after a failed
//! acknowledgement, a reconnect to another node, or a relay killed before its
//! forwarded mark reached the disk) is refused by the stream as a duplicate within its
//! duplicate window, and acknowledged as stored. So there is no refill: a JetStream
//! cluster with three replicas does not lose what it acknowledged with one node.
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
use tokio::sync::{mpsc, Notify};
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
        })
    }

    /// The connection, for what the relay reads from NATS.
    pub fn client(&self) -> async_nats::Client {
        self.client.clone()
    }

    /// Forwards until `shutdown`, then waits a little for what is in flight. An error is
    /// a log that cannot be read or written.
    pub async fn run(mut self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let checked = tokio::spawn(check_stream(self.js.clone(), self.refill_window));
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
            .message_id(nats::message_id(&self.site, self.log.id(), number))
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

/// Says once whether the stream is there, and warns when its duplicate window is
/// shorter than `--refill-window`, what this relay's settings say it may send again.
async fn check_stream(js: jetstream::Context, refill_window: Duration) {
    let mut backoff = Backoff::default();
    loop {
        match js.get_stream(nats::STREAM).await.context("stream info") {
            Ok(mut stream) => {
                match stream.info().await {
                    Ok(info) if info.config.duplicate_window < refill_window => tracing::warn!(
                        stream = nats::STREAM,
                        duplicate_window = ?info.config.duplicate_window,
                        refill_window = ?refill_window,
                        "the NATS stream's duplicate window is shorter than --refill-window: a message sent again after it is stored twice when it has no (device, boot, seq); raise the persister's --nats-duplicate-window"
                    ),
                    Ok(info) => tracing::info!(
                        stream = nats::STREAM,
                        replicas = info.config.num_replicas,
                        duplicate_window = ?info.config.duplicate_window,
                        "publishing into the NATS stream"
                    ),
                    Err(error) => tracing::warn!("cannot read the NATS stream's settings: {error}"),
                }
                return;
            }
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
    }
}
