//! The client session: what is in flight, what was received, and the timers.
//!
//! The session owns no thread, no socket and no clock. Each call is handed
//! the transport (`embedded_io` traits) and the current time in
//! milliseconds (a wrapping counter), does its work and returns. Incoming
//! PUBLISH packets are read in steps so that the caller can put the topic
//! and the payload straight into memory of its own:
//! [`Session::receive`] returns [`Event::Message`] with the lengths, then
//! [`Session::read_topic`], [`Session::read_payload`] and
//! [`Session::finish_message`] complete it. A message the caller has no
//! memory for, or larger than [`Config::max_packet_size`], is read past
//! and acknowledged all the same: refused, a broker that keeps the session
//! would send it again on every link.
//!
//! This file holds the session's state and the connection; the rest is
//! split by concern: `cycle` (one step of the caller's loop, over what has
//! arrived), `outbound` (the in-flight table: publishes,
//! subscriptions, acknowledgements, resends), `receive` (what the broker
//! sends), `inbound_qos2` (received QoS 2 ids until their release),
//! `read_ahead` (bytes read ahead of need) and `timers` (keepalive and the
//! CONNECT deadline). Each file's unit tests sit at its end; `testing`
//! holds their in-memory broker link.

use embedded_io::{ReadExactError, Write};

use crate::codec::{self, Connect, DecodeError, EncodeError, PacketType, QoS};
use crate::topic::{self, TopicError};

mod cycle;
mod inbound_qos2;
mod outbound;
mod read_ahead;
mod receive;
mod reconnect;
#[cfg(test)]
mod testing;
mod timers;
mod v5;

pub use cycle::{MessageSink, Outcome, PACKETS_PER_STEP};
pub use inbound_qos2::INBOUND_QOS2_MAX;
use inbound_qos2::RecentIds;
use outbound::Inflight;
pub use outbound::{INFLIGHT_MAX, Kept, Message, Verdict};
use read_ahead::ReadAhead;
use receive::Incoming;
use reconnect::Backoff;
pub use reconnect::{Failure, Filters};
pub use v5::{
    ASSIGNED_ID_MAX, AliasTopics, INBOUND_ALIAS_MAX, REASON_MAX, ServerLimits, TOPIC_ALIAS_MAX, TopicName, V5,
    reason_text,
};

/// Settings fixed when the session is created.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// How long an acknowledgement, or the rest of a started packet, may take.
    pub command_timeout_ms: u32,
    /// Largest incoming packet accepted (fixed header excluded). A PUBLISH
    /// that is larger is read past, acknowledged and reported dropped.
    pub max_packet_size: u32,
}

/// What went wrong, grouped by who is at fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Error {
    // The caller's arguments or timing.
    /// A topic name or filter breaks the topic rules.
    InvalidTopic(TopicError),
    /// A string or payload is longer than MQTT can carry.
    TooLong,
    /// A payload said to be UTF-8 text (MQTT 5's Payload Format
    /// Indicator) is not.
    NotText,
    /// An empty client id needs a clean session.
    InvalidClientId,
    /// The operation needs an accepted connection.
    NotConnected,
    /// Every in-flight slot is taken (or, in MQTT 5, as many QoS 1/2
    /// publishes are in flight as the broker's Receive Maximum allows).
    InflightFull,
    /// The broker's CONNACK does not allow it (MQTT 5): a QoS above its
    /// maximum, RETAIN without retained messages, a packet over its
    /// maximum size.
    BrokerLimit,
    /// The call does not fit the session's state (e.g. reading a payload
    /// when no message is being received, or a buffer of the wrong size).
    WrongState,
    // The peer.
    /// The peer sent bytes that are not a valid packet.
    Malformed(DecodeError),
    /// The peer sent a packet a broker may not send at this point.
    UnexpectedPacket,
    /// The broker did not answer a PINGREQ in time.
    PingTimeout,
    /// The broker did not answer CONNECT in time.
    ConnectTimeout,
    /// The broker sent DISCONNECT (MQTT 5): its reason is in the [`V5`].
    Disconnected,
    // The transport.
    /// The transport reported an error (the caller knows which).
    Transport,
    /// The peer closed the connection.
    Closed,
}

impl From<TopicError> for Error {
    fn from(error: TopicError) -> Self {
        Error::InvalidTopic(error)
    }
}

impl From<DecodeError> for Error {
    fn from(error: DecodeError) -> Self {
        Error::Malformed(error)
    }
}

impl<E> From<EncodeError<E>> for Error {
    fn from(error: EncodeError<E>) -> Self {
        match error {
            EncodeError::FieldTooLong | EncodeError::PacketTooLong => Error::TooLong,
            EncodeError::Io(_) => Error::Transport,
            EncodeError::Closed => Error::Closed,
        }
    }
}

impl<E> From<ReadExactError<E>> for Error {
    fn from(error: ReadExactError<E>) -> Self {
        match error {
            ReadExactError::UnexpectedEof => Error::Closed,
            ReadExactError::Other(_) => Error::Transport,
        }
    }
}

/// Identifies a command waiting for its acknowledgement.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ticket {
    /// Index in the in-flight table, or [`CONNECT_SLOT`].
    pub slot: u8,
    pub packet_id: u16,
}

/// The slot of the ticket for a CONNECT, answered by CONNACK.
pub(crate) const CONNECT_SLOT: u8 = 0xff;

impl Ticket {
    const CONNECT: Ticket = Ticket {
        slot: CONNECT_SLOT,
        packet_id: 0,
    };
}

/// Where a command stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CommandState {
    /// Sent; no answer yet.
    Pending,
    /// Answered: the CONNACK or SUBACK return code, or 0.
    Done(u8),
    /// No answer within the command timeout. A publish stays in flight and
    /// is sent again after a reconnect.
    TimedOut,
    /// The link went down first. A publish stays in flight, as above.
    Interrupted,
}

/// What [`Session::receive`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// No packet was waiting.
    Nothing,
    /// A packet was handled inside the session (PINGRESP, PUBREC, PUBREL,
    /// an acknowledgement for an unknown packet id).
    Handled,
    /// The CONNACK arrived.
    ConnAck { code: u8, session_present: bool },
    /// A PUBLISH header was read; its topic and payload come next.
    Message {
        topic_len: u16,
        payload_len: u32,
        qos: QoS,
        retain: bool,
        dup: bool,
        /// The packet is larger than [`Config::max_packet_size`]: its
        /// payload may only be read past (`read_payload` with `None`).
        too_large: bool,
    },
    /// An outbound QoS 1/2 publish is acknowledged end to end; the caller
    /// may drop what it kept for a resend.
    Completed(Ticket),
    /// A SUBACK or UNSUBACK arrived for this ticket.
    Answered(Ticket),
}

/// A received message whose acknowledgement waits for the application
/// ([`Session::defer_message`]): which packet to acknowledge, how, and on
/// which link. Fits in 26 bits, so that a binding can keep it as a small
/// integer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Deferred(pub u32);

/// What [`Session::read_topic`] learned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MessageInfo {
    /// 0 for QoS 0.
    pub packet_id: u16,
    /// False for a QoS 2 message whose packet id was already delivered and
    /// is not yet released: it must not reach the application twice.
    pub deliver: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Link {
    Down,
    AwaitingConnAck { since: u32 },
    Up,
}

/// One client's MQTT session state.
#[derive(Debug)]
pub struct Session {
    config: Config,
    link: Link,
    last_connack: Option<u8>,
    keepalive_ms: u32,
    next_packet_id: u16,
    inflight: [Option<Inflight>; INFLIGHT_MAX],
    inbound_qos2: RecentIds,
    last_sent: u32,
    last_received: u32,
    ping_sent: Option<u32>,
    incoming: Incoming,
    read_ahead: ReadAhead,
    /// Built-in reconnection's backoff, when it is on.
    backoff: Option<Backoff>,
    /// When the broker last accepted the connection (until the link's loss
    /// is timed by [`Session::next_attempt_delay`]).
    up_since: Option<u32>,
    /// The next entry of the caller's table to subscribe again, while the
    /// subscriptions are being sent again after a reconnect.
    resubscribe: Option<u16>,
    /// Resubscriptions the broker refused, not yet reported.
    resubscriptions_refused: u8,
    /// Counts the links (each CONNECT), so that an acknowledgement the
    /// application deferred is never sent on a later link.
    link_count: u8,
    /// The protocol level: 4 for MQTT 3.1.1, 5 for MQTT 5.
    version: u8,
}

fn elapsed(now: u32, since: u32) -> u32 {
    now.wrapping_sub(since)
}

impl Session {
    pub fn new(config: Config) -> Self {
        Session {
            config,
            link: Link::Down,
            last_connack: None,
            keepalive_ms: 0,
            next_packet_id: 1,
            inflight: [None; INFLIGHT_MAX],
            inbound_qos2: RecentIds::new(),
            last_sent: 0,
            last_received: 0,
            ping_sent: None,
            incoming: Incoming::Idle,
            read_ahead: ReadAhead::default(),
            backoff: None,
            up_since: None,
            resubscribe: None,
            resubscriptions_refused: 0,
            link_count: 0,
            version: 4,
        }
    }

    /// A session that speaks MQTT 5: its calls that need the MQTT 5 state
    /// take a [`V5`].
    pub fn new_v5(config: Config) -> Self {
        Session {
            version: 5,
            ..Session::new(config)
        }
    }

    /// The protocol level: 4 (MQTT 3.1.1) or 5 (MQTT 5).
    pub fn version(&self) -> u8 {
        self.version
    }

    /// Whether the session speaks MQTT 5: never in an engine built
    /// without the `mqtt5` feature, whose MQTT 5 code the compiler then
    /// leaves out.
    pub(super) fn is_v5(&self) -> bool {
        cfg!(feature = "mqtt5") && self.version == 5
    }

    /// How long an acknowledgement, or the rest of a started packet, may take.
    pub fn command_timeout_ms(&self) -> u32 {
        self.config.command_timeout_ms
    }

    /// Largest incoming packet accepted (fixed header excluded).
    pub fn max_packet_size(&self) -> u32 {
        self.config.max_packet_size
    }

    /// Whether the broker accepted the connection and the link is up.
    pub fn is_connected(&self) -> bool {
        self.link == Link::Up
    }

    /// Sends CONNECT. The answer arrives as [`Event::ConnAck`]; the
    /// returned ticket follows it with [`Session::command_state`].
    pub fn connect<W: Write>(&mut self, io: &mut W, now: u32, connect: &Connect<'_>) -> Result<Ticket, Error> {
        self.prepare_connect(now, connect)?;
        codec::write_connect(io, connect).inspect_err(|_| self.link = Link::Down)?;
        Ok(Ticket::CONNECT)
    }

    /// Sends an MQTT 5 CONNECT, with the properties `v5` asks for and
    /// the will's `will_properties`.
    pub fn connect_v5<W: Write>(
        &mut self,
        io: &mut W,
        now: u32,
        connect: &Connect<'_>,
        user: Option<&dyn codec::v5::UserProperties>,
        will_properties: &codec::v5::MessageProperties<'_>,
        v5: &V5,
    ) -> Result<Ticket, Error> {
        if !self.is_v5() {
            return Err(Error::WrongState);
        }
        if let Some(topic) = will_properties.response_topic {
            topic::check_name(topic.as_bytes())?;
        }
        self.prepare_connect(now, connect)?;
        let blocks = codec::v5::ConnectBlocks {
            connect: &v5.connect,
            user,
            will: will_properties,
        };
        codec::v5::write_connect(io, connect, Some(blocks)).inspect_err(|_| self.link = Link::Down)?;
        Ok(Ticket::CONNECT)
    }

    /// Checks CONNECT's fields and sets the session up for a new link.
    fn prepare_connect(&mut self, now: u32, connect: &Connect<'_>) -> Result<(), Error> {
        if connect.client_id.is_empty() && !connect.clean_session {
            return Err(Error::InvalidClientId);
        }
        if let Some(will) = &connect.will {
            topic::check_name(will.topic.as_bytes())?;
        }
        if connect.clean_session {
            self.inflight = [None; INFLIGHT_MAX];
            self.inbound_qos2.clear();
        }
        // Nobody waits for a resubscription the last link left unanswered:
        // the next CONNACK decides whether they are all sent again.
        self.forget_resubscriptions();
        self.link = Link::AwaitingConnAck { since: now };
        self.link_count = self.link_count.wrapping_add(1);
        self.last_connack = None;
        self.keepalive_ms = u32::from(connect.keepalive_s).saturating_mul(1000);
        self.ping_sent = None;
        self.incoming = Incoming::Idle;
        self.read_ahead = ReadAhead::default();
        self.last_sent = now;
        self.last_received = now;
        Ok(())
    }

    /// Sends DISCONNECT (when the link is up) and marks the link down.
    pub fn disconnect<W: Write>(&mut self, io: &mut W) -> Result<(), Error> {
        let was_up = self.link == Link::Up;
        self.link_lost();
        if was_up {
            codec::write_empty(io, PacketType::Disconnect)?;
        }
        Ok(())
    }

    /// Records that the transport is gone. In-flight publishes are kept
    /// and sent again after the next connect (unless it is clean).
    pub fn link_lost(&mut self) {
        // A QoS 2 message cut off in its payload reached nobody: the
        // broker's resend must be taken, not answered as a duplicate.
        if let Incoming::Payload {
            qos: QoS::ExactlyOnce,
            info,
            ..
        } = self.incoming
            && info.deliver
        {
            self.inbound_qos2.forget(info.packet_id);
        }
        self.link = Link::Down;
        self.ping_sent = None;
        self.incoming = Incoming::Idle;
        self.read_ahead = ReadAhead::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{Connect, Packet, QoS, Will, write_connack};
    use crate::session::testing::*;
    use crate::session::{CommandState, Error, Event, Session};
    use crate::topic::TopicError;

    #[test]
    fn session_is_small() {
        // It lives in the client's heap object: every byte counts.
        assert_eq!(core::mem::size_of::<Inflight>(), 8);
        assert!(
            core::mem::size_of::<Session>() <= 256,
            "{}",
            core::mem::size_of::<Session>()
        );
        // MQTT 5 costs a 3.1.1 client nothing here: its state is a `V5`
        // of its own, and the protocol level took a byte of padding.
        assert_eq!(core::mem::size_of::<Session>(), 252);
    }

    #[test]
    fn refused_connection_reports_its_code() {
        let mut session = Session::new(CONFIG);
        let mut pipe = Pipe::default();
        let ticket = session.connect(&mut pipe, 0, &connect_options(0, true)).unwrap();
        pipe.broker_sends(|b| write_connack(&mut VecWriter(b), false, 5).unwrap());
        assert_eq!(
            session.receive(&mut pipe, 1).unwrap(),
            Event::ConnAck {
                code: 5,
                session_present: false
            }
        );
        assert_eq!(session.command_state(ticket, 2), CommandState::Done(5));
        assert!(!session.is_connected());
        assert_eq!(
            session.publish(&mut pipe, 3, "t", b"", QoS::AtMostOnce, false),
            Err(Error::NotConnected)
        );
    }

    #[test]
    fn connect_times_out_without_connack() {
        let mut session = Session::new(CONFIG);
        let mut pipe = Pipe::default();
        let ticket = session.connect(&mut pipe, 0, &connect_options(0, true)).unwrap();
        assert_eq!(session.tick(&mut pipe, 999), Ok(()));
        assert_eq!(session.tick(&mut pipe, 1000), Err(Error::ConnectTimeout));
        assert_eq!(session.command_state(ticket, 1000), CommandState::TimedOut);
    }

    #[test]
    fn empty_client_id_needs_clean_session() {
        let mut session = Session::new(CONFIG);
        let options = Connect {
            client_id: "",
            ..connect_options(0, false)
        };
        assert_eq!(
            session.connect(&mut Pipe::default(), 0, &options),
            Err(Error::InvalidClientId)
        );
        let options = Connect {
            client_id: "",
            ..connect_options(0, true)
        };
        assert!(session.connect(&mut Pipe::default(), 0, &options).is_ok());
    }

    #[test]
    fn connect_carries_the_will() {
        let mut session = Session::new(CONFIG);
        let mut pipe = Pipe::default();
        let will = Will {
            topic: "last/words",
            payload: b"gone",
            qos: QoS::AtLeastOnce,
            retain: true,
        };
        let options = Connect {
            will: Some(will),
            ..connect_options(30, true)
        };
        session.connect(&mut pipe, 0, &options).unwrap();
        let (packet, _) = codec::decode(&pipe.outbound).unwrap().unwrap();
        assert_eq!(packet, Packet::Connect(options));
        let bad_will = Will { topic: "a/#", ..will };
        let options = Connect {
            will: Some(bad_will),
            ..connect_options(30, true)
        };
        assert_eq!(
            session.connect(&mut pipe, 0, &options),
            Err(Error::InvalidTopic(TopicError::WildcardInName))
        );
    }

    #[test]
    fn clean_connect_forgets_in_flight_messages() {
        let (mut session, mut pipe) = connected(0);
        session
            .publish(&mut pipe, 0, "a", b"", QoS::AtLeastOnce, false)
            .unwrap();
        session.link_lost();
        session.connect(&mut pipe, 1, &connect_options(0, true)).unwrap();
        assert_eq!(session.publishes_to_resend().count(), 0);
    }
}
