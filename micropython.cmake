# How CMake ports (rp2, esp32) build the `mqtt` user C module:
#
#   make BOARD=... USER_C_MODULES=/path/to/this/repository/micropython.cmake
#
# The Rust engine is built with cargo for the board's target as one object
# (the crate with what it uses of core, after link-time optimisation), then
# pre-linked so that it exports only the engine's C functions. It leaves out
# Rust's compiler_builtins: the few routines the engine needs (memcpy,
# memset, memcmp) come from the port's own C library, which both CMake ports
# have (newlib in ESP-IDF; newlib and the pico-sdk's ROM-backed versions on
# rp2), so that nothing of Rust's replaces the firmware's (on RP2040 those
# live in RAM; Rust's would be in flash) and nothing is there twice.
cmake_minimum_required(VERSION 3.19)

set(MQTT_MOD_DIR ${CMAKE_CURRENT_LIST_DIR})

# modmqtt.c includes the binding's other files (mqtt_*.c, mqtt_client.h):
# one translation unit. MicroPython collects qstrs again only when modmqtt.c
# changes: after adding a qstr to an included file, touch modmqtt.c
# (ports/rp2/build.sh sees to it).
add_library(usermod_mqtt INTERFACE)
target_sources(usermod_mqtt INTERFACE ${MQTT_MOD_DIR}/modmqtt.c)
target_include_directories(usermod_mqtt INTERFACE ${MQTT_MOD_DIR})

# The Rust target, from the port's own settings unless given.
if(NOT MQTT_RUST_TARGET)
    if(PICO_PLATFORM STREQUAL "rp2040")
        set(MQTT_RUST_TARGET thumbv6m-none-eabi)
    elseif(PICO_PLATFORM STREQUAL "rp2350-arm-s" OR PICO_PLATFORM STREQUAL "rp2350")
        set(MQTT_RUST_TARGET thumbv8m.main-none-eabi)
    elseif(PICO_PLATFORM STREQUAL "rp2350-riscv")
        set(MQTT_RUST_TARGET riscv32imac-unknown-none-elf)
    elseif(IDF_TARGET STREQUAL "esp32c3")
        set(MQTT_RUST_TARGET riscv32imc-unknown-none-elf)
    elseif(IDF_TARGET STREQUAL "esp32c6")
        set(MQTT_RUST_TARGET riscv32imac-unknown-none-elf)
    elseif(IDF_TARGET STREQUAL "esp32")
        # Xtensa needs the esp Rust toolchain fork (espup); see README.md.
        set(MQTT_RUST_TARGET xtensa-esp32-none-elf)
    elseif(IDF_TARGET STREQUAL "esp32s3")
        set(MQTT_RUST_TARGET xtensa-esp32s3-none-elf)
    else()
        message(FATAL_ERROR "mqtt: unknown board target; pass -DMQTT_RUST_TARGET=<rust target triple>")
    endif()
endif()

# -DMQTT_V5=OFF builds a module that speaks MQTT 3.1.1 only, about 9 KB of
# engine and 2 KB of binding smaller.
option(MQTT_V5 "the mqtt module speaks MQTT 5 too" ON)
if(NOT MQTT_V5)
    set(MQTT_CARGO_FEATURES --no-default-features)
    target_compile_definitions(usermod_mqtt INTERFACE MQTT_V5=0)
endif()

find_program(MQTT_CARGO cargo REQUIRED)
set(MQTT_CARGO_DIR ${CMAKE_BINARY_DIR}/mqtt-engine)
set(MQTT_ENGINE_OBJ ${CMAKE_BINARY_DIR}/mqtt_engine.o)
set(MQTT_RUST_OBJ ${CMAKE_BINARY_DIR}/mqtt_engine_rust.o)

# The engine's exported functions, as the committed header declares them
# (read again, by a new configure step, whenever the header changes).
set_property(DIRECTORY APPEND PROPERTY CMAKE_CONFIGURE_DEPENDS ${MQTT_MOD_DIR}/mqtt_engine.h)
file(READ ${MQTT_MOD_DIR}/mqtt_engine.h MQTT_HEADER)
string(REGEX MATCHALL "mqtt_[a-z_]+\\(" MQTT_EXPORTS "${MQTT_HEADER}")
string(REPLACE "(" "" MQTT_EXPORTS "${MQTT_EXPORTS}")
list(REMOVE_DUPLICATES MQTT_EXPORTS)
list(TRANSFORM MQTT_EXPORTS PREPEND "-u" OUTPUT_VARIABLE MQTT_UNDEFINED)
list(TRANSFORM MQTT_EXPORTS PREPEND "--keep-global-symbol=" OUTPUT_VARIABLE MQTT_KEEP)

file(GLOB_RECURSE MQTT_RUST_SOURCES CONFIGURE_DEPENDS ${MQTT_MOD_DIR}/src/*.rs)
add_custom_command(
    OUTPUT ${MQTT_ENGINE_OBJ}
    COMMAND ${MQTT_CARGO} rustc --release --locked --lib
        --manifest-path ${MQTT_MOD_DIR}/Cargo.toml --target-dir ${MQTT_CARGO_DIR}
        --target ${MQTT_RUST_TARGET} ${MQTT_CARGO_FEATURES} -- --emit=obj=${MQTT_RUST_OBJ}
    COMMAND ${CMAKE_LINKER} -r --gc-sections -o ${MQTT_ENGINE_OBJ}.full ${MQTT_UNDEFINED} ${MQTT_RUST_OBJ}
    COMMAND ${CMAKE_OBJCOPY} ${MQTT_KEEP}
        --remove-section=.llvmbc --remove-section=.llvmcmd
        --remove-section=.ARM.exidx* --remove-section=.ARM.extab* --remove-section=.eh_frame
        ${MQTT_ENGINE_OBJ}.full ${MQTT_ENGINE_OBJ}
    COMMAND ${CMAKE_COMMAND} -E rm -f ${MQTT_ENGINE_OBJ}.full
    DEPENDS ${MQTT_RUST_SOURCES} ${MQTT_MOD_DIR}/Cargo.toml ${MQTT_MOD_DIR}/Cargo.lock ${MQTT_MOD_DIR}/mqtt_engine.h
        ${MQTT_MOD_DIR}/micropython.cmake
    COMMENT "Building the mqtt engine for ${MQTT_RUST_TARGET}"
    VERBATIM
)
add_custom_target(mqtt_engine_build DEPENDS ${MQTT_ENGINE_OBJ})

# Dependencies of an interface library pass to the firmware that links it.
add_dependencies(usermod_mqtt mqtt_engine_build)
target_link_libraries(usermod_mqtt INTERFACE ${MQTT_ENGINE_OBJ})
target_link_libraries(usermod INTERFACE usermod_mqtt)
