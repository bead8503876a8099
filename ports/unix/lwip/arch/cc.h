// lwIP's view of the compiler and the host: MicroPython's own
// (extmod/lwip-include/arch/cc.h), but for a 64-bit host.
#ifndef MQTT_UNIX_LWIP_ARCH_CC_H
#define MQTT_UNIX_LWIP_ARCH_CC_H

#include <assert.h>
#include <stdint.h>
#include <stdlib.h>

typedef uint8_t u8_t;
typedef int8_t s8_t;
typedef uint16_t u16_t;
typedef int16_t s16_t;
typedef uint32_t u32_t;
typedef int32_t s32_t;
typedef uintptr_t mem_ptr_t;

#define U16_F "hu"
#define S16_F "hd"
#define X16_F "hx"
#define U32_F "u"
#define S32_F "d"
#define X32_F "x"
#define X8_F "02x"
#define SZT_F "zu"

// glibc's endian.h may have said so already.
#ifndef BYTE_ORDER
#define BYTE_ORDER LITTLE_ENDIAN
#endif
#define LWIP_PLATFORM_DIAG(x)
#define LWIP_PLATFORM_ASSERT(x) assert(0)
#define LWIP_RAND() ((u32_t)rand())

#define PACK_STRUCT_FIELD(x) x
#define PACK_STRUCT_STRUCT __attribute__((packed))
#define PACK_STRUCT_BEGIN
#define PACK_STRUCT_END

#endif
