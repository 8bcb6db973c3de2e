//! The persister on a NATS JetStream cloud (`--broker nats://…`): the stream set up
//! (create or update, idempotent), then the durable pull consumer every replica shares
//! read, each message mapped as on MQTT (its topic from the `Mqtt-Topic` header) and
//! acknowledged only after the write that holds it.
//!
//! A reading without `(device, boot, seq)` gets a key from its message (`n` counts the
//! message's documents): `_id: {site, msg, n}` from the relay's `Nats-Msg-Id` (its run
//! and the message's place in its log; one-way, [`message_key`]) and the site its
//! subject names, else `{stream, seq, n}` from the stream sequence. A message delivered again (a replica that died before
//! acknowledging, an acknowledgement lost with a node), or held twice by the stream, is
//! then refused by the database like a keyed reading's copy, so it too is stored once.
//! The relay's id rather than the stream's sequence because the message is the relay's:
//! a copy the stream took again under a new sequence (seen once across a leader cut off
//! from the other nodes on nats-server 2.9) or after it lost its state keeps its id.
//!
//! Requests go back to the sites as on MQTT, over core NATS (`iot_core::nats`): the
//! repairer's replay requests and the Sparkplug host's Rebirths to the site whose
//! subject the device's (the node's) messages last came on
//! (`iot.request.<site>.replay`, `.ncmd`), the host's `STATE` to every site
//! (`iot.state`), again every `STATE_EVERY` since NATS has no retained messages and no
//! last will. Devices' answers that they no longer have some readings
//! (`/replay/<device>/gone`) come in the stream like any message and go to the
//! repairer.
//!
//! A Sparkplug host must see every message of a node to follow its `seq` numbers, and
//! replicas share the stream: a host beside another persister, or a persister beside a
//! host, refuses to start ([`crate::roll_call`]).

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
use iot_core::replay;
use iot_store::sparkplug::Rebirth;
use iot_store::{Mapping, Record};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::budget::{self, DeviceBudget};
use crate::config::Config;
use crate::persister::{observe, serve_ops, spawn_repairer, spawn_writer, WriterTask, STOP_GRACE};
use crate::ready::{ReadyFile, SUBSCRIBED_CHECK};
use crate::repair;
use crate::roll_call;
use crate::sparkplug::{self, Sparkplug};
use crate::writer::{Pending, Stats};

/// A JetStream message's acknowledgement, kept until its write succeeded.
pub struct NatsAck(Acker);

impl std::fmt::Debug for NatsAck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NatsAck")
    }
}

/// Calls the persisters' roll ([`roll_call`]): an error when a Sparkplug host would
/// read the stream beside another persister. A roll call that cannot be made (a
/// cluster configured before it: no permission) is said and passed.
async fn check_alone(
    config: &Config,
    client: &async_nats::Client,
    sparkplug: bool,
) -> anyhow::Result<()> {
    let host_id = sparkplug.then(|| config.sparkplug_host_id());
    let role = roll_call::role(host_id.as_deref());
    match roll_call::call(client, &role).await {
        Ok(others) => match roll_call::refusal(&role, &others) {
            Some(why) => anyhow::bail!("{why}"),
            None => {
                tracing::info!(
                    role,
                    others = others.len(),
                    "other persisters on the stream"
                );
                Ok(())
            }
        },
        Err(error) => {
            tracing::warn!("cannot tell which other persisters read the stream: {error:#}");
            Ok(())
        }
    }
}

/// Warns when the server removes a full stream's oldest messages rather than refusing
/// new ones. Connected by then (the stream answered): the server's INFO is in.
fn warn_of_an_old_server(config: &Config, client: &async_nats::Client) {
    let version = client.server_info().version;
    if !nats::holds_max_bytes(&version) {
        tracing::warn!(
            version,
            max_bytes = config.nats_max_bytes,
            "this nats-server removes a full stream's oldest messages at its max_bytes, discard new or not (nats-io/nats-server#4775, fixed in 2.10.5): edge-relay keeps a tenth of --nats-max-bytes free, each relay taking a share of the room left, but anything else publishing into the stream near the limit costs its oldest messages; nats-server 2.10.5 or later refuses instead"
        );
    }
}

/// The persister's NATS connection name, as the nodes' `/connz` shows it: its client id,
/// host name and process id (`mongo-persister on 3f2a9c1b, pid 1`), one per replica,
/// containers included (each its own host name, all pid 1).
fn connection_name(config: &Config) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_string())
        .unwrap_or_else(|_| "?".into());
    format!(
        "{} on {host}, pid {}",
        config.client_id(),
        std::process::id()
    )
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
    serve_ops(
        config,
        &shutdown,
        "the NATS consumer is not set up yet",
        METRICS,
    )
    .await?;
    tracing::info!(
        cloud = %settings.address(), stream = nats::STREAM, consumer = nats::CONSUMER,
        mongodb = %config.mongo.redacted_uri(), database = config.mongo.database,
        batch_size = config.batch_size, repairs = config.repairs(),
        ingest = %if config.ingest.is_empty() { "default".to_string() } else { config.ingest.join(",") },
        "storing messages from the NATS stream"
    );
    let stats = Arc::new(Stats::default());
    let mut task = spawn_writer::<NatsAck>(config, &db, &stats);
    let (seen, requests, stop_repairing) = spawn_repairer(config, &db, &config.client_id());
    // Named so that the nodes' monitoring (`/connz`) tells the replicas apart.
    let client = settings.connect(&connection_name(config)).await?;
    let js = jetstream::new(client.clone());
    let sparkplug = mapping.reads_sparkplug().then(|| {
        Sparkplug::new(
            &config.sparkplug_host_id(),
            config.sparkplug_reorder_timeout,
        )
    });
    let mut reader = Reader {
        mapping,
        budget: DeviceBudget::new(config.device_documents_per_second),
        stats: Arc::clone(&stats),
        seen,
        sparkplug,
        sites: Sites::default(),
        client: client.clone(),
    };
    let Some(consumer) = set_up(config, &js, &shutdown).await else {
        stop_repairing.cancel();
        nats::flush_before_stop(&client).await;
        return finish(task, &stats).await;
    };
    // Before the host says it is online: a host refused must not speak for one that runs.
    if let Err(refused) = check_alone(config, &client, reader.sparkplug.is_some()).await {
        stop_repairing.cancel();
        finish(task, &stats).await?;
        return Err(refused);
    }
    reader.publish_state(true).await;
    warn_of_an_old_server(config, &client);
    ready.mark()?;
    ops::health().set(SUBSCRIBED_CHECK, Ok(()));
    // Read for the metrics only, so only where they are served.
    let watching = config.metrics_address.is_some().then(|| {
        tokio::spawn(watch_stream_and_consumer(
            js,
            consumer.clone(),
            shutdown.clone(),
        ))
    });
    let outcome = reader
        .serve(&consumer, &mut task, requests, config, &shutdown)
        .await;
    if let Some(watching) = watching {
        watching.abort();
    }
    stop_repairing.cancel();
    ready.clear();
    let finished = finish(task, &stats).await;
    // Edge nodes learn that the host is away, as from a clean MQTT disconnect.
    reader.publish_state(false).await;
    nats::flush_before_stop(&client).await;
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

/// The stream's and the shared consumer's state, as every replica reads it (the
/// figures are the cluster's, not this replica's alone).
pub const METRICS: &[ops::Metric] = &[
    nats::CONNECTED,
    ops::Metric::gauge(
        "iot_persister_nats_stream_bytes",
        "Bytes the NATS stream holds",
    ),
    ops::Metric::gauge(
        "iot_persister_nats_stream_max_bytes",
        "The NATS stream's byte limit (--nats-max-bytes); -1 for none",
    ),
    ops::Metric::gauge(
        "iot_persister_nats_stream_messages",
        "Messages the NATS stream holds",
    ),
    ops::Metric::gauge(
        "iot_persister_nats_consumer_pending",
        "Messages in the NATS stream the persisters' consumer has not handed out yet: the lag",
    ),
    ops::Metric::gauge(
        "iot_persister_nats_consumer_ack_pending",
        "Messages handed out to the persisters and not acknowledged yet (at most --nats-max-ack-pending)",
    ),
    ops::Metric::gauge(
        "iot_persister_nats_consumer_redelivered",
        "Messages handed out more than once and not acknowledged yet",
    ),
    ops::Metric::counter(
        "iot_persister_nats_redeliveries_total",
        "Messages this persister received that had been handed out before and not acknowledged within --nats-ack-wait (a replica that died, a write that failed or took longer)",
    ),
];

/// How often [`watch_stream_and_consumer`] reads the stream's and the consumer's state.
const WATCH_EVERY: Duration = Duration::from_secs(5);

/// Sets the gauges of [`METRICS`] from the consumer's and the stream's info, every
/// [`WATCH_EVERY`] until `shutdown`; a read that fails (no leader for a moment, the
/// cluster gone: `iot_nats_connected` says which) keeps the last figures.
async fn watch_stream_and_consumer(
    js: jetstream::Context,
    consumer: jetstream::consumer::Consumer<pull::Config>,
    shutdown: CancellationToken,
) {
    let mut ticks = tokio::time::interval(WATCH_EVERY);
    // Reads that waited for a cluster that is gone are not made up for all at once.
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    while shutdown.run_until_cancelled(ticks.tick()).await.is_some() {
        match consumer.get_info().await {
            Ok(info) => {
                metrics::gauge!("iot_persister_nats_consumer_pending").set(info.num_pending as f64);
                metrics::gauge!("iot_persister_nats_consumer_ack_pending")
                    .set(info.num_ack_pending as f64);
                metrics::gauge!("iot_persister_nats_consumer_redelivered")
                    .set(info.num_redelivered as f64);
            }
            Err(error) => tracing::debug!("cannot read the NATS consumer's state: {error}"),
        }
        match js.get_stream(nats::STREAM).await {
            Ok(stream) => {
                let info = stream.cached_info();
                metrics::gauge!("iot_persister_nats_stream_bytes").set(info.state.bytes as f64);
                metrics::gauge!("iot_persister_nats_stream_messages")
                    .set(info.state.messages as f64);
                metrics::gauge!("iot_persister_nats_stream_max_bytes")
                    .set(info.config.max_bytes as f64);
            }
            Err(error) => tracing::debug!("cannot read the NATS stream's state: {error}"),
        }
    }
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

/// Sites by device and by Sparkplug node (`<group>/<node>`): where each one's
/// messages came from last, so its requests go there.
#[derive(Debug, Default)]
struct Sites {
    by_name: std::collections::HashMap<String, String>,
}

/// Names followed at most; past it they are all forgotten and learnt again from the
/// messages that follow (a request for one not heard since waits for its next message).
const MAX_SITES_FOLLOWED: usize = 100_000;

impl Sites {
    fn heard(&mut self, name: String, site: &str) {
        if self.by_name.get(&name).is_some_and(|known| known == site) {
            return;
        }
        if self.by_name.len() >= MAX_SITES_FOLLOWED {
            self.by_name.clear();
        }
        self.by_name.insert(name, site.to_string());
    }

    fn of(&self, name: &str) -> Option<&str> {
        self.by_name.get(name).map(String::as_str)
    }
}

/// `device:<id>` for the site map.
fn device_name(device: &str) -> String {
    format!("device:{device}")
}

/// `node:<group>/<node>` of a Sparkplug topic `spBv1.0/<group>/<type>/<node>[/...]`.
fn node_name(topic: &str) -> Option<String> {
    let mut levels = topic.strip_prefix("spBv1.0/")?.split('/');
    let group = levels.next()?;
    let _kind = levels.next()?;
    let node = levels.next()?;
    Some(format!("node:{group}/{node}"))
}

/// Maps messages and hands them to the writer; sends the requests back.
struct Reader {
    mapping: Mapping,
    budget: DeviceBudget,
    stats: Arc<Stats>,
    /// What the repairer follows.
    seen: mpsc::Sender<repair::Seen>,
    /// The Sparkplug B host, with `--ingest sparkplug`.
    sparkplug: Option<Sparkplug>,
    sites: Sites,
    client: async_nats::Client,
}

impl Reader {
    async fn serve(
        &mut self,
        consumer: &jetstream::consumer::Consumer<pull::Config>,
        task: &mut WriterTask<NatsAck>,
        mut requests: mpsc::UnboundedReceiver<repair::Request>,
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
        let mut sparkplug_ticks = tokio::time::interval(sparkplug::TICK);
        let mut state_ticks = tokio::time::interval(nats::STATE_EVERY);
        state_ticks.reset();
        let batch = usize::from(config.batch_size);
        let mut last_line = String::new();
        // Pull errors since the last message: a node cut off from the others answers none.
        let mut failing = 0_u32;
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
                    self.pull_failed(&mut failing);
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
                            failing = 0;
                            let item = self.read(message).await;
                            if let Some(sparkplug) = &mut self.sparkplug {
                                // Data the host could not name asks its Rebirth at once.
                                let asked = sparkplug.asked();
                                self.send_rebirths(asked).await;
                            }
                            let Some(item) = item else { continue };
                            queued.add(item.documents, item.bytes);
                            if pending.send(item).await.is_err() {
                                anyhow::bail!("the database writer stopped");
                            }
                        }
                        // A missed heartbeat, a leader change: the pull goes on.
                        Some(Err(error)) => {
                            tracing::warn!("pulling from the NATS consumer: {error}");
                            self.pull_failed(&mut failing);
                        }
                        None => continue 'connect,
                    },
                    Some(acks) = written.recv() => acknowledge(acks).await,
                    Some(request) = requests.recv() => self.send_request(request).await,
                    _ = sparkplug_ticks.tick(), if self.sparkplug.is_some() => {
                        let due = self.sparkplug.as_mut().map(Sparkplug::due).unwrap_or_default();
                        self.send_rebirths(due).await;
                    }
                    _ = state_ticks.tick(), if self.sparkplug.is_some() => self.publish_state(true).await,
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

    /// One more pull failure in a row; after a few, another node is tried.
    fn pull_failed(&self, failing: &mut u32) {
        *failing += 1;
        if *failing >= nats::FAILURES_BEFORE_ANOTHER_NODE {
            *failing = 0;
            nats::try_another_node(&self.client);
        }
    }

    /// Publishes `payload` as an MQTT message of `topic` on `subject` (core NATS, at
    /// most once; see the module documentation).
    async fn request(&self, subject: String, topic: &str, qos: u8, retain: bool, payload: Vec<u8>) {
        let headers = nats::mqtt_headers(topic, qos, retain);
        if let Err(error) = self
            .client
            .publish_with_headers(subject, headers, payload.into())
            .await
        {
            tracing::warn!(topic, "not sent over NATS: {error}");
        }
    }

    /// A replay request of the repairer's, to the device's site.
    async fn send_request(&self, request: repair::Request) {
        let Some(site) = self.sites.of(&device_name(&request.device)) else {
            tracing::warn!(device = request.device, "replay request not sent: no message of the device heard, its site is unknown (asked again later)");
            return;
        };
        let subject = nats::request_subject(site, "replay");
        let topic = replay::request_topic(&request.device);
        self.request(subject, &topic, 1, false, request.ranges.encode())
            .await;
    }

    /// Rebirth commands, each to its node's site, at QoS 0 as on MQTT.
    async fn send_rebirths(&self, rebirths: Vec<Rebirth>) {
        for rebirth in rebirths {
            let Some(site) = self.sites.of(&format!("node:{}", rebirth.node)) else {
                tracing::warn!(
                    node = rebirth.node,
                    "Rebirth not sent: the node's site is unknown"
                );
                continue;
            };
            let subject = nats::request_subject(site, "ncmd");
            self.request(subject, &rebirth.topic, 0, false, rebirth.payload)
                .await;
        }
    }

    /// The Sparkplug host's `STATE` to every site, retained at QoS 1 as on MQTT.
    async fn publish_state(&self, online: bool) {
        if let Some(sparkplug) = &self.sparkplug {
            let (topic, payload) = (sparkplug.state_topic(), sparkplug.state(online));
            self.request(nats::STATE_SUBJECT.to_string(), topic, 1, true, payload)
                .await;
        }
    }

    /// A device's answer that it no longer has some readings, for the repairer.
    fn gone(&mut self, device: &str, site: Option<&str>, topic: &str, payload: &[u8]) {
        if let Some(site) = site {
            self.sites.heard(device_name(device), site);
        }
        match replay::Ranges::parse(payload) {
            Ok(ranges) => repair::offer(
                &self.seen,
                repair::Seen::Gone {
                    device: device.to_string(),
                    ranges,
                },
            ),
            Err(why) => tracing::warn!(topic, "answer to a replay request ignored: {why}"),
        }
    }

    /// One message: mapped, its unkeyed readings keyed by the message ([`message_key`]);
    /// `None` for a device's answer to a replay request (for the repairer, acknowledged
    /// now).
    async fn read(&mut self, message: jetstream::Message) -> Option<Pending<NatsAck>> {
        let sequence = match message.info() {
            Ok(info) => {
                if info.delivered > 1 {
                    metrics::counter!("iot_persister_nats_redeliveries_total").increment(1);
                }
                info.stream_sequence
            }
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
        let site = nats::site_of_subject(message.subject.as_str());
        if let Some(device) = replay::device_of_gone(&topic) {
            self.gone(device, site, &topic, &message.payload);
            acknowledge(vec![NatsAck(acker)]).await;
            return None;
        }
        let mut record = self.mapping.read_with(
            self.sparkplug.as_mut().map(|sparkplug| &mut sparkplug.host),
            &topic,
            &message.payload,
            Utc::now(),
        );
        if let Some(site) = site {
            if let Some(node) = node_name(&topic) {
                self.sites.heard(node, site);
            }
            for part in record.parts() {
                if let Record::Readings {
                    documents,
                    keyed: true,
                } = part
                {
                    if let Some(device) = documents
                        .first()
                        .and_then(|document| document.get_document("_id").ok())
                        .and_then(|key| key.get_str("device").ok())
                    {
                        self.sites.heard(device_name(device), site);
                    }
                }
            }
        }
        for part in record.parts() {
            observe(&self.seen, &self.stats, &topic, part);
        }
        let msg_id = message
            .headers
            .as_ref()
            .and_then(|headers| headers.get(async_nats::header::NATS_MESSAGE_ID))
            .map(|id| id.as_str());
        key_unkeyed(&mut record, message_key(site, msg_id, sequence));
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

/// The key of a message's unkeyed documents (without `n`): the site its subject names
/// and the relay's message id, `{site, msg}`, when it came from a relay; else its place
/// in the stream, `{stream, seq}`. The site comes from the subject, which the site's
/// account alone may publish on, so one site cannot take another's keys. The id is
/// kept one-way ([`id_digest`]): the stream refuses a copy of an id whatever the
/// subject, so another site's account that read a relay's run id in the database
/// could publish that relay's next ids first and have its messages refused.
pub fn message_key(site: Option<&str>, msg_id: Option<&str>, sequence: u64) -> bson::Document {
    match (site, msg_id) {
        (Some(site), Some(msg)) if !msg.is_empty() => {
            doc! { "site": site, "msg": id_digest(msg) }
        }
        _ => {
            let seq = i64::try_from(sequence).unwrap_or(i64::MAX);
            doc! { "stream": nats::STREAM, "seq": seq }
        }
    }
}

/// The first 128 bits of `msg_id`'s SHA-256, in hex.
pub fn id_digest(msg_id: &str) -> String {
    use sha2::Digest as _;
    use std::fmt::Write as _;
    let digest = sha2::Sha256::digest(msg_id.as_bytes());
    digest
        .iter()
        .take(16)
        .fold(String::with_capacity(32), |mut hex, byte| {
            let _ = write!(hex, "{byte:02x}");
            hex
        })
}

/// Gives every document without a key of its own (readings without `(device, boot,
/// seq)`, flagged payloads: their `_id` is a new ObjectId) `key` and `n`, its place
/// among the message's documents: the same on every delivery.
pub fn key_unkeyed(record: &mut Record, key: bson::Document) {
    let mut n = 0i64;
    let mut give = |document: &mut bson::Document| {
        // A key of the reading's own stays; an ObjectId (made at random for each
        // delivery) gives way to the message's.
        if !matches!(document.get("_id"), Some(bson::Bson::Document(_))) {
            let mut id = key.clone();
            id.insert("n", n);
            document.insert("_id", id);
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
            } => documents.iter_mut().for_each(&mut give),
            Record::Unparsed { document } => give(document),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_go_to_the_site_a_device_or_node_was_heard_from_last() {
        assert_eq!(
            node_name("spBv1.0/cell/DDATA/line-7/gauge").as_deref(),
            Some("node:cell/line-7")
        );
        assert_eq!(
            node_name("spBv1.0/cell/NBIRTH/line-7").as_deref(),
            Some("node:cell/line-7")
        );
        assert_eq!(node_name("spBv1.0/STATE"), None);
        assert_eq!(node_name("/sensor/t-1/temperature"), None);
        let mut sites = Sites::default();
        sites.heard(device_name("t-1"), "plant-1");
        sites.heard(device_name("t-2"), "plant-2");
        sites.heard(device_name("t-1"), "plant-3");
        assert_eq!(sites.of(&device_name("t-1")), Some("plant-3"));
        assert_eq!(sites.of(&device_name("t-2")), Some("plant-2"));
        assert_eq!(sites.of(&device_name("t-3")), None);
    }

    #[test]
    fn a_relays_message_is_keyed_by_its_site_and_id_else_by_its_place_in_the_stream() {
        // The id one-way: SHA-256's first 128 bits.
        let digest = id_digest("plant-1:ab12:7");
        assert_eq!(digest.len(), 32);
        assert_eq!(id_digest("abc"), "ba7816bf8f01cfea414140de5dae2223");
        assert_eq!(
            message_key(Some("plant-1"), Some("plant-1:ab12:7"), 42),
            doc! { "site": "plant-1", "msg": &digest }
        );
        // Another site's id on this site's subject stays this site's key.
        assert_eq!(
            message_key(Some("plant-2"), Some("plant-1:ab12:7"), 42),
            doc! { "site": "plant-2", "msg": &digest }
        );
        let by_place = doc! { "stream": nats::STREAM, "seq": 42_i64 };
        assert_eq!(message_key(None, Some("plant-1:ab12:7"), 42), by_place);
        assert_eq!(message_key(Some("plant-1"), None, 42), by_place);
        assert_eq!(message_key(Some("plant-1"), Some(""), 42), by_place);
    }

    #[test]
    fn unkeyed_documents_are_keyed_by_their_message() {
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
        key_unkeyed(&mut record, message_key(None, None, 42));
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
