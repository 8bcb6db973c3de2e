//! `device-status`: a device's presence on the edge broker.
//!
//! Registers a last will `offline` (QoS 1, retained) with the broker, publishes `online`
//! (retained) on every connection and every `--interval`, and on Ctrl-C or SIGTERM
//! publishes `offline` itself before disconnecting: a will fires only when a client
//! vanishes, so without that a cleanly stopped device would read `online` forever.
//!
//! `--devices N` keeps N presences, each on a connection of its own (a will belongs to
//! a connection) and on its own topic (`{device}` in `--topic`).

use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use iot_core::config::{parse_positive_seconds, parse_qos, BrokerSettings, LocalBroker};
use iot_core::mqtt::{Connection, Event};
use iot_core::topics;
use rumqttc::{LastWill, QoS};
use sensor_sim::fleet;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

/// Payload while the device runs.
pub const ONLINE: &str = "online";
/// Payload once it stopped or vanished.
pub const OFFLINE: &str = "offline";

/// Device presence: `online` while running, `offline` (retained) once stopped or gone.
#[derive(Debug, Clone, Parser)]
#[command(name = "device-status", version)]
pub struct Config {
    /// Topic of the status messages and of the last will; `{device}` in it gives every
    /// device its own (needed with --devices, e.g. /device/{device}/status)
    #[arg(long, env = "STATUS_TOPIC", default_value = topics::DEVICE_STATUS)]
    pub topic: String,
    /// Quality of service of `online` (the will and the final `offline` are always QoS 1)
    #[arg(long, env = "STATUS_QOS", value_parser = parse_qos, default_value = "1")]
    pub qos: QoS,
    /// Seconds between repeated `online` messages; fractions allowed
    #[arg(long, env = "STATUS_INTERVAL", value_name = "SECONDS", value_parser = parse_positive_seconds, default_value = "30")]
    pub interval: Duration,
    /// MQTT client id [default: device-status-<random>]; with --devices, each device's
    /// connection adds -<device id> to it
    #[arg(long, env = "STATUS_CLIENT_ID")]
    pub client_id: Option<String>,
    /// Number of devices, each with its own connection, last will and topic
    #[arg(long, env = "STATUS_DEVICES", default_value = "1",
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub devices: u32,
    /// Id of the (first) device, for `{device}` in --topic; the others count up its number
    #[arg(long, env = "STATUS_DEVICE", default_value = "device-0001")]
    pub device: String,
    /// Serve Prometheus metrics and health checks (/metrics, /health/live, /health/ready) on HOST:PORT, e.g. 0.0.0.0:9464 [default: off]
    #[arg(long, value_name = "HOST:PORT", env = "STATUS_METRICS_ADDRESS", value_parser = iot_core::ops::parse_listen_address)]
    pub metrics_address: Option<String>,
    #[command(flatten)]
    pub broker: LocalBroker,
}

/// How long a stopping device waits for the broker to take its `offline`.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

impl Config {
    /// Refuses settings that parse but cannot work together; the message names them.
    pub fn validate(&self) -> Result<(), String> {
        if self.devices > 1 && !fleet::has_placeholder(&self.topic) {
            return Err(format!(
                "--devices {} needs {{device}} in --topic (STATUS_TOPIC), e.g. /device/{{device}}/status: on one topic their retained statuses would overwrite each other",
                self.devices
            ));
        }
        Ok(())
    }

    /// Each device's id and status topic (`{device}` in --topic replaced by its id,
    /// for a single device too).
    pub fn device_topics(&self) -> Vec<(String, String)> {
        fleet::device_ids(&self.device, self.devices as usize)
            .into_iter()
            .map(|id| {
                let topic = fleet::device_topic(&self.topic, &id);
                (id, topic)
            })
            .collect()
    }
}

/// Keeps every device's status `online` until `shutdown`, then leaves them `offline`.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let base_id = config
        .client_id
        .clone()
        .unwrap_or_else(|| format!("device-status-{}", sensor_sim::sensor::new_boot_id()));
    let broker = BrokerSettings::from(config.broker.clone());
    let devices = config.device_topics();
    iot_core::ops::serve(config.metrics_address.as_deref(), shutdown.clone(), &[]).await?;
    if let [(_, topic)] = devices.as_slice() {
        return presence(&config, &broker, base_id, topic, config.interval, shutdown).await;
    }
    tracing::info!(
        broker = %broker.address(), devices = devices.len(), topic = config.topic,
        "reporting the status of {} devices, one connection each", devices.len()
    );
    let count = devices.len();
    let mut running = tokio::task::JoinSet::new();
    for (index, (id, topic)) in devices.into_iter().enumerate() {
        // Spread the refreshes over the interval instead of all devices at once.
        let first = config.interval.mul_f64((index + 1) as f64 / count as f64);
        let (config, broker, shutdown) = (config.clone(), broker.clone(), shutdown.clone());
        let client_id = format!("{base_id}-{id}");
        running.spawn(async move {
            presence(&config, &broker, client_id, &topic, first, shutdown).await
        });
    }
    let mut outcome = Ok(());
    while let Some(ended) = running.join_next().await {
        let ended = ended.map_err(anyhow::Error::from).and_then(|result| result);
        if let Err(error) = ended {
            // One device failing (a refused password, say) stops the others cleanly.
            shutdown.cancel();
            if outcome.is_ok() {
                outcome = Err(error);
            }
        }
    }
    outcome
}

/// One device: `online` on every connection and every `--interval` (the first refresh
/// after `first`), `offline` on `shutdown`.
async fn presence(
    config: &Config,
    broker: &BrokerSettings,
    client_id: String,
    topic: &str,
    first: Duration,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let mut options = broker
        .mqtt_options(&client_id, true)
        .context("cannot set up the broker connection")?;
    options.set_last_will(LastWill::new(topic, OFFLINE, QoS::AtLeastOnce, true));
    if config.devices == 1 {
        tracing::info!(broker = %broker.address(), client_id, topic, interval = ?config.interval, "reporting device status");
    }

    let mut connection = Connection::start(broker, options);
    let mut ticks = tokio::time::interval_at(Instant::now() + first, config.interval);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            event = connection.recv() => {
                // After a reconnect the will may have fired meanwhile: say `online` again.
                if let Event::Connected { .. } = event? {
                    connection.publish(topic, config.qos, true, ONLINE.into()).await?;
                    if config.devices == 1 {
                        tracing::info!(topic, "status online");
                    } else {
                        tracing::debug!(topic, "status online");
                    }
                }
            }
            _ = ticks.tick() => {
                connection.publish(topic, config.qos, true, ONLINE.into()).await?;
                tracing::debug!(topic, "status online (refresh)");
            }
        }
    }

    connection
        .publish(topic, QoS::AtLeastOnce, true, OFFLINE.into())
        .await?;
    tracing::info!(topic, "status offline, disconnecting");
    connection.close(STOP_TIMEOUT).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn defaults_are_the_seed_scripts() {
        let config = Config::try_parse_from(["device-status"]).expect("defaults parse");
        assert_eq!(config.topic, "/device/status");
        assert_eq!(config.interval, Duration::from_secs(30));
        assert_eq!(config.qos, QoS::AtLeastOnce);
    }

    #[test]
    fn a_zero_interval_is_refused() {
        assert!(Config::try_parse_from(["device-status", "--interval", "0"]).is_err());
    }

    #[test]
    fn a_fleet_needs_a_topic_per_device() {
        let shared = Config::try_parse_from(["device-status", "--devices", "3"]).expect("parses");
        let error = shared.validate().expect_err("one topic for three wills");
        assert!(error.contains("{device}"), "{error}");
        let own = Config::try_parse_from([
            "device-status",
            "--devices",
            "3",
            "--topic",
            "/device/{device}/status",
        ])
        .expect("parses");
        assert_eq!(own.validate(), Ok(()));
    }

    #[test]
    fn a_single_device_gets_its_id_in_the_topic_too() {
        let config = Config::try_parse_from([
            "device-status",
            "--topic",
            "/device/{device}/status",
            "--device",
            "gateway-02",
        ])
        .expect("parses");
        assert_eq!(
            config.device_topics(),
            [(
                "gateway-02".to_string(),
                "/device/gateway-02/status".to_string()
            )]
        );
        let fleet = Config::try_parse_from([
            "device-status",
            "--devices",
            "2",
            "--topic",
            "/device/{device}/status",
        ])
        .expect("parses");
        let topics: Vec<String> = fleet.device_topics().into_iter().map(|(_, t)| t).collect();
        assert_eq!(
            topics,
            ["/device/device-0001/status", "/device/device-0002/status"]
        );
        let seed = Config::try_parse_from(["device-status"]).expect("parses");
        assert_eq!(seed.device_topics()[0].1, "/device/status");
    }

    #[test]
    fn help_names_the_variables() {
        let help = Config::command().render_long_help().to_string();
        for variable in [
            "STATUS_TOPIC",
            "STATUS_INTERVAL",
            "STATUS_QOS",
            "STATUS_CLIENT_ID",
            "STATUS_DEVICES",
            "STATUS_DEVICE",
            "LOCAL_BROKER",
            "LOCAL_PASSWORD",
        ] {
            assert!(help.contains(variable), "--help lacks {variable}");
        }
    }
}
