// The MicroPython binding of the `mqtt` module: the Python API. It includes
// the binding's other files, one translation unit: mqtt_client.h (the client
// object, the port's loop back-end), mqtt_link.c, mqtt_cycle.c,
// mqtt_reconnect.c, the loop (mqtt_loop_*.c) and the asyncio API
// (mqtt_asyncio.c); README.md says more. The binding knows Python, not MQTT:
// every protocol decision is made by the Rust engine (src/).

#include <string.h>

#include "py/mperrno.h"
#include "py/mphal.h"
#include "py/objexcept.h"
#include "py/objstr.h"
#include "py/objtuple.h"
#include "py/objtype.h"
#include "py/runtime.h"
#include "py/smallint.h"
#include "py/stream.h"
#if MICROPY_PY_THREAD
#include "py/mpthread.h"
#endif

#include "mqtt_engine.h"

#include "mqtt_client.h"

MP_DEFINE_EXCEPTION(MQTTException, Exception)

// ---------------------------------------------------------------------------
// Argument helpers

static mqtt_bytes_t bytes_of_str(mp_obj_t text, const char *what) {
    if (!mp_obj_is_str(text)) {
        mp_raise_msg_varg(&mp_type_TypeError, MP_ERROR_TEXT("%s must be a str"), what);
    }
    size_t len;
    const char *data = mp_obj_str_get_data(text, &len);
    mqtt_bytes_t bytes = { .data = (const uint8_t *)data, .len = len };
    return bytes;
}

static mqtt_bytes_t bytes_of_buffer(mp_obj_t object) {
    mp_buffer_info_t info;
    mp_get_buffer_raise(object, &info, MP_BUFFER_READ);
    mqtt_bytes_t bytes = { .data = info.buf, .len = info.len };
    return bytes;
}

static mqtt_bytes_t no_bytes(void) {
    mqtt_bytes_t bytes = { .data = NULL, .len = 0 };
    return bytes;
}

static uint8_t qos_of(mp_obj_t object) {
    mp_int_t qos = mp_obj_get_int(object);
    if (qos < 0 || qos > 2) {
        mp_raise_ValueError(MP_ERROR_TEXT("qos must be 0, 1 or 2"));
    }
    return (uint8_t)qos;
}

// A non-negative int argument below 2**31 (milliseconds, sizes).
static uint32_t non_negative_of(mp_obj_t object, const char *what) {
    mp_int_t value = mp_obj_get_int(object);
    if (value < 0 || value > 0x7fffffff) {
        mp_raise_msg_varg(&mp_type_ValueError, MP_ERROR_TEXT("%s out of range"), what);
    }
    return (uint32_t)value;
}

static void check_topic(mp_obj_t topic, bool filter) {
    if (mqtt_topic_check(bytes_of_str(topic, "topic"), filter) != MQTT_OK) {
        mp_raise_ValueError(filter ? MP_ERROR_TEXT("invalid topic filter") : MP_ERROR_TEXT("invalid topic"));
    }
}

// Sets an optional setting (may raise MemoryError on the first one).
// Makes the client's options, all None, unless it has them.
static void make_options(mp_obj_mqtt_client_t *self) {
    if (self->options == NULL) {
        size_t count = options_count(self);
        mp_obj_t *options = m_new(mp_obj_t, count);
        for (size_t i = 0; i < count; i++) {
            options[i] = mp_const_none;
        }
        self->options = options;
    }
}

// Sets an option; an MQTT 3.1.1 client takes None alone for MQTT 5's.
static void set_option(mp_obj_mqtt_client_t *self, size_t which, mp_obj_t value) {
    if (which >= options_count(self) || (self->options == NULL && value == mp_const_none)) {
        return;
    }
    make_options(self);
    self->options[which] = value;
}

static mp_obj_mqtt_client_t *client_of(mp_obj_t self_in) {
    return MP_OBJ_TO_PTR(self_in);
}

// ---------------------------------------------------------------------------
// Calling Python safely

// Calls `function(args...)`; an exception is printed, not propagated.
// Returns the result, or MP_OBJ_NULL when the call raised.
static mp_obj_t call_and_report(mp_obj_t function, size_t n_args, const mp_obj_t *args) {
    nlr_buf_t nlr;
    if (nlr_push(&nlr) == 0) {
        mp_obj_t result = mp_call_function_n_kw(function, n_args, 0, args);
        nlr_pop();
        return result;
    }
    mp_printf(MICROPY_ERROR_PRINTER, "mqtt: exception in callback:\n");
    mp_obj_print_exception(MICROPY_ERROR_PRINTER, MP_OBJ_FROM_PTR(nlr.ret_val));
    return MP_OBJ_NULL;
}

// Calls `object.method(args...)` and returns the result (may raise).
static mp_obj_t call_method(mp_obj_t object, qstr method, size_t n_args, const mp_obj_t *args) {
    mp_obj_t call[2 + 4];
    mp_load_method(object, method, call);
    for (size_t i = 0; i < n_args; i++) {
        call[2 + i] = args[i];
    }
    return mp_call_method_n_kw(n_args, 0, call);
}

// Calls the client's callback kept as option `which` (breconnect_cb,
// aconnect_cb) with the client, if it has one; an exception is printed.
static void notify(mp_obj_mqtt_client_t *self, size_t which) {
    mp_obj_t callback = option(self, which);
    if (callback != mp_const_none) {
        mp_obj_t self_obj = MP_OBJ_FROM_PTR(self);
        call_and_report(callback, 1, &self_obj);
    }
}

// Included together, before this file's own functions: MicroPython's qstr
// collection keeps only the last stretch of each file in the preprocessed
// unit, so the MP_QSTR_ names of this file must all come after them.
#include "mqtt_link.c"
#include "mqtt_properties.c"
#include "mqtt_cycle.c"
#include "mqtt_reconnect.c"
#include MQTT_LOOP_FILE
#include "mqtt_asyncio.c"

// ---------------------------------------------------------------------------
// Connecting

// Connects with the stored parameters, waiting for the CONNACK. Returns
// its return code; raises OSError when the broker cannot be reached.
static int do_connect(mp_obj_mqtt_client_t *self) {
    give_way(self);
    mp_obj_t sock = MP_OBJ_NULL;
    mp_obj_t stream = MP_OBJ_NULL;
    open_link(self, &sock, &stream);
    loop_watch_link(self, sock);
    mqtt_ticket_t ticket;
    int status = start_session(self, sock, stream, &ticket);

    nlr_buf_t nlr;
    bool raised = nlr_push(&nlr) != 0;
    if (!raised) {
        if (status != MQTT_OK) {
            nlr_raise(exception_for_status(self, status));
        }
        self->return_code = wait_for(self, ticket);
        if (self->return_code == 0) {
            status = session_accepted(self);
            if (status != MQTT_OK) {
                nlr_raise(exception_for_status(self, status));
            }
        }
        nlr_pop();
    }
    if (raised || self->return_code != 0) {
        // Refused, or failed: the link goes.
        client_lock(self);
        drop_link(self);
        client_unlock(self);
    }
    if (raised) {
        loop_link_lost(self);
        nlr_jump(nlr.ret_val);
    }
    return self->return_code;
}

// Connects, runs aconnect_cb on success, and returns the return code.
static int connect_and_notify(mp_obj_mqtt_client_t *self) {
    int code = do_connect(self);
    if (code == 0) {
        notify(self, OPTION_ACONNECT_CB);
    }
    return code;
}

// ---------------------------------------------------------------------------
// The Client class

// Client(client_id, clean_session=True, cycle_timeout=500, command_timeout=60000, *,
//        max_packet_size=1048576, protocol=MQTTv311, session_expiry=None, topic_aliases=0)
static mp_obj_t client_make_new(const mp_obj_type_t *type, size_t n_args, size_t n_kw, const mp_obj_t *all_args) {
    enum {
        ARG_client_id, ARG_clean_session, ARG_cycle_timeout, ARG_command_timeout, ARG_max_packet_size, ARG_protocol,
        ARG_session_expiry, ARG_topic_aliases,
    };
    static const mp_arg_t allowed[] = {
        { MP_QSTR_client_id, MP_ARG_REQUIRED | MP_ARG_OBJ, {.u_rom_obj = MP_ROM_NONE} },
        { MP_QSTR_clean_session, MP_ARG_BOOL, {.u_bool = true} },
        { MP_QSTR_cycle_timeout, MP_ARG_OBJ, {.u_rom_obj = MP_ROM_INT(500)} },
        { MP_QSTR_command_timeout, MP_ARG_OBJ, {.u_rom_obj = MP_ROM_INT(60000)} },
        { MP_QSTR_max_packet_size, MP_ARG_KW_ONLY | MP_ARG_OBJ, {.u_rom_obj = MP_ROM_INT(MQTT_DEFAULT_MAX_PACKET)} },
        { MP_QSTR_protocol, MP_ARG_KW_ONLY | MP_ARG_INT, {.u_int = 4} },
        { MP_QSTR_session_expiry, MP_ARG_KW_ONLY | MP_ARG_OBJ, {.u_rom_obj = MP_ROM_NONE} },
        { MP_QSTR_topic_aliases, MP_ARG_KW_ONLY | MP_ARG_INT, {.u_int = 0} },
    };
    mp_arg_val_t args[MP_ARRAY_SIZE(allowed)];
    mp_arg_parse_all_kw_array(n_args, n_kw, all_args, MP_ARRAY_SIZE(allowed), allowed, args);

    mqtt_bytes_t client_id = bytes_of_str(args[ARG_client_id].u_obj, "client_id");
    if (client_id.len > 65535) {
        mp_raise_ValueError(MP_ERROR_TEXT("client_id too long"));
    }
    bool clean_session = args[ARG_clean_session].u_bool;
    if (client_id.len == 0 && !clean_session) {
        mp_raise_ValueError(MP_ERROR_TEXT("empty client_id needs clean_session=True"));
    }
    uint32_t cycle_timeout = non_negative_of(args[ARG_cycle_timeout].u_obj, "cycle_timeout");
    uint32_t command_timeout = non_negative_of(args[ARG_command_timeout].u_obj, "command_timeout");
    if (command_timeout == 0) {
        mp_raise_ValueError(MP_ERROR_TEXT("command_timeout must be positive"));
    }
    uint32_t max_packet_size = non_negative_of(args[ARG_max_packet_size].u_obj, "max_packet_size");
    mp_int_t protocol = args[ARG_protocol].u_int;
    if (protocol != 4 && protocol != 5) {
        mp_raise_ValueError(MP_ERROR_TEXT("protocol must be MQTTv311 or MQTTv5"));
    }
    mp_obj_t session_expiry = args[ARG_session_expiry].u_obj;
    if (session_expiry != mp_const_none && protocol != 5) {
        mp_raise_ValueError(MP_ERROR_TEXT("session_expiry needs protocol=MQTTv5"));
    }
    // How many topic aliases the broker may use towards the client: each
    // keeps a topic str (see sink_topic_alias).
    mp_int_t topic_aliases = args[ARG_topic_aliases].u_int;
    if (topic_aliases < 0 || topic_aliases > MQTT_INBOUND_ALIAS_MAX) {
        mp_raise_ValueError(MP_ERROR_TEXT("topic_aliases must be 0-16"));
    }
    if (topic_aliases != 0 && protocol != 5) {
        mp_raise_ValueError(MP_ERROR_TEXT("topic_aliases needs protocol=MQTTv5"));
    }

    // An MQTT 5 session is larger: its MQTT 5 state follows it. (0: the
    // engine was built without MQTT 5, MQTT_V5=0.)
    size_t session_size = mqtt_session_size((uint8_t)protocol);
    if (session_size == 0) {
        mp_raise_ValueError(MP_ERROR_TEXT("MQTT 5 is not in this firmware"));
    }
    // Zeroed: what is not set below starts as 0, false, NULL or MP_OBJ_NULL.
    mp_obj_mqtt_client_t *self = m_malloc0(sizeof(mp_obj_mqtt_client_t) + session_size);
    self->base.type = type;
    self->client_id = args[ARG_client_id].u_obj;
    self->host = mp_const_none;
    self->loop_failure = mp_const_none;
    self->subscriptions = mp_const_empty_tuple;
    self->sock_fd = -1;
    self->cycle_timeout_ms = cycle_timeout;
    self->port = 1883;
    self->clean_session = clean_session;
    self->return_code = MQTT_NO_RETURN_CODE;
    self->owns_stream = true;
    #if MICROPY_PY_THREAD
    mp_thread_mutex_init(&self->lock);
    #endif
    // Cannot fail: the memory has the size the engine asked for, and the
    // alignment it needs (see session_of).
    mqtt_session_init(self->session_memory, session_size, command_timeout, max_packet_size, (uint8_t)protocol);
    if (session_expiry != mp_const_none) {
        mqtt_session_set_session_expiry(session_of(self), non_negative_of(session_expiry, "session_expiry"));
    }
    if (topic_aliases != 0) {
        mqtt_session_set_topic_aliases(session_of(self), (uint16_t)topic_aliases);
        mp_obj_tuple_t *topics = MP_OBJ_TO_PTR(mp_obj_new_tuple(topic_aliases, NULL));
        for (mp_int_t i = 0; i < topic_aliases; i++) {
            topics->items[i] = mp_const_none;
        }
        set_option(self, OPTION_INBOUND_ALIASES, MP_OBJ_FROM_PTR(topics));
    }
    return MP_OBJ_FROM_PTR(self);
}

// Reads connect()'s auto_reconnect: None or False (off), True (the
// default bounds), or (min_ms, max_ms). Returns whether it is on.
static bool backoff_of(mp_obj_t value, uint32_t *min_ms, uint32_t *max_ms) {
    *min_ms = MQTT_RECONNECT_MIN_MS;
    *max_ms = MQTT_RECONNECT_MAX_MS;
    if (value == mp_const_none || value == mp_const_false) {
        return false;
    }
    if (value == mp_const_true) {
        return true;
    }
    if (!mp_obj_is_type(value, &mp_type_tuple) && !mp_obj_is_type(value, &mp_type_list)) {
        mp_raise_TypeError(MP_ERROR_TEXT("auto_reconnect must be True or (min_ms, max_ms)"));
    }
    mp_obj_t *bounds;
    mp_obj_get_array_fixed_n(value, 2, &bounds);
    *min_ms = non_negative_of(bounds[0], "auto_reconnect");
    *max_ms = non_negative_of(bounds[1], "auto_reconnect");
    if (*min_ms == 0 || *min_ms > *max_ms) {
        mp_raise_ValueError(MP_ERROR_TEXT("auto_reconnect needs 0 < min_ms <= max_ms"));
    }
    return true;
}

// Takes the arguments of connect() and aconnect() (see client_connect
// and client_aconnect), and keeps them in the client for the attempts.
// Returns start_loop; `*queue` is aconnect()'s queue argument (None when
// not given).
static bool configure_connect(size_t n_args, const mp_obj_t *pos_args, mp_map_t *kw_args, mp_obj_t *queue) {
    enum {
        ARG_host, ARG_keepalive, ARG_port, ARG_ssl_ctx, ARG_breconnect_cb, ARG_aconnect_cb, ARG_loop_failure,
        ARG_start_loop, ARG_stream, ARG_auto_reconnect, ARG_on_drop, ARG_user_properties, ARG_queue,
    };
    static const mp_arg_t allowed[] = {
        { MP_QSTR_host, MP_ARG_REQUIRED | MP_ARG_OBJ, {.u_rom_obj = MP_ROM_NONE} },
        { MP_QSTR_keepalive, MP_ARG_REQUIRED | MP_ARG_OBJ, {.u_rom_obj = MP_ROM_NONE} },
        { MP_QSTR_port, MP_ARG_OBJ, {.u_rom_obj = MP_ROM_INT(1883)} },
        { MP_QSTR_ssl_ctx, MP_ARG_OBJ, {.u_rom_obj = MP_ROM_NONE} },
        { MP_QSTR_breconnect_cb, MP_ARG_OBJ, {.u_rom_obj = MP_ROM_NONE} },
        { MP_QSTR_aconnect_cb, MP_ARG_OBJ, {.u_rom_obj = MP_ROM_NONE} },
        { MP_QSTR_loop_failure, MP_ARG_OBJ, {.u_rom_obj = MP_ROM_NONE} },
        { MP_QSTR_start_loop, MP_ARG_BOOL, {.u_bool = true} },
        { MP_QSTR_stream, MP_ARG_KW_ONLY | MP_ARG_OBJ, {.u_rom_obj = MP_ROM_NONE} },
        { MP_QSTR_auto_reconnect, MP_ARG_KW_ONLY | MP_ARG_OBJ, {.u_rom_obj = MP_ROM_NONE} },
        { MP_QSTR_on_drop, MP_ARG_KW_ONLY | MP_ARG_OBJ, {.u_rom_obj = MP_ROM_NONE} },
        { MP_QSTR_user_properties, MP_ARG_KW_ONLY | MP_ARG_OBJ, {.u_rom_obj = MP_ROM_NONE} },
        { MP_QSTR_queue, MP_ARG_KW_ONLY | MP_ARG_OBJ, {.u_rom_obj = MP_ROM_NONE} },
    };
    mp_obj_mqtt_client_t *self = client_of(pos_args[0]);
    mp_arg_val_t args[MP_ARRAY_SIZE(allowed)];
    mp_arg_parse_all(n_args - 1, pos_args + 1, kw_args, MP_ARRAY_SIZE(allowed), allowed, args);

    mp_obj_t stream = args[ARG_stream].u_obj;
    if (stream != mp_const_none) {
        // Any stream: a socket, a UART, an io.IOBase class with
        // readinto/write/ioctl.
        nlr_buf_t nlr;
        if (nlr_push(&nlr) == 0) {
            mp_get_stream_raise(stream, MP_STREAM_OP_READ | MP_STREAM_OP_WRITE | MP_STREAM_OP_IOCTL);
            nlr_pop();
        } else {
            mp_raise_TypeError(MP_ERROR_TEXT("stream must be a stream object"));
        }
    }
    // Over a given stream the host only names the server for TLS.
    if (stream == mp_const_none || args[ARG_host].u_obj != mp_const_none) {
        bytes_of_str(args[ARG_host].u_obj, "host");
    }
    mp_int_t keepalive = mp_obj_get_int(args[ARG_keepalive].u_obj);
    if (keepalive < 0 || keepalive > 65535) {
        mp_raise_ValueError(MP_ERROR_TEXT("keepalive must be 0-65535 seconds"));
    }
    mp_int_t port = mp_obj_get_int(args[ARG_port].u_obj);
    if (port < 1 || port > 65535) {
        mp_raise_ValueError(MP_ERROR_TEXT("port must be 1-65535"));
    }
    const size_t callbacks[] = { ARG_breconnect_cb, ARG_aconnect_cb, ARG_loop_failure, ARG_on_drop };
    for (size_t i = 0; i < MP_ARRAY_SIZE(callbacks); i++) {
        mp_obj_t callback = args[callbacks[i]].u_obj;
        if (callback != mp_const_none && !mp_obj_is_callable(callback)) {
            mp_raise_TypeError(MP_ERROR_TEXT("callbacks must be callable or None"));
        }
    }
    mp_obj_t user_properties = args[ARG_user_properties].u_obj;
    if (user_properties != mp_const_none) {
        if (!speaks_v5(self)) {
            mp_raise_ValueError(MP_ERROR_TEXT("user properties need MQTTv5"));
        }
        user_properties = user_pairs_of(user_properties);
    }
    uint32_t min_ms, max_ms;
    bool auto_reconnect = backoff_of(args[ARG_auto_reconnect].u_obj, &min_ms, &max_ms);
    if (loop_runs_elsewhere(self) || aio_loop_runs(self)) {
        mp_raise_OSError(MP_EBUSY);
    }
    // The client id and a fast clock make each device's jitter its own.
    // Without auto_reconnect: off (a min of 0), whatever an earlier connect() set.
    client_lock(self);
    mqtt_session_set_backoff(session_of(self), auto_reconnect ? min_ms : 0, max_ms, bytes_of_str(self->client_id, "client_id"), (uint32_t)mp_hal_ticks_us());
    client_unlock(self);
    self->auto_reconnect = auto_reconnect;
    self->host = args[ARG_host].u_obj;
    self->keepalive_s = (uint16_t)keepalive;
    self->port = (uint16_t)port;
    set_option(self, OPTION_SSL_CTX, args[ARG_ssl_ctx].u_obj);
    set_option(self, OPTION_BRECONNECT_CB, args[ARG_breconnect_cb].u_obj);
    set_option(self, OPTION_ACONNECT_CB, args[ARG_aconnect_cb].u_obj);
    set_option(self, OPTION_STREAM, stream);
    set_option(self, OPTION_ON_DROP, args[ARG_on_drop].u_obj);
    set_option(self, OPTION_USER_PROPERTIES, user_properties);
    self->loop_failure = args[ARG_loop_failure].u_obj;
    *queue = args[ARG_queue].u_obj;
    return args[ARG_start_loop].u_bool;
}

// Raises MQTTException for a CONNACK refusal: a return code 1-5 (the
// engine accepts no other) in MQTT 3.1.1, a reason code in MQTT 5.
static NORETURN void raise_refusal(mp_obj_mqtt_client_t *self, int code) {
    if (speaks_v5(self)) {
        nlr_raise(reason_exception(self, "connection refused", code));
    }
    raise_mqtt(code, "connection refused: %s", refusals[code - 1]);
}

// Client.connect(host, keepalive, port=1883, ssl_ctx=None, breconnect_cb=None,
//                aconnect_cb=None, loop_failure=None, start_loop=True, *,
//                stream=None, auto_reconnect=None, on_drop=None, user_properties=None)
static mp_obj_t client_connect(size_t n_args, const mp_obj_t *pos_args, mp_map_t *kw_args) {
    mp_obj_mqtt_client_t *self = client_of(pos_args[0]);
    mp_obj_t queue;
    bool start_loop = configure_connect(n_args, pos_args, kw_args, &queue);
    if (queue != mp_const_none) {
        mp_raise_TypeError(MP_ERROR_TEXT("queue is an argument of aconnect()"));
    }
    int code = connect_and_notify(self);
    if (code != 0) {
        raise_refusal(self, code);
    }
    if (start_loop) {
        loop_start(self);
    }
    return mp_const_none;
}
static MP_DEFINE_CONST_FUN_OBJ_KW(client_connect_obj, 3, client_connect);

// Client.reconnect() -> CONNACK return code
static mp_obj_t client_reconnect(mp_obj_t self_in) {
    mp_obj_mqtt_client_t *self = client_of(self_in);
    if (self->host == mp_const_none && option(self, OPTION_STREAM) == mp_const_none) {
        // Never connected: nothing to connect to again.
        mp_raise_OSError(MP_ENOTCONN);
    }
    notify(self, OPTION_BRECONNECT_CB);
    return MP_OBJ_NEW_SMALL_INT(connect_and_notify(self));
}
static MP_DEFINE_CONST_FUN_OBJ_1(client_reconnect_obj, client_reconnect);

// Client.get_return_code() -> CONNACK return code of the last attempt, or -1
static mp_obj_t client_get_return_code(mp_obj_t self_in) {
    uint8_t code = client_of(self_in)->return_code;
    return MP_OBJ_NEW_SMALL_INT(code == MQTT_NO_RETURN_CODE ? -1 : code);
}
static MP_DEFINE_CONST_FUN_OBJ_1(client_get_return_code_obj, client_get_return_code);

// Client.connected() -> bool
static mp_obj_t client_connected(mp_obj_t self_in) {
    mp_obj_mqtt_client_t *self = client_of(self_in);
    client_lock(self);
    bool connected = mqtt_session_is_connected(session_of(self));
    client_unlock(self);
    return mp_obj_new_bool(connected);
}
static MP_DEFINE_CONST_FUN_OBJ_1(client_connected_obj, client_connected);

// Client.disconnect_reason() -> (code, reason string) or None: the reason
// code of the MQTT 5 broker's last DISCONNECT and the reason string of its
// last refusal; None before any (and always with MQTT 3.1.1).
static mp_obj_t client_disconnect_reason(mp_obj_t self_in) {
    mp_obj_mqtt_client_t *self = client_of(self_in);
    char text[MQTT_REASON_MAX];
    mqtt_bytes_t reason;
    client_lock(self);
    int code = mqtt_session_disconnect_reason(session_of(self), &reason);
    size_t len = code < 0 ? 0 : copy_out(text, sizeof(text), reason);
    client_unlock(self);
    if (code < 0) {
        return mp_const_none;
    }
    mp_obj_t items[2] = { MP_OBJ_NEW_SMALL_INT(code), mp_obj_new_str(text, len) };
    return mp_obj_new_tuple(2, items);
}
static MP_DEFINE_CONST_FUN_OBJ_1(client_disconnect_reason_obj, client_disconnect_reason);

// Client.assigned_client_id() -> str or None: the client identifier the
// MQTT 5 broker assigned when the client connected with an empty one.
static mp_obj_t client_assigned_client_id(mp_obj_t self_in) {
    mp_obj_mqtt_client_t *self = client_of(self_in);
    char text[MQTT_ASSIGNED_ID_MAX];
    client_lock(self);
    size_t len = copy_out(text, sizeof(text), mqtt_session_assigned_client_id(session_of(self)));
    client_unlock(self);
    return len == 0 ? mp_const_none : mp_obj_new_str(text, len);
}
static MP_DEFINE_CONST_FUN_OBJ_1(client_assigned_client_id_obj, client_assigned_client_id);

// Client.message_flags() -> int or None: inside a message callback, the
// flags of the message's PUBLISH header (bit 0 retain, bits 1-2 QoS, bit 3
// DUP); elsewhere those of the message messages() gave last, or None. A
// small int: nothing is allocated.
static mp_obj_t client_message_flags(mp_obj_t self_in) {
    mp_obj_mqtt_client_t *self = client_of(self_in);
    if (in_callback(self)) {
        return MP_OBJ_NEW_SMALL_INT(self->message_flags);
    }
    if (self->aio != NULL && self->aio->taken_flags >= 0) {
        return MP_OBJ_NEW_SMALL_INT(self->aio->taken_flags);
    }
    return mp_const_none;
}
static MP_DEFINE_CONST_FUN_OBJ_1(client_message_flags_obj, client_message_flags);

// Client.message_properties() -> dict or None: MQTT 5, inside a message
// callback, the properties of the message (see properties_dict());
// elsewhere those of the message messages() gave last; None with MQTT
// 3.1.1 and outside both. Made anew at each call from the block kept as
// it arrived.
static mp_obj_t client_message_properties(mp_obj_t self_in) {
    mp_obj_mqtt_client_t *self = client_of(self_in);
    mp_obj_t block = MP_OBJ_NULL;
    if (in_callback(self) && speaks_v5(self)) {
        // None: the message has no property block.
        block = option(self, OPTION_MESSAGE_PROPERTIES);
        block = block == mp_const_none ? mp_const_empty_bytes : block;
    } else if (!in_callback(self) && self->aio != NULL) {
        block = self->aio->taken_properties;
    }
    return !MQTT_V5 || block == MP_OBJ_NULL ? mp_const_none : properties_dict(block);
}
static MP_DEFINE_CONST_FUN_OBJ_1(client_message_properties_obj, client_message_properties);

// Client.loop(): start the background loop (a no-op when it runs already)
static mp_obj_t client_loop(mp_obj_t self_in) {
    mp_obj_mqtt_client_t *self = client_of(self_in);
    client_lock(self);
    bool linked = self->stream != MP_OBJ_NULL;
    client_unlock(self);
    if (!linked) {
        // A loop without a link would only end at once.
        mp_raise_OSError(MP_ENOTCONN);
    }
    if (aio_loop_runs(self)) {
        mp_raise_OSError(MP_EBUSY);
    }
    loop_start(self);
    return mp_const_none;
}
static MP_DEFINE_CONST_FUN_OBJ_1(client_loop_obj, client_loop);

// Client.cycle(): run one loop cycle on the calling thread
static mp_obj_t client_cycle(mp_obj_t self_in) {
    mp_obj_mqtt_client_t *self = client_of(self_in);
    if (loop_runs_elsewhere(self) || aio_loop_runs(self)) {
        mp_raise_OSError(MP_EBUSY);
    }
    if (self->reconnect_phase != RECONNECT_OFF) {
        reconnect_step(self, self->cycle_timeout_ms);
        return mp_const_none;
    }
    int status = run_cycle(self, self->cycle_timeout_ms);
    if (status == MQTT_OK || status == MQTT_LINK_REPLACED) {
        return mp_const_none;
    }
    // Made before loop_failure runs: a reconnect there clears what the
    // failed link stashed.
    mp_obj_t failure = exception_for_status(self, status);
    if (loop_goes_on(self)) {
        return mp_const_none;
    }
    nlr_raise(failure);
}
static MP_DEFINE_CONST_FUN_OBJ_1(client_cycle_obj, client_cycle);

// Client.set_username_pw(username, password='')
static mp_obj_t client_set_username_pw(size_t n_args, const mp_obj_t *pos_args, mp_map_t *kw_args) {
    enum { ARG_username, ARG_password };
    static const mp_arg_t allowed[] = {
        { MP_QSTR_username, MP_ARG_REQUIRED | MP_ARG_OBJ, {.u_rom_obj = MP_ROM_NONE} },
        { MP_QSTR_password, MP_ARG_OBJ, {.u_rom_obj = MP_ROM_NONE} },
    };
    mp_obj_mqtt_client_t *self = client_of(pos_args[0]);
    mp_arg_val_t args[MP_ARRAY_SIZE(allowed)];
    mp_arg_parse_all(n_args - 1, pos_args + 1, kw_args, MP_ARRAY_SIZE(allowed), allowed, args);
    mqtt_bytes_t username = bytes_of_str(args[ARG_username].u_obj, "username");
    mp_obj_t password = args[ARG_password].u_obj;
    if (password != mp_const_none) {
        mqtt_bytes_t bytes = bytes_of_buffer(password);
        password = bytes.len == 0 ? mp_const_none : password;
        if (bytes.len > 65535) {
            mp_raise_ValueError(MP_ERROR_TEXT("password too long"));
        }
    }
    if (username.len > 65535) {
        mp_raise_ValueError(MP_ERROR_TEXT("username too long"));
    }
    set_option(self, OPTION_USERNAME, args[ARG_username].u_obj);
    set_option(self, OPTION_PASSWORD, password);
    return mp_const_none;
}
static MP_DEFINE_CONST_FUN_OBJ_KW(client_set_username_pw_obj, 2, client_set_username_pw);

// Client.set_will(topic, payload, qos=0, retain=False, *, delay=None,
// expiry=None, content_type=None, response_topic=None,
// correlation_data=None, payload_format=None, user_properties=None)
static mp_obj_t client_set_will(size_t n_args, const mp_obj_t *pos_args, mp_map_t *kw_args) {
    // The properties in kept_properties()'s order.
    enum {
        ARG_topic, ARG_payload, ARG_qos, ARG_retain, ARG_delay, ARG_expiry, ARG_content_type, ARG_response_topic,
        ARG_correlation_data, ARG_payload_format, ARG_user_properties,
    };
    static const mp_arg_t allowed[] = {
        { MP_QSTR_topic, MP_ARG_REQUIRED | MP_ARG_OBJ, {.u_rom_obj = MP_ROM_NONE} },
        { MP_QSTR_payload, MP_ARG_REQUIRED | MP_ARG_OBJ, {.u_rom_obj = MP_ROM_NONE} },
        { MP_QSTR_qos, MP_ARG_OBJ, {.u_rom_obj = MP_ROM_INT(0)} },
        { MP_QSTR_retain, MP_ARG_BOOL, {.u_bool = false} },
        { MP_QSTR_delay, MP_ARG_KW_ONLY | MP_ARG_OBJ, {.u_rom_obj = MP_ROM_NONE} },
        { MP_QSTR_expiry, MP_ARG_KW_ONLY | MP_ARG_OBJ, {.u_rom_obj = MP_ROM_NONE} },
        { MP_QSTR_content_type, MP_ARG_KW_ONLY | MP_ARG_OBJ, {.u_rom_obj = MP_ROM_NONE} },
        { MP_QSTR_response_topic, MP_ARG_KW_ONLY | MP_ARG_OBJ, {.u_rom_obj = MP_ROM_NONE} },
        { MP_QSTR_correlation_data, MP_ARG_KW_ONLY | MP_ARG_OBJ, {.u_rom_obj = MP_ROM_NONE} },
        { MP_QSTR_payload_format, MP_ARG_KW_ONLY | MP_ARG_OBJ, {.u_rom_obj = MP_ROM_NONE} },
        { MP_QSTR_user_properties, MP_ARG_KW_ONLY | MP_ARG_OBJ, {.u_rom_obj = MP_ROM_NONE} },
    };
    mp_obj_mqtt_client_t *self = client_of(pos_args[0]);
    mp_arg_val_t args[MP_ARRAY_SIZE(allowed)];
    mp_arg_parse_all(n_args - 1, pos_args + 1, kw_args, MP_ARRAY_SIZE(allowed), allowed, args);
    check_topic(args[ARG_topic].u_obj, false);
    if (bytes_of_buffer(args[ARG_payload].u_obj).len > 65535) {
        mp_raise_ValueError(MP_ERROR_TEXT("will payload too long"));
    }
    uint8_t qos = qos_of(args[ARG_qos].u_obj);
    mp_obj_t given[PROPERTY_COUNT];
    for (size_t i = 0; i < PROPERTY_COUNT; i++) {
        given[i] = args[ARG_delay + i].u_obj;
    }
    mp_obj_t properties = kept_properties(self, given, "will properties");
    set_option(self, OPTION_WILL_TOPIC, args[ARG_topic].u_obj);
    set_option(self, OPTION_WILL_PAYLOAD, args[ARG_payload].u_obj);
    set_option(self, OPTION_WILL_PROPERTIES, properties);
    self->will_qos = qos;
    self->will_retain = args[ARG_retain].u_bool;
    return mp_const_none;
}
static MP_DEFINE_CONST_FUN_OBJ_KW(client_set_will_obj, 3, client_set_will);

// Ends an engine call that sent a packet, under the lock: a link that
// failed under it is closed, the lock released, and a failure raised.
static void unlock_after_sending(mp_obj_mqtt_client_t *self, int status) {
    if (status == MQTT_ERR_TRANSPORT || status == MQTT_ERR_CLOSED) {
        drop_link(self);
    }
    client_unlock(self);
    if (status != MQTT_OK) {
        raise_status(self, status);
    }
}

// Reads the arguments of publish() and apublish() (see client_publish)
// into `message`, checked.
static void parse_publish(size_t n_args, const mp_obj_t *pos_args, mp_map_t *kw_args, outgoing_t *message) {
    enum {
        ARG_topic, ARG_payload, ARG_qos, ARG_retain, ARG_message_expiry, ARG_content_type, ARG_response_topic,
        ARG_correlation_data, ARG_payload_format, ARG_user_properties,
    };
    static const mp_arg_t allowed[] = {
        { MP_QSTR_topic, MP_ARG_REQUIRED | MP_ARG_OBJ, {.u_rom_obj = MP_ROM_NONE} },
        { MP_QSTR_payload, MP_ARG_OBJ, {.u_rom_obj = MP_ROM_QSTR(MP_QSTR_)} },
        { MP_QSTR_qos, MP_ARG_OBJ, {.u_rom_obj = MP_ROM_INT(0)} },
        { MP_QSTR_retain, MP_ARG_BOOL, {.u_bool = false} },
        { MP_QSTR_message_expiry, MP_ARG_KW_ONLY | MP_ARG_OBJ, {.u_rom_obj = MP_ROM_NONE} },
        { MP_QSTR_content_type, MP_ARG_KW_ONLY | MP_ARG_OBJ, {.u_rom_obj = MP_ROM_NONE} },
        { MP_QSTR_response_topic, MP_ARG_KW_ONLY | MP_ARG_OBJ, {.u_rom_obj = MP_ROM_NONE} },
        { MP_QSTR_correlation_data, MP_ARG_KW_ONLY | MP_ARG_OBJ, {.u_rom_obj = MP_ROM_NONE} },
        { MP_QSTR_payload_format, MP_ARG_KW_ONLY | MP_ARG_OBJ, {.u_rom_obj = MP_ROM_NONE} },
        { MP_QSTR_user_properties, MP_ARG_KW_ONLY | MP_ARG_OBJ, {.u_rom_obj = MP_ROM_NONE} },
    };
    mp_arg_val_t args[MP_ARRAY_SIZE(allowed)];
    mp_arg_parse_all(n_args - 1, pos_args + 1, kw_args, MP_ARRAY_SIZE(allowed), allowed, args);
    message->topic = args[ARG_topic].u_obj;
    message->payload = args[ARG_payload].u_obj;
    bytes_of_str(message->topic, "topic");
    bytes_of_buffer(message->payload);
    message->qos = qos_of(args[ARG_qos].u_obj);
    message->retain = args[ARG_retain].u_bool;
    check_topic(message->topic, false);
    mp_obj_t given[PROPERTY_COUNT] = {
        [PROPERTY_DELAY] = mp_const_none,
        [PROPERTY_EXPIRY] = args[ARG_message_expiry].u_obj,
        [PROPERTY_CONTENT_TYPE] = args[ARG_content_type].u_obj,
        [PROPERTY_RESPONSE_TOPIC] = args[ARG_response_topic].u_obj,
        [PROPERTY_CORRELATION_DATA] = args[ARG_correlation_data].u_obj,
        [PROPERTY_PAYLOAD_FORMAT] = args[ARG_payload_format].u_obj,
        [PROPERTY_USER] = args[ARG_user_properties].u_obj,
    };
    message->properties = kept_properties(client_of(pos_args[0]), given, "message properties");
}

// Sends `message`. Returns whether there is an acknowledgement to wait
// for: `*ticket` follows it.
static bool publish_now(mp_obj_mqtt_client_t *self, const outgoing_t *message, mqtt_ticket_t *ticket) {
    uint8_t qos = message->qos;
    if (qos > 0 && self->held == NULL) {
        mp_obj_t *held = m_new0(mp_obj_t, 2 * MQTT_INFLIGHT_MAX);
        client_lock(self);
        if (self->held == NULL) {
            self->held = held;
        }
        client_unlock(self);
    }
    mqtt_bytes_t topic_bytes = bytes_of_str(message->topic, "topic");
    mqtt_bytes_t payload_bytes = bytes_of_buffer(message->payload);
    // Kept with the topic, for a resend after a reconnect (kept_publish()).
    mp_obj_t kept_topic = message->topic;
    mqtt_message_properties_t properties;
    bool has_properties = MQTT_V5 && message->properties != mp_const_none;
    if (has_properties) {
        message_properties_of(message->properties, &properties);
        mp_obj_t with_properties[2] = { message->topic, message->properties };
        kept_topic = qos > 0 ? mp_obj_new_tuple(2, with_properties) : mp_const_none;
    }
    // MQTT 5: the topic may go by a topic alias (mqtt_properties.c).
    alias_context_t alias_context = { .client = self, .topic = message->topic };
    mqtt_aliases_t aliases = { .context = &alias_context, .stands_for = alias_stands_for, .set = alias_set };
    client_lock(self);
    mqtt_transport_t transport = transport_of(self);
    // Without a link the engine answers MQTT_ERR_NOT_CONNECTED.
    int status = mqtt_session_publish(session_of(self), &transport, now_ms(), topic_bytes, payload_bytes, qos,
        message->retain, has_properties ? &properties : NULL, speaks_v5(self) ? &aliases : NULL, ticket);
    if (status == MQTT_OK && qos > 0) {
        self->held[2 * ticket->slot] = kept_topic;
        self->held[2 * ticket->slot + 1] = message->payload;
    }
    unlock_after_sending(self, status);
    return qos > 0;
}

// Client.publish(topic, payload='', qos=0, retain=False)
static mp_obj_t client_publish(size_t n_args, const mp_obj_t *pos_args, mp_map_t *kw_args) {
    mp_obj_mqtt_client_t *self = client_of(pos_args[0]);
    outgoing_t message;
    parse_publish(n_args, pos_args, kw_args, &message);
    if (message.qos > 0 && self->auto_reconnect) {
        // Built-in reconnection may bring a lost link back meanwhile.
        wait_for_link(self);
    }
    mqtt_ticket_t ticket;
    // From a callback the loop is busy with us: it completes the flow later.
    if (publish_now(self, &message, &ticket) && !in_callback(self)) {
        wait_for(self, ticket);
    }
    return mp_const_none;
}
static MP_DEFINE_CONST_FUN_OBJ_KW(client_publish_obj, 2, client_publish);

// A subscription's options as its table entry keeps them: the options
// byte as a small int, or with a subscription identifier (MQTT 5, up to
// 28 bits: more than a small int holds on every port) an (options, id)
// tuple.
static mp_obj_t kept_options(uint8_t options, uint32_t id) {
    if (id == 0) {
        return MP_OBJ_NEW_SMALL_INT(options);
    }
    mp_obj_t both[2] = { MP_OBJ_NEW_SMALL_INT(options), mp_obj_new_int_from_uint(id) };
    return mp_obj_new_tuple(2, both);
}

// Returns a copy of the subscription table where `filter` maps to
// `callback` and `options` (see kept_options(); in its place, or added at
// the end), or without `filter` when `callback` is MP_OBJ_NULL (the same
// table when it has none).
static mp_obj_t table_with(mp_obj_t table, mp_obj_t filter, mp_obj_t callback, mp_obj_t options) {
    size_t n;
    mp_obj_t *items;
    mp_obj_tuple_get(table, &n, &items);
    size_t at = 0;
    while (at < n && !mp_obj_equal(items[at], filter)) {
        at += TABLE_ENTRY;
    }
    if (callback == MP_OBJ_NULL) {
        if (at == n) {
            return table;
        }
        mp_obj_tuple_t *smaller = MP_OBJ_TO_PTR(mp_obj_new_tuple(n - TABLE_ENTRY, NULL));
        memcpy(smaller->items, items, at * sizeof(mp_obj_t));
        memcpy(smaller->items + at, items + at + TABLE_ENTRY, (n - at - TABLE_ENTRY) * sizeof(mp_obj_t));
        return MP_OBJ_FROM_PTR(smaller);
    }
    mp_obj_tuple_t *copy = MP_OBJ_TO_PTR(mp_obj_new_tuple(at == n ? n + TABLE_ENTRY : n, NULL));
    memcpy(copy->items, items, n * sizeof(mp_obj_t));
    copy->items[at] = filter;
    copy->items[at + 1] = callback;
    copy->items[at + 2] = options;
    return MP_OBJ_FROM_PTR(copy);
}

// Installs a subscription table where `filter` maps to `callback` and
// `options` (see kept_options()), or is absent when `callback` is
// MP_OBJ_NULL. The table is built outside the lock (building allocates,
// which may raise) and installed only if no other thread changed the
// table meanwhile. Returns the table it replaced; `*installed` is the new
// one.
static mp_obj_t update_subscriptions(mp_obj_mqtt_client_t *self, mp_obj_t filter, mp_obj_t callback, mp_obj_t options, mp_obj_t *installed) {
    for (;;) {
        mp_obj_t current = self->subscriptions;
        mp_obj_t next = table_with(current, filter, callback, options);
        client_lock(self);
        bool unchanged = self->subscriptions == current;
        if (unchanged) {
            self->subscriptions = next;
            if (callback == MP_OBJ_NULL && next != current) {
                // Entries moved down: a resubscription under way starts again.
                mqtt_session_table_shrank(session_of(self));
            }
        }
        client_unlock(self);
        if (unchanged) {
            *installed = next;
            return current;
        }
    }
}

// Sends SUBSCRIBE or UNSUBSCRIBE and returns its ticket (raises on error).
// `options`: the subscription's QoS, and in MQTT 5 its options and
// subscription identifier (0: none; see start_subscription).
static mqtt_ticket_t send_subscription(mp_obj_mqtt_client_t *self, mp_obj_t filter, uint8_t options, uint32_t id, bool unsubscribe) {
    mqtt_bytes_t topic = bytes_of_str(filter, "topic");
    client_lock(self);
    mqtt_transport_t transport = transport_of(self);
    mqtt_ticket_t ticket;
    int status = mqtt_session_subscribe(session_of(self), &transport, now_ms(), topic, options, id, unsubscribe, &ticket);
    unlock_after_sending(self, status);
    return ticket;
}

// Subscribes for subscribe() and asubscribe(): puts the filter in the
// table with its function (None, for asubscribe(): the queue messages()
// empties) and sends SUBSCRIBE, whose answer `*ticket` follows. `wait`:
// waits for it too, and returns the granted QoS. A failure, or a refusal
// waited for, takes the filter off the table again.
static uint8_t start_subscription(size_t n_args, const mp_obj_t *pos_args, mp_map_t *kw_args, bool wait, mqtt_ticket_t *ticket, mp_obj_t *filter_out) {
    enum {
        ARG_topic, ARG_function, ARG_qos, ARG_no_local, ARG_retain_as_published, ARG_retain_handling,
        ARG_subscription_id,
    };
    static const mp_arg_t allowed[] = {
        { MP_QSTR_topic, MP_ARG_REQUIRED | MP_ARG_OBJ, {.u_rom_obj = MP_ROM_NONE} },
        { MP_QSTR_function, MP_ARG_OBJ, {.u_rom_obj = MP_ROM_NONE} },
        { MP_QSTR_qos, MP_ARG_OBJ, {.u_rom_obj = MP_ROM_INT(0)} },
        { MP_QSTR_no_local, MP_ARG_KW_ONLY | MP_ARG_BOOL, {.u_bool = false} },
        { MP_QSTR_retain_as_published, MP_ARG_KW_ONLY | MP_ARG_BOOL, {.u_bool = false} },
        { MP_QSTR_retain_handling, MP_ARG_KW_ONLY | MP_ARG_INT, {.u_int = 0} },
        { MP_QSTR_subscription_id, MP_ARG_KW_ONLY | MP_ARG_OBJ, {.u_rom_obj = MP_ROM_NONE} },
    };
    mp_obj_mqtt_client_t *self = client_of(pos_args[0]);
    mp_arg_val_t args[MP_ARRAY_SIZE(allowed)];
    mp_arg_parse_all(n_args - 1, pos_args + 1, kw_args, MP_ARRAY_SIZE(allowed), allowed, args);
    mp_obj_t filter = args[ARG_topic].u_obj;
    mp_obj_t function = args[ARG_function].u_obj;
    *filter_out = filter;
    check_topic(filter, true);
    if ((wait || function != mp_const_none) && !mp_obj_is_callable(function)) {
        mp_raise_TypeError(MP_ERROR_TEXT("function must be callable"));
    }
    // MQTT 5's subscription options byte: the QoS in bits 0-1, then No
    // Local, Retain As Published and Retain Handling.
    mp_int_t retain_handling = args[ARG_retain_handling].u_int;
    if (retain_handling < 0 || retain_handling > 2) {
        mp_raise_ValueError(MP_ERROR_TEXT("retain_handling must be 0, 1 or 2"));
    }
    uint8_t options = qos_of(args[ARG_qos].u_obj) | (args[ARG_no_local].u_bool << 2)
        | (args[ARG_retain_as_published].u_bool << 3) | (uint8_t)(retain_handling << 4);
    mp_obj_t given_id = args[ARG_subscription_id].u_obj;
    uint32_t id = 0;
    if (given_id != mp_const_none) {
        id = non_negative_of(given_id, "subscription_id");
        if (id == 0 || id > MQTT_SUBSCRIPTION_ID_MAX) {
            mp_raise_ValueError(MP_ERROR_TEXT("subscription_id must be 1-268435455"));
        }
    }
    if ((options > 3 || id != 0) && !speaks_v5(self)) {
        mp_raise_ValueError(MP_ERROR_TEXT("no_local, retain_as_published, retain_handling and subscription_id need MQTTv5"));
    }

    // The callback is in the table before SUBSCRIBE leaves, so retained
    // messages that follow the SUBACK at once find it.
    mp_obj_t updated;
    mp_obj_t previous = update_subscriptions(self, filter, function, kept_options(options, id), &updated);

    nlr_buf_t nlr;
    if (nlr_push(&nlr) == 0) {
        *ticket = send_subscription(self, filter, options, id, false);
        uint8_t code = !wait || in_callback(self) ? 0 : wait_for(self, *ticket);
        // 0x80 in MQTT 3.1.1; any code from 0x80 up in MQTT 5.
        if (code >= MQTT_EXC_SUBSCRIBE_FAILED) {
            raise_subscription_refused(self, code);
        }
        nlr_pop();
        return code;
    }
    client_lock(self);
    if (self->subscriptions == updated) {
        self->subscriptions = previous;
    }
    client_unlock(self);
    nlr_jump(nlr.ret_val);
}

// Client.subscribe(topic, function, qos=0, *, no_local=False,
//                  retain_as_published=False, retain_handling=0,
//                  subscription_id=None)
static mp_obj_t client_subscribe(size_t n_args, const mp_obj_t *pos_args, mp_map_t *kw_args) {
    mqtt_ticket_t ticket;
    mp_obj_t filter;
    return MP_OBJ_NEW_SMALL_INT(start_subscription(n_args, pos_args, kw_args, true, &ticket, &filter));
}
static MP_DEFINE_CONST_FUN_OBJ_KW(client_subscribe_obj, 3, client_subscribe);

// Takes `filter` off the table (its callback is never called again) and
// sends UNSUBSCRIBE, whose answer the returned ticket follows.
static mqtt_ticket_t start_unsubscription(mp_obj_mqtt_client_t *self, mp_obj_t filter) {
    check_topic(filter, true);
    mp_obj_t smaller;
    update_subscriptions(self, filter, MP_OBJ_NULL, MP_OBJ_NEW_SMALL_INT(0), &smaller);
    return send_subscription(self, filter, 0, 0, true);
}

// Client.unsubscribe(topic)
static mp_obj_t client_unsubscribe(mp_obj_t self_in, mp_obj_t filter) {
    mp_obj_mqtt_client_t *self = client_of(self_in);
    mqtt_ticket_t ticket = start_unsubscription(self, filter);
    if (!in_callback(self)) {
        wait_for(self, ticket);
    }
    return mp_const_none;
}
static MP_DEFINE_CONST_FUN_OBJ_2(client_unsubscribe_obj, client_unsubscribe);

// Ends the link for disconnect() and adisconnect(): the loop stops (a
// thread within one cycle), reconnecting stops, DISCONNECT goes if it can.
static void end_link(mp_obj_mqtt_client_t *self) {
    loop_stop(self);
    aio_stop(self);
    stop_reconnecting(self);
    client_lock(self);
    if (self->stream != MP_OBJ_NULL) {
        mqtt_transport_t transport = transport_of(self);
        // Best effort: the link closes whether DISCONNECT got out or not.
        mqtt_session_disconnect(session_of(self), &transport, now_ms());
        clear_pending(self);
    }
    drop_link(self);
    self->link_generation++;
    client_unlock(self);
}

// Client.disconnect(timeout=None)
static mp_obj_t client_disconnect(size_t n_args, const mp_obj_t *pos_args, mp_map_t *kw_args) {
    static const mp_arg_t allowed[] = {
        { MP_QSTR_timeout, MP_ARG_OBJ, {.u_rom_obj = MP_ROM_NONE} },
    };
    mp_obj_mqtt_client_t *self = client_of(pos_args[0]);
    mp_arg_val_t args[MP_ARRAY_SIZE(allowed)];
    mp_arg_parse_all(n_args - 1, pos_args + 1, kw_args, MP_ARRAY_SIZE(allowed), allowed, args);
    mp_obj_t timeout_obj = args[0].u_obj;
    uint32_t timeout = timeout_obj == mp_const_none ? 0 : non_negative_of(timeout_obj, "timeout");
    end_link(self);
    if (timeout_obj != mp_const_none && !in_callback(self)) {
        uint32_t start = now_ms();
        while (self->loop_state != LOOP_STOPPED && now_ms() - start < timeout) {
            pause_briefly(now_ms() - start);
        }
    }
    return mp_const_none;
}
static MP_DEFINE_CONST_FUN_OBJ_KW(client_disconnect_obj, 1, client_disconnect);

static const mp_rom_map_elem_t client_locals_table[] = {
    { MP_ROM_QSTR(MP_QSTR_connect), MP_ROM_PTR(&client_connect_obj) },
    { MP_ROM_QSTR(MP_QSTR_reconnect), MP_ROM_PTR(&client_reconnect_obj) },
    { MP_ROM_QSTR(MP_QSTR_get_return_code), MP_ROM_PTR(&client_get_return_code_obj) },
    { MP_ROM_QSTR(MP_QSTR_disconnect_reason), MP_ROM_PTR(&client_disconnect_reason_obj) },
    { MP_ROM_QSTR(MP_QSTR_assigned_client_id), MP_ROM_PTR(&client_assigned_client_id_obj) },
    { MP_ROM_QSTR(MP_QSTR_connected), MP_ROM_PTR(&client_connected_obj) },
    { MP_ROM_QSTR(MP_QSTR_message_flags), MP_ROM_PTR(&client_message_flags_obj) },
    { MP_ROM_QSTR(MP_QSTR_message_properties), MP_ROM_PTR(&client_message_properties_obj) },
    { MP_ROM_QSTR(MP_QSTR_loop), MP_ROM_PTR(&client_loop_obj) },
    { MP_ROM_QSTR(MP_QSTR_cycle), MP_ROM_PTR(&client_cycle_obj) },
    { MP_ROM_QSTR(MP_QSTR_set_username_pw), MP_ROM_PTR(&client_set_username_pw_obj) },
    { MP_ROM_QSTR(MP_QSTR_set_will), MP_ROM_PTR(&client_set_will_obj) },
    { MP_ROM_QSTR(MP_QSTR_publish), MP_ROM_PTR(&client_publish_obj) },
    { MP_ROM_QSTR(MP_QSTR_subscribe), MP_ROM_PTR(&client_subscribe_obj) },
    { MP_ROM_QSTR(MP_QSTR_unsubscribe), MP_ROM_PTR(&client_unsubscribe_obj) },
    { MP_ROM_QSTR(MP_QSTR_disconnect), MP_ROM_PTR(&client_disconnect_obj) },
    { MP_ROM_QSTR(MP_QSTR_aconnect), MP_ROM_PTR(&client_aconnect_obj) },
    { MP_ROM_QSTR(MP_QSTR_apublish), MP_ROM_PTR(&client_apublish_obj) },
    { MP_ROM_QSTR(MP_QSTR_asubscribe), MP_ROM_PTR(&client_asubscribe_obj) },
    { MP_ROM_QSTR(MP_QSTR_aunsubscribe), MP_ROM_PTR(&client_aunsubscribe_obj) },
    { MP_ROM_QSTR(MP_QSTR_adisconnect), MP_ROM_PTR(&client_adisconnect_obj) },
    { MP_ROM_QSTR(MP_QSTR_messages), MP_ROM_PTR(&client_messages_obj) },
};
static MP_DEFINE_CONST_DICT(client_locals, client_locals_table);

static MP_DEFINE_CONST_OBJ_TYPE(
    mqtt_client_type,
    MP_QSTR_Client,
    MP_TYPE_FLAG_NONE,
    make_new, client_make_new,
    protocol, &client_stream_p,
    locals_dict, &client_locals
    );

static const mp_rom_map_elem_t mqtt_module_globals_table[] = {
    { MP_ROM_QSTR(MP_QSTR___name__), MP_ROM_QSTR(MP_QSTR_mqtt) },
    { MP_ROM_QSTR(MP_QSTR_Client), MP_ROM_PTR(&mqtt_client_type) },
    { MP_ROM_QSTR(MP_QSTR_MQTTException), MP_ROM_PTR(&mp_type_MQTTException) },
    { MP_ROM_QSTR(MP_QSTR_BREAK_LOOP), MP_ROM_INT(MQTT_BREAK_LOOP) },
    { MP_ROM_QSTR(MP_QSTR_RECOVERED), MP_ROM_INT(MQTT_RECOVERED) },
    { MP_ROM_QSTR(MP_QSTR_CONNECTION_ACCEPTED), MP_ROM_INT(0) },
    { MP_ROM_QSTR(MP_QSTR_CONNECTION_REFUSED_PROTOCOL_VERSION), MP_ROM_INT(1) },
    { MP_ROM_QSTR(MP_QSTR_CONNECTION_REFUSED_IDENTIFIER_REJECTED), MP_ROM_INT(2) },
    { MP_ROM_QSTR(MP_QSTR_CONNECTION_REFUSED_SERVER_UNAVAILABLE), MP_ROM_INT(3) },
    { MP_ROM_QSTR(MP_QSTR_CONNECTION_REFUSED_BAD_USERNAME_PASSWORD), MP_ROM_INT(4) },
    { MP_ROM_QSTR(MP_QSTR_CONNECTION_REFUSED_NOT_AUTHORIZED), MP_ROM_INT(5) },
    { MP_ROM_QSTR(MP_QSTR_SUBSCRIBE_FAILED), MP_ROM_INT(MQTT_EXC_SUBSCRIBE_FAILED) },
    { MP_ROM_QSTR(MP_QSTR_TIMEOUT), MP_ROM_INT(MQTT_EXC_TIMEOUT) },
    { MP_ROM_QSTR(MP_QSTR_PROTOCOL_ERROR), MP_ROM_INT(MQTT_EXC_PROTOCOL) },
    { MP_ROM_QSTR(MP_QSTR_REASON), MP_ROM_INT(MQTT_EXC_REASON) },
    { MP_ROM_QSTR(MP_QSTR_MQTTv311), MP_ROM_INT(4) },
    { MP_ROM_QSTR(MP_QSTR_MQTTv5), MP_ROM_INT(5) },
    { MP_ROM_QSTR(MP_QSTR_LOOP), MP_ROM_QSTR(MQTT_LOOP_NAME) },
};
static MP_DEFINE_CONST_DICT(mqtt_module_globals, mqtt_module_globals_table);

const mp_obj_module_t mqtt_user_cmodule = {
    .base = { &mp_type_module },
    .globals = (mp_obj_dict_t *)&mqtt_module_globals,
};

MP_REGISTER_MODULE(MP_QSTR_mqtt, mqtt_user_cmodule);

