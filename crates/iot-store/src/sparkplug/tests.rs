//! The host against the specification's message flows, built with the same protobuf
//! types a node would use.

use super::*;
use proto::metric::Value;

const T0: u64 = 1_764_000_000_000;

fn at() -> DateTime<Utc> {
    DateTime::from_timestamp_millis(1_764_000_100_000).expect("a time")
}

fn metric(name: Option<&str>, alias: Option<u64>, datatype: DataType, value: Value) -> Metric {
    Metric {
        name: name.map(String::from),
        alias,
        timestamp: Some(T0),
        datatype: Some(datatype.number()),
        value: Some(value),
        ..Metric::default()
    }
}

fn bd_seq_metric(bd_seq: u64) -> Metric {
    metric(
        Some("bdSeq"),
        None,
        DataType::Int64,
        Value::LongValue(bd_seq),
    )
}

/// A node birth: bdSeq, Temperature (alias 1, Double), Count (alias 2, Int8), Running
/// (alias 3, Boolean), Rebirth, and a String.
fn node_birth(bd_seq: u64) -> Vec<u8> {
    encode(
        Some(0),
        vec![
            bd_seq_metric(bd_seq),
            metric(
                Some("Temperature"),
                Some(1),
                DataType::Double,
                Value::DoubleValue(21.5),
            ),
            metric(
                Some("Count"),
                Some(2),
                DataType::Int8,
                Value::IntValue(0xFF),
            ),
            metric(
                Some("Running"),
                Some(3),
                DataType::Boolean,
                Value::BooleanValue(true),
            ),
            metric(
                Some(REBIRTH_METRIC),
                Some(4),
                DataType::Boolean,
                Value::BooleanValue(false),
            ),
            metric(
                Some("Label"),
                Some(5),
                DataType::Other(12),
                Value::StringValue("line 1".into()),
            ),
        ],
    )
}

fn encode(seq: Option<u64>, metrics: Vec<Metric>) -> Vec<u8> {
    Payload {
        timestamp: Some(T0),
        metrics,
        seq,
        ..Payload::default()
    }
    .encode_to_vec()
}

/// Data by alias only, as nodes send it after their birth.
fn by_alias(seq: u64, alias: u64, value: Value, timestamp: u64) -> Vec<u8> {
    let mut metric = metric(None, Some(alias), DataType::Double, value);
    metric.datatype = None;
    metric.timestamp = Some(timestamp);
    encode(Some(seq), vec![metric])
}

const NBIRTH: &str = "spBv1.0/plant/NBIRTH/press-1";
const NDATA: &str = "spBv1.0/plant/NDATA/press-1";
const NDEATH: &str = "spBv1.0/plant/NDEATH/press-1";

fn host() -> Host {
    Host::new(Duration::from_secs(2))
}

/// (device, measurement, value) of each reading of a record.
fn values(record: &Record) -> Vec<(String, String, f64)> {
    documents_of(record)
        .iter()
        .map(|document| {
            (
                document.get_str("device").expect("device").to_string(),
                document
                    .get_str("measurement")
                    .expect("measurement")
                    .to_string(),
                document.get_f64("value").expect("value"),
            )
        })
        .collect()
}

/// (device, online) of each status of a record.
fn statuses(record: &Record) -> Vec<(String, bool)> {
    record
        .parts()
        .iter()
        .filter_map(|part| match part {
            Record::Status { device, online, .. } => Some((device.clone(), *online)),
            _ => None,
        })
        .collect()
}

fn flagged_why(record: &Record) -> String {
    match record {
        Record::Unparsed { document } => document.get_str("error").expect("error").to_string(),
        other => panic!("not flagged: {other:?}"),
    }
}

#[test]
fn a_birth_defines_the_metrics_that_data_names_by_alias() {
    let (mut host, now) = (host(), Instant::now());
    let birth = host.read(NBIRTH, &node_birth(7), at(), now);
    assert_eq!(statuses(&birth), [("plant/press-1".to_string(), true)]);
    // Int8 0xFF is -1; the string, bdSeq and the Rebirth metric are no readings.
    assert_eq!(
        values(&birth),
        [
            ("plant/press-1".into(), "Temperature".into(), 21.5),
            ("plant/press-1".into(), "Count".into(), -1.0),
            ("plant/press-1".into(), "Running".into(), 1.0),
        ]
    );
    assert_eq!(host.skipped().metrics, 3);
    let Record::Several(parts) = &birth else {
        panic!("a status and readings: {birth:?}")
    };
    let Record::Status { document, .. } = &parts[0] else {
        panic!("the status first")
    };
    assert_eq!(document.get_i64("bd_seq"), Ok(7));

    let data = host.read(
        NDATA,
        &by_alias(1, 1, Value::DoubleValue(22.25), T0 + 500),
        at(),
        now,
    );
    assert_eq!(
        values(&data),
        [("plant/press-1".into(), "Temperature".into(), 22.25)]
    );
    let documents = documents_of(&data);
    assert_eq!(
        documents[0]
            .get_datetime("ts")
            .map(|ts| ts.timestamp_millis()),
        Ok(i64::try_from(T0 + 500).expect("fits"))
    );
    assert_eq!(
        documents[0].get_document("_id"),
        Ok(&doc! {
            "device": "plant/press-1",
            "measurement": "Temperature",
            "ts": bson::DateTime::from_millis(i64::try_from(T0 + 500).expect("fits")),
            "value": 22.25,
        })
    );
    assert!(host.due(now).is_empty());
}

#[test]
fn devices_are_born_after_their_node_and_die_with_it() {
    let (mut host, now) = (host(), Instant::now());
    host.read(NBIRTH, &node_birth(1), at(), now);
    let device_birth = encode(
        Some(1),
        vec![metric(
            Some("Pressure"),
            Some(10),
            DataType::Float,
            Value::FloatValue(1.5),
        )],
    );
    let birth = host.read(
        "spBv1.0/plant/DBIRTH/press-1/gauge",
        &device_birth,
        at(),
        now,
    );
    assert_eq!(
        statuses(&birth),
        [("plant/press-1/gauge".to_string(), true)]
    );
    assert_eq!(
        values(&birth),
        [("plant/press-1/gauge".into(), "Pressure".into(), 1.5)]
    );
    let mut data = metric(None, Some(10), DataType::Float, Value::FloatValue(2.5));
    data.datatype = None;
    let data = host.read(
        "spBv1.0/plant/DDATA/press-1/gauge",
        &encode(Some(2), vec![data]),
        at(),
        now,
    );
    assert_eq!(
        values(&data),
        [("plant/press-1/gauge".into(), "Pressure".into(), 2.5)]
    );
    // The node's death takes its devices with it.
    let death = host.read(NDEATH, &encode(None, vec![bd_seq_metric(1)]), at(), now);
    assert_eq!(
        statuses(&death),
        [
            ("plant/press-1".to_string(), false),
            ("plant/press-1/gauge".to_string(), false)
        ]
    );
    // And a device's own death.
    host.read(NBIRTH, &node_birth(2), at(), now);
    host.read(
        "spBv1.0/plant/DBIRTH/press-1/gauge",
        &device_birth,
        at(),
        now,
    );
    let death = host.read(
        "spBv1.0/plant/DDEATH/press-1/gauge",
        &encode(Some(2), Vec::new()),
        at(),
        now,
    );
    assert_eq!(
        statuses(&death),
        [("plant/press-1/gauge".to_string(), false)]
    );
}

#[test]
fn a_late_death_of_an_earlier_session_changes_nothing() {
    let (mut host, now) = (host(), Instant::now());
    host.read(NBIRTH, &node_birth(4), at(), now);
    host.read(NBIRTH, &node_birth(5), at(), now);
    let late = host.read(NDEATH, &encode(None, vec![bd_seq_metric(4)]), at(), now);
    assert!(matches!(late, Record::Nothing { .. }), "{late:?}");
    assert_eq!(host.skipped().late_deaths, 1);
    // Still online: its data is read.
    let data = host.read(
        NDATA,
        &by_alias(1, 1, Value::DoubleValue(1.0), T0),
        at(),
        now,
    );
    assert_eq!(values(&data).len(), 1);
    let death = host.read(NDEATH, &encode(None, vec![bd_seq_metric(5)]), at(), now);
    assert_eq!(statuses(&death), [("plant/press-1".to_string(), false)]);
}

#[test]
fn a_seq_gap_that_lasts_the_reorder_timeout_gets_one_rebirth() {
    let (mut host, start) = (host(), Instant::now());
    host.read(NBIRTH, &node_birth(1), at(), start);
    host.read(
        NDATA,
        &by_alias(1, 1, Value::DoubleValue(1.0), T0 + 1),
        at(),
        start,
    );
    // 2 and 3 are lost.
    host.read(
        NDATA,
        &by_alias(4, 1, Value::DoubleValue(4.0), T0 + 4),
        at(),
        start,
    );
    assert!(host.due(start + Duration::from_millis(1999)).is_empty());
    let due = host.due(start + Duration::from_secs(2));
    let [rebirth] = &due[..] else {
        panic!("one rebirth: {due:?}")
    };
    assert_eq!(rebirth.topic, "spBv1.0/plant/NCMD/press-1");
    let command = Payload::decode(rebirth.payload.as_slice()).expect("a payload");
    assert_eq!(command.metrics[0].name.as_deref(), Some(REBIRTH_METRIC));
    assert_eq!(command.metrics[0].value, Some(Value::BooleanValue(true)));
    // Asked once: the same gap does not ask again.
    assert!(host.due(start + Duration::from_secs(10)).is_empty());

    // A gap filled by a reordered message within the timeout asks nothing; the numbers
    // wrap from 255 to 0.
    let (mut host, start) = (self::host(), Instant::now());
    host.read(NBIRTH, &node_birth(1), at(), start);
    for seq in 1..=255 {
        host.read(
            NDATA,
            &by_alias(seq, 1, Value::DoubleValue(1.0), T0),
            at(),
            start,
        );
    }
    host.read(
        NDATA,
        &by_alias(1, 1, Value::DoubleValue(1.0), T0),
        at(),
        start,
    );
    host.read(
        NDATA,
        &by_alias(0, 1, Value::DoubleValue(1.0), T0),
        at(),
        start,
    );
    assert!(host.due(start + Duration::from_secs(5)).is_empty());
}

#[test]
fn data_the_host_cannot_name_is_flagged_and_asks_a_rebirth_once_per_timeout() {
    let (mut host, now) = (host(), Instant::now());
    let before = host.read(
        NDATA,
        &by_alias(3, 1, Value::DoubleValue(1.0), T0),
        at(),
        now,
    );
    assert!(
        flagged_why(&before).contains("without a birth"),
        "{before:?}"
    );
    host.read(
        NDATA,
        &by_alias(4, 1, Value::DoubleValue(1.0), T0),
        at(),
        now,
    );
    let due = host.due(now);
    assert_eq!(due.len(), 1, "{due:?}");
    assert_eq!(due[0].node, "plant/press-1");

    host.read(NBIRTH, &node_birth(1), at(), now);
    let unknown = host.read(
        NDATA,
        &by_alias(1, 99, Value::DoubleValue(1.0), T0),
        at(),
        now,
    );
    assert!(flagged_why(&unknown).contains("alias 99"), "{unknown:?}");
    // Within the timeout of the last request: not asked again.
    assert!(host.due(now).is_empty());
    let later = now + Duration::from_secs(3);
    host.read(
        NDATA,
        &by_alias(2, 99, Value::DoubleValue(1.0), T0),
        at(),
        later,
    );
    assert_eq!(host.due(later).len(), 1);
    let device_data = host.read(
        "spBv1.0/plant/DDATA/press-1/never-born",
        &by_alias(3, 1, Value::DoubleValue(1.0), T0),
        at(),
        later,
    );
    assert!(flagged_why(&device_data).contains("device never-born"));
}

#[test]
fn what_is_not_sparkplug_is_flagged_and_commands_are_not_stored() {
    let (mut host, now) = (host(), Instant::now());
    assert!(flagged_why(&host.read(NBIRTH, b"\xff\xff\xff", at(), now)).contains("payload"));
    assert!(flagged_why(&host.read(NBIRTH, b"{\"json\":1}", at(), now)).contains("payload"));
    for topic in [
        "spBv1.0/plant/NBIRTH",
        "spBv1.0/plant/DDATA/press-1",
        "spBv1.0/plant/NDATA/press-1/extra",
        "spBv1.0/plant/XDATA/press-1",
        "spBv1.0/+/NDATA/press-1",
    ] {
        let record = host.read(topic, &node_birth(1), at(), now);
        assert!(
            flagged_why(&record).contains("topic"),
            "{topic}: {record:?}"
        );
    }
    for topic in ["spBv1.0/plant/NCMD/press-1", "spBv1.0/STATE/host-1"] {
        let record = host.read(topic, b"{}", at(), now);
        assert!(matches!(record, Record::Nothing { .. }), "{topic}");
    }
    // A birth without names or with one alias twice defines nothing.
    let twice = encode(
        Some(0),
        vec![
            metric(
                Some("a"),
                Some(1),
                DataType::Double,
                Value::DoubleValue(1.0),
            ),
            metric(
                Some("b"),
                Some(1),
                DataType::Double,
                Value::DoubleValue(1.0),
            ),
        ],
    );
    assert!(flagged_why(&host.read(NBIRTH, &twice, at(), now)).contains("alias 1"));
    assert_eq!(host.nodes(), 0, "no node learned from a bad birth");
}

#[test]
fn historical_values_keep_their_time_and_are_stored_once() {
    let (mut host, now) = (host(), Instant::now());
    host.read(NBIRTH, &node_birth(1), at(), now);
    let mut old = metric(None, Some(1), DataType::Double, Value::DoubleValue(19.0));
    old.is_historical = Some(true);
    old.timestamp = Some(T0 - 3_600_000);
    let first = host.read(NDATA, &encode(Some(1), vec![old.clone()]), at(), now);
    let again = host.read(NDATA, &encode(Some(2), vec![old]), at(), now);
    let (first, again) = (documents_of(&first), documents_of(&again));
    assert_eq!(
        first[0].get_datetime("ts").map(|ts| ts.timestamp_millis()),
        Ok(i64::try_from(T0 - 3_600_000).expect("fits"))
    );
    assert_eq!(first[0].get("_id"), again[0].get("_id"), "the same key");
    // Another value in the same millisecond is another reading.
    let mut other = metric(None, Some(1), DataType::Double, Value::DoubleValue(19.5));
    other.timestamp = Some(T0 - 3_600_000);
    let other = documents_of(&host.read(NDATA, &encode(Some(3), vec![other]), at(), now));
    assert_ne!(first[0].get("_id"), other[0].get("_id"));
    // Null and transient values are no readings.
    let mut null = metric(None, Some(1), DataType::Double, Value::DoubleValue(0.0));
    null.is_null = Some(true);
    null.value = None;
    let mut transient = metric(None, Some(1), DataType::Double, Value::DoubleValue(5.0));
    transient.is_transient = Some(true);
    let none = host.read(NDATA, &encode(Some(4), vec![null, transient]), at(), now);
    assert!(matches!(none, Record::Nothing { .. }), "{none:?}");
}

#[test]
fn births_are_bounded_in_metrics_and_the_host_in_nodes() {
    let (mut host, now) = (host(), Instant::now());
    let many = |count: u64| {
        let metrics = (0..count)
            .map(|n| {
                metric(
                    Some(&format!("Tag/{n}")),
                    Some(n),
                    DataType::UInt32,
                    Value::IntValue(u32::try_from(n).expect("small")),
                )
            })
            .collect();
        encode(Some(0), metrics)
    };
    let big = host.read(NBIRTH, &many(MAX_METRICS as u64), at(), now);
    assert_eq!(values(&big).len(), MAX_METRICS);
    let data = host.read(
        NDATA,
        &by_alias(1, 9_999, Value::IntValue(7), T0 + 1),
        at(),
        now,
    );
    assert_eq!(
        values(&data),
        [("plant/press-1".into(), "Tag/9999".into(), 7.0)]
    );
    let too_big = host.read(NBIRTH, &many(MAX_METRICS as u64 + 1), at(), now);
    assert!(flagged_why(&too_big).contains("more than 10000"));

    // The node table: full of online nodes, a new one is refused; an offline one
    // makes room.
    let mut host = self::host();
    for n in 0..MAX_NODES {
        host.read(&format!("spBv1.0/g/NBIRTH/n{n}"), &node_birth(1), at(), now);
    }
    let refused = host.read("spBv1.0/g/NBIRTH/one-more", &node_birth(1), at(), now);
    assert!(flagged_why(&refused).contains("10000 edge nodes"));
    host.read(
        "spBv1.0/g/NDEATH/n0",
        &encode(None, vec![bd_seq_metric(1)]),
        at(),
        now,
    );
    let taken = host.read("spBv1.0/g/NBIRTH/one-more", &node_birth(1), at(), now);
    assert_eq!(statuses(&taken), [("g/one-more".to_string(), true)]);
    assert_eq!(host.nodes(), MAX_NODES);
}

#[test]
fn one_edge_node_id_takes_a_bounded_share_of_the_host() {
    let (mut host, now) = (host(), Instant::now());
    let birth = |group: usize| format!("spBv1.0/g{group}/NBIRTH/press-1");
    for group in 0..MAX_GROUPS {
        let record = host.read(&birth(group), &node_birth(1), at(), now);
        assert_eq!(statuses(&record).len(), 1, "{record:?}");
    }
    let refused = host.read(&birth(MAX_GROUPS), &node_birth(1), at(), now);
    assert!(flagged_why(&refused).contains("16 groups"), "{refused:?}");
    // Nor is it followed by asking: data in yet another group asks nothing.
    host.read(
        "spBv1.0/g99/NDATA/press-1",
        &by_alias(1, 1, Value::DoubleValue(1.0), T0),
        at(),
        now,
    );
    assert!(host.due(now).is_empty());
    // Another account's node is followed as ever.
    let other = host.read("spBv1.0/g0/NBIRTH/press-2", &node_birth(1), at(), now);
    assert_eq!(statuses(&other), [("g0/press-2".to_string(), true)]);

    // Metric definitions: 100 000 for one edge node id, its groups and devices together.
    let (mut host, now) = (self::host(), Instant::now());
    let tags = |count: usize| {
        let metrics = (0..count)
            .map(|n| {
                metric(
                    Some(&format!("Tag/{n}")),
                    Some(n as u64),
                    DataType::Double,
                    Value::DoubleValue(1.0),
                )
            })
            .collect();
        encode(Some(0), metrics)
    };
    for group in 0..10 {
        host.read(&birth(group), &tags(MAX_METRICS), at(), now);
    }
    let over = host.read(&birth(10), &tags(1), at(), now);
    assert!(
        flagged_why(&over).contains("more than 100000 metrics"),
        "{over:?}"
    );
    // A new birth of a followed node replaces its definitions: within the budget.
    let again = host.read(&birth(3), &tags(MAX_METRICS), at(), now);
    assert_eq!(statuses(&again).len(), 1);
}

#[test]
fn times_and_seq_numbers_out_of_their_range_are_not_taken() {
    let (mut host, now) = (host(), Instant::now());
    host.read(NBIRTH, &node_birth(1), at(), now);
    // A metric time past 9999-12-31: the payload's time instead.
    let far = host.read(
        NDATA,
        &by_alias(1, 1, Value::DoubleValue(1.0), 253_402_300_800_000),
        at(),
        now,
    );
    assert_eq!(
        documents_of(&far)[0]
            .get_datetime("ts")
            .map(|ts| ts.timestamp_millis()),
        Ok(i64::try_from(T0).expect("fits"))
    );
    // A seq past 255 is no number of Sparkplug's: not followed, no gap.
    host.read(
        NDATA,
        &by_alias(300, 1, Value::DoubleValue(1.0), T0),
        at(),
        now,
    );
    host.read(
        NDATA,
        &by_alias(2, 1, Value::DoubleValue(1.0), T0),
        at(),
        now,
    );
    assert!(host.due(now + Duration::from_secs(10)).is_empty());
}
