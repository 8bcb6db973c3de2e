//! `mongo-persister`: stores every reading and status change from the cloud broker in
//! MongoDB, at least once and without duplicates.
//!
//! The MQTT side runs with manual acknowledgements and a persistent session: a message
//! is acknowledged to the broker only after the write that holds it succeeded, so a
//! crash or a database outage loses nothing (the broker delivers again what was not
//! acknowledged). Writes happen in batches in a task of their own ([`writer`]), so the
//! MQTT event loop is never blocked by the database.
//!
//! Replicas share the stream through a shared subscription (`--share GROUP`). The
//! broker keeps routing a share of it to every member's persistent session, online or
//! not, so each replica's client id must stay the same across restarts; a replica
//! removed for good is retired (`--retire`): it stores what waited in its session, then
//! ends the session.

pub mod repair;
pub mod writer;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use chrono::Utc;
use chrono_tz::Tz;
use clap::Parser;
use iot_core::config::{parse_positive_seconds, BrokerSettings, CloudBroker};
use iot_core::mqtt::{self, Connection, Event};
use iot_core::replay;
use iot_store::{parse_retention, Mapping, MongoSettings, Record};
use rumqttc::{QoS, SubscribeFilter, SubscribeReasonCode};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use iot_core::ops;
use writer::{Pending, Retention, Stats, Writer, DATABASE_CHECK};

/// Stores readings and status changes from the cloud broker in MongoDB.
#[derive(Debug, Clone, Parser)]
#[command(name = "mongo-persister", version)]
pub struct Config {
    /// Topic filter to subscribe to; repeat for several [default: the filters of the ingest rules]
    #[arg(
        long = "topic",
        value_name = "FILTER",
        env = "PERSISTER_TOPIC",
        value_delimiter = ','
    )]
    pub topics: Vec<String>,
    /// How to read what devices publish: an ingest mapping file, or a built-in preset (default, tasmota, zigbee2mqtt, esphome, shelly, homeassistant); repeat for several, tried in order [default: default]
    #[arg(
        long = "ingest",
        value_name = "FILE|PRESET",
        env = "PERSISTER_INGEST",
        value_delimiter = ','
    )]
    pub ingest: Vec<String>,
    /// Time zone of device times written without an offset (Tasmota's Time), where a rule names none: an IANA name such as Europe/Berlin
    #[arg(long, value_name = "ZONE", env = "PERSISTER_DEVICE_TIMEZONE", default_value = "UTC", value_parser = parse_zone)]
    pub device_timezone: Tz,
    /// Share the stream with other replicas through the shared subscription $share/GROUP/...; needs --client-id
    #[arg(long, env = "PERSISTER_SHARE", value_name = "GROUP")]
    pub share: Option<String>,
    /// MQTT client id, the name of the persistent session; keep it the same across restarts [default: mongo-persister; required with --share]
    #[arg(long, env = "PERSISTER_CLIENT_ID")]
    pub client_id: Option<String>,
    /// Retire the replica --client-id (with its --share group): store what waits in its session, end the session, exit
    #[arg(long)]
    pub retire: bool,
    /// File created once every subscription stands (readings published from then on wait for this persister), removed on exit; for healthchecks and start order
    #[arg(long, value_name = "PATH", env = "PERSISTER_READY_FILE")]
    pub ready_file: Option<std::path::PathBuf>,
    /// Keep readings this long after they were stored (30d, 12h); MongoDB removes older ones. Without it: kept without limit (an earlier limit is lifted)
    #[arg(long, value_name = "DURATION", env = "PERSISTER_RETENTION", value_parser = parse_retention)]
    pub retention: Option<Duration>,
    /// The same for the status history
    #[arg(long, value_name = "DURATION", env = "PERSISTER_STATUS_RETENTION", value_parser = parse_retention)]
    pub status_retention: Option<Duration>,
    /// Most documents written in one insert
    #[arg(long, env = "PERSISTER_BATCH_SIZE", default_value = "500", value_parser = clap::value_parser!(u16).range(1..))]
    pub batch_size: u16,
    /// Seconds a batch waits to fill before it is written anyway; fractions allowed
    #[arg(long, value_name = "SECONDS", env = "PERSISTER_FLUSH_INTERVAL", default_value = "0.2", value_parser = parse_positive_seconds)]
    pub flush_interval: Duration,
    /// Seconds between throughput lines in the log
    #[arg(long, value_name = "SECONDS", env = "PERSISTER_STATS_INTERVAL", default_value = "10", value_parser = parse_positive_seconds)]
    pub stats_interval: Duration,
    /// Seconds a gap in a device's seq numbers may last before the device is asked to
    /// send the readings again; fractions allowed
    #[arg(long, value_name = "SECONDS", env = "PERSISTER_REPAIR_AFTER", default_value = "10", value_parser = parse_positive_seconds)]
    pub repair_after: Duration,
    /// Never ask devices to send missing readings again
    #[arg(long)]
    pub no_repair: bool,
    /// Serve Prometheus metrics and health checks (/metrics, /health/live, /health/ready) on HOST:PORT, e.g. 0.0.0.0:9464 [default: off]
    #[arg(long, value_name = "HOST:PORT", env = "PERSISTER_METRICS_ADDRESS", value_parser = iot_core::ops::parse_listen_address)]
    pub metrics_address: Option<String>,
    #[command(flatten)]
    pub broker: CloudBroker,
    #[command(flatten)]
    pub mongo: MongoSettings,
}

fn parse_zone(value: &str) -> Result<Tz, String> {
    value
        .parse()
        .map_err(|_| "expected an IANA time zone such as Europe/Berlin or UTC".to_string())
}

/// The session name without --client-id (and without --share).
pub const DEFAULT_CLIENT_ID: &str = "mongo-persister";

impl Config {
    /// Refuses settings that parse but cannot work together, and an ingest mapping that
    /// does not load; the message names them.
    pub fn validate(&self) -> Result<(), String> {
        self.mapping()?;
        if let (Some(group), None) = (&self.share, &self.client_id) {
            return Err(format!(
                "--share {group} (PERSISTER_SHARE) needs --client-id (PERSISTER_CLIENT_ID), the same on every start: \
                 a session name that changes leaves a dead member in the group that takes its share of the stream"
            ));
        }
        if self.retire && self.client_id.is_none() {
            return Err(
                "--retire needs --client-id (PERSISTER_CLIENT_ID) naming the replica's session to retire".into(),
            );
        }
        if let Some(group) = &self.share {
            if group.is_empty() || group.contains(['/', '+', '#']) {
                return Err(format!(
                    "--share {group:?} (PERSISTER_SHARE): a group name is not empty and has no '/', '+' or '#'"
                ));
            }
        }
        Ok(())
    }

    fn client_id(&self) -> String {
        self.client_id
            .clone()
            .unwrap_or_else(|| DEFAULT_CLIENT_ID.to_string())
    }

    /// The ingest mapping: `--ingest` in order, or the built-in default.
    pub fn mapping(&self) -> Result<Mapping, String> {
        if self.ingest.is_empty() {
            Mapping::load(&["default".to_string()], self.device_timezone)
        } else {
            Mapping::load(&self.ingest, self.device_timezone)
        }
    }

    /// The topic filters: `--topic`, or those of the mapping's rules; and the devices'
    /// answers to replay requests, unless `--no-repair`.
    pub fn topics(&self, mapping: &Mapping) -> Vec<String> {
        let mut topics = if self.topics.is_empty() {
            mapping.filters()
        } else {
            self.topics.clone()
        };
        let covered = topics
            .iter()
            .any(|topic| iot_store::ingest::topic::covers(topic, replay::GONE));
        if self.repairs() && !covered {
            topics.push(replay::GONE.to_string());
        }
        topics
    }

    /// Whether this run asks devices for missing readings (not when retiring).
    fn repairs(&self) -> bool {
        !self.no_repair && !self.retire
    }

    /// The subscription filters, inside `$share/GROUP/` when sharing.
    pub fn filters(&self, mapping: &Mapping) -> Vec<String> {
        self.topics(mapping)
            .into_iter()
            .map(|topic| match &self.share {
                Some(group) => format!("$share/{group}/{topic}"),
                None => topic,
            })
            .collect()
    }
}

/// How long a stopping persister keeps trying to write what it holds.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// Stores messages until `shutdown` (or, retiring, until the session's queue is
/// drained); then writes the batch in hand, acknowledges it and disconnects.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let broker = BrokerSettings::from(config.broker.clone());
    let client_id = config.client_id();
    let mut options = broker
        .mqtt_options(&client_id, false)
        .context("cannot set up the broker connection")?;
    options.set_manual_acks(true);

    let db = config.mongo.database("mongo-persister").await?;
    let mut ready = ReadyFile::new(config.ready_file.clone())?;
    let mapping = config
        .mapping()
        .map_err(|error| anyhow::anyhow!("cannot load the ingest mapping: {error}"))?;
    let topics = config.topics(&mapping);
    let filters = config.filters(&mapping);
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

    ops::health().set(SUBSCRIBED_CHECK, Err("not subscribed yet".into()));
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
    let stats = Arc::new(Stats::default());
    let batch_size = usize::from(config.batch_size);
    // The buffer between MQTT and the database: when full, no more messages are read.
    let (pending_tx, pending_rx) = mpsc::channel::<Pending>(batch_size * 4);
    let (written_tx, mut written_rx) = mpsc::unbounded_channel();
    // The writer waits for the database itself: the session is made (and readings start
    // to wait in it) even while MongoDB is not up yet.
    let retention = Retention {
        readings: config.retention,
        status: config.status_retention,
    };
    let writer = Writer::new(
        &db,
        config.mongo.redacted_uri(),
        retention,
        batch_size,
        config.flush_interval,
        Arc::clone(&stats),
    );
    let stop_writing = CancellationToken::new();
    let writer = tokio::spawn(writer.run(pending_rx, written_tx, stop_writing.clone()));
    // The repairer follows the series and hands back requests to publish.
    // Bounded: what does not fit while the repairer is busy is dropped and counted (a
    // reading it misses only costs a look in the database before anything is asked).
    let (seen_tx, seen_rx) = mpsc::channel(repair::SEEN_QUEUE);
    let (requests_tx, mut requests_rx) = mpsc::unbounded_channel::<repair::Request>();
    let stop_repairing = CancellationToken::new();
    if config.repairs() {
        let repairer = repair::Repairer::new(&db, config.repair_after, client_id.clone());
        tokio::spawn(repairer.run(seen_rx, requests_tx, stop_repairing.clone()));
    } else {
        // Nobody listens: what would be sent is dropped at once, never queued.
        drop(seen_rx);
    }

    let subscriptions: Vec<SubscribeFilter> = filters
        .iter()
        .map(|filter| SubscribeFilter::new(filter.clone(), QoS::AtLeastOnce))
        .collect();
    let mut connection = Connection::start(&broker, options);
    let mut stats_ticks = tokio::time::interval(config.stats_interval);
    stats_ticks.reset();
    let mut last_line = String::new();
    let mut retiring = config.retire.then(|| Retiring::new(filters.len()));
    // Messages handed to the writer, and those written (and acknowledged) since.
    let received = || stats.received.get();
    let mut settled = 0u64;
    let mut lag = Lag::default();
    let mut lag_ticks = tokio::time::interval(Duration::from_secs(1));

    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            event = connection.recv(), if pending_tx.capacity() > 0 => match event? {
                Event::Connected { session_present } => match &mut retiring {
                    Some(retiring) => {
                        if !session_present {
                            tracing::info!(client_id, "the broker keeps no session of this name: nothing waits in it");
                        }
                        // No new share of the stream for this session; what is queued
                        // in it stays queued and is delivered.
                        connection.unsubscribe(&filters).await?;
                        retiring.connected();
                    }
                    None => {
                        // Every time: a kept session may hold other subscriptions than
                        // these (a run with other settings); retained messages replayed
                        // by subscribing again are recognised and not stored twice.
                        connection.subscribe(subscriptions.clone()).await?;
                        if config.share.is_some() && session_present {
                            // Left from a run without --share, they would take every
                            // message a second time.
                            connection.unsubscribe(&topics).await?;
                        }
                    }
                },
                Event::Subscribed(codes) => {
                    if report_subscription(&filters, &codes) {
                        ready.mark()?;
                        ops::health().set(SUBSCRIBED_CHECK, Ok(()));
                    }
                }
                Event::Message { publish, ack } if replay::device_of_gone(&publish.topic).is_some() => {
                    let device = replay::device_of_gone(&publish.topic).unwrap_or_default().to_string();
                    match replay::Ranges::parse(&publish.payload) {
                        Ok(ranges) => repair::offer(&seen_tx, repair::Seen::Gone { device, ranges }),
                        Err(why) => tracing::warn!(topic = publish.topic, "answer to a replay request ignored: {why}"),
                    }
                    connection.ack(ack).await?;
                }
                Event::Message { publish, ack } => {
                    stats.received.add(1);
                    lag.received();
                    let record = mapping.read(&publish.topic, &publish.payload, Utc::now());
                    if let Record::Readings { documents, keyed: true } = &record {
                        if let Some((device, boot, seq)) = documents.first().and_then(reading_key) {
                            repair::offer(&seen_tx, repair::Seen::Reading { device, boot, seq });
                        }
                    }
                    match &record {
                        Record::Unparsed { document } => {
                            stats.unparsed.add(1);
                            if let Ok(identity) = document.get_str("identity") {
                                metrics::counter!("iot_persister_identity_flagged_total", "identity" => identity.to_string()).increment(1);
                                tracing::warn!(
                                    topic = publish.topic,
                                    identity,
                                    claimed = document.get_str("claimed_device").unwrap_or_default(),
                                    "stored flagged: the payload names a device its topic does not vouch for"
                                );
                            }
                        }
                        Record::Nothing { why } => {
                            stats.ignored.add(1);
                            tracing::debug!(topic = publish.topic, "nothing to store: {why}");
                        }
                        _ => {}
                    }
                    let replay = publish.retain;
                    // Room was checked above, and only this task sends.
                    if pending_tx.send(Pending { record, replay, ack }).await.is_err() {
                        anyhow::bail!("the database writer stopped");
                    }
                }
                Event::Unsubscribed => {
                    if let Some(retiring) = &mut retiring {
                        retiring.unsubscribed(received());
                    }
                }
                Event::Acked => {}
            },
            Some(written) = written_rx.recv() => {
                settled += written.len() as u64;
                lag.written(written.len());
                for ack in written {
                    connection.ack(ack).await?;
                }
            }
            _ = lag_ticks.tick() => lag.report(),
            Some(request) = requests_rx.recv() => {
                let topic = replay::request_topic(&request.device);
                match connection.publish(&topic, QoS::AtLeastOnce, false, request.ranges.encode()).await {
                    Err(error) if error.downcast_ref::<mqtt::Unencodable>().is_some() => {
                        tracing::warn!(device = %request.device, "replay request not sent: {error:#}");
                    }
                    outcome => outcome?,
                }
            }
            _ = stats_ticks.tick() => {
                let line = stats.line(pending_tx.max_capacity() - pending_tx.capacity());
                if line != last_line {
                    tracing::info!("{line}");
                    last_line = line;
                }
            }
        }
        if let Some(retiring) = &mut retiring {
            if retiring.drained {
                break;
            }
            if retiring.wants_barrier(received() == settled) {
                connection.barrier().await?;
                retiring.barrier_sent(received());
            }
        }
    }

    stop_repairing.cancel();
    // Stop: the writer writes what it holds (trying for a while if the database is
    // down), then everything written is acknowledged before disconnecting.
    drop(pending_tx);
    let grace = tokio::spawn({
        let stop_writing = stop_writing.clone();
        async move {
            tokio::time::sleep(STOP_GRACE).await;
            stop_writing.cancel();
        }
    });
    let unwritten = writer.await.context("the database writer failed")?;
    grace.abort();
    while let Ok(written) = written_rx.try_recv() {
        for ack in written {
            connection.ack(ack).await?;
        }
    }
    if unwritten > 0 {
        tracing::warn!("{unwritten} message(s) could not be written; the broker delivers them again on the next start");
    }
    tracing::info!("{}", stats.line(0));
    ready.clear();
    connection.close(Duration::from_secs(5)).await?;
    match retiring {
        Some(retiring) if retiring.drained => {
            end_session(&broker, &client_id).await?;
            let line = format!(
                "retired {client_id}: stored {} document(s) from the {} message(s) that waited in its session ({}); the broker no longer keeps the session",
                stats.written.get(),
                stats.received.get(),
                stats.line(0),
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

/// The persister's readiness check on its subscriptions.
const SUBSCRIBED_CHECK: &str = "subscribed";

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

/// Where a retiring persister stands: its session's subscriptions removed, then rounds
/// of "write and acknowledge everything received, then a barrier" until a barrier
/// comes back with no message before it. The broker answers in order and sends the
/// next queued messages as soon as it reads our acknowledgements, so such a barrier
/// proves the session's queue is empty. (Mosquitto does: reading a PUBACK, it moves
/// queued messages in flight and writes them before it reads the next packet. A broker
/// that does not could leave messages queued when the session ends.)
#[derive(Debug)]
struct Retiring {
    filters: usize,
    /// Unsubscribe answers still to come on this connection.
    unsubscribing: usize,
    connected: bool,
    /// Messages received when the barrier in flight was sent.
    barrier: Option<u64>,
    drained: bool,
}

impl Retiring {
    fn new(filters: usize) -> Self {
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
    fn connected(&mut self) {
        self.connected = true;
        self.unsubscribing = self.filters;
        self.barrier = None;
    }

    fn unsubscribed(&mut self, received: u64) {
        if self.unsubscribing > 0 {
            self.unsubscribing -= 1;
        } else if let Some(sent_at) = self.barrier.take() {
            self.drained = received == sent_at;
        }
    }

    fn wants_barrier(&self, all_settled: bool) -> bool {
        self.connected && self.unsubscribing == 0 && self.barrier.is_none() && all_settled
    }

    fn barrier_sent(&mut self, received: u64) {
        self.barrier = Some(received);
    }
}

/// Makes the broker forget `client_id`'s session: a connection with a clean session
/// discards the old one, and its own ends with it.
async fn end_session(broker: &BrokerSettings, client_id: &str) -> anyhow::Result<()> {
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

/// Logs each filter's answer; true when the broker granted all of them.
fn report_subscription(filters: &[String], codes: &[SubscribeReasonCode]) -> bool {
    let mut all = codes.len() == filters.len();
    for (filter, code) in filters.iter().zip(codes) {
        match code {
            SubscribeReasonCode::Success(_) => tracing::info!(filter, "subscribed"),
            SubscribeReasonCode::Failure => {
                all = false;
                tracing::error!(
                    filter,
                    "the broker refused the subscription (check the ACL for this user)"
                )
            }
        }
    }
    all
}

/// The `--ready-file`: absent until the subscriptions stand, removed again on exit.
#[derive(Debug)]
struct ReadyFile {
    path: Option<std::path::PathBuf>,
    marked: bool,
}

impl ReadyFile {
    /// Removes a file left by an earlier run that did not end cleanly.
    fn new(path: Option<std::path::PathBuf>) -> anyhow::Result<Self> {
        if let Some(path) = &path {
            match std::fs::remove_file(path) {
                Ok(()) => {}
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
                Err(error) => {
                    return Err(error).with_context(|| {
                        format!("cannot remove the old ready file {}", path.display())
                    })
                }
            }
        }
        Ok(Self {
            path,
            marked: false,
        })
    }

    fn mark(&mut self) -> anyhow::Result<()> {
        if let (Some(path), false) = (&self.path, self.marked) {
            std::fs::write(path, b"subscribed\n").with_context(|| {
                format!(
                    "cannot write the ready file {} (PERSISTER_READY_FILE)",
                    path.display()
                )
            })?;
            tracing::info!(file = %path.display(), "ready: every subscription stands");
            self.marked = true;
        }
        Ok(())
    }

    fn clear(&self) {
        if let Some(path) = &self.path {
            let _ = std::fs::remove_file(path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Config {
        Config::try_parse_from(std::iter::once("mongo-persister").chain(args.iter().copied()))
            .expect("parses")
    }

    #[test]
    fn a_shared_replica_needs_a_stable_client_id() {
        let error = parse(&["--share", "persisters"])
            .validate()
            .expect_err("no id");
        assert!(
            error.contains("--client-id") && error.contains("dead member"),
            "{error}"
        );
        let config = parse(&["--share", "persisters", "--client-id", "persister-1"]);
        assert_eq!(config.validate(), Ok(()));
        assert_eq!(config.client_id(), "persister-1");
        let mapping = config.mapping().expect("the default mapping");
        assert_eq!(
            config.filters(&mapping),
            [
                "$share/persisters//device/#",
                "$share/persisters//sensor/#",
                "$share/persisters//replay/+/gone"
            ]
        );
    }

    #[test]
    fn retiring_names_the_session() {
        assert!(parse(&["--retire"]).validate().is_err());
        assert_eq!(
            parse(&["--retire", "--client-id", "persister-2"]).validate(),
            Ok(())
        );
    }

    #[test]
    fn without_sharing_the_session_has_the_seed_name() {
        assert_eq!(parse(&[]).client_id(), DEFAULT_CLIENT_ID);
        assert!(parse(&["--share", "a/b", "--client-id", "x"])
            .validate()
            .is_err());
    }

    #[test]
    fn the_mapping_gives_the_filters_unless_topics_are_named() {
        let config = parse(&[
            "--ingest",
            "tasmota,default",
            "--device-timezone",
            "Europe/Berlin",
        ]);
        let mapping = config.mapping().expect("loads");
        assert_eq!(config.topics(&mapping)[0], "tele/+/LWT");
        assert!(config.topics(&mapping).contains(&"/sensor/#".to_string()));
        let config = parse(&["--ingest", "tasmota", "--topic", "#"]);
        assert_eq!(config.topics(&config.mapping().expect("loads")), ["#"]);
        let error = parse(&["--ingest", "tasmoda"])
            .validate()
            .expect_err("no such preset");
        assert!(error.contains("--ingest tasmoda"), "{error}");
        assert!(
            Config::try_parse_from(["mongo-persister", "--device-timezone", "Berlin"]).is_err()
        );
    }

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
