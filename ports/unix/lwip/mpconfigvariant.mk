# The unix variant that stands in for MicroPython's lwIP boards
# (`MQTT_LWIP=1 ports/unix/build.sh`, which also passes MICROPY_PY_SOCKET=0
# MICROPY_PY_LWIP=1): the unix Makefile compiles this folder's .c files.

# lwipopts.h and arch/cc.h, for lwIP and modlwip.c.
INC += -I$(VARIANT_DIR)

# machine.Timer's soft timer, which the service thread of lwip_unix.c runs.
SRC_C += shared/runtime/softtimer.c

# modlwip.c compares signed and unsigned timeouts, and takes the unix
# port's listen backlog from SOMAXCONN, which it does not include.
$(BUILD)/extmod/modlwip.o: CFLAGS += -Wno-sign-compare -DSOMAXCONN=128
