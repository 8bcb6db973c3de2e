//! The persister on a NATS JetStream cloud (`--broker nats://…`): the stream set up
//! (create or update, idempotent), then the durable pull consumer every replica shares
//! read, each message mapped as on MQTT (its topic from the `Mqtt-Topic` header) and
//! acknowledged only after the write that holds it.
//!
//! A reading without `(device, boot, seq)` gets `_id: {stream, seq, n}` from its
//! message's stream sequence (`n` counts its documents): a message delivered again (a
//! replica that died before acknowledging, an acknowledgement lost with a node) is then
//! refused by the database like a keyed reading's copy, so it too is stored once. The
//! relays' message ids keep copies out of the stream itself.
//!
//! Not over NATS yet: replay requests to devices (self-healing), Sparkplug commands.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use async_nats::jetstream::{self, consumer::pull, message::Acker};
use bson::doc;
use chrono::Utc;
use futures_util::StreamExt;
use iot_core::backoff::retry;
use iot_core::nats::{self, NatsSettings};
use iot_core::ops;
use iot_store::{Mapping, Record};
use tokio_util::sync::CancellationToken;

use crate::budget::{self, DeviceBudget};
use crate::config::Config;
use crate::persister::{spawn_writer, WriterTask, STOP_GRACE};
use crate::ready::{ReadyFile, SUBSCRIBED_CHECK};
use crate::writer::{self, Pending, Stats, DATABASE_CHECK};

/// A JetStream message's acknowledgement, kept until its write succeeded.
pub struct NatsAck(Acker);

impl std::fmt::Debug for NatsAck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NatsAck")
    }
}

/// Reads the shared consumer until `shutdown`, then writes what it holds and
/// acknowledges it.
pub async fn run(
    config: &Config,
    settings: &NatsSettings,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let db = config.mongo.database("mongo-persister").await?;
    let mut ready = ReadyFile::new(config.ready_file.clone())?;
    let mapping = config
        .mapping()
        .map_err(|error| anyhow::anyhow!("cannot load the ingest mapping: {error}"))?;
    ops::health().set(
        SUBSCRIBED_CHECK,
        Err("the NATS consumer is not set up yet".into()),
    );
    ops::health().set(
        DATABASE_CHECK,
        Err(format!(
            "MongoDB at {} not reached yet",
            config.mongo.redacted_uri()
        )),
    );
    ops::serve(
        config.metrics_address.as_deref(),
        shutdown.clone(),
        writer::METRICS,
    )
    .await?;
    tracing::info!(
        cloud = %settings.address(), stream = nats::STREAM, consumer = nats::CONSUMER,
        mongodb = %config.mongo.redacted_uri(), database = config.mongo.database,
        batch_size = config.batch_size,
        "storing messages from the NATS stream (replay requests to devices are not sent over NATS yet)"
    );
    let stats = Arc::new(Stats::default());
    let mut task = spawn_writer::<NatsAck>(config, &db, &stats);
    let client = settings.connect(nats::CONSUMER).await?;
    let js = jetstream::new(client.clone());
    let Some(consumer) = set_up(config, &js, &shutdown).await else {
        return finish(task, &stats).await;
    };
    ready.mark()?;
    ops::health().set(SUBSCRIBED_CHECK, Ok(()));
    let mut reader = Reader {
        mapping,
        budget: DeviceBudget::new(config.device_documents_per_second),
        stats: Arc::clone(&stats),
    };
    let outcome = reader.serve(&consumer, &mut task, config, &shutdown).await;
    ready.clear();
    let finished = finish(task, &stats).await;
    let _ = client.flush().await;
    outcome.and(finished)
}

/// The stream and the shared consumer, made or brought to the settings; retried while
/// the cluster has no leader or is unreachable. `None` when `shutdown` came first.
async fn set_up(
    config: &Config,
    js: &jetstream::Context,
    shutdown: &CancellationToken,
) -> Option<jetstream::consumer::Consumer<pull::Config>> {
    let stream_settings = config.stream_settings();
    let max_ack_pending = config.nats_max_ack_pending;
    // How long a delivered message may wait unacknowledged (a batch being written, the
    // database down) before the stream hands it out again: a message delivered twice
    // is refused as a duplicate, so a short wait costs writes, never copies.
    let ack_wait = config.nats_ack_wait;
    retry(
        shutdown,
        || async {
            let info = nats::ensure_stream(js, &stream_settings).await?;
            tracing::info!(
                stream = nats::STREAM,
                messages = info.state.messages,
                replicas = info.config.num_replicas,
                "the NATS stream is set up"
            );
            let stream = js
                .get_stream(nats::STREAM)
                .await
                .context("cannot read the NATS stream")?;
            stream
                .create_consumer(pull::Config {
                    durable_name: Some(nats::CONSUMER.to_string()),
                    ack_policy: jetstream::consumer::AckPolicy::Explicit,
                    ack_wait,
                    max_deliver: -1,
                    max_ack_pending,
                    ..Default::default()
                })
                .await
                .context("cannot create the NATS consumer")
        },
        |error: &anyhow::Error, attempt, delay| {
            tracing::warn!(attempt, "NATS not ready: {error:#}; retrying in {delay:?}");
        },
    )
    .await
}

/// Writes what is handed over, acknowledges it, and says what was done.
async fn finish(task: WriterTask<NatsAck>, stats: &Stats) -> anyhow::Result<()> {
    let WriterTask {
        pending,
        mut written,
        writer,
        stop_writing,
        ..
    } = task;
    drop(pending);
    let grace = tokio::spawn(async move {
        tokio::time::sleep(STOP_GRACE).await;
        stop_writing.cancel();
    });
    let unwritten = writer.await.context("the database writer failed")?;
    grace.abort();
    while let Ok(acks) = written.try_recv() {
        acknowledge(acks).await;
    }
    if unwritten > 0 {
        tracing::warn!(
            "{unwritten} message(s) could not be written; the stream delivers them again"
        );
    }
    tracing::info!("{}", stats.line(0));
    Ok(())
}

/// Acknowledges written messages; one that fails is delivered again and refused as a
/// duplicate.
async fn acknowledge(acks: Vec<NatsAck>) {
    for NatsAck(acker) in acks {
        if let Err(error) = acker.ack().await {
            tracing::debug!("acknowledgement not sent: {error}");
        }
    }
}

/// Maps messages and hands them to the writer.
struct Reader {
    mapping: Mapping,
    budget: DeviceBudget,
    stats: Arc<Stats>,
}

impl Reader {
    async fn serve(
        &mut self,
        consumer: &jetstream::consumer::Consumer<pull::Config>,
        task: &mut WriterTask<NatsAck>,
        config: &Config,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<()> {
        let WriterTask {
            pending,
            queued,
            written,
            ..
        } = task;
        let mut stats_ticks = tokio::time::interval(config.stats_interval);
        stats_ticks.reset();
        let batch = usize::from(config.batch_size);
        let mut last_line = String::new();
        'connect: loop {
            let mut messages = match consumer
                .stream()
                .max_messages_per_batch(batch)
                .messages()
                .await
            {
                Ok(messages) => messages,
                Err(error) => {
                    tracing::warn!("cannot pull from the NATS consumer: {error}; again in 1 s");
                    tokio::select! {
                        () = shutdown.cancelled() => return Ok(()),
                        () = tokio::time::sleep(Duration::from_secs(1)) => continue 'connect,
                    }
                }
            };
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => return Ok(()),
                    message = messages.next(), if pending.capacity() > 0 && queued.has_room() => match message {
                        Some(Ok(message)) => {
                            let Some(item) = self.read(message) else { continue };
                            queued.add(item.documents, item.bytes);
                            if pending.send(item).await.is_err() {
                                anyhow::bail!("the database writer stopped");
                            }
                        }
                        // A missed heartbeat, a leader change: the pull goes on.
                        Some(Err(error)) => tracing::warn!("pulling from the NATS consumer: {error}"),
                        None => continue 'connect,
                    },
                    Some(acks) = written.recv() => acknowledge(acks).await,
                    _ = stats_ticks.tick() => {
                        // As on MQTT: a line only when it changed, not every ten seconds of an idle stream.
                        let line = self.stats.line(pending.max_capacity() - pending.capacity());
                        if line != last_line {
                            tracing::info!("{line}");
                            last_line = line;
                        }
                    }
                }
            }
        }
    }

    /// One message: mapped, its unkeyed readings keyed by its stream sequence.
    fn read(&mut self, message: jetstream::Message) -> Option<Pending<NatsAck>> {
        let sequence = match message.info() {
            Ok(info) => info.stream_sequence,
            Err(error) => {
                tracing::warn!("a NATS message without its stream sequence, ignored: {error}");
                return None;
            }
        };
        let (message, acker) = message.split();
        self.stats.received.add(1);
        let topic = message
            .headers
            .as_ref()
            .and_then(|headers| headers.get(nats::TOPIC_HEADER))
            .and_then(|value| nats::decode_topic(value.as_str()))
            // Not from a relay: its subject is the best name it has.
            .unwrap_or_else(|| message.subject.to_string());
        let mut record = self
            .mapping
            .read_with(None, &topic, &message.payload, Utc::now());
        key_by_sequence(&mut record, sequence);
        if matches!(record, Record::Unparsed { .. }) {
            self.stats.unparsed.add(1);
        }
        let spender = budget::spender(&topic, &record).to_string();
        let refused = self
            .budget
            .spend(&spender, &mut record, std::time::Instant::now());
        if refused > 0 {
            metrics::counter!("iot_persister_over_budget_total").increment(refused as u64);
        }
        Some(Pending {
            documents: budget::documents(&record),
            bytes: message.payload.len(),
            record,
            // No retained replays on a stream: each message is in it once.
            replay: false,
            ack: NatsAck(acker),
        })
    }
}

/// Gives every document without a key of its own (readings without `(device, boot,
/// seq)`, flagged payloads: their `_id` is a new ObjectId) `{stream, seq, n}`: the same
/// on every delivery.
pub fn key_by_sequence(record: &mut Record, sequence: u64) {
    let mut n = 0i64;
    let seq = i64::try_from(sequence).unwrap_or(i64::MAX);
    let mut key = |document: &mut bson::Document| {
        // A key of the reading's own stays; an ObjectId (made at random for each
        // delivery) gives way to the message's place in the stream.
        if !matches!(document.get("_id"), Some(bson::Bson::Document(_))) {
            document.insert("_id", doc! { "stream": nats::STREAM, "seq": seq, "n": n });
        }
        n += 1;
    };
    let parts: &mut [Record] = match record {
        Record::Several(records) => records,
        single => std::slice::from_mut(single),
    };
    for part in parts {
        match part {
            Record::Readings {
                documents,
                keyed: false,
            } => documents.iter_mut().for_each(&mut key),
            Record::Unparsed { document } => key(document),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unkeyed_documents_are_keyed_by_the_stream_sequence() {
        let mut record = Record::Several(vec![
            Record::Readings {
                documents: vec![
                    doc! { "_id": bson::oid::ObjectId::new(), "value": 1.0 },
                    doc! { "value": 2.0 },
                ],
                keyed: false,
            },
            Record::Readings {
                documents: vec![doc! { "_id": { "device": "d", "boot": "b", "seq": 1 } }],
                keyed: true,
            },
            Record::Unparsed {
                document: doc! { "raw": "x" },
            },
        ]);
        key_by_sequence(&mut record, 42);
        let ids: Vec<bson::Bson> = record
            .parts()
            .iter()
            .flat_map(|part| match part {
                Record::Readings { documents, .. } => documents.clone(),
                Record::Unparsed { document } => vec![document.clone()],
                _ => Vec::new(),
            })
            .filter_map(|document| document.get("_id").cloned())
            .collect();
        assert_eq!(ids.len(), 4);
        assert_eq!(
            ids[0],
            bson::bson!({ "stream": nats::STREAM, "seq": 42_i64, "n": 0_i64 })
        );
        assert_eq!(
            ids[1],
            bson::bson!({ "stream": nats::STREAM, "seq": 42_i64, "n": 1_i64 })
        );
        assert_eq!(
            ids[2],
            bson::bson!({ "device": "d", "boot": "b", "seq": 1 })
        );
        assert_eq!(
            ids[3],
            bson::bson!({ "stream": nats::STREAM, "seq": 42_i64, "n": 2_i64 })
        );
    }
}
