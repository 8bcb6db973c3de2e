//! An MQTT 5 connection that keeps itself alive, for the relay's two subscriptions
//! (every message from the edge broker; requests and commands from the cloud broker).
//!
//! MQTT 5, not 3.1.1 as the other services speak, for two subscription options the relay
//! cannot do without: *retain as published*, so a message goes on with the retain flag
//! its publisher set (3.1.1 clears it on live delivery, and the cloud would lose its
//! retained readings and the Sparkplug host's retained STATE), and *no local*, so what the
//! relay publishes on a broker never comes back to it (a carried-in replay request
//! would otherwise be forwarded out again, for ever).
//!
//! rumqttc's event loop runs in a task of its own (the driver) that nothing cancels
//! mid-write; it reconnects with capped, jittered backoff, logging each attempt, and gives
//! up only on refused credentials. rumqttc acknowledges nothing by itself (manual acks):
//! the relay acknowledges a message once it handled it (on disk, carried on). The
//! acknowledgements go through rumqttc's request channel, which it empties of them when
//! a connection drops (the broker sends those messages again on the next one);
//! [`Link::ack`] also drops any of an earlier connection, whose packet ids may name
//! other messages on the new one, and [`Link::comes_again`] says which of them the
//! broker sends again (all, unless it lost the session meanwhile).
//!
//! What waits for the relay is bounded: QoS 0 by count and bytes (past them new ones are
//! dropped and counted), QoS 1 and 2 by the receive maximum and by [`RELIABLE_BYTES`]:
//! past those bytes the driver stops reading until the relay has taken half of them. The
//! broker keeps the rest meanwhile (they are not acknowledged). Should the pause outlast
//! the keep-alive (the disk budget full for long), the broker closes the connection and
//! sends them again on the next one.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use anyhow::anyhow;
use iot_core::backoff::Backoff;
use iot_core::config::BrokerSettings;
use rumqttc::v5::mqttbytes::v5::{
    ConnectReturnCode, Filter, Packet, Publish, RetainForwardRule, SubscribeReasonCode,
};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, ConnectionError, Event, EventLoop, MqttOptions};
use tokio::sync::{mpsc, Notify};

/// Most QoS 0 messages waiting for the relay, and most bytes of them ([`QOS0_BYTES`]);
/// past either, new ones are dropped and counted, as a broker drops QoS 0 for a slow
/// client. QoS 1 and 2 are bounded by the receive maximum the relay announces
/// ([`RECEIVE_MAXIMUM`]): the broker sends no more until some are acknowledged.
pub const QOS0_BACKLOG: usize = 100_000;
/// Most bytes of QoS 0 payloads waiting for the relay (a device account could otherwise
/// fill its memory with 100 000 messages of 2 MiB).
pub const QOS0_BYTES: usize = 64 << 20;
/// Unacknowledged QoS 1/2 messages the broker may send the relay at once: the largest
/// batch one disk sync covers.
pub const RECEIVE_MAXIMUM: u16 = 1000;
/// Most bytes of QoS 1/2 payloads waiting for the relay before the driver stops reading
/// (the receive maximum alone would let 1 000 messages of 2 MiB, 2 GiB, wait).
pub const RELIABLE_BYTES: usize = 64 << 20;

/// What the relay hears from a link.
#[derive(Debug)]
pub enum Heard {
    Connected { session_present: bool },
    Message(Box<Message>),
}

/// A message and the connection it came on.
#[derive(Debug)]
pub struct Message {
    pub publish: Publish,
    connection: u64,
}

/// A running MQTT 5 connection.
#[derive(Debug)]
pub struct Link {
    pub client: AsyncClient,
    heard: mpsc::UnboundedReceiver<Heard>,
    /// Number of the current connection, counted from 1, and of the last one that
    /// found no session (the broker had nothing to send again).
    connection: Arc<Connections>,
    qos0: Arc<Waiting>,
    reliable: Arc<Held>,
    driver: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    name: &'static str,
}

/// A subscription of the relay's: no local, retain as published, retained messages
/// sent only when it is new (not again on every reconnect of a kept session).
pub fn filter(path: &str, qos: QoS) -> Filter {
    Filter {
        path: path.to_string(),
        qos,
        nolocal: true,
        preserve_retain: true,
        retain_forward_rule: RetainForwardRule::OnNewSubscribe,
    }
}

impl Link {
    /// Starts connecting to `broker` in the background; `name` ("edge", "cloud-replay")
    /// names it in logs and the `iot_relay_connected{link}` gauge; `check`, if any, is
    /// the readiness check that follows it: it passes once the link's subscription
    /// stands ([`on_connack`], [`on_suback`]), not merely once connected.
    pub fn start(
        broker: &BrokerSettings,
        mut options: MqttOptions,
        name: &'static str,
        check: Option<&'static str>,
    ) -> Self {
        options.set_receive_maximum(Some(RECEIVE_MAXIMUM));
        // What the relay has not handled (on disk, carried on) is not acknowledged: the
        // broker keeps it for the next connection of the session.
        options.set_manual_acks(true);
        let mut network = options.network_options();
        network.set_tcp_nodelay(true);
        options.set_network_options(network);
        let (client, eventloop) = AsyncClient::new(options, usize::from(u16::MAX));
        let (heard_tx, heard) = mpsc::unbounded_channel();
        let connection = Arc::new(Connections::default());
        let qos0 = Arc::new(Waiting::default());
        let reliable = Arc::new(Held::default());
        metrics::gauge!("iot_relay_connected", "link" => name).set(0.0);
        let driver = Driver {
            eventloop,
            heard: heard_tx,
            connection: Arc::clone(&connection),
            qos0: Arc::clone(&qos0),
            reliable: Arc::clone(&reliable),
            broker: broker.clone(),
            name,
            check,
            dropped: 0,
        };
        Self {
            client,
            heard,
            connection,
            qos0,
            reliable,
            driver: Some(tokio::spawn(driver.run())),
            name,
        }
    }

    /// The next thing heard; an error when the link ended for good (refused credentials).
    pub async fn recv(&mut self) -> anyhow::Result<Heard> {
        match self.heard.recv().await {
            Some(heard) => {
                if let Heard::Message(message) = &heard {
                    let len = message.publish.payload.len();
                    if message.publish.qos == QoS::AtMostOnce {
                        self.qos0.release(len);
                    } else {
                        self.reliable.release(len);
                    }
                }
                Ok(heard)
            }
            None => Err(self.why_stopped().await),
        }
    }

    /// Acknowledges `message` if it came on the current connection (else the broker
    /// sends it again on this one, and that copy is acknowledged).
    pub async fn ack(&self, message: &Message) -> anyhow::Result<()> {
        if message.publish.qos == QoS::AtMostOnce
            || message.connection != self.connection.current.load(Ordering::Acquire)
        {
            return Ok(());
        }
        self.client
            .ack(&message.publish)
            .await
            .map_err(|_| anyhow!("the {} connection is closed", self.name))
    }

    /// Whether the broker sends `message` again, so that this copy is not to be handled:
    /// a QoS 1/2 message of an earlier connection, when no connection since found its
    /// session gone. (One that did, the broker lost what it had not delivered: the copy
    /// the relay holds is then the only one.)
    pub fn comes_again(&self, message: &Message) -> bool {
        message.publish.qos != QoS::AtMostOnce && self.connection.sends_again(message.connection)
    }

    /// Whether connection `number` (a [`Message::connection`]) is of the broker's current
    /// session: no connection since found it gone. A packet id names one message only
    /// within a session.
    pub fn session_kept_since(&self, number: u64) -> bool {
        self.connection.lost.load(Ordering::Acquire) <= number
    }

    /// Disconnects and waits (briefly) for the driver to end.
    pub async fn close(mut self) {
        let _ = self.client.try_disconnect();
        if let Some(driver) = self.driver.take() {
            let _ = tokio::time::timeout(std::time::Duration::from_secs(2), driver).await;
        }
    }

    async fn why_stopped(&mut self) -> anyhow::Error {
        match self.driver.take() {
            Some(driver) => match driver.await {
                Ok(Err(error)) => error,
                Ok(Ok(())) => anyhow!("the {} connection was closed", self.name),
                Err(join) => anyhow!("the {} connection failed: {join}", self.name),
            },
            None => anyhow!("the {} connection was closed", self.name),
        }
    }
}

impl Message {
    #[cfg(test)]
    pub fn new(publish: Publish, connection: u64) -> Self {
        Self {
            publish,
            connection,
        }
    }

    /// The connection it came on, counted from 1.
    pub fn connection(&self) -> u64 {
        self.connection
    }

    pub fn topic(&self) -> Result<&str, std::str::Utf8Error> {
        std::str::from_utf8(&self.publish.topic)
    }
}

/// The connections of a link, counted by the driver.
#[derive(Debug, Default)]
struct Connections {
    /// The current one, counted from 1.
    current: AtomicU64,
    /// The last one whose broker had no session for the relay.
    lost: AtomicU64,
}

impl Connections {
    /// A connection began; `session_present` as its CONNACK said.
    fn connected(&self, session_present: bool) -> u64 {
        let number = self.current.load(Ordering::Acquire) + 1;
        if !session_present {
            self.lost.store(number, Ordering::Release);
        }
        self.current.store(number, Ordering::Release);
        number
    }

    /// Whether the broker sends again what it did not have acknowledged on connection
    /// `number`: one came since, and none since found the session gone.
    fn sends_again(&self, number: u64) -> bool {
        let current = self.current.load(Ordering::Acquire);
        number < current && self.lost.load(Ordering::Acquire) <= number
    }
}

/// QoS 1/2 payload bytes handed to the relay and not taken from the link yet; the driver
/// waits for [`Held::room`] once they pass [`RELIABLE_BYTES`].
#[derive(Debug, Default)]
struct Held {
    bytes: AtomicUsize,
    room: Notify,
}

impl Held {
    /// Counts `len` bytes in; whether the driver is to stop reading now.
    fn take(&self, len: usize) -> bool {
        self.bytes.fetch_add(len, Ordering::AcqRel) + len > RELIABLE_BYTES
    }

    fn release(&self, len: usize) {
        let before = self.bytes.fetch_sub(len, Ordering::AcqRel);
        if before > RELIABLE_BYTES / 2 && before - len <= RELIABLE_BYTES / 2 {
            self.room.notify_one();
        }
    }

    fn has_room(&self) -> bool {
        self.bytes.load(Ordering::Acquire) <= RELIABLE_BYTES / 2
    }
}

/// QoS 0 messages handed to the relay and not taken from the link yet: counted by the
/// driver (the one that adds) and the link (the one that takes away).
#[derive(Debug, Default)]
struct Waiting {
    count: AtomicUsize,
    bytes: AtomicUsize,
}

impl Waiting {
    /// Counts a message of `len` bytes in, unless that would pass [`QOS0_BACKLOG`] or
    /// [`QOS0_BYTES`].
    fn take(&self, len: usize) -> bool {
        let count = self.count.load(Ordering::Acquire);
        let bytes = self.bytes.load(Ordering::Acquire);
        if count >= QOS0_BACKLOG || bytes + len > QOS0_BYTES {
            return false;
        }
        self.count.fetch_add(1, Ordering::AcqRel);
        self.bytes.fetch_add(len, Ordering::AcqRel);
        true
    }

    fn release(&self, len: usize) {
        self.count.fetch_sub(1, Ordering::AcqRel);
        self.bytes.fetch_sub(len, Ordering::AcqRel);
    }
}

struct Driver {
    eventloop: EventLoop,
    heard: mpsc::UnboundedSender<Heard>,
    connection: Arc<Connections>,
    qos0: Arc<Waiting>,
    reliable: Arc<Held>,
    broker: BrokerSettings,
    name: &'static str,
    check: Option<&'static str>,
    /// QoS 0 messages dropped since the last warning.
    dropped: u64,
}

impl Driver {
    async fn run(mut self) -> anyhow::Result<()> {
        let address = self.broker.address();
        let mut backoff = Backoff::starting();
        loop {
            let heard = match self.eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    let number = self.connection.connected(ack.session_present);
                    let verb = if number == 1 {
                        "connected"
                    } else {
                        "reconnected"
                    };
                    tracing::info!(broker = %address, link = self.name, "{verb}");
                    metrics::gauge!("iot_relay_connected", "link" => self.name).set(1.0);
                    self.health(on_connack(ack.session_present));
                    backoff.reset();
                    Heard::Connected {
                        session_present: ack.session_present,
                    }
                }
                Ok(Event::Incoming(Packet::Publish(publish))) => {
                    let len = publish.payload.len();
                    if publish.qos == QoS::AtMostOnce && !self.qos0.take(len) {
                        self.drop_qos0();
                        continue;
                    }
                    let full = publish.qos != QoS::AtMostOnce && self.reliable.take(len);
                    let message = Message {
                        publish,
                        connection: self.connection.current.load(Ordering::Acquire),
                    };
                    if self.heard.send(Heard::Message(Box::new(message))).is_err() {
                        return Ok(());
                    }
                    if full && !wait_for_room(&self.reliable, &self.heard, self.name).await {
                        return Ok(());
                    }
                    continue;
                }
                Ok(Event::Incoming(Packet::SubAck(ack))) => {
                    self.subscribed(&address, &ack.return_codes);
                    continue;
                }
                Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => return Ok(()),
                Ok(_) => continue,
                Err(ConnectionError::RequestsDone) => return Ok(()),
                Err(ConnectionError::ConnectionRefused(code)) if is_final(code) => {
                    return Err(anyhow!(
                        "broker {address} refused the {} connection: {code:?}; check {}_USERNAME and {}_PASSWORD",
                        self.name,
                        self.broker.env_prefix,
                        self.broker.env_prefix
                    ));
                }
                Err(error) => {
                    metrics::gauge!("iot_relay_connected", "link" => self.name).set(0.0);
                    self.health(Err(format!("no connection to {address}: {error}")));
                    let delay = backoff.next_delay();
                    tracing::warn!(broker = %address, link = self.name, attempt = backoff.attempt(), "no connection: {error}; retrying in {delay:?}");
                    tokio::select! {
                        () = tokio::time::sleep(delay) => continue,
                        () = self.heard.closed() => return Ok(()),
                    }
                }
            };
            if self.heard.send(heard).is_err() {
                return Ok(());
            }
        }
    }

    /// The broker's answer to the link's subscription: the readiness check that
    /// follows the link passes once it granted every filter (the link without a check
    /// logs its own subscription).
    fn subscribed(&self, address: &str, codes: &[SubscribeReasonCode]) {
        let state = on_suback(codes);
        if self.check.is_some() {
            match &state {
                Ok(()) => {
                    tracing::info!(broker = %address, "subscribed on the {} broker", self.name)
                }
                Err(why) => tracing::error!(broker = %address, link = self.name, "{why}"),
            }
        }
        self.health(state);
    }

    fn health(&self, state: Result<(), String>) {
        if let Some(check) = self.check {
            iot_core::ops::health().set(check, state);
        }
    }

    fn drop_qos0(&mut self) {
        if self.dropped == 0 {
            tracing::warn!(
                link = self.name,
                "{QOS0_BACKLOG} QoS 0 messages (or {QOS0_BYTES} bytes of them) wait for the log: dropping new ones until it catches up"
            );
        }
        self.dropped += 1;
        metrics::counter!("iot_relay_qos0_dropped_total").increment(1);
    }
}

/// Keeps the driver from reading until the relay took half of the QoS 1/2 bytes waiting
/// for it; `false` when the relay is gone.
async fn wait_for_room(
    reliable: &Held,
    heard: &mpsc::UnboundedSender<Heard>,
    name: &'static str,
) -> bool {
    tracing::debug!(
        link = name,
        "{RELIABLE_BYTES} bytes of QoS 1/2 messages wait for the relay: reading no more until it takes half"
    );
    metrics::counter!("iot_relay_reading_paused_total", "link" => name).increment(1);
    while !reliable.has_room() {
        tokio::select! {
            () = reliable.room.notified() => {}
            () = heard.closed() => return false,
        }
    }
    true
}

/// A link's readiness on a CONNACK: a broker that kept the session keeps its
/// subscription, and delivers to it at once; a new session has none until the broker
/// acknowledges the one the relay sends on connecting ([`on_suback`]), and a message
/// published meanwhile goes to no one.
fn on_connack(session_present: bool) -> Result<(), String> {
    if session_present {
        Ok(())
    } else {
        Err("connected, not subscribed yet (a new session)".into())
    }
}

/// A link's readiness on a SUBACK: its subscription stands when the broker granted
/// every filter of it.
fn on_suback(codes: &[SubscribeReasonCode]) -> Result<(), String> {
    let refused: Vec<&SubscribeReasonCode> = codes
        .iter()
        .filter(|code| !matches!(code, SubscribeReasonCode::Success(_)))
        .collect();
    if refused.is_empty() {
        Ok(())
    } else {
        Err(format!("the broker refused the subscription: {refused:?}"))
    }
}

fn is_final(code: ConnectReturnCode) -> bool {
    matches!(
        code,
        ConnectReturnCode::BadUserNamePassword
            | ConnectReturnCode::NotAuthorized
            | ConnectReturnCode::BadClientId
            | ConnectReturnCode::ClientIdentifierNotValid
            | ConnectReturnCode::Banned
            | ConnectReturnCode::BadAuthenticationMethod
    )
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::time::Duration;

    use iot_core::config::BrokerSettings;
    use rumqttc::v5::mqttbytes::QoS;

    use super::{
        filter, Connections, Heard, Held, Link, Waiting, QOS0_BACKLOG, QOS0_BYTES, RELIABLE_BYTES,
    };

    #[test]
    fn what_an_earlier_connection_left_unacknowledged_comes_again_unless_the_session_went() {
        let connections = Connections::default();
        connections.connected(false);
        assert!(!connections.sends_again(1), "still the current connection");
        connections.connected(true);
        assert!(connections.sends_again(1), "the session was kept");
        connections.connected(false);
        assert!(
            !connections.sends_again(1) && !connections.sends_again(2),
            "the broker lost the session: the relay's copies are the only ones"
        );
        connections.connected(true);
        assert!(connections.sends_again(3), "kept since the loss");
        assert!(!connections.sends_again(2), "lost after it");
    }

    #[test]
    fn reading_stops_past_the_reliable_bytes_until_half_are_taken() {
        let held = Held::default();
        assert!(!held.take(RELIABLE_BYTES), "up to the bound");
        assert!(held.take(1), "past it");
        assert!(!held.has_room());
        held.release(RELIABLE_BYTES / 2);
        assert!(!held.has_room(), "just over half");
        held.release(1);
        assert!(held.has_room(), "half taken");
    }

    #[test]
    fn qos0_waits_up_to_its_count_and_its_bytes() {
        let waiting = Waiting::default();
        for _ in 0..QOS0_BACKLOG {
            assert!(waiting.take(1));
        }
        assert!(!waiting.take(1), "past the count");
        waiting.release(1);
        assert!(waiting.take(1), "room again");

        let waiting = Waiting::default();
        assert!(waiting.take(QOS0_BYTES - 10));
        assert!(!waiting.take(11), "past the bytes");
        assert!(waiting.take(10));
        waiting.release(QOS0_BYTES - 10);
        assert!(waiting.take(2 << 20), "a 2 MiB message once there is room");
    }

    /// The check of the test below, apart from any other test's in this process.
    const CHECK: &str = "edge broker (test)";

    /// Why [`CHECK`] fails, or `None` when it passes.
    fn failing() -> Option<String> {
        let why = iot_core::ops::health().ready().err()?;
        why.split("; ")
            .find_map(|part| part.strip_prefix(&format!("{CHECK}: ")))
            .map(str::to_string)
    }

    async fn until_passes() {
        for _ in 0..200 {
            if failing().is_none() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("{CHECK} still fails: {:?}", failing());
    }

    /// One MQTT packet read from `socket`: its first byte and the rest.
    fn read_packet(socket: &mut TcpStream) -> (u8, Vec<u8>) {
        let mut byte = [0];
        socket.read_exact(&mut byte).expect("a packet");
        let kind = byte[0];
        let (mut length, mut shift) = (0usize, 0);
        loop {
            socket.read_exact(&mut byte).expect("its length");
            length |= usize::from(byte[0] & 0x7f) << shift;
            if byte[0] & 0x80 == 0 {
                break;
            }
            shift += 7;
        }
        let mut rest = vec![0; length];
        socket.read_exact(&mut rest).expect("its body");
        (kind, rest)
    }

    /// Accepts the link's next connection and answers its CONNECT.
    fn accept(listener: &TcpListener, session_present: bool) -> TcpStream {
        let (mut socket, _) = listener.accept().expect("the link connects");
        socket
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("a timeout");
        assert_eq!(read_packet(&mut socket).0, 0x10, "CONNECT");
        socket
            .write_all(&[0x20, 3, u8::from(session_present), 0, 0])
            .expect("CONNACK");
        socket
    }

    /// Reads the link's SUBSCRIBE and answers it with `reason` for its one filter.
    fn answer_subscribe(socket: &mut TcpStream, reason: u8) {
        let (kind, body) = read_packet(socket);
        assert_eq!(kind, 0x82, "SUBSCRIBE");
        socket
            .write_all(&[0x90, 4, body[0], body[1], 0, reason])
            .expect("SUBACK");
    }

    async fn subscribe(link: &mut Link, session_present: bool) {
        match link.recv().await.expect("the link runs") {
            Heard::Connected {
                session_present: present,
            } => assert_eq!(present, session_present),
            Heard::Message(_) => panic!("a message before CONNACK"),
        }
        link.client
            .subscribe_many([filter("#", QoS::AtLeastOnce)])
            .await
            .expect("SUBSCRIBE queued");
    }

    /// A new session has no subscription until the broker acknowledges it: the edge
    /// check waits for the SUBACK (what the edge broker takes meanwhile goes to no one),
    /// but not on a session the broker kept. A refused subscription is not ready.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_edge_check_passes_once_a_new_sessions_subscription_is_acknowledged() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("a port");
        let broker = BrokerSettings {
            host: "127.0.0.1".into(),
            port: listener.local_addr().expect("its address").port(),
            username: None,
            password: None,
            tls_ca: None,
            keep_alive: Duration::from_secs(30),
            env_prefix: "LOCAL",
        };
        let options = broker.mqtt5_options("relay-test", false).expect("options");
        let mut link = Link::start(&broker, options, "edge-test", Some(CHECK));

        // A new session: connected, not subscribed yet.
        let mut socket = tokio::task::block_in_place(|| accept(&listener, false));
        subscribe(&mut link, false).await;
        let why = failing().expect("not ready before the SUBACK");
        assert!(why.contains("not subscribed yet"), "{why}");
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(failing().is_some(), "still not ready");
        tokio::task::block_in_place(|| answer_subscribe(&mut socket, 1));
        until_passes().await;

        // The connection drops; the broker kept the session: ready on the CONNACK.
        drop(socket);
        let mut socket = tokio::task::block_in_place(|| accept(&listener, true));
        subscribe(&mut link, true).await;
        assert_eq!(failing(), None, "the kept session has the subscription");
        tokio::task::block_in_place(|| answer_subscribe(&mut socket, 1));

        // A new session whose subscription the broker refuses.
        drop(socket);
        let mut socket = tokio::task::block_in_place(|| accept(&listener, false));
        subscribe(&mut link, false).await;
        tokio::task::block_in_place(|| answer_subscribe(&mut socket, 0x87));
        for _ in 0..200 {
            if failing().is_some_and(|why| why.contains("refused")) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let why = failing().expect("a refused subscription is not ready");
        assert!(why.contains("refused"), "{why}");
        drop(socket);
        link.close().await;
    }
}
