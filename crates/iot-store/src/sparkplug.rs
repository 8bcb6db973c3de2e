//! A Sparkplug B 3.0 host application's reading of its edge nodes (`--ingest
//! sparkplug`): [`Host`] keeps what each node's and device's birth defined (metric
//! names, aliases, datatypes) and turns every message into what the persister stores:
//!
//! - `NBIRTH`/`DBIRTH`: the node or device is online (a status change), its metrics are
//!   learned and their values stored; `NDATA`/`DDATA`: values, by name or by alias.
//! - `NDEATH`: the node and its devices are offline, when its `bdSeq` is the one of the
//!   node's current birth (a late death of an earlier session changes nothing);
//!   `DDEATH`: the device is offline.
//! - Each numeric or boolean metric is one reading: device `<group>/<node>[/<device>]`,
//!   measurement the metric's name, its own timestamp (historical ones too), keyed
//!   `{device, measurement, ts, value}` so a node that sends its history again is not
//!   stored twice. Strings, dates, bytes, arrays, datasets, templates, null and transient
//!   metrics, and `bdSeq` and `Node Control/*` are not readings; they are counted.
//! - A message the host cannot read whole (not a Sparkplug payload, data of a node or
//!   device without a birth, an alias no birth defined) is stored flagged, raw.
//!
//! Repair is Sparkplug's own: a node's `seq` (0–255, one more per message) that skips
//! for longer than the reorder timeout, or data the host cannot name, gets the Rebirth
//! command (`NCMD` `Node Control/Rebirth`), at most once per timeout per node
//! ([`Host::due`]). Every table is bounded ([`MAX_NODES`], [`MAX_DEVICES`],
//! [`MAX_METRICS`], [`MAX_KNOWN_METRICS`]), and what one edge node id (the account the
//! broker binds it to) may take of them ([`MAX_GROUPS`], [`MAX_NODE_METRICS`]).

pub mod proto;

use std::borrow::Cow;
use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use bson::{doc, oid::ObjectId, Bson};
use chrono::{DateTime, Utc};
use iot_core::bounds::{check_id, check_name};
use prost::Message as _;

use crate::record::{unparsed, Record};
use proto::{DataType, Metric, Payload};

/// The topic namespace of Sparkplug B.
pub const NAMESPACE: &str = "spBv1.0";

/// The most metrics one message may hold; a message with more is flagged.
pub const MAX_METRICS: usize = 10_000;
/// The most edge nodes the host follows; a birth of one more is flagged.
pub const MAX_NODES: usize = 10_000;
/// The most devices of one edge node.
pub const MAX_DEVICES: usize = 1_000;
/// The most metric definitions kept from all births together (about 100 bytes and the
/// name each).
pub const MAX_KNOWN_METRICS: usize = 1_000_000;
/// The most groups one edge node id (one device account) is followed in.
pub const MAX_GROUPS: usize = 16;
/// The most metric definitions of one edge node id, its groups and devices together:
/// one account alone cannot fill [`MAX_KNOWN_METRICS`].
pub const MAX_NODE_METRICS: usize = 100_000;
/// The latest metric time taken as one: 9999-12-31T23:59:59.999Z, in ms.
const MAX_TS: u64 = 253_402_300_799_999;

/// The metric a Rebirth command sets.
pub const REBIRTH_METRIC: &str = "Node Control/Rebirth";

/// The message types of an edge node's topics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageType {
    NBirth,
    NData,
    NDeath,
    DBirth,
    DData,
    DDeath,
    /// Commands and the host's own state: for the nodes, not stored.
    Command,
}

/// A Sparkplug topic: `spBv1.0/<group>/<type>/<node>[/<device>]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Topic<'a> {
    pub group: &'a str,
    pub kind: MessageType,
    pub node: &'a str,
    pub device: Option<&'a str>,
}

impl<'a> Topic<'a> {
    /// The topic's parts, or why it is not a Sparkplug B topic.
    pub fn parse(topic: &'a str) -> Result<Topic<'a>, String> {
        let levels: Vec<&str> = topic.split('/').collect();
        if levels.first() != Some(&NAMESPACE) {
            return Err(format!("not in the {NAMESPACE} namespace"));
        }
        if levels.get(1) == Some(&"STATE") {
            return Ok(Topic {
                group: "",
                kind: MessageType::Command,
                node: "",
                device: None,
            });
        }
        let (kind, device_level) = match levels.get(2).copied() {
            Some("NBIRTH") => (MessageType::NBirth, false),
            Some("NDATA") => (MessageType::NData, false),
            Some("NDEATH") => (MessageType::NDeath, false),
            Some("DBIRTH") => (MessageType::DBirth, true),
            Some("DDATA") => (MessageType::DData, true),
            Some("DDEATH") => (MessageType::DDeath, true),
            Some("NCMD") => (MessageType::Command, false),
            Some("DCMD") => (MessageType::Command, true),
            Some(other) => return Err(format!("{other:.32} is not a Sparkplug message type")),
            None => return Err("no message type".into()),
        };
        let expected = if device_level { 5 } else { 4 };
        if levels.len() != expected {
            return Err(format!(
                "a {} topic has {expected} levels, this one {}",
                levels[2],
                levels.len()
            ));
        }
        for (what, level) in [("group", levels[1]), ("edge node", levels[3])]
            .into_iter()
            .chain(levels.get(4).map(|device| ("device", *device)))
        {
            check_id(what, level)?;
        }
        let topic = Topic {
            group: levels[1],
            kind,
            node: levels[3],
            device: levels.get(4).copied(),
        };
        check_name("device", &topic.stored_device())?;
        Ok(topic)
    }

    /// The node as the host names it: `<group>/<node>`.
    pub fn node_key(&self) -> String {
        format!("{}/{}", self.group, self.node)
    }

    /// The device readings are stored under: `<group>/<node>[/<device>]`.
    pub fn stored_device(&self) -> String {
        match self.device {
            Some(device) => format!("{}/{}/{device}", self.group, self.node),
            None => self.node_key(),
        }
    }
}

/// A Rebirth command to publish: `NCMD` to one edge node.
#[derive(Debug, Clone, PartialEq)]
pub struct Rebirth {
    /// `<group>/<node>`.
    pub node: String,
    pub topic: String,
    pub payload: Vec<u8>,
    /// Why it is asked, for the log.
    pub why: String,
}

impl Rebirth {
    fn new(node: &str, why: String) -> Rebirth {
        let (group, edge_node) = node.split_once('/').unwrap_or((node, ""));
        let now = u64::try_from(Utc::now().timestamp_millis()).unwrap_or_default();
        let payload = Payload {
            timestamp: Some(now),
            metrics: vec![Metric {
                name: Some(REBIRTH_METRIC.to_string()),
                timestamp: Some(now),
                datatype: Some(DataType::Boolean.number()),
                value: Some(proto::metric::Value::BooleanValue(true)),
                ..Metric::default()
            }],
            ..Payload::default()
        };
        Rebirth {
            node: node.to_string(),
            topic: format!("{NAMESPACE}/{group}/NCMD/{edge_node}"),
            payload: payload.encode_to_vec(),
            why,
        }
    }
}

/// The metrics one birth defined.
#[derive(Debug, Default)]
struct Metrics {
    by_name: HashMap<String, DataType>,
    by_alias: HashMap<u64, (String, DataType)>,
}

impl Metrics {
    /// The definitions of a birth's metrics; why not, when one has no name or
    /// datatype, or two share an alias.
    fn learn(metrics: &[Metric]) -> Result<Metrics, String> {
        let mut learned = Metrics::default();
        for metric in metrics {
            let name = metric.name.as_deref().ok_or("a birth metric has no name")?;
            check_name("metric name", name)?;
            let datatype = DataType::from_number(
                metric
                    .datatype
                    .ok_or_else(|| format!("birth metric {name:.128} has no datatype"))?,
            );
            if let Some(alias) = metric.alias {
                if learned
                    .by_alias
                    .insert(alias, (name.to_string(), datatype))
                    .is_some()
                {
                    return Err(format!("alias {alias} is given to two metrics"));
                }
            }
            learned.by_name.insert(name.to_string(), datatype);
        }
        Ok(learned)
    }

    fn len(&self) -> usize {
        self.by_name.len()
    }

    /// A data metric's name and datatype, by its name or its alias.
    fn resolve<'m>(&'m self, metric: &'m Metric) -> Option<(&'m str, DataType)> {
        match (&metric.name, metric.alias) {
            (Some(name), _) => self
                .by_name
                .get(name)
                .map(|datatype| (name.as_str(), *datatype)),
            (None, Some(alias)) => self
                .by_alias
                .get(&alias)
                .map(|(name, datatype)| (name.as_str(), *datatype)),
            (None, None) => None,
        }
    }
}

#[derive(Debug, Default)]
struct Device {
    online: bool,
    /// None until its birth (again, after a node's new birth).
    metrics: Option<Metrics>,
}

/// What the host knows of one edge node.
#[derive(Debug, Default)]
struct Node {
    online: bool,
    /// The `bdSeq` of its current birth.
    bd_seq: Option<u64>,
    /// None until its birth.
    metrics: Option<Metrics>,
    devices: HashMap<String, Device>,
    /// The `seq` the next message should have.
    expected: Option<u8>,
    /// The numbers skipped and not (yet) seen, since `gap_since`.
    missing: BTreeSet<u8>,
    gap_since: Option<Instant>,
    /// When a Rebirth was last asked.
    rebirth_at: Option<Instant>,
    last_seen: Option<Instant>,
}

impl Node {
    fn known_metrics(&self) -> usize {
        self.metrics.as_ref().map_or(0, Metrics::len)
            + self
                .devices
                .values()
                .filter_map(|device| device.metrics.as_ref())
                .map(Metrics::len)
                .sum::<usize>()
    }

    /// Follows `seq`: a number ahead of the expected one leaves the ones between
    /// missing until they come (reordered) or the reorder timeout asks a Rebirth.
    fn follow(&mut self, seq: Option<u64>, now: Instant) {
        let Some(seq) = seq.and_then(|seq| u8::try_from(seq).ok()) else {
            return;
        };
        if self.missing.remove(&seq) {
            if self.missing.is_empty() {
                self.gap_since = None;
            }
            return;
        }
        if let Some(expected) = self.expected {
            let mut skipped = expected;
            while skipped != seq && self.missing.len() < 255 {
                self.missing.insert(skipped);
                skipped = skipped.wrapping_add(1);
            }
            if !self.missing.is_empty() {
                self.gap_since.get_or_insert(now);
            }
        }
        self.expected = Some(seq.wrapping_add(1));
    }
}

/// Counts of what the host did not store as readings, for the persister's metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Skipped {
    /// Metrics of a type that is no measurement, null, transient, or protocol metrics.
    pub metrics: u64,
    /// Deaths of an earlier session than the node's current birth.
    pub late_deaths: u64,
}

/// The Sparkplug host's state; see the module documentation.
#[derive(Debug)]
pub struct Host {
    nodes: HashMap<String, Node>,
    reorder_timeout: Duration,
    /// Rebirths asked since [`Host::due`] was last called.
    asked: Vec<Rebirth>,
    known_metrics: usize,
    /// What each edge node id takes of the tables, by id.
    usage: HashMap<String, Usage>,
    skipped: Skipped,
}

/// The groups and metric definitions of one edge node id.
#[derive(Debug, Default, Clone, Copy)]
struct Usage {
    groups: usize,
    metrics: usize,
}

impl Host {
    pub fn new(reorder_timeout: Duration) -> Host {
        Host {
            nodes: HashMap::new(),
            reorder_timeout,
            asked: Vec::new(),
            known_metrics: 0,
            usage: HashMap::new(),
            skipped: Skipped::default(),
        }
    }

    /// What skipped so far.
    pub fn skipped(&self) -> Skipped {
        self.skipped
    }

    /// The edge nodes followed.
    pub fn nodes(&self) -> usize {
        self.nodes.len()
    }

    /// What a message of the namespace becomes, at `now` (for the reorder timeout).
    pub fn read(
        &mut self,
        topic: &str,
        payload: &[u8],
        received_at: DateTime<Utc>,
        now: Instant,
    ) -> Record {
        let received = bson::DateTime::from_chrono(received_at);
        let flag = |why: &str| Record::Unparsed {
            document: unparsed(topic, payload, received, why),
        };
        let parts = match Topic::parse(topic) {
            Ok(parts) => parts,
            Err(why) => return flag(&format!("not a Sparkplug B topic: {why}")),
        };
        if parts.kind == MessageType::Command {
            return Record::Nothing {
                why: Cow::Borrowed("a Sparkplug command or host state"),
            };
        }
        let decoded = match Payload::decode(payload) {
            Ok(decoded) => decoded,
            Err(error) => return flag(&format!("not a Sparkplug B payload: {error}")),
        };
        if decoded.metrics.len() > MAX_METRICS {
            return flag(&format!(
                "{} metrics in one message, more than {MAX_METRICS}",
                decoded.metrics.len()
            ));
        }
        let message = Message {
            topic,
            parts,
            payload: &decoded,
            received,
        };
        match self.take(&message, now) {
            Ok(record) => record,
            Err(why) => flag(&why),
        }
    }

    /// The Rebirths asked since the last call, for messages the host could not name:
    /// cheap, for after every message.
    pub fn asked(&mut self) -> Vec<Rebirth> {
        std::mem::take(&mut self.asked)
    }

    /// The Rebirths to send now: those [`Host::asked`], and one for each node whose
    /// `seq` gap outlasted the reorder timeout; each node at most once per timeout.
    /// Looks at every node: for a timer, not for every message.
    pub fn due(&mut self, now: Instant) -> Vec<Rebirth> {
        let timeout = self.reorder_timeout;
        let mut due = self.asked();
        for (key, node) in &mut self.nodes {
            let Some(since) = node.gap_since else {
                continue;
            };
            if now.duration_since(since) < timeout || !may_ask(node, now, timeout) {
                continue;
            }
            let missing = node.missing.len();
            node.missing.clear();
            node.gap_since = None;
            node.rebirth_at = Some(now);
            due.push(Rebirth::new(
                key,
                format!("{missing} seq number(s) missing for {timeout:?}"),
            ));
        }
        due
    }

    /// Asks `node` for a Rebirth, unless one was asked within the reorder timeout.
    fn ask(&mut self, key: &str, now: Instant, why: String) {
        let timeout = self.reorder_timeout;
        if let Some(node) = self.nodes.get_mut(key) {
            if !may_ask(node, now, timeout) {
                return;
            }
            node.rebirth_at = Some(now);
        } else if !self.may_add(key) || !self.make_room() {
            return;
        } else {
            self.add(
                key,
                Node {
                    rebirth_at: Some(now),
                    last_seen: Some(now),
                    ..Node::default()
                },
            );
        }
        self.asked.push(Rebirth::new(key, why));
    }

    /// Room for one more node: an offline one seen longest ago goes when the table is
    /// full; false when every node is online.
    fn make_room(&mut self) -> bool {
        if self.nodes.len() < MAX_NODES {
            return true;
        }
        let oldest = self
            .nodes
            .iter()
            .filter(|(_, node)| !node.online)
            .min_by_key(|(_, node)| node.last_seen)
            .map(|(key, _)| key.clone());
        let Some((key, node)) = oldest.and_then(|key| self.nodes.remove_entry(&key)) else {
            return false;
        };
        let known = node.known_metrics();
        release(
            &mut self.usage,
            &mut self.known_metrics,
            node_id(&key),
            known,
        );
        if let Some(usage) = self.usage.get_mut(node_id(&key)) {
            usage.groups -= 1;
            if usage.groups == 0 {
                self.usage.remove(node_id(&key));
            }
        }
        true
    }

    /// Follows a new node.
    fn add(&mut self, key: &str, node: Node) {
        self.usage
            .entry(node_id(key).to_string())
            .or_default()
            .groups += 1;
        self.nodes.insert(key.to_string(), node);
    }

    /// Whether one more group of `key`'s edge node id may be followed.
    fn may_add(&self, key: &str) -> bool {
        self.usage.get(node_id(key)).map_or(0, |usage| usage.groups) < MAX_GROUPS
    }

    fn take(&mut self, message: &Message<'_>, now: Instant) -> Result<Record, String> {
        let key = message.parts.node_key();
        if let Some(node) = self.nodes.get_mut(&key) {
            node.last_seen = Some(now);
            if message.parts.kind != MessageType::NDeath {
                node.follow(message.payload.seq, now);
            }
        }
        match message.parts.kind {
            MessageType::NBirth => self.node_birth(&key, message, now),
            MessageType::NDeath => Ok(self.node_death(&key, message)),
            MessageType::DBirth => self.device_birth(&key, message, now),
            MessageType::DDeath => self.device_death(&key, message, now),
            MessageType::NData | MessageType::DData => self.data(&key, message, now),
            MessageType::Command => unreachable!("commands are not taken"),
        }
    }

    fn node_birth(
        &mut self,
        key: &str,
        message: &Message<'_>,
        now: Instant,
    ) -> Result<Record, String> {
        let metrics = Metrics::learn(&message.payload.metrics)?;
        if !self.nodes.contains_key(key) {
            if !self.may_add(key) {
                return Err(format!(
                    "edge node {} is in {MAX_GROUPS} groups already, the most this host follows",
                    message.parts.node
                ));
            }
            if !self.make_room() {
                return Err(format!(
                    "{MAX_NODES} edge nodes are online already, the most this host follows"
                ));
            }
            self.add(key, Node::default());
        }
        let before = self.nodes.get(key).map_or(0, Node::known_metrics);
        let (usage, known) = (&mut self.usage, &mut self.known_metrics);
        reserve(usage, known, message.parts.node, before, metrics.len())?;
        let node = self.nodes.entry(key.to_string()).or_default();
        let readings = readings(message, &metrics, &mut self.skipped.metrics);
        *node = Node {
            online: true,
            bd_seq: bd_seq(message.payload),
            metrics: Some(metrics),
            // Devices are born again after their node; until then they are not read.
            devices: std::mem::take(&mut node.devices)
                .into_iter()
                .map(|(id, device)| {
                    (
                        id,
                        Device {
                            metrics: None,
                            ..device
                        },
                    )
                })
                .collect(),
            expected: message
                .payload
                .seq
                .and_then(|seq| u8::try_from(seq).ok())
                .map(|seq| seq.wrapping_add(1)),
            rebirth_at: node.rebirth_at,
            last_seen: Some(now),
            ..Node::default()
        };
        let status = status(message, &message.parts.node_key(), true, node.bd_seq);
        Ok(several(status, readings?))
    }

    fn node_death(&mut self, key: &str, message: &Message<'_>) -> Record {
        let death = bd_seq(message.payload);
        let Some(node) = self.nodes.get_mut(key).filter(|node| node.bd_seq == death) else {
            self.skipped.late_deaths += 1;
            let born = self.nodes.get(key).and_then(|node| node.bd_seq);
            return Record::Nothing {
                why: Cow::Owned(format!(
                    "a death of another session (bdSeq {death:?}) than the node's birth (bdSeq {born:?})"
                )),
            };
        };
        node.online = false;
        node.expected = None;
        node.missing.clear();
        node.gap_since = None;
        let mut statuses = vec![status(message, key, false, death)];
        for (id, device) in &mut node.devices {
            if std::mem::take(&mut device.online) {
                statuses.push(status(message, &format!("{key}/{id}"), false, None));
            }
        }
        Record::Several(statuses)
    }

    fn device_birth(
        &mut self,
        key: &str,
        message: &Message<'_>,
        now: Instant,
    ) -> Result<Record, String> {
        let device_id = message.parts.device.unwrap_or_default();
        let metrics = Metrics::learn(&message.payload.metrics)?;
        let Some(node) = born(&mut self.nodes, key) else {
            let why = format!("a birth of device {device_id} before its edge node's birth");
            return Err(self.refuse(key, now, why));
        };
        if !node.devices.contains_key(device_id) && node.devices.len() >= MAX_DEVICES {
            return Err(format!(
                "edge node {key} has {MAX_DEVICES} devices, the most this host follows"
            ));
        }
        let before = node
            .devices
            .get(device_id)
            .and_then(|device| device.metrics.as_ref())
            .map_or(0, Metrics::len);
        let (usage, known) = (&mut self.usage, &mut self.known_metrics);
        reserve(usage, known, message.parts.node, before, metrics.len())?;
        let device = node.devices.entry(device_id.to_string()).or_default();
        let readings = readings(message, &metrics, &mut self.skipped.metrics);
        device.online = true;
        device.metrics = Some(metrics);
        let status = status(message, &message.parts.stored_device(), true, None);
        Ok(several(status, readings?))
    }

    fn device_death(
        &mut self,
        key: &str,
        message: &Message<'_>,
        now: Instant,
    ) -> Result<Record, String> {
        let device_id = message.parts.device.unwrap_or_default();
        let Some(node) = born(&mut self.nodes, key) else {
            let why = format!("a death of device {device_id} before its edge node's birth");
            return Err(self.refuse(key, now, why));
        };
        if let Some(device) = node.devices.get_mut(device_id) {
            device.online = false;
        }
        let device = message.parts.stored_device();
        Ok(status(message, &device, false, None))
    }

    fn data(&mut self, key: &str, message: &Message<'_>, now: Instant) -> Result<Record, String> {
        let metrics = match (born(&mut self.nodes, key), message.parts.device) {
            (None, _) => None,
            (Some(node), None) => node.metrics.as_ref(),
            (Some(node), Some(device)) => node
                .devices
                .get(device)
                .and_then(|device| device.metrics.as_ref()),
        };
        let Some(metrics) = metrics else {
            let whose = match message.parts.device {
                Some(device) => format!("device {device}"),
                None => "edge node".to_string(),
            };
            let why = format!("data of {whose} without a birth the host has seen");
            return Err(self.refuse(key, now, why));
        };
        match readings(message, metrics, &mut self.skipped.metrics) {
            Ok(Record::Readings { documents, .. }) if documents.is_empty() => Ok(Record::Nothing {
                why: Cow::Borrowed("no measurement in the Sparkplug message"),
            }),
            Ok(record) => Ok(record),
            Err(why) => Err(self.refuse(key, now, why)),
        }
    }

    /// Asks `key`'s node for a Rebirth because of `why`, which it gives back: why the
    /// message is stored flagged.
    fn refuse(&mut self, key: &str, now: Instant, why: String) -> String {
        self.ask(key, now, why.clone());
        why
    }
}

/// The node, when it is online with a birth seen.
fn born<'n>(nodes: &'n mut HashMap<String, Node>, key: &str) -> Option<&'n mut Node> {
    nodes
        .get_mut(key)
        .filter(|node| node.online && node.metrics.is_some())
}

/// Counts `after` metric definitions of `node_id`'s birth in place of its `before`,
/// when that fits the node id's own budget and the host's (`known`, all of them).
fn reserve(
    usage: &mut HashMap<String, Usage>,
    known: &mut usize,
    node_id: &str,
    before: usize,
    after: usize,
) -> Result<(), String> {
    let own = usage.get(node_id).map_or(0, |usage| usage.metrics);
    if own - before + after > MAX_NODE_METRICS {
        return Err(format!(
            "the births of edge node {node_id} would define more than {MAX_NODE_METRICS} metrics"
        ));
    }
    if *known - before + after > MAX_KNOWN_METRICS {
        return Err(format!(
            "the births of all edge nodes would define more than {MAX_KNOWN_METRICS} metrics"
        ));
    }
    release(usage, known, node_id, before);
    *known += after;
    if let Some(usage) = usage.get_mut(node_id) {
        usage.metrics += after;
    }
    Ok(())
}

/// Forgets `count` metric definitions of `node_id`.
fn release(usage: &mut HashMap<String, Usage>, known: &mut usize, node_id: &str, count: usize) {
    *known -= count;
    if let Some(usage) = usage.get_mut(node_id) {
        usage.metrics -= count;
    }
}

/// The edge node id of a `<group>/<node>` key.
fn node_id(key: &str) -> &str {
    key.split_once('/').map_or(key, |(_, node)| node)
}

/// Whether a Rebirth may be asked of `node` at `now`.
fn may_ask(node: &Node, now: Instant, timeout: Duration) -> bool {
    node.rebirth_at
        .is_none_or(|at| now.duration_since(at) >= timeout)
}

/// One message being taken.
struct Message<'a> {
    topic: &'a str,
    parts: Topic<'a>,
    payload: &'a Payload,
    received: bson::DateTime,
}

/// The `bdSeq` metric of a birth or death.
fn bd_seq(payload: &Payload) -> Option<u64> {
    payload
        .metrics
        .iter()
        .find(|metric| metric.name.as_deref() == Some("bdSeq"))
        .and_then(|metric| match metric.value {
            Some(proto::metric::Value::LongValue(value)) => Some(value),
            Some(proto::metric::Value::IntValue(value)) => Some(u64::from(value)),
            _ => None,
        })
}

/// A status change of `device` at the message's time.
fn status(message: &Message<'_>, device: &str, online: bool, bd_seq: Option<u64>) -> Record {
    let ts = time_of(message.payload.timestamp).unwrap_or(message.received);
    let mut document = doc! {
        "_id": ObjectId::new(),
        "topic": message.topic,
        "device": device,
        "status": if online { "online" } else { "offline" },
        "ts": ts,
        "received_at": message.received,
    };
    if let Some(bd_seq) = bd_seq.and_then(|value| i64::try_from(value).ok()) {
        document.insert("bd_seq", bd_seq);
    }
    Record::Status {
        device: device.to_string(),
        online,
        document,
    }
}

/// A status and the readings of a birth, as one record.
fn several(status: Record, readings: Record) -> Record {
    match readings {
        Record::Readings { ref documents, .. } if documents.is_empty() => status,
        readings => Record::Several(vec![status, readings]),
    }
}

/// A metric time as stored, when it is one.
fn time_of(ms: Option<u64>) -> Option<bson::DateTime> {
    ms.filter(|ms| *ms <= MAX_TS)
        .and_then(|ms| i64::try_from(ms).ok())
        .map(bson::DateTime::from_millis)
}

/// Metrics the host never stores as readings: the session number and the commands.
fn is_protocol(name: &str) -> bool {
    name == "bdSeq" || name.starts_with("Node Control/") || name.starts_with("Device Control/")
}

/// The readings of a message's metrics, named by `metrics`; why not, when a metric is
/// one no birth defined. `skipped` counts the metrics that are no readings.
fn readings(message: &Message<'_>, metrics: &Metrics, skipped: &mut u64) -> Result<Record, String> {
    let device = message.parts.stored_device();
    let sent = time_of(message.payload.timestamp);
    let mut documents = Vec::with_capacity(message.payload.metrics.len());
    for metric in &message.payload.metrics {
        let Some((name, datatype)) = metrics.resolve(metric) else {
            return Err(match (&metric.name, metric.alias) {
                (Some(name), _) => format!("metric {name:.128} is not in the birth"),
                (None, Some(alias)) => format!("alias {alias} is not in the birth"),
                (None, None) => "a metric has neither name nor alias".to_string(),
            });
        };
        let value = match &metric.value {
            Some(value) if !is_protocol(name) && metric.is_transient != Some(true) => {
                datatype.measure(value)
            }
            _ => None,
        };
        let Some(value) = value else {
            *skipped += 1;
            continue;
        };
        let taken = time_of(metric.timestamp).or(sent);
        let ts = taken.unwrap_or(message.received);
        // The same value of the same metric at the same time is one reading: a node's
        // history or birth sent again is refused as a duplicate, two values taken in
        // the same millisecond are both kept.
        let id = match taken {
            Some(ts) => Bson::Document(
                doc! { "device": &device, "measurement": name, "ts": ts, "value": value },
            ),
            None => Bson::ObjectId(ObjectId::new()),
        };
        documents.push(doc! {
            "_id": id,
            "topic": message.topic,
            "device": &device,
            "measurement": name,
            "value": value,
            "ts": ts,
            "received_at": message.received,
        });
    }
    Ok(Record::Readings {
        documents,
        keyed: false,
    })
}

/// The record's documents of readings, for tests.
#[cfg(test)]
fn documents_of(record: &Record) -> Vec<bson::Document> {
    match record {
        Record::Readings { documents, .. } => documents.clone(),
        Record::Several(records) => records.iter().flat_map(documents_of).collect(),
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests;
