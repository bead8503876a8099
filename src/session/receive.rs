//! What the broker sends: packets read one at a time, PUBLISH in steps
//! (header, topic, payload, acknowledgement), acknowledgements handled.

use embedded_io::{Read, ReadReady, Write};

use super::outbound::Stage;
use super::read_ahead::Reading;
use super::{Deferred, Error, Event, Link, MessageInfo, MessageSink, Session, V5};
use crate::codec::properties::{Property, PropertyReader, allowed, id};
use crate::codec::{self, DecodeError, FixedHeader, Packet, PacketType, QoS};
use crate::topic;

/// Longest body of any MQTT 3.1.1 packet other than PUBLISH that a
/// client accepts (a SUBACK for one filter is the longest: 3 bytes).
pub(super) const SMALL_BODY_MAX: u32 = 4;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Incoming {
    Idle,
    Topic {
        topic_len: u16,
        payload_len: u32,
        qos: QoS,
        too_large: bool,
    },
    Payload {
        payload_len: u32,
        qos: QoS,
        info: MessageInfo,
        too_large: bool,
    },
    Received {
        qos: QoS,
        info: MessageInfo,
    },
}

fn read_remaining_length<T: Read>(io: &mut T) -> Result<u32, Error> {
    let mut bytes = [0u8; 4];
    for used in 1..=bytes.len() {
        let read_so_far = bytes.get_mut(..used).ok_or(Error::WrongState)?;
        if let Some(last) = read_so_far.last_mut() {
            codec::read_exact(io, core::slice::from_mut(last))?;
        }
        if let Some((value, _)) = codec::decode_remaining_length(read_so_far)? {
            return Ok(value);
        }
    }
    Err(DecodeError::MalformedLength.into())
}

/// Reads `len` bytes past without keeping them: a piece at a time through
/// a small buffer, each piece handed to `check` before the next is read.
fn skip<T: Read>(io: &mut T, len: u32, mut check: impl FnMut(&[u8]) -> Result<(), Error>) -> Result<(), Error> {
    let mut scratch = [0u8; 64];
    let mut left = len;
    while left > 0 {
        let size = scratch.len().min(usize::try_from(left).unwrap_or(scratch.len()));
        let piece = scratch.get_mut(..size).ok_or(Error::WrongState)?;
        codec::read_exact(io, piece)?;
        check(piece)?;
        left = left.saturating_sub(u32::try_from(size).unwrap_or(left));
    }
    Ok(())
}

/// Reads from `io`, copying what it reads into `copy` while room lasts.
/// Every property block is read through one (an empty `copy` keeps
/// nothing), so that the property reader's code exists once.
pub(super) struct Copying<'a, T> {
    pub(super) io: &'a mut T,
    pub(super) copy: &'a mut [u8],
    pub(super) at: usize,
}

impl<T: embedded_io::ErrorType> embedded_io::ErrorType for Copying<'_, T> {
    type Error = T::Error;
}

impl<T: Read> Read for Copying<'_, T> {
    fn read(&mut self, buf: &mut [u8]) -> Result<usize, T::Error> {
        let count = self.io.read(buf)?;
        let read = buf.get(..count).unwrap_or(&[]);
        codec::copy(self.copy.get_mut(self.at..).unwrap_or(&mut []), read);
        self.at = self.at.saturating_add(count);
        Ok(count)
    }
}

/// What a PUBLISH's property block says to the session.
struct PublishProperties {
    payload_len: u32,
    /// The block is empty, or went whole into the room given for it.
    kept: bool,
    /// Its topic alias (0: none).
    alias: u16,
}

/// Reads a PUBLISH's properties, checking them, from the `rest` of the
/// packet after its packet id, into the room `keep` gives (else past).
fn read_publish_properties<T: Read>(
    io: &mut T,
    rest: u32,
    v5: &V5,
    keep: Option<&mut dyn MessageSink>,
) -> Result<PublishProperties, Error> {
    let (reader, used) = PropertyReader::start(io, rest, allowed::PUBLISH)?;
    let payload_len = rest.saturating_sub(used);
    let block_len = usize::try_from(reader.left()).map_err(|_| DecodeError::BadLength)?;
    if block_len == 0 {
        return Ok(PublishProperties {
            payload_len,
            kept: true,
            alias: 0,
        });
    }
    let room = keep.and_then(|sink| sink.properties(block_len));
    let kept = room.is_some();
    // Read through the copying reader either way: one reading code.
    let mut reading = Copying {
        io,
        copy: room.unwrap_or(&mut []),
        at: 0,
    };
    let alias = check_publish_properties(&mut reading, reader, v5)?;
    Ok(PublishProperties {
        payload_len,
        kept,
        alias,
    })
}

/// Reads a PUBLISH's property block through, checking it; returns its
/// topic alias (0: none).
fn check_publish_properties<T: Read>(io: &mut T, mut reader: PropertyReader, v5: &V5) -> Result<u16, Error> {
    let mut alias = 0;
    while let Some(property) = reader.next(io)? {
        match property {
            // The client takes as many topic aliases as CONNECT said.
            Property::Number {
                id: id::TOPIC_ALIAS,
                value,
            } => {
                alias = u16::try_from(value).map_err(|_| DecodeError::InvalidProperty)?;
                if alias > v5.connect.topic_alias_maximum {
                    return Err(DecodeError::InvalidProperty.into());
                }
            }
            Property::Number { .. } => {}
            Property::Bytes { .. } | Property::UserName { .. } => {
                reader.take(io, &mut [])?;
            }
        }
    }
    Ok(alias)
}

impl Session {
    /// Reads one packet if one has started to arrive and handles it. A
    /// packet whose first byte is here must complete within the transport's
    /// deadline. PUBLISH is read only up to its topic: see [`Event::Message`].
    pub fn receive<T: Read + Write + ReadReady>(&mut self, io: &mut T, now: u32) -> Result<Event, Error> {
        self.reading(io, |session, reading| session.receive_packet(reading, now, None))
    }

    /// As [`Session::receive`], for an MQTT 5 session.
    pub fn receive_v5<T: Read + Write + ReadReady>(
        &mut self,
        io: &mut T,
        now: u32,
        v5: &mut V5,
    ) -> Result<Event, Error> {
        self.reading(io, |session, reading| session.receive_packet(reading, now, Some(v5)))
    }

    /// Reads one packet, as [`Session::receive`]; `v5` is the MQTT 5
    /// state, which an MQTT 5 session needs.
    pub(super) fn receive_packet<T: Read + Write + ReadReady>(
        &mut self,
        io: &mut Reading<'_, T>,
        now: u32,
        v5: Option<&mut V5>,
    ) -> Result<Event, Error> {
        if self.incoming != Incoming::Idle {
            return Err(Error::WrongState);
        }
        if !io.read_ready().map_err(|_| Error::Transport)? {
            return Ok(Event::Nothing);
        }
        let mut first = [0u8; 1];
        codec::read_exact(io, &mut first)?;
        self.last_received = now;
        let (kind, flags) = FixedHeader::check_first_byte(first[0])?;
        let remaining_length = read_remaining_length(io)?;
        if kind == PacketType::Publish {
            return self.start_message(io, flags, remaining_length);
        }
        if self.is_v5() != v5.is_some() {
            return Err(Error::WrongState);
        }
        self.receive_control(io, now, kind, remaining_length, v5)
    }

    fn start_message<T: Read>(&mut self, io: &mut T, flags: u8, remaining_length: u32) -> Result<Event, Error> {
        if self.link != Link::Up {
            return Err(Error::UnexpectedPacket);
        }
        // A PUBLISH over the limit is read past rather than refused: failing
        // the link would not help, as a broker keeping the session sends it
        // again on the next link, and the next. (Any other packet that long
        // is malformed: see `SMALL_BODY_MAX`.)
        let too_large = remaining_length > self.config.max_packet_size;
        let qos = QoS::from_bits((flags >> 1) & 0b11).ok_or(DecodeError::InvalidQoS)?;
        let dup = flags & 0b1000 != 0;
        if qos == QoS::AtMostOnce && dup {
            return Err(DecodeError::InvalidFlags.into());
        }
        let mut length = [0u8; 2];
        codec::read_exact(io, &mut length)?;
        let topic_len = u16::from_be_bytes(length);
        // In MQTT 5 an empty topic may go by an alias (checked with the
        // properties).
        if topic_len == 0 && !self.is_v5() {
            return Err(DecodeError::InvalidTopic.into());
        }
        let id_len = if qos == QoS::AtMostOnce { 0 } else { 2 };
        // Topic length prefix, topic, packet id: at most 65,539 bytes. (In
        // MQTT 5 the properties come next: `payload_len` holds them too
        // until `read_topic` has read them.)
        let header_len = u32::from(topic_len).saturating_add(2).saturating_add(id_len);
        let payload_len = remaining_length.checked_sub(header_len).ok_or(DecodeError::BadLength)?;
        self.incoming = Incoming::Topic {
            topic_len,
            payload_len,
            qos,
            too_large,
        };
        Ok(Event::Message {
            topic_len,
            payload_len,
            qos,
            retain: flags & 1 != 0,
            dup,
            too_large,
        })
    }

    /// Reads the topic of the message announced by [`Event::Message`] into
    /// `topic` (exactly `topic_len` bytes) and checks it.
    pub fn read_topic<T: Read>(&mut self, io: &mut T, topic: &mut [u8]) -> Result<MessageInfo, Error> {
        self.reading(io, |session, reading| {
            let packet_id = session.read_topic_from(reading, Some(topic))?;
            session
                .read_properties_from(reading, packet_id, None, None)
                .map(|(info, _)| info)
        })
    }

    /// As [`Session::read_topic`], for an MQTT 5 session: the message's
    /// properties are read too, and checked.
    pub fn read_topic_v5<T: Read>(&mut self, io: &mut T, topic: &mut [u8], v5: &mut V5) -> Result<MessageInfo, Error> {
        self.reading(io, |session, reading| {
            let packet_id = session.read_topic_from(reading, Some(topic))?;
            session
                .read_properties_from(reading, packet_id, Some(v5), None)
                .map(|(info, _)| info)
        })
    }

    /// The first half of [`Session::read_topic`]: reads the topic into
    /// `topic`, or past it when `topic` is `None` (no memory for it), and
    /// the packet id (0 for QoS 0), which it returns.
    pub(super) fn read_topic_from<T: Read>(&mut self, io: &mut T, topic: Option<&mut [u8]>) -> Result<u16, Error> {
        let Incoming::Topic { topic_len, qos, .. } = self.incoming else {
            return Err(Error::WrongState);
        };
        match topic {
            Some(topic) => {
                if topic.len() != usize::from(topic_len) {
                    return Err(Error::WrongState);
                }
                codec::read_exact(io, topic)?;
                // In MQTT 5 an empty topic goes by its alias (checked with
                // the properties).
                if !(topic.is_empty() && self.is_v5()) {
                    topic::check_name(topic).map_err(|_| DecodeError::InvalidTopic)?;
                }
            }
            // Checked as far as one piece at a time allows: whether the
            // bytes make well-formed UTF-8 would need the characters that
            // straddle two pieces, and the topic goes nowhere anyway.
            None => skip(io, u32::from(topic_len), |piece| {
                let forbidden = piece.iter().any(|&byte| matches!(byte, 0 | b'+' | b'#'));
                if forbidden {
                    Err(DecodeError::InvalidTopic.into())
                } else {
                    Ok(())
                }
            })?,
        }
        let packet_id = if qos == QoS::AtMostOnce {
            0
        } else {
            let mut id = [0u8; 2];
            codec::read_exact(io, &mut id)?;
            match u16::from_be_bytes(id) {
                0 => return Err(DecodeError::ZeroPacketId.into()),
                id => id,
            }
        };
        Ok(packet_id)
    }

    /// The second half of [`Session::read_topic`], after
    /// [`Session::read_topic_from`] read `packet_id`: reads the
    /// properties (MQTT 5) and readies the payload. `sink` holds the
    /// topic, when it was read: the property block of a message to deliver
    /// goes into the room it gives, and a topic alias is set or resolved
    /// there. Also returns whether the message is whole in the sink so far
    /// (its property block kept, its topic known).
    pub(super) fn read_properties_from<T: Read>(
        &mut self,
        io: &mut T,
        packet_id: u16,
        v5: Option<&mut V5>,
        mut sink: Option<&mut dyn MessageSink>,
    ) -> Result<(MessageInfo, bool), Error> {
        let Incoming::Topic {
            topic_len,
            mut payload_len,
            qos,
            too_large,
        } = self.incoming
        else {
            return Err(Error::WrongState);
        };
        let deliver = !(qos == QoS::ExactlyOnce && self.inbound_qos2.contains(packet_id));
        let mut whole = true;
        if self.is_v5() {
            let v5 = v5.ok_or(Error::WrongState)?;
            // Only a message that goes to the application keeps them.
            let keep: Option<&mut dyn MessageSink> = match sink.as_mut() {
                Some(sink) if deliver && !too_large => Some(&mut **sink),
                _ => None,
            };
            let properties = read_publish_properties(io, payload_len, v5, keep)?;
            payload_len = properties.payload_len;
            whole = properties.kept;
            let alias = properties.alias;
            if topic_len == 0 {
                // The topic is the one the alias stands for.
                if !v5.knows_alias(alias) {
                    let error = if alias == 0 {
                        DecodeError::InvalidTopic
                    } else {
                        DecodeError::InvalidProperty
                    };
                    return Err(error.into());
                }
                whole = whole && sink.is_some_and(|sink| sink.topic_alias(alias, false));
            } else if alias != 0 {
                // The alias stands for this topic from now on, if the
                // sink keeps it (else its next use fails the link).
                let kept = sink.is_some_and(|sink| sink.topic_alias(alias, true));
                v5.set_alias_known(alias, kept);
            }
        }
        if qos == QoS::ExactlyOnce && deliver {
            // Remembered before the application gets the message (or it is
            // dropped): if the link dies before PUBREC leaves, the broker's
            // resend is then recognised and not taken a second time.
            self.inbound_qos2.remember(packet_id);
        }
        let info = MessageInfo { packet_id, deliver };
        self.incoming = Incoming::Payload {
            payload_len,
            qos,
            info,
            too_large,
        };
        Ok((info, whole))
    }

    /// The length of the current message's payload, once its topic is
    /// read (in MQTT 5 the properties' length is only known then).
    pub fn payload_len(&self) -> Option<u32> {
        match self.incoming {
            Incoming::Payload { payload_len, .. } => Some(payload_len),
            _ => None,
        }
    }

    /// Reads the payload of the current message into `payload` (exactly
    /// `payload_len` bytes), or reads it past when `payload` is `None`: the
    /// message is then dropped, and [`Session::finish_message`] still
    /// acknowledges it, so that the broker does not send it again. The
    /// payload of a message announced `too_large` can only be read past.
    pub fn read_payload<T: Read>(&mut self, io: &mut T, payload: Option<&mut [u8]>) -> Result<(), Error> {
        self.reading(io, |session, reading| session.read_payload_from(reading, payload))
    }

    pub(super) fn read_payload_from<T: Read>(&mut self, io: &mut T, payload: Option<&mut [u8]>) -> Result<(), Error> {
        let Incoming::Payload {
            payload_len,
            qos,
            info,
            too_large,
        } = self.incoming
        else {
            return Err(Error::WrongState);
        };
        match payload {
            Some(buffer) => {
                if too_large || u32::try_from(buffer.len()) != Ok(payload_len) {
                    return Err(Error::WrongState);
                }
                codec::read_exact(io, buffer)?;
            }
            None => skip(io, payload_len, |_| Ok(()))?,
        }
        self.incoming = Incoming::Received { qos, info };
        Ok(())
    }

    /// Acknowledges the current message once the application has it:
    /// PUBACK for QoS 1, PUBREC for QoS 2. A QoS 2 packet id is remembered
    /// from [`Session::read_topic`] until PUBREL, so that a redelivery is
    /// not delivered again.
    pub fn finish_message<W: Write>(&mut self, io: &mut W, now: u32) -> Result<(), Error> {
        let Incoming::Received { qos, info } = self.incoming else {
            return Err(Error::WrongState);
        };
        self.incoming = Incoming::Idle;
        match qos {
            QoS::AtMostOnce => return Ok(()),
            QoS::AtLeastOnce => codec::write_ack(io, PacketType::PubAck, info.packet_id)?,
            QoS::ExactlyOnce => codec::write_ack(io, PacketType::PubRec, info.packet_id)?,
        }
        self.last_sent = now;
        Ok(())
    }

    /// Ends the current message without acknowledging it yet, for an
    /// application that takes messages from a queue at its own pace: the
    /// broker then sends no more than its window of unacknowledged
    /// messages, which bounds the queue. Returns the token that
    /// [`Session::acknowledge`] takes once the application has the
    /// message, or `None` when there is nothing to acknowledge (QoS 0).
    pub fn defer_message(&mut self) -> Result<Option<Deferred>, Error> {
        let Incoming::Received { qos, info } = self.incoming else {
            return Err(Error::WrongState);
        };
        self.incoming = Incoming::Idle;
        let qos_bits = match qos {
            QoS::AtMostOnce => return Ok(None),
            QoS::AtLeastOnce => 1,
            QoS::ExactlyOnce => 2,
        };
        let token = u32::from(info.packet_id) | (qos_bits << 16) | (u32::from(self.link_count) << 18);
        Ok(Some(Deferred(token)))
    }

    /// Sends the acknowledgement a deferred message is owed, if the link it
    /// arrived on is still up. On a later link nothing is sent: the broker
    /// sends the message again (QoS 1, so it may arrive twice), or a QoS 2
    /// resend is recognised as a duplicate and answered then.
    pub fn acknowledge<W: Write>(&mut self, io: &mut W, now: u32, deferred: Deferred) -> Result<(), Error> {
        let Deferred(token) = deferred;
        let same_link = token >> 18 == u32::from(self.link_count);
        if !same_link || self.link != Link::Up {
            return Ok(());
        }
        let packet_id = u16::try_from(token & 0xffff).map_err(|_| Error::WrongState)?;
        let kind = match (token >> 16) & 0b11 {
            1 => PacketType::PubAck,
            2 => PacketType::PubRec,
            _ => return Err(Error::WrongState),
        };
        if packet_id == 0 {
            return Err(Error::WrongState);
        }
        codec::write_ack(io, kind, packet_id)?;
        self.last_sent = now;
        Ok(())
    }

    pub(super) fn handle<W: Write>(&mut self, io: &mut W, now: u32, packet: Packet<'_>) -> Result<Event, Error> {
        let awaiting_connack = matches!(self.link, Link::AwaitingConnAck { .. });
        match packet {
            Packet::ConnAck { code, session_present } if awaiting_connack => {
                self.last_connack = Some(code);
                self.link = if code == 0 { Link::Up } else { Link::Down };
                self.last_sent = now;
                if code == 0 {
                    self.accepted(now, session_present);
                }
                return Ok(Event::ConnAck { code, session_present });
            }
            _ if self.link != Link::Up => return Err(Error::UnexpectedPacket),
            Packet::PubAck(id) => {
                if let Some(ticket) = self.find(id, |stage| matches!(stage, Stage::AwaitPubAck { .. })) {
                    self.release(ticket);
                    return Ok(Event::Completed(ticket));
                }
            }
            Packet::PubRec(id) => {
                if let Some(ticket) = self.find(id, |stage| matches!(stage, Stage::AwaitPubRec { .. })) {
                    self.set_stage(ticket, Stage::AwaitPubComp, now);
                }
                // Answered even for an unknown id, so the broker can finish.
                codec::write_ack(io, PacketType::PubRel, id)?;
                self.last_sent = now;
            }
            Packet::PubComp(id) => {
                if let Some(ticket) = self.find(id, |stage| stage == Stage::AwaitPubComp) {
                    self.release(ticket);
                    return Ok(Event::Completed(ticket));
                }
            }
            Packet::PubRel(id) => {
                self.inbound_qos2.forget(id);
                codec::write_ack(io, PacketType::PubComp, id)?;
                self.last_sent = now;
            }
            Packet::SubAck { packet_id, codes } => {
                let subscription = |stage| stage == Stage::AwaitSubAck || stage == Stage::AwaitResubAck;
                if let Some(ticket) = self.find(packet_id, subscription) {
                    // One filter per SUBSCRIBE, so exactly one return code.
                    let [code] = codes else {
                        return Err(DecodeError::BadLength.into());
                    };
                    if self.find(packet_id, |stage| stage == Stage::AwaitResubAck).is_some() {
                        self.release(ticket);
                        self.resubscribed(*code);
                        return Ok(Event::Handled);
                    }
                    self.set_stage(ticket, Stage::Answered(*code), now);
                    return Ok(Event::Answered(ticket));
                }
            }
            Packet::UnsubAck(id) => {
                if let Some(ticket) = self.find(id, |stage| stage == Stage::AwaitUnsubAck) {
                    self.set_stage(ticket, Stage::Answered(0), now);
                    return Ok(Event::Answered(ticket));
                }
            }
            Packet::PingResp => self.ping_sent = None,
            Packet::ConnAck { .. }
            | Packet::Connect(_)
            | Packet::Publish(_)
            | Packet::Subscribe { .. }
            | Packet::Unsubscribe { .. }
            | Packet::PingReq
            | Packet::Disconnect => return Err(Error::UnexpectedPacket),
        }
        Ok(Event::Handled)
    }
}

#[cfg(test)]
mod tests {
    use crate::codec::{DecodeError, Packet, PacketType, QoS, write_ack, write_connack};
    use crate::session::testing::*;
    use crate::session::{Deferred, Error, Event, INBOUND_QOS2_MAX, MessageInfo, Session};

    /// Reads the next message up to its acknowledgement, which is deferred.
    fn read_deferred(session: &mut Session, pipe: &mut Pipe) -> Option<Deferred> {
        let Event::Message {
            topic_len, payload_len, ..
        } = session.receive(pipe, 0).unwrap()
        else {
            panic!("no message")
        };
        session.read_topic(pipe, &mut vec![0; usize::from(topic_len)]).unwrap();
        session
            .read_payload(pipe, Some(&mut vec![0; payload_len as usize]))
            .unwrap();
        session.defer_message().unwrap()
    }

    #[test]
    fn deferred_acknowledgements_go_when_the_application_asks() {
        let (mut session, mut pipe) = connected(0);
        broker_publish(&mut pipe, "q", b"0", QoS::AtMostOnce, 0, false);
        broker_publish(&mut pipe, "q", b"1", QoS::AtLeastOnce, 7, false);
        broker_publish(&mut pipe, "q", b"2", QoS::ExactlyOnce, 8, false);
        assert_eq!(read_deferred(&mut session, &mut pipe), None);
        let first = read_deferred(&mut session, &mut pipe).unwrap();
        let second = read_deferred(&mut session, &mut pipe).unwrap();
        // Nothing acknowledged until asked, then in the order asked.
        assert!(pipe.take_sent().is_empty());
        session.acknowledge(&mut pipe, 1, second).unwrap();
        session.acknowledge(&mut pipe, 1, first).unwrap();
        assert_eq!(
            pipe.take_sent(),
            [format!("{:?}", Packet::PubRec(8)), format!("{:?}", Packet::PubAck(7))]
        );
        // Deferring needs a message that has been read.
        assert_eq!(session.defer_message(), Err(Error::WrongState));
    }

    #[test]
    fn a_deferred_acknowledgement_never_goes_on_a_later_link() {
        let (mut session, mut pipe) = connected(0);
        broker_publish(&mut pipe, "q", b"1", QoS::AtLeastOnce, 7, false);
        broker_publish(&mut pipe, "q", b"2", QoS::ExactlyOnce, 8, false);
        let qos1 = read_deferred(&mut session, &mut pipe).unwrap();
        let qos2 = read_deferred(&mut session, &mut pipe).unwrap();
        session.link_lost();
        session.acknowledge(&mut pipe, 1, qos1).unwrap();
        session.connect(&mut pipe, 1, &connect_options(0, false)).unwrap();
        pipe.take_sent();
        pipe.broker_sends(|b| write_connack(&mut VecWriter(b), true, 0).unwrap());
        session.receive(&mut pipe, 2).unwrap();
        session.acknowledge(&mut pipe, 3, qos1).unwrap();
        session.acknowledge(&mut pipe, 3, qos2).unwrap();
        assert!(pipe.take_sent().is_empty());
        // The QoS 2 resend is a duplicate: answered, not taken again.
        broker_publish(&mut pipe, "q", b"2", QoS::ExactlyOnce, 8, true);
        assert!(!read_message(&mut session, &mut pipe, 4).unwrap().2.deliver);
        assert_eq!(pipe.take_sent(), [format!("{:?}", Packet::PubRec(8))]);
    }

    #[test]
    fn a_forged_token_sends_nothing() {
        let (mut session, mut pipe) = connected(0);
        let link = 1 << 18;
        for token in [link, link | (3 << 16) | 5, link | (1 << 16)] {
            assert_eq!(
                session.acknowledge(&mut pipe, 0, Deferred(token)),
                Err(Error::WrongState)
            );
        }
        assert!(pipe.take_sent().is_empty());
    }

    #[test]
    fn incoming_qos0_and_qos1() {
        let (mut session, mut pipe) = connected(0);
        broker_publish(&mut pipe, "x/y", b"hello", QoS::AtMostOnce, 0, false);
        let (topic, payload, info) = read_message(&mut session, &mut pipe, 5).unwrap();
        assert_eq!(
            (topic.as_str(), payload.as_slice(), info),
            (
                "x/y",
                &b"hello"[..],
                MessageInfo {
                    packet_id: 0,
                    deliver: true
                }
            )
        );
        assert!(pipe.take_sent().is_empty());
        broker_publish(&mut pipe, "x", b"", QoS::AtLeastOnce, 42, false);
        let (_, payload, info) = read_message(&mut session, &mut pipe, 6).unwrap();
        assert!(payload.is_empty());
        assert_eq!(info.packet_id, 42);
        assert_eq!(pipe.take_sent(), [format!("{:?}", Packet::PubAck(42))]);
    }

    #[test]
    fn incoming_qos2_is_delivered_exactly_once() {
        let (mut session, mut pipe) = connected(0);
        broker_publish(&mut pipe, "x", b"1", QoS::ExactlyOnce, 7, false);
        let (_, _, info) = read_message(&mut session, &mut pipe, 1).unwrap();
        assert!(info.deliver);
        assert_eq!(pipe.take_sent(), [format!("{:?}", Packet::PubRec(7))]);
        // The broker did not see our PUBREC and sends the message again.
        broker_publish(&mut pipe, "x", b"1", QoS::ExactlyOnce, 7, true);
        let (_, _, info) = read_message(&mut session, &mut pipe, 2).unwrap();
        assert!(!info.deliver, "a redelivered packet id is not delivered twice");
        assert_eq!(pipe.take_sent(), [format!("{:?}", Packet::PubRec(7))]);
        pipe.broker_sends(|b| write_ack(&mut VecWriter(b), PacketType::PubRel, 7).unwrap());
        assert_eq!(session.receive(&mut pipe, 3).unwrap(), Event::Handled);
        assert_eq!(pipe.take_sent(), [format!("{:?}", Packet::PubComp(7))]);
        // Released: the same id now carries a new message.
        broker_publish(&mut pipe, "x", b"2", QoS::ExactlyOnce, 7, false);
        assert!(read_message(&mut session, &mut pipe, 4).unwrap().2.deliver);
    }

    #[test]
    fn qos2_delivered_before_a_lost_pubrec_is_not_delivered_again() {
        let (mut session, mut pipe) = connected(0);
        broker_publish(&mut pipe, "x", b"1", QoS::ExactlyOnce, 9, false);
        let Event::Message {
            topic_len, payload_len, ..
        } = session.receive(&mut pipe, 0).unwrap()
        else {
            panic!()
        };
        let mut topic = vec![0; topic_len.into()];
        assert!(session.read_topic(&mut pipe, &mut topic).unwrap().deliver);
        let mut payload = vec![0; payload_len as usize];
        session.read_payload(&mut pipe, Some(&mut payload)).unwrap();
        // Delivered; the link dies before PUBREC leaves.
        session.link_lost();
        session.connect(&mut pipe, 1, &connect_options(0, false)).unwrap();
        pipe.broker_sends(|b| write_connack(&mut VecWriter(b), true, 0).unwrap());
        session.receive(&mut pipe, 2).unwrap();
        broker_publish(&mut pipe, "x", b"1", QoS::ExactlyOnce, 9, true);
        assert!(!read_message(&mut session, &mut pipe, 3).unwrap().2.deliver);
    }

    #[test]
    fn skipped_qos2_message_is_not_delivered_again() {
        let (mut session, mut pipe) = connected(0);
        broker_publish(&mut pipe, "x", b"big", QoS::ExactlyOnce, 4, false);
        let Event::Message { topic_len, .. } = session.receive(&mut pipe, 0).unwrap() else {
            panic!()
        };
        session.read_topic(&mut pipe, &mut vec![0; topic_len.into()]).unwrap();
        // Skipped is dropped: acknowledged, and not taken again.
        session.read_payload(&mut pipe, None).unwrap();
        session.finish_message(&mut pipe, 0).unwrap();
        assert_eq!(pipe.take_sent(), [format!("{:?}", Packet::PubRec(4))]);
        session.link_lost();
        session.connect(&mut pipe, 1, &connect_options(0, false)).unwrap();
        pipe.broker_sends(|b| write_connack(&mut VecWriter(b), true, 0).unwrap());
        session.receive(&mut pipe, 2).unwrap();
        broker_publish(&mut pipe, "x", b"big", QoS::ExactlyOnce, 4, true);
        assert!(!read_message(&mut session, &mut pipe, 3).unwrap().2.deliver);
    }

    #[test]
    fn a_qos2_message_cut_off_in_its_payload_is_taken_when_sent_again() {
        let (mut session, mut pipe) = connected(0);
        broker_publish(&mut pipe, "x", b"payload", QoS::ExactlyOnce, 6, false);
        // The link dies after the topic: the payload never comes.
        pipe.inbound.truncate(pipe.inbound.len() - 3);
        let Event::Message { topic_len, .. } = session.receive(&mut pipe, 0).unwrap() else {
            panic!()
        };
        assert!(
            session
                .read_topic(&mut pipe, &mut vec![0; topic_len.into()])
                .unwrap()
                .deliver
        );
        session.link_lost();
        pipe.inbound.clear();
        session.connect(&mut pipe, 1, &connect_options(0, false)).unwrap();
        pipe.broker_sends(|b| write_connack(&mut VecWriter(b), true, 0).unwrap());
        session.receive(&mut pipe, 2).unwrap();
        broker_publish(&mut pipe, "x", b"payload", QoS::ExactlyOnce, 6, true);
        let (_, payload, info) = read_message(&mut session, &mut pipe, 3).unwrap();
        assert!(info.deliver);
        assert_eq!(payload, b"payload");
    }

    #[test]
    fn many_pending_qos2_releases_forget_the_oldest() {
        let (mut session, mut pipe) = connected(0);
        for id in 1..=(INBOUND_QOS2_MAX as u16 + 5) {
            broker_publish(&mut pipe, "x", b"", QoS::ExactlyOnce, id, false);
            assert!(read_message(&mut session, &mut pipe, 1).unwrap().2.deliver);
        }
        assert!(session.is_connected());
        // The newest ids are still recognised as duplicates.
        broker_publish(&mut pipe, "x", b"", QoS::ExactlyOnce, INBOUND_QOS2_MAX as u16 + 5, true);
        assert!(!read_message(&mut session, &mut pipe, 2).unwrap().2.deliver);
        broker_publish(&mut pipe, "x", b"", QoS::ExactlyOnce, 1, true);
        assert!(
            read_message(&mut session, &mut pipe, 2).unwrap().2.deliver,
            "the oldest was forgotten"
        );
    }

    #[test]
    fn skipped_payload_keeps_the_stream_in_step() {
        let (mut session, mut pipe) = connected(0);
        broker_publish(&mut pipe, "big", &[1; 300], QoS::AtLeastOnce, 3, false);
        broker_publish(&mut pipe, "small", b"ok", QoS::AtMostOnce, 0, false);
        let Event::Message { topic_len, .. } = session.receive(&mut pipe, 0).unwrap() else {
            panic!()
        };
        let mut topic = vec![0; topic_len.into()];
        session.read_topic(&mut pipe, &mut topic).unwrap();
        session.read_payload(&mut pipe, None).unwrap();
        session.finish_message(&mut pipe, 0).unwrap();
        let (topic, payload, _) = read_message(&mut session, &mut pipe, 0).unwrap();
        assert_eq!((topic.as_str(), payload.as_slice()), ("small", &b"ok"[..]));
    }

    #[test]
    fn message_steps_out_of_order_are_refused() {
        let (mut session, mut pipe) = connected(0);
        assert_eq!(session.read_topic(&mut pipe, &mut [0; 1]), Err(Error::WrongState));
        assert_eq!(session.read_payload(&mut pipe, None), Err(Error::WrongState));
        assert_eq!(session.finish_message(&mut pipe, 0), Err(Error::WrongState));
        broker_publish(&mut pipe, "abc", b"", QoS::AtMostOnce, 0, false);
        session.receive(&mut pipe, 0).unwrap();
        assert_eq!(
            session.read_topic(&mut pipe, &mut [0; 2]),
            Err(Error::WrongState),
            "wrong topic buffer size"
        );
        assert_eq!(session.receive(&mut pipe, 0), Err(Error::WrongState));
    }

    #[test]
    fn a_publish_over_the_size_limit_is_announced_too_large() {
        let (mut session, mut pipe) = connected(0);
        session.config.max_packet_size = 100;
        // Remaining lengths: 2 + 1 + 2 + 95 = 100, then 101.
        for (payload_len, too_large) in [(95, false), (96, true)] {
            broker_publish(&mut pipe, "t", &vec![1; payload_len], QoS::AtLeastOnce, 8, false);
            let Event::Message {
                too_large: announced, ..
            } = session.receive(&mut pipe, 0).unwrap()
            else {
                panic!()
            };
            assert_eq!(announced, too_large, "{payload_len} bytes");
            session.read_topic(&mut pipe, &mut [0; 1]).unwrap();
            let mut payload = vec![0; payload_len];
            let read = session.read_payload(&mut pipe, Some(&mut payload));
            if too_large {
                // Its payload may only be read past.
                assert_eq!(read, Err(Error::WrongState));
                session.read_payload(&mut pipe, None).unwrap();
            }
            session.finish_message(&mut pipe, 0).unwrap();
            assert_eq!(pipe.take_sent(), [format!("{:?}", Packet::PubAck(8))]);
        }
    }

    #[test]
    fn oversized_packets_but_publish_and_malformed_publish_are_refused() {
        // A SUBACK of 200 bytes: no packet but PUBLISH is that long.
        let (mut session, mut pipe) = connected(0);
        session.config.max_packet_size = 100;
        pipe.broker_sends(|b| b.extend_from_slice(&[0x90, 0xc8, 0x01]));
        assert_eq!(
            session.receive(&mut pipe, 0),
            Err(Error::Malformed(DecodeError::BadLength))
        );

        // Over the limit, and shorter than its own topic.
        let (mut session, mut pipe) = connected(0);
        session.config.max_packet_size = 2;
        pipe.broker_sends(|b| b.extend_from_slice(&[0x30, 3, 0, 5, b'a']));
        assert_eq!(
            session.receive(&mut pipe, 0),
            Err(Error::Malformed(DecodeError::BadLength))
        );

        let (mut session, mut pipe) = connected(0);
        pipe.broker_sends(|b| b.extend_from_slice(&[0x30, 3, 0, 5, b'a']));
        assert_eq!(
            session.receive(&mut pipe, 0),
            Err(Error::Malformed(DecodeError::BadLength))
        );

        let (mut session, mut pipe) = connected(0);
        pipe.broker_sends(|b| b.extend_from_slice(&[0x30, 4, 0, 2, b'a', b'#']));
        let Event::Message { .. } = session.receive(&mut pipe, 0).unwrap() else {
            panic!()
        };
        assert_eq!(
            session.read_topic(&mut pipe, &mut [0; 2]),
            Err(Error::Malformed(DecodeError::InvalidTopic))
        );

        let (mut session, mut pipe) = connected(0);
        pipe.broker_sends(|b| b.extend_from_slice(&[0x32, 5, 0, 1, b'a', 0, 0]));
        session.receive(&mut pipe, 0).unwrap();
        assert_eq!(
            session.read_topic(&mut pipe, &mut [0; 1]),
            Err(Error::Malformed(DecodeError::ZeroPacketId))
        );

        let (mut session, mut pipe) = connected(0);
        pipe.broker_sends(|b| b.extend_from_slice(&[0x30, 0xff, 0xff, 0xff, 0xff, 0x01]));
        assert_eq!(
            session.receive(&mut pipe, 0),
            Err(Error::Malformed(DecodeError::MalformedLength))
        );
    }

    #[test]
    fn truncated_packet_is_reported_as_closed() {
        let (mut session, mut pipe) = connected(0);
        pipe.broker_sends(|b| b.extend_from_slice(&[0x40, 2, 0]));
        assert_eq!(session.receive(&mut pipe, 0), Err(Error::Closed));
    }

    #[test]
    fn unexpected_packets_from_the_broker() {
        for bytes in [
            &[0xc0, 0][..],
            &[0xe0, 0],
            &[0x20, 2, 0, 0],
            &[0x82, 6, 0, 1, 0, 1, b'a', 0],
        ] {
            let (mut session, mut pipe) = connected(0);
            pipe.broker_sends(|b| b.extend_from_slice(bytes));
            assert!(
                matches!(
                    session.receive(&mut pipe, 0),
                    Err(Error::UnexpectedPacket | Error::Malformed(_))
                ),
                "{bytes:?}"
            );
        }
        // Before CONNACK, nothing else may come.
        let mut session = Session::new(CONFIG);
        let mut pipe = Pipe::default();
        session.connect(&mut pipe, 0, &connect_options(0, true)).unwrap();
        broker_publish(&mut pipe, "t", b"", QoS::AtMostOnce, 0, false);
        assert_eq!(session.receive(&mut pipe, 0), Err(Error::UnexpectedPacket));
    }

    proptest::proptest! {
        /// Arbitrary bytes from the broker never make the session panic or
        /// read past what it was given, in any chunking.
        #[test]
        fn arbitrary_broker_bytes(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200)) {
            let (mut session, mut pipe) = connected(5);
            // Small, so that some messages are too large.
            session.config.max_packet_size = 100;
            pipe.inbound.extend(bytes);
            for now in 0..50u32 {
                match session.receive(&mut pipe, now * 100) {
                    Ok(Event::Message { topic_len, payload_len, too_large, .. }) => {
                        let mut topic = vec![0; topic_len.into()];
                        if session.read_topic(&mut pipe, &mut topic).is_err() { break; }
                        let mut payload = vec![0; payload_len.min(1000) as usize];
                        let fits = !too_large && payload.len() as u32 == payload_len;
                        let buffer = fits.then_some(&mut payload[..]);
                        if session.read_payload(&mut pipe, buffer).is_err() { break; }
                        if session.finish_message(&mut pipe, now).is_err() { break; }
                    }
                    Ok(_) => {}
                    Err(_) => break,
                }
                let _ = session.tick(&mut pipe, now * 100);
            }
            // Whatever the client wrote in answer is well-formed.
            pipe.take_sent();
        }
    }
}
