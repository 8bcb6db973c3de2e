//! The persister at work: one [`Persister`] owns the broker connection, the ingest
//! mapping and the hand-offs to the [`Writer`] and the repairer (each a task of its
//! own); its methods are the steps of a run: start, one event from the broker, one
//! batch written, one replay request to send, and drain and close.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use chrono::Utc;
use iot_core::config::BrokerSettings;
use iot_core::mqtt::{self, Ack, Connection, Event};
use iot_core::{ops, replay};
use iot_store::{Mapping, Record};
use rumqttc::{Publish, QoS, SubscribeFilter};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::budget::{self, DeviceBudget, Queued};
use crate::config::Config;
use crate::ready::{report_subscription, ReadyFile, SUBSCRIBED_CHECK};
use crate::repair;
use crate::retire::{end_session, Retiring};
use crate::sparkplug::{self, Sparkplug};
use crate::writer::{self, Pending, Retention, Stats, Writer, DATABASE_CHECK};

/// How long a stopping persister keeps trying to write what it holds.
pub(crate) const STOP_GRACE: Duration = Duration::from_secs(10);

/// A running persister; see the module documentation.
#[derive(Debug)]
pub struct Persister {
    broker: BrokerSettings,
    client_id: String,
    /// Whether the subscriptions are shared (`--share`).
    shared: bool,
    mapping: Mapping,
    /// The Sparkplug B host, with `--ingest sparkplug`.
    sparkplug: Option<Sparkplug>,
    /// The topic filters, and the same inside `$share/GROUP/` when shared.
    topics: Vec<String>,
    filters: Vec<String>,
    connection: Connection,
    stats: Arc<Stats>,
    /// Messages to the writer: when full, or `queued` is, no more are read from the
    /// broker.
    pending: mpsc::Sender<Pending>,
    queued: Arc<Queued>,
    /// What each device's messages may expand into.
    budget: DeviceBudget,
    /// Acknowledgements of the batches the writer wrote, in order.
    written: mpsc::UnboundedReceiver<Vec<Ack>>,
    writer: JoinHandle<usize>,
    stop_writing: CancellationToken,
    /// What the repairer follows; bounded, what does not fit is dropped and counted.
    seen: mpsc::Sender<repair::Seen>,
    /// Replay requests the repairer hands back to publish.
    requests: mpsc::UnboundedReceiver<repair::Request>,
    stop_repairing: CancellationToken,
    ready: ReadyFile,
    retiring: Option<Retiring>,
    /// Messages written and acknowledged.
    settled: u64,
    lag: Lag,
    /// The last stats line logged: a line is logged only when it changes.
    last_line: String,
}

impl Persister {
    /// Serves metrics and health, starts the writer and the repairer, and connects to
    /// the broker (subscribing once connected: the session is made, and readings wait
    /// in it, even while MongoDB is not up yet).
    pub async fn start(config: &Config, shutdown: &CancellationToken) -> anyhow::Result<Self> {
        let broker = BrokerSettings::from(config.broker.clone());
        let client_id = config.client_id();
        let mut options = broker
            .mqtt_options(&client_id, false)
            .context("cannot set up the broker connection")?;
        options.set_manual_acks(true);
        let db = config.mongo.database("mongo-persister").await?;
        let ready = ReadyFile::new(config.ready_file.clone())?;
        let mapping = config
            .mapping()
            .map_err(|error| anyhow::anyhow!("cannot load the ingest mapping: {error}"))?;
        let (topics, filters) = (config.topics(&mapping), config.filters(&mapping));
        let sparkplug = (mapping.reads_sparkplug() && !config.retire).then(|| {
            Sparkplug::new(
                &config.sparkplug_host_id(),
                config.sparkplug_reorder_timeout,
            )
        });
        if let Some(sparkplug) = &sparkplug {
            sparkplug.set_will(&mut options);
        }
        log_start(config, &broker, &client_id, &filters);
        serve_ops(config, shutdown, "not subscribed yet", &[]).await?;

        let stats = Arc::new(Stats::default());
        let WriterTask {
            pending,
            queued,
            written,
            writer,
            stop_writing,
        } = spawn_writer(config, &db, &stats);

        let (seen, requests, stop_repairing) = spawn_repairer(config, &db, &client_id);

        Ok(Self {
            connection: Connection::start(&broker, options),
            broker,
            client_id,
            shared: config.share.is_some(),
            mapping,
            sparkplug,
            retiring: config.retire.then(|| Retiring::new(filters.len())),
            topics,
            filters,
            stats,
            pending,
            queued,
            budget: DeviceBudget::new(config.device_documents_per_second),
            written,
            writer,
            stop_writing,
            seen,
            requests,
            stop_repairing,
            ready,
            settled: 0,
            lag: Lag::default(),
            last_line: String::new(),
        })
    }

    /// Stores messages until `shutdown` or, retiring, until the session is drained.
    pub async fn serve(
        &mut self,
        shutdown: &CancellationToken,
        stats_interval: Duration,
    ) -> anyhow::Result<()> {
        let mut stats_ticks = tokio::time::interval(stats_interval);
        stats_ticks.reset();
        let mut lag_ticks = tokio::time::interval(Duration::from_secs(1));
        let mut sparkplug_ticks = tokio::time::interval(sparkplug::TICK);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                event = self.connection.recv(), if self.pending.capacity() > 0 && self.queued.has_room() => self.on_event(event?).await?,
                Some(written) = self.written.recv() => self.on_written(written).await?,
                _ = lag_ticks.tick() => self.lag.report(),
                Some(request) = self.requests.recv() => self.send_request(request).await?,
                _ = stats_ticks.tick() => self.log_stats(),
                _ = sparkplug_ticks.tick(), if self.sparkplug.is_some() => self.send_rebirths().await?,
            }
            if self.retire_step().await? {
                return Ok(());
            }
        }
    }

    /// One event from the broker.
    async fn on_event(&mut self, event: Event) -> anyhow::Result<()> {
        match event {
            Event::Connected {
                session_present, ..
            } => self.on_connected(session_present).await,
            Event::Subscribed(codes) => {
                if report_subscription(&self.filters, &codes) {
                    self.ready.mark()?;
                    ops::health().set(SUBSCRIBED_CHECK, Ok(()));
                }
                Ok(())
            }
            Event::Message { publish, ack } => match replay::device_of_gone(&publish.topic) {
                Some(device) => {
                    self.on_gone(device.to_string(), &publish);
                    self.connection.ack(ack).await
                }
                None => self.on_message(publish, ack).await,
            },
            Event::Unsubscribed => {
                if let Some(retiring) = &mut self.retiring {
                    retiring.unsubscribed(self.stats.received.get());
                }
                Ok(())
            }
            Event::Acked => Ok(()),
        }
    }

    /// A (new) connection: subscribe, or, retiring, take no new share of the stream.
    async fn on_connected(&mut self, session_present: bool) -> anyhow::Result<()> {
        if let Some(retiring) = &mut self.retiring {
            if !session_present {
                tracing::info!(
                    client_id = self.client_id,
                    "the broker keeps no session of this name: nothing waits in it"
                );
            }
            // What is queued in the session stays queued and is delivered.
            self.connection.unsubscribe(&self.filters).await?;
            retiring.connected();
            return Ok(());
        }
        if let Some(sparkplug) = &self.sparkplug {
            sparkplug.publish_state(&mut self.connection, true).await?;
        }
        // Every time: a kept session may hold other subscriptions than these (a run with
        // other settings); retained messages replayed by subscribing again are
        // recognised and not stored twice.
        let subscriptions = self
            .filters
            .iter()
            .map(|filter| SubscribeFilter::new(filter.clone(), QoS::AtLeastOnce))
            .collect();
        self.connection.subscribe(subscriptions).await?;
        if self.shared && session_present {
            // Left from a run without --share, they would take every message twice.
            self.connection.unsubscribe(&self.topics).await?;
        }
        Ok(())
    }

    /// A device's answer that it no longer has some readings: for the repairer.
    fn on_gone(&self, device: String, publish: &Publish) {
        match replay::Ranges::parse(&publish.payload) {
            Ok(ranges) => repair::offer(&self.seen, repair::Seen::Gone { device, ranges }),
            Err(why) => tracing::warn!(
                topic = publish.topic,
                "answer to a replay request ignored: {why}"
            ),
        }
    }

    /// One message: read by the mapping, shown to the repairer when it is a keyed
    /// reading, and handed to the writer (its acknowledgement waits for the write).
    async fn on_message(&mut self, publish: Publish, ack: Ack) -> anyhow::Result<()> {
        self.stats.received.add(1);
        self.lag.received();
        let mut record = self.mapping.read_with(
            self.sparkplug.as_mut().map(|sparkplug| &mut sparkplug.host),
            &publish.topic,
            &publish.payload,
            Utc::now(),
        );
        for part in record.parts() {
            self.count(&publish.topic, part);
        }
        // After the repairer saw its keyed readings: a refused one is no hole to ask for.
        let spender = budget::spender(&publish.topic, &record).to_string();
        let refused = self
            .budget
            .spend(&spender, &mut record, std::time::Instant::now());
        if refused > 0 {
            metrics::counter!("iot_persister_over_budget_total").increment(refused as u64);
        }
        if let Some(sparkplug) = &mut self.sparkplug {
            // Data the host could not name asks its Rebirth at once.
            sparkplug.send_asked(&mut self.connection).await?;
        }
        let replay = publish.retain;
        let (documents, bytes) = (budget::documents(&record), publish.payload.len());
        self.queued.add(documents, bytes);
        // Room was checked before reading, and only this task sends.
        if self
            .pending
            .send(Pending {
                record,
                replay,
                ack,
                documents,
                bytes,
            })
            .await
            .is_err()
        {
            anyhow::bail!("the database writer stopped");
        }
        Ok(())
    }

    /// Shows a keyed reading to the repairer, counts what is flagged or not stored.
    fn count(&self, topic: &str, record: &Record) {
        observe(&self.seen, &self.stats, topic, record);
    }

    /// Sends the Sparkplug Rebirth commands that are due.
    async fn send_rebirths(&mut self) -> anyhow::Result<()> {
        match &mut self.sparkplug {
            Some(sparkplug) => sparkplug.send_due(&mut self.connection).await,
            None => Ok(()),
        }
    }

    /// One batch written: its messages are acknowledged to the broker.
    async fn on_written(&mut self, written: Vec<Ack>) -> anyhow::Result<()> {
        self.settled += written.len() as u64;
        self.lag.written(written.len());
        for ack in written {
            self.connection.ack(ack).await?;
        }
        Ok(())
    }

    /// Publishes a replay request of the repairer's; one the broker could not take (a
    /// topic too long) is logged and dropped, the connection goes on.
    async fn send_request(&mut self, request: repair::Request) -> anyhow::Result<()> {
        let topic = replay::request_topic(&request.device);
        let payload = request.ranges.encode();
        match self
            .connection
            .publish(&topic, QoS::AtLeastOnce, false, payload)
            .await
        {
            Err(error) if error.downcast_ref::<mqtt::Unencodable>().is_some() => {
                tracing::warn!(device = %request.device, "replay request not sent: {error:#}");
                Ok(())
            }
            outcome => outcome,
        }
    }

    /// Logs the throughput line when it changed since the last one.
    fn log_stats(&mut self) {
        let buffered = self.pending.max_capacity() - self.pending.capacity();
        let line = self.stats.line(buffered);
        if line != self.last_line {
            tracing::info!("{line}");
            self.last_line = line;
        }
    }

    /// Retiring: sends a barrier once everything received is written; true once one
    /// came back with nothing before it (the session is drained).
    async fn retire_step(&mut self) -> anyhow::Result<bool> {
        let received = self.stats.received.get();
        let Some(retiring) = &mut self.retiring else {
            return Ok(false);
        };
        if retiring.drained {
            return Ok(true);
        }
        if retiring.wants_barrier(received == self.settled) {
            self.connection.barrier().await?;
            retiring.barrier_sent(received);
        }
        Ok(false)
    }

    /// Stops: the writer writes what it holds (trying for [`STOP_GRACE`] if the database
    /// is down), everything written is acknowledged, then the connection closes; a
    /// drained retiring session is ended.
    pub async fn finish(mut self) -> anyhow::Result<()> {
        self.stop_repairing.cancel();
        drop(self.pending);
        let grace = tokio::spawn({
            let stop_writing = self.stop_writing.clone();
            async move {
                tokio::time::sleep(STOP_GRACE).await;
                stop_writing.cancel();
            }
        });
        let unwritten = self.writer.await.context("the database writer failed")?;
        grace.abort();
        while let Ok(written) = self.written.try_recv() {
            for ack in written {
                self.connection.ack(ack).await?;
            }
        }
        if unwritten > 0 {
            tracing::warn!("{unwritten} message(s) could not be written; the broker delivers them again on the next start");
        }
        tracing::info!("{}", self.stats.line(0));
        self.ready.clear();
        if let Some(sparkplug) = &self.sparkplug {
            // A clean disconnect sends no will: edge nodes learn from this that the host
            // is away.
            sparkplug.publish_state(&mut self.connection, false).await?;
        }
        self.connection.close(Duration::from_secs(5)).await?;
        let client_id = &self.client_id;
        match self.retiring {
            Some(retiring) if retiring.drained => {
                end_session(&self.broker, client_id).await?;
                let line = format!(
                    "retired {client_id}: stored {} document(s) from the {} message(s) that waited in its session ({}); the broker no longer keeps the session",
                    self.stats.written.get(),
                    self.stats.received.get(),
                    self.stats.line(0),
                );
                tracing::info!("{line}");
                println!("{line}");
                Ok(())
            }
            Some(_) => anyhow::bail!(
                "stopped before {client_id}'s session was drained; it is kept, run --retire again"
            ),
            None => Ok(()),
        }
    }
}

/// Health checks not passed yet (`subscribed` says why the subscription is not) and
/// the metrics and health endpoints, on MQTT and on NATS alike (`cloud_metrics`: the
/// cloud tier's own).
pub(crate) async fn serve_ops(
    config: &Config,
    shutdown: &CancellationToken,
    subscribed: &str,
    cloud_metrics: &[ops::Metric],
) -> anyhow::Result<()> {
    ops::health().set(SUBSCRIBED_CHECK, Err(subscribed.into()));
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
        &[writer::METRICS, sparkplug::METRICS, cloud_metrics].concat(),
    )
    .await
}

/// Shows a keyed reading to the repairer (`seen`), counts what is flagged or not
/// stored.
pub(crate) fn observe(
    seen: &mpsc::Sender<repair::Seen>,
    stats: &Stats,
    topic: &str,
    record: &Record,
) {
    match record {
        Record::Readings {
            documents,
            keyed: true,
        } => {
            if let Some((device, boot, seq)) = documents.first().and_then(reading_key) {
                repair::offer(seen, repair::Seen::Reading { device, boot, seq });
            }
        }
        Record::Unparsed { document } => {
            stats.unparsed.add(1);
            // Flagged for its content, yet received: no hole to ask for again.
            if let Some((device, boot, seq)) = reading_key(document) {
                repair::offer(seen, repair::Seen::Reading { device, boot, seq });
            }
            if let Ok(identity) = document.get_str("identity") {
                metrics::counter!("iot_persister_identity_flagged_total", "identity" => identity.to_string()).increment(1);
                tracing::warn!(
                    topic,
                    identity,
                    claimed = document.get_str("claimed_device").unwrap_or_default(),
                    "stored flagged: the payload names a device its topic does not vouch for"
                );
            }
        }
        Record::Nothing { why } => {
            stats.ignored.add(1);
            tracing::debug!(topic, "nothing to store: {why}");
        }
        _ => {}
    }
}

/// The writer's task and what goes to and comes from it.
pub(crate) struct WriterTask<A = Ack> {
    pub(crate) pending: mpsc::Sender<Pending<A>>,
    pub(crate) queued: Arc<Queued>,
    pub(crate) written: mpsc::UnboundedReceiver<Vec<A>>,
    pub(crate) writer: JoinHandle<usize>,
    pub(crate) stop_writing: CancellationToken,
}

pub(crate) fn spawn_writer<A: Send + Sync + 'static>(
    config: &Config,
    db: &mongodb::Database,
    stats: &Arc<Stats>,
) -> WriterTask<A> {
    let batch_size = usize::from(config.batch_size);
    // Bounded in documents and bytes by `queued`; in messages, by as many documents.
    let queued = Arc::new(Queued::new(batch_size));
    let (pending, pending_rx) = mpsc::channel::<Pending<A>>(batch_size * budget::QUEUE_BATCHES);
    let (written_tx, written) = mpsc::unbounded_channel();
    let retention = Retention {
        readings: config.retention,
        status: config.status_retention,
    };
    let writer = Writer::new(
        db,
        config.mongo.redacted_uri(),
        retention,
        (batch_size, config.flush_interval),
        Arc::clone(stats),
        Arc::clone(&queued),
    );
    let stop_writing = CancellationToken::new();
    let writer = tokio::spawn(writer.run(pending_rx, written_tx, stop_writing.clone()));
    WriterTask {
        pending,
        queued,
        written,
        writer,
        stop_writing,
    }
}

/// The repairer's task, when this run repairs: what it follows goes in (bounded), the
/// requests it makes come out.
pub(crate) fn spawn_repairer(
    config: &Config,
    db: &mongodb::Database,
    client_id: &str,
) -> (
    mpsc::Sender<repair::Seen>,
    mpsc::UnboundedReceiver<repair::Request>,
    CancellationToken,
) {
    let (seen, seen_rx) = mpsc::channel(repair::SEEN_QUEUE);
    let (requests_tx, requests) = mpsc::unbounded_channel();
    let stop = CancellationToken::new();
    if config.repairs() {
        let repairer = repair::Repairer::new(db, config.repair_after, client_id.to_string());
        tokio::spawn(repairer.run(seen_rx, requests_tx, stop.clone()));
    } else {
        // Nobody listens: what would be sent is dropped at once, never queued.
        drop(seen_rx);
    }
    (seen, requests, stop)
}

/// The start line: where from, where to, how (never the database's password).
fn log_start(config: &Config, broker: &BrokerSettings, client_id: &str, filters: &[String]) {
    if config.retire {
        tracing::info!(
            broker = %broker.address(), client_id, topics = ?filters,
            mongodb = %config.mongo.redacted_uri(), database = config.mongo.database,
            "retiring: storing what waits in the session, then ending it"
        );
    } else {
        tracing::info!(
            broker = %broker.address(), client_id, topics = ?filters,
            mongodb = %config.mongo.redacted_uri(), database = config.mongo.database,
            batch_size = config.batch_size, flush_interval = ?config.flush_interval,
            ingest = %if config.ingest.is_empty() { "default".to_string() } else { config.ingest.join(",") },
            "storing messages"
        );
    }
}

/// When each message not yet written arrived, oldest first: for the lag gauges.
#[derive(Debug, Default)]
struct Lag {
    unwritten: std::collections::VecDeque<tokio::time::Instant>,
}

impl Lag {
    fn received(&mut self) {
        self.unwritten.push_back(tokio::time::Instant::now());
    }

    /// `count` messages written: the oldest, as the writer writes in order.
    fn written(&mut self, count: usize) {
        let count = count.min(self.unwritten.len());
        self.unwritten.drain(..count);
        self.report();
    }

    fn report(&self) {
        let age = self
            .unwritten
            .front()
            .map_or(0.0, |oldest| oldest.elapsed().as_secs_f64());
        metrics::gauge!("iot_persister_lag_seconds").set(age);
        metrics::gauge!("iot_persister_buffered").set(self.unwritten.len() as f64);
    }
}

/// The device, boot and seq that name a keyed reading (its `_id`).
fn reading_key(document: &bson::Document) -> Option<(String, String, u64)> {
    let key = document.get_document("_id").ok()?;
    let seq = iot_store::integer(key.get("seq"))?;
    Some((
        key.get_str("device").ok()?.to_string(),
        key.get_str("boot").ok()?.to_string(),
        u64::try_from(seq).ok()?,
    ))
}
