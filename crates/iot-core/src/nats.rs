//! The NATS JetStream cloud tier, beside the Mosquitto one: what `edge-relay` and
//! `mongo-persister` share when their cloud address is `nats://…`.
//!
//! One stream ([`STREAM`]) holds every site's messages under `iot.telemetry.<site>`;
//! each message keeps its MQTT topic, QoS and retain flag as headers ([`TOPIC_HEADER`],
//! [`QOS_HEADER`], [`RETAIN_HEADER`]) and carries a `Nats-Msg-Id` made of the site, the
//! run of the relay that wrote it and its number in the log ([`message_id`]), so the stream
//! refuses a copy sent again within its duplicate window. The stream is set up in one
//! place ([`ensure_stream`]), by the persister, the cloud side's own service: a relay at
//! an edge site may publish into it and read its settings, never change them.
//!
//! Requests go the other way, cloud to edge, as core NATS messages (no stream): replay
//! requests and Sparkplug NCMD on `iot.request.<site>.<kind>` ([`request_subject`]),
//! which only that site's relay may read, and the Sparkplug primary host's `STATE` on
//! [`STATE_SUBJECT`], which every relay reads (it is the same for every site, as the
//! retained `spBv1.0/STATE/<host>` is on the cloud Mosquitto). They carry the same
//! headers as telemetry ([`mqtt_headers`]): the relay publishes each on its edge broker
//! as it would one from the cloud Mosquitto. At most once is enough for each: the
//! persister asks again for a hole that stays, the Sparkplug host sends a Rebirth again
//! for data it still cannot name, and it sends its `STATE` again every
//! [`STATE_EVERY`]; a relay that hears none for [`STATE_TIMEOUT`] while connected
//! publishes the host's `STATE` offline at the edge, as the MQTT host's last will
//! would be.

use std::time::Duration;

use anyhow::Context;
use async_nats::jetstream;
use async_nats::jetstream::stream::{DiscardPolicy, RetentionPolicy, StorageType};

/// The stream of every site's messages.
pub const STREAM: &str = "IOT_TELEMETRY";
/// Subjects of the stream: a site publishes on `iot.telemetry.<site>`.
pub const SUBJECT_PREFIX: &str = "iot.telemetry";
/// The durable pull consumer every persister replica reads: one name, so replicas
/// share it (each message goes to one of them) rather than each reading everything.
pub const CONSUMER: &str = "mongo-persister";
/// The MQTT topic a message was published on (percent-encoded: [`encode_topic`]).
pub const TOPIC_HEADER: &str = "Mqtt-Topic";
/// The QoS it was published at, `0`, `1` or `2`.
pub const QOS_HEADER: &str = "Mqtt-Qos";
/// `1` when it was published retained.
pub const RETAIN_HEADER: &str = "Mqtt-Retain";

/// Cloud-to-edge requests of a site: `iot.request.<site>.<kind>`.
pub const REQUEST_PREFIX: &str = "iot.request";
/// The Sparkplug primary host's `STATE`, for every site.
pub const STATE_SUBJECT: &str = "iot.state";
/// How often the persister publishes its Sparkplug `STATE` online again over NATS.
pub const STATE_EVERY: Duration = Duration::from_secs(10);
/// How long a relay, connected, waits for the next `STATE` before it takes the host
/// for gone (three of [`STATE_EVERY`] and a margin).
pub const STATE_TIMEOUT: Duration = Duration::from_secs(35);

/// Whether a cloud address names a NATS cluster rather than an MQTT broker's host.
pub fn is_nats(address: &str) -> bool {
    address.trim_start().starts_with("nats://")
}

/// The subject a site publishes on.
pub fn site_subject(site: &str) -> String {
    format!("{SUBJECT_PREFIX}.{site}")
}

/// The subject of the requests of `kind` (`replay`, `ncmd`) to `site`.
pub fn request_subject(site: &str, kind: &str) -> String {
    format!("{REQUEST_PREFIX}.{site}.{kind}")
}

/// Every request subject of `site`, as its relay subscribes.
pub fn site_requests(site: &str) -> String {
    format!("{REQUEST_PREFIX}.{site}.>")
}

/// The site of a telemetry subject `iot.telemetry.<site>`.
pub fn site_of_subject(subject: &str) -> Option<&str> {
    let site = subject.strip_prefix(SUBJECT_PREFIX)?.strip_prefix('.')?;
    (!site.is_empty() && site_token_error(site).is_none()).then_some(site)
}

/// An MQTT message's topic, QoS and retain flag as headers.
pub fn mqtt_headers(topic: &str, qos: u8, retain: bool) -> async_nats::HeaderMap {
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(TOPIC_HEADER, encode_topic(topic).as_str());
    headers.insert(QOS_HEADER, qos.to_string().as_str());
    if retain {
        headers.insert(RETAIN_HEADER, "1");
    }
    headers
}

/// What [`mqtt_headers`] wrote: the topic, the QoS (0 to 2) and the retain flag;
/// `None` without a readable topic. A QoS that is missing or not 0 to 2 is 0.
pub fn mqtt_of_headers(headers: Option<&async_nats::HeaderMap>) -> Option<(String, u8, bool)> {
    let headers = headers?;
    let topic = decode_topic(headers.get(TOPIC_HEADER)?.as_str())?;
    let qos = headers
        .get(QOS_HEADER)
        .and_then(|value| value.as_str().parse::<u8>().ok())
        .filter(|qos| *qos <= 2)
        .unwrap_or(0);
    let retain = headers
        .get(RETAIN_HEADER)
        .is_some_and(|value| value.as_str() == "1");
    Some((topic, qos, retain))
}

/// Why `site` cannot be a subject token (NATS splits subjects on `.`, and `*`, `>` and
/// blanks are wildcards or separators); `None` when it can.
pub fn site_token_error(site: &str) -> Option<String> {
    site.chars()
        .find(|c| matches!(c, '.' | '*' | '>') || c.is_whitespace())
        .map(|c| format!("{c:?} cannot be in a NATS subject token"))
}

/// The `Nats-Msg-Id` of message `number` of a relay log at `site`, written in the
/// relay's run `run` (an id made at random at each start: numbers given again, by a
/// log moved aside, restored from a copy or cut short, come under another run, so they
/// never repeat an id the stream or the database may still remember).
pub fn message_id(site: &str, run: &str, number: u64) -> String {
    format!("{site}:{run}:{number}")
}

/// A topic as a header value: `%`, control characters and blanks percent-encoded (a
/// header value is one line, and its blanks at either end would be trimmed).
pub fn encode_topic(topic: &str) -> String {
    let mut encoded = String::with_capacity(topic.len());
    for c in topic.chars() {
        if c == '%' || c == ' ' || c.is_control() {
            let mut bytes = [0; 4];
            for byte in c.encode_utf8(&mut bytes).bytes() {
                encoded.push_str(&format!("%{byte:02X}"));
            }
        } else {
            encoded.push(c);
        }
    }
    encoded
}

/// What [`encode_topic`] wrote; `None` for a value it cannot have written.
pub fn decode_topic(value: &str) -> Option<String> {
    let bytes = value.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut at = 0;
    while at < bytes.len() {
        if bytes[at] == b'%' {
            let hex = std::str::from_utf8(bytes.get(at + 1..at + 3)?).ok()?;
            decoded.push(u8::from_str_radix(hex, 16).ok()?);
            at += 3;
        } else {
            decoded.push(bytes[at]);
            at += 1;
        }
    }
    String::from_utf8(decoded).ok()
}

/// Where and as whom to connect to a NATS cluster.
#[derive(Clone)]
pub struct NatsSettings {
    /// `nats://host:port` of each node (the client also learns the others from them).
    pub servers: Vec<String>,
    pub username: Option<String>,
    pub password: Option<String>,
    /// The CA certificate (PEM) that signed the nodes' certificates: with it the client
    /// speaks TLS only, and verifies each node's name against its certificate.
    pub tls_ca: Option<std::path::PathBuf>,
}

impl std::fmt::Debug for NatsSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsSettings")
            .field("servers", &self.servers)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("tls_ca", &self.tls_ca)
            .finish()
    }
}

impl NatsSettings {
    /// `nats://h1:4222,nats://h2:4222` (commas, as the variable holds it) with the
    /// account; a one-line reason when an address is not `nats://HOST:PORT`.
    pub fn parse(
        addresses: &str,
        username: Option<String>,
        password: Option<String>,
    ) -> Result<Self, String> {
        let mut servers = Vec::new();
        for address in addresses.split(',').map(str::trim) {
            let rest = address
                .strip_prefix("nats://")
                .ok_or_else(|| format!("{address:?} is not a nats://HOST:PORT address"))?;
            let (host, port) = rest
                .rsplit_once(':')
                .ok_or_else(|| format!("{address:?} has no port (nats://HOST:PORT)"))?;
            if host.is_empty() || host.contains(['/', '@']) || port.parse::<u16>().is_err() {
                return Err(format!(
                    "{address:?} is not a nats://HOST:PORT address (credentials go in the user name and password settings)"
                ));
            }
            servers.push(address.to_string());
        }
        Ok(Self {
            servers,
            username,
            password,
            tls_ca: None,
        })
    }

    /// With TLS to every node, verified against the CA certificate in `ca` (PEM).
    #[must_use]
    pub fn with_tls_ca(mut self, ca: Option<std::path::PathBuf>) -> Self {
        self.tls_ca = ca;
        self
    }

    /// The servers as given, for log lines (never the password), with `(TLS)` when on.
    pub fn address(&self) -> String {
        let tls = if self.tls_ca.is_some() { " (TLS)" } else { "" };
        format!("{}{tls}", self.servers.join(","))
    }

    /// Connects as `name` (shown by the server's monitoring). Returns at once: the
    /// client connects, and reconnects to any node of the cluster, in the background,
    /// for ever; what is sent meanwhile waits in it. Replies come to an inbox under
    /// `_INBOX.<user>`, so the account's permissions can give each user only its own.
    pub async fn connect(&self, name: &str) -> anyhow::Result<async_nats::Client> {
        let mut options = async_nats::ConnectOptions::new()
            .name(name)
            .retry_on_initial_connect()
            .event_callback(|event| async move {
                match event {
                    async_nats::Event::Connected => {
                        metrics::gauge!(CONNECTED_METRIC).set(1.0);
                        tracing::info!("connected to NATS");
                    }
                    async_nats::Event::Disconnected => {
                        metrics::gauge!(CONNECTED_METRIC).set(0.0);
                        tracing::warn!("disconnected from NATS; reconnecting");
                    }
                    other => tracing::warn!("NATS: {other}"),
                }
            });
        if let Some(user) = &self.username {
            options = options
                .user_and_password(user.clone(), self.password.clone().unwrap_or_default())
                .custom_inbox_prefix(inbox_prefix(user));
        }
        if let Some(ca) = &self.tls_ca {
            // Read here, so that a missing or unreadable file is one clear error at
            // start rather than a reconnect loop.
            std::fs::metadata(ca)
                .with_context(|| format!("cannot read the NATS CA certificate {}", ca.display()))?;
            options = options.add_root_certificates(ca.clone()).require_tls(true);
        }
        options
            .connect(self.servers.as_slice())
            .await
            .with_context(|| format!("cannot set up the NATS connection to {}", self.address()))
    }
}

/// The gauge that is 1 while a service is connected to a node of the cluster.
pub const CONNECTED_METRIC: &str = "iot_nats_connected";

/// [`CONNECTED_METRIC`] as a service on NATS describes it.
pub const CONNECTED: crate::ops::Metric = crate::ops::Metric::gauge(
    CONNECTED_METRIC,
    "1 while connected to a node of the NATS cluster, else 0",
);

/// Failures in a row, on a connection that stands, after which a client tries another
/// node ([`try_another_node`]).
pub const FAILURES_BEFORE_ANOTHER_NODE: u32 = 3;

/// Reconnects `client`, to a node picked at random among those it knows: a node cut off
/// from the others (its routes down) keeps its clients connected yet answers none of
/// their JetStream requests, and the client would not leave it by itself. Called after
/// [`FAILURES_BEFORE_ANOTHER_NODE`] failures in a row; in the background.
pub fn try_another_node(client: &async_nats::Client) {
    if client.connection_state() != async_nats::connection::State::Connected {
        return; // already reconnecting
    }
    tracing::warn!(
        "the NATS node this client is connected to fails every request: connecting to another"
    );
    let client = client.clone();
    tokio::spawn(async move {
        if let Err(error) = client.force_reconnect().await {
            tracing::debug!("reconnecting to another NATS node: {error}");
        }
    });
}

/// How long a stop waits for what a client buffered to reach NATS.
const FLUSH_ON_STOP: Duration = Duration::from_secs(2);

/// Flushes what `client` buffered before a stop, for at most [`FLUSH_ON_STOP`]: with no
/// node reachable a flush waits for a reconnect that may never come, and held a
/// persister's SIGTERM for good. What it had not sent is sent again by whoever needs it
/// (a relay's publishes from its mark; the host's STATE every 10 s).
pub async fn flush_before_stop(client: &async_nats::Client) {
    if tokio::time::timeout(FLUSH_ON_STOP, client.flush())
        .await
        .is_err()
    {
        tracing::info!("stopping without flushing to NATS: no node answers");
    }
}

/// The inbox prefix of `user`'s replies: `_INBOX.<user>`.
pub fn inbox_prefix(user: &str) -> String {
    format!("_INBOX.{user}")
}

/// The stream's limits; see [`ensure_stream`].
#[derive(Debug, Clone, Copy)]
pub struct StreamSettings {
    /// Most bytes the stream holds; past it new messages are refused (`discard new`),
    /// and the relays keep them on their disks.
    pub max_bytes: i64,
    /// A message older than this is removed even if no persister stored it.
    pub max_age: Duration,
    /// How long the stream remembers a `Nats-Msg-Id`: a copy within it is refused. At
    /// least the relays' `--refill-window`.
    pub duplicate_window: Duration,
    pub replicas: usize,
}

impl Default for StreamSettings {
    fn default() -> Self {
        Self {
            max_bytes: 1 << 30,
            max_age: Duration::from_secs(7 * 86_400),
            duplicate_window: Duration::from_secs(120),
            replicas: 3,
        }
    }
}

/// Whether nats-server `version` holds a stream's `max_bytes` with `discard new` by
/// refusing new messages only. Before 2.10.5 it checks a message against the limit
/// without its record's overhead, takes it, finds the stream past the limit and removes
/// its oldest messages to make room (nats-io/nats-server#4775): a publish at the limit
/// costs a message no persister has stored. (Its account limit, `max_file`, is no way
/// around it: each replica checks it again after storing a message, against its own
/// view of the other nodes' usage, and removes the message when past it, so that the
/// replicas differ and the consumer passes over messages the stream still holds.)
pub fn holds_max_bytes(version: &str) -> bool {
    let mut parts = version
        .split(|c: char| !c.is_ascii_digit())
        .map(|part| part.parse::<u64>().unwrap_or(0));
    let mut next = || parts.next().unwrap_or(0);
    (next(), next(), next()) >= (2, 10, 5)
}

/// Creates the stream, or updates it to `settings`: idempotent, so every persister
/// replica runs it at start. Work-queue retention: a message stays until a persister
/// acknowledges it (after the write that holds it), so the stream's bytes are the
/// cloud's backlog, and a full stream refuses new messages rather than dropping old ones
/// (but on servers before 2.10.5: [`holds_max_bytes`]).
pub async fn ensure_stream(
    js: &jetstream::Context,
    settings: &StreamSettings,
) -> anyhow::Result<jetstream::stream::Info> {
    let config = jetstream::stream::Config {
        name: STREAM.to_string(),
        subjects: vec![format!("{SUBJECT_PREFIX}.>")],
        retention: RetentionPolicy::WorkQueue,
        storage: StorageType::File,
        num_replicas: settings.replicas,
        max_bytes: settings.max_bytes,
        max_age: settings.max_age,
        discard: DiscardPolicy::New,
        duplicate_window: settings.duplicate_window,
        ..Default::default()
    };
    js.create_or_update_stream(config)
        .await
        .with_context(|| format!("cannot create or update the NATS stream {STREAM}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_servers_that_hold_max_bytes_get_it() {
        for version in ["2.9.10", "2.9.25", "2.10.0", "2.10.4", "1.4.1", "", "x"] {
            assert!(!holds_max_bytes(version), "{version}");
        }
        for version in ["2.10.5", "2.10.14", "2.11.0", "2.12.0-RC.1", "3.0.0"] {
            assert!(holds_max_bytes(version), "{version}");
        }
    }

    #[test]
    fn topics_survive_the_header() {
        for topic in [
            "/sensor/temperature",
            "a b",
            " lead",
            "100%",
            "line\r\nbreak",
            "zigbee2mqtt/Küche",
            "",
        ] {
            let encoded = encode_topic(topic);
            assert!(!encoded.contains([' ', '\r', '\n']), "{encoded:?}");
            assert_eq!(decode_topic(&encoded).as_deref(), Some(topic));
        }
        assert_eq!(encode_topic("/sensor/pressure"), "/sensor/pressure");
        assert_eq!(decode_topic("%4"), None);
    }

    #[test]
    fn addresses_are_nats_urls_with_ports() {
        let settings =
            NatsSettings::parse("nats://a:4222, nats://b:4223", None, None).expect("two servers");
        assert_eq!(settings.servers, ["nats://a:4222", "nats://b:4223"]);
        for bad in [
            "a:4222",
            "nats://a",
            "nats://:4222",
            "nats://u:p@a:4222",
            "nats://a:x",
        ] {
            assert!(NatsSettings::parse(bad, None, None).is_err(), "{bad}");
        }
        assert!(is_nats("nats://a:1") && !is_nats("localhost"));
    }

    #[test]
    fn sites_must_be_one_subject_token() {
        assert_eq!(site_token_error("plant-1"), None);
        assert!(site_token_error("plant.1").is_some());
        assert!(site_token_error("a>").is_some());
        assert_eq!(site_subject("plant-1"), "iot.telemetry.plant-1");
        assert_eq!(message_id("s", "ab12", 7), "s:ab12:7");
        assert_eq!(site_of_subject("iot.telemetry.plant-1"), Some("plant-1"));
        assert_eq!(site_of_subject("iot.telemetry."), None);
        assert_eq!(site_of_subject("iot.telemetry.a.b"), None);
        assert_eq!(site_of_subject("iot.request.a"), None);
        assert_eq!(
            request_subject("plant-1", "replay"),
            "iot.request.plant-1.replay"
        );
        assert_eq!(site_requests("plant-1"), "iot.request.plant-1.>");
    }

    #[test]
    fn mqtt_headers_come_back_as_written() {
        let headers = mqtt_headers("spBv1.0/STATE/h 1", 1, true);
        assert_eq!(
            mqtt_of_headers(Some(&headers)),
            Some(("spBv1.0/STATE/h 1".to_string(), 1, true))
        );
        let headers = mqtt_headers("/replay/d/request", 0, false);
        assert_eq!(
            mqtt_of_headers(Some(&headers)),
            Some(("/replay/d/request".to_string(), 0, false))
        );
        assert_eq!(mqtt_of_headers(None), None);
        assert_eq!(mqtt_of_headers(Some(&async_nats::HeaderMap::new())), None);
    }
}
