//! The packets a client sends, in their MQTT 5 form: CONNECT, PUBLISH,
//! SUBSCRIBE, UNSUBSCRIBE, the acknowledgements and DISCONNECT. Each is
//! the 3.1.1 packet with a property block (and, for some, a reason code);
//! a property that has its default value is left out. CONNECT, PUBLISH,
//! SUBSCRIBE and UNSUBSCRIBE are written in their 3.1.1 form when given
//! no properties: one function per packet keeps the engine small.

use embedded_io::Write;

use super::properties::{self as p, id};
use super::{Connect, EncodeError, PacketType, PacketWriter, Publish, QoS, field_len, total};

/// What a CONNECT says in MQTT 5 beyond the 3.1.1 fields.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnectProperties {
    /// Seconds the broker keeps the session after the link ends
    /// (0: it ends with the link; `u32::MAX`: never).
    pub session_expiry_s: u32,
    /// QoS 1 and 2 messages the broker may have unacknowledged at once.
    pub receive_maximum: u16,
    /// Largest packet the client accepts, whole (0: no limit sent).
    pub maximum_packet_size: u32,
    /// Topic aliases the broker may use towards the client.
    pub topic_alias_maximum: u16,
}

/// User properties (name, value pairs) where their owner keeps them. A
/// packet's writer reads them twice: once for its length, once to write.
pub trait UserProperties {
    /// The pair at `index`; None past the last.
    fn pair(&self, index: usize) -> Option<(&str, &str)>;
}

/// Pairs in a slice or an array: `&[("name", "value")]`.
impl UserProperties for [(&str, &str)] {
    fn pair(&self, index: usize) -> Option<(&str, &str)> {
        self.get(index).copied()
    }
}

impl<const N: usize> UserProperties for [(&str, &str); N] {
    fn pair(&self, index: usize) -> Option<(&str, &str)> {
        self.as_slice().pair(index)
    }
}

/// The pairs of `user`, in order.
fn pairs(user: Option<&dyn UserProperties>) -> impl Iterator<Item = (&str, &str)> {
    (0..).map_while(move |index| user?.pair(index))
}

/// The size of `user`'s pairs as properties.
fn user_len(user: Option<&dyn UserProperties>) -> u32 {
    pairs(user).fold(0u32, |len, (name, value)| {
        len.saturating_add(p::user_property_len(name, value))
    })
}

fn put_users<W: Write>(
    writer: &mut PacketWriter<'_, W>,
    user: Option<&dyn UserProperties>,
) -> Result<(), EncodeError<W::Error>> {
    for (name, value) in pairs(user) {
        p::put_user(writer, name, value)?;
    }
    Ok(())
}

/// The properties of a message: a PUBLISH's, or a will's. (No Debug: it
/// would pull formatting code into the engine for user properties.)
#[derive(Clone, Copy, Default)]
pub struct MessageProperties<'a> {
    /// The payload is UTF-8 text (Payload Format Indicator 1).
    pub utf8_payload: bool,
    /// Seconds after which the broker drops the message undelivered.
    pub message_expiry_s: Option<u32>,
    pub content_type: Option<&'a str>,
    pub response_topic: Option<&'a str>,
    pub correlation_data: Option<&'a [u8]>,
    /// A PUBLISH's topic alias (0: none); never in a will.
    pub topic_alias: u16,
    /// A will's delay in seconds; never in a PUBLISH.
    pub will_delay_s: u32,
    pub user: Option<&'a dyn UserProperties>,
}

impl MessageProperties<'_> {
    /// The block's length, its own length prefix not included.
    fn len(&self) -> Option<u32> {
        let mut len = 0u32;
        let mut add = |size: u32| len = len.saturating_add(size);
        if self.utf8_payload {
            add(p::BYTE_PROPERTY_LEN);
        }
        if self.message_expiry_s.is_some() {
            add(p::FOUR_PROPERTY_LEN);
        }
        for text in [self.content_type, self.response_topic].into_iter().flatten() {
            add(p::bytes_property_len(text.len()));
        }
        if let Some(data) = self.correlation_data {
            add(p::bytes_property_len(data.len()));
        }
        if self.topic_alias != 0 {
            add(p::TWO_PROPERTY_LEN);
        }
        if self.will_delay_s != 0 {
            add(p::FOUR_PROPERTY_LEN);
        }
        add(user_len(self.user));
        (len <= p::VARINT_MAX).then_some(len)
    }

    fn put<W: Write>(&self, writer: &mut PacketWriter<'_, W>, len: u32) -> Result<(), EncodeError<W::Error>> {
        p::put_varint(writer, len)?;
        if self.will_delay_s != 0 {
            p::put_four(writer, id::WILL_DELAY, self.will_delay_s)?;
        }
        if self.utf8_payload {
            p::put_byte(writer, id::PAYLOAD_FORMAT, 1)?;
        }
        if let Some(expiry) = self.message_expiry_s {
            p::put_four(writer, id::MESSAGE_EXPIRY, expiry)?;
        }
        if let Some(text) = self.content_type {
            p::put_bytes(writer, id::CONTENT_TYPE, text.as_bytes())?;
        }
        if let Some(text) = self.response_topic {
            p::put_bytes(writer, id::RESPONSE_TOPIC, text.as_bytes())?;
        }
        if let Some(data) = self.correlation_data {
            p::put_bytes(writer, id::CORRELATION_DATA, data)?;
        }
        if self.topic_alias != 0 {
            p::put_two(writer, id::TOPIC_ALIAS, self.topic_alias)?;
        }
        put_users(writer, self.user)
    }
}

/// A property block's size on the wire: its length prefix and itself.
fn block_len(len: u32) -> usize {
    usize::try_from(len.saturating_add(p::varint_len(len))).unwrap_or(usize::MAX)
}

impl ConnectProperties {
    fn len(&self, user: Option<&dyn UserProperties>) -> u32 {
        let mut len = user_len(user);
        if self.session_expiry_s != 0 {
            len = len.saturating_add(p::FOUR_PROPERTY_LEN);
        }
        if self.receive_maximum != u16::MAX {
            len = len.saturating_add(p::TWO_PROPERTY_LEN);
        }
        if self.maximum_packet_size != 0 {
            len = len.saturating_add(p::FOUR_PROPERTY_LEN);
        }
        if self.topic_alias_maximum != 0 {
            len = len.saturating_add(p::TWO_PROPERTY_LEN);
        }
        len
    }

    fn put<W: Write>(
        &self,
        writer: &mut PacketWriter<'_, W>,
        user: Option<&dyn UserProperties>,
    ) -> Result<(), EncodeError<W::Error>> {
        p::put_varint(writer, self.len(user))?;
        if self.session_expiry_s != 0 {
            p::put_four(writer, id::SESSION_EXPIRY, self.session_expiry_s)?;
        }
        // 0 is a protocol error: it is sent as 1.
        if self.receive_maximum != u16::MAX {
            p::put_two(writer, id::RECEIVE_MAXIMUM, self.receive_maximum.max(1))?;
        }
        if self.maximum_packet_size != 0 {
            p::put_four(writer, id::MAXIMUM_PACKET_SIZE, self.maximum_packet_size)?;
        }
        if self.topic_alias_maximum != 0 {
            p::put_two(writer, id::TOPIC_ALIAS_MAXIMUM, self.topic_alias_maximum)?;
        }
        put_users(writer, user)
    }
}

/// The properties of an MQTT 5 CONNECT: its own, its user properties and
/// its will's properties.
#[derive(Clone, Copy)]
pub struct ConnectBlocks<'a> {
    pub connect: &'a ConnectProperties,
    pub user: Option<&'a dyn UserProperties>,
    pub will: &'a MessageProperties<'a>,
}

/// Writes CONNECT: `connect`'s fields (in MQTT 5, Clean Start for
/// `clean_session`), and in MQTT 5 (`properties` given) its properties
/// and the will's; in MQTT 3.1.1 without them.
pub fn write_connect<W: Write>(
    io: &mut W,
    connect: &Connect<'_>,
    properties: Option<ConnectBlocks<'_>>,
) -> Result<(), EncodeError<W::Error>> {
    // Without MQTT 5 in the engine, only the 3.1.1 form is kept.
    let properties = properties.filter(|_| cfg!(feature = "mqtt5"));
    let flags = super::connect_flags(connect);
    let will_properties_len = match properties {
        Some(blocks) => Some(blocks.will.len().ok_or(EncodeError::PacketTooLong)?),
        None => None,
    };
    let mut will_len = 0;
    if connect.will.is_some() {
        will_len = total(&[
            will_properties_len.map_or(0, block_len),
            super::will_fields_len(connect)?,
        ])
        .ok_or(EncodeError::PacketTooLong)?;
    }
    let credentials_len = super::credentials_len(connect)?;
    // Protocol name (6), level (1), flags (1), keepalive (2).
    let remaining = total(&[
        10,
        properties.map_or(0, |blocks| block_len(blocks.connect.len(blocks.user))),
        field_len(connect.client_id.as_bytes())?,
        will_len,
        credentials_len,
    ])
    .ok_or(EncodeError::PacketTooLong)?;
    let mut writer = PacketWriter::start(io, (PacketType::Connect as u8) << 4, remaining)?;
    writer.put_field(b"MQTT")?;
    writer.put_u8(if properties.is_some() { 5 } else { 4 })?;
    writer.put_u8(flags)?;
    writer.put_u16(connect.keepalive_s)?;
    if let Some(blocks) = properties {
        blocks.connect.put(&mut writer, blocks.user)?;
    }
    writer.put_field(connect.client_id.as_bytes())?;
    if let Some(will) = &connect.will {
        if let (Some(blocks), Some(len)) = (properties, will_properties_len) {
            blocks.will.put(&mut writer, len)?;
        }
        writer.put_field(will.topic.as_bytes())?;
        writer.put_field(will.payload)?;
    }
    super::put_credentials(&mut writer, connect)?;
    writer.finish()
}

/// Writes PUBLISH: in MQTT 5 (`properties` given) with its property
/// block, in MQTT 3.1.1 without. With a topic alias, `publish.topic` may
/// be empty (the alias stands for a topic the broker already knows).
pub fn write_publish<W: Write>(
    io: &mut W,
    publish: &Publish<'_>,
    properties: Option<&MessageProperties<'_>>,
) -> Result<(), EncodeError<W::Error>> {
    // Without MQTT 5 in the engine, only the 3.1.1 form is kept.
    let properties = properties.filter(|_| cfg!(feature = "mqtt5"));
    let properties_len = match properties {
        Some(properties) => Some(properties.len().ok_or(EncodeError::PacketTooLong)?),
        None => None,
    };
    field_len(publish.topic.as_bytes())?;
    let remaining = publish_remaining(publish, properties_len).ok_or(EncodeError::PacketTooLong)?;
    let mut writer = PacketWriter::start(io, super::publish_first_byte(publish), remaining)?;
    writer.put_field(publish.topic.as_bytes())?;
    if let Some(packet_id) = publish.packet_id {
        writer.put_u16(packet_id)?;
    }
    if let (Some(properties), Some(len)) = (properties, properties_len) {
        properties.put(&mut writer, len)?;
    }
    writer.put_bytes(publish.payload)?;
    writer.finish()
}

/// A PUBLISH's remaining length: topic, packet id, the property block of
/// `properties_len` bytes (MQTT 5) and payload. None when too long.
fn publish_remaining(publish: &Publish<'_>, properties_len: Option<u32>) -> Option<usize> {
    let id_len = if publish.packet_id.is_some() { 2 } else { 0 };
    let topic_len = publish.topic.len().checked_add(2)?;
    total(&[
        topic_len,
        id_len,
        properties_len.map_or(0, block_len),
        publish.payload.len(),
    ])
}

/// The size of a whole PUBLISH in MQTT 5, fixed header included; None
/// when it is longer than a packet can be.
pub fn publish_size(publish: &Publish<'_>, properties: &MessageProperties<'_>) -> Option<u32> {
    let remaining = u32::try_from(publish_remaining(publish, Some(properties.len()?))?).ok()?;
    (remaining <= p::VARINT_MAX).then(|| remaining.saturating_add(1).saturating_add(p::varint_len(remaining)))
}

/// A subscription's options byte (MQTT 5, section 3.8.3.1), and its
/// subscription identifier.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SubscriptionOptions {
    pub qos: QoS,
    /// The broker does not send back what this client publishes.
    pub no_local: bool,
    /// Messages keep the retain flag they were published with.
    pub retain_as_published: bool,
    /// 0: send retained messages on subscribing; 1: only if the
    /// subscription is new; 2: never.
    pub retain_handling: u8,
    /// Given back with every message the subscription brings (1 to
    /// 268,435,455; 0: none).
    pub subscription_id: u32,
}

impl SubscriptionOptions {
    /// Options that ask for `qos` alone (all a 3.1.1 subscription has).
    pub fn qos(qos: QoS) -> Self {
        SubscriptionOptions {
            qos,
            no_local: false,
            retain_as_published: false,
            retain_handling: 0,
            subscription_id: 0,
        }
    }

    /// The options an options byte gives, with `subscription_id`, or
    /// `None` when it sets a reserved bit, QoS 3 or retain handling 3, or
    /// the identifier is out of range.
    pub fn from_byte(byte: u8, subscription_id: u32) -> Option<Self> {
        let retain_handling = (byte >> 4) & 0b11;
        if byte & 0xc0 != 0 || retain_handling == 3 || subscription_id > p::VARINT_MAX {
            return None;
        }
        Some(SubscriptionOptions {
            qos: QoS::from_bits(byte & 0b11)?,
            no_local: byte & 0x04 != 0,
            retain_as_published: byte & 0x08 != 0,
            retain_handling,
            subscription_id,
        })
    }

    /// Whether they ask for nothing but a QoS (as a 3.1.1 client must).
    pub fn is_qos_only(&self) -> bool {
        *self == SubscriptionOptions::qos(self.qos)
    }

    /// The options byte (MQTT 5, section 3.8.3.1).
    pub fn byte(&self) -> u8 {
        let mut byte = self.qos as u8 | ((self.retain_handling & 0b11) << 4);
        if self.no_local {
            byte |= 0x04;
        }
        if self.retain_as_published {
            byte |= 0x08;
        }
        byte
    }
}

/// Writes a SUBSCRIBE for one filter: in MQTT 5 (`v5`) with a property
/// block, holding the options' subscription identifier unless it is 0; in
/// MQTT 3.1.1 without, and only the options' QoS.
pub fn write_subscribe<W: Write>(
    io: &mut W,
    packet_id: u16,
    filter: &str,
    options: &SubscriptionOptions,
    v5: bool,
) -> Result<(), EncodeError<W::Error>> {
    // Without MQTT 5 in the engine, only the 3.1.1 form is kept.
    let subscription_id = (v5 && cfg!(feature = "mqtt5")).then_some(options.subscription_id);
    let properties_len = match subscription_id {
        None | Some(0) => 0,
        Some(id) => p::varint_len(id).saturating_add(1),
    };
    let block = if subscription_id.is_some() {
        block_len(properties_len)
    } else {
        0
    };
    let remaining = total(&[2, block, field_len(filter.as_bytes())?, 1]).ok_or(EncodeError::PacketTooLong)?;
    let mut writer = PacketWriter::start(io, ((PacketType::Subscribe as u8) << 4) | 0b0010, remaining)?;
    writer.put_u16(packet_id)?;
    if let Some(subscription_id) = subscription_id {
        p::put_varint(&mut writer, properties_len)?;
        if subscription_id != 0 {
            writer.put_u8(id::SUBSCRIPTION_ID)?;
            p::put_varint(&mut writer, subscription_id)?;
        }
    }
    writer.put_field(filter.as_bytes())?;
    let byte = if subscription_id.is_some() {
        options.byte()
    } else {
        options.qos as u8
    };
    writer.put_u8(byte)?;
    writer.finish()
}

/// Writes an UNSUBSCRIBE for one filter: in MQTT 5 (`v5`) with an empty
/// property block, in MQTT 3.1.1 without.
pub fn write_unsubscribe<W: Write>(
    io: &mut W,
    packet_id: u16,
    filter: &str,
    v5: bool,
) -> Result<(), EncodeError<W::Error>> {
    let remaining = total(&[2, usize::from(v5), field_len(filter.as_bytes())?]).ok_or(EncodeError::PacketTooLong)?;
    let mut writer = PacketWriter::start(io, ((PacketType::Unsubscribe as u8) << 4) | 0b0010, remaining)?;
    writer.put_u16(packet_id)?;
    if v5 {
        writer.put_u8(0)?;
    }
    writer.put_field(filter.as_bytes())?;
    writer.finish()
}

/// Writes an MQTT 5 PUBACK, PUBREC, PUBREL or PUBCOMP. Reason code 0
/// (success) takes the short form the standard allows: the id alone.
pub fn write_ack<W: Write>(
    io: &mut W,
    kind: PacketType,
    packet_id: u16,
    reason: u8,
) -> Result<(), EncodeError<W::Error>> {
    if reason == 0 {
        return super::write_ack(io, kind, packet_id);
    }
    let flags = if kind == PacketType::PubRel { 0b0010 } else { 0 };
    let mut writer = PacketWriter::start(io, ((kind as u8) << 4) | flags, 3)?;
    writer.put_u16(packet_id)?;
    writer.put_u8(reason)?;
    writer.finish()
}

/// Writes an MQTT 5 DISCONNECT with `reason` (0: normal disconnection,
/// the short form) and, when it is not `None`, a Session Expiry Interval
/// that replaces the one CONNECT gave.
pub fn write_disconnect<W: Write>(
    io: &mut W,
    reason: u8,
    session_expiry_s: Option<u32>,
) -> Result<(), EncodeError<W::Error>> {
    let first = (PacketType::Disconnect as u8) << 4;
    match session_expiry_s {
        None if reason == 0 => PacketWriter::start(io, first, 0)?.finish(),
        None => {
            let mut writer = PacketWriter::start(io, first, 1)?;
            writer.put_u8(reason)?;
            writer.finish()
        }
        Some(expiry) => {
            let mut writer = PacketWriter::start(io, first, 7)?;
            writer.put_u8(reason)?;
            p::put_varint(&mut writer, p::FOUR_PROPERTY_LEN)?;
            p::put_four(&mut writer, id::SESSION_EXPIRY, expiry)?;
            writer.finish()
        }
    }
}

#[cfg(all(test, feature = "mqtt5"))]
mod tests {
    use super::*;
    use crate::codec::Will;

    fn written(write: impl FnOnce(&mut &mut [u8])) -> std::vec::Vec<u8> {
        let mut buffer = [0u8; 256];
        let mut sink = &mut buffer[..];
        write(&mut sink);
        let left = sink.len();
        buffer[..256 - left].to_vec()
    }

    fn connect() -> Connect<'static> {
        Connect {
            client_id: "c",
            clean_session: true,
            keepalive_s: 60,
            will: None,
            username: None,
            password: None,
        }
    }

    #[test]
    fn connect_with_properties_and_a_will() {
        let properties = ConnectProperties {
            session_expiry_s: 300,
            receive_maximum: 16,
            maximum_packet_size: 1024,
            topic_alias_maximum: 0,
        };
        let will = MessageProperties {
            will_delay_s: 5,
            utf8_payload: true,
            user: Some(&[("a", "")]),
            ..Default::default()
        };
        let options = Connect {
            will: Some(Will {
                topic: "w",
                payload: b"x",
                qos: QoS::AtLeastOnce,
                retain: false,
            }),
            username: Some("u"),
            ..connect()
        };
        let blocks = ConnectBlocks {
            connect: &properties,
            user: Some(&[("k", "v")]),
            will: &will,
        };
        let bytes = written(|io| write_connect(io, &options, Some(blocks)).unwrap());
        #[rustfmt::skip]
        let expected = [
            0x10, 57,
            0, 4, b'M', b'Q', b'T', b'T', 5, 0x80 | 0x08 | 0x04 | 0x02, 0, 60,
            20, id::SESSION_EXPIRY, 0, 0, 1, 44, id::RECEIVE_MAXIMUM, 0, 16,
            id::MAXIMUM_PACKET_SIZE, 0, 0, 4, 0, id::USER_PROPERTY, 0, 1, b'k', 0, 1, b'v',
            0, 1, b'c',
            13, id::WILL_DELAY, 0, 0, 0, 5, id::PAYLOAD_FORMAT, 1,
            id::USER_PROPERTY, 0, 1, b'a', 0, 0,
            0, 1, b'w', 0, 1, b'x',
            0, 1, b'u',
        ];
        assert_eq!(bytes, expected);
    }

    #[test]
    fn connect_leaves_defaults_out() {
        let properties = ConnectProperties {
            receive_maximum: u16::MAX,
            ..Default::default()
        };
        let blocks = ConnectBlocks {
            connect: &properties,
            user: None,
            will: &MessageProperties::default(),
        };
        let bytes = written(|io| write_connect(io, &connect(), Some(blocks)).unwrap());
        assert_eq!(
            bytes,
            [0x10, 14, 0, 4, b'M', b'Q', b'T', b'T', 5, 0x02, 0, 60, 0, 0, 1, b'c']
        );
    }

    #[test]
    fn publish_carries_its_properties_before_the_payload() {
        let publish = Publish {
            topic: "t",
            packet_id: Some(7),
            qos: QoS::AtLeastOnce,
            retain: true,
            dup: false,
            payload: b"hi",
        };
        let properties = MessageProperties {
            message_expiry_s: Some(10),
            response_topic: Some("r"),
            correlation_data: Some(&[1, 2]),
            topic_alias: 3,
            user: Some(&[("n", "v"), ("n", "w")]),
            ..Default::default()
        };
        let bytes = written(|io| write_publish(io, &publish, Some(&properties)).unwrap());
        #[rustfmt::skip]
        let expected = [
            0x33, 39,
            0, 1, b't', 0, 7,
            31, id::MESSAGE_EXPIRY, 0, 0, 0, 10, id::RESPONSE_TOPIC, 0, 1, b'r',
            id::CORRELATION_DATA, 0, 2, 1, 2, id::TOPIC_ALIAS, 0, 3,
            id::USER_PROPERTY, 0, 1, b'n', 0, 1, b'v', id::USER_PROPERTY, 0, 1, b'n', 0, 1, b'w',
            b'h', b'i',
        ];
        assert_eq!(bytes, expected);
        assert_eq!(publish_size(&publish, &properties), Some(41));
        let bare = written(|io| {
            write_publish(
                io,
                &Publish {
                    retain: false,
                    ..publish
                },
                Some(&Default::default()),
            )
            .unwrap()
        });
        assert_eq!(bare, [0x32, 8, 0, 1, b't', 0, 7, 0, b'h', b'i']);
    }

    #[test]
    fn subscribe_with_options_and_an_identifier() {
        let options = SubscriptionOptions {
            qos: QoS::ExactlyOnce,
            no_local: true,
            retain_as_published: true,
            retain_handling: 2,
            subscription_id: 200,
        };
        let bytes = written(|io| write_subscribe(io, 9, "a/+", &options, true).unwrap());
        assert_eq!(
            bytes,
            [
                0x82,
                12,
                0,
                9,
                3,
                id::SUBSCRIPTION_ID,
                0xc8,
                0x01,
                0,
                3,
                b'a',
                b'/',
                b'+',
                0x2e
            ]
        );
        let plain = SubscriptionOptions::qos(QoS::AtMostOnce);
        assert_eq!(
            written(|io| write_subscribe(io, 1, "x", &plain, true).unwrap()),
            [0x82, 7, 0, 1, 0, 0, 1, b'x', 0]
        );
    }

    #[test]
    fn unsubscribe_acks_and_disconnect() {
        assert_eq!(
            written(|io| write_unsubscribe(io, 2, "x", true).unwrap()),
            [0xa2, 6, 0, 2, 0, 0, 1, b'x']
        );
        assert_eq!(
            written(|io| write_ack(io, PacketType::PubAck, 5, 0).unwrap()),
            [0x40, 2, 0, 5]
        );
        assert_eq!(
            written(|io| write_ack(io, PacketType::PubRel, 5, 0x92).unwrap()),
            [0x62, 3, 0, 5, 0x92]
        );
        assert_eq!(written(|io| write_disconnect(io, 0, None).unwrap()), [0xe0, 0]);
        assert_eq!(written(|io| write_disconnect(io, 4, None).unwrap()), [0xe0, 1, 4]);
        assert_eq!(
            written(|io| write_disconnect(io, 0, Some(0)).unwrap()),
            [0xe0, 7, 0, 5, id::SESSION_EXPIRY, 0, 0, 0, 0]
        );
    }
}
