//! The client session: what is in flight, what was received, and the timers.
//!
//! The session owns no thread, no socket and no clock. Each call is handed
//! the transport (`embedded_io` traits) and the current time in
//! milliseconds (a wrapping counter), does its work and returns. Incoming
//! PUBLISH packets are read in steps so that the caller can put the topic
//! and the payload straight into memory of its own:
//! [`Session::receive`] returns [`Event::Message`] with the lengths, then
//! [`Session::read_topic`], [`Session::read_payload`] and
//! [`Session::finish_message`] complete it.

use embedded_io::{Read, ReadExactError, ReadReady, Write};

use crate::codec::{self, Connect, DecodeError, EncodeError, FixedHeader, Packet, PacketType, Publish, QoS};
use crate::topic::{self, TopicError};

/// How many QoS 1/2 publishes, subscriptions and unsubscriptions can wait
/// for their acknowledgement at once. A publish from the application's
/// thread waits for its own, so this bounds what callbacks send in a burst
/// and what a dead link leaves behind; each slot costs 8 bytes here and two
/// object references in the binding.
pub const INFLIGHT_MAX: usize = 8;

/// How many inbound QoS 2 packet ids are remembered until their PUBREL.
///
/// MQTT 3.1.1 gives the client no way to limit how many QoS 2 messages a
/// broker sends before releasing them (mosquitto sends 20, EMQX 32). When
/// more are pending, the oldest id is forgotten: its PUBREL normally
/// follows soon, and forgetting it risks a duplicate delivery only if the
/// broker also sends that message again after a lost link.
pub const INBOUND_QOS2_MAX: usize = 32;

/// Longest body of any packet other than PUBLISH that a client accepts
/// (a SUBACK for one filter is the longest: 3 bytes).
const SMALL_BODY_MAX: usize = 4;

/// Bytes read from the transport ahead of need: an acknowledgement, or a
/// PUBLISH header with its topic, then comes in one transport read rather
/// than one per field (each a system call on the unix port). At most 255.
const READ_AHEAD_LEN: usize = 32;

/// Settings fixed when the session is created.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// How long an acknowledgement, or the rest of a started packet, may take.
    pub command_timeout_ms: u32,
    /// Largest incoming packet accepted (fixed header excluded).
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
    /// An empty client id needs a clean session.
    InvalidClientId,
    /// The operation needs an accepted connection.
    NotConnected,
    /// Every in-flight slot is taken.
    InflightFull,
    /// The call does not fit the session's state (e.g. reading a payload
    /// when no message is being received, or a buffer of the wrong size).
    WrongState,
    // The peer.
    /// The peer sent bytes that are not a valid packet.
    Malformed(DecodeError),
    /// The peer sent a packet a broker may not send at this point.
    UnexpectedPacket,
    /// An incoming packet is larger than the configured maximum.
    PacketTooLarge,
    /// The broker did not answer a PINGREQ in time.
    PingTimeout,
    /// The broker did not answer CONNECT in time.
    ConnectTimeout,
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

/// The packet ids of the QoS 2 messages received and not yet released
/// (PUBREL), oldest first, at most [`INBOUND_QOS2_MAX`]: when full,
/// remembering one more forgets the oldest.
#[derive(Debug)]
struct RecentIds {
    ids: [u16; INBOUND_QOS2_MAX],
    len: u8,
}

impl RecentIds {
    const fn new() -> Self {
        RecentIds {
            ids: [0; INBOUND_QOS2_MAX],
            len: 0,
        }
    }

    fn known(&self) -> &[u16] {
        self.ids.get(..usize::from(self.len)).unwrap_or(&[])
    }

    fn contains(&self, id: u16) -> bool {
        self.known().contains(&id)
    }

    fn remember(&mut self, id: u16) {
        if usize::from(self.len) == INBOUND_QOS2_MAX {
            self.remove_at(0);
        }
        if let Some(place) = self.ids.get_mut(usize::from(self.len)) {
            *place = id;
            self.len = self.len.saturating_add(1);
        }
    }

    fn forget(&mut self, id: u16) {
        if let Some(index) = self.known().iter().position(|&known| known == id) {
            self.remove_at(index);
        }
    }

    /// Removes the id at `index`, moving the younger ones down one place.
    /// (By hand: `Vec::remove` and `rotate_left` bring panic code along.)
    fn remove_at(&mut self, index: usize) {
        let mut place = index;
        while let Some(&younger) = self.known().get(place.saturating_add(1)) {
            if let Some(slot) = self.ids.get_mut(place) {
                *slot = younger;
            }
            place = place.saturating_add(1);
        }
        self.len = self.len.saturating_sub(1);
    }

    fn clear(&mut self) {
        self.len = 0;
    }
}

/// Identifies a command waiting for its acknowledgement.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ticket {
    /// Index in the in-flight table, or [`Ticket::CONNECT_SLOT`].
    pub slot: u8,
    pub packet_id: u16,
}

impl Ticket {
    /// The slot of the ticket for a CONNECT, answered by CONNACK.
    pub const CONNECT_SLOT: u8 = 0xff;
    const CONNECT: Ticket = Ticket {
        slot: Self::CONNECT_SLOT,
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
    /// No complete packet was waiting, or one was handled internally
    /// (PINGRESP, PUBREC, PUBREL, an unknown acknowledgement).
    Nothing,
    /// The CONNACK arrived.
    ConnAck { code: u8, session_present: bool },
    /// A PUBLISH header was read; its topic and payload come next.
    Message {
        topic_len: u16,
        payload_len: u32,
        qos: QoS,
        retain: bool,
        dup: bool,
    },
    /// An outbound QoS 1/2 publish is acknowledged end to end; the caller
    /// may drop what it kept for a resend.
    Completed(Ticket),
    /// A SUBACK or UNSUBACK arrived for this ticket.
    Answered(Ticket),
}

/// What [`Session::read_topic`] learned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MessageInfo {
    /// 0 for QoS 0.
    pub packet_id: u16,
    /// False for a QoS 2 message whose packet id was already delivered and
    /// is not yet released: it must not reach the application twice.
    pub deliver: bool,
}

/// Where an in-flight command stands. A publish waiting for its first
/// answer carries its RETAIN flag, needed to send it again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    AwaitPubAck { retain: bool },
    AwaitPubRec { retain: bool },
    AwaitPubComp,
    AwaitSubAck,
    AwaitUnsubAck,
    Answered(u8),
}

/// One in-flight command: 8 bytes, INFLIGHT_MAX of them per client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Inflight {
    packet_id: u16,
    stage: Stage,
    sent_at: u32,
}

impl Inflight {
    fn is_publish(&self) -> bool {
        matches!(
            self.stage,
            Stage::AwaitPubAck { .. } | Stage::AwaitPubRec { .. } | Stage::AwaitPubComp
        )
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Link {
    Down,
    AwaitingConnAck { since: u32 },
    Up,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Incoming {
    Idle,
    Topic {
        topic_len: u16,
        payload_len: u32,
        qos: QoS,
    },
    Payload {
        payload_len: u32,
        qos: QoS,
        info: MessageInfo,
    },
    Received {
        qos: QoS,
        info: MessageInfo,
    },
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
}

/// What was read from the transport but not yet used.
#[derive(Clone, Copy, Debug, Default)]
struct ReadAhead {
    bytes: [u8; READ_AHEAD_LEN],
    start: u8,
    end: u8,
}

impl ReadAhead {
    fn buffered(&self) -> &[u8] {
        self.bytes
            .get(usize::from(self.start)..usize::from(self.end))
            .unwrap_or(&[])
    }
}

/// The transport as the session reads it: through its read-ahead bytes.
struct Reading<'a, T> {
    io: &'a mut T,
    ahead: &'a mut ReadAhead,
}

impl<T: embedded_io::ErrorType> embedded_io::ErrorType for Reading<'_, T> {
    type Error = T::Error;
}

impl<T: Read> Read for Reading<'_, T> {
    fn read(&mut self, buf: &mut [u8]) -> Result<usize, T::Error> {
        if self.ahead.buffered().is_empty() {
            if buf.len() >= READ_AHEAD_LEN {
                // Large reads (payloads) go straight to their destination.
                return self.io.read(buf);
            }
            let count = self.io.read(&mut self.ahead.bytes)?;
            self.ahead.start = 0;
            self.ahead.end = u8::try_from(count.min(READ_AHEAD_LEN)).unwrap_or(0);
        }
        let available = self.ahead.buffered();
        let count = available.len().min(buf.len());
        codec::copy(buf, available);
        // count <= READ_AHEAD_LEN, which fits a u8.
        self.ahead.start = self.ahead.start.saturating_add(u8::try_from(count).unwrap_or(0));
        Ok(count)
    }
}

impl<T: ReadReady> ReadReady for Reading<'_, T> {
    fn read_ready(&mut self) -> Result<bool, T::Error> {
        Ok(!self.ahead.buffered().is_empty() || self.io.read_ready()?)
    }
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
        }
    }

    /// Whether bytes already read from the transport wait to be handled:
    /// then the caller must not wait for the transport before
    /// [`Session::receive`].
    pub fn has_input(&self) -> bool {
        !self.read_ahead.buffered().is_empty()
    }

    /// Runs `step` with the transport wrapped in the read-ahead bytes.
    fn reading<T, R>(&mut self, io: &mut T, step: impl FnOnce(&mut Self, &mut Reading<'_, T>) -> R) -> R {
        let mut ahead = core::mem::take(&mut self.read_ahead);
        let result = step(self, &mut Reading { io, ahead: &mut ahead });
        self.read_ahead = ahead;
        result
    }

    /// How long an acknowledgement, or the rest of a started packet, may take.
    pub fn command_timeout_ms(&self) -> u32 {
        self.config.command_timeout_ms
    }

    /// Whether the broker accepted the connection and the link is up.
    pub fn is_connected(&self) -> bool {
        self.link == Link::Up
    }

    /// Sends CONNECT. The answer arrives as [`Event::ConnAck`]; the
    /// returned ticket follows it with [`Session::command_state`].
    pub fn connect<W: Write>(&mut self, io: &mut W, now: u32, connect: &Connect<'_>) -> Result<Ticket, Error> {
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
        self.link = Link::AwaitingConnAck { since: now };
        self.last_connack = None;
        self.keepalive_ms = u32::from(connect.keepalive_s).saturating_mul(1000);
        self.ping_sent = None;
        self.incoming = Incoming::Idle;
        self.read_ahead = ReadAhead::default();
        self.last_sent = now;
        self.last_received = now;
        codec::write_connect(io, connect).inspect_err(|_| self.link = Link::Down)?;
        Ok(Ticket::CONNECT)
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
        self.link = Link::Down;
        self.ping_sent = None;
        self.incoming = Incoming::Idle;
        self.read_ahead = ReadAhead::default();
    }

    fn free_slot(&self) -> Result<u8, Error> {
        let index = self
            .inflight
            .iter()
            .position(Option::is_none)
            .ok_or(Error::InflightFull)?;
        u8::try_from(index).map_err(|_| Error::InflightFull)
    }

    fn allocate_packet_id(&mut self) -> u16 {
        loop {
            let candidate = self.next_packet_id;
            self.next_packet_id = match candidate.wrapping_add(1) {
                0 => 1,
                next => next,
            };
            let in_use = self.inflight.iter().flatten().any(|entry| entry.packet_id == candidate);
            // At most INFLIGHT_MAX ids are in use, so a free one comes soon.
            if !in_use {
                return candidate;
            }
        }
    }

    fn start_command(&mut self, now: u32, stage: Stage) -> Result<Ticket, Error> {
        let slot = self.free_slot()?;
        let packet_id = self.allocate_packet_id();
        if let Some(entry) = self.inflight.get_mut(usize::from(slot)) {
            *entry = Some(Inflight {
                packet_id,
                stage,
                sent_at: now,
            });
        }
        Ok(Ticket { slot, packet_id })
    }

    fn entry(&self, ticket: Ticket) -> Option<&Inflight> {
        self.inflight
            .get(usize::from(ticket.slot))
            .and_then(Option::as_ref)
            .filter(|entry| entry.packet_id == ticket.packet_id)
    }

    fn release(&mut self, ticket: Ticket) {
        if let Some(entry) = self.inflight.get_mut(usize::from(ticket.slot))
            && entry.is_some_and(|inflight| inflight.packet_id == ticket.packet_id)
        {
            *entry = None;
        }
    }

    /// Sends a PUBLISH. For QoS 1 and 2 the message takes an in-flight slot
    /// until it is acknowledged, and the returned ticket follows it; the
    /// caller keeps topic and payload until [`Event::Completed`] so that
    /// [`Session::resend`] can send them again after a reconnect.
    pub fn publish<W: Write>(
        &mut self,
        io: &mut W,
        now: u32,
        topic: &str,
        payload: &[u8],
        qos: QoS,
        retain: bool,
    ) -> Result<Option<Ticket>, Error> {
        topic::check_name(topic.as_bytes())?;
        if self.link != Link::Up {
            return Err(Error::NotConnected);
        }
        let ticket = match qos {
            QoS::AtMostOnce => None,
            QoS::AtLeastOnce => Some(self.start_command(now, Stage::AwaitPubAck { retain })?),
            QoS::ExactlyOnce => Some(self.start_command(now, Stage::AwaitPubRec { retain })?),
        };
        let publish = Publish {
            topic,
            packet_id: ticket.map(|ticket| ticket.packet_id),
            qos,
            retain,
            dup: false,
            payload,
        };
        let written = codec::write_publish(io, &publish);
        if let (Err(_), Some(ticket)) = (&written, ticket) {
            // At most part of the packet left, which the broker discards:
            // the message was not sent, and the caller may send it again.
            self.release(ticket);
        }
        written?;
        self.last_sent = now;
        Ok(ticket)
    }

    /// Slots of in-flight publishes that must be sent again on this
    /// (re)connected link, in no particular order.
    pub fn publishes_to_resend(&self) -> impl Iterator<Item = Ticket> + '_ {
        self.inflight.iter().enumerate().filter_map(|(slot, entry)| {
            let entry = entry.as_ref()?;
            let wants_payload = matches!(entry.stage, Stage::AwaitPubAck { .. } | Stage::AwaitPubRec { .. });
            let slot = u8::try_from(slot).ok()?;
            wants_payload.then_some(Ticket {
                slot,
                packet_id: entry.packet_id,
            })
        })
    }

    /// Sends an in-flight publish again with DUP set and its packet id.
    pub fn resend<W: Write>(
        &mut self,
        io: &mut W,
        now: u32,
        ticket: Ticket,
        topic: &str,
        payload: &[u8],
    ) -> Result<(), Error> {
        if self.link != Link::Up {
            return Err(Error::NotConnected);
        }
        let entry = *self.entry(ticket).ok_or(Error::WrongState)?;
        let (qos, retain) = match entry.stage {
            Stage::AwaitPubAck { retain } => (QoS::AtLeastOnce, retain),
            Stage::AwaitPubRec { retain } => (QoS::ExactlyOnce, retain),
            _ => return Err(Error::WrongState),
        };
        let publish = Publish {
            topic,
            packet_id: Some(entry.packet_id),
            qos,
            retain,
            dup: true,
            payload,
        };
        codec::write_publish(io, &publish)?;
        self.restart_timer(ticket, now);
        self.last_sent = now;
        Ok(())
    }

    /// Sends PUBREL again for every QoS 2 publish whose PUBREC arrived on an
    /// earlier link.
    pub fn resend_releases<W: Write>(&mut self, io: &mut W, now: u32) -> Result<(), Error> {
        if self.link != Link::Up {
            return Err(Error::NotConnected);
        }
        for entry in self.inflight.iter_mut().flatten() {
            if entry.stage == Stage::AwaitPubComp {
                codec::write_ack(io, PacketType::PubRel, entry.packet_id)?;
                entry.sent_at = now;
                self.last_sent = now;
            }
        }
        Ok(())
    }

    fn restart_timer(&mut self, ticket: Ticket, now: u32) {
        if let Some(Some(entry)) = self.inflight.get_mut(usize::from(ticket.slot)) {
            entry.sent_at = now;
        }
    }

    /// Sends a SUBSCRIBE for one filter.
    pub fn subscribe<W: Write>(&mut self, io: &mut W, now: u32, filter: &str, qos: QoS) -> Result<Ticket, Error> {
        topic::check_filter(filter.as_bytes())?;
        if self.link != Link::Up {
            return Err(Error::NotConnected);
        }
        let ticket = self.start_command(now, Stage::AwaitSubAck)?;
        codec::write_subscribe(io, ticket.packet_id, &[(filter, qos)])?;
        self.last_sent = now;
        Ok(ticket)
    }

    /// Sends an UNSUBSCRIBE for one filter.
    pub fn unsubscribe<W: Write>(&mut self, io: &mut W, now: u32, filter: &str) -> Result<Ticket, Error> {
        topic::check_filter(filter.as_bytes())?;
        if self.link != Link::Up {
            return Err(Error::NotConnected);
        }
        let ticket = self.start_command(now, Stage::AwaitUnsubAck)?;
        codec::write_unsubscribe(io, ticket.packet_id, &[filter])?;
        self.last_sent = now;
        Ok(ticket)
    }

    /// Where the command behind `ticket` stands. An answered subscription's
    /// slot is freed by this call, so ask once it is `Done`.
    pub fn command_state(&mut self, ticket: Ticket, now: u32) -> CommandState {
        let timed_out = |since: u32| elapsed(now, since) >= self.config.command_timeout_ms;
        if ticket.slot == Ticket::CONNECT_SLOT {
            return match (self.link, self.last_connack) {
                (Link::Up, _) => CommandState::Done(0),
                (Link::AwaitingConnAck { since }, _) if timed_out(since) => CommandState::TimedOut,
                (Link::AwaitingConnAck { .. }, _) => CommandState::Pending,
                (Link::Down, Some(code)) => CommandState::Done(code),
                (Link::Down, None) => CommandState::Interrupted,
            };
        }
        let Some(entry) = self.entry(ticket).copied() else {
            // A publish leaves the table when its flow completes.
            return CommandState::Done(0);
        };
        match entry.stage {
            Stage::Answered(code) => {
                self.release(ticket);
                CommandState::Done(code)
            }
            _ if self.link != Link::Up => {
                self.forget(ticket);
                CommandState::Interrupted
            }
            _ if timed_out(entry.sent_at) => CommandState::TimedOut,
            _ => CommandState::Pending,
        }
    }

    /// Gives up waiting for a subscription's answer. A publish is kept: it
    /// is sent again after a reconnect.
    pub fn forget(&mut self, ticket: Ticket) {
        if self.entry(ticket).is_some_and(|entry| !entry.is_publish()) {
            self.release(ticket);
        }
    }

    /// How long the broker has to answer PINGREQ: half a keepalive period,
    /// so that a dead link is noticed within 1.5 periods of silence.
    fn ping_patience(&self) -> u32 {
        (self.keepalive_ms / 2).min(self.config.command_timeout_ms).max(1)
    }

    /// How long the link has been quiet in either direction. Pinging when
    /// nothing came in for a keepalive period, too, finds a dead link even
    /// while the application keeps publishing.
    fn idle_for(&self, now: u32) -> u32 {
        elapsed(now, self.last_sent).max(elapsed(now, self.last_received))
    }

    /// Milliseconds until [`Session::tick`] has work to do (a PINGREQ to
    /// send, an answer overdue), at most `limit`: how long a caller may wait
    /// for input before it should tick again.
    pub fn next_timer(&self, now: u32, limit: u32) -> u32 {
        let until = |since: u32, period: u32| period.saturating_sub(elapsed(now, since));
        let due = match self.link {
            Link::Down => limit,
            Link::AwaitingConnAck { since } => until(since, self.config.command_timeout_ms),
            Link::Up if self.keepalive_ms == 0 => limit,
            Link::Up => match self.ping_sent {
                Some(sent) => until(sent, self.ping_patience()),
                None => until(self.last_sent, self.keepalive_ms).min(until(self.last_received, self.keepalive_ms)),
            },
        };
        due.min(limit)
    }

    /// Runs the timers: sends PINGREQ when nothing was sent, or nothing
    /// received, for the keepalive period, and fails when the broker does
    /// not answer it, or CONNECT, in time.
    pub fn tick<W: Write>(&mut self, io: &mut W, now: u32) -> Result<(), Error> {
        match self.link {
            Link::Down => Ok(()),
            Link::AwaitingConnAck { since } => {
                if elapsed(now, since) >= self.config.command_timeout_ms {
                    Err(Error::ConnectTimeout)
                } else {
                    Ok(())
                }
            }
            Link::Up if self.keepalive_ms == 0 => Ok(()),
            Link::Up => {
                if let Some(sent) = self.ping_sent {
                    // Half a keepalive period for the answer: a dead link is
                    // noticed within 1.5 keepalive periods of silence.
                    if elapsed(now, sent) >= self.ping_patience() {
                        return Err(Error::PingTimeout);
                    }
                } else if self.idle_for(now) >= self.keepalive_ms {
                    codec::write_empty(io, PacketType::PingReq)?;
                    self.ping_sent = Some(now);
                    self.last_sent = now;
                }
                Ok(())
            }
        }
    }

    /// Reads one packet if one has started to arrive and handles it. A
    /// packet whose first byte is here must complete within the transport's
    /// deadline. PUBLISH is read only up to its topic: see [`Event::Message`].
    pub fn receive<T: Read + Write + ReadReady>(&mut self, io: &mut T, now: u32) -> Result<Event, Error> {
        self.reading(io, |session, reading| session.receive_packet(reading, now))
    }

    fn receive_packet<T: Read + Write + ReadReady>(
        &mut self,
        io: &mut Reading<'_, T>,
        now: u32,
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
        let mut body = [0u8; SMALL_BODY_MAX];
        let body = usize::try_from(remaining_length)
            .ok()
            .and_then(|len| body.get_mut(..len))
            .ok_or(Error::Malformed(DecodeError::BadLength))?;
        codec::read_exact(io, body)?;
        let packet = codec::decode_from_broker(kind, flags, body)?;
        // Answers go straight to the transport (one copy of the writers).
        self.handle(io.io, now, packet)
    }

    fn start_message<T: Read>(&mut self, io: &mut T, flags: u8, remaining_length: u32) -> Result<Event, Error> {
        if self.link != Link::Up {
            return Err(Error::UnexpectedPacket);
        }
        if remaining_length > self.config.max_packet_size {
            return Err(Error::PacketTooLarge);
        }
        let qos = QoS::from_bits((flags >> 1) & 0b11).ok_or(DecodeError::InvalidQoS)?;
        let dup = flags & 0b1000 != 0;
        if qos == QoS::AtMostOnce && dup {
            return Err(DecodeError::InvalidFlags.into());
        }
        let mut length = [0u8; 2];
        codec::read_exact(io, &mut length)?;
        let topic_len = u16::from_be_bytes(length);
        if topic_len == 0 {
            return Err(DecodeError::InvalidTopic.into());
        }
        let id_len = if qos == QoS::AtMostOnce { 0 } else { 2 };
        // Topic length prefix, topic, packet id: at most 65,539 bytes.
        let header_len = u32::from(topic_len).saturating_add(2).saturating_add(id_len);
        let payload_len = remaining_length.checked_sub(header_len).ok_or(DecodeError::BadLength)?;
        self.incoming = Incoming::Topic {
            topic_len,
            payload_len,
            qos,
        };
        Ok(Event::Message {
            topic_len,
            payload_len,
            qos,
            retain: flags & 1 != 0,
            dup,
        })
    }

    /// Reads the topic of the message announced by [`Event::Message`] into
    /// `topic` (exactly `topic_len` bytes) and checks it.
    pub fn read_topic<T: Read>(&mut self, io: &mut T, topic: &mut [u8]) -> Result<MessageInfo, Error> {
        self.reading(io, |session, reading| session.read_topic_from(reading, topic))
    }

    fn read_topic_from<T: Read>(&mut self, io: &mut T, topic: &mut [u8]) -> Result<MessageInfo, Error> {
        let Incoming::Topic {
            topic_len,
            payload_len,
            qos,
        } = self.incoming
        else {
            return Err(Error::WrongState);
        };
        if topic.len() != usize::from(topic_len) {
            return Err(Error::WrongState);
        }
        codec::read_exact(io, topic)?;
        topic::check_name(topic).map_err(|_| DecodeError::InvalidTopic)?;
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
        let deliver = !(qos == QoS::ExactlyOnce && self.inbound_qos2.contains(packet_id));
        if qos == QoS::ExactlyOnce && deliver {
            // Remembered before the application gets the message: if the
            // link dies before PUBREC leaves, the broker's resend is then
            // recognised and not delivered a second time.
            self.inbound_qos2.remember(packet_id);
        }
        let info = MessageInfo { packet_id, deliver };
        self.incoming = Incoming::Payload { payload_len, qos, info };
        Ok(info)
    }

    /// Reads the payload of the current message into `payload` (exactly
    /// `payload_len` bytes), or skips it when `payload` is `None`.
    pub fn read_payload<T: Read>(&mut self, io: &mut T, payload: Option<&mut [u8]>) -> Result<(), Error> {
        self.reading(io, |session, reading| session.read_payload_from(reading, payload))
    }

    fn read_payload_from<T: Read>(&mut self, io: &mut T, payload: Option<&mut [u8]>) -> Result<(), Error> {
        let Incoming::Payload { payload_len, qos, info } = self.incoming else {
            return Err(Error::WrongState);
        };
        match payload {
            Some(buffer) => {
                if u32::try_from(buffer.len()) != Ok(payload_len) {
                    return Err(Error::WrongState);
                }
                codec::read_exact(io, buffer)?;
            }
            None => {
                if qos == QoS::ExactlyOnce && info.deliver {
                    // Skipped, so not delivered: the broker's resend must be.
                    self.inbound_qos2.forget(info.packet_id);
                }
                let mut scratch = [0u8; 64];
                let mut left = payload_len;
                while left > 0 {
                    let chunk = scratch.len().min(usize::try_from(left).unwrap_or(scratch.len()));
                    let part = scratch.get_mut(..chunk).ok_or(Error::WrongState)?;
                    codec::read_exact(io, part)?;
                    left = left.saturating_sub(u32::try_from(chunk).unwrap_or(left));
                }
            }
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

    fn find(&self, packet_id: u16, at_stage: impl Fn(Stage) -> bool) -> Option<Ticket> {
        self.inflight.iter().enumerate().find_map(|(slot, entry)| {
            let entry = entry.as_ref()?;
            let found = entry.packet_id == packet_id && at_stage(entry.stage);
            found.then_some(Ticket {
                slot: u8::try_from(slot).ok()?,
                packet_id,
            })
        })
    }

    fn set_stage(&mut self, ticket: Ticket, stage: Stage, now: u32) {
        if let Some(Some(entry)) = self.inflight.get_mut(usize::from(ticket.slot)) {
            entry.stage = stage;
            entry.sent_at = now;
        }
    }

    fn handle<W: Write>(&mut self, io: &mut W, now: u32, packet: Packet<'_>) -> Result<Event, Error> {
        let awaiting_connack = matches!(self.link, Link::AwaitingConnAck { .. });
        match packet {
            Packet::ConnAck { code, session_present } if awaiting_connack => {
                self.last_connack = Some(code);
                self.link = if code == 0 { Link::Up } else { Link::Down };
                self.last_sent = now;
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
                if let Some(ticket) = self.find(packet_id, |stage| stage == Stage::AwaitSubAck) {
                    // One filter per SUBSCRIBE, so exactly one return code.
                    let [code] = codes else {
                        return Err(DecodeError::BadLength.into());
                    };
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
        Ok(Event::Nothing)
    }
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

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::panic,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)]
mod tests {
    use super::*;
    use crate::codec::{Will, write_ack, write_connack, write_empty, write_publish, write_suback};
    use std::collections::VecDeque;
    use std::vec::Vec;

    /// An in-memory broker link: bytes the broker sent, bytes we wrote.
    #[derive(Default)]
    struct Pipe {
        inbound: VecDeque<u8>,
        outbound: Vec<u8>,
        /// Every write fails, as on a link that just died.
        broken: bool,
    }

    impl embedded_io::ErrorType for Pipe {
        type Error = embedded_io::ErrorKind;
    }

    impl Read for Pipe {
        fn read(&mut self, buf: &mut [u8]) -> Result<usize, Self::Error> {
            let count = buf.len().min(self.inbound.len());
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
        fn broker_sends(&mut self, write: impl FnOnce(&mut Vec<u8>)) {
            let mut bytes = Vec::new();
            write(&mut bytes);
            self.inbound.extend(bytes);
        }

        /// Decodes and removes everything the client wrote.
        fn take_sent(&mut self) -> Vec<String> {
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

    struct VecWriter<'a>(&'a mut Vec<u8>);
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

    const CONFIG: Config = Config {
        command_timeout_ms: 1000,
        max_packet_size: 1 << 20,
    };

    fn connect_options(keepalive_s: u16, clean_session: bool) -> Connect<'static> {
        Connect {
            client_id: "c1",
            clean_session,
            keepalive_s,
            will: None,
            username: None,
            password: None,
        }
    }

    fn connected(keepalive_s: u16) -> (Session, Pipe) {
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
    fn read_message<T: Read + Write + ReadReady>(
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

    fn broker_publish(pipe: &mut Pipe, topic: &str, payload: &[u8], qos: QoS, id: u16, dup: bool) {
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

    #[test]
    fn session_is_small() {
        // It lives in the client's heap object: every byte counts.
        assert_eq!(core::mem::size_of::<Inflight>(), 8);
        assert!(
            core::mem::size_of::<Session>() <= 216,
            "{}",
            core::mem::size_of::<Session>()
        );
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
    fn qos1_publish_flow() {
        let (mut session, mut pipe) = connected(0);
        let ticket = session
            .publish(&mut pipe, 10, "a/b", b"x", QoS::AtLeastOnce, false)
            .unwrap()
            .unwrap();
        assert_eq!(
            pipe.take_sent(),
            [format!(
                "{:?}",
                Packet::Publish(Publish {
                    topic: "a/b",
                    packet_id: Some(ticket.packet_id),
                    qos: QoS::AtLeastOnce,
                    retain: false,
                    dup: false,
                    payload: b"x"
                })
            )]
        );
        assert_eq!(session.command_state(ticket, 20), CommandState::Pending);
        pipe.broker_sends(|b| write_ack(&mut VecWriter(b), PacketType::PubAck, ticket.packet_id).unwrap());
        assert_eq!(session.receive(&mut pipe, 30).unwrap(), Event::Completed(ticket));
        assert_eq!(session.command_state(ticket, 30), CommandState::Done(0));
    }

    #[test]
    fn qos2_publish_flow() {
        let (mut session, mut pipe) = connected(0);
        let ticket = session
            .publish(&mut pipe, 10, "a", b"x", QoS::ExactlyOnce, true)
            .unwrap()
            .unwrap();
        pipe.take_sent();
        pipe.broker_sends(|b| write_ack(&mut VecWriter(b), PacketType::PubRec, ticket.packet_id).unwrap());
        assert_eq!(session.receive(&mut pipe, 11).unwrap(), Event::Nothing);
        assert_eq!(pipe.take_sent(), [format!("{:?}", Packet::PubRel(ticket.packet_id))]);
        assert_eq!(session.command_state(ticket, 12), CommandState::Pending);
        pipe.broker_sends(|b| write_ack(&mut VecWriter(b), PacketType::PubComp, ticket.packet_id).unwrap());
        assert_eq!(session.receive(&mut pipe, 13).unwrap(), Event::Completed(ticket));
        assert_eq!(session.command_state(ticket, 14), CommandState::Done(0));
    }

    #[test]
    fn publish_times_out_but_stays_in_flight_for_resend() {
        let (mut session, mut pipe) = connected(0);
        let ticket = session
            .publish(&mut pipe, 0, "a", b"payload", QoS::AtLeastOnce, true)
            .unwrap()
            .unwrap();
        assert_eq!(session.command_state(ticket, 1000), CommandState::TimedOut);
        session.link_lost();
        assert_eq!(session.command_state(ticket, 1001), CommandState::Interrupted);
        // Reconnect without a clean session: the message goes again, DUP set.
        session.connect(&mut pipe, 2000, &connect_options(0, false)).unwrap();
        pipe.broker_sends(|b| write_connack(&mut VecWriter(b), true, 0).unwrap());
        session.receive(&mut pipe, 2001).unwrap();
        pipe.take_sent();
        let resend: Vec<_> = session.publishes_to_resend().collect();
        assert_eq!(resend, [ticket]);
        session.resend(&mut pipe, 2002, ticket, "a", b"payload").unwrap();
        let expected = Packet::Publish(Publish {
            topic: "a",
            packet_id: Some(ticket.packet_id),
            qos: QoS::AtLeastOnce,
            retain: true,
            dup: true,
            payload: b"payload",
        });
        assert_eq!(pipe.take_sent(), [format!("{expected:?}")]);
        assert_eq!(session.command_state(ticket, 2003), CommandState::Pending);
    }

    #[test]
    fn publish_that_could_not_be_written_is_not_in_flight() {
        let (mut session, mut pipe) = connected(0);
        pipe.broken = true;
        assert_eq!(
            session.publish(&mut pipe, 0, "a", b"x", QoS::AtLeastOnce, false),
            Err(Error::Transport)
        );
        assert_eq!(session.inflight.iter().flatten().count(), 0);
        session.link_lost();
        assert_eq!(session.publishes_to_resend().count(), 0);
    }

    #[test]
    fn pubrel_is_resent_after_reconnect() {
        let (mut session, mut pipe) = connected(0);
        let ticket = session
            .publish(&mut pipe, 0, "a", b"", QoS::ExactlyOnce, false)
            .unwrap()
            .unwrap();
        pipe.broker_sends(|b| write_ack(&mut VecWriter(b), PacketType::PubRec, ticket.packet_id).unwrap());
        session.receive(&mut pipe, 1).unwrap();
        session.link_lost();
        session.connect(&mut pipe, 2, &connect_options(0, false)).unwrap();
        pipe.broker_sends(|b| write_connack(&mut VecWriter(b), true, 0).unwrap());
        session.receive(&mut pipe, 3).unwrap();
        pipe.take_sent();
        assert_eq!(session.publishes_to_resend().count(), 0);
        session.resend_releases(&mut pipe, 4).unwrap();
        assert_eq!(pipe.take_sent(), [format!("{:?}", Packet::PubRel(ticket.packet_id))]);
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

    #[test]
    fn in_flight_table_is_bounded_and_ids_unique() {
        let (mut session, mut pipe) = connected(0);
        let mut ids = Vec::new();
        for _ in 0..INFLIGHT_MAX {
            ids.push(
                session
                    .publish(&mut pipe, 0, "a", b"", QoS::AtLeastOnce, false)
                    .unwrap()
                    .unwrap()
                    .packet_id,
            );
        }
        assert_eq!(
            session.publish(&mut pipe, 0, "a", b"", QoS::AtLeastOnce, false),
            Err(Error::InflightFull)
        );
        // QoS 0 needs no slot.
        assert_eq!(
            session.publish(&mut pipe, 0, "a", b"", QoS::AtMostOnce, false),
            Ok(None)
        );
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), INFLIGHT_MAX);
        assert!(!ids.contains(&0));
    }

    #[test]
    fn packet_ids_wrap_and_skip_zero_and_ids_in_use() {
        let (mut session, mut pipe) = connected(0);
        session.next_packet_id = 65_535;
        let first = session
            .publish(&mut pipe, 0, "a", b"", QoS::AtLeastOnce, false)
            .unwrap()
            .unwrap();
        assert_eq!(first.packet_id, 65_535);
        let second = session
            .publish(&mut pipe, 0, "a", b"", QoS::AtLeastOnce, false)
            .unwrap()
            .unwrap();
        assert_eq!(second.packet_id, 1);
        session.next_packet_id = 65_535;
        let third = session
            .publish(&mut pipe, 0, "a", b"", QoS::AtLeastOnce, false)
            .unwrap()
            .unwrap();
        assert_eq!(third.packet_id, 2, "65535 and 1 are still in flight");
    }

    #[test]
    fn subscribe_reports_granted_qos_and_failure() {
        let (mut session, mut pipe) = connected(0);
        let ticket = session.subscribe(&mut pipe, 0, "a/+", QoS::ExactlyOnce).unwrap();
        pipe.broker_sends(|b| write_suback(&mut VecWriter(b), ticket.packet_id, &[1]).unwrap());
        assert_eq!(session.receive(&mut pipe, 1).unwrap(), Event::Answered(ticket));
        assert_eq!(session.command_state(ticket, 2), CommandState::Done(1));
        let ticket = session.subscribe(&mut pipe, 0, "b", QoS::AtMostOnce).unwrap();
        pipe.broker_sends(|b| write_suback(&mut VecWriter(b), ticket.packet_id, &[0x80]).unwrap());
        session.receive(&mut pipe, 1).unwrap();
        assert_eq!(session.command_state(ticket, 2), CommandState::Done(0x80));
        assert_eq!(
            session.subscribe(&mut pipe, 0, "a/#/b", QoS::AtMostOnce),
            Err(Error::InvalidTopic(TopicError::MisplacedWildcard))
        );
    }

    #[test]
    fn suback_with_wrong_number_of_codes_is_a_protocol_error() {
        let (mut session, mut pipe) = connected(0);
        let ticket = session.subscribe(&mut pipe, 0, "a", QoS::AtMostOnce).unwrap();
        pipe.broker_sends(|b| write_suback(&mut VecWriter(b), ticket.packet_id, &[0, 0]).unwrap());
        assert_eq!(
            session.receive(&mut pipe, 1),
            Err(Error::Malformed(DecodeError::BadLength))
        );
    }

    #[test]
    fn unsubscribe_flow_and_forget() {
        let (mut session, mut pipe) = connected(0);
        let ticket = session.unsubscribe(&mut pipe, 0, "a/#").unwrap();
        pipe.broker_sends(|b| write_ack(&mut VecWriter(b), PacketType::UnsubAck, ticket.packet_id).unwrap());
        assert_eq!(session.receive(&mut pipe, 1).unwrap(), Event::Answered(ticket));
        assert_eq!(session.command_state(ticket, 1), CommandState::Done(0));
        let ticket = session.unsubscribe(&mut pipe, 0, "a/#").unwrap();
        assert_eq!(session.command_state(ticket, 1000), CommandState::TimedOut);
        session.forget(ticket);
        assert_eq!(session.inflight.iter().flatten().count(), 0);
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
        assert_eq!(session.receive(&mut pipe, 3).unwrap(), Event::Nothing);
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
    fn skipped_qos2_message_is_delivered_when_sent_again() {
        let (mut session, mut pipe) = connected(0);
        broker_publish(&mut pipe, "x", b"big", QoS::ExactlyOnce, 4, false);
        let Event::Message { topic_len, .. } = session.receive(&mut pipe, 0).unwrap() else {
            panic!()
        };
        session.read_topic(&mut pipe, &mut vec![0; topic_len.into()]).unwrap();
        session.read_payload(&mut pipe, None).unwrap();
        session.link_lost();
        session.connect(&mut pipe, 1, &connect_options(0, false)).unwrap();
        pipe.broker_sends(|b| write_connack(&mut VecWriter(b), true, 0).unwrap());
        session.receive(&mut pipe, 2).unwrap();
        broker_publish(&mut pipe, "x", b"big", QoS::ExactlyOnce, 4, true);
        assert!(read_message(&mut session, &mut pipe, 3).unwrap().2.deliver);
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

    /// A transport that counts its reads.
    struct Counting<'a> {
        pipe: &'a mut Pipe,
        reads: usize,
    }

    impl embedded_io::ErrorType for Counting<'_> {
        type Error = embedded_io::ErrorKind;
    }

    impl Read for Counting<'_> {
        fn read(&mut self, buf: &mut [u8]) -> Result<usize, Self::Error> {
            self.reads += 1;
            self.pipe.read(buf)
        }
    }

    impl ReadReady for Counting<'_> {
        fn read_ready(&mut self) -> Result<bool, Self::Error> {
            self.pipe.read_ready()
        }
    }

    impl Write for Counting<'_> {
        fn write(&mut self, buf: &[u8]) -> Result<usize, Self::Error> {
            self.pipe.write(buf)
        }
        fn flush(&mut self) -> Result<(), Self::Error> {
            Ok(())
        }
    }

    #[test]
    fn packets_are_read_ahead_in_few_transport_reads() {
        let (mut session, mut pipe) = connected(0);
        let ticket = session
            .publish(&mut pipe, 0, "a", b"", QoS::AtLeastOnce, false)
            .unwrap()
            .unwrap();
        pipe.broker_sends(|b| write_ack(&mut VecWriter(b), PacketType::PubAck, ticket.packet_id).unwrap());
        broker_publish(&mut pipe, "topic/x", &[5; 100], QoS::AtMostOnce, 0, false);
        let mut io = Counting {
            pipe: &mut pipe,
            reads: 0,
        };
        assert_eq!(session.receive(&mut io, 1).unwrap(), Event::Completed(ticket));
        assert_eq!(io.reads, 1, "the PUBACK and the start of the PUBLISH came in one read");
        assert!(session.has_input());
        let (topic, payload, _) = read_message(&mut session, &mut io, 2).unwrap();
        assert_eq!((topic.as_str(), payload), ("topic/x", vec![5; 100]));
        // The rest of the payload went straight into the caller's buffer.
        assert_eq!(io.reads, 2);
        assert!(!session.has_input());
    }

    #[test]
    fn read_ahead_bytes_of_a_dead_link_are_dropped() {
        let (mut session, mut pipe) = connected(0);
        pipe.broker_sends(|b| b.extend_from_slice(&[0xd0, 0, 0x30]));
        session.receive(&mut pipe, 1).unwrap();
        assert!(session.has_input());
        session.link_lost();
        assert!(!session.has_input());
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
    fn oversized_and_malformed_publish_are_refused() {
        let config = Config {
            max_packet_size: 100,
            ..CONFIG
        };
        let (mut session, mut pipe) = connected(0);
        session.config = config;
        broker_publish(&mut pipe, "t", &[0; 200], QoS::AtMostOnce, 0, false);
        assert_eq!(session.receive(&mut pipe, 0), Err(Error::PacketTooLarge));

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

    #[test]
    fn unknown_acknowledgements_are_ignored() {
        let (mut session, mut pipe) = connected(0);
        pipe.broker_sends(|b| {
            write_ack(&mut VecWriter(b), PacketType::PubAck, 99).unwrap();
            write_ack(&mut VecWriter(b), PacketType::PubComp, 99).unwrap();
            write_ack(&mut VecWriter(b), PacketType::UnsubAck, 99).unwrap();
            write_suback(&mut VecWriter(b), 99, &[0]).unwrap();
        });
        for _ in 0..4 {
            assert_eq!(session.receive(&mut pipe, 0).unwrap(), Event::Nothing);
        }
        assert!(session.is_connected());
    }

    #[test]
    fn keepalive_pings_and_detects_a_dead_broker() {
        let (mut session, mut pipe) = connected(10);
        session.tick(&mut pipe, 9_999).unwrap();
        assert!(pipe.take_sent().is_empty());
        session.tick(&mut pipe, 10_001).unwrap();
        assert_eq!(pipe.take_sent(), ["PingReq"]);
        pipe.broker_sends(|b| write_empty(&mut VecWriter(b), PacketType::PingResp).unwrap());
        session.receive(&mut pipe, 10_002).unwrap();
        session.tick(&mut pipe, 15_000).unwrap();
        assert!(pipe.take_sent().is_empty(), "the ping reset the idle timer");
        session.tick(&mut pipe, 20_001).unwrap();
        assert_eq!(pipe.take_sent(), ["PingReq"]);
        // No PINGRESP: half a keepalive later (capped by the command
        // timeout of 1 s here) the link is declared dead.
        assert_eq!(session.tick(&mut pipe, 20_500), Ok(()));
        assert_eq!(session.tick(&mut pipe, 21_001), Err(Error::PingTimeout));
    }

    #[test]
    fn next_timer_tells_when_to_tick() {
        let (mut session, mut pipe) = connected(10);
        assert_eq!(session.next_timer(1, 500), 500);
        assert_eq!(session.next_timer(9_801, 500), 200);
        assert_eq!(session.next_timer(10_001, 500), 0);
        session.tick(&mut pipe, 10_001).unwrap();
        // Waiting for PINGRESP: the command timeout (1 s) caps the patience.
        assert_eq!(session.next_timer(10_401, 5_000), 600);
        session.link_lost();
        assert_eq!(session.next_timer(10_400, 5_000), 5_000);
        let (session, _) = connected(0);
        assert_eq!(session.next_timer(123, 700), 700);
    }

    #[test]
    fn keepalive_pings_while_only_receiving() {
        let (mut session, mut pipe) = connected(1);
        let mut pings = 0;
        for now in (100..5_000).step_by(100) {
            broker_publish(&mut pipe, "t", b"", QoS::AtMostOnce, 0, false);
            read_message(&mut session, &mut pipe, now);
            session.tick(&mut pipe, now).unwrap();
            if let Some(packet) = pipe.take_sent().first() {
                assert_eq!(packet, "PingReq");
                pings += 1;
                pipe.broker_sends(|b| write_empty(&mut VecWriter(b), PacketType::PingResp).unwrap());
                session.receive(&mut pipe, now).unwrap();
            }
        }
        assert_eq!(pings, 4, "one ping per second of not sending");
    }

    #[test]
    fn keepalive_pings_while_only_sending_and_finds_the_dead_link() {
        let (mut session, mut pipe) = connected(2);
        // The application publishes every 100 ms; the broker is silent.
        let mut failed_at = None;
        for now in (100..10_000).step_by(100) {
            session
                .publish(&mut pipe, now, "t", b"", QoS::AtMostOnce, false)
                .unwrap();
            if session.tick(&mut pipe, now).is_err() {
                failed_at = Some(now);
                break;
            }
        }
        assert!(pipe.take_sent().iter().any(|packet| packet == "PingReq"));
        // Last packet received at 1 ms: ping at 2 s, dead 1 s later.
        assert_eq!(failed_at, Some(3_100));
    }

    #[test]
    fn clock_wraps() {
        let (mut session, mut pipe) = connected(10);
        session.last_sent = u32::MAX - 100;
        session.tick(&mut pipe, 5_000).unwrap();
        assert!(pipe.take_sent().is_empty());
        session.tick(&mut pipe, 9_900).unwrap();
        assert_eq!(pipe.take_sent(), ["PingReq"]);
    }

    #[test]
    fn interrupted_subscription_is_forgotten_and_publish_kept() {
        let (mut session, mut pipe) = connected(0);
        let sub = session.subscribe(&mut pipe, 0, "a", QoS::AtMostOnce).unwrap();
        let publish = session
            .publish(&mut pipe, 0, "a", b"", QoS::AtLeastOnce, false)
            .unwrap()
            .unwrap();
        session.link_lost();
        assert_eq!(session.command_state(sub, 1), CommandState::Interrupted);
        assert_eq!(session.command_state(publish, 1), CommandState::Interrupted);
        assert_eq!(session.inflight.iter().flatten().count(), 1);
    }

    proptest::proptest! {
        /// Arbitrary bytes from the broker never make the session panic or
        /// read past what it was given, in any chunking.
        #[test]
        fn arbitrary_broker_bytes(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200)) {
            let (mut session, mut pipe) = connected(5);
            pipe.inbound.extend(bytes);
            for now in 0..50u32 {
                match session.receive(&mut pipe, now * 100) {
                    Ok(Event::Message { topic_len, payload_len, .. }) => {
                        let mut topic = vec![0; topic_len.into()];
                        if session.read_topic(&mut pipe, &mut topic).is_err() { break; }
                        let mut payload = vec![0; payload_len.min(1000) as usize];
                        let buffer = (payload.len() as u32 == payload_len).then_some(&mut payload[..]);
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
