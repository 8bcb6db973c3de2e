//! `mqtt-subscriber`: the catch-all subscriber that prints every message.
//!
//! It keeps a persistent session (client id `mqtt_subscriber_1`, clean session off), so
//! QoS 1 messages published while it is stopped are printed when it comes back. A
//! message is acknowledged to the broker only once its line has been written to stdout,
//! so one that `--count` leaves unprinted is delivered again next time, not lost.
//!
//! Lines are written by a thread of their own behind a bounded buffer: a slow reader
//! of stdout (`| less` left open, a full disk) stalls only that thread. While the
//! buffer is full, messages wait unacknowledged (the broker holds QoS 1 ones) and the
//! connection stays alive.

use std::io::{self, Write};
use std::time::Duration;

use anyhow::Context;
use chrono::Utc;
use clap::Parser;
use iot_core::config::{parse_qos, BrokerSettings, LocalBroker};
use iot_core::mqtt::{Ack, Connection, Event};
use iot_core::payload::{escape_for_line, format_time, PayloadText};
use iot_core::topics;
use rumqttc::{Publish, QoS, SubscribeFilter, SubscribeReasonCode};
use serde::Serialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// How each message is printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    /// One human-readable line: time, topic, payload, retained flag
    Text,
    /// One JSON object per line: topic, payload (or payload_base64), qos, retain, received_at
    Json,
}

/// Catch-all subscriber: prints every message on the local broker.
#[derive(Debug, Clone, Parser)]
#[command(name = "mqtt-subscriber", version)]
pub struct Config {
    /// Topic filter to subscribe to; repeat for several
    #[arg(long = "topic", value_name = "FILTER", env = "SUBSCRIBER_TOPIC", value_delimiter = ',', default_value = topics::ALL)]
    pub topics: Vec<String>,
    /// Quality of service of the subscription: 0, 1 or 2 (QoS 0 messages are not kept while stopped)
    #[arg(long, env = "SUBSCRIBER_QOS", value_parser = parse_qos, default_value = "1")]
    pub qos: QoS,
    /// Output form
    #[arg(long, env = "SUBSCRIBER_FORMAT", value_enum, default_value = "text")]
    pub format: OutputFormat,
    /// Exit 0 after printing this many messages (like mosquitto_sub -C)
    #[arg(long, env = "SUBSCRIBER_COUNT", value_parser = clap::value_parser!(u64).range(1..))]
    pub count: Option<u64>,
    /// MQTT client id; the broker keeps the session under it while the subscriber is stopped
    #[arg(
        long,
        env = "SUBSCRIBER_CLIENT_ID",
        default_value = "mqtt_subscriber_1"
    )]
    pub client_id: String,
    /// Serve Prometheus metrics and health checks (/metrics, /health/live, /health/ready) on HOST:PORT, e.g. 0.0.0.0:9464 [default: off]
    #[arg(long, value_name = "HOST:PORT", env = "SUBSCRIBER_METRICS_ADDRESS", value_parser = iot_core::ops::parse_listen_address)]
    pub metrics_address: Option<String>,
    #[command(flatten)]
    pub broker: LocalBroker,
}

/// Lines waiting for the printing thread; past that, messages wait unacknowledged.
const PRINT_BUFFER: usize = 1024;
/// Lines written but not yet flushed (so not yet acknowledged) before a flush is forced.
const FLUSH_EVERY: usize = 256;

/// Prints messages until `shutdown`, `--count` messages, or a closed stdout.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let broker = BrokerSettings::from(config.broker.clone());
    let mut options = broker
        .mqtt_options(&config.client_id, false)
        .context("cannot set up the broker connection")?;
    options.set_manual_acks(true);
    tracing::info!(broker = %broker.address(), client_id = config.client_id, topics = ?config.topics, "subscribing");
    let printed_metric = iot_core::ops::Metric::counter(
        "iot_messages_printed_total",
        "Messages printed (and then acknowledged)",
    );
    iot_core::ops::serve(
        config.metrics_address.as_deref(),
        shutdown.clone(),
        &[printed_metric],
    )
    .await?;

    let filters: Vec<SubscribeFilter> = config
        .topics
        .iter()
        .map(|topic| SubscribeFilter::new(topic.clone(), config.qos))
        .collect();
    let mut connection = Connection::start(&broker, options);
    let (lines, printed_rx) = mpsc::channel::<(String, Ack)>(PRINT_BUFFER);
    let (printed_tx, mut printed) = mpsc::unbounded_channel::<Vec<Ack>>();
    let printer = std::thread::Builder::new()
        .name("stdout".into())
        .spawn(move || print_lines(printed_rx, printed_tx))
        .context("cannot start the printing thread")?;
    let mut queued: u64 = 0;
    let finished = |queued: u64| config.count.is_some_and(|count| queued >= count);

    while !finished(queued) {
        tokio::select! {
            () = shutdown.cancelled() => break,
            acks = printed.recv() => match acks {
                Some(acks) => {
                    metrics::counter!("iot_messages_printed_total").increment(acks.len() as u64);
                    ack_all(&mut connection, acks).await?
                }
                None => break, // stdout closed: the printing thread ended
            },
            // Read on only while the printing thread has room.
            event = connection.recv(), if lines.capacity() > 0 => match event? {
                // Subscribe on every connection: a broker that lost the session forgot them.
                Event::Connected { .. } => connection.subscribe(filters.clone()).await?,
                Event::Subscribed(codes) => report_subscription(&config.topics, &codes),
                Event::Message { publish, ack } => {
                    let line = match config.format {
                        OutputFormat::Text => text_line(&publish),
                        OutputFormat::Json => json_line(&publish),
                    };
                    if lines.try_send((line, ack)).is_err() {
                        break; // the printing thread ended: stdout closed
                    }
                    queued += 1;
                }
                Event::Acked | Event::Unsubscribed => {}
            },
        }
    }

    // What was handed to the printing thread is printed (and acknowledged) first.
    drop(lines);
    let stdout = tokio::task::spawn_blocking(move || printer.join())
        .await
        .context("the printing thread")?
        .map_err(|_| anyhow::anyhow!("the printing thread panicked"))?;
    while let Some(acks) = printed.recv().await {
        ack_all(&mut connection, acks).await?;
    }
    let printed_count = stdout?;
    tracing::info!(printed = printed_count, "stopping");
    connection.close(Duration::from_secs(5)).await
}

async fn ack_all(connection: &mut Connection, acks: Vec<Ack>) -> anyhow::Result<()> {
    for ack in acks {
        connection.ack(ack).await?;
    }
    Ok(())
}

/// The printing thread: writes each line, flushes when caught up (or every
/// [`FLUSH_EVERY`] lines), and only then hands the flushed lines' acknowledgements back.
/// Ends when `lines` closes or stdout does; returns how many lines it printed.
fn print_lines(
    mut lines: mpsc::Receiver<(String, Ack)>,
    printed: mpsc::UnboundedSender<Vec<Ack>>,
) -> anyhow::Result<u64> {
    let mut out = io::BufWriter::new(io::stdout().lock());
    let mut unflushed = Vec::with_capacity(FLUSH_EVERY);
    let mut count = 0;
    while let Some((line, ack)) = lines.blocking_recv() {
        if let Err(error) = writeln!(out, "{line}") {
            return stdout_closed(error).map(|()| count);
        }
        unflushed.push(ack);
        if unflushed.len() >= FLUSH_EVERY || lines.is_empty() {
            if let Err(error) = out.flush() {
                return stdout_closed(error).map(|()| count);
            }
            count += unflushed.len() as u64;
            // The other side is gone only when the subscriber is stopping anyway.
            let _ = printed.send(std::mem::take(&mut unflushed));
        }
    }
    Ok(count)
}

/// A closed stdout (`| head`) ends the subscriber quietly; other write errors are errors.
/// Nothing unflushed is acknowledged then: the broker delivers it again.
fn stdout_closed(error: io::Error) -> anyhow::Result<()> {
    if error.kind() == io::ErrorKind::BrokenPipe {
        tracing::info!("stdout closed, stopping");
        Ok(())
    } else {
        Err(error).context("cannot write to stdout")
    }
}

fn report_subscription(topics: &[String], codes: &[SubscribeReasonCode]) {
    for (topic, code) in topics.iter().zip(codes) {
        match code {
            SubscribeReasonCode::Success(qos) => {
                tracing::info!(topic, qos = *qos as u8, "subscribed")
            }
            SubscribeReasonCode::Failure => {
                tracing::error!(
                    topic,
                    "the broker refused the subscription (check the ACL for this user)"
                )
            }
        }
    }
}

/// `2026-11-24T10:00:00.123Z /sensor/temperature 23.41 (retained)`
pub fn text_line(publish: &Publish) -> String {
    let retained = if publish.retain { " (retained)" } else { "" };
    format!(
        "{} {} {}{retained}",
        format_time(Utc::now()),
        publish.topic,
        escape_for_line(&publish.payload)
    )
}

#[derive(Serialize)]
struct JsonLine<'a> {
    topic: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    payload: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    payload_base64: Option<String>,
    qos: u8,
    retain: bool,
    received_at: String,
}

/// One JSON object: the payload as a string when it is UTF-8, else as `payload_base64`.
pub fn json_line(publish: &Publish) -> String {
    let (payload, payload_base64) = match PayloadText::of(&publish.payload) {
        PayloadText::Utf8(text) => (Some(text), None),
        PayloadText::Base64(encoded) => (None, Some(encoded)),
    };
    let line = JsonLine {
        topic: &publish.topic,
        payload,
        payload_base64,
        qos: publish.qos as u8,
        retain: publish.retain,
        received_at: format_time(Utc::now()),
    };
    // Strings, integers and booleans always serialize.
    serde_json::to_string(&line).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn publish(payload: &[u8], retain: bool) -> Publish {
        let mut publish = Publish::new("/sensor/temperature", QoS::AtLeastOnce, payload.to_vec());
        publish.retain = retain;
        publish
    }

    #[test]
    fn defaults_are_the_seed_scripts() {
        let config = Config::try_parse_from(["mqtt-subscriber"]).expect("defaults parse");
        assert_eq!(config.client_id, "mqtt_subscriber_1");
        assert_eq!(config.topics, ["#"]);
        assert_eq!(config.format, OutputFormat::Text);
    }

    #[test]
    fn topic_repeats() {
        let config = Config::try_parse_from([
            "mqtt-subscriber",
            "--topic",
            "/sensor/#",
            "--topic",
            "/device/status",
        ])
        .expect("parses");
        assert_eq!(config.topics, ["/sensor/#", "/device/status"]);
    }

    #[test]
    fn text_line_shows_topic_payload_and_retained_flag() {
        let line = text_line(&publish(b"23.41", true));
        assert!(
            line.ends_with(" /sensor/temperature 23.41 (retained)"),
            "{line}"
        );
        let line = text_line(&publish(b"a\nb\xff", false));
        assert!(line.ends_with(" /sensor/temperature a\\nb\\xff"), "{line}");
    }

    #[test]
    fn json_line_is_valid_json_even_for_binary_payloads() {
        let value: serde_json::Value =
            serde_json::from_str(&json_line(&publish(b"23.41", true))).expect("json");
        assert_eq!(value["payload"], "23.41");
        assert_eq!(value["qos"], 1);
        assert_eq!(value["retain"], true);
        assert!(value["received_at"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z')));

        let value: serde_json::Value =
            serde_json::from_str(&json_line(&publish(&[0xff, 0x00], false))).expect("json");
        assert_eq!(value["payload_base64"], "/wA=");
        assert!(value.get("payload").is_none());
    }
}
