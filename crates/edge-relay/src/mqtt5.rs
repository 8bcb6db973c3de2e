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
//! other messages on the new one.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use anyhow::anyhow;
use iot_core::backoff::Backoff;
use iot_core::config::BrokerSettings;
use rumqttc::v5::mqttbytes::v5::{ConnectReturnCode, Filter, Packet, Publish, RetainForwardRule};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, ConnectionError, Event, EventLoop, MqttOptions};
use tokio::sync::mpsc;

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
    /// Number of the current connection, counted from 1.
    connection: Arc<AtomicU64>,
    qos0: Arc<Waiting>,
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
    /// the readiness check that follows it.
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
        let connection = Arc::new(AtomicU64::new(0));
        let qos0 = Arc::new(Waiting::default());
        metrics::gauge!("iot_relay_connected", "link" => name).set(0.0);
        let driver = Driver {
            eventloop,
            heard: heard_tx,
            connection: Arc::clone(&connection),
            qos0: Arc::clone(&qos0),
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
            driver: Some(tokio::spawn(driver.run())),
            name,
        }
    }

    /// The next thing heard; an error when the link ended for good (refused credentials).
    pub async fn recv(&mut self) -> anyhow::Result<Heard> {
        match self.heard.recv().await {
            Some(heard) => {
                if let Heard::Message(message) = &heard {
                    if message.publish.qos == QoS::AtMostOnce {
                        self.qos0.release(message.publish.payload.len());
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
            || message.connection != self.connection.load(Ordering::Acquire)
        {
            return Ok(());
        }
        self.client
            .ack(&message.publish)
            .await
            .map_err(|_| anyhow!("the {} connection is closed", self.name))
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
    pub fn topic(&self) -> Result<&str, std::str::Utf8Error> {
        std::str::from_utf8(&self.publish.topic)
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
    connection: Arc<AtomicU64>,
    qos0: Arc<Waiting>,
    broker: BrokerSettings,
    name: &'static str,
    check: Option<&'static str>,
    /// QoS 0 messages dropped since the last warning.
    dropped: u64,
}

impl Driver {
    async fn run(mut self) -> anyhow::Result<()> {
        let address = self.broker.address();
        let mut backoff = Backoff::default();
        loop {
            let heard = match self.eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    let number = self.connection.fetch_add(1, Ordering::AcqRel) + 1;
                    let verb = if number == 1 {
                        "connected"
                    } else {
                        "reconnected"
                    };
                    tracing::info!(broker = %address, link = self.name, "{verb}");
                    metrics::gauge!("iot_relay_connected", "link" => self.name).set(1.0);
                    self.health(Ok(()));
                    backoff.reset();
                    Heard::Connected {
                        session_present: ack.session_present,
                    }
                }
                Ok(Event::Incoming(Packet::Publish(publish))) => {
                    if publish.qos == QoS::AtMostOnce && !self.qos0.take(publish.payload.len()) {
                        self.drop_qos0();
                        continue;
                    }
                    Heard::Message(Box::new(Message {
                        publish,
                        connection: self.connection.load(Ordering::Acquire),
                    }))
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
    use super::{Waiting, QOS0_BACKLOG, QOS0_BYTES};

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
}
