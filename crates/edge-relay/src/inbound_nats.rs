//! Cloud to edge over NATS, when the cloud is a JetStream cluster: the relay reads its
//! site's request subjects (`iot.request.<site>.>`: replay requests, Sparkplug NCMD)
//! and the Sparkplug primary host's `STATE` (`iot.state`), and hands each to the same
//! [`Carrier`] as the cloud Mosquitto's: a replay request is answered from the log
//! first, the rest goes on to the edge broker with its topic, QoS and retain flag
//! unchanged. Only what the MQTT path subscribes to is carried ([`carried`]).
//!
//! These are core NATS messages, at most once: a request lost with a connection is
//! asked again (see `iot_core::nats`). The host's `STATE` has no last will over NATS: the
//! host sends it again every `STATE_EVERY`, and a host not heard for `STATE_TIMEOUT`
//! while this relay is connected is taken for gone: its `STATE` offline (its last
//! `online` with `online: false`, the same timestamp, as its will would have been) is
//! published retained at the edge, so edge nodes hold their data as they would for an
//! MQTT host that died.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use futures_util::StreamExt;
use iot_core::nats;
use rumqttc::v5::mqttbytes::QoS;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::inbound::{carried, Carrier};

/// Sparkplug hosts followed at once (one a persister that reads Sparkplug).
const MAX_HOSTS: usize = 64;

/// A host's `STATE` as last carried to the edge.
#[derive(Debug)]
struct Host {
    /// The payload carried last: the same again is not published again.
    carried: Bytes,
    /// Its will: `STATE` offline with the timestamp of its `online`; `None` once the
    /// host said it is offline, or its will was published.
    will: Option<Bytes>,
    heard: Instant,
}

/// Carries requests in until `shutdown`.
pub async fn run(
    client: async_nats::Client,
    site: String,
    mut carrier: Carrier,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let requests = client
        .subscribe(nats::site_requests(&site))
        .await
        .context("cannot subscribe to the site's NATS requests")?;
    let states = client
        .subscribe(nats::STATE_SUBJECT)
        .await
        .context("cannot subscribe to the Sparkplug host's STATE on NATS")?;
    tracing::info!(
        requests = nats::site_requests(&site),
        state = nats::STATE_SUBJECT,
        "reading replay requests and Sparkplug commands from NATS"
    );
    let mut messages = futures_util::stream::select(requests, states);
    let mut hosts: HashMap<String, Host> = HashMap::new();
    let mut ticks = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            message = messages.next() => {
                let Some(message) = message else {
                    anyhow::bail!("the NATS subscriptions ended");
                };
                let Some((topic, qos, retain)) = nats::mqtt_of_headers(message.headers.as_ref())
                    .filter(|(topic, ..)| carried(topic))
                else {
                    tracing::warn!(subject = %message.subject, "a NATS request that is no replay request, Sparkplug NCMD or STATE: not carried");
                    continue;
                };
                let qos = match qos {
                    0 => QoS::AtMostOnce,
                    1 => QoS::AtLeastOnce,
                    _ => QoS::ExactlyOnce,
                };
                if message.subject.as_str() == nats::STATE_SUBJECT {
                    if topic.starts_with("spBv1.0/STATE/") {
                        heard_state(&mut carrier, &mut hosts, topic, qos, retain, message.payload).await?;
                    }
                    continue;
                }
                if topic.starts_with("spBv1.0/STATE/") {
                    continue; // a site's own subject carries no host's STATE
                }
                carrier.carry(&topic, qos, retain, &message.payload).await?;
            }
            _ = ticks.tick() => check_hosts(&client, &carrier, &mut hosts).await?,
        }
    }
}

/// A host's `STATE`: carried to the edge when it changed, and remembered (its will too).
async fn heard_state(
    carrier: &mut Carrier,
    hosts: &mut HashMap<String, Host>,
    topic: String,
    qos: QoS,
    retain: bool,
    payload: Bytes,
) -> anyhow::Result<()> {
    let will = will_of(&payload);
    let now = Instant::now();
    if let Some(host) = hosts.get_mut(&topic) {
        host.heard = now;
        if host.carried == payload {
            return Ok(());
        }
        carrier.publish(&topic, qos, retain, &payload).await?;
        host.carried = payload;
        host.will = will;
        return Ok(());
    }
    if hosts.len() >= MAX_HOSTS {
        tracing::warn!(
            topic,
            "more than {MAX_HOSTS} Sparkplug hosts: this one's STATE not carried"
        );
        return Ok(());
    }
    carrier.publish(&topic, qos, retain, &payload).await?;
    tracing::info!(topic, "Sparkplug host STATE carried to the edge");
    hosts.insert(
        topic,
        Host {
            carried: payload,
            will,
            heard: now,
        },
    );
    Ok(())
}

/// Once a second: a host not heard for `STATE_TIMEOUT` while connected gets its will
/// published at the edge. While the relay is away from NATS nobody is judged (the
/// clock starts again when it is back).
async fn check_hosts(
    client: &async_nats::Client,
    carrier: &Carrier,
    hosts: &mut HashMap<String, Host>,
) -> anyhow::Result<()> {
    let now = Instant::now();
    if client.connection_state() != async_nats::connection::State::Connected {
        hosts.values_mut().for_each(|host| host.heard = now);
        return Ok(());
    }
    for (topic, host) in hosts.iter_mut() {
        if now.duration_since(host.heard) < nats::STATE_TIMEOUT {
            continue;
        }
        let Some(will) = host.will.take() else {
            continue;
        };
        tracing::warn!(
            topic,
            "the Sparkplug host's STATE not heard for {:?}: publishing its STATE offline at the edge, as its last will",
            nats::STATE_TIMEOUT
        );
        carrier
            .publish(topic, QoS::AtLeastOnce, true, &will)
            .await?;
        host.carried = will;
    }
    Ok(())
}

/// The will of a host's `STATE` online (`{"online":true,"timestamp":T}`): the same
/// with `online: false`; `None` for anything else.
fn will_of(payload: &[u8]) -> Option<Bytes> {
    let mut state: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(payload).ok()?;
    if state.get("online")? != &serde_json::Value::Bool(true) {
        return None;
    }
    state.insert("online".into(), serde_json::Value::Bool(false));
    Some(Bytes::from(serde_json::to_vec(&state).ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hosts_will_is_its_online_state_turned_offline() {
        let will = will_of(br#"{"online":true,"timestamp":1700000000000}"#).expect("a will");
        let will: serde_json::Value = serde_json::from_slice(&will).expect("JSON");
        assert_eq!(
            will,
            serde_json::json!({"online": false, "timestamp": 1_700_000_000_000_i64})
        );
        assert_eq!(will_of(br#"{"online":false,"timestamp":1}"#), None);
        assert_eq!(will_of(b"online"), None);
    }
}
