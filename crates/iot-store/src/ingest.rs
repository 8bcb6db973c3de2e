//! Ingest mappings: how the persister reads what devices publish. A mapping is a list
//! of rules from TOML files (`ingest/*.toml`, built into the binary as presets); the
//! first rule whose topic pattern matches a message reads it:
//!
//! - `kind = "readings"` (the default): the payload becomes one document per
//!   measurement. `payload = "auto"` reads JSON when the payload is JSON, else a plain
//!   value; `"json"` and `"plain"` only that; `"reading"` the project's own form (a
//!   plain number, or a JSON object with `value` and optionally `device`, `boot`, `seq`,
//!   `ts`, `unit`).
//! - `kind = "status"`: availability; `online`/`offline` list the payloads that mean
//!   each (plain, or the `state_field` of a JSON object). A payload that is neither is
//!   left to the next rule.
//! - `kind = "ignore"`: topics of the preset that carry no readings (commands, logs).
//! - `kind = "sparkplug"`: the Sparkplug B namespace (`topic = "spBv1.0/#"`), read by
//!   the persister's [`sparkplug::Host`], which keeps what births defined.
//!
//! Reading a JSON payload: every number is a measurement named by its path (`.` between
//! keys, array elements by index: `ENERGY.Current.0`); booleans and exactly `"ON"` /
//! `"OFF"` are 1 and 0; other strings and `null` are not measurements. A plain payload:
//! a decimal number, or `on`/`off`/`true`/`false` in any case (1/0); other text is not a
//! measurement. A message that yields nothing is counted, not stored; one that cannot be
//! read (not UTF-8, broken JSON) is stored flagged, as any payload the default mapping
//! cannot read.

#[cfg(any(test, feature = "fixtures"))]
pub mod fixtures;
pub mod layout;
pub mod topic;

use std::borrow::Cow;
use std::str::FromStr;
use std::sync::LazyLock;

use bson::{doc, oid::ObjectId, Bson};
use chrono::{DateTime, NaiveDateTime, TimeZone, Utc};
use chrono_tz::Tz;
use serde::Deserialize;
use serde_json::Value;

use iot_core::bounds::{check_id, check_name, check_seq, MAX_ID_BYTES};
use iot_core::payload::{decode, Decoded, JsonReading};

use crate::record::{cut, unparsed, Record};
use crate::sparkplug;
use topic::{check_filter, minimal_filters, Captures, Pattern, Template};

impl Record {
    /// What a message received at `received_at` becomes under the built-in mapping
    /// (`ingest/default.toml`).
    pub fn from_message(topic: &str, payload: &[u8], received_at: DateTime<Utc>) -> Record {
        Mapping::builtin().read(topic, payload, received_at)
    }
}

/// The presets built into the binary, by name: `--ingest tasmota` reads
/// `ingest/tasmota.toml` as it was when the binary was built.
pub const PRESETS: &[(&str, &str)] = &[
    ("default", include_str!("../../../ingest/default.toml")),
    ("tasmota", include_str!("../../../ingest/tasmota.toml")),
    (
        "zigbee2mqtt",
        include_str!("../../../ingest/zigbee2mqtt.toml"),
    ),
    ("esphome", include_str!("../../../ingest/esphome.toml")),
    ("shelly", include_str!("../../../ingest/shelly.toml")),
    (
        "homeassistant",
        include_str!("../../../ingest/homeassistant.toml"),
    ),
    ("sparkplug", include_str!("../../../ingest/sparkplug.toml")),
];

/// The most measurements one message may hold; a payload with more is flagged (it is
/// not telemetry, and would otherwise become that many documents).
pub const MAX_MEASUREMENTS: usize = 1000;

/// Rules in the order they are tried.
#[derive(Debug, Clone)]
pub struct Mapping {
    rules: Vec<Rule>,
    /// The zone of device times written without an offset, where a rule names none.
    timezone: Tz,
}

static DEFAULT: LazyLock<Mapping> = LazyLock::new(|| {
    Mapping::load(&["default".to_string()], Tz::UTC).unwrap_or_else(|error| {
        // ingest/default.toml is built in and tested: this cannot happen in a release.
        panic!("the built-in default mapping does not load: {error}")
    })
});

impl Mapping {
    /// The mapping without `--ingest`: the seed topics and the project's reading form.
    pub fn builtin() -> &'static Mapping {
        &DEFAULT
    }

    /// Reads the mapping files (or built-in presets, by name) in order. The error is one
    /// line naming the file, the rule and what is wrong.
    pub fn load(sources: &[String], timezone: Tz) -> Result<Mapping, String> {
        let mut rules = Vec::new();
        for source in sources {
            let (name, text, setting) = read_source(source)?;
            rules.extend(parse(&name, &text, setting)?);
        }
        if rules.is_empty() {
            return Err(format!(
                "the ingest mapping {} has no rules",
                sources.join(",")
            ));
        }
        Ok(Mapping { rules, timezone })
    }

    /// The filters to subscribe to: those of the rules that subscribe, without the ones
    /// another covers.
    pub fn filters(&self) -> Vec<String> {
        minimal_filters(
            self.rules
                .iter()
                .filter(|rule| rule.subscribe)
                .map(|rule| rule.filter.clone()),
        )
    }

    /// Whether a rule is for Sparkplug B: the reader then needs a [`sparkplug::Host`].
    pub fn reads_sparkplug(&self) -> bool {
        self.rules
            .iter()
            .any(|rule| matches!(rule.kind, Kind::Sparkplug))
    }

    /// What a message becomes (one a Sparkplug rule covers is flagged: reading it
    /// takes the host, [`Mapping::read_with`]).
    pub fn read(&self, topic: &str, payload: &[u8], received_at: DateTime<Utc>) -> Record {
        self.read_with(None, topic, payload, received_at)
    }

    /// What a message becomes, the Sparkplug host reading what a Sparkplug rule covers.
    pub fn read_with(
        &self,
        mut sparkplug: Option<&mut sparkplug::Host>,
        topic: &str,
        payload: &[u8],
        received_at: DateTime<Utc>,
    ) -> Record {
        let received = bson::DateTime::from_chrono(received_at);
        let mut refused_status: Option<String> = None;
        let levels: Vec<&str> = topic.split('/').collect();
        for rule in &self.rules {
            let Some(captures) = rule.pattern.matches_levels(topic, &levels) else {
                continue;
            };
            let zone = rule.timezone.unwrap_or(self.timezone);
            match &rule.kind {
                Kind::Ignore => {
                    return Record::Nothing {
                        why: Cow::Borrowed("an ignore rule"),
                    }
                }
                Kind::Status(status) => match status.read(rule, &captures, payload, received, zone)
                {
                    Ok(record) => return record,
                    Err(why) => {
                        refused_status.get_or_insert(why);
                    }
                },
                Kind::Readings(readings) => {
                    return readings.read(rule, &captures, topic, payload, received, zone)
                }
                Kind::Sparkplug => {
                    return match sparkplug.as_deref_mut() {
                        Some(host) => {
                            host.read(topic, payload, received_at, std::time::Instant::now())
                        }
                        None => flagged(
                            topic,
                            payload,
                            received,
                            "a Sparkplug B message, read by the persister's Sparkplug host only",
                        ),
                    }
                }
            }
        }
        match refused_status {
            Some(why) => flagged(topic, payload, received, &why),
            None => Record::Nothing {
                why: Cow::Borrowed("no ingest rule for this topic"),
            },
        }
    }
}

/// A preset's layout parameter as given (`fulltopic`, its value).
type Setting<'a> = Option<(&'a str, &'a str)>;

/// The source's name for errors, its text, and the layout parameter given with a preset
/// (`tasmota:fulltopic=...`).
fn read_source(source: &str) -> Result<(String, String, Setting<'_>), String> {
    let names: Vec<&str> = PRESETS.iter().map(|(name, _)| *name).collect();
    let (source, setting) = match layout::split_source(source, &names) {
        Some((name, parameter, value)) => (name, Some((parameter, value))),
        None => (source, None),
    };
    // A file is named by a path (with a '/') or a .toml name; anything else is a preset.
    let is_path = source.contains('/') || source.ends_with(".toml");
    if !is_path {
        return match PRESETS.iter().find(|(name, _)| *name == source) {
            Some((name, text)) => Ok((format!("preset {name}"), text.to_string(), setting)),
            None => Err(format!(
                "--ingest {source}: not a preset ({}); a mapping file is named by a path or a .toml name",
                names.join(", ")
            )),
        };
    }
    std::fs::read_to_string(source)
        .map(|text| (source.to_string(), text, None))
        .map_err(|error| format!("--ingest {source}: cannot read it: {error}"))
}

/// A mapping file as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    /// How the owner may have laid the topics out (presets: `--ingest NAME:PARAMETER=VALUE`).
    layout: Option<layout::Layout>,
    #[serde(default)]
    rule: Vec<RawRule>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    topic: String,
    filter: Option<String>,
    subscribe: Option<bool>,
    #[serde(default)]
    kind: RawKind,
    payload: Option<Form>,
    device: Option<String>,
    measurement: Option<String>,
    root: Option<String>,
    skip: Option<Vec<String>>,
    #[serde(default)]
    time: Vec<TimeField>,
    timezone: Option<String>,
    units: Option<toml::Table>,
    online: Option<Vec<String>>,
    offline: Option<Vec<String>>,
    state_field: Option<String>,
    device_field: Option<String>,
    trust_payload_device: Option<bool>,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum RawKind {
    #[default]
    Readings,
    Status,
    Ignore,
    Sparkplug,
}

/// How a readings rule reads the payload.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Form {
    /// JSON when the payload is JSON, else a plain value.
    #[default]
    Auto,
    /// JSON only: anything else is flagged.
    Json,
    /// A plain value only: JSON is not a measurement.
    Plain,
    /// The project's reading form: a plain number or `{"value": ..}` with device, boot,
    /// seq, ts and unit; anything else is flagged.
    Reading,
}

/// Where a time may be, tried in order.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimeField {
    /// A path below the rule's root, `.` between keys.
    pub field: String,
    pub format: TimeFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimeFormat {
    /// `2026-11-24T10:00:00Z`, with an offset or (in the rule's zone) without one;
    /// fractions of a second allowed, `T` or a space between date and time.
    Datetime,
    /// Seconds since 1970 (fractions allowed).
    Unix,
    /// Milliseconds since 1970.
    UnixMs,
}

/// One rule, checked.
#[derive(Debug, Clone)]
struct Rule {
    pattern: Pattern,
    filter: String,
    subscribe: bool,
    kind: Kind,
    /// The device as the topic names it: the level a device account's ACL binds it to.
    device: Option<Template>,
    /// Where the topic names no device: whether a payload's own `device` is believed
    /// (topics only service accounts may write, such as the seed's `/sensor/temperature`).
    trust_payload_device: bool,
    time: Vec<TimeField>,
    timezone: Option<Tz>,
}

#[derive(Debug, Clone)]
enum Kind {
    Readings(Readings),
    Status(Status),
    Ignore,
    Sparkplug,
}

#[derive(Debug, Clone)]
struct Readings {
    form: Form,
    measurement: Option<Template>,
    root: Vec<String>,
    skip: Vec<String>,
    units: Vec<(String, String)>,
}

#[derive(Debug, Clone)]
struct Status {
    online: Vec<String>,
    offline: Vec<String>,
    state_field: Option<String>,
    device_field: Option<String>,
}

/// Parses one mapping file; `name` is how errors name it, `setting` its layout.
fn parse(name: &str, text: &str, setting: Setting<'_>) -> Result<Vec<Rule>, String> {
    let file: File = toml::from_str(text).map_err(|error| {
        let at = error.span().map(|span| span.start).unwrap_or(0);
        let line = text[..at.min(text.len())].matches('\n').count() + 1;
        let rule = text[..at.min(text.len())]
            .lines()
            .filter(|line| line.trim() == "[[rule]]")
            .count();
        let which = if rule > 0 {
            format!("rule {rule} (line {line})")
        } else {
            format!("line {line}")
        };
        let message: Vec<&str> = error
            .message()
            .lines()
            .map(str::trim)
            .filter(|line| !line.is_empty())
            .collect();
        format!("{name}: {which}: {}", message.join("; "))
    })?;
    if file.rule.is_empty() {
        return Err(format!("{name}: no [[rule]] in it"));
    }
    let rules = match setting {
        Some(setting) => laid_out(name, file.layout.as_ref(), file.rule, setting)?,
        None => file.rule,
    };
    rules
        .into_iter()
        .enumerate()
        .map(|(index, raw)| {
            let topic = raw.topic.clone();
            check(raw).map_err(|why| format!("{name}: rule {} (topic {topic:?}): {why}", index + 1))
        })
        .collect()
}

/// The rules rewritten from the preset's default layout to the one given.
fn laid_out(
    name: &str,
    layout: Option<&layout::Layout>,
    rules: Vec<RawRule>,
    (parameter, value): (&str, &str),
) -> Result<Vec<RawRule>, String> {
    let Some(layout) = layout.filter(|layout| layout.parameter == parameter) else {
        return Err(match layout {
            Some(layout) => format!(
                "--ingest {}: {parameter} is not a parameter of this preset; it takes {}=VALUE (default {})",
                name.trim_start_matches("preset "),
                layout.parameter,
                layout.default
            ),
            None => format!("--ingest {}: this preset takes no parameter", name.trim_start_matches("preset ")),
        });
    };
    layout::check_value(layout.kind, parameter, value)
        .map_err(|why| format!("--ingest {}: {why}", name.trim_start_matches("preset ")))?;
    let fixed = layout::fixed_device(layout.kind, value);
    let rewrite = |text: &str, capture: &str| {
        layout::rewrite(layout.kind, &layout.default, value, text, capture)
    };
    Ok(rules
        .into_iter()
        .map(|mut rule| {
            let moved = rewrite(&rule.topic, "{device}");
            if moved != rule.topic && rule.device.is_none() {
                rule.device = fixed.clone();
            }
            rule.topic = moved;
            rule.filter = rule.filter.as_deref().map(|filter| rewrite(filter, "+"));
            if layout.kind == layout::LayoutKind::Root {
                rule.device = rule
                    .device
                    .as_deref()
                    .map(|device| rewrite(device, "{device}"));
            }
            rule
        })
        .collect())
}

/// Turns a rule as written into a checked one.
fn check(raw: RawRule) -> Result<Rule, String> {
    let pattern = Pattern::parse(&raw.topic)?;
    let filter = match raw.filter.clone() {
        Some(filter) => {
            check_filter(&filter)?;
            filter
        }
        None => pattern.filter(),
    };
    let device = match template(&pattern, &raw.device)? {
        Some(device) => Some(device),
        None => named_capture(&pattern, "device")?,
    };
    let trust_payload_device = raw.trust_payload_device.unwrap_or(false);
    if trust_payload_device && device.is_some() {
        return Err(
            "trust_payload_device is for topics that name no device; this one names it".into(),
        );
    }
    let timezone = raw
        .timezone
        .as_deref()
        .map(|zone| {
            Tz::from_str(zone).map_err(|_| {
                format!("timezone {zone:?} is not an IANA zone such as Europe/Berlin or UTC")
            })
        })
        .transpose()?;
    let kind = match raw.kind {
        RawKind::Ignore => check_ignore(&raw)?,
        RawKind::Status => check_status(&raw)?,
        RawKind::Readings => check_readings(&raw, &pattern)?,
        RawKind::Sparkplug => check_sparkplug(&raw)?,
    };
    Ok(Rule {
        pattern,
        filter,
        // An ignore rule only keeps what other filters bring from being stored.
        subscribe: raw.subscribe.unwrap_or(raw.kind != RawKind::Ignore),
        kind,
        device,
        trust_payload_device,
        time: raw.time,
        timezone,
    })
}

/// A template of the pattern's captures, where the rule writes one.
fn template(pattern: &Pattern, text: &Option<String>) -> Result<Option<Template>, String> {
    text.as_deref()
        .map(|text| Template::parse(text, pattern.names()))
        .transpose()
}

/// The capture `{name}` as a template, where the pattern has one.
fn named_capture(pattern: &Pattern, name: &str) -> Result<Option<Template>, String> {
    pattern
        .names()
        .any(|known| known == name)
        .then(|| Template::parse(&format!("{{{name}}}"), pattern.names()))
        .transpose()
}

/// The keys of readings rules, each with whether the rule has it.
fn readings_keys(raw: &RawRule) -> [(bool, &'static str); 5] {
    [
        (raw.payload.is_some(), "payload"),
        (raw.measurement.is_some(), "measurement"),
        (raw.root.is_some(), "root"),
        (raw.skip.is_some(), "skip"),
        (raw.units.is_some(), "units"),
    ]
}

/// The keys of status rules, each with whether the rule has it.
fn status_keys(raw: &RawRule) -> [(bool, &'static str); 4] {
    [
        (raw.online.is_some(), "online"),
        (raw.offline.is_some(), "offline"),
        (raw.state_field.is_some(), "state_field"),
        (raw.device_field.is_some(), "device_field"),
    ]
}

fn check_ignore(raw: &RawRule) -> Result<Kind, String> {
    for (present, what) in readings_keys(raw).iter().chain(&status_keys(raw)) {
        if *present {
            return Err(format!("{what} means nothing in an ignore rule"));
        }
    }
    if raw.device.is_some()
        || !raw.time.is_empty()
        || raw.timezone.is_some()
        || raw.trust_payload_device.is_some()
    {
        return Err(
            "device, trust_payload_device, time and timezone mean nothing in an ignore rule".into(),
        );
    }
    Ok(Kind::Ignore)
}

/// A Sparkplug rule names the namespace and nothing else: the host reads the topics.
fn check_sparkplug(raw: &RawRule) -> Result<Kind, String> {
    let namespace = format!("{}/#", sparkplug::NAMESPACE);
    let others = readings_keys(raw)
        .iter()
        .chain(&status_keys(raw))
        .any(|(present, _)| *present)
        || raw.device.is_some()
        || !raw.time.is_empty()
        || raw.timezone.is_some()
        || raw.trust_payload_device.is_some();
    if raw.topic != namespace || others {
        return Err(format!(
            "a sparkplug rule is topic = \"{namespace}\" and kind = \"sparkplug\", nothing else: the host reads the topics"
        ));
    }
    Ok(Kind::Sparkplug)
}

fn check_status(raw: &RawRule) -> Result<Kind, String> {
    for (present, what) in readings_keys(raw) {
        if present {
            return Err(format!("{what} is for readings rules, not status rules"));
        }
    }
    let online = raw.online.clone().unwrap_or_else(|| vec!["online".into()]);
    let offline = raw
        .offline
        .clone()
        .unwrap_or_else(|| vec!["offline".into()]);
    if online.is_empty() || offline.is_empty() || online.iter().any(|word| offline.contains(word)) {
        return Err("online and offline each need at least one payload, none in both".into());
    }
    Ok(Kind::Status(Status {
        online,
        offline,
        state_field: raw.state_field.clone(),
        device_field: raw.device_field.clone(),
    }))
}

fn check_readings(raw: &RawRule, pattern: &Pattern) -> Result<Kind, String> {
    for (present, what) in status_keys(raw) {
        if present {
            return Err(format!("{what} is for status rules, not readings rules"));
        }
    }
    let form = raw.payload.unwrap_or_default();
    let measurement = match template(pattern, &raw.measurement)? {
        Some(measurement) => Some(measurement),
        None => named_capture(pattern, "measurement")?,
    };
    let mut units = Vec::new();
    for (glob, unit) in raw.units.clone().unwrap_or_default() {
        match unit {
            toml::Value::String(unit) => units.push((glob, unit)),
            other => {
                return Err(format!(
                    "units: {glob:?} = {}, not a string such as \"°C\"",
                    other.type_str()
                ))
            }
        }
    }
    if form == Form::Plain && (raw.root.is_some() || !raw.time.is_empty()) {
        return Err("root and time read a JSON payload; this rule reads plain payloads".into());
    }
    Ok(Kind::Readings(Readings {
        form,
        measurement,
        root: raw
            .root
            .as_ref()
            .map(|root| root.split('.').map(String::from).collect())
            .unwrap_or_default(),
        skip: raw.skip.clone().unwrap_or_default(),
        units,
    }))
}

impl Status {
    /// The status a payload says, or why it says none this rule knows.
    fn read(
        &self,
        rule: &Rule,
        captures: &Captures<'_>,
        payload: &[u8],
        received: bson::DateTime,
        zone: Tz,
    ) -> Result<Record, String> {
        let text = std::str::from_utf8(payload)
            .map_err(|_| "payload is not UTF-8".to_string())?
            .trim();
        let json = match &self.state_field {
            Some(_) if text.starts_with('{') => serde_json::from_str::<Value>(text).ok(),
            _ => None,
        };
        let word = match (&json, &self.state_field) {
            (Some(json), Some(field)) => {
                json.get(field).and_then(Value::as_str).unwrap_or_default()
            }
            _ => text,
        };
        let online = if self.online.iter().any(|known| known == word) {
            true
        } else if self.offline.iter().any(|known| known == word) {
            false
        } else {
            return Err(format!(
                "not a status: expected {} or {}",
                self.online.join("/"),
                self.offline.join("/")
            ));
        };
        let claimed = json
            .as_ref()
            .zip(self.device_field.as_deref())
            .and_then(|(json, field)| json.get(field)?.as_str());
        let topic = captures.get("topic").map_or("", String::as_str);
        // The topic's device wins: a payload that claims another is flagged.
        let device = match (
            rule.device.as_ref().map(|device| device.fill(captures)),
            claimed,
        ) {
            (Some(bound), Some(claimed)) if bound != claimed => {
                return Ok(identity_flagged(
                    topic,
                    payload,
                    received,
                    Some(&bound),
                    claimed,
                ))
            }
            (Some(bound), _) => bound,
            (None, Some(claimed)) => claimed.to_string(),
            (None, None) => topic.to_string(),
        };
        if let Err(why) = check_name("device", &device) {
            return Ok(flagged(topic, payload, received, &why));
        }
        let ts = json
            .as_ref()
            .and_then(|json| time_of(json, &rule.time, zone))
            .map(bson::DateTime::from_chrono)
            .unwrap_or(received);
        let document = doc! {
            "_id": ObjectId::new(),
            "topic": topic,
            "device": &device,
            "status": if online { "online" } else { "offline" },
            "ts": ts,
            "received_at": received,
        };
        Ok(Record::Status {
            device,
            online,
            document,
        })
    }
}

impl Readings {
    fn read(
        &self,
        rule: &Rule,
        captures: &Captures<'_>,
        topic: &str,
        payload: &[u8],
        received: bson::DateTime,
        zone: Tz,
    ) -> Record {
        let device = rule.device.as_ref().map(|device| device.fill(captures));
        let measurement = self
            .measurement
            .as_ref()
            .map(|measurement| measurement.fill(captures));
        if self.form == Form::Reading {
            return reading_form(
                topic,
                payload,
                received,
                device,
                rule.trust_payload_device,
                measurement,
            );
        }
        let read = self.measurements(rule, payload, received, zone, device.as_deref());
        let Measured { json, values, ts } = match read {
            Ok(read) => read,
            Err(none) => return none.record(topic, payload, received),
        };
        let named = named(values, measurement.as_deref());
        // The names as stored, the rule's measurement and the payload's path together.
        if let Some(why) = named
            .iter()
            .find_map(|(name, _)| check_name("measurement", name).err())
        {
            return flagged(topic, payload, received, &why);
        }
        let documents = named
            .into_iter()
            .map(|(name, value)| {
                let mut document = doc! { "_id": ObjectId::new(), "topic": topic };
                if let Some(device) = &device {
                    document.insert("device", device);
                }
                document.insert("value", value);
                if let Some(unit) = self.unit_of(&name, json.as_ref()) {
                    document.insert("unit", unit);
                }
                document.insert("measurement", name);
                document.insert("ts", ts);
                document.insert("received_at", received);
                document
            })
            .collect();
        Record::Readings {
            documents,
            keyed: false,
        }
    }

    /// What the payload holds, or why nothing.
    fn measurements(
        &self,
        rule: &Rule,
        payload: &[u8],
        received: bson::DateTime,
        zone: Tz,
        device: Option<&str>,
    ) -> Result<Measured, NoReadings> {
        if let Some(Err(why)) = device.map(|device| check_name("device", device)) {
            return Err(NoReadings::Flagged(why));
        }
        let Ok(text) = std::str::from_utf8(payload) else {
            return Err(NoReadings::Flagged("payload is not UTF-8".into()));
        };
        let text = text.trim();
        let json = self.json(text)?;
        let mut values: Vec<(String, f64)> = Vec::new();
        let mut ts = received;
        match &json {
            Some(json) => {
                let Some(root) = self.root.iter().try_fold(json, |value, key| value.get(key))
                else {
                    return Err(NoReadings::Nothing(
                        "the payload has no root object the rule names",
                    ));
                };
                if let Some(time) = time_of(root, &rule.time, zone) {
                    ts = bson::DateTime::from_chrono(time);
                }
                let skipped = |path: &str| {
                    rule.time.iter().any(|time| time.field == path)
                        || self.skip.iter().any(|glob| glob_matches(glob, path))
                };
                let mut path = String::new();
                if !flatten(root, &mut path, &mut values, &skipped) {
                    return Err(NoReadings::Flagged(format!(
                        "more than {MAX_MEASUREMENTS} measurements in one message"
                    )));
                }
            }
            None => values.extend(plain_value(text).map(|value| (String::new(), value))),
        }
        if values.is_empty() {
            return Err(NoReadings::Nothing("no measurement in the payload"));
        }
        Ok(Measured { json, values, ts })
    }

    /// The payload as JSON: `json` expects it, `auto` reads what looks like it (an
    /// object or an array), `plain` never.
    fn json(&self, text: &str) -> Result<Option<Value>, NoReadings> {
        if self.form == Form::Plain {
            return Ok(None);
        }
        match serde_json::from_str::<Value>(text) {
            Ok(json) => Ok(Some(json)),
            Err(error) if self.form == Form::Json || text.starts_with(['{', '[']) => {
                Err(NoReadings::Flagged(format!("payload is not JSON: {error}")))
            }
            Err(_) => Ok(None),
        }
    }

    /// The unit of measurement `name`: the first `units` pattern that matches it,
    /// with `{Field}` filled from the payload's top-level string fields; none when such
    /// a field is missing.
    fn unit_of(&self, name: &str, json: Option<&Value>) -> Option<String> {
        let (_, unit) = self
            .units
            .iter()
            .find(|(glob, _)| glob_matches(glob, name))?;
        let mut out = String::new();
        let mut rest = unit.as_str();
        while let Some(open) = rest.find('{') {
            let close = open + rest[open..].find('}')?;
            out.push_str(&rest[..open]);
            out.push_str(json?.get(&rest[open + 1..close])?.as_str()?);
            rest = &rest[close + 1..];
        }
        out.push_str(rest);
        (!out.is_empty()).then_some(out)
    }
}

/// Measurement names as stored: the rule's measurement, then the payload's path.
fn named(values: Vec<(String, f64)>, measurement: Option<&str>) -> Vec<(String, f64)> {
    values
        .into_iter()
        .map(|(path, value)| {
            let name = match (measurement, path.is_empty()) {
                (Some(measurement), true) => measurement.to_string(),
                (Some(measurement), false) => format!("{measurement}.{path}"),
                (None, true) => "value".to_string(),
                (None, false) => path,
            };
            (name, value)
        })
        .collect()
}

/// What a payload holds by a readings rule.
#[derive(Debug)]
struct Measured {
    /// The payload as JSON, where the rule read it so (for units filled from it).
    json: Option<Value>,
    /// Its measurements by path; one with an empty path for a plain value.
    values: Vec<(String, f64)>,
    /// Its time: the payload's where the rule says, else the receive time.
    ts: bson::DateTime,
}

/// Why a message yields no readings.
#[derive(Debug)]
enum NoReadings {
    /// It cannot be read: stored flagged, with why.
    Flagged(String),
    /// It holds nothing to store (an event, a text), for the log.
    Nothing(&'static str),
}

impl NoReadings {
    fn record(self, topic: &str, payload: &[u8], received: bson::DateTime) -> Record {
        match self {
            NoReadings::Flagged(why) => flagged(topic, payload, received, &why),
            NoReadings::Nothing(why) => Record::Nothing {
                why: Cow::Borrowed(why),
            },
        }
    }
}

/// The flagged record of a payload that cannot be read, and why.
fn flagged(topic: &str, payload: &[u8], received: bson::DateTime, why: &str) -> Record {
    Record::Unparsed {
        document: unparsed(topic, payload, received, why),
    }
}

/// The project's reading form, with the measurement the topic gives. Who names the
/// device: the topic where it names one (`topic_device`, bound to a device account by
/// the broker's ACL; a payload that claims another device is flagged, never stored or
/// keyed as that device); else the payload's own `device`, where `trusted` (topics only
/// service accounts write); else nobody (a claim is flagged). Ids and `seq` outside
/// [`iot_core::bounds`] are flagged too, so they never become a key or a topic.
fn reading_form(
    topic: &str,
    payload: &[u8],
    received: bson::DateTime,
    topic_device: Option<String>,
    trusted: bool,
    measurement: Option<String>,
) -> Record {
    if let Some(Err(why)) = measurement
        .as_deref()
        .map(|name| check_name("measurement", name))
    {
        return flagged(topic, payload, received, &why);
    }
    let mut document = doc! { "topic": topic };
    let keyed = match decode(payload) {
        Ok(Decoded::Number(value)) => {
            if let Some(Err(why)) = topic_device.as_deref().map(|id| check_id("device", id)) {
                return flagged(topic, payload, received, &why);
            }
            document.insert("_id", ObjectId::new());
            if let Some(device) = topic_device {
                document.insert("device", device);
            }
            if let Some(measurement) = measurement {
                document.insert("measurement", measurement);
            }
            document.insert("value", value);
            document.insert("ts", received);
            false
        }
        Ok(Decoded::Json(reading)) => {
            let device = match (topic_device, reading.device.as_deref()) {
                (Some(bound), Some(claimed)) if bound != claimed => {
                    return identity_flagged(topic, payload, received, Some(&bound), claimed)
                }
                (Some(bound), _) => Some(bound),
                (None, Some(claimed)) if trusted => Some(claimed.to_string()),
                (None, Some(claimed)) => {
                    return identity_flagged(topic, payload, received, None, claimed)
                }
                (None, None) => None,
            };
            match json_reading(&mut document, reading, device, measurement, received) {
                Ok(keyed) => keyed,
                Err(why) => return flagged(topic, payload, received, &why),
            }
        }
        Err(error) => {
            let mut record = flagged(topic, payload, received, &error.to_string());
            key_flagged(&mut record, payload, topic_device.as_deref(), trusted);
            return record;
        }
    };
    document.insert("received_at", received);
    Record::Readings {
        documents: vec![document],
        keyed,
    }
}

/// Fills `document` with a JSON reading of `device` (whoever vouches for it), keyed by
/// `{device, boot, seq}` when it has all three; true when keyed. Ids and `seq` outside
/// their bounds are refused with why.
fn json_reading(
    document: &mut bson::Document,
    reading: JsonReading,
    device: Option<String>,
    measurement: Option<String>,
    received: bson::DateTime,
) -> Result<bool, String> {
    let checks = [
        device.as_deref().map(|id| check_id("device", id)),
        reading.boot.as_deref().map(|id| check_id("boot", id)),
        reading.seq.map(check_seq),
    ];
    if let Some(why) = checks.into_iter().flatten().find_map(Result::err) {
        return Err(why);
    }
    let key = match (&device, &reading.boot, reading.seq) {
        (Some(device), Some(boot), Some(seq)) => {
            Some(doc! { "device": device, "boot": boot, "seq": seq as i64 })
        }
        _ => None,
    };
    let keyed = key.is_some();
    document.insert(
        "_id",
        key.map(Bson::Document)
            .unwrap_or_else(|| ObjectId::new().into()),
    );
    if let Some(device) = device {
        document.insert("device", device);
    }
    if let Some(boot) = reading.boot {
        document.insert("boot", boot);
    }
    if let Some(seq) = reading.seq {
        document.insert("seq", seq as i64);
    }
    if let Some(measurement) = measurement {
        document.insert("measurement", measurement);
    }
    document.insert("value", reading.value);
    if let Some(unit) = reading.unit {
        document.insert("unit", unit);
    }
    document.insert(
        "ts",
        reading
            .ts
            .map(bson::DateTime::from_chrono)
            .unwrap_or(received),
    );
    Ok(keyed)
}

/// A JSON reading flagged for its content (a `value` that is no number), whose device
/// is vouched for as a reading's would be and whose `boot` and `seq` are within their
/// bounds: keyed like the reading, `_id: {device, boot, seq}` and the three beside it.
/// So it is no hole to ask the device for again (it was received; asking again brings
/// the same), and a replay of it is refused as a duplicate rather than flagged twice.
fn key_flagged(record: &mut Record, payload: &[u8], topic_device: Option<&str>, trusted: bool) {
    #[derive(Deserialize)]
    struct Key {
        device: Option<String>,
        boot: Option<String>,
        seq: Option<u64>,
    }
    let Record::Unparsed { document } = record else {
        return;
    };
    let Ok(Key { device, boot, seq }) = serde_json::from_slice::<Key>(payload) else {
        return;
    };
    let device = match (topic_device, device) {
        (Some(bound), Some(claimed)) if bound != claimed => return,
        (Some(bound), _) => bound.to_string(),
        (None, Some(claimed)) if trusted => claimed,
        _ => return,
    };
    let (Some(boot), Some(seq)) = (boot, seq) else {
        return;
    };
    if check_id("device", &device).is_err()
        || check_id("boot", &boot).is_err()
        || check_seq(seq).is_err()
    {
        return;
    }
    document.insert(
        "_id",
        doc! { "device": &device, "boot": &boot, "seq": seq as i64 },
    );
    document.insert("device", device);
    document.insert("boot", boot);
    document.insert("seq", seq as i64);
}

/// A payload whose `device` is not the one its topic names (`topic_device`), or names a
/// device where nothing vouches for it: stored flagged (`identity: "mismatch"` or
/// `"unverified"`, with both names), never under the claimed device nor with its key.
fn identity_flagged(
    topic: &str,
    payload: &[u8],
    received: bson::DateTime,
    topic_device: Option<&str>,
    claimed: &str,
) -> Record {
    let (identity, why) = match topic_device {
        Some(bound) => (
            "mismatch",
            format!("the payload claims another device than its topic names ({bound:.128})"),
        ),
        None => (
            "unverified",
            "the payload names a device on a topic where only the topic may".to_string(),
        ),
    };
    let mut document = unparsed(topic, payload, received, &why);
    document.insert("identity", identity);
    if let Some(bound) = topic_device {
        document.insert("topic_device", bound);
    }
    document.insert("claimed_device", cut(claimed, MAX_ID_BYTES));
    Record::Unparsed { document }
}

/// A plain payload's value: a finite decimal number, or on/off/true/false in any case.
pub fn plain_value(text: &str) -> Option<f64> {
    let text = text.trim();
    if let Ok(value) = text.parse::<f64>() {
        return value.is_finite().then_some(value);
    }
    if text.eq_ignore_ascii_case("on") || text.eq_ignore_ascii_case("true") {
        Some(1.0)
    } else if text.eq_ignore_ascii_case("off") || text.eq_ignore_ascii_case("false") {
        Some(0.0)
    } else {
        None
    }
}

/// The measurements of a JSON value, named by path from `path`; false when there are
/// more than [`MAX_MEASUREMENTS`].
fn flatten(
    value: &Value,
    path: &mut String,
    out: &mut Vec<(String, f64)>,
    skipped: &dyn Fn(&str) -> bool,
) -> bool {
    if !path.is_empty() && skipped(path) {
        return true;
    }
    let number = match value {
        Value::Number(number) => number.as_f64(),
        Value::Bool(flag) => Some(f64::from(u8::from(*flag))),
        Value::String(text) if text == "ON" => Some(1.0),
        Value::String(text) if text == "OFF" => Some(0.0),
        Value::String(_) | Value::Null => None,
        Value::Object(map) => {
            return map
                .iter()
                .all(|(key, value)| descend(key, value, path, out, skipped));
        }
        Value::Array(items) => {
            return items
                .iter()
                .enumerate()
                .all(|(index, value)| descend(&index.to_string(), value, path, out, skipped));
        }
    };
    if let Some(number) = number.filter(|number| number.is_finite()) {
        if out.len() == MAX_MEASUREMENTS {
            return false;
        }
        out.push((path.clone(), number));
    }
    true
}

fn descend(
    key: &str,
    value: &Value,
    path: &mut String,
    out: &mut Vec<(String, f64)>,
    skipped: &dyn Fn(&str) -> bool,
) -> bool {
    let length = path.len();
    if length > 0 {
        path.push('.');
    }
    path.push_str(key);
    let fine = flatten(value, path, out, skipped);
    path.truncate(length);
    fine
}

/// The first of `fields` present in `json` that reads as a time in its format.
fn time_of(json: &Value, fields: &[TimeField], zone: Tz) -> Option<DateTime<Utc>> {
    fields.iter().find_map(|time| {
        let value = time
            .field
            .split('.')
            .try_fold(json, |value, key| value.get(key))?;
        match time.format {
            TimeFormat::Datetime => parse_datetime(value.as_str()?, zone),
            TimeFormat::Unix => {
                let seconds = value.as_f64()?;
                DateTime::from_timestamp_millis((seconds * 1000.0).round() as i64)
            }
            TimeFormat::UnixMs => DateTime::from_timestamp_millis(value.as_f64()?.round() as i64),
        }
    })
}

/// RFC 3339 with any offset, or a local time without one in `zone` (`T` or a space
/// between date and time; fractions of a second allowed). An ambiguous local time (the
/// hour a clock is set back) is read as the earlier one.
pub fn parse_datetime(text: &str, zone: Tz) -> Option<DateTime<Utc>> {
    if let Ok(time) = DateTime::parse_from_rfc3339(text) {
        return Some(time.with_timezone(&Utc));
    }
    let local = ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M:%S%.f"]
        .iter()
        .find_map(|format| NaiveDateTime::parse_from_str(text, format).ok())?;
    zone.from_local_datetime(&local)
        .earliest()
        .map(|time| time.with_timezone(&Utc))
}

/// `*` matches any text (dots included); everything else itself.
pub fn glob_matches(glob: &str, text: &str) -> bool {
    let mut parts = glob.split('*');
    let first = parts.next().unwrap_or_default();
    let Some(mut rest) = text.strip_prefix(first) else {
        return false;
    };
    let parts: Vec<&str> = parts.collect();
    let Some((last, middle)) = parts.split_last() else {
        return rest.is_empty();
    };
    for part in middle {
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

#[cfg(test)]
mod tests;
