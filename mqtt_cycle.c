// The cycle: locking, the reader's role, receiving, and waiting for
// acknowledgements (README.md, "The binding inside: locks and roles",
// draws them). Part of modmqtt.c's translation unit.

// ---------------------------------------------------------------------------
// Locking and thread identity

// Identifies the calling thread (without threads, any non-NULL value).
static void *current_thread(mp_obj_mqtt_client_t *self) {
    #if MICROPY_PY_THREAD
    (void)self;
    return mp_thread_get_state();
    #else
    return self;
    #endif
}

static void client_lock(mp_obj_mqtt_client_t *self) {
    #if MICROPY_PY_THREAD
    // Never wait for our lock while holding the GIL: its holder may need it.
    MP_THREAD_GIL_EXIT();
    mp_thread_mutex_lock(&self->lock, 1);
    MP_THREAD_GIL_ENTER();
    #endif
    #if MQTT_LOOP_SCHEDULED
    self->lock_holder = current_thread(self);
    #endif
    (void)self;
}

static void client_unlock(mp_obj_mqtt_client_t *self) {
    #if MQTT_LOOP_SCHEDULED
    self->lock_holder = NULL;
    #endif
    #if MICROPY_PY_THREAD
    mp_thread_mutex_unlock(&self->lock);
    #endif
    (void)self;
}

// Whether the calling thread is inside a message callback of this client.
static bool in_callback(mp_obj_mqtt_client_t *self) {
    return self->callback_thread == current_thread(self);
}

// Marks the calling thread as inside a message callback (or not); returns
// the previous mark so that nested deliveries restore it.
static bool set_in_callback(mp_obj_mqtt_client_t *self, bool active) {
    bool previous = in_callback(self);
    self->callback_thread = active ? current_thread(self) : NULL;
    return previous;
}

// Waits a little while another thread makes progress: for the first
// milliseconds only by yielding the processor (an acknowledgement on a
// good link takes well under a millisecond), then in 1 ms sleeps.
static void pause_briefly(uint32_t waited_ms) {
    if (waited_ms >= 2) {
        sleep_a_little();
        return;
    }
    MP_THREAD_GIL_EXIT();
    #if MQTT_POSIX_POLL
    sched_yield();
    #else
    mp_hal_delay_us(50);
    #endif
    MP_THREAD_GIL_ENTER();
}

// ---------------------------------------------------------------------------
// Receiving

// Sends the next subscriptions again after a reconnect (mqtt_reconnect.c).
static int resubscribe_more(mp_obj_mqtt_client_t *self);

// Finds whether `filter` (with `callback`) is still in the current table.
static bool still_subscribed(mp_obj_mqtt_client_t *self, mp_obj_t filter, mp_obj_t callback) {
    size_t n;
    mp_obj_t *items;
    mp_obj_tuple_get(self->subscriptions, &n, &items);
    for (size_t i = 0; i + TABLE_ENTRY <= n; i += TABLE_ENTRY) {
        if (items[i] == filter && items[i + 1] == callback) {
            return true;
        }
    }
    return false;
}

// Whether a subscription without a callback (asubscribe() without one)
// matches `topic`: the message then goes to the queue. Never raises.
static bool queue_takes(mp_obj_mqtt_client_t *self, mp_obj_t topic) {
    size_t n;
    mp_obj_t *items;
    mp_obj_tuple_get(self->subscriptions, &n, &items);
    size_t len;
    const char *data = mp_obj_str_get_data(topic, &len);
    mqtt_bytes_t topic_bytes = { .data = (const uint8_t *)data, .len = len };
    for (size_t i = 0; i + TABLE_ENTRY <= n; i += TABLE_ENTRY) {
        if (items[i + 1] == mp_const_none) {
            data = mp_obj_str_get_data(items[i], &len);
            mqtt_bytes_t filter = { .data = (const uint8_t *)data, .len = len };
            if (mqtt_topic_matches(filter, topic_bytes)) {
                return true;
            }
        }
    }
    return false;
}

// A message read from the link, handed to the callbacks once the lock is
// released.
typedef struct _delivery_t {
    mp_obj_t topic;
    mp_obj_t payload;
    // MQTT 5: its property block (bytes, empty when it has none), or
    // MP_OBJ_NULL in MQTT 3.1.1.
    mp_obj_t properties;
    uint16_t link_generation;
    // QoS 1/2: acknowledged once the callbacks returned.
    bool acknowledge;
    // Its PUBLISH header flags: retain, QoS, DUP.
    uint8_t flags;
    // QoS 1/2 for the queue: its acknowledgement, deferred until
    // messages() gives it to the application (see mqtt_session_defer_message).
    uint32_t token;
    // A message that could not be taken (payload MP_OBJ_NULL): its
    // payload's length, and whether it was larger than max_packet_size
    // (else there was no memory for it). Its topic is None when unknown.
    bool too_large;
    uint32_t dropped_len;
} delivery_t;

// Puts a message in the queue that messages() empties (mqtt_asyncio.c).
static void aio_enqueue(mp_obj_mqtt_client_t *self, const delivery_t *message);

// Whether a subscription whose table entry keeps `options` (see
// kept_options()) takes a message with the property block `properties`:
// one with a subscription identifier (MQTT 5) takes only the messages
// that carry it, so that overlapping subscriptions each get their own
// copy; one without takes every message its filter matches. Never raises.
static bool subscription_takes(mp_obj_t options, mp_obj_t properties) {
    if (!MQTT_V5 || !mp_obj_is_type(options, &mp_type_tuple)) {
        return true;
    }
    uint32_t id = (uint32_t)mp_obj_get_int_truncated(((mp_obj_tuple_t *)MP_OBJ_TO_PTR(options))->items[1]);
    mp_buffer_info_t block;
    if (properties == MP_OBJ_NULL || !mp_get_buffer(properties, &block, MP_BUFFER_READ)) {
        return false;
    }
    mqtt_bytes_t bytes = { .data = block.buf, .len = block.len };
    size_t offset = 0;
    mqtt_property_t property;
    while (mqtt_property_next(bytes, &offset, &property)) {
        if (property.id == MQTT_PROPERTY_SUBSCRIPTION_ID && property.number == id) {
            return true;
        }
    }
    return false;
}

// Sets the property block message_properties() gives the callbacks (MQTT
// 5): None for none. Allocates nothing: a message with a block found the
// options made (sink_message_ready), and without them there is nothing to
// set.
static void set_message_properties(mp_obj_mqtt_client_t *self, mp_obj_t block) {
    if (MQTT_V5 && self->options != NULL && speaks_v5(self)) {
        bool none = block == MP_OBJ_NULL || block == mp_const_empty_bytes;
        self->options[OPTION_MESSAGE_PROPERTIES] = none ? mp_const_none : block;
    }
}

// Calls the callback of every subscription whose filter matches the
// message's topic (see subscription_takes() for those with an MQTT 5
// subscription identifier), and queues the message for messages() if one
// without a callback does (or its token, its deferred acknowledgement,
// says it was meant for the queue). Its flags and properties are what
// message_flags() and message_properties() give the callbacks. Called
// without the lock.
static void deliver(mp_obj_mqtt_client_t *self, const delivery_t *message) {
    mp_obj_t topic = message->topic, payload = message->payload;
    uint8_t flags = message->flags;
    uint32_t token = message->token;
    mp_obj_t snapshot = self->subscriptions;
    size_t n;
    mp_obj_t *items;
    mp_obj_tuple_get(snapshot, &n, &items);
    mqtt_bytes_t topic_bytes = bytes_of_str(topic, "topic");
    bool outer = set_in_callback(self, true);
    uint8_t outer_flags = self->message_flags;
    mp_obj_t outer_properties = option(self, OPTION_MESSAGE_PROPERTIES);
    self->message_flags = flags;
    set_message_properties(self, message->properties);
    bool queued = token != 0;
    for (size_t i = 0; i + TABLE_ENTRY <= n; i += TABLE_ENTRY) {
        if (!mqtt_topic_matches(bytes_of_str(items[i], "filter"), topic_bytes)
            || !subscription_takes(items[i + 2], message->properties)) {
            continue;
        }
        // An unsubscribe() (maybe by an earlier callback) takes effect at once.
        if (self->subscriptions != snapshot && !still_subscribed(self, items[i], items[i + 1])) {
            continue;
        }
        if (items[i + 1] == mp_const_none) {
            queued = true;
            continue;
        }
        mp_obj_t args[3] = { MP_OBJ_FROM_PTR(self), payload, topic };
        call_and_report(items[i + 1], 3, args);
    }
    self->message_flags = outer_flags;
    set_message_properties(self, outer_properties);
    set_in_callback(self, outer);
    if (queued) {
        aio_enqueue(self, message);
    }
}

// Allocates a vstr of `len` bytes without raising; false when out of memory.
static bool new_buffer(vstr_t *vstr, size_t len) {
    nlr_buf_t nlr;
    if (nlr_push(&nlr) == 0) {
        vstr_init_len(vstr, len);
        nlr_pop();
        return true;
    }
    return false;
}

// The engine's sink (mqtt_sink_t): where a step puts the message it reads.
// Its callbacks never raise. A short topic is read on the C stack, so that
// a topic the firmware knows as a qstr (any literal in the program) costs
// no allocation at all; a long one into a heap buffer that becomes the str.
#define MQTT_TOPIC_ON_STACK (64)

typedef struct _message_sink_t {
    mp_obj_mqtt_client_t *client;
    byte short_topic[MQTT_TOPIC_ON_STACK];
    size_t topic_len;
    vstr_t long_topic;
    vstr_t properties;
    vstr_t payload;
    // Heap buffers the step took and no object owns yet.
    bool topic_taken;
    bool properties_taken;
    bool payload_taken;
    mp_obj_t topic_obj;
    mp_obj_t properties_obj;
    mp_obj_t payload_obj;
} message_sink_t;

static uint8_t *sink_topic(void *context, size_t len) {
    message_sink_t *sink = context;
    sink->topic_len = len;
    if (len <= MQTT_TOPIC_ON_STACK) {
        return sink->short_topic;
    }
    sink->topic_taken = new_buffer(&sink->long_topic, len);
    return sink->topic_taken ? (uint8_t *)sink->long_topic.buf : NULL;
}

static uint8_t *sink_properties(void *context, size_t len) {
    message_sink_t *sink = context;
    sink->properties_taken = new_buffer(&sink->properties, len);
    return sink->properties_taken ? (uint8_t *)sink->properties.buf : NULL;
}

// The topic of the message the sink holds, as a str (see sink_topic);
// MP_OBJ_NULL when there is no memory for it. Never raises.
static mp_obj_t sink_topic_str(message_sink_t *sink) {
    if (sink->topic_obj != MP_OBJ_NULL) {
        return sink->topic_obj;
    }
    nlr_buf_t nlr;
    if (nlr_push(&nlr) != 0) {
        return MP_OBJ_NULL;
    }
    // The engine checked the topic's UTF-8 already.
    sink->topic_obj = sink->topic_len <= MQTT_TOPIC_ON_STACK
        ? mp_obj_new_str((const char *)sink->short_topic, sink->topic_len)
        : mp_obj_new_str_from_vstr(&sink->long_topic);
    nlr_pop();
    // The str owns the buffer now.
    sink->topic_taken = false;
    return sink->topic_obj;
}

// MQTT 5, a topic alias from the broker: keeps the message's topic str for
// `alias` (`set`), or makes the message's topic the str kept for it.
static bool sink_topic_alias(void *context, uint16_t alias, bool set) {
    message_sink_t *sink = context;
    mp_obj_t topics = option(sink->client, OPTION_INBOUND_ALIASES);
    if (topics == mp_const_none) {
        return false;
    }
    size_t n;
    mp_obj_t *items;
    mp_obj_tuple_get(topics, &n, &items);
    if (alias == 0 || alias > n) {
        return false;
    }
    if (set) {
        mp_obj_t topic = sink_topic_str(sink);
        if (topic == MP_OBJ_NULL) {
            return false;
        }
        items[alias - 1] = topic;
        return true;
    }
    sink->topic_obj = items[alias - 1];
    return sink->topic_obj != mp_const_none;
}

static uint8_t *sink_payload(void *context, size_t len) {
    message_sink_t *sink = context;
    sink->payload_taken = new_buffer(&sink->payload, len);
    return sink->payload_taken ? (uint8_t *)sink->payload.buf : NULL;
}

// Builds the topic str (unless a topic alias did), the payload bytes and the
// properties bytes from their buffers.
static bool sink_message_ready(void *context) {
    message_sink_t *sink = context;
    // Made already when a topic alias came with it.
    if (sink_topic_str(sink) == MP_OBJ_NULL) {
        return false;
    }
    nlr_buf_t nlr;
    if (nlr_push(&nlr) != 0) {
        return false;
    }
    sink->payload_obj = mp_obj_new_bytes_from_vstr(&sink->payload);
    // The objects own the buffers now.
    sink->payload_taken = false;
    if (sink->properties_taken) {
        // Where the callbacks find it (see set_message_properties).
        make_options(sink->client);
        sink->properties_obj = mp_obj_new_bytes_from_vstr(&sink->properties);
        sink->properties_taken = false;
    } else if (speaks_v5(sink->client)) {
        // A message without properties: none to read, and no allocation.
        sink->properties_obj = mp_const_empty_bytes;
    }
    nlr_pop();
    return true;
}

// The topic of a dropped message, from the sink's buffer (or the str
// made before the payload's object failed), or None when there is no
// memory for it. Never raises.
static mp_obj_t dropped_topic(message_sink_t *sink) {
    if (sink->topic_obj != MP_OBJ_NULL) {
        return sink->topic_obj;
    }
    nlr_buf_t nlr;
    if (nlr_push(&nlr) != 0) {
        return mp_const_none;
    }
    mp_obj_t topic = mp_const_none;
    if (sink->topic_len <= MQTT_TOPIC_ON_STACK) {
        topic = mp_obj_new_str((const char *)sink->short_topic, sink->topic_len);
    } else if (sink->topic_taken) {
        topic = mp_obj_new_str_from_vstr(&sink->long_topic);
        sink->topic_taken = false;
    }
    nlr_pop();
    return topic;
}

// Calls on_drop(client, topic, length) for a message dropped, if the
// client has one; returns whether it has.
static bool tell_on_drop(mp_obj_mqtt_client_t *self, mp_obj_t topic, size_t length) {
    mp_obj_t on_drop = option(self, OPTION_ON_DROP);
    if (on_drop == mp_const_none) {
        return false;
    }
    mp_obj_t args[3] = { MP_OBJ_FROM_PTR(self), topic, mp_obj_new_int_from_uint(length) };
    call_and_report(on_drop, 3, args);
    return true;
}

// Tells of a message that could not be taken (read past and acknowledged
// by the engine): on_drop(client, topic, length), or a printed line.
// Called without the lock.
static void report_drop(mp_obj_mqtt_client_t *self, mp_obj_t topic, uint32_t length, bool too_large) {
    if (tell_on_drop(self, topic, length)) {
        return;
    }
    const char *topic_text = topic == mp_const_none ? "?" : mp_obj_str_get_str(topic);
    mp_printf(MICROPY_ERROR_PRINTER, "mqtt: message of %u bytes on %s dropped: %s\n", (unsigned)length, topic_text,
        too_large ? "larger than max_packet_size" : "out of memory");
}

// The publish in `slot` is acknowledged: what was kept to resend it goes.
static void sink_completed(void *context, uint8_t slot) {
    mp_obj_mqtt_client_t *self = ((message_sink_t *)context)->client;
    if (self->held != NULL && slot < MQTT_INFLIGHT_MAX) {
        self->held[2 * slot] = MP_OBJ_NULL;
        self->held[2 * slot + 1] = MP_OBJ_NULL;
    }
}

// Handles what has arrived, up to the first message to deliver, then runs
// the timers: one engine step. Called with the lock held. Returns MQTT_OK
// or an engine error (a link failure).
static int process_input(mp_obj_mqtt_client_t *self, delivery_t *delivery) {
    if (self->stream == MP_OBJ_NULL) {
        return MQTT_ERR_NOT_CONNECTED;
    }
    mqtt_transport_t transport = transport_of(self);
    message_sink_t message = { .client = self };
    mqtt_sink_t sink = {
        .context = &message,
        .topic = sink_topic,
        .properties = MQTT_V5 ? sink_properties : NULL,
        .topic_alias = MQTT_V5 ? sink_topic_alias : NULL,
        .payload = sink_payload,
        .message_ready = sink_message_ready,
        .completed = sink_completed,
    };
    mqtt_outcome_t outcome;
    int status = mqtt_session_step(session_of(self), &transport, now_ms(), &sink, &outcome);
    if (status == MQTT_OK) {
        if (outcome.kind == MQTT_OUTCOME_CONNACK) {
            // connect() is waiting for this.
            self->return_code = outcome.code;
        } else if (outcome.kind == MQTT_OUTCOME_DROPPED) {
            // The engine read it past and acknowledged it: it is reported
            // once the lock is released, with its topic when one can be made.
            delivery->topic = outcome.topic_read ? dropped_topic(&message) : mp_const_none;
            delivery->payload = MP_OBJ_NULL;
            delivery->dropped_len = outcome.payload_len;
            delivery->too_large = outcome.too_large;
        } else if (outcome.kind == MQTT_OUTCOME_MESSAGE) {
            delivery->topic = message.topic_obj;
            delivery->payload = message.payload_obj;
            delivery->properties = message.properties_obj;
            delivery->link_generation = self->link_generation;
            delivery->acknowledge = outcome.acknowledge;
            delivery->flags = outcome.flags;
            if (outcome.acknowledge && queue_takes(self, message.topic_obj)) {
                // Acknowledged when taken: the broker's window of
                // unacknowledged messages bounds the queue.
                delivery->acknowledge = false;
                status = mqtt_session_defer_message(session_of(self), &delivery->token);
            }
        }
    }
    if (status == MQTT_OK) {
        // SUBACKs free in-flight slots: the next resubscriptions go.
        status = resubscribe_more(self);
    }
    // What a step that did not finish its message left behind.
    if (message.topic_taken) {
        vstr_clear(&message.long_topic);
    }
    if (message.properties_taken) {
        vstr_clear(&message.properties);
    }
    if (message.payload_taken) {
        vstr_clear(&message.payload);
    }
    return status;
}

// Waits for input, handles it and delivers a message that arrived; the
// body of run_cycle, run by the thread that holds the reader's role.
static int read_and_deliver(mp_obj_mqtt_client_t *self, uint32_t wait_ms) {
    client_lock(self);
    mp_obj_t stream = self->stream;
    int fd = self->sock_fd;
    bool buffers = self->stream_buffers;
    // Wake up in time for the keepalive timers; do not wait at all when
    // the engine holds input it read ahead.
    wait_ms = mqtt_session_has_input(session_of(self)) ? 0 : mqtt_session_next_timer(session_of(self), now_ms(), wait_ms);
    client_unlock(self);
    if (stream == MP_OBJ_NULL) {
        for (uint32_t start = now_ms(); now_ms() - start < wait_ms;) {
            sleep_a_little();
        }
        return MQTT_ERR_NOT_CONNECTED;
    }
    // Another thread may close the stream while we wait: the wait then
    // ends early, and the lock below sees the change.
    bool ready = wait_ready(stream, fd, MP_STREAM_POLL_RD, wait_ms, buffers);
    delivery_t delivery = { .topic = MP_OBJ_NULL };
    client_lock(self);
    self->input_ready = ready && self->stream == stream;
    int status = process_input(self, &delivery);
    self->input_ready = false;
    if (status != MQTT_OK && self->stream != MP_OBJ_NULL) {
        drop_link(self);
    }
    client_unlock(self);
    if (delivery.topic == MP_OBJ_NULL) {
        return status;
    }
    if (delivery.payload == MP_OBJ_NULL) {
        report_drop(self, delivery.topic, delivery.dropped_len, delivery.too_large);
        return status;
    }
    deliver(self, &delivery);
    if (!delivery.acknowledge || status != MQTT_OK) {
        // QoS 0 needs nothing more from the link: no lock to take (a
        // publisher woken by the callback is likely waiting for it).
        return status;
    }
    client_lock(self);
    if (self->link_generation != delivery.link_generation || self->stream == MP_OBJ_NULL) {
        // A callback disconnected or reconnected: that link is gone.
        status = MQTT_LINK_REPLACED;
    } else {
        mqtt_transport_t transport = transport_of(self);
        status = mqtt_session_finish_message(session_of(self), &transport, now_ms());
        if (status != MQTT_OK) {
            drop_link(self);
        }
    }
    client_unlock(self);
    return status;
}

// One cycle: waits up to `wait_ms` for input (without the lock), handles
// it, and calls the callbacks of a message that arrived (without the
// lock). A failed link is closed before this returns its status. One
// thread at a time reads the link, from its wait to the end of the message
// it delivers, so messages reach the callbacks one at a time and in order;
// another thread that wants a cycle meanwhile just lets the reader work.
static int run_cycle(mp_obj_mqtt_client_t *self, uint32_t wait_ms) {
    void *me = current_thread(self);
    client_lock(self);
    void *outer = self->reader;
    bool busy = outer != NULL && outer != me;
    if (!busy) {
        self->reader = me;
    }
    client_unlock(self);
    if (busy) {
        pause_briefly(0);
        return MQTT_OK;
    }
    // An exception (a KeyboardInterrupt while a board's wait runs pending
    // events) must not leave the reader's role taken.
    nlr_buf_t nlr;
    if (nlr_push(&nlr) != 0) {
        self->reader = outer;
        nlr_jump(nlr.ret_val);
    }
    int status = read_and_deliver(self, wait_ms);
    nlr_pop();
    self->reader = outer;
    return status;
}

// Whether the link has input waiting (read ahead by the engine, or in the
// stream, TLS's buffer included). Called on the interpreter's thread, by
// the loops that run as turns (scheduled, or an asyncio task).
static bool input_waiting(mp_obj_mqtt_client_t *self) {
    client_lock(self);
    bool waiting = self->stream != MP_OBJ_NULL && mqtt_session_has_input(session_of(self));
    mp_obj_t stream = self->stream;
    client_unlock(self);
    if (waiting || stream == MP_OBJ_NULL) {
        return waiting;
    }
    // Unlike transport_readable, a failed poll counts as no input: turns
    // would otherwise follow one another at once for as long as it fails.
    int errcode = 0;
    mp_uint_t ready = stream_poll(stream, MP_STREAM_POLL_RD, &errcode);
    return ready != MP_STREAM_ERROR && (ready & (MP_STREAM_POLL_RD | MP_STREAM_POLL_HUP | MP_STREAM_POLL_ERR));
}

// ---------------------------------------------------------------------------
// Waiting for acknowledgements

static NORETURN void raise_still_in_flight(const char *why) {
    raise_mqtt(MQTT_EXC_TIMEOUT, why, NULL);
}

// What is left of command_timeout since `since` (0 once it has passed).
static uint32_t command_time_left(mp_obj_mqtt_client_t *self, uint32_t since) {
    uint32_t waited = now_ms() - since;
    uint32_t timeout = mqtt_session_command_timeout(session_of(self));
    return waited < timeout ? timeout - waited : 0;
}

// Raises what the engine's verdict on a command that will not be answered
// means (MQTT_AWAIT_CONNECT_TIMED_OUT, _TIMED_OUT, _LINK_LOST_IN_FLIGHT or
// _LINK_LOST): MQTTException(TIMEOUT) for a publish, which stays in flight
// and goes again after a reconnect; OSError otherwise. `failure`: the
// status of the caller's own cycle that lost the link, or MQTT_OK.
static NORETURN void raise_unanswered(mp_obj_mqtt_client_t *self, int verdict, int failure) {
    switch (verdict) {
        case MQTT_AWAIT_CONNECT_TIMED_OUT:
            // A broker that does not answer CONNECT counts as unreachable.
            mp_raise_OSError(MP_ETIMEDOUT);
        case MQTT_AWAIT_TIMED_OUT:
            raise_still_in_flight("timeout: no acknowledgement within command_timeout");
        case MQTT_AWAIT_LINK_LOST_IN_FLIGHT:
            clear_pending(self);
            raise_still_in_flight("link lost: the message stays in flight");
        default:
            if (failure != MQTT_OK) {
                // What broke the link says more than ENOTCONN.
                raise_status(self, failure);
            }
            mp_raise_OSError(MP_ENOTCONN);
    }
}

// Waits until the command behind `ticket` is answered; returns its code
// (CONNACK or SUBACK return code). Runs cycles itself unless the loop runs
// on another thread. What an answer that does not come means (a timeout,
// a lost link, waiting for a loop that may reconnect) is the engine's
// verdict; this raises it: MQTTException(TIMEOUT) for a publish, which
// stays in flight and goes again after a reconnect; OSError otherwise.
static uint8_t wait_for(mp_obj_mqtt_client_t *self, mqtt_ticket_t ticket) {
    uint32_t since = now_ms();
    // The status of a cycle of ours that lost the link, if one did.
    int failure = MQTT_OK;
    for (;;) {
        uint8_t code = 0;
        client_lock(self);
        int verdict = mqtt_session_await(session_of(self), ticket, now_ms(), since, loop_runs_elsewhere(self), &code);
        client_unlock(self);
        if (verdict == MQTT_AWAIT_ANSWERED) {
            return code;
        }
        if (verdict == MQTT_AWAIT_RECONNECT) {
            // A loop runs elsewhere and may reconnect (in loop_failure);
            // a scheduled loop's turns run meanwhile.
            clear_pending(self);
            pause_briefly(now_ms() - since);
            continue;
        }
        if (verdict != MQTT_AWAIT_PENDING) {
            raise_unanswered(self, verdict, failure);
        }
        if (loop_on_other_thread(self)) {
            pause_briefly(now_ms() - since);
            continue;
        }
        int status = run_cycle(self, self->cycle_timeout_ms);
        if (status != MQTT_OK && status != MQTT_LINK_REPLACED) {
            loop_link_lost(self);
            failure = status;
        }
    }
}
