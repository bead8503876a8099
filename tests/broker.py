"""mosquitto for the tests and the benchmark: a real broker on a free
loopback port, stopped by its PID."""

import os
import random
import re
import socket
import subprocess
import time
from pathlib import Path

# Where the brokers listen and the scripts connect: loopback, or the
# address of a network namespace's own link when the suite runs inside one
# (lwip_network.py, for the firmware whose sockets are lwIP's).
HOST = os.environ.get("MQTT_TEST_HOST", "127.0.0.1")


def ephemeral_ports():
    """The kernel's range for the local ports of outgoing connections."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except OSError:
        return 32768, 60999


# The ports free_port() gave in this process.
_handed_out = set()


def free_port():
    """A loopback port that is free now and outside the ephemeral range.

    A port the kernel hands out for bind((HOST, 0)) comes from the
    ephemeral range, where every outgoing connection (a peer's, a script's,
    another broker's probe) also takes its local port: between the moment a
    test picks a port and the moment mosquitto binds it, a connection could
    take it, and mosquitto would exit with "Address already in use". Ports
    below that range are never given to outgoing connections.

    No port is handed out twice by one process (a broker may not have
    bound the last one yet). Test processes that run at once take ports
    from their own share of the range: MQTT_TEST_PORTS="k/n" (tests/run
    sets it) gives the ports whose remainder modulo n is k."""
    low, _ = ephemeral_ports()
    first = 10000 if low > 12000 else 1024
    share, shares = (int(part) for part in os.environ.get("MQTT_TEST_PORTS", "0/1").split("/"))
    for _ in range(200):
        port = random.randrange(first, low)
        port -= (port - share) % shares
        if port < first or port in _handed_out:
            continue
        with socket.socket() as probe:
            try:
                probe.bind((HOST, port))
            except OSError:
                continue
            _handed_out.add(port)
            return port
    raise RuntimeError(f"no free loopback port between {first} and {low}")


def wait_for_port(port, process, timeout=10.0, log=None):
    """Returns once `port` accepts connections; raises if `process` exits
    first (with the end of its `log` file, if given)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            said = Path(log).read_text(errors="replace")[-800:] if log else ""
            raise RuntimeError(f"broker exited early with code {process.returncode}:\n{said}")
        try:
            with socket.create_connection((HOST, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"broker did not listen on port {port}")


def stop_process(process):
    """Ends a broker the tests started, by its PID, as a service manager
    would: SIGTERM (mosquitto saves its persistence database first), then
    SIGKILL after 10 s."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class Broker:
    """A mosquitto process on HOST, stopped by its PID at the end.
    `settings` may add listeners of its own (`listener PORT HOST`)."""

    def __init__(self, directory, settings="allow_anonymous true\n"):
        self.directory = Path(directory)
        self.port = free_port()
        self.config = self.directory / "mosquitto.conf"
        # Started as root, mosquitto would switch to its own user, which
        # cannot read the tests' temporary files; "user root" keeps it as is.
        identity = "user root\n" if os.geteuid() == 0 else ""
        self.config.write_text(f"{identity}listener {self.port} {HOST}\n{settings}")
        self.listeners = [int(port) for port in re.findall(r"^listener (\d+)", self.config.read_text(), re.M)]
        self.log = open(self.directory / "mosquitto.log", "ab")
        self.start()

    def start(self):
        """Starts mosquitto and returns once every listener accepts
        connections: mosquitto opens them one after the other, the TLS
        ones after loading their certificates, so the first one open says
        nothing of the others."""
        self.process = subprocess.Popen(
            ["mosquitto", "-c", str(self.config)], stdout=self.log, stderr=subprocess.STDOUT
        )
        for port in self.listeners:
            wait_for_port(port, self.process, log=self.log.name)

    def terminate(self):
        stop_process(self.process)

    def restart(self):
        self.terminate()
        self.start()

    def stop(self):
        self.terminate()
        if not self.log.closed:
            self.log.close()


if __name__ == "__main__":
    # `python3 tests/broker.py free-port` prints a free port, for shell scripts.
    import sys

    if sys.argv[1:] != ["free-port"]:
        sys.exit("usage: broker.py free-port")
    print(free_port())
