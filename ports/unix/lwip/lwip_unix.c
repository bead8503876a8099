// lwIP under the unix firmware that stands in for MicroPython's lwIP boards
// (Pico W, ESP8266...): its `socket` module is extmod/modlwip.c over a real
// lwIP, whose Ethernet interface is a Linux TAP device (tap_linux.c).
//
// A thread stands in for the boards' interrupts: it feeds lwIP the frames
// that arrive, runs lwIP's timers and machine.Timer's soft timer, inside
// the lock the boards take around lwIP (MICROPY_PY_LWIP_ENTER/EXIT, and
// the soft timer's PendSV level), so that the sockets' callbacks (option
// 20) and the timers' fire from that context, as they do on a board.
//
// The interface comes up when the firmware starts, if the environment says
// how: MQTT_LWIP_TAP=NAME,ADDRESS,GATEWAY (tap0,10.0.0.2,10.0.0.1, say;
// the netmask is 255.255.255.0). The TAP device must exist; the tests make
// one inside a network namespace of their own.

#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "py/mphal.h"
#include "py/mpstate.h"
#include "shared/runtime/softtimer.h"
#include "lwip/etharp.h"
#include "lwip_hooks.h"
#include "lwip/init.h"
#include "lwip/netif.h"
#include "lwip/pbuf.h"
#include "lwip/timeouts.h"
#include "netif/ethernet.h"

int tap_open(const char *name);

// modlwip.c's DNS lookups ask for it; MicroPython's network module (not
// built here) defines it on the boards.
int mp_mod_network_prefer_dns_use_ip_version = 4;

static pthread_mutex_t lwip_mutex;
// The thread that runs the program, and the signal that interrupts its
// waits when a callback is scheduled (MICROPY_SCHED_HOOK_SCHEDULED).
static pthread_t interpreter_thread;
#define WAKE_SIGNAL SIGUSR2
static struct netif tap_netif;
static int tap_fd = -1;
// Written to when the soft timer's next expiry moves: the service thread
// then works out its wait again.
static int wake_pipe[2] = { -1, -1 };
// When the soft timer wants soft_timer_handler() run (ticks_ms), if it does.
static uint32_t soft_timer_due;
static bool soft_timer_pending;

#define FRAME_MAX (1514)

void lwip_unix_lock(void) {
    pthread_mutex_lock(&lwip_mutex);
}

void lwip_unix_unlock(void) {
    pthread_mutex_unlock(&lwip_mutex);
}

void lwip_unix_wake_interpreter(void) {
    pthread_kill(interpreter_thread, WAKE_SIGNAL);
}

// The signal's only work is to end the wait it interrupts (EINTR).
static void woken(int signal) {
    (void)signal;
}

u32_t sys_now(void) {
    return (u32_t)mp_hal_ticks_ms();
}

// Four-microsecond steps of the host's monotonic clock, shared by every
// process: later connections start higher (lwipopts.h says why).
u32_t lwip_unix_tcp_isn(const ip_addr_t *local_ip, u16_t local_port, const ip_addr_t *remote_ip, u16_t remote_port) {
    (void)local_ip;
    (void)local_port;
    (void)remote_ip;
    (void)remote_port;
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (u32_t)((uint64_t)now.tv_sec * 250000u + (uint64_t)now.tv_nsec / 4000u);
}

uint32_t soft_timer_get_ms(void) {
    return (uint32_t)mp_hal_ticks_ms();
}

// Called under the lock, by the soft timer.
void soft_timer_schedule_at_ms(uint32_t ticks_ms) {
    soft_timer_due = ticks_ms;
    soft_timer_pending = true;
    if (wake_pipe[1] >= 0) {
        ssize_t written = write(wake_pipe[1], "", 1);
        (void)written;
    }
}

// How long the service thread may wait: lwIP's timers want it every 10 ms
// or so; the soft timer, when its next expiry is due.
static int wait_ms(void) {
    lwip_unix_lock();
    int32_t wait = 10;
    if (soft_timer_pending) {
        int32_t left = soft_timer_ticks_diff(soft_timer_due, soft_timer_get_ms());
        wait = left < 0 ? 0 : left < wait ? left : wait;
    }
    lwip_unix_unlock();
    return (int)wait;
}

static err_t tap_output(struct netif *netif, struct pbuf *frame) {
    (void)netif;
    uint8_t bytes[FRAME_MAX];
    u16_t len = pbuf_copy_partial(frame, bytes, sizeof(bytes), 0);
    return write(tap_fd, bytes, len) == len ? ERR_OK : ERR_IF;
}

static err_t tap_netif_init(struct netif *netif) {
    netif->name[0] = 't';
    netif->name[1] = 'p';
    netif->output = etharp_output;
    netif->linkoutput = tap_output;
    netif->mtu = 1500;
    netif->hwaddr_len = ETH_HWADDR_LEN;
    static const uint8_t address[ETH_HWADDR_LEN] = { 0x02, 0x00, 0x00, 0x00, 0x00, 0x02 };
    memcpy(netif->hwaddr, address, ETH_HWADDR_LEN);
    netif->flags = NETIF_FLAG_BROADCAST | NETIF_FLAG_ETHARP | NETIF_FLAG_ETHERNET;
    return ERR_OK;
}

// The boards' interrupts: frames in, lwIP's timers and the soft timer run,
// under the lock.
static void *service(void *unused) {
    (void)unused;
    for (;;) {
        struct pollfd ready[2] = { { .fd = tap_fd, .events = POLLIN }, { .fd = wake_pipe[0], .events = POLLIN } };
        poll(ready, 2, wait_ms());
        if (ready[1].revents & POLLIN) {
            char drained[64];
            ssize_t got = read(wake_pipe[0], drained, sizeof(drained));
            (void)got;
        }
        if (ready[0].revents & POLLIN) {
            uint8_t bytes[FRAME_MAX];
            ssize_t len = read(tap_fd, bytes, sizeof(bytes));
            if (len > 0) {
                lwip_unix_lock();
                struct pbuf *frame = pbuf_alloc(PBUF_RAW, (u16_t)len, PBUF_POOL);
                if (frame != NULL) {
                    pbuf_take(frame, bytes, (u16_t)len);
                    if (tap_netif.input(frame, &tap_netif) != ERR_OK) {
                        pbuf_free(frame);
                    }
                }
                lwip_unix_unlock();
            }
        }
        lwip_unix_lock();
        sys_check_timeouts();
        if (soft_timer_pending && soft_timer_ticks_diff(soft_timer_due, soft_timer_get_ms()) <= 0) {
            soft_timer_pending = false;
            soft_timer_handler();
        }
        lwip_unix_unlock();
        // A board's sleeps run what is scheduled at every tick. The unix
        // port's time.sleep() runs one callback per interruption, and a
        // wake sent while the interpreter was not waiting interrupts
        // nothing: so interrupt it again while callbacks wait.
        if (MP_STATE_VM(sched_state) == MP_SCHED_PENDING) {
            lwip_unix_wake_interpreter();
        }
    }
    return NULL;
}

// Brings the TAP interface up: `setting` is NAME,ADDRESS,GATEWAY.
static void bring_up(const char *setting) {
    char name[32], address_text[32], gateway_text[32];
    ip4_addr_t address, netmask, gateway;
    if (sscanf(setting, "%31[^,],%31[^,],%31s", name, address_text, gateway_text) != 3
        || !ip4addr_aton(address_text, &address) || !ip4addr_aton(gateway_text, &gateway)) {
        fprintf(stderr, "MQTT_LWIP_TAP must be NAME,ADDRESS,GATEWAY, not %s\n", setting);
        exit(2);
    }
    tap_fd = tap_open(name);
    if (tap_fd < 0) {
        fprintf(stderr, "cannot open the TAP device %s\n", name);
        exit(2);
    }
    IP4_ADDR(&netmask, 255, 255, 255, 0);
    netif_add(&tap_netif, &address, &netmask, &gateway, NULL, tap_netif_init, ethernet_input);
    netif_set_default(&tap_netif);
    netif_set_up(&tap_netif);
    netif_set_link_up(&tap_netif);
}

// Sets lwIP and the service thread up before the program runs; the TAP
// interface too, when MQTT_LWIP_TAP says how.
__attribute__((constructor)) static void lwip_unix_start(void) {
    const char *setting = getenv("MQTT_LWIP_TAP");
    pthread_mutexattr_t attributes;
    pthread_mutexattr_init(&attributes);
    pthread_mutexattr_settype(&attributes, PTHREAD_MUTEX_RECURSIVE);
    pthread_mutex_init(&lwip_mutex, &attributes);
    // Each run its own local ports, as on a board that was reset.
    srand((unsigned)time(NULL) ^ (unsigned)getpid());
    lwip_init();
    if (pipe(wake_pipe) != 0) {
        fprintf(stderr, "lwip_unix: no pipe\n");
        exit(2);
    }
    // Without a TAP device the service thread runs only the timers.
    if (setting != NULL) {
        bring_up(setting);
    }
    interpreter_thread = pthread_self();
    struct sigaction wake = { .sa_handler = woken };
    sigemptyset(&wake.sa_mask);
    sigaction(WAKE_SIGNAL, &wake, NULL);
    // Signals are for the interpreter's thread (Ctrl-C, the GC's, the wake).
    sigset_t blocked, previous;
    sigfillset(&blocked);
    pthread_sigmask(SIG_BLOCK, &blocked, &previous);
    pthread_t thread;
    pthread_create(&thread, NULL, service, NULL);
    pthread_detach(thread);
    pthread_sigmask(SIG_SETMASK, &previous, NULL);
}
