//! `mongo-persister`: stores every reading and status change from the cloud broker in
//! MongoDB, at least once and without duplicates.
//!
//! The MQTT side runs with manual acknowledgements and a persistent session: a message
//! is acknowledged to the broker only after the write that holds it succeeded, so a
//! crash or a database outage loses nothing (the broker delivers again what was not
//! acknowledged). Writes happen in batches in a task of their own ([`writer`]), so the
//! MQTT event loop is never blocked by the database.

pub mod writer;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use chrono::Utc;
use clap::Parser;
use iot_core::backoff::Backoff;
use iot_core::config::{parse_positive_seconds, BrokerSettings, CloudBroker};
use iot_core::mqtt::{Connection, Event};
use iot_core::store::{describe, ensure_schema, MongoSettings, Record};
use iot_core::topics;
use rumqttc::{QoS, SubscribeFilter};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use writer::{Pending, Stats, Writer};

/// Stores readings and status changes from the cloud broker in MongoDB.
#[derive(Debug, Clone, Parser)]
#[command(name = "mongo-persister", version)]
pub struct Config {
    /// Topic filter to store; repeat for several
    #[arg(long = "topic", value_name = "FILTER", env = "PERSISTER_TOPIC", value_delimiter = ',',
          default_values_t = [topics::SENSORS.to_string(), topics::DEVICES.to_string()])]
    pub topics: Vec<String>,
    /// Share the stream with other replicas through the shared subscription $share/GROUP/...
    #[arg(long, env = "PERSISTER_SHARE", value_name = "GROUP")]
    pub share: Option<String>,
    /// MQTT client id, the name of the persistent session [default: mongo-persister; with --share, mongo-persister-<host name>]
    #[arg(long, env = "PERSISTER_CLIENT_ID")]
    pub client_id: Option<String>,
    /// Most documents written in one insert
    #[arg(long, env = "PERSISTER_BATCH_SIZE", default_value = "500", value_parser = clap::value_parser!(u16).range(1..))]
    pub batch_size: u16,
    /// Seconds a batch waits to fill before it is written anyway; fractions allowed
    #[arg(long, value_name = "SECONDS", env = "PERSISTER_FLUSH_INTERVAL", default_value = "0.2", value_parser = parse_positive_seconds)]
    pub flush_interval: Duration,
    /// Seconds between throughput lines in the log
    #[arg(long, value_name = "SECONDS", env = "PERSISTER_STATS_INTERVAL", default_value = "10", value_parser = parse_positive_seconds)]
    pub stats_interval: Duration,
    #[command(flatten)]
    pub broker: CloudBroker,
    #[command(flatten)]
    pub mongo: MongoSettings,
}

impl Config {
    fn client_id(&self) -> String {
        match (&self.client_id, &self.share) {
            (Some(id), _) => id.clone(),
            (None, None) => "mongo-persister".to_string(),
            (None, Some(_)) => {
                let host =
                    std::env::var("HOSTNAME").unwrap_or_else(|_| iot_core::sensor::new_boot_id());
                format!("mongo-persister-{host}")
            }
        }
    }

    /// The subscription filters, inside `$share/GROUP/` when sharing.
    pub fn filters(&self) -> Vec<String> {
        self.topics
            .iter()
            .map(|topic| match &self.share {
                Some(group) => format!("$share/{group}/{topic}"),
                None => topic.clone(),
            })
            .collect()
    }
}

/// How long a stopping persister keeps trying to write what it holds.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// Stores messages until `shutdown`; then writes the batch in hand, acknowledges it and
/// disconnects.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let broker = BrokerSettings::from(config.broker.clone());
    let client_id = config.client_id();
    let mut options = broker
        .mqtt_options(&client_id, false)
        .context("cannot set up the broker connection")?;
    options.set_manual_acks(true);

    let db = config.mongo.database("mongo-persister").await?;
    let mut backoff = Backoff::default();
    loop {
        match ensure_schema(&db).await {
            Ok(()) => break,
            Err(error) => {
                let delay = backoff.next_delay();
                tracing::warn!(
                    attempt = backoff.attempt(),
                    "MongoDB at {} not ready: {}; retrying in {delay:?}",
                    config.mongo.redacted_uri(),
                    describe(&error)
                );
                tokio::select! {
                    () = shutdown.cancelled() => return Ok(()),
                    () = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
    let filters = config.filters();
    tracing::info!(
        broker = %broker.address(), client_id, topics = ?filters,
        mongodb = %config.mongo.redacted_uri(), database = config.mongo.database,
        batch_size = config.batch_size, flush_interval = ?config.flush_interval,
        "storing messages"
    );

    let stats = Arc::new(Stats::default());
    let batch_size = usize::from(config.batch_size);
    // The buffer between MQTT and the database: when full, no more messages are read.
    let (pending_tx, pending_rx) = mpsc::channel::<Pending>(batch_size * 4);
    let (written_tx, mut written_rx) = mpsc::unbounded_channel();
    let writer = Writer::new(&db, batch_size, config.flush_interval, Arc::clone(&stats));
    let stop_writing = CancellationToken::new();
    let writer = tokio::spawn(writer.run(pending_rx, written_tx, stop_writing.clone()));

    let subscriptions: Vec<SubscribeFilter> = filters
        .iter()
        .map(|filter| SubscribeFilter::new(filter.clone(), QoS::AtLeastOnce))
        .collect();
    let mut connection = Connection::start(&broker, options);
    let mut stats_ticks = tokio::time::interval(config.stats_interval);
    stats_ticks.reset();
    let mut last_line = String::new();

    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            event = connection.recv(), if pending_tx.capacity() > 0 => match event? {
                Event::Connected { session_present } => {
                    // A broker that kept the session kept the subscriptions too; a fresh
                    // subscribe would replay every retained message once more.
                    if !session_present {
                        connection.subscribe(subscriptions.clone()).await?;
                    }
                }
                Event::Subscribed(codes) => {
                    for (filter, code) in filters.iter().zip(codes) {
                        match code {
                            rumqttc::SubscribeReasonCode::Success(_) => tracing::info!(filter, "subscribed"),
                            rumqttc::SubscribeReasonCode::Failure => tracing::error!(filter, "the broker refused the subscription (check the ACL for this user)"),
                        }
                    }
                }
                Event::Message(publish) => {
                    stats.received.fetch_add(1, Ordering::Relaxed);
                    let record = Record::from_message(&publish.topic, &publish.payload, Utc::now());
                    if let Record::Unparsed { .. } = record {
                        stats.unparsed.fetch_add(1, Ordering::Relaxed);
                    }
                    let replay = publish.retain;
                    // Room was checked above, and only this task sends.
                    if pending_tx.send(Pending { record, replay, publish }).await.is_err() {
                        anyhow::bail!("the database writer stopped");
                    }
                }
                Event::Acked | Event::Unsubscribed => {}
            },
            Some(written) = written_rx.recv() => {
                for publish in written {
                    connection.ack(&publish).await?;
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
    }

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
        for publish in written {
            connection.ack(&publish).await?;
        }
    }
    if unwritten > 0 {
        tracing::warn!("{unwritten} message(s) could not be written; the broker delivers them again on the next start");
    }
    tracing::info!("{}", stats.line(0));
    connection.close(Duration::from_secs(5)).await
}
