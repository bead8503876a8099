//! One cycle's work, after the caller waited for input: [`Session::step`]
//! handles what has arrived up to the next message to deliver, then runs
//! the timers. The caller never sequences packets; it hands over memory for
//! a message through a [`MessageSink`] and delivers what the step returns.

use embedded_io::{Read, ReadReady, Write};

use super::read_ahead::Reading;
use super::receive::Incoming;
use super::{Error, Event, Session, Ticket, V5};
use crate::codec::QoS;

/// Packets handled in one step at most, so that a flood of
/// acknowledgements cannot keep the caller (and its lock) busy for long:
/// the timers run, and the caller's loop goes round, at least this often.
pub const PACKETS_PER_STEP: usize = 16;

/// Memory of the caller's for an incoming message, and news of outbound
/// publishes. None of these may fail by unwinding or jumping: out of
/// memory is an answer, and the step decides what it means.
pub trait MessageSink {
    /// Room for the topic of the next message (exactly `len` bytes). Asked
    /// for a message larger than [`Config::max_packet_size`] too, so that
    /// its report can name it.
    ///
    /// [`Config::max_packet_size`]: super::Config::max_packet_size
    fn topic(&mut self, len: usize) -> Option<&mut [u8]>;
    /// MQTT 5: room for its property block as it arrived (exactly `len`
    /// bytes, never 0), checked, for the application to read (see
    /// [`crate::codec::properties::kept_property`]). Asked only for a message the
    /// payload is asked for next; without room the message is dropped,
    /// as for want of room for its payload.
    fn properties(&mut self, len: usize) -> Option<&mut [u8]>;
    /// MQTT 5, a topic alias the broker uses: with `set`, the topic read
    /// into the sink's room is the one `alias` stands for from now on
    /// (keep it); without, the message's topic is the one `alias` stands
    /// for (its room was empty). False when it cannot (no memory to keep
    /// it; no topic kept): the message is then dropped, and an alias not
    /// kept fails the link when the broker uses it.
    fn topic_alias(&mut self, alias: u16, set: bool) -> bool;
    /// Room for its payload (exactly `len` bytes). Never asked for a
    /// message larger than the maximum, nor one without room for its topic.
    fn payload(&mut self, len: usize) -> Option<&mut [u8]>;
    /// Topic and payload are read and valid: turn them into the message
    /// the application gets. False when that needs memory there is not.
    fn message_ready(&mut self) -> bool;
    /// An outbound QoS 1/2 publish is acknowledged end to end: what was
    /// kept to send it again may go.
    fn completed(&mut self, ticket: Ticket);
}

/// What a step did for the caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Nothing to deliver; the timers ran.
    Idle,
    /// The CONNACK arrived. The timers did not run: the caller that waits
    /// for it goes on (and the step after handles what follows).
    ConnAck { code: u8, session_present: bool },
    /// A message is in the sink, to deliver; the timers ran. For QoS 1/2
    /// (`acknowledge`), call [`Session::finish_message`] once it is
    /// delivered: a message is acknowledged only when the application
    /// has it. `flags` are those of its PUBLISH header (bit 0 retain,
    /// bits 1-2 QoS, bit 3 DUP), for the application to read.
    Message { acknowledge: bool, flags: u8 },
    /// A message the client could not take was read past and dropped, at
    /// any QoS; the timers ran. It is acknowledged as if delivered (a QoS
    /// 2 packet id is remembered until PUBREL, as for a delivered one):
    /// refused, a broker that keeps the session would send it again on
    /// every link. Nothing is lost silently: the caller reports it.
    Dropped {
        payload_len: u32,
        /// The sink's topic buffer holds its topic, checked (UTF-8 and
        /// the rules of a topic name), to name the message in the report.
        topic: bool,
        /// Larger than [`Config::max_packet_size`]; otherwise the sink
        /// had no memory for it.
        ///
        /// [`Config::max_packet_size`]: super::Config::max_packet_size
        too_large: bool,
        /// As in [`Outcome::Message`].
        flags: u8,
    },
}

/// A PUBLISH as its header announced it ([`Event::Message`]).
struct Announced {
    topic_len: usize,
    /// As in [`Outcome::Message`].
    flags: u8,
    too_large: bool,
}

impl Session {
    /// Handles the packets that have arrived, up to the first message to
    /// deliver (at most [`PACKETS_PER_STEP`]; the rest waits for the next
    /// step), then runs the timers.
    ///
    /// A message the client cannot take (no memory for its topic, its
    /// payload or the finished message, or larger than the configured
    /// maximum) is read past, acknowledged and reported
    /// ([`Outcome::Dropped`]), whatever its QoS. Any error means the link
    /// is failed. An MQTT 5 session needs its `v5` state.
    pub fn step<T, S>(&mut self, io: &mut T, now: u32, sink: &mut S, v5: Option<&mut V5>) -> Result<Outcome, Error>
    where
        T: Read + Write + ReadReady,
        S: MessageSink,
    {
        // The whole step reads through the read-ahead bytes at once.
        let outcome = self.reading(io, |session, reading| session.handle_arrivals(reading, now, sink, v5))?;
        if !matches!(outcome, Outcome::ConnAck { .. }) {
            self.tick(io, now)?;
        }
        Ok(outcome)
    }

    fn handle_arrivals<T, S>(
        &mut self,
        io: &mut Reading<'_, T>,
        now: u32,
        sink: &mut S,
        mut v5: Option<&mut V5>,
    ) -> Result<Outcome, Error>
    where
        T: Read + Write + ReadReady,
        S: MessageSink,
    {
        for _ in 0..PACKETS_PER_STEP {
            match self.receive_packet(io, now, v5.as_deref_mut())? {
                Event::Nothing => break,
                Event::Handled | Event::Answered(_) => {}
                Event::Completed(ticket) => sink.completed(ticket),
                Event::ConnAck { code, session_present } => return Ok(Outcome::ConnAck { code, session_present }),
                Event::Message {
                    topic_len,
                    payload_len: _,
                    qos,
                    retain,
                    dup,
                    too_large,
                } => {
                    let message = Announced {
                        topic_len: usize::from(topic_len),
                        flags: u8::from(retain) | (qos as u8) << 1 | u8::from(dup) << 3,
                        too_large,
                    };
                    return self.take_message(io, now, sink, message, v5);
                }
            }
        }
        Ok(Outcome::Idle)
    }

    /// Reads the message announced by [`Event::Message`] into the sink, or
    /// past it when the client cannot take it.
    fn take_message<T, S>(
        &mut self,
        io: &mut Reading<'_, T>,
        now: u32,
        sink: &mut S,
        message: Announced,
        v5: Option<&mut V5>,
    ) -> Result<Outcome, Error>
    where
        T: Read + Write + ReadReady,
        S: MessageSink,
    {
        let Announced {
            topic_len,
            flags,
            too_large,
        } = message;
        let qos = QoS::from_bits((flags >> 1) & 0b11).ok_or(Error::WrongState)?;
        let topic = sink.topic(topic_len);
        let topic_read = topic.is_some();
        let packet_id = self.read_topic_from(io, topic)?;
        // Only a message with its topic keeps its properties.
        let keep = topic_read.then_some(&mut *sink as &mut dyn MessageSink);
        let (info, properties_kept) = self.read_properties_from(io, packet_id, v5, keep)?;
        // Known once the topic (and, in MQTT 5, the properties) are read.
        let Incoming::Payload { payload_len, .. } = self.incoming else {
            return Err(Error::WrongState);
        };
        // A QoS 2 message delivered before is skipped (and acknowledged
        // again); so is one that cannot be delivered, for want of its topic
        // or of room for its payload.
        let room = if info.deliver && topic_read && !too_large && properties_kept {
            usize::try_from(payload_len).ok().and_then(|len| sink.payload(len))
        } else {
            None
        };
        let had_room = room.is_some();
        self.read_payload_from(io, room)?;
        let outcome = if !info.deliver {
            Outcome::Idle
        } else if had_room && sink.message_ready() {
            Outcome::Message {
                acknowledge: qos != QoS::AtMostOnce,
                flags,
            }
        } else {
            Outcome::Dropped {
                payload_len,
                topic: topic_read,
                too_large,
                flags,
            }
        };
        // A message to deliver at QoS 1/2 is acknowledged once delivered;
        // anything else is done with now.
        if !matches!(outcome, Outcome::Message { acknowledge: true, .. }) {
            self.finish_message(io.io, now)?;
        }
        Ok(outcome)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{DecodeError, PacketType, Publish, write_ack, write_publish};
    use crate::session::testing::*;
    use std::string::String;
    use std::vec::Vec;

    #[test]
    fn a_message_carries_the_flags_of_its_header() {
        let (mut session, mut pipe) = connected(0);
        let mut sink = Memory::default();
        let publish = Publish {
            topic: "kept",
            packet_id: Some(3),
            qos: QoS::AtLeastOnce,
            retain: true,
            dup: true,
            payload: b"r",
        };
        pipe.broker_sends(|b| write_publish(&mut VecWriter(b), &publish).unwrap());
        // Retain (bit 0), QoS 1 (bits 1-2), DUP (bit 3).
        assert_eq!(
            session.step(&mut pipe, 5, &mut sink, None),
            Ok(Outcome::Message {
                acknowledge: true,
                flags: 0b1011
            })
        );
    }

    #[test]
    fn a_message_is_delivered_and_acknowledged_only_when_asked() {
        for (qos, acknowledgement) in [
            (QoS::AtMostOnce, None),
            (QoS::AtLeastOnce, Some("PubAck(9)")),
            (QoS::ExactlyOnce, Some("PubRec(9)")),
        ] {
            let (mut session, mut pipe) = connected(0);
            let mut sink = Memory::default();
            broker_publish(&mut pipe, "a/b", b"hello", qos, 9, false);
            let acknowledge = acknowledgement.is_some();
            let flags = (qos as u8) << 1;
            assert_eq!(
                session.step(&mut pipe, 5, &mut sink, None),
                Ok(Outcome::Message { acknowledge, flags })
            );
            assert_eq!(sink.messages, [(String::from("a/b"), b"hello".to_vec())]);
            // Not acknowledged before the application has the message.
            assert!(pipe.take_sent().is_empty());
            if acknowledge {
                session.finish_message(&mut pipe, 6).unwrap();
            }
            assert_eq!(pipe.take_sent(), Vec::from_iter(acknowledgement.map(String::from)));
        }
    }

    /// Steps `session` and checks that the next message, `t` = `next` at
    /// QoS 0, comes whole: the link is still in step after a drop.
    fn next_message_is_delivered(session: &mut Session, pipe: &mut Pipe, sink: &mut Memory) {
        *sink = Memory::default();
        assert_eq!(
            session.step(pipe, 7, sink, None),
            Ok(Outcome::Message {
                acknowledge: false,
                flags: 0
            })
        );
        assert_eq!(sink.messages, [(String::from("t"), b"next".to_vec())]);
        assert!(session.is_connected());
    }

    #[test]
    fn a_message_without_room_for_its_payload_is_dropped_and_acknowledged() {
        for (qos, acknowledgement) in [
            (QoS::AtMostOnce, None),
            (QoS::AtLeastOnce, Some("PubAck(3)")),
            (QoS::ExactlyOnce, Some("PubRec(3)")),
        ] {
            let (mut session, mut pipe) = connected(0);
            let mut sink = Memory {
                no_payload: true,
                ..Memory::default()
            };
            broker_publish(&mut pipe, "a/b", b"12345", qos, 3, false);
            broker_publish(&mut pipe, "t", b"next", QoS::AtMostOnce, 0, false);
            assert_eq!(
                session.step(&mut pipe, 5, &mut sink, None),
                Ok(Outcome::Dropped {
                    payload_len: 5,
                    topic: true,
                    too_large: false,
                    flags: (qos as u8) << 1
                })
            );
            assert_eq!(sink.topic, b"a/b");
            assert!(sink.messages.is_empty());
            // Acknowledged at once: the broker must not send it again.
            assert_eq!(pipe.take_sent(), Vec::from_iter(acknowledgement.map(String::from)));
            next_message_is_delivered(&mut session, &mut pipe, &mut sink);
        }
    }

    #[test]
    fn a_dropped_qos2_message_is_not_taken_again_when_sent_again() {
        let (mut session, mut pipe) = connected(0);
        let mut sink = Memory {
            no_payload: true,
            ..Memory::default()
        };
        broker_publish(&mut pipe, "t", b"once", QoS::ExactlyOnce, 4, false);
        assert!(matches!(
            session.step(&mut pipe, 5, &mut sink, None),
            Ok(Outcome::Dropped { .. })
        ));
        assert_eq!(pipe.take_sent(), ["PubRec(4)"]);
        // The link dies before the broker has the PUBREC; it sends the
        // message again on the next link (DUP set), with memory for it now.
        session.link_lost();
        session.connect(&mut pipe, 10, &connect_options(0, false)).unwrap();
        pipe.broker_sends(|b| codec_connack(b, true));
        assert!(matches!(
            session.step(&mut pipe, 11, &mut sink, None),
            Ok(Outcome::ConnAck { code: 0, .. })
        ));
        pipe.take_sent();
        sink.no_payload = false;
        broker_publish(&mut pipe, "t", b"once", QoS::ExactlyOnce, 4, true);
        assert_eq!(session.step(&mut pipe, 12, &mut sink, None), Ok(Outcome::Idle));
        assert!(sink.messages.is_empty(), "neither delivered nor reported again");
        assert_eq!(pipe.take_sent(), ["PubRec(4)"]);
        pipe.broker_sends(|b| codec_ack(b, PacketType::PubRel, 4));
        assert_eq!(session.step(&mut pipe, 13, &mut sink, None), Ok(Outcome::Idle));
        assert_eq!(pipe.take_sent(), ["PubComp(4)"]);
    }

    #[test]
    fn a_message_without_room_for_its_topic_is_dropped_and_acknowledged() {
        let (mut session, mut pipe) = connected(0);
        let mut sink = Memory {
            no_topic: true,
            ..Memory::default()
        };
        broker_publish(&mut pipe, "a/long/topic/name", b"12345", QoS::AtLeastOnce, 3, false);
        broker_publish(&mut pipe, "t", b"next", QoS::AtMostOnce, 0, false);
        assert_eq!(
            session.step(&mut pipe, 5, &mut sink, None),
            Ok(Outcome::Dropped {
                payload_len: 5,
                topic: false,
                too_large: false,
                flags: 0b010
            })
        );
        assert!(sink.payloads_asked.is_empty(), "no payload without its topic");
        assert_eq!(pipe.take_sent(), ["PubAck(3)"]);
        next_message_is_delivered(&mut session, &mut pipe, &mut sink);
    }

    #[test]
    fn a_topic_read_past_is_still_checked() {
        // Topics "a/#" and "a/" with U+0000 break the rules of a topic name.
        for bytes in [[0x30, 5, 0, 3, b'a', b'/', b'#'], [0x30, 5, 0, 3, b'a', b'/', 0]] {
            let (mut session, mut pipe) = connected(0);
            let mut sink = Memory {
                no_topic: true,
                ..Memory::default()
            };
            pipe.broker_sends(|b| b.extend_from_slice(&bytes));
            assert_eq!(
                session.step(&mut pipe, 5, &mut sink, None),
                Err(Error::Malformed(DecodeError::InvalidTopic))
            );
        }
    }

    #[test]
    fn a_message_the_sink_cannot_finish_is_dropped_and_acknowledged() {
        let (mut session, mut pipe) = connected(0);
        let mut sink = Memory {
            no_message: true,
            ..Memory::default()
        };
        broker_publish(&mut pipe, "t", b"12345", QoS::AtLeastOnce, 3, false);
        broker_publish(&mut pipe, "t", b"next", QoS::AtMostOnce, 0, false);
        assert_eq!(
            session.step(&mut pipe, 5, &mut sink, None),
            Ok(Outcome::Dropped {
                payload_len: 5,
                topic: true,
                too_large: false,
                flags: 0b010
            })
        );
        assert!(sink.messages.is_empty());
        assert_eq!(pipe.take_sent(), ["PubAck(3)"]);
        next_message_is_delivered(&mut session, &mut pipe, &mut sink);
    }

    #[test]
    fn a_message_over_the_size_limit_is_read_past_and_acknowledged() {
        let (mut session, mut pipe) = connected(0);
        session.config.max_packet_size = 100;
        // The payload arrives over many transport reads.
        pipe.read_limit = Some(7);
        let mut sink = Memory::default();
        broker_publish(&mut pipe, "big", &[7; 300], QoS::AtLeastOnce, 5, false);
        broker_publish(&mut pipe, "t", b"next", QoS::AtMostOnce, 0, false);
        assert_eq!(
            session.step(&mut pipe, 5, &mut sink, None),
            Ok(Outcome::Dropped {
                payload_len: 300,
                topic: true,
                too_large: true,
                flags: 0b010
            })
        );
        // The topic names it in the report; no room was asked for the rest.
        assert_eq!(sink.topic, b"big");
        assert!(sink.payloads_asked.is_empty());
        assert_eq!(pipe.take_sent(), ["PubAck(5)"]);
        next_message_is_delivered(&mut session, &mut pipe, &mut sink);
        assert_eq!(sink.payloads_asked, [4]);
    }

    #[test]
    fn a_burst_is_handled_within_the_packet_budget() {
        let (mut session, mut pipe) = connected(0);
        let mut sink = Memory::default();
        // More PUBRELs than one step handles, then a message.
        let burst = PACKETS_PER_STEP + 4;
        for id in 1..=burst {
            pipe.broker_sends(|b| codec_ack(b, PacketType::PubRel, id as u16));
        }
        broker_publish(&mut pipe, "after", b"burst", QoS::AtMostOnce, 0, false);
        let mut answered = Vec::new();
        loop {
            let outcome = session.step(&mut pipe, 5, &mut sink, None).unwrap();
            answered.push(pipe.take_sent().len());
            if matches!(outcome, Outcome::Message { acknowledge: false, .. }) {
                break;
            }
            assert_eq!(outcome, Outcome::Idle);
            assert!(answered.len() < burst, "{answered:?}");
        }
        // The first step stops at the budget; the next one handles the
        // rest and the message. Every PUBREL is answered (PUBCOMP).
        assert_eq!(answered, [PACKETS_PER_STEP, 4]);
        assert_eq!(sink.messages, [(String::from("after"), b"burst".to_vec())]);
    }

    #[test]
    fn completed_publishes_are_reported_to_the_sink() {
        let (mut session, mut pipe) = connected(0);
        let mut sink = Memory::default();
        let first = session
            .publish(&mut pipe, 1, "t", b"a", QoS::AtLeastOnce, false)
            .unwrap()
            .unwrap();
        let second = session
            .publish(&mut pipe, 1, "t", b"b", QoS::AtLeastOnce, false)
            .unwrap()
            .unwrap();
        pipe.broker_sends(|b| codec_ack(b, PacketType::PubAck, second.packet_id));
        pipe.broker_sends(|b| codec_ack(b, PacketType::PubAck, first.packet_id));
        assert_eq!(session.step(&mut pipe, 2, &mut sink, None), Ok(Outcome::Idle));
        assert_eq!(sink.completed, [second, first]);
    }

    #[test]
    fn the_timers_run_after_the_packets() {
        let (mut session, mut pipe) = connected(1);
        let mut sink = Memory::default();
        // Quiet for a keepalive period: the step sends PINGREQ.
        assert_eq!(session.step(&mut pipe, 1001, &mut sink, None), Ok(Outcome::Idle));
        assert_eq!(pipe.take_sent(), ["PingReq"]);
        // Still before the broker's deadline, a packet in and no failure.
        pipe.broker_sends(|b| codec_ack(b, PacketType::PubRel, 1));
        assert_eq!(session.step(&mut pipe, 1400, &mut sink, None), Ok(Outcome::Idle));
        // No PINGRESP within half a period: the link is failed.
        assert_eq!(session.step(&mut pipe, 1501, &mut sink, None), Err(Error::PingTimeout));
    }

    fn codec_ack(bytes: &mut Vec<u8>, kind: PacketType, id: u16) {
        write_ack(&mut VecWriter(bytes), kind, id).unwrap();
    }

    fn codec_connack(bytes: &mut Vec<u8>, session_present: bool) {
        crate::codec::write_connack(&mut VecWriter(bytes), session_present, 0).unwrap();
    }
}
