// lwIP as MicroPython's lwIP boards configure it (extmod's common
// settings: no OS, the raw API), IPv4 only, on a 64-bit host.
#ifndef MQTT_UNIX_LWIPOPTS_H
#define MQTT_UNIX_LWIPOPTS_H

#include <stdint.h>

#define LWIP_IPV4 1
#define LWIP_IPV6 0

#include "extmod/lwip-include/lwipopts_common.h"

// Pointers are 8 bytes here.
#undef MEM_ALIGNMENT
#define MEM_ALIGNMENT 8
// The tests open many connections, and closed ones linger in TIME_WAIT.
#define MEMP_NUM_TCP_PCB 16

// Initial sequence numbers that grow with the clock (RFC 793's), not
// lwIP's, which restart at the same value in every process: a new
// connection from a local port that an earlier run of the firmware used
// must be accepted by the broker's host while it keeps the old one in
// TIME-WAIT (Linux takes a SYN there only if its number is higher).
#define LWIP_HOOK_FILENAME "lwip_hooks.h"
#define LWIP_HOOK_TCP_ISN lwip_unix_tcp_isn

// The lock the boards take around lwIP; the service thread of
// lwip_unix.c takes it too. modlwip.c defines these only when unset.
void lwip_unix_lock(void);
void lwip_unix_unlock(void);
#define MICROPY_PY_LWIP_ENTER lwip_unix_lock();
#define MICROPY_PY_LWIP_REENTER lwip_unix_lock();
#define MICROPY_PY_LWIP_EXIT lwip_unix_unlock();

#endif
