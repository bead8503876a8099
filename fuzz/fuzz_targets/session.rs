//! The session fed arbitrary broker bytes in arbitrary chunks, interleaved
//! with arbitrary API calls and clock jumps, and stepped with a sink whose
//! allocations fail at the fuzzer's choice. Checked: no panic, no message
//! larger than the configured maximum is announced unless marked too large
//! (and then no memory is asked for its payload), a delivered topic, or
//! one a dropped message's report names, is UTF-8, a kept property block
//! reads back whole, and everything the session writes is a well-formed
//! packet a client may send. The session speaks MQTT 3.1.1 or MQTT 5, as
//! the input says.
#![no_main]

use std::collections::VecDeque;

use arbitrary::Arbitrary;
use embedded_io::{ErrorKind, ErrorType, Read, ReadReady, Write};
use libfuzzer_sys::fuzz_target;
use mqtt_engine::codec::properties::kept_property;
use mqtt_engine::codec::v5::{ConnectProperties, MessageProperties, SubscriptionOptions};
use mqtt_engine::codec::{self, Connect, FixedHeader, Packet, PacketType, QoS, Will};
use mqtt_engine::session::{
    AliasTopics, Config, Event, Failure, Filters, Kept, Message, MessageSink, Outcome, Session, TOPIC_ALIAS_MAX,
    Ticket, V5,
};

const MAX_PACKET: u32 = 4096;

#[derive(Arbitrary, Debug)]
enum Step {
    BrokerSends(Vec<u8>),
    Receive,
    /// One step of the caller's loop; `memory` picks which of the sink's
    /// allocations fail (bit 0 the topic, bit 1 the payload, bit 2 the
    /// finished message, bit 3 the property block).
    Cycle { memory: u8 },
    /// Acknowledges the message the last step delivered.
    FinishMessage,
    Tick,
    Advance(u16),
    Connect { clean_session: bool, keepalive_s: u8, will: bool },
    Publish { topic: String, payload: Vec<u8>, qos: u8, retain: bool },
    Subscribe { filter: String, qos: u8 },
    Unsubscribe { filter: String },
    CommandState { slot: u8, packet_id: u16 },
    Forget { slot: u8, packet_id: u16 },
    Await { slot: u8, packet_id: u16, waited: u16, loop_may_reconnect: bool },
    /// Sends again what the last link left; `keep` says for which slots
    /// the caller kept topic and payload (one bit each).
    Resume { keep: u8 },
    LinkLost,
    Disconnect,
    /// Turns built-in reconnection on.
    SetBackoff { min_ms: u32, max_ms: u32, seed: u32 },
    /// The wait before the next attempt, for a failure: 0 a lost link,
    /// 1 a refusal with `code`, 2 a TLS handshake.
    NextAttempt { failure: u8, code: u8 },
    /// Sends the next subscriptions of a table of `entries` filters again.
    Resubscribe { entries: u8 },
}

#[derive(Arbitrary, Debug)]
struct Input {
    /// Bits 0-6: the largest number of bytes one transport read returns
    /// (0 means 1); bit 7: the session speaks MQTT 5. (One byte as before
    /// MQTT 5 came, so that the inputs kept in regressions/ still mean
    /// what they meant.)
    chunk: u8,
    steps: Vec<Step>,
}

/// The broker's side of the link, in memory.
struct Link {
    inbound: VecDeque<u8>,
    outbound: Vec<u8>,
    chunk: usize,
}

impl ErrorType for Link {
    type Error = ErrorKind;
}

impl Read for Link {
    fn read(&mut self, buf: &mut [u8]) -> Result<usize, ErrorKind> {
        if self.inbound.is_empty() {
            // Nothing more will come within the deadline.
            return Err(ErrorKind::TimedOut);
        }
        let count = buf.len().min(self.chunk).min(self.inbound.len());
        for slot in &mut buf[..count] {
            *slot = self.inbound.pop_front().unwrap();
        }
        Ok(count)
    }
}

impl ReadReady for Link {
    fn read_ready(&mut self) -> Result<bool, ErrorKind> {
        Ok(!self.inbound.is_empty())
    }
}

impl Write for Link {
    fn write(&mut self, buf: &[u8]) -> Result<usize, ErrorKind> {
        self.outbound.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> Result<(), ErrorKind> {
        Ok(())
    }
}

/// The caller's memory for a message, failing as the fuzzer says.
struct Sink<'a> {
    topic: Vec<u8>,
    properties: Vec<u8>,
    payload: Vec<u8>,
    fail: u8,
    /// The topics kept for the broker's topic aliases, from step to step.
    alias_topics: &'a mut Vec<(u16, Vec<u8>)>,
}

/// How many topic aliases the client takes from the broker in MQTT 5.
const INBOUND_ALIASES: u16 = 4;

impl MessageSink for Sink<'_> {
    fn topic(&mut self, len: usize) -> Option<&mut [u8]> {
        assert!(len <= usize::from(u16::MAX));
        // A new message: no property block yet.
        self.properties.clear();
        self.topic = vec![0; len];
        (self.fail & 1 == 0).then_some(&mut self.topic[..])
    }

    fn properties(&mut self, len: usize) -> Option<&mut [u8]> {
        assert!(len > 0 && len <= MAX_PACKET as usize, "a property block of {len} bytes");
        self.properties = vec![0; len];
        (self.fail & 8 == 0).then_some(&mut self.properties[..])
    }

    fn topic_alias(&mut self, alias: u16, set: bool) -> bool {
        assert!((1..=INBOUND_ALIASES).contains(&alias), "alias {alias}");
        if set {
            self.alias_topics.retain(|(kept, _)| *kept != alias);
            self.alias_topics.push((alias, self.topic.clone()));
            return true;
        }
        match self.alias_topics.iter().find(|(kept, _)| *kept == alias) {
            Some((_, topic)) => {
                self.topic = topic.clone();
                true
            }
            None => panic!("alias {alias} was never set"),
        }
    }

    fn payload(&mut self, len: usize) -> Option<&mut [u8]> {
        assert!(len <= MAX_PACKET as usize, "a payload of {len} bytes");
        self.payload = vec![0; len];
        (self.fail & 2 == 0).then_some(&mut self.payload[..])
    }

    fn message_ready(&mut self) -> bool {
        assert!(std::str::from_utf8(&self.topic).is_ok(), "topic {:?}", self.topic);
        // The kept block reads back property by property to its end.
        let mut offset = 0;
        while let Some((_, next)) = kept_property(&self.properties, offset) {
            assert!(next > offset);
            offset = next;
        }
        assert_eq!(offset, self.properties.len(), "block {:?}", self.properties);
        self.fail & 4 == 0
    }

    fn completed(&mut self, _ticket: Ticket) {}
}

/// What the caller kept of its in-flight publishes: slots whose bit is set.
struct KeptSlots(u8);

impl Kept for KeptSlots {
    fn publish(&mut self, ticket: Ticket) -> Option<Message<'_>> {
        let kept = ticket.slot < 8 && self.0 & (1 << ticket.slot) != 0;
        kept.then_some(Message {
            topic: "t",
            payload: b"again",
            properties: MessageProperties {
                message_expiry_s: Some(5),
                user: Some(&[("k", "v")]),
                ..MessageProperties::default()
            },
        })
    }
}

/// The topics of the topic aliases the session set, as the binding keeps them.
#[derive(Default)]
struct AliasTopicsKept(Vec<(u16, String)>);

impl AliasTopics for AliasTopicsKept {
    fn stands_for(&mut self, alias: u16, topic: &str) -> bool {
        self.0.iter().any(|(kept, text)| *kept == alias && text == topic)
    }

    fn set(&mut self, alias: u16, topic: &str) -> bool {
        assert!((1..=TOPIC_ALIAS_MAX).contains(&alias), "alias {alias}");
        self.0.retain(|(kept, _)| *kept != alias);
        self.0.push((alias, topic.to_string()));
        true
    }
}

/// A subscription table of this many entries.
struct Table(u8);

impl Filters for Table {
    fn filter(&mut self, index: u16) -> Option<(&str, SubscriptionOptions)> {
        (index < u16::from(self.0)).then_some(("a/+/#", SubscriptionOptions::qos(QoS::AtLeastOnce)))
    }
}

/// Everything the client wrote must decode, whole, as packets a client
/// sends (in MQTT 5: fixed headers whose lengths add up, of such packets).
fn check_written(link: &mut Link, v5: bool) {
    if v5 {
        let mut rest = &link.outbound[..];
        while !rest.is_empty() {
            let Ok(Some((header, header_len))) = FixedHeader::parse(rest) else {
                panic!("the session wrote a malformed packet: {rest:?}");
            };
            assert!(
                !matches!(
                    header.kind,
                    PacketType::ConnAck | PacketType::SubAck | PacketType::UnsubAck | PacketType::PingResp
                ),
                "a client may not send {:?}",
                header.kind
            );
            let total = header_len + header.remaining_length as usize;
            assert!(total <= rest.len(), "a packet cut short: {rest:?}");
            rest = &rest[total..];
        }
        link.outbound.clear();
        return;
    }
    let mut rest = &link.outbound[..];
    while !rest.is_empty() {
        let (packet, used) = match codec::decode(rest) {
            Ok(Some(found)) => found,
            other => panic!("the session wrote a malformed packet: {other:?} in {rest:?}"),
        };
        match packet {
            Packet::Connect(_)
            | Packet::Publish(_)
            | Packet::PubAck(_)
            | Packet::PubRec(_)
            | Packet::PubRel(_)
            | Packet::PubComp(_)
            | Packet::Subscribe { .. }
            | Packet::Unsubscribe { .. }
            | Packet::PingReq
            | Packet::Disconnect => {}
            other => panic!("a client may not send {other:?}"),
        }
        rest = &rest[used..];
    }
    link.outbound.clear();
}

fn qos(value: u8) -> QoS {
    QoS::from_bits(value % 3).unwrap()
}

fuzz_target!(|input: Input| {
    let config = Config { command_timeout_ms: 1000, max_packet_size: MAX_PACKET };
    let speaks_v5 = input.chunk & 0x80 != 0;
    let mut session = if speaks_v5 { Session::new_v5(config) } else { Session::new(config) };
    let mut v5 = speaks_v5.then(|| {
        V5::new(ConnectProperties {
            session_expiry_s: 0,
            receive_maximum: 32,
            maximum_packet_size: MAX_PACKET,
            topic_alias_maximum: INBOUND_ALIASES,
        })
    });
    let mut alias_topics = AliasTopicsKept::default();
    let mut inbound_aliases = Vec::new();
    let mut link = Link { inbound: VecDeque::new(), outbound: Vec::new(), chunk: usize::from(input.chunk.max(1)) };
    let mut now: u32 = 0;
    for step in input.steps {
        match step {
            Step::BrokerSends(bytes) => link.inbound.extend(bytes),
            Step::Receive => {
                let event = match v5.as_mut() {
                    Some(v5) => session.receive_v5(&mut link, now, v5),
                    None => session.receive(&mut link, now),
                };
                if let Ok(Event::Message { topic_len, payload_len, too_large, .. }) = event {
                    assert!(too_large || payload_len <= MAX_PACKET, "announced {payload_len} bytes");
                    let mut topic = vec![0; usize::from(topic_len)];
                    let read = match v5.as_mut() {
                        Some(v5) => session.read_topic_v5(&mut link, &mut topic, v5),
                        None => session.read_topic(&mut link, &mut topic),
                    };
                    if read.is_ok() {
                        // What is left once the properties are read.
                        let payload_len = session.payload_len().unwrap();
                        // Memory for half the payloads, never for one too large
                        // (it may only be read past).
                        let keep = !too_large && payload_len % 2 == 0;
                        let mut payload = keep.then(|| vec![0; payload_len as usize]);
                        let buffer = payload.as_deref_mut();
                        if session.read_payload(&mut link, buffer).is_ok() {
                            let _ = session.finish_message(&mut link, now);
                        }
                    }
                }
            }
            Step::Cycle { memory } => {
                let mut sink = Sink {
                    topic: Vec::new(),
                    properties: Vec::new(),
                    payload: Vec::new(),
                    fail: memory,
                    alias_topics: &mut inbound_aliases,
                };
                if let Ok(Outcome::Dropped { payload_len, topic, too_large, .. }) =
                    session.step(&mut link, now, &mut sink, v5.as_mut())
                {
                    assert!(too_large || payload_len <= MAX_PACKET);
                    assert!(!topic || std::str::from_utf8(&sink.topic).is_ok(), "topic {:?}", sink.topic);
                }
            }
            Step::FinishMessage => {
                let _ = session.finish_message(&mut link, now);
            }
            Step::Tick => {
                let _ = session.tick(&mut link, now);
            }
            Step::Advance(ms) => now = now.wrapping_add(u32::from(ms)),
            Step::Connect { clean_session, keepalive_s, will } => {
                let connect = Connect {
                    client_id: "fuzz",
                    clean_session,
                    keepalive_s: u16::from(keepalive_s),
                    will: will.then_some(Will { topic: "w", payload: b"x", qos: QoS::AtLeastOnce, retain: false }),
                    username: None,
                    password: None,
                };
                let _ = match v5.as_ref() {
                    Some(v5) => session.connect_v5(&mut link, now, &connect, None, &Default::default(), v5),
                    None => session.connect(&mut link, now, &connect),
                };
            }
            Step::Publish { topic, payload, qos: level, retain } => {
                let allowed = match v5.as_ref() {
                    Some(v5) => {
                        let message = Message { topic: &topic, payload: &payload, ..Message::default() };
                        session.check_publish_v5(v5, &message, qos(level), retain).is_ok()
                    }
                    None => true,
                };
                if allowed {
                    let message = Message { topic: &topic, payload: &payload, ..Message::default() };
                    let aliases = v5.as_mut().map(|v5| (v5, &mut alias_topics as &mut dyn AliasTopics));
                    let _ = session.publish_aliased(&mut link, now, &message, qos(level), retain, aliases);
                }
            }
            Step::Subscribe { filter, qos: level } => {
                let _ = session.subscribe(&mut link, now, &filter, qos(level));
            }
            Step::Unsubscribe { filter } => {
                let _ = session.unsubscribe(&mut link, now, &filter);
            }
            Step::CommandState { slot, packet_id } => {
                let _ = session.command_state(Ticket { slot, packet_id }, now);
            }
            Step::Forget { slot, packet_id } => session.forget(Ticket { slot, packet_id }),
            Step::Await { slot, packet_id, waited, loop_may_reconnect } => {
                let since = now.wrapping_sub(u32::from(waited));
                let _ = session.await_answer(Ticket { slot, packet_id }, now, since, loop_may_reconnect);
            }
            Step::Resume { keep } => {
                let _ = session.resume(&mut link, now, &mut KeptSlots(keep));
            }
            Step::LinkLost => {
                session.link_lost();
                link.inbound.clear();
            }
            Step::Disconnect => {
                let _ = session.disconnect(&mut link);
            }
            Step::SetBackoff { min_ms, max_ms, seed } => session.set_backoff(min_ms, max_ms, seed),
            Step::NextAttempt { failure, code } => {
                let failure = match failure % 3 {
                    0 => Failure::Link,
                    1 => Failure::Refused(code),
                    _ => Failure::Handshake,
                };
                let _ = session.next_attempt_delay(now, failure);
            }
            Step::Resubscribe { entries } => {
                let _ = session.resubscribe(&mut link, now, &mut Table(entries));
            }
        }
        let _ = session.next_timer(now, 1000);
        check_written(&mut link, speaks_v5);
    }
});
