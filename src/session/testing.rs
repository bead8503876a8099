//! Helpers of the session's unit tests: an in-memory broker link and a
//! connected session.

use embedded_io::{Read, ReadReady, Write};
use std::collections::VecDeque;
use std::string::String;
use std::vec::Vec;

use super::*;
use crate::codec::{self, Connect, Publish, QoS, write_connack, write_publish};

/// An in-memory broker link: bytes the broker sent, bytes we wrote.
#[derive(Default)]
pub(super) struct Pipe {
    pub(super) inbound: VecDeque<u8>,
    pub(super) outbound: Vec<u8>,
    /// Every write fails, as on a link that just died.
    pub(super) broken: bool,
    /// Most bytes one read returns, as from a network that delivers a
    /// packet in pieces; `None` for no limit.
    pub(super) read_limit: Option<usize>,
}

impl embedded_io::ErrorType for Pipe {
    type Error = embedded_io::ErrorKind;
}

impl Read for Pipe {
    fn read(&mut self, buf: &mut [u8]) -> Result<usize, Self::Error> {
        let count = buf
            .len()
            .min(self.inbound.len())
            .min(self.read_limit.unwrap_or(usize::MAX));
        for slot in &mut buf[..count] {
            *slot = self.inbound.pop_front().unwrap();
        }
        Ok(count)
    }
}

impl ReadReady for Pipe {
    fn read_ready(&mut self) -> Result<bool, Self::Error> {
        Ok(!self.inbound.is_empty())
    }
}

impl Write for Pipe {
    fn write(&mut self, buf: &[u8]) -> Result<usize, Self::Error> {
        if self.broken {
            return Err(embedded_io::ErrorKind::BrokenPipe);
        }
        self.outbound.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> Result<(), Self::Error> {
        Ok(())
    }
}

impl Pipe {
    pub(super) fn broker_sends(&mut self, write: impl FnOnce(&mut Vec<u8>)) {
        let mut bytes = Vec::new();
        write(&mut bytes);
        self.inbound.extend(bytes);
    }

    /// Decodes and removes everything the client wrote.
    pub(super) fn take_sent(&mut self) -> Vec<String> {
        let bytes = std::mem::take(&mut self.outbound);
        let mut rest = &bytes[..];
        let mut packets = Vec::new();
        while !rest.is_empty() {
            let (packet, used) = codec::decode(rest).unwrap().unwrap();
            packets.push(format!("{packet:?}"));
            rest = &rest[used..];
        }
        packets
    }
}

pub(super) struct VecWriter<'a>(pub(super) &'a mut Vec<u8>);
impl embedded_io::ErrorType for VecWriter<'_> {
    type Error = core::convert::Infallible;
}
impl Write for VecWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> Result<usize, Self::Error> {
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> Result<(), Self::Error> {
        Ok(())
    }
}

pub(super) const CONFIG: Config = Config {
    command_timeout_ms: 1000,
    max_packet_size: 1 << 20,
};

pub(super) fn connect_options(keepalive_s: u16, clean_session: bool) -> Connect<'static> {
    Connect {
        client_id: "c1",
        clean_session,
        keepalive_s,
        will: None,
        username: None,
        password: None,
    }
}

pub(super) fn connected(keepalive_s: u16) -> (Session, Pipe) {
    let mut session = Session::new(CONFIG);
    let mut pipe = Pipe::default();
    let ticket = session
        .connect(&mut pipe, 0, &connect_options(keepalive_s, true))
        .unwrap();
    assert_eq!(session.command_state(ticket, 1), CommandState::Pending);
    pipe.broker_sends(|b| write_connack(&mut VecWriter(b), false, 0).unwrap());
    assert_eq!(
        session.receive(&mut pipe, 1).unwrap(),
        Event::ConnAck {
            code: 0,
            session_present: false
        }
    );
    assert_eq!(session.command_state(ticket, 1), CommandState::Done(0));
    assert!(session.is_connected());
    pipe.take_sent();
    (session, pipe)
}

/// Reads a whole message the way the binding does.
pub(super) fn read_message<T: Read + Write + ReadReady>(
    session: &mut Session,
    pipe: &mut T,
    now: u32,
) -> Option<(String, Vec<u8>, MessageInfo)> {
    let Event::Message {
        topic_len, payload_len, ..
    } = session.receive(pipe, now).unwrap()
    else {
        return None;
    };
    let mut topic = vec![0; usize::from(topic_len)];
    let info = session.read_topic(pipe, &mut topic).unwrap();
    let mut payload = vec![0; payload_len as usize];
    session.read_payload(pipe, Some(&mut payload)).unwrap();
    session.finish_message(pipe, now).unwrap();
    Some((String::from_utf8(topic).unwrap(), payload, info))
}

/// As `read_message`, for an MQTT 5 session.
#[cfg(feature = "mqtt5")]
pub(super) fn read_message_v5(
    session: &mut Session,
    pipe: &mut Pipe,
    v5: &mut crate::session::V5,
) -> Option<(String, Vec<u8>, MessageInfo)> {
    let Event::Message { topic_len, .. } = session.receive_v5(pipe, 0, v5).unwrap() else {
        return None;
    };
    let mut topic = vec![0; usize::from(topic_len)];
    let info = session.read_topic_v5(pipe, &mut topic, v5).unwrap();
    let payload_len = session.payload_len().unwrap();
    let mut payload = vec![0; payload_len as usize];
    session.read_payload(pipe, Some(&mut payload)).unwrap();
    session.finish_message(pipe, 0).unwrap();
    Some((String::from_utf8(topic).unwrap(), payload, info))
}

pub(super) fn broker_publish(pipe: &mut Pipe, topic: &str, payload: &[u8], qos: QoS, id: u16, dup: bool) {
    let publish = Publish {
        topic,
        packet_id: (qos != QoS::AtMostOnce).then_some(id),
        qos,
        retain: false,
        dup,
        payload,
    };
    pipe.broker_sends(|b| write_publish(&mut VecWriter(b), &publish).unwrap());
}

/// A sink that keeps the last message, and can be told to have no
/// memory for topics, payloads or the finished message.
#[derive(Default)]
pub(super) struct Memory {
    pub(super) topic: Vec<u8>,
    pub(super) payload: Vec<u8>,
    /// The last property block kept (MQTT 5).
    pub(super) properties: Vec<u8>,
    /// The length of every payload room asked for.
    pub(super) payloads_asked: Vec<usize>,
    pub(super) messages: Vec<(String, Vec<u8>)>,
    pub(super) completed: Vec<Ticket>,
    pub(super) no_topic: bool,
    pub(super) no_payload: bool,
    pub(super) no_properties: bool,
    /// The topics kept for the broker's topic aliases.
    pub(super) alias_topics: Vec<(u16, Vec<u8>)>,
    pub(super) no_message: bool,
}

impl MessageSink for Memory {
    fn topic(&mut self, len: usize) -> Option<&mut [u8]> {
        self.topic = vec![0; len];
        (!self.no_topic).then_some(&mut self.topic[..])
    }
    fn properties(&mut self, len: usize) -> Option<&mut [u8]> {
        self.properties = vec![0; len];
        (!self.no_properties).then_some(&mut self.properties[..])
    }
    fn topic_alias(&mut self, alias: u16, set: bool) -> bool {
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
            None => false,
        }
    }
    fn payload(&mut self, len: usize) -> Option<&mut [u8]> {
        self.payloads_asked.push(len);
        self.payload = vec![0; len];
        (!self.no_payload).then_some(&mut self.payload[..])
    }
    fn message_ready(&mut self) -> bool {
        if !self.no_message {
            let topic = String::from_utf8(self.topic.clone()).unwrap();
            self.messages.push((topic, self.payload.clone()));
        }
        !self.no_message
    }
    fn completed(&mut self, ticket: Ticket) {
        self.completed.push(ticket);
    }
}
