#!/usr/bin/env python3
"""Heap and speed of `mqtt` beside umqtt.simple, paho-mqtt and a raw socket,
all measured in one run against one mosquitto on loopback.

    .build/venv/bin/python tests/benchmark.py [--umqtt DIR] [--mqtt-as DIR] [--quick]

DIR is micropython-lib's `micropython/umqtt.simple` folder (the one holding
`umqtt/simple.py`); it is frozen into a second firmware so its import is
measured at its best. Without it the umqtt column stays empty. Likewise
--mqtt-as takes a checkout of micropython-mqtt (the folder holding
`mqtt_as/__init__.py`; it is not on PyPI), frozen into a third firmware for
the asyncio table. --quick uses
small counts (CI runs it that way so the script cannot rot); figures from a
quick run mean little.

Not a test: it prints figures and ratios, and asserts nothing about them.
"""

import argparse
import os
import resource
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from broker import HOST, Broker, free_port  # noqa: E402
from lwip_network import HOST as LwipHost  # noqa: E402
from lwip_network import LwipNetwork  # noqa: E402

PAYLOAD = 64

# ---------------------------------------------------------------------------
# MicroPython side: each script prints "name value" lines, and "ready" when
# it waits (on stdin) for the flood to be published.

# The start of MQTT_SCRIPT, up to the heap figure once connected: alone, it
# gives that figure for the table that compares firmwares.
CONNECTED_HEAP_SCRIPT = """
import gc, micropython, sys, time
count = [0]
def on_message(client, payload, topic):
    count[0] += 1
payload = b"x" * PAYLOAD
gc.collect(); base = gc.mem_alloc()
import mqtt
gc.collect(); print("heap_import", gc.mem_alloc() - base)
client = mqtt.Client("bench-mqtt", protocol=4)
client.connect(HOST, 60, port=PORT)
client.subscribe("bench/mqtt/rt", on_message)
gc.collect(); print("heap_connected", gc.mem_alloc() - base)
"""

MQTT_SCRIPT = CONNECTED_HEAP_SCRIPT + """

def round_trips(n):
    for i in range(n):
        target = count[0] + 1
        client.publish("bench/mqtt/rt", payload)
        while count[0] < target:
            pass

round_trips(100)
start_total = micropython.mem_total(); start = time.ticks_us()
round_trips(ROUND_TRIPS)
elapsed = time.ticks_diff(time.ticks_us(), start)
print("churn_qos0", (micropython.mem_total() - start_total) / ROUND_TRIPS)
print("qos0_rate", ROUND_TRIPS * 1000000 / elapsed)

start_total = micropython.mem_total(); start = time.ticks_us()
for i in range(QOS1):
    client.publish("bench/mqtt/q1", payload, qos=1)
elapsed = time.ticks_diff(time.ticks_us(), start)
print("churn_qos1", (micropython.mem_total() - start_total) / QOS1)
print("qos1_rate", QOS1 * 1000000 / elapsed)

def settled_heap():
    # The loop thread's stack may still point at the last message it
    # delivered, which the GC then keeps: take the least of a few samples,
    # each after a few more round trips.
    samples = []
    for i in range(5):
        round_trips(10)
        gc.collect()
        samples.append(gc.mem_alloc())
    return min(samples)

before = settled_heap()
for block in range(10):
    round_trips(SOAK // 10)
print("soak_growth", settled_heap() - before)

count[0] = 0
client.subscribe("bench/flood", on_message)
print("ready")
sys.stdin.readline()
last = count[0]; first_at = None; last_at = time.ticks_ms()
while time.ticks_diff(time.ticks_ms(), last_at) < 2000 and count[0] < FLOOD:
    time.sleep_ms(1)
    if count[0] != last:
        if first_at is None:
            first_at = time.ticks_ms()
        last = count[0]; last_at = time.ticks_ms()
print("flood_received", count[0])
print("flood_rate", count[0] * 1000 / max(1, time.ticks_diff(last_at, first_at or last_at)))
client.disconnect()
"""

# Round trips and QoS 1 publishes from a thread that blocks on a lock while
# it waits, as a threaded application does: what the loop thread and the
# application make of the interpreter lock (on esp32) shows here.
WAITING_SCRIPT = """
import _thread, time, mqtt
arrived = _thread.allocate_lock()
arrived.acquire()
def on_message(client, payload, topic):
    arrived.release()
client = mqtt.Client("bench-waiting")
client.connect(HOST, 60, port=PORT)
client.subscribe("bench/waiting", on_message)
payload = b"x" * PAYLOAD
start = time.ticks_us()
for i in range(ROUND_TRIPS):
    client.publish("bench/waiting", payload)
    arrived.acquire()
print("waiting_rate", ROUND_TRIPS * 1000000 / max(1, time.ticks_diff(time.ticks_us(), start)))
start = time.ticks_us()
for i in range(QOS1):
    client.publish("bench/waiting/q1", payload, qos=1)
print("waiting_qos1_rate", QOS1 * 1000000 / max(1, time.ticks_diff(time.ticks_us(), start)))
client.disconnect()
"""

UMQTT_SCRIPT = """
import gc, micropython, sys, time
count = [0]
def on_message(topic, payload):
    count[0] += 1
payload = b"x" * PAYLOAD
gc.collect(); base = gc.mem_alloc()
from umqtt.simple import MQTTClient
gc.collect(); print("heap_import", gc.mem_alloc() - base)
client = MQTTClient("bench-umqtt", HOST, port=PORT, keepalive=60)
client.set_callback(on_message)
client.connect()
client.subscribe(b"bench/umqtt/rt")
gc.collect(); print("heap_connected", gc.mem_alloc() - base)

def round_trips(n):
    for i in range(n):
        target = count[0] + 1
        client.publish(b"bench/umqtt/rt", payload)
        while count[0] < target:
            client.wait_msg()

round_trips(10)
start_total = micropython.mem_total(); start = time.ticks_us()
round_trips(ROUND_TRIPS)
elapsed = time.ticks_diff(time.ticks_us(), start)
print("churn_qos0", (micropython.mem_total() - start_total) / ROUND_TRIPS)
print("qos0_rate", ROUND_TRIPS * 1000000 / elapsed)

start_total = micropython.mem_total(); start = time.ticks_us()
for i in range(QOS1):
    client.publish(b"bench/umqtt/q1", payload, qos=1)
elapsed = time.ticks_diff(time.ticks_us(), start)
print("churn_qos1", (micropython.mem_total() - start_total) / QOS1)
print("qos1_rate", QOS1 * 1000000 / elapsed)

count[0] = 0
client.subscribe(b"bench/flood")
client.sock.setblocking(True)
print("ready")
sys.stdin.readline()
client.sock.settimeout(2)
first_at = None; last_at = time.ticks_ms()
try:
    while count[0] < FLOOD:
        client.wait_msg()
        if first_at is None:
            first_at = time.ticks_ms()
        last_at = time.ticks_ms()
except OSError:
    pass
print("flood_received", count[0])
print("flood_rate", count[0] * 1000 / max(1, time.ticks_diff(last_at, first_at or last_at)))
"""


# The asyncio table: the same program for `mqtt` (aconnect, messages()) and
# for mqtt_as (its queue interface): heap once connected and subscribed,
# heap allocated per QoS 0 round trip, round trips per second, and the worst
# lateness of a task that wakes every 10 ms meanwhile. asyncio is imported
# before the heap's base: both pay for it alike.
ASYNC_TICKER = """
import gc, micropython, sys, time, asyncio
payload = b"x" * PAYLOAD
lateness = [0]

async def ticker():
    expected = time.ticks_add(time.ticks_ms(), 10)
    while True:
        await asyncio.sleep_ms(10)
        now = time.ticks_ms()
        lateness[0] = max(lateness[0], time.ticks_diff(now, expected))
        expected = time.ticks_add(now, 10)

async def measure(publish, messages):
    async def round_trips(n):
        for i in range(n):
            await publish()
            await messages.__anext__()

    await round_trips(100)
    tick = asyncio.create_task(ticker())
    await asyncio.sleep_ms(30)
    lateness[0] = 0
    start_total = micropython.mem_total(); start = time.ticks_us()
    await round_trips(ROUND_TRIPS)
    elapsed = time.ticks_diff(time.ticks_us(), start)
    print("churn_qos0", (micropython.mem_total() - start_total) / ROUND_TRIPS)
    print("qos0_rate", ROUND_TRIPS * 1000000 / elapsed)
    print("lateness", lateness[0])
    tick.cancel()
"""

ASYNC_MQTT_SCRIPT = ASYNC_TICKER + """
async def main():
    gc.collect(); base = gc.mem_alloc()
    import mqtt
    gc.collect(); print("heap_import", gc.mem_alloc() - base)
    client = mqtt.Client("bench-async")
    await client.aconnect(HOST, 60, port=PORT)
    await client.asubscribe("bench/async/rt")
    gc.collect(); print("heap_connected", gc.mem_alloc() - base)
    await measure(lambda: client.apublish("bench/async/rt", payload), client.messages())
    await client.adisconnect()

asyncio.run(main())
"""

# mqtt_as wants a board: the unix port has no `network` module and no
# machine.unique_id, so the script gives it stand-ins (made before the
# heap's base) for a Wi-Fi link that is always up.
MQTT_AS_SCRIPT = ASYNC_TICKER + """
class WLAN:
    def __init__(self, *args): pass
    def active(self, *args): return True
    def isconnected(self): return True
    def connect(self, *args): pass
    def disconnect(self): pass
    def status(self): return 3
    def config(self, **settings): pass

class network:
    STA_IF = 0
    STAT_IDLE = 0
    STAT_CONNECTING = 1
    STAT_GOT_IP = 3
    WLAN = WLAN

class machine:
    def unique_id():
        return b"bench"

sys.modules["network"] = network
sys.modules["machine"] = machine

async def main():
    gc.collect(); base = gc.mem_alloc()
    from mqtt_as import MQTTClient, config
    gc.collect(); print("heap_import", gc.mem_alloc() - base)
    config["server"] = HOST
    config["port"] = PORT
    config["client_id"] = "bench-mqtt-as"
    config["keepalive"] = 60
    config["queue_len"] = 1
    client = MQTTClient(config)
    await client.connect(quick=True)
    await client.subscribe("bench/as/rt", 0)
    gc.collect(); print("heap_connected", gc.mem_alloc() - base)
    await measure(lambda: client.publish("bench/as/rt", payload, qos=0), client.queue)
    client.close()

asyncio.run(main())
"""


def run_micropython(firmware, script, counts, flood, network=None):
    """Runs a benchmark script; publishes the flood when it is ready. With
    `network` (an LwipNetwork), the firmware runs inside its namespace."""
    counts = dict(counts, HOST=LwipHost if network else HOST)
    source = "".join(f"{name} = {value!r}\n" for name, value in counts.items()) + textwrap.dedent(script)
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as file:
        file.write(source)
    command = [str(firmware), file.name]
    environment = None
    if network:
        command = network.command(*command)
        environment = network.firmware_environment()
    process = subprocess.Popen(
        command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=environment
    )
    results = {}
    try:
        for line in process.stdout:
            fields = line.split()
            if fields == ["ready"]:
                flood()
                process.stdin.write("go\n")
                process.stdin.flush()
            elif len(fields) == 2:
                try:
                    results[fields[0]] = float(fields[1])
                except ValueError:
                    print(line, end="", file=sys.stderr)
            else:
                print(line, end="", file=sys.stderr)
        process.wait(timeout=600)
    finally:
        if process.poll() is None:
            process.kill()
        os.unlink(file.name)
    if process.returncode != 0:
        raise RuntimeError(f"{firmware} failed with code {process.returncode}")
    return results


# ---------------------------------------------------------------------------
# CPython peers


def flood_publisher(port, count):
    """Publishes `count` QoS 0 messages of 64 B as fast as one raw socket can."""

    def publish():
        sock = socket.create_connection(("127.0.0.1", port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(connect_packet(b"bench-flood"))
        read_packet(sock)
        packet = publish_packet(b"bench/flood", b"f" * PAYLOAD)
        batch = packet * 100
        sent = 0
        while sent < count:
            chunk = min(100, count - sent)
            sock.sendall(batch if chunk == 100 else packet * chunk)
            sent += chunk
        sock.sendall(b"\xe0\x00")
        sock.close()

    return publish


def remaining_length(value):
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def connect_packet(client_id, keepalive=60):
    body = b"\x00\x04MQTT\x04\x02" + struct.pack("!H", keepalive) + struct.pack("!H", len(client_id)) + client_id
    return b"\x10" + remaining_length(len(body)) + body


def publish_packet(topic, payload, qos=0, packet_id=0):
    body = struct.pack("!H", len(topic)) + topic + (struct.pack("!H", packet_id) if qos else b"") + payload
    return bytes([0x30 | (qos << 1)]) + remaining_length(len(body)) + body


def subscribe_packet(topic, packet_id=1):
    body = struct.pack("!H", packet_id) + struct.pack("!H", len(topic)) + topic + b"\x00"
    return b"\x82" + remaining_length(len(body)) + body


class BufferedSocket:
    def __init__(self, sock):
        self.sock = sock
        self.buffer = b""

    def exactly(self, count):
        while len(self.buffer) < count:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError
            self.buffer += chunk
        data, self.buffer = self.buffer[:count], self.buffer[count:]
        return data


def read_packet(stream):
    if isinstance(stream, socket.socket):
        stream = BufferedSocket(stream)
    first = stream.exactly(1)[0]
    length, shift = 0, 0
    while True:
        byte = stream.exactly(1)[0]
        length |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            break
    return first, stream.exactly(length)


def raw_socket_peer(port, counts):
    """The practical limit of one synchronous client: whole packets in one
    write each, TCP_NODELAY, a buffered reader."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    stream = BufferedSocket(sock)
    sock.sendall(connect_packet(b"bench-raw"))
    read_packet(stream)
    sock.sendall(subscribe_packet(b"bench/raw/rt"))
    read_packet(stream)
    packet = publish_packet(b"bench/raw/rt", b"x" * PAYLOAD)
    start = time.perf_counter()
    for _ in range(counts["ROUND_TRIPS"]):
        sock.sendall(packet)
        read_packet(stream)
    qos0 = counts["ROUND_TRIPS"] / (time.perf_counter() - start)
    start = time.perf_counter()
    for number in range(counts["QOS1"]):
        sock.sendall(publish_packet(b"bench/raw/q1", b"x" * PAYLOAD, qos=1, packet_id=number % 65535 + 1))
        read_packet(stream)
    qos1 = counts["QOS1"] / (time.perf_counter() - start)
    sock.close()
    return {"qos0_rate": qos0, "qos1_rate": qos1}


def raw_socket_flood(port, counts):
    sock = socket.create_connection(("127.0.0.1", port))
    stream = BufferedSocket(sock)
    sock.sendall(connect_packet(b"bench-raw-flood"))
    read_packet(stream)
    sock.sendall(subscribe_packet(b"bench/flood"))
    read_packet(stream)
    publisher = threading.Thread(target=flood_publisher(port, counts["FLOOD"]))
    publisher.start()
    sock.settimeout(2)
    received, first_at, last_at = 0, None, time.perf_counter()
    try:
        while received < counts["FLOOD"]:
            read_packet(stream)
            received += 1
            last_at = time.perf_counter()
            first_at = first_at or last_at
    except (socket.timeout, EOFError):
        pass
    publisher.join()
    sock.close()
    return {"flood_received": received, "flood_rate": received / max(1e-6, last_at - (first_at or last_at))}


def paho_peer(port, counts):
    import paho.mqtt.client as paho

    received = threading.Condition()
    state = {"count": 0, "first": None, "last": None}

    def on_message(client, userdata, message):
        with received:
            state["count"] += 1
            state["last"] = time.perf_counter()
            state["first"] = state["first"] or state["last"]
            received.notify_all()

    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="bench-paho")
    client.on_message = on_message
    client.connect("127.0.0.1", port)
    client.loop_start()
    subscribed = threading.Event()
    client.on_subscribe = lambda *args: subscribed.set()
    client.subscribe("bench/paho/rt")
    subscribed.wait(5)
    payload = b"x" * PAYLOAD
    start = time.perf_counter()
    for _ in range(counts["ROUND_TRIPS"]):
        with received:
            target = state["count"] + 1
            client.publish("bench/paho/rt", payload)
            while state["count"] < target:
                received.wait(5)
    qos0 = counts["ROUND_TRIPS"] / (time.perf_counter() - start)
    start = time.perf_counter()
    for _ in range(counts["QOS1"]):
        client.publish("bench/paho/q1", payload, qos=1).wait_for_publish(5)
    qos1 = counts["QOS1"] / (time.perf_counter() - start)

    subscribed.clear()
    client.subscribe("bench/flood")
    subscribed.wait(5)
    with received:
        state.update(count=0, first=None, last=None)
    publisher = threading.Thread(target=flood_publisher(port, counts["FLOOD"]))
    publisher.start()
    publisher.join()
    with received:
        while state["count"] < counts["FLOOD"]:
            if not received.wait(2):
                break
        flood = state["count"]
        span = (state["last"] or 0) - (state["first"] or 0)
    client.loop_stop()
    client.disconnect()
    return {"qos0_rate": qos0, "qos1_rate": qos1, "flood_received": flood, "flood_rate": flood / max(1e-6, span)}


# ---------------------------------------------------------------------------
# The table

ROWS = [
    ("heap_import", "heap after import (B)", "smaller"),
    ("heap_connected", "heap after import + Client + connect + subscribe (B)", "smaller"),
    ("churn_qos0", "heap allocated per QoS 0 round trip (B)", "smaller"),
    ("churn_qos1", "heap allocated per QoS 1 publish (B)", "smaller"),
    ("qos0_rate", "QoS 0 round trips per second", "larger"),
    ("qos1_rate", "QoS 1 publishes per second", "larger"),
    ("flood_rate", "flood: messages delivered per second", "larger"),
    ("flood_lost", "flood: messages lost", "smaller"),
    ("soak_growth", "soak: heap growth after the round trips (B)", "smaller"),
]
PEERS = ["umqtt", "paho", "raw"]


def cell(value):
    if value is None:
        return "-"
    return f"{value:,.0f}" if abs(value) >= 10 else f"{value:,.1f}"


def print_table(results, counts):
    print(f"\nmqtt benchmark: {counts['ROUND_TRIPS']:,} round trips, {counts['QOS1']:,} QoS 1 publishes, "
          f"{counts['FLOOD']:,} flood messages, {counts['SOAK']:,} soak round trips, {PAYLOAD} B payloads\n")
    header = ["figure", "mqtt"] + PEERS + [f"mqtt/{peer}" for peer in PEERS]
    lines = [header]
    for key, label, _ in ROWS:
        ours = results["mqtt"].get(key)
        row = [label, cell(ours)]
        for peer in PEERS:
            row.append(cell(results.get(peer, {}).get(key)))
        for peer in PEERS:
            theirs = results.get(peer, {}).get(key)
            row.append(f"{ours / theirs:.2f}" if ours is not None and theirs else "-")
        lines.append(row)
    print_rows(lines)


def print_rows(lines):
    """A Markdown table: the first line is the header; figures align right."""
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    for index, line in enumerate(lines):
        print("| " + " | ".join(text.ljust(widths[i]) if i == 0 else text.rjust(widths[i]) for i, text in enumerate(line)) + " |")
        if index == 0:
            print("|" + "|".join("-" * (width + 2) for width in widths) + "|")


def waiting_figures(firmware, port, count):
    """QoS 0 round trips and QoS 1 publishes per second, and the CPU time of
    each (the process's, less that of a run without them)."""

    def run(round_trips, qos1):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        counts = {"PORT": port, "ROUND_TRIPS": round_trips, "QOS1": qos1, "PAYLOAD": PAYLOAD}
        figures = run_micropython(firmware, WAITING_SCRIPT, counts, lambda: None)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        return figures, after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime

    _, idle = run(0, 0)
    round_trips, round_trips_cpu = run(count, 0)
    publishes, publishes_cpu = run(0, count)
    return [
        round_trips["waiting_rate"],
        (round_trips_cpu - idle) / count * 1e6,
        publishes["waiting_qos1_rate"],
        (publishes_cpu - idle) / count * 1e6,
    ]


def print_waiting_table(default, esp32, count):
    print(f"\nthe esp32 path: {count:,} QoS 0 round trips, then {count:,} QoS 1 publishes, from a thread"
          " that blocks on a lock while it waits\n")
    labels = ["QoS 0 round trips per second", "CPU time per QoS 0 round trip (us)",
              "QoS 1 publishes per second", "CPU time per QoS 1 publish (us)"]
    lines = [["figure", "unix (no interpreter lock, POSIX poll)", "esp32 path (interpreter lock, no POSIX poll)"]]
    lines += [[label, cell(ours), cell(theirs)] for label, ours, theirs in zip(labels, default, esp32)]
    print_rows(lines)


def heap_figures(firmwares, port):
    """heap_connected of each firmware (name: (path, whether its sockets are
    lwIP's)), for MQTT 3.1.1 and MQTT 5 (keyed (name, protocol)), against
    the broker on `port`; an lwIP firmware's against a broker inside a
    namespace of its own (root only: else "-")."""
    figures = {}
    counts = {"PORT": port, "PAYLOAD": PAYLOAD}
    for name, (firmware, lwip) in firmwares.items():
        for protocol in (4, 5):
            # The protocol is written into the script: a global of its own
            # would change the script's globals, and so the heap measured.
            script = CONNECTED_HEAP_SCRIPT.replace("protocol=4", f"protocol={protocol}")
            if not lwip:
                result = run_micropython(firmware, script, counts, lambda: None)
                figures[name, protocol] = result["heap_connected"]
            elif os.geteuid() == 0:
                with tempfile.TemporaryDirectory() as directory:
                    network = LwipNetwork(directory)
                    try:
                        lwip_port = free_port()
                        network.start_broker(lwip_port)
                        figures[name, protocol] = run_micropython(
                            firmware, script, dict(counts, PORT=lwip_port), lambda: None, network
                        )["heap_connected"]
                    finally:
                        network.close()
    return figures


def print_heap_table(figures, firmwares):
    print("\nheap after import + Client() + connect() + subscribe(), per firmware (B)\n")
    lines = [["firmware", "MQTT 3.1.1", "MQTT 5"]]
    lines += [[name, cell(figures.get((name, 4))), cell(figures.get((name, 5)))] for name in firmwares]
    print_rows(lines)


ASYNC_ROWS = [
    ("heap_import", "heap after import (B)"),
    ("heap_connected", "heap after import + connect + subscribe, awaited (B)"),
    ("churn_qos0", "heap allocated per QoS 0 round trip (B)"),
    ("qos0_rate", "QoS 0 round trips per second"),
    ("lateness", "worst lateness of a 10 ms task meanwhile (ms)"),
]


def print_async_table(results, round_trips):
    print(f"\nasyncio: {round_trips:,} QoS 0 round trips awaited, {PAYLOAD} B payloads, a task waking every 10 ms beside\n")
    names = list(results)
    lines = [["figure"] + names + (["mqtt/mqtt_as"] if "mqtt_as" in results else [])]
    for key, label in ASYNC_ROWS:
        row = [label] + [cell(results[name].get(key)) for name in names]
        if "mqtt_as" in results:
            ours, theirs = results[names[0]].get(key), results["mqtt_as"].get(key)
            row.append(f"{ours / theirs:.2f}" if ours is not None and theirs else "-")
        lines.append(row)
    print_rows(lines)


def newest_micropython():
    """The newest MicroPython source tree Debian has (unstable's), as
    tests/run builds it, and its version."""
    script = 'work="$PWD/.build" && source ports/debian.sh && tree=$(micropython_source sid) && echo "$tree" && micropython_version "$tree"'
    output = subprocess.run(["bash", "-c", script], cwd=REPO, check=True, stdout=subprocess.PIPE, text=True)
    tree, version = output.stdout.strip().splitlines()[-2:]
    return tree, version


def build(freeze=None, esp32_path=False, lwip=False, tree=None, threads=True):
    """Builds a unix firmware; `freeze` is (folder, package) to freeze in."""
    environment = dict(os.environ)
    if freeze:
        environment["MQTT_FREEZE_PACKAGE"] = f"{freeze[0]}:{freeze[1]}"
    if not threads:
        environment["MQTT_THREAD"] = "0"
    if esp32_path:
        environment["MQTT_ESP32_PATH"] = "1"
    if lwip:
        environment["MQTT_LWIP"] = "1"
    output = subprocess.run(
        [str(REPO / "ports" / "unix" / "build.sh")] + ([tree] if tree else []),
        env=environment,
        check=True,
        stdout=subprocess.PIPE,
        text=True,
    )
    return Path(output.stdout.strip().splitlines()[-1])


def mqtt_as_package(checkout):
    """A folder holding only mqtt_as's client (its __init__.py and the MQTT 5
    properties it may import), to freeze: the checkout's tests and demos
    are not needed."""
    if not (Path(checkout) / "mqtt_as" / "__init__.py").exists():
        raise SystemExit(f"--mqtt-as: no mqtt_as/__init__.py in {checkout}")
    folder = Path(tempfile.mkdtemp(prefix="mqtt_as-"))
    (folder / "mqtt_as").mkdir()
    for name in ("__init__.py", "mqtt_v5_properties.py"):
        source = Path(checkout) / "mqtt_as" / name
        if source.exists():
            (folder / "mqtt_as" / name).write_text(source.read_text())
    return folder


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--umqtt", metavar="DIR", help="micropython-lib's micropython/umqtt.simple folder")
    parser.add_argument("--mqtt-as", metavar="DIR", help="a checkout of micropython-mqtt (holding mqtt_as/)")
    parser.add_argument("--quick", action="store_true", help="small counts, to check the script runs")
    options = parser.parse_args()
    if options.quick:
        counts = {"ROUND_TRIPS": 200, "QOS1": 200, "FLOOD": 2000, "SOAK": 1000, "PAYLOAD": PAYLOAD}
    else:
        counts = {"ROUND_TRIPS": 20000, "QOS1": 10000, "FLOOD": 100000, "SOAK": 1000000, "PAYLOAD": PAYLOAD}

    firmware = build()
    esp32_firmware = build(esp32_path=True)
    newest, newest_version = newest_micropython()
    firmwares = {
        "unix (MicroPython 1.25, POSIX sockets, loop thread)": (firmware, False),
        "esp32 path (interpreter lock, no POSIX poll)": (esp32_firmware, False),
        f"unix, MicroPython {newest_version} (Debian unstable)": (build(tree=newest), False),
        "lwIP sockets (modlwip.c over lwIP 2.2.1, scheduled loop)": (build(lwip=True), True),
    }
    umqtt_firmware = build((options.umqtt, "umqtt")) if options.umqtt else None
    async_firmwares = {"mqtt (asyncio)": firmware, "mqtt (asyncio, no threads)": build(threads=False)}
    if options.mqtt_as:
        package = mqtt_as_package(options.mqtt_as)
        async_firmwares["mqtt_as"] = build((package, "mqtt_as"))
        shutil.rmtree(package)
    async_round_trips = min(counts["ROUND_TRIPS"], 2000)
    waiting = 200 if options.quick else 5000
    results = {}
    with tempfile.TemporaryDirectory() as directory:
        broker = Broker(directory)
        try:
            port = broker.port
            results["mqtt"] = run_micropython(
                firmware, MQTT_SCRIPT, dict(counts, PORT=port), flood_publisher(port, counts["FLOOD"])
            )
            if umqtt_firmware:
                # umqtt waits about 45 ms for a delayed ACK on each round trip.
                slow = dict(counts, PORT=port, ROUND_TRIPS=min(counts["ROUND_TRIPS"], 200), QOS1=min(counts["QOS1"], 200))
                results["umqtt"] = run_micropython(umqtt_firmware, UMQTT_SCRIPT, slow, flood_publisher(port, counts["FLOOD"]))
            results["paho"] = paho_peer(port, counts)
            results["raw"] = raw_socket_peer(port, counts)
            results["raw"].update(raw_socket_flood(port, counts))
            waits = [waiting_figures(build_firmware, port, waiting) for build_firmware in (firmware, esp32_firmware)]
            heaps = heap_figures(firmwares, port)
            async_counts = {"PORT": port, "ROUND_TRIPS": async_round_trips, "PAYLOAD": PAYLOAD}
            async_results = {
                name: run_micropython(
                    path, MQTT_AS_SCRIPT if name == "mqtt_as" else ASYNC_MQTT_SCRIPT, async_counts, lambda: None
                )
                for name, path in async_firmwares.items()
            }
        finally:
            broker.stop()
    for figures in results.values():
        if "flood_received" in figures:
            figures["flood_lost"] = counts["FLOOD"] - figures["flood_received"]
    print_table(results, counts)
    print_waiting_table(*waits, waiting)
    print_heap_table(heaps, firmwares)
    print_async_table(async_results, async_round_trips)


if __name__ == "__main__":
    main()
