//! The edge side: every message from the edge broker into the log, acknowledged to the
//! broker only once it is on disk.
//!
//! Group commit without a timer: while one batch is being synced, the next gathers what
//! arrives, and is written as soon as the first is done. A quiet edge costs one sync per
//! message; a busy one up to [`RECEIVE_MAXIMUM`](crate::mqtt5::RECEIVE_MAXIMUM) messages
//! per sync (the broker sends no more unacknowledged ones at once).
//!
//! Back-pressure: while the disk budget is full of messages not forwarded yet
//! ([`Room`]), no batch is written and nothing acknowledged; the broker holds what comes
//! (in the relay's session) and the devices their own buffers. Nothing is dropped.

use std::sync::Arc;

use anyhow::Context;
use rumqttc::v5::mqttbytes::QoS;
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::log::{now_ms, Entry, Log};
use crate::mqtt5::{filter, Heard, Link, Message};

/// Most messages held while a batch is written (or while the disk is full).
const MAX_PENDING: usize = 10_000;

/// Whether the log may take more: `true` while the disk budget is full of messages not
/// forwarded yet.
pub type Room = watch::Receiver<bool>;

/// Takes messages from `link` into `log` until `shutdown`; wakes `forward` after each
/// batch on disk. An error is a failed disk write or refused credentials.
pub async fn run(
    mut link: Link,
    log: Log,
    topics: Vec<String>,
    forward: Arc<Notify>,
    mut full: Room,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let mut pending: Vec<Message> = Vec::new();
    let mut writing: Option<JoinHandle<anyhow::Result<Vec<Message>>>> = None;
    let mut held_back = false;
    let result = loop {
        if writing.is_none() && !pending.is_empty() {
            if *full.borrow() {
                if !held_back {
                    tracing::warn!(
                        held = pending.len(),
                        "the log's disk budget is full of messages not forwarded yet: not acknowledging the edge broker until the cloud takes some"
                    );
                    metrics::gauge!("iot_relay_back_pressure").set(1.0);
                    held_back = true;
                }
            } else {
                if held_back {
                    tracing::info!("room in the log again: acknowledging the edge broker");
                    metrics::gauge!("iot_relay_back_pressure").set(0.0);
                    held_back = false;
                }
                writing = Some(write(&log, std::mem::take(&mut pending)));
            }
        }
        tokio::select! {
            biased;
            written = async {
                match writing.as_mut() {
                    Some(task) => task.await,
                    None => std::future::pending().await,
                }
            }, if writing.is_some() => {
                writing = None;
                // A batch the disk refused is not acknowledged: the broker sends it again
                // to whoever takes the session next.
                let batch = match written.context("the log's writer failed").and_then(|batch| batch) {
                    Ok(batch) => batch,
                    Err(error) => break Err(error),
                };
                metrics::counter!("iot_relay_logged_total").increment(batch.len() as u64);
                forward.notify_one();
                if let Err(error) = ack_all(&link, &batch).await {
                    break Err(error);
                }
            }
            () = shutdown.cancelled(), if writing.is_none() => break Ok(()),
            heard = link.recv(), if pending.len() < MAX_PENDING => match heard {
                Ok(Heard::Connected { .. }) => {
                    let filters = topics.iter().map(|topic| filter(topic, QoS::AtLeastOnce));
                    if link.client.subscribe_many(filters).await.is_err() {
                        break Err(anyhow::anyhow!("the edge connection closed"));
                    }
                    tracing::info!(topics = ?topics, "subscribed on the edge broker");
                }
                Ok(Heard::Message(message)) => pending.push(*message),
                Err(error) => break Err(error),
            },
            changed = full.changed(), if *full.borrow() => {
                if changed.is_err() {
                    break Ok(());
                }
            }
        }
    };
    if !pending.is_empty() {
        tracing::info!(
            count = pending.len(),
            "stopping: messages not on disk yet are left to the edge broker (not acknowledged, sent again on the next start)"
        );
    }
    link.close().await;
    result
}

async fn ack_all(link: &Link, batch: &[Message]) -> anyhow::Result<()> {
    for message in batch {
        link.ack(message).await?;
    }
    Ok(())
}

/// Writes `batch` to the log in a blocking task; gives it back once it is on disk.
fn write(log: &Log, batch: Vec<Message>) -> JoinHandle<anyhow::Result<Vec<Message>>> {
    let log = log.clone();
    tokio::task::spawn_blocking(move || {
        let received_ms = now_ms();
        let entries: Vec<Entry> = batch
            .iter()
            .map(|message| Entry {
                topic: String::from_utf8_lossy(&message.publish.topic).into_owned(),
                payload: message.publish.payload.clone(),
                qos: match message.publish.qos {
                    QoS::AtMostOnce => rumqttc::QoS::AtMostOnce,
                    QoS::AtLeastOnce => rumqttc::QoS::AtLeastOnce,
                    QoS::ExactlyOnce => rumqttc::QoS::ExactlyOnce,
                },
                retain: message.publish.retain,
                received_ms,
            })
            .collect();
        log.append(&entries)?;
        Ok(batch)
    })
}
