//! The flags of a sensor binary: the same for both kinds, with defaults and variable
//! names (`TEMPERATURE_QOS`, `PRESSURE_INTERVAL`) filled in from its [`SensorKind`].

use std::time::Duration;

use clap::{ArgAction, Command, CommandFactory, Parser};
use iot_core::config::{self, parse_duration, parse_qos, parse_seconds, LocalBroker};
use iot_core::ops;
use iot_core::payload::Format;
use rumqttc::QoS;

use crate::sensor::SensorKind;

/// Flags of a sensor binary. Defaults that depend on the kind are filled in by
/// [`SensorConfig::command`].
#[derive(Debug, Clone, Parser)]
#[command(version)]
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
    /// Stop after this many readings in all, and, at QoS 1 and 2, their
    /// acknowledgements [default: run until stopped]
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub count: Option<u64>,
    /// Stop after this long: seconds, or 30s, 10m, 2h [default: run until stopped]
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
    /// about 170 bytes of memory each) [default: 10 minutes' worth, 100 to 100 000]; 0
    /// keeps none
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

    pub fn retained(&self) -> bool {
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
    pub fn asked_rate(&self) -> Option<f64> {
        let period = self.period();
        (!period.is_zero()).then(|| 1.0 / period.as_secs_f64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sensor::{PRESSURE, TEMPERATURE};
    use iot_core::payload::Format;

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
    fn version_is_printed_not_refused() {
        for kind in [&TEMPERATURE, &PRESSURE] {
            let line = [kind.name, "--version"];
            match config::try_parse::<SensorConfig>(SensorConfig::command(kind), line) {
                Err(config::ParseOutcome::Exit(shown)) => {
                    assert_eq!(shown.exit_code(), 0);
                    let text = shown.render().to_string();
                    assert_eq!(
                        text.trim(),
                        format!("{} {}", kind.name, env!("CARGO_PKG_VERSION"))
                    );
                }
                other => panic!("{} --version: {other:?}", kind.name),
            }
        }
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
}
