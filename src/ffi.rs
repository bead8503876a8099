//! The C interface: plain structs and status codes around [`Session`].
//!
//! This is the only module with `unsafe` code. Every function checks its
//! pointers (null, alignment) and returns a status; none can unwind or
//! jump. The header `mqtt_engine.h` is generated from this file by
//! cbindgen (see `tests/header.rs`).
//!
//! The caller (the MicroPython binding) serialises all calls on one
//! session: it holds its client's lock around each of them.

use core::ffi::c_void;
use core::mem::{align_of, size_of};

use cty::{c_char, c_int, intptr_t, size_t};

use crate::codec::properties::{KeptProperty, VARINT_MAX, id, kept_property, varint_len};
use crate::codec::v5::{ConnectProperties, MessageProperties, SubscriptionOptions, UserProperties};
use crate::codec::{Connect, DecodeError, QoS, Will};
use crate::session::{
    AliasTopics, Config, Deferred, Error, Failure, Filters, INBOUND_ALIAS_MAX, INBOUND_QOS2_MAX, Kept, Message,
    MessageSink, Outcome, Session, TOPIC_ALIAS_MAX, Ticket, V5, Verdict,
};

/// What a call did: `MQTT_OK`, or why it failed.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[allow(non_camel_case_types, clippy::upper_case_acronyms)]
pub enum mqtt_status_t {
    /// Success.
    MQTT_OK = 0,
    /// A topic name or filter breaks the topic rules.
    MQTT_ERR_INVALID_TOPIC = -1,
    /// A string or payload is longer than MQTT can carry.
    MQTT_ERR_TOO_LONG = -2,
    /// An empty client id needs a clean session.
    MQTT_ERR_INVALID_CLIENT_ID = -3,
    /// A QoS outside 0-2, a text that is not UTF-8, or a null pointer.
    MQTT_ERR_INVALID_ARGUMENT = -4,
    /// The operation needs an accepted connection.
    MQTT_ERR_NOT_CONNECTED = -5,
    /// Every in-flight slot is taken (or as many QoS 1/2 publishes are in
    /// flight as an MQTT 5 broker's Receive Maximum allows).
    MQTT_ERR_INFLIGHT_FULL = -6,
    /// The call does not fit the session's state (a bug in the caller).
    MQTT_ERR_WRONG_STATE = -7,
    /// The MQTT 5 broker's CONNACK does not allow it: a QoS above its
    /// maximum, RETAIN without retained messages, a packet over its
    /// maximum size.
    MQTT_ERR_BROKER_LIMIT = -8,
    /// MQTT 5: a payload said to be UTF-8 text (payload format 1) is not.
    MQTT_ERR_NOT_TEXT = -9,
    /// The broker did not answer PINGREQ in time: the link is dead.
    MQTT_ERR_PING_TIMEOUT = -10,
    /// The broker did not answer CONNECT in time.
    MQTT_ERR_CONNECT_TIMEOUT = -11,
    /// The transport callback failed; the caller knows why.
    MQTT_ERR_TRANSPORT = -12,
    /// The peer closed the connection.
    MQTT_ERR_CLOSED = -13,
    /// The broker sent DISCONNECT (MQTT 5), with a reason code.
    MQTT_ERR_DISCONNECTED = -14,
    // The broker broke a rule of MQTT: `mqtt_broken_rule` names it.
    /// The remaining length uses more than four bytes.
    MQTT_ERR_MALFORMED_LENGTH = -20,
    /// Packet type 0 or 15.
    MQTT_ERR_UNKNOWN_PACKET_TYPE = -21,
    /// Reserved flag bits set wrongly.
    MQTT_ERR_INVALID_FLAGS = -22,
    /// QoS 3, or a QoS where none is allowed.
    MQTT_ERR_INVALID_QOS = -23,
    /// A field runs past the end of the packet, or bytes are left over.
    MQTT_ERR_BAD_LENGTH = -24,
    /// A string that is not UTF-8 or contains U+0000.
    MQTT_ERR_INVALID_UTF8 = -25,
    /// A topic name that breaks the topic rules.
    MQTT_ERR_INVALID_TOPIC_NAME = -26,
    /// A packet identifier of zero.
    MQTT_ERR_ZERO_PACKET_ID = -27,
    /// A protocol name or level this client does not speak.
    MQTT_ERR_UNSUPPORTED_PROTOCOL = -28,
    /// A CONNACK or SUBACK return code MQTT does not define.
    MQTT_ERR_INVALID_RETURN_CODE = -29,
    /// A SUBSCRIBE or UNSUBSCRIBE without a topic filter.
    MQTT_ERR_EMPTY_PAYLOAD = -30,
    /// An MQTT 5 property that is unknown, misplaced, repeated or out of range.
    MQTT_ERR_INVALID_PROPERTY = -31,
    /// A packet a broker may not send at this point.
    MQTT_ERR_UNEXPECTED_PACKET = -32,
}

use mqtt_await_t::*;
use mqtt_outcome_kind_t::*;
use mqtt_status_t::*;

/// The broken rules' texts, in the order of their statuses from
/// `MQTT_ERR_MALFORMED_LENGTH` down, each ending in NUL.
const BROKEN_RULES: &[u8] = b"remaining length over 4 bytes\0\
    packet type 0 or 15\0\
    reserved flag bits set\0\
    invalid QoS\0\
    lengths do not add up\0\
    bad UTF-8 or U+0000\0\
    invalid topic name\0\
    packet id 0\0\
    unsupported protocol\0\
    undefined return code\0\
    no topic filter\0\
    invalid property\0\
    packet not allowed now\0";

/// `mqtt_session_await`: what the caller waiting for an answer does next.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[allow(non_camel_case_types)]
pub enum mqtt_await_t {
    /// Answered: the return code is in `*code`.
    MQTT_AWAIT_ANSWERED,
    /// Not yet: run a cycle, or let the loop that runs elsewhere work.
    MQTT_AWAIT_PENDING,
    /// The link is down and a loop elsewhere may reconnect: wait for it.
    MQTT_AWAIT_RECONNECT,
    /// The broker did not answer CONNECT in time: it counts as unreachable.
    MQTT_AWAIT_CONNECT_TIMED_OUT,
    /// No answer within the command timeout (a publish stays in flight).
    MQTT_AWAIT_TIMED_OUT,
    /// The link went down before a publish was acknowledged: it stays in
    /// flight and goes again after a reconnect.
    MQTT_AWAIT_LINK_LOST_IN_FLIGHT,
    /// The link went down before the answer came.
    MQTT_AWAIT_LINK_LOST,
}

/// `mqtt_outcome_t.kind`: what a step did.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[allow(non_camel_case_types)]
pub enum mqtt_outcome_kind_t {
    /// Nothing to deliver; the timers ran.
    MQTT_OUTCOME_IDLE,
    /// The CONNACK arrived: `code` and `session_present` are set. The
    /// timers did not run.
    MQTT_OUTCOME_CONNACK,
    /// A message is in the sink, to deliver. When `acknowledge` is set
    /// (QoS 1/2), call `mqtt_session_finish_message` once it is delivered.
    MQTT_OUTCOME_MESSAGE,
    /// A message the client could not take was read past and dropped, at
    /// any QoS: report it. It is acknowledged as if delivered, so the
    /// broker does not send it again (do not call
    /// `mqtt_session_finish_message`). `too_large` says it was larger than
    /// `max_packet_size`, otherwise memory ran out (for its topic, its
    /// payload, or in `message_ready`). `payload_len` and `flags` are its;
    /// when `topic_read`, the room the sink gave for the topic holds it
    /// (checked: UTF-8, a valid topic name), to name it in the report.
    MQTT_OUTCOME_DROPPED,
}

/// A session, in memory the caller owns (see `mqtt_session_init`).
#[allow(non_camel_case_types)]
pub struct mqtt_session_t {
    _opaque: [u8; 0],
}

/// The in-flight table's size: tickets' slots are below this.
pub const MQTT_INFLIGHT_MAX: usize = 8;

// cbindgen writes literals only; this keeps it equal to the engine's.
const _: () = assert!(MQTT_INFLIGHT_MAX == crate::session::INFLIGHT_MAX);

/// The transport the session reads and writes through.
///
/// `deadline_ms` is on the same wrapping millisecond clock as the `now_ms`
/// arguments: a call may wait for the stream until then, not longer.
#[repr(C)]
pub struct mqtt_transport_t {
    pub context: *mut c_void,
    /// Reads up to `len` bytes: returns how many (> 0), 0 at end of stream,
    /// or a negative value on error or when the deadline passed.
    pub read:
        Option<unsafe extern "C" fn(context: *mut c_void, buf: *mut u8, len: size_t, deadline_ms: u32) -> intptr_t>,
    /// Writes up to `len` bytes: returns how many (> 0), or a negative
    /// value on error or when the deadline passed.
    pub write:
        Option<unsafe extern "C" fn(context: *mut c_void, buf: *const u8, len: size_t, deadline_ms: u32) -> intptr_t>,
    /// Returns 1 when a read would not wait, 0 when it would, negative on error.
    pub readable: Option<unsafe extern "C" fn(context: *mut c_void) -> c_int>,
}

/// A borrowed byte string; `data` may be null when `len` is 0.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct mqtt_bytes_t {
    pub data: *const u8,
    pub len: size_t,
}

/// Bytes handed to the caller.
fn bytes_of(bytes: &[u8]) -> mqtt_bytes_t {
    mqtt_bytes_t {
        data: bytes.as_ptr(),
        len: bytes.len(),
    }
}

impl mqtt_bytes_t {
    /// Absent.
    const NONE: Self = mqtt_bytes_t {
        data: core::ptr::null(),
        len: 0,
    };

    /// Engine memory handed to the caller, valid until its next call.
    fn of(text: &str) -> Self {
        bytes_of(text.as_bytes())
    }
}

/// User properties (MQTT 5) where the caller keeps them. `pair` sets
/// `*name` and `*value` (UTF-8) to the pair at `index` and returns true,
/// or returns false past the last; the pairs stay valid and the same for
/// the call they are given to. A null `pair`: no user properties. Must not
/// raise or jump.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct mqtt_user_properties_t {
    pub context: *mut c_void,
    pub pair: Option<
        unsafe extern "C" fn(
            context: *mut c_void,
            index: size_t,
            name: *mut mqtt_bytes_t,
            value: *mut mqtt_bytes_t,
        ) -> bool,
    >,
}

impl mqtt_user_properties_t {
    const NONE: Self = mqtt_user_properties_t {
        context: core::ptr::null_mut(),
        pair: None,
    };

    /// The pair at `index` as the caller gave it.
    fn raw_pair(&self, index: usize) -> Option<(mqtt_bytes_t, mqtt_bytes_t)> {
        let pair = self.pair?;
        let mut name = mqtt_bytes_t::NONE;
        let mut value = mqtt_bytes_t::NONE;
        // SAFETY: the callback gets the caller's context and two valid
        // places to write to.
        unsafe { pair(self.context, index, &mut name, &mut value) }.then_some((name, value))
    }

    /// Checks every pair, and gives them as the codec reads them (None
    /// when there are none).
    ///
    /// # Safety
    /// The pairs' byte strings are valid (the promise above).
    unsafe fn checked(&self) -> Result<Option<&dyn UserProperties>, mqtt_status_t> {
        // An engine without MQTT 5 writes no properties.
        if !cfg!(feature = "mqtt5") {
            return Ok(None);
        }
        let mut any = false;
        for index in 0.. {
            let Some((name, value)) = self.raw_pair(index) else {
                break;
            };
            // SAFETY: valid byte strings (the caller's promise).
            unsafe { text(name)?.zip(text(value)?) }.ok_or(MQTT_ERR_INVALID_ARGUMENT)?;
            any = true;
        }
        Ok(any.then_some(self as &dyn UserProperties))
    }
}

impl UserProperties for mqtt_user_properties_t {
    fn pair(&self, index: usize) -> Option<(&str, &str)> {
        let (name, value) = self.raw_pair(index)?;
        // SAFETY: valid byte strings, checked before the codec reads them.
        unsafe { text(name).ok()?.zip(text(value).ok()?) }
    }
}

/// The properties of a message (MQTT 5): a PUBLISH's or a will's.
/// Optional strings are absent when `data` is null.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct mqtt_message_properties_t {
    /// 1: the payload is UTF-8 text (Payload Format Indicator); 0: not said.
    pub payload_format: u8,
    /// Whether `message_expiry_s` is given.
    pub has_message_expiry: bool,
    /// Seconds after which the broker drops the message undelivered.
    pub message_expiry_s: u32,
    /// A will's delay in seconds (0: none); never for a PUBLISH.
    pub will_delay_s: u32,
    pub content_type: mqtt_bytes_t,
    pub response_topic: mqtt_bytes_t,
    pub correlation_data: mqtt_bytes_t,
    pub user_properties: mqtt_user_properties_t,
}

impl mqtt_message_properties_t {
    const NONE: Self = mqtt_message_properties_t {
        payload_format: 0,
        has_message_expiry: false,
        message_expiry_s: 0,
        will_delay_s: 0,
        content_type: mqtt_bytes_t::NONE,
        response_topic: mqtt_bytes_t::NONE,
        correlation_data: mqtt_bytes_t::NONE,
        user_properties: mqtt_user_properties_t::NONE,
    };
}

/// CONNECT's fields. Optional strings are absent when `data` is null.
#[repr(C)]
pub struct mqtt_connect_t {
    pub client_id: mqtt_bytes_t,
    pub username: mqtt_bytes_t,
    pub password: mqtt_bytes_t,
    pub will_topic: mqtt_bytes_t,
    pub will_payload: mqtt_bytes_t,
    pub will_qos: u8,
    pub will_retain: bool,
    pub clean_session: bool,
    pub keepalive_s: u16,
    /// MQTT 5: the will's properties, or null for none.
    pub will_properties: *const mqtt_message_properties_t,
    /// MQTT 5: CONNECT's user properties.
    pub user_properties: mqtt_user_properties_t,
}

/// Follows one command to its acknowledgement.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct mqtt_ticket_t {
    pub slot: u8,
    pub packet_id: u16,
}

/// Memory of the caller's for an incoming message (see `MessageSink`).
/// No callback may raise or jump; out of memory is an answer.
#[repr(C)]
pub struct mqtt_sink_t {
    pub context: *mut c_void,
    /// Returns room for `len` bytes of topic, valid until the step
    /// returns, or null when out of memory (the message is then dropped).
    /// Asked for a message larger than `max_packet_size` too, so that its
    /// report can name it.
    pub topic: Option<unsafe extern "C" fn(context: *mut c_void, len: size_t) -> *mut u8>,
    /// MQTT 5: returns room for the message's property block, `len` bytes
    /// (never 0), as above, asked just before its payload; read it with
    /// `mqtt_property_next`. Null room: the message is dropped, as for its
    /// payload.
    pub properties: Option<unsafe extern "C" fn(context: *mut c_void, len: size_t) -> *mut u8>,
    /// MQTT 5, a topic alias from the broker (only when the client takes
    /// some: `mqtt_session_set_topic_aliases`): with `set`, keep the topic
    /// in the room given for it as the one `alias` stands for; without,
    /// the message's topic is the one kept for `alias` (its room was
    /// empty). Returns false when it cannot (see `MessageSink`).
    pub topic_alias: Option<unsafe extern "C" fn(context: *mut c_void, alias: u16, set: bool) -> bool>,
    /// Returns room for `len` bytes of payload, as above. Never asked for
    /// a message larger than `max_packet_size`, nor one without a topic.
    pub payload: Option<unsafe extern "C" fn(context: *mut c_void, len: size_t) -> *mut u8>,
    /// Topic and payload are read and valid: makes the message the
    /// application gets. Returns false when out of memory.
    pub message_ready: Option<unsafe extern "C" fn(context: *mut c_void) -> bool>,
    /// An outbound QoS 1/2 publish in `slot` is acknowledged end to end.
    pub completed: Option<unsafe extern "C" fn(context: *mut c_void, slot: u8)>,
}

/// The topics the caller keeps for the topic aliases the engine sets
/// towards the broker (MQTT 5; see `AliasTopics`): aliases 1 to
/// `MQTT_TOPIC_ALIAS_MAX`. No callback may raise or jump.
#[repr(C)]
pub struct mqtt_aliases_t {
    pub context: *mut c_void,
    /// Whether alias `alias` stands for `topic`.
    pub stands_for: Option<unsafe extern "C" fn(context: *mut c_void, alias: u16, topic: mqtt_bytes_t) -> bool>,
    /// Keeps `topic` (the publish's being sent) for alias `alias`, in place
    /// of what it stood for; false when it cannot.
    pub set: Option<unsafe extern "C" fn(context: *mut c_void, alias: u16, topic: mqtt_bytes_t) -> bool>,
}

/// The caller's alias topics as the session sees them.
struct AliasesOfCaller<'a>(&'a mqtt_aliases_t);

impl AliasTopics for AliasesOfCaller<'_> {
    fn stands_for(&mut self, alias: u16, topic: &str) -> bool {
        // SAFETY: the callback gets the context the caller gave and the
        // topic, valid for the call.
        self.0
            .stands_for
            .is_some_and(|stands_for| unsafe { stands_for(self.0.context, alias, mqtt_bytes_t::of(topic)) })
    }

    fn set(&mut self, alias: u16, topic: &str) -> bool {
        // SAFETY: as above.
        self.0
            .set
            .is_some_and(|set| unsafe { set(self.0.context, alias, mqtt_bytes_t::of(topic)) })
    }
}

/// The most topic aliases the engine sets towards a broker.
pub const MQTT_TOPIC_ALIAS_MAX: u16 = 8;

const _: () = assert!(MQTT_TOPIC_ALIAS_MAX == TOPIC_ALIAS_MAX);

/// What the caller kept of its in-flight publishes (see `Kept`).
#[repr(C)]
pub struct mqtt_kept_t {
    pub context: *mut c_void,
    /// Sets `*topic`, `*payload` and (MQTT 5) `*properties` to what was
    /// kept for the publish in flight in `slot`, valid until
    /// `mqtt_session_resume` returns; returns false when nothing was kept.
    /// `*properties` comes without properties. Must not raise or jump.
    pub publish: Option<
        unsafe extern "C" fn(
            context: *mut c_void,
            slot: u8,
            topic: *mut mqtt_bytes_t,
            payload: *mut mqtt_bytes_t,
            properties: *mut mqtt_message_properties_t,
        ) -> bool,
    >,
}

/// The caller's subscription table (see `Filters`).
#[repr(C)]
pub struct mqtt_filters_t {
    pub context: *mut c_void,
    /// Sets `*filter`, `*options` and `*subscription_id` (as for
    /// `mqtt_session_subscribe`) to entry `index` of the table, valid until
    /// `mqtt_session_resubscribe` returns; returns false past its end. Must
    /// not raise or jump.
    pub filter: Option<
        unsafe extern "C" fn(
            context: *mut c_void,
            index: u16,
            filter: *mut mqtt_bytes_t,
            options: *mut u8,
            subscription_id: *mut u32,
        ) -> bool,
    >,
}

/// Why the link is down, for `mqtt_session_next_attempt`: lost,
/// unreachable, or no CONNACK in time.
pub const MQTT_FAILURE_LINK: c_int = 0;
/// The broker refused the connection (the CONNACK code goes with it).
pub const MQTT_FAILURE_REFUSED: c_int = 1;
/// The TLS handshake failed.
pub const MQTT_FAILURE_HANDSHAKE: c_int = 2;

/// What `mqtt_session_step` did.
#[repr(C)]
pub struct mqtt_outcome_t {
    pub kind: mqtt_outcome_kind_t,
    pub code: u8,
    pub session_present: bool,
    pub acknowledge: bool,
    /// A message's, delivered or dropped: the flags of its PUBLISH header
    /// (bit 0 retain, bits 1-2 QoS, bit 3 DUP), as MQTT lays them out.
    pub flags: u8,
    /// A dropped message's: the sink's topic buffer holds its topic.
    pub topic_read: bool,
    /// A dropped message's: it was larger than `max_packet_size`.
    pub too_large: bool,
    /// A dropped message's payload length.
    pub payload_len: u32,
}

#[derive(Debug)]
struct LinkError;

impl embedded_io::Error for LinkError {
    fn kind(&self) -> embedded_io::ErrorKind {
        embedded_io::ErrorKind::Other
    }
}

/// The C transport with this call's deadline.
struct Link<'a> {
    transport: &'a mqtt_transport_t,
    deadline: u32,
}

impl embedded_io::ErrorType for Link<'_> {
    type Error = LinkError;
}

impl embedded_io::Read for Link<'_> {
    fn read(&mut self, buf: &mut [u8]) -> Result<usize, LinkError> {
        let read = self.transport.read.ok_or(LinkError)?;
        // SAFETY: the callback receives a valid, writable buffer of `len` bytes.
        let count = unsafe { read(self.transport.context, buf.as_mut_ptr(), buf.len(), self.deadline) };
        let count = usize::try_from(count).map_err(|_| LinkError)?;
        if count > buf.len() { Err(LinkError) } else { Ok(count) }
    }
}

impl embedded_io::Write for Link<'_> {
    fn write(&mut self, buf: &[u8]) -> Result<usize, LinkError> {
        let write = self.transport.write.ok_or(LinkError)?;
        // SAFETY: the callback receives a valid, readable buffer of `len` bytes.
        let count = unsafe { write(self.transport.context, buf.as_ptr(), buf.len(), self.deadline) };
        let count = usize::try_from(count).map_err(|_| LinkError)?;
        if count > buf.len() { Err(LinkError) } else { Ok(count) }
    }

    fn flush(&mut self) -> Result<(), LinkError> {
        Ok(())
    }
}

impl embedded_io::ReadReady for Link<'_> {
    fn read_ready(&mut self) -> Result<bool, LinkError> {
        let readable = self.transport.readable.ok_or(LinkError)?;
        // SAFETY: the callback only receives the context the caller gave.
        match unsafe { readable(self.transport.context) } {
            0 => Ok(false),
            1.. => Ok(true),
            _ => Err(LinkError),
        }
    }
}

fn status(error: Error) -> mqtt_status_t {
    match error {
        Error::InvalidTopic(_) => MQTT_ERR_INVALID_TOPIC,
        Error::TooLong => MQTT_ERR_TOO_LONG,
        Error::NotText => MQTT_ERR_NOT_TEXT,
        Error::InvalidClientId => MQTT_ERR_INVALID_CLIENT_ID,
        Error::NotConnected => MQTT_ERR_NOT_CONNECTED,
        Error::InflightFull => MQTT_ERR_INFLIGHT_FULL,
        Error::BrokerLimit => MQTT_ERR_BROKER_LIMIT,
        Error::WrongState => MQTT_ERR_WRONG_STATE,
        Error::Malformed(error) => broken_rule(error),
        Error::UnexpectedPacket => MQTT_ERR_UNEXPECTED_PACKET,
        Error::PingTimeout => MQTT_ERR_PING_TIMEOUT,
        Error::ConnectTimeout => MQTT_ERR_CONNECT_TIMEOUT,
        Error::Disconnected => MQTT_ERR_DISCONNECTED,
        Error::Transport => MQTT_ERR_TRANSPORT,
        Error::Closed => MQTT_ERR_CLOSED,
    }
}

fn broken_rule(error: DecodeError) -> mqtt_status_t {
    match error {
        DecodeError::MalformedLength => MQTT_ERR_MALFORMED_LENGTH,
        DecodeError::UnknownPacketType => MQTT_ERR_UNKNOWN_PACKET_TYPE,
        DecodeError::InvalidFlags => MQTT_ERR_INVALID_FLAGS,
        DecodeError::InvalidQoS => MQTT_ERR_INVALID_QOS,
        DecodeError::BadLength => MQTT_ERR_BAD_LENGTH,
        DecodeError::InvalidUtf8 => MQTT_ERR_INVALID_UTF8,
        DecodeError::InvalidTopic => MQTT_ERR_INVALID_TOPIC_NAME,
        DecodeError::ZeroPacketId => MQTT_ERR_ZERO_PACKET_ID,
        DecodeError::UnsupportedProtocol => MQTT_ERR_UNSUPPORTED_PROTOCOL,
        DecodeError::InvalidReturnCode => MQTT_ERR_INVALID_RETURN_CODE,
        DecodeError::EmptyPayload => MQTT_ERR_EMPTY_PAYLOAD,
        DecodeError::InvalidProperty => MQTT_ERR_INVALID_PROPERTY,
    }
}

fn to_status(result: Result<(), Error>) -> mqtt_status_t {
    match result {
        Ok(()) => MQTT_OK,
        Err(error) => status(error),
    }
}

/// # Safety
/// `session` is null or points to memory set up by `mqtt_session_init`.
unsafe fn session_mut<'a>(session: *mut mqtt_session_t) -> Option<&'a mut Session> {
    let session = session.cast::<Session>();
    if session.is_null() || !session.is_aligned() {
        return None;
    }
    // SAFETY: non-null and aligned; the caller promises it was initialised
    // and that no other call uses it at the same time.
    unsafe { session.as_mut() }
}

/// Where an MQTT 5 session's [`V5`] lies in its memory: after the session.
const V5_OFFSET: usize = size_of::<Session>().next_multiple_of(align_of::<V5>());

/// The session and, for an MQTT 5 one, its MQTT 5 state.
///
/// # Safety
/// As [`session_mut`].
unsafe fn session_parts<'a>(session: *mut mqtt_session_t) -> Option<(&'a mut Session, Option<&'a mut V5>)> {
    // SAFETY: as the caller promises.
    let whole = unsafe { session_mut(session) }?;
    if !cfg!(feature = "mqtt5") || whole.version() != 5 {
        return Some((whole, None));
    }
    // SAFETY: `mqtt_session_init` made an MQTT 5 session only in memory
    // that holds its V5 at V5_OFFSET, initialised, apart from the session.
    let v5 = unsafe { session.cast::<u8>().add(V5_OFFSET).cast::<V5>().as_mut() }?;
    Some((whole, Some(v5)))
}

/// # Safety
/// `transport` is null or points to a valid `mqtt_transport_t`.
unsafe fn link<'a>(transport: *const mqtt_transport_t, session: &Session, now_ms: u32) -> Option<Link<'a>> {
    // SAFETY: the caller promises a valid pointer or null.
    let transport = unsafe { transport.as_ref() }?;
    Some(Link {
        transport,
        deadline: now_ms.wrapping_add(session.command_timeout_ms()),
    })
}

/// Runs `step` on the session over its transport, for the calls whose only
/// pointers are those two.
///
/// # Safety
/// As for [`session_mut`] and [`link`].
unsafe fn with_link(
    session: *mut mqtt_session_t,
    transport: *const mqtt_transport_t,
    now_ms: u32,
    step: impl FnOnce(&mut Session, &mut Link<'_>) -> Result<(), Error>,
) -> mqtt_status_t {
    // SAFETY: `session` is null or from `mqtt_session_init`, in no other call now (the caller's promise).
    let Some(session) = (unsafe { session_mut(session) }) else {
        return MQTT_ERR_INVALID_ARGUMENT;
    };
    // SAFETY: `transport` is null or valid (the caller's promise).
    let Some(mut io) = (unsafe { link(transport, session, now_ms) }) else {
        return MQTT_ERR_INVALID_ARGUMENT;
    };
    to_status(step(session, &mut io))
}

/// A message's properties as the caller gave them (none for null).
///
/// # Safety
/// `properties` is null or valid, and so are its byte strings.
unsafe fn message_properties<'a>(
    properties: *const mqtt_message_properties_t,
) -> Result<MessageProperties<'a>, mqtt_status_t> {
    // SAFETY: as the caller promises.
    let given = unsafe { properties.as_ref() };
    // An engine without MQTT 5 writes no properties: none are read.
    let Some(given) = given.filter(|_| cfg!(feature = "mqtt5")) else {
        return Ok(MessageProperties::default());
    };
    if given.payload_format > 1 {
        return Err(MQTT_ERR_INVALID_ARGUMENT);
    }
    // SAFETY: valid pairs (the caller's promise).
    let user = unsafe { given.user_properties.checked() }?;
    Ok(MessageProperties {
        utf8_payload: given.payload_format == 1,
        message_expiry_s: given.has_message_expiry.then_some(given.message_expiry_s),
        // SAFETY: each byte string is null or valid (the caller's promise).
        content_type: unsafe { text(given.content_type) }?,
        // SAFETY: as above.
        response_topic: unsafe { text(given.response_topic) }?,
        // SAFETY: as above.
        correlation_data: unsafe { slice(given.correlation_data) },
        topic_alias: 0,
        will_delay_s: given.will_delay_s,
        user,
    })
}

/// # Safety
/// `bytes.data` is null or valid for `bytes.len` bytes.
unsafe fn slice<'a>(bytes: mqtt_bytes_t) -> Option<&'a [u8]> {
    if bytes.data.is_null() {
        return None;
    }
    // SAFETY: the caller promises `len` readable bytes at `data`.
    Some(unsafe { core::slice::from_raw_parts(bytes.data, bytes.len) })
}

/// # Safety
/// As for [`slice`].
unsafe fn text<'a>(bytes: mqtt_bytes_t) -> Result<Option<&'a str>, mqtt_status_t> {
    // SAFETY: `bytes.data` is null or valid for `bytes.len` bytes (the caller's promise).
    match unsafe { slice(bytes) } {
        None => Ok(None),
        Some(raw) => crate::codec::utf8(raw).map(Some).ok_or(MQTT_ERR_INVALID_ARGUMENT),
    }
}

fn qos(value: u8) -> Result<QoS, mqtt_status_t> {
    QoS::from_bits(value).ok_or(MQTT_ERR_INVALID_ARGUMENT)
}

fn ticket_out(ticket: Ticket) -> mqtt_ticket_t {
    mqtt_ticket_t {
        slot: ticket.slot,
        packet_id: ticket.packet_id,
    }
}

/// The longest reason string `mqtt_session_reason` gives, in bytes.
pub const MQTT_REASON_MAX: usize = 64;

const _: () = assert!(MQTT_REASON_MAX == crate::session::REASON_MAX);

/// The longest client identifier `mqtt_session_assigned_client_id` gives.
pub const MQTT_ASSIGNED_ID_MAX: usize = 64;

const _: () = assert!(MQTT_ASSIGNED_ID_MAX == crate::session::ASSIGNED_ID_MAX);

/// The alignment, in bytes, that session memory has at least.
pub const MQTT_SESSION_ALIGN: usize = 8;

const _: () = assert!(align_of::<Session>() <= MQTT_SESSION_ALIGN);
const _: () = assert!(align_of::<V5>() <= MQTT_SESSION_ALIGN);

/// Bytes of memory a session of `protocol` (4: MQTT 3.1.1, 5: MQTT 5)
/// needs; 0 for another protocol level, and for 5 in an engine built
/// without MQTT 5.
#[unsafe(no_mangle)]
pub extern "C" fn mqtt_session_size(protocol: u8) -> size_t {
    match protocol {
        4 => size_of::<Session>(),
        5 if cfg!(feature = "mqtt5") => V5_OFFSET.saturating_add(size_of::<V5>()),
        _ => 0,
    }
}

/// Sets up a session in `memory` (`size` bytes, see `mqtt_session_size`,
/// aligned to `MQTT_SESSION_ALIGN` bytes) and returns it, or null when the memory does
/// not fit. `command_timeout_ms` bounds how long an acknowledgement, or the
/// rest of a started packet, may take; `max_packet_size` is the largest
/// incoming packet accepted. The memory holds no pointers, so it may be
/// freed without any call back into the engine.
///
/// # Safety
/// `memory` is valid for `size` writable bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mqtt_session_init(
    memory: *mut c_void,
    size: size_t,
    command_timeout_ms: u32,
    max_packet_size: u32,
    protocol: u8,
) -> *mut mqtt_session_t {
    let session = memory.cast::<Session>();
    let needed = mqtt_session_size(protocol);
    if session.is_null() || !session.is_aligned() || needed == 0 || size < needed {
        return core::ptr::null_mut();
    }
    let config = Config {
        command_timeout_ms,
        max_packet_size,
    };
    if cfg!(feature = "mqtt5") && protocol == 5 {
        // SAFETY: the memory holds `needed` bytes: the session, then its
        // V5 at V5_OFFSET, which is aligned as the memory is.
        unsafe {
            session.write(Session::new_v5(config));
            let v5 = memory.cast::<u8>().add(V5_OFFSET).cast::<V5>();
            v5.write(V5::new(ConnectProperties::default()));
        }
    } else {
        // SAFETY: non-null, aligned and large enough, as checked above.
        unsafe { session.write(Session::new(config)) };
    }
    memory.cast()
}

/// The Maximum Packet Size an MQTT 5 CONNECT states for a client that
/// takes packets whose remaining length is up to `max_packet_size`: the
/// whole packet's size, less one byte, for mosquitto (2.0.11 at least)
/// leaves the first byte out when it compares, and so sends packets one
/// byte over what is stated. 0 (none stated) when no limit applies.
fn stated_maximum_packet_size(max_packet_size: u32) -> u32 {
    if max_packet_size >= VARINT_MAX {
        return 0;
    }
    max_packet_size.saturating_add(varint_len(max_packet_size))
}

/// The rule of MQTT that the broker broke, when `status` says it broke
/// one (`MQTT_ERR_MALFORMED_LENGTH` to `MQTT_ERR_UNEXPECTED_PACKET`), as a
/// NUL-terminated text; null for any other status.
#[unsafe(no_mangle)]
pub extern "C" fn mqtt_broken_rule(status: c_int) -> *const c_char {
    const RULES: c_int = MQTT_ERR_MALFORMED_LENGTH as c_int - MQTT_ERR_UNEXPECTED_PACKET as c_int + 1;
    let mut index = (MQTT_ERR_MALFORMED_LENGTH as c_int).wrapping_sub(status);
    if !(0..RULES).contains(&index) {
        return core::ptr::null();
    }
    for (at, &byte) in BROKEN_RULES.iter().enumerate() {
        if index == 0 {
            return BROKEN_RULES
                .get(at..)
                .map_or(core::ptr::null(), |rule| rule.as_ptr().cast());
        }
        if byte == 0 {
            index = index.wrapping_sub(1);
        }
    }
    core::ptr::null()
}

/// Whether the broker accepted the connection and the link is up.
///
/// # Safety
/// `session` comes from `mqtt_session_init`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mqtt_session_is_connected(session: *mut mqtt_session_t) -> bool {
    // SAFETY: `session` is null or from `mqtt_session_init`, in no other call now (the caller's promise).
    unsafe { session_mut(session) }.is_some_and(|session| session.is_connected())
}

/// Sends CONNECT; `*ticket` follows the CONNACK.
///
/// # Safety
/// `session` comes from `mqtt_session_init`; the other pointers are valid.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mqtt_session_connect(
    session: *mut mqtt_session_t,
    transport: *const mqtt_transport_t,
    now_ms: u32,
    options: *const mqtt_connect_t,
    ticket: *mut mqtt_ticket_t,
) -> mqtt_status_t {
    let run = || -> Result<(), mqtt_status_t> {
        // SAFETY: `session` is null or from `mqtt_session_init`, in no other call now (the caller's promise).
        let (session, v5) = unsafe { session_parts(session) }.ok_or(MQTT_ERR_INVALID_ARGUMENT)?;
        // SAFETY: `options` is null or valid (the caller's promise).
        let options = unsafe { options.as_ref() }.ok_or(MQTT_ERR_INVALID_ARGUMENT)?;
        // SAFETY: `ticket` is null or valid (the caller's promise).
        let ticket = unsafe { ticket.as_mut() }.ok_or(MQTT_ERR_INVALID_ARGUMENT)?;
        // SAFETY: `transport` is null or valid (the caller's promise).
        let mut io = unsafe { link(transport, session, now_ms) }.ok_or(MQTT_ERR_INVALID_ARGUMENT)?;
        // SAFETY: each byte string of `options` (this one and the four
        // below) is null or valid for its `len` bytes (the caller's promise).
        let will_topic = unsafe { text(options.will_topic) }?;
        // SAFETY: as above.
        let will_payload = unsafe { slice(options.will_payload) }.unwrap_or(&[]);
        // SAFETY: as above.
        let client_id = unsafe { text(options.client_id) }?.unwrap_or("");
        // SAFETY: as above.
        let username = unsafe { text(options.username) }?;
        // SAFETY: as above.
        let password = unsafe { slice(options.password) };
        let will = match will_topic {
            Some(topic) => Some(Will {
                topic,
                payload: will_payload,
                qos: qos(options.will_qos)?,
                retain: options.will_retain,
            }),
            None => None,
        };
        let connect = Connect {
            client_id,
            clean_session: options.clean_session,
            keepalive_s: options.keepalive_s,
            will,
            username,
            password,
        };
        let sent = match v5 {
            Some(v5) => {
                // Without a session expiry of its own, a session that is
                // not clean outlives the link, as in MQTT 3.1.1.
                let default_expiry = if options.clean_session { 0 } else { u32::MAX };
                v5.connect = ConnectProperties {
                    session_expiry_s: v5.session_expiry_s.unwrap_or(default_expiry),
                    // No more unacknowledged QoS 1/2 messages than the
                    // QoS 2 ids the session can remember.
                    receive_maximum: u16::try_from(INBOUND_QOS2_MAX).unwrap_or(u16::MAX),
                    maximum_packet_size: stated_maximum_packet_size(session.max_packet_size()),
                    topic_alias_maximum: v5.topic_aliases_taken,
                };
                // SAFETY: null or valid, with valid byte strings (the caller's promise).
                let will = unsafe { message_properties(options.will_properties) }?;
                // SAFETY: valid pairs (the caller's promise).
                let user = unsafe { options.user_properties.checked() }?;
                session.connect_v5(&mut io, now_ms, &connect, user, &will, v5)
            }
            None => session.connect(&mut io, now_ms, &connect),
        };
        *ticket = ticket_out(sent.map_err(status)?);
        Ok(())
    };
    run().err().unwrap_or(MQTT_OK)
}

/// Sends DISCONNECT if the link is up, and marks it down.
///
/// # Safety
/// `session` comes from `mqtt_session_init`; `transport` is valid.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mqtt_session_disconnect(
    session: *mut mqtt_session_t,
    transport: *const mqtt_transport_t,
    now_ms: u32,
) -> mqtt_status_t {
    // SAFETY: `session` and `transport` are as `with_link` requires (the caller's promise).
    unsafe { with_link(session, transport, now_ms, |session, io| session.disconnect(io)) }
}

/// Records that the transport is gone; in-flight publishes are kept.
///
/// # Safety
/// `session` comes from `mqtt_session_init`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mqtt_session_link_lost(session: *mut mqtt_session_t) {
    // SAFETY: `session` is null or from `mqtt_session_init`, in no other call now (the caller's promise).
    if let Some(session) = unsafe { session_mut(session) } {
        session.link_lost();
    }
}

/// Sends a PUBLISH. For QoS 1 and 2, `*ticket` follows it; keep the topic
/// and payload until `MQTT_EVENT_COMPLETED` for that ticket.
///
/// # Safety
/// `session` comes from `mqtt_session_init`; the other pointers are valid.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mqtt_session_publish(
    session: *mut mqtt_session_t,
    transport: *const mqtt_transport_t,
    now_ms: u32,
    topic: mqtt_bytes_t,
    payload: mqtt_bytes_t,
    qos_level: u8,
    retain: bool,
    properties: *const mqtt_message_properties_t,
    aliases: *const mqtt_aliases_t,
    ticket: *mut mqtt_ticket_t,
) -> mqtt_status_t {
    let run = || -> Result<(), mqtt_status_t> {
        // SAFETY: `session` is null or from `mqtt_session_init`, in no other call now (the caller's promise).
        let (session, v5) = unsafe { session_parts(session) }.ok_or(MQTT_ERR_INVALID_ARGUMENT)?;
        // SAFETY: `ticket` is null or valid (the caller's promise).
        let ticket = unsafe { ticket.as_mut() }.ok_or(MQTT_ERR_INVALID_ARGUMENT)?;
        // SAFETY: `transport` is null or valid (the caller's promise).
        let mut io = unsafe { link(transport, session, now_ms) }.ok_or(MQTT_ERR_INVALID_ARGUMENT)?;
        // SAFETY: `topic.data` is null or valid for `topic.len` bytes (the caller's promise).
        let topic = unsafe { text(topic) }?.ok_or(MQTT_ERR_INVALID_ARGUMENT)?;
        // SAFETY: `payload.data` is null or valid for `payload.len` bytes (the caller's promise).
        let payload = unsafe { slice(payload) }.unwrap_or(&[]);
        let message = Message {
            topic,
            payload,
            // SAFETY: null or valid, with valid byte strings (the caller's promise).
            properties: unsafe { message_properties(properties) }?,
        };
        if let Some(v5) = v5.as_deref() {
            session
                .check_publish_v5(v5, &message, qos(qos_level)?, retain)
                .map_err(status)?;
        }
        // SAFETY: null or valid (the caller's promise).
        let mut topics = unsafe { aliases.as_ref() }.map(AliasesOfCaller);
        let aliases = match (v5, topics.as_mut()) {
            (Some(v5), Some(topics)) => Some((v5, topics as &mut dyn AliasTopics)),
            _ => None,
        };
        let sent = session
            .publish_aliased(&mut io, now_ms, &message, qos(qos_level)?, retain, aliases)
            .map_err(status)?;
        *ticket = sent.map(ticket_out).unwrap_or(mqtt_ticket_t { slot: 0, packet_id: 0 });
        Ok(())
    };
    run().err().unwrap_or(MQTT_OK)
}

/// The caller's kept publishes as the session sees them, with room for
/// the properties of the one asked for.
struct KeptByCaller<'a> {
    kept: &'a mqtt_kept_t,
    properties: mqtt_message_properties_t,
}

impl Kept for KeptByCaller<'_> {
    fn publish(&mut self, ticket: Ticket) -> Option<Message<'_>> {
        let publish = self.kept.publish?;
        let mut topic = mqtt_bytes_t::NONE;
        let mut payload = mqtt_bytes_t::NONE;
        self.properties = mqtt_message_properties_t::NONE;
        // SAFETY: the callback gets the context the caller gave and three
        // valid places to write to.
        if !unsafe {
            publish(
                self.kept.context,
                ticket.slot,
                &mut topic,
                &mut payload,
                &mut self.properties,
            )
        } {
            return None;
        }
        // SAFETY: the caller promises the byte strings stay valid until
        // `mqtt_session_resume` returns.
        let topic = unsafe { text(topic) }.ok()??;
        // SAFETY: as above.
        let payload = unsafe { slice(payload) }.unwrap_or(&[]);
        // SAFETY: as above. Checked when first published, so it passes again.
        let properties = unsafe { message_properties(&self.properties) }.ok()?;
        Some(Message {
            topic,
            payload,
            properties,
        })
    }
}

/// Sends again, on a link that just came up (after CONNACK), what the
/// previous link left unacknowledged: the in-flight publishes whose topic
/// and payload the caller kept, then the pending PUBRELs.
///
/// # Safety
/// `session` comes from `mqtt_session_init`; the other pointers are valid.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mqtt_session_resume(
    session: *mut mqtt_session_t,
    transport: *const mqtt_transport_t,
    now_ms: u32,
    kept: *const mqtt_kept_t,
) -> mqtt_status_t {
    // SAFETY: the caller promises a valid pointer or null.
    let Some(kept) = (unsafe { kept.as_ref() }) else {
        return MQTT_ERR_INVALID_ARGUMENT;
    };
    // SAFETY: the caller promises valid pointers or null.
    unsafe {
        with_link(session, transport, now_ms, |session, io| {
            session.resume(
                io,
                now_ms,
                &mut KeptByCaller {
                    kept,
                    properties: mqtt_message_properties_t::NONE,
                },
            )
        })
    }
}

/// Sends SUBSCRIBE (`unsubscribe` false) or UNSUBSCRIBE for one filter.
/// `options` is MQTT 5's subscription options byte: bits 0-1 the QoS, bit
/// 2 No Local, bit 3 Retain As Published, bits 4-5 Retain Handling;
/// `subscription_id` its subscription identifier, 0 for none (an MQTT
/// 3.1.1 session takes a QoS alone). What the MQTT 5 broker's CONNACK
/// does not allow (wildcards, shared subscriptions, identifiers) fails
/// with `MQTT_ERR_BROKER_LIMIT` before anything is sent.
///
/// # Safety
/// `session` comes from `mqtt_session_init`; the other pointers are valid.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mqtt_session_subscribe(
    session: *mut mqtt_session_t,
    transport: *const mqtt_transport_t,
    now_ms: u32,
    filter: mqtt_bytes_t,
    options: u8,
    subscription_id: u32,
    unsubscribe: bool,
    ticket: *mut mqtt_ticket_t,
) -> mqtt_status_t {
    let run = || -> Result<(), mqtt_status_t> {
        // SAFETY: `session` is null or from `mqtt_session_init`, in no other call now (the caller's promise).
        let (session, v5) = unsafe { session_parts(session) }.ok_or(MQTT_ERR_INVALID_ARGUMENT)?;
        // SAFETY: `ticket` is null or valid (the caller's promise).
        let ticket = unsafe { ticket.as_mut() }.ok_or(MQTT_ERR_INVALID_ARGUMENT)?;
        // SAFETY: `transport` is null or valid (the caller's promise).
        let mut io = unsafe { link(transport, session, now_ms) }.ok_or(MQTT_ERR_INVALID_ARGUMENT)?;
        // SAFETY: `filter.data` is null or valid for `filter.len` bytes (the caller's promise).
        let filter = unsafe { text(filter) }?.ok_or(MQTT_ERR_INVALID_ARGUMENT)?;
        let sent = if unsubscribe {
            session.unsubscribe(&mut io, now_ms, filter)
        } else {
            let options = SubscriptionOptions::from_byte(options, subscription_id).ok_or(MQTT_ERR_INVALID_ARGUMENT)?;
            if let Some(v5) = v5 {
                v5.check_subscribe(filter, &options).map_err(status)?;
            }
            session.subscribe_with(&mut io, now_ms, filter, options)
        };
        *ticket = ticket_out(sent.map_err(status)?);
        Ok(())
    };
    run().err().unwrap_or(MQTT_OK)
}

/// What the caller waiting for the answer to `ticket` does next:
/// `since_ms` is when it began to wait,
/// `loop_may_reconnect` says that a loop running elsewhere may bring a
/// lost link back. Sets `*code` when answered.
///
/// # Safety
/// `session` comes from `mqtt_session_init`; `code` is valid.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mqtt_session_await(
    session: *mut mqtt_session_t,
    ticket: mqtt_ticket_t,
    now_ms: u32,
    since_ms: u32,
    loop_may_reconnect: bool,
    code: *mut u8,
) -> mqtt_await_t {
    // SAFETY: `session` is null or from `mqtt_session_init`, in no other call now; `code` is
    // null or valid (the caller's promise).
    let (Some(session), Some(code)) = (unsafe { session_mut(session) }, unsafe { code.as_mut() }) else {
        return MQTT_AWAIT_LINK_LOST;
    };
    let ticket = Ticket {
        slot: ticket.slot,
        packet_id: ticket.packet_id,
    };
    match session.await_answer(ticket, now_ms, since_ms, loop_may_reconnect) {
        Verdict::Answered(answer) => {
            *code = answer;
            MQTT_AWAIT_ANSWERED
        }
        Verdict::Pending => MQTT_AWAIT_PENDING,
        Verdict::AwaitReconnect => MQTT_AWAIT_RECONNECT,
        Verdict::ConnectTimedOut => MQTT_AWAIT_CONNECT_TIMED_OUT,
        Verdict::TimedOut => MQTT_AWAIT_TIMED_OUT,
        Verdict::LinkLostInFlight => MQTT_AWAIT_LINK_LOST_IN_FLIGHT,
        Verdict::LinkLost => MQTT_AWAIT_LINK_LOST,
    }
}

/// The command timeout the session was set up with, in milliseconds.
///
/// # Safety
/// `session` comes from `mqtt_session_init`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mqtt_session_command_timeout(session: *mut mqtt_session_t) -> u32 {
    // SAFETY: `session` is null or from `mqtt_session_init`, in no other call now (the caller's promise).
    unsafe { session_mut(session) }.map_or(0, |session| session.command_timeout_ms())
}

/// Whether bytes the engine already read wait to be handled: then call
/// `mqtt_session_receive` without waiting for the stream first.
///
/// # Safety
/// `session` comes from `mqtt_session_init`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mqtt_session_has_input(session: *mut mqtt_session_t) -> bool {
    // SAFETY: `session` is null or from `mqtt_session_init`, in no other call now (the caller's promise).
    unsafe { session_mut(session) }.is_some_and(|session| session.has_input())
}

/// Milliseconds until `mqtt_session_tick` has work to do, at most `limit_ms`.
///
/// # Safety
/// `session` comes from `mqtt_session_init`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mqtt_session_next_timer(session: *mut mqtt_session_t, now_ms: u32, limit_ms: u32) -> u32 {
    // SAFETY: `session` is null or from `mqtt_session_init`, in no other call now (the caller's promise).
    match unsafe { session_mut(session) } {
        Some(session) => session.next_timer(now_ms, limit_ms),
        None => limit_ms,
    }
}

/// The caller's sink as the session sees it.
struct Sink<'a> {
    sink: &'a mqtt_sink_t,
}

impl Sink<'_> {
    /// # Safety
    /// `room` is null or valid for `len` writable bytes until the step
    /// returns (the sink's promise).
    unsafe fn room<'b>(room: *mut u8, len: usize) -> Option<&'b mut [u8]> {
        // SAFETY: null is refused; otherwise the sink promises `len`
        // writable bytes that nothing else uses during the step.
        (!room.is_null()).then(|| unsafe { core::slice::from_raw_parts_mut(room, len) })
    }
}

impl MessageSink for Sink<'_> {
    fn topic(&mut self, len: usize) -> Option<&mut [u8]> {
        let topic = self.sink.topic?;
        // SAFETY: the callback gets the context the caller gave; the room
        // it returns is valid as `Sink::room` requires.
        unsafe { Self::room(topic(self.sink.context, len), len) }
    }

    fn properties(&mut self, len: usize) -> Option<&mut [u8]> {
        let properties = self.sink.properties?;
        // SAFETY: as for `topic`.
        unsafe { Self::room(properties(self.sink.context, len), len) }
    }

    fn topic_alias(&mut self, alias: u16, set: bool) -> bool {
        // SAFETY: the callback gets the context the caller gave.
        self.sink
            .topic_alias
            .is_some_and(|topic_alias| unsafe { topic_alias(self.sink.context, alias, set) })
    }

    fn payload(&mut self, len: usize) -> Option<&mut [u8]> {
        let payload = self.sink.payload?;
        // SAFETY: as for `topic`.
        unsafe { Self::room(payload(self.sink.context, len), len) }
    }

    fn message_ready(&mut self) -> bool {
        // SAFETY: the callback gets the context the caller gave.
        self.sink
            .message_ready
            .is_some_and(|ready| unsafe { ready(self.sink.context) })
    }

    fn completed(&mut self, ticket: Ticket) {
        if let Some(completed) = self.sink.completed {
            // SAFETY: the callback gets the context the caller gave.
            unsafe { completed(self.sink.context, ticket.slot) }
        }
    }
}

/// One step of the caller's loop, after it waited for input: handles what
/// has arrived up to the next message to deliver (which goes into `sink`)
/// or to report dropped, then runs the keepalive and CONNECT timers. Any
/// error status means the link is failed: close it.
///
/// # Safety
/// `session` comes from `mqtt_session_init`; the other pointers are valid.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mqtt_session_step(
    session: *mut mqtt_session_t,
    transport: *const mqtt_transport_t,
    now_ms: u32,
    sink: *const mqtt_sink_t,
    outcome: *mut mqtt_outcome_t,
) -> mqtt_status_t {
    let run = || -> Result<(), mqtt_status_t> {
        // SAFETY: the caller promises the pointers are valid or null.
        let (session, v5) = unsafe { session_parts(session) }.ok_or(MQTT_ERR_INVALID_ARGUMENT)?;
        // SAFETY: as above.
        let outcome = unsafe { outcome.as_mut() }.ok_or(MQTT_ERR_INVALID_ARGUMENT)?;
        // SAFETY: as above.
        let sink = unsafe { sink.as_ref() }.ok_or(MQTT_ERR_INVALID_ARGUMENT)?;
        // SAFETY: as above.
        let mut io = unsafe { link(transport, session, now_ms) }.ok_or(MQTT_ERR_INVALID_ARGUMENT)?;
        *outcome = mqtt_outcome_t {
            kind: MQTT_OUTCOME_IDLE,
            code: 0,
            session_present: false,
            acknowledge: false,
            flags: 0,
            topic_read: false,
            too_large: false,
            payload_len: 0,
        };
        match session.step(&mut io, now_ms, &mut Sink { sink }, v5).map_err(status)? {
            Outcome::Idle => {}
            Outcome::ConnAck { code, session_present } => {
                outcome.kind = MQTT_OUTCOME_CONNACK;
                outcome.code = code;
                outcome.session_present = session_present;
            }
            Outcome::Message { acknowledge, flags } => {
                outcome.kind = MQTT_OUTCOME_MESSAGE;
                outcome.acknowledge = acknowledge;
                outcome.flags = flags;
            }
            Outcome::Dropped {
                payload_len,
                topic,
                too_large,
                flags,
            } => {
                outcome.kind = MQTT_OUTCOME_DROPPED;
                outcome.payload_len = payload_len;
                outcome.topic_read = topic;
                outcome.too_large = too_large;
                outcome.flags = flags;
            }
        }
        Ok(())
    };
    run().err().unwrap_or(MQTT_OK)
}

/// Acknowledges the current message (PUBACK or PUBREC as its QoS asks).
///
/// # Safety
/// `session` comes from `mqtt_session_init`; `transport` is valid.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mqtt_session_finish_message(
    session: *mut mqtt_session_t,
    transport: *const mqtt_transport_t,
    now_ms: u32,
) -> mqtt_status_t {
    // SAFETY: `session` and `transport` are as `with_link` requires (the caller's promise).
    unsafe {
        with_link(session, transport, now_ms, |session, io| {
            session.finish_message(io, now_ms)
        })
    }
}

/// Ends the current message without acknowledging it: `*token` (below
/// 2^26, so a binding can keep it as a small integer) is what
/// `mqtt_session_acknowledge` takes once the application has taken the
/// message; 0 when there is nothing to acknowledge (QoS 0).
///
/// # Safety
/// `session` comes from `mqtt_session_init`; `token` is valid.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mqtt_session_defer_message(session: *mut mqtt_session_t, token: *mut u32) -> mqtt_status_t {
    // SAFETY: `session` is null or from `mqtt_session_init`, in no other call now; `token` is
    // null or valid (the caller's promise).
    let (Some(session), Some(token)) = (unsafe { session_mut(session) }, unsafe { token.as_mut() }) else {
        return MQTT_ERR_INVALID_ARGUMENT;
    };
    let deferred = session.defer_message();
    *token = deferred.map_or(0, |deferred| deferred.map_or(0, |Deferred(token)| token));
    to_status(deferred.map(|_| ()))
}

/// Sends the acknowledgement `token` (from `mqtt_session_defer_message`)
/// stands for, if the link the message came on is still up.
///
/// # Safety
/// `session` comes from `mqtt_session_init`; `transport` is valid.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mqtt_session_acknowledge(
    session: *mut mqtt_session_t,
    transport: *const mqtt_transport_t,
    now_ms: u32,
    token: u32,
) -> mqtt_status_t {
    // SAFETY: `session` and `transport` are as `with_link` requires (the caller's promise).
    unsafe {
        with_link(session, transport, now_ms, |session, io| {
            session.acknowledge(io, now_ms, Deferred(token))
        })
    }
}

/// Turns built-in reconnection on: attempts are timed by
/// `mqtt_session_next_attempt`, between `min_ms` and `max_ms`, and the
/// subscriptions are sent again (`mqtt_session_resubscribe`) after a
/// reconnect to a broker that kept no session. `client_id` and `entropy`
/// (a fast clock, say) seed the jitter, so that devices differ. A
/// `min_ms` of 0 turns built-in reconnection off.
///
/// # Safety
/// `session` comes from `mqtt_session_init`; `client_id` is valid.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mqtt_session_set_backoff(
    session: *mut mqtt_session_t,
    min_ms: u32,
    max_ms: u32,
    client_id: mqtt_bytes_t,
    entropy: u32,
) {
    // SAFETY: `client_id.data` is null or valid for `client_id.len` bytes (the caller's promise).
    let id = unsafe { slice(client_id) }.unwrap_or(&[]);
    // FNV-1a of the client id, which differs from device to device.
    let seed = id.iter().fold(0x811c_9dc5u32, |hash, &byte| {
        (hash ^ u32::from(byte)).wrapping_mul(0x0100_0193)
    });
    // SAFETY: `session` is null or from `mqtt_session_init`, in no other call now (the caller's promise).
    if let Some(session) = unsafe { session_mut(session) } {
        session.set_backoff(min_ms, max_ms, seed ^ entropy);
    }
}

/// How long to wait, in milliseconds, before the next attempt to connect,
/// the link being down for `failure`, one of `MQTT_FAILURE_*` (`code`: the
/// CONNACK refusal); an unknown value counts as a lost link.
///
/// # Safety
/// `session` comes from `mqtt_session_init`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mqtt_session_next_attempt(
    session: *mut mqtt_session_t,
    now_ms: u32,
    failure: c_int,
    code: u8,
) -> u32 {
    let failure = match failure {
        MQTT_FAILURE_REFUSED => Failure::Refused(code),
        MQTT_FAILURE_HANDSHAKE => Failure::Handshake,
        _ => Failure::Link,
    };
    // SAFETY: `session` is null or from `mqtt_session_init`, in no other call now (the caller's promise).
    unsafe { session_mut(session) }.map_or(0, |session| session.next_attempt_delay(now_ms, failure))
}

/// The caller's subscription table as the session sees it.
struct FiltersOfCaller<'a> {
    filters: &'a mqtt_filters_t,
}

impl Filters for FiltersOfCaller<'_> {
    fn filter(&mut self, index: u16) -> Option<(&str, SubscriptionOptions)> {
        let get = self.filters.filter?;
        let mut filter = mqtt_bytes_t {
            data: core::ptr::null(),
            len: 0,
        };
        let mut level = 0u8;
        let mut subscription_id = 0u32;
        // SAFETY: the callback gets the context the caller gave and three
        // valid places to write to.
        if !unsafe {
            get(
                self.filters.context,
                index,
                &mut filter,
                &mut level,
                &mut subscription_id,
            )
        } {
            return None;
        }
        // SAFETY: the caller promises the filter stays valid until
        // `mqtt_session_resubscribe` returns.
        let filter = unsafe { text(filter) }.ok()??;
        Some((filter, SubscriptionOptions::from_byte(level, subscription_id)?))
    }
}

/// After a reconnect to a broker that kept no session (with built-in
/// reconnection on), sends the subscriptions of the caller's table again,
/// as many as the in-flight slots allow; call after every step until the
/// table is done (a call with nothing to do returns at once). Sets
/// `*refused` to how many resubscriptions the broker refused since the
/// last call.
///
/// # Safety
/// `session` comes from `mqtt_session_init`; the other pointers are valid.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mqtt_session_resubscribe(
    session: *mut mqtt_session_t,
    transport: *const mqtt_transport_t,
    now_ms: u32,
    filters: *const mqtt_filters_t,
    refused: *mut u8,
) -> mqtt_status_t {
    // SAFETY: the caller promises valid pointers or null.
    let (Some(filters), Some(refused)) = (unsafe { filters.as_ref() }, unsafe { refused.as_mut() }) else {
        return MQTT_ERR_INVALID_ARGUMENT;
    };
    // SAFETY: the caller promises valid pointers or null.
    unsafe {
        with_link(session, transport, now_ms, |session, io| {
            *refused = session.resubscribe(io, now_ms, &mut FiltersOfCaller { filters })?;
            Ok(())
        })
    }
}

/// An entry left the caller's subscription table (the ones after it moved
/// down): a resubscription under way starts again from the first entry.
///
/// # Safety
/// `session` comes from `mqtt_session_init`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mqtt_session_table_shrank(session: *mut mqtt_session_t) {
    // SAFETY: `session` is null or from `mqtt_session_init`, in no other call now (the caller's promise).
    if let Some(session) = unsafe { session_mut(session) } {
        session.table_shrank();
    }
}

/// Checks a topic name (`filter` false) or a topic filter; returns
/// `MQTT_OK` or `MQTT_ERR_INVALID_TOPIC`.
///
/// # Safety
/// `bytes.data` is valid for `bytes.len` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mqtt_topic_check(bytes: mqtt_bytes_t, filter: bool) -> mqtt_status_t {
    // SAFETY: `bytes.data` is null or valid for `bytes.len` bytes (the caller's promise).
    let raw = unsafe { slice(bytes) }.unwrap_or(&[]);
    let checked = if filter {
        crate::topic::check_filter(raw)
    } else {
        crate::topic::check_name(raw)
    };
    match checked {
        Ok(()) => MQTT_OK,
        Err(_) => MQTT_ERR_INVALID_TOPIC,
    }
}

/// Whether `topic` matches the topic filter `filter`.
///
/// # Safety
/// Both point to valid bytes of the given lengths.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mqtt_topic_matches(filter: mqtt_bytes_t, topic: mqtt_bytes_t) -> bool {
    // SAFETY: `filter.data` is null or valid for `filter.len` bytes (the caller's promise).
    let (filter, topic) = unsafe { (slice(filter).unwrap_or(&[]), slice(topic).unwrap_or(&[])) };
    crate::topic::matches(filter, topic)
}

/// The protocol level of `session`: 4 (MQTT 3.1.1) or 5 (MQTT 5); 0
/// for a null session.
///
/// # Safety
/// `session` comes from `mqtt_session_init`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mqtt_session_protocol(session: *mut mqtt_session_t) -> u8 {
    // SAFETY: the caller promises a valid pointer or null.
    unsafe { session_mut(session) }.map_or(0, |session| session.version())
}

/// Sets the Session Expiry Interval an MQTT 5 session's CONNECT asks for
/// (without one: 0 for a clean session, never for another, as in MQTT
/// 3.1.1). Does nothing to an MQTT 3.1.1 session.
///
/// # Safety
/// `session` comes from `mqtt_session_init`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mqtt_session_set_session_expiry(session: *mut mqtt_session_t, seconds: u32) {
    // SAFETY: the caller promises a valid pointer or null.
    if let Some((_, Some(v5))) = unsafe { session_parts(session) } {
        v5.session_expiry_s = Some(seconds);
    }
}

/// The largest subscription identifier (MQTT 5).
pub const MQTT_SUBSCRIPTION_ID_MAX: u32 = 268_435_455;

const _: () = assert!(MQTT_SUBSCRIPTION_ID_MAX == VARINT_MAX);

/// The properties an incoming message may carry (MQTT 5 identifiers), as
/// `mqtt_property_next` gives them.
pub const MQTT_PROPERTY_PAYLOAD_FORMAT: u8 = 0x01;
pub const MQTT_PROPERTY_MESSAGE_EXPIRY: u8 = 0x02;
pub const MQTT_PROPERTY_CONTENT_TYPE: u8 = 0x03;
pub const MQTT_PROPERTY_RESPONSE_TOPIC: u8 = 0x08;
pub const MQTT_PROPERTY_CORRELATION_DATA: u8 = 0x09;
pub const MQTT_PROPERTY_SUBSCRIPTION_ID: u8 = 0x0b;
pub const MQTT_PROPERTY_USER: u8 = 0x26;

const _: () = assert!(
    MQTT_PROPERTY_PAYLOAD_FORMAT == id::PAYLOAD_FORMAT
        && MQTT_PROPERTY_MESSAGE_EXPIRY == id::MESSAGE_EXPIRY
        && MQTT_PROPERTY_CONTENT_TYPE == id::CONTENT_TYPE
        && MQTT_PROPERTY_RESPONSE_TOPIC == id::RESPONSE_TOPIC
        && MQTT_PROPERTY_CORRELATION_DATA == id::CORRELATION_DATA
        && MQTT_PROPERTY_SUBSCRIPTION_ID == id::SUBSCRIPTION_ID
        && MQTT_PROPERTY_USER == id::USER_PROPERTY
);

/// One property of an incoming message: `id` (an `MQTT_PROPERTY_*`), and
/// `number` for an integer, `value` for a string (UTF-8) or binary data,
/// `name` and `value` for a user property (`data` null where unused).
#[repr(C)]
pub struct mqtt_property_t {
    pub id: u8,
    pub number: u32,
    pub name: mqtt_bytes_t,
    pub value: mqtt_bytes_t,
}

/// Reads the property at `*offset` (0 for the first) of a property block
/// that `mqtt_sink_t`'s `properties` room received, and moves `*offset`
/// to the next one; false at the block's end. A topic alias (the engine's
/// own business) is not given.
///
/// # Safety
/// `block` is valid for its length; `offset` and `property` are valid.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mqtt_property_next(
    block: mqtt_bytes_t,
    offset: *mut size_t,
    property: *mut mqtt_property_t,
) -> bool {
    // SAFETY: valid bytes (the caller's promise).
    let block = unsafe { slice(block) };
    // An engine without MQTT 5 keeps no property block.
    let Some(block) = block.filter(|_| cfg!(feature = "mqtt5")) else {
        return false;
    };
    // SAFETY: null or valid (the caller's promise).
    let (Some(offset), Some(property)) = (unsafe { offset.as_mut() }, unsafe { property.as_mut() }) else {
        return false;
    };
    loop {
        let Some((kept, next)) = kept_property(block, *offset) else {
            return false;
        };
        *offset = next;
        let (id, number, name, value) = match kept {
            KeptProperty::Number { id, .. } if id == id::TOPIC_ALIAS => continue,
            KeptProperty::Number { id, value } => (id, value, mqtt_bytes_t::NONE, mqtt_bytes_t::NONE),
            KeptProperty::Bytes { id, value } => (id, 0, mqtt_bytes_t::NONE, bytes_of(value)),
            KeptProperty::User { name, value } => {
                (id::USER_PROPERTY, 0, mqtt_bytes_t::of(name), mqtt_bytes_t::of(value))
            }
        };
        *property = mqtt_property_t {
            id,
            number,
            name,
            value,
        };
        return true;
    }
}

/// How many topic aliases an MQTT 5 session takes from the broker (sent in
/// the next CONNECT; at most `MQTT_INBOUND_ALIAS_MAX`, 0 by default): the
/// sink keeps a topic for each (`mqtt_sink_t`'s `topic_alias`). Returns
/// false for a number out of range or a session that is not MQTT 5.
///
/// # Safety
/// `session` comes from `mqtt_session_init`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mqtt_session_set_topic_aliases(session: *mut mqtt_session_t, count: u16) -> bool {
    // SAFETY: the caller promises a valid pointer or null.
    match unsafe { session_parts(session) } {
        Some((_, Some(v5))) if count <= INBOUND_ALIAS_MAX => {
            v5.topic_aliases_taken = count;
            true
        }
        _ => false,
    }
}

/// The most topic aliases a session takes from the broker.
pub const MQTT_INBOUND_ALIAS_MAX: u16 = 16;

const _: () = assert!(MQTT_INBOUND_ALIAS_MAX == INBOUND_ALIAS_MAX);

/// What an MQTT 5 reason code means, as a NUL-terminated text (null for
/// a code the standard does not define).
#[unsafe(no_mangle)]
pub extern "C" fn mqtt_reason_text(code: u8) -> *const c_char {
    if !cfg!(feature = "mqtt5") {
        return core::ptr::null();
    }
    crate::session::reason_text(code).map_or(core::ptr::null(), |text| text.as_ptr().cast())
}

/// The reason code of the MQTT 5 broker's last refusal (a CONNACK, an
/// acknowledgement, a DISCONNECT) and its reason string (`*reason`, at
/// most `MQTT_REASON_MAX` bytes of it, not NUL-terminated; empty when none
/// came). 0 for an MQTT 3.1.1 session.
///
/// # Safety
/// `session` comes from `mqtt_session_init`; `reason` is valid.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mqtt_session_reason(session: *mut mqtt_session_t, reason: *mut mqtt_bytes_t) -> u8 {
    // SAFETY: the caller promises valid pointers or null.
    let (Some((_, v5)), Some(reason)) = (unsafe { session_parts(session) }, unsafe { reason.as_mut() }) else {
        return 0;
    };
    let (code, text) = v5.map_or((0, ""), |v5| (v5.reason_code, v5.reason()));
    *reason = mqtt_bytes_t::of(text);
    code
}

/// The reason code of the MQTT 5 broker's last DISCONNECT, or -1 when
/// none came (or for an MQTT 3.1.1 session); `*reason` as for
/// `mqtt_session_reason`.
///
/// # Safety
/// `session` comes from `mqtt_session_init`; `reason` is valid.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mqtt_session_disconnect_reason(
    session: *mut mqtt_session_t,
    reason: *mut mqtt_bytes_t,
) -> c_int {
    // SAFETY: the caller promises valid pointers or null.
    let (Some((_, Some(v5))), Some(reason)) = (unsafe { session_parts(session) }, unsafe { reason.as_mut() }) else {
        return -1;
    };
    let Some(code) = v5.disconnect_code else {
        return -1;
    };
    let text = v5.reason();
    *reason = mqtt_bytes_t::of(text);
    c_int::from(code)
}

/// The client identifier the MQTT 5 broker assigned in its last CONNACK
/// (empty when it assigned none), valid until the next call on `session`.
///
/// # Safety
/// `session` comes from `mqtt_session_init`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mqtt_session_assigned_client_id(session: *mut mqtt_session_t) -> mqtt_bytes_t {
    // SAFETY: the caller promises a valid pointer or null.
    let text = match unsafe { session_parts(session) } {
        Some((_, Some(v5))) => v5.assigned_client_id(),
        _ => "",
    };
    mqtt_bytes_t::of(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(status: c_int) -> Option<&'static str> {
        let text = mqtt_broken_rule(status);
        // SAFETY: a non-null answer points into BROKEN_RULES, at a NUL-terminated text.
        (!text.is_null()).then(|| unsafe { core::ffi::CStr::from_ptr(text) }.to_str().unwrap())
    }

    #[test]
    fn an_mqtt5_session_is_larger_unless_the_engine_leaves_mqtt5_out() {
        let mqtt311 = mqtt_session_size(4);
        assert_eq!(mqtt311, size_of::<Session>());
        if cfg!(feature = "mqtt5") {
            assert!(mqtt_session_size(5) >= mqtt311 + size_of::<V5>());
        } else {
            assert_eq!(mqtt_session_size(5), 0);
        }
        assert_eq!(mqtt_session_size(3), 0);
    }

    #[test]
    fn every_broken_rule_has_its_own_text() {
        let rules: std::vec::Vec<_> = (MQTT_ERR_UNEXPECTED_PACKET as c_int..=MQTT_ERR_MALFORMED_LENGTH as c_int)
            .map(|status| rule(status).unwrap())
            .collect();
        assert_eq!(rules.len(), 13);
        assert!(rules.iter().all(|text| !text.is_empty()));
        let distinct: std::collections::BTreeSet<_> = rules.iter().collect();
        assert_eq!(distinct.len(), rules.len());
        assert_eq!(rule(MQTT_ERR_INVALID_FLAGS as c_int), Some("reserved flag bits set"));
        assert_eq!(
            rule(status(Error::UnexpectedPacket) as c_int),
            Some("packet not allowed now")
        );
        assert_eq!(
            rule(status(DecodeError::ZeroPacketId.into()) as c_int),
            Some("packet id 0")
        );
        assert_eq!(
            rule(status(DecodeError::InvalidProperty.into()) as c_int),
            Some("invalid property")
        );
    }

    #[test]
    fn other_statuses_break_no_rule() {
        for status in [MQTT_OK, MQTT_ERR_INVALID_TOPIC] {
            assert_eq!(rule(status as c_int), None);
        }
        for status in [-19, -33, -1000, c_int::MIN, c_int::MAX, 1] {
            assert_eq!(rule(status), None);
        }
    }

    /// The committed C header matches what cbindgen makes of this module.
    #[test]
    fn header_is_current() {
        let root = env!("CARGO_MANIFEST_DIR");
        let path = std::path::Path::new(root).join("mqtt_engine.h");
        let config = cbindgen::Config::from_root_or_default(root);
        let mut generated = std::vec::Vec::new();
        cbindgen::Builder::new()
            .with_crate(root)
            .with_config(config)
            .generate()
            .unwrap()
            .write(&mut generated);
        if std::env::var_os("MQTT_UPDATE_HEADER").is_some() {
            std::fs::write(&path, &generated).unwrap();
        }
        let committed = std::fs::read(&path).unwrap_or_default();
        assert!(
            committed == generated,
            "mqtt_engine.h is out of date: run `MQTT_UPDATE_HEADER=1 cargo test header` and commit it"
        );
    }
}
