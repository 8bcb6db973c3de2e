//! The payload decoder and the printers on any bytes: no panic, and what they say holds.
#![no_main]

use iot_core::payload::{decode, escape_for_line, Decoded, PayloadText};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    match decode(bytes) {
        Ok(Decoded::Number(value)) => assert!(value.is_finite()),
        Ok(Decoded::Json(reading)) => assert!(reading.value.is_finite()),
        Err(error) => drop(error.to_string()),
    }
    assert!(!escape_for_line(bytes).chars().any(char::is_control));
    if let PayloadText::Utf8(text) = PayloadText::of(bytes) {
        assert_eq!(text.as_bytes(), bytes);
    }
});
