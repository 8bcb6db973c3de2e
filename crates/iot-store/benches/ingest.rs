//! What reading one message costs, per measurement, Sparkplug B against JSON: the same
//! 15 metrics as a Tasmota `tele/<topic>/SENSOR` message (energy monitor and BME280) and
//! as a Sparkplug `DDATA` by alias after its birth. Run by `bench/sparkplug.sh`
//! (`cargo bench -p iot-store --bench ingest`); one line of figures per round, the two
//! forms alternating in each round so a noisy machine slows both alike.

use std::hint::black_box;
use std::time::{Duration, Instant};

use chrono::Utc;
use iot_store::sparkplug::proto::{metric::Value, DataType, Metric, Payload};
use iot_store::sparkplug::Host;
use iot_store::{Mapping, Record};
use prost::Message as _;

/// The 15 measurements, by name.
const METRICS: [(&str, f64); 15] = [
    ("ENERGY.Total", 1234.567),
    ("ENERGY.Yesterday", 3.21),
    ("ENERGY.Today", 1.05),
    ("ENERGY.Power", 230.0),
    ("ENERGY.ApparentPower", 240.0),
    ("ENERGY.ReactivePower", 65.0),
    ("ENERGY.Factor", 0.96),
    ("ENERGY.Voltage", 229.0),
    ("ENERGY.Current", 1.048),
    ("BME280.Temperature", 22.1),
    ("BME280.Humidity", 45.0),
    ("BME280.DewPoint", 9.6),
    ("BME280.Pressure", 1013.2),
    ("ANALOG.A0", 512.0),
    ("ANALOG.Range", 100.0),
];

const MESSAGES: usize = 20_000;
const ROUNDS: usize = 5;

fn tasmota_payload() -> Vec<u8> {
    let mut json = serde_json::json!({
        "Time": "2026-11-24T11:00:05",
        "Epoch": 1_795_514_400,
        "TempUnit": "C",
        "PressureUnit": "hPa",
    });
    for (name, value) in METRICS {
        let (group, field) = name.split_once('.').expect("a path");
        json[group][field] = serde_json::json!(value);
    }
    json.to_string().into_bytes()
}

fn sparkplug_metric(name: Option<&str>, alias: u64, value: f64) -> Metric {
    Metric {
        name: name.map(String::from),
        alias: Some(alias),
        timestamp: Some(1_795_514_400_000),
        datatype: name.map(|_| DataType::Double.number()),
        value: Some(Value::DoubleValue(value)),
        ..Metric::default()
    }
}

fn sparkplug_payload(birth: bool, seq: u64) -> Vec<u8> {
    let metrics = METRICS
        .iter()
        .zip(0..)
        .map(|((name, value), alias)| sparkplug_metric(birth.then_some(*name), alias, *value))
        .collect();
    Payload {
        timestamp: Some(1_795_514_400_000),
        metrics,
        seq: Some(seq),
        ..Payload::default()
    }
    .encode_to_vec()
}

/// Time per measurement of reading `MESSAGES` messages with `read`.
fn per_measurement(mut read: impl FnMut(usize) -> Record) -> Duration {
    let start = Instant::now();
    let mut measurements = 0;
    for n in 0..MESSAGES {
        if let Record::Readings { documents, .. } = black_box(read(n)) {
            measurements += documents.len();
        }
    }
    assert_eq!(measurements, MESSAGES * METRICS.len(), "every metric read");
    start.elapsed() / u32::try_from(measurements).expect("fits")
}

fn main() {
    let tasmota = Mapping::load(&["tasmota".to_string()], chrono_tz::Tz::UTC).expect("preset");
    let sparkplug = Mapping::load(&["sparkplug".to_string()], chrono_tz::Tz::UTC).expect("preset");
    let json = tasmota_payload();
    // seq 1..=255 then 0: no gap, every message read.
    let data: Vec<Vec<u8>> = (0..256).map(|seq| sparkplug_payload(false, seq)).collect();
    println!(
        "payload bytes: Tasmota JSON {}, Sparkplug DDATA by alias {}",
        json.len(),
        data[1].len()
    );
    let mut ratios = Vec::new();
    for round in 1..=ROUNDS {
        let now = Utc::now();
        let json_time = per_measurement(|_| tasmota.read("tele/plug_1/SENSOR", &json, now));
        let mut host = Host::new(Duration::from_secs(2));
        let birth = sparkplug_payload(true, 0);
        sparkplug.read_with(
            Some(&mut host),
            "spBv1.0/plant/NBIRTH/plug_1",
            &sparkplug_payload(true, 0),
            now,
        );
        sparkplug.read_with(
            Some(&mut host),
            "spBv1.0/plant/DBIRTH/plug_1/meter",
            &birth,
            now,
        );
        let spb_time = per_measurement(|n| {
            let seq = (n + 1) % 256;
            sparkplug.read_with(
                Some(&mut host),
                "spBv1.0/plant/DDATA/plug_1/meter",
                &data[seq],
                now,
            )
        });
        let ratio = spb_time.as_secs_f64() / json_time.as_secs_f64();
        ratios.push(ratio);
        println!(
            "round {round}: per measurement: Tasmota JSON {json_time:?}, Sparkplug DDATA {spb_time:?}, Sparkplug/JSON {ratio:.2}"
        );
    }
    ratios.sort_by(f64::total_cmp);
    println!(
        "median Sparkplug/JSON CPU per measurement: {:.2}",
        ratios[ROUNDS / 2]
    );
}
