// Opens a Linux TAP device for lwip_unix.c. On its own because Linux's
// network headers and lwIP's clash.

#include <fcntl.h>
#include <linux/if.h>
#include <linux/if_tun.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

int tap_open(const char *name);

// Waits (up to two seconds) until the host runs the device `name`. A TAP
// device comes up on the host's side some time after a program opens it
// (the kernel's link watch, rate-limited to once a second); until then the
// host neither answers ARP there nor sends anything, and lwIP, whose first
// ARP request went unanswered, would ask again only a second later.
static void wait_until_running(const char *name) {
    int probe = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (probe < 0) {
        return;
    }
    struct ifreq request;
    memset(&request, 0, sizeof(request));
    strncpy(request.ifr_name, name, IFNAMSIZ - 1);
    const struct timespec millisecond = { 0, 1000000 };
    for (int waited = 0; waited < 2000; waited++) {
        if (ioctl(probe, SIOCGIFFLAGS, &request) < 0 || (request.ifr_flags & IFF_RUNNING)) {
            break;
        }
        nanosleep(&millisecond, NULL);
    }
    close(probe);
}

// Returns the descriptor of the TAP device `name` (which must exist), or -1.
int tap_open(const char *name) {
    int fd = open("/dev/net/tun", O_RDWR | O_CLOEXEC);
    if (fd < 0) {
        return -1;
    }
    struct ifreq request;
    memset(&request, 0, sizeof(request));
    request.ifr_flags = IFF_TAP | IFF_NO_PI;
    strncpy(request.ifr_name, name, IFNAMSIZ - 1);
    if (ioctl(fd, TUNSETIFF, &request) < 0) {
        close(fd);
        return -1;
    }
    wait_until_running(name);
    return fd;
}
