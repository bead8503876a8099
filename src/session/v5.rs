//! What an MQTT 5 session adds to a 3.1.1 one: the properties CONNECT
//! sends, the limits the broker's CONNACK sets, the reason codes and
//! reason strings of its answers, and its DISCONNECT.
//!
//! This state lives apart from [`Session`], in a [`V5`] that only an MQTT
//! 5 client has (the binding allocates it after the session), so that a
//! 3.1.1 client pays nothing for it. The session's calls that need it take
//! it as an argument.

use embedded_io::{Read, ReadReady, Write};

use super::outbound::Stage;
use super::read_ahead::Reading;
use super::receive::{Copying, SMALL_BODY_MAX};
use super::{Error, Event, Link, Message, Session};
use crate::codec::properties::{Property, PropertyReader, ReadError, allowed, id};
use crate::codec::v5::{ConnectProperties, SubscriptionOptions};
use crate::codec::{self, DecodeError, Packet, PacketType, Publish, QoS, SUBACK_FAILURE};

/// Bytes of a reason string kept (cut at a character boundary).
pub const REASON_MAX: usize = 64;

/// Bytes of a client identifier the broker assigns that are kept.
pub const ASSIGNED_ID_MAX: usize = 64;

/// What the broker's CONNACK allows, its defaults when it says nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServerLimits {
    /// QoS 1 and 2 publishes the broker takes unacknowledged at once.
    pub receive_maximum: u16,
    /// The largest packet, whole, the broker takes (0: no limit).
    pub maximum_packet_size: u32,
    /// Topic aliases the broker takes from the client.
    pub topic_alias_maximum: u16,
    pub maximum_qos: QoS,
    pub retain_available: bool,
    pub wildcards_available: bool,
    pub subscription_ids_available: bool,
    pub shared_available: bool,
    /// The session expiry the broker chose instead of the client's.
    pub session_expiry_s: Option<u32>,
    /// The keepalive the broker chose instead of the client's.
    pub keepalive_s: Option<u16>,
}

impl Default for ServerLimits {
    fn default() -> Self {
        ServerLimits {
            receive_maximum: u16::MAX,
            maximum_packet_size: 0,
            topic_alias_maximum: 0,
            maximum_qos: QoS::ExactlyOnce,
            retain_available: true,
            wildcards_available: true,
            subscription_ids_available: true,
            shared_available: true,
            session_expiry_s: None,
            keepalive_s: None,
        }
    }
}

/// The MQTT 5 state of a session (see the module's documentation).
#[derive(Clone, Debug)]
pub struct V5 {
    /// What CONNECT asks for.
    pub connect: ConnectProperties,
    /// The Session Expiry Interval the application asked for, if any.
    pub session_expiry_s: Option<u32>,
    /// What the last CONNACK allowed.
    pub server: ServerLimits,
    /// The reason code of the broker's last refusal: a CONNACK, an
    /// acknowledgement with a failure code, or a DISCONNECT.
    pub reason_code: u8,
    /// The reason code of the broker's last DISCONNECT, if one came.
    pub disconnect_code: Option<u8>,
    reason: [u8; REASON_MAX],
    reason_len: u8,
    assigned_id: [u8; ASSIGNED_ID_MAX],
    assigned_id_len: u8,
    /// Outbound topic aliases set on this link (1 to this many), and the
    /// last one set again once all were taken.
    aliases_set: u16,
    alias_last: u16,
    /// The topic aliases the broker may use towards the client (at most
    /// [`INBOUND_ALIAS_MAX`]; 0, the default, for none: each costs the
    /// caller a kept topic).
    pub topic_aliases_taken: u16,
    /// The inbound aliases the broker set on this link, bit `n - 1` for
    /// alias `n`, whose topic the caller keeps.
    aliases_known: u16,
}

/// The most topic aliases a client takes from the broker.
pub const INBOUND_ALIAS_MAX: u16 = 16;

/// The most topic aliases a client sets towards the broker: the caller
/// keeps a topic for each ([`AliasTopics`]).
pub const TOPIC_ALIAS_MAX: u16 = 8;

/// The topics the caller keeps for the topic aliases the session sets on
/// a link (MQTT 5), alias `n` (1-based) standing for one topic.
pub trait AliasTopics {
    /// Whether alias `alias` stands for `topic`.
    fn stands_for(&mut self, alias: u16, topic: &str) -> bool;
    /// Keeps `topic` for alias `alias`, in place of what it stood for;
    /// false when it cannot (the alias is then not set).
    fn set(&mut self, alias: u16, topic: &str) -> bool;
}

/// How a PUBLISH names its topic in MQTT 5.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TopicName {
    /// The topic itself.
    Topic,
    /// The topic, and the alias it sets (1 and up).
    SetAlias(u16),
    /// The alias alone (an empty topic).
    Alias(u16),
}

impl V5 {
    pub fn new(connect: ConnectProperties) -> Self {
        V5 {
            connect,
            session_expiry_s: None,
            server: ServerLimits::default(),
            reason_code: 0,
            disconnect_code: None,
            reason: [0; REASON_MAX],
            reason_len: 0,
            assigned_id: [0; ASSIGNED_ID_MAX],
            assigned_id_len: 0,
            aliases_set: 0,
            alias_last: 0,
            topic_aliases_taken: 0,
            aliases_known: 0,
        }
    }

    /// The bit of inbound alias `alias` in `aliases_known` (0 for none).
    fn alias_bit(alias: u16) -> u16 {
        alias
            .checked_sub(1)
            .and_then(|shift| 1u16.checked_shl(u32::from(shift)))
            .unwrap_or(0)
    }

    /// Whether the broker set inbound alias `alias` on this link, and
    /// the caller keeps its topic.
    pub(super) fn knows_alias(&self, alias: u16) -> bool {
        self.aliases_known & Self::alias_bit(alias) != 0
    }

    /// Records that the broker set inbound alias `alias`, and whether the
    /// caller keeps its topic (when not, a later use of it fails the link).
    pub(super) fn set_alias_known(&mut self, alias: u16, known: bool) {
        if known {
            self.aliases_known |= Self::alias_bit(alias);
        } else {
            self.aliases_known &= !Self::alias_bit(alias);
        }
    }

    /// How the next PUBLISH to `topic` names it: by an alias already set
    /// for it, by a new one (up to the broker's Topic Alias Maximum and
    /// [`TOPIC_ALIAS_MAX`]; once all are taken, each is set again in turn),
    /// or, without aliases, by itself. Only the forms that fit the broker's
    /// Maximum Packet Size (see [`V5::fits`]) are taken: `by_alias`, the
    /// alias alone, and `setting`, the topic with an alias.
    pub fn topic_name(
        &mut self,
        topic: &str,
        aliases: &mut dyn AliasTopics,
        by_alias: bool,
        setting: bool,
    ) -> TopicName {
        let most = self.server.topic_alias_maximum.min(TOPIC_ALIAS_MAX);
        if most == 0 || topic.is_empty() {
            return TopicName::Topic;
        }
        if let Some(alias) = (1..=self.aliases_set).find(|&alias| aliases.stands_for(alias, topic)) {
            return if by_alias {
                TopicName::Alias(alias)
            } else {
                TopicName::Topic
            };
        }
        if !setting {
            return TopicName::Topic;
        }
        let alias = if self.aliases_set < most {
            self.aliases_set.saturating_add(1)
        } else {
            self.alias_last.checked_rem(most).unwrap_or(0).saturating_add(1)
        };
        if !aliases.set(alias, topic) {
            return TopicName::Topic;
        }
        self.aliases_set = self.aliases_set.max(alias);
        self.alias_last = alias;
        TopicName::SetAlias(alias)
    }

    /// Whether `message` fits the broker's Maximum Packet Size with `topic`
    /// for its topic and, when `aliased`, a topic alias (three bytes).
    pub fn fits(&self, message: &Message<'_>, qos: QoS, retain: bool, topic: &str, aliased: bool) -> bool {
        if self.server.maximum_packet_size == 0 {
            return true;
        }
        let publish = Publish {
            topic,
            packet_id: (qos != QoS::AtMostOnce).then_some(1),
            qos,
            retain,
            dup: false,
            payload: message.payload,
        };
        let properties = codec::v5::MessageProperties {
            topic_alias: u16::from(aliased),
            ..message.properties
        };
        codec::v5::publish_size(&publish, &properties).is_some_and(|size| size <= self.server.maximum_packet_size)
    }

    /// Forgets the aliases set on this link: a PUBLISH that may have set
    /// one did not leave. Each is set again, with its topic, when next used.
    pub(super) fn forget_aliases(&mut self) {
        self.aliases_set = 0;
        self.alias_last = 0;
    }

    /// The reason string that came with [`V5::reason_code`] (empty when
    /// none did), at most [`REASON_MAX`] bytes of it.
    pub fn reason(&self) -> &str {
        codec::utf8(self.reason.get(..usize::from(self.reason_len)).unwrap_or(&[])).unwrap_or("")
    }

    /// The client identifier the broker assigned in the last CONNACK
    /// (empty when it assigned none).
    pub fn assigned_client_id(&self) -> &str {
        codec::utf8(self.assigned_id.get(..usize::from(self.assigned_id_len)).unwrap_or(&[])).unwrap_or("")
    }

    /// Checks a subscription against what the broker's CONNACK allows:
    /// wildcards, shared subscriptions, subscription identifiers
    /// ([`Error::BrokerLimit`]). Nothing is sent.
    pub fn check_subscribe(&self, filter: &str, options: &SubscriptionOptions) -> Result<(), Error> {
        let server = &self.server;
        let wildcard = filter.bytes().any(|byte| byte == b'+' || byte == b'#');
        let refused = (wildcard && !server.wildcards_available)
            || (filter.starts_with("$share/") && !server.shared_available)
            || (options.subscription_id != 0 && !server.subscription_ids_available);
        if refused { Err(Error::BrokerLimit) } else { Ok(()) }
    }
}

/// The reason codes a broker may send (section 2.4), and what each means,
/// in the same order, each text ending in NUL: one table, smaller on a
/// microcontroller than a match over the codes.
const REASON_CODES: [u8; 40] = [
    0x00, 0x01, 0x02, 0x10, 0x11, 0x80, 0x81, 0x82, 0x83, 0x84, 0x85, 0x86, 0x87, 0x88, 0x89, 0x8a, 0x8b, 0x8c, 0x8d,
    0x8e, 0x8f, 0x90, 0x91, 0x92, 0x93, 0x94, 0x95, 0x96, 0x97, 0x98, 0x99, 0x9a, 0x9b, 0x9c, 0x9d, 0x9e, 0x9f, 0xa0,
    0xa1, 0xa2,
];
const REASON_TEXTS: &[u8] = b"success\0\
    granted QoS 1\0\
    granted QoS 2\0\
    no matching subscribers\0\
    no subscription existed\0\
    unspecified error\0\
    malformed packet\0\
    protocol error\0\
    implementation specific error\0\
    unsupported protocol version\0\
    client identifier not valid\0\
    bad user name or password\0\
    not authorized\0\
    server unavailable\0\
    server busy\0\
    banned\0\
    server shutting down\0\
    bad authentication method\0\
    keep alive timeout\0\
    session taken over\0\
    topic filter invalid\0\
    topic name invalid\0\
    packet identifier in use\0\
    packet identifier not found\0\
    receive maximum exceeded\0\
    topic alias invalid\0\
    packet too large\0\
    message rate too high\0\
    quota exceeded\0\
    administrative action\0\
    payload format invalid\0\
    retain not supported\0\
    QoS not supported\0\
    use another server\0\
    server moved\0\
    shared subscriptions not supported\0\
    connection rate exceeded\0\
    maximum connect time\0\
    subscription identifiers not supported\0\
    wildcard subscriptions not supported\0";

/// What an MQTT 5 reason code that a broker may send means, as a text
/// ending in NUL, or `None` for a code the standard does not define.
pub fn reason_text(code: u8) -> Option<&'static [u8]> {
    let index = REASON_CODES.iter().position(|&known| known == code)?;
    REASON_TEXTS.split_inclusive(|&byte| byte == 0).nth(index)
}

/// Whether `code` is a reason code MQTT 5 defines for a CONNACK.
fn is_connack_code(code: u8) -> bool {
    matches!(code, 0x00 | 0x80..=0x8a | 0x8c | 0x90 | 0x95 | 0x97 | 0x99..=0x9d | 0x9f)
}

/// Whether `code` is one for PUBACK or PUBREC.
fn is_publish_ack_code(code: u8) -> bool {
    matches!(code, 0x00 | 0x10 | 0x80 | 0x83 | 0x87 | 0x90 | 0x91 | 0x97 | 0x99)
}

/// Whether `code` is one for a SUBACK (a granted QoS, or a refusal).
fn is_suback_code(code: u8) -> bool {
    matches!(
        code,
        0x00..=0x02 | 0x80 | 0x83 | 0x87 | 0x8f | 0x91 | 0x97 | 0x9e | 0xa1 | 0xa2
    )
}

/// Whether `code` is one for an UNSUBACK.
fn is_unsuback_code(code: u8) -> bool {
    matches!(code, 0x00 | 0x11 | 0x80 | 0x83 | 0x87 | 0x8f | 0x91)
}

/// Whether `code` is one for a DISCONNECT from the broker.
fn is_disconnect_code(code: u8) -> bool {
    matches!(code, 0x00 | 0x80..=0x83 | 0x87 | 0x89 | 0x8b | 0x8d..=0x9a | 0x9c..=0xa2)
}

/// Reads a packet's fields byte by byte within its remaining length.
struct Body<'a, T> {
    io: &'a mut T,
    left: u32,
}

impl<T: Read> Body<'_, T> {
    fn u8(&mut self) -> Result<u8, Error> {
        self.left = self.left.checked_sub(1).ok_or(DecodeError::BadLength)?;
        let mut byte = [0u8; 1];
        codec::read_exact(self.io, &mut byte)?;
        Ok(byte[0])
    }

    fn packet_id(&mut self) -> Result<u16, Error> {
        let high = self.u8()?;
        let low = self.u8()?;
        match u16::from_be_bytes([high, low]) {
            0 => Err(DecodeError::ZeroPacketId.into()),
            id => Ok(id),
        }
    }

    /// The reason code that may end the packet's short form: `default`
    /// when the packet ends before it.
    fn reason_or(&mut self, default: u8) -> Result<u8, Error> {
        if self.left == 0 { Ok(default) } else { self.u8() }
    }

    /// Reads the property block, when the packet has one (it may end
    /// before it), handing each property to `v5`, and checks that the
    /// packet ends with it unless `more` follows.
    fn properties(
        &mut self,
        v5: &mut V5,
        allowed_ids: crate::codec::properties::IdSet,
        more: bool,
    ) -> Result<(), Error> {
        if self.left == 0 {
            return Ok(());
        }
        // Through the reader every property block is read with.
        let io = &mut Copying {
            io: &mut *self.io,
            copy: &mut [],
            at: 0,
        };
        let (mut reader, used) = PropertyReader::start(io, self.left, allowed_ids)?;
        self.left = self.left.saturating_sub(used);
        v5.reason_len = 0;
        while let Some(property) = reader.next(io)? {
            match property {
                Property::Number { id, value } => v5.server.set(id, value),
                Property::Bytes {
                    id: id::REASON_STRING, ..
                } => {
                    let kept = reader.take(io, &mut v5.reason)?;
                    v5.reason_len = u8::try_from(kept).unwrap_or(0);
                }
                Property::Bytes {
                    id: id::ASSIGNED_CLIENT_ID,
                    len,
                    ..
                } => {
                    // An identifier that does not fit cannot be used again:
                    // better no identifier than a wrong one.
                    let kept = reader.take(io, &mut v5.assigned_id)?;
                    v5.assigned_id_len = if kept == usize::from(len) {
                        u8::try_from(kept).unwrap_or(0)
                    } else {
                        0
                    };
                }
                // User properties, a server reference, response
                // information and authentication data are read past.
                Property::Bytes { .. } | Property::UserName { .. } => {
                    reader.take(io, &mut [])?;
                }
            }
        }
        if !more && self.left != 0 {
            return Err(DecodeError::BadLength.into());
        }
        Ok(())
    }
}

impl<E> From<ReadError<E>> for Error {
    fn from(error: ReadError<E>) -> Self {
        match error {
            ReadError::Io(error) => error.into(),
            ReadError::Malformed(error) => error.into(),
        }
    }
}

impl ServerLimits {
    /// Takes a number from the broker's CONNACK (others are ignored).
    fn set(&mut self, property: u8, value: u32) {
        let two = u16::try_from(value).unwrap_or(u16::MAX);
        let flag = value != 0;
        match property {
            id::RECEIVE_MAXIMUM => self.receive_maximum = two,
            id::MAXIMUM_PACKET_SIZE => self.maximum_packet_size = value,
            id::TOPIC_ALIAS_MAXIMUM => self.topic_alias_maximum = two,
            id::MAXIMUM_QOS => self.maximum_qos = if flag { QoS::AtLeastOnce } else { QoS::AtMostOnce },
            id::RETAIN_AVAILABLE => self.retain_available = flag,
            id::WILDCARD_AVAILABLE => self.wildcards_available = flag,
            id::SUBSCRIPTION_ID_AVAILABLE => self.subscription_ids_available = flag,
            id::SHARED_AVAILABLE => self.shared_available = flag,
            id::SESSION_EXPIRY => self.session_expiry_s = Some(value),
            id::SERVER_KEEPALIVE => self.keepalive_s = Some(two),
            _ => {}
        }
    }
}

impl Session {
    /// Whether the broker's CONNACK lets this publish go: a QoS no higher
    /// than its Maximum QoS, RETAIN only where it has retained messages,
    /// a packet no larger than its Maximum Packet Size (all
    /// [`Error::BrokerLimit`]), and no more QoS 1/2 publishes in flight
    /// than its Receive Maximum ([`Error::InflightFull`]: wait for one to
    /// complete). Nothing is sent.
    pub fn check_publish_v5(&self, v5: &V5, message: &Message<'_>, qos: QoS, retain: bool) -> Result<(), Error> {
        let server = &v5.server;
        if qos > server.maximum_qos || (retain && !server.retain_available) {
            return Err(Error::BrokerLimit);
        }
        if server.maximum_packet_size != 0 {
            // The packet as it goes: the size of a packet id counts, no other field's value.
            let publish = Publish {
                topic: message.topic,
                packet_id: (qos != QoS::AtMostOnce).then_some(1),
                qos,
                retain,
                dup: false,
                payload: message.payload,
            };
            let size = codec::v5::publish_size(&publish, &message.properties).ok_or(Error::TooLong)?;
            if size > server.maximum_packet_size {
                return Err(Error::BrokerLimit);
            }
        }
        if qos != QoS::AtMostOnce && self.publishes_in_flight() >= usize::from(server.receive_maximum) {
            return Err(Error::InflightFull);
        }
        Ok(())
    }

    /// Reads and handles a packet other than PUBLISH, whose fixed header
    /// is read. In MQTT 5 (`v5` given) its reason code and properties go
    /// to `v5`; in MQTT 3.1.1 it is a few bytes at most.
    pub(super) fn receive_control<T: Read + Write + ReadReady>(
        &mut self,
        io: &mut Reading<'_, T>,
        now: u32,
        kind: PacketType,
        remaining_length: u32,
        v5: Option<&mut V5>,
    ) -> Result<Event, Error> {
        // Never MQTT 5 in an engine built without it: the compiler then
        // leaves out what follows for MQTT 5.
        let mut v5 = if self.is_v5() { v5 } else { None };
        if v5.is_none() && remaining_length > SMALL_BODY_MAX {
            return Err(DecodeError::BadLength.into());
        }
        let mut body = Body {
            io,
            left: remaining_length,
        };
        // A refusal's reason code (MQTT 5), for the packets that carry one.
        let mut code = 0;
        let mut codes = [0u8; 2];
        let packet = match kind {
            PacketType::ConnAck => {
                let ack_flags = body.u8()?;
                if ack_flags & 0xfe != 0 {
                    return Err(DecodeError::InvalidFlags.into());
                }
                code = body.u8()?;
                match v5.as_deref_mut() {
                    None if code > 5 => return Err(DecodeError::InvalidReturnCode.into()),
                    None => {}
                    Some(v5) => {
                        if !is_connack_code(code) {
                            return Err(DecodeError::InvalidReturnCode.into());
                        }
                        // The property block is required here.
                        if body.left == 0 {
                            return Err(DecodeError::BadLength.into());
                        }
                        v5.server = ServerLimits::default();
                        v5.assigned_id_len = 0;
                        // Aliases end with the link that set them.
                        v5.aliases_set = 0;
                        v5.alias_last = 0;
                        v5.aliases_known = 0;
                        body.properties(v5, allowed::CONNACK, false)?;
                        v5.reason_code = code;
                        if let Some(keepalive_s) = v5.server.keepalive_s {
                            self.keepalive_ms = u32::from(keepalive_s).saturating_mul(1000);
                        }
                    }
                }
                Packet::ConnAck {
                    session_present: ack_flags & 1 == 1,
                    code,
                }
            }
            PacketType::PubAck | PacketType::PubRec | PacketType::PubRel | PacketType::PubComp => {
                let packet_id = body.packet_id()?;
                if let Some(v5) = v5.as_deref_mut() {
                    code = body.reason_or(0)?;
                    let valid = match kind {
                        PacketType::PubAck | PacketType::PubRec => is_publish_ack_code(code),
                        _ => matches!(code, 0x00 | 0x92),
                    };
                    if !valid {
                        return Err(DecodeError::InvalidReturnCode.into());
                    }
                    body.properties(v5, allowed::ACK, false)?;
                    if code >= 0x80 {
                        v5.reason_code = code;
                    }
                }
                match kind {
                    PacketType::PubAck => Packet::PubAck(packet_id),
                    PacketType::PubRec => Packet::PubRec(packet_id),
                    PacketType::PubRel => Packet::PubRel(packet_id),
                    _ => Packet::PubComp(packet_id),
                }
            }
            PacketType::SubAck | PacketType::UnsubAck => {
                let packet_id = body.packet_id()?;
                if let Some(v5) = v5.as_deref_mut() {
                    if body.left == 0 {
                        return Err(DecodeError::BadLength.into());
                    }
                    body.properties(v5, allowed::ACK, true)?;
                }
                if kind == PacketType::UnsubAck && v5.is_none() {
                    Packet::UnsubAck(packet_id)
                } else {
                    // One code per filter (3.1.1: at most two fit); one
                    // filter per SUBSCRIBE or UNSUBSCRIBE.
                    let count = usize::try_from(body.left).unwrap_or(usize::MAX);
                    let read = codes.get_mut(..count).filter(|read| !read.is_empty());
                    for slot in read.ok_or(DecodeError::BadLength)? {
                        *slot = body.u8()?;
                        let valid = match (kind, v5.is_some()) {
                            (PacketType::SubAck, false) => *slot <= 2 || *slot == SUBACK_FAILURE,
                            (PacketType::SubAck, true) => is_suback_code(*slot),
                            _ => is_unsuback_code(*slot),
                        };
                        if !valid {
                            return Err(DecodeError::InvalidReturnCode.into());
                        }
                    }
                    code = codes[0];
                    match kind {
                        PacketType::SubAck => Packet::SubAck {
                            packet_id,
                            codes: codes.get(..count).unwrap_or(&[]),
                        },
                        _ if count == 1 => Packet::UnsubAck(packet_id),
                        _ => return Err(DecodeError::BadLength.into()),
                    }
                }
            }
            PacketType::PingResp => Packet::PingResp,
            PacketType::PingReq => Packet::PingReq,
            PacketType::Disconnect => {
                let Some(v5) = v5 else {
                    return Err(Error::UnexpectedPacket);
                };
                code = body.reason_or(0)?;
                if !is_disconnect_code(code) {
                    return Err(DecodeError::InvalidReturnCode.into());
                }
                body.properties(v5, allowed::DISCONNECT, false)?;
                v5.reason_code = code;
                v5.disconnect_code = Some(code);
                return Err(Error::Disconnected);
            }
            // Packets only a client sends.
            PacketType::Connect | PacketType::Subscribe | PacketType::Unsubscribe | PacketType::Publish => {
                return Err(DecodeError::UnknownPacketType.into());
            }
        };
        if body.left != 0 {
            return Err(DecodeError::BadLength.into());
        }
        // Answers go straight to the transport (one copy of the writers).
        let io = &mut *body.io.io;
        match packet {
            // A refused PUBREC ends the exchange: no PUBREL follows.
            Packet::PubRec(id) if code >= 0x80 && self.link == Link::Up => {
                let ticket = self.find(id, |stage| matches!(stage, Stage::AwaitPubRec { .. }));
                if let Some(ticket) = ticket {
                    self.release(ticket);
                    return Ok(Event::Completed(ticket));
                }
                Ok(Event::Handled)
            }
            Packet::UnsubAck(_) => {
                let event = self.handle(io, now, packet)?;
                if let Event::Answered(ticket) = event {
                    self.set_stage(ticket, Stage::Answered(code), now);
                }
                Ok(event)
            }
            _ => self.handle(io, now, packet),
        }
    }
}

#[cfg(all(test, feature = "mqtt5"))]
mod tests {
    use super::*;
    use crate::codec::properties::id;
    use crate::codec::v5::MessageProperties;
    use crate::session::testing::*;
    use crate::session::{CommandState, Config};

    fn v5_session() -> (Session, V5, Pipe) {
        let session = Session::new_v5(CONFIG);
        let v5 = V5::new(ConnectProperties {
            session_expiry_s: 0,
            receive_maximum: 32,
            maximum_packet_size: 4096,
            topic_alias_maximum: 0,
        });
        (session, v5, Pipe::default())
    }

    fn connack(pipe: &mut Pipe, code: u8, properties: &[u8]) {
        let mut bytes = vec![0x20, 0, 0, code, properties.len() as u8];
        bytes.extend_from_slice(properties);
        bytes[1] = (bytes.len() - 2) as u8;
        pipe.broker_sends(|b| b.extend(bytes));
    }

    fn connected_v5(properties: &[u8]) -> (Session, V5, Pipe) {
        let (mut session, mut v5, mut pipe) = v5_session();
        session
            .connect_v5(&mut pipe, 0, &connect_options(30, true), None, &Default::default(), &v5)
            .unwrap();
        connack(&mut pipe, 0, properties);
        let event = session.receive_v5(&mut pipe, 1, &mut v5).unwrap();
        assert_eq!(
            event,
            Event::ConnAck {
                code: 0,
                session_present: false
            }
        );
        pipe.outbound.clear();
        (session, v5, pipe)
    }

    #[test]
    fn connect_is_sent_in_mqtt_5_form() {
        let (mut session, v5, mut pipe) = v5_session();
        session
            .connect_v5(&mut pipe, 0, &connect_options(30, true), None, &Default::default(), &v5)
            .unwrap();
        #[rustfmt::skip]
        let expected = [
            0x10, 23, 0, 4, b'M', b'Q', b'T', b'T', 5, 0x02, 0, 30,
            8, id::RECEIVE_MAXIMUM, 0, 32, id::MAXIMUM_PACKET_SIZE, 0, 0, 16, 0,
            0, 2, b'c', b'1',
        ];
        assert_eq!(pipe.outbound, expected);
    }

    #[test]
    fn connack_sets_the_limits_and_the_assigned_id() {
        #[rustfmt::skip]
        let properties = [
            id::RECEIVE_MAXIMUM, 0, 2,
            id::MAXIMUM_QOS, 1,
            id::RETAIN_AVAILABLE, 0,
            id::SERVER_KEEPALIVE, 0, 10,
            id::ASSIGNED_CLIENT_ID, 0, 3, b'a', b'-', b'1',
            id::USER_PROPERTY, 0, 1, b'k', 0, 1, b'v',
        ];
        let (session, v5, _) = connected_v5(&properties);
        assert!(session.is_connected());
        assert_eq!(v5.server.receive_maximum, 2);
        assert_eq!(v5.server.maximum_qos, QoS::AtLeastOnce);
        assert!(!v5.server.retain_available);
        assert_eq!(v5.server.keepalive_s, Some(10));
        assert_eq!(session.keepalive_ms, 10_000);
        assert_eq!(v5.assigned_client_id(), "a-1");
    }

    #[test]
    fn a_refusal_keeps_its_code_and_reason() {
        let (mut session, mut v5, mut pipe) = v5_session();
        let ticket = session
            .connect_v5(&mut pipe, 0, &connect_options(30, true), None, &Default::default(), &v5)
            .unwrap();
        connack(&mut pipe, 0x87, &[id::REASON_STRING, 0, 2, b'n', b'o']);
        session.receive_v5(&mut pipe, 1, &mut v5).unwrap();
        assert_eq!(session.command_state(ticket, 1), CommandState::Done(0x87));
        assert_eq!((v5.reason_code, v5.reason()), (0x87, "no"));
        assert!(!session.is_connected());
    }

    #[test]
    fn malformed_connacks_fail_the_link() {
        for (code, properties) in [
            (0x01u8, &[][..]),                                  // a 3.1.1 code
            (0, &[id::TOPIC_ALIAS, 0, 1][..]),                  // not a CONNACK property
            (0, &[id::MAXIMUM_QOS, 1, id::MAXIMUM_QOS, 1][..]), // repeated
        ] {
            let (mut session, mut v5, mut pipe) = v5_session();
            session
                .connect_v5(&mut pipe, 0, &connect_options(30, true), None, &Default::default(), &v5)
                .unwrap();
            connack(&mut pipe, code, properties);
            assert!(matches!(
                session.receive_v5(&mut pipe, 1, &mut v5),
                Err(Error::Malformed(_))
            ));
        }
    }

    #[test]
    fn acknowledgements_carry_reason_codes() {
        let (mut session, mut v5, mut pipe) = connected_v5(&[]);
        let ticket = session
            .publish(&mut pipe, 2, "t", b"x", QoS::AtLeastOnce, false)
            .unwrap()
            .unwrap();
        // PUBACK: id, "not authorized", a reason string.
        pipe.broker_sends(|b| b.extend([0x40, 7, 0, ticket.packet_id as u8, 0x87, 3, id::REASON_STRING, 0, 0]));
        assert_eq!(
            session.receive_v5(&mut pipe, 3, &mut v5).unwrap(),
            Event::Completed(ticket)
        );
        assert_eq!(v5.reason_code, 0x87);
        // The short form, and a success code with no properties.
        let ticket = session
            .publish(&mut pipe, 2, "t", b"x", QoS::AtLeastOnce, false)
            .unwrap()
            .unwrap();
        pipe.broker_sends(|b| b.extend([0x40, 3, 0, ticket.packet_id as u8, 0x10]));
        assert_eq!(
            session.receive_v5(&mut pipe, 3, &mut v5).unwrap(),
            Event::Completed(ticket)
        );
    }

    #[test]
    fn a_refused_pubrec_ends_the_exchange_without_pubrel() {
        let (mut session, mut v5, mut pipe) = connected_v5(&[]);
        let ticket = session
            .publish(&mut pipe, 2, "t", b"x", QoS::ExactlyOnce, false)
            .unwrap()
            .unwrap();
        pipe.outbound.clear();
        pipe.broker_sends(|b| b.extend([0x50, 3, 0, ticket.packet_id as u8, 0x97]));
        assert_eq!(
            session.receive_v5(&mut pipe, 3, &mut v5).unwrap(),
            Event::Completed(ticket)
        );
        assert!(pipe.outbound.is_empty());
        assert_eq!(v5.reason_code, 0x97);
    }

    #[test]
    fn suback_and_unsuback_answer_with_their_code() {
        let (mut session, mut v5, mut pipe) = connected_v5(&[]);
        let ticket = session.subscribe(&mut pipe, 2, "a/#", QoS::AtLeastOnce).unwrap();
        // The SUBSCRIBE went in MQTT 5 form: empty properties, options byte.
        assert_eq!(
            pipe.outbound,
            [0x82, 9, 0, ticket.packet_id as u8, 0, 0, 3, b'a', b'/', b'#', 1]
        );
        pipe.broker_sends(|b| b.extend([0x90, 4, 0, ticket.packet_id as u8, 0, 0x97]));
        assert_eq!(
            session.receive_v5(&mut pipe, 3, &mut v5).unwrap(),
            Event::Answered(ticket)
        );
        assert_eq!(session.command_state(ticket, 3), CommandState::Done(0x97));
        let ticket = session.unsubscribe(&mut pipe, 4, "a/#").unwrap();
        pipe.broker_sends(|b| b.extend([0xb0, 4, 0, ticket.packet_id as u8, 0, 0x11]));
        assert_eq!(
            session.receive_v5(&mut pipe, 5, &mut v5).unwrap(),
            Event::Answered(ticket)
        );
        assert_eq!(session.command_state(ticket, 5), CommandState::Done(0x11));
    }

    #[test]
    fn subscription_options_go_in_the_options_byte() {
        use crate::codec::v5::SubscriptionOptions;
        let (mut session, _, mut pipe) = connected_v5(&[]);
        // QoS 1, No Local, Retain As Published, Retain Handling 2.
        let options = SubscriptionOptions::from_byte(0x2d, 0).unwrap();
        assert_eq!(
            (
                options.qos,
                options.no_local,
                options.retain_as_published,
                options.retain_handling
            ),
            (QoS::AtLeastOnce, true, true, 2)
        );
        assert_eq!(options.byte(), 0x2d);
        let ticket = session.subscribe_with(&mut pipe, 2, "a", options).unwrap();
        assert_eq!(pipe.outbound, [0x82, 7, 0, ticket.packet_id as u8, 0, 0, 1, b'a', 0x2d]);
        // Reserved bits, QoS 3 and retain handling 3 are no options; nor is
        // an identifier beyond the largest variable byte integer.
        for byte in [0x40, 0x80, 0x03, 0x30] {
            assert_eq!(SubscriptionOptions::from_byte(byte, 0), None, "{byte:#x}");
        }
        assert!(SubscriptionOptions::from_byte(0, 268_435_455).is_some());
        assert_eq!(SubscriptionOptions::from_byte(0, 268_435_456), None);
        // A 3.1.1 session takes a QoS alone.
        let (mut session, mut pipe) = connected(0);
        assert_eq!(
            session.subscribe_with(&mut pipe, 2, "a", options),
            Err(Error::WrongState)
        );
        assert!(
            session
                .subscribe_with(&mut pipe, 2, "a", SubscriptionOptions::qos(QoS::AtLeastOnce))
                .is_ok()
        );
    }

    #[test]
    fn a_resubscription_keeps_its_options() {
        use crate::codec::v5::SubscriptionOptions;
        use crate::session::Filters;
        struct One;
        impl Filters for One {
            fn filter(&mut self, index: u16) -> Option<(&str, SubscriptionOptions)> {
                (index == 0).then(|| ("r", SubscriptionOptions::from_byte(0x25, 300).unwrap()))
            }
        }
        let (mut session, mut v5, mut pipe) = v5_session();
        session.set_backoff(100, 1000, 1);
        session
            .connect_v5(&mut pipe, 0, &connect_options(30, true), None, &Default::default(), &v5)
            .unwrap();
        connack(&mut pipe, 0, &[]);
        session.receive_v5(&mut pipe, 1, &mut v5).unwrap();
        pipe.outbound.clear();
        session.resubscribe(&mut pipe, 2, &mut One).unwrap();
        // Subscription identifier 300, then QoS 1, No Local, Retain
        // Handling 2: the options byte 0x25.
        #[rustfmt::skip]
        let expected = [0x82, 10, 0, 1, 3, id::SUBSCRIPTION_ID, 0xac, 0x02, 0, 1, b'r', 0x25];
        assert_eq!(pipe.outbound, expected);
    }

    #[test]
    fn subscriptions_stay_within_what_the_broker_allows() {
        use crate::codec::v5::SubscriptionOptions;
        let with_id = SubscriptionOptions {
            subscription_id: 5,
            ..SubscriptionOptions::qos(QoS::AtMostOnce)
        };
        let plain = SubscriptionOptions::qos(QoS::AtMostOnce);
        let (_, v5, _) = connected_v5(&[]);
        for filter in ["a/+", "a/#", "$share/g/a"] {
            assert_eq!(v5.check_subscribe(filter, &with_id), Ok(()));
        }
        #[rustfmt::skip]
        let refusals = [id::WILDCARD_AVAILABLE, 0, id::SUBSCRIPTION_ID_AVAILABLE, 0, id::SHARED_AVAILABLE, 0];
        let (_, v5, _) = connected_v5(&refusals);
        assert_eq!(v5.check_subscribe("a/b", &plain), Ok(()));
        for (filter, options) in [("a/+", plain), ("#", plain), ("$share/g/a", plain), ("a", with_id)] {
            assert_eq!(
                v5.check_subscribe(filter, &options),
                Err(Error::BrokerLimit),
                "{filter}"
            );
        }
    }

    #[test]
    fn the_brokers_disconnect_ends_the_link_with_its_reason() {
        let (mut session, mut v5, mut pipe) = connected_v5(&[]);
        pipe.broker_sends(|b| b.extend([0xe0, 6, 0x8e, 4, id::REASON_STRING, 0, 1, b'x']));
        assert_eq!(session.receive_v5(&mut pipe, 3, &mut v5), Err(Error::Disconnected));
        assert_eq!((v5.disconnect_code, v5.reason()), (Some(0x8e), "x"));
        let (mut session, mut v5, mut pipe) = connected_v5(&[]);
        pipe.broker_sends(|b| b.extend([0xe0, 1, 0x04]));
        assert!(matches!(
            session.receive_v5(&mut pipe, 3, &mut v5),
            Err(Error::Malformed(_))
        ));
    }

    #[test]
    fn publishes_go_in_mqtt_5_form_and_arrive_with_their_properties_checked() {
        let (mut session, mut v5, mut pipe) = connected_v5(&[]);
        session
            .publish(&mut pipe, 2, "t", b"x", QoS::AtMostOnce, false)
            .unwrap();
        assert_eq!(pipe.outbound, [0x30, 5, 0, 1, b't', 0, b'x']);
        // Inbound: a message expiry and a user property, then the payload.
        #[rustfmt::skip]
        let publish = [
            0x32, 19, 0, 1, b't', 0, 9,
            11, id::MESSAGE_EXPIRY, 0, 0, 0, 5, id::USER_PROPERTY, 0, 1, b'k', 0, 0,
            b'h', b'i',
        ];
        pipe.broker_sends(|b| b.extend(publish));
        let (topic, payload, info) = read_message_v5(&mut session, &mut pipe, &mut v5).unwrap();
        assert_eq!((topic.as_str(), &payload[..], info.packet_id), ("t", &b"hi"[..], 9));
        // A topic alias the client never allowed fails the link.
        pipe.broker_sends(|b| b.extend([0x30, 8, 0, 1, b't', 3, id::TOPIC_ALIAS, 0, 1, b'x']));
        let Event::Message { topic_len, .. } = session.receive_v5(&mut pipe, 3, &mut v5).unwrap() else {
            panic!("no message")
        };
        let mut topic = vec![0; usize::from(topic_len)];
        assert!(matches!(
            session.read_topic_v5(&mut pipe, &mut topic, &mut v5),
            Err(Error::Malformed(DecodeError::InvalidProperty))
        ));
    }

    #[test]
    fn a_message_keeps_its_properties_for_the_application() {
        use crate::codec::properties::{KeptProperty, kept_property};
        use crate::session::Outcome;
        let (mut session, mut v5, mut pipe) = connected_v5(&[]);
        #[rustfmt::skip]
        let block = [
            id::MESSAGE_EXPIRY, 0, 0, 0, 5,
            id::USER_PROPERTY, 0, 1, b'k', 0, 1, b'v',
            id::CORRELATION_DATA, 0, 2, 0xff, 0,
            id::SUBSCRIPTION_ID, 0x81, 0x01,
            id::SUBSCRIPTION_ID, 7,
        ];
        let mut publish = vec![0x32, 30, 0, 1, b't', 0, 9, 22];
        publish.extend(block);
        publish.extend(b"hi");
        pipe.broker_sends(|b| b.extend(&publish));
        let mut sink = Memory::default();
        let outcome = session.step(&mut pipe, 2, &mut sink, Some(&mut v5)).unwrap();
        assert!(matches!(outcome, Outcome::Message { acknowledge: true, .. }));
        assert_eq!((&sink.properties[..], &sink.payload[..]), (&block[..], &b"hi"[..]));
        // Read back one property at a time.
        let mut read = vec![];
        let mut offset = 0;
        while let Some((property, next)) = kept_property(&sink.properties, offset) {
            read.push(property);
            offset = next;
        }
        assert_eq!(
            read,
            [
                KeptProperty::Number {
                    id: id::MESSAGE_EXPIRY,
                    value: 5
                },
                KeptProperty::User { name: "k", value: "v" },
                KeptProperty::Bytes {
                    id: id::CORRELATION_DATA,
                    value: &[0xff, 0]
                },
                KeptProperty::Number {
                    id: id::SUBSCRIPTION_ID,
                    value: 129
                },
                KeptProperty::Number {
                    id: id::SUBSCRIPTION_ID,
                    value: 7
                },
            ]
        );
        // Without room for the block, the message is dropped (and
        // acknowledged), as without room for its payload.
        session.finish_message(&mut pipe, 3).unwrap();
        pipe.outbound.clear();
        pipe.broker_sends(|b| b.extend(&publish));
        sink.no_properties = true;
        let outcome = session.step(&mut pipe, 4, &mut sink, Some(&mut v5)).unwrap();
        assert!(matches!(
            outcome,
            Outcome::Dropped {
                too_large: false,
                topic: true,
                ..
            }
        ));
        assert!(
            sink.payloads_asked.len() == 1,
            "no payload asked without room for the properties"
        );
        assert_eq!(pipe.outbound, [0x40, 2, 0, 9]);
        // No room is asked for an empty block.
        sink.no_properties = false;
        sink.properties.clear();
        pipe.broker_sends(|b| b.extend([0x30, 6, 0, 1, b't', 0, b'h', b'i']));
        let outcome = session.step(&mut pipe, 5, &mut sink, Some(&mut v5)).unwrap();
        assert!(matches!(outcome, Outcome::Message { .. }));
        assert!(sink.properties.is_empty());
    }

    /// Alias topics kept as the binding keeps them.
    #[derive(Default)]
    struct Topics(Vec<(u16, String)>);

    impl AliasTopics for Topics {
        fn stands_for(&mut self, alias: u16, topic: &str) -> bool {
            self.0.iter().any(|(kept, text)| *kept == alias && text == topic)
        }
        fn set(&mut self, alias: u16, topic: &str) -> bool {
            self.0.retain(|(kept, _)| *kept != alias);
            self.0.push((alias, String::from(topic)));
            true
        }
    }

    #[test]
    fn repeated_topics_go_by_their_alias() {
        let (mut session, mut v5, mut pipe) = connected_v5(&[id::TOPIC_ALIAS_MAXIMUM, 0, 2]);
        let mut topics = Topics::default();
        let mut send = |session: &mut Session, v5: &mut V5, pipe: &mut Pipe, topic: &str, qos: QoS| {
            let message = Message {
                topic,
                payload: b"x",
                ..Message::default()
            };
            pipe.outbound.clear();
            session
                .publish_aliased(pipe, 2, &message, qos, false, Some((v5, &mut topics)))
                .unwrap();
            pipe.outbound.clone()
        };
        let alias = |n: u8| [3, id::TOPIC_ALIAS, 0, n];
        // Set with the topic, then used alone; a second topic takes the
        // second alias; a third, the first again.
        let first = send(&mut session, &mut v5, &mut pipe, "a/b", QoS::AtMostOnce);
        assert_eq!(
            first,
            [&[0x30, 10, 0, 3, b'a', b'/', b'b'][..], &alias(1), b"x"].concat()
        );
        let again = send(&mut session, &mut v5, &mut pipe, "a/b", QoS::AtMostOnce);
        assert_eq!(again, [&[0x30, 7, 0, 0][..], &alias(1), b"x"].concat());
        let second = send(&mut session, &mut v5, &mut pipe, "c", QoS::AtMostOnce);
        assert_eq!(second, [&[0x30, 8, 0, 1, b'c'][..], &alias(2), b"x"].concat());
        let third = send(&mut session, &mut v5, &mut pipe, "d", QoS::AtMostOnce);
        assert_eq!(third, [&[0x30, 8, 0, 1, b'd'][..], &alias(1), b"x"].concat());
        // "a/b" lost its alias to "d": it takes the next one, with its topic.
        let back = send(&mut session, &mut v5, &mut pipe, "a/b", QoS::AtMostOnce);
        assert_eq!(
            back,
            [&[0x30, 10, 0, 3, b'a', b'/', b'b'][..], &alias(2), b"x"].concat()
        );
        // A QoS 1 message by alias goes again after a reconnect by its
        // topic: the new link knows no alias.
        let by_alias = send(&mut session, &mut v5, &mut pipe, "d", QoS::AtLeastOnce);
        assert_eq!(by_alias, [&[0x32, 9, 0, 0, 0, 1][..], &alias(1), b"x"].concat());
        session.link_lost();
        session
            .connect_v5(
                &mut pipe,
                3,
                &connect_options(30, false),
                None,
                &Default::default(),
                &v5,
            )
            .unwrap();
        connack(&mut pipe, 0, &[id::TOPIC_ALIAS_MAXIMUM, 0, 2]);
        session.receive_v5(&mut pipe, 4, &mut v5).unwrap();
        pipe.outbound.clear();
        struct One;
        impl crate::session::Kept for One {
            fn publish(&mut self, _: crate::session::Ticket) -> Option<Message<'_>> {
                Some(Message {
                    topic: "d",
                    payload: b"x",
                    ..Message::default()
                })
            }
        }
        session.resume(&mut pipe, 5, &mut One).unwrap();
        assert_eq!(pipe.outbound, [0x3a, 7, 0, 1, b'd', 0, 1, 0, b'x']);
        // And the next publish sets its alias again.
        let after = send(&mut session, &mut v5, &mut pipe, "d", QoS::AtMostOnce);
        assert_eq!(after, [&[0x30, 8, 0, 1, b'd'][..], &alias(1), b"x"].concat());
    }

    #[test]
    fn an_alias_is_set_only_where_the_packet_still_fits() {
        #[rustfmt::skip]
        let limits = [id::TOPIC_ALIAS_MAXIMUM, 0, 2, id::MAXIMUM_PACKET_SIZE, 0, 0, 0, 10];
        let (mut session, mut v5, mut pipe) = connected_v5(&limits);
        let mut topics = Topics::default();
        let mut send = |message: &Message<'_>| {
            pipe.outbound.clear();
            session.check_publish_v5(&v5, message, QoS::AtMostOnce, false).unwrap();
            let aliases = Some((&mut v5, &mut topics as &mut dyn AliasTopics));
            session
                .publish_aliased(&mut pipe, 2, message, QoS::AtMostOnce, false, aliases)
                .unwrap();
            pipe.outbound.clone()
        };
        let full = Message {
            topic: "t",
            payload: b"1234",
            ..Message::default()
        };
        let small = Message { payload: b"1", ..full };
        // 10 bytes whole without an alias: setting one would make 13.
        assert_eq!(send(&full), [0x30, 8, 0, 1, b't', 0, b'1', b'2', b'3', b'4']);
        // 7 bytes: room for the alias.
        assert_eq!(send(&small), [0x30, 8, 0, 1, b't', 3, id::TOPIC_ALIAS, 0, 1, b'1']);
        // By its alias alone the larger one would make 12 (the alias takes
        // more than the topic it replaces): it goes by its topic.
        assert_eq!(send(&full), [0x30, 8, 0, 1, b't', 0, b'1', b'2', b'3', b'4']);
        // The smaller one still goes by it: 9 bytes.
        assert_eq!(send(&small), [0x30, 7, 0, 0, 3, id::TOPIC_ALIAS, 0, 1, b'1']);
    }

    /// A session connected with a Topic Alias Maximum of 2 for the broker.
    fn taking_two_aliases() -> (Session, V5, Pipe) {
        let (mut session, mut v5, mut pipe) = v5_session();
        v5.connect.topic_alias_maximum = 2;
        session
            .connect_v5(&mut pipe, 0, &connect_options(30, true), None, &Default::default(), &v5)
            .unwrap();
        // CONNECT states it.
        assert!(
            pipe.outbound
                .windows(3)
                .any(|bytes| bytes == [id::TOPIC_ALIAS_MAXIMUM, 0, 2])
        );
        connack(&mut pipe, 0, &[]);
        session.receive_v5(&mut pipe, 1, &mut v5).unwrap();
        (session, v5, pipe)
    }

    #[test]
    fn the_brokers_topic_aliases_are_resolved() {
        use crate::session::Outcome;
        let (mut session, mut v5, mut pipe) = taking_two_aliases();
        let mut sink = Memory::default();
        let publish = |topic: &[u8], alias: u8| {
            let mut bytes = vec![0x30, 0, 0, topic.len() as u8];
            bytes.extend_from_slice(topic);
            bytes.extend(if alias == 0 {
                vec![0]
            } else {
                vec![3, id::TOPIC_ALIAS, 0, alias]
            });
            bytes.push(b'x');
            bytes[1] = (bytes.len() - 2) as u8;
            bytes
        };
        let mut receive = |session: &mut Session, v5: &mut V5, pipe: &mut Pipe, bytes: Vec<u8>| {
            pipe.broker_sends(|b| b.extend(bytes));
            let outcome = session.step(pipe, 2, &mut sink, Some(v5));
            outcome.map(|outcome| (outcome, sink.messages.last().map(|(topic, _)| topic.clone())))
        };
        // Set with its topic, then used alone.
        let (outcome, topic) = receive(&mut session, &mut v5, &mut pipe, publish(b"a/b", 1)).unwrap();
        assert!(matches!(outcome, Outcome::Message { .. }));
        assert_eq!(topic.as_deref(), Some("a/b"));
        let (_, topic) = receive(&mut session, &mut v5, &mut pipe, publish(b"", 1)).unwrap();
        assert_eq!(topic.as_deref(), Some("a/b"));
        // Set again for another topic.
        receive(&mut session, &mut v5, &mut pipe, publish(b"c", 1)).unwrap();
        let (_, topic) = receive(&mut session, &mut v5, &mut pipe, publish(b"", 1)).unwrap();
        assert_eq!(topic.as_deref(), Some("c"));
        // An alias never set, one beyond the maximum, and an empty topic
        // without an alias fail the link.
        for (bytes, error) in [
            (publish(b"", 2), DecodeError::InvalidProperty),
            (publish(b"d", 3), DecodeError::InvalidProperty),
            (publish(b"", 0), DecodeError::InvalidTopic),
        ] {
            let (mut session, mut v5, mut pipe) = taking_two_aliases();
            assert_eq!(
                receive(&mut session, &mut v5, &mut pipe, bytes).map(|_| ()),
                Err(Error::Malformed(error))
            );
        }
    }

    #[test]
    fn without_the_brokers_aliases_topics_go_whole() {
        let (mut session, mut v5, mut pipe) = connected_v5(&[]);
        let mut topics = Topics::default();
        let message = Message {
            topic: "t",
            payload: b"",
            ..Message::default()
        };
        for _ in 0..2 {
            pipe.outbound.clear();
            session
                .publish_aliased(
                    &mut pipe,
                    2,
                    &message,
                    QoS::AtMostOnce,
                    false,
                    Some((&mut v5, &mut topics)),
                )
                .unwrap();
            assert_eq!(pipe.outbound, [0x30, 4, 0, 1, b't', 0]);
        }
        assert!(topics.0.is_empty());
    }

    #[test]
    fn publishes_stay_within_the_brokers_limits() {
        #[rustfmt::skip]
        let properties = [
            id::RECEIVE_MAXIMUM, 0, 1,
            id::MAXIMUM_QOS, 1,
            id::RETAIN_AVAILABLE, 0,
            id::MAXIMUM_PACKET_SIZE, 0, 0, 0, 20,
        ];
        let (mut session, v5, mut pipe) = connected_v5(&properties);
        let message = |payload: &'static [u8]| Message {
            topic: "t",
            payload,
            ..Message::default()
        };
        assert_eq!(
            session.check_publish_v5(&v5, &message(b""), QoS::ExactlyOnce, false),
            Err(Error::BrokerLimit)
        );
        assert_eq!(
            session.check_publish_v5(&v5, &message(b""), QoS::AtMostOnce, true),
            Err(Error::BrokerLimit)
        );
        // 20 bytes whole: header 2, topic 3, id 2, properties 1, payload 12.
        let twelve = message(&[0; 12]);
        assert_eq!(session.check_publish_v5(&v5, &twelve, QoS::AtLeastOnce, false), Ok(()));
        assert_eq!(
            session.check_publish_v5(&v5, &message(&[0; 13]), QoS::AtLeastOnce, false),
            Err(Error::BrokerLimit)
        );
        // Properties count: a user property of 5 bytes leaves room for 7 of payload.
        let with_property = |payload| Message {
            properties: MessageProperties {
                user: Some(&[("", "")]),
                ..MessageProperties::default()
            },
            ..message(payload)
        };
        assert_eq!(
            session.check_publish_v5(&v5, &with_property(&[0; 7]), QoS::AtLeastOnce, false),
            Ok(())
        );
        assert_eq!(
            session.check_publish_v5(&v5, &with_property(&[0; 8]), QoS::AtLeastOnce, false),
            Err(Error::BrokerLimit)
        );
        session
            .publish(&mut pipe, 1, "t", b"", QoS::AtLeastOnce, false)
            .unwrap();
        assert_eq!(
            session.check_publish_v5(&v5, &message(b""), QoS::AtLeastOnce, false),
            Err(Error::InflightFull)
        );
        assert_eq!(
            session.check_publish_v5(&v5, &message(b""), QoS::AtMostOnce, false),
            Ok(())
        );
    }

    #[test]
    fn every_reason_code_has_its_own_text() {
        let texts: Vec<_> = REASON_CODES.iter().map(|&code| reason_text(code).unwrap()).collect();
        assert_eq!(
            REASON_TEXTS.iter().filter(|&&byte| byte == 0).count(),
            REASON_CODES.len()
        );
        assert!(texts.iter().all(|text| text.len() > 1 && text.ends_with(&[0])));
        assert_eq!(reason_text(0x87), Some(&b"not authorized\0"[..]));
        assert_eq!(reason_text(0xa2), Some(&b"wildcard subscriptions not supported\0"[..]));
        assert_eq!(reason_text(0x03), None);
        assert_eq!(reason_text(0xff), None);
    }

    #[test]
    fn the_mqtt5_state_is_small() {
        // It follows the session in an MQTT 5 client's heap object.
        assert_eq!(core::mem::size_of::<V5>(), 192);
    }

    #[test]
    fn a_3_1_1_session_is_unchanged() {
        let config = Config { ..CONFIG };
        assert_eq!(Session::new(config).version(), 4);
        assert_eq!(Session::new_v5(config).version(), 5);
    }
}
