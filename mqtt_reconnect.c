// Connecting, and built-in reconnection (connect(auto_reconnect=...)): the
// phases of an attempt, each a step that does not wait, so that a
// scheduled loop never holds the application for a whole attempt. The
// engine times the attempts (its backoff), decides which failures wait
// longest, and has the subscriptions sent again. Part of modmqtt.c's
// translation unit.

// ---------------------------------------------------------------------------
// A new link's session

// What the CONNACK return codes 1-5 mean.
static const char *const refusals[] = {
    "unacceptable protocol version", "identifier rejected", "server unavailable",
    "bad user name or password", "not authorized",
};

// What the client kept of the publish in flight in `slot` (mqtt_kept_t):
// the topic str (with MQTT 5 properties: a (topic, properties) tuple) and
// the payload object it published. Never raises: publish() checked them.
static bool kept_publish(void *context, uint8_t slot, mqtt_bytes_t *topic, mqtt_bytes_t *payload,
    mqtt_message_properties_t *properties) {
    mp_obj_mqtt_client_t *self = context;
    mp_buffer_info_t info;
    if (self->held == NULL || slot >= MQTT_INFLIGHT_MAX || self->held[2 * slot] == MP_OBJ_NULL
        || !mp_get_buffer(self->held[2 * slot + 1], &info, MP_BUFFER_READ)) {
        return false;
    }
    mp_obj_t kept_topic = self->held[2 * slot];
    if (MQTT_V5 && mp_obj_is_type(kept_topic, &mp_type_tuple)) {
        mp_obj_tuple_t *with_properties = MP_OBJ_TO_PTR(kept_topic);
        kept_topic = with_properties->items[0];
        message_properties_of(with_properties->items[1], properties);
    }
    size_t len;
    const char *data = mp_obj_str_get_data(kept_topic, &len);
    *topic = (mqtt_bytes_t) { .data = (const uint8_t *)data, .len = len };
    *payload = (mqtt_bytes_t) { .data = info.buf, .len = info.len };
    return true;
}

// Entry `index` of the subscription table (mqtt_filters_t), for the engine
// to subscribe again. Never raises.
static bool table_filter(void *context, uint16_t index, mqtt_bytes_t *filter, uint8_t *options, uint32_t *id) {
    mp_obj_mqtt_client_t *self = context;
    size_t n;
    mp_obj_t *items;
    mp_obj_tuple_get(self->subscriptions, &n, &items);
    size_t at = (size_t)index * TABLE_ENTRY;
    if (at + TABLE_ENTRY > n) {
        return false;
    }
    size_t len;
    const char *data = mp_obj_str_get_data(items[at], &len);
    *filter = (mqtt_bytes_t) { .data = (const uint8_t *)data, .len = len };
    // kept_options() made it: a small int, or (options, id).
    mp_obj_t kept = items[at + 2];
    *id = 0;
    if (mp_obj_is_type(kept, &mp_type_tuple)) {
        mp_obj_tuple_t *both = MP_OBJ_TO_PTR(kept);
        kept = both->items[0];
        *id = (uint32_t)mp_obj_get_int_truncated(both->items[1]);
    }
    *options = (uint8_t)MP_OBJ_SMALL_INT_VALUE(kept);
    return true;
}

// Sends the next subscriptions again, when the engine says a reconnect
// lost them (with the lock held). Returns the engine's status.
static int resubscribe_more(mp_obj_mqtt_client_t *self) {
    if (!self->auto_reconnect || self->stream == MP_OBJ_NULL) {
        return MQTT_OK;
    }
    mqtt_transport_t transport = transport_of(self);
    mqtt_filters_t filters = { .context = self, .filter = table_filter };
    uint8_t refused = 0;
    int status = mqtt_session_resubscribe(session_of(self), &transport, now_ms(), &filters, &refused);
    if (refused > 0) {
        mp_printf(MICROPY_ERROR_PRINTER, "mqtt: the broker refused %u subscription(s) again after a reconnect\n", refused);
    }
    return status;
}

// Makes `stream` (over `sock`) the client's link and sends CONNECT; the
// CONNACK comes through the cycles; `*ticket` follows it. Returns the
// engine's status.
static int start_session(mp_obj_mqtt_client_t *self, mp_obj_t sock, mp_obj_t stream, mqtt_ticket_t *ticket) {
    mqtt_connect_t options = {
        .client_id = bytes_of_str(self->client_id, "client_id"),
        .username = optional_bytes(option(self, OPTION_USERNAME)),
        .password = optional_bytes(option(self, OPTION_PASSWORD)),
        .will_topic = optional_bytes(option(self, OPTION_WILL_TOPIC)),
        .will_payload = optional_bytes(option(self, OPTION_WILL_PAYLOAD)),
        .will_qos = self->will_qos,
        .will_retain = self->will_retain,
        .clean_session = self->clean_session,
        .keepalive_s = self->keepalive_s,
        .user_properties = user_properties_of(option(self, OPTION_USER_PROPERTIES)),
    };
    mqtt_message_properties_t will_properties;
    mp_obj_t kept = option(self, OPTION_WILL_PROPERTIES);
    if (MQTT_V5 && kept != mp_const_none) {
        message_properties_of(kept, &will_properties);
        options.will_properties = &will_properties;
    }
    client_lock(self);
    self->stream = stream;
    self->stream_buffers = stream != sock;
    self->owns_stream = option(self, OPTION_STREAM) == mp_const_none;
    self->sock_fd = socket_fd(sock);
    self->return_code = MQTT_NO_RETURN_CODE;
    clear_pending(self);
    if (self->clean_session && self->held != NULL) {
        memset(self->held, 0, sizeof(mp_obj_t) * 2 * MQTT_INFLIGHT_MAX);
    }
    mqtt_transport_t transport = transport_of(self);
    int status = mqtt_session_connect(session_of(self), &transport, now_ms(), &options, ticket);
    client_unlock(self);
    return status;
}

// The broker accepted the connection: sends again what the previous link
// left unacknowledged, and the subscriptions a lost session took along.
static int session_accepted(mp_obj_mqtt_client_t *self) {
    mqtt_kept_t kept = { .context = self, .publish = kept_publish };
    client_lock(self);
    mqtt_transport_t transport = transport_of(self);
    int status = mqtt_session_resume(session_of(self), &transport, now_ms(), &kept);
    if (status == MQTT_OK) {
        status = resubscribe_more(self);
    }
    client_unlock(self);
    return status;
}

// ---------------------------------------------------------------------------
// Built-in reconnection

// Whether the link is up (the broker accepted it).
static bool link_up(mp_obj_mqtt_client_t *self) {
    client_lock(self);
    bool up = mqtt_session_is_connected(session_of(self));
    client_unlock(self);
    return up;
}

// Ends the attempt under way, if any (with the lock held). A stream the
// application gave stays open: it is the application's.
static void end_attempt(mp_obj_mqtt_client_t *self) {
    mp_obj_t sock = self->attempt_sock;
    self->attempt_sock = MP_OBJ_NULL;
    if (sock != MP_OBJ_NULL && option(self, OPTION_STREAM) == mp_const_none) {
        close_quietly(sock);
    }
}

// Clears the way for a new connection (connect(), aconnect()): a
// reconnection under way gives way to it, and the old link goes.
static void give_way(mp_obj_mqtt_client_t *self) {
    client_lock(self);
    self->reconnect_phase = RECONNECT_OFF;
    end_attempt(self);
    drop_link(self);
    self->link_generation++;
    client_unlock(self);
}

// Stops reconnecting (disconnect(), or a loop that ends).
static void stop_reconnecting(mp_obj_mqtt_client_t *self) {
    client_lock(self);
    self->reconnect_phase = RECONNECT_OFF;
    end_attempt(self);
    client_unlock(self);
}

// The link is down for `failure` (one of MQTT_FAILURE_*; `code`: a CONNACK
// refusal): the next attempt waits as long as the engine's backoff says.
// Nothing when reconnecting stopped meanwhile (disconnect()).
static void attempt_later(mp_obj_mqtt_client_t *self, int failure, uint8_t code) {
    client_lock(self);
    end_attempt(self);
    if (self->stream != MP_OBJ_NULL) {
        drop_link(self);
    }
    bool stopped = self->reconnect_phase == RECONNECT_OFF;
    uint32_t delay = 0;
    if (!stopped) {
        delay = mqtt_session_next_attempt(session_of(self), now_ms(), failure, code);
        self->attempt_at = now_ms() + delay;
        self->reconnect_phase = RECONNECT_WAITING;
    }
    client_unlock(self);
    clear_pending(self);
    if (stopped) {
        return;
    }
    if (failure == MQTT_FAILURE_REFUSED) {
        if (speaks_v5(self)) {
            const char *meaning = mqtt_reason_text(code);
            mp_printf(MICROPY_ERROR_PRINTER, "mqtt: connection refused: %s (0x%02x); next attempt in %u ms\n",
                meaning != NULL ? meaning : "reason code", (unsigned)code, (unsigned)delay);
        } else {
            mp_printf(MICROPY_ERROR_PRINTER, "mqtt: connection refused: %s; next attempt in %u ms\n", refusals[code - 1], (unsigned)delay);
        }
    } else if (failure == MQTT_FAILURE_HANDSHAKE) {
        mp_printf(MICROPY_ERROR_PRINTER, "mqtt: TLS handshake failed; next attempt in %u ms\n", (unsigned)delay);
    }
}

// With built-in reconnection, the loop found the link lost: reconnecting
// starts (unless a callback brought the link back already).
static void start_reconnecting(mp_obj_mqtt_client_t *self) {
    client_lock(self);
    bool start = self->reconnect_phase == RECONNECT_OFF && !mqtt_session_is_connected(session_of(self));
    if (start) {
        self->reconnect_phase = RECONNECT_WAITING;
    }
    client_unlock(self);
    if (start) {
        attempt_later(self, MQTT_FAILURE_LINK, 0);
    }
}

// After a failed cycle: calls loop_failure(client), and tells whether the
// loop goes on. RECOVERED: it does (the callback reconnected). With
// built-in reconnection, anything but BREAK_LOOP (None, an exception, no
// callback) lets the client reconnect by itself. Without it, only
// RECOVERED keeps the loop alive.
static bool loop_goes_on(mp_obj_mqtt_client_t *self) {
    mp_obj_t verdict = mp_const_none;
    if (self->loop_failure != mp_const_none) {
        mp_obj_t self_obj = MP_OBJ_FROM_PTR(self);
        verdict = call_and_report(self->loop_failure, 1, &self_obj);
    }
    bool small = verdict != MP_OBJ_NULL && mp_obj_is_small_int(verdict);
    if (small && MP_OBJ_SMALL_INT_VALUE(verdict) == MQTT_RECOVERED) {
        return true;
    }
    if (!self->auto_reconnect || (small && MP_OBJ_SMALL_INT_VALUE(verdict) == MQTT_BREAK_LOOP)) {
        return false;
    }
    start_reconnecting(self);
    return true;
}

// Whether a failure raised during a TLS handshake is the handshake's own
// (a certificate, a protocol): anything but an OSError with a plain errno,
// which means the link itself failed.
static bool handshake_failure(mp_obj_t exception) {
    if (!mp_obj_is_subclass_fast(MP_OBJ_FROM_PTR(mp_obj_get_type(exception)), MP_OBJ_FROM_PTR(&mp_type_OSError))) {
        return true;
    }
    // mbedTLS's failures carry its negative codes.
    mp_obj_t value = mp_obj_exception_get_value(exception);
    return !mp_obj_is_small_int(value) || MP_OBJ_SMALL_INT_VALUE(value) <= 0;
}

// Starts a TCP connection to the broker without waiting for it: a new
// socket, kept in attempt_sock (where a failure or disconnect() closes
// it), non-blocking, connecting. The name lookup blocks (for as long as
// the port's resolver takes). Raises OSError when the connection cannot
// even start.
static mp_obj_t start_tcp(mp_obj_mqtt_client_t *self) {
    mp_obj_t address;
    mp_obj_t sock = new_socket(self, &address);
    client_lock(self);
    self->attempt_sock = sock;
    client_unlock(self);
    mp_obj_t setblocking = mp_const_false;
    call_method(sock, MP_QSTR_setblocking, 1, &setblocking);
    nlr_buf_t connecting;
    if (nlr_push(&connecting) == 0) {
        call_method(sock, MP_QSTR_connect, 1, &address);
        nlr_pop();
    } else {
        // A non-blocking connect is "in progress"; anything else failed.
        mp_obj_t errcode = mp_obj_exception_get_value(MP_OBJ_FROM_PTR(connecting.ret_val));
        if (!mp_obj_is_small_int(errcode) || (MP_OBJ_SMALL_INT_VALUE(errcode) != MP_EINPROGRESS && !mp_is_nonblocking_error(MP_OBJ_SMALL_INT_VALUE(errcode)))) {
            nlr_jump(connecting.ret_val);
        }
    }
    return sock;
}

// Phase RECONNECT_WAITING, when the attempt is due: breconnect_cb, then
// the TCP connection is started without waiting for it.
static void begin_attempt(mp_obj_mqtt_client_t *self) {
    notify(self, OPTION_BRECONNECT_CB);
    if (self->reconnect_phase != RECONNECT_WAITING) {
        // The callback disconnected, or reconnected itself.
        return;
    }
    if (option(self, OPTION_STREAM) != mp_const_none) {
        // The application's own stream: it is connected already, so the
        // attempt goes straight to CONNECT.
        client_lock(self);
        self->attempt_sock = option(self, OPTION_STREAM);
        self->reconnect_phase = RECONNECT_TCP;
        self->attempt_at = now_ms();
        client_unlock(self);
        return;
    }
    nlr_buf_t nlr;
    if (nlr_push(&nlr) == 0) {
        start_tcp(self);
        nlr_pop();
    } else {
        attempt_later(self, MQTT_FAILURE_LINK, 0);
        return;
    }
    client_lock(self);
    if (self->reconnect_phase == RECONNECT_WAITING) {
        self->reconnect_phase = RECONNECT_TCP;
        self->attempt_at = now_ms();
    } else {
        // disconnect() stopped reconnecting meanwhile.
        end_attempt(self);
    }
    client_unlock(self);
}

// Makes `stream` (over `sock`, the attempt's: a TLS wrapper or the socket
// itself) the link and sends CONNECT, whose CONNACK comes through the
// cycles and which `*ticket` follows. Returns the engine's status, or
// MQTT_LINK_REPLACED when disconnect() ended the attempt meanwhile.
static int take_link(mp_obj_mqtt_client_t *self, mp_obj_t sock, mp_obj_t stream, mqtt_ticket_t *ticket) {
    bool owned = option(self, OPTION_STREAM) == mp_const_none;
    client_lock(self);
    bool current = self->attempt_sock == sock;
    // The link owns the socket from here on.
    self->attempt_sock = MP_OBJ_NULL;
    client_unlock(self);
    if (!current) {
        if (owned) {
            close_quietly(stream);
        }
        return MQTT_LINK_REPLACED;
    }
    if (!aio_loop_runs(self)) {
        loop_watch_link(self, sock);
    }
    return start_session(self, sock, stream, ticket);
}

// Makes the connected `sock` the link: TLS (its handshake blocks, bounded
// by command_timeout), then CONNECT (see take_link). Raises what TLS
// raised.
static int open_session(mp_obj_mqtt_client_t *self, mp_obj_t sock, mqtt_ticket_t *ticket) {
    if (option(self, OPTION_STREAM) == mp_const_none) {
        set_nodelay(sock);
        set_command_timeout(self, sock);
    }
    return take_link(self, sock, secure_stream(self, sock), ticket);
}

// Phase RECONNECT_TCP, the socket connected: TLS, then CONNECT.
static void send_connect(mp_obj_mqtt_client_t *self, mp_obj_t sock) {
    mqtt_ticket_t ticket;
    int status;
    nlr_buf_t nlr;
    if (nlr_push(&nlr) == 0) {
        status = open_session(self, sock, &ticket);
        nlr_pop();
    } else {
        bool handshake = option(self, OPTION_SSL_CTX) != mp_const_none && handshake_failure(MP_OBJ_FROM_PTR(nlr.ret_val));
        attempt_later(self, handshake ? MQTT_FAILURE_HANDSHAKE : MQTT_FAILURE_LINK, 0);
        return;
    }
    if (status == MQTT_LINK_REPLACED || self->reconnect_phase != RECONNECT_TCP) {
        // disconnect() ended the attempt meanwhile.
        return;
    }
    self->reconnect_phase = RECONNECT_CONNACK;
    self->attempt_at = now_ms();
    if (status != MQTT_OK) {
        attempt_later(self, MQTT_FAILURE_LINK, 0);
    }
}

// Whether the TCP connection of `sock` is made (1), not yet (0), or
// failed: refused or unreachable (-1). Never waits.
static int tcp_progress(mp_obj_mqtt_client_t *self, mp_obj_t sock) {
    if (option(self, OPTION_STREAM) != mp_const_none) {
        return 1;
    }
    int errcode = 0;
    mp_uint_t ready = stream_poll(sock, MP_STREAM_POLL_WR, &errcode);
    if (ready == MP_STREAM_ERROR || (ready & (MP_STREAM_POLL_ERR | MP_STREAM_POLL_HUP))) {
        return -1;
    }
    // lwIP calls no socket callback when a connection is made: the caller
    // looks again soon.
    return (ready & MP_STREAM_POLL_WR) ? 1 : 0;
}

// Phase RECONNECT_TCP: is the connection made? Waits up to `wait_ms` for
// it. Returns how soon to look again.
static uint32_t check_tcp(mp_obj_mqtt_client_t *self, uint32_t wait_ms) {
    mp_obj_t sock = self->attempt_sock;
    if (sock == MP_OBJ_NULL) {
        attempt_later(self, MQTT_FAILURE_LINK, 0);
        return 0;
    }
    uint32_t left = command_time_left(self, self->attempt_at);
    if (left == 0) {
        attempt_later(self, MQTT_FAILURE_LINK, 0);
        return 0;
    }
    if (option(self, OPTION_STREAM) == mp_const_none && wait_ms > 0) {
        wait_ready(sock, socket_fd(sock), MP_STREAM_POLL_WR, MIN(wait_ms, left), false);
    }
    int progress = tcp_progress(self, sock);
    if (progress < 0) {
        attempt_later(self, MQTT_FAILURE_LINK, 0);
        return 0;
    }
    if (progress == 0) {
        return MIN(left, MQTT_TCP_POLL_MS);
    }
    send_connect(self, sock);
    return 0;
}

// Phase RECONNECT_CONNACK: runs a cycle, which reads the CONNACK when it
// comes. Returns how soon to look again.
static uint32_t check_connack(mp_obj_mqtt_client_t *self, uint32_t wait_ms) {
    int status = run_cycle(self, wait_ms);
    if (self->reconnect_phase != RECONNECT_CONNACK) {
        // A callback disconnected or reconnected.
        return 0;
    }
    if (self->return_code != 0 && self->return_code != MQTT_NO_RETURN_CODE) {
        attempt_later(self, MQTT_FAILURE_REFUSED, self->return_code);
        return 0;
    }
    if (status != MQTT_OK && status != MQTT_LINK_REPLACED) {
        attempt_later(self, MQTT_FAILURE_LINK, 0);
        return 0;
    }
    if (!link_up(self)) {
        // No CONNACK yet (the engine's timer fails the link when it is
        // late): a scheduled loop looks again when input or a timer is due.
        client_lock(self);
        uint32_t next = mqtt_session_next_timer(session_of(self), now_ms(), self->cycle_timeout_ms);
        client_unlock(self);
        return next;
    }
    self->reconnect_phase = RECONNECT_OFF;
    if (session_accepted(self) != MQTT_OK) {
        attempt_later(self, MQTT_FAILURE_LINK, 0);
        return 0;
    }
    notify(self, OPTION_ACONNECT_CB);
    return 0;
}

// With built-in reconnection, a QoS 1/2 publish while the link is down
// waits up to command_timeout for the loop to bring it back. Returns
// whether the link is up.
static bool wait_for_link(mp_obj_mqtt_client_t *self) {
    uint32_t since = now_ms();
    uint32_t timeout = mqtt_session_command_timeout(session_of(self));
    while (!link_up(self)) {
        if (!self->auto_reconnect || !loop_runs_elsewhere(self) || in_callback(self) || now_ms() - since >= timeout) {
            return false;
        }
        pause_briefly(now_ms() - since);
    }
    return true;
}

// One step of reconnection, waiting at most `wait_ms` (0 on a scheduled
// loop, which must not wait). Returns how soon the next step is wanted.
static uint32_t reconnect_step(mp_obj_mqtt_client_t *self, uint32_t wait_ms) {
    switch (self->reconnect_phase) {
        case RECONNECT_WAITING: {
            int32_t left = (int32_t)(self->attempt_at - now_ms());
            if (left > 0) {
                uint32_t rest = MIN((uint32_t)left, wait_ms);
                for (uint32_t start = now_ms(); now_ms() - start < rest && self->reconnect_phase == RECONNECT_WAITING;) {
                    sleep_a_little();
                }
                return rest < (uint32_t)left ? (uint32_t)left - rest : 0;
            }
            begin_attempt(self);
            return 0;
        }
        case RECONNECT_TCP:
            return check_tcp(self, wait_ms);
        case RECONNECT_CONNACK:
            return check_connack(self, wait_ms);
        default:
            return 0;
    }
}
