// The client object, and what the binding's files share (see modmqtt.c).

// Waiting for a socket: POSIX poll() on unix, without the interpreter
// lock; elsewhere the stream's poll and short sleeps (see sleep_a_little).
// MQTT_ESP32_PATH=1 makes a unix firmware wait the esp32 way.
#if (defined(__unix__) || defined(__APPLE__)) && !MQTT_ESP32_PATH
#include <errno.h>
#include <poll.h>
#include <sched.h>
#define MQTT_POSIX_POLL (1)
#else
#define MQTT_POSIX_POLL (0)
#endif

// The loop back-end: how connect(start_loop=True) runs the loop on this
// port, the way that costs the least heap (each file says more). rp2 and
// lwIP ports: scheduled turns, woken by socket option 20 and machine.Timer
// (-DMQTT_TIMER_LOOP=1 chooses it on any port that has machine.Timer);
// the unix port without threads: scheduled turns woken by signals; ports
// with threads: a thread; the others: none, the application calls cycle().
#if MICROPY_PY_LWIP || PICO_ON_DEVICE || MQTT_TIMER_LOOP
#define MQTT_LOOP_FILE "mqtt_loop_timer.c"
#define MQTT_LOOP_SCHEDULED (1)
#elif MQTT_POSIX_POLL && !MICROPY_PY_THREAD
#define MQTT_LOOP_FILE "mqtt_loop_signal.c"
#define MQTT_LOOP_SCHEDULED (1)
#define MQTT_WAKE_BY_SIGNAL (1)
#elif MICROPY_PY_THREAD
#define MQTT_LOOP_FILE "mqtt_loop_thread.c"
#define MQTT_LOOP_THREAD (1)
#else
#define MQTT_LOOP_FILE "mqtt_loop_cycle.c"
#endif

// MQTT_V5=0 (micropython.mk, micropython.cmake): a module for MQTT 3.1.1
// only. speaks_v5() is then false at compile time, and what only an MQTT 5
// client reaches is left out of the binding too.
#ifndef MQTT_V5
#define MQTT_V5 (1)
#endif

// Most cycles one turn of a scheduled or asyncio loop runs before it lets
// the application go on.
#define MQTT_CYCLES_PER_TURN (8)

// Items of one subscription in the client's table: filter, callback, and
// its options byte (the QoS, and MQTT 5's options: see start_subscription).
#define TABLE_ENTRY (3)

// Built-in reconnection's bounds for connect(auto_reconnect=True), in ms.
#define MQTT_RECONNECT_MIN_MS (1000)
#define MQTT_RECONNECT_MAX_MS (60000)

// How often a TCP connection under way is looked at: lwIP calls no socket
// callback when a connection is made.
#define MQTT_TCP_POLL_MS (20)

// Largest incoming packet accepted unless the Client is told otherwise.
#define MQTT_DEFAULT_MAX_PACKET (1024 * 1024)

// Codes carried by MQTTException beyond the CONNACK return codes 1-5.
#define MQTT_EXC_SUBSCRIBE_FAILED (0x80)
#define MQTT_EXC_TIMEOUT (0x100)
#define MQTT_EXC_PROTOCOL (0x101)
// An MQTT 5 reason code r (a refusal, the broker's DISCONNECT) is carried
// as MQTT_EXC_REASON + r, apart from the 3.1.1 codes above.
#define MQTT_EXC_REASON (0x200)

// Client.return_code before a CONNACK answered (no code MQTT defines).
#define MQTT_NO_RETURN_CODE (0xff)

// Values loop_failure returns.
#define MQTT_BREAK_LOOP (0)
#define MQTT_RECOVERED (1)

// What a cycle returns: an engine status, or this when the link was
// replaced or closed by the application (disconnect() or reconnect() from
// a callback): not a failure.
#define MQTT_LINK_REPLACED (1)

// Where built-in reconnection stands: not reconnecting (the link is up,
// or the loop ends on a failure); waiting for the next attempt; its TCP
// connection under way; its CONNECT sent and the CONNACK awaited.
enum {
    RECONNECT_OFF,
    RECONNECT_WAITING,
    RECONNECT_TCP,
    RECONNECT_CONNACK,
};

enum {
    LOOP_STOPPED,
    LOOP_RUNNING,
    LOOP_STOPPING,
};

// A Client. Its fields go from the widest to the narrowest, so that no
// padding wastes heap.
typedef struct _mp_obj_mqtt_client_t {
    mp_obj_base_t base;
    // Connection parameters, kept for reconnect().
    mp_obj_t client_id;
    mp_obj_t host;
    // The optional settings (OPTION_*), allocated when one is first set:
    // a client that uses none of them saves their room.
    mp_obj_t *options;
    mp_obj_t loop_failure;
    // (filter, callback, qos, filter, callback, qos, ...): TABLE_ENTRY
    // items a subscription; replaced, never mutated, so that a delivery in
    // progress can keep iterating its snapshot.
    mp_obj_t subscriptions;
    // Topic and payload of each in-flight QoS 1/2 publish, by slot, kept
    // for a resend after reconnect; allocated on the first such publish.
    mp_obj_t *held;
    // What the session talks to: the socket or its TLS wrapper (closing
    // that closes the socket too). MP_OBJ_NULL when there is no link.
    mp_obj_t stream;
    // What a transport callback caught, raised once the engine returned.
    mp_obj_t pending_exception;
    // Built-in reconnection: the socket of an attempt whose TCP
    // connection is under way (see mqtt_reconnect.c), or MP_OBJ_NULL.
    mp_obj_t attempt_sock;
    // What the asyncio API keeps (mqtt_asyncio.c): allocated by the first
    // aconnect() or asubscribe(), so that a client without asyncio saves
    // its room.
    struct _mqtt_aio_t *aio;
    // The thread that reads the link in a cycle (see run_cycle), or NULL.
    void *volatile reader;
    // The thread calling message callbacks, if any.
    void *volatile callback_thread;
    #if MICROPY_PY_THREAD
    mp_thread_mutex_t lock;
    #endif
    #if MQTT_LOOP_THREAD
    // The thread running the background loop.
    struct _mp_state_thread_t *volatile loop_thread;
    #endif
    #if MQTT_LOOP_SCHEDULED
    // What the socket's arrival signal and the timer call: this client's
    // _wake(), bound. Made on the first connect.
    mp_obj_t wake;
    #if !MQTT_WAKE_BY_SIGNAL
    // The machine.Timer of the scheduled loop, made when first needed.
    mp_obj_t timer;
    #endif
    // The thread holding the client's lock (any non-NULL value without
    // threads): a turn the scheduler runs inside such a call (in a Python
    // stream's method, or a wait) must not enter the engine again.
    void *volatile lock_holder;
    #endif
    int sock_fd;
    uint32_t cycle_timeout_ms;
    // Built-in reconnection: when the next attempt is due (RECONNECT_WAITING),
    // or when the attempt's phase began (the later phases).
    uint32_t attempt_at;
    #if MQTT_WAKE_BY_SIGNAL
    // When the client wants its next scheduled cycle (ticks_ms).
    uint32_t wake_at;
    #endif
    int16_t pending_errno;
    // Bumped on every new link, so a cycle notices when a callback
    // disconnected or reconnected under it.
    uint16_t link_generation;
    uint16_t port;
    uint16_t keepalive_s;
    // The CONNACK's return code (a reason code in MQTT 5) of the last
    // attempt, or MQTT_NO_RETURN_CODE before an answer.
    uint8_t return_code;
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
    // connect(auto_reconnect=...) was given: the loop reconnects by itself.
    bool auto_reconnect;
    // Where built-in reconnection stands (RECONNECT_*).
    volatile uint8_t reconnect_phase;
    // The PUBLISH header flags of the message whose callbacks run (for
    // message_flags(); valid on the callback's thread).
    uint8_t message_flags;
    #if MQTT_LOOP_SCHEDULED
    // The link's socket signals arriving input; without that (a given
    // stream) the timer polls every cycle_timeout.
    bool input_signalled;
    // A turn of the scheduled loop is running (callbacks included).
    bool turning;
    #endif
    // The engine's session: mqtt_session_size() bytes (see session_of).
    uint64_t session_memory[];
} mp_obj_mqtt_client_t;

// The GC's blocks are aligned to at least 8 bytes.
_Static_assert(offsetof(mp_obj_mqtt_client_t, session_memory) % MQTT_SESSION_ALIGN == 0, "session misaligned");

// The engine's session in the client (mqtt_session_init set it up there).
static mqtt_session_t *session_of(mp_obj_mqtt_client_t *self) {
    return (mqtt_session_t *)self->session_memory;
}

// A message to publish (publish()'s and apublish()'s arguments).
typedef struct _outgoing_t {
    mp_obj_t topic;
    mp_obj_t payload;
    uint8_t qos;
    bool retain;
    // MQTT 5: its properties as kept_properties() keeps them, or None.
    mp_obj_t properties;
} outgoing_t;

// The optional settings a client keeps for reconnect(), and what it keeps
// of MQTT 5: only an MQTT 5 client's array has room for the options from
// OPTION_COUNT_V311 on (see options_count()).
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
    // What is told of a message that could not be taken (connect(on_drop=...)).
    OPTION_ON_DROP,
    OPTION_COUNT_V311,
    // MQTT 5: the will's properties (see kept_properties()), or None.
    OPTION_WILL_PROPERTIES = OPTION_COUNT_V311,
    // MQTT 5: CONNECT's user properties (see user_pairs_of()), or None.
    OPTION_USER_PROPERTIES,
    // MQTT 5: the topics of the topic aliases set on the link, a tuple of
    // MQTT_TOPIC_ALIAS_MAX (see alias_topics()), made when first needed.
    OPTION_TOPIC_ALIASES,
    // MQTT 5: the topics of the broker's topic aliases, a tuple of
    // Client(topic_aliases=...) entries (see sink_topic_alias()), or None.
    OPTION_INBOUND_ALIASES,
    // MQTT 5: the property block of the message whose callbacks run (for
    // message_properties(); valid on the callback's thread), or None. The
    // options exist whenever a message has a block (sink_message_ready).
    OPTION_MESSAGE_PROPERTIES,
    OPTION_COUNT,
};

static bool speaks_v5(mp_obj_mqtt_client_t *self);

// How many options the client's array holds (see OPTION_COUNT_V311).
static size_t options_count(mp_obj_mqtt_client_t *self) {
    return speaks_v5(self) ? OPTION_COUNT : OPTION_COUNT_V311;
}

static mp_obj_t option(mp_obj_mqtt_client_t *self, size_t which) {
    return self->options == NULL || which >= options_count(self) ? mp_const_none : self->options[which];
}

static uint32_t now_ms(void) {
    return (uint32_t)mp_hal_ticks_ms();
}

// The client's lock (mqtt_cycle.c), around every engine call.
static void client_lock(mp_obj_mqtt_client_t *self);
static void client_unlock(mp_obj_mqtt_client_t *self);

// What the loop back-end (MQTT_LOOP_FILE) provides.

// Starts the loop of a client that has a link (a no-op when it runs).
static void loop_start(mp_obj_mqtt_client_t *self);
// Stops it: at once, or within one cycle for a thread.
static void loop_stop(mp_obj_mqtt_client_t *self);
// A new link is open on `sock`: have it signal arriving input if it can.
static void loop_watch_link(mp_obj_mqtt_client_t *self, mp_obj_t sock);
// A call of the application lost the link: the loop tells loop_failure
// as if it had found the loss itself.
static void loop_link_lost(mp_obj_mqtt_client_t *self);
// Whether the loop runs on a thread other than the caller's: then that
// thread reads the link and the caller only waits.
static bool loop_on_other_thread(mp_obj_mqtt_client_t *self);
// Whether the loop runs outside the caller (on another thread, or as
// scheduled turns the caller is not one of), so that it may reconnect.
static bool loop_runs_elsewhere(mp_obj_mqtt_client_t *self);
// Whether the client's loop runs as an asyncio task (mqtt_asyncio.c).
static bool aio_loop_runs(mp_obj_mqtt_client_t *self);
// Ends that task (at once, or at the end of its turn when it runs now),
// and wakes the tasks awaiting the client.
static void aio_stop(mp_obj_mqtt_client_t *self);
// And MQTT_LOOP_NAME: the value of mqtt.LOOP, what connect(start_loop=True) starts.
