// The scheduled loop back-end of lwIP ports and rp2 (and of the unix
// firmware built with MQTT_TIMER_LOOP=1): turns are woken by the socket
// when input arrives (lwIP's socket option 20) and by a machine.Timer.
// Part of modmqtt.c's translation unit.

// lwIP does not call a socket's option 20 callback when the link fails
// with a reset (modlwip.c's error callback does not): wake up at least
// this often whatever the timers say, so that such a link is noticed soon.
#define MQTT_LONGEST_SLEEP_MS (1000)

#include "mqtt_loop_scheduled.c"

static void wake_up_in(mp_obj_mqtt_client_t *self, uint32_t delay_ms) {
    if (self->timer == MP_OBJ_NULL) {
        mp_obj_t machine = mp_import_name(MP_QSTR_machine, mp_const_none, MP_OBJ_NEW_SMALL_INT(0));
        mp_obj_t virtual_timer = MP_OBJ_NEW_SMALL_INT(-1);
        self->timer = mp_call_function_n_kw(mp_load_attr(machine, MP_QSTR_Timer), 1, 0, &virtual_timer);
    }
    // timer.init(mode=Timer.ONE_SHOT, period=delay_ms, callback=wake)
    mp_obj_t call[2 + 6];
    mp_load_method(self->timer, MP_QSTR_init, call);
    call[2] = MP_OBJ_NEW_QSTR(MP_QSTR_mode);
    call[3] = mp_load_attr(self->timer, MP_QSTR_ONE_SHOT);
    call[4] = MP_OBJ_NEW_QSTR(MP_QSTR_period);
    call[5] = mp_obj_new_int_from_uint(delay_ms > 0 ? delay_ms : 1);
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
