// The scheduled loop back-end of lwIP ports and rp2 (and of the unix lwIP
// firmware, MQTT_LWIP=1 ports/unix/build.sh): turns are woken by the socket
// when input arrives (lwIP's socket option 20) and by a machine.Timer.
// Part of modmqtt.c's translation unit.

// lwIP calls no option 20 callback for a reset link (modlwip.c's error
// callback does not): wake up this often anyway, to notice such a link.
#define MQTT_LONGEST_SLEEP_MS (1000)

#include "mqtt_loop_scheduled.c"

// The timer's shortest period; a turn wanted sooner is also scheduled now.
#define MQTT_SHORTEST_PERIOD_MS (10)

// The timer is periodic, and each turn sets it anew: when the scheduler's
// queue is full, the soft timer (and option 20) drop their call, and a
// one-shot timer would then never wake the loop again.
static void wake_up_in(mp_obj_mqtt_client_t *self, uint32_t delay_ms) {
    if (self->timer == MP_OBJ_NULL) {
        mp_obj_t machine = mp_import_name(MP_QSTR_machine, mp_const_none, MP_OBJ_NEW_SMALL_INT(0));
        mp_obj_t virtual_timer = MP_OBJ_NEW_SMALL_INT(-1);
        self->timer = mp_call_function_n_kw(mp_load_attr(machine, MP_QSTR_Timer), 1, 0, &virtual_timer);
    }
    if (delay_ms < MQTT_SHORTEST_PERIOD_MS) {
        mp_sched_schedule(self->wake, mp_const_none);
        delay_ms = MQTT_SHORTEST_PERIOD_MS;
    }
    // timer.init(mode=Timer.PERIODIC, period=delay_ms, callback=wake)
    mp_obj_t call[2 + 6];
    mp_load_method(self->timer, MP_QSTR_init, call);
    call[2] = MP_OBJ_NEW_QSTR(MP_QSTR_mode);
    call[3] = mp_load_attr(self->timer, MP_QSTR_PERIODIC);
    call[4] = MP_OBJ_NEW_QSTR(MP_QSTR_period);
    call[5] = mp_obj_new_int_from_uint(delay_ms);
    call[6] = MP_OBJ_NEW_QSTR(MP_QSTR_callback);
    call[7] = self->wake;
    mp_call_method_n_kw(0, 3, call);
}

// Makes the link's socket call wake() when input arrives (lwIP's socket
// option 20). A given stream that cannot is polled by the timer.
static void watch_input(mp_obj_mqtt_client_t *self, mp_obj_t sock) {
    nlr_buf_t nlr;
    if (nlr_push(&nlr) == 0) {
        mp_obj_t option[3] = { MP_OBJ_NEW_SMALL_INT(1), MP_OBJ_NEW_SMALL_INT(20), self->wake };
        call_method(sock, MP_QSTR_setsockopt, 3, option);
        nlr_pop();
        self->input_signalled = true;
    } else {
        self->input_signalled = false;
    }
}

static void start_scheduled(mp_obj_mqtt_client_t *self) {
    self->loop_state = LOOP_RUNNING;
    wake_up_in(self, 0);
}

static void stop_scheduled(mp_obj_mqtt_client_t *self) {
    self->loop_state = LOOP_STOPPED;
    if (self->timer != MP_OBJ_NULL) {
        call_method(self->timer, MP_QSTR_deinit, 0, NULL);
    }
}
