//! What the client sends and waits for: the in-flight table of QoS 1/2
//! publishes, subscriptions and unsubscriptions, their packet ids, their
//! acknowledgements and their resend after a reconnect.

use embedded_io::Write;

use super::{AliasTopics, CONNECT_SLOT, CommandState, Error, Link, Session, Ticket, TopicName, V5, elapsed};
use crate::codec::v5::{MessageProperties, SubscriptionOptions};
use crate::codec::{self, PacketType, Publish, QoS};
use crate::topic;

/// How many QoS 1/2 publishes, subscriptions and unsubscriptions can wait
/// for their acknowledgement at once. A publish from the application's
/// thread waits for its own, so this bounds what callbacks send in a burst
/// and what a dead link leaves behind; each slot costs 8 bytes here and two
/// object references in the binding.
pub const INFLIGHT_MAX: usize = 8;

/// What a caller waiting for an answer does next ([`Session::await_answer`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Answered: the CONNACK or SUBACK return code, or 0.
    Answered(u8),
    /// Not yet: run a cycle, or let the loop that runs elsewhere work.
    Pending,
    /// The link is down and a loop elsewhere may reconnect: a publish
    /// waits for that.
    AwaitReconnect,
    /// The broker did not answer CONNECT in time: it counts as unreachable.
    ConnectTimedOut,
    /// No answer within the command timeout. A publish stays in flight.
    TimedOut,
    /// The link went down before a publish was acknowledged: it stays in
    /// flight and goes again after a reconnect.
    LinkLostInFlight,
    /// The link went down before the answer came.
    LinkLost,
}

/// A message to publish: its topic, payload and (MQTT 5) properties.
#[derive(Clone, Copy, Default)]
pub struct Message<'a> {
    pub topic: &'a str,
    pub payload: &'a [u8],
    /// Left out in MQTT 3.1.1. Its topic alias is the session's to choose.
    pub properties: MessageProperties<'a>,
}

/// What the caller kept of its in-flight publishes, to send them again
/// after a reconnect (the session keeps only their packet ids and state).
pub trait Kept {
    /// The publish in flight as `ticket`, as it was first sent, or None
    /// when nothing was kept for it.
    fn publish(&mut self, ticket: Ticket) -> Option<Message<'_>>;
}

/// Where an in-flight command stands. A publish waiting for its first
/// answer carries its RETAIN flag, needed to send it again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Stage {
    AwaitPubAck {
        retain: bool,
    },
    AwaitPubRec {
        retain: bool,
    },
    AwaitPubComp,
    AwaitSubAck,
    /// A subscription sent again after a reconnect: nobody waits for it.
    AwaitResubAck,
    AwaitUnsubAck,
    Answered(u8),
}

/// One in-flight command: 8 bytes, INFLIGHT_MAX of them per client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Inflight {
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

/// Checks what the application may get wrong in an MQTT 5 message's
/// properties (the lengths are checked when the packet is written).
fn check_properties(message: &Message<'_>) -> Result<(), Error> {
    let properties = &message.properties;
    if let Some(topic) = properties.response_topic {
        topic::check_name(topic.as_bytes())?;
    }
    if properties.utf8_payload && codec::utf8(message.payload).is_none() {
        return Err(Error::NotText);
    }
    Ok(())
}

impl Session {
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

    pub(super) fn start_command(&mut self, now: u32, stage: Stage) -> Result<Ticket, Error> {
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

    pub(super) fn release(&mut self, ticket: Ticket) {
        if let Some(entry) = self.inflight.get_mut(usize::from(ticket.slot))
            && entry.is_some_and(|inflight| inflight.packet_id == ticket.packet_id)
        {
            *entry = None;
        }
    }

    /// Sends a PUBLISH without properties: see [`Session::publish_message`].
    pub fn publish<W: Write>(
        &mut self,
        io: &mut W,
        now: u32,
        topic: &str,
        payload: &[u8],
        qos: QoS,
        retain: bool,
    ) -> Result<Option<Ticket>, Error> {
        let message = Message {
            topic,
            payload,
            properties: MessageProperties::default(),
        };
        self.publish_message(io, now, &message, qos, retain)
    }

    /// Sends a PUBLISH. For QoS 1 and 2 the message takes an in-flight slot
    /// until it is acknowledged, and the returned ticket follows it; the
    /// caller keeps the message until [`Event::Completed`] so that
    /// [`Session::resume`] can send it again after a reconnect.
    pub fn publish_message<W: Write>(
        &mut self,
        io: &mut W,
        now: u32,
        message: &Message<'_>,
        qos: QoS,
        retain: bool,
    ) -> Result<Option<Ticket>, Error> {
        self.publish_aliased(io, now, message, qos, retain, None)
    }

    /// As [`Session::publish_message`]; in MQTT 5, with `aliases` (the
    /// session's V5 state and the topics the caller keeps for them), the
    /// topic goes by a topic alias when the broker takes them (see
    /// [`V5::topic_name`]).
    pub fn publish_aliased<W: Write>(
        &mut self,
        io: &mut W,
        now: u32,
        message: &Message<'_>,
        qos: QoS,
        retain: bool,
        aliases: Option<(&mut V5, &mut dyn AliasTopics)>,
    ) -> Result<Option<Ticket>, Error> {
        topic::check_name(message.topic.as_bytes())?;
        if self.is_v5() {
            check_properties(message)?;
        }
        if self.link != Link::Up {
            return Err(Error::NotConnected);
        }
        let ticket = match qos {
            QoS::AtMostOnce => None,
            QoS::AtLeastOnce => Some(self.start_command(now, Stage::AwaitPubAck { retain })?),
            QoS::ExactlyOnce => Some(self.start_command(now, Stage::AwaitPubRec { retain })?),
        };
        // Chosen last: an alias the session takes is set by this packet.
        let mut aliases = aliases.filter(|_| self.is_v5());
        let name = match aliases.as_mut() {
            Some((v5, topics)) => {
                // An alias takes three bytes: never beyond the broker's maximum.
                let by_alias = v5.fits(message, qos, retain, "", true);
                let setting = v5.fits(message, qos, retain, message.topic, true);
                v5.topic_name(message.topic, *topics, by_alias, setting)
            }
            None => TopicName::Topic,
        };
        let (topic, topic_alias) = match name {
            TopicName::Topic => (message.topic, 0),
            TopicName::SetAlias(alias) => (message.topic, alias),
            TopicName::Alias(alias) => ("", alias),
        };
        let publish = Publish {
            topic,
            packet_id: ticket.map(|ticket| ticket.packet_id),
            qos,
            retain,
            dup: false,
            payload: message.payload,
        };
        let properties = MessageProperties {
            topic_alias,
            ..message.properties
        };
        let written = self.write_publish(io, &publish, &properties);
        if written.is_err() {
            if let (Some((v5, _)), true) = (aliases, topic_alias != 0) {
                // The alias this packet would have set did not reach the broker.
                v5.forget_aliases();
            }
            if let Some(ticket) = ticket {
                // At most part of the packet left, which the broker discards:
                // the message was not sent, and the caller may send it again.
                self.release(ticket);
            }
        }
        written?;
        self.last_sent = now;
        Ok(ticket)
    }

    /// Writes a SUBSCRIBE for one filter in the session's protocol.
    pub(super) fn write_subscribe<W: Write>(
        &self,
        io: &mut W,
        packet_id: u16,
        filter: &str,
        options: SubscriptionOptions,
    ) -> Result<(), codec::EncodeError<W::Error>> {
        codec::v5::write_subscribe(io, packet_id, filter, &options, self.is_v5())
    }

    /// Writes a PUBLISH in the session's protocol (MQTT 3.1.1 leaves
    /// `properties` out).
    fn write_publish<W: Write>(
        &self,
        io: &mut W,
        publish: &Publish<'_>,
        properties: &MessageProperties<'_>,
    ) -> Result<(), codec::EncodeError<W::Error>> {
        codec::v5::write_publish(io, publish, self.is_v5().then_some(properties))
    }

    /// Sends again, on a link that just came up, what the previous one left
    /// unacknowledged: every in-flight publish whose topic and payload the
    /// caller kept (DUP set, the same packet id), then PUBREL for every QoS
    /// 2 publish whose PUBREC arrived. MQTT 3.1.1 asks for this whether or
    /// not the broker kept the session: one that lost it takes the
    /// publishes as new, and answers a PUBREL for an id it does not know.
    pub fn resume<W: Write, K: Kept>(&mut self, io: &mut W, now: u32, kept: &mut K) -> Result<(), Error> {
        for slot in 0..INFLIGHT_MAX {
            let Some(ticket) = self
                .publishes_to_resend()
                .find(|ticket| usize::from(ticket.slot) == slot)
            else {
                continue;
            };
            if let Some(message) = kept.publish(ticket) {
                self.resend(io, now, ticket, &message)?;
            }
        }
        self.resend_releases(io, now)
    }

    /// How many QoS 1/2 publishes are in flight.
    pub(super) fn publishes_in_flight(&self) -> usize {
        self.inflight
            .iter()
            .flatten()
            .filter(|entry| entry.is_publish())
            .count()
    }

    /// Slots of in-flight publishes that must be sent again on this
    /// (re)connected link, in no particular order.
    pub(super) fn publishes_to_resend(&self) -> impl Iterator<Item = Ticket> + '_ {
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
    pub(super) fn resend<W: Write>(
        &mut self,
        io: &mut W,
        now: u32,
        ticket: Ticket,
        message: &Message<'_>,
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
            topic: message.topic,
            packet_id: Some(entry.packet_id),
            qos,
            retain,
            dup: true,
            payload: message.payload,
        };
        // Topic aliases end with the link that set them.
        let properties = MessageProperties {
            topic_alias: 0,
            ..message.properties
        };
        self.write_publish(io, &publish, &properties)?;
        self.restart_timer(ticket, now);
        self.last_sent = now;
        Ok(())
    }

    /// Sends PUBREL again for every QoS 2 publish whose PUBREC arrived on an
    /// earlier link.
    pub(super) fn resend_releases<W: Write>(&mut self, io: &mut W, now: u32) -> Result<(), Error> {
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
        self.subscribe_with(io, now, filter, SubscriptionOptions::qos(qos))
    }

    /// Sends a SUBSCRIBE for one filter with MQTT 5's subscription options
    /// (an MQTT 3.1.1 session takes a QoS alone: [`Error::WrongState`]).
    pub fn subscribe_with<W: Write>(
        &mut self,
        io: &mut W,
        now: u32,
        filter: &str,
        options: SubscriptionOptions,
    ) -> Result<Ticket, Error> {
        topic::check_filter(filter.as_bytes())?;
        if !self.is_v5() && !options.is_qos_only() {
            return Err(Error::WrongState);
        }
        if self.link != Link::Up {
            return Err(Error::NotConnected);
        }
        let ticket = self.start_command(now, Stage::AwaitSubAck)?;
        self.write_subscribe(io, ticket.packet_id, filter, options)?;
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
        codec::v5::write_unsubscribe(io, ticket.packet_id, filter, self.is_v5())?;
        self.last_sent = now;
        Ok(ticket)
    }

    /// Where the command behind `ticket` stands. An answered subscription's
    /// slot is freed by this call, so ask once it is `Done`.
    pub fn command_state(&mut self, ticket: Ticket, now: u32) -> CommandState {
        let timed_out = |since: u32| elapsed(now, since) >= self.config.command_timeout_ms;
        if ticket.slot == CONNECT_SLOT {
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

    /// What a caller waiting for the answer to `ticket` does next: the
    /// meaning of an answer that has not come (see [`Verdict`]). `since` is
    /// when the caller began to wait; `loop_may_reconnect` says that a loop
    /// running elsewhere may bring a lost link back, which a publish then
    /// waits for. A subscription that timed out is forgotten; a publish
    /// stays in flight, to be sent again after a reconnect.
    pub fn await_answer(&mut self, ticket: Ticket, now: u32, since: u32, loop_may_reconnect: bool) -> Verdict {
        let publish = self.entry(ticket).is_some_and(Inflight::is_publish);
        let state = self.command_state(ticket, now);
        // A publish waits at most the command timeout from the call, even
        // when a resend restarted its own timer.
        let out_of_time = publish && elapsed(now, since) >= self.config.command_timeout_ms;
        match state {
            CommandState::Done(code) => Verdict::Answered(code),
            CommandState::TimedOut if ticket.slot == CONNECT_SLOT => Verdict::ConnectTimedOut,
            CommandState::TimedOut => {
                self.forget(ticket);
                Verdict::TimedOut
            }
            _ if out_of_time => Verdict::TimedOut,
            CommandState::Interrupted if publish && loop_may_reconnect => Verdict::AwaitReconnect,
            CommandState::Interrupted if publish => Verdict::LinkLostInFlight,
            CommandState::Interrupted => Verdict::LinkLost,
            CommandState::Pending => Verdict::Pending,
        }
    }

    /// Frees the slots of resubscriptions still waiting for their SUBACK.
    pub(super) fn forget_resubscriptions(&mut self) {
        for entry in &mut self.inflight {
            if entry.is_some_and(|inflight| inflight.stage == Stage::AwaitResubAck) {
                *entry = None;
            }
        }
    }

    /// Gives up waiting for a subscription's answer. A publish is kept: it
    /// is sent again after a reconnect.
    pub fn forget(&mut self, ticket: Ticket) {
        if self.entry(ticket).is_some_and(|entry| !entry.is_publish()) {
            self.release(ticket);
        }
    }

    pub(super) fn find(&self, packet_id: u16, at_stage: fn(Stage) -> bool) -> Option<Ticket> {
        self.inflight.iter().enumerate().find_map(|(slot, entry)| {
            let entry = entry.as_ref()?;
            let found = entry.packet_id == packet_id && at_stage(entry.stage);
            found.then_some(Ticket {
                slot: u8::try_from(slot).ok()?,
                packet_id,
            })
        })
    }

    pub(super) fn set_stage(&mut self, ticket: Ticket, stage: Stage, now: u32) {
        if let Some(Some(entry)) = self.inflight.get_mut(usize::from(ticket.slot)) {
            entry.stage = stage;
            entry.sent_at = now;
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::codec::{DecodeError, Packet, PacketType, Publish, QoS, write_ack, write_connack, write_suback};
    use crate::session::testing::*;
    use crate::session::{CommandState, Error, Event, INFLIGHT_MAX, Kept, Message, Session, Ticket, Verdict};
    use crate::topic::TopicError;

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
        assert_eq!(session.receive(&mut pipe, 11).unwrap(), Event::Handled);
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
        let message = Message {
            topic: "a",
            payload: b"payload",
            ..Message::default()
        };
        session.resend(&mut pipe, 2002, ticket, &message).unwrap();
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
    fn unknown_acknowledgements_are_ignored() {
        let (mut session, mut pipe) = connected(0);
        pipe.broker_sends(|b| {
            write_ack(&mut VecWriter(b), PacketType::PubAck, 99).unwrap();
            write_ack(&mut VecWriter(b), PacketType::PubComp, 99).unwrap();
            write_ack(&mut VecWriter(b), PacketType::UnsubAck, 99).unwrap();
            write_suback(&mut VecWriter(b), 99, &[0]).unwrap();
        });
        for _ in 0..4 {
            assert_eq!(session.receive(&mut pipe, 0).unwrap(), Event::Handled);
        }
        assert!(session.is_connected());
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

    /// What the binding keeps: topic and payload by ticket.
    struct KeptPublishes(Vec<(Ticket, &'static str, &'static [u8])>);

    impl Kept for KeptPublishes {
        fn publish(&mut self, ticket: Ticket) -> Option<Message<'_>> {
            let kept = self.0.iter().find(|(kept, ..)| *kept == ticket)?;
            Some(Message {
                topic: kept.1,
                payload: kept.2,
                ..Message::default()
            })
        }
    }

    #[test]
    fn resume_sends_again_what_the_last_link_left_with_or_without_a_session() {
        for session_present in [true, false] {
            let mut session = Session::new(CONFIG);
            let mut pipe = Pipe::default();
            session.connect(&mut pipe, 0, &connect_options(0, false)).unwrap();
            pipe.broker_sends(|b| write_connack(&mut VecWriter(b), false, 0).unwrap());
            session.receive(&mut pipe, 0).unwrap();
            let publish = |session: &mut Session, pipe: &mut Pipe, topic, qos| {
                session.publish(pipe, 1, topic, b"p", qos, false).unwrap().unwrap()
            };
            let a = publish(&mut session, &mut pipe, "a", QoS::AtLeastOnce);
            let b = publish(&mut session, &mut pipe, "b", QoS::ExactlyOnce);
            let c = publish(&mut session, &mut pipe, "c", QoS::ExactlyOnce);
            let d = publish(&mut session, &mut pipe, "d", QoS::AtLeastOnce);
            // b's PUBREC came: only its PUBREL is owed.
            pipe.broker_sends(|bytes| write_ack(&mut VecWriter(bytes), PacketType::PubRec, b.packet_id).unwrap());
            session.receive(&mut pipe, 2).unwrap();
            session.link_lost();
            session.connect(&mut pipe, 3, &connect_options(0, false)).unwrap();
            pipe.broker_sends(|bytes| write_connack(&mut VecWriter(bytes), session_present, 0).unwrap());
            session.receive(&mut pipe, 4).unwrap();
            pipe.take_sent();
            // The binding kept a, b and c (d's objects are gone).
            let mut kept = KeptPublishes(vec![(a, "a", b"p"), (b, "b", b"p"), (c, "c", b"p")]);
            session.resume(&mut pipe, 5, &mut kept).unwrap();
            let again = |ticket: Ticket, topic, qos| {
                format!(
                    "{:?}",
                    Packet::Publish(Publish {
                        topic,
                        packet_id: Some(ticket.packet_id),
                        qos,
                        retain: false,
                        dup: true,
                        payload: b"p",
                    })
                )
            };
            assert_eq!(
                pipe.take_sent(),
                [
                    again(a, "a", QoS::AtLeastOnce),
                    again(c, "c", QoS::ExactlyOnce),
                    format!("{:?}", Packet::PubRel(b.packet_id)),
                ]
            );
            // Each resent message waits for its answer again; d stays in
            // flight for a later resume.
            assert_eq!(session.command_state(a, 6), CommandState::Pending);
            assert_eq!(session.command_state(d, 6), CommandState::Pending);
        }
    }

    #[test]
    fn resume_needs_a_link_that_is_up() {
        let (mut session, mut pipe) = connected(0);
        session.link_lost();
        assert_eq!(
            session.resume(&mut pipe, 1, &mut KeptPublishes(Vec::new())),
            Err(Error::NotConnected)
        );
    }

    #[test]
    fn await_answer_says_what_a_missing_answer_means() {
        // Answered, and pending before that.
        let (mut session, mut pipe) = connected(0);
        let subscription = session.subscribe(&mut pipe, 0, "t", QoS::AtLeastOnce).unwrap();
        assert_eq!(session.await_answer(subscription, 10, 0, false), Verdict::Pending);
        pipe.broker_sends(|b| write_suback(&mut VecWriter(b), subscription.packet_id, &[1]).unwrap());
        session.receive(&mut pipe, 20).unwrap();
        assert_eq!(session.await_answer(subscription, 20, 0, false), Verdict::Answered(1));

        // No answer in time: a subscription is forgotten, a publish kept.
        let subscription = session.subscribe(&mut pipe, 0, "t", QoS::AtLeastOnce).unwrap();
        let publish = session
            .publish(&mut pipe, 0, "t", b"p", QoS::AtLeastOnce, false)
            .unwrap()
            .unwrap();
        assert_eq!(session.await_answer(subscription, 1000, 0, false), Verdict::TimedOut);
        assert_eq!(session.await_answer(publish, 1000, 0, false), Verdict::TimedOut);
        assert_eq!(session.await_answer(subscription, 1001, 0, false), Verdict::Answered(0));
        assert_eq!(session.publishes_to_resend().collect::<Vec<_>>(), [publish]);

        // A publish waits at most the command timeout from the call, even
        // when a resend restarted its own timer.
        session.restart_timer(publish, 1500);
        assert_eq!(session.await_answer(publish, 1600, 700, false), Verdict::Pending);
        assert_eq!(session.await_answer(publish, 1600, 600, false), Verdict::TimedOut);

        // The link lost: a publish waits for a loop that may reconnect, or
        // stays in flight; a subscription is forgotten.
        let subscription = session.subscribe(&mut pipe, 1500, "t", QoS::AtLeastOnce).unwrap();
        session.link_lost();
        assert_eq!(session.await_answer(publish, 1501, 1500, true), Verdict::AwaitReconnect);
        assert_eq!(
            session.await_answer(publish, 1501, 1500, false),
            Verdict::LinkLostInFlight
        );
        assert_eq!(session.await_answer(subscription, 1501, 1500, true), Verdict::LinkLost);
        assert_eq!(session.publishes_to_resend().collect::<Vec<_>>(), [publish]);
    }

    #[test]
    fn await_answer_for_connect() {
        let connect =
            |session: &mut Session, pipe: &mut Pipe| session.connect(pipe, 0, &connect_options(0, true)).unwrap();
        // Refused: the return code.
        let mut session = Session::new(CONFIG);
        let mut pipe = Pipe::default();
        let ticket = connect(&mut session, &mut pipe);
        assert_eq!(session.await_answer(ticket, 10, 0, false), Verdict::Pending);
        pipe.broker_sends(|b| write_connack(&mut VecWriter(b), false, 5).unwrap());
        session.receive(&mut pipe, 10).unwrap();
        assert_eq!(session.await_answer(ticket, 10, 0, false), Verdict::Answered(5));
        // No CONNACK in time: the broker counts as unreachable.
        let ticket = connect(&mut session, &mut pipe);
        assert_eq!(session.await_answer(ticket, 1000, 0, true), Verdict::ConnectTimedOut);
        // The link lost first.
        let ticket = connect(&mut session, &mut pipe);
        session.link_lost();
        assert_eq!(session.await_answer(ticket, 1, 0, true), Verdict::LinkLost);
    }
}
