//! A preset's topics as the device's owner laid them out: `--ingest
//! tasmota:fulltopic=home/%prefix%/%topic%/`, `esphome:topic_prefix=home/{device}`,
//! `zigbee2mqtt:base_topic=home/zigbee`. A preset's `[layout]` table names its one
//! parameter, how it changes the topics, and the firmware's default; its rules are
//! written in the default layout and rewritten here before they are checked.

use serde::Deserialize;

/// A preset's `[layout]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Layout {
    /// The parameter's name, as the firmware's settings call it (`fulltopic`).
    pub parameter: String,
    pub kind: LayoutKind,
    /// The value the rules are written for (`%prefix%/%topic%/`, `zigbee2mqtt`).
    pub default: String,
}

/// How a layout parameter changes a rule's topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LayoutKind {
    /// Tasmota's FullTopic: `%prefix%` (tele, stat, cmnd) and `%topic%` (the device;
    /// `%hostname%` or `%id%` where FullTopic uses those instead) in any order and
    /// depth, ending with `/`; the rest of the topic follows it.
    Fulltopic,
    /// A base topic of any depth in place of the default's first level (Zigbee2MQTT's
    /// and Home Assistant statestream's `base_topic`).
    Root,
    /// A prefix of any depth in place of the `{device}` level the topics start with
    /// (ESPHome's `topic_prefix`, Shelly Gen2's topic prefix). `{device}` in it marks
    /// the level that names the device; without it the prefix is one device's, named
    /// by its last level.
    DevicePrefix,
}

/// `NAME:PARAMETER=VALUE`: the preset's name, the parameter and its value, when
/// `source` has that form and NAME is one of `presets`.
pub fn split_source<'a>(source: &'a str, presets: &[&str]) -> Option<(&'a str, &'a str, &'a str)> {
    let (name, setting) = source.split_once(':')?;
    let (parameter, value) = setting.split_once('=')?;
    presets.contains(&name).then_some((name, parameter, value))
}

/// A value checked for its kind: levels of letters, digits and `_.-` (and the
/// kind's placeholders), none empty, no MQTT wildcard.
pub fn check_value(kind: LayoutKind, parameter: &str, value: &str) -> Result<(), String> {
    let body = match kind {
        LayoutKind::Fulltopic => value.strip_suffix('/').unwrap_or(value),
        _ => value,
    };
    let allowed = |c: char| c.is_ascii_alphanumeric() || "_.-".contains(c);
    let placeholder_ok = |level: &str| match kind {
        LayoutKind::Fulltopic => {
            ["%prefix%", "%topic%", "%hostname%", "%id%"].contains(&level)
                || level.chars().all(allowed)
        }
        LayoutKind::DevicePrefix => level == "{device}" || level.chars().all(allowed),
        LayoutKind::Root => level.chars().all(allowed),
    };
    if body.is_empty()
        || body
            .split('/')
            .any(|level| level.is_empty() || !placeholder_ok(level))
    {
        return Err(format!(
            "{parameter}={value:?}: expected topic levels of letters, digits and _.- (no '+', '#' or empty level){}",
            match kind {
                LayoutKind::Fulltopic => ", with %prefix% and %topic% (or %hostname% or %id%) as whole levels",
                LayoutKind::DevicePrefix => ", {device} as a whole level where the device's name is",
                LayoutKind::Root => "",
            }
        ));
    }
    let levels: Vec<&str> = body.split('/').collect();
    match kind {
        LayoutKind::Fulltopic => {
            if !levels.contains(&"%prefix%") || device_placeholder(&levels).is_none() {
                return Err(format!(
                    "{parameter}={value:?}: a FullTopic has %prefix% and %topic% (or %hostname% or %id%)"
                ));
            }
        }
        LayoutKind::DevicePrefix => {
            if levels.iter().filter(|level| **level == "{device}").count() > 1 {
                return Err(format!("{parameter}={value:?}: {{device}} at most once"));
            }
        }
        LayoutKind::Root => {}
    }
    Ok(())
}

/// The FullTopic level that names the device: `%topic%`, else `%hostname%`, else `%id%`.
fn device_placeholder<'a>(levels: &[&'a str]) -> Option<&'a str> {
    ["%topic%", "%hostname%", "%id%"]
        .into_iter()
        .find(|placeholder| levels.contains(placeholder))
}

/// A rule's topic (or filter, with `capture` `+` for the device level) rewritten from
/// the default layout to `value`; a topic outside the layout is kept as it is.
pub fn rewrite(kind: LayoutKind, default: &str, value: &str, topic: &str, capture: &str) -> String {
    match kind {
        LayoutKind::Root => match topic.strip_prefix(default) {
            Some(rest) if rest.is_empty() || rest.starts_with('/') => format!("{value}{rest}"),
            _ => topic.to_string(),
        },
        LayoutKind::DevicePrefix => match topic.strip_prefix(capture) {
            Some(rest) if rest.starts_with('/') => {
                format!("{}{rest}", value.replace("{device}", capture))
            }
            _ => topic.to_string(),
        },
        LayoutKind::Fulltopic => {
            // tele/{device}/SENSOR: the prefix, the device level, the rest.
            let mut levels = topic.splitn(3, '/');
            let (Some(prefix), Some(device), rest) = (levels.next(), levels.next(), levels.next())
            else {
                return topic.to_string();
            };
            if !["tele", "stat", "cmnd"].contains(&prefix) || device != capture {
                return topic.to_string();
            }
            let body = value.strip_suffix('/').unwrap_or(value);
            let body_levels: Vec<&str> = body.split('/').collect();
            let named = device_placeholder(&body_levels);
            let filled: Vec<String> = body_levels
                .iter()
                .map(|level| match *level {
                    "%prefix%" => prefix.to_string(),
                    placeholder if Some(placeholder) == named => capture.to_string(),
                    "%topic%" | "%hostname%" | "%id%" => "+".to_string(),
                    other => other.to_string(),
                })
                .collect();
            match rest {
                Some(rest) => format!("{}/{rest}", filled.join("/")),
                None => filled.join("/"),
            }
        }
    }
}

/// The device a rule names when a device prefix has no `{device}`: the prefix's last
/// level (`home/living_room` is the node `living_room`).
pub fn fixed_device(kind: LayoutKind, value: &str) -> Option<String> {
    (kind == LayoutKind::DevicePrefix && !value.contains("{device}"))
        .then(|| value.rsplit('/').next().unwrap_or(value).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tasmota_fulltopic_moves_prefix_and_topic_where_the_owner_put_them() {
        let fulltopic = "emoncms/ch2i/factory/%topic%/%prefix%/";
        assert_eq!(
            check_value(LayoutKind::Fulltopic, "fulltopic", fulltopic),
            Ok(())
        );
        let moved = |topic| {
            rewrite(
                LayoutKind::Fulltopic,
                "%prefix%/%topic%/",
                fulltopic,
                topic,
                "{device}",
            )
        };
        assert_eq!(
            moved("tele/{device}/SENSOR"),
            "emoncms/ch2i/factory/{device}/tele/SENSOR"
        );
        assert_eq!(
            moved("stat/{device}/{measurement}"),
            "emoncms/ch2i/factory/{device}/stat/{measurement}"
        );
        assert_eq!(moved("cmnd/{device}"), "emoncms/ch2i/factory/{device}/cmnd");
        assert_eq!(
            moved("other/{device}/x"),
            "other/{device}/x",
            "not of the layout"
        );
        let default = rewrite(
            LayoutKind::Fulltopic,
            "%prefix%/%topic%/",
            "%prefix%/%topic%/",
            "tele/{device}/LWT",
            "{device}",
        );
        assert_eq!(default, "tele/{device}/LWT");
        let both = rewrite(
            LayoutKind::Fulltopic,
            "",
            "%prefix%/%hostname%/%topic%/",
            "tele/{device}/LWT",
            "{device}",
        );
        assert_eq!(
            both, "tele/+/{device}/LWT",
            "%topic% names the device, %hostname% is any"
        );
        for bad in [
            "%topic%/",
            "%prefix%/",
            "a/%prefix%/%topic%/#/",
            "a//%prefix%/%topic%/",
            "x%prefix%/%topic%/",
            "",
        ] {
            assert!(
                check_value(LayoutKind::Fulltopic, "fulltopic", bad).is_err(),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn a_base_topic_replaces_the_first_level_and_a_prefix_the_device_level() {
        let root = |topic| {
            rewrite(
                LayoutKind::Root,
                "zigbee2mqtt",
                "home/zigbee",
                topic,
                "{device}",
            )
        };
        assert_eq!(
            root("zigbee2mqtt/{device...}/availability"),
            "home/zigbee/{device...}/availability"
        );
        assert_eq!(root("zigbee2mqtt/bridge"), "home/zigbee/bridge");
        assert_eq!(root("zigbee2mqtt"), "home/zigbee");
        assert_eq!(root("zigbee2mqttx/a"), "zigbee2mqttx/a");
        let prefix = |value, topic, capture| {
            rewrite(LayoutKind::DevicePrefix, "{device}", value, topic, capture)
        };
        assert_eq!(
            prefix(
                "home/{device}",
                "{device}/+/{measurement}/state",
                "{device}"
            ),
            "home/{device}/+/{measurement}/state"
        );
        assert_eq!(prefix("home/{device}", "+/status", "+"), "home/+/status");
        assert_eq!(
            prefix("home/living_room", "{device}/status", "{device}"),
            "home/living_room/status"
        );
        assert_eq!(
            prefix("home/{device}", "shellies/{device}/online", "{device}"),
            "shellies/{device}/online"
        );
        assert_eq!(
            fixed_device(LayoutKind::DevicePrefix, "home/living_room").as_deref(),
            Some("living_room")
        );
        assert_eq!(
            fixed_device(LayoutKind::DevicePrefix, "home/{device}"),
            None
        );
        assert!(check_value(
            LayoutKind::DevicePrefix,
            "topic_prefix",
            "home/{device}/{device}"
        )
        .is_err());
        assert!(check_value(LayoutKind::Root, "base_topic", "home/+").is_err());
        assert!(check_value(LayoutKind::Root, "base_topic", "home/zigbee").is_ok());
    }

    #[test]
    fn only_a_known_preset_takes_a_parameter() {
        let presets = ["tasmota", "esphome"];
        assert_eq!(
            split_source("tasmota:fulltopic=a/%prefix%/%topic%/", &presets),
            Some(("tasmota", "fulltopic", "a/%prefix%/%topic%/"))
        );
        assert_eq!(split_source("/etc/iot/my:file.toml", &presets), None);
        assert_eq!(split_source("tasmota", &presets), None);
    }
}
