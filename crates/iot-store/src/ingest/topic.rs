//! Topic patterns of ingest rules (`tele/{device}/SENSOR`, `zigbee2mqtt/{device...}`),
//! the MQTT filters they subscribe to, and the templates (`{domain}.{entity}`) that
//! build device and measurement names from what a pattern captured.

use std::collections::HashMap;

/// One level of a pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Level {
    /// This exact text.
    Literal(String),
    /// `+`: any one level, not kept.
    Any,
    /// `{name}`: any one level, kept as `name`.
    Capture(String),
    /// `{name...}`: one or more levels, kept as `name` with their `/`.
    CaptureRest(String),
    /// `#`, last: any number of levels, none kept.
    Rest,
}

/// A topic pattern: MQTT filter syntax plus named captures, each a whole level.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern {
    levels: Vec<Level>,
}

/// What a matching topic captured, by name; `topic` is always the whole topic.
pub type Captures<'t> = HashMap<&'t str, String>;

impl Pattern {
    /// Parses a pattern; the error says what is wrong with it.
    pub fn parse(text: &str) -> Result<Self, String> {
        if text.is_empty() {
            return Err("the topic pattern is empty".into());
        }
        let parts: Vec<&str> = text.split('/').collect();
        let mut levels = Vec::with_capacity(parts.len());
        for (index, part) in parts.iter().enumerate() {
            let last = index + 1 == parts.len();
            let level = match *part {
                "+" => Level::Any,
                "#" if last => Level::Rest,
                "#" => return Err("'#' may only be the last level".into()),
                part if part.starts_with('{') && part.ends_with('}') => {
                    let inner = &part[1..part.len() - 1];
                    let (name, rest) = match inner.strip_suffix("...") {
                        Some(name) => (name, true),
                        None => (inner, false),
                    };
                    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                        return Err(format!("{part:?}: a capture is {{name}} or {{name...}}, the name letters, digits and '_'"));
                    }
                    if name == "topic" {
                        return Err("{topic} is the whole topic and cannot be captured".into());
                    }
                    if rest { Level::CaptureRest(name.into()) } else { Level::Capture(name.into()) }
                }
                part if part.contains(['{', '}', '+', '#']) => {
                    return Err(format!(
                        "level {part:?}: a capture, '+' or '#' is a whole level (write {{device}}, not prefix_{{device}})"
                    ))
                }
                part => Level::Literal(part.into()),
            };
            levels.push(level);
        }
        let open_ended = levels
            .iter()
            .filter(|level| matches!(level, Level::CaptureRest(_) | Level::Rest))
            .count();
        if open_ended > 1 {
            return Err("at most one {name...} or '#' per pattern".into());
        }
        let mut names: Vec<&str> = levels
            .iter()
            .filter_map(|level| match level {
                Level::Capture(name) | Level::CaptureRest(name) => Some(name.as_str()),
                _ => None,
            })
            .collect();
        let count = names.len();
        names.sort_unstable();
        names.dedup();
        if names.len() != count {
            return Err("a capture name is used twice".into());
        }
        Ok(Self { levels })
    }

    /// The names this pattern captures.
    pub fn names(&self) -> impl Iterator<Item = &str> + Clone {
        self.levels.iter().filter_map(|level| match level {
            Level::Capture(name) | Level::CaptureRest(name) => Some(name.as_str()),
            _ => None,
        })
    }

    /// The MQTT filter that brings every topic this pattern matches (and, after a
    /// `{name...}`, others, which the pattern then does not match).
    pub fn filter(&self) -> String {
        let mut out: Vec<&str> = Vec::with_capacity(self.levels.len());
        for level in &self.levels {
            match level {
                Level::Literal(text) => out.push(text),
                Level::Any | Level::Capture(_) => out.push("+"),
                Level::CaptureRest(_) | Level::Rest => {
                    out.push("#");
                    break;
                }
            }
        }
        out.join("/")
    }

    /// The captures when `topic` matches.
    pub fn matches<'p>(&'p self, topic: &str) -> Option<Captures<'p>> {
        let topic_levels: Vec<&str> = topic.split('/').collect();
        self.matches_levels(topic, &topic_levels)
    }

    /// As [`Pattern::matches`], for a topic already split into its levels (a caller
    /// that tries several patterns splits it once).
    pub fn matches_levels<'p>(
        &'p self,
        topic: &str,
        topic_levels: &[&str],
    ) -> Option<Captures<'p>> {
        let open = self
            .levels
            .iter()
            .position(|level| matches!(level, Level::CaptureRest(_) | Level::Rest));
        let mut captures = Captures::new();
        let level_matches = |level: &'p Level, text: &str, captures: &mut Captures<'p>| match level
        {
            Level::Literal(literal) => literal == text,
            Level::Any => true,
            // An empty level names nothing.
            Level::Capture(name) if !text.is_empty() => {
                captures.insert(name.as_str(), text.to_string());
                true
            }
            Level::Capture(_) => false,
            Level::CaptureRest(_) | Level::Rest => false,
        };
        match open {
            None => {
                if topic_levels.len() != self.levels.len() {
                    return None;
                }
                for (level, text) in self.levels.iter().zip(topic_levels) {
                    if !level_matches(level, text, &mut captures) {
                        return None;
                    }
                }
            }
            Some(at) => {
                let before = &self.levels[..at];
                let after = &self.levels[at + 1..];
                let least = match self.levels[at] {
                    Level::Rest => 0,
                    _ => 1,
                };
                if topic_levels.len() < before.len() + after.len() + least {
                    return None;
                }
                let tail = topic_levels.len() - after.len();
                for (level, text) in before.iter().zip(topic_levels) {
                    if !level_matches(level, text, &mut captures) {
                        return None;
                    }
                }
                for (level, text) in after.iter().zip(&topic_levels[tail..]) {
                    if !level_matches(level, text, &mut captures) {
                        return None;
                    }
                }
                if let Level::CaptureRest(name) = &self.levels[at] {
                    let levels = &topic_levels[at..tail];
                    if levels.iter().all(|level| level.is_empty()) {
                        return None;
                    }
                    captures.insert(name.as_str(), levels.join("/"));
                }
            }
        }
        captures.insert("topic", topic.to_string());
        Some(captures)
    }
}

/// Text with `{name}` parts filled from a pattern's captures.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    parts: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    Name(String),
}

impl Template {
    /// Parses `text`; every `{name}` must be one of `names` (or `topic`).
    pub fn parse<'n>(
        text: &str,
        names: impl Iterator<Item = &'n str> + Clone,
    ) -> Result<Self, String> {
        let mut parts = Vec::new();
        let mut rest = text;
        while let Some(open) = rest.find('{') {
            if open > 0 {
                parts.push(Part::Text(rest[..open].into()));
            }
            let Some(close) = rest[open..].find('}') else {
                return Err(format!("{text:?}: a '{{' without its '}}'"));
            };
            let name = &rest[open + 1..open + close];
            if name != "topic" && !names.clone().any(|known| known == name) {
                let known: Vec<&str> = names.clone().collect();
                return Err(format!(
                    "{text:?} uses {{{name}}}, which the topic pattern does not capture (it captures: {}topic)",
                    known.iter().map(|name| format!("{name}, ")).collect::<String>()
                ));
            }
            parts.push(Part::Name(name.into()));
            rest = &rest[open + close + 1..];
        }
        if !rest.is_empty() {
            parts.push(Part::Text(rest.into()));
        }
        if parts.is_empty() {
            return Err("an empty name".into());
        }
        Ok(Self { parts })
    }

    /// The text with the captures filled in.
    pub fn fill(&self, captures: &Captures<'_>) -> String {
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Text(text) => out.push_str(text),
                Part::Name(name) => {
                    out.push_str(captures.get(name.as_str()).map_or("", String::as_str))
                }
            }
        }
        out
    }
}

/// Checks an MQTT topic filter (`+` and `#` as whole levels, `#` last).
pub fn check_filter(filter: &str) -> Result<(), String> {
    let levels: Vec<&str> = filter.split('/').collect();
    for (index, level) in levels.iter().enumerate() {
        let bad = match *level {
            "+" => false,
            "#" => index + 1 != levels.len(),
            level => level.contains(['+', '#']),
        };
        if bad || filter.is_empty() {
            return Err(format!("{filter:?} is not an MQTT topic filter"));
        }
    }
    Ok(())
}

/// Whether filter `wide` matches every topic filter `narrow` matches.
pub fn covers(wide: &str, narrow: &str) -> bool {
    let mut wide_levels = wide.split('/');
    let mut narrow_levels = narrow.split('/');
    loop {
        match (wide_levels.next(), narrow_levels.next()) {
            (Some("#"), _) => return true,
            (None, None) => return true,
            (Some("+"), Some(level)) if level != "#" => {}
            (Some(w), Some(n)) if w == n => {}
            _ => return false,
        }
    }
}

/// The filters without those another one covers, in their first order.
pub fn minimal_filters(filters: impl IntoIterator<Item = String>) -> Vec<String> {
    let mut all: Vec<String> = Vec::new();
    for filter in filters {
        if !all.contains(&filter) {
            all.push(filter);
        }
    }
    all.iter()
        .enumerate()
        .filter(|(index, filter)| {
            !all.iter().enumerate().any(|(other, wide)| {
                other != *index && covers(wide, filter) && !(covers(filter, wide) && other > *index)
            })
        })
        .map(|(_, filter)| filter.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn captured(pattern: &str, topic: &str) -> Option<Vec<(String, String)>> {
        let pattern = Pattern::parse(pattern).expect("valid pattern");
        let captures = pattern.matches(topic)?;
        let mut out: Vec<(String, String)> = captures
            .into_iter()
            .filter(|(name, _)| *name != "topic")
            .map(|(name, value)| (name.to_string(), value))
            .collect();
        out.sort();
        Some(out)
    }

    fn pairs(list: &[(&str, &str)]) -> Option<Vec<(String, String)>> {
        Some(
            list.iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect(),
        )
    }

    #[test]
    fn patterns_capture_whole_levels() {
        assert_eq!(
            captured("tele/{device}/SENSOR", "tele/plug_1/SENSOR"),
            pairs(&[("device", "plug_1")])
        );
        assert_eq!(captured("tele/{device}/SENSOR", "tele/a/b/SENSOR"), None);
        assert_eq!(captured("tele/{device}/SENSOR", "tele/plug_1/STATE"), None);
        assert_eq!(
            captured(
                "zigbee2mqtt/{device...}/availability",
                "zigbee2mqtt/kitchen/floor_light/availability"
            ),
            pairs(&[("device", "kitchen/floor_light")])
        );
        assert_eq!(
            captured(
                "zigbee2mqtt/{device...}/availability",
                "zigbee2mqtt/availability"
            ),
            None
        );
        assert_eq!(
            captured(
                "{device...}/sensor/{measurement}/state",
                "home/esp/node1/sensor/outdoor_temperature/state"
            ),
            pairs(&[
                ("device", "home/esp/node1"),
                ("measurement", "outdoor_temperature")
            ])
        );
        assert_eq!(captured("/sensor/#", "/sensor"), pairs(&[]));
        assert_eq!(captured("tele/{device}/SENSOR", "tele//SENSOR"), None);
        assert_eq!(
            captured("z/{device...}/availability", "z//availability"),
            None
        );
        assert_eq!(captured("/sensor/#", "/sensor/a/b"), pairs(&[]));
        assert_eq!(captured("/sensor/+", "/sensor/a/b"), None);
        assert_eq!(
            captured("{domain}/{entity}", "sensor/x"),
            pairs(&[("domain", "sensor"), ("entity", "x")])
        );
    }

    #[test]
    fn bad_patterns_say_why() {
        for (bad, why) in [
            ("", "empty"),
            ("a/#/b", "last level"),
            ("tele/tasmota_{device}/SENSOR", "whole level"),
            ("a/{device...}/{rest...}", "at most one"),
            ("a/{device...}/#", "at most one"),
            ("{a}/{a}", "twice"),
            ("{}/x", "capture is"),
            ("{topic}/x", "whole topic"),
            ("a+/b", "whole level"),
        ] {
            let error = Pattern::parse(bad).expect_err(bad);
            assert!(error.contains(why), "{bad}: {error}");
        }
    }

    #[test]
    fn filters_come_from_patterns() {
        let filter = |pattern: &str| Pattern::parse(pattern).expect("valid").filter();
        assert_eq!(filter("tele/{device}/SENSOR"), "tele/+/SENSOR");
        assert_eq!(
            filter("zigbee2mqtt/{device...}/availability"),
            "zigbee2mqtt/#"
        );
        assert_eq!(filter("{device}/+/{measurement}/state"), "+/+/+/state");
        assert_eq!(filter("/sensor/#"), "/sensor/#");
    }

    #[test]
    fn templates_fill_from_captures() {
        let pattern = Pattern::parse("homeassistant/{domain}/{entity}/state").expect("valid");
        let template = Template::parse("{domain}.{entity}", pattern.names()).expect("valid");
        let captures = pattern
            .matches("homeassistant/sensor/outside/state")
            .expect("matches");
        assert_eq!(template.fill(&captures), "sensor.outside");
        assert_eq!(
            Template::parse("{topic}", pattern.names())
                .expect("valid")
                .fill(&captures),
            "homeassistant/sensor/outside/state"
        );
        assert_eq!(
            Template::parse("bridge", pattern.names())
                .expect("valid")
                .fill(&captures),
            "bridge"
        );
        let error = Template::parse("{device}", pattern.names()).expect_err("not captured");
        assert!(error.contains("captures: domain, entity, topic"), "{error}");
        assert!(Template::parse("{domain", pattern.names()).is_err());
    }

    #[test]
    fn covered_filters_are_left_out() {
        assert!(covers("zigbee2mqtt/#", "zigbee2mqtt/bridge/state"));
        assert!(covers("a/#", "a"));
        assert!(covers("+/+/+/state", "a/+/b/state"));
        assert!(!covers("+/status", "+/status/+"));
        assert!(!covers("a/+", "a/#"));
        assert_eq!(
            minimal_filters(
                [
                    "zigbee2mqtt/bridge/state",
                    "zigbee2mqtt/#",
                    "tele/+/LWT",
                    "zigbee2mqtt/#",
                    "tele/+/SENSOR"
                ]
                .map(String::from)
            ),
            ["zigbee2mqtt/#", "tele/+/LWT", "tele/+/SENSOR"]
        );
        assert!(check_filter("a/+/#").is_ok());
        assert!(check_filter("a/#/b").is_err());
        assert!(check_filter("a/b+").is_err());
    }
}
