//! The ingest contract: each preset on the firmware documentation's messages
//! (`tests/fixtures/ingest/`), bad mapping files, and any input never panicking.

use super::*;
use std::collections::BTreeMap;

use super::fixtures::{laid_out, messages, Expect, Message, ALL_PRESETS as ALL, LAYOUTS};

fn at() -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2026-11-27T12:00:00Z")
        .expect("valid")
        .with_timezone(&Utc)
}

fn berlin() -> Tz {
    Tz::from_str("Europe/Berlin").expect("a zone")
}

fn mapping(sources: &[&str]) -> Mapping {
    let sources: Vec<String> = sources.iter().map(|source| source.to_string()).collect();
    Mapping::load(&sources, berlin()).unwrap_or_else(|error| panic!("{error}"))
}

#[test]
fn the_sparkplug_preset_hands_its_namespace_to_the_host() {
    let sparkplug = mapping(&["sparkplug", "tasmota"]);
    assert!(sparkplug.reads_sparkplug());
    assert!(!mapping(&["tasmota"]).reads_sparkplug());
    assert!(sparkplug.filters().contains(&"spBv1.0/#".to_string()));
    let birth = crate::sparkplug::proto::Payload {
        seq: Some(0),
        ..Default::default()
    };
    let payload = prost::Message::encode_to_vec(&birth);
    let topic = "spBv1.0/plant/NBIRTH/press-1";
    // Without the host, flagged; with it, a birth (a status change).
    assert!(matches!(
        sparkplug.read(topic, &payload, at()),
        Record::Unparsed { .. }
    ));
    let mut host = crate::sparkplug::Host::new(std::time::Duration::from_secs(2));
    let record = sparkplug.read_with(Some(&mut host), topic, &payload, at());
    assert!(
        matches!(&record, Record::Status { device, online: true, .. } if device == "plant/press-1"),
        "{record:?}"
    );
    // Other presets' topics are theirs still.
    let tasmota = sparkplug.read_with(Some(&mut host), "tele/plug/STATE", b"{}", at());
    assert!(matches!(tasmota, Record::Nothing { .. }), "{tasmota:?}");
    // The rule names the namespace and nothing else; the preset takes no layout.
    for (text, expected) in [
        (
            "[[rule]]\ntopic = \"spBv1.0/+/NDATA/#\"\nkind = \"sparkplug\"\n",
            "topic = \"spBv1.0/#\"",
        ),
        (
            "[[rule]]\ntopic = \"spBv1.0/#\"\nkind = \"sparkplug\"\npayload = \"json\"\n",
            "nothing else",
        ),
    ] {
        let error = parse("f.toml", text, None).expect_err("refused");
        assert!(error.contains(expected), "{error}");
    }
    let error =
        Mapping::load(&["sparkplug:topic_prefix=x".to_string()], berlin()).expect_err("no layout");
    assert!(error.contains("sparkplug"), "{error}");
}

/// Checks what `mapping` makes of the fixture messages of `preset` (every preset's
/// when `None`).
fn check_fixtures(mapping: &Mapping, preset: Option<&str>) {
    for message in messages() {
        if preset.is_some_and(|preset| preset != message.preset) {
            continue;
        }
        check_message(mapping, &message);
    }
}

/// Checks what `mapping` makes of one fixture message.
fn check_message(mapping: &Mapping, message: &Message) {
    let topic = message.topic.as_str();
    let record = mapping.read(topic, &message.payload, at());
    let context = format!(
        "{topic} {:?}: {record:?}",
        String::from_utf8_lossy(&message.payload)
    );
    match message.expect.clone() {
        Expect::Nothing => assert!(matches!(record, Record::Nothing { .. }), "{context}"),
        Expect::Flagged => assert!(matches!(record, Record::Unparsed { .. }), "{context}"),
        Expect::Status { device, online } => {
            let Record::Status {
                device: got,
                online: got_online,
                document,
            } = record
            else {
                panic!("not a status: {context}");
            };
            assert_eq!((got, got_online), (device, online), "{context}");
            assert_eq!(document.get_str("topic"), Ok(topic));
        }
        Expect::Readings {
            device,
            ts,
            readings,
        } => {
            let Record::Readings {
                documents,
                keyed: false,
            } = record
            else {
                panic!("not readings: {context}");
            };
            let mut got = BTreeMap::new();
            for document in &documents {
                assert_eq!(
                    document.get_str("device").ok(),
                    device.as_deref(),
                    "{context}"
                );
                assert_eq!(document.get_str("topic"), Ok(topic));
                let stored_ts = document.get_datetime("ts").expect("ts").to_chrono();
                assert_eq!(stored_ts, ts.unwrap_or(at()), "{context}");
                got.insert(
                    document
                        .get_str("measurement")
                        .expect("measurement")
                        .to_string(),
                    (
                        document.get_f64("value").expect("a double"),
                        document.get_str("unit").ok().map(String::from),
                    ),
                );
            }
            assert_eq!(got, readings, "{topic}");
        }
    }
}

#[test]
fn a_preset_with_the_owners_layout_reads_the_same_messages_the_same() {
    for (preset, source) in LAYOUTS {
        let mapping = mapping(&[source]);
        let mut moved = 0;
        for message in messages().iter().filter(|message| message.preset == preset) {
            let laid_out = laid_out(message);
            moved += usize::from(laid_out.topic != message.topic);
            check_message(&mapping, &laid_out);
        }
        assert!(moved >= 5, "{source}: only {moved} topics moved");
    }
    // The issue's own cases: Tasmota's FullTopic as pasted, a node with a fixed prefix.
    let tasmota = mapping(&["tasmota:fulltopic=emoncms/ch2i/factory/%topic%/%prefix%/"]);
    let Record::Readings { documents, .. } = tasmota.read(
        "emoncms/ch2i/factory/denky_D6C0C0/tele/SENSOR",
        br#"{"Time":"2026-11-27T13:00:00","ENERGY":{"Power":12.5}}"#,
        at(),
    ) else {
        panic!("not read");
    };
    assert_eq!(documents[0].get_str("device"), Ok("denky_D6C0C0"));
    let esphome = mapping(&["esphome:topic_prefix=home/living_room"]);
    let Record::Readings { documents, .. } =
        esphome.read("home/living_room/sensor/pressure/state", b"1012.5", at())
    else {
        panic!("not read");
    };
    assert_eq!(documents[0].get_str("device"), Ok("living_room"));
    assert_eq!(documents[0].get_str("measurement"), Ok("pressure"));
}

#[test]
fn a_layout_parameter_that_makes_no_sense_is_one_clear_error() {
    for (source, says) in [
        ("tasmota:fulltopic=home/%topic%/", "%prefix%"),
        ("tasmota:fulltopic=home/#/%prefix%/%topic%/", "no '+', '#'"),
        ("tasmota:base_topic=home", "takes fulltopic=VALUE"),
        ("default:prefix=x", "takes no parameter"),
        ("zigbee2mqtt:base_topic=", "no '+', '#' or empty level"),
        (
            "esphome:topic_prefix=a/{device}/{device}",
            "{device} at most once",
        ),
    ] {
        let error = Mapping::load(&[source.to_string()], berlin()).expect_err(source);
        assert!(
            error.contains(says) && error.contains("--ingest"),
            "{source}: {error}"
        );
        assert_eq!(error.lines().count(), 1, "{error}");
    }
}

#[test]
fn every_preset_reads_its_firmware_messages() {
    for preset in ALL.iter().filter(|preset| **preset != "default") {
        let of_preset = messages()
            .iter()
            .filter(|message| message.preset == *preset)
            .count();
        assert!(
            of_preset >= 8,
            "{preset}: at least 8 messages, {of_preset} found"
        );
        check_fixtures(&mapping(&[preset]), Some(preset));
    }
}

#[test]
fn all_presets_together_read_each_one_s_messages_the_same() {
    check_fixtures(&mapping(&ALL), None);
}

#[test]
fn every_preset_loads_and_subscribes_to_what_its_rules_read() {
    for (name, _) in PRESETS {
        let filters = mapping(&[name]).filters();
        assert!(!filters.is_empty(), "{name}");
    }
    assert_eq!(mapping(&["default"]).filters(), ["/device/#", "/sensor/#"]);
    assert_eq!(Mapping::builtin().filters(), ["/device/#", "/sensor/#"]);
    assert_eq!(
        mapping(&["tasmota"]).filters(),
        ["tele/+/LWT", "tele/+/SENSOR", "tele/+/STATE", "stat/+/+"]
    );
    assert_eq!(mapping(&["zigbee2mqtt"]).filters(), ["zigbee2mqtt/#"]);
    assert_eq!(
        mapping(&["homeassistant"]).filters(),
        ["homeassistant/+/+/+"]
    );
}

#[test]
fn the_default_mapping_reads_the_project_s_own_forms() {
    let default = Mapping::builtin();
    let Record::Readings {
        documents,
        keyed: false,
    } = default.read("/sensor/temperature", b"23.41", at())
    else {
        panic!("not a reading");
    };
    assert_eq!(documents[0].get_f64("value"), Ok(23.41));
    assert_eq!(documents[0].get_str("measurement"), Ok("temperature"));
    assert!(documents[0].get("device").is_none());

    let json = br#"{"device":"temp-0007","boot":"b1","seq":3,"ts":"2026-11-24T10:00:00.000Z","value":21.5,"unit":"C"}"#;
    let Record::Readings {
        documents,
        keyed: true,
    } = default.read("/sensor/temp-0007/temperature", json, at())
    else {
        panic!("not a keyed reading");
    };
    assert_eq!(
        documents[0].get_document("_id"),
        Ok(&doc! { "device": "temp-0007", "boot": "b1", "seq": 3_i64 })
    );
    assert_eq!(documents[0].get_str("measurement"), Ok("temperature"));

    // Deeper topics, and anything --topic brings, in the reading form or flagged.
    assert!(matches!(
        default.read("/sensor/a/b/c", b"1.5", at()),
        Record::Readings { .. }
    ));
    assert!(matches!(
        default.read("other/topic", b"{broken", at()),
        Record::Unparsed { .. }
    ));
    // A status payload that is not one is read as a reading, as it always was.
    assert!(matches!(
        default.read("/device/status", b"rebooting", at()),
        Record::Unparsed { .. }
    ));
    let Record::Status {
        device,
        online: true,
        ..
    } = default.read(
        "/device/dev-0002/status",
        br#"{"device":"dev-0002","status":"online"}"#,
        at(),
    )
    else {
        panic!("not a status");
    };
    assert_eq!(device, "dev-0002");
}

#[test]
fn without_a_rule_for_the_topic_nothing_is_stored() {
    let tasmota = mapping(&["tasmota"]);
    assert!(matches!(
        tasmota.read("/sensor/temperature", b"23.41", at()),
        Record::Nothing { .. }
    ));
}

#[test]
fn local_device_time_follows_the_zone_and_its_daylight_saving() {
    let berlin = berlin();
    let read = |text: &str| parse_datetime(text, berlin).map(|time| time.to_rfc3339());
    assert_eq!(
        read("2026-11-24T11:00:00").as_deref(),
        Some("2026-11-24T10:00:00+00:00")
    );
    assert_eq!(
        read("2026-07-01T12:00:00").as_deref(),
        Some("2026-07-01T10:00:00+00:00")
    );
    assert_eq!(
        read("2026-07-01 12:00:00.250").as_deref(),
        Some("2026-07-01T10:00:00.250+00:00")
    );
    assert_eq!(
        read("2026-07-01T12:00:00+05:00").as_deref(),
        Some("2026-07-01T07:00:00+00:00")
    );
    assert_eq!(read("yesterday"), None);
}

#[test]
fn plain_values_and_globs() {
    for (text, value) in [
        ("23.41", Some(23.41)),
        (" -5 \n", Some(-5.0)),
        ("1e3", Some(1000.0)),
        ("ON", Some(1.0)),
        ("off", Some(0.0)),
        ("True", Some(1.0)),
        ("FALSE", Some(0.0)),
        ("nan", None),
        ("inf", None),
        ("None", None),
        ("unavailable", None),
        ("", None),
        ("12 °C", None),
    ] {
        assert_eq!(plain_value(text), value, "{text:?}");
    }
    assert!(glob_matches("*Temperature*", "BME280.Temperature"));
    assert!(glob_matches("*Temperature*", "ANALOG.Temperature1"));
    assert!(glob_matches("ENERGY.Power*", "ENERGY.Power.1"));
    assert!(!glob_matches("ENERGY.Power*", "ENERGY.ApparentPower.1"));
    assert!(glob_matches("relay/*/power", "relay/0/power"));
    assert!(!glob_matches("relay/*/power", "relay/0/energy"));
    assert!(glob_matches("temperature", "temperature"));
    assert!(!glob_matches("temperature", "local_temperature"));
    assert!(glob_matches("*", ""));
}

#[test]
fn too_many_measurements_are_flagged_not_multiplied() {
    let numbers = format!("[{}]", vec!["1"; MAX_MEASUREMENTS + 1].join(","));
    let record = mapping(&["zigbee2mqtt"]).read("zigbee2mqtt/big", numbers.as_bytes(), at());
    assert!(matches!(record, Record::Unparsed { .. }), "{record:?}");
}

/// Parses a mapping file and returns the error.
fn error_of(text: &str) -> String {
    parse("ingest/mine.toml", text, None).expect_err("a bad mapping")
}

#[test]
fn a_bad_mapping_file_names_the_file_the_rule_and_the_problem() {
    let cases = [
        (
            "[[rule]]\ntopic = \"a/{device}\"\n[[rule]]\ntopic = \"tele/{device/SENSOR\"\n",
            "rule 2 (topic \"tele/{device/SENSOR\")",
        ),
        (
            "[[rule]]\ntopic = \"a\"\npayload = \"xml\"\n",
            "rule 1 (line 3)",
        ),
        (
            "[[rule]]\ntopic = \"a\"\n[[rule]]\ntopic = \"b\"\ncolour = \"red\"\n",
            "rule 2 (line 5): unknown field `colour`",
        ),
        (
            "[[rule]]\ntopic = \"a/{x}\"\ndevice = \"{device}\"\n",
            "does not capture",
        ),
        (
            "[[rule]]\ntopic = \"a\"\nkind = \"status\"\npayload = \"json\"\n",
            "payload is for readings rules",
        ),
        (
            "[[rule]]\ntopic = \"a\"\nonline = [\"up\"]\n",
            "online is for status rules",
        ),
        (
            "[[rule]]\ntopic = \"a\"\nkind = \"status\"\nonline = [\"x\"]\noffline = [\"x\"]\n",
            "none in both",
        ),
        (
            "[[rule]]\ntopic = \"a\"\ntimezone = \"Mars/Base\"\n",
            "IANA zone",
        ),
        (
            "[[rule]]\ntopic = \"a\"\nfilter = \"a/#/b\"\n",
            "not an MQTT topic filter",
        ),
        (
            "[[rule]]\ntopic = \"a\"\nunits = { x = 1 }\n",
            "not a string",
        ),
        (
            "[[rule]]\ntopic = \"a\"\npayload = \"plain\"\nroot = \"params\"\n",
            "plain payloads",
        ),
        (
            "[[rule]]\ntopic = \"a\"\nkind = \"ignore\"\nskip = [\"x\"]\n",
            "ignore rule",
        ),
        (
            "[[rule]]\ntopic = \"a/{device}\"\ntrust_payload_device = true\n",
            "this one names it",
        ),
        (
            "[[rule]]\ntopic = \"a\"\nkind = \"ignore\"\ntrust_payload_device = false\n",
            "ignore rule",
        ),
        ("# nothing\n", "no [[rule]]"),
        ("[[rule]\n", "line 1"),
    ];
    for (text, needle) in cases {
        let error = error_of(text);
        assert!(error.starts_with("ingest/mine.toml: "), "{error}");
        assert!(error.contains(needle), "{needle:?} not in {error:?}");
        assert!(!error.contains('\n'), "one line: {error:?}");
    }
    let missing = Mapping::load(&["no-such-preset".into()], Tz::UTC).expect_err("unknown");
    assert!(missing.contains("tasmota, zigbee2mqtt"), "{missing}");
    assert!(missing.contains("a path or a .toml name"), "{missing}");
    let unreadable =
        Mapping::load(&["/nonexistent/mine.toml".into()], Tz::UTC).expect_err("unreadable");
    assert!(
        unreadable.contains("/nonexistent/mine.toml"),
        "{unreadable}"
    );
}

mod properties {
    //! Any JSON and any bytes, under every rule of every preset: no panic, and no
    //! measurement from a string other than exactly "ON"/"OFF".

    use super::*;
    use proptest::prelude::*;

    fn json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<f64>()
                .prop_map(|number| serde_json::Number::from_f64(number)
                    .map_or(Value::Null, Value::Number)),
            any::<i64>().prop_map(|number| Value::Number(number.into())),
            prop_oneof![
                Just("ON".to_string()),
                Just("on".to_string()),
                Just("12.5".to_string()),
                ".{0,8}"
            ]
            .prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 64, 6, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                proptest::collection::btree_map("[A-Za-z_:.]{1,8}", inner, 0..6)
                    .prop_map(|map| Value::Object(map.into_iter().collect())),
            ]
        })
    }

    /// The values a JSON value's numbers, booleans and "ON"/"OFF" stand for: the only
    /// things a measurement may come from.
    fn measurable(value: &Value) -> Vec<f64> {
        match value {
            Value::Number(number) => number.as_f64().into_iter().collect(),
            Value::Bool(flag) => vec![f64::from(u8::from(*flag))],
            Value::String(text) if text == "ON" => vec![1.0],
            Value::String(text) if text == "OFF" => vec![0.0],
            Value::String(_) | Value::Null => Vec::new(),
            Value::Array(items) => items.iter().flat_map(measurable).collect(),
            Value::Object(map) => map.values().flat_map(measurable).collect(),
        }
    }

    fn topics() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("tele/plug/SENSOR".to_string()),
            Just("zigbee2mqtt/a/b".to_string()),
            Just("shellyplus-1/events/rpc".to_string()),
            Just("shellyplus-1/status/switch:0".to_string()),
            Just("homeassistant/sensor/x/attr".to_string()),
            Just("node/sensor/t/state".to_string()),
            Just("/sensor/temperature".to_string()),
            "[a-z/+#]{0,20}",
        ]
    }

    proptest! {
        #[test]
        fn json_never_panics_and_strings_are_not_numbers(value in json(), topic in topics()) {
            let all = mapping(&ALL);
            let text = serde_json::to_vec(&value).expect("serializes");
            if let Record::Readings { documents, .. } = all.read(&topic, &text, at()) {
                // As the payload reads back.
                let sources = measurable(&serde_json::from_slice(&text).expect("JSON"));
                prop_assert!(documents.len() <= sources.len(), "{} documents from {}", documents.len(), value);
                for document in documents {
                    let stored = document.get_f64("value").ok();
                    prop_assert!(stored.is_some_and(f64::is_finite));
                    // Each value is one of the payload's numbers, booleans or ON/OFF:
                    // never a string's.
                    prop_assert!(stored.is_some_and(|stored| sources.contains(&stored)), "{document} from {value}");
                }
            }
        }

        #[test]
        fn any_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256), topic in topics()) {
            let _ = mapping(&ALL).read(&topic, &bytes, at());
        }
    }
}

/// A reading flagged for its value keeps its key where its device is vouched for (the
/// device's own topic, or a service's seed topic), so it is no hole to ask for again;
/// nowhere else.
#[test]
fn a_reading_flagged_for_its_value_is_keyed_where_its_device_is_vouched_for() {
    let default = mapping(&["default"]);
    let junk = br#"{"device":"evil","boot":"b1","seq":7,"value":"junk"}"#;
    let key_of = |topic: &str, payload: &[u8]| match default.read(topic, payload, at()) {
        Record::Unparsed { document } => document.get_document("_id").ok().map(|key| {
            (
                key.get_str("device").expect("device").to_string(),
                key.get_i64("seq").expect("seq"),
            )
        }),
        other => panic!("flagged, not {other:?}"),
    };
    assert_eq!(
        key_of("/sensor/evil/temperature", junk),
        Some(("evil".to_string(), 7))
    );
    // Without a device of its own, the topic's.
    assert_eq!(
        key_of(
            "/sensor/evil/temperature",
            br#"{"boot":"b1","seq":7,"value":[]}"#
        ),
        Some(("evil".to_string(), 7))
    );
    // The seed's topic: written by services only, so the payload's device is believed.
    assert_eq!(
        key_of("/sensor/temperature", junk),
        Some(("evil".to_string(), 7))
    );
    // Another device's name, no boot, a seq past its bound, not JSON: flagged unkeyed.
    for (topic, payload) in [
        ("/sensor/other/temperature", &junk[..]),
        (
            "/sensor/evil/temperature",
            br#"{"seq":7,"value":"junk"}"#.as_slice(),
        ),
        (
            "/sensor/evil/temperature",
            br#"{"boot":"b1","seq":0,"value":"junk"}"#.as_slice(),
        ),
        ("/sensor/evil/temperature", b"junk".as_slice()),
    ] {
        assert_eq!(key_of(topic, payload), None, "{topic} {payload:?}");
    }
}
