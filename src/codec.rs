//! MQTT 3.1.1 wire format: the fixed header, the remaining-length varint,
//! length-prefixed strings and every control packet.
//!
//! Decoding works on a complete packet held in a byte slice ([`decode`]).
//! Encoding streams through a [`PacketWriter`], which gathers small fields in
//! a stack buffer and passes large slices (payloads) straight to the
//! transport, so a payload is never copied into an engine buffer.
//!
//! Nothing here panics: every read goes through [`Reader`], whose accessors
//! check bounds, and every length is computed with checked arithmetic.

use embedded_io::{Read, ReadExactError, Write};

pub mod properties;
pub mod v5;

/// Largest value the remaining-length varint can carry (4 bytes, 7 bits each).
pub const MAX_REMAINING_LENGTH: u32 = 268_435_455;

/// Longest fixed header: one type byte and four remaining-length bytes.
pub const MAX_FIXED_HEADER_LEN: usize = 5;

/// Longest UTF-8 string or binary field MQTT can carry (16-bit length prefix).
pub const MAX_STRING_LEN: usize = 65_535;

/// Quality of service of a PUBLISH or a subscription.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum QoS {
    AtMostOnce = 0,
    AtLeastOnce = 1,
    ExactlyOnce = 2,
}

impl QoS {
    /// The QoS for a two-bit field value; 3 is reserved and malformed.
    pub fn from_bits(bits: u8) -> Option<QoS> {
        match bits {
            0 => Some(QoS::AtMostOnce),
            1 => Some(QoS::AtLeastOnce),
            2 => Some(QoS::ExactlyOnce),
            _ => None,
        }
    }
}

/// Control packet types (the high nibble of the first byte).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PacketType {
    Connect = 1,
    ConnAck = 2,
    Publish = 3,
    PubAck = 4,
    PubRec = 5,
    PubRel = 6,
    PubComp = 7,
    Subscribe = 8,
    SubAck = 9,
    Unsubscribe = 10,
    UnsubAck = 11,
    PingReq = 12,
    PingResp = 13,
    Disconnect = 14,
}

impl PacketType {
    fn from_nibble(nibble: u8) -> Option<PacketType> {
        use PacketType::*;
        Some(match nibble {
            1 => Connect,
            2 => ConnAck,
            3 => Publish,
            4 => PubAck,
            5 => PubRec,
            6 => PubRel,
            7 => PubComp,
            8 => Subscribe,
            9 => SubAck,
            10 => Unsubscribe,
            11 => UnsubAck,
            12 => PingReq,
            13 => PingResp,
            14 => Disconnect,
            _ => return None,
        })
    }

    /// The flag nibble the specification fixes for this type, or `None`
    /// for PUBLISH, whose flags carry DUP, QoS and RETAIN.
    fn required_flags(self) -> Option<u8> {
        match self {
            PacketType::Publish => None,
            PacketType::PubRel | PacketType::Subscribe | PacketType::Unsubscribe => Some(0b0010),
            _ => Some(0),
        }
    }
}

/// Why bytes from the peer are not a valid MQTT 3.1.1 packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum DecodeError {
    /// The remaining length uses more than four bytes.
    MalformedLength,
    /// Packet type 0 or 15.
    UnknownPacketType,
    /// Flag bits that the specification reserves are set wrongly.
    InvalidFlags,
    /// QoS 3, or a QoS where none is allowed.
    InvalidQoS,
    /// A field runs past the end of the packet, or bytes are left over.
    BadLength,
    /// A string is not well-formed UTF-8 or contains U+0000.
    InvalidUtf8,
    /// A topic name or filter breaks the topic rules.
    InvalidTopic,
    /// A packet identifier of zero where one is required.
    ZeroPacketId,
    /// A CONNECT with an unknown protocol name or level.
    UnsupportedProtocol,
    /// A CONNACK return code above 5 or SUBACK code other than 0, 1, 2, 0x80.
    InvalidReturnCode,
    /// A SUBSCRIBE or UNSUBSCRIBE with no topic filter at all.
    EmptyPayload,
    /// An MQTT 5 property that is unknown, not allowed in the packet,
    /// repeated, or whose value is out of range.
    InvalidProperty,
}

/// Why a packet could not be encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum EncodeError<E> {
    /// A string or binary field is longer than 65,535 bytes.
    FieldTooLong,
    /// The packet is longer than [`MAX_REMAINING_LENGTH`].
    PacketTooLong,
    /// The transport failed while the packet was being written.
    Io(E),
    /// The transport took none of a write: it is closed.
    Closed,
}

/// Copies `source` to the start of `destination`, as many bytes as both
/// hold (`copy_from_slice` without its panic path).
pub fn copy(destination: &mut [u8], source: &[u8]) {
    for (to, from) in destination.iter_mut().zip(source) {
        *to = *from;
    }
}

/// Writes all of `bytes` (embedded-io's `write_all` panics when a write
/// takes nothing; a transport that does is treated as closed here).
fn write_all<W: Write>(io: &mut W, mut bytes: &[u8]) -> Result<(), EncodeError<W::Error>> {
    while !bytes.is_empty() {
        let written = io.write(bytes).map_err(EncodeError::Io)?;
        bytes = bytes
            .get(written..)
            .filter(|_| written > 0)
            .ok_or(EncodeError::Closed)?;
    }
    Ok(())
}

/// Reads exactly `buffer.len()` bytes (as embedded-io's `read_exact`,
/// without its panic path for a transport that claims more than it read).
pub fn read_exact<T: Read>(io: &mut T, buffer: &mut [u8]) -> Result<(), ReadExactError<T::Error>> {
    let mut filled = 0;
    loop {
        let rest = buffer.get_mut(filled..).ok_or(ReadExactError::UnexpectedEof)?;
        if rest.is_empty() {
            return Ok(());
        }
        let read = io.read(rest).map_err(ReadExactError::Other)?;
        if read == 0 {
            return Err(ReadExactError::UnexpectedEof);
        }
        filled = filled.saturating_add(read);
    }
}

/// Decodes a remaining-length varint from the start of `bytes`.
///
/// Returns `Ok(None)` while more bytes are needed, otherwise the value and
/// how many bytes it took.
pub fn decode_remaining_length(bytes: &[u8]) -> Result<Option<(u32, usize)>, DecodeError> {
    let mut value: u32 = 0;
    let mut shift = 0u32;
    for (used, byte) in (1..).zip(bytes.iter()) {
        if used > 4 {
            return Err(DecodeError::MalformedLength);
        }
        // At most four bytes: the shift stays at or below 21.
        value |= u32::from(byte & 0x7f).wrapping_shl(shift);
        shift = shift.wrapping_add(7);
        if byte & 0x80 == 0 {
            return Ok(Some((value, used)));
        }
    }
    if bytes.len() >= 4 {
        return Err(DecodeError::MalformedLength);
    }
    Ok(None)
}

/// Encodes `value` as a remaining-length varint; returns the bytes and how
/// many of them are used, or `None` when `value` is too large.
pub fn encode_remaining_length(value: u32) -> Option<([u8; 4], usize)> {
    if value > MAX_REMAINING_LENGTH {
        return None;
    }
    let mut out = [0u8; 4];
    let mut rest = value;
    for (used, slot) in (1..).zip(out.iter_mut()) {
        let mut byte = (rest & 0x7f) as u8;
        rest >>= 7;
        if rest != 0 {
            byte |= 0x80;
        }
        *slot = byte;
        if rest == 0 {
            return Some((out, used));
        }
    }
    None
}

/// The first byte and the remaining length of a packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FixedHeader {
    pub kind: PacketType,
    pub flags: u8,
    pub remaining_length: u32,
}

impl FixedHeader {
    /// Checks the type and flag nibbles of a packet's first byte.
    pub fn check_first_byte(first: u8) -> Result<(PacketType, u8), DecodeError> {
        let kind = PacketType::from_nibble(first >> 4).ok_or(DecodeError::UnknownPacketType)?;
        let flags = first & 0x0f;
        match kind.required_flags() {
            Some(required) if required != flags => Err(DecodeError::InvalidFlags),
            None if (flags >> 1) & 0b11 == 3 => Err(DecodeError::InvalidQoS),
            _ => Ok((kind, flags)),
        }
    }

    /// Parses a fixed header from the start of `bytes`; `Ok(None)` means
    /// more bytes are needed. Also returns the header's length in bytes.
    pub fn parse(bytes: &[u8]) -> Result<Option<(FixedHeader, usize)>, DecodeError> {
        let Some((&first, rest)) = bytes.split_first() else {
            return Ok(None);
        };
        let (kind, flags) = Self::check_first_byte(first)?;
        let Some((remaining_length, used)) = decode_remaining_length(rest)? else {
            return Ok(None);
        };
        let header = FixedHeader {
            kind,
            flags,
            remaining_length,
        };
        // The varint takes at most four bytes.
        Ok(Some((header, used.saturating_add(1))))
    }
}

/// A bounds-checked cursor over a packet's bytes.
pub struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    pub fn new(bytes: &'a [u8]) -> Self {
        Reader { bytes }
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    pub fn remaining(&self) -> &'a [u8] {
        self.bytes
    }

    pub fn take(&mut self, count: usize) -> Result<&'a [u8], DecodeError> {
        let (head, tail) = self.bytes.split_at_checked(count).ok_or(DecodeError::BadLength)?;
        self.bytes = tail;
        Ok(head)
    }

    pub fn u8(&mut self) -> Result<u8, DecodeError> {
        let (&byte, rest) = self.bytes.split_first().ok_or(DecodeError::BadLength)?;
        self.bytes = rest;
        Ok(byte)
    }

    pub fn u16(&mut self) -> Result<u16, DecodeError> {
        let high = self.u8()?;
        let low = self.u8()?;
        Ok(u16::from_be_bytes([high, low]))
    }

    pub fn packet_id(&mut self) -> Result<u16, DecodeError> {
        match self.u16()? {
            0 => Err(DecodeError::ZeroPacketId),
            id => Ok(id),
        }
    }

    /// A length-prefixed binary field.
    pub fn binary(&mut self) -> Result<&'a [u8], DecodeError> {
        let len = self.u16()?;
        self.take(usize::from(len))
    }

    /// A length-prefixed UTF-8 string (MQTT 3.1.1 section 1.5.3).
    pub fn string(&mut self) -> Result<&'a str, DecodeError> {
        utf8_string(self.binary()?)
    }

    fn finish(&self) -> Result<(), DecodeError> {
        if self.bytes.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::BadLength)
        }
    }
}

/// Checks an MQTT UTF-8 string: well-formed and without U+0000.
pub fn utf8_string(bytes: &[u8]) -> Result<&str, DecodeError> {
    // Not `contains`: for bytes that is core's memchr, larger than this.
    #[allow(clippy::manual_contains)]
    if bytes.iter().any(|&byte| byte == 0) {
        return Err(DecodeError::InvalidUtf8);
    }
    utf8(bytes).ok_or(DecodeError::InvalidUtf8)
}

/// `bytes` as text when they are well-formed UTF-8.
///
/// A small validator of our own instead of `core::str::from_utf8`: that one
/// is built for speed on long texts and brings core's panic and formatting
/// code with it, several kilobytes of flash on a microcontroller, while
/// MQTT strings are short. The unit tests check it against core's on
/// random and edge-case input.
#[allow(unsafe_code)]
pub fn utf8(bytes: &[u8]) -> Option<&str> {
    let mut check = Utf8Check::default();
    if !(bytes.iter().all(|&byte| check.push(byte)) && check.is_complete()) {
        return None;
    }
    // SAFETY: `Utf8Check` accepted only well-formed UTF-8, which is what
    // `str` requires.
    Some(unsafe { core::str::from_utf8_unchecked(bytes) })
}

/// Checks UTF-8 one byte at a time, so that a string can be checked as it
/// streams past in pieces. The ranges are those of the Unicode standard's
/// table of well-formed byte sequences (as in RFC 3629), which rule out
/// overlong forms, surrogates and code points above U+10FFFF.
#[derive(Clone, Copy, Debug)]
pub struct Utf8Check {
    /// Continuation bytes still expected in the current sequence.
    expected: u8,
    /// The range the next continuation byte must lie in.
    low: u8,
    high: u8,
}

impl Default for Utf8Check {
    fn default() -> Self {
        Utf8Check {
            expected: 0,
            low: 0x80,
            high: 0xbf,
        }
    }
}

impl Utf8Check {
    /// Takes the next byte; false when it cannot continue well-formed UTF-8.
    pub fn push(&mut self, byte: u8) -> bool {
        if self.expected > 0 {
            if byte < self.low || byte > self.high {
                return false;
            }
            self.expected = self.expected.saturating_sub(1);
            self.low = 0x80;
            self.high = 0xbf;
            return true;
        }
        let (expected, low, high) = match byte {
            0x00..=0x7f => return true,
            0xc2..=0xdf => (1, 0x80, 0xbf),
            0xe0 => (2, 0xa0, 0xbf),
            0xe1..=0xec | 0xee..=0xef => (2, 0x80, 0xbf),
            0xed => (2, 0x80, 0x9f),
            0xf0 => (3, 0x90, 0xbf),
            0xf1..=0xf3 => (3, 0x80, 0xbf),
            0xf4 => (3, 0x80, 0x8f),
            _ => return false,
        };
        *self = Utf8Check { expected, low, high };
        true
    }

    /// Whether the bytes so far end on a whole character.
    pub fn is_complete(&self) -> bool {
        self.expected == 0
    }
}

/// A will message carried by CONNECT.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Will<'a> {
    pub topic: &'a str,
    pub payload: &'a [u8],
    pub qos: QoS,
    pub retain: bool,
}

/// The fields of a CONNECT packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Connect<'a> {
    pub client_id: &'a str,
    pub clean_session: bool,
    pub keepalive_s: u16,
    pub will: Option<Will<'a>>,
    pub username: Option<&'a str>,
    pub password: Option<&'a [u8]>,
}

/// The fields of a PUBLISH packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Publish<'a> {
    pub topic: &'a str,
    /// Present exactly when `qos` is 1 or 2.
    pub packet_id: Option<u16>,
    pub qos: QoS,
    pub retain: bool,
    pub dup: bool,
    pub payload: &'a [u8],
}

/// The topic filters of a SUBSCRIBE (each with its QoS byte) or an
/// UNSUBSCRIBE, checked when the packet was decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FilterList<'a> {
    bytes: &'a [u8],
    with_qos: bool,
}

impl<'a> FilterList<'a> {
    /// Iterates over `(filter, qos)`; the QoS is `AtMostOnce` for UNSUBSCRIBE.
    pub fn iter(&self) -> impl Iterator<Item = (&'a str, QoS)> + 'a {
        let mut reader = Reader::new(self.bytes);
        let with_qos = self.with_qos;
        core::iter::from_fn(move || {
            if reader.is_empty() {
                return None;
            }
            // The list was validated by `FilterList::parse`, so these reads
            // succeed; a failure simply ends the iteration.
            let filter = reader.string().ok()?;
            let qos = if with_qos {
                QoS::from_bits(reader.u8().ok()?)?
            } else {
                QoS::AtMostOnce
            };
            Some((filter, qos))
        })
    }

    fn parse(bytes: &'a [u8], with_qos: bool) -> Result<Self, DecodeError> {
        if bytes.is_empty() {
            return Err(DecodeError::EmptyPayload);
        }
        let mut reader = Reader::new(bytes);
        while !reader.is_empty() {
            let filter = reader.string()?;
            crate::topic::check_filter(filter.as_bytes()).map_err(|_| DecodeError::InvalidTopic)?;
            if with_qos {
                let options = reader.u8()?;
                if options > 2 {
                    return Err(DecodeError::InvalidQoS);
                }
            }
        }
        Ok(FilterList { bytes, with_qos })
    }
}

/// SUBACK return code for a refused subscription.
pub const SUBACK_FAILURE: u8 = 0x80;

/// A decoded control packet borrowing from the bytes it was decoded from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Packet<'a> {
    Connect(Connect<'a>),
    ConnAck { session_present: bool, code: u8 },
    Publish(Publish<'a>),
    PubAck(u16),
    PubRec(u16),
    PubRel(u16),
    PubComp(u16),
    Subscribe { packet_id: u16, filters: FilterList<'a> },
    SubAck { packet_id: u16, codes: &'a [u8] },
    Unsubscribe { packet_id: u16, filters: FilterList<'a> },
    UnsubAck(u16),
    PingReq,
    PingResp,
    Disconnect,
}

/// Decodes one complete packet from the start of `bytes`.
///
/// Returns `Ok(None)` while the packet is incomplete, otherwise the packet
/// and how many bytes it used.
pub fn decode(bytes: &[u8]) -> Result<Option<(Packet<'_>, usize)>, DecodeError> {
    let Some((header, header_len)) = FixedHeader::parse(bytes)? else {
        return Ok(None);
    };
    let body_len = usize::try_from(header.remaining_length).map_err(|_| DecodeError::BadLength)?;
    let total = header_len.checked_add(body_len).ok_or(DecodeError::BadLength)?;
    let Some(body) = bytes.get(header_len..total) else {
        return Ok(None);
    };
    let packet = decode_body(header.kind, header.flags, body)?;
    Ok(Some((packet, total)))
}

/// Decodes a packet's variable header and payload, given its fixed header.
pub fn decode_body(kind: PacketType, flags: u8, body: &[u8]) -> Result<Packet<'_>, DecodeError> {
    let mut reader = Reader::new(body);
    let packet = match kind {
        PacketType::Connect => Packet::Connect(decode_connect(&mut reader)?),
        PacketType::Subscribe => {
            let packet_id = reader.packet_id()?;
            let filters = FilterList::parse(reader.remaining(), true)?;
            reader = Reader::new(&[]);
            Packet::Subscribe { packet_id, filters }
        }
        PacketType::Unsubscribe => {
            let packet_id = reader.packet_id()?;
            let filters = FilterList::parse(reader.remaining(), false)?;
            reader = Reader::new(&[]);
            Packet::Unsubscribe { packet_id, filters }
        }
        _ => return decode_from_broker(kind, flags, body),
    };
    reader.finish()?;
    Ok(packet)
}

/// Decodes the body of a packet that a broker may send: what the client
/// needs, without the code for CONNECT, SUBSCRIBE and UNSUBSCRIBE (which
/// only a broker reads). Those three give [`DecodeError::UnknownPacketType`].
pub fn decode_from_broker(kind: PacketType, flags: u8, body: &[u8]) -> Result<Packet<'_>, DecodeError> {
    let mut reader = Reader::new(body);
    let packet = match kind {
        PacketType::Connect | PacketType::Subscribe | PacketType::Unsubscribe => {
            return Err(DecodeError::UnknownPacketType);
        }
        PacketType::ConnAck => {
            let ack_flags = reader.u8()?;
            if ack_flags & 0xfe != 0 {
                return Err(DecodeError::InvalidFlags);
            }
            let code = reader.u8()?;
            if code > 5 {
                return Err(DecodeError::InvalidReturnCode);
            }
            Packet::ConnAck {
                session_present: ack_flags & 1 == 1,
                code,
            }
        }
        PacketType::Publish => {
            let qos = QoS::from_bits((flags >> 1) & 0b11).ok_or(DecodeError::InvalidQoS)?;
            let dup = flags & 0b1000 != 0;
            if qos == QoS::AtMostOnce && dup {
                return Err(DecodeError::InvalidFlags);
            }
            let topic = reader.string()?;
            crate::topic::check_name(topic.as_bytes()).map_err(|_| DecodeError::InvalidTopic)?;
            let packet_id = match qos {
                QoS::AtMostOnce => None,
                _ => Some(reader.packet_id()?),
            };
            let payload = reader.remaining();
            reader = Reader::new(&[]);
            Packet::Publish(Publish {
                topic,
                packet_id,
                qos,
                retain: flags & 1 != 0,
                dup,
                payload,
            })
        }
        PacketType::PubAck => Packet::PubAck(reader.packet_id()?),
        PacketType::PubRec => Packet::PubRec(reader.packet_id()?),
        PacketType::PubRel => Packet::PubRel(reader.packet_id()?),
        PacketType::PubComp => Packet::PubComp(reader.packet_id()?),
        PacketType::SubAck => {
            let packet_id = reader.packet_id()?;
            let codes = reader.remaining();
            if codes.is_empty() {
                return Err(DecodeError::BadLength);
            }
            if codes.iter().any(|&code| code > 2 && code != SUBACK_FAILURE) {
                return Err(DecodeError::InvalidReturnCode);
            }
            reader = Reader::new(&[]);
            Packet::SubAck { packet_id, codes }
        }
        PacketType::UnsubAck => Packet::UnsubAck(reader.packet_id()?),
        PacketType::PingReq => Packet::PingReq,
        PacketType::PingResp => Packet::PingResp,
        PacketType::Disconnect => Packet::Disconnect,
    };
    reader.finish()?;
    Ok(packet)
}

fn decode_connect<'a>(reader: &mut Reader<'a>) -> Result<Connect<'a>, DecodeError> {
    if reader.string()? != "MQTT" || reader.u8()? != 4 {
        return Err(DecodeError::UnsupportedProtocol);
    }
    let flags = reader.u8()?;
    if flags & 1 != 0 {
        return Err(DecodeError::InvalidFlags);
    }
    let has_username = flags & 0x80 != 0;
    let has_password = flags & 0x40 != 0;
    let will_retain = flags & 0x20 != 0;
    let will_qos = QoS::from_bits((flags >> 3) & 0b11).ok_or(DecodeError::InvalidQoS)?;
    let has_will = flags & 0x04 != 0;
    if !has_will && (will_retain || will_qos != QoS::AtMostOnce) {
        return Err(DecodeError::InvalidFlags);
    }
    if has_password && !has_username {
        return Err(DecodeError::InvalidFlags);
    }
    let keepalive_s = reader.u16()?;
    let client_id = reader.string()?;
    let will = if has_will {
        let topic = reader.string()?;
        crate::topic::check_name(topic.as_bytes()).map_err(|_| DecodeError::InvalidTopic)?;
        let payload = reader.binary()?;
        Some(Will {
            topic,
            payload,
            qos: will_qos,
            retain: will_retain,
        })
    } else {
        None
    };
    let username = if has_username { Some(reader.string()?) } else { None };
    let password = if has_password { Some(reader.binary()?) } else { None };
    Ok(Connect {
        client_id,
        clean_session: flags & 0x02 != 0,
        keepalive_s,
        will,
        username,
        password,
    })
}

/// Size of the stack buffer a [`PacketWriter`] gathers small fields in.
pub const GATHER_LEN: usize = 128;

/// Writes one packet to a transport, gathering small fields into one
/// stack buffer and passing large slices through without copying them.
pub struct PacketWriter<'w, W: Write> {
    io: &'w mut W,
    buffer: [u8; GATHER_LEN],
    used: usize,
}

impl<'w, W: Write> PacketWriter<'w, W> {
    /// Starts a packet: writes its first byte and remaining length.
    pub fn start(io: &'w mut W, first_byte: u8, remaining_length: usize) -> Result<Self, EncodeError<W::Error>> {
        let length = u32::try_from(remaining_length).map_err(|_| EncodeError::PacketTooLong)?;
        let (varint, varint_len) = encode_remaining_length(length).ok_or(EncodeError::PacketTooLong)?;
        let mut writer = PacketWriter {
            io,
            buffer: [0; GATHER_LEN],
            used: 0,
        };
        writer.put_u8(first_byte)?;
        writer.put_bytes(varint.get(..varint_len).unwrap_or(&[]))?;
        Ok(writer)
    }

    pub fn put_u8(&mut self, value: u8) -> Result<(), EncodeError<W::Error>> {
        self.put_bytes(&[value])
    }

    pub fn put_u16(&mut self, value: u16) -> Result<(), EncodeError<W::Error>> {
        self.put_bytes(&value.to_be_bytes())
    }

    /// A length-prefixed string or binary field.
    pub fn put_field(&mut self, bytes: &[u8]) -> Result<(), EncodeError<W::Error>> {
        let len = u16::try_from(bytes.len()).map_err(|_| EncodeError::FieldTooLong)?;
        self.put_u16(len)?;
        self.put_bytes(bytes)
    }

    /// Appends bytes: copied when they fit in the gather buffer, otherwise
    /// written straight from the caller's slice after what is gathered.
    pub fn put_bytes(&mut self, bytes: &[u8]) -> Result<(), EncodeError<W::Error>> {
        let end = self.used.checked_add(bytes.len());
        if let Some(slot) = end.and_then(|end| self.buffer.get_mut(self.used..end)) {
            copy(slot, bytes);
            self.used = end.unwrap_or(self.used);
            return Ok(());
        }
        self.flush_gathered()?;
        if let Some(slot) = self.buffer.get_mut(..bytes.len()) {
            copy(slot, bytes);
            self.used = bytes.len();
            return Ok(());
        }
        write_all(&mut self.io, bytes)
    }

    fn flush_gathered(&mut self) -> Result<(), EncodeError<W::Error>> {
        if self.used > 0 {
            let gathered = self.buffer.get(..self.used).unwrap_or(&[]);
            write_all(&mut self.io, gathered)?;
            self.used = 0;
        }
        Ok(())
    }

    /// Writes out whatever is still gathered; the packet is complete.
    pub fn finish(mut self) -> Result<(), EncodeError<W::Error>> {
        self.flush_gathered()?;
        self.io.flush().map_err(EncodeError::Io)
    }
}

/// Sum of field lengths, failing on overflow.
fn total(parts: &[usize]) -> Option<usize> {
    parts.iter().try_fold(0usize, |sum, &part| sum.checked_add(part))
}

/// Length of a length-prefixed field, failing when it cannot be encoded.
fn field_len<E>(bytes: &[u8]) -> Result<usize, EncodeError<E>> {
    if bytes.len() > MAX_STRING_LEN {
        return Err(EncodeError::FieldTooLong);
    }
    bytes.len().checked_add(2).ok_or(EncodeError::FieldTooLong)
}

/// Writes a CONNECT packet.
pub fn write_connect<W: Write>(io: &mut W, connect: &Connect<'_>) -> Result<(), EncodeError<W::Error>> {
    v5::write_connect(io, connect, None)
}

/// CONNECT's flags byte.
fn connect_flags(connect: &Connect<'_>) -> u8 {
    let mut flags = 0u8;
    if connect.clean_session {
        flags |= 0x02;
    }
    if let Some(will) = &connect.will {
        flags |= 0x04 | ((will.qos as u8) << 3);
        if will.retain {
            flags |= 0x20;
        }
    }
    if connect.username.is_some() {
        flags |= 0x80;
    }
    if connect.password.is_some() {
        flags |= 0x40;
    }
    flags
}

/// The length of the will's topic and payload (0 without a will).
fn will_fields_len<E>(connect: &Connect<'_>) -> Result<usize, EncodeError<E>> {
    match &connect.will {
        Some(will) => {
            total(&[field_len(will.topic.as_bytes())?, field_len(will.payload)?]).ok_or(EncodeError::PacketTooLong)
        }
        None => Ok(0),
    }
}

/// The length of CONNECT's user name and password.
fn credentials_len<E>(connect: &Connect<'_>) -> Result<usize, EncodeError<E>> {
    let mut len = 0;
    if let Some(username) = connect.username {
        len = field_len(username.as_bytes())?;
    }
    if let Some(password) = connect.password {
        len = total(&[len, field_len(password)?]).ok_or(EncodeError::PacketTooLong)?;
    }
    Ok(len)
}

fn put_credentials<W: Write>(
    writer: &mut PacketWriter<'_, W>,
    connect: &Connect<'_>,
) -> Result<(), EncodeError<W::Error>> {
    if let Some(username) = connect.username {
        writer.put_field(username.as_bytes())?;
    }
    if let Some(password) = connect.password {
        writer.put_field(password)?;
    }
    Ok(())
}

/// Writes a PUBLISH packet; the payload goes out without being copied
/// unless the whole packet fits the gather buffer.
pub fn write_publish<W: Write>(io: &mut W, publish: &Publish<'_>) -> Result<(), EncodeError<W::Error>> {
    v5::write_publish(io, publish, None)
}

/// PUBLISH's first byte: its type, DUP, QoS and RETAIN.
fn publish_first_byte(publish: &Publish<'_>) -> u8 {
    let mut first = ((PacketType::Publish as u8) << 4) | ((publish.qos as u8) << 1);
    if publish.dup {
        first |= 0x08;
    }
    if publish.retain {
        first |= 0x01;
    }
    first
}

/// Writes PUBACK, PUBREC, PUBREL, PUBCOMP or UNSUBACK: a packet identifier only.
pub fn write_ack<W: Write>(io: &mut W, kind: PacketType, packet_id: u16) -> Result<(), EncodeError<W::Error>> {
    let first = ((kind as u8) << 4) | kind.required_flags().unwrap_or(0);
    let mut writer = PacketWriter::start(io, first, 2)?;
    writer.put_u16(packet_id)?;
    writer.finish()
}

/// Writes PINGREQ, PINGRESP or DISCONNECT: a fixed header only.
pub fn write_empty<W: Write>(io: &mut W, kind: PacketType) -> Result<(), EncodeError<W::Error>> {
    PacketWriter::start(io, (kind as u8) << 4, 0)?.finish()
}

/// Writes a CONNACK.
pub fn write_connack<W: Write>(io: &mut W, session_present: bool, code: u8) -> Result<(), EncodeError<W::Error>> {
    let mut writer = PacketWriter::start(io, (PacketType::ConnAck as u8) << 4, 2)?;
    writer.put_u8(u8::from(session_present))?;
    writer.put_u8(code)?;
    writer.finish()
}

/// Writes a SUBSCRIBE for the given `(filter, qos)` pairs.
pub fn write_subscribe<W: Write>(
    io: &mut W,
    packet_id: u16,
    filters: &[(&str, QoS)],
) -> Result<(), EncodeError<W::Error>> {
    let mut remaining = 2usize;
    for (filter, _) in filters {
        remaining = total(&[remaining, field_len(filter.as_bytes())?, 1]).ok_or(EncodeError::PacketTooLong)?;
    }
    let mut writer = PacketWriter::start(io, ((PacketType::Subscribe as u8) << 4) | 0b0010, remaining)?;
    writer.put_u16(packet_id)?;
    for (filter, qos) in filters {
        writer.put_field(filter.as_bytes())?;
        writer.put_u8(*qos as u8)?;
    }
    writer.finish()
}

/// Writes a SUBACK with the given return codes.
pub fn write_suback<W: Write>(io: &mut W, packet_id: u16, codes: &[u8]) -> Result<(), EncodeError<W::Error>> {
    let remaining = codes.len().checked_add(2).ok_or(EncodeError::PacketTooLong)?;
    let mut writer = PacketWriter::start(io, (PacketType::SubAck as u8) << 4, remaining)?;
    writer.put_u16(packet_id)?;
    writer.put_bytes(codes)?;
    writer.finish()
}

/// Writes an UNSUBSCRIBE for the given filters.
pub fn write_unsubscribe<W: Write>(io: &mut W, packet_id: u16, filters: &[&str]) -> Result<(), EncodeError<W::Error>> {
    let mut remaining = 2usize;
    for filter in filters {
        remaining = total(&[remaining, field_len(filter.as_bytes())?]).ok_or(EncodeError::PacketTooLong)?;
    }
    let mut writer = PacketWriter::start(io, ((PacketType::Unsubscribe as u8) << 4) | 0b0010, remaining)?;
    writer.put_u16(packet_id)?;
    for filter in filters {
        writer.put_field(filter.as_bytes())?;
    }
    writer.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::vec::Vec;

    /// An in-memory transport that records each write separately.
    #[derive(Default)]
    struct Recorder {
        writes: Vec<Vec<u8>>,
        sources: Vec<*const u8>,
    }

    impl embedded_io::ErrorType for Recorder {
        type Error = core::convert::Infallible;
    }

    impl Write for Recorder {
        fn write(&mut self, buf: &[u8]) -> Result<usize, Self::Error> {
            self.writes.push(buf.to_vec());
            self.sources.push(buf.as_ptr());
            Ok(buf.len())
        }
        fn flush(&mut self) -> Result<(), Self::Error> {
            Ok(())
        }
    }

    impl Recorder {
        fn bytes(&self) -> Vec<u8> {
            self.writes.concat()
        }
    }

    fn encoded(write: impl FnOnce(&mut Recorder)) -> Vec<u8> {
        let mut recorder = Recorder::default();
        write(&mut recorder);
        recorder.bytes()
    }

    #[test]
    fn remaining_length_boundaries_from_the_specification() {
        // MQTT 3.1.1, table 2.4: the limits of 1, 2, 3 and 4 byte encodings.
        let cases: &[(u32, &[u8])] = &[
            (0, &[0x00]),
            (127, &[0x7f]),
            (128, &[0x80, 0x01]),
            (16_383, &[0xff, 0x7f]),
            (16_384, &[0x80, 0x80, 0x01]),
            (2_097_151, &[0xff, 0xff, 0x7f]),
            (2_097_152, &[0x80, 0x80, 0x80, 0x01]),
            (268_435_455, &[0xff, 0xff, 0xff, 0x7f]),
        ];
        for &(value, bytes) in cases {
            let (out, len) = encode_remaining_length(value).unwrap();
            assert_eq!(&out[..len], bytes, "encoding {value}");
            assert_eq!(decode_remaining_length(bytes), Ok(Some((value, bytes.len()))));
        }
        assert_eq!(encode_remaining_length(268_435_456), None);
    }

    #[test]
    fn remaining_length_malformed_and_incomplete() {
        assert_eq!(
            decode_remaining_length(&[0x80, 0x80, 0x80, 0x80, 0x01]),
            Err(DecodeError::MalformedLength)
        );
        assert_eq!(
            decode_remaining_length(&[0xff, 0xff, 0xff, 0xff]),
            Err(DecodeError::MalformedLength)
        );
        assert_eq!(decode_remaining_length(&[0x80, 0x80]), Ok(None));
        assert_eq!(decode_remaining_length(&[]), Ok(None));
    }

    #[test]
    fn connect_example_from_the_specification() {
        // Section 3.1.2.10: client id empty is allowed; here a full example
        // with will, username and password, keepalive 10 s.
        let connect = Connect {
            client_id: "dev1",
            clean_session: true,
            keepalive_s: 10,
            will: Some(Will {
                topic: "w/t",
                payload: b"bye",
                qos: QoS::AtLeastOnce,
                retain: true,
            }),
            username: Some("user"),
            password: Some(b"pw"),
        };
        let bytes = encoded(|io| write_connect(io, &connect).unwrap());
        let expected: Vec<u8> = [
            &[0x10, 36][..],
            &[0, 4, b'M', b'Q', b'T', b'T', 4],
            &[0b1110_1110, 0, 10],
            &[0, 4, b'd', b'e', b'v', b'1'],
            &[0, 3, b'w', b'/', b't', 0, 3, b'b', b'y', b'e'],
            &[0, 4, b'u', b's', b'e', b'r', 0, 2, b'p', b'w'],
        ]
        .concat();
        assert_eq!(bytes, expected);
        assert_eq!(decode(&bytes), Ok(Some((Packet::Connect(connect), bytes.len()))));
    }

    #[test]
    fn connect_rejects_bad_protocol_and_flags() {
        let good = encoded(|io| {
            write_connect(
                io,
                &Connect {
                    client_id: "c",
                    clean_session: true,
                    keepalive_s: 0,
                    will: None,
                    username: None,
                    password: None,
                },
            )
            .unwrap()
        });
        let mut bad_level = good.clone();
        bad_level[8] = 3;
        assert_eq!(decode(&bad_level), Err(DecodeError::UnsupportedProtocol));
        let mut reserved = good.clone();
        reserved[9] |= 1;
        assert_eq!(decode(&reserved), Err(DecodeError::InvalidFlags));
        let mut password_only = good.clone();
        password_only[9] |= 0x40;
        assert!(decode(&password_only).is_err());
    }

    #[test]
    fn connack_codes() {
        for code in 0..=5u8 {
            let bytes = encoded(|io| write_connack(io, code == 0, code).unwrap());
            assert_eq!(bytes, [0x20, 2, u8::from(code == 0), code]);
            assert_eq!(
                decode(&bytes),
                Ok(Some((
                    Packet::ConnAck {
                        session_present: code == 0,
                        code
                    },
                    4
                )))
            );
        }
        assert_eq!(decode(&[0x20, 2, 0, 6]), Err(DecodeError::InvalidReturnCode));
        assert_eq!(decode(&[0x20, 2, 2, 0]), Err(DecodeError::InvalidFlags));
        assert_eq!(decode(&[0x20, 3, 0, 0, 0]), Err(DecodeError::BadLength));
        assert_eq!(decode(&[0x21, 2, 0, 0]), Err(DecodeError::InvalidFlags));
    }

    #[test]
    fn publish_example_from_the_specification() {
        // Section 3.3.2.3: topic "a/b", packet identifier 10.
        let publish = Publish {
            topic: "a/b",
            packet_id: Some(10),
            qos: QoS::AtLeastOnce,
            retain: false,
            dup: false,
            payload: b"hi",
        };
        let bytes = encoded(|io| write_publish(io, &publish).unwrap());
        assert_eq!(bytes, [0x32, 9, 0, 3, b'a', b'/', b'b', 0, 10, b'h', b'i']);
        assert_eq!(decode(&bytes), Ok(Some((Packet::Publish(publish), bytes.len()))));
    }

    #[test]
    fn small_publish_is_one_write_and_large_payload_is_not_copied() {
        let mut small = Recorder::default();
        let publish = Publish {
            topic: "t",
            packet_id: None,
            qos: QoS::AtMostOnce,
            retain: true,
            dup: false,
            payload: &[7; 64],
        };
        write_publish(&mut small, &publish).unwrap();
        assert_eq!(small.writes.len(), 1);

        let payload = vec![9u8; 10_000];
        let mut large = Recorder::default();
        let publish = Publish {
            payload: &payload,
            ..publish
        };
        write_publish(&mut large, &publish).unwrap();
        assert_eq!(large.writes.len(), 2);
        assert_eq!(large.sources[1], payload.as_ptr(), "payload passed through, not copied");
    }

    #[test]
    fn publish_rejects_bad_fields() {
        // QoS 3.
        assert_eq!(decode(&[0x36, 5, 0, 1, b't', 0, 1]), Err(DecodeError::InvalidQoS));
        // Topic length past the end of the packet.
        assert_eq!(decode(&[0x30, 3, 0, 9, b't']), Err(DecodeError::BadLength));
        // Packet identifier zero.
        assert_eq!(decode(&[0x32, 5, 0, 1, b't', 0, 0]), Err(DecodeError::ZeroPacketId));
        // Invalid UTF-8 and NUL in the topic.
        assert_eq!(decode(&[0x30, 3, 0, 1, 0xff]), Err(DecodeError::InvalidUtf8));
        assert_eq!(decode(&[0x30, 3, 0, 1, 0]), Err(DecodeError::InvalidUtf8));
        // Wildcards are not allowed in a topic name.
        assert_eq!(decode(&[0x30, 3, 0, 1, b'#']), Err(DecodeError::InvalidTopic));
        assert_eq!(decode(&[0x30, 3, 0, 1, b'+']), Err(DecodeError::InvalidTopic));
        // DUP with QoS 0.
        assert_eq!(decode(&[0x38, 3, 0, 1, b't']), Err(DecodeError::InvalidFlags));
    }

    #[test]
    fn acks_and_empty_packets() {
        for (kind, first) in [
            (PacketType::PubAck, 0x40),
            (PacketType::PubRec, 0x50),
            (PacketType::PubRel, 0x62),
            (PacketType::PubComp, 0x70),
            (PacketType::UnsubAck, 0xb0),
        ] {
            let bytes = encoded(|io| write_ack(io, kind, 0x1234).unwrap());
            assert_eq!(bytes, [first, 2, 0x12, 0x34]);
            let packet = decode(&bytes).unwrap().unwrap().0;
            let id = match packet {
                Packet::PubAck(id)
                | Packet::PubRec(id)
                | Packet::PubRel(id)
                | Packet::PubComp(id)
                | Packet::UnsubAck(id) => id,
                other => panic!("unexpected {other:?}"),
            };
            assert_eq!(id, 0x1234);
            assert_eq!(decode(&[first, 2, 0, 0]), Err(DecodeError::ZeroPacketId));
            assert_eq!(decode(&[first, 3, 0, 1, 0]), Err(DecodeError::BadLength));
        }
        assert_eq!(
            decode(&[0x60, 2, 0, 1]),
            Err(DecodeError::InvalidFlags),
            "PUBREL needs flags 0010"
        );
        for (kind, packet, first) in [
            (PacketType::PingReq, Packet::PingReq, 0xc0),
            (PacketType::PingResp, Packet::PingResp, 0xd0),
            (PacketType::Disconnect, Packet::Disconnect, 0xe0),
        ] {
            let bytes = encoded(|io| write_empty(io, kind).unwrap());
            assert_eq!(bytes, [first, 0]);
            assert_eq!(decode(&bytes), Ok(Some((packet, 2))));
            assert_eq!(decode(&[first, 1, 0]), Err(DecodeError::BadLength));
        }
    }

    #[test]
    fn subscribe_and_suback() {
        let bytes =
            encoded(|io| write_subscribe(io, 10, &[("a/b", QoS::AtLeastOnce), ("c/#", QoS::ExactlyOnce)]).unwrap());
        assert_eq!(
            bytes,
            [0x82, 14, 0, 10, 0, 3, b'a', b'/', b'b', 1, 0, 3, b'c', b'/', b'#', 2]
        );
        let Some((Packet::Subscribe { packet_id, filters }, _)) = decode(&bytes).unwrap() else {
            panic!()
        };
        assert_eq!(packet_id, 10);
        let list: Vec<_> = filters.iter().collect();
        assert_eq!(list, [("a/b", QoS::AtLeastOnce), ("c/#", QoS::ExactlyOnce)]);
        assert_eq!(decode(&[0x82, 2, 0, 10]), Err(DecodeError::EmptyPayload));
        assert_eq!(decode(&[0x82, 6, 0, 10, 0, 1, b'a', 3]), Err(DecodeError::InvalidQoS));
        assert_eq!(decode(&[0x82, 6, 0, 10, 0, 1, b'#', 0]).map(|p| p.is_some()), Ok(true));
        assert_eq!(
            decode(&[0x82, 7, 0, 10, 0, 2, b'a', b'#', 0]),
            Err(DecodeError::InvalidTopic)
        );

        // Section 3.9.3: return codes 0, 1, 2 and 0x80.
        let bytes = encoded(|io| write_suback(io, 10, &[0, 1, 2, 0x80]).unwrap());
        assert_eq!(bytes, [0x90, 6, 0, 10, 0, 1, 2, 0x80]);
        assert_eq!(
            decode(&bytes),
            Ok(Some((
                Packet::SubAck {
                    packet_id: 10,
                    codes: &[0, 1, 2, 0x80]
                },
                8
            )))
        );
        assert_eq!(decode(&[0x90, 3, 0, 10, 3]), Err(DecodeError::InvalidReturnCode));
        assert_eq!(decode(&[0x90, 2, 0, 10]), Err(DecodeError::BadLength));
    }

    #[test]
    fn unsubscribe() {
        let bytes = encoded(|io| write_unsubscribe(io, 7, &["a/+", "b"]).unwrap());
        assert_eq!(bytes, [0xa2, 10, 0, 7, 0, 3, b'a', b'/', b'+', 0, 1, b'b']);
        let Some((Packet::Unsubscribe { packet_id, filters }, _)) = decode(&bytes).unwrap() else {
            panic!()
        };
        assert_eq!(packet_id, 7);
        assert_eq!(filters.iter().map(|(f, _)| f).collect::<Vec<_>>(), ["a/+", "b"]);
    }

    #[test]
    fn header_rules() {
        assert_eq!(decode(&[0x00, 0]), Err(DecodeError::UnknownPacketType));
        assert_eq!(decode(&[0xf0, 0]), Err(DecodeError::UnknownPacketType));
        assert_eq!(decode(&[0xc1, 0]), Err(DecodeError::InvalidFlags));
        assert_eq!(decode(&[0x30]), Ok(None));
        assert_eq!(decode(&[0x30, 5, 0, 1]), Ok(None));
    }

    #[test]
    fn overlong_fields_are_refused() {
        let long = "x".repeat(65_536);
        let mut io = Recorder::default();
        let publish = Publish {
            topic: &long,
            packet_id: None,
            qos: QoS::AtMostOnce,
            retain: false,
            dup: false,
            payload: b"",
        };
        assert_eq!(write_publish(&mut io, &publish), Err(EncodeError::FieldTooLong));
        assert!(
            io.writes.is_empty(),
            "nothing written for a packet that cannot be encoded"
        );
    }

    #[test]
    fn utf8_agrees_with_core_on_the_edges() {
        let cases: &[&[u8]] = &[
            b"",
            b"plain",
            "é€😀".as_bytes(),
            &[0xc2, 0x80],             // smallest two-byte form
            &[0xc1, 0xbf],             // overlong
            &[0xe0, 0x9f, 0xbf],       // overlong three-byte
            &[0xed, 0xa0, 0x80],       // surrogate
            &[0xed, 0x9f, 0xbf],       // just below the surrogates
            &[0xf4, 0x8f, 0xbf, 0xbf], // U+10FFFF
            &[0xf4, 0x90, 0x80, 0x80], // above U+10FFFF
            &[0xf0, 0x8f, 0xbf, 0xbf], // overlong four-byte
            &[0xf5, 0x80, 0x80, 0x80],
            &[0xe2, 0x82],       // truncated
            &[0x80],             // lone continuation
            &[0xe2, 0x28, 0xa1], // bad continuation
            &[0xff],
        ];
        for bytes in cases {
            assert_eq!(utf8(bytes), core::str::from_utf8(bytes).ok(), "{bytes:x?}");
        }
    }

    fn topic_strategy() -> impl Strategy<Value = String> {
        "[a-z0-9/ é]{1,40}"
    }

    proptest! {
        #[test]
        fn utf8_agrees_with_core(bytes in proptest::collection::vec(any::<u8>(), 0..12)) {
            prop_assert_eq!(utf8(&bytes), core::str::from_utf8(&bytes).ok());
        }

        #[test]
        fn utf8_accepts_every_text(text in any::<String>()) {
            prop_assert_eq!(utf8(text.as_bytes()), Some(text.as_str()));
        }

        #[test]
        fn remaining_length_round_trips(value in 0u32..=MAX_REMAINING_LENGTH) {
            let (out, len) = encode_remaining_length(value).unwrap();
            prop_assert_eq!(decode_remaining_length(&out[..len]), Ok(Some((value, len))));
        }

        #[test]
        fn publish_round_trips(topic in topic_strategy(), payload in proptest::collection::vec(any::<u8>(), 0..400),
                               qos in 0u8..3, retain: bool, dup: bool, id in 1u16..) {
            let qos = QoS::from_bits(qos).unwrap();
            let publish = Publish {
                topic: &topic,
                packet_id: (qos != QoS::AtMostOnce).then_some(id),
                qos,
                retain,
                dup: dup && qos != QoS::AtMostOnce,
                payload: &payload,
            };
            let bytes = encoded(|io| write_publish(io, &publish).unwrap());
            prop_assert_eq!(decode(&bytes), Ok(Some((Packet::Publish(publish), bytes.len()))));
        }

        #[test]
        fn connect_round_trips(client_id in "[a-zA-Z0-9]{0,23}", keepalive_s: u16, clean_session: bool,
                               will in proptest::option::of((topic_strategy(), proptest::collection::vec(any::<u8>(), 0..50), 0u8..3, any::<bool>())),
                               username in proptest::option::of("[a-z]{0,10}"), password in proptest::collection::vec(any::<u8>(), 0..10)) {
            let will = will.as_ref().map(|(topic, payload, qos, retain)| Will {
                topic, payload, qos: QoS::from_bits(*qos).unwrap(), retain: *retain,
            });
            let connect = Connect {
                client_id: &client_id,
                clean_session,
                keepalive_s,
                will,
                username: username.as_deref(),
                password: username.as_ref().map(|_| password.as_slice()),
            };
            let bytes = encoded(|io| write_connect(io, &connect).unwrap());
            prop_assert_eq!(decode(&bytes), Ok(Some((Packet::Connect(connect), bytes.len()))));
        }

        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            if let Ok(Some((_, used))) = decode(&bytes) {
                prop_assert!(used <= bytes.len());
            }
        }
    }
}
