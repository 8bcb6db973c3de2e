//! Fleet ids and topics from any first id, count and template: no panic, the asked
//! number of distinct ids, and each topic names its device.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sensor_sim::fleet::{device_ids, device_topic, has_placeholder};

fuzz_target!(|input: (&str, u8, &str)| {
    let (first, count, template) = input;
    let ids = device_ids(first, usize::from(count));
    assert_eq!(ids.len(), usize::from(count));
    let distinct: std::collections::HashSet<&String> = ids.iter().collect();
    assert_eq!(distinct.len(), ids.len(), "{first:?} x {count}");
    for id in &ids {
        let topic = device_topic(template, id);
        if has_placeholder(template) {
            assert!(topic.contains(id.as_str()));
        }
    }
});
