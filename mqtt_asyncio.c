// The asyncio API: the client's loop as an asyncio task, and awaitable
// calls (aconnect, apublish, asubscribe, aunsubscribe, adisconnect and
// messages()). Part of modmqtt.c's translation unit.
//
// How it fits MicroPython's asyncio (extmod/asyncio/core.py): a task runs
// until it yields, and whatever it waits for puts it back in the run queue
// (core._task_queue, ordered by time). Here:
// - the loop task's coroutine is an Awaitable of kind RUN_LOOP: each send()
//   is one turn (the cycles for what arrived, or a step of reconnection).
//   Then the task waits for input in core._io_queue (the Client is
//   pollable: it answers with its socket's descriptor, so asyncio's poll
//   sleeps in the kernel), while a second task, RUN_TIMER, sleeps in the
//   run queue until the engine's next timer (keepalive, a deadline) and
//   then takes the loop task out of the I/O queue;
// - a task awaiting an answer sleeps in the run queue until its deadline,
//   and the loop task brings it forward when something arrived;
// - a task awaiting messages() sleeps likewise until a message is queued.
// A turn never waits for the link: it reads only what has arrived (a
// packet once begun is read to its end) and writes without waiting unless
// the socket's buffer is full. aconnect()'s TLS handshake goes step by
// step; the name lookup, and the handshake of a reconnection, block (as
// the README says).

// What the asyncio methods share with the blocking ones (modmqtt.c).
static bool configure_connect(size_t n_args, const mp_obj_t *pos_args, mp_map_t *kw_args, mp_obj_t *queue);
static NORETURN void raise_refusal(mp_obj_mqtt_client_t *self, int code);
static void parse_publish(size_t n_args, const mp_obj_t *pos_args, mp_map_t *kw_args, outgoing_t *message);
static bool publish_now(mp_obj_mqtt_client_t *self, const outgoing_t *message, mqtt_ticket_t *ticket);
static uint8_t start_subscription(size_t n_args, const mp_obj_t *pos_args, mp_map_t *kw_args, bool wait, mqtt_ticket_t *ticket, mp_obj_t *filter_out);
static mqtt_ticket_t start_unsubscription(mp_obj_mqtt_client_t *self, mp_obj_t filter);
static mp_obj_t update_subscriptions(mp_obj_mqtt_client_t *self, mp_obj_t filter, mp_obj_t callback, mp_obj_t options, mp_obj_t *installed);
static void end_link(mp_obj_mqtt_client_t *self);

// Tasks parked for an answer: one per in-flight slot, and CONNECT's last.
#define AIO_WAITERS (MQTT_INFLIGHT_MAX + 1)
#define AIO_CONNECT_WAITER (MQTT_INFLIGHT_MAX)

// Items of one queued message: topic, payload, (token << 4) | flags.
#define QUEUE_ENTRY (3)

// QoS 0 messages the queue holds unless aconnect(queue=...) says otherwise.
#define MQTT_DEFAULT_QUEUE (8)

// How long a task awaiting messages() sleeps before it looks again by
// itself (a queued message wakes it at once).
#define MQTT_READER_SLEEP_MS (3600000)

// What the asyncio API keeps for a client.
typedef struct _mqtt_aio_t {
    // The asyncio.core module, where the run queue, the I/O queue and the
    // current task are.
    mp_obj_t core;
    // The task running the loop, or MP_OBJ_NULL; the task waking it.
    mp_obj_t loop_task;
    mp_obj_t timer_task;
    // Tasks parked for an answer, by in-flight slot (MP_OBJ_NULL: none).
    mp_obj_t waiters[AIO_WAITERS];
    // The task parked in messages(), or MP_OBJ_NULL.
    mp_obj_t reader;
    // Tasks whose QoS 1/2 apublish() waits for built-in reconnection to
    // bring the link back (a list, made when first needed).
    mp_obj_t link_waiters;
    // A finished Awaitable (a QoS 0 apublish()), and messages()'s iterator.
    mp_obj_t done;
    mp_obj_t messages;
    // Ring of queued messages, QUEUE_ENTRY items each: the topic (with
    // MQTT 5 properties: a (topic, properties) tuple), the payload, and
    // the token and flags as a small int.
    mp_obj_t *queue;
    // The properties of the message messages() gave last (for
    // message_properties()), or MP_OBJ_NULL.
    mp_obj_t taken_properties;
    // QoS 0 messages dropped because the queue held `queue_bound`.
    uint32_t dropped;
    // What failed the link of aconnect()'s attempt (an engine status).
    int connect_status;
    uint16_t queue_head;
    uint16_t queue_len;
    uint16_t queue_capacity;
    uint16_t queue_bound;
    // The flags of the message messages() gave last (for message_flags()),
    // or -1.
    int16_t taken_flags;
    // aconnect()'s attempt is under way: a failure ends the loop task and
    // is raised to aconnect()'s caller, not retried.
    bool connecting;
    // The timer task is in the run queue.
    bool timer_armed;
} mqtt_aio_t;

// What an Awaitable does each time it is resumed.
enum {
    // Finished: returns `value` (a QoS 0 apublish(), say).
    AWAIT_DONE,
    // Waits for the answer to `ticket` (a publish, SUBSCRIBE or
    // UNSUBSCRIBE), then returns it.
    AWAIT_ANSWER,
    // A QoS 1/2 apublish() while built-in reconnection brings the link
    // back: waits for the link (up to command_timeout), publishes
    // `object` (topic, payload, qos | retain << 2), becomes AWAIT_ANSWER.
    AWAIT_LINK,
    // aconnect(): waits for the TCP connection of `object` (the socket),
    // then (with an ssl_ctx: AWAIT_TLS, for the handshake of `object`, the
    // TLS stream) sends CONNECT and becomes AWAIT_CONNACK.
    AWAIT_TCP,
    AWAIT_TLS,
    AWAIT_CONNACK,
    // messages(): waits for the next queued message.
    AWAIT_MESSAGE,
    // The coroutines of the loop task and of its timer.
    RUN_LOOP,
    RUN_TIMER,
};

typedef struct _mp_obj_awaitable_t {
    mp_obj_base_t base;
    mp_obj_mqtt_client_t *client;
    // AWAIT_DONE: the result. AWAIT_TCP: the socket. AWAIT_ANSWER for a
    // subscription: its filter (taken off the table if refused).
    mp_obj_t object;
    mqtt_ticket_t ticket;
    // When the wait began (the answer's deadline counts from here).
    uint32_t since;
    uint8_t kind;
    // AWAIT_TCP: looks so far; AWAIT_ANSWER: what the answer is for
    // (ANSWER_*).
    uint8_t detail;
} mp_obj_awaitable_t;

enum {
    ANSWER_PUBLISH,
    ANSWER_SUBSCRIBE,
    ANSWER_UNSUBSCRIBE,
};

static const mp_obj_type_t awaitable_type;

static mp_obj_t new_awaitable(mp_obj_mqtt_client_t *self, uint8_t kind, mp_obj_t object) {
    mp_obj_awaitable_t *awaitable = mp_obj_malloc(mp_obj_awaitable_t, &awaitable_type);
    awaitable->client = self;
    awaitable->object = object;
    awaitable->kind = kind;
    awaitable->detail = 0;
    awaitable->since = now_ms();
    return MP_OBJ_FROM_PTR(awaitable);
}

// ---------------------------------------------------------------------------
// asyncio's queues

static bool aio_loop_runs(mp_obj_mqtt_client_t *self) {
    return self->aio != NULL && self->aio->loop_task != MP_OBJ_NULL;
}

// The client's asyncio part, made on first use (imports asyncio).
static mqtt_aio_t *aio_of(mp_obj_mqtt_client_t *self) {
    if (self->aio == NULL) {
        mp_obj_t asyncio = mp_import_name(MP_QSTR_asyncio, mp_const_none, MP_OBJ_NEW_SMALL_INT(0));
        mqtt_aio_t *aio = m_new0(mqtt_aio_t, 1);
        aio->core = mp_load_attr(asyncio, MP_QSTR_core);
        aio->done = new_awaitable(self, AWAIT_DONE, mp_const_none);
        aio->queue_bound = MQTT_DEFAULT_QUEUE;
        aio->taken_flags = -1;
        self->aio = aio;
    }
    return self->aio;
}

static mp_obj_t core_attr(mqtt_aio_t *aio, qstr name) {
    return mp_load_attr(aio->core, name);
}

// asyncio's ticks, `delay_ms` from now (the run queue's time keys).
static mp_obj_t ticks_after(uint32_t delay_ms) {
    return MP_OBJ_NEW_SMALL_INT((mp_hal_ticks_ms() + delay_ms) & (MICROPY_PY_TIME_TICKS_PERIOD - 1));
}

// Puts `task` in the run queue, to run in `delay_ms`.
static void run_queue_push(mqtt_aio_t *aio, mp_obj_t task, uint32_t delay_ms) {
    mp_obj_t args[2] = { task, ticks_after(delay_ms) };
    call_method(core_attr(aio, MP_QSTR__task_queue), MP_QSTR_push, 2, args);
}

static void run_queue_remove(mqtt_aio_t *aio, mp_obj_t task) {
    call_method(core_attr(aio, MP_QSTR__task_queue), MP_QSTR_remove, 1, &task);
}

// Makes a task that waits (sleeping in the run queue, or in the I/O
// queue) run now. A task whose wait was cancelled (its data is the
// exception to throw) is left to asyncio.
static void wake_task(mqtt_aio_t *aio, mp_obj_t task) {
    mp_obj_t data = mp_load_attr(task, MP_QSTR_data);
    if (data == mp_const_none) {
        run_queue_remove(aio, task);
    } else if (data == core_attr(aio, MP_QSTR__io_queue)) {
        call_method(data, MP_QSTR_remove, 1, &task);
    } else {
        return;
    }
    run_queue_push(aio, task, 0);
}

// The calling task sleeps `delay_ms`, or until woken. Returns it.
static mp_obj_t sleep_current(mqtt_aio_t *aio, uint32_t delay_ms) {
    mp_obj_t task = core_attr(aio, MP_QSTR_cur_task);
    if (task == mp_const_none) {
        mp_raise_msg(&mp_type_RuntimeError, MP_ERROR_TEXT("await it in an asyncio task"));
    }
    run_queue_push(aio, task, delay_ms);
    return task;
}

// The timer task runs in `delay_ms` (and no longer when it was due).
static void arm_timer(mqtt_aio_t *aio, uint32_t delay_ms) {
    if (aio->timer_armed) {
        run_queue_remove(aio, aio->timer_task);
    }
    run_queue_push(aio, aio->timer_task, delay_ms);
    aio->timer_armed = true;
}

static void disarm_timer(mqtt_aio_t *aio) {
    if (aio->timer_armed) {
        run_queue_remove(aio, aio->timer_task);
        aio->timer_armed = false;
    }
}

// Wakes the tasks awaiting an answer (they look at their ticket again)
// and, if asked, the one awaiting messages().
static void wake_waiters(mqtt_aio_t *aio, bool reader) {
    for (size_t i = 0; i < AIO_WAITERS; i++) {
        if (aio->waiters[i] != MP_OBJ_NULL) {
            wake_task(aio, aio->waiters[i]);
        }
    }
    if (reader && aio->reader != MP_OBJ_NULL) {
        wake_task(aio, aio->reader);
    }
}

// Whether `task` is in the list `tasks`; takes it out if so.
static bool take_out(mp_obj_t tasks, mp_obj_t task) {
    if (tasks == MP_OBJ_NULL) {
        return false;
    }
    size_t n;
    mp_obj_t *items;
    mp_obj_list_get(tasks, &n, &items);
    for (size_t i = 0; i < n; i++) {
        if (items[i] == task) {
            call_method(tasks, MP_QSTR_remove, 1, &task);
            return true;
        }
    }
    return false;
}

// Wakes the tasks waiting for the link (it came back, or the loop ended).
static void wake_link_waiters(mqtt_aio_t *aio) {
    if (aio->link_waiters == MP_OBJ_NULL) {
        return;
    }
    size_t n;
    mp_obj_t *items;
    mp_obj_list_get(aio->link_waiters, &n, &items);
    for (size_t i = 0; i < n; i++) {
        wake_task(aio, items[i]);
    }
}

// ---------------------------------------------------------------------------
// The queue that messages() empties

static void aio_enqueue(mp_obj_mqtt_client_t *self, const delivery_t *message) {
    mp_obj_t topic = message->topic, payload = message->payload;
    uint32_t token = message->token;
    mqtt_aio_t *aio = self->aio;
    if (aio == NULL) {
        // Nothing can have asked for a queue (asubscribe() makes aio).
        return;
    }
    if (token == 0 && aio->queue_len >= aio->queue_bound) {
        // QoS 0 beyond the bound: dropped, counted, told to on_drop.
        aio->dropped++;
        tell_on_drop(self, topic, bytes_of_buffer(payload).len);
        return;
    }
    if (aio->queue_len == aio->queue_capacity) {
        // QoS 1/2 always find room: the broker's window bounds them.
        uint16_t capacity = aio->queue_capacity == 0 ? aio->queue_bound : 2 * aio->queue_capacity;
        mp_obj_t *bigger = m_new0(mp_obj_t, (size_t)capacity * QUEUE_ENTRY);
        for (uint16_t i = 0; i < aio->queue_len; i++) {
            size_t from = (size_t)((aio->queue_head + i) % aio->queue_capacity) * QUEUE_ENTRY;
            memcpy(bigger + (size_t)i * QUEUE_ENTRY, aio->queue + from, QUEUE_ENTRY * sizeof(mp_obj_t));
        }
        aio->queue = bigger;
        aio->queue_capacity = capacity;
        aio->queue_head = 0;
    }
    size_t at = (size_t)((aio->queue_head + aio->queue_len) % aio->queue_capacity) * QUEUE_ENTRY;
    aio->queue[at] = topic;
    if (MQTT_V5 && message->properties != MP_OBJ_NULL && message->properties != mp_const_empty_bytes) {
        mp_obj_t with_properties[2] = { topic, message->properties };
        aio->queue[at] = mp_obj_new_tuple(2, with_properties);
    }
    aio->queue[at + 1] = payload;
    aio->queue[at + 2] = MP_OBJ_NEW_SMALL_INT(((mp_int_t)token << 4) | message->flags);
    aio->queue_len++;
    if (aio->reader != MP_OBJ_NULL) {
        wake_task(aio, aio->reader);
    }
}

// Takes the oldest queued message as (topic, payload), acknowledging it
// if it waited for that; MP_OBJ_NULL when the queue is empty.
static mp_obj_t take_message(mp_obj_mqtt_client_t *self) {
    mqtt_aio_t *aio = self->aio;
    if (aio->queue_len == 0) {
        return MP_OBJ_NULL;
    }
    mp_obj_t *entry = aio->queue + (size_t)aio->queue_head * QUEUE_ENTRY;
    // An MQTT 5 message without properties has the empty block.
    mp_obj_t properties = speaks_v5(self) ? mp_const_empty_bytes : MP_OBJ_NULL;
    if (MQTT_V5 && mp_obj_is_type(entry[0], &mp_type_tuple)) {
        mp_obj_tuple_t *with_properties = MP_OBJ_TO_PTR(entry[0]);
        entry[0] = with_properties->items[0];
        properties = with_properties->items[1];
    }
    mp_obj_t message = mp_obj_new_tuple(2, entry);
    aio->taken_properties = properties;
    mp_int_t tag = MP_OBJ_SMALL_INT_VALUE(entry[2]);
    memset(entry, 0, QUEUE_ENTRY * sizeof(mp_obj_t));
    aio->queue_head = (uint16_t)((aio->queue_head + 1) % aio->queue_capacity);
    aio->queue_len--;
    aio->taken_flags = (int16_t)(tag & 0xf);
    uint32_t token = (uint32_t)(tag >> 4);
    if (token != 0) {
        client_lock(self);
        mqtt_transport_t transport = transport_of(self);
        int status = self->stream == MP_OBJ_NULL ? MQTT_OK : mqtt_session_acknowledge(session_of(self), &transport, now_ms(), token);
        if (status != MQTT_OK) {
            // The loop task finds the link gone when it next looks.
            drop_link(self);
            clear_pending(self);
        }
        client_unlock(self);
    }
    return message;
}

// ---------------------------------------------------------------------------
// The loop task

// The loop task is no longer the client's (it ended, or adisconnect() or
// disconnect() stopped it): its timer goes, and every task awaiting the
// client wakes to find out why. A stopped loop task ends at its next turn.
static void forget_loop_task(mqtt_aio_t *aio) {
    disarm_timer(aio);
    aio->loop_task = MP_OBJ_NULL;
    aio->timer_task = MP_OBJ_NULL;
    aio->connecting = false;
    wake_waiters(aio, true);
    wake_link_waiters(aio);
}

static mp_obj_t end_loop(mp_obj_mqtt_client_t *self) {
    forget_loop_task(self->aio);
    return MP_OBJ_STOP_ITERATION;
}

// Puts the calling task back in the run queue, to run in `delay_ms`,
// wherever a failed turn left it (already parked, or not).
static void park_again(mqtt_aio_t *aio, mp_obj_t task, uint32_t delay_ms) {
    mp_obj_t io_queue = core_attr(aio, MP_QSTR__io_queue);
    if (mp_load_attr(task, MP_QSTR_data) == io_queue) {
        call_method(io_queue, MP_QSTR_remove, 1, &task);
    } else {
        // A no-op for a task that is in no queue.
        run_queue_remove(aio, task);
    }
    run_queue_push(aio, task, delay_ms);
}

// The loop task waits for input, or for the engine's next timer.
static void wait_for_input(mp_obj_mqtt_client_t *self, uint32_t delay_ms) {
    mqtt_aio_t *aio = self->aio;
    mp_obj_t client = MP_OBJ_FROM_PTR(self);
    call_method(core_attr(aio, MP_QSTR__io_queue), MP_QSTR_queue_read, 1, &client);
    arm_timer(aio, delay_ms);
}

// After a failed cycle: tells whether the loop goes on (loop_failure and
// built-in reconnection decide, as for the other loops).
static bool loop_survives(mp_obj_mqtt_client_t *self, int status) {
    mqtt_aio_t *aio = self->aio;
    if (aio->connecting) {
        // aconnect()'s caller raises it.
        aio->connect_status = status;
        return false;
    }
    clear_pending(self);
    return loop_goes_on(self);
}

// One turn of the loop task: a step of reconnection, or the cycles for
// what has arrived; then it waits (in asyncio's queues) for the next.
// Returns MP_OBJ_STOP_ITERATION when the loop ends.
static mp_obj_t loop_turn(mp_obj_mqtt_client_t *self) {
    mqtt_aio_t *aio = self->aio;
    mp_obj_t me = core_attr(aio, MP_QSTR_cur_task);
    if (aio->loop_task != me) {
        // Stopped (or replaced by a later aconnect()'s): it just ends.
        return MP_OBJ_STOP_ITERATION;
    }
    disarm_timer(aio);
    if (self->reconnect_phase != RECONNECT_OFF) {
        uint32_t delay = reconnect_step(self, 0);
        wake_waiters(aio, false);
        if (self->reconnect_phase == RECONNECT_OFF) {
            wake_link_waiters(aio);
        }
        if (self->reconnect_phase == RECONNECT_CONNACK) {
            wait_for_input(self, delay);
        } else {
            sleep_current(aio, self->reconnect_phase == RECONNECT_OFF ? 0 : delay);
        }
        return mp_const_none;
    }
    bool more = true;
    for (int cycle = 0; cycle < MQTT_CYCLES_PER_TURN && more; cycle++) {
        int status = run_cycle(self, 0);
        if (aio->loop_task != me) {
            // A callback disconnected.
            return MP_OBJ_STOP_ITERATION;
        }
        if (status != MQTT_OK && status != MQTT_LINK_REPLACED && !loop_survives(self, status)) {
            return aio->loop_task == me ? end_loop(self) : MP_OBJ_STOP_ITERATION;
        }
        if (self->reconnect_phase != RECONNECT_OFF) {
            wake_waiters(aio, false);
            sleep_current(aio, 0);
            return mp_const_none;
        }
        more = input_waiting(self);
    }
    wake_waiters(aio, false);
    client_lock(self);
    bool linked = self->stream != MP_OBJ_NULL;
    uint32_t next = mqtt_session_next_timer(session_of(self), now_ms(), MQTT_READER_SLEEP_MS);
    client_unlock(self);
    if (more) {
        // Input still waiting (the engine's read-ahead, TLS): the other
        // tasks run first, then another turn. asyncio's poll would not
        // see it: it watches the socket.
        sleep_current(aio, 0);
    } else if (linked) {
        wait_for_input(self, next);
    } else {
        sleep_current(aio, self->cycle_timeout_ms);
    }
    return mp_const_none;
}

// The timer task's turn: the loop task's wait for input ends.
static mp_obj_t timer_turn(mp_obj_mqtt_client_t *self) {
    mqtt_aio_t *aio = self->aio;
    if (aio->timer_task != core_attr(aio, MP_QSTR_cur_task)) {
        // The timer of a loop task that was stopped.
        return MP_OBJ_STOP_ITERATION;
    }
    aio->timer_armed = false;
    if (aio->loop_task != MP_OBJ_NULL) {
        wake_task(aio, aio->loop_task);
    }
    // Parked in no queue until the loop task arms it again.
    return mp_const_none;
}

// Runs a turn of the loop task. An exception of the application's kind
// (a MemoryError, say) is printed and the loop goes on after
// cycle_timeout; anything else (KeyboardInterrupt, a cancellation) ends
// the loop and goes on up.
static mp_obj_t run_loop_turn(mp_obj_mqtt_client_t *self) {
    nlr_buf_t nlr;
    if (nlr_push(&nlr) == 0) {
        mp_obj_t result = loop_turn(self);
        nlr_pop();
        return result;
    }
    mp_obj_t exception = MP_OBJ_FROM_PTR(nlr.ret_val);
    mqtt_aio_t *aio = self->aio;
    mp_obj_t me = core_attr(aio, MP_QSTR_cur_task);
    bool current = aio->loop_task == me;
    if (!mp_obj_is_subclass_fast(MP_OBJ_FROM_PTR(mp_obj_get_type(exception)), MP_OBJ_FROM_PTR(&mp_type_Exception))) {
        if (current) {
            forget_loop_task(aio);
        }
        nlr_jump(nlr.ret_val);
    }
    if (!current) {
        return MP_OBJ_STOP_ITERATION;
    }
    mp_printf(MICROPY_ERROR_PRINTER, "mqtt: exception in the loop task:\n");
    mp_obj_print_exception(MICROPY_ERROR_PRINTER, exception);
    park_again(aio, me, self->cycle_timeout_ms);
    return mp_const_none;
}

// Starts the loop task and its timer.
static void start_loop_task(mp_obj_mqtt_client_t *self) {
    mqtt_aio_t *aio = self->aio;
    mp_obj_t create_task = core_attr(aio, MP_QSTR_create_task);
    aio->timer_task = mp_call_function_1(create_task, new_awaitable(self, RUN_TIMER, mp_const_none));
    // create_task() put it in the run queue: its first turn parks it.
    aio->timer_armed = true;
    aio->loop_task = mp_call_function_1(create_task, new_awaitable(self, RUN_LOOP, mp_const_none));
}

static void aio_stop(mp_obj_mqtt_client_t *self) {
    mqtt_aio_t *aio = self->aio;
    if (aio == NULL) {
        return;
    }
    mp_obj_t loop_task = aio->loop_task;
    aio->connecting = false;
    if (loop_task == MP_OBJ_NULL) {
        return;
    }
    forget_loop_task(aio);
    // It ends at its next turn (from the loop task itself, a callback:
    // at the end of this turn).
    if (core_attr(aio, MP_QSTR_cur_task) != loop_task) {
        wake_task(aio, loop_task);
    }
}

// ---------------------------------------------------------------------------
// Awaiting answers

// The step of an Awaitable waiting for the answer to its ticket: returns
// the answer, raises what its absence means, or parks the calling task
// until the loop task or the deadline wakes it.
static mp_obj_t answer_step(mp_obj_awaitable_t *awaitable) {
    mp_obj_mqtt_client_t *self = awaitable->client;
    mqtt_aio_t *aio = self->aio;
    mqtt_ticket_t ticket = awaitable->ticket;
    size_t waiter = ticket.slot < MQTT_INFLIGHT_MAX ? ticket.slot : AIO_CONNECT_WAITER;
    aio->waiters[waiter] = MP_OBJ_NULL;
    uint8_t code = 0;
    client_lock(self);
    int verdict = mqtt_session_await(session_of(self), ticket, now_ms(), awaitable->since, self->auto_reconnect && aio_loop_runs(self), &code);
    client_unlock(self);
    if (verdict == MQTT_AWAIT_ANSWERED) {
        // 0x80 in MQTT 3.1.1; any code from 0x80 up in MQTT 5.
        if (awaitable->detail == ANSWER_SUBSCRIBE && code >= MQTT_EXC_SUBSCRIBE_FAILED) {
            mp_obj_t smaller;
            update_subscriptions(self, awaitable->object, MP_OBJ_NULL, MP_OBJ_NEW_SMALL_INT(0), &smaller);
            raise_subscription_refused(self, code);
        }
        return mp_make_stop_iteration(awaitable->detail == ANSWER_SUBSCRIBE ? MP_OBJ_NEW_SMALL_INT(code) : mp_const_none);
    }
    if (verdict != MQTT_AWAIT_PENDING && verdict != MQTT_AWAIT_RECONNECT) {
        raise_unanswered(self, verdict, MQTT_OK);
    }
    if (!aio_loop_runs(self)) {
        // Nothing would read the answer.
        mp_raise_OSError(MP_ENOTCONN);
    }
    // Pending, or the link is being brought back: sleep until the deadline.
    aio->waiters[waiter] = sleep_current(aio, command_time_left(self, awaitable->since));
    return mp_const_none;
}

// The step of a QoS 1/2 apublish() waiting for the link: publishes once
// it is up, raises OSError(ENOTCONN) when command_timeout passed or the
// loop task ended, or parks the calling task until the loop task brings
// the link back.
static mp_obj_t link_step(mp_obj_awaitable_t *awaitable) {
    mp_obj_mqtt_client_t *self = awaitable->client;
    mqtt_aio_t *aio = self->aio;
    mp_obj_t me = core_attr(aio, MP_QSTR_cur_task);
    take_out(aio->link_waiters, me);
    if (link_up(self)) {
        mp_obj_t *fields;
        mp_obj_get_array_fixed_n(awaitable->object, 4, &fields);
        mp_int_t flags = MP_OBJ_SMALL_INT_VALUE(fields[2]);
        outgoing_t message = {
            .topic = fields[0], .payload = fields[1], .qos = flags & 3, .retain = flags >> 2, .properties = fields[3],
        };
        publish_now(self, &message, &awaitable->ticket);
        awaitable->kind = AWAIT_ANSWER;
        awaitable->detail = ANSWER_PUBLISH;
        awaitable->object = mp_const_none;
        awaitable->since = now_ms();
        return answer_step(awaitable);
    }
    uint32_t left = command_time_left(self, awaitable->since);
    if (left == 0 || !aio_loop_runs(self)) {
        mp_raise_OSError(MP_ENOTCONN);
    }
    if (aio->link_waiters == MP_OBJ_NULL) {
        aio->link_waiters = mp_obj_new_list(0, NULL);
    }
    mp_obj_list_append(aio->link_waiters, sleep_current(aio, left));
    return mp_const_none;
}

// ---------------------------------------------------------------------------
// aconnect(): the first attempt

// The CONNACK came, or its absence is final: finishes aconnect() (the
// loop task goes on), or raises why it failed (the loop task ends).
static mp_obj_t connack_step(mp_obj_awaitable_t *awaitable) {
    mp_obj_mqtt_client_t *self = awaitable->client;
    mqtt_aio_t *aio = self->aio;
    aio->waiters[AIO_CONNECT_WAITER] = MP_OBJ_NULL;
    uint8_t code = 0;
    client_lock(self);
    int verdict = mqtt_session_await(session_of(self), awaitable->ticket, now_ms(), awaitable->since, false, &code);
    client_unlock(self);
    if (verdict == MQTT_AWAIT_PENDING && aio_loop_runs(self)) {
        aio->waiters[AIO_CONNECT_WAITER] = sleep_current(aio, mqtt_session_command_timeout(session_of(self)));
        return mp_const_none;
    }
    aio->connecting = false;
    int status = verdict == MQTT_AWAIT_ANSWERED && code == 0 ? session_accepted(self) : MQTT_OK;
    if (verdict == MQTT_AWAIT_ANSWERED && code == 0 && status == MQTT_OK) {
        notify(self, OPTION_ACONNECT_CB);
        return mp_make_stop_iteration(mp_const_none);
    }
    // Refused, or failed: the link and the loop task go.
    aio_stop(self);
    client_lock(self);
    drop_link(self);
    client_unlock(self);
    if (verdict == MQTT_AWAIT_ANSWERED && code != 0) {
        raise_refusal(self, code);
    }
    if (verdict == MQTT_AWAIT_CONNECT_TIMED_OUT) {
        mp_raise_OSError(MP_ETIMEDOUT);
    }
    if (status == MQTT_OK) {
        status = aio->connect_status != MQTT_OK ? aio->connect_status : MQTT_ERR_NOT_CONNECTED;
    }
    nlr_raise(exception_for_status(self, status));
}

static mp_obj_t tls_step(mp_obj_awaitable_t *awaitable);

// Ends aconnect()'s attempt that failed: its socket is closed.
static void give_up_attempt(mp_obj_mqtt_client_t *self) {
    client_lock(self);
    end_attempt(self);
    client_unlock(self);
}

// The calling task looks again at aconnect()'s attempt soon: after 1, 2,
// 4 ... ms, at most MQTT_TCP_POLL_MS apart (lwIP calls no socket callback
// when a connection is made, nor mbedTLS when a handshake can go on).
// Raises OSError(ETIMEDOUT) once command_timeout has passed.
static mp_obj_t look_again(mp_obj_awaitable_t *awaitable) {
    mp_obj_mqtt_client_t *self = awaitable->client;
    if (command_time_left(self, awaitable->since) == 0) {
        give_up_attempt(self);
        mp_raise_OSError(MP_ETIMEDOUT);
    }
    uint32_t delay = MIN((uint32_t)1 << MIN(awaitable->detail, 5), MQTT_TCP_POLL_MS);
    awaitable->detail++;
    sleep_current(self->aio, delay);
    return mp_const_none;
}

// The link is ready (TCP, and TLS if asked for): sends CONNECT and starts
// the loop task, which reads the CONNACK.
static mp_obj_t send_first_connect(mp_obj_awaitable_t *awaitable, int status) {
    mp_obj_mqtt_client_t *self = awaitable->client;
    mqtt_aio_t *aio = self->aio;
    if (status == MQTT_LINK_REPLACED) {
        // adisconnect() or disconnect() came first.
        mp_raise_OSError(MP_ENOTCONN);
    }
    if (status != MQTT_OK) {
        client_lock(self);
        drop_link(self);
        client_unlock(self);
        nlr_raise(exception_for_status(self, status));
    }
    aio->connecting = true;
    aio->connect_status = MQTT_OK;
    start_loop_task(self);
    awaitable->kind = AWAIT_CONNACK;
    awaitable->object = mp_const_none;
    awaitable->since = now_ms();
    aio->waiters[AIO_CONNECT_WAITER] = sleep_current(aio, mqtt_session_command_timeout(session_of(self)));
    return mp_const_none;
}

// Waits for the TCP connection of aconnect()'s socket without holding the
// event loop, then TLS's handshake (AWAIT_TLS) or CONNECT.
static mp_obj_t tcp_step(mp_obj_awaitable_t *awaitable) {
    mp_obj_mqtt_client_t *self = awaitable->client;
    mp_obj_t sock = awaitable->object;
    int progress = tcp_progress(self, sock);
    if (progress == 0) {
        return look_again(awaitable);
    }
    if (progress < 0) {
        give_up_attempt(self);
        mp_raise_OSError(MP_ECONNREFUSED);
    }
    nlr_buf_t nlr;
    if (nlr_push(&nlr) != 0) {
        give_up_attempt(self);
        nlr_jump(nlr.ret_val);
    }
    bool owned = option(self, OPTION_STREAM) == mp_const_none;
    if (owned && option(self, OPTION_SSL_CTX) != mp_const_none) {
        // The handshake goes step by step too (AWAIT_TLS).
        set_nodelay(sock);
        awaitable->object = start_tls(self, sock);
        nlr_pop();
        awaitable->kind = AWAIT_TLS;
        awaitable->detail = 0;
        awaitable->since = now_ms();
        return tls_step(awaitable);
    }
    int status = open_session(self, sock, &awaitable->ticket);
    nlr_pop();
    return send_first_connect(awaitable, status);
}

// Drives aconnect()'s TLS handshake as far as the socket allows, and
// sends CONNECT once it is done.
static mp_obj_t tls_step(mp_obj_awaitable_t *awaitable) {
    mp_obj_mqtt_client_t *self = awaitable->client;
    mp_obj_t stream = awaitable->object;
    nlr_buf_t nlr;
    if (nlr_push(&nlr) != 0) {
        give_up_attempt(self);
        nlr_jump(nlr.ret_val);
    }
    bool done = tls_progress(stream);
    nlr_pop();
    if (!done) {
        return look_again(awaitable);
    }
    // attempt_sock still holds the socket under the TLS stream, unless
    // adisconnect() or disconnect() ended the attempt meanwhile.
    mp_obj_t sock = self->attempt_sock;
    int status = sock == MP_OBJ_NULL ? MQTT_LINK_REPLACED : take_link(self, sock, stream, &awaitable->ticket);
    return send_first_connect(awaitable, status);
}

// ---------------------------------------------------------------------------
// The Awaitable type

// The step of messages(): the next queued message, or the calling task
// parks until one comes; the iteration ends when the queue is empty and
// the loop task has ended.
static mp_obj_t message_step(mp_obj_awaitable_t *awaitable) {
    mp_obj_mqtt_client_t *self = awaitable->client;
    mqtt_aio_t *aio = self->aio;
    mp_obj_t me = core_attr(aio, MP_QSTR_cur_task);
    if (aio->reader == me) {
        aio->reader = MP_OBJ_NULL;
    }
    mp_obj_t message = take_message(self);
    if (message != MP_OBJ_NULL) {
        return mp_make_stop_iteration(message);
    }
    if (!aio_loop_runs(self)) {
        nlr_raise(mp_obj_new_exception(&mp_type_StopAsyncIteration));
    }
    if (aio->reader != MP_OBJ_NULL) {
        // Another task is reading messages() already.
        mp_raise_OSError(MP_EBUSY);
    }
    aio->reader = sleep_current(aio, MQTT_READER_SLEEP_MS);
    return mp_const_none;
}

static mp_obj_t awaitable_iternext(mp_obj_t self_in) {
    mp_obj_awaitable_t *awaitable = MP_OBJ_TO_PTR(self_in);
    switch (awaitable->kind) {
        case AWAIT_ANSWER:
            return answer_step(awaitable);
        case AWAIT_LINK:
            return link_step(awaitable);
        case AWAIT_TCP:
            return tcp_step(awaitable);
        case AWAIT_TLS:
            return tls_step(awaitable);
        case AWAIT_CONNACK:
            return connack_step(awaitable);
        case AWAIT_MESSAGE:
            return message_step(awaitable);
        case RUN_LOOP:
            return run_loop_turn(awaitable->client);
        case RUN_TIMER:
            return timer_turn(awaitable->client);
        default:
            return mp_make_stop_iteration(awaitable->object);
    }
}

// Awaitable.send(value): what asyncio calls to run a task's coroutine.
static mp_obj_t awaitable_send(mp_obj_t self_in, mp_obj_t value) {
    (void)value;
    mp_obj_t result = awaitable_iternext(self_in);
    if (result == MP_OBJ_STOP_ITERATION) {
        mp_obj_t returned = MP_STATE_THREAD(stop_iteration_arg);
        nlr_raise(mp_obj_new_exception_arg1(&mp_type_StopIteration, returned == MP_OBJ_NULL ? mp_const_none : returned));
    }
    return result;
}
static MP_DEFINE_CONST_FUN_OBJ_2(awaitable_send_obj, awaitable_send);

// Awaitable.throw(exception): a task awaiting this was cancelled (or
// something else thrown into it): it no longer waits; the exception goes on.
static mp_obj_t awaitable_throw(size_t n_args, const mp_obj_t *args) {
    mp_obj_awaitable_t *awaitable = MP_OBJ_TO_PTR(args[0]);
    mp_obj_mqtt_client_t *self = awaitable->client;
    mqtt_aio_t *aio = self->aio;
    if (aio != NULL) {
        mp_obj_t me = core_attr(aio, MP_QSTR_cur_task);
        for (size_t i = 0; i < AIO_WAITERS; i++) {
            if (aio->waiters[i] == me) {
                aio->waiters[i] = MP_OBJ_NULL;
            }
        }
        if (aio->reader == me) {
            aio->reader = MP_OBJ_NULL;
        }
        take_out(aio->link_waiters, me);
        if (awaitable->kind == RUN_LOOP && aio->loop_task == me) {
            forget_loop_task(aio);
        }
        if (awaitable->kind == AWAIT_TCP || awaitable->kind == AWAIT_TLS) {
            give_up_attempt(self);
        }
    }
    nlr_raise(mp_make_raise_obj(args[n_args > 2 ? 2 : 1]));
}
static MP_DEFINE_CONST_FUN_OBJ_VAR_BETWEEN(awaitable_throw_obj, 2, 4, awaitable_throw);

// Awaitable.__aiter__() and __anext__(): messages() is its own iterator
// and its own awaitable.
static mp_obj_t awaitable_self(mp_obj_t self_in) {
    return self_in;
}
static MP_DEFINE_CONST_FUN_OBJ_1(awaitable_self_obj, awaitable_self);

// The messages() iterator's attribute `dropped`: QoS 0 messages dropped
// because the queue was full.
static void awaitable_attr(mp_obj_t self_in, qstr attr, mp_obj_t *dest) {
    mp_obj_awaitable_t *awaitable = MP_OBJ_TO_PTR(self_in);
    if (dest[0] == MP_OBJ_NULL && attr == MP_QSTR_dropped && awaitable->kind == AWAIT_MESSAGE) {
        dest[0] = mp_obj_new_int_from_uint(awaitable->client->aio->dropped);
        return;
    }
    // Everything else: the locals dict.
    dest[1] = MP_OBJ_SENTINEL;
}

static const mp_rom_map_elem_t awaitable_locals_table[] = {
    { MP_ROM_QSTR(MP_QSTR_send), MP_ROM_PTR(&awaitable_send_obj) },
    { MP_ROM_QSTR(MP_QSTR_throw), MP_ROM_PTR(&awaitable_throw_obj) },
    { MP_ROM_QSTR(MP_QSTR___aiter__), MP_ROM_PTR(&awaitable_self_obj) },
    { MP_ROM_QSTR(MP_QSTR___anext__), MP_ROM_PTR(&awaitable_self_obj) },
};
static MP_DEFINE_CONST_DICT(awaitable_locals, awaitable_locals_table);

static MP_DEFINE_CONST_OBJ_TYPE(
    awaitable_type,
    MP_QSTR_Awaitable,
    MP_TYPE_FLAG_ITER_IS_ITERNEXT,
    iter, awaitable_iternext,
    attr, awaitable_attr,
    locals_dict, &awaitable_locals
    );

// ---------------------------------------------------------------------------
// The Client's asyncio methods

// The Client as asyncio's poll sees it: readable when the engine or TLS
// holds input or the socket has some; its descriptor when it has one, so
// that the poll sleeps in the kernel (the loop task empties the engine's
// and TLS's buffers before each wait, since a poll by descriptor never
// asks this again).
static mp_uint_t client_ioctl(mp_obj_t self_in, mp_uint_t request, uintptr_t arg, int *errcode) {
    mp_obj_mqtt_client_t *self = client_of(self_in);
    if (request == MP_STREAM_GET_FILENO && self->sock_fd >= 0) {
        return (mp_uint_t)self->sock_fd;
    }
    if (request != MP_STREAM_POLL) {
        *errcode = MP_EINVAL;
        return MP_STREAM_ERROR;
    }
    if (!(arg & MP_STREAM_POLL_RD)) {
        return 0;
    }
    if (self->stream == MP_OBJ_NULL) {
        return MP_STREAM_POLL_HUP;
    }
    return input_waiting(self) ? MP_STREAM_POLL_RD : 0;
}

static const mp_stream_p_t client_stream_p = {
    .ioctl = client_ioctl,
};

// Client.aconnect(host, keepalive, port=1883, ssl_ctx=None, breconnect_cb=None,
//                 aconnect_cb=None, loop_failure=None, *, stream=None,
//                 auto_reconnect=None, on_drop=None, queue=8) -> awaitable
static mp_obj_t client_aconnect(size_t n_args, const mp_obj_t *pos_args, mp_map_t *kw_args) {
    mp_obj_mqtt_client_t *self = client_of(pos_args[0]);
    mqtt_aio_t *aio = aio_of(self);
    mp_obj_t queue;
    if (!configure_connect(n_args, pos_args, kw_args, &queue)) {
        mp_raise_ValueError(MP_ERROR_TEXT("aconnect() always starts its loop task"));
    }
    if (queue != mp_const_none) {
        mp_int_t bound = mp_obj_get_int(queue);
        if (bound < 0 || bound > 0x7fff) {
            mp_raise_ValueError(MP_ERROR_TEXT("queue must be 0-32767"));
        }
        aio->queue_bound = (uint16_t)bound;
    }
    give_way(self);
    mp_obj_t given = option(self, OPTION_STREAM);
    if (given != mp_const_none) {
        client_lock(self);
        self->attempt_sock = given;
        client_unlock(self);
        return new_awaitable(self, AWAIT_TCP, given);
    }
    nlr_buf_t nlr;
    if (nlr_push(&nlr) != 0) {
        client_lock(self);
        end_attempt(self);
        client_unlock(self);
        nlr_jump(nlr.ret_val);
    }
    mp_obj_t awaitable = new_awaitable(self, AWAIT_TCP, start_tcp(self));
    nlr_pop();
    return awaitable;
}
static MP_DEFINE_CONST_FUN_OBJ_KW(client_aconnect_obj, 3, client_aconnect);

// An Awaitable for the answer to `ticket`.
static mp_obj_t answer_awaitable(mp_obj_mqtt_client_t *self, mqtt_ticket_t ticket, uint8_t detail, mp_obj_t object) {
    mp_obj_awaitable_t *awaitable = MP_OBJ_TO_PTR(new_awaitable(self, AWAIT_ANSWER, object));
    awaitable->ticket = ticket;
    awaitable->detail = detail;
    return MP_OBJ_FROM_PTR(awaitable);
}

// Client.apublish(topic, payload='', qos=0, retain=False) -> awaitable
static mp_obj_t client_apublish(size_t n_args, const mp_obj_t *pos_args, mp_map_t *kw_args) {
    mp_obj_mqtt_client_t *self = client_of(pos_args[0]);
    mqtt_aio_t *aio = aio_of(self);
    outgoing_t message;
    parse_publish(n_args, pos_args, kw_args, &message);
    if (message.qos > 0 && self->auto_reconnect && aio_loop_runs(self) && !link_up(self)) {
        // Built-in reconnection may bring the link back: the awaitable
        // waits for it, then publishes.
        mp_obj_t fields[4] = {
            message.topic, message.payload, MP_OBJ_NEW_SMALL_INT(message.qos | (message.retain << 2)), message.properties,
        };
        return new_awaitable(self, AWAIT_LINK, mp_obj_new_tuple(4, fields));
    }
    mqtt_ticket_t ticket;
    if (!publish_now(self, &message, &ticket)) {
        return aio->done;
    }
    return answer_awaitable(self, ticket, ANSWER_PUBLISH, mp_const_none);
}
static MP_DEFINE_CONST_FUN_OBJ_KW(client_apublish_obj, 2, client_apublish);

// Client.asubscribe(topic, function=None, qos=0, *, no_local=False, ...) -> awaitable
// of the granted QoS (the keywords as for subscribe())
static mp_obj_t client_asubscribe(size_t n_args, const mp_obj_t *pos_args, mp_map_t *kw_args) {
    mp_obj_mqtt_client_t *self = client_of(pos_args[0]);
    aio_of(self);
    mqtt_ticket_t ticket;
    mp_obj_t filter;
    start_subscription(n_args, pos_args, kw_args, false, &ticket, &filter);
    return answer_awaitable(self, ticket, ANSWER_SUBSCRIBE, filter);
}
static MP_DEFINE_CONST_FUN_OBJ_KW(client_asubscribe_obj, 2, client_asubscribe);

// Client.aunsubscribe(topic) -> awaitable
static mp_obj_t client_aunsubscribe(mp_obj_t self_in, mp_obj_t filter) {
    mp_obj_mqtt_client_t *self = client_of(self_in);
    aio_of(self);
    mqtt_ticket_t ticket = start_unsubscription(self, filter);
    return answer_awaitable(self, ticket, ANSWER_UNSUBSCRIBE, mp_const_none);
}
static MP_DEFINE_CONST_FUN_OBJ_2(client_aunsubscribe_obj, client_aunsubscribe);

// Client.adisconnect() -> awaitable: disconnects at once; awaiting it
// waits for the loop task to end.
static mp_obj_t client_adisconnect(mp_obj_t self_in) {
    mp_obj_mqtt_client_t *self = client_of(self_in);
    mqtt_aio_t *aio = aio_of(self);
    mp_obj_t loop_task = aio->loop_task;
    end_link(self);
    bool from_loop = loop_task != MP_OBJ_NULL && core_attr(aio, MP_QSTR_cur_task) == loop_task;
    return loop_task == MP_OBJ_NULL || from_loop ? aio->done : loop_task;
}
static MP_DEFINE_CONST_FUN_OBJ_1(client_adisconnect_obj, client_adisconnect);

// Client.messages() -> async iterator of (topic, payload): the messages of
// subscriptions made without a function.
static mp_obj_t client_messages(mp_obj_t self_in) {
    mp_obj_mqtt_client_t *self = client_of(self_in);
    mqtt_aio_t *aio = aio_of(self);
    if (aio->messages == MP_OBJ_NULL) {
        aio->messages = new_awaitable(self, AWAIT_MESSAGE, mp_const_none);
    }
    return aio->messages;
}
static MP_DEFINE_CONST_FUN_OBJ_1(client_messages_obj, client_messages);
