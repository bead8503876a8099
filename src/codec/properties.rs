//! MQTT 5 properties: the block of `(identifier, value)` pairs that MQTT 5
//! puts in most packets, after a variable byte integer giving its length.
//!
//! A broker's properties are read as they arrive, one at a time, by
//! [`PropertyReader`]: a string or binary value can be up to 65,535 bytes
//! and a packet can hold any number of user properties, so the block is
//! never held whole. Every property is checked: its identifier must be one
//! that the packet may carry, it may appear only once (user properties and
//! subscription identifiers aside), its value must be in range, and a
//! string must be well-formed UTF-8. What the reader does not keep, it
//! reads past, checking it all the same.
//!
//! Writing goes through [`PacketWriter`] with [`put_varint`] and the
//! `put_*` functions here; [`varint_len`] and the `*_len` functions give
//! the sizes a packet's length needs first.

use embedded_io::{Read, ReadExactError, Write};

use super::{DecodeError, EncodeError, PacketWriter, Utf8Check};

/// Why a property block could not be read: the transport failed, or the
/// bytes break the rules.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadError<E> {
    Io(ReadExactError<E>),
    Malformed(DecodeError),
}

impl<E> From<DecodeError> for ReadError<E> {
    fn from(error: DecodeError) -> Self {
        ReadError::Malformed(error)
    }
}

impl<E> From<ReadExactError<E>> for ReadError<E> {
    fn from(error: ReadExactError<E>) -> Self {
        ReadError::Io(error)
    }
}

/// What the reading functions return for a transport `T`.
type Reads<T, V> = Result<V, ReadError<<T as embedded_io::ErrorType>::Error>>;

/// The property identifiers of MQTT 5.0 (section 2.2.2.2).
pub mod id {
    pub(crate) const PAYLOAD_FORMAT: u8 = 0x01;
    pub(crate) const MESSAGE_EXPIRY: u8 = 0x02;
    pub(crate) const CONTENT_TYPE: u8 = 0x03;
    pub(crate) const RESPONSE_TOPIC: u8 = 0x08;
    pub(crate) const CORRELATION_DATA: u8 = 0x09;
    pub(crate) const SUBSCRIPTION_ID: u8 = 0x0b;
    pub(crate) const SESSION_EXPIRY: u8 = 0x11;
    pub(crate) const ASSIGNED_CLIENT_ID: u8 = 0x12;
    pub(crate) const SERVER_KEEPALIVE: u8 = 0x13;
    pub(crate) const AUTH_METHOD: u8 = 0x15;
    pub(crate) const AUTH_DATA: u8 = 0x16;
    pub(crate) const REQUEST_PROBLEM_INFO: u8 = 0x17;
    pub(crate) const WILL_DELAY: u8 = 0x18;
    pub(crate) const REQUEST_RESPONSE_INFO: u8 = 0x19;
    pub(crate) const RESPONSE_INFO: u8 = 0x1a;
    pub(crate) const SERVER_REFERENCE: u8 = 0x1c;
    pub(crate) const REASON_STRING: u8 = 0x1f;
    pub(crate) const RECEIVE_MAXIMUM: u8 = 0x21;
    pub(crate) const TOPIC_ALIAS_MAXIMUM: u8 = 0x22;
    pub(crate) const TOPIC_ALIAS: u8 = 0x23;
    pub(crate) const MAXIMUM_QOS: u8 = 0x24;
    pub(crate) const RETAIN_AVAILABLE: u8 = 0x25;
    pub(crate) const USER_PROPERTY: u8 = 0x26;
    pub(crate) const MAXIMUM_PACKET_SIZE: u8 = 0x27;
    pub(crate) const WILDCARD_AVAILABLE: u8 = 0x28;
    pub(crate) const SUBSCRIPTION_ID_AVAILABLE: u8 = 0x29;
    pub(crate) const SHARED_AVAILABLE: u8 = 0x2a;
}

/// Largest value of a variable byte integer (four bytes of seven bits).
pub(crate) const VARINT_MAX: u32 = 268_435_455;

/// A set of property identifiers, one bit each (all are below 64).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IdSet(u64);

impl IdSet {
    const fn of(mut ids: &[u8]) -> IdSet {
        let mut bits = 0u64;
        while let [first, rest @ ..] = ids {
            // Every identifier is below 64 (the list above).
            bits |= 1u64 << (*first & 63);
            ids = rest;
        }
        IdSet(bits)
    }

    fn contains(self, property: u8) -> bool {
        property < 64 && self.0 & (1u64 << property) != 0
    }

    fn with(self, property: u8) -> IdSet {
        if property < 64 {
            IdSet(self.0 | (1u64 << property))
        } else {
            self
        }
    }
}

/// What a broker may put in each packet it sends (MQTT 5.0, section 3).
pub mod allowed {
    use super::IdSet;
    use super::id::*;

    pub const CONNACK: IdSet = IdSet::of(&[
        SESSION_EXPIRY,
        RECEIVE_MAXIMUM,
        MAXIMUM_QOS,
        RETAIN_AVAILABLE,
        MAXIMUM_PACKET_SIZE,
        ASSIGNED_CLIENT_ID,
        TOPIC_ALIAS_MAXIMUM,
        REASON_STRING,
        USER_PROPERTY,
        WILDCARD_AVAILABLE,
        SUBSCRIPTION_ID_AVAILABLE,
        SHARED_AVAILABLE,
        SERVER_KEEPALIVE,
        RESPONSE_INFO,
        SERVER_REFERENCE,
        AUTH_METHOD,
        AUTH_DATA,
    ]);
    pub const PUBLISH: IdSet = IdSet::of(&[
        PAYLOAD_FORMAT,
        MESSAGE_EXPIRY,
        TOPIC_ALIAS,
        RESPONSE_TOPIC,
        CORRELATION_DATA,
        USER_PROPERTY,
        SUBSCRIPTION_ID,
        CONTENT_TYPE,
    ]);
    /// PUBACK, PUBREC, PUBREL, PUBCOMP, SUBACK and UNSUBACK.
    pub const ACK: IdSet = IdSet::of(&[REASON_STRING, USER_PROPERTY]);
    /// A broker's DISCONNECT (Session Expiry Interval is the client's alone).
    pub const DISCONNECT: IdSet = IdSet::of(&[REASON_STRING, USER_PROPERTY, SERVER_REFERENCE]);
}

/// The properties that may appear more than once in one packet.
const REPEATABLE: IdSet = IdSet::of(&[id::USER_PROPERTY, id::SUBSCRIPTION_ID]);

/// One property as [`PropertyReader::next`] found it. A string or binary
/// value is announced with its length and must then be consumed with
/// [`PropertyReader::take`] before the next property; a user property is
/// two strings, its name and then its value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Property {
    /// A one-, two- or four-byte integer, or a variable byte integer.
    Number { id: u8, value: u32 },
    /// A UTF-8 string (`text`) or binary data of `len` bytes, to be taken.
    Bytes { id: u8, len: u16, text: bool },
    /// The name of a user property, `len` bytes of UTF-8, to be taken; its
    /// value comes next as `Bytes` with the id [`id::USER_PROPERTY`].
    UserName { len: u16 },
}

/// The value of a property: how long, and what it may hold.
#[derive(Clone, Copy)]
enum Kind {
    /// One byte, at most the given value.
    Byte {
        max: u8,
    },
    /// A two-byte integer; `nonzero` when 0 is a protocol error.
    Two {
        nonzero: bool,
    },
    /// A four-byte integer; `nonzero` when 0 is a protocol error.
    Four {
        nonzero: bool,
    },
    VarInt,
    Text,
    Binary,
    Pair,
}

fn kind_of(property: u8) -> Option<Kind> {
    use id::*;
    Some(match property {
        PAYLOAD_FORMAT
        | REQUEST_PROBLEM_INFO
        | REQUEST_RESPONSE_INFO
        | MAXIMUM_QOS
        | RETAIN_AVAILABLE
        | WILDCARD_AVAILABLE
        | SUBSCRIPTION_ID_AVAILABLE
        | SHARED_AVAILABLE => Kind::Byte { max: 1 },
        MESSAGE_EXPIRY | SESSION_EXPIRY | WILL_DELAY => Kind::Four { nonzero: false },
        MAXIMUM_PACKET_SIZE => Kind::Four { nonzero: true },
        SERVER_KEEPALIVE | TOPIC_ALIAS_MAXIMUM => Kind::Two { nonzero: false },
        RECEIVE_MAXIMUM | TOPIC_ALIAS => Kind::Two { nonzero: true },
        SUBSCRIPTION_ID => Kind::VarInt,
        CONTENT_TYPE | RESPONSE_TOPIC | ASSIGNED_CLIENT_ID | AUTH_METHOD | RESPONSE_INFO | SERVER_REFERENCE
        | REASON_STRING => Kind::Text,
        CORRELATION_DATA | AUTH_DATA => Kind::Binary,
        USER_PROPERTY => Kind::Pair,
        _ => return None,
    })
}

/// Where a [`PropertyReader`] stands between two calls.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pending {
    /// The next call reads a property identifier.
    Nothing,
    /// A value of `len` bytes is announced and not taken yet.
    Value { len: u16, text: bool },
    /// A user property's name is announced; its value follows.
    UserName { len: u16 },
    /// A user property's name was taken; its value is read next.
    UserValue,
}

/// Reads a packet's property block from the transport, one property at a
/// time, checking each (see the module's documentation).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PropertyReader {
    /// Bytes of the block not read yet.
    left: u32,
    allowed: IdSet,
    seen: IdSet,
    pending: Pending,
}

impl PropertyReader {
    /// Reads the block's length (a variable byte integer) from `io`. The
    /// block, its length included, must fit in the `room` bytes left in
    /// the packet; returns the reader and how many of them it takes.
    pub fn start<T: Read>(io: &mut T, room: u32, allowed: IdSet) -> Reads<T, (PropertyReader, u32)> {
        let mut budget = room;
        let left = read_varint(io, &mut budget)?;
        if left > budget {
            return Err(DecodeError::BadLength.into());
        }
        let reader = PropertyReader {
            left,
            allowed,
            seen: IdSet(0),
            pending: Pending::Nothing,
        };
        Ok((reader, room.saturating_sub(budget).saturating_add(left)))
    }

    /// Bytes of the block not read yet: at the start, its length.
    pub fn left(&self) -> u32 {
        self.left
    }

    /// Reads the next property; `None` once the block is over.
    pub fn next<T: Read>(&mut self, io: &mut T) -> Reads<T, Option<Property>> {
        match self.pending {
            Pending::Nothing => {}
            Pending::UserValue => {
                let len = u16::from_be_bytes(self.read_array(io)?);
                self.pending = Pending::Value { len, text: true };
                return Ok(Some(Property::Bytes {
                    id: id::USER_PROPERTY,
                    len,
                    text: true,
                }));
            }
            // The caller did not take the value announced last.
            Pending::Value { .. } | Pending::UserName { .. } => return Err(DecodeError::BadLength.into()),
        }
        if self.left == 0 {
            return Ok(None);
        }
        // The identifier is a variable byte integer, but every known one
        // is below 128: one byte, and a longer form is unknown anyway.
        let [property] = self.read_array(io)?;
        let kind = kind_of(property).ok_or(DecodeError::InvalidProperty)?;
        if !self.allowed.contains(property) || (self.seen.contains(property) && !REPEATABLE.contains(property)) {
            return Err(DecodeError::InvalidProperty.into());
        }
        self.seen = self.seen.with(property);
        let value = match kind {
            Kind::Byte { max } => {
                let [value] = self.read_array(io)?;
                (value <= max).then_some(u32::from(value))
            }
            Kind::Two { nonzero } => {
                let value = u32::from(u16::from_be_bytes(self.read_array(io)?));
                (!nonzero || value != 0).then_some(value)
            }
            Kind::Four { nonzero } => {
                let value = u32::from_be_bytes(self.read_array(io)?);
                (!nonzero || value != 0).then_some(value)
            }
            Kind::VarInt => {
                let value = read_varint(io, &mut self.left)?;
                (value != 0).then_some(value)
            }
            Kind::Text | Kind::Binary => {
                let len = u16::from_be_bytes(self.read_array(io)?);
                let text = matches!(kind, Kind::Text);
                self.pending = Pending::Value { len, text };
                return Ok(Some(Property::Bytes {
                    id: property,
                    len,
                    text,
                }));
            }
            Kind::Pair => {
                let len = u16::from_be_bytes(self.read_array(io)?);
                self.pending = Pending::UserName { len };
                return Ok(Some(Property::UserName { len }));
            }
        };
        let value = value.ok_or(DecodeError::InvalidProperty)?;
        Ok(Some(Property::Number { id: property, value }))
    }

    /// Takes the string or binary value just announced: its first bytes
    /// into `keep` (as many as fit; for a string, cut back to whole
    /// characters), the rest read past. A string is checked whole. Returns
    /// how many bytes `keep` got.
    pub fn take<T: Read>(&mut self, io: &mut T, keep: &mut [u8]) -> Reads<T, usize> {
        let (len, text, next) = match self.pending {
            Pending::Value { len, text } => (len, text, Pending::Nothing),
            Pending::UserName { len } => (len, true, Pending::UserValue),
            Pending::Nothing | Pending::UserValue => return Err(DecodeError::BadLength.into()),
        };
        let mut check = Utf8Check::default();
        let mut kept = 0usize;
        let mut left = usize::from(len);
        let mut scratch = [0u8; 32];
        while left > 0 {
            let keeping = kept < keep.len();
            let room = if keeping {
                keep.get_mut(kept..).unwrap_or(&mut [])
            } else {
                &mut scratch[..]
            };
            let size = room.len().min(left);
            let piece = room.get_mut(..size).unwrap_or(&mut []);
            self.read_exact(io, piece)?;
            if text && !piece.iter().all(|&byte| byte != 0 && check.push(byte)) {
                return Err(DecodeError::InvalidUtf8.into());
            }
            if keeping {
                kept = kept.saturating_add(size);
            }
            left = left.saturating_sub(size);
        }
        if text && !check.is_complete() {
            return Err(DecodeError::InvalidUtf8.into());
        }
        if text && usize::from(len) > kept {
            kept = char_boundary(keep.get(..kept).unwrap_or(&[]));
        }
        self.pending = next;
        Ok(kept)
    }

    /// Reads the rest of the block past, checking it.
    pub fn skip_all<T: Read>(&mut self, io: &mut T) -> Reads<T, ()> {
        while let Some(property) = self.next(io)? {
            if !matches!(property, Property::Number { .. }) {
                self.take(io, &mut [])?;
            }
        }
        Ok(())
    }

    fn read_array<T: Read, const N: usize>(&mut self, io: &mut T) -> Reads<T, [u8; N]> {
        let mut bytes = [0u8; N];
        self.read_exact(io, &mut bytes)?;
        Ok(bytes)
    }

    /// Reads `buffer` full from the block: past its end, the packet is
    /// shorter than it says.
    fn read_exact<T: Read>(&mut self, io: &mut T, buffer: &mut [u8]) -> Reads<T, ()> {
        let len = u32::try_from(buffer.len()).map_err(|_| DecodeError::BadLength)?;
        self.left = self.left.checked_sub(len).ok_or(DecodeError::BadLength)?;
        super::read_exact(io, buffer)?;
        Ok(())
    }
}

/// A property of a PUBLISH property block kept whole, as the
/// application reads it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeptProperty<'a> {
    Number {
        id: u8,
        value: u32,
    },
    /// A string (checked UTF-8) or binary data.
    Bytes {
        id: u8,
        value: &'a [u8],
    },
    User {
        name: &'a str,
        value: &'a str,
    },
}

/// The property at `offset` of a PUBLISH property block that was checked
/// as it arrived (its length prefix left out), and the offset of the next
/// one; None at the block's end (or at an offset that is not a property's).
/// The block was checked, so this only walks it.
pub fn kept_property(block: &[u8], offset: usize) -> Option<(KeptProperty<'_>, usize)> {
    let mut rest = Cursor(block.get(offset..)?);
    let id = rest.number(1)?;
    let id = u8::try_from(id).ok()?;
    let kept = match kind_of(id)? {
        Kind::Byte { .. } => KeptProperty::Number {
            id,
            value: rest.number(1)?,
        },
        Kind::Two { .. } => KeptProperty::Number {
            id,
            value: rest.number(2)?,
        },
        Kind::Four { .. } => KeptProperty::Number {
            id,
            value: rest.number(4)?,
        },
        Kind::VarInt => {
            // At most four bytes, the last without its top bit.
            let mut value = 0u32;
            for shift in [0u32, 7, 14, 21] {
                let byte = rest.number(1)?;
                value |= (byte & 0x7f) << shift;
                if byte & 0x80 == 0 {
                    break;
                }
            }
            KeptProperty::Number { id, value }
        }
        Kind::Text | Kind::Binary => KeptProperty::Bytes {
            id,
            value: rest.field()?,
        },
        Kind::Pair => KeptProperty::User {
            name: super::utf8(rest.field()?)?,
            value: super::utf8(rest.field()?)?,
        },
    };
    Some((kept, block.len().saturating_sub(rest.0.len())))
}

/// What is left of a kept property block, read from its start.
struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, len: usize) -> Option<&'a [u8]> {
        let (taken, rest) = self.0.split_at_checked(len)?;
        self.0 = rest;
        Some(taken)
    }

    /// A big-endian integer of `len` bytes (at most 4).
    fn number(&mut self, len: usize) -> Option<u32> {
        let bytes = self.take(len)?;
        Some(bytes.iter().fold(0u32, |value, &byte| value << 8 | u32::from(byte)))
    }

    /// A length-prefixed string or binary value.
    fn field(&mut self) -> Option<&'a [u8]> {
        let len = self.number(2)?;
        self.take(usize::try_from(len).ok()?)
    }
}

/// How many of `bytes` (valid UTF-8 cut anywhere) end on a character.
fn char_boundary(bytes: &[u8]) -> usize {
    // The last sequence's lead byte is at most three bytes from the end.
    let mut start = bytes.len();
    for _ in 0..4 {
        let Some(before) = start.checked_sub(1) else { break };
        start = before;
        match bytes.get(start) {
            Some(&byte) if byte & 0xc0 == 0x80 => continue,
            _ => break,
        }
    }
    let sequence_len = match bytes.get(start) {
        None | Some(0x00..=0x7f) => return bytes.len(),
        Some(0xc0..=0xdf) => 2,
        Some(0xe0..=0xef) => 3,
        Some(_) => 4,
    };
    if bytes.len().saturating_sub(start) >= sequence_len {
        bytes.len()
    } else {
        start
    }
}

/// Reads a variable byte integer of at most four bytes, taking them from
/// the `budget` of bytes the packet has left.
pub fn read_varint<T: Read>(io: &mut T, budget: &mut u32) -> Reads<T, u32> {
    let mut value = 0u32;
    let mut shift = 0u32;
    for index in 0..4u32 {
        *budget = budget.checked_sub(1).ok_or(DecodeError::BadLength)?;
        let mut byte = [0u8; 1];
        super::read_exact(io, &mut byte)?;
        value |= u32::from(byte[0] & 0x7f) << shift;
        shift = shift.saturating_add(7);
        if byte[0] & 0x80 == 0 {
            // The shortest form is the only one allowed (section 1.5.5).
            if index > 0 && byte[0] == 0 {
                return Err(DecodeError::MalformedLength.into());
            }
            return Ok(value);
        }
    }
    Err(DecodeError::MalformedLength.into())
}

/// How many bytes `value` takes as a variable byte integer.
pub fn varint_len(value: u32) -> u32 {
    match value {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}

/// Writes `value` (at most [`VARINT_MAX`]) as a variable byte integer.
pub fn put_varint<W: Write>(writer: &mut PacketWriter<'_, W>, value: u32) -> Result<(), EncodeError<W::Error>> {
    if value > VARINT_MAX {
        return Err(EncodeError::PacketTooLong);
    }
    let mut rest = value;
    loop {
        let low = u8::try_from(rest & 0x7f).unwrap_or(0);
        rest >>= 7;
        if rest == 0 {
            return writer.put_u8(low);
        }
        writer.put_u8(low | 0x80)?;
    }
}

/// Size of a one-byte property; of a two- and a four-byte one.
pub(crate) const BYTE_PROPERTY_LEN: u32 = 2;
pub(crate) const TWO_PROPERTY_LEN: u32 = 3;
pub(crate) const FOUR_PROPERTY_LEN: u32 = 5;

/// Size of a string or binary property of `len` bytes.
pub fn bytes_property_len(len: usize) -> u32 {
    u32::try_from(len).unwrap_or(u32::MAX).saturating_add(3)
}

/// Size of a user property.
pub fn user_property_len(name: &str, value: &str) -> u32 {
    bytes_property_len(name.len()).saturating_add(u32::try_from(value.len()).unwrap_or(u32::MAX).saturating_add(2))
}

pub fn put_byte<W: Write>(
    writer: &mut PacketWriter<'_, W>,
    property: u8,
    value: u8,
) -> Result<(), EncodeError<W::Error>> {
    writer.put_u8(property)?;
    writer.put_u8(value)
}

pub fn put_two<W: Write>(
    writer: &mut PacketWriter<'_, W>,
    property: u8,
    value: u16,
) -> Result<(), EncodeError<W::Error>> {
    writer.put_u8(property)?;
    writer.put_u16(value)
}

pub fn put_four<W: Write>(
    writer: &mut PacketWriter<'_, W>,
    property: u8,
    value: u32,
) -> Result<(), EncodeError<W::Error>> {
    writer.put_u8(property)?;
    writer.put_bytes(&value.to_be_bytes())
}

/// A string or binary property (a length-prefixed field).
pub fn put_bytes<W: Write>(
    writer: &mut PacketWriter<'_, W>,
    property: u8,
    value: &[u8],
) -> Result<(), EncodeError<W::Error>> {
    writer.put_u8(property)?;
    writer.put_field(value)
}

pub fn put_user<W: Write>(
    writer: &mut PacketWriter<'_, W>,
    name: &str,
    value: &str,
) -> Result<(), EncodeError<W::Error>> {
    writer.put_u8(id::USER_PROPERTY)?;
    writer.put_field(name.as_bytes())?;
    writer.put_field(value.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `read_block` found: each property's id (0 for a user
    /// property's name), number, and the bytes kept of its value.
    type Found = std::vec::Vec<(u8, u32, std::vec::Vec<u8>)>;

    /// Reads a whole block, keeping up to 8 bytes of each value.
    fn read_block(bytes: &[u8], allowed: IdSet) -> Result<Found, ReadError<core::convert::Infallible>> {
        let mut io = bytes;
        let room = u32::try_from(bytes.len()).unwrap();
        let (mut reader, used) = PropertyReader::start(&mut io, room, allowed)?;
        let mut found = std::vec::Vec::new();
        while let Some(property) = reader.next(&mut io)? {
            match property {
                Property::Number { id, value } => found.push((id, value, std::vec::Vec::new())),
                Property::Bytes { id, .. } => {
                    let mut keep = [0u8; 8];
                    let kept = reader.take(&mut io, &mut keep)?;
                    found.push((id, 0, keep[..kept].to_vec()));
                }
                Property::UserName { .. } => {
                    let mut keep = [0u8; 8];
                    let kept = reader.take(&mut io, &mut keep)?;
                    found.push((0, 0, keep[..kept].to_vec()));
                }
            }
        }
        assert_eq!(used, room, "the block is the whole input");
        Ok(found)
    }

    #[test]
    fn reads_every_kind_of_value() {
        let block = [
            23, // length
            id::RECEIVE_MAXIMUM,
            0,
            10,
            id::MAXIMUM_QOS,
            1,
            id::MAXIMUM_PACKET_SIZE,
            0,
            1,
            0,
            0,
            id::REASON_STRING,
            0,
            2,
            b'o',
            b'k',
            id::USER_PROPERTY,
            0,
            1,
            b'k',
            0,
            2,
            b'v',
            b'w',
        ];
        assert_eq!(
            read_block(&block, allowed::CONNACK).unwrap(),
            [
                (id::RECEIVE_MAXIMUM, 10, vec![]),
                (id::MAXIMUM_QOS, 1, vec![]),
                (id::MAXIMUM_PACKET_SIZE, 65536, vec![]),
                (id::REASON_STRING, 0, b"ok".to_vec()),
                (0, 0, b"k".to_vec()),
                (id::USER_PROPERTY, 0, b"vw".to_vec()),
            ]
        );
    }

    #[test]
    fn subscription_ids_repeat_and_are_varints() {
        let block = [
            6,
            id::SUBSCRIPTION_ID,
            0x80,
            0x01,
            id::SUBSCRIPTION_ID,
            5, /* one byte short */
        ];
        assert_eq!(
            read_block(&block[..6], allowed::PUBLISH),
            Err(ReadError::Malformed(DecodeError::BadLength))
        );
        let block = [5, id::SUBSCRIPTION_ID, 0x80, 0x01, id::SUBSCRIPTION_ID, 5];
        assert_eq!(
            read_block(&block, allowed::PUBLISH).unwrap(),
            [(id::SUBSCRIPTION_ID, 128, vec![]), (id::SUBSCRIPTION_ID, 5, vec![])]
        );
        assert_eq!(
            read_block(&[2, id::SUBSCRIPTION_ID, 0], allowed::PUBLISH),
            Err(ReadError::Malformed(DecodeError::InvalidProperty))
        );
    }

    #[test]
    fn refuses_what_the_packet_may_not_carry() {
        // Unknown identifier, a property of another packet, a repeat.
        assert_eq!(
            read_block(&[2, 0x7f, 0], allowed::ACK),
            Err(ReadError::Malformed(DecodeError::InvalidProperty))
        );
        assert_eq!(
            read_block(&[3, id::TOPIC_ALIAS, 0, 1], allowed::ACK),
            Err(ReadError::Malformed(DecodeError::InvalidProperty))
        );
        assert_eq!(
            read_block(&[4, id::MAXIMUM_QOS, 0, id::MAXIMUM_QOS, 1], allowed::CONNACK),
            Err(ReadError::Malformed(DecodeError::InvalidProperty))
        );
        assert_eq!(
            read_block(&[5, id::SESSION_EXPIRY, 0, 0, 0, 1], allowed::DISCONNECT),
            Err(ReadError::Malformed(DecodeError::InvalidProperty))
        );
    }

    #[test]
    fn refuses_values_out_of_range() {
        assert_eq!(
            read_block(&[2, id::MAXIMUM_QOS, 2], allowed::CONNACK),
            Err(ReadError::Malformed(DecodeError::InvalidProperty))
        );
        assert_eq!(
            read_block(&[2, id::RETAIN_AVAILABLE, 7], allowed::CONNACK),
            Err(ReadError::Malformed(DecodeError::InvalidProperty))
        );
        assert_eq!(
            read_block(&[3, id::RECEIVE_MAXIMUM, 0, 0], allowed::CONNACK),
            Err(ReadError::Malformed(DecodeError::InvalidProperty))
        );
        assert_eq!(
            read_block(&[5, id::MAXIMUM_PACKET_SIZE, 0, 0, 0, 0], allowed::CONNACK),
            Err(ReadError::Malformed(DecodeError::InvalidProperty))
        );
        assert_eq!(
            read_block(&[3, id::TOPIC_ALIAS, 0, 0], allowed::PUBLISH),
            Err(ReadError::Malformed(DecodeError::InvalidProperty))
        );
        assert_eq!(
            read_block(&[2, id::PAYLOAD_FORMAT, 2], allowed::PUBLISH),
            Err(ReadError::Malformed(DecodeError::InvalidProperty))
        );
    }

    #[test]
    fn checks_strings_whole_even_when_kept_in_part() {
        // 10 bytes, of which 8 are kept: the last character is cut off.
        let text = "abcdefgé!".as_bytes();
        assert_eq!(text.len(), 10);
        let mut block = vec![13, id::REASON_STRING, 0, 10];
        block.extend_from_slice(text);
        assert_eq!(
            read_block(&block, allowed::ACK).unwrap(),
            [(id::REASON_STRING, 0, b"abcdefg".to_vec())]
        );
        // A bad byte after what is kept, and U+0000.
        let last = block.len() - 1;
        block[last] = 0xff;
        assert_eq!(
            read_block(&block, allowed::ACK),
            Err(ReadError::Malformed(DecodeError::InvalidUtf8))
        );
        block[last] = 0;
        assert_eq!(
            read_block(&block, allowed::ACK),
            Err(ReadError::Malformed(DecodeError::InvalidUtf8))
        );
        // Binary data is not text.
        assert_eq!(
            read_block(&[5, id::CORRELATION_DATA, 0, 2, 0, 0xff], allowed::PUBLISH).unwrap(),
            [(id::CORRELATION_DATA, 0, vec![0, 0xff])]
        );
    }

    #[test]
    fn refuses_blocks_that_do_not_fit() {
        // Longer than the packet, a value past the block, a long varint.
        assert_eq!(
            read_block(&[9, id::MAXIMUM_QOS, 1], allowed::CONNACK),
            Err(ReadError::Malformed(DecodeError::BadLength))
        );
        assert_eq!(
            read_block(&[3, id::REASON_STRING, 0, 5], allowed::ACK),
            Err(ReadError::Malformed(DecodeError::BadLength))
        );
        assert_eq!(
            read_block(&[0x80, 0], allowed::ACK),
            Err(ReadError::Malformed(DecodeError::MalformedLength))
        );
        assert_eq!(
            read_block(&[], allowed::ACK),
            Err(ReadError::Malformed(DecodeError::BadLength))
        );
        assert_eq!(read_block(&[0], allowed::ACK).unwrap(), []);
    }

    #[test]
    fn varints_round_trip() {
        for value in [0, 1, 127, 128, 16_383, 16_384, 2_097_151, 2_097_152, VARINT_MAX] {
            let mut out = [0u8; 8];
            let mut sink = &mut out[..];
            let mut writer = PacketWriter::start(&mut sink, 0x30, varint_len(value) as usize).unwrap();
            put_varint(&mut writer, value).unwrap();
            writer.finish().unwrap();
            let header_len = 2;
            let encoded = &out[header_len..header_len + varint_len(value) as usize];
            assert_eq!(encoded.len() as u32, varint_len(value));
            let mut io = encoded;
            let mut budget = 4;
            assert_eq!(read_varint(&mut io, &mut budget).unwrap(), value);
            assert_eq!(4 - budget, varint_len(value));
        }
    }

    #[test]
    fn cuts_at_character_boundaries() {
        assert_eq!(char_boundary(b"abc"), 3);
        assert_eq!(char_boundary("aé".as_bytes()), 3);
        assert_eq!(char_boundary(&"aé".as_bytes()[..2]), 1);
        assert_eq!(char_boundary(&"a€".as_bytes()[..3]), 1);
        assert_eq!(char_boundary(&"a😀".as_bytes()[..4]), 1);
        assert_eq!(char_boundary("a😀".as_bytes()), 5);
    }

    proptest::proptest! {
        #[test]
        fn any_block_is_read_or_refused(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..64)) {
            for allowed in [allowed::CONNACK, allowed::PUBLISH, allowed::ACK, allowed::DISCONNECT] {
                let mut io = &bytes[..];
                let room = u32::try_from(bytes.len()).unwrap();
                if let Ok((mut reader, used)) = PropertyReader::start(&mut io, room, allowed) {
                    proptest::prop_assert!(used <= room);
                    let _ = reader.skip_all(&mut io);
                }
            }
        }
    }
}
