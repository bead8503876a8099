// The loop back-end of ports with neither threads nor a way to schedule
// turns (the qemu boards): nothing runs the loop in the background; the
// application calls cycle(), from its main loop or an asyncio task. Part
// of modmqtt.c's translation unit.

#define MQTT_LOOP_NAME MP_QSTR_cycle

static void loop_start(mp_obj_mqtt_client_t *self) {
    (void)self;
}

static void loop_stop(mp_obj_mqtt_client_t *self) {
    (void)self;
}

static void loop_watch_link(mp_obj_mqtt_client_t *self, mp_obj_t sock) {
    (void)self;
    (void)sock;
}

static void loop_link_lost(mp_obj_mqtt_client_t *self) {
    (void)self;
}

static bool loop_on_other_thread(mp_obj_mqtt_client_t *self) {
    (void)self;
    return false;
}

static bool loop_runs_elsewhere(mp_obj_mqtt_client_t *self) {
    (void)self;
    return false;
}
