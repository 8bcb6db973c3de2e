//! The command line of `readings`: the queries, their flags, and the parsing of times,
//! bucket widths and series, with the checks that need more than one flag.

use bson::Document;
use chrono::{DateTime, Utc};
use clap::{Parser, Subcommand};

use iot_core::config::CloudBroker;
use iot_store::MongoSettings;

/// Queries over the readings stored by mongo-persister.
#[derive(Debug, Clone, Parser)]
#[command(name = "readings", version)]
pub struct Cli {
    #[command(subcommand)]
    pub query: Query,
    /// Output form
    #[arg(
        long,
        global = true,
        env = "READINGS_FORMAT",
        value_enum,
        default_value = "table"
    )]
    pub format: OutputFormat,
    #[command(flatten)]
    pub mongo: MongoSettings,
}

/// How results are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    /// Aligned columns for people (cells longer than 60 characters are cut with …)
    Table,
    /// A JSON array of objects
    Json,
    /// Comma-separated values with a header line
    Csv,
}

#[derive(Debug, Clone, Subcommand)]
pub enum Query {
    /// The last value of every series (topic, device and measurement)
    Latest,
    /// One series' readings in a time range, oldest first
    Range {
        #[command(flatten)]
        series: Series,
        #[command(flatten)]
        window: Window,
        /// Most readings printed (at least 1)
        #[arg(long, default_value = "1000", value_parser = clap::value_parser!(u32).range(1..))]
        limit: u32,
    },
    /// Count, min, average and max of one series per time bucket
    Stats {
        #[command(flatten)]
        series: Series,
        #[command(flatten)]
        window: Window,
        /// Bucket width (30s, 90s, 7m, 1h, 1d); buckets start at whole multiples of it
        /// counted from 1970-01-01T00:00:00Z, so 1h starts on the hour, 1d at midnight UTC
        #[arg(long, default_value = "1m", value_parser = parse_bucket)]
        every: Bucket,
    },
    /// Every device: its measurements, when it was last heard from, its status
    Devices,
    /// Every device's status and since when
    Status,
    /// What is stored: documents per collection and how long they are kept
    Info,
    /// Missing and duplicate sequence numbers per device and boot; exits 1 when there
    /// are any, 0 when there are none, 2 when the query fails (like diff)
    Gaps {
        /// Only readings since: a duration back from now (30s, 10m, 2h, 7d; -10m too) or
        /// an RFC 3339 time [default: every stored reading, and each boot must start at seq 1]
        #[arg(long, value_parser = parse_time, allow_hyphen_values = true)]
        since: Option<DateTime<Utc>>,
        /// Only this device
        #[arg(long)]
        device: Option<String>,
        /// Report a gap only once a reading after it was received this long ago (10s,
        /// 1m): on a live stream with persister replicas, another replica's batch may
        /// still be on its way [default: every gap]
        #[arg(long, value_parser = parse_time, allow_hyphen_values = true)]
        settle: Option<DateTime<Utc>>,
        /// Ask each device with missing readings to send them again, through the cloud
        /// broker (as the persister does by itself for recent gaps); needs the
        /// persister's broker user, the only one that may ask
        #[arg(long)]
        repair: bool,
        #[command(flatten)]
        broker: CloudBroker,
    },
}

/// A time window: from `since` up to (not including) `until`.
#[derive(Debug, Clone, clap::Args)]
pub struct Window {
    /// Start: a duration back from now (30s, 10m, 2h, 7d; -10m reads the same) or an
    /// RFC 3339 time
    #[arg(long, default_value = "1h", value_parser = parse_time, allow_hyphen_values = true)]
    pub since: DateTime<Utc>,
    /// End (exclusive), in the same forms; after --since [default: now]
    #[arg(long, value_parser = parse_time, allow_hyphen_values = true)]
    pub until: Option<DateTime<Utc>>,
}

impl Window {
    /// The end: `--until`, or now.
    pub fn until(&self) -> DateTime<Utc> {
        self.until.unwrap_or_else(Utc::now)
    }

    /// Refuses an end that is not after the start (`--since 1h --until 2h`), which
    /// would quietly find nothing.
    fn check(&self) -> Result<(), String> {
        match self.until {
            Some(until) if until <= self.since => Err(format!(
                "--until {} is not after --since {}: nothing could be found between them \
                 (durations count back from now, so --since 2h --until 1h is the hour before the last)",
                iot_core::payload::format_time(until),
                iot_core::payload::format_time(self.since),
            )),
            _ => Ok(()),
        }
    }
}

/// Which readings: a topic, a device, a measurement, or several of these together.
#[derive(Debug, Clone, clap::Args)]
#[group(skip)]
#[command(group(clap::ArgGroup::new("series").required(true).multiple(true).args(["topic", "device"])))]
pub struct Series {
    /// Topic, e.g. /sensor/temperature or tele/plug_1/SENSOR
    #[arg(long)]
    pub topic: Option<String>,
    /// Device, e.g. temp-0001 or living_room (readings devices lists them)
    #[arg(long)]
    pub device: Option<String>,
    /// Measurement of the device or topic, e.g. temperature or BME280.Temperature
    #[arg(long, requires = "series")]
    pub measurement: Option<String>,
}

impl Series {
    /// The query's filter on `topic`, `device` and `measurement`.
    pub fn filter(&self) -> Document {
        let mut filter = Document::new();
        for (field, value) in [
            ("topic", &self.topic),
            ("device", &self.device),
            ("measurement", &self.measurement),
        ] {
            if let Some(value) = value {
                filter.insert(field, value);
            }
        }
        filter
    }

    /// The series in words, for an empty answer.
    pub fn describe(&self) -> String {
        [
            self.topic.as_deref(),
            self.device.as_deref(),
            self.measurement.as_deref(),
        ]
        .into_iter()
        .flatten()
        .collect::<Vec<_>>()
        .join(" ")
    }
}

impl Cli {
    /// The command line, with the MongoDB flags accepted after the query too
    /// (`readings latest --mongodb-uri …`).
    pub fn command() -> clap::Command {
        <Self as clap::CommandFactory>::command()
            .mut_arg("uri", |arg| arg.global(true))
            .mut_arg("database", |arg| arg.global(true))
            .mut_arg("timeout", |arg| arg.global(true))
    }

    /// Refuses flags that parse but do not fit together; the message names them.
    pub fn check(&self) -> Result<(), String> {
        match &self.query {
            Query::Range { window, .. } | Query::Stats { window, .. } => window.check(),
            _ => Ok(()),
        }
    }
}

/// Parses `10m`-style durations back from now (`-10m` too: the sign only says "ago"),
/// or RFC 3339 times.
pub fn parse_time(value: &str) -> Result<DateTime<Utc>, String> {
    if let Ok(time) = DateTime::parse_from_rfc3339(value) {
        return Ok(time.with_timezone(&Utc));
    }
    let ago =
        humantime::parse_duration(value.strip_prefix('-').unwrap_or(value)).map_err(|_| {
            format!("expected a duration such as 10m or 2h, or an RFC 3339 time, not {value:?}")
        })?;
    let ago = chrono::Duration::from_std(ago).map_err(|_| "duration too long".to_string())?;
    Utc::now()
        .checked_sub_signed(ago)
        .ok_or_else(|| "duration too long".to_string())
}

/// A bucket width of `stats`, in milliseconds (at least one second, at most 10 000
/// days).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bucket {
    pub millis: i64,
}

/// The widest bucket: 10 000 days, far beyond any stored history.
const MAX_BUCKET_MILLIS: i64 = 10_000 * 86_400_000;

/// Parses `30s`, `90s`, `7m`, `1h`, `1d`: any whole number of milliseconds from one
/// second on.
pub fn parse_bucket(value: &str) -> Result<Bucket, String> {
    let duration = humantime::parse_duration(value)
        .map_err(|_| format!("expected a duration such as 30s, 1m or 1h, not {value:?}"))?;
    let millis = i64::try_from(duration.as_millis()).unwrap_or(i64::MAX);
    if duration.subsec_nanos() % 1_000_000 != 0 || millis < 1_000 {
        return Err("expected a whole number of milliseconds, at least 1s".into());
    }
    if millis > MAX_BUCKET_MILLIS {
        return Err("expected at most 10000 days".into());
    }
    Ok(Bucket { millis })
}

#[cfg(test)]
mod tests {
    use super::*;
    use iot_core::payload::format_time;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::command()
            .try_get_matches_from(std::iter::once("readings").chain(args.iter().copied()))
            .and_then(|matches| <Cli as clap::FromArgMatches>::from_arg_matches(&matches))
    }

    #[test]
    fn a_series_is_a_topic_or_a_device_and_measurement() {
        assert!(parse(&["range"]).is_err(), "a series is needed");
        assert!(
            parse(&["range", "--measurement", "temperature"]).is_err(),
            "a measurement of what?"
        );
        assert!(parse(&["stats", "--topic", "/sensor/pressure"]).is_ok());
        let cli = parse(&[
            "range",
            "--device",
            "living_room",
            "--measurement",
            "temperature",
        ])
        .expect("parses");
        let Query::Range { series, .. } = cli.query else {
            panic!("not range");
        };
        assert_eq!(
            series.filter(),
            bson::doc! { "device": "living_room", "measurement": "temperature" }
        );
        assert_eq!(series.describe(), "living_room temperature");
    }

    #[test]
    fn durations_and_times_parse() {
        let before = Utc::now();
        for value in ["10m", "-10m"] {
            let since = parse_time(value).expect(value);
            let ago = (before - since).num_seconds();
            assert!((599..=601).contains(&ago), "{value}: {ago}");
        }
        assert!(parse_time("7d").is_ok());
        assert_eq!(
            parse_time("2026-11-24T10:00:00+01:00").map(format_time),
            Ok("2026-11-24T09:00:00.000Z".to_string())
        );
        assert!(parse_time("yesterday").is_err());
        assert!(parse_time("--5m").is_err());
    }

    #[test]
    fn a_negative_duration_is_a_value_not_a_flag() {
        let cli =
            parse(&["range", "--topic", "t", "--since", "-5m", "--until", "-1m"]).expect("parses");
        let Query::Range { window, .. } = &cli.query else {
            panic!("not range");
        };
        assert!(window.since < window.until());
        assert_eq!(cli.check(), Ok(()));
    }

    #[test]
    fn until_before_since_is_refused() {
        let cli =
            parse(&["stats", "--topic", "t", "--since", "1h", "--until", "2h"]).expect("parses");
        let error = cli.check().expect_err("until before since");
        assert!(
            error.contains("--until") && error.contains("--since"),
            "{error}"
        );
        let same = "2026-11-24T10:00:00Z";
        let cli =
            parse(&["range", "--topic", "t", "--since", same, "--until", same]).expect("parses");
        assert!(cli.check().is_err(), "an empty window");
    }

    #[test]
    fn a_limit_of_nothing_is_refused() {
        assert!(parse(&["range", "--topic", "t", "--limit", "0"]).is_err());
        assert!(parse(&["range", "--topic", "t", "--limit", "1"]).is_ok());
    }

    #[test]
    fn buckets_are_any_whole_number_of_milliseconds_from_a_second() {
        assert_eq!(parse_bucket("1m"), Ok(Bucket { millis: 60_000 }));
        assert_eq!(parse_bucket("90s"), Ok(Bucket { millis: 90_000 }));
        assert_eq!(parse_bucket("7m"), Ok(Bucket { millis: 420_000 }));
        assert_eq!(parse_bucket("1500ms"), Ok(Bucket { millis: 1_500 }));
        assert_eq!(parse_bucket("1d"), Ok(Bucket { millis: 86_400_000 }));
        assert!(parse_bucket("999ms").is_err());
        assert!(parse_bucket("0s").is_err());
        assert!(parse_bucket("1s 1us").is_err());
        assert!(parse_bucket("100000d").is_err());
    }
}
