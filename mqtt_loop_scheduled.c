// What the two scheduled loop back-ends share (mqtt_loop_timer.c and
// mqtt_loop_signal.c include it): no thread; each turn runs on the
// interpreter's thread, between two bytecodes of the application, and
// never waits. Part of modmqtt.c's translation unit.
//
// The including back-end defines MQTT_LONGEST_SLEEP_MS and these:

// Makes the next turn run in `delay_ms` (0: as soon as possible).
static void wake_up_in(mp_obj_mqtt_client_t *self, uint32_t delay_ms);
// Makes `sock` call self->wake when input arrives; sets input_signalled.
static void watch_input(mp_obj_mqtt_client_t *self, mp_obj_t sock);
// Starts the turns (loop_state becomes LOOP_RUNNING), and stops them.
static void start_scheduled(mp_obj_mqtt_client_t *self);
static void stop_scheduled(mp_obj_mqtt_client_t *self);

#define MQTT_LOOP_NAME MP_QSTR_scheduled

// The body of a turn: the cycles for what has arrived, then the timer for
// what is due next (a keepalive ping, an acknowledgement's deadline).
static void run_turn(mp_obj_mqtt_client_t *self) {
    if (self->reader != NULL || self->lock_holder == current_thread(self)) {
        // This turn runs inside a call of the client that reads the link
        // (it waits for an acknowledgement) or that is in the engine (a
        // stream written in Python ran the scheduler): that call takes
        // the input, and the engine is not entered twice.
        wake_up_in(self, self->cycle_timeout_ms);
        return;
    }
    if (self->reconnect_phase != RECONNECT_OFF) {
        // Reconnecting: one step, which does not wait.
        uint32_t delay = reconnect_step(self, 0);
        if (self->loop_state == LOOP_RUNNING) {
            wake_up_in(self, self->reconnect_phase == RECONNECT_OFF ? 0 : delay);
        }
        return;
    }
    bool more = true;
    for (int cycle = 0; cycle < MQTT_CYCLES_PER_TURN && more; cycle++) {
        int status = run_cycle(self, 0);
        if (status != MQTT_OK && status != MQTT_LINK_REPLACED) {
            clear_pending(self);
            if (self->loop_state != LOOP_RUNNING || !loop_goes_on(self)) {
                stop_scheduled(self);
                return;
            }
            if (self->reconnect_phase != RECONNECT_OFF) {
                wake_up_in(self, 0);
                return;
            }
        }
        if (self->loop_state != LOOP_RUNNING) {
            return;
        }
        more = input_waiting(self);
    }
    // Input still waiting after the turn's cycles: another turn at once.
    uint32_t delay_ms = 0;
    if (!more) {
        uint32_t longest = self->input_signalled ? MQTT_LONGEST_SLEEP_MS : self->cycle_timeout_ms;
        client_lock(self);
        delay_ms = self->stream == MP_OBJ_NULL
            ? self->cycle_timeout_ms
            : mqtt_session_next_timer(session_of(self), now_ms(), longest);
        client_unlock(self);
    }
    wake_up_in(self, delay_ms);
}

// One turn of the scheduled loop, unless one runs already (a callback of
// this turn may wait in a way that lets the scheduler run).
static void scheduled_turn(mp_obj_mqtt_client_t *self) {
    if (self->loop_state != LOOP_RUNNING || self->turning) {
        return;
    }
    self->turning = true;
    nlr_buf_t nlr;
    if (nlr_push(&nlr) == 0) {
        run_turn(self);
        nlr_pop();
        self->turning = false;
    } else {
        self->turning = false;
        // The scheduler prints what escaped the turn (a KeyboardInterrupt,
        // say); the loop itself must not end with it: wake up again later.
        nlr_buf_t again;
        if (nlr_push(&again) == 0) {
            wake_up_in(self, self->cycle_timeout_ms);
            nlr_pop();
        }
        nlr_jump(nlr.ret_val);
    }
}

// Client._wake(arg): what the arrival signal and the timer call (`arg` is
// the socket or the timer).
static mp_obj_t client_wake(mp_obj_t self_in, mp_obj_t arg) {
    (void)arg;
    scheduled_turn(client_of(self_in));
    return mp_const_none;
}
static MP_DEFINE_CONST_FUN_OBJ_2(client_wake_obj, client_wake);

static void loop_start(mp_obj_mqtt_client_t *self) {
    if (self->loop_state != LOOP_RUNNING) {
        start_scheduled(self);
    }
}

static void loop_stop(mp_obj_mqtt_client_t *self) {
    if (self->loop_state == LOOP_RUNNING) {
        stop_scheduled(self);
    }
}

static void loop_watch_link(mp_obj_mqtt_client_t *self, mp_obj_t sock) {
    if (self->wake == MP_OBJ_NULL) {
        self->wake = mp_obj_new_bound_meth(MP_OBJ_FROM_PTR(&client_wake_obj), MP_OBJ_FROM_PTR(self));
    }
    watch_input(self, sock);
}

// The next turn, at once, tells loop_failure.
static void loop_link_lost(mp_obj_mqtt_client_t *self) {
    if (self->loop_state == LOOP_RUNNING && self->stream == MP_OBJ_NULL) {
        wake_up_in(self, 0);
    }
}

static bool loop_on_other_thread(mp_obj_mqtt_client_t *self) {
    (void)self;
    return false;
}

static bool loop_runs_elsewhere(mp_obj_mqtt_client_t *self) {
    return self->loop_state == LOOP_RUNNING && !self->turning;
}
