"""Type stub of `mqtt`, the MQTT 3.1.1 client module compiled into the firmware.

It describes what modmqtt.c defines, for editors and type checkers;
tests/test_stub.py checks it against the firmware.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Final, Literal, Protocol

# What a payload or a password may be: a str or any object with the buffer
# protocol (bytes, bytearray, memoryview, array...).
_Buffer = str | bytes | bytearray | memoryview

# MQTT 5 user properties: (name, value) pairs, in order, names may repeat;
# or a dict.
_UserProperties = list[tuple[str, str]] | tuple[tuple[str, str], ...] | dict[str, str]

class _Stream(Protocol):
    """An already-connected stream: a socket, a machine.UART, or an io.IOBase
    subclass, which must also define ioctl(request, arg) to answer polls."""

    def readinto(self, buf: bytearray, /) -> int | None: ...
    def write(self, buf: bytearray, /) -> int | None: ...

class _SSLContext(Protocol):
    """An SSLContext of the `tls` (or `ssl`) module."""

    def wrap_socket(self, sock: _Stream, /, *, server_hostname: str | None) -> _Stream: ...

class _MessageCallback(Protocol):
    def __call__(self, client: Client, payload: bytes, topic: str, /) -> None: ...

class _ClientCallback(Protocol):
    def __call__(self, client: Client, /) -> None: ...

class _LoopFailure(Protocol):
    def __call__(self, client: Client, /) -> int | None: ...

class _DropCallback(Protocol):
    def __call__(self, client: Client, topic: str | None, length: int, /) -> None: ...

class MQTTException(Exception):
    """Raised with (code, text): a refused connection (code 1-5),
    SUBSCRIBE_FAILED, TIMEOUT or PROTOCOL_ERROR; with MQTT 5, REASON plus
    the reason code of the broker's refusal or DISCONNECT."""

    args: tuple[int, str]
    def __init__(self, code: int, text: str, /) -> None: ...

# What loop_failure returns: end the loop, or keep it going.
BREAK_LOOP: Final[int] = 0
RECOVERED: Final[int] = 1

# CONNACK return codes, as reconnect() and get_return_code() give them and
# as MQTTException carries a refusal.
CONNECTION_ACCEPTED: Final[int] = 0
CONNECTION_REFUSED_PROTOCOL_VERSION: Final[int] = 1
CONNECTION_REFUSED_IDENTIFIER_REJECTED: Final[int] = 2
CONNECTION_REFUSED_SERVER_UNAVAILABLE: Final[int] = 3
CONNECTION_REFUSED_BAD_USERNAME_PASSWORD: Final[int] = 4
CONNECTION_REFUSED_NOT_AUTHORIZED: Final[int] = 5

# The other codes of MQTTException.
SUBSCRIBE_FAILED: Final[int] = 0x80
TIMEOUT: Final[int] = 0x100
PROTOCOL_ERROR: Final[int] = 0x101
# With MQTT 5, MQTTException carries REASON + the broker's reason code
# (0x87 "not authorized" as REASON + 0x87), apart from the codes above.
REASON: Final[int] = 0x200

# The protocol a Client speaks (Client(protocol=...)).
MQTTv311: Final[int] = 4
MQTTv5: Final[int] = 5

# What connect(start_loop=True) starts on this port: a background thread,
# turns run by the scheduler, or nothing ('cycle': call Client.cycle()).
LOOP: Final[Literal["thread", "scheduled", "cycle"]]

class Client:
    def __init__(
        self,
        client_id: str,
        clean_session: bool = True,
        cycle_timeout: int = 500,
        command_timeout: int = 60000,
        *,
        max_packet_size: int = 1048576,
        protocol: int = 4,
        session_expiry: int | None = None,
        topic_aliases: int = 0,
    ) -> None:
        """Makes a client; timeouts are in milliseconds and max_packet_size is
        the largest incoming packet accepted, in bytes. protocol is MQTTv311
        or MQTTv5; session_expiry (MQTT 5, seconds) is how long the broker
        keeps the session after the link ends (default: 0 for a clean
        session, for ever otherwise, as in MQTT 3.1.1); topic_aliases (MQTT
        5, 0-16) how many topic aliases the broker may use towards the
        client, each keeping a topic."""

    def connect(
        self,
        host: str | None,
        keepalive: int,
        port: int = 1883,
        ssl_ctx: _SSLContext | None = None,
        breconnect_cb: _ClientCallback | None = None,
        aconnect_cb: _ClientCallback | None = None,
        loop_failure: _LoopFailure | None = None,
        start_loop: bool = True,
        *,
        stream: _Stream | None = None,
        auto_reconnect: bool | tuple[int, int] | None = None,
        on_drop: _DropCallback | None = None,
        user_properties: _UserProperties | None = None,
    ) -> None:
        """Opens a TCP connection to host:port (or uses `stream`, which stays the
        caller's to close; host may then be None), sends CONNECT and waits for
        CONNACK. Raises OSError if unreachable, MQTTException if refused.
        auto_reconnect (True, or (min_ms, max_ms)): the loop reconnects by
        itself after a failure, with a growing, jittered wait, and subscribes
        again when the broker kept no session. on_drop(client, topic, length):
        told of a message read past and acknowledged because it was larger
        than max_packet_size or there was no memory for it. user_properties
        (MQTT 5) go in every CONNECT."""

    def reconnect(self) -> int:
        """Calls breconnect_cb, connects again with the same parameters, calls
        aconnect_cb on success; returns the CONNACK return code."""

    def get_return_code(self) -> int:
        """The CONNACK return code of the last connection attempt, or -1."""

    def disconnect_reason(self) -> tuple[int, str] | None:
        """MQTT 5: the reason code of the broker's last DISCONNECT and the
        reason string of its last refusal; None before any, and with MQTT
        3.1.1."""

    def assigned_client_id(self) -> str | None:
        """MQTT 5: the client identifier the broker assigned to a client
        made with an empty one, once connected; None otherwise."""

    def connected(self) -> bool:
        """Whether the link is up and the broker accepted the connection."""

    def message_flags(self) -> int | None:
        """Inside a message callback, the flags of the message's PUBLISH
        header: bit 0 retain, bits 1-2 QoS, bit 3 DUP (a resend); elsewhere
        those of the message messages() gave last, or None. Allocates
        nothing."""

    def message_properties(self) -> dict[str, object] | None:
        """MQTT 5: inside a message callback, the message's properties, by
        publish()'s keyword names (message_expiry, content_type,
        response_topic, correlation_data, payload_format, user_properties)
        plus subscription_ids, each only when present; elsewhere those of
        the message messages() gave last; None with MQTT 3.1.1. Made at each
        call from the property block kept with the message."""

    def loop(self) -> None:
        """Starts the background loop (see LOOP); a no-op while it runs.
        Raises OSError(ENOTCONN) without a connection."""

    def cycle(self) -> None:
        """Runs one loop cycle on the calling thread: waits up to cycle_timeout
        for input and handles it (while auto_reconnect brings a lost link
        back: one reconnection step). Raises OSError(EBUSY) while the loop
        runs."""

    def set_username_pw(self, username: str, password: _Buffer | None = "") -> None:
        """Sets the credentials sent by the next connections; an empty password
        sends none."""

    def set_will(
        self,
        topic: str,
        payload: _Buffer,
        qos: int = 0,
        retain: bool = False,
        *,
        delay: int | None = None,
        expiry: int | None = None,
        content_type: str | None = None,
        response_topic: str | None = None,
        correlation_data: _Buffer | None = None,
        payload_format: int | None = None,
        user_properties: _UserProperties | None = None,
    ) -> None:
        """Sets the will the broker publishes if the link dies without
        DISCONNECT; used by the next connections. The keyword properties are
        MQTT 5's: delay and expiry in seconds, payload_format 1 for UTF-8."""

    def publish(
        self,
        topic: str,
        payload: _Buffer = "",
        qos: int = 0,
        retain: bool = False,
        *,
        message_expiry: int | None = None,
        content_type: str | None = None,
        response_topic: str | None = None,
        correlation_data: _Buffer | None = None,
        payload_format: int | None = None,
        user_properties: _UserProperties | None = None,
    ) -> None:
        """Publishes a message; with QoS 1 or 2 returns once the broker has
        acknowledged it (raises MQTTException(TIMEOUT) if it does not in time).
        The keyword properties are MQTT 5's: message_expiry in seconds,
        payload_format 1 for UTF-8 text (a payload that is not raises
        ValueError); a message in flight goes again with them after a
        reconnect."""

    def subscribe(
        self,
        topic: str,
        function: _MessageCallback,
        qos: int = 0,
        *,
        no_local: bool = False,
        retain_as_published: bool = False,
        retain_handling: int = 0,
        subscription_id: int | None = None,
    ) -> int:
        """Subscribes `function` to the topic filter; returns the QoS the broker
        granted (0 from a message callback, which does not wait for it). The
        keyword options are MQTT 5's: no_local (not the client's own
        messages), retain_as_published (the retain flag as published),
        retain_handling (retained messages: 0 on subscribing, 1 only for a
        new subscription, 2 never) and subscription_id (1-268435455: the
        subscription then gets only the messages that carry it)."""

    def unsubscribe(self, topic: str, /) -> None:
        """Removes the subscription to the topic filter; its function is not
        called again."""

    def disconnect(self, timeout: int | None = None) -> None:
        """Sends DISCONNECT, closes the link and stops the loop; with a timeout
        (ms), also waits up to that long for the background loop to end."""

    # The asyncio API: the loop runs as an asyncio task, the calls are awaited.

    def aconnect(
        self,
        host: str | None,
        keepalive: int,
        port: int = 1883,
        ssl_ctx: _SSLContext | None = None,
        breconnect_cb: _ClientCallback | None = None,
        aconnect_cb: _ClientCallback | None = None,
        loop_failure: _LoopFailure | None = None,
        *,
        stream: _Stream | None = None,
        auto_reconnect: bool | tuple[int, int] | None = None,
        on_drop: _DropCallback | None = None,
        user_properties: _UserProperties | None = None,
        queue: int = 8,
    ) -> Awaitable[None]:
        """connect() for asyncio: the TCP connection, the TLS handshake and
        the CONNACK are awaited (the name lookup blocks), then the
        client's loop runs as an asyncio task instead of the port's loop.
        queue: how many QoS 0 messages messages() keeps (more are dropped and
        counted; QoS 1/2 are all kept, and acknowledged when taken)."""

    def apublish(
        self,
        topic: str,
        payload: _Buffer = "",
        qos: int = 0,
        retain: bool = False,
        *,
        message_expiry: int | None = None,
        content_type: str | None = None,
        response_topic: str | None = None,
        correlation_data: _Buffer | None = None,
        payload_format: int | None = None,
        user_properties: _UserProperties | None = None,
    ) -> Awaitable[None]:
        """publish() for asyncio: QoS 0 is sent at once; with QoS 1 or 2 the
        awaitable finishes when the broker acknowledged the message."""

    def asubscribe(
        self,
        topic: str,
        function: _MessageCallback | None = None,
        qos: int = 0,
        *,
        no_local: bool = False,
        retain_as_published: bool = False,
        retain_handling: int = 0,
        subscription_id: int | None = None,
    ) -> Awaitable[int]:
        """subscribe() for asyncio; gives the granted QoS. Without a function
        the messages go to messages()."""

    def aunsubscribe(self, topic: str, /) -> Awaitable[None]:
        """unsubscribe() for asyncio."""

    def adisconnect(self) -> Awaitable[None]:
        """Disconnects at once (as disconnect()); awaiting it waits for the
        loop task to end."""

    def messages(self) -> _Messages:
        """The messages of subscriptions made without a function, oldest
        first: async for topic, payload in client.messages(). The iteration
        ends when the queue is empty and the loop task has ended."""


class _Messages(Protocol):
    # QoS 0 messages dropped because the queue was full.
    dropped: int

    def __aiter__(self) -> _Messages: ...
    async def __anext__(self) -> tuple[str, bytes]: ...
