//! MQTT 5 property blocks fed arbitrary bytes, as every packet a broker
//! sends would carry them: no panic, never a read past the block, and the
//! start of a string that is kept is whole UTF-8.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mqtt_engine::codec::properties::{Property, PropertyReader, allowed};

fuzz_target!(|data: &[u8]| {
    for set in [allowed::CONNACK, allowed::PUBLISH, allowed::ACK, allowed::DISCONNECT] {
        let mut io = data;
        let room = u32::try_from(data.len()).unwrap_or(u32::MAX);
        let Ok((mut reader, used)) = PropertyReader::start(&mut io, room, set) else {
            continue;
        };
        assert!(used <= room);
        while let Ok(Some(property)) = reader.next(&mut io) {
            let text = match property {
                Property::Number { .. } => continue,
                Property::Bytes { text, .. } => text,
                Property::UserName { .. } => true,
            };
            let mut keep = [0u8; 7];
            match reader.take(&mut io, &mut keep) {
                Ok(kept) => {
                    assert!(kept <= keep.len());
                    if text {
                        assert!(core::str::from_utf8(&keep[..kept]).is_ok());
                    }
                }
                Err(_) => break,
            }
        }
        // What was read lies within the block.
        assert!(data.len() - io.len() <= used as usize);
    }
});
