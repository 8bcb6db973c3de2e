//! `edge-relay`: store-and-forward at the edge, in place of Mosquitto's bridge.
//!
//! Every message the edge broker gets goes into an on-disk log ([`log`]) and is
//! acknowledged to the broker only once it is there ([`intake`]); from the log it goes
//! on, unchanged, to the cloud broker at QoS 2, so that a relay killed at any moment
//! forwards nothing twice ([`forward`], over [`cloud`]). A cloud outage is a
//! backlog on disk, bounded by `--max-disk`, not a queue in the broker's memory; a full
//! disk stops the acknowledgements (back-pressure), it never drops a message. A device
//! account past its share of the log or its size limit is the exception, by design: its
//! messages are refused (acknowledged, not written, counted), so that one account's
//! flood costs the others seconds ([`accounts`]). Forwarded
//! messages are kept for `--retention`, so replay requests are answered from the log
//! even for devices that have since stopped ([`inbound`]), and a cloud broker that comes
//! back without the relay's session is sent again what it may have lost.
//! [`keep`] trims the log and reports; [`mqtt5`] is the relay's MQTT 5 connection.
//!
//! Four tasks, one per job, joined by the log and three small channels; the first to
//! fail stops the others, and each finishes what it holds on the way out. A failure of
//! the store (a write the file system refused, which leaves fjall refusing every write
//! after it) does not end the relay: the tasks stop, the log is opened again and they
//! start again, as at a start, without exiting ([`run`]). What was not on disk was not
//! acknowledged, and the edge broker sends it again.
//!
//! With `nats://` addresses in `--cloud-broker` the cloud is a NATS JetStream cluster
//! instead ([`forward_nats`]): the log is published into its stream, and replay
//! requests, Sparkplug commands and the host's STATE come in on the site's NATS subjects
//! ([`inbound_nats`]), carried as from the cloud Mosquitto.

pub mod accounts;
pub mod cloud;
pub mod config;
pub mod forward;
pub mod forward_nats;
pub mod inbound;
pub mod inbound_nats;
pub mod intake;
pub mod keep;
pub mod log;
pub mod mqtt5;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use iot_core::ops::{self, Metric};
use tokio::sync::{mpsc, Notify};
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
    Metric::counter("iot_relay_forwarded_total", "messages the cloud broker received (QoS 2 PUBREC); its subscribers get them once the forwarded mark is on disk"),
    Metric::gauge("iot_relay_backlog", "messages on disk not forwarded yet"),
    Metric::gauge("iot_relay_oldest_unforwarded_seconds", "age of the oldest message not forwarded yet (0 without a backlog)"),
    Metric::gauge("iot_relay_disk_bytes", "bytes the log takes on disk as counted against --max-disk: its tables, what waits in memory for them, its journals at their most (64 MiB)"),
    Metric::gauge("iot_relay_kept", "messages in the log, forwarded or not"),
    Metric::gauge("iot_relay_room_bytes", "bytes the log may still take, as last measured: the lesser of what --max-disk and the file system (its free space less what the store needs for its own writes, halved) leave"),
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
    Metric::counter("iot_relay_refused_total", "messages of a device account acknowledged to the edge broker and not forwarded: reason too_large (past its --max-message) or over_share (its --account-share of the log not forwarded yet)"),
    Metric::counter("iot_relay_qos0_dropped_total", "QoS 0 messages dropped because 100 000 waited for the disk"),
    Metric::gauge("iot_relay_held_for_stream_room", "1 while the log is held for a NATS stream near its byte limit (nats-server before 2.10.5)"),
    iot_core::nats::CONNECTED,
];

/// The longest wait before the log is opened again after a failure of the store.
const REOPEN_BACKOFF: Duration = Duration::from_secs(30);

/// Relays until `shutdown`: the batch being written is finished and acknowledged, what
/// is in flight to the cloud given a few seconds, the log synced. A failure of the store
/// opens the log again (after 1 s, doubling up to [`REOPEN_BACKOFF`] while it fails
/// again within a minute) rather than ending the relay.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    ops::health().set(EDGE_CHECK, Err("not connected yet".into()));
    ops::health().set(LOG_CHECK, Err("not open yet".into()));
    ops::serve(config.metrics_address.as_deref(), shutdown.clone(), METRICS).await?;
    let mut backoff = Duration::from_secs(1);
    loop {
        let started = tokio::time::Instant::now();
        let error = match relay(&config, &shutdown).await {
            Err(error) if log::is_store_failure(&error) && !shutdown.is_cancelled() => error,
            // The store of the run that failed, not closed yet.
            Err(error) if held_by_this_process(&error) && !shutdown.is_cancelled() => error,
            outcome => return outcome,
        };
        ops::health().set(LOG_CHECK, Err(format!("{error:#}")));
        if started.elapsed() > Duration::from_secs(60) {
            backoff = Duration::from_secs(1);
        }
        tracing::error!(
            "the log's store failed ({error:#}): what was not on disk was not acknowledged to the edge broker, which sends it again; opening the log again in {backoff:?}"
        );
        tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(REOPEN_BACKOFF);
    }
}

/// One run of the relay on the log opened once: until `shutdown` or a failure.
async fn relay(config: &Config, shutdown: &CancellationToken) -> anyhow::Result<()> {
    let log = open_log(config)?;
    ops::health().set(LOG_CHECK, Ok(()));
    if let Some(nats) = config.cloud_nats().map_err(anyhow::Error::msg)? {
        return run_nats(config, &nats, log, shutdown).await;
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
    let cloud = cloud::Cloud::new(
        &cloud_broker,
        cloud_broker.mqtt_options(&config.cloud_client_id(), false)?,
        log.is_new(),
    );
    log_start(config, &edge_broker, &cloud_broker);

    let accounts = accounts_of(config, &log).await?;
    let wake = Arc::new(Notify::new());
    // Few: each may be a message of 2 MiB, and an answer waits here for the forwarder.
    let (replays_tx, replays) = mpsc::channel(inbound::REPLAY_QUEUE);
    let (keeper, room) = keep::Keeper::new(
        log.clone(),
        config.log_dir.clone(),
        config.retention,
        config.max_disk,
    )?;
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
            Arc::clone(&accounts),
            stop.clone(),
        )),
        tokio::spawn(
            forward::Forwarder::new(cloud, log.clone(), accounts, wake, replays, refill)
                .run(stop.clone()),
        ),
        tokio::spawn(inbound::run(
            inbound,
            log.clone(),
            edge_client,
            replays_tx,
            stop.clone(),
        )),
        tokio::spawn(keeper.run(stop.clone())),
    ];
    finish(futures_join(tasks, &stop).await, &log, config)
}

/// As [`run`], into a NATS JetStream cluster: intake, forwarding, requests in from NATS
/// and keeping.
async fn run_nats(
    config: &Config,
    nats: &iot_core::nats::NatsSettings,
    log: log::Log,
    shutdown: &CancellationToken,
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
        run = log.run_of(log.next()),
        max_disk = config.max_disk,
        retention = ?config.retention,
        requests = iot_core::nats::site_requests(&config.site),
        "edge-relay starting, into the NATS stream"
    );
    let edge_client = edge.client.clone();
    let (replays_tx, replays) = mpsc::channel(inbound::REPLAY_QUEUE);
    let wake = Arc::new(Notify::new());
    let accounts = accounts_of(config, &log).await?;
    let (keeper, room) = keep::Keeper::new(
        log.clone(),
        config.log_dir.clone(),
        config.retention,
        config.max_disk,
    )?;
    let stop = shutdown.child_token();
    let forwarder = forward_nats::NatsForwarder::start(
        nats,
        &config.site,
        log.clone(),
        Arc::clone(&accounts),
        Arc::clone(&wake),
        config.refill_window,
        replays,
    )
    .await?;
    let carrier = inbound::Carrier::new(log.clone(), edge_client, replays_tx);
    let tasks = [
        tokio::spawn(intake::run(
            edge,
            log.clone(),
            config.topics.clone(),
            wake,
            room,
            accounts,
            stop.clone(),
        )),
        tokio::spawn(inbound_nats::run(
            forwarder.client(),
            config.site.clone(),
            carrier,
            stop.clone(),
        )),
        tokio::spawn(forwarder.run(stop.clone())),
        tokio::spawn(keeper.run(stop.clone())),
    ];
    finish(futures_join(tasks, &stop).await, &log, config)
}

/// The device accounts of `--accounts`, each with a share of the log and a size limit,
/// and what each has in `log` not forwarded yet counted against its share.
async fn accounts_of(config: &Config, log: &log::Log) -> anyhow::Result<Arc<accounts::Accounts>> {
    let accounts = Arc::new(accounts::Accounts::new(
        config.accounts.clone(),
        config.max_message,
        config.account_share,
    ));
    let (counting, log) = (Arc::clone(&accounts), log.clone());
    let started = std::time::Instant::now();
    let (messages, bytes) = tokio::task::spawn_blocking(move || counting.count_backlog(&log))
        .await
        .context("counting the backlog against the accounts' shares failed")??;
    if messages > 0 {
        tracing::info!(
            messages,
            bytes,
            took = ?started.elapsed(),
            "the device accounts' messages in the log not forwarded yet counted against their shares"
        );
    }
    Ok(accounts)
}

/// The first error of the tasks, after the log is synced.
fn finish(
    mut results: Vec<anyhow::Result<()>>,
    log: &log::Log,
    config: &Config,
) -> anyhow::Result<()> {
    let mut outcome = Ok(());
    for result in results.drain(..) {
        if let Err(error) = result {
            if outcome.is_ok() {
                outcome = Err(error);
            }
        }
    }
    // Not on a file system without room: the forwarded mark waits for the next start
    // (what it would have saved is forwarded again, never lost).
    let room = log::free_bytes(&config.log_dir).map_or(true, |free| free >= keep::MIN_FREE);
    if outcome.is_ok() && room {
        outcome = log.sync();
    }
    if outcome.is_ok() {
        tracing::info!(
            backlog = log.backlog(),
            "edge-relay stopped; the log keeps what was not forwarded"
        );
    }
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

/// Whether `error` says the log is held by this very process: the store of a run that
/// failed, still closing.
fn held_by_this_process(error: &anyhow::Error) -> bool {
    error
        .downcast_ref::<log::Held>()
        .is_some_and(|held| held.pid == Some(std::process::id()))
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
    tasks: impl IntoIterator<Item = tokio::task::JoinHandle<anyhow::Result<()>>>,
    stop: &CancellationToken,
) -> Vec<anyhow::Result<()>> {
    let mut pending: Vec<_> = tasks.into_iter().collect();
    let mut results = Vec::with_capacity(pending.len());
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

/// The most `du` of the log reaches for a `--max-disk` of `max_disk` bytes (on a file
/// system with room for it): the budget (the tables, the memtables, the journals at 64
/// MiB) and one batch, which may overlap the keeper's measurement (the journals take
/// less than 62 MiB before a batch, at most 4 MiB more after it). Measured: 120 to 127
/// MiB for 128M under a fast stream of 256 KiB messages (docs/edge-relay.md).
pub fn disk_bound(max_disk: u64) -> u64 {
    max_disk + intake::MAX_BATCH_BYTES
}
