//! The forwarding connection to the cloud broker (MQTT 3.1.1): packets in and out, with
//! the packet ids and the timing of every acknowledgement in the forwarder's hands.
//!
//! The forwarder publishes at QoS 2 under packet ids it derives from the log, and writes
//! a PUBREL only once its forwarded mark is on disk ([`crate::forward`]). rumqttc's event
//! loop does neither: it numbers publishes itself and answers a PUBREC with a PUBREL at
//! once, inside `poll`. So this connection uses rumqttc only to connect (TCP, TLS, CONNECT
//! and CONNACK, its `EventLoop::poll` while it has no network), then reads and writes
//! rumqttc's packets on that network itself; the session's state is the forwarder's.
//!
//! Like [`iot_core::mqtt::Connection`]: reconnects with capped, jittered backoff (each
//! attempt logged), stops only when the broker refuses the credentials, pings at the
//! keep-alive interval, and follows `iot_mqtt_connected` and `iot_mqtt_reconnects_total`.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use futures_util::FutureExt;
use iot_core::backoff::Backoff;
use iot_core::config::BrokerSettings;
use iot_core::mqtt::refused_for_good;
use rumqttc::{ConnectionError, EventLoop, MqttOptions, Packet};
use tokio::time::Instant;

/// Most packets read in one go once the first has come (as rumqttc's own reads).
const READ_BATCH: usize = 256;

/// What the forwarder hears.
#[derive(Debug)]
pub enum Heard {
    /// A connection (or reconnection) was accepted; with the relay's session kept or not.
    Connected { session_present: bool },
    /// A packet from the broker (PUBREC, PUBCOMP, PUBACK, ...); pings are answered here.
    Packet(Packet),
}

/// A connection attempt: the event loop back, the outcome, and whether a clean session
/// was made first (see [`Cloud::clean_first`]).
type Connecting = Pin<Box<dyn Future<Output = (Box<EventLoop>, Polled, bool)> + Send>>;
type Polled = Result<rumqttc::Event, ConnectionError>;

enum State {
    /// Not connected; the next attempt at `retry_at`.
    Down {
        eventloop: Box<EventLoop>,
        retry_at: Instant,
    },
    /// An attempt under way, kept across cancelled calls of [`Cloud::next`] so that a
    /// busy forwarder never cuts a connection attempt short.
    Connecting(Connecting),
    Up(Box<EventLoop>),
    /// Only between two of the above.
    Moving,
}

/// The connection; see the module header.
pub struct Cloud {
    state: State,
    broker: BrokerSettings,
    address: String,
    backoff: Backoff,
    /// Connections made so far (the throwaway clean one not counted).
    connections: u64,
    /// The next connection starts with a clean session and is closed at once: a new log
    /// numbers its messages from 1 again, and the broker must not hold an earlier log's
    /// messages under the packet ids they get.
    clean_first: bool,
    /// Packets read and not handed over yet.
    read: std::collections::VecDeque<Packet>,
    keep_alive: Duration,
    ping_at: Instant,
    awaiting_pong: bool,
    write_timeout: Duration,
}

/// A connection attempt, all in one future that is kept across cancellations: a clean
/// session first when `clean_first`, closed at once, then the persistent one.
fn attempt(mut eventloop: Box<EventLoop>, clean_first: bool) -> Connecting {
    Box::pin(async move {
        if clean_first {
            eventloop.mqtt_options.set_clean_session(true);
            let polled = eventloop.poll().await;
            if polled.is_err() {
                return (eventloop, polled, false);
            }
            if let Some(network) = eventloop.network.as_mut() {
                // Closing the socket ends a clean session as well.
                let _ = network.write(Packet::Disconnect).await;
                let _ = network.flush().await;
            }
            eventloop.clean();
            eventloop.mqtt_options.set_clean_session(false);
        }
        let polled = eventloop.poll().await;
        (eventloop, polled, clean_first)
    })
}

impl std::fmt::Debug for Cloud {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cloud")
            .field("address", &self.address)
            .field("connected", &self.is_connected())
            .finish_non_exhaustive()
    }
}

impl Cloud {
    /// A connection to `broker` with `options` (its session persistent), made by the
    /// first call of [`Cloud::next`]; `new_log` first clears what the broker holds of the
    /// relay's session (see [`Cloud::clean_first`]).
    pub fn new(broker: &BrokerSettings, mut options: MqttOptions, new_log: bool) -> Self {
        options.set_clean_session(false);
        let keep_alive = match options.keep_alive() {
            Duration::ZERO => Duration::from_secs(86_400),
            every => every,
        };
        let mut eventloop = EventLoop::new(options, 1);
        let mut network = eventloop.network_options();
        // Every write is a whole batch: Nagle's algorithm would only hold its last packet.
        network.set_tcp_nodelay(true);
        let write_timeout = Duration::from_secs(network.connection_timeout());
        eventloop.set_network_options(network);
        metrics::gauge!("iot_mqtt_connected").set(0.0);
        Self {
            state: State::Down {
                eventloop: Box::new(eventloop),
                retry_at: Instant::now(),
            },
            broker: broker.clone(),
            address: broker.address(),
            backoff: Backoff::starting(),
            connections: 0,
            clean_first: new_log,
            read: std::collections::VecDeque::new(),
            keep_alive,
            ping_at: Instant::now(),
            awaiting_pong: false,
            write_timeout,
        }
    }

    /// Whether packets were read that [`Cloud::next`] has not handed over yet: the
    /// forwarder acts on a burst of them once it has them all.
    pub fn has_read(&self) -> bool {
        !self.read.is_empty()
    }

    pub fn is_connected(&self) -> bool {
        matches!(self.state, State::Up(_))
    }

    /// The next thing heard: connects (again) when down, after the backoff delay. Safe
    /// to cancel: a read or a connection attempt goes on at the next call. An error is a
    /// refusal for good (the credentials).
    pub async fn next(&mut self) -> anyhow::Result<Heard> {
        loop {
            if let Some(packet) = self.read.pop_front() {
                return Ok(Heard::Packet(packet));
            }
            match &mut self.state {
                State::Down { retry_at, .. } => {
                    tokio::time::sleep_until(*retry_at).await;
                    let State::Down { eventloop, .. } =
                        std::mem::replace(&mut self.state, State::Moving)
                    else {
                        unreachable!("matched above")
                    };
                    self.state = State::Connecting(attempt(eventloop, self.clean_first));
                }
                State::Connecting(attempt) => {
                    let (eventloop, polled, cleared) = attempt.await;
                    if cleared {
                        self.clean_first = false;
                        tracing::info!(
                            broker = %self.address,
                            "a new log: cleared this relay's session on the cloud broker (its packet ids are the new log's)"
                        );
                    }
                    self.state = State::Up(eventloop);
                    if let Some(heard) = self.connected(polled)? {
                        return Ok(heard);
                    }
                }
                State::Up(eventloop) => {
                    let Some(network) = eventloop.network.as_mut() else {
                        self.lost("no network", false);
                        continue;
                    };
                    let ping_at = self.ping_at;
                    tokio::select! {
                        first = network.read() => {
                            let first = match first {
                                Ok(packet) => packet,
                                Err(error) => {
                                    self.lost(&error, false);
                                    continue;
                                }
                            };
                            self.read.push_back(first);
                            // What else has come, without waiting.
                            while self.read.len() < READ_BATCH {
                                match network.read().now_or_never() {
                                    Some(Ok(packet)) => self.read.push_back(packet),
                                    Some(Err(error)) => {
                                        self.lost(&error, false);
                                        break;
                                    }
                                    None => break,
                                }
                            }
                            self.read.retain(|packet| !matches!(packet, Packet::PingResp));
                            self.awaiting_pong = false;
                        }
                        () = tokio::time::sleep_until(ping_at) => {
                            if self.awaiting_pong {
                                self.lost("no answer to the keep-alive ping", false);
                                continue;
                            }
                            self.ping_at = Instant::now() + self.keep_alive;
                            if self.write([Packet::PingReq]).await {
                                self.awaiting_pong = true;
                            }
                        }
                    }
                }
                State::Moving => unreachable!("never left so"),
            }
        }
    }

    /// The outcome of a connection attempt, its event loop back in `Up`: what to hand
    /// over, if anything (a failed attempt is down again until the backoff's delay).
    fn connected(&mut self, polled: Polled) -> anyhow::Result<Option<Heard>> {
        let ack = match polled {
            Ok(rumqttc::Event::Incoming(Packet::ConnAck(ack))) => ack,
            Ok(other) => {
                self.lost(format!("expected CONNACK, got {other:?}"), true);
                return Ok(None);
            }
            Err(ConnectionError::ConnectionRefused(code)) => {
                if let Some(error) = refused_for_good(&self.broker, code) {
                    return Err(error);
                }
                self.lost(format!("connection refused: {code:?}"), true);
                return Ok(None);
            }
            Err(error) => {
                self.lost(&error, true);
                return Ok(None);
            }
        };
        if self.connections == 0 {
            tracing::info!(broker = %self.address, "connected");
        } else {
            tracing::info!(broker = %self.address, "reconnected");
            metrics::counter!("iot_mqtt_reconnects_total").increment(1);
        }
        metrics::gauge!("iot_mqtt_connected").set(1.0);
        self.connections += 1;
        self.backoff.reset();
        self.read.clear();
        self.awaiting_pong = false;
        self.ping_at = Instant::now() + self.keep_alive;
        Ok(Some(Heard::Connected {
            session_present: ack.session_present,
        }))
    }

    /// Writes `packets` with one flush; `false` when not connected or the write failed
    /// (the connection is dropped then, and made again by [`Cloud::next`]).
    pub async fn write(&mut self, packets: impl IntoIterator<Item = Packet>) -> bool {
        let State::Up(eventloop) = &mut self.state else {
            return false;
        };
        let Some(network) = eventloop.network.as_mut() else {
            return false;
        };
        let write = async {
            for packet in packets {
                network.write(packet).await?;
            }
            network.flush().await
        };
        let error = match tokio::time::timeout(self.write_timeout, write).await {
            Ok(Ok(())) => return true,
            Ok(Err(error)) => error.to_string(),
            Err(_) => format!("no write within {:?}", self.write_timeout),
        };
        self.lost(error, false);
        false
    }

    /// Closes the connection cleanly (a DISCONNECT), if it is up.
    pub async fn close(&mut self) {
        if self.write([Packet::Disconnect]).await {
            tracing::debug!(broker = %self.address, "disconnected");
        }
        if let State::Up(eventloop) = &mut self.state {
            eventloop.clean();
        }
    }

    /// The connection is gone (or an attempt failed): down until the backoff's delay.
    fn lost(&mut self, error: impl std::fmt::Display, attempt: bool) {
        let State::Up(mut eventloop) = std::mem::replace(&mut self.state, State::Moving) else {
            unreachable!("only a connection that is up is lost")
        };
        eventloop.clean();
        self.read.clear();
        metrics::gauge!("iot_mqtt_connected").set(0.0);
        let delay = self.backoff.next_delay();
        if !attempt && self.connections > 0 {
            tracing::warn!(broker = %self.address, "connection lost: {error}; reconnecting in {delay:?}");
        } else {
            let attempt = self.backoff.attempt();
            tracing::warn!(broker = %self.address, attempt, "cannot connect: {error}; retrying in {delay:?}");
        }
        self.state = State::Down {
            eventloop,
            retry_at: Instant::now() + delay,
        };
    }
}
