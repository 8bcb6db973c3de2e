//! The relay's settings: flags with their environment variables, and what follows from
//! them (session names, broker settings).

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use iot_core::bounds::check_id;
pub use iot_core::config::parse_bytes;
use iot_core::config::{parse_duration, BrokerSettings, RelayCloudBroker, RelayLocalBroker};

/// Store-and-forward at the edge: takes every message from the edge broker into an
/// on-disk log, acknowledges it once it is on disk, and forwards it unchanged to the
/// cloud broker; carries replay requests and Sparkplug commands from the cloud to the
/// edge and answers replay requests from its log.
#[derive(Debug, Clone, Parser)]
#[command(name = "edge-relay", version)]
pub struct Config {
    /// This edge site's name, unique among the sites of one cloud broker: the relay's sessions there are edge-relay-SITE and edge-relay-SITE-replay
    #[arg(long, env = "EDGE_SITE", default_value = "edge", value_parser = parse_site)]
    pub site: String,
    /// Folder of the on-disk log, created when missing; on a disk that survives a restart
    #[arg(
        long,
        value_name = "DIR",
        env = "RELAY_LOG_DIR",
        default_value = "relay-log"
    )]
    pub log_dir: PathBuf,
    /// Most disk the log may take, in bytes or with a unit (512M, 20G). Forwarded messages make room first; once it is full of messages not forwarded yet, the relay stops acknowledging the edge broker (which then holds what comes) until the cloud takes some
    #[arg(long, value_name = "BYTES", env = "RELAY_MAX_DISK", default_value = "1G", value_parser = parse_bytes)]
    pub max_disk: u64,
    /// How long forwarded messages are kept, to answer replay requests and to refill a cloud broker that lost its state (30m, 24h, 7d); within --max-disk
    #[arg(long, value_name = "DURATION", env = "RELAY_RETENTION", default_value = "24h", value_parser = parse_duration)]
    pub retention: Duration,
    /// When the cloud broker comes back without the relay's session (it lost what it had not saved yet), what was forwarded this long before the loss is sent again; at least the cloud's autosave_interval (30 s) plus the persister's lag
    #[arg(long, value_name = "DURATION", env = "RELAY_REFILL_WINDOW", default_value = "2m", value_parser = parse_duration)]
    pub refill_window: Duration,
    /// When the cloud broker comes back without the relay's session, how long the relay waits before it forwards anything (the refill and the backlog): the broker lost its subscribers' sessions too, and what it gets before they subscribe again goes to nobody. At least the longest reconnect delay of the cloud's subscribers (30 s for this project's services)
    #[arg(long, value_name = "DURATION", env = "RELAY_REFILL_DELAY", default_value = "30s", value_parser = parse_duration)]
    pub refill_delay: Duration,
    /// Topic filter taken from the edge broker; repeat for several
    #[arg(
        long = "topic",
        value_name = "FILTER",
        env = "RELAY_TOPIC",
        default_value = "#",
        value_delimiter = ','
    )]
    pub topics: Vec<String>,
    /// The edge broker's ACL (the acl file mosquitto/setup.sh renders, or its devices/ folder), read again when it changes: which device account may write a topic and its largest message. A file that cannot be read fails closed (every topic one unknown device account's). Without it, no device account's share or size limit is enforced [default: none]
    #[arg(long, value_name = "FILE", env = "RELAY_ACCOUNTS")]
    pub accounts: Option<PathBuf>,
    /// Most bytes one device account may have in the log not forwarded yet; past it, its messages are acknowledged to the edge broker and not forwarded (counted in iot_relay_refused_total) while the others' go on. What one account's flood can delay the others by: this much forwarded ahead of them
    #[arg(long, value_name = "BYTES", env = "RELAY_ACCOUNT_SHARE", default_value = "32M", value_parser = parse_bytes)]
    pub account_share: u64,
    /// Largest message of a device account whose ACL block names no limit of its own (scripts/add-device --max-message writes one); larger ones are acknowledged and not forwarded (counted in iot_relay_refused_total)
    #[arg(long, value_name = "BYTES", env = "RELAY_MAX_MESSAGE", default_value = "256K", value_parser = parse_bytes)]
    pub max_message: u64,
    /// Serve Prometheus metrics and health checks (/metrics, /health/live, /health/ready) on HOST:PORT, e.g. 0.0.0.0:9469 [default: off]
    #[arg(long, value_name = "HOST:PORT", env = "RELAY_METRICS_ADDRESS", value_parser = iot_core::ops::parse_listen_address)]
    pub metrics_address: Option<String>,
    #[command(flatten)]
    pub local: RelayLocalBroker,
    /// The cloud broker; the relay's second connection (replay requests and Sparkplug commands in) logs in as CLOUD_USERNAME with "-replay" added, with the same password
    #[command(flatten)]
    pub cloud: RelayCloudBroker,
}

/// The longest `--refill-delay`: a cloud without subscribers for longer is down, not
/// restarting.
pub const MAX_REFILL_DELAY: Duration = Duration::from_secs(3600);
/// The longest `--retention` (ten years; more could not be added to a clock).
pub const MAX_RETENTION: Duration = Duration::from_secs(3650 * 86_400);

/// The smallest disk budget: the store's journals alone may take 64 MiB.
pub const MIN_DISK: u64 = 128 * 1024 * 1024;

impl Config {
    /// Checks what one flag's parser cannot.
    pub fn validate(&self) -> Result<(), String> {
        if self.max_disk < MIN_DISK {
            return Err(format!(
                "--max-disk (RELAY_MAX_DISK) is {} bytes: expected at least 128M (the store's journals alone may take 64M)",
                self.max_disk
            ));
        }
        if self.account_share < 4 << 20 || self.account_share > self.max_disk / 2 {
            return Err(format!(
                "--account-share (RELAY_ACCOUNT_SHARE) is {} bytes: expected at least 4M (two of the largest messages) and at most half of --max-disk",
                self.account_share
            ));
        }
        if self.max_message == 0 || self.max_message > 2 << 20 {
            return Err(format!(
                "--max-message (RELAY_MAX_MESSAGE) is {} bytes: expected 1 to 2M (the edge broker's max_packet_size)",
                self.max_message
            ));
        }
        if self.refill_window > self.retention {
            return Err(
                "--refill-window (RELAY_REFILL_WINDOW) is longer than --retention (RELAY_RETENTION): what it sends again must still be kept"
                    .into(),
            );
        }
        if self.refill_delay > MAX_REFILL_DELAY {
            return Err(
                "--refill-delay (RELAY_REFILL_DELAY) is longer than 1h: expected the cloud subscribers' reconnect delay, such as 30s"
                    .into(),
            );
        }
        if self.retention > MAX_RETENTION {
            return Err(
                "--retention (RELAY_RETENTION) is longer than 3650d: expected a duration such as 24h or 7d"
                    .into(),
            );
        }
        if let Some(topic) = self.topics.iter().find(|topic| topic.is_empty()) {
            return Err(format!("--topic (RELAY_TOPIC) {topic:?} is empty"));
        }
        if self.cloud_nats()?.is_some() {
            if let Some(why) = iot_core::nats::site_token_error(&self.site) {
                return Err(format!(
                    "--site (EDGE_SITE) {:?}: {why}; the site names its NATS subject",
                    self.site
                ));
            }
        }
        Ok(())
    }

    /// The NATS JetStream cluster to publish into when `--cloud-broker` holds
    /// `nats://` addresses; `None` for a cloud MQTT broker.
    pub fn cloud_nats(&self) -> Result<Option<iot_core::nats::NatsSettings>, String> {
        self.cloud_broker()
            .nats(self.cloud.port.is_some())
            .map_err(|why| format!("--cloud-broker: {why}"))
    }

    pub fn edge_broker(&self) -> BrokerSettings {
        self.local.clone().into()
    }

    pub fn cloud_broker(&self) -> BrokerSettings {
        self.cloud.clone().into()
    }

    /// The cloud side of the relay's second connection: the same broker, the account
    /// with `-replay` added.
    pub fn cloud_replay_broker(&self) -> BrokerSettings {
        let mut broker = self.cloud_broker();
        broker.username = broker.username.map(|user| format!("{user}-replay"));
        broker
    }

    /// The session on the edge broker (one relay per edge broker).
    pub fn edge_client_id(&self) -> String {
        format!("edge-relay-{}", self.site)
    }

    /// The session that forwards on the cloud broker.
    pub fn cloud_client_id(&self) -> String {
        format!("edge-relay-{}", self.site)
    }

    /// The session that carries requests in from the cloud broker.
    pub fn cloud_replay_client_id(&self) -> String {
        format!("edge-relay-{}-replay", self.site)
    }
}

/// A site name: one topic level's worth of a device id's characters.
fn parse_site(value: &str) -> Result<String, String> {
    check_id("site", value)?;
    if value.len() > 64 || value.contains(char::is_whitespace) {
        return Err("expected at most 64 characters without blanks".into());
    }
    Ok(value.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, String> {
        let mut all = vec!["edge-relay"];
        all.extend_from_slice(args);
        Config::try_parse_from(all)
            .map_err(|error| error.to_string())
            .and_then(|config| config.validate().map(|()| config))
    }

    #[test]
    fn defaults_name_the_sessions_after_the_site() {
        let config = parse(&["--site", "plant-3"]).expect("valid");
        assert_eq!(config.edge_client_id(), "edge-relay-plant-3");
        assert_eq!(config.cloud_replay_client_id(), "edge-relay-plant-3-replay");
        assert_eq!(config.max_disk, 1 << 30);
        assert_eq!(config.topics, ["#"]);
        let config = parse(&[
            "--cloud-username",
            "edge-relay",
            "--cloud-password",
            "s",
            "--local-port",
            "1884",
        ])
        .expect("valid");
        assert_eq!(
            config.cloud_replay_broker().username.as_deref(),
            Some("edge-relay-replay")
        );
        assert_eq!(config.edge_broker().port, 1884);
        assert_eq!(config.cloud_broker().port, 1883);
    }

    #[test]
    fn bad_settings_are_refused() {
        for args in [
            &["--site", "a/b"][..],
            &["--site", ""],
            &["--max-disk", "100M"],
            &["--max-disk", "lots"],
            &["--retention", "1m", "--refill-window", "5m"],
            &["--refill-delay", "2h"],
            &["--account-share", "1M"],
            &["--max-disk", "128M", "--account-share", "65M"],
            &["--max-message", "3M"],
            &["--retention", "100000d"],
            &["--cloud-password", "x"],
            &["--cloud-broker", "nats://a:4222", "--cloud-port", "4222"],
            &["--cloud-broker", "nats://a"],
            &["--cloud-broker", "nats://a:4222", "--site", "plant.1"],
        ] {
            assert!(parse(args).is_err(), "{args:?}");
        }
    }

    #[test]
    fn a_nats_cloud_is_a_list_of_nodes() {
        let config = parse(&["--cloud-broker", "nats://a:4222,nats://b:4223"]).expect("valid");
        let nats = config.cloud_nats().expect("valid").expect("nats");
        assert_eq!(nats.servers, ["nats://a:4222", "nats://b:4223"]);
        assert_eq!(nats.tls_ca, None);
        // A CA file turns TLS on for every node.
        let ca = concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml");
        let config =
            parse(&["--cloud-broker", "nats://a:4222", "--cloud-tls-ca", ca]).expect("valid");
        let nats = config.cloud_nats().expect("valid").expect("nats");
        assert_eq!(nats.tls_ca, Some(ca.into()));
        assert!(nats.address().ends_with("(TLS)"), "{}", nats.address());
        let config = parse(&[]).expect("valid");
        assert!(config.cloud_nats().expect("valid").is_none());
    }

    #[test]
    fn sizes_read_with_binary_units() {
        assert_eq!(parse_bytes("512M"), Ok(512 << 20));
        assert_eq!(parse_bytes("20 GiB"), Ok(20 << 30));
        assert_eq!(parse_bytes("4096"), Ok(4096));
        assert!(parse_bytes("1.5G").is_err());
        assert!(parse_bytes("99999999999T").is_err());
    }
}
