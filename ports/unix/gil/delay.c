// mp_hal_delay_ms (time.sleep_ms, among others) of the unix firmware that
// stands in for esp32: it waits as esp32's port does (its mphalport.c),
// so that the tests see what threads on an esp32 see. Whole FreeRTOS
// ticks are slept with the interpreter lock released; the last part of a
// tick, and any wait shorter than one, is spun with the lock held. The
// tick here is 1 ms (ESP-IDF's CONFIG_FREERTOS_HZ=1000); at MicroPython's
// default of 100 Hz an esp32 spins waits of up to 10 ms the same way.

#include <sched.h>
#include <unistd.h>

#include "py/mphal.h"
#include "py/mpthread.h"
#include "py/runtime.h"

#define TICK_US (1000)

void unix_delay_ms_as_esp32(uintptr_t ms) {
    mp_uint_t wait_us = ms * 1000;
    mp_uint_t start = mp_hal_ticks_us();
    for (;;) {
        mp_handle_pending(true);
        MP_THREAD_GIL_EXIT();
        if (mp_hal_ticks_us() - start + TICK_US >= wait_us) {
            sched_yield();
            MP_THREAD_GIL_ENTER();
            break;
        }
        usleep(TICK_US);
        MP_THREAD_GIL_ENTER();
    }
    while (mp_hal_ticks_us() - start < wait_us) {
    }
}
