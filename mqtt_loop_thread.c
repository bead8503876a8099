// The loop back-end of ports with threads (unix, esp32): the loop runs
// cycles on a thread of its own. Part of modmqtt.c's translation unit.

#define MQTT_LOOP_NAME MP_QSTR_thread

// Runs the loop until it is stopped or a failure is not recovered.
// Each step waits at most cycle_timeout, so a stop is seen within that
// (or within a TLS handshake or name lookup of a reconnection under way).
static void run_loop(mp_obj_mqtt_client_t *self) {
    while (self->loop_state == LOOP_RUNNING) {
        if (self->reconnect_phase != RECONNECT_OFF) {
            reconnect_step(self, self->cycle_timeout_ms);
            continue;
        }
        int status = run_cycle(self, self->cycle_timeout_ms);
        if (status == MQTT_OK || status == MQTT_LINK_REPLACED) {
            continue;
        }
        clear_pending(self);
        if (self->loop_state != LOOP_RUNNING || !loop_goes_on(self)) {
            break;
        }
    }
    stop_reconnecting(self);
}

// The stack size of loop threads, as mp_thread_create adjusted it.
static size_t loop_stack_size;

// The background thread, started with mp_thread_create as _thread does
// (the port keeps `arg`, the client, reachable for the GC), but without
// _thread's argument record on the heap.
static void *loop_thread(void *arg) {
    mp_obj_mqtt_client_t *self = arg;
    mp_state_thread_t state;
    mp_thread_init_state(&state, loop_stack_size, NULL, NULL);
    MP_THREAD_GIL_ENTER();
    mp_thread_start();
    self->loop_thread = mp_thread_get_state();
    nlr_buf_t nlr;
    if (nlr_push(&nlr) == 0) {
        run_loop(self);
        nlr_pop();
    } else {
        mp_printf(MICROPY_ERROR_PRINTER, "mqtt: exception in the loop:\n");
        mp_obj_print_exception(MICROPY_ERROR_PRINTER, MP_OBJ_FROM_PTR(nlr.ret_val));
    }
    // Cleared before the loop counts as stopped, so a loop() started
    // right after finds its own thread recorded, not a stale one.
    self->loop_thread = NULL;
    self->loop_state = LOOP_STOPPED;
    mp_thread_finish();
    MP_THREAD_GIL_EXIT();
    return NULL;
}

static void loop_start(mp_obj_mqtt_client_t *self) {
    if (self->loop_state == LOOP_RUNNING) {
        return;
    }
    // A loop that is still stopping ends within one cycle.
    uint32_t start = now_ms();
    while (self->loop_state == LOOP_STOPPING && now_ms() - start < self->cycle_timeout_ms + 1000) {
        pause_briefly(now_ms() - start);
    }
    self->loop_state = LOOP_RUNNING;
    // The port's default stack; mp_thread_create writes back what the
    // thread may use, which the thread reads when it starts. Every loop
    // thread gets the same size, so one variable serves them all.
    loop_stack_size = 0;
    nlr_buf_t nlr;
    if (nlr_push(&nlr) == 0) {
        mp_thread_create(loop_thread, self, &loop_stack_size);
        nlr_pop();
    } else {
        self->loop_state = LOOP_STOPPED;
        nlr_jump(nlr.ret_val);
    }
}

// The thread ends after its current cycle: disconnect() closes the link.
static void loop_stop(mp_obj_mqtt_client_t *self) {
    if (self->loop_state == LOOP_RUNNING) {
        self->loop_state = LOOP_STOPPING;
    }
}

static void loop_watch_link(mp_obj_mqtt_client_t *self, mp_obj_t sock) {
    // The thread waits on the link itself.
    (void)self;
    (void)sock;
}

static void loop_link_lost(mp_obj_mqtt_client_t *self) {
    // The thread finds the lost link by itself.
    (void)self;
}

static bool loop_on_other_thread(mp_obj_mqtt_client_t *self) {
    return self->loop_state == LOOP_RUNNING && self->loop_thread != mp_thread_get_state();
}

static bool loop_runs_elsewhere(mp_obj_mqtt_client_t *self) {
    return loop_on_other_thread(self);
}
