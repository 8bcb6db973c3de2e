//! The simulated sensor service behind `temperature-sensor` and `pressure-sensor`.
//!
//! Both binaries run the same code with a different [`SensorKind`]: its topic, interval,
//! value range and unit are the seed scripts' defaults, and its flags read environment
//! variables with the kind's own prefix (`TEMPERATURE_QOS`, `PRESSURE_INTERVAL`, ...),
//! so one `.env` can configure both.

use std::ops::RangeInclusive;
use std::time::Duration;

use anyhow::Context;
use chrono::Utc;
use clap::{ArgAction, Command, CommandFactory, Parser};
use iot_core::ops;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rumqttc::{QoS, SubscribeFilter};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use iot_core::config::{
    self, parse_duration, parse_qos, parse_seconds, BrokerSettings, LocalBroker,
};
use iot_core::mqtt::{Connection, Event};
use iot_core::payload::{Format, Reading};
use iot_core::replay as iot_replay;
use iot_core::topics;

use crate::fleet::{self, Pacer};
use crate::replay::disk::DiskLog;
use crate::replay::{self, ReplayBuffer};

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

/// Flags of a sensor binary. Defaults that depend on the kind are filled in by
/// [`SensorConfig::command`].
#[derive(Debug, Clone, Parser)]
pub struct SensorConfig {
    /// Topic to publish to; `{device}` in it gives every device its own topic
    /// (e.g. /sensor/{device}/temperature)
    #[arg(long)]
    pub topic: String,
    /// Quality of service: 0, 1 or 2
    #[arg(long, value_parser = parse_qos, default_value = "0")]
    pub qos: QoS,
    /// Seconds between two readings of one device; fractions allowed, 0 publishes as
    /// fast as possible
    #[arg(long, value_name = "SECONDS", value_parser = parse_seconds)]
    pub interval: Duration,
    /// Readings per second for the whole process, spread over its devices (instead of
    /// --interval)
    #[arg(long, value_name = "PER_SECOND", value_parser = parse_rate, conflicts_with = "interval")]
    pub rate: Option<f64>,
    /// Publish retained, so a new subscriber gets the last reading at once (default)
    #[arg(long, num_args = 0..=1, default_value = "true", default_missing_value = "true",
          action = ArgAction::Set, overrides_with = "no_retain")]
    pub retain: bool,
    /// Publish without the retain flag
    #[arg(long, overrides_with = "retain")]
    pub no_retain: bool,
    /// Payload form: plain (the value, e.g. 23.41) or json (device, boot, seq, ts, value, unit)
    #[arg(long, value_enum, default_value = "plain")]
    pub format: Format,
    /// Stop after this many readings in all (default: run until stopped)
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub count: Option<u64>,
    /// Stop after this long: seconds, or 30s, 10m, 2h
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// MQTT client id [default: <binary>-<boot id>]
    #[arg(long)]
    pub client_id: Option<String>,
    /// Number of simulated devices, each with its own id, seq and random walk
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1_000_000), default_value = "1")]
    pub devices: u32,
    /// Device id in the JSON form; with --devices N, the first id, and the others count
    /// up its number
    #[arg(long)]
    pub device: String,
    /// Seed of the random walk, for a reproducible series of values
    #[arg(long)]
    pub seed: Option<u64>,
    /// Serve Prometheus metrics and health checks (/metrics, /health/live, /health/ready) on HOST:PORT, e.g. 0.0.0.0:9464 [default: off]
    #[arg(long, value_name = "HOST:PORT", value_parser = ops::parse_listen_address)]
    pub metrics_address: Option<String>,
    /// Readings each device keeps to publish again when the cloud asks (JSON form only;
    /// about 200 bytes each) [default: 10 minutes' worth, 100 to 100 000]; 0 keeps none
    #[arg(long, value_name = "N")]
    pub replay_buffer: Option<usize>,
    /// Keep the replay buffer on disk too, in DIR/<device>/ (as many readings as
    /// --replay-buffer), so readings of an earlier run can still be sent again after a
    /// restart [default: memory only]
    #[arg(long, value_name = "DIR")]
    pub replay_dir: Option<std::path::PathBuf>,
    #[command(flatten)]
    pub broker: LocalBroker,
}

/// The flags that read `<PREFIX>_<FLAG>` from the environment.
const OWN_FLAGS: [&str; 15] = [
    "metrics_address",
    "replay_buffer",
    "replay_dir",
    "topic",
    "qos",
    "interval",
    "rate",
    "retain",
    "format",
    "count",
    "duration",
    "client_id",
    "devices",
    "device",
    "seed",
];

/// Parses a positive number of readings per second (`10000`, `0.5`).
fn parse_rate(value: &str) -> Result<f64, String> {
    match value.trim().parse::<f64>() {
        Ok(rate) if rate.is_finite() && rate > 0.0 && rate <= 10_000_000.0 => Ok(rate),
        _ => Err("expected readings per second, more than 0 (e.g. 1000 or 0.5)".into()),
    }
}
impl SensorConfig {
    /// The command line of `kind`'s binary: its name, defaults and variable names.
    pub fn command(kind: &SensorKind) -> Command {
        let mut command = <Self as CommandFactory>::command()
            .name(kind.name)
            .bin_name(kind.name)
            .about(format!(
                "Simulated {} sensor: publishes a reading in {}–{} {} every {} s to {} (the seed's defaults).",
                kind.quantity,
                kind.range.start(),
                kind.range.end(),
                kind.unit,
                kind.interval,
                kind.topic
            ));
        for id in OWN_FLAGS {
            let env = format!("{}_{}", kind.env_prefix, id.to_uppercase());
            command = command.mut_arg(id, |arg| arg.env(env));
        }
        command
            .mut_arg("topic", |arg| arg.default_value(kind.topic).required(false))
            .mut_arg("interval", |arg| {
                arg.default_value(kind.interval).required(false)
            })
            .mut_arg("device", |arg| {
                arg.default_value(kind.device).required(false)
            })
    }

    /// Loads `.env`, the environment and the command line; exits 2 on a bad setting.
    pub fn load(kind: &SensorKind) -> Self {
        config::load_with(Self::command(kind), std::env::args_os())
    }

    fn retained(&self) -> bool {
        self.retain && !self.no_retain
    }

    /// Time between two publishes of the process: the interval shared among the devices,
    /// or one over the rate; zero means as fast as possible.
    pub fn period(&self) -> Duration {
        match self.rate {
            Some(rate) => Duration::from_secs_f64(1.0 / rate),
            None => self.interval / self.devices,
        }
    }

    /// Readings per second the process was asked for; `None` for as fast as possible.
    fn asked_rate(&self) -> Option<f64> {
        let period = self.period();
        (!period.is_zero()).then(|| 1.0 / period.as_secs_f64())
    }
}

/// A value that wanders inside a range in small steps, like a real sensor's.
#[derive(Debug, Clone)]
pub struct RandomWalk {
    min: f64,
    max: f64,
    step: f64,
    value: f64,
}

impl RandomWalk {
    /// Starts at a random point of `range`; each step moves at most 2 % of its width.
    pub fn new(range: RangeInclusive<f64>, rng: &mut impl Rng) -> Self {
        let (min, max) = (*range.start(), *range.end());
        Self {
            min,
            max,
            step: (max - min) * 0.02,
            value: rng.random_range(min..=max),
        }
    }

    /// The next value, reflected back into the range at its edges.
    pub fn next_value(&mut self, rng: &mut impl Rng) -> f64 {
        let mut value = self.value + rng.random_range(-self.step..=self.step);
        if value > self.max {
            value = self.max - (value - self.max);
        }
        if value < self.min {
            value = self.min + (self.min - value);
        }
        self.value = value.clamp(self.min, self.max);
        self.value
    }
}

/// A short random id for one run of the process (`k3x9q2`). It never comes from
/// `--seed`: two runs with the same seed are still two boots.
pub fn new_boot_id() -> String {
    const ALPHABET: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut rng = rand::rng();
    (0..6)
        .map(|_| char::from(ALPHABET[rng.random_range(0..ALPHABET.len())]))
        .collect()
}

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
    let boot = new_boot_id();
    let client_id = config
        .client_id
        .clone()
        .unwrap_or_else(|| format!("{}-{boot}", kind.name));
    let broker = BrokerSettings::from(config.broker.clone());
    let options = broker
        .mqtt_options(&client_id, true)
        .context("cannot set up the broker connection")?;
    let retain = config.retained();

    let mut rng = match config.seed {
        Some(seed) => StdRng::seed_from_u64(seed),
        None => StdRng::from_rng(&mut rand::rng()),
    };
    // Only JSON readings carry the seq a replay request names.
    let replay_capacity = match config.format {
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
            Some(dir) if replay_capacity > 0 => {
                Some(DiskLog::open(dir, &id, &boot, replay_capacity)?)
            }
            _ => None,
        };
        devices.push(Device {
            topic: fleet::device_topic(&config.topic, &id),
            id,
            seq: 0,
            walk: RandomWalk::new(kind.range.clone(), &mut rng),
            kept: ReplayBuffer::new(replay_capacity),
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
    let requests: Vec<SubscribeFilter> = devices
        .iter()
        .filter(|_| replay_capacity > 0)
        .map(|device| SubscribeFilter::new(iot_replay::request_topic(&device.id), QoS::AtLeastOnce))
        .collect();
    if devices.len() > 1 && !fleet::has_placeholder(&config.topic) && config.format == Format::Plain
    {
        tracing::warn!(
            "{} devices share {} with plain payloads, so nobody can tell them apart: use --format json, or {{device}} in --topic",
            devices.len(), config.topic
        );
    }
    let asked = config.asked_rate();
    tracing::info!(
        broker = %broker.address(), client_id, topic = config.topic, qos = config.qos as u8, retain,
        devices = devices.len(), rate = asked.map_or("as fast as possible".into(), |rate| format!("{rate:.1}/s")),
        format = ?config.format, boot,
        "publishing {} readings", kind.quantity
    );

    ops::serve(config.metrics_address.as_deref(), shutdown.clone(), METRICS).await?;
    let mut connection = Connection::start(&broker, options);
    let mut pacer = Pacer::new(config.period());
    let started = Instant::now();
    let stop_at = tokio::time::sleep(config.duration.unwrap_or(Duration::MAX / 4));
    tokio::pin!(stop_at);
    let mut report = tokio::time::interval_at(started + RATE_REPORT, RATE_REPORT);
    let mut sync = tokio::time::interval_at(started + SYNC_EVERY, SYNC_EVERY);
    let mut skipped_reported = 0;
    let mut sent: u64 = 0;
    // Readings sent again on request (their acknowledgements count too).
    let mut replayed: u64 = 0;
    let mut next = 0;

    while config.count.is_none_or(|count| sent < count) {
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = &mut stop_at => break,
            event = connection.recv() => match event? {
                // Every connection: the broker may have forgotten a clean session's.
                Event::Connected { .. } if !requests.is_empty() => {
                    connection.subscribe(requests.clone()).await?;
                }
                Event::Message { publish, .. } => {
                    replayed += replay_readings(&mut connection, &devices, &boot, config.qos, &publish).await?;
                }
                Event::Subscribed(codes) => {
                    let granted = codes.iter().filter(|code| matches!(code, rumqttc::SubscribeReasonCode::Success(_))).count();
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
            },
            _ = sync.tick(), if config.replay_dir.is_some() => sync_disks(&mut devices),
            _ = report.tick() => {
                let skipped = pacer.skipped();
                metrics::counter!("iot_readings_skipped_total").absolute(skipped);
                if let (Some(rate), true) = (asked, skipped > skipped_reported) {
                    tracing::warn!(
                        "cannot keep {rate:.0} readings/s: fell more than a second behind and skipped {} readings in the last {RATE_REPORT:?} ({} in all)",
                        skipped - skipped_reported, skipped
                    );
                    skipped_reported = skipped;
                }
            }
            () = pacer.next() => {
                let count = devices.len();
                let device = &mut devices[next];
                next = (next + 1) % count;
                device.seq += 1;
                sent += 1;
                metrics::counter!("iot_readings_made_total").increment(1);
                let reading = Reading {
                    device: device.id.clone(),
                    boot: boot.clone(),
                    seq: device.seq,
                    ts: Utc::now(),
                    value: device.walk.next_value(&mut rng),
                    unit: kind.unit.to_string(),
                };
                let payload = reading.encode(config.format);
                tracing::trace!(device = device.id, seq = device.seq, "publish");
                tokio::select! {
                    published = connection.publish(&device.topic, config.qos, retain, payload.clone()) => published?,
                    () = shutdown.cancelled() => {
                        // Stopped before the client took it: not sent, so not counted
                        // and its seq not used (a count would claim a reading no one
                        // can ever see).
                        device.seq -= 1;
                        sent -= 1;
                        break;
                    }
                }
                if let Some(disk) = &mut device.disk {
                    if let Err(error) = disk.append(device.seq, &payload) {
                        // Publishing matters more: carry on with the memory buffer.
                        tracing::warn!(device = device.id, "replay buffer no longer kept on disk: {error:#}");
                        device.disk = None;
                    }
                }
                device.kept.push(device.seq, payload);
            }
        }
    }

    sync_disks(&mut devices);
    let publishing = started.elapsed();
    let settled = connection.wait_acknowledged(DRAIN_TIMEOUT).await?;
    let settling = started.elapsed() - publishing;
    let achieved = sent as f64 / publishing.as_secs_f64().max(1e-9);
    let asked = asked.map_or("as fast as possible".into(), |rate| format!("{rate:.0}/s"));
    let acknowledged = match config.qos {
        QoS::AtMostOnce => "no acknowledgements at QoS 0".to_string(),
        _ => format!(
            "{} acknowledged {:.3} s after the last",
            connection.acknowledged(),
            settling.as_secs_f64()
        ),
    };
    let mut more = match pacer.skipped() {
        0 => String::new(),
        skipped => format!("; {skipped} skipped for falling behind"),
    };
    if replayed > 0 {
        more.push_str(&format!("; {replayed} sent again on replay requests"));
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
    connection.close(DRAIN_TIMEOUT).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(kind: &SensorKind, args: &[&str]) -> SensorConfig {
        let args = std::iter::once(kind.name).chain(args.iter().copied());
        match config::try_parse(SensorConfig::command(kind), args) {
            Ok(config) => config,
            Err(outcome) => panic!("{outcome:?}"),
        }
    }

    #[test]
    fn defaults_are_the_seed_scripts() {
        let temperature = parse(&TEMPERATURE, &[]);
        assert_eq!(temperature.topic, "/sensor/temperature");
        assert_eq!(temperature.interval, Duration::from_secs(3));
        assert_eq!(temperature.qos, QoS::AtMostOnce);
        assert!(temperature.retained());
        assert_eq!(temperature.format, Format::Plain);

        let pressure = parse(&PRESSURE, &[]);
        assert_eq!(pressure.topic, "/sensor/pressure");
        assert_eq!(pressure.interval, Duration::from_millis(500));
    }

    #[test]
    fn retain_flags_and_the_last_one_wins() {
        assert!(!parse(&TEMPERATURE, &["--no-retain"]).retained());
        assert!(parse(&TEMPERATURE, &["--no-retain", "--retain"]).retained());
        assert!(!parse(&TEMPERATURE, &["--retain", "false"]).retained());
    }

    #[test]
    fn help_names_every_variable_with_the_kind_prefix() {
        let help = SensorConfig::command(&PRESSURE)
            .render_long_help()
            .to_string();
        for variable in [
            "PRESSURE_TOPIC",
            "PRESSURE_QOS",
            "PRESSURE_INTERVAL",
            "PRESSURE_RETAIN",
            "PRESSURE_FORMAT",
            "PRESSURE_COUNT",
            "PRESSURE_CLIENT_ID",
            "PRESSURE_DEVICE",
            "PRESSURE_SEED",
            "PRESSURE_DEVICES",
            "PRESSURE_RATE",
            "PRESSURE_DURATION",
            "LOCAL_BROKER",
            "LOCAL_PORT",
            "LOCAL_USERNAME",
            "LOCAL_PASSWORD",
            "LOCAL_TLS_CA",
        ] {
            assert!(help.contains(variable), "--help lacks {variable}:\n{help}");
        }
        assert!(help.contains("[default: /sensor/pressure]"), "{help}");
    }

    #[test]
    fn devices_share_the_interval_and_a_rate_replaces_it() {
        let fleet = parse(&TEMPERATURE, &["--devices", "300"]);
        assert_eq!(fleet.period(), Duration::from_millis(10));
        assert_eq!(fleet.asked_rate(), Some(100.0));

        let rated = parse(&PRESSURE, &["--rate", "10000", "--devices", "50"]);
        assert_eq!(rated.period(), Duration::from_micros(100));

        let flat_out = parse(&PRESSURE, &["--interval", "0"]);
        assert_eq!(flat_out.period(), Duration::ZERO);
        assert_eq!(flat_out.asked_rate(), None);
    }

    #[test]
    fn bad_fleet_settings_are_refused() {
        let refused = |args: &[&str]| {
            let line = std::iter::once(PRESSURE.name).chain(args.iter().copied());
            match config::try_parse::<SensorConfig>(SensorConfig::command(&PRESSURE), line) {
                Err(config::ParseOutcome::Bad(line)) => line,
                other => panic!("{args:?} accepted: {other:?}"),
            }
        };
        assert!(refused(&["--devices", "0"]).contains("PRESSURE_DEVICES"));
        assert!(refused(&["--rate", "0"]).contains("readings per second"));
        assert!(refused(&["--rate", "5", "--interval", "1"]).contains("--interval"));
        assert!(refused(&["--duration", "later"]).contains("PRESSURE_DURATION"));
    }

    #[test]
    fn the_walk_stays_in_range_and_moves_in_small_steps() {
        let mut rng = StdRng::seed_from_u64(7);
        let mut walk = RandomWalk::new(990.0..=1020.0, &mut rng);
        let mut previous = walk.value;
        for _ in 0..100_000 {
            let value = walk.next_value(&mut rng);
            assert!((990.0..=1020.0).contains(&value), "{value} out of range");
            assert!(
                (value - previous).abs() <= 0.6 + 1e-9,
                "{previous} -> {value}"
            );
            previous = value;
        }
    }

    #[test]
    fn a_seed_makes_the_series_reproducible() {
        let series = |seed| {
            let mut rng = StdRng::seed_from_u64(seed);
            let mut walk = RandomWalk::new(20.0..=30.0, &mut rng);
            (0..5)
                .map(|_| walk.next_value(&mut rng))
                .collect::<Vec<_>>()
        };
        assert_eq!(series(1), series(1));
        assert_ne!(series(1), series(2));
    }

    #[test]
    fn boot_ids_differ_between_runs() {
        let (a, b) = (new_boot_id(), new_boot_id());
        assert_eq!(a.len(), 6);
        assert_ne!(a, b);
    }
}
