"""The client on an emulated microcontroller: MicroPython's qemu port, built
by ports/qemu/build.sh, with BOARD=MICROBIT (nRF51, Cortex-M0, the RP2040's
instruction set) under qemu-system-arm, or VIRT_RV32 (RISC-V, as ESP32-C3/C6)
under qemu-system-riscv32. The board has no network: its one UART is bridged
to mosquitto by the host (qemu_board.py), and the client talks over it with
connect(stream=...).

Set MQTT_QEMU_FIRMWARE to the firmware.elf to run these tests (they skip
otherwise), and MQTT_UMQTT_DIR to micropython-lib's umqtt.simple folder to
also measure umqtt.simple's heap on the same image."""

import ast
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from peer import Peer
from qemu_board import BRIDGE_MARKER, EmulatedBoard, board_name, qemu_command

HERE = Path(__file__).resolve().parent
FIRMWARE = os.environ.get("MQTT_QEMU_FIRMWARE")
UMQTT_DIR = os.environ.get("MQTT_UMQTT_DIR")

# Board-side code that every script starts with (after BOARD = its name):
# the UART stream `uart`, ticks_ms() and ticks_diff(), a `result` helper,
# and BRIDGE (the line that hands the serial line over to the MQTT bridge).
PRELUDE = (HERE / "uart_stream.py").read_text() + f"""
uart = UartStream()
BRIDGE = {BRIDGE_MARKER.decode().strip()!r}

def result(value):
    print("RESULT", repr(value))
"""


def firmware_or_skip():
    if not FIRMWARE:
        pytest.skip("set MQTT_QEMU_FIRMWARE to a firmware.elf from ports/qemu/build.sh")
    firmware = Path(FIRMWARE)
    assert firmware.exists(), f"MQTT_QEMU_FIRMWARE: no firmware at {firmware}"
    command = qemu_command(firmware)
    assert board_name(command), f"no UART driver for the board of {command}"
    # Asked to run on an emulated board, a missing emulator is a failure.
    assert shutil.which(command[0]), f"{command[0]} not found: see ports/qemu/emulator.sh"
    return firmware


@pytest.fixture
def boards(tmp_path):
    """Boots emulated boards on demand (each a fresh qemu); stops them all."""
    firmware = firmware_or_skip()
    started = []

    def boot():
        board = EmulatedBoard(firmware, tmp_path / f"qemu{len(started)}.log")
        started.append(board)
        return board

    yield boot
    for board in started:
        board.close()


def run_for_result(board, code, broker_port=None, timeout=60):
    prelude = f"BOARD = {board.name!r}\n" + PRELUDE
    output = board.run(prelude + code, broker_port=broker_port, timeout=timeout)
    lines = [line for line in output.splitlines() if line.startswith("RESULT ")]
    assert len(lines) == 1, f"no result from the board; it printed:\n{output}"
    return ast.literal_eval(lines[0][len("RESULT ") :])


def test_harness_carries_raw_mqtt_bytes(boards, broker):
    # Pure Python on the board, no mqtt module: a hand-built CONNECT out
    # over the UART, the broker's CONNACK back.
    board = boards()
    connack = run_for_result(
        board,
        """
connect = b"\\x10\\x11\\x00\\x04MQTT\\x04\\x02\\x00\\x3c\\x00\\x05probe"
print(BRIDGE)
uart.write(connect)
reply = bytearray(4)
got = 0
start = ticks_ms()
while got < 4 and ticks_diff(ticks_ms(), start) < 10000:
    got += uart.readinto(memoryview(reply)[got:]) or 0
uart.write(b"\\xe0\\x00")
uart.drain()
result(bytes(reply[:got]))
""",
        broker_port=broker.port,
    )
    assert connack == b"\x20\x02\x00\x00"
    # The REPL is usable again after the session.
    assert run_for_result(board, "result(6 * 7)") == 42


SESSION = """
import mqtt

received = []

def on_message(client, payload, topic):
    received.append((topic, payload))

client = mqtt.Client("emulated-board", cycle_timeout=50)
print(BRIDGE)
client.connect("broker", 60, stream=uart, start_loop=False)
granted = [client.subscribe("emu/echo/#", on_message, qos=2),
           client.subscribe("emu/in/#", on_message, qos=2)]
for qos in range(3):
    client.publish("emu/echo/q%d" % qos, ("echo at QoS %d" % qos).encode(), qos=qos)
for qos in range(3):
    client.publish("emu/out/q%d" % qos, ("from the board at QoS %d" % qos).encode(), qos=qos)
# The peer publishes to emu/in/ once it got emu/out/.
start = ticks_ms()
while len(received) < 6 and ticks_diff(ticks_ms(), start) < 30000:
    client.cycle()
client.disconnect()
uart.drain()
result({"granted": granted, "received": received})
"""


def test_session_at_every_qos_with_a_peer(boards, broker):
    board = boards()
    peer = Peer(broker.port)
    try:
        peer.subscribe("emu/out/#", qos=2)
        with ThreadPoolExecutor(1) as pool:
            session = pool.submit(run_for_result, board, SESSION, broker.port, 90)
            from_board = peer.wait_for(3, timeout=60)
            for qos in range(3):
                peer.publish(f"emu/in/q{qos}", f"to the board at QoS {qos}".encode(), qos=qos)
            outcome = session.result(timeout=90)
    finally:
        peer.close()

    assert sorted((m.topic, m.payload, m.qos) for m in from_board) == [
        (f"emu/out/q{qos}", f"from the board at QoS {qos}".encode(), qos) for qos in range(3)
    ]
    assert outcome["granted"] == [2, 2]
    assert sorted(outcome["received"]) == sorted(
        [(f"emu/echo/q{qos}", f"echo at QoS {qos}".encode()) for qos in range(3)]
        + [(f"emu/in/q{qos}", f"to the board at QoS {qos}".encode()) for qos in range(3)]
    )


# Heap growth, as the unix figures are measured: gc.collect() and
# gc.mem_alloc() just before the import, again after subscribe. The UART
# stream, the callback and every global the measured code binds exist
# before the first reading, so they are not counted.
MQTT_HEAP = """
import gc
mqtt = client = grown = client_alone = imported = None

def on_message(client, payload, topic):
    pass

print(BRIDGE)
gc.collect()
before = gc.mem_alloc()
import mqtt
gc.collect()
imported = gc.mem_alloc()
client = mqtt.Client("emulated-board")
gc.collect()
client_alone = gc.mem_alloc() - imported
client.connect("broker", 60, stream=uart, start_loop=False)
client.subscribe("emu/heap", on_message, qos=0)
gc.collect()
grown = gc.mem_alloc() - before
client.disconnect()
uart.drain()
result((grown, client_alone))
"""

# umqtt.simple opens its own socket: socket_standin.py gives it the UART.
# Its source is pasted into the script and imported with exec(), which
# compiles it on the board as an import of the .py file would.
UMQTT_HEAP = """
import gc
umqtt_simple = client = grown = None

def on_message(topic, payload):
    pass

print(BRIDGE)
gc.collect()
before = gc.mem_alloc()
umqtt_simple = {"__name__": "umqtt.simple"}
exec(UMQTT_SOURCE, umqtt_simple)
client = umqtt_simple["MQTTClient"]("emulated-board", "broker", keepalive=60)
client.set_callback(on_message)
client.connect()
client.subscribe("emu/heap", qos=0)
gc.collect()
grown = gc.mem_alloc() - before
client.disconnect()
uart.drain()
result(grown)
"""


def test_heap_after_import_client_connect_subscribe(boards, broker, capsys):
    board = boards()
    mqtt_grown, client_alone = run_for_result(board, MQTT_HEAP, broker_port=broker.port)
    umqtt = "umqtt.simple not measured (set MQTT_UMQTT_DIR)"
    if UMQTT_DIR:
        source = (Path(UMQTT_DIR) / "umqtt" / "simple.py").read_text()
        standin = (HERE / "socket_standin.py").read_text()
        code = standin + f"UMQTT_SOURCE = {source!r}\n" + UMQTT_HEAP
        umqtt_grown = run_for_result(boards(), code, broker_port=broker.port)
        umqtt = f"umqtt.simple {umqtt_grown} B"
    with capsys.disabled():
        print(
            f"\nemulated {board.name} heap after import+Client+connect+subscribe: "
            f"mqtt {mqtt_grown} B (the Client object alone {client_alone} B), {umqtt}"
        )
    assert 0 < client_alone < mqtt_grown < 4096
