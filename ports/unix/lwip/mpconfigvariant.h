// The unix variant that stands in for MicroPython's lwIP boards (Pico W,
// ESP8266...): the standard variant, plus machine.Timer on MicroPython's
// soft timer, which lwip_unix.c's service thread runs as a board's timer
// interrupt would, under the same lock as lwIP (a board's PendSV level).

#define MICROPY_CONFIG_ROM_LEVEL (MICROPY_CONFIG_ROM_LEVEL_EXTRA_FEATURES)
#include "variants/mpconfigvariant_common.h"

void lwip_unix_lock(void);
void lwip_unix_unlock(void);
void lwip_unix_wake_interpreter(void);

#define MICROPY_PY_MACHINE_TIMER (1)
#define MICROPY_PY_MACHINE_EXTRA_GLOBALS \
    { MP_ROM_QSTR(MP_QSTR_Timer), MP_ROM_PTR(&machine_timer_type) },
#define MICROPY_PY_PENDSV_ENTER lwip_unix_lock()
#define MICROPY_PY_PENDSV_EXIT lwip_unix_unlock()
// A board's sleeps run scheduled callbacks as they come; the unix port's
// time.sleep() runs them only when a signal interrupts it. So a scheduling
// interrupts the interpreter's thread (lwip_unix.c).
#define MICROPY_SCHED_HOOK_SCHEDULED lwip_unix_wake_interpreter()
