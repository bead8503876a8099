"""mosquitto for the tests and the benchmark: a real broker on a free
loopback port, stopped by its PID."""

import os
import socket
import subprocess
import time
from pathlib import Path


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for_port(port, process, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"broker exited early with code {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"broker did not listen on port {port}")


class Broker:
    """A mosquitto process on 127.0.0.1, stopped by its PID at the end."""

    def __init__(self, directory, settings="allow_anonymous true\n"):
        self.directory = Path(directory)
        self.port = free_port()
        self.config = self.directory / "mosquitto.conf"
        # Started as root, mosquitto would switch to its own user, which
        # cannot read the tests' temporary files; "user root" keeps it as is.
        identity = "user root\n" if os.geteuid() == 0 else ""
        self.config.write_text(f"{identity}listener {self.port} 127.0.0.1\n{settings}")
        self.log = open(self.directory / "mosquitto.log", "ab")
        self.start()

    def start(self):
        self.process = subprocess.Popen(
            ["mosquitto", "-c", str(self.config)], stdout=self.log, stderr=subprocess.STDOUT
        )
        wait_for_port(self.port, self.process)

    def terminate(self):
        """Stops mosquitto as a service manager would (SIGTERM: it saves
        its persistence database first)."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

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
