//! One cycle's work, after the caller waited for input: [`Session::step`]
//! handles what has arrived up to the next message to deliver, then runs
//! the timers. The caller never sequences packets; it hands over memory for
//! a message through a [`MessageSink`] and delivers what the step returns.

use embedded_io::{Read, ReadReady, Write};

use super::read_ahead::Reading;
use super::{Error, Event, Session, Ticket};
use crate::codec::QoS;

/// Packets handled in one step at most, so that a flood of
/// acknowledgements cannot keep the caller (and its lock) busy for long:
/// the timers run, and the caller's loop goes round, at least this often.
pub const PACKETS_PER_STEP: usize = 16;

/// Memory of the caller's for an incoming message, and news of outbound
/// publishes. None of these may fail by unwinding or jumping: out of
/// memory is an answer, and the step decides what it means.
pub trait MessageSink {
    /// Room for the topic of the next message (exactly `len` bytes).
    fn topic(&mut self, len: usize) -> Option<&mut [u8]>;
    /// Room for its payload (exactly `len` bytes).
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
    /// A QoS 0 message was dropped: there was no memory for its payload.
    /// Nothing is lost silently: the caller reports it.
    Dropped { payload_len: u32 },
}

impl Session {
    /// Handles the packets that have arrived, up to the first message to
    /// deliver (at most [`PACKETS_PER_STEP`]; the rest waits for the next
    /// step), then runs the timers.
    ///
    /// A message the sink has no memory for: QoS 0 is dropped and reported
    /// ([`Outcome::Dropped`]); QoS 1 and 2 fail the link
    /// ([`Error::OutOfMemory`]) unacknowledged, so the broker sends them
    /// again after a reconnect. Any error means the link is failed.
    pub fn step<T, S>(&mut self, io: &mut T, now: u32, sink: &mut S) -> Result<Outcome, Error>
    where
        T: Read + Write + ReadReady,
        S: MessageSink,
    {
        // The whole step reads through the read-ahead bytes at once.
        let outcome = self.reading(io, |session, reading| session.handle_arrivals(reading, now, sink))?;
        if !matches!(outcome, Outcome::ConnAck { .. }) {
            self.tick(io, now)?;
        }
        Ok(outcome)
    }

    fn handle_arrivals<T, S>(&mut self, io: &mut Reading<'_, T>, now: u32, sink: &mut S) -> Result<Outcome, Error>
    where
        T: Read + Write + ReadReady,
        S: MessageSink,
    {
        for _ in 0..PACKETS_PER_STEP {
            match self.receive_packet(io, now)? {
                Event::Nothing => break,
                Event::Handled | Event::Answered(_) => {}
                Event::Completed(ticket) => sink.completed(ticket),
                Event::ConnAck { code, session_present } => return Ok(Outcome::ConnAck { code, session_present }),
                Event::Message {
                    topic_len,
                    payload_len,
                    qos,
                    retain,
                    dup,
                } => {
                    let flags = u8::from(retain) | (qos as u8) << 1 | u8::from(dup) << 3;
                    return self.take_message(io, now, sink, usize::from(topic_len), payload_len, flags);
                }
            }
        }
        Ok(Outcome::Idle)
    }

    /// Reads the message announced by [`Event::Message`] into the sink.
    fn take_message<T, S>(
        &mut self,
        io: &mut Reading<'_, T>,
        now: u32,
        sink: &mut S,
        topic_len: usize,
        payload_len: u32,
        flags: u8,
    ) -> Result<Outcome, Error>
    where
        T: Read + Write + ReadReady,
        S: MessageSink,
    {
        let qos = QoS::from_bits((flags >> 1) & 0b11).ok_or(Error::WrongState)?;
        // Without room for the topic the message cannot be followed.
        let topic = sink.topic(topic_len).ok_or(Error::OutOfMemory)?;
        let info = self.read_topic_from(io, topic)?;
        // A QoS 2 message delivered before is skipped (and acknowledged
        // again); so is a payload without room.
        let room = if info.deliver {
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
        } else if qos == QoS::AtMostOnce {
            Outcome::Dropped { payload_len }
        } else {
            // Never acknowledge what was not delivered, and forget a QoS 2
            // message was seen: the broker's resend after the reconnect
            // must be delivered.
            if qos == QoS::ExactlyOnce {
                self.inbound_qos2.forget(info.packet_id);
            }
            return Err(Error::OutOfMemory);
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
    use crate::codec::{PacketType, Publish, write_ack, write_publish};
    use crate::session::CommandState;
    use crate::session::testing::*;
    use std::string::String;
    use std::vec::Vec;

    /// A sink that keeps the last message, and can be told to have no
    /// memory for topics, payloads or the finished message.
    #[derive(Default)]
    struct Memory {
        topic: Vec<u8>,
        payload: Vec<u8>,
        messages: Vec<(String, Vec<u8>)>,
        completed: Vec<Ticket>,
        no_topic: bool,
        no_payload: bool,
        no_message: bool,
    }

    impl MessageSink for Memory {
        fn topic(&mut self, len: usize) -> Option<&mut [u8]> {
            self.topic = vec![0; len];
            (!self.no_topic).then_some(&mut self.topic[..])
        }
        fn payload(&mut self, len: usize) -> Option<&mut [u8]> {
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
            session.step(&mut pipe, 5, &mut sink),
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
                session.step(&mut pipe, 5, &mut sink),
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

    #[test]
    fn a_qos0_message_without_memory_is_dropped_and_reported() {
        for (no_payload, no_message) in [(true, false), (false, true)] {
            let (mut session, mut pipe) = connected(0);
            let mut sink = Memory {
                no_payload,
                no_message,
                ..Memory::default()
            };
            broker_publish(&mut pipe, "t", b"12345", QoS::AtMostOnce, 0, false);
            broker_publish(&mut pipe, "t", b"next", QoS::AtMostOnce, 0, false);
            assert_eq!(
                session.step(&mut pipe, 5, &mut sink),
                Ok(Outcome::Dropped { payload_len: 5 })
            );
            // The link is still in step: the next message comes whole.
            sink.no_payload = false;
            sink.no_message = false;
            assert_eq!(
                session.step(&mut pipe, 5, &mut sink),
                Ok(Outcome::Message {
                    acknowledge: false,
                    flags: 0
                })
            );
            assert_eq!(sink.messages, [(String::from("t"), b"next".to_vec())]);
            assert!(session.is_connected());
        }
    }

    #[test]
    fn a_qos1_or_qos2_message_without_memory_fails_the_link_unacknowledged() {
        for qos in [QoS::AtLeastOnce, QoS::ExactlyOnce] {
            for (no_topic, no_payload, no_message) in [(true, false, false), (false, true, false), (false, false, true)]
            {
                let (mut session, mut pipe) = connected(0);
                let mut sink = Memory {
                    no_topic,
                    no_payload,
                    no_message,
                    ..Memory::default()
                };
                broker_publish(&mut pipe, "t", b"12345", qos, 3, false);
                assert_eq!(session.step(&mut pipe, 5, &mut sink), Err(Error::OutOfMemory));
                assert!(pipe.take_sent().is_empty(), "nothing acknowledged");
                assert!(sink.messages.is_empty());
            }
        }
    }

    #[test]
    fn a_qos2_message_refused_for_memory_is_delivered_when_sent_again() {
        for (no_payload, no_message) in [(true, false), (false, true)] {
            let (mut session, mut pipe) = connected(0);
            let mut sink = Memory {
                no_payload,
                no_message,
                ..Memory::default()
            };
            broker_publish(&mut pipe, "t", b"once", QoS::ExactlyOnce, 4, false);
            assert_eq!(session.step(&mut pipe, 5, &mut sink), Err(Error::OutOfMemory));
            session.link_lost();
            // The broker sends it again on the next link (DUP set).
            let ticket = session.connect(&mut pipe, 10, &connect_options(0, false)).unwrap();
            pipe.broker_sends(|b| codec_connack(b, true));
            assert!(matches!(
                session.step(&mut pipe, 11, &mut sink),
                Ok(Outcome::ConnAck { code: 0, .. })
            ));
            assert_eq!(session.command_state(ticket, 11), CommandState::Done(0));
            pipe.take_sent();
            sink.no_payload = false;
            sink.no_message = false;
            broker_publish(&mut pipe, "t", b"once", QoS::ExactlyOnce, 4, true);
            // The broker's resend: QoS 2 (bits 1-2) and DUP (bit 3).
            assert_eq!(
                session.step(&mut pipe, 12, &mut sink),
                Ok(Outcome::Message {
                    acknowledge: true,
                    flags: 0b1100
                })
            );
            assert_eq!(sink.messages, [(String::from("t"), b"once".to_vec())]);
        }
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
            let outcome = session.step(&mut pipe, 5, &mut sink).unwrap();
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
        assert_eq!(session.step(&mut pipe, 2, &mut sink), Ok(Outcome::Idle));
        assert_eq!(sink.completed, [second, first]);
    }

    #[test]
    fn the_timers_run_after_the_packets() {
        let (mut session, mut pipe) = connected(1);
        let mut sink = Memory::default();
        // Quiet for a keepalive period: the step sends PINGREQ.
        assert_eq!(session.step(&mut pipe, 1001, &mut sink), Ok(Outcome::Idle));
        assert_eq!(pipe.take_sent(), ["PingReq"]);
        // Still before the broker's deadline, a packet in and no failure.
        pipe.broker_sends(|b| codec_ack(b, PacketType::PubRel, 1));
        assert_eq!(session.step(&mut pipe, 1400, &mut sink), Ok(Outcome::Idle));
        // No PINGRESP within half a period: the link is failed.
        assert_eq!(session.step(&mut pipe, 1501, &mut sink), Err(Error::PingTimeout));
    }

    fn codec_ack(bytes: &mut Vec<u8>, kind: PacketType, id: u16) {
        write_ack(&mut VecWriter(bytes), kind, id).unwrap();
    }

    fn codec_connack(bytes: &mut Vec<u8>, session_present: bool) {
        crate::codec::write_connack(&mut VecWriter(bytes), session_present, 0).unwrap();
    }
}
