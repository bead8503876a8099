// The unix port run as esp32 runs MicroPython: the standard variant with
// the interpreter lock (GIL) on. `MQTT_ESP32_PATH=1 ports/unix/build.sh`
// builds it, with the mqtt module waiting as it does on esp32 (no POSIX
// poll), so that the tests run the esp32 code path.

#define MICROPY_CONFIG_ROM_LEVEL (MICROPY_CONFIG_ROM_LEVEL_EXTRA_FEATURES)
#include "variants/mpconfigvariant_common.h"

// The Makefile passes -DMICROPY_PY_THREAD_GIL=0; a variant header comes
// after the command line.
#undef MICROPY_PY_THREAD_GIL
#define MICROPY_PY_THREAD_GIL (1)
// The asynchronous Ctrl-C cannot work with the lock; the unix port's
// threads with the lock need recursive mutexes.
#undef MICROPY_ASYNC_KBD_INTR
#define MICROPY_ASYNC_KBD_INTR (0)
#undef MICROPY_PY_THREAD_RECURSIVE_MUTEX
#define MICROPY_PY_THREAD_RECURSIVE_MUTEX (1)

// Waits as esp32's port does (delay.c).
#include <stdint.h>
void unix_delay_ms_as_esp32(uintptr_t ms);
#define mp_hal_delay_ms unix_delay_ms_as_esp32
