"""Built-in reconnection (connect(auto_reconnect=...)): outages the client
survives without application code, and the backoff between its attempts.
The outages are real: the tests' proxy swallows or closes the links, or
the broker is stopped."""

import math
import random
import threading
import time

import pytest

from conftest import LOOP, expect_line
from peer import Peer
from proxy import Proxy

pytestmark = [pytest.mark.long, pytest.mark.longest]

# Allowed lateness of an attempt beyond its drawn wait: the scheduled
# loop's timer and the thread's sleeps add a few milliseconds.
SCHEDULING_MARGIN_MS = 150


class Lines:
    """Reads a script's lines on a thread of its own, each with the time it
    arrived (time.monotonic())."""

    def __init__(self, process):
        self.process = process
        self.lines = []
        self.changed = threading.Condition()
        threading.Thread(target=self._read, args=(process,), daemon=True).start()

    def _read(self, process):
        for line in process.stdout:
            with self.changed:
                self.lines.append((time.monotonic(), line.strip()))
                self.changed.notify_all()

    def wait_for(self, text, after=0, timeout=30):
        """The time of the first line equal to `text` (or starting with it
        and a space) that arrived after `after`; fails after `timeout` s."""
        deadline = time.monotonic() + timeout
        with self.changed:
            while True:
                for at, line in self.lines:
                    if at > after and (line == text or line.startswith(text + " ")):
                        return at, line
                left = deadline - time.monotonic()
                if left <= 0:
                    ended = self.process.poll()
                    state = "running" if ended is None else f"ended with {ended}"
                    raise AssertionError(
                        f"no {text!r} within {timeout} s (the script is {state}); it printed:\n" + self.text()
                    )
                self.changed.wait(left)

    def text(self):
        return "\n".join(line for _, line in self.lines)


BROKER_DOWN_SCRIPT = """
import gc
from array import array
attempts = array('I', [0] * 64)
count = [0, 0]
def before(client):
    if count[0] < len(attempts):
        attempts[count[0]] = time.ticks_ms()
    count[0] += 1
def after(client):
    count[1] += 1
client = mqtt.Client('backoff', command_timeout=3000)
client.connect(HOST, 30, port=PORT, breconnect_cb=before, aconnect_cb=after,
               auto_reconnect=(MIN_MS, MAX_MS))
gc.collect()
before_heap = gc.mem_alloc()
print('ready')
wait_until(lambda: not client.connected(), 10000)
print('down', client.connected())
wait_until(lambda: count[1] == 2, 120000)
gc.collect()
print('back', count[0], count[1], before_heap, gc.mem_alloc())
for i in range(min(count[0], len(attempts))):
    print('attempt', attempts[i])
client.disconnect()
"""


def test_broker_down_for_30_s_attempts_back_off(broker, micropython):
    """auto_reconnect=(250, 4000), the broker stopped for 30 s: each gap
    between attempts lies in its [cap/2, cap] range, the number of attempts
    stays within log2(max/min) + 2 * 30 s / max + 2, the client comes back
    with its heap where it was."""
    min_ms, max_ms = 250, 4000
    process = micropython.start(BROKER_DOWN_SCRIPT, PORT=broker.port, MIN_MS=min_ms, MAX_MS=max_ms)
    expect_line(process, "ready")
    broker.terminate()
    expect_line(process, "down False")
    time.sleep(30)
    broker.start()
    output, _ = process.communicate(timeout=60)
    lines = output.split("\n")
    back = [line for line in lines if line.startswith("back ")]
    assert back, output
    _, attempts, connects, heap_before, heap_after = back[0].split()
    times = [int(line.split()[1]) for line in lines if line.startswith("attempt ")]
    assert int(connects) == 2, output
    assert len(times) == int(attempts)
    bound = math.log2(max_ms / min_ms) + 2 * 30_000 / max_ms + 2
    assert len(times) <= bound, f"{len(times)} attempts, more than {bound}:\n{output}"
    # The attempts ran while the broker was down, and the last one found it.
    assert len(times) >= 10, output
    for k in range(1, len(times)):
        cap = min(max_ms, min_ms * 2**k)
        gap = times[k] - times[k - 1]
        assert cap // 2 <= gap <= cap + SCHEDULING_MARGIN_MS, f"attempt {k}: gap {gap} ms outside [{cap // 2}, {cap}]"
    # Heap flat: what reconnecting 15 times left behind.
    assert int(heap_after) - int(heap_before) < 1024, output


OUTAGES_SCRIPT = """
import gc, os
received = bytearray(8192)
state = {'connects': 0, 'fresh': False, 'fast': 0, 'slow': 0}
def on_message(client, payload, topic):
    received[int(payload)] = 1
    if state['fresh']:
        state['fresh'] = False
        print('delivered', state['connects'])
def after(client):
    state['connects'] += 1
    state['fresh'] = True
    print('connected', state['connects'])
def published_count():
    try:
        with open(DONE) as done:
            return int(done.read())
    except (OSError, ValueError):
        return None
client = mqtt.Client('outages', clean_session=False, command_timeout=2000)
client.connect(HOST, 1, port=PORT, aconnect_cb=after, auto_reconnect=(250, 2000))
client.subscribe('outages/#', on_message, 1)
gc.collect()
heap_before = gc.mem_alloc()
print('ready')
count = None
while count is None:
    time.sleep_ms(100)
    count = published_count()
    # A QoS 0 publish while the link is down fails at once.
    if not client.connected():
        start = time.ticks_ms()
        try:
            client.publish('outages/probe', 'x')
        except OSError as error:
            took = time.ticks_diff(time.ticks_ms(), start)
            state['fast' if took < 100 and error.errno == 107 else 'slow'] += 1
wait_until(lambda: sum(received[:count]) == count, 20000)
gc.collect()
missing = [n for n in range(count) if not received[n]]
print('report', state['connects'], len(missing), state['fast'], state['slow'], heap_before, gc.mem_alloc())
print('missing', missing[:20])
client.disconnect()
"""


def test_twenty_outages_without_application_code(broker, micropython, tmp_path):
    """20 outages of 2-10 s, half a silent blackhole, half closed links,
    keepalive 1 s: the client comes back after each by itself (aconnect_cb
    runs 21 times), with its subscription, and a QoS 1 publisher that
    publishes throughout loses nothing to its persistent session; QoS 0
    publishes while down fail at once with ENOTCONN."""
    proxy = Proxy(broker.port)
    peer = Peer(broker.port, client_id="outages-publisher")
    count = [0]
    publishing = threading.Event()
    publishing.set()

    def publish():
        while publishing.is_set():
            peer.publish("outages/seq", str(count[0]), qos=1)
            count[0] += 1
            time.sleep(0.05)

    try:
        done = tmp_path / "published"
        process = micropython.start(OUTAGES_SCRIPT, PORT=proxy.port, DONE=str(done))
        lines = Lines(process)
        lines.wait_for("ready")
        publisher = threading.Thread(target=publish, daemon=True)
        publisher.start()
        chooser = random.Random(20)
        recoveries = []
        for outage in range(20):
            time.sleep(0.5)
            blackhole = outage % 2 == 0
            if blackhole:
                proxy.swallow()
            else:
                proxy.refuse()
            time.sleep(chooser.uniform(2, 10))
            if blackhole:
                proxy.cut()
            proxy.forward()
            ended = time.monotonic()
            at, _ = lines.wait_for(f"delivered {outage + 2}", after=0, timeout=30)
            recoveries.append(at - ended)
        time.sleep(1)
        publishing.clear()
        publisher.join()
        # Everything published reaches the client (its session kept it).
        done.write_text(str(count[0]))
        _, report = lines.wait_for("report", timeout=30)
        process.wait(timeout=30)
    finally:
        publishing.clear()
        peer.close()
        proxy.close()
    _, connects, missing, fast, slow, heap_before, heap_after = report.split()
    output = lines.text()
    assert int(connects) == 21, output
    assert int(missing) == 0, output
    assert int(fast) > 0 and int(slow) == 0, output
    print(f"{LOOP}: longest time from an outage's end to a delivered message: {max(recoveries):.2f} s;"
          f" heap {heap_before} B before, {heap_after} B after")
    assert int(heap_after) - int(heap_before) < 2048, output
