// lwIP's hooks in the unix lwIP firmware (lwipopts.h names this file).
#ifndef MQTT_UNIX_LWIP_HOOKS_H
#define MQTT_UNIX_LWIP_HOOKS_H

#include "lwip/ip_addr.h"

// The initial sequence number of a connection (lwip_unix.c).
u32_t lwip_unix_tcp_isn(const ip_addr_t *local_ip, u16_t local_port, const ip_addr_t *remote_ip, u16_t remote_port);

#endif
