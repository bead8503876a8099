// The scheduled loop back-end of the unix port without threads (the
// stand-in for the boards in the tests): turns are woken by SIGIO when a
// watched socket has input and by SIGALRM when a timer is due. Part of
// modmqtt.c's translation unit.

#include <fcntl.h>
#include <signal.h>
#include <sys/time.h>
#include <unistd.h>

// The scheduler of the unix port without threads has no atomic sections,
// so a signal that races its bookkeeping can be lost: wake up at least
// this often whatever the timers say.
#define MQTT_LONGEST_SLEEP_MS (1000)

#include "mqtt_loop_scheduled.c"

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
    install_signal_handlers();
    int fd = socket_fd(sock);
    int flags = fd < 0 ? -1 : fcntl(fd, F_GETFL);
    self->input_signalled = flags >= 0
        && fcntl(fd, F_SETOWN, getpid()) == 0
        && fcntl(fd, F_SETFL, flags | O_ASYNC) == 0;
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
