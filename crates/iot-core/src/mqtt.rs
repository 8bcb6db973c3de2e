//! An MQTT connection that keeps itself alive.
//!
//! [`Connection::start`] runs rumqttc's event loop in a task of its own (the driver)
//! that the service never blocks: it reconnects with capped, jittered exponential
//! backoff (logging every attempt), gives up only when the broker refuses the
//! credentials (retrying a wrong password forever helps nobody), and hands the service
//! the few events it cares about.
//!
//! Three rules keep a slow service from losing data or its connection:
//! - The driver never waits for the service. Events go into an unbounded queue, so the
//!   event loop keeps reading and sending keep-alive pings however long the service
//!   takes, with one bound: once [`MESSAGE_BACKLOG`] QoS 1 and 2 messages (or
//!   [`MESSAGE_BACKLOG_BYTES`] of payloads) wait for the service, the driver stops reading until it has taken half of them, and writes the
//!   keep-alive pings itself meanwhile. The broker keeps the rest (they are not
//!   acknowledged). Its in-flight window is no such bound: Mosquitto 2.0.11 with
//!   `max_inflight_messages 1000` had 41 000 messages unacknowledged to a consumer that
//!   acknowledged in batches of 500 at half the rate they came (a persister behind a slow
//!   database grew by 20 MiB a minute). QoS 0 messages do not count there; beyond
//!   [`QOS0_BACKLOG`] of them (or [`QOS0_BACKLOG_BYTES`]) waiting, new ones are dropped
//!   and counted, as a broker drops QoS 0 for a slow client.
//! - An acknowledgement belongs to the connection its message came on ([`Ack`]). After
//!   a reconnect the broker delivers unacknowledged messages again, and only those
//!   copies are acknowledged: a packet id of the old connection may name another
//!   message on the new one.
//! - Acknowledgements do not go through rumqttc's request channel: its event loop takes
//!   one request per turn, behind a batch of up to ten incoming packets, so a consumer
//!   draining a long queue fell ever further behind. The driver writes all that wait in
//!   one go instead, but only while connected: a connection attempt is never cancelled.
//!   QoS 1 and 2 publishes likewise: as many as rumqttc's in-flight window has room
//!   for, one flush for all (rumqttc wrote and flushed each on its own, a system call
//!   per publish), their packet ids and retries still rumqttc's state's.
//!
//! The driver relies on rumqttc internals (its pending queue, its state's leftover
//! events, packet writing through `MqttState`); the version is pinned exactly in the
//! workspace's `Cargo.toml` and each of those behaviours has a test below.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::anyhow;
use rumqttc::{
    AsyncClient, ConnectReturnCode, ConnectionError, EventLoop, MqttOptions, Outgoing, Packet,
    PubAck, PubRec, Publish, QoS, Request, SubscribeFilter, SubscribeReasonCode, Unsubscribe,
};
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::backoff::Backoff;
use crate::config::BrokerSettings;

/// Capacity of rumqttc's request channel: publishes, subscriptions, the disconnect.
/// Acknowledgements of received messages take their own path (see the module header).
const REQUEST_CAPACITY: usize = u16::MAX as usize;
/// Most acknowledgements written in one go.
const ACK_BATCH: usize = 4096;
/// Most QoS 1/2 publishes written in one go (and no more than the in-flight window has
/// room for).
const PUBLISH_BATCH: usize = 1000;
/// Most QoS 0 messages waiting for the service; more are dropped (see the header).
pub const QOS0_BACKLOG: usize = 100_000;
/// Most payload bytes of QoS 0 messages waiting for the service (but always one); more
/// are dropped likewise: 100 000 messages of 2 MiB would be 200 GiB.
pub const QOS0_BACKLOG_BYTES: usize = 8 << 20;
/// QoS 1 and 2 messages waiting for the service at which the driver stops reading (see
/// the header); it reads again once no more than half of them wait.
pub const MESSAGE_BACKLOG: usize = 1000;
/// The same in payload bytes: 1000 messages of 2 MiB would be 2 GiB.
pub const MESSAGE_BACKLOG_BYTES: usize = 16 << 20;

/// Messages the driver handed over and the service has not taken yet.
#[derive(Debug, Default)]
struct Backlog {
    qos0: AtomicUsize,
    qos0_bytes: AtomicUsize,
    /// QoS 1 and 2.
    reliable: AtomicUsize,
    reliable_bytes: AtomicUsize,
    /// Wakes a driver that stopped reading, once the service took enough.
    room: Notify,
    /// Whether the driver is connected (set at the broker's CONNACK, cleared at a loss).
    connected: AtomicBool,
}

impl Backlog {
    /// The service took `event` from the queue.
    fn taken(&self, event: &Event) {
        if let Event::Message { publish, .. } = event {
            let bytes = publish.payload.len();
            if publish.qos == QoS::AtMostOnce {
                self.qos0.fetch_sub(1, Ordering::Relaxed);
                self.qos0_bytes.fetch_sub(bytes, Ordering::Relaxed);
            } else {
                let count = self.reliable.fetch_sub(1, Ordering::Relaxed) - 1;
                let bytes = self.reliable_bytes.fetch_sub(bytes, Ordering::Relaxed) - bytes;
                if count <= MESSAGE_BACKLOG / 2 && bytes <= MESSAGE_BACKLOG_BYTES / 2 {
                    self.room.notify_one();
                }
            }
        }
    }

    /// Whether a driver that stopped reading may read again.
    fn has_room(&self) -> bool {
        self.reliable.load(Ordering::Relaxed) <= MESSAGE_BACKLOG / 2
            && self.reliable_bytes.load(Ordering::Relaxed) <= MESSAGE_BACKLOG_BYTES / 2
    }
}

/// What the service hears from its connection.
#[derive(Debug)]
pub enum Event {
    /// A connection (or reconnection) was accepted; `forgotten` of the service's publishes
    /// the broker had not acknowledged are not sent again (see [`Unconfirmed::Forget`]).
    Connected {
        session_present: bool,
        forgotten: u64,
    },
    /// The broker answered a subscription; one code per topic filter.
    Subscribed(Vec<SubscribeReasonCode>),
    /// A message arrived; `ack` acknowledges it (with manual acknowledgements on).
    Message { publish: Publish, ack: Ack },
    /// The broker acknowledged one of our QoS 1 or 2 publishes.
    Acked,
    /// The broker answered an unsubscribe.
    Unsubscribed,
}

/// What becomes of the service's QoS 1/2 publishes the broker had not acknowledged when
/// a connection dropped, once it comes back without the session (it lost its state).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unconfirmed {
    /// Sent again: they arrive at least once (a sensor's readings).
    Resend,
    /// Not sent again, nor those queued since the connection dropped, and counted in
    /// [`Event::Connected`]: for a service that sends them again itself when it is ready
    /// (`edge-relay`'s refill, once the broker's subscribers are back), which would
    /// otherwise deliver them twice.
    Forget,
}

/// How to acknowledge one received message: its packet id on the connection it came
/// on. Small and `Copy`, so a service can keep it instead of the whole message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ack {
    /// Which connection of this [`Connection`] the message came on, counted from 1.
    connection: u64,
    pkid: u16,
    qos: QoS,
}

impl Ack {
    /// The acknowledgement of `publish`, received on connection number `connection`:
    /// only the driver makes them.
    fn of(publish: &Publish, connection: u64) -> Self {
        Self {
            connection,
            pkid: publish.pkid,
            qos: publish.qos,
        }
    }
}

/// What the service asks the driver to write, in order.
#[derive(Debug)]
enum Outbound {
    Ack(Ack),
    /// An unsubscribe from a filter nobody uses: its answer proves the broker read
    /// everything written before it.
    Barrier,
}

/// A running connection: the client to send with, and its events.
#[derive(Debug)]
pub struct Connection {
    pub client: AsyncClient,
    events: mpsc::UnboundedReceiver<Event>,
    /// Messages queued in `events` (the driver drops new QoS 0 ones past their bound,
    /// and stops reading past [`MESSAGE_BACKLOG`]).
    backlog: Arc<Backlog>,
    /// Acknowledgements (and barriers) for the driver to write, in order.
    outbound: mpsc::UnboundedSender<Outbound>,
    /// QoS 1/2 publishes for the driver to write, in order.
    publishes: mpsc::Sender<Publish>,
    /// The event loop task; taken once its outcome was collected.
    driver: Option<JoinHandle<anyhow::Result<()>>>,
    /// QoS 1/2 publishes sent through [`Connection::publish`] and not yet acknowledged.
    unacked: u64,
    /// QoS 1/2 publishes the broker acknowledged so far.
    acknowledged: u64,
    /// Whether [`Connection::ack`] sent acknowledgements the broker may not have read yet.
    acks_sent: bool,
}

/// A topic filter nobody subscribes to: unsubscribing from it is a harmless round trip.
const BARRIER_FILTER: &str = "$iot-pipeline/barrier/never-subscribed";

impl Connection {
    /// Starts connecting to `broker` with `options` in the background; the readiness
    /// check [`BROKER_CHECK`] follows the connection.
    pub fn start(broker: &BrokerSettings, options: MqttOptions) -> Self {
        Self::start_checked(broker, options, Some(BROKER_CHECK), Unconfirmed::Resend)
    }

    /// As [`Connection::start`], with the readiness check of another name, or none for a
    /// connection the service is ready without (`edge-relay`'s to the cloud: a cloud
    /// that is down is what it is there for), and `unconfirmed` saying what becomes of
    /// unacknowledged publishes when the broker lost the session.
    pub fn start_checked(
        broker: &BrokerSettings,
        options: MqttOptions,
        check: Option<&'static str>,
        unconfirmed: Unconfirmed,
    ) -> Self {
        let (client, mut eventloop) = AsyncClient::new(options, REQUEST_CAPACITY);
        // rumqttc writes whole batches of packets at once, so Nagle's algorithm only adds
        // delay: up to 40 ms on the last packets before a pause, against delayed ACKs.
        let mut network = eventloop.network_options();
        network.set_tcp_nodelay(true);
        eventloop.set_network_options(network);
        let (events_tx, events) = mpsc::unbounded_channel();
        let (outbound, outbound_rx) = mpsc::unbounded_channel();
        let (publishes, publishes_rx) = mpsc::channel(REQUEST_CAPACITY);
        let backlog = Arc::new(Backlog::default());
        if let Some(check) = check {
            crate::ops::health().set(
                check,
                Err(format!("not connected to {} yet", broker.address())),
            );
        }
        metrics::gauge!("iot_mqtt_connected").set(0.0);
        let driver = Driver {
            eventloop,
            events: events_tx,
            backlog: Arc::clone(&backlog),
            paused: None,
            outbound: outbound_rx,
            batch: Vec::with_capacity(ACK_BATCH),
            publishes: publishes_rx,
            to_publish: Vec::with_capacity(PUBLISH_BATCH),
            address: broker.address(),
            broker: broker.clone(),
            backoff: Backoff::starting(),
            check,
            connection: 0,
            unconfirmed: Vec::new(),
            without_session: unconfirmed,
            dropped_qos0: 0,
            stale_acks: 0,
        };
        Self {
            client,
            events,
            backlog,
            outbound,
            publishes,
            driver: Some(tokio::spawn(driver.run())),
            unacked: 0,
            acknowledged: 0,
            acks_sent: false,
        }
    }

    /// Subscribes to `filters` (the answer comes as [`Event::Subscribed`]).
    pub async fn subscribe(&mut self, filters: Vec<SubscribeFilter>) -> anyhow::Result<()> {
        if self.client.subscribe_many(filters).await.is_err() {
            return Err(self.why_stopped().await);
        }
        Ok(())
    }

    /// Unsubscribes from `filters`, one request each (each answer comes as
    /// [`Event::Unsubscribed`]).
    pub async fn unsubscribe(&mut self, filters: &[String]) -> anyhow::Result<()> {
        for filter in filters {
            if self.client.unsubscribe(filter.clone()).await.is_err() {
                return Err(self.why_stopped().await);
            }
        }
        Ok(())
    }

    /// Acknowledges a message received with manual acknowledgements on. Never waits:
    /// the driver writes it with the others that wait, on the connection the message
    /// came on, or not at all when that connection is gone (the broker sends the
    /// message again on the new one).
    pub async fn ack(&mut self, ack: Ack) -> anyhow::Result<()> {
        if ack.qos == QoS::AtMostOnce {
            return Ok(());
        }
        if self.outbound.send(Outbound::Ack(ack)).is_err() {
            return Err(self.why_stopped().await);
        }
        self.acks_sent = true;
        Ok(())
    }

    /// Asks the broker for a round trip behind everything sent so far; its answer comes
    /// as [`Event::Unsubscribed`] once the broker has read it all (and has sent us what
    /// it sends in answer to it: the broker answers in order).
    pub async fn barrier(&mut self) -> anyhow::Result<()> {
        if self.outbound.send(Outbound::Barrier).is_err() {
            return Err(self.why_stopped().await);
        }
        Ok(())
    }

    /// Queues a publish; waits only while its queue (the driver's for QoS 1 and 2,
    /// rumqttc's request channel for QoS 0) is full. QoS 1 and 2 publishes are counted until the broker acknowledges them. A packet the protocol
    /// or the broker cannot take is refused at once as an [`Unencodable`] error of this
    /// publish alone (written, rumqttc would cut a long topic's length to 16 bits and
    /// the broker read a different packet, or drop the connection and be sent it again
    /// on every reconnect); any other error means the connection is gone.
    pub async fn publish(
        &mut self,
        topic: &str,
        qos: QoS,
        retain: bool,
        payload: Vec<u8>,
    ) -> anyhow::Result<()> {
        if let Err(refused) = encodable(topic, qos, payload.len()) {
            metrics::counter!("iot_mqtt_publishes_refused_total").increment(1);
            return Err(refused.into());
        }
        let queued = if qos == QoS::AtMostOnce {
            self.client
                .publish(topic, qos, retain, payload)
                .await
                .is_ok()
        } else {
            let mut publish = Publish::new(topic, qos, payload);
            publish.retain = retain;
            self.publishes.send(publish).await.is_ok()
        };
        if !queued {
            return Err(self.why_stopped().await);
        }
        metrics::counter!("iot_mqtt_published_total").increment(1);
        if qos != QoS::AtMostOnce {
            self.unacked += 1;
            metrics::gauge!("iot_mqtt_unacknowledged").set(self.unacked as f64);
        }
        Ok(())
    }

    /// The next event. An error means the connection ended for good: the broker refused
    /// the credentials, or the connection was closed.
    pub async fn recv(&mut self) -> anyhow::Result<Event> {
        match self.events.recv().await {
            Some(event) => {
                match &event {
                    Event::Acked => {
                        self.unacked = self.unacked.saturating_sub(1);
                        self.acknowledged += 1;
                        metrics::counter!("iot_mqtt_acknowledged_total").increment(1);
                        metrics::gauge!("iot_mqtt_unacknowledged").set(self.unacked as f64);
                    }
                    Event::Message { .. } => {
                        metrics::counter!("iot_mqtt_received_total").increment(1);
                    }
                    Event::Connected { forgotten, .. } => {
                        self.unacked = self.unacked.saturating_sub(*forgotten);
                        metrics::gauge!("iot_mqtt_unacknowledged").set(self.unacked as f64);
                    }
                    _ => {}
                }
                self.backlog.taken(&event);
                Ok(event)
            }
            None => Err(self.why_stopped().await),
        }
    }

    /// Whether the connection is up, as far as the driver knows (a broker gone without a
    /// word is noticed at the keep-alive). What is published meanwhile waits in the
    /// driver's queue (QoS 1/2) or rumqttc's (QoS 0) and goes out first on the next
    /// connection, unless [`Unconfirmed::Forget`] drops it there.
    pub fn is_connected(&self) -> bool {
        self.backlog.connected.load(Ordering::Acquire)
    }

    /// How many QoS 1/2 publishes the broker acknowledged so far.
    pub fn acknowledged(&self) -> u64 {
        self.acknowledged
    }

    /// Waits up to `timeout` until the broker acknowledged every QoS 1/2 publish; `false`
    /// when some are still unacknowledged then. Other events are read and dropped.
    pub async fn wait_acknowledged(&mut self, timeout: Duration) -> anyhow::Result<bool> {
        let deadline = tokio::time::Instant::now() + timeout;
        while self.unacked > 0 {
            match tokio::time::timeout_at(deadline, self.recv()).await {
                Ok(event) => drop(event?),
                Err(_) => return Ok(false),
            }
        }
        Ok(true)
    }

    /// Waits up to `timeout` until the broker acknowledged every QoS 1/2 publish and read
    /// every acknowledgement we sent, then disconnects cleanly and waits for the event
    /// loop to end. A broker that is down is reported and given up on, not waited for.
    pub async fn close(mut self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        // The broker answers in order, so the answer to an unsubscribe proves it read the
        // acknowledgements sent before it. Without that, a restart under the same client
        // id can take the session over while they still sit unread in the old socket,
        // and the broker delivers those messages again.
        let mut barrier = self.acks_sent && self.outbound.send(Outbound::Barrier).is_ok();
        while self.unacked > 0 || barrier {
            match tokio::time::timeout_at(deadline, self.recv()).await {
                Ok(event) => {
                    if let Event::Unsubscribed = event? {
                        barrier = false;
                    }
                }
                Err(_) => {
                    tracing::warn!(
                        unacknowledged = self.unacked,
                        "the broker did not confirm what was sent within {timeout:?}; it may be lost or delivered again"
                    );
                    break;
                }
            }
        }
        // Fails only when the event loop is already gone, which `outcome` reports.
        let _ = self.client.try_disconnect();
        // Taken, so that a driver that stopped reading reads on to the disconnect.
        let drain = async {
            while let Some(event) = self.events.recv().await {
                self.backlog.taken(&event);
            }
        };
        match tokio::time::timeout_at(
            deadline.max(tokio::time::Instant::now() + Duration::from_secs(1)),
            drain,
        )
        .await
        {
            Ok(()) => self.outcome().await,
            Err(_) => {
                if let Some(driver) = self.driver.take() {
                    driver.abort();
                }
                tracing::warn!(
                    "broker did not confirm the disconnect within {timeout:?}; closed anyway"
                );
                Ok(())
            }
        }
    }

    /// Why the event loop is gone (a refused login, say), for whichever call noticed it.
    async fn why_stopped(&mut self) -> anyhow::Error {
        match self.outcome().await {
            Err(error) => error,
            Ok(()) => anyhow!("the MQTT connection was closed"),
        }
    }

    /// How the event loop ended; `Ok` once it was already collected.
    async fn outcome(&mut self) -> anyhow::Result<()> {
        let Some(driver) = self.driver.take() else {
            return Ok(());
        };
        match driver.await {
            Ok(result) => result,
            Err(join) if join.is_cancelled() => Ok(()),
            Err(join) => Err(anyhow!("MQTT event loop failed: {join}")),
        }
    }
}

/// The longest topic MQTT can encode: its length is a 16-bit number.
pub const MAX_TOPIC_BYTES: usize = u16::MAX as usize;
/// The largest packet our clients write: the project's brokers' `max_packet_size`
/// (2 MiB); a broker disconnects a client that writes a larger one.
pub const MAX_OUTGOING_PACKET: usize = 2 * 1024 * 1024;

/// A publish that cannot be written: the topic or the whole packet is too long.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "cannot publish on a topic of {topic_bytes} bytes with {payload_bytes} bytes of payload: {why}"
)]
pub struct Unencodable {
    pub topic_bytes: usize,
    pub payload_bytes: usize,
    pub why: &'static str,
}

/// The remaining length of an MQTT 3.1.1 PUBLISH: topic length and topic, packet id,
/// payload. Mosquitto measures a packet against its `max_packet_size` as this plus one
/// (the first byte of the fixed header, not the bytes of the length itself): the largest
/// publish the brokers accept has a remaining length of 2 097 151.
pub fn remaining_length(topic: &str, qos: QoS, payload_bytes: usize) -> usize {
    let packet_id = if qos == QoS::AtMostOnce { 0 } else { 2 };
    2 + topic.len() + packet_id + payload_bytes
}

/// Whether a PUBLISH of `topic` and `payload_bytes` can be written: the brokers take it
/// as Mosquitto counts ([`remaining_length`] + 1 within [`MAX_OUTGOING_PACKET`]).
pub fn encodable(topic: &str, qos: QoS, payload_bytes: usize) -> Result<(), Unencodable> {
    let refuse = |why| {
        Err(Unencodable {
            topic_bytes: topic.len(),
            payload_bytes,
            why,
        })
    };
    if topic.is_empty() || topic.contains(['+', '#', '\0']) {
        return refuse("a topic is not empty and holds no wildcard or NUL");
    }
    if topic.len() > MAX_TOPIC_BYTES {
        return refuse("a topic is at most 65535 bytes");
    }
    if remaining_length(topic, qos, payload_bytes) + 1 > MAX_OUTGOING_PACKET {
        return refuse("a packet is at most 2 MiB (the brokers' max_packet_size)");
    }
    Ok(())
}

/// The task that owns rumqttc's event loop; see the module header.
struct Driver {
    eventloop: EventLoop,
    events: mpsc::UnboundedSender<Event>,
    backlog: Arc<Backlog>,
    /// While the service is [`MESSAGE_BACKLOG`] messages behind: not reading, and when
    /// to write the next keep-alive ping.
    paused: Option<Instant>,
    outbound: mpsc::UnboundedReceiver<Outbound>,
    batch: Vec<Outbound>,
    publishes: mpsc::Receiver<Publish>,
    to_publish: Vec<Publish>,
    address: String,
    broker: BrokerSettings,
    backoff: Backoff,
    /// The readiness check that follows this connection, if any.
    check: Option<&'static str>,
    /// Number of the current (or last) connection, counted from 1; 0 before the first.
    connection: u64,
    /// Our publishes the broker had not acknowledged when the connection dropped.
    unconfirmed: Vec<Request>,
    /// What becomes of them when the broker comes back without the session.
    without_session: Unconfirmed,
    /// QoS 0 messages dropped since the last warning, because the service lagged.
    dropped_qos0: u64,
    /// Acknowledgements of an earlier connection's messages, not written.
    stale_acks: u64,
}

/// The readiness check every connection keeps: connected to its broker.
pub const BROKER_CHECK: &str = "broker";

/// Why the driver stops: the service is gone, or the broker said no for good.
type Stop = anyhow::Result<()>;

impl Driver {
    /// Polls the event loop until the service is gone, a clean disconnect, or refused
    /// credentials; reconnects with backoff in between.
    async fn run(mut self) -> anyhow::Result<()> {
        loop {
            if self.paused.is_some() && self.backlog.has_room() {
                self.paused = None;
                // The answer to rumqttc's last ping may still sit behind publishes not
                // read yet; it would take it as lost at its next ping.
                self.eventloop.state.await_pingresp = false;
            }
            let ping_at = self.paused.unwrap_or_else(Instant::now);
            let publish_room = self.publish_room();
            let polled = tokio::select! {
                biased;
                // Acknowledgements first, all that wait, but only on a live connection: one
                // that came while poll() was connecting would cancel the attempt. While
                // poll() waits for a packet, cancelling it loses nothing (rumqttc's framed
                // reader keeps what it read; see the tests).
                taken = self.outbound.recv_many(&mut self.batch, ACK_BATCH),
                    if self.eventloop.network.is_some() =>
                {
                    if taken == 0 {
                        return Ok(()); // the service is gone
                    }
                    match self.write_outbound().await {
                        Ok(()) => continue,
                        Err(error) => Err(error),
                    }
                }
                taken = self.publishes.recv_many(&mut self.to_publish, publish_room),
                    if publish_room > 0 =>
                {
                    if taken == 0 {
                        return Ok(()); // the service is gone
                    }
                    match self.write_publishes().await {
                        Ok(()) => continue,
                        Err(error) => Err(error),
                    }
                }
                () = self.backlog.room.notified(), if self.paused.is_some() => continue,
                () = tokio::time::sleep_until(ping_at), if self.paused.is_some() => {
                    match self.write_ping().await {
                        Ok(()) => continue,
                        Err(error) => Err(error),
                    }
                }
                polled = self.eventloop.poll(), if self.paused.is_none() => polled,
            };
            let result = match polled {
                Ok(event) => self.handle(event),
                Err(ConnectionError::RequestsDone) => return Ok(()),
                Err(ConnectionError::ConnectionRefused(code)) if is_final(code) => {
                    return Err(refused(&self.broker, code));
                }
                Err(error) => self.lost(&error).await,
            };
            if let Some(stop) = result {
                return stop;
            }
        }
    }

    /// Turns one of rumqttc's events into the service's, if it cares.
    fn handle(&mut self, event: rumqttc::Event) -> Option<Stop> {
        let event = match event {
            rumqttc::Event::Incoming(Packet::ConnAck(ack)) => {
                if self.connection == 0 {
                    tracing::info!(broker = %self.address, "connected");
                } else {
                    tracing::info!(broker = %self.address, "reconnected");
                    metrics::counter!("iot_mqtt_reconnects_total").increment(1);
                }
                metrics::gauge!("iot_mqtt_connected").set(1.0);
                if let Some(check) = self.check {
                    crate::ops::health().set(check, Ok(()));
                }
                self.connection += 1;
                self.backlog.connected.store(true, Ordering::Release);
                self.backoff.reset();
                if self.stale_acks > 0 {
                    tracing::debug!(
                        count = self.stale_acks,
                        "acknowledgements of the previous connection's messages not sent: the broker delivers those again"
                    );
                    self.stale_acks = 0;
                }
                // Sent again whatever the broker remembers: rumqttc would forget them
                // when it comes back without our session (after a crash, say).
                let mut forgotten = 0;
                if ack.session_present || self.without_session == Unconfirmed::Resend {
                    self.eventloop.pending.extend(self.unconfirmed.drain(..));
                } else {
                    // Those written and, after a lost connection, those still queued:
                    // all the service published before this connection, in order.
                    forgotten = self.unconfirmed.len() as u64;
                    self.unconfirmed.clear();
                    while self.connection > 1 && self.publishes.try_recv().is_ok() {
                        forgotten += 1;
                    }
                }
                Event::Connected {
                    session_present: ack.session_present,
                    forgotten,
                }
            }
            rumqttc::Event::Incoming(Packet::Publish(publish)) => {
                let bytes = publish.payload.len();
                if publish.qos == QoS::AtMostOnce {
                    if self.backlog.qos0.load(Ordering::Relaxed) >= QOS0_BACKLOG
                        || self.backlog.qos0_bytes.load(Ordering::Relaxed) >= QOS0_BACKLOG_BYTES
                    {
                        self.drop_qos0();
                        return None;
                    }
                    self.backlog.qos0.fetch_add(1, Ordering::Relaxed);
                    self.backlog.qos0_bytes.fetch_add(bytes, Ordering::Relaxed);
                } else {
                    let count = self.backlog.reliable.fetch_add(1, Ordering::Relaxed) + 1;
                    let held = self
                        .backlog
                        .reliable_bytes
                        .fetch_add(bytes, Ordering::Relaxed)
                        + bytes;
                    if (count >= MESSAGE_BACKLOG || held >= MESSAGE_BACKLOG_BYTES)
                        && self.paused.is_none()
                    {
                        tracing::debug!(
                        "the service is {MESSAGE_BACKLOG} messages or {} MiB behind: not reading until it takes half",
                        MESSAGE_BACKLOG_BYTES >> 20
                    );
                        metrics::counter!("iot_mqtt_read_pauses_total").increment(1);
                        self.paused = Some(Instant::now() + self.keep_alive());
                    }
                }
                let ack = Ack::of(&publish, self.connection);
                Event::Message { publish, ack }
            }
            rumqttc::Event::Incoming(Packet::PubAck(_) | Packet::PubComp(_)) => Event::Acked,
            rumqttc::Event::Incoming(Packet::SubAck(ack)) => Event::Subscribed(ack.return_codes),
            rumqttc::Event::Incoming(Packet::UnsubAck(_)) => Event::Unsubscribed,
            rumqttc::Event::Outgoing(Outgoing::Disconnect) => return Some(Ok(())),
            _ => return None,
        };
        if self.events.send(event).is_err() {
            return Some(Ok(())); // the service stopped listening
        }
        None
    }

    fn drop_qos0(&mut self) {
        if self.dropped_qos0 == 0 {
            tracing::warn!(
                "the service is {QOS0_BACKLOG} QoS 0 messages or {} MiB behind: dropping new ones until it catches up (use QoS 1 to have the broker hold them)", QOS0_BACKLOG_BYTES >> 20
            );
        }
        self.dropped_qos0 += 1;
        if self.dropped_qos0.is_power_of_two() && self.dropped_qos0 >= 1024 {
            tracing::warn!(dropped = self.dropped_qos0, "QoS 0 messages dropped so far");
        }
    }

    /// After a lost connection: hands over what rumqttc had read but not yet returned
    /// (it keeps such events across a reconnect, and they belong to the old connection),
    /// keeps our unconfirmed publishes, and waits before the next attempt.
    async fn lost(&mut self, error: &ConnectionError) -> Option<Stop> {
        let leftovers: Vec<rumqttc::Event> = self.eventloop.state.events.drain(..).collect();
        for event in leftovers {
            if let Some(stop) = self.handle(event) {
                return Some(stop);
            }
        }
        keep_unconfirmed(&mut self.eventloop, &mut self.unconfirmed);
        self.backlog.connected.store(false, Ordering::Release);
        // Reconnecting needs the event loop; a service still behind pauses it again.
        self.paused = None;
        metrics::gauge!("iot_mqtt_connected").set(0.0);
        if let Some(check) = self.check {
            crate::ops::health().set(
                check,
                Err(format!("no connection to {}: {error}", self.address)),
            );
        }
        let delay = self.backoff.next_delay();
        let attempt = self.backoff.attempt();
        if attempt == 1 && self.connection > 0 {
            tracing::warn!(broker = %self.address, "connection lost: {error}; reconnecting in {delay:?}");
        } else {
            tracing::warn!(broker = %self.address, attempt, "cannot connect: {error}; retrying in {delay:?}");
        }
        tokio::select! {
            () = tokio::time::sleep(delay) => None,
            () = self.events.closed() => Some(Ok(())),
        }
    }

    /// The keep-alive interval; a day when pings are off.
    fn keep_alive(&self) -> Duration {
        match self.eventloop.mqtt_options.keep_alive() {
            Duration::ZERO => Duration::from_secs(86_400),
            every => every,
        }
    }

    /// While not reading: a PINGREQ written directly, so the broker keeps the
    /// connection (rumqttc pings only from `poll`). Its answer is read, and ignored,
    /// once reading resumes. On failure the connection is dropped, as for acks.
    async fn write_ping(&mut self) -> Result<(), ConnectionError> {
        self.paused = Some(Instant::now() + self.keep_alive());
        let Some(network) = self.eventloop.network.as_mut() else {
            return Ok(());
        };
        let timeout = Duration::from_secs(self.eventloop.network_options.connection_timeout());
        let write = async {
            network.write(Packet::PingReq).await?;
            network.flush().await
        };
        let result = within(timeout, write).await;
        if result.is_err() {
            self.eventloop.clean();
        }
        result
    }

    /// How many QoS 1/2 publishes the driver may write now: as many as rumqttc's in-flight
    /// window has room for, on a live connection, once what rumqttc sends again after a
    /// reconnect (with their packet ids) is out, and while no packet id collided.
    fn publish_room(&self) -> usize {
        let eventloop = &self.eventloop;
        if eventloop.network.is_none()
            || !eventloop.pending.is_empty()
            || eventloop.state.collision.is_some()
        {
            return 0;
        }
        let free = eventloop
            .mqtt_options
            .inflight()
            .saturating_sub(eventloop.state.inflight());
        usize::from(free).min(PUBLISH_BATCH)
    }

    /// Writes the waiting publishes in one go, with one flush; rumqttc's state gives them
    /// their packet ids and keeps them until acknowledged, as for those it writes itself.
    /// On failure the connection is dropped, and those not written yet wait in rumqttc's
    /// pending queue with the ones it keeps.
    async fn write_publishes(&mut self) -> Result<(), ConnectionError> {
        let Some(network) = self.eventloop.network.as_mut() else {
            return Ok(()); // not reached: only called while connected
        };
        let state = &mut self.eventloop.state;
        let timeout = Duration::from_secs(self.eventloop.network_options.connection_timeout());
        let mut publishes = self.to_publish.drain(..);
        let write = async {
            for publish in publishes.by_ref() {
                if let Some(packet) = state.handle_outgoing_packet(Request::Publish(publish))? {
                    network.write(packet).await?;
                }
            }
            network.flush().await
        };
        let result = within(timeout, write).await;
        if result.is_err() {
            self.eventloop.clean();
            self.eventloop
                .pending
                .extend(publishes.map(Request::Publish));
        }
        result
    }

    /// Writes the waiting acknowledgements of the current connection (and the barriers
    /// among them) in one go, with one flush. On failure the connection is dropped, to be
    /// made again by the next poll.
    async fn write_outbound(&mut self) -> Result<(), ConnectionError> {
        let Some(network) = self.eventloop.network.as_mut() else {
            return Ok(()); // not reached: only called while connected
        };
        let state = &mut self.eventloop.state;
        let timeout = Duration::from_secs(self.eventloop.network_options.connection_timeout());
        let (current, batch, stale) = (self.connection, &mut self.batch, &mut self.stale_acks);
        let write = async {
            for outbound in batch.drain(..) {
                let request = match outbound {
                    Outbound::Ack(ack) if ack.connection != current => {
                        *stale += 1;
                        continue;
                    }
                    Outbound::Ack(Ack {
                        pkid,
                        qos: QoS::ExactlyOnce,
                        ..
                    }) => Request::PubRec(PubRec::new(pkid)),
                    Outbound::Ack(Ack { pkid, .. }) => Request::PubAck(PubAck::new(pkid)),
                    Outbound::Barrier => Request::Unsubscribe(Unsubscribe::new(BARRIER_FILTER)),
                };
                if let Some(packet) = state.handle_outgoing_packet(request)? {
                    network.write(packet).await?;
                }
            }
            network.flush().await
        };
        let result = within(timeout, write).await;
        if result.is_err() {
            self.batch.clear();
            self.eventloop.clean();
        }
        result
    }
}

/// A write of the driver's own, given `timeout` to finish: a failure or a time-out
/// is a lost connection.
async fn within(
    timeout: Duration,
    write: impl std::future::Future<Output = Result<(), rumqttc::StateError>>,
) -> Result<(), ConnectionError> {
    match tokio::time::timeout(timeout, write).await {
        Ok(written) => written.map_err(ConnectionError::from),
        Err(_) => Err(ConnectionError::FlushTimeout),
    }
}

/// Takes the publishes rumqttc set aside to send again after a lost connection: it
/// drops them when the broker answers the reconnect without our session, which would
/// lose QoS 1 readings a broker crash had not confirmed. Sent again, they arrive at
/// least once. Acknowledgements rumqttc kept are dropped: they belong to the old
/// connection.
fn keep_unconfirmed(eventloop: &mut EventLoop, unconfirmed: &mut Vec<Request>) {
    let pending = std::mem::take(&mut eventloop.pending);
    for request in pending {
        match request {
            Request::Publish(_) => unconfirmed.push(request),
            Request::PubAck(_) | Request::PubRec(_) => {}
            other => eventloop.pending.push_back(other),
        }
    }
}

/// The error to stop on when a broker refused a connection with `code` for good (wrong
/// credentials, a rejected client id, another protocol); `None` for a refusal a retry
/// may fix. For connections of a service's own that reconnect like the driver does.
pub fn refused_for_good(broker: &BrokerSettings, code: ConnectReturnCode) -> Option<anyhow::Error> {
    is_final(code).then(|| refused(broker, code))
}

/// Refusals that no retry can fix.
fn is_final(code: ConnectReturnCode) -> bool {
    matches!(
        code,
        ConnectReturnCode::BadUserNamePassword
            | ConnectReturnCode::NotAuthorized
            | ConnectReturnCode::BadClientId
            | ConnectReturnCode::RefusedProtocolVersion
    )
}

fn refused(broker: &BrokerSettings, code: ConnectReturnCode) -> anyhow::Error {
    let prefix = broker.env_prefix;
    let reason = match code {
        ConnectReturnCode::BadUserNamePassword | ConnectReturnCode::NotAuthorized => {
            let user = match &broker.username {
                Some(user) => format!("user {user:?}"),
                None => "an anonymous client (no user name set)".to_string(),
            };
            format!("not authorized: wrong user name or password for {user}; check {prefix}_USERNAME and {prefix}_PASSWORD")
        }
        ConnectReturnCode::BadClientId => {
            "the client id was rejected; choose another --client-id".to_string()
        }
        _ => "the broker does not speak MQTT 3.1.1".to_string(),
    };
    anyhow!(
        "broker {} refused the connection: {reason}",
        broker.address()
    )
}

#[cfg(test)]
mod tests;
