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
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rumqttc::QoS;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

use crate::config::{self, parse_qos, parse_seconds, BrokerSettings, LocalBroker};
use crate::mqtt::Connection;
use crate::payload::{Format, Reading};
use crate::topics;

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
    /// Topic to publish to
    #[arg(long)]
    pub topic: String,
    /// Quality of service: 0, 1 or 2
    #[arg(long, value_parser = parse_qos, default_value = "0")]
    pub qos: QoS,
    /// Seconds between readings; fractions allowed, 0 publishes as fast as possible
    #[arg(long, value_name = "SECONDS", value_parser = parse_seconds)]
    pub interval: Duration,
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
    /// Stop after this many readings (default: run until stopped)
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub count: Option<u64>,
    /// MQTT client id [default: <binary>-<boot id>]
    #[arg(long)]
    pub client_id: Option<String>,
    /// Device id in the JSON form
    #[arg(long)]
    pub device: String,
    /// Seed of the random walk, for a reproducible series of values
    #[arg(long)]
    pub seed: Option<u64>,
    #[command(flatten)]
    pub broker: LocalBroker,
}

/// The flags that read `<PREFIX>_<FLAG>` from the environment.
const OWN_FLAGS: [&str; 8] = [
    "topic",
    "qos",
    "interval",
    "retain",
    "format",
    "count",
    "client_id",
    "device",
];

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
        for id in OWN_FLAGS.into_iter().chain(["seed"]) {
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

/// Publishes readings until `shutdown`, or until `--count` readings were sent and
/// (at QoS 1 and 2) acknowledged.
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
    tracing::info!(
        broker = %broker.address(), client_id, topic = config.topic, qos = config.qos as u8, retain,
        interval = ?config.interval, format = ?config.format, boot,
        "publishing {} readings", kind.quantity
    );

    let mut rng = match config.seed {
        Some(seed) => StdRng::seed_from_u64(seed),
        None => StdRng::from_rng(&mut rand::rng()),
    };
    let mut walk = RandomWalk::new(kind.range.clone(), &mut rng);
    let mut ticks = Ticks::new(config.interval);
    let mut connection = Connection::start(&broker, options);
    let mut sent: u64 = 0;

    while config.count.is_none_or(|count| sent < count) {
        tokio::select! {
            () = shutdown.cancelled() => break,
            event = connection.recv() => {
                event?;
            }
            () = ticks.next() => {
                sent += 1;
                let reading = Reading {
                    device: config.device.clone(),
                    boot: boot.clone(),
                    seq: sent,
                    ts: Utc::now(),
                    value: walk.next_value(&mut rng),
                    unit: kind.unit.to_string(),
                };
                let payload = reading.encode(config.format);
                tracing::debug!(seq = sent, payload = %String::from_utf8_lossy(&payload), "publish");
                tokio::select! {
                    published = connection.publish(&config.topic, config.qos, retain, payload) => published?,
                    () = shutdown.cancelled() => break,
                }
            }
        }
    }

    tracing::info!(sent, "stopping");
    connection.close(DRAIN_TIMEOUT).await
}

/// A timer for readings; an interval of zero means "as fast as possible".
struct Ticks(Option<tokio::time::Interval>);

impl Ticks {
    fn new(period: Duration) -> Self {
        Self((!period.is_zero()).then(|| {
            let mut interval = tokio::time::interval(period);
            interval.set_missed_tick_behavior(MissedTickBehavior::Delay);
            interval
        }))
    }

    async fn next(&mut self) {
        match &mut self.0 {
            Some(interval) => {
                interval.tick().await;
            }
            None => tokio::task::yield_now().await,
        }
    }
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
