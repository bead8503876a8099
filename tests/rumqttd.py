"""rumqttd, the tests' second MQTT 5 broker: an implementation of its own
(Rust, from crates.io; ports/setup.sh installs it with cargo), unlike
mosquitto in every line, that starts in milliseconds and needs no
service. The MQTT 5 tests that concern what any broker does run against
it too, so that what they check is MQTT 5 and not mosquitto's reading of
it."""

import os
import shutil
import subprocess
from pathlib import Path

from broker import HOST, free_port, stop_process, wait_for_port

VERSION = "0.20.0"


def executable():
    """The rumqttd that ports/setup.sh installed (cargo's bin directory)."""
    installed = Path(os.environ.get("CARGO_HOME", Path.home() / ".cargo")) / "bin" / "rumqttd"
    found = installed if installed.exists() else shutil.which("rumqttd")
    if found is None:
        raise RuntimeError(f"rumqttd {VERSION} is not installed: run ports/setup.sh tests")
    return str(found)


class Rumqttd:
    """A rumqttd process with one MQTT 5 listener on HOST, stopped by its
    PID at the end."""

    def __init__(self, directory):
        self.directory = Path(directory)
        self.port = free_port()
        self.config = self.directory / "rumqttd.toml"
        self.config.write_text(
            "id = 0\n"
            "[router]\n"
            "id = 0\n"
            "max_connections = 100\n"
            "max_outgoing_packet_count = 200\n"
            "max_segment_size = 1048576\n"
            "max_segment_count = 10\n"
            "[v5.1]\n"
            'name = "v5-1"\n'
            f'listen = "{HOST}:{self.port}"\n'
            "next_connection_delay_ms = 1\n"
            "[v5.1.connections]\n"
            "connection_timeout_ms = 60000\n"
            "max_payload_size = 20480\n"
            "max_inflight_count = 100\n"
        )
        self.log = open(self.directory / "rumqttd.log", "ab")
        self.process = subprocess.Popen(
            [executable(), "-c", str(self.config), "-q"], stdout=self.log, stderr=subprocess.STDOUT
        )
        wait_for_port(self.port, self.process, log=self.log.name)

    def stop(self):
        stop_process(self.process)
        self.log.close()
