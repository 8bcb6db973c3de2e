//! The persister as a Sparkplug B primary host application (`--ingest sparkplug`): its
//! `STATE` (`spBv1.0/STATE/<host id>`, retained, `online` on every connect and the last
//! will `offline`, so edge nodes that buffer keep their data while it is away), the
//! [`Host`] that reads the nodes' messages, and the Rebirth commands it asks for.

use std::time::{Duration, Instant};

use iot_core::mqtt::Connection;
use iot_store::sparkplug::{Host, Rebirth, Skipped, NAMESPACE};
use rumqttc::{LastWill, MqttOptions, QoS};

/// How often a gap's reorder timeout is checked.
pub const TICK: Duration = Duration::from_millis(100);

/// The persister's Sparkplug metrics.
pub const METRICS: &[iot_core::ops::Metric] = &[
    iot_core::ops::Metric::counter(
        "iot_persister_sparkplug_rebirths_total",
        "Rebirth commands sent to Sparkplug edge nodes (a seq gap, data without its birth)",
    ),
    iot_core::ops::Metric::counter(
        "iot_persister_sparkplug_skipped_metrics_total",
        "Sparkplug metrics that are no readings (strings, datasets, null, transient, bdSeq, Node Control)",
    ),
    iot_core::ops::Metric::counter(
        "iot_persister_sparkplug_late_deaths_total",
        "Sparkplug deaths of an earlier session than the node's birth, ignored",
    ),
    iot_core::ops::Metric::gauge(
        "iot_persister_sparkplug_nodes",
        "Sparkplug edge nodes the host follows",
    ),
];

/// The host application; see the module documentation.
#[derive(Debug)]
pub struct Sparkplug {
    pub host: Host,
    state_topic: String,
    /// The timestamp of the `STATE` messages of this run, its will's too.
    since: i64,
    reported: Skipped,
}

impl Sparkplug {
    pub fn new(host_id: &str, reorder_timeout: Duration) -> Sparkplug {
        Sparkplug {
            host: Host::new(reorder_timeout),
            state_topic: format!("{NAMESPACE}/STATE/{host_id}"),
            since: chrono::Utc::now().timestamp_millis(),
            reported: Skipped::default(),
        }
    }

    /// `spBv1.0/STATE/<host id>`.
    pub fn state_topic(&self) -> &str {
        &self.state_topic
    }

    /// The `STATE` payload, online or offline, with this run's timestamp.
    pub fn state(&self, online: bool) -> Vec<u8> {
        serde_json::json!({ "online": online, "timestamp": self.since })
            .to_string()
            .into_bytes()
    }

    /// Sets the last will: `STATE` offline, retained.
    pub fn set_will(&self, options: &mut MqttOptions) {
        options.set_last_will(LastWill::new(
            &self.state_topic,
            self.state(false),
            QoS::AtLeastOnce,
            true,
        ));
    }

    /// Publishes `STATE` online or offline, retained.
    pub async fn publish_state(
        &self,
        connection: &mut Connection,
        online: bool,
    ) -> anyhow::Result<()> {
        connection
            .publish(
                &self.state_topic,
                QoS::AtLeastOnce,
                true,
                self.state(online),
            )
            .await
    }

    /// Sends the Rebirths asked while reading messages (data the host could not name).
    pub async fn send_asked(&mut self, connection: &mut Connection) -> anyhow::Result<()> {
        send(connection, self.asked()).await
    }

    /// Sends the Rebirths that are due (a `seq` gap past the reorder timeout, and those
    /// asked) and brings the counters up to date; every [`TICK`].
    pub async fn send_due(&mut self, connection: &mut Connection) -> anyhow::Result<()> {
        let due = self.due();
        send(connection, due).await
    }

    /// The Rebirths asked while reading messages, logged and counted: to send.
    pub fn asked(&mut self) -> Vec<Rebirth> {
        announce(self.host.asked())
    }

    /// The Rebirths that are due, logged and counted, with the counters brought up to
    /// date: to send, every [`TICK`].
    pub fn due(&mut self) -> Vec<Rebirth> {
        let due = self.host.due(Instant::now());
        let skipped = self.host.skipped();
        metrics::counter!("iot_persister_sparkplug_skipped_metrics_total")
            .increment(skipped.metrics - self.reported.metrics);
        metrics::counter!("iot_persister_sparkplug_late_deaths_total")
            .increment(skipped.late_deaths - self.reported.late_deaths);
        self.reported = skipped;
        #[allow(clippy::cast_precision_loss)]
        metrics::gauge!("iot_persister_sparkplug_nodes").set(self.host.nodes() as f64);
        announce(due)
    }
}

/// Logs and counts Rebirth commands about to be sent.
fn announce(rebirths: Vec<Rebirth>) -> Vec<Rebirth> {
    for rebirth in &rebirths {
        tracing::info!(
            node = rebirth.node,
            "Sparkplug Rebirth requested: {}",
            rebirth.why
        );
        metrics::counter!("iot_persister_sparkplug_rebirths_total").increment(1);
    }
    rebirths
}

/// Publishes Rebirth commands at QoS 0, as the specification has commands.
async fn send(connection: &mut Connection, rebirths: Vec<Rebirth>) -> anyhow::Result<()> {
    for rebirth in rebirths {
        connection
            .publish(&rebirth.topic, QoS::AtMostOnce, false, rebirth.payload)
            .await?;
    }
    Ok(())
}
