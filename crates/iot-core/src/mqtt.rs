//! An MQTT connection that keeps itself alive.
//!
//! [`Connection::start`] runs rumqttc's event loop in a task of its own that is never
//! blocked by the service: it reconnects with capped exponential backoff (logging
//! every attempt), gives up only when the broker refuses the credentials (retrying a
//! wrong password forever helps nobody), and hands the service the few events it
//! cares about through a channel.
//!
//! Acknowledgements of received messages do not go through rumqttc's request channel:
//! its event loop takes one request per turn, behind a batch of up to ten incoming
//! packets, so a subscriber draining a long queue fell ever further behind with its
//! acknowledgements, and once 65 535 of them waited, the service blocked on the full
//! request channel while the event loop blocked on the full event channel: a deadlock.
//! Acknowledgements go to the driver task instead, which writes all that wait in one
//! go, also while it waits for the service to take an event.

use std::time::Duration;

use anyhow::anyhow;
use rumqttc::{
    AsyncClient, ConnectReturnCode, ConnectionError, EventLoop, MqttOptions, Outgoing, Packet,
    PubAck, PubRec, Publish, QoS, Request, SubscribeFilter, SubscribeReasonCode, Unsubscribe,
};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::backoff::Backoff;
use crate::config::BrokerSettings;

/// Capacity of rumqttc's request channel: publishes, subscriptions, the disconnect.
/// Acknowledgements of received messages take their own path (see the module header).
const REQUEST_CAPACITY: usize = u16::MAX as usize;
/// Events buffered between the event loop and the service.
const EVENT_CAPACITY: usize = 1024;
/// Most acknowledgements written in one go.
const ACK_BATCH: usize = 4096;

/// What the service hears from its connection.
#[derive(Debug)]
pub enum Event {
    /// A connection (or reconnection) was accepted.
    Connected { session_present: bool },
    /// The broker answered a subscription; one code per topic filter.
    Subscribed(Vec<SubscribeReasonCode>),
    /// A message arrived.
    Message(Publish),
    /// The broker acknowledged one of our QoS 1 or 2 publishes.
    Acked,
    /// The broker answered an unsubscribe.
    Unsubscribed,
}

/// A running connection: the client to send with, and its events.
#[derive(Debug)]
pub struct Connection {
    pub client: AsyncClient,
    events: mpsc::Receiver<Event>,
    /// Acknowledgements (and the barrier behind them) for the driver to write, in order.
    acks: mpsc::UnboundedSender<Request>,
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
    /// Starts connecting to `broker` with `options` in the background.
    pub fn start(broker: &BrokerSettings, options: MqttOptions) -> Self {
        let (client, mut eventloop) = AsyncClient::new(options, REQUEST_CAPACITY);
        // rumqttc writes whole batches of packets at once, so Nagle's algorithm only adds
        // delay: up to 40 ms on the last packets before a pause, against delayed ACKs.
        let mut network = eventloop.network_options();
        network.set_tcp_nodelay(true);
        eventloop.set_network_options(network);
        let (tx, events) = mpsc::channel(EVENT_CAPACITY);
        let (acks, acks_rx) = mpsc::unbounded_channel();
        let driver = tokio::spawn(drive(eventloop, tx, acks_rx, broker.clone()));
        Self {
            client,
            events,
            acks,
            driver: Some(driver),
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

    /// Acknowledges a message received with manual acknowledgements on. Never waits:
    /// the driver writes it with the others that wait, at the latest once the event
    /// loop's current step is done.
    pub async fn ack(&mut self, publish: &Publish) -> anyhow::Result<()> {
        let request = match publish.qos {
            QoS::AtMostOnce => return Ok(()),
            QoS::AtLeastOnce => Request::PubAck(PubAck::new(publish.pkid)),
            QoS::ExactlyOnce => Request::PubRec(PubRec::new(publish.pkid)),
        };
        if self.acks.send(request).is_err() {
            return Err(self.why_stopped().await);
        }
        self.acks_sent = true;
        Ok(())
    }

    /// Queues a publish; waits only while rumqttc's request channel is full. QoS 1 and 2
    /// publishes are counted until the broker acknowledges them.
    pub async fn publish(
        &mut self,
        topic: &str,
        qos: QoS,
        retain: bool,
        payload: Vec<u8>,
    ) -> anyhow::Result<()> {
        if self
            .client
            .publish(topic, qos, retain, payload)
            .await
            .is_err()
        {
            return Err(self.why_stopped().await);
        }
        if qos != QoS::AtMostOnce {
            self.unacked += 1;
        }
        Ok(())
    }

    /// The next event. An error means the connection ended for good: the broker refused
    /// the credentials, or the connection was closed.
    pub async fn recv(&mut self) -> anyhow::Result<Event> {
        match self.events.recv().await {
            Some(event) => {
                if let Event::Acked = event {
                    self.unacked = self.unacked.saturating_sub(1);
                    self.acknowledged += 1;
                }
                Ok(event)
            }
            None => Err(self.why_stopped().await),
        }
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

    /// How many events wait to be read: zero means the service is caught up.
    pub fn backlog(&self) -> usize {
        self.events.len()
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
        let mut barrier = self.acks_sent
            && self
                .acks
                .send(Request::Unsubscribe(Unsubscribe::new(BARRIER_FILTER)))
                .is_ok();
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
        // Keep draining events so the event loop is never stuck on a full channel.
        let drain = async { while self.events.recv().await.is_some() {} };
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

/// Polls the event loop forever: reconnects with backoff, stops on a clean disconnect,
/// on refused credentials, or when the service stopped listening. Writes the service's
/// acknowledgements as they come.
async fn drive(
    mut eventloop: EventLoop,
    events: mpsc::Sender<Event>,
    mut acks: mpsc::UnboundedReceiver<Request>,
    broker: BrokerSettings,
) -> anyhow::Result<()> {
    let address = broker.address();
    let mut backoff = Backoff::default();
    let mut ever_connected = false;
    let mut batch = Vec::with_capacity(ACK_BATCH);
    // Our publishes the broker had not acknowledged when the connection dropped.
    let mut unconfirmed: Vec<Request> = Vec::new();
    loop {
        let polled = tokio::select! {
            biased;
            // Acknowledgements first, all that wait. One that comes while poll() waits
            // ends that wait (what poll() had read stays buffered in rumqttc), so it is
            // written at once, not after the next incoming packet.
            taken = acks.recv_many(&mut batch, ACK_BATCH) => {
                if taken == 0 {
                    return Ok(()); // the service is gone
                }
                match write_requests(&mut eventloop, &mut batch).await {
                    Ok(()) => continue,
                    Err(error) => Err(error),
                }
            }
            polled = eventloop.poll() => polled,
        };
        let mut lost = None;
        let event = match polled {
            Ok(rumqttc::Event::Incoming(Packet::ConnAck(ack))) => {
                if ever_connected {
                    tracing::info!(broker = %address, "reconnected");
                } else {
                    tracing::info!(broker = %address, "connected");
                }
                ever_connected = true;
                backoff.reset();
                drop_stale_acks(&mut eventloop, &mut acks);
                // Sent again whatever the broker remembers: rumqttc would forget them
                // when it comes back without our session (after a crash, say).
                eventloop.pending.extend(unconfirmed.drain(..));
                Event::Connected {
                    session_present: ack.session_present,
                }
            }
            Ok(rumqttc::Event::Incoming(Packet::Publish(publish))) => Event::Message(publish),
            Ok(rumqttc::Event::Incoming(Packet::PubAck(_) | Packet::PubComp(_))) => Event::Acked,
            Ok(rumqttc::Event::Incoming(Packet::SubAck(ack))) => {
                Event::Subscribed(ack.return_codes)
            }
            Ok(rumqttc::Event::Incoming(Packet::UnsubAck(_))) => Event::Unsubscribed,
            Ok(rumqttc::Event::Outgoing(Outgoing::Disconnect)) => return Ok(()),
            Ok(_) => continue,
            Err(ConnectionError::RequestsDone) => return Ok(()),
            Err(ConnectionError::ConnectionRefused(code)) if is_final(code) => {
                return Err(refused(&broker, code));
            }
            Err(error) => {
                keep_unconfirmed(&mut eventloop, &mut unconfirmed);
                back_off(&mut backoff, ever_connected, &address, &error).await;
                continue;
            }
        };
        // Hand the event over, writing the acknowledgements that come meanwhile: while
        // the service catches up, the broker hears of what it has done.
        let mut event = Some(event);
        while let Some(next) = event.take() {
            tokio::select! {
                biased;
                permit = events.reserve() => match permit {
                    Ok(permit) => permit.send(next),
                    Err(_) => return Ok(()), // the service stopped listening
                },
                taken = acks.recv_many(&mut batch, ACK_BATCH) => {
                    if taken == 0 {
                        return Ok(());
                    }
                    if let Err(error) = write_requests(&mut eventloop, &mut batch).await {
                        lost = Some(error);
                    }
                    event = Some(next);
                }
            }
        }
        if let Some(error) = lost {
            keep_unconfirmed(&mut eventloop, &mut unconfirmed);
            back_off(&mut backoff, ever_connected, &address, &error).await;
        }
    }
}

/// Logs a lost or refused connection and waits before the next attempt.
async fn back_off(
    backoff: &mut Backoff,
    ever_connected: bool,
    address: &str,
    error: &ConnectionError,
) {
    let delay = backoff.next_delay();
    let attempt = backoff.attempt();
    if attempt == 1 && ever_connected {
        tracing::warn!(broker = %address, "connection lost: {error}; reconnecting in {delay:?}");
    } else {
        tracing::warn!(broker = %address, attempt, "cannot connect: {error}; retrying in {delay:?}");
    }
    tokio::time::sleep(delay).await;
}

/// Writes the service's acknowledgements (and the barrier behind them) in one go, with
/// one flush. On failure the connection is dropped, to be made again by the next poll.
/// Without a connection, acknowledgements are dropped as rumqttc drops its own: the
/// broker sends those messages again, and an acknowledgement on a new connection could
/// confirm another message that got the same packet id.
async fn write_requests(
    eventloop: &mut EventLoop,
    batch: &mut Vec<Request>,
) -> Result<(), ConnectionError> {
    let Some(network) = eventloop.network.as_mut() else {
        keep_all_but_acks(&mut eventloop.pending, batch.drain(..));
        return Ok(());
    };
    let state = &mut eventloop.state;
    let timeout = Duration::from_secs(eventloop.network_options.connection_timeout());
    let write = async {
        for request in batch.drain(..) {
            if let Some(packet) = state.handle_outgoing_packet(request)? {
                network.write(packet).await?;
            }
        }
        network.flush().await
    };
    let result = match tokio::time::timeout(timeout, write).await {
        Ok(written) => written.map_err(ConnectionError::from),
        Err(_) => Err(ConnectionError::FlushTimeout),
    };
    if result.is_err() {
        batch.clear();
        eventloop.clean();
    }
    result
}

/// Takes the publishes rumqttc set aside to send again after a lost connection: it
/// drops them when the broker answers the reconnect without our session, which would
/// lose QoS 1 readings a broker crash had not confirmed. Sent again, they arrive at
/// least once.
fn keep_unconfirmed(eventloop: &mut EventLoop, unconfirmed: &mut Vec<Request>) {
    let pending = std::mem::take(&mut eventloop.pending);
    let (publishes, others): (Vec<Request>, Vec<Request>) = pending
        .into_iter()
        .partition(|request| matches!(request, Request::Publish(_)));
    unconfirmed.extend(publishes);
    eventloop.pending.extend(others);
}

/// On a new connection, acknowledgements of the previous one's messages are dropped.
fn drop_stale_acks(eventloop: &mut EventLoop, acks: &mut mpsc::UnboundedReceiver<Request>) {
    let waiting = std::iter::from_fn(|| acks.try_recv().ok());
    keep_all_but_acks(&mut eventloop.pending, waiting);
}

fn keep_all_but_acks(
    pending: &mut std::collections::VecDeque<Request>,
    requests: impl Iterator<Item = Request>,
) {
    pending.extend(
        requests.filter(|request| !matches!(request, Request::PubAck(_) | Request::PubRec(_))),
    );
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
mod tests {
    //! A broker that loses a publish before confirming it cannot be made from a real
    //! Mosquitto on demand; this one speaks just enough MQTT over a socket to do it.

    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    /// Reads one MQTT packet: its type (high nibble of the first byte) and its body.
    async fn read_packet(stream: &mut TcpStream) -> (u8, Vec<u8>) {
        let first = stream.read_u8().await.expect("a packet");
        let (mut length, mut shift) = (0usize, 0);
        loop {
            let byte = stream.read_u8().await.expect("its length");
            length |= usize::from(byte & 0x7f) << shift;
            shift += 7;
            if byte & 0x80 == 0 {
                break;
            }
        }
        let mut body = vec![0; length];
        stream.read_exact(&mut body).await.expect("its body");
        (first >> 4, body)
    }

    /// Accepts a connection and answers CONNECT with "accepted, no session".
    async fn accept(listener: &TcpListener) -> TcpStream {
        let (mut stream, _) = listener.accept().await.expect("a connection");
        assert_eq!(read_packet(&mut stream).await.0, 1, "CONNECT first");
        stream
            .write_all(&[0x20, 0x02, 0x00, 0x00])
            .await
            .expect("CONNACK");
        stream
    }

    #[tokio::test]
    async fn a_publish_never_confirmed_is_sent_again_to_a_broker_that_forgot_the_session() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("a port");
        let broker = BrokerSettings {
            host: "127.0.0.1".into(),
            port: listener.local_addr().expect("address").port(),
            username: None,
            password: None,
            tls_ca: None,
            keep_alive: Duration::from_secs(30),
            env_prefix: "LOCAL",
        };
        let options = broker.mqtt_options("resend-test", true).expect("options");
        let mut connection = Connection::start(&broker, options);
        connection
            .publish("/sensor/t", QoS::AtLeastOnce, false, b"21.50".to_vec())
            .await
            .expect("queued");

        // The broker reads the publish and dies before confirming it.
        let mut stream = accept(&listener).await;
        let (kind, body) = read_packet(&mut stream).await;
        assert_eq!(kind, 3, "PUBLISH");
        assert!(body.ends_with(b"21.50"));
        drop(stream);

        // Back without our session: the reading comes again, and once confirmed the
        // connection counts it acknowledged.
        let events = tokio::spawn(async move {
            connection
                .wait_acknowledged(Duration::from_secs(20))
                .await
                .map(|all| (all, connection.acknowledged()))
        });
        let mut stream = accept(&listener).await;
        let (kind, body) = read_packet(&mut stream).await;
        assert_eq!(kind, 3, "the same PUBLISH again");
        assert!(body.ends_with(b"21.50"));
        let packet_id = &body[2 + "/sensor/t".len()..][..2];
        stream
            .write_all(&[0x40, 0x02, packet_id[0], packet_id[1]])
            .await
            .expect("PUBACK");
        let (all, acknowledged) = events.await.expect("task").expect("connection");
        assert!(all && acknowledged == 1);
    }
}
