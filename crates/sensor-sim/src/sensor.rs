//! The simulated sensor service behind `temperature-sensor` and `pressure-sensor`.
//!
//! Both binaries run the same code with a different [`SensorKind`]: its topic, interval,
//! value range and unit are the seed scripts' defaults, and its flags read environment
//! variables with the kind's own prefix (`TEMPERATURE_QOS`, `PRESSURE_INTERVAL`, ...),
//! so one `.env` can configure both ([`config`]). A run is a [`Sensor`]: start, one
//! reading, one event from the broker (replay requests), and the summary at the end.

mod config;
mod walk;

use std::ops::RangeInclusive;
use std::time::Duration;

use anyhow::Context;
use chrono::Utc;
use iot_core::ops;
use rand::rngs::StdRng;
use rand::SeedableRng;
use rumqttc::{QoS, SubscribeFilter, SubscribeReasonCode};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use iot_core::config::BrokerSettings;
use iot_core::mqtt::{Connection, Event};
use iot_core::payload::{Format, Reading};
use iot_core::replay as iot_replay;
use iot_core::topics;

use crate::fleet::{self, Pacer};
use crate::replay::disk::DiskLog;
use crate::replay::{self, ReplayBuffer};

pub use config::SensorConfig;
pub use walk::{new_boot_id, RandomWalk};

/// What distinguishes one kind of simulated sensor from another.
#[derive(Debug, Clone)]
pub struct SensorKind {
    /// Binary name, also the start of the default client id.
    pub name: &'static str,
    /// What is measured, for log lines.
    pub quantity: &'static str,
    pub topic: &'static str,
    /// Default interval between readings, in seconds as typed on the command line.
    pub interval: &'static str,
    pub range: RangeInclusive<f64>,
    pub unit: &'static str,
    /// Default device id in the JSON form.
    pub device: &'static str,
    /// Prefix of the environment variables of this binary's own flags.
    pub env_prefix: &'static str,
}

/// Temperature in 20–30 °C every 3 s on `/sensor/temperature`.
pub const TEMPERATURE: SensorKind = SensorKind {
    name: "temperature-sensor",
    quantity: "temperature",
    topic: topics::TEMPERATURE,
    interval: "3",
    range: 20.0..=30.0,
    unit: "°C",
    device: "temp-0001",
    env_prefix: "TEMPERATURE",
};

/// Pressure in 990–1020 hPa every 0.5 s on `/sensor/pressure`.
pub const PRESSURE: SensorKind = SensorKind {
    name: "pressure-sensor",
    quantity: "pressure",
    topic: topics::PRESSURE,
    interval: "0.5",
    range: 990.0..=1020.0,
    unit: "hPa",
    device: "pres-0001",
    env_prefix: "PRESSURE",
};

/// How long a stopping sensor waits for the broker to acknowledge what it sent.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the replay files are synced to disk (what a power loss may take).
const SYNC_EVERY: Duration = Duration::from_secs(1);
/// How often a sensor that cannot keep its rate says so.
const RATE_REPORT: Duration = Duration::from_secs(5);

/// One simulated device of the process.
#[derive(Debug)]
struct Device {
    id: String,
    topic: String,
    seq: u64,
    walk: RandomWalk,
    /// What it sent, to send again when asked.
    kept: ReplayBuffer,
    /// The same on disk, with earlier boots' (`--replay-dir`).
    disk: Option<DiskLog>,
}

/// Makes the devices' replay files survive a power loss; a device whose file cannot be
/// written any more keeps its buffer in memory only.
fn sync_disks(devices: &mut [Device]) {
    for device in devices {
        if let Some(Err(error)) = device.disk.as_mut().map(DiskLog::sync) {
            tracing::warn!(
                device = device.id,
                "replay buffer no longer kept on disk: {error:#}"
            );
            device.disk = None;
        }
    }
}

/// Answers a replay request: publishes again what the asked device kept, marked as
/// replays, and says which asked ranges it no longer has; returns how many it sent. A
/// request it cannot read is logged and dropped.
async fn replay_readings(
    connection: &mut Connection,
    devices: &[Device],
    boot: &str,
    qos: QoS,
    publish: &rumqttc::Publish,
) -> anyhow::Result<u64> {
    let Some(device) = devices
        .iter()
        .find(|device| iot_replay::request_topic(&device.id) == publish.topic)
    else {
        return Ok(0);
    };
    let request = match iot_replay::Ranges::parse(&publish.payload) {
        Ok(request) => request,
        Err(why) => {
            tracing::warn!(topic = publish.topic, "replay request ignored: {why}");
            return Ok(0);
        }
    };
    let answer = match &device.disk {
        Some(disk) if request.boot != boot => disk.answer(&request).unwrap_or_else(|error| {
            tracing::warn!(
                device = device.id,
                "cannot read the replay folder: {error:#}"
            );
            replay::Answer::default()
        }),
        _ => device.kept.answer(boot, device.seq, &request),
    };
    tracing::info!(
        device = device.id, asked = ?request.ranges, asked_boot = request.boot,
        sent = answer.replays.len(), gone = ?answer.gone,
        "replaying readings the cloud asked for"
    );
    // At least QoS 1: a replay lost on the way is what it is there to prevent.
    let qos = if qos == QoS::AtMostOnce {
        QoS::AtLeastOnce
    } else {
        qos
    };
    let sent = answer.replays.len() as u64;
    for payload in answer.replays {
        metrics::counter!("iot_readings_replayed_total").increment(1);
        connection
            .publish(&device.topic, qos, false, payload)
            .await?;
    }
    if !answer.gone.is_empty() {
        let gone = iot_replay::Ranges {
            boot: request.boot,
            ranges: answer.gone,
        };
        connection
            .publish(
                &iot_replay::gone_topic(&device.id),
                QoS::AtLeastOnce,
                false,
                gone.encode(),
            )
            .await?;
    }
    Ok(sent)
}

/// The sensors' own metrics (the connection's are common to every service).
const METRICS: &[ops::Metric] = &[
    ops::Metric::counter(
        "iot_readings_made_total",
        "Readings made (each one published once)",
    ),
    ops::Metric::counter(
        "iot_readings_skipped_total",
        "Reading slots skipped for falling more than a second behind the rate",
    ),
    ops::Metric::counter(
        "iot_readings_replayed_total",
        "Readings published again because the cloud asked (replay requests)",
    ),
];

/// Publishes readings until `shutdown`, `--count` readings or `--duration`, waits for
/// the broker to acknowledge them (QoS 1 and 2), and logs a one-line summary.
pub async fn run(
    kind: &SensorKind,
    config: SensorConfig,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let mut sensor = Sensor::start(kind, config, &shutdown).await?;
    sensor.publish(&shutdown).await?;
    sensor.finish().await
}

/// A running sensor process: its devices, its connection, its pace and its counts.
#[derive(Debug)]
pub struct Sensor {
    kind: SensorKind,
    config: SensorConfig,
    boot: String,
    retain: bool,
    connection: Connection,
    devices: Vec<Device>,
    /// The devices' replay request topics, subscribed on every connection.
    requests: Vec<SubscribeFilter>,
    rng: StdRng,
    pacer: Pacer,
    /// The device whose turn is next.
    next: usize,
    started: Instant,
    sent: u64,
    /// Readings sent again on request (their acknowledgements count too).
    replayed: u64,
    skipped_reported: u64,
}

impl Sensor {
    /// Makes the devices (opening their replay files), serves metrics and connects.
    pub async fn start(
        kind: &SensorKind,
        config: SensorConfig,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<Self> {
        let boot = new_boot_id();
        let client_id = config
            .client_id
            .clone()
            .unwrap_or_else(|| format!("{}-{boot}", kind.name));
        let broker = BrokerSettings::from(config.broker.clone());
        let options = broker
            .mqtt_options(&client_id, true)
            .context("cannot set up the broker connection")?;
        let mut rng = match config.seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_rng(&mut rand::rng()),
        };
        let devices = open_devices(kind, &config, &boot, &mut rng)?;
        let requests: Vec<SubscribeFilter> = devices
            .iter()
            .filter(|device| device.kept.capacity() > 0)
            .map(|device| {
                SubscribeFilter::new(iot_replay::request_topic(&device.id), QoS::AtLeastOnce)
            })
            .collect();
        if devices.len() > 1
            && !fleet::has_placeholder(&config.topic)
            && config.format == Format::Plain
        {
            tracing::warn!(
                "{} devices share {} with plain payloads, so nobody can tell them apart: use --format json, or {{device}} in --topic",
                devices.len(), config.topic
            );
        }
        let retain = config.retained();
        tracing::info!(
            broker = %broker.address(), client_id, topic = config.topic, qos = config.qos as u8, retain,
            devices = devices.len(), rate = config.asked_rate().map_or("as fast as possible".into(), |rate| format!("{rate:.1}/s")),
            format = ?config.format, boot,
            "publishing {} readings", kind.quantity
        );
        ops::serve(config.metrics_address.as_deref(), shutdown.clone(), METRICS).await?;
        Ok(Self {
            kind: kind.clone(),
            pacer: Pacer::new(config.period()),
            connection: Connection::start(&broker, options),
            config,
            boot,
            retain,
            devices,
            requests,
            rng,
            next: 0,
            started: Instant::now(),
            sent: 0,
            replayed: 0,
            skipped_reported: 0,
        })
    }

    /// Publishes until `shutdown`, `--count` or `--duration`, answering replay requests
    /// and syncing the replay files meanwhile.
    pub async fn publish(&mut self, shutdown: &CancellationToken) -> anyhow::Result<()> {
        let stop_at = tokio::time::sleep(self.config.duration.unwrap_or(Duration::MAX / 4));
        tokio::pin!(stop_at);
        let mut report = tokio::time::interval_at(self.started + RATE_REPORT, RATE_REPORT);
        let mut sync = tokio::time::interval_at(self.started + SYNC_EVERY, SYNC_EVERY);
        while self.config.count.is_none_or(|count| self.sent < count) {
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = &mut stop_at => break,
                event = self.connection.recv() => self.on_event(event?).await?,
                _ = sync.tick(), if self.config.replay_dir.is_some() => sync_disks(&mut self.devices),
                _ = report.tick() => self.report_rate(),
                () = self.pacer.next() => {
                    if !self.publish_next(shutdown).await? {
                        break;
                    }
                }
            }
        }
        Ok(())
    }

    /// One event from the broker: subscribe to the replay requests on every connection
    /// (the broker may have forgotten a clean session's), answer a request.
    async fn on_event(&mut self, event: Event) -> anyhow::Result<()> {
        match event {
            Event::Connected { .. } if !self.requests.is_empty() => {
                self.connection.subscribe(self.requests.clone()).await?;
            }
            Event::Message { publish, .. } => {
                self.replayed += replay_readings(
                    &mut self.connection,
                    &self.devices,
                    &self.boot,
                    self.config.qos,
                    &publish,
                )
                .await?;
            }
            Event::Subscribed(codes) => {
                let granted = codes
                    .iter()
                    .filter(|code| matches!(code, SubscribeReasonCode::Success(_)))
                    .count();
                if granted == codes.len() {
                    tracing::info!(devices = granted, "listening for replay requests");
                } else {
                    tracing::warn!(
                        granted, asked = codes.len(),
                        "the broker refused some replay request subscriptions (check the ACL): those devices cannot be asked for missing readings"
                    );
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// Says so when the process fell behind its rate and skipped readings.
    fn report_rate(&mut self) {
        let skipped = self.pacer.skipped();
        metrics::counter!("iot_readings_skipped_total").absolute(skipped);
        if let (Some(rate), true) = (self.config.asked_rate(), skipped > self.skipped_reported) {
            tracing::warn!(
                "cannot keep {rate:.0} readings/s: fell more than a second behind and skipped {} readings in the last {RATE_REPORT:?} ({} in all)",
                skipped - self.skipped_reported, skipped
            );
            self.skipped_reported = skipped;
        }
    }

    /// The next device's next reading, published and kept for replays; false when
    /// `shutdown` came before the client took it.
    async fn publish_next(&mut self, shutdown: &CancellationToken) -> anyhow::Result<bool> {
        let count = self.devices.len();
        let device = &mut self.devices[self.next];
        self.next = (self.next + 1) % count;
        let reading = Reading {
            device: device.id.clone(),
            boot: self.boot.clone(),
            seq: device.seq + 1,
            ts: Utc::now(),
            value: device.walk.next_value(&mut self.rng),
            unit: self.kind.unit.to_string(),
        };
        let payload = reading.encode(self.config.format);
        tracing::trace!(device = device.id, seq = reading.seq, "publish");
        let publish =
            self.connection
                .publish(&device.topic, self.config.qos, self.retain, payload.clone());
        tokio::select! {
            published = publish => published?,
            // Stopped before the client took it: not sent, so not counted and its seq
            // not used (a count would claim a reading no one can ever see).
            () = shutdown.cancelled() => return Ok(false),
        }
        device.seq = reading.seq;
        self.sent += 1;
        metrics::counter!("iot_readings_made_total").increment(1);
        if let Some(disk) = &mut device.disk {
            if let Err(error) = disk.append(device.seq, &payload) {
                // Publishing matters more: carry on with the memory buffer.
                tracing::warn!(
                    device = device.id,
                    "replay buffer no longer kept on disk: {error:#}"
                );
                device.disk = None;
            }
        }
        device.kept.push(device.seq, payload);
        Ok(true)
    }

    /// Syncs the replay files, waits for the broker's acknowledgements, logs the
    /// summary line and disconnects.
    pub async fn finish(mut self) -> anyhow::Result<()> {
        sync_disks(&mut self.devices);
        let publishing = self.started.elapsed();
        let settled = self.connection.wait_acknowledged(DRAIN_TIMEOUT).await?;
        let settling = self.started.elapsed() - publishing;
        let sent = self.sent;
        let achieved = sent as f64 / publishing.as_secs_f64().max(1e-9);
        let asked = self
            .config
            .asked_rate()
            .map_or("as fast as possible".into(), |rate| format!("{rate:.0}/s"));
        let acknowledged = match self.config.qos {
            QoS::AtMostOnce => "no acknowledgements at QoS 0".to_string(),
            _ => format!(
                "{} acknowledged {:.3} s after the last",
                self.connection.acknowledged(),
                settling.as_secs_f64()
            ),
        };
        let mut more = match self.pacer.skipped() {
            0 => String::new(),
            skipped => format!("; {skipped} skipped for falling behind"),
        };
        if self.replayed > 0 {
            more.push_str(&format!(
                "; {} sent again on replay requests",
                self.replayed
            ));
        }
        tracing::info!(
            "summary: {sent} readings sent in {:.2} s ({achieved:.0}/s, asked {asked}), {acknowledged}{more}",
            publishing.as_secs_f64()
        );
        if !settled {
            tracing::warn!(
                "the broker did not acknowledge every reading within {DRAIN_TIMEOUT:?}; they may be lost or delivered again"
            );
        }
        self.connection.close(DRAIN_TIMEOUT).await
    }
}

/// The process's devices: ids counting up from `--device`, each with its topic, random
/// walk and replay buffer (on disk too with `--replay-dir`; JSON readings only, as only
/// they carry the `seq` a request names).
fn open_devices(
    kind: &SensorKind,
    config: &SensorConfig,
    boot: &str,
    rng: &mut StdRng,
) -> anyhow::Result<Vec<Device>> {
    let capacity = match config.format {
        Format::Json => config.replay_buffer.unwrap_or_else(|| {
            replay::default_capacity(
                config
                    .asked_rate()
                    .map(|rate| rate / f64::from(config.devices)),
            )
        }),
        Format::Plain => 0,
    };
    let mut devices = Vec::with_capacity(config.devices as usize);
    for id in fleet::device_ids(&config.device, config.devices as usize) {
        let disk = match &config.replay_dir {
            Some(dir) if capacity > 0 => Some(DiskLog::open(dir, &id, boot, capacity)?),
            _ => None,
        };
        devices.push(Device {
            topic: fleet::device_topic(&config.topic, &id),
            id,
            seq: 0,
            walk: RandomWalk::new(kind.range.clone(), rng),
            kept: ReplayBuffer::new(capacity),
            disk,
        });
    }
    if let Some(dir) = &config.replay_dir {
        let (readings, boots) = devices
            .iter()
            .filter_map(|device| device.disk.as_ref())
            .map(DiskLog::earlier)
            .fold((0, 0), |(readings, boots), (r, b)| {
                (readings + r, boots + b)
            });
        tracing::info!(dir = %dir.display(), "replay buffer on disk: {readings} readings of earlier runs kept ({boots} boot(s) of all devices together)");
    }
    Ok(devices)
}
