//! The replay protocol: the cloud side asks a device to publish readings again that
//! never reached the database, and the device answers what it no longer has.
//!
//! - `/replay/<device>/request` (cloud to edge, carried by the bridge `in`; only the
//!   persister may publish it): `{"boot":"k3x9q2","ranges":[[957,3678]]}`, `seq` ranges
//!   of that boot, both ends included.
//! - The device publishes each reading it still has again on its usual topic, unchanged
//!   but for `"replay":true`, at QoS 1; the database refuses the ones it already has.
//! - `/replay/<device>/gone` (edge to cloud): `{"boot":"k3x9q2","ranges":[[1,40]]}`, the
//!   asked ranges it cannot send any more (older than its buffer, or another boot).
//!
//! A request is bounded: at most [`MAX_PER_REQUEST`] readings are sent for one; the
//! cloud side asks again for the rest. Either message holds at most [`MAX_RANGES`]
//! ranges within `1..=`[`MAX_SEQ`](crate::bounds::MAX_SEQ) and a boot that passes
//! [`check_id`]; anything else is refused whole.

use serde::{Deserialize, Serialize};

use crate::bounds::{check_id, check_seq};

/// Every device's requests, as the devices' side subscribes to them.
pub const REQUESTS: &str = "/replay/+/request";
/// Every device's answers of ranges it no longer has.
pub const GONE: &str = "/replay/+/gone";
/// The most readings one request makes a device send.
pub const MAX_PER_REQUEST: u64 = 10_000;
/// The most ranges one request or answer may list.
pub const MAX_RANGES: usize = 1000;

/// Where the cloud asks `device` for readings.
pub fn request_topic(device: &str) -> String {
    format!("/replay/{device}/request")
}

/// Where `device` says which asked ranges it no longer has.
pub fn gone_topic(device: &str) -> String {
    format!("/replay/{device}/gone")
}

/// The device of a `/replay/<device>/gone` topic.
pub fn device_of_gone(topic: &str) -> Option<&str> {
    let device = topic.strip_prefix("/replay/")?.strip_suffix("/gone")?;
    (!device.is_empty() && !device.contains('/')).then_some(device)
}

/// A request, or an answer of ranges gone: a boot and `seq` ranges, ends included.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ranges {
    pub boot: String,
    pub ranges: Vec<(u64, u64)>,
}

impl Ranges {
    /// Reads a payload; the error says what is wrong, for a warning.
    pub fn parse(payload: &[u8]) -> Result<Self, String> {
        let ranges: Ranges = serde_json::from_slice(payload)
            .map_err(|error| format!("not a replay message: {error}"))?;
        check_id("boot", &ranges.boot).map_err(|why| format!("not a replay message: {why}"))?;
        if ranges.ranges.len() > MAX_RANGES {
            return Err(format!(
                "not a replay message: {} ranges, more than {MAX_RANGES}",
                ranges.ranges.len()
            ));
        }
        if let Some((from, to)) = ranges
            .ranges
            .iter()
            .find(|(from, to)| from > to || check_seq(*from).is_err() || check_seq(*to).is_err())
        {
            return Err(format!("not a replay message: range [{from}, {to}]"));
        }
        Ok(ranges)
    }

    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// A JSON reading marked as a replay: `"replay":true` added before its closing brace.
pub fn mark_replay(payload: &[u8]) -> Option<Vec<u8>> {
    let end = payload.iter().rposition(|byte| *byte == b'}')?;
    let mut marked = Vec::with_capacity(payload.len() + 14);
    marked.extend_from_slice(&payload[..end]);
    marked.extend_from_slice(b",\"replay\":true}");
    Some(marked)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_read_and_refuse_what_they_should() {
        let request =
            Ranges::parse(br#"{"boot":"b1","ranges":[[3,7],[10,10]]}"#).expect("a request");
        assert_eq!(request.ranges, [(3, 7), (10, 10)]);
        assert_eq!(Ranges::parse(&request.encode()), Ok(request));
        for bad in [
            &b"nonsense"[..],
            br#"{"boot":"","ranges":[]}"#,
            br#"{"boot":"b","ranges":[[5,2]]}"#,
            br#"{"boot":"b","ranges":[[0,2]]}"#,
            br#"{"boot":"b","ranges":[[452,18446744073709551615]]}"#,
            br#"{"boot":"b","ranges":[[1,9007199254740993]]}"#,
            br#"{"boot":"a/b","ranges":[[1,2]]}"#,
        ] {
            assert!(
                Ranges::parse(bad).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn a_message_of_too_many_ranges_is_refused() {
        let many: Vec<String> = (1..=MAX_RANGES as u64 + 1)
            .map(|n| format!("[{},{}]", 2 * n, 2 * n))
            .collect();
        let payload = format!(r#"{{"boot":"b","ranges":[{}]}}"#, many.join(","));
        assert!(Ranges::parse(payload.as_bytes()).is_err());
        let top = format!(
            r#"{{"boot":"b","ranges":[[1,{}]]}}"#,
            crate::bounds::MAX_SEQ
        );
        assert!(Ranges::parse(top.as_bytes()).is_ok());
    }

    #[test]
    fn a_replay_is_the_reading_with_a_mark() {
        let reading = br#"{"device":"d","boot":"b","seq":3,"value":1.5}"#;
        assert_eq!(
            mark_replay(reading).as_deref(),
            Some(&br#"{"device":"d","boot":"b","seq":3,"value":1.5,"replay":true}"#[..])
        );
        assert_eq!(device_of_gone("/replay/temp-0001/gone"), Some("temp-0001"));
        assert_eq!(device_of_gone("/replay//gone"), None);
        assert_eq!(request_topic("temp-0001"), "/replay/temp-0001/request");
    }
}
