//! The persister's settings: flags with their environment variables, the checks that
//! need several of them, and what follows from them (the session name, the ingest
//! mapping, the topic filters).

use std::time::Duration;

use chrono_tz::Tz;
use clap::Parser;
use iot_core::config::{
    parse_duration, parse_positive_seconds, BrokerSettings, PersisterCloudBroker,
};
use iot_core::nats::{NatsSettings, StreamSettings};
use iot_core::replay;
use iot_store::{parse_retention, Mapping, MongoSettings};

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
    /// How to read what devices publish: an ingest mapping file, or a built-in preset (default, tasmota, zigbee2mqtt, esphome, shelly, homeassistant, sparkplug), with its owner's topic layout as PRESET:PARAMETER=VALUE (tasmota:fulltopic=home/%prefix%/%topic%/); repeat for several, tried in order [default: default]
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
    /// Documents gathered into one write; a message's documents are never split, so one batch holds up to one message more. The writer's queue holds at most four batches' worth of documents and 8 MiB of payloads
    #[arg(long, env = "PERSISTER_BATCH_SIZE", default_value = "500", value_parser = clap::value_parser!(u16).range(1..))]
    pub batch_size: u16,
    /// Documents one device's messages may expand into per second beyond one a message (a Sparkplug message's metrics, a preset's JSON fields), with a burst of ten seconds' worth and never less than 10 000 (a whole Sparkplug birth); past it, that message's readings are refused and counted (iot_persister_over_budget_total), the device's statuses and everyone else's readings go on. 0: no budget
    #[arg(
        long,
        value_name = "DOCUMENTS",
        env = "PERSISTER_DEVICE_DOCUMENTS_PER_SECOND",
        default_value = "1000"
    )]
    pub device_documents_per_second: u32,
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
    /// Sparkplug B (--ingest sparkplug): this host application's id, its STATE topic spBv1.0/STATE/ID that edge nodes name as their primary host [default: the client id]
    #[arg(
        long,
        value_name = "ID",
        env = "PERSISTER_SPARKPLUG_HOST_ID",
        help_heading = "Sparkplug B"
    )]
    pub sparkplug_host_id: Option<String>,
    /// Seconds a gap in an edge node's seq numbers may last (messages arriving out of order) before the node is sent a Rebirth command; fractions allowed
    #[arg(long, value_name = "SECONDS", env = "PERSISTER_SPARKPLUG_REORDER_TIMEOUT", default_value = "2", value_parser = parse_positive_seconds, help_heading = "Sparkplug B")]
    pub sparkplug_reorder_timeout: Duration,
    /// NATS cloud (--broker nats://...): most bytes the stream holds; past it, new messages are refused and the relays keep them on their disks (discard new). nats-server before 2.10.5 removes the oldest messages at this limit instead (nats-io/nats-server#4775): there the relays keep a tenth of it free, each taking a share of the room left
    #[arg(long, value_name = "BYTES", env = "PERSISTER_NATS_MAX_BYTES", default_value = "1G", value_parser = iot_core::config::parse_bytes, help_heading = "NATS JetStream")]
    pub nats_max_bytes: u64,
    /// NATS cloud: a message no persister stored within this is removed from the stream
    #[arg(long, value_name = "DURATION", env = "PERSISTER_NATS_MAX_AGE", default_value = "7d", value_parser = parse_duration, help_heading = "NATS JetStream")]
    pub nats_max_age: Duration,
    /// NATS cloud: how long the stream remembers a message's id and refuses a copy; at least the relays' --refill-window
    #[arg(long, value_name = "DURATION", env = "PERSISTER_NATS_DUPLICATE_WINDOW", default_value = "2m", value_parser = parse_duration, help_heading = "NATS JetStream")]
    pub nats_duplicate_window: Duration,
    /// NATS cloud: copies of the stream, one per node (3 survives the loss of any one)
    #[arg(long, value_name = "N", env = "PERSISTER_NATS_REPLICAS", default_value = "3", value_parser = clap::value_parser!(u8).range(1..=5), help_heading = "NATS JetStream")]
    pub nats_replicas: u8,
    /// NATS cloud: messages the shared consumer hands out unacknowledged at most, over all replicas
    #[arg(long, value_name = "N", env = "PERSISTER_NATS_MAX_ACK_PENDING", default_value = "10000", value_parser = clap::value_parser!(i64).range(1..), help_heading = "NATS JetStream")]
    pub nats_max_ack_pending: i64,
    /// NATS cloud: how long a message handed to a persister may wait for its acknowledgement (its write) before the stream hands it out again; a persister that died leaves its messages waiting this long
    #[arg(long, value_name = "DURATION", env = "PERSISTER_NATS_ACK_WAIT", default_value = "60s", value_parser = parse_duration, help_heading = "NATS JetStream")]
    pub nats_ack_wait: Duration,
    #[command(flatten)]
    pub broker: PersisterCloudBroker,
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
        self.validate_nats()?;
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
        if self.share.is_some() && self.mapping()?.reads_sparkplug() {
            return Err(
                "--ingest sparkplug with --share: a Sparkplug host must see every message of a node to follow its seq numbers; \
                 run one persister without --share for Sparkplug and share the other presets among replicas".into(),
            );
        }
        if let Err(why) =
            iot_core::bounds::check_id("--sparkplug-host-id", &self.sparkplug_host_id())
        {
            return Err(format!(
                "{why} (PERSISTER_SPARKPLUG_HOST_ID): it is a topic level"
            ));
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

    /// The NATS JetStream cluster to read from when `--broker` holds `nats://`
    /// addresses; `None` for a cloud MQTT broker.
    pub fn nats(&self) -> Result<Option<NatsSettings>, String> {
        BrokerSettings::from(self.broker.clone())
            .nats(self.broker.port.is_some())
            .map_err(|why| format!("--broker: {why}"))
    }

    /// The stream's settings, from the `--nats-*` flags.
    pub fn stream_settings(&self) -> StreamSettings {
        StreamSettings {
            max_bytes: i64::try_from(self.nats_max_bytes).unwrap_or(i64::MAX),
            max_age: self.nats_max_age,
            duplicate_window: self.nats_duplicate_window,
            replicas: usize::from(self.nats_replicas),
        }
    }

    /// What a NATS cloud does not need, refused with the reason.
    fn validate_nats(&self) -> Result<(), String> {
        if self.nats()?.is_none() {
            return Ok(());
        }
        if self.share.is_some() || self.retire {
            return Err("--share and --retire with a NATS cloud: every replica reads the one durable consumer, which needs neither".into());
        }
        Ok(())
    }

    pub fn client_id(&self) -> String {
        self.client_id
            .clone()
            .unwrap_or_else(|| DEFAULT_CLIENT_ID.to_string())
    }

    /// The Sparkplug host id: `--sparkplug-host-id`, else the client id.
    pub fn sparkplug_host_id(&self) -> String {
        self.sparkplug_host_id
            .clone()
            .unwrap_or_else(|| self.client_id())
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
    pub fn repairs(&self) -> bool {
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
    fn a_sparkplug_host_sees_every_message_and_names_its_state_topic() {
        let config = parse(&["--ingest", "sparkplug,tasmota"]);
        assert_eq!(config.validate(), Ok(()));
        assert_eq!(config.sparkplug_host_id(), DEFAULT_CLIENT_ID);
        let shared = parse(&[
            "--ingest",
            "sparkplug",
            "--share",
            "g",
            "--client-id",
            "p-1",
        ]);
        let error = shared.validate().expect_err("a shared host");
        assert!(
            error.contains("--share") && error.contains("seq"),
            "{error}"
        );
        let error = parse(&["--sparkplug-host-id", "a/b"])
            .validate()
            .expect_err("a level");
        assert!(error.contains("--sparkplug-host-id"), "{error}");
        assert_eq!(
            parse(&["--sparkplug-host-id", "scada-1"]).sparkplug_host_id(),
            "scada-1"
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
    fn a_nats_cloud_takes_its_nodes_and_refuses_what_it_cannot_do_yet() {
        let config = parse(&["--broker", "nats://a:4222,nats://b:4222"]);
        assert_eq!(config.validate(), Ok(()));
        let nats = config.nats().expect("valid").expect("nats");
        assert_eq!(nats.servers.len(), 2);
        assert_eq!(config.stream_settings().replicas, 3);
        // Its commands and STATE go over NATS.
        assert_eq!(
            parse(&["--broker", "nats://a:4222", "--ingest", "sparkplug"]).validate(),
            Ok(())
        );
        for args in [
            &["--broker", "nats://a:4222", "--port", "4222"][..],
            &[
                "--broker",
                "nats://a:4222",
                "--share",
                "g",
                "--client-id",
                "p-1",
            ],
            &["--broker", "nats://a"],
        ] {
            assert!(parse(args).validate().is_err(), "{args:?}");
        }
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
}
