# The lwIP glue of the unix firmware that stands in for the lwIP boards
# (`MQTT_LWIP=1 ports/unix/build.sh`): a user C module beside `mqtt`.
LWIP_GLUE_DIR := $(USERMOD_DIR)

SRC_USERMOD_C += $(LWIP_GLUE_DIR)/lwip_unix.c $(LWIP_GLUE_DIR)/tap_linux.c
# Where lwIP finds lwipopts.h and arch/cc.h.
CFLAGS_USERMOD += -I$(LWIP_GLUE_DIR)

# modlwip.c compares signed and unsigned timeouts, and takes the unix
# port's listen backlog from SOMAXCONN, which it does not include.
$(BUILD)/extmod/modlwip.o: CFLAGS += -Wno-sign-compare -DSOMAXCONN=128
