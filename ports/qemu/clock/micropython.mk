# The millisecond clock that the `mqtt` module needs and MicroPython 1.25's
# qemu port lacks (it has no `time` module and no mp_hal_ticks_ms).
# ports/qemu/build.sh links this folder next to the repository.
SRC_USERMOD_C += $(USERMOD_DIR)/clock.c
