//! The payload codec: the seed-compatible `plain` form (`"23.41"`) and the `json` form
//! that names a reading uniquely by `device`, `boot` and `seq`.

use base64::Engine;
use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};

/// How a reading is written on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// The value alone with two decimals, e.g. `23.41` (what the seed scripts sent).
    Plain,
    /// A JSON object with device, boot, seq, ts, value and unit.
    Json,
}

/// One reading of one device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reading {
    /// Device id, e.g. `temp-0001`.
    pub device: String,
    /// Identifies one run of the publishing process.
    pub boot: String,
    /// Counts from 1 per device within a boot.
    pub seq: u64,
    /// The device's clock, RFC 3339 with milliseconds.
    #[serde(with = "rfc3339_millis")]
    pub ts: DateTime<Utc>,
    pub value: f64,
    pub unit: String,
}

impl Reading {
    /// The payload bytes in `format`. Values are rounded to two decimals in both forms,
    /// so the two forms of one reading carry the same number.
    pub fn encode(&self, format: Format) -> Vec<u8> {
        let value = round2(self.value);
        match format {
            Format::Plain => format!("{value:.2}").into_bytes(),
            Format::Json => {
                let rounded = Reading {
                    value,
                    ..self.clone()
                };
                // A struct of strings and finite numbers always serializes.
                serde_json::to_vec(&rounded).unwrap_or_default()
            }
        }
    }
}

fn round2(value: f64) -> f64 {
    (value * 100.0).round() / 100.0
}

/// A payload understood as a reading.
#[derive(Debug, Clone, PartialEq)]
pub enum Decoded {
    /// A plain number (the seed's form).
    Number(f64),
    /// A JSON object with a numeric `value` (the JSON form, or a subset of it).
    Json(JsonReading),
}

/// A reading in JSON as a device may send it: `value` is required, the rest optional.
/// A reading that carries `device`, `boot` and `seq` is named uniquely by them.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct JsonReading {
    pub device: Option<String>,
    pub boot: Option<String>,
    pub seq: Option<u64>,
    #[serde(default, deserialize_with = "rfc3339_millis::deserialize_option")]
    pub ts: Option<DateTime<Utc>>,
    pub value: f64,
    pub unit: Option<String>,
}

/// Why a payload is not a reading.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DecodeError {
    #[error("payload is not UTF-8")]
    NotUtf8,
    #[error("payload is neither a finite number nor a JSON reading: {0}")]
    Unrecognised(String),
}

/// Reads either form. Anything else is an error that says why, so a caller can keep
/// the raw payload instead of dropping it.
pub fn decode(payload: &[u8]) -> Result<Decoded, DecodeError> {
    let text = std::str::from_utf8(payload).map_err(|_| DecodeError::NotUtf8)?;
    let trimmed = text.trim();
    if trimmed.starts_with('{') {
        let reading: JsonReading = serde_json::from_str(trimmed)
            .map_err(|error| DecodeError::Unrecognised(error.to_string()))?;
        if !reading.value.is_finite() {
            return Err(DecodeError::Unrecognised("value is not finite".into()));
        }
        return Ok(Decoded::Json(reading));
    }
    match trimmed.parse::<f64>() {
        Ok(value) if value.is_finite() && !trimmed.is_empty() => Ok(Decoded::Number(value)),
        _ => Err(DecodeError::Unrecognised(format!("{:?}", preview(trimmed)))),
    }
}

fn preview(text: &str) -> &str {
    match text.char_indices().nth(40) {
        Some((end, _)) => &text[..end],
        None => text,
    }
}

/// A payload as text for people and JSON: the UTF-8 text itself, or base64 when the
/// bytes are not UTF-8.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PayloadText<'a> {
    Utf8(&'a str),
    Base64(String),
}

impl<'a> PayloadText<'a> {
    pub fn of(payload: &'a [u8]) -> Self {
        match std::str::from_utf8(payload) {
            Ok(text) => Self::Utf8(text),
            Err(_) => Self::Base64(base64::engine::general_purpose::STANDARD.encode(payload)),
        }
    }
}

/// `payload` on one line for a terminal: control characters and bytes that are not
/// UTF-8 are escaped (`\n`, `\x1b`, `\xff`); everything else, quotes included, is kept.
pub fn escape_for_line(payload: &[u8]) -> String {
    let mut out = String::with_capacity(payload.len());
    for chunk in payload.utf8_chunks() {
        for c in chunk.valid().chars() {
            match c {
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                '\\' => out.push_str("\\\\"),
                c if c.is_control() => out.extend(c.escape_unicode()),
                c => out.push(c),
            }
        }
        for byte in chunk.invalid() {
            out.push_str(&format!("\\x{byte:02x}"));
        }
    }
    out
}

/// Formats a time as RFC 3339 in UTC with milliseconds: `2026-11-24T10:00:00.123Z`.
pub fn format_time(time: DateTime<Utc>) -> String {
    time.to_rfc3339_opts(SecondsFormat::Millis, true)
}

mod rfc3339_millis {
    use chrono::{DateTime, Utc};
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(
        time: &DateTime<Utc>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&super::format_time(*time))
    }

    /// As [`deserialize`], for an optional field.
    pub fn deserialize_option<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<DateTime<Utc>>, D::Error> {
        deserialize(deserializer).map(Some)
    }

    /// Accepts any RFC 3339 offset and converts it to UTC.
    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<DateTime<Utc>, D::Error> {
        let text = String::deserialize(deserializer)?;
        DateTime::parse_from_rfc3339(&text)
            .map(|time| time.with_timezone(&Utc))
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn reading(value: f64) -> Reading {
        Reading {
            device: "temp-0001".into(),
            boot: "k3x9q2".into(),
            seq: 42,
            ts: Utc
                .with_ymd_and_hms(2026, 11, 24, 10, 0, 0)
                .single()
                .expect("valid date")
                + chrono::Duration::milliseconds(123),
            value,
            unit: "°C".into(),
        }
    }

    #[test]
    fn plain_is_two_decimals() {
        assert_eq!(reading(23.4149).encode(Format::Plain), b"23.41");
        assert_eq!(reading(20.0).encode(Format::Plain), b"20.00");
        assert_eq!(reading(1019.999).encode(Format::Plain), b"1020.00");
    }

    #[test]
    fn json_matches_the_product_example() {
        let json = String::from_utf8(reading(23.4100001).encode(Format::Json)).expect("utf-8");
        assert_eq!(
            json,
            r#"{"device":"temp-0001","boot":"k3x9q2","seq":42,"ts":"2026-11-24T10:00:00.123Z","value":23.41,"unit":"°C"}"#
        );
    }

    #[test]
    fn both_forms_round_trip() {
        let original = reading(23.41);
        let Ok(Decoded::Json(json)) = decode(&original.encode(Format::Json)) else {
            panic!("the JSON form does not decode");
        };
        assert_eq!(json.device.as_deref(), Some("temp-0001"));
        assert_eq!(json.boot.as_deref(), Some("k3x9q2"));
        assert_eq!(
            (json.seq, json.ts, json.value),
            (Some(42), Some(original.ts), 23.41)
        );
        assert_eq!(json.unit.as_deref(), Some("°C"));
        assert_eq!(
            decode(&original.encode(Format::Plain)),
            Ok(Decoded::Number(23.41))
        );
        assert_eq!(decode(b" 990.5\n"), Ok(Decoded::Number(990.5)));
    }

    #[test]
    fn device_time_with_an_offset_is_read_as_utc() {
        let json = r#"{"device":"d","boot":"b","seq":1,"ts":"2026-11-24T11:00:00.123+01:00","value":1,"unit":"hPa"}"#;
        let Ok(Decoded::Json(decoded)) = decode(json.as_bytes()) else {
            panic!("not decoded");
        };
        assert_eq!(decoded.ts, Some(reading(0.0).ts));
    }

    #[test]
    fn anything_else_is_an_error_not_a_panic() {
        assert_eq!(decode(&[0xff, 0xfe]), Err(DecodeError::NotUtf8));
        for bad in [
            "",
            "abc",
            "NaN",
            "inf",
            "-infinity",
            "{",
            r#"{"device":"d"}"#,
            r#"{"value":"1"}"#,
            r#"{"value":1,"seq":-1}"#,
            r#"{"value":1e999}"#,
            "[1,2]",
        ] {
            assert!(
                matches!(decode(bad.as_bytes()), Err(DecodeError::Unrecognised(_))),
                "{bad:?} should not decode"
            );
        }
    }

    #[test]
    fn a_json_reading_needs_only_a_value() {
        let Ok(Decoded::Json(json)) = decode(br#"{"value":21.5}"#) else {
            panic!("a bare value is a reading");
        };
        assert_eq!(
            (json.value, json.device, json.seq, json.ts),
            (21.5, None, None, None)
        );
    }

    #[test]
    fn payload_text_falls_back_to_base64() {
        assert_eq!(PayloadText::of(b"23.41"), PayloadText::Utf8("23.41"));
        assert_eq!(
            PayloadText::of(&[0xff, 0x00]),
            PayloadText::Base64("/wA=".into())
        );
    }

    #[test]
    fn escaping_keeps_one_message_on_one_line() {
        assert_eq!(escape_for_line(b"23.41"), "23.41");
        assert_eq!(escape_for_line(br#"{"a":"b"}"#), r#"{"a":"b"}"#);
        assert_eq!(escape_for_line(b"a\nb\tc\\"), "a\\nb\\tc\\\\");
        assert_eq!(escape_for_line(&[b'o', b'k', 0xff, 0x1b]), "ok\\xff\\u{1b}");
        assert_eq!(escape_for_line("°C".as_bytes()), "°C");
    }
}

#[cfg(test)]
mod properties {
    //! The codec on any input: round trips hold and nothing panics.

    use super::*;
    use proptest::prelude::*;

    fn reading() -> impl Strategy<Value = Reading> {
        (
            ".{0,40}",
            "[a-z0-9]{0,12}",
            any::<u64>(),
            // 1970 to 2100, to the millisecond, as the wire form carries it.
            0i64..4_102_444_800_000,
            -1e12f64..1e12,
            ".{0,8}",
        )
            .prop_map(|(device, boot, seq, millis, value, unit)| Reading {
                device,
                boot,
                seq,
                ts: DateTime::from_timestamp_millis(millis).expect("in range"),
                value,
                unit,
            })
    }

    proptest! {
        #[test]
        fn json_readings_decode_to_what_was_encoded(reading in reading()) {
            let Ok(Decoded::Json(decoded)) = decode(&reading.encode(Format::Json)) else {
                panic!("not decoded as JSON");
            };
            prop_assert_eq!(decoded.device.as_deref(), Some(reading.device.as_str()));
            prop_assert_eq!(decoded.boot.as_deref(), Some(reading.boot.as_str()));
            prop_assert_eq!(decoded.seq, Some(reading.seq));
            prop_assert_eq!(decoded.ts, Some(reading.ts));
            prop_assert_eq!(decoded.value, round2(reading.value));
            prop_assert_eq!(decoded.unit.as_deref(), Some(reading.unit.as_str()));
        }

        #[test]
        fn plain_readings_decode_to_the_rounded_value(reading in reading()) {
            let decoded = decode(&reading.encode(Format::Plain));
            prop_assert_eq!(decoded, Ok(Decoded::Number(round2(reading.value))));
        }

        #[test]
        fn any_bytes_decode_or_say_why_and_print_on_one_line(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            if let Ok(Decoded::Number(value)) = decode(&bytes) {
                prop_assert!(value.is_finite());
            }
            let line = escape_for_line(&bytes);
            prop_assert!(!line.chars().any(char::is_control), "{:?}", line);
            match PayloadText::of(&bytes) {
                PayloadText::Utf8(text) => prop_assert_eq!(text.as_bytes(), &bytes[..]),
                PayloadText::Base64(text) => prop_assert_eq!(
                    base64::engine::general_purpose::STANDARD.decode(text).expect("base64"),
                    bytes.clone()
                ),
            }
        }

        #[test]
        fn json_that_is_almost_a_reading_never_panics(text in r#"\{("[a-z]{1,6}":(-?[0-9]{1,400}(\.[0-9]*)?(e-?[0-9]{1,4})?|"[^"]{0,8}"|null|true|\[|\{)[,}]?){0,6}"#) {
            if let Ok(Decoded::Json(reading)) = decode(text.as_bytes()) {
                prop_assert!(reading.value.is_finite());
            }
        }
    }
}
