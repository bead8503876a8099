"""A network of the tests' own for the lwIP firmware (`MQTT_LWIP=1
ports/unix/build.sh`): a network namespace holding a TAP device. The
namespace's side of the link is 10.0.0.1, where the brokers listen; the
firmware's lwIP is 10.0.0.2 on the other side. Every process that must
see the link runs inside the namespace; no packet leaves it. Needs root
(ip netns, /dev/net/tun).

Run as a script, it runs a command inside a namespace of its own, as
tests/run runs the whole suite on the lwIP firmware:
    python3 tests/lwip_network.py python3 -m pytest tests"""

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HOST = "10.0.0.1"
FIRMWARE_ADDRESS = "10.0.0.2"
TAP = "tap0"


def ip(*arguments):
    subprocess.run(["ip", *arguments], check=True, capture_output=True, text=True)


class LwipNetwork:
    """The namespace, made on creation and deleted by close(), with the
    processes started in it, each stopped by its PID."""

    def __init__(self, directory):
        self.directory = Path(directory)
        self.name = f"mqtt-lwip-{os.getpid()}"
        self.processes = []
        ip("netns", "add", self.name)
        try:
            ip("-n", self.name, "link", "set", "lo", "up")
            ip("-n", self.name, "tuntap", "add", TAP, "mode", "tap")
            ip("-n", self.name, "addr", "add", f"{HOST}/24", "dev", TAP)
            ip("-n", self.name, "link", "set", TAP, "up")
        except subprocess.CalledProcessError:
            self.close()
            raise

    def command(self, *arguments):
        """A command line that runs `arguments` inside the namespace."""
        return ["ip", "netns", "exec", self.name, *arguments]

    def firmware_environment(self):
        """The environment that brings the firmware's lwIP interface up."""
        return dict(os.environ, MQTT_LWIP_TAP=f"{TAP},{FIRMWARE_ADDRESS},{HOST}")

    def start(self, *arguments, **options):
        process = subprocess.Popen(self.command(*arguments), **options)
        self.processes.append(process)
        return process

    def start_broker(self, port, settings="allow_anonymous true\n"):
        """mosquitto on HOST:port, once it listens."""
        log = self.directory / f"mosquitto-{port}.log"
        config = self.directory / f"mosquitto-{port}.conf"
        config.write_text(f"listener {port} {HOST}\n{settings}log_dest file {log}\nuser root\n")
        process = self.start("mosquitto", "-c", str(config), stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while "running" not in (log.read_text() if log.exists() else ""):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mosquitto did not start in the namespace: {log.read_text() if log.exists() else ''}")
            time.sleep(0.02)
        return process

    def close(self):
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        self.processes = []
        subprocess.run(["ip", "netns", "delete", self.name], capture_output=True)


def main(arguments):
    """Runs a command (the whole suite, say) inside a fresh namespace, with
    MQTT_TEST_HOST and the firmware's interface settings in its
    environment, and deletes the namespace after."""
    with tempfile.TemporaryDirectory() as directory:
        network = LwipNetwork(directory)
        try:
            environment = dict(network.firmware_environment(), MQTT_TEST_HOST=HOST)
            return subprocess.run(network.command(*arguments), env=environment).returncode
        finally:
            network.close()


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(f"usage: {sys.argv[0]} COMMAND [ARGUMENT...]: runs COMMAND inside a namespace of its own")
    sys.exit(main(sys.argv[1:]))
