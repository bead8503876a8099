// The MicroPython binding of the `mqtt` module.
//
// This file knows Python, not MQTT: it checks and converts arguments, keeps
// every Python object the client needs reachable from the Client object,
// runs the engine's transport over a MicroPython stream (socket or TLS),
// calls the user's callbacks and turns engine status codes into exceptions.
// Every protocol decision is made by the Rust engine (src/, mqtt_engine.h).
//
// Locking: every call into the engine, and every change to the client's
// tables, happens under the client's lock. Waiting for input and calling
// user callbacks happen outside it, so a callback may publish.
//
// Exceptions: MicroPython raises by longjmp, which must never cross Rust
// frames. The transport callbacks catch with nlr_push and stash what they
// caught on the client; the binding raises it after the engine returned.

#include <string.h>

#include "py/mperrno.h"
#include "py/mphal.h"
#include "py/objexcept.h"
#include "py/objstr.h"
#include "py/objtuple.h"
#include "py/objtype.h"
#include "py/runtime.h"
#include "py/stream.h"
#if MICROPY_PY_THREAD
#include "py/mpthread.h"
#endif

#include "mqtt_engine.h"

#if defined(__unix__) || defined(__APPLE__)
#include <errno.h>
#include <poll.h>
#include <sched.h>
#define MQTT_POSIX_POLL (1)
#else
#define MQTT_POSIX_POLL (0)
#endif

// How connect(start_loop=True) runs the loop on this port, the way that
// costs the least heap:
// - scheduled: cycles run on the interpreter's thread, through the
//   scheduler, when the socket signals input and when a timer expires; no
//   thread, no stack. Ports with lwIP sockets (rp2 Pico W, esp8266) signal
//   input through socket option 20 and time with machine.Timer; so does
//   every rp2 board, where a thread's stack would take 4 KiB of the heap (a
//   stream without an arrival signal, a UART, is polled by the timer). The
//   unix port without threads (the stand-in for those boards in the tests)
//   uses SIGIO and SIGALRM.
// - thread: a thread of its own (unix; esp32, whose thread stacks are
//   outside the heap).
// - neither (the qemu boards): the application calls cycle().
// MQTT_TIMER_LOOP=1 forces the boards' way (socket option 20 and
// machine.Timer) on any port: the tests build a unix firmware so, with
// stand-ins for the two.
#if MICROPY_PY_LWIP || PICO_ON_DEVICE || MQTT_TIMER_LOOP
#define MQTT_LOOP_SCHEDULED (1)
#define MQTT_WAKE_BY_SIGNAL (0)
#elif MQTT_POSIX_POLL && !MICROPY_PY_THREAD
#define MQTT_LOOP_SCHEDULED (1)
#define MQTT_WAKE_BY_SIGNAL (1)
#include <fcntl.h>
#include <signal.h>
#include <sys/time.h>
#include <unistd.h>
#else
#define MQTT_LOOP_SCHEDULED (0)
#define MQTT_WAKE_BY_SIGNAL (0)
#endif
#define MQTT_LOOP_THREAD (MICROPY_PY_THREAD && !MQTT_LOOP_SCHEDULED)

// Largest incoming packet accepted unless the Client is told otherwise.
#define MQTT_DEFAULT_MAX_PACKET (1024 * 1024)

// Codes carried by MQTTException beyond the CONNACK return codes 1-5.
#define MQTT_EXC_SUBSCRIBE_FAILED (0x80)
#define MQTT_EXC_TIMEOUT (0x100)
#define MQTT_EXC_PROTOCOL (0x101)

// Values loop_failure returns.
#define MQTT_BREAK_LOOP (0)
#define MQTT_RECOVERED (1)

// Status of a cycle that ended because the link was replaced or closed by
// the application (disconnect() or reconnect() from a callback): not a failure.
#define MQTT_LINK_REPLACED (1)

enum {
    LOOP_STOPPED,
    LOOP_RUNNING,
    LOOP_STOPPING,
};

MP_DEFINE_EXCEPTION(MQTTException, Exception)

typedef struct _mp_obj_mqtt_client_t {
    mp_obj_base_t base;
    // Connection parameters, kept for reconnect().
    mp_obj_t client_id;
    mp_obj_t host;
    // The optional settings (OPTION_*), allocated when one is first set:
    // a client that uses none of them saves their room.
    mp_obj_t *options;
    mp_obj_t loop_failure;
    // (filter, callback, filter, callback, ...); replaced, never mutated,
    // so that a delivery in progress can keep iterating its snapshot.
    mp_obj_t subscriptions;
    // Topic and payload of each in-flight QoS 1/2 publish, by slot, kept
    // for a resend after reconnect; allocated on the first such publish.
    mp_obj_t *held;
    // What the session talks to: the socket or its TLS wrapper (closing
    // that closes the socket too). MP_OBJ_NULL when there is no link.
    mp_obj_t stream;
    // What a transport callback caught, raised once the engine returned.
    mp_obj_t pending_exception;
    #if MICROPY_PY_THREAD
    mp_thread_mutex_t lock;
    // The thread running the background loop, and the thread calling
    // message callbacks, if any.
    struct _mp_state_thread_t *volatile loop_thread;
    struct _mp_state_thread_t *volatile callback_thread;
    #else
    volatile bool in_callback;
    #endif
    #if MQTT_LOOP_SCHEDULED
    // What the socket's arrival signal and the timer call: this client's
    // wake(), bound. Made on the first connect.
    mp_obj_t wake;
    #if MQTT_WAKE_BY_SIGNAL
    // When the client wants its next scheduled cycle (ticks_ms).
    uint32_t wake_at;
    #else
    // The machine.Timer of the scheduled loop, made when first needed.
    mp_obj_t timer;
    #endif
    // The link's socket signals arriving input; without that (a given
    // stream) the timer polls every cycle_timeout.
    bool input_signalled;
    // A turn of the scheduled loop is running (callbacks included).
    bool turning;
    // The thread holding the client's lock (any non-NULL value without
    // threads): a turn that the scheduler runs inside such a call, while a
    // stream's Python method or a wait runs pending callbacks, must not
    // enter the engine again.
    void *volatile lock_holder;
    #endif
    // The small fields last, packed: the object lives on the heap.
    int sock_fd;
    uint32_t cycle_timeout_ms;
    int16_t pending_errno;
    // Bumped on every new link, so a cycle notices when a callback
    // disconnected or reconnected under it.
    uint16_t link_generation;
    uint16_t port;
    uint16_t keepalive_s;
    int8_t return_code;
    uint8_t will_qos;
    bool will_retain;
    bool clean_session;
    volatile uint8_t loop_state;
    // The stream is a TLS wrapper that may hold input of its own.
    bool stream_buffers;
    // The client opened the link's socket (false for connect(stream=...)),
    // so it closes it when the link ends.
    bool owns_stream;
    // The cycle's wait found input (spares the engine's readiness check).
    bool input_ready;
    // The thread that reads the link in a cycle (see run_cycle), or NULL.
    void *volatile reader;
    // The engine's session, mqtt_session_size() bytes.
    uint64_t session[];
} mp_obj_mqtt_client_t;

static const mp_obj_type_t mqtt_client_type;

// The optional settings a client keeps for reconnect().
enum {
    OPTION_SSL_CTX,
    OPTION_USERNAME,
    OPTION_PASSWORD,
    OPTION_WILL_TOPIC,
    OPTION_WILL_PAYLOAD,
    OPTION_BRECONNECT_CB,
    OPTION_ACONNECT_CB,
    // A stream the application connected itself (connect(stream=...)).
    OPTION_STREAM,
    OPTION_COUNT,
};

static mp_obj_t option(mp_obj_mqtt_client_t *self, size_t which) {
    return self->options == NULL ? mp_const_none : self->options[which];
}

// Sets an optional setting (may raise MemoryError on the first one).
static void set_option(mp_obj_mqtt_client_t *self, size_t which, mp_obj_t value) {
    if (self->options == NULL) {
        if (value == mp_const_none) {
            return;
        }
        mp_obj_t *options = m_new(mp_obj_t, OPTION_COUNT);
        for (size_t i = 0; i < OPTION_COUNT; i++) {
            options[i] = mp_const_none;
        }
        self->options = options;
    }
    self->options[which] = value;
}

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
    #if MICROPY_PY_THREAD
    return self->callback_thread == mp_thread_get_state();
    #else
    return self->in_callback;
    #endif
}

// Marks the calling thread as inside a message callback (or not); returns
// the previous mark so that nested deliveries restore it.
static bool set_in_callback(mp_obj_mqtt_client_t *self, bool active) {
    bool previous = in_callback(self);
    #if MICROPY_PY_THREAD
    self->callback_thread = active ? mp_thread_get_state() : NULL;
    #else
    self->in_callback = active;
    #endif
    return previous;
}

// Whether the background loop runs on a thread other than the caller's:
// then that thread reads the link and the caller only waits.
static bool loop_on_other_thread(mp_obj_mqtt_client_t *self) {
    #if MQTT_LOOP_THREAD
    return self->loop_state == LOOP_RUNNING && self->loop_thread != mp_thread_get_state();
    #else
    (void)self;
    return false;
    #endif
}

// Whether the background loop runs outside the caller: on a thread other
// than the caller's, or as scheduled turns (see MQTT_LOOP_SCHEDULED) when
// the caller is not one of them.
static bool loop_runs_elsewhere(mp_obj_mqtt_client_t *self) {
    #if MQTT_LOOP_SCHEDULED
    return self->loop_state == LOOP_RUNNING && !self->turning;
    #else
    return loop_on_other_thread(self);
    #endif
}

// Waits a little while another thread makes progress: for the first
// milliseconds only by yielding the processor (an acknowledgement on a
// good link takes well under a millisecond), then in 1 ms sleeps.
static void pause_briefly(uint32_t waited_ms) {
    if (waited_ms >= 2) {
        mp_hal_delay_ms(1);
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

static uint32_t now_ms(void) {
    return (uint32_t)mp_hal_ticks_ms();
}

static uint32_t command_timeout_ms(mp_obj_mqtt_client_t *self) {
    return mqtt_session_command_timeout(self->session);
}

// ---------------------------------------------------------------------------
// The transport: the engine's view of the MicroPython stream

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
        mp_hal_delay_ms(1);
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
    if (ready == MP_STREAM_ERROR) {
        // Let the read find out what is wrong.
        return 1;
    }
    return (ready & (MP_STREAM_POLL_RD | MP_STREAM_POLL_ERR | MP_STREAM_POLL_HUP)) ? 1 : 0;
}

static mqtt_transport_t transport_of(mp_obj_mqtt_client_t *self) {
    mqtt_transport_t transport = {
        .context = self,
        .read = transport_read,
        .write = transport_write,
        .readable = transport_readable,
    };
    return transport;
}

// ---------------------------------------------------------------------------
// Errors

static mp_obj_t mqtt_exception(int code, const char *text) {
    mp_obj_t args[2] = { MP_OBJ_NEW_SMALL_INT(code), mp_obj_new_str(text, strlen(text)) };
    return mp_obj_new_exception_args(&mp_type_MQTTException, 2, args);
}

static NORETURN void raise_mqtt(int code, const char *text) {
    nlr_raise(mqtt_exception(code, text));
}

static mp_obj_t os_error(int errcode) {
    return mp_obj_new_exception_arg1(&mp_type_OSError, MP_OBJ_NEW_SMALL_INT(errcode));
}

// The exception that the status of the last engine call means, taking
// what a transport callback stashed. Call without the lock held.
static mp_obj_t exception_for_status(mp_obj_mqtt_client_t *self, int status) {
    mp_obj_t stashed = self->pending_exception;
    int errcode = self->pending_errno;
    self->pending_exception = MP_OBJ_NULL;
    self->pending_errno = 0;
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
        case MQTT_ERR_PROTOCOL:
            return mqtt_exception(MQTT_EXC_PROTOCOL, "protocol error: the broker sent an invalid packet");
        case MQTT_ERR_PACKET_TOO_LARGE:
            return mqtt_exception(MQTT_EXC_PROTOCOL, "incoming packet larger than max_packet_size");
        case MQTT_ERR_PING_TIMEOUT:
            return mqtt_exception(MQTT_EXC_TIMEOUT, "timeout: no answer to keepalive ping");
        case MQTT_ERR_CONNECT_TIMEOUT:
            // A broker that does not answer CONNECT counts as unreachable.
            return os_error(MP_ETIMEDOUT);
        case MQTT_ERR_CLOSED:
            return os_error(MP_ECONNRESET);
        case MQTT_ERR_NO_MEMORY:
            return os_error(MP_ENOMEM);
        default:
            if (stashed != MP_OBJ_NULL) {
                return stashed;
            }
            return os_error(errcode ? errcode : MP_EIO);
    }
}

#if MQTT_LOOP_SCHEDULED
static void wake_up_in(mp_obj_mqtt_client_t *self, uint32_t delay_ms);
#endif

// After a call of the application lost the link: with the scheduled loop
// running, its next turn, at once, tells loop_failure, as it would have
// if it had found the loss itself. (A loop thread finds it by itself.)
static void notice_lost_link(mp_obj_mqtt_client_t *self) {
    #if MQTT_LOOP_SCHEDULED
    if (self->loop_state == LOOP_RUNNING && self->stream == MP_OBJ_NULL) {
        wake_up_in(self, 0);
    }
    #else
    (void)self;
    #endif
}

// Raises what an engine status means for a call of the application.
static NORETURN void raise_status(mp_obj_mqtt_client_t *self, int status) {
    notice_lost_link(self);
    nlr_raise(exception_for_status(self, status));
}

static void clear_pending(mp_obj_mqtt_client_t *self) {
    self->pending_exception = MP_OBJ_NULL;
    self->pending_errno = 0;
}

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

// ---------------------------------------------------------------------------
// The link

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
    mqtt_session_link_lost(self->session);
    mp_obj_t stream = self->stream;
    self->stream = MP_OBJ_NULL;
    self->sock_fd = -1;
    // A stream the application gave stays open: it belongs to the application.
    if (stream != MP_OBJ_NULL && self->owns_stream) {
        close_quietly(stream);
    }
}

// Opens a TCP connection to the broker; raises OSError when it cannot be
// reached. The socket is returned connected and still blocking.
static mp_obj_t open_socket(mp_obj_mqtt_client_t *self) {
    mp_obj_t socket_module = mp_import_name(MP_QSTR_socket, mp_const_none, MP_OBJ_NEW_SMALL_INT(0));
    mp_obj_t lookup[2] = { self->host, MP_OBJ_NEW_SMALL_INT(self->port) };
    mp_obj_t addresses = call_method(socket_module, MP_QSTR_getaddrinfo, 2, lookup);
    mp_obj_t address = mp_obj_subscr(addresses, MP_OBJ_NEW_SMALL_INT(0), MP_OBJ_SENTINEL);
    size_t n_fields;
    mp_obj_t *fields;
    mp_obj_get_array(address, &n_fields, &fields);
    if (n_fields < 5) {
        mp_raise_OSError(MP_EINVAL);
    }
    mp_obj_t socket_type = mp_load_attr(socket_module, MP_QSTR_socket);
    mp_obj_t sock = mp_call_function_n_kw(socket_type, 3, 0, fields);
    nlr_buf_t nlr;
    if (nlr_push(&nlr) == 0) {
        // Bound the connection attempt by command_timeout.
        mp_obj_t timeout = mp_obj_new_float((mp_float_t)command_timeout_ms(self) / 1000);
        call_method(sock, MP_QSTR_settimeout, 1, &timeout);
        call_method(sock, MP_QSTR_connect, 1, &fields[n_fields - 1]);
        // TCP_NODELAY (IPPROTO_TCP 6, option 1 on Linux and lwIP) so a small
        // packet leaves at once; ports without it just keep Nagle.
        nlr_buf_t nodelay;
        if (nlr_push(&nodelay) == 0) {
            mp_obj_t option[3] = { MP_OBJ_NEW_SMALL_INT(6), MP_OBJ_NEW_SMALL_INT(1), MP_OBJ_NEW_SMALL_INT(1) };
            call_method(sock, MP_QSTR_setsockopt, 3, option);
            nlr_pop();
        }
        nlr_pop();
    } else {
        close_quietly(sock);
        nlr_jump(nlr.ret_val);
    }
    return sock;
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

// ---------------------------------------------------------------------------
// Receiving

// Finds whether `filter` (with `callback`) is still in the current table.
static bool still_subscribed(mp_obj_mqtt_client_t *self, mp_obj_t filter, mp_obj_t callback) {
    size_t n;
    mp_obj_t *items;
    mp_obj_tuple_get(self->subscriptions, &n, &items);
    for (size_t i = 0; i + 1 < n; i += 2) {
        if (items[i] == filter && items[i + 1] == callback) {
            return true;
        }
    }
    return false;
}

// Calls the callback of every subscription whose filter matches `topic`.
// Called without the lock.
static void deliver(mp_obj_mqtt_client_t *self, mp_obj_t topic, mp_obj_t payload) {
    mp_obj_t snapshot = self->subscriptions;
    size_t n;
    mp_obj_t *items;
    mp_obj_tuple_get(snapshot, &n, &items);
    mqtt_bytes_t topic_bytes = bytes_of_str(topic, "topic");
    bool outer = set_in_callback(self, true);
    for (size_t i = 0; i + 1 < n; i += 2) {
        if (!mqtt_topic_matches(bytes_of_str(items[i], "filter"), topic_bytes)) {
            continue;
        }
        // An unsubscribe() (maybe by an earlier callback) takes effect at once.
        if (self->subscriptions != snapshot && !still_subscribed(self, items[i], items[i + 1])) {
            continue;
        }
        mp_obj_t args[3] = { MP_OBJ_FROM_PTR(self), payload, topic };
        call_and_report(items[i + 1], 3, args);
    }
    set_in_callback(self, outer);
}

// A message read from the link, handed to the callbacks once the lock is
// released.
typedef struct _delivery_t {
    mp_obj_t topic;
    mp_obj_t payload;
    uint16_t link_generation;
    // QoS 1/2: acknowledged once the callbacks returned.
    bool acknowledge;
} delivery_t;

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

// Where an incoming topic is read: on the C stack when short, so that a
// topic the firmware already knows as a qstr (any literal in the program)
// costs no allocation at all; in a heap buffer that becomes the str when
// long.
#define MQTT_TOPIC_ON_STACK (64)

typedef struct _topic_buffer_t {
    byte on_stack[MQTT_TOPIC_ON_STACK];
    vstr_t on_heap;
    size_t len;
} topic_buffer_t;

// Prepares room for `len` bytes without raising; false when out of memory.
static bool topic_buffer_init(topic_buffer_t *topic, size_t len) {
    topic->len = len;
    return len <= MQTT_TOPIC_ON_STACK || new_buffer(&topic->on_heap, len);
}

static byte *topic_buffer_data(topic_buffer_t *topic) {
    return topic->len <= MQTT_TOPIC_ON_STACK ? topic->on_stack : (byte *)topic->on_heap.buf;
}

static void topic_buffer_clear(topic_buffer_t *topic) {
    if (topic->len > MQTT_TOPIC_ON_STACK) {
        vstr_clear(&topic->on_heap);
    }
}

// Builds the topic str and payload bytes from their buffers without raising.
static bool new_message_objects(topic_buffer_t *topic, vstr_t *payload, mp_obj_t *topic_out, mp_obj_t *payload_out) {
    nlr_buf_t nlr;
    if (nlr_push(&nlr) == 0) {
        // The engine checked the topic's UTF-8 already.
        *topic_out = topic->len <= MQTT_TOPIC_ON_STACK
            ? mp_obj_new_str((const char *)topic->on_stack, topic->len)
            : mp_obj_new_str_from_vstr(&topic->on_heap);
        *payload_out = mp_obj_new_bytes_from_vstr(payload);
        nlr_pop();
        return true;
    }
    return false;
}

// The engine's sink (mqtt_sink_t): where a step puts the message it
// reads. Its callbacks never raise; the engine decides what a lack of
// memory means.
typedef struct _message_sink_t {
    mp_obj_mqtt_client_t *client;
    topic_buffer_t topic;
    vstr_t payload;
    // Buffers the step took and no object owns yet.
    bool topic_taken;
    bool payload_taken;
    mp_obj_t topic_obj;
    mp_obj_t payload_obj;
} message_sink_t;

static uint8_t *sink_topic(void *context, size_t len) {
    message_sink_t *sink = context;
    sink->topic_taken = topic_buffer_init(&sink->topic, len);
    return sink->topic_taken ? topic_buffer_data(&sink->topic) : NULL;
}

static uint8_t *sink_payload(void *context, size_t len) {
    message_sink_t *sink = context;
    sink->payload_taken = new_buffer(&sink->payload, len);
    return sink->payload_taken ? (uint8_t *)sink->payload.buf : NULL;
}

static bool sink_message_ready(void *context) {
    message_sink_t *sink = context;
    if (!new_message_objects(&sink->topic, &sink->payload, &sink->topic_obj, &sink->payload_obj)) {
        return false;
    }
    // The objects own the buffers now.
    sink->topic_taken = false;
    sink->payload_taken = false;
    return true;
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
        .payload = sink_payload,
        .message_ready = sink_message_ready,
        .completed = sink_completed,
    };
    mqtt_outcome_t outcome;
    int status = mqtt_session_step(self->session, &transport, now_ms(), &sink, &outcome);
    // What a step that did not finish its message left behind.
    if (message.topic_taken) {
        topic_buffer_clear(&message.topic);
    }
    if (message.payload_taken) {
        vstr_clear(&message.payload);
    }
    if (status != MQTT_OK) {
        return status;
    }
    if (outcome.kind == MQTT_OUTCOME_CONNACK) {
        // connect() is waiting for this.
        self->return_code = outcome.code;
    } else if (outcome.kind == MQTT_OUTCOME_DROPPED) {
        mp_printf(MICROPY_ERROR_PRINTER, "mqtt: message of %u bytes dropped: out of memory\n", (unsigned)outcome.payload_len);
    } else if (outcome.kind == MQTT_OUTCOME_MESSAGE) {
        delivery->topic = message.topic_obj;
        delivery->payload = message.payload_obj;
        delivery->link_generation = self->link_generation;
        delivery->acknowledge = outcome.acknowledge;
    }
    return MQTT_OK;
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
    wait_ms = mqtt_session_has_input(self->session) ? 0 : mqtt_session_next_timer(self->session, now_ms(), wait_ms);
    client_unlock(self);
    if (stream == MP_OBJ_NULL) {
        mp_hal_delay_ms(wait_ms);
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
    deliver(self, delivery.topic, delivery.payload);
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
        status = mqtt_session_finish_message(self->session, &transport, now_ms());
        if (status != MQTT_OK) {
            drop_link(self);
        }
    }
    client_unlock(self);
    return status;
}

// One cycle: waits up to `wait_ms` for input (without the lock), handles
// it, and calls the callbacks of a message that arrived (without the
// lock). A failed link is closed before this returns its status.
//
// One thread at a time reads the link, from its wait to the end of the
// message it delivers: messages reach the callbacks one at a time, in
// order, and no other thread waits on or reads the socket meanwhile.
// Another thread that wants a cycle then just lets the reader work.
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

// ---------------------------------------------------------------------------
// Waiting for acknowledgements

static NORETURN void raise_still_in_flight(const char *why) {
    raise_mqtt(MQTT_EXC_TIMEOUT, why);
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
        int verdict = mqtt_session_await(self->session, ticket, now_ms(), since, loop_runs_elsewhere(self), &code);
        client_unlock(self);
        switch (verdict) {
            case MQTT_AWAIT_ANSWERED:
                return code;
            case MQTT_AWAIT_CONNECT_TIMED_OUT:
                // A broker that does not answer CONNECT counts as unreachable.
                mp_raise_OSError(MP_ETIMEDOUT);
            case MQTT_AWAIT_TIMED_OUT:
                raise_still_in_flight("timeout: no acknowledgement within command_timeout");
            case MQTT_AWAIT_LINK_LOST_IN_FLIGHT:
                clear_pending(self);
                raise_still_in_flight("link lost before the acknowledgement: the message stays in flight");
            case MQTT_AWAIT_LINK_LOST:
                if (failure != MQTT_OK) {
                    // What broke the link says more than ENOTCONN.
                    raise_status(self, failure);
                }
                mp_raise_OSError(MP_ENOTCONN);
            case MQTT_AWAIT_RECONNECT:
                // A loop runs elsewhere and may reconnect (in loop_failure);
                // a scheduled loop's turns run meanwhile.
                clear_pending(self);
                pause_briefly(now_ms() - since);
                continue;
            default:
                break;
        }
        if (loop_on_other_thread(self)) {
            pause_briefly(now_ms() - since);
            continue;
        }
        int status = run_cycle(self, self->cycle_timeout_ms);
        if (status != MQTT_OK && status != MQTT_LINK_REPLACED) {
            notice_lost_link(self);
            failure = status;
        }
    }
}

// ---------------------------------------------------------------------------
// Connecting

static mqtt_bytes_t optional_bytes(mp_obj_t object) {
    return object == mp_const_none ? no_bytes() : bytes_of_buffer(object);
}

#if MQTT_LOOP_SCHEDULED
// The scheduled loop (below) watches each new link.
static const mp_obj_fun_builtin_fixed_t client_wake_obj;
static void watch_input(mp_obj_mqtt_client_t *self, mp_obj_t sock);
#endif

// What the client kept of the publish in flight in `slot` (mqtt_kept_t):
// the topic str and payload object it published. Never raises.
static bool kept_publish(void *context, uint8_t slot, mqtt_bytes_t *topic, mqtt_bytes_t *payload) {
    mp_obj_mqtt_client_t *self = context;
    mp_buffer_info_t info;
    if (self->held == NULL || slot >= MQTT_INFLIGHT_MAX || self->held[2 * slot] == MP_OBJ_NULL
        || !mp_obj_is_str(self->held[2 * slot])
        || !mp_get_buffer(self->held[2 * slot + 1], &info, MP_BUFFER_READ)) {
        return false;
    }
    size_t len;
    const char *data = mp_obj_str_get_data(self->held[2 * slot], &len);
    *topic = (mqtt_bytes_t) { .data = (const uint8_t *)data, .len = len };
    *payload = (mqtt_bytes_t) { .data = info.buf, .len = info.len };
    return true;
}

// Connects with the stored parameters. Returns the CONNACK return code;
// raises OSError when the broker cannot be reached.
static int do_connect(mp_obj_mqtt_client_t *self) {
    client_lock(self);
    drop_link(self);
    self->link_generation++;
    client_unlock(self);

    mp_obj_t sock = MP_OBJ_NULL;
    mp_obj_t stream = MP_OBJ_NULL;
    open_link(self, &sock, &stream);
    #if MQTT_LOOP_SCHEDULED
    if (self->wake == MP_OBJ_NULL) {
        self->wake = mp_obj_new_bound_meth(MP_OBJ_FROM_PTR(&client_wake_obj), MP_OBJ_FROM_PTR(self));
    }
    #endif

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
    };
    client_lock(self);
    self->stream = stream;
    self->stream_buffers = stream != sock;
    self->owns_stream = option(self, OPTION_STREAM) == mp_const_none;
    self->sock_fd = socket_fd(sock);
    self->return_code = -1;
    #if MQTT_LOOP_SCHEDULED
    watch_input(self, sock);
    #endif
    clear_pending(self);
    if (self->clean_session && self->held != NULL) {
        memset(self->held, 0, sizeof(mp_obj_t) * 2 * MQTT_INFLIGHT_MAX);
    }
    mqtt_transport_t transport = transport_of(self);
    mqtt_ticket_t ticket;
    int status = mqtt_session_connect(self->session, &transport, now_ms(), &options, &ticket);
    if (status != MQTT_OK) {
        drop_link(self);
    }
    client_unlock(self);
    if (status != MQTT_OK) {
        raise_status(self, status);
    }

    nlr_buf_t nlr;
    if (nlr_push(&nlr) == 0) {
        uint8_t code = wait_for(self, ticket);
        nlr_pop();
        self->return_code = code;
    } else {
        client_lock(self);
        drop_link(self);
        client_unlock(self);
        nlr_jump(nlr.ret_val);
    }
    if (self->return_code != 0) {
        client_lock(self);
        drop_link(self);
        client_unlock(self);
        return self->return_code;
    }

    // Send again what the previous link left unacknowledged.
    client_lock(self);
    mqtt_kept_t kept = { .context = self, .publish = kept_publish };
    status = mqtt_session_resume(self->session, &transport, now_ms(), &kept);
    if (status != MQTT_OK) {
        drop_link(self);
    }
    client_unlock(self);
    if (status != MQTT_OK) {
        raise_status(self, status);
    }
    return 0;
}

static const char *refusal_text(int code) {
    switch (code) {
        case 1:
            return "connection refused: unacceptable protocol version";
        case 2:
            return "connection refused: identifier rejected";
        case 3:
            return "connection refused: server unavailable";
        case 4:
            return "connection refused: bad user name or password";
        case 5:
            return "connection refused: not authorized";
        default:
            return "connection refused";
    }
}

// Connects, runs aconnect_cb on success, and returns the return code.
static int connect_and_notify(mp_obj_mqtt_client_t *self) {
    int code = do_connect(self);
    mp_obj_t aconnect_cb = option(self, OPTION_ACONNECT_CB);
    if (code == 0 && aconnect_cb != mp_const_none) {
        mp_obj_t self_obj = MP_OBJ_FROM_PTR(self);
        call_and_report(aconnect_cb, 1, &self_obj);
    }
    return code;
}

// ---------------------------------------------------------------------------
// The loop

// After a failed cycle: calls loop_failure(client) and tells whether it
// returned RECOVERED (anything else, an exception, or no callback: no).
static bool loop_failure_recovers(mp_obj_mqtt_client_t *self) {
    if (self->loop_failure == mp_const_none) {
        return false;
    }
    mp_obj_t self_obj = MP_OBJ_FROM_PTR(self);
    mp_obj_t verdict = call_and_report(self->loop_failure, 1, &self_obj);
    return verdict != MP_OBJ_NULL && mp_obj_is_small_int(verdict) && MP_OBJ_SMALL_INT_VALUE(verdict) == MQTT_RECOVERED;
}

#if MQTT_LOOP_THREAD
// Runs the loop until it is stopped or a failure is not recovered.
static void run_loop(mp_obj_mqtt_client_t *self) {
    while (self->loop_state == LOOP_RUNNING) {
        int status = run_cycle(self, self->cycle_timeout_ms);
        if (status == MQTT_OK || status == MQTT_LINK_REPLACED) {
            continue;
        }
        clear_pending(self);
        if (self->loop_state != LOOP_RUNNING || !loop_failure_recovers(self)) {
            break;
        }
    }
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
#endif

#if MQTT_LOOP_SCHEDULED
// The scheduled loop: no thread; each turn runs on the interpreter's
// thread, between two bytecodes of the application, and never waits.

// Most cycles one turn runs before it lets the application go on.
#define MQTT_CYCLES_PER_TURN (8)

#if MQTT_WAKE_BY_SIGNAL
// On the unix port without threads the scheduler has no atomic sections,
// so a signal that races its bookkeeping can be lost: wake up at least
// this often whatever the timers say.
#define MQTT_LONGEST_SLEEP_MS (1000)
#else
#define MQTT_LONGEST_SLEEP_MS (60000)
#endif

// Whether the link has input waiting (read ahead by the engine, or in the
// stream). Called on the interpreter's thread.
static bool input_waiting(mp_obj_mqtt_client_t *self) {
    client_lock(self);
    bool waiting = self->stream != MP_OBJ_NULL && mqtt_session_has_input(self->session);
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

static void stop_scheduled(mp_obj_mqtt_client_t *self);

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
    bool more = true;
    for (int cycle = 0; cycle < MQTT_CYCLES_PER_TURN && more; cycle++) {
        int status = run_cycle(self, 0);
        if (status != MQTT_OK && status != MQTT_LINK_REPLACED) {
            clear_pending(self);
            if (self->loop_state != LOOP_RUNNING || !loop_failure_recovers(self)) {
                stop_scheduled(self);
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
            : mqtt_session_next_timer(self->session, now_ms(), longest);
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

#if MQTT_WAKE_BY_SIGNAL
// SIGIO reports input on any socket the clients watch; SIGALRM is the one
// timer, set for the client that is due first. Either schedules one turn
// of every client whose loop runs (those in mqtt_signal_clients).
MP_REGISTER_ROOT_POINTER(mp_obj_t mqtt_signal_clients);

static volatile sig_atomic_t turns_scheduled;

static mp_obj_t list_of_signal_clients(void) {
    if (MP_STATE_VM(mqtt_signal_clients) == MP_OBJ_NULL) {
        MP_STATE_VM(mqtt_signal_clients) = mp_obj_new_list(0, NULL);
    }
    return MP_STATE_VM(mqtt_signal_clients);
}

// Sets SIGALRM for the client that wants to wake up first.
static void set_alarm(void) {
    size_t n;
    mp_obj_t *clients;
    mp_obj_list_get(list_of_signal_clients(), &n, &clients);
    uint32_t now = now_ms();
    int32_t soonest = n > 0 ? MQTT_LONGEST_SLEEP_MS : 0;
    for (size_t i = 0; i < n; i++) {
        int32_t left = (int32_t)(client_of(clients[i])->wake_at - now);
        soonest = left < soonest ? left : soonest;
    }
    // A zero timer would disarm: one millisecond is the soonest.
    soonest = (n > 0 && soonest < 1) ? 1 : soonest;
    struct itimerval timer = {
        .it_value = { .tv_sec = soonest / 1000, .tv_usec = (soonest % 1000) * 1000 },
    };
    setitimer(ITIMER_REAL, &timer, NULL);
}

// Runs a turn of every client whose loop runs.
static mp_obj_t run_signal_turns(mp_obj_t unused) {
    (void)unused;
    turns_scheduled = 0;
    mp_obj_t list = list_of_signal_clients();
    size_t n;
    mp_obj_t *clients;
    mp_obj_list_get(list, &n, &clients);
    // A turn may stop its client, which leaves the list: walk down, and
    // read the list afresh each time.
    for (size_t i = n; i-- > 0;) {
        mp_obj_list_get(list, &n, &clients);
        if (i < n) {
            scheduled_turn(client_of(clients[i]));
        }
    }
    set_alarm();
    return mp_const_none;
}
static MP_DEFINE_CONST_FUN_OBJ_1(run_signal_turns_obj, run_signal_turns);

static void on_signal(int signal_number) {
    (void)signal_number;
    if (!turns_scheduled) {
        turns_scheduled = 1;
        if (!mp_sched_schedule(MP_OBJ_FROM_PTR(&run_signal_turns_obj), mp_const_none)) {
            // The scheduler's queue is full: the alarm tries again.
            turns_scheduled = 0;
        }
    }
}

static void install_signal_handlers(void) {
    static bool installed;
    if (installed) {
        return;
    }
    struct sigaction action;
    memset(&action, 0, sizeof(action));
    action.sa_handler = on_signal;
    // Interrupted system calls of the application go on by themselves.
    action.sa_flags = SA_RESTART;
    sigemptyset(&action.sa_mask);
    sigaddset(&action.sa_mask, SIGIO);
    sigaddset(&action.sa_mask, SIGALRM);
    sigaction(SIGIO, &action, NULL);
    sigaction(SIGALRM, &action, NULL);
    installed = true;
}

static void wake_up_in(mp_obj_mqtt_client_t *self, uint32_t delay_ms) {
    self->wake_at = now_ms() + delay_ms;
    set_alarm();
}

// Makes the link's socket signal arriving input (SIGIO).
static void watch_input(mp_obj_mqtt_client_t *self, mp_obj_t sock) {
    (void)sock;
    install_signal_handlers();
    int flags = self->sock_fd < 0 ? -1 : fcntl(self->sock_fd, F_GETFL);
    self->input_signalled = flags >= 0
        && fcntl(self->sock_fd, F_SETOWN, getpid()) == 0
        && fcntl(self->sock_fd, F_SETFL, flags | O_ASYNC) == 0;
}

static void start_scheduled(mp_obj_mqtt_client_t *self) {
    mp_obj_t list = list_of_signal_clients();
    mp_obj_list_append(list, MP_OBJ_FROM_PTR(self));
    self->loop_state = LOOP_RUNNING;
    wake_up_in(self, 0);
}

static void stop_scheduled(mp_obj_mqtt_client_t *self) {
    self->loop_state = LOOP_STOPPED;
    mp_obj_t list = list_of_signal_clients();
    size_t n;
    mp_obj_t *clients;
    mp_obj_list_get(list, &n, &clients);
    for (size_t i = 0; i < n; i++) {
        if (clients[i] == MP_OBJ_FROM_PTR(self)) {
            mp_obj_list_remove(list, clients[i]);
            break;
        }
    }
    set_alarm();
}

#else // lwIP sockets and machine.Timer

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
#endif
#endif // MQTT_LOOP_SCHEDULED

static void start_loop(mp_obj_mqtt_client_t *self) {
    if (self->loop_state == LOOP_RUNNING) {
        return;
    }
    #if MQTT_LOOP_SCHEDULED
    start_scheduled(self);
    #elif MQTT_LOOP_THREAD
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
    #else
    // Nothing runs the loop in the background: the application calls
    // cycle(), from its main loop or an asyncio task.
    (void)self;
    #endif
}

// ---------------------------------------------------------------------------
// The Client class

// Client(client_id, clean_session=True, cycle_timeout=500, command_timeout=60000, *, max_packet_size=1048576)
static mp_obj_t client_make_new(const mp_obj_type_t *type, size_t n_args, size_t n_kw, const mp_obj_t *all_args) {
    enum { ARG_client_id, ARG_clean_session, ARG_cycle_timeout, ARG_command_timeout, ARG_max_packet_size };
    static const mp_arg_t allowed[] = {
        { MP_QSTR_client_id, MP_ARG_REQUIRED | MP_ARG_OBJ, {.u_rom_obj = MP_ROM_NONE} },
        { MP_QSTR_clean_session, MP_ARG_BOOL, {.u_bool = true} },
        { MP_QSTR_cycle_timeout, MP_ARG_OBJ, {.u_rom_obj = MP_ROM_INT(500)} },
        { MP_QSTR_command_timeout, MP_ARG_OBJ, {.u_rom_obj = MP_ROM_INT(60000)} },
        { MP_QSTR_max_packet_size, MP_ARG_KW_ONLY | MP_ARG_OBJ, {.u_rom_obj = MP_ROM_INT(MQTT_DEFAULT_MAX_PACKET)} },
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

    size_t words = (mqtt_session_size() + sizeof(uint64_t) - 1) / sizeof(uint64_t);
    mp_obj_mqtt_client_t *self = mp_obj_malloc_var(mp_obj_mqtt_client_t, session, uint64_t, words, type);
    self->client_id = args[ARG_client_id].u_obj;
    self->host = mp_const_none;
    self->options = NULL;
    self->loop_failure = mp_const_none;
    self->subscriptions = mp_const_empty_tuple;
    self->held = NULL;
    self->stream = MP_OBJ_NULL;
    self->pending_exception = MP_OBJ_NULL;
    self->pending_errno = 0;
    self->sock_fd = -1;
    self->link_generation = 0;
    self->cycle_timeout_ms = cycle_timeout;
    self->port = 1883;
    self->keepalive_s = 0;
    self->will_qos = 0;
    self->will_retain = false;
    self->clean_session = clean_session;
    self->return_code = -1;
    self->loop_state = LOOP_STOPPED;
    self->stream_buffers = false;
    self->owns_stream = true;
    self->input_ready = false;
    self->reader = NULL;
    #if MICROPY_PY_THREAD
    mp_thread_mutex_init(&self->lock);
    self->loop_thread = NULL;
    self->callback_thread = NULL;
    #else
    self->in_callback = false;
    #endif
    #if MQTT_LOOP_SCHEDULED
    self->wake = MP_OBJ_NULL;
    #if MQTT_WAKE_BY_SIGNAL
    self->wake_at = 0;
    #else
    self->timer = MP_OBJ_NULL;
    #endif
    self->input_signalled = false;
    self->turning = false;
    self->lock_holder = NULL;
    #endif
    mqtt_config_t config = { .command_timeout_ms = command_timeout, .max_packet_size = max_packet_size };
    if (mqtt_session_init(self->session, words * sizeof(uint64_t), &config) != MQTT_OK) {
        mp_raise_msg(&mp_type_RuntimeError, MP_ERROR_TEXT("mqtt engine init failed"));
    }
    return MP_OBJ_FROM_PTR(self);
}

// Client.connect(host, keepalive, port=1883, ssl_ctx=None, breconnect_cb=None,
//                aconnect_cb=None, loop_failure=None, start_loop=True, *, stream=None)
static mp_obj_t client_connect(size_t n_args, const mp_obj_t *pos_args, mp_map_t *kw_args) {
    enum { ARG_host, ARG_keepalive, ARG_port, ARG_ssl_ctx, ARG_breconnect_cb, ARG_aconnect_cb, ARG_loop_failure, ARG_start_loop, ARG_stream };
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
    const size_t callbacks[] = { ARG_breconnect_cb, ARG_aconnect_cb, ARG_loop_failure };
    for (size_t i = 0; i < MP_ARRAY_SIZE(callbacks); i++) {
        mp_obj_t callback = args[callbacks[i]].u_obj;
        if (callback != mp_const_none && !mp_obj_is_callable(callback)) {
            mp_raise_TypeError(MP_ERROR_TEXT("callbacks must be callable or None"));
        }
    }
    if (loop_runs_elsewhere(self)) {
        mp_raise_OSError(MP_EBUSY);
    }
    self->host = args[ARG_host].u_obj;
    self->keepalive_s = (uint16_t)keepalive;
    self->port = (uint16_t)port;
    set_option(self, OPTION_SSL_CTX, args[ARG_ssl_ctx].u_obj);
    set_option(self, OPTION_BRECONNECT_CB, args[ARG_breconnect_cb].u_obj);
    set_option(self, OPTION_ACONNECT_CB, args[ARG_aconnect_cb].u_obj);
    set_option(self, OPTION_STREAM, stream);
    self->loop_failure = args[ARG_loop_failure].u_obj;

    int code = connect_and_notify(self);
    if (code != 0) {
        raise_mqtt(code, refusal_text(code));
    }
    if (args[ARG_start_loop].u_bool) {
        start_loop(self);
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
    mp_obj_t breconnect_cb = option(self, OPTION_BRECONNECT_CB);
    if (breconnect_cb != mp_const_none) {
        call_and_report(breconnect_cb, 1, &self_in);
    }
    return MP_OBJ_NEW_SMALL_INT(connect_and_notify(self));
}
static MP_DEFINE_CONST_FUN_OBJ_1(client_reconnect_obj, client_reconnect);

// Client.get_return_code() -> CONNACK return code of the last attempt, or -1
static mp_obj_t client_get_return_code(mp_obj_t self_in) {
    return MP_OBJ_NEW_SMALL_INT(client_of(self_in)->return_code);
}
static MP_DEFINE_CONST_FUN_OBJ_1(client_get_return_code_obj, client_get_return_code);

// Client.connected() -> bool
static mp_obj_t client_connected(mp_obj_t self_in) {
    mp_obj_mqtt_client_t *self = client_of(self_in);
    client_lock(self);
    bool connected = self->stream != MP_OBJ_NULL && mqtt_session_is_connected(self->session);
    client_unlock(self);
    return mp_obj_new_bool(connected);
}
static MP_DEFINE_CONST_FUN_OBJ_1(client_connected_obj, client_connected);

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
    start_loop(self);
    return mp_const_none;
}
static MP_DEFINE_CONST_FUN_OBJ_1(client_loop_obj, client_loop);

// Client.cycle(): run one loop cycle on the calling thread
static mp_obj_t client_cycle(mp_obj_t self_in) {
    mp_obj_mqtt_client_t *self = client_of(self_in);
    if (loop_runs_elsewhere(self)) {
        mp_raise_OSError(MP_EBUSY);
    }
    int status = run_cycle(self, self->cycle_timeout_ms);
    if (status == MQTT_OK || status == MQTT_LINK_REPLACED) {
        return mp_const_none;
    }
    // Made before loop_failure runs: a reconnect there clears what the
    // failed link stashed.
    mp_obj_t failure = exception_for_status(self, status);
    if (loop_failure_recovers(self)) {
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

// Client.set_will(topic, payload, qos=0, retain=False)
static mp_obj_t client_set_will(size_t n_args, const mp_obj_t *pos_args, mp_map_t *kw_args) {
    enum { ARG_topic, ARG_payload, ARG_qos, ARG_retain };
    static const mp_arg_t allowed[] = {
        { MP_QSTR_topic, MP_ARG_REQUIRED | MP_ARG_OBJ, {.u_rom_obj = MP_ROM_NONE} },
        { MP_QSTR_payload, MP_ARG_REQUIRED | MP_ARG_OBJ, {.u_rom_obj = MP_ROM_NONE} },
        { MP_QSTR_qos, MP_ARG_OBJ, {.u_rom_obj = MP_ROM_INT(0)} },
        { MP_QSTR_retain, MP_ARG_BOOL, {.u_bool = false} },
    };
    mp_obj_mqtt_client_t *self = client_of(pos_args[0]);
    mp_arg_val_t args[MP_ARRAY_SIZE(allowed)];
    mp_arg_parse_all(n_args - 1, pos_args + 1, kw_args, MP_ARRAY_SIZE(allowed), allowed, args);
    check_topic(args[ARG_topic].u_obj, false);
    if (bytes_of_buffer(args[ARG_payload].u_obj).len > 65535) {
        mp_raise_ValueError(MP_ERROR_TEXT("will payload too long"));
    }
    uint8_t qos = qos_of(args[ARG_qos].u_obj);
    set_option(self, OPTION_WILL_TOPIC, args[ARG_topic].u_obj);
    set_option(self, OPTION_WILL_PAYLOAD, args[ARG_payload].u_obj);
    self->will_qos = qos;
    self->will_retain = args[ARG_retain].u_bool;
    return mp_const_none;
}
static MP_DEFINE_CONST_FUN_OBJ_KW(client_set_will_obj, 3, client_set_will);

// Client.publish(topic, payload='', qos=0, retain=False)
static mp_obj_t client_publish(size_t n_args, const mp_obj_t *pos_args, mp_map_t *kw_args) {
    enum { ARG_topic, ARG_payload, ARG_qos, ARG_retain };
    static const mp_arg_t allowed[] = {
        { MP_QSTR_topic, MP_ARG_REQUIRED | MP_ARG_OBJ, {.u_rom_obj = MP_ROM_NONE} },
        { MP_QSTR_payload, MP_ARG_OBJ, {.u_rom_obj = MP_ROM_QSTR(MP_QSTR_)} },
        { MP_QSTR_qos, MP_ARG_OBJ, {.u_rom_obj = MP_ROM_INT(0)} },
        { MP_QSTR_retain, MP_ARG_BOOL, {.u_bool = false} },
    };
    mp_obj_mqtt_client_t *self = client_of(pos_args[0]);
    mp_arg_val_t args[MP_ARRAY_SIZE(allowed)];
    mp_arg_parse_all(n_args - 1, pos_args + 1, kw_args, MP_ARRAY_SIZE(allowed), allowed, args);
    mp_obj_t topic = args[ARG_topic].u_obj;
    mp_obj_t payload = args[ARG_payload].u_obj;
    mqtt_bytes_t topic_bytes = bytes_of_str(topic, "topic");
    mqtt_bytes_t payload_bytes = bytes_of_buffer(payload);
    uint8_t qos = qos_of(args[ARG_qos].u_obj);
    check_topic(topic, false);
    if (qos > 0 && self->held == NULL) {
        mp_obj_t *held = m_new0(mp_obj_t, 2 * MQTT_INFLIGHT_MAX);
        client_lock(self);
        if (self->held == NULL) {
            self->held = held;
        }
        client_unlock(self);
    }

    client_lock(self);
    mqtt_transport_t transport = transport_of(self);
    mqtt_ticket_t ticket;
    int status = self->stream == MP_OBJ_NULL
        ? MQTT_ERR_NOT_CONNECTED
        : mqtt_session_publish(self->session, &transport, now_ms(), topic_bytes, payload_bytes, qos, args[ARG_retain].u_bool, &ticket);
    if (status == MQTT_OK && qos > 0) {
        self->held[2 * ticket.slot] = topic;
        self->held[2 * ticket.slot + 1] = payload;
    }
    if (status == MQTT_ERR_TRANSPORT || status == MQTT_ERR_CLOSED) {
        drop_link(self);
    }
    client_unlock(self);
    if (status != MQTT_OK) {
        raise_status(self, status);
    }
    // From a callback the loop is busy with us: it completes the flow later.
    if (qos > 0 && !in_callback(self)) {
        wait_for(self, ticket);
    }
    return mp_const_none;
}
static MP_DEFINE_CONST_FUN_OBJ_KW(client_publish_obj, 2, client_publish);

// Returns the subscription table with `filter` removed.
static mp_obj_t table_without(mp_obj_t table, mp_obj_t filter) {
    size_t n;
    mp_obj_t *items;
    mp_obj_tuple_get(table, &n, &items);
    for (size_t i = 0; i + 1 < n; i += 2) {
        if (mp_obj_equal(items[i], filter)) {
            mp_obj_tuple_t *smaller = MP_OBJ_TO_PTR(mp_obj_new_tuple(n - 2, NULL));
            memcpy(smaller->items, items, i * sizeof(mp_obj_t));
            memcpy(smaller->items + i, items + i + 2, (n - i - 2) * sizeof(mp_obj_t));
            return MP_OBJ_FROM_PTR(smaller);
        }
    }
    return table;
}

// Returns the table with `filter` mapped to `callback` (replacing in place).
static mp_obj_t table_with(mp_obj_t table, mp_obj_t filter, mp_obj_t callback) {
    size_t n;
    mp_obj_t *items;
    mp_obj_tuple_get(table, &n, &items);
    for (size_t i = 0; i + 1 < n; i += 2) {
        if (mp_obj_equal(items[i], filter)) {
            mp_obj_tuple_t *copy = MP_OBJ_TO_PTR(mp_obj_new_tuple(n, items));
            copy->items[i + 1] = callback;
            return MP_OBJ_FROM_PTR(copy);
        }
    }
    mp_obj_tuple_t *larger = MP_OBJ_TO_PTR(mp_obj_new_tuple(n + 2, NULL));
    memcpy(larger->items, items, n * sizeof(mp_obj_t));
    larger->items[n] = filter;
    larger->items[n + 1] = callback;
    return MP_OBJ_FROM_PTR(larger);
}

// Installs a subscription table where `filter` maps to `callback`, or is
// absent when `callback` is MP_OBJ_NULL. The table is built outside the
// lock (building allocates, which may raise) and installed only if no
// other thread changed the table meanwhile. Returns the table it replaced;
// `*installed` is the new one.
static mp_obj_t update_subscriptions(mp_obj_mqtt_client_t *self, mp_obj_t filter, mp_obj_t callback, mp_obj_t *installed) {
    for (;;) {
        mp_obj_t current = self->subscriptions;
        mp_obj_t next = callback == MP_OBJ_NULL ? table_without(current, filter) : table_with(current, filter, callback);
        client_lock(self);
        bool unchanged = self->subscriptions == current;
        if (unchanged) {
            self->subscriptions = next;
        }
        client_unlock(self);
        if (unchanged) {
            *installed = next;
            return current;
        }
    }
}

// Sends SUBSCRIBE or UNSUBSCRIBE and returns its ticket (raises on error).
static mqtt_ticket_t send_subscription(mp_obj_mqtt_client_t *self, mp_obj_t filter, uint8_t qos, bool unsubscribe) {
    client_lock(self);
    mqtt_transport_t transport = transport_of(self);
    mqtt_ticket_t ticket;
    int status = self->stream == MP_OBJ_NULL
        ? MQTT_ERR_NOT_CONNECTED
        : mqtt_session_subscribe(self->session, &transport, now_ms(), bytes_of_str(filter, "topic"), qos, unsubscribe, &ticket);
    if (status == MQTT_ERR_TRANSPORT || status == MQTT_ERR_CLOSED) {
        drop_link(self);
    }
    client_unlock(self);
    if (status != MQTT_OK) {
        raise_status(self, status);
    }
    return ticket;
}

// Client.subscribe(topic, function, qos=0)
static mp_obj_t client_subscribe(size_t n_args, const mp_obj_t *pos_args, mp_map_t *kw_args) {
    enum { ARG_topic, ARG_function, ARG_qos };
    static const mp_arg_t allowed[] = {
        { MP_QSTR_topic, MP_ARG_REQUIRED | MP_ARG_OBJ, {.u_rom_obj = MP_ROM_NONE} },
        { MP_QSTR_function, MP_ARG_REQUIRED | MP_ARG_OBJ, {.u_rom_obj = MP_ROM_NONE} },
        { MP_QSTR_qos, MP_ARG_OBJ, {.u_rom_obj = MP_ROM_INT(0)} },
    };
    mp_obj_mqtt_client_t *self = client_of(pos_args[0]);
    mp_arg_val_t args[MP_ARRAY_SIZE(allowed)];
    mp_arg_parse_all(n_args - 1, pos_args + 1, kw_args, MP_ARRAY_SIZE(allowed), allowed, args);
    mp_obj_t filter = args[ARG_topic].u_obj;
    mp_obj_t function = args[ARG_function].u_obj;
    check_topic(filter, true);
    if (!mp_obj_is_callable(function)) {
        mp_raise_TypeError(MP_ERROR_TEXT("function must be callable"));
    }
    uint8_t qos = qos_of(args[ARG_qos].u_obj);

    // The callback is in the table before SUBSCRIBE leaves, so retained
    // messages that follow the SUBACK at once find it.
    mp_obj_t updated;
    mp_obj_t previous = update_subscriptions(self, filter, function, &updated);

    nlr_buf_t nlr;
    if (nlr_push(&nlr) == 0) {
        mqtt_ticket_t ticket = send_subscription(self, filter, qos, false);
        uint8_t code = in_callback(self) ? 0 : wait_for(self, ticket);
        if (code == MQTT_EXC_SUBSCRIBE_FAILED) {
            raise_mqtt(MQTT_EXC_SUBSCRIBE_FAILED, "subscription refused by the broker");
        }
        nlr_pop();
        return MP_OBJ_NEW_SMALL_INT(code);
    }
    client_lock(self);
    if (self->subscriptions == updated) {
        self->subscriptions = previous;
    }
    client_unlock(self);
    nlr_jump(nlr.ret_val);
}
static MP_DEFINE_CONST_FUN_OBJ_KW(client_subscribe_obj, 3, client_subscribe);

// Client.unsubscribe(topic)
static mp_obj_t client_unsubscribe(mp_obj_t self_in, mp_obj_t filter) {
    mp_obj_mqtt_client_t *self = client_of(self_in);
    check_topic(filter, true);
    // Off the table first: its callback is never called again.
    mp_obj_t smaller;
    update_subscriptions(self, filter, MP_OBJ_NULL, &smaller);
    mqtt_ticket_t ticket = send_subscription(self, filter, 0, true);
    if (!in_callback(self)) {
        wait_for(self, ticket);
    }
    return mp_const_none;
}
static MP_DEFINE_CONST_FUN_OBJ_2(client_unsubscribe_obj, client_unsubscribe);

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
    #if MQTT_LOOP_SCHEDULED
    if (self->loop_state == LOOP_RUNNING) {
        stop_scheduled(self);
    }
    #endif
    client_lock(self);
    if (self->loop_state == LOOP_RUNNING) {
        self->loop_state = LOOP_STOPPING;
    }
    if (self->stream != MP_OBJ_NULL) {
        mqtt_transport_t transport = transport_of(self);
        // Best effort: the link closes whether DISCONNECT got out or not.
        mqtt_session_disconnect(self->session, &transport, now_ms());
        clear_pending(self);
    }
    drop_link(self);
    self->link_generation++;
    client_unlock(self);
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
    { MP_ROM_QSTR(MP_QSTR_connected), MP_ROM_PTR(&client_connected_obj) },
    { MP_ROM_QSTR(MP_QSTR_loop), MP_ROM_PTR(&client_loop_obj) },
    { MP_ROM_QSTR(MP_QSTR_cycle), MP_ROM_PTR(&client_cycle_obj) },
    { MP_ROM_QSTR(MP_QSTR_set_username_pw), MP_ROM_PTR(&client_set_username_pw_obj) },
    { MP_ROM_QSTR(MP_QSTR_set_will), MP_ROM_PTR(&client_set_will_obj) },
    { MP_ROM_QSTR(MP_QSTR_publish), MP_ROM_PTR(&client_publish_obj) },
    { MP_ROM_QSTR(MP_QSTR_subscribe), MP_ROM_PTR(&client_subscribe_obj) },
    { MP_ROM_QSTR(MP_QSTR_unsubscribe), MP_ROM_PTR(&client_unsubscribe_obj) },
    { MP_ROM_QSTR(MP_QSTR_disconnect), MP_ROM_PTR(&client_disconnect_obj) },
};
static MP_DEFINE_CONST_DICT(client_locals, client_locals_table);

static MP_DEFINE_CONST_OBJ_TYPE(
    mqtt_client_type,
    MP_QSTR_Client,
    MP_TYPE_FLAG_NONE,
    make_new, client_make_new,
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
    // What connect(start_loop=True) starts on this port.
    #if MQTT_LOOP_SCHEDULED
    { MP_ROM_QSTR(MP_QSTR_LOOP), MP_ROM_QSTR(MP_QSTR_scheduled) },
    #elif MQTT_LOOP_THREAD
    { MP_ROM_QSTR(MP_QSTR_LOOP), MP_ROM_QSTR(MP_QSTR_thread) },
    #else
    { MP_ROM_QSTR(MP_QSTR_LOOP), MP_ROM_QSTR(MP_QSTR_cycle) },
    #endif
};
static MP_DEFINE_CONST_DICT(mqtt_module_globals, mqtt_module_globals_table);

const mp_obj_module_t mqtt_user_cmodule = {
    .base = { &mp_type_module },
    .globals = (mp_obj_dict_t *)&mqtt_module_globals,
};

MP_REGISTER_MODULE(MP_QSTR_mqtt, mqtt_user_cmodule);
