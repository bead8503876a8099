// mp_hal_ticks_ms, mp_hal_ticks_us and the delays for MicroPython's qemu
// port, which defines none of them, from a hardware counter that qemu emulates:
// TIMER0 of the nRF51 (BOARD=MICROBIT) or the CLINT's mtime (BOARD=VIRT_RV32).
// Only 32-bit arithmetic: on Cortex-M0, 64-bit division would pull in libgcc
// objects whose unwind tables the port's linker script does not place.

#include <stdint.h>

#include "py/mphal.h"

#if defined(QEMU_SOC_NRF51)

// nRF51 TIMER0, counting microseconds: 16 MHz divided by 2^4, 32 bits wide.
#define TIMER0_BASE (0x40008000)
#define TIMER_REG(offset) (*(volatile uint32_t *)(TIMER0_BASE + (offset)))
#define TIMER_TASKS_START TIMER_REG(0x000)
#define TIMER_TASKS_CAPTURE0 TIMER_REG(0x040)
#define TIMER_MODE TIMER_REG(0x504)
#define TIMER_BITMODE TIMER_REG(0x508)
#define TIMER_PRESCALER TIMER_REG(0x510)
#define TIMER_CC0 TIMER_REG(0x540)

#define TIMER_MODE_TIMER (0)
#define TIMER_BITMODE_32 (3)
#define TIMER_PRESCALER_1MHZ (4)

#define COUNTS_PER_US (1)

static bool timer_started;

static uint32_t read_counter(void) {
    if (!timer_started) {
        TIMER_MODE = TIMER_MODE_TIMER;
        TIMER_BITMODE = TIMER_BITMODE_32;
        TIMER_PRESCALER = TIMER_PRESCALER_1MHZ;
        TIMER_TASKS_START = 1;
        timer_started = true;
    }
    TIMER_TASKS_CAPTURE0 = 1;
    return TIMER_CC0;
}

#elif defined(QEMU_SOC_VIRT)

// The low word of the CLINT's machine timer, which qemu's virt machine
// runs at 10 MHz.
#define MTIME_LOW (*(volatile uint32_t *)0x0200bff8)

#define COUNTS_PER_US (10)

static uint32_t read_counter(void) {
    return MTIME_LOW;
}

#else
#error "no clock for this qemu board"
#endif

// The counter wraps within minutes; these advance on every reading, so they
// stay right as long as something reads the clock more often than that.
static uint32_t last_count;
static uint32_t counts_into_us;
static uint32_t now_us;
static uint32_t us_into_ms;
static uint32_t now_ms;

static void advance(void) {
    uint32_t count = read_counter();
    counts_into_us += count - last_count;
    last_count = count;
    uint32_t us = counts_into_us / COUNTS_PER_US;
    counts_into_us %= COUNTS_PER_US;
    now_us += us;
    us_into_ms += us;
    now_ms += us_into_ms / 1000;
    us_into_ms %= 1000;
}

mp_uint_t mp_hal_ticks_us(void) {
    advance();
    return now_us;
}

mp_uint_t mp_hal_ticks_ms(void) {
    advance();
    return now_ms;
}

void mp_hal_delay_us(mp_uint_t us) {
    mp_uint_t start = mp_hal_ticks_us();
    while (mp_hal_ticks_us() - start < us) {
    }
}

void mp_hal_delay_ms(mp_uint_t ms) {
    mp_uint_t start = mp_hal_ticks_ms();
    while (mp_hal_ticks_ms() - start < ms) {
    }
}
