//! Retiring a replica removed for good (`--retire`): its session stops taking a share
//! of the stream, what waited in it is stored, then the session is ended.

use std::time::Duration;

use anyhow::Context;
use iot_core::config::BrokerSettings;
use iot_core::mqtt::{Connection, Event};

/// Where a retiring persister stands: its session's subscriptions removed, then rounds
/// of "write and acknowledge everything received, then a barrier" until a barrier
/// comes back with no message before it. The broker answers in order and sends the
/// next queued messages as soon as it reads our acknowledgements, so such a barrier
/// proves the session's queue is empty. (Mosquitto does: reading a PUBACK, it moves
/// queued messages in flight and writes them before it reads the next packet. A broker
/// that does not could leave messages queued when the session ends.)
#[derive(Debug)]
pub struct Retiring {
    filters: usize,
    /// Unsubscribe answers still to come on this connection.
    unsubscribing: usize,
    connected: bool,
    /// Messages received when the barrier in flight was sent.
    barrier: Option<u64>,
    pub drained: bool,
}

impl Retiring {
    pub fn new(filters: usize) -> Self {
        Self {
            filters,
            unsubscribing: 0,
            connected: false,
            barrier: None,
            drained: false,
        }
    }

    /// A (new) connection: its unsubscribes are on their way; a barrier of an earlier
    /// connection proves nothing.
    pub fn connected(&mut self) {
        self.connected = true;
        self.unsubscribing = self.filters;
        self.barrier = None;
    }

    pub fn unsubscribed(&mut self, received: u64) {
        if self.unsubscribing > 0 {
            self.unsubscribing -= 1;
        } else if let Some(sent_at) = self.barrier.take() {
            self.drained = received == sent_at;
        }
    }

    pub fn wants_barrier(&self, all_settled: bool) -> bool {
        self.connected && self.unsubscribing == 0 && self.barrier.is_none() && all_settled
    }

    pub fn barrier_sent(&mut self, received: u64) {
        self.barrier = Some(received);
    }
}

/// Makes the broker forget `client_id`'s session: a connection with a clean session
/// discards the old one, and its own ends with it.
pub async fn end_session(broker: &BrokerSettings, client_id: &str) -> anyhow::Result<()> {
    let options = broker
        .mqtt_options(client_id, true)
        .context("cannot set up the broker connection")?;
    let mut connection = Connection::start(broker, options);
    loop {
        if let Event::Connected { .. } = connection.recv().await? {
            break;
        }
    }
    connection.close(Duration::from_secs(5)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_barrier_with_no_message_before_it_ends_retiring() {
        let mut retiring = Retiring::new(2);
        assert!(!retiring.wants_barrier(true), "not connected yet");
        retiring.connected();
        retiring.unsubscribed(0);
        assert!(!retiring.wants_barrier(true), "one unsubscribe to go");
        retiring.unsubscribed(3);
        assert!(
            !retiring.wants_barrier(false),
            "three messages not written yet"
        );
        assert!(retiring.wants_barrier(true));
        retiring.barrier_sent(3);
        retiring.unsubscribed(5); // two more came before the answer
        assert!(!retiring.drained);
        retiring.barrier_sent(5);
        retiring.unsubscribed(5);
        assert!(retiring.drained);
    }
}
