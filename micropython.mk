# How Make ports (unix) build the `mqtt` user C module.
#
# Build a firmware with USER_C_MODULES=<folder holding this repository>.
# The Rust engine is built with cargo and pre-linked into one object that
# exports only the engine's C functions: the Rust archive also carries
# compiler_builtins, whose memcpy, sqrt and friends must never replace the
# firmware's own C library functions.

MQTT_MOD_DIR := $(USERMOD_DIR)

# modmqtt.c includes the binding's other files (mqtt_*.c, mqtt_client.h):
# one translation unit. The qstrs are collected anew when any of them changes.
SRC_USERMOD_C += $(MQTT_MOD_DIR)/modmqtt.c
CFLAGS_USERMOD += -I$(MQTT_MOD_DIR)
QSTR_GLOBAL_DEPENDENCIES += $(wildcard $(MQTT_MOD_DIR)/mqtt_*.c $(MQTT_MOD_DIR)/mqtt_client.h)

# The Rust target; empty means the host (the unix port).
MQTT_RUST_TARGET ?=
MQTT_CARGO ?= cargo
# MQTT_V5=0 builds a module that speaks MQTT 3.1.1 only, about 9 KB of
# engine and 2 KB of binding smaller.
MQTT_V5 ?= 1
CFLAGS_USERMOD += -DMQTT_V5=$(if $(filter 0,$(MQTT_V5)),0,1)
MQTT_CARGO_DIR := $(abspath $(BUILD))/mqtt-engine
MQTT_ARCHIVE := $(MQTT_CARGO_DIR)/$(if $(MQTT_RUST_TARGET),$(MQTT_RUST_TARGET)/)release/libmqtt_engine.a
MQTT_ENGINE_OBJ := $(BUILD)/mqtt_engine.o

# The engine's exported functions, as the committed header declares them.
MQTT_EXPORTS := $(shell grep -oP '\bmqtt_\w+(?=\x28)' $(MQTT_MOD_DIR)/mqtt_engine.h | sort -u)

$(MQTT_ARCHIVE): $(wildcard $(MQTT_MOD_DIR)/src/*.rs $(MQTT_MOD_DIR)/src/*/*.rs) $(MQTT_MOD_DIR)/Cargo.toml $(MQTT_MOD_DIR)/Cargo.lock
	$(ECHO) "CARGO mqtt engine"
	$(Q)$(MQTT_CARGO) build --release --locked --lib \
		--manifest-path $(MQTT_MOD_DIR)/Cargo.toml --target-dir $(MQTT_CARGO_DIR) \
		$(if $(MQTT_RUST_TARGET),--target $(MQTT_RUST_TARGET)) \
		$(if $(filter 0,$(MQTT_V5)),--no-default-features)

# The pre-link also drops Rust's unwind tables (.ARM.exidx*, .ARM.extab* and,
# for a board, .eh_frame): the engine panics by aborting, and bare-metal
# linker scripts do not place them.
$(MQTT_ENGINE_OBJ): $(MQTT_ARCHIVE) $(MQTT_MOD_DIR)/mqtt_engine.h $(MQTT_MOD_DIR)/micropython.mk
	$(ECHO) "PRELINK $@"
	$(Q)$(LD) -r --gc-sections -o $@.full $(addprefix -u ,$(MQTT_EXPORTS)) $(MQTT_ARCHIVE)
	$(Q)$(OBJCOPY) $(addprefix --keep-global-symbol=,$(MQTT_EXPORTS)) \
		--remove-section=.llvmbc --remove-section=.llvmcmd \
		--remove-section='.ARM.exidx*' --remove-section='.ARM.extab*' \
		$(if $(MQTT_RUST_TARGET),--remove-section=.eh_frame) $@.full $@
	$(Q)$(RM) $@.full

# Objects in PY_O are part of every Make port's link.
PY_O += $(MQTT_ENGINE_OBJ)
