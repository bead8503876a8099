// The link: the engine's transport over a MicroPython stream (socket or
// TLS), opening and closing it, and what engine statuses mean as Python
// exceptions. Part of modmqtt.c's translation unit. MicroPython raises by
// longjmp, which must never cross Rust frames: the transport callbacks
// catch with nlr_push and stash it; the binding raises it afterwards.

// ---------------------------------------------------------------------------
// The transport: the engine's view of the stream

// Asks the stream whether it is ready for `events` without waiting. Never
// raises (the engine calls this, and a stream written in Python may raise):
// an exception counts as MP_STREAM_ERROR, and the read or write that
// follows meets the stream's trouble itself and reports it.
static mp_uint_t stream_poll(mp_obj_t stream, mp_uint_t events, int *errcode) {
    const mp_stream_p_t *protocol = mp_get_stream(stream);
    nlr_buf_t nlr;
    if (nlr_push(&nlr) == 0) {
        mp_uint_t ready = protocol->ioctl(stream, MP_STREAM_POLL, events, errcode);
        nlr_pop();
        return ready;
    }
    *errcode = MP_EIO;
    return MP_STREAM_ERROR;
}

// Sleeps about a millisecond after running pending events. With the
// interpreter lock (esp32), mp_hal_delay_ms would spin holding it, starving
// the other threads: sleep as select.poll waits there, the lock released.
static void sleep_a_little(void) {
    #if MICROPY_PY_THREAD_GIL
    mp_handle_pending(true);
    MP_THREAD_GIL_EXIT();
    #ifdef ESP_PLATFORM
    ulTaskNotifyTake(pdFALSE, 1);
    #else
    mp_hal_delay_us(1000);
    #endif
    MP_THREAD_GIL_ENTER();
    #else
    mp_hal_delay_ms(1);
    #endif
}

// Waits up to `timeout_ms` for the stream (whose socket has descriptor
// `fd`, or -1) to be ready for `events`. Returns false when the time ran
// out. Never raises on POSIX ports.
static bool wait_ready(mp_obj_t stream, int fd, mp_uint_t events, uint32_t timeout_ms, bool buffers) {
    (void)buffers;
    int errcode = 0;
    mp_uint_t ready;
    uint32_t start = now_ms();
    #if MQTT_POSIX_POLL
    // A stream that buffers (TLS) may hold input its socket no longer shows.
    if (buffers) {
        ready = stream_poll(stream, events, &errcode);
        if (ready == MP_STREAM_ERROR || (ready & (events | MP_STREAM_POLL_ERR | MP_STREAM_POLL_HUP | MP_STREAM_POLL_NVAL))) {
            return true;
        }
    }
    if (fd >= 0) {
        struct pollfd pfd = { .fd = fd, .events = (events & MP_STREAM_POLL_RD) ? POLLIN : POLLOUT };
        for (;;) {
            uint32_t waited = now_ms() - start;
            if (waited >= timeout_ms) {
                return false;
            }
            MP_THREAD_GIL_EXIT();
            int found = poll(&pfd, 1, (int)(timeout_ms - waited));
            MP_THREAD_GIL_ENTER();
            // EINTR: the GC stops threads with a signal; just wait again.
            if (found != 0 && !(found < 0 && errno == EINTR)) {
                return true;
            }
        }
    }
    #endif
    for (;;) {
        ready = stream_poll(stream, events, &errcode);
        if (ready == MP_STREAM_ERROR || (ready & (events | MP_STREAM_POLL_ERR | MP_STREAM_POLL_HUP))) {
            return true;
        }
        if (now_ms() - start >= timeout_ms) {
            return false;
        }
        sleep_a_little();
    }
}

static void stash_exception(mp_obj_mqtt_client_t *self, mp_obj_t exception) {
    if (self->pending_exception == MP_OBJ_NULL) {
        self->pending_exception = exception;
    }
}

static void stash_errno(mp_obj_mqtt_client_t *self, int errcode) {
    if (self->pending_errno == 0 && self->pending_exception == MP_OBJ_NULL) {
        self->pending_errno = (int16_t)errcode;
    }
}

// One read or write of the stream, waiting for readiness until the
// deadline. Returns bytes moved, 0 at end of stream, -1 on error (stashed).
static intptr_t transport_io(mp_obj_mqtt_client_t *self, void *buf, size_t len, uint32_t deadline, bool reading) {
    if (reading) {
        // What the cycle's wait saw may be what this read takes.
        self->input_ready = false;
    }
    if (self->stream == MP_OBJ_NULL) {
        stash_errno(self, MP_ENOTCONN);
        return -1;
    }
    const mp_stream_p_t *protocol = mp_get_stream(self->stream);
    nlr_buf_t nlr;
    if (nlr_push(&nlr) != 0) {
        stash_exception(self, MP_OBJ_FROM_PTR(nlr.ret_val));
        return -1;
    }
    intptr_t result;
    for (;;) {
        int errcode = 0;
        mp_uint_t moved = reading
            ? protocol->read(self->stream, buf, len, &errcode)
            : protocol->write(self->stream, buf, len, &errcode);
        if (moved != MP_STREAM_ERROR) {
            result = (intptr_t)moved;
            break;
        }
        if (!mp_is_nonblocking_error(errcode) && errcode != MP_EINTR) {
            stash_errno(self, errcode);
            result = -1;
            break;
        }
        int32_t left = (int32_t)(deadline - now_ms());
        mp_uint_t events = reading ? MP_STREAM_POLL_RD : MP_STREAM_POLL_WR;
        if (left <= 0 || !wait_ready(self->stream, self->sock_fd, events, (uint32_t)left, self->stream_buffers)) {
            stash_errno(self, MP_ETIMEDOUT);
            result = -1;
            break;
        }
    }
    nlr_pop();
    return result;
}

static intptr_t transport_read(void *context, uint8_t *buf, size_t len, uint32_t deadline) {
    return transport_io(context, buf, len, deadline, true);
}

static intptr_t transport_write(void *context, const uint8_t *buf, size_t len, uint32_t deadline) {
    intptr_t written = transport_io(context, (void *)buf, len, deadline, false);
    // A stream never accepts zero bytes of a non-empty write: treat as closed.
    if (written == 0 && len > 0) {
        stash_errno(context, MP_ECONNRESET);
        return -1;
    }
    return written;
}

static int transport_readable(void *context) {
    mp_obj_mqtt_client_t *self = context;
    if (self->input_ready) {
        // The cycle's wait just found input: no need to ask again.
        self->input_ready = false;
        return 1;
    }
    if (self->stream == MP_OBJ_NULL) {
        stash_errno(self, MP_ENOTCONN);
        return -1;
    }
    int errcode = 0;
    mp_uint_t ready = stream_poll(self->stream, MP_STREAM_POLL_RD, &errcode);
    // On an error, let the read find out what is wrong.
    return ready == MP_STREAM_ERROR || (ready & (MP_STREAM_POLL_RD | MP_STREAM_POLL_ERR | MP_STREAM_POLL_HUP));
}

// Not inlined: one copy of the code that fills it, not one per engine call.
static MP_NOINLINE mqtt_transport_t transport_of(mp_obj_mqtt_client_t *self) {
    return (mqtt_transport_t) { .context = self, .read = transport_read, .write = transport_write, .readable = transport_readable };
}

// ---------------------------------------------------------------------------
// Errors

// MQTTException(code, text), where `text` may hold one %s for `detail`.
static mp_obj_t mqtt_exception(int code, const char *text, const char *detail) {
    vstr_t message;
    vstr_init(&message, 0);
    vstr_printf(&message, text, detail);
    mp_obj_t args[2] = { MP_OBJ_NEW_SMALL_INT(code), mp_obj_new_str_from_vstr(&message) };
    return mp_obj_new_exception_args(&mp_type_MQTTException, 2, args);
}

static NORETURN void raise_mqtt(int code, const char *text, const char *detail) {
    nlr_raise(mqtt_exception(code, text, detail));
}

// Copies bytes the engine gave (valid while the lock is held) into `to`,
// at most `room` of them, and returns how many.
static size_t copy_out(char *to, size_t room, mqtt_bytes_t from) {
    size_t len = from.len < room ? from.len : room;
    memcpy(to, from.data, len);
    return len;
}

// MQTTException(MQTT_EXC_REASON + code, "<what>: <meaning> (0x..)[: <reason
// string>]") for an MQTT 5 reason code the broker sent, with the reason
// string of the broker's last refusal; `code` -1: the last refusal's code.
// Takes the lock for a moment: call without it.
static mp_obj_t reason_exception(mp_obj_mqtt_client_t *self, const char *what, int code) {
    // Copied out under the lock; nothing is allocated while it is held.
    char text[MQTT_REASON_MAX];
    mqtt_bytes_t reason;
    client_lock(self);
    uint8_t last = mqtt_session_reason(session_of(self), &reason);
    size_t len = copy_out(text, sizeof(text), reason);
    client_unlock(self);
    uint8_t shown = code < 0 ? last : (uint8_t)code;
    const char *meaning = mqtt_reason_text(shown);
    vstr_t message;
    vstr_init(&message, 0);
    vstr_printf(&message, "%s: %s (0x%02x)", what, meaning != NULL ? meaning : "reason code", shown);
    if (len > 0) {
        vstr_add_str(&message, ": ");
        vstr_add_strn(&message, text, len);
    }
    mp_obj_t args[2] = { MP_OBJ_NEW_SMALL_INT(MQTT_EXC_REASON + shown), mp_obj_new_str_from_vstr(&message) };
    return mp_obj_new_exception_args(&mp_type_MQTTException, 2, args);
}

// Whether the client speaks MQTT 5.
static bool speaks_v5(mp_obj_mqtt_client_t *self) {
    return MQTT_V5 && mqtt_session_protocol(session_of(self)) == 5;
}

// Raises what a subscription refused with `code` means.
static NORETURN void raise_subscription_refused(mp_obj_mqtt_client_t *self, uint8_t code) {
    if (speaks_v5(self)) {
        nlr_raise(reason_exception(self, "subscription refused", code));
    }
    raise_mqtt(MQTT_EXC_SUBSCRIBE_FAILED, "subscription refused by the broker", NULL);
}

static mp_obj_t os_error(int errcode) {
    return mp_obj_new_exception_arg1(&mp_type_OSError, MP_OBJ_NEW_SMALL_INT(errcode));
}

static void clear_pending(mp_obj_mqtt_client_t *self) {
    self->pending_exception = MP_OBJ_NULL;
    self->pending_errno = 0;
}

// The exception that the status of the last engine call means, taking
// what a transport callback stashed. Call without the lock held.
static mp_obj_t exception_for_status(mp_obj_mqtt_client_t *self, int status) {
    const char *rule = mqtt_broken_rule(status);
    mp_obj_t stashed = self->pending_exception;
    int errcode = self->pending_errno;
    clear_pending(self);
    switch (status) {
        case MQTT_ERR_INVALID_TOPIC:
            return mp_obj_new_exception_msg(&mp_type_ValueError, MP_ERROR_TEXT("invalid topic"));
        case MQTT_ERR_TOO_LONG:
            return mp_obj_new_exception_msg(&mp_type_ValueError, MP_ERROR_TEXT("too long for MQTT"));
        case MQTT_ERR_INVALID_CLIENT_ID:
            return mp_obj_new_exception_msg(&mp_type_ValueError, MP_ERROR_TEXT("empty client_id needs clean_session=True"));
        case MQTT_ERR_INVALID_ARGUMENT:
            return mp_obj_new_exception_msg(&mp_type_ValueError, MP_ERROR_TEXT("invalid argument"));
        case MQTT_ERR_NOT_CONNECTED:
            return os_error(MP_ENOTCONN);
        case MQTT_ERR_INFLIGHT_FULL:
            return os_error(MP_ENOBUFS);
        case MQTT_ERR_NOT_TEXT:
            return mp_obj_new_exception_msg(&mp_type_ValueError, MP_ERROR_TEXT("payload_format=1 needs a UTF-8 payload"));
        case MQTT_ERR_BROKER_LIMIT:
            return mp_obj_new_exception_msg(&mp_type_ValueError, MP_ERROR_TEXT("not allowed by the broker (its maximum QoS, retain or packet size)"));
        case MQTT_ERR_DISCONNECTED:
            return reason_exception(self, "disconnected by the broker", -1);
        case MQTT_ERR_PING_TIMEOUT:
            return mqtt_exception(MQTT_EXC_TIMEOUT, "timeout: no answer to keepalive ping", NULL);
        case MQTT_ERR_CONNECT_TIMEOUT:
            // A broker that does not answer CONNECT counts as unreachable.
            return os_error(MP_ETIMEDOUT);
        case MQTT_ERR_CLOSED:
            return os_error(MP_ECONNRESET);
        default:
            if (rule != NULL) {
                return mqtt_exception(MQTT_EXC_PROTOCOL, "protocol error: %s", rule);
            }
            if (stashed != MP_OBJ_NULL) {
                return stashed;
            }
            return os_error(errcode ? errcode : MP_EIO);
    }
}

// Raises what an engine status means for a call of the application.
static NORETURN void raise_status(mp_obj_mqtt_client_t *self, int status) {
    loop_link_lost(self);
    nlr_raise(exception_for_status(self, status));
}

// ---------------------------------------------------------------------------
// Opening and closing

// Closes a stream, ignoring any error.
static void close_quietly(mp_obj_t stream) {
    nlr_buf_t nlr;
    if (nlr_push(&nlr) == 0) {
        mp_stream_close(stream);
        nlr_pop();
    }
}

// Closes the stream (under the lock) and tells the session the link is gone.
static void drop_link(mp_obj_mqtt_client_t *self) {
    mqtt_session_link_lost(session_of(self));
    mp_obj_t stream = self->stream;
    self->stream = MP_OBJ_NULL;
    self->sock_fd = -1;
    // A stream the application gave stays open: it belongs to the application.
    if (stream != MP_OBJ_NULL && self->owns_stream) {
        close_quietly(stream);
    }
}

// Makes a TCP socket for the broker's address, which it returns in
// `*address`. Raises OSError when the name cannot be resolved.
static mp_obj_t new_socket(mp_obj_mqtt_client_t *self, mp_obj_t *address) {
    mp_obj_t socket_module = mp_import_name(MP_QSTR_socket, mp_const_none, MP_OBJ_NEW_SMALL_INT(0));
    mp_obj_t lookup[2] = { self->host, MP_OBJ_NEW_SMALL_INT(self->port) };
    mp_obj_t addresses = call_method(socket_module, MP_QSTR_getaddrinfo, 2, lookup);
    mp_obj_t found = mp_obj_subscr(addresses, MP_OBJ_NEW_SMALL_INT(0), MP_OBJ_SENTINEL);
    size_t n_fields;
    mp_obj_t *fields;
    mp_obj_get_array(found, &n_fields, &fields);
    if (n_fields < 5) {
        mp_raise_OSError(MP_EINVAL);
    }
    *address = fields[n_fields - 1];
    mp_obj_t socket_type = mp_load_attr(socket_module, MP_QSTR_socket);
    return mp_call_function_n_kw(socket_type, 3, 0, fields);
}

// Sets TCP_NODELAY (at IPPROTO_TCP, 6), so that a small packet leaves at
// once: the socket module's number for it (lwIP's is 0x40), or Linux's
// where it names none; ports without the option just keep Nagle.
static void set_nodelay(mp_obj_t sock) {
    nlr_buf_t nlr;
    if (nlr_push(&nlr) == 0) {
        mp_obj_t socket_module = mp_import_name(MP_QSTR_socket, mp_const_none, MP_OBJ_NEW_SMALL_INT(0));
        mp_obj_t found[2];
        mp_load_method_maybe(socket_module, MP_QSTR_TCP_NODELAY, found);
        mp_obj_t tcp_nodelay = found[0] != MP_OBJ_NULL ? found[0] : MP_OBJ_NEW_SMALL_INT(1);
        mp_obj_t option[3] = { MP_OBJ_NEW_SMALL_INT(6), tcp_nodelay, MP_OBJ_NEW_SMALL_INT(1) };
        call_method(sock, MP_QSTR_setsockopt, 3, option);
        nlr_pop();
    }
}

// Bounds the socket's blocking calls by command_timeout.
static void set_command_timeout(mp_obj_mqtt_client_t *self, mp_obj_t sock) {
    mp_obj_t timeout = mp_obj_new_float((mp_float_t)mqtt_session_command_timeout(session_of(self)) / 1000);
    call_method(sock, MP_QSTR_settimeout, 1, &timeout);
}

// Opens a TCP connection to the broker; raises OSError when it cannot be
// reached. The socket is returned connected and still blocking.
static mp_obj_t open_socket(mp_obj_mqtt_client_t *self) {
    mp_obj_t address;
    mp_obj_t sock = new_socket(self, &address);
    nlr_buf_t nlr;
    if (nlr_push(&nlr) == 0) {
        set_command_timeout(self, sock);
        call_method(sock, MP_QSTR_connect, 1, &address);
        set_nodelay(sock);
        nlr_pop();
    } else {
        close_quietly(sock);
        nlr_jump(nlr.ret_val);
    }
    return sock;
}

// Wraps a connected socket (or the stream the application gave) in TLS
// if the client has an SSLContext (the handshake blocks, bounded by the
// socket's timeout), and makes it non-blocking. Returns the stream the
// session talks to; raises what the handshake raised.
static mp_obj_t secure_stream(mp_obj_mqtt_client_t *self, mp_obj_t sock) {
    mp_obj_t stream = sock;
    mp_obj_t ssl_ctx = option(self, OPTION_SSL_CTX);
    if (ssl_ctx != mp_const_none) {
        // ssl_ctx.wrap_socket(sock, server_hostname=host)
        mp_obj_t call[5];
        mp_load_method(ssl_ctx, MP_QSTR_wrap_socket, call);
        call[2] = sock;
        call[3] = MP_OBJ_NEW_QSTR(MP_QSTR_server_hostname);
        call[4] = self->host;
        stream = mp_call_method_n_kw(1, 1, call);
    }
    // From here on every wait is a poll with a deadline. A given stream
    // without setblocking() (a UART, a stream class) must not block.
    mp_obj_t setblocking[3];
    mp_load_method_maybe(sock, MP_QSTR_setblocking, setblocking);
    if (setblocking[0] != MP_OBJ_NULL) {
        setblocking[2] = mp_const_false;
        mp_call_method_n_kw(1, 0, setblocking);
    }
    return stream;
}

// Wraps the connected, non-blocking socket of an attempt in TLS without
// the handshake, which tls_progress() then drives step by step.
static mp_obj_t start_tls(mp_obj_mqtt_client_t *self, mp_obj_t sock) {
    // ssl_ctx.wrap_socket(sock, server_hostname=host, do_handshake_on_connect=False)
    mp_obj_t call[7];
    mp_load_method(option(self, OPTION_SSL_CTX), MP_QSTR_wrap_socket, call);
    call[2] = sock;
    call[3] = MP_OBJ_NEW_QSTR(MP_QSTR_server_hostname);
    call[4] = self->host;
    call[5] = MP_OBJ_NEW_QSTR(MP_QSTR_do_handshake_on_connect);
    call[6] = mp_const_false;
    return mp_call_method_n_kw(1, 2, call);
}

// Drives the TLS handshake of `stream` (from start_tls) as far as the
// socket allows without waiting: true once it is done. An empty write does
// it: mbedTLS finishes the handshake before any write (and then sends an
// empty record, which TLS allows). Raises what the handshake raised (a
// certificate that does not verify, say).
static bool tls_progress(mp_obj_t stream) {
    int errcode = 0;
    static const byte nothing[1] = { 0 };
    mp_uint_t written = mp_get_stream(stream)->write(stream, nothing, 0, &errcode);
    if (written != MP_STREAM_ERROR) {
        return true;
    }
    if (!mp_is_nonblocking_error(errcode)) {
        mp_raise_OSError(errcode);
    }
    return false;
}

// Opens the link: a TCP connection, or the stream the application gave,
// wrapped in TLS if the client has an SSLContext. Runs without the lock;
// raises OSError when the broker cannot be reached.
static void open_link(mp_obj_mqtt_client_t *self, mp_obj_t *sock_out, mp_obj_t *stream_out) {
    mp_obj_t given = option(self, OPTION_STREAM);
    bool owned = given == mp_const_none;
    mp_obj_t sock = owned ? open_socket(self) : given;
    nlr_buf_t nlr;
    if (nlr_push(&nlr) == 0) {
        mp_obj_t stream = secure_stream(self, sock);
        nlr_pop();
        *sock_out = sock;
        *stream_out = stream;
    } else {
        if (owned) {
            close_quietly(sock);
        }
        nlr_jump(nlr.ret_val);
    }
}

// The descriptor of a socket, or -1 when the stream has none (a stream
// written in Python answers ioctls itself: never ask it).
static int socket_fd(mp_obj_t sock) {
    if (mp_obj_is_instance_type(mp_obj_get_type(sock))) {
        return -1;
    }
    int errcode = 0;
    const mp_stream_p_t *protocol = mp_get_stream(sock);
    mp_uint_t fd = protocol->ioctl(sock, MP_STREAM_GET_FILENO, 0, &errcode);
    return fd == MP_STREAM_ERROR ? -1 : (int)fd;
}
