//! `edge-relay`: store-and-forward at the edge, in place of Mosquitto's bridge.
//!
//! Every message the edge broker gets goes into an on-disk log ([`log`]) and is
//! acknowledged to the broker only once it is there ([`intake`]); from the log it goes
//! on, unchanged, to the cloud broker at QoS 1 ([`forward`]). A cloud outage is a
//! backlog on disk, bounded by `--max-disk`, not a queue in the broker's memory; a full
//! disk stops the acknowledgements (back-pressure), it never drops a message. Forwarded
//! messages are kept for `--retention`, so replay requests are answered from the log
//! even for devices that have since stopped ([`inbound`]), and a cloud broker that comes
//! back without the relay's session is sent again what it may have lost.
//! [`keep`] trims the log and reports; [`mqtt5`] is the relay's MQTT 5 connection.
//!
//! Four tasks, one per job, joined by the log and three small channels; the first to
//! fail stops the others, and each finishes what it holds on the way out.
//!
//! With `nats://` addresses in `--cloud-broker` the cloud is a NATS JetStream cluster
//! instead ([`forward_nats`]): the log is published into its stream, and nothing comes
//! back from the cloud yet (no replay requests, no Sparkplug commands).

pub mod config;
pub mod forward;
pub mod forward_nats;
pub mod inbound;
pub mod intake;
pub mod keep;
pub mod log;
pub mod mqtt5;

use std::sync::Arc;

use anyhow::Context;
use iot_core::mqtt::{Connection, Unconfirmed};
use iot_core::ops::{self, Metric};
use tokio::sync::{mpsc, watch, Notify};
use tokio_util::sync::CancellationToken;

pub use config::Config;

/// The readiness checks: the subscription on the edge broker standing (acknowledged,
/// for a new session) and the log open. A cloud that is down
/// is what the relay is there for; it shows in `iot_mqtt_connected` (the forwarding
/// connection) and `iot_relay_connected{link="cloud-replay"}`.
const EDGE_CHECK: &str = "edge broker";
const LOG_CHECK: &str = "log";

/// How far above its figure at start an idle relay's memory may stay after a backlog
/// of any length was forwarded, of messages of any size up to the 2 MiB a broker takes:
/// what the allocator keeps of a burst through the forwarding window
/// ([`forward::WINDOW_BYTES`] and one message), the log's memtables (up to its 64 MiB of
/// journal) and block cache (16 MiB), and the intake's bounds (twice 64 MiB). It does not
/// grow with what is kept. Measured 191 to 269 MiB above 55 MiB after 1 GB of 2 MB
/// messages; see docs/edge-relay.md.
pub const IDLE_MEMORY_BOUND: u64 = 320 << 20;

/// The relay's own metrics, beside the common ones.
pub const METRICS: &[Metric] = &[
    Metric::gauge("iot_relay_connected", "1 while the link (edge, cloud-replay) is connected; the forwarding connection to the cloud is iot_mqtt_connected"),
    Metric::counter("iot_relay_logged_total", "messages taken from the edge broker onto disk and acknowledged"),
    Metric::counter("iot_relay_forwarded_total", "messages the cloud broker acknowledged"),
    Metric::gauge("iot_relay_backlog", "messages on disk not forwarded yet"),
    Metric::gauge("iot_relay_oldest_unforwarded_seconds", "age of the oldest message not forwarded yet (0 without a backlog)"),
    Metric::gauge("iot_relay_disk_bytes", "bytes the log takes on disk as counted against --max-disk: its tables, what waits in memory for them, its journals at their most (64 MiB)"),
    Metric::gauge("iot_relay_kept", "messages in the log, forwarded or not"),
    Metric::gauge("iot_relay_back_pressure", "1 while the disk budget is full of messages not forwarded and the edge broker is not acknowledged"),
    Metric::counter("iot_relay_expired_total", "forwarded messages deleted past --retention"),
    Metric::counter("iot_relay_evicted_total", "forwarded messages deleted before their retention because the disk budget needed the room"),
    Metric::counter("iot_relay_replayed_total", "readings answered from the log to replay requests"),
    Metric::counter(
        "iot_relay_replay_requests_held_total",
        "replay requests not answered again: their ranges were answered from the log within a minute",
    ),
    Metric::counter(
        "iot_relay_replays_over_budget_total",
        "readings of replay answers left for a later request: the device's budget of 32 MiB a minute sent again was spent",
    ),
    Metric::counter("iot_relay_refills_total", "times the cloud broker came back without the relay's session"),
    Metric::counter("iot_relay_refilled_total", "messages sent again to refill a cloud broker that lost its state"),
    Metric::counter("iot_relay_unforwardable_total", "messages the cloud broker cannot take (too long for MQTT), passed over"),
    Metric::counter("iot_relay_unreadable_total", "messages of the log that could not be read back, skipped"),
    Metric::counter("iot_relay_set_aside_total", "messages not forwarded yet that damage to the log's files cost, counted at start (moved aside with the damaged part)"),
    Metric::counter("iot_relay_qos0_dropped_total", "QoS 0 messages dropped because 100 000 waited for the disk"),
];

/// Relays until `shutdown`: the batch being written is finished and acknowledged, what
/// is in flight to the cloud given a few seconds, the log synced.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    ops::health().set(EDGE_CHECK, Err("not connected yet".into()));
    ops::health().set(LOG_CHECK, Err("not open yet".into()));
    ops::serve(config.metrics_address.as_deref(), shutdown.clone(), METRICS).await?;
    let log = open_log(&config)?;
    ops::health().set(LOG_CHECK, Ok(()));
    if let Some(nats) = config.cloud_nats().map_err(anyhow::Error::msg)? {
        return run_nats(&config, &nats, log, shutdown).await;
    }

    let (edge_broker, cloud_broker) = (config.edge_broker(), config.cloud_broker());
    let edge = mqtt5::Link::start(
        &edge_broker,
        edge_broker.mqtt5_options(&config.edge_client_id(), false)?,
        "edge",
        Some(EDGE_CHECK),
    );
    let inbound = mqtt5::Link::start(
        &cloud_broker,
        config
            .cloud_replay_broker()
            .mqtt5_options(&config.cloud_replay_client_id(), false)?,
        "cloud-replay",
        None,
    );
    let mut cloud_options = cloud_broker.mqtt_options(&config.cloud_client_id(), false)?;
    cloud_options.set_inflight(u16::try_from(forward::WINDOW).unwrap_or(u16::MAX));
    let cloud = Connection::start_checked(&cloud_broker, cloud_options, None, Unconfirmed::Forget);
    log_start(&config, &edge_broker, &cloud_broker);

    let wake = Arc::new(Notify::new());
    // Few: each may be a message of 2 MiB, and an answer waits here for the forwarder.
    let (replays_tx, replays) = mpsc::channel(inbound::REPLAY_QUEUE);
    // The keeper measures the room within a second; until then, what the log may take.
    let (room_tx, room) = watch::channel(config.max_disk.saturating_sub(log.budget_bytes()));
    let stop = shutdown.child_token();
    let refill = (config.refill_window, config.refill_delay);
    let edge_client = edge.client.clone();
    let tasks = [
        tokio::spawn(intake::run(
            edge,
            log.clone(),
            config.topics.clone(),
            Arc::clone(&wake),
            room,
            stop.clone(),
        )),
        tokio::spawn(
            forward::Forwarder::new(cloud, log.clone(), wake, replays, refill).run(stop.clone()),
        ),
        tokio::spawn(inbound::run(
            inbound,
            log.clone(),
            edge_client,
            replays_tx,
            stop.clone(),
        )),
        tokio::spawn(
            keep::Keeper {
                log: log.clone(),
                retention: config.retention,
                max_disk: config.max_disk,
                room: room_tx,
            }
            .run(stop.clone()),
        ),
    ];
    finish(futures_join(tasks, &stop).await, &log)
}

/// As [`run`], into a NATS JetStream cluster: intake, forwarding and keeping; the
/// fourth task (replay requests in) has nothing to do yet and waits for the stop.
async fn run_nats(
    config: &Config,
    nats: &iot_core::nats::NatsSettings,
    log: log::Log,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let edge_broker = config.edge_broker();
    let edge = mqtt5::Link::start(
        &edge_broker,
        edge_broker.mqtt5_options(&config.edge_client_id(), false)?,
        "edge",
        Some(EDGE_CHECK),
    );
    tracing::info!(
        site = config.site,
        edge = %edge_broker.address(),
        cloud = %nats.address(),
        subject = iot_core::nats::site_subject(&config.site),
        log = %config.log_dir.display(),
        log_id = log.id(),
        max_disk = config.max_disk,
        retention = ?config.retention,
        "edge-relay starting, into the NATS stream (replay requests are not carried over NATS yet)"
    );
    let wake = Arc::new(Notify::new());
    let (room_tx, room) = watch::channel(config.max_disk.saturating_sub(log.budget_bytes()));
    let stop = shutdown.child_token();
    let forwarder = forward_nats::NatsForwarder::start(
        nats,
        &config.site,
        log.clone(),
        Arc::clone(&wake),
        config.refill_window,
    )
    .await?;
    let idle = stop.clone();
    let tasks = [
        tokio::spawn(intake::run(
            edge,
            log.clone(),
            config.topics.clone(),
            wake,
            room,
            stop.clone(),
        )),
        tokio::spawn(forwarder.run(stop.clone())),
        tokio::spawn(async move {
            idle.cancelled().await;
            Ok(())
        }),
        tokio::spawn(
            keep::Keeper {
                log: log.clone(),
                retention: config.retention,
                max_disk: config.max_disk,
                room: room_tx,
            }
            .run(stop.clone()),
        ),
    ];
    finish(futures_join(tasks, &stop).await, &log)
}

/// The first error of the tasks, after the log is synced.
fn finish(mut results: Vec<anyhow::Result<()>>, log: &log::Log) -> anyhow::Result<()> {
    let mut outcome = Ok(());
    for result in results.drain(..) {
        if let Err(error) = result {
            if outcome.is_ok() {
                outcome = Err(error);
            }
        }
    }
    log.sync()?;
    tracing::info!(
        backlog = log.backlog(),
        "edge-relay stopped; the log keeps what was not forwarded"
    );
    outcome
}

fn log_start(
    config: &Config,
    edge_broker: &iot_core::config::BrokerSettings,
    cloud_broker: &iot_core::config::BrokerSettings,
) {
    tracing::info!(
        site = config.site,
        edge = %edge_broker.address(),
        cloud = %cloud_broker.address(),
        log = %config.log_dir.display(),
        max_disk = config.max_disk,
        retention = ?config.retention,
        "edge-relay starting"
    );
}

/// Opens the log, saying what it found: damage as errors, with what it cost.
fn open_log(config: &Config) -> anyhow::Result<log::Log> {
    let (log, opened) = log::Log::open(&config.log_dir)
        .with_context(|| format!("--log-dir {}", config.log_dir.display()))?;
    for damage in &opened.damage {
        tracing::error!(lost = opened.lost, "{damage}");
    }
    if let Some((aside, why)) = &opened.set_aside {
        tracing::error!(
            "the log could not be opened ({why}); moved aside to {} and started a new one: what it held is not forwarded (kept there for inspection)",
            aside.display()
        );
    }
    tracing::info!(
        messages = opened.messages,
        backlog = opened.backlog,
        set_aside = opened.lost,
        "log open"
    );
    Ok(log)
}

/// Waits for every task; the first to end with an error stops the others.
async fn futures_join(
    tasks: [tokio::task::JoinHandle<anyhow::Result<()>>; 4],
    stop: &CancellationToken,
) -> Vec<anyhow::Result<()>> {
    let mut results = Vec::with_capacity(tasks.len());
    let mut pending: Vec<_> = tasks.into_iter().collect();
    while !pending.is_empty() {
        let (result, _, rest) = futures_util::future::select_all(pending).await;
        pending = rest;
        let result = result
            .context("a relay task failed")
            .and_then(|result| result);
        if result.is_err() {
            stop.cancel();
        }
        results.push(result);
    }
    results
}
