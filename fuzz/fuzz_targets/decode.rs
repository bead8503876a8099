//! The packet decoder fed arbitrary bytes: no panic, never a length past
//! the input, and what it accepts as a topic obeys the topic rules.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mqtt_engine::codec::{self, Packet};
use mqtt_engine::topic;

fuzz_target!(|data: &[u8]| {
    if let Ok(Some((packet, used))) = codec::decode(data) {
        assert!(used <= data.len());
        if let Packet::Publish(publish) = packet {
            assert!(topic::check_name(publish.topic.as_bytes()).is_ok());
        }
        if let Packet::Subscribe { filters, .. } | Packet::Unsubscribe { filters, .. } = packet {
            for (filter, _) in filters.iter() {
                assert!(topic::check_filter(filter.as_bytes()).is_ok());
            }
        }
    }
    // Matching takes anything without panicking.
    let (left, right) = data.split_at(data.len() / 2);
    let _ = topic::matches(left, right);
});
