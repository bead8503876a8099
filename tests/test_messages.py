"""Publishing and receiving through a real mosquitto, checked by an
independent paho-mqtt peer."""

import hashlib
import os
import select
import subprocess
import time

import pytest

from broker import HOST, Broker
from conftest import KILLED_KEEPALIVE, expect_line, needs_threads
from peer import Peer

SIZES = [0, 1, 64, 10 * 1024, 200 * 1024]


def pattern(size, seed):
    """Deterministic payload bytes, built the same way in MicroPython."""
    return bytes((i * 7 + seed) % 251 for i in range(size))


# Indented like the scripts it is prepended to, which are dedented as a whole.
PATTERN_MP = """
        def pattern(size, seed):
            return bytes((i * 7 + seed) % 251 for i in range(size))
"""


@pytest.mark.parametrize("qos", [0, 1, 2])
def test_firmware_publishes_every_size_as_str_and_bytes(broker, micropython, qos):
    peer = Peer(broker.port)
    peer.subscribe("out/#", qos=2)
    output = micropython.run(
        PATTERN_MP
        + """
        c = mqtt.Client("publisher")
        c.connect(HOST, 30, port=PORT)
        for size in SIZES:
            c.publish("out/bytes/%d" % size, pattern(size, QOS), qos=QOS)
            c.publish("out/str/%d" % size, "s" * size, qos=QOS)
        print("published")
        c.disconnect()
        """,
        PORT=broker.port,
        QOS=qos,
        SIZES=SIZES,
    )
    assert "published" in output
    messages = peer.wait_for(2 * len(SIZES), timeout=20)
    received = {m.topic: m.payload for m in messages}
    for size in SIZES:
        assert received[f"out/bytes/{size}"] == pattern(size, qos)
        assert received[f"out/str/{size}"] == b"s" * size
    assert {m.qos for m in messages} == {qos}
    peer.close()


@pytest.mark.parametrize("qos", [0, 1, 2])
def test_firmware_receives_every_size(broker, micropython, qos):
    process = micropython.start(
        """
        import hashlib, binascii
        got = []
        def on_message(client, payload, topic):
            got.append((topic, len(payload), binascii.hexlify(hashlib.sha256(payload).digest()).decode(), type(payload).__name__, type(topic).__name__))
        c = mqtt.Client("receiver")
        c.connect(HOST, 30, port=PORT)
        c.subscribe("in/#", on_message, qos=2)
        print("ready")
        wait_until(lambda: len(got) == COUNT, 20000)
        for entry in sorted(got):
            print(entry)
        c.disconnect()
        """,
        PORT=broker.port,
        COUNT=len(SIZES),
    )
    expect_line(process, "ready")
    peer = Peer(broker.port)
    for size in SIZES:
        peer.publish(f"in/{size}", pattern(size, 3), qos=qos)
    output, _ = process.communicate(timeout=30)
    assert process.returncode == 0, output
    for size in SIZES:
        digest = hashlib.sha256(pattern(size, 3)).hexdigest()
        assert f"('in/{size}', {size}, '{digest}', 'bytes', 'str')" in output
    peer.close()


def test_round_trip_at_every_qos_to_own_subscription(broker, micropython):
    output = micropython.run(
        PATTERN_MP
        + """
        got = []
        c = mqtt.Client("self")
        c.connect(HOST, 30, port=PORT)
        c.subscribe("loop/+", lambda client, payload, topic: got.append((topic, payload)), qos=2)
        expected = []
        for qos in (0, 1, 2):
            for size in SIZES:
                payload = pattern(size, qos)
                c.publish("loop/%d" % qos, payload, qos=qos)
                expected.append(("loop/%d" % qos, payload))
        print(wait_until(lambda: len(got) == len(expected), 20000))
        print(sorted(got) == sorted(expected))
        c.disconnect()
        """,
        PORT=broker.port,
        SIZES=SIZES,
    )
    assert output.split() == ["True", "True"], output


def test_connect_disconnect_and_state(broker, micropython):
    output = micropython.run(
        """
        c = mqtt.Client("states")
        print(c.connected(), c.get_return_code())
        c.connect(HOST, 30, port=PORT)
        print(c.connected(), c.get_return_code())
        c.disconnect()
        print(c.connected())
        c.disconnect()
        print(c.connected())
        c.connect(HOST, 30, port=PORT)
        print(c.connected())
        c.disconnect(1000)
        print(c.connected())
        """,
        PORT=broker.port,
    )
    assert output.split() == ["False", "-1", "True", "0", "False", "False", "True", "False"]


def test_retained_message(broker, micropython):
    peer = Peer(broker.port)
    peer.publish("state/lamp", b"on", qos=1, retain=True)
    output = micropython.run(
        """
        got = []
        c = mqtt.Client("retain")
        c.connect(HOST, 30, port=PORT)
        c.subscribe("state/#", lambda client, payload, topic: got.append((topic, payload)))
        print(wait_until(lambda: got), got)
        c.publish("state/door", "open", qos=1, retain=True)
        c.disconnect()
        """,
        PORT=broker.port,
    )
    assert "True [('state/lamp', b'on')]" in output
    late = Peer(broker.port, client_id="late")
    late.subscribe("state/door")
    messages = late.wait_for(1)
    assert [(m.topic, m.payload, m.retain) for m in messages] == [("state/door", b"open", True)]
    late.close()
    peer.close()


def test_wildcards_and_dollar_topics(broker, micropython):
    output = micropython.run(
        """
        got = []
        def recorder(name):
            return lambda client, payload, topic: got.append((name, topic))
        c = mqtt.Client("wild")
        c.connect(HOST, 30, port=PORT)
        c.subscribe("sport/+/player1", recorder("plus"))
        c.subscribe("sport/#", recorder("hash"))
        c.subscribe("#", recorder("all"))
        c.publish("sport/tennis/player1", "a")
        c.publish("sport", "b")
        c.publish("other/x", "c")
        wait_until(lambda: len(got) >= 6)
        time.sleep_ms(200)
        for entry in sorted(got):
            print(entry)
        c.disconnect()
        """,
        PORT=broker.port,
    )
    lines = output.strip().splitlines()
    assert lines == [
        "('all', 'other/x')",
        "('all', 'sport')",
        "('all', 'sport/tennis/player1')",
        "('hash', 'sport')",
        "('hash', 'sport/tennis/player1')",
        "('plus', 'sport/tennis/player1')",
    ]
    # "#" must not match $SYS topics, which mosquitto publishes to subscribers.
    assert "$SYS" not in output


def test_overlapping_subscriptions_deliver_once_per_subscription(broker, micropython):
    output = micropython.run(
        """
        calls = []
        def first(client, payload, topic):
            calls.append("first")
        def shared(client, payload, topic):
            calls.append("shared")
        c = mqtt.Client("overlap")
        c.connect(HOST, 30, port=PORT)
        print(c.subscribe("a/#", first, qos=1), c.subscribe("a/b", shared), c.subscribe("+/b", shared, qos=2))
        c.publish("a/b", "x", qos=1)
        wait_until(lambda: len(calls) >= 3)
        time.sleep_ms(300)
        print(sorted(calls))
        # Subscribing again to a filter replaces its callback.
        calls.clear()
        print(c.subscribe("a/#", shared))
        c.publish("a/c", "y", qos=1)
        wait_until(lambda: calls)
        time.sleep_ms(300)
        print(calls)
        c.disconnect()
        """,
        PORT=broker.port,
    )
    # The granted QoS follows each subscription, and a second subscription
    # to a filter replaces both its callback and its QoS.
    assert output.strip().splitlines() == ["1 0 2", "['first', 'shared', 'shared']", "0", "['shared']"]


def test_unsubscribe_stops_the_callback(broker, micropython):
    output = micropython.run(
        """
        got = []
        c = mqtt.Client("unsub")
        c.connect(HOST, 30, port=PORT)
        c.subscribe("u/1", lambda client, payload, topic: got.append(payload))
        c.publish("u/1", "before", qos=1)
        wait_until(lambda: got)
        c.unsubscribe("u/1")
        for i in range(20):
            c.publish("u/1", "after", qos=1)
        time.sleep_ms(300)
        print(got)
        c.disconnect()
        """,
        PORT=broker.port,
    )
    assert output.strip() == "[b'before']"


def test_will_is_published_on_abrupt_close_only(broker, micropython):
    peer = Peer(broker.port)
    peer.subscribe("wills/#", qos=1)
    clean = micropython.run(
        """
        c = mqtt.Client("clean-leaver")
        c.set_will("wills/clean", "gone", qos=1)
        c.connect(HOST, 30, port=PORT)
        c.disconnect()
        print("done")
        """,
        PORT=broker.port,
    )
    assert "done" in clean
    abrupt = micropython.start(
        """
        c = mqtt.Client("abrupt-leaver")
        c.set_will("wills/abrupt", b"lost", qos=1, retain=False)
        c.connect(HOST, KEEPALIVE, port=PORT)
        print("connected")
        time.sleep(30)
        """,
        PORT=broker.port,
        KEEPALIVE=KILLED_KEEPALIVE,
    )
    expect_line(abrupt, "connected")
    abrupt.kill()
    abrupt.communicate()
    messages = peer.wait_for(1)
    time.sleep(0.5)
    assert [(m.topic, m.payload) for m in peer.messages] == [("wills/abrupt", b"lost")]
    peer.close()


def test_publish_from_inside_a_callback(broker, micropython):
    peer = Peer(broker.port)
    peer.subscribe("reply/#", qos=2)
    output = micropython.run(
        """
        seen = []
        def echo(client, payload, topic):
            qos = int(topic[-1])
            client.publish("reply/%d" % qos, payload + b"!", qos=qos)
            seen.append(qos)
        c = mqtt.Client("echo")
        c.connect(HOST, 30, port=PORT)
        c.subscribe("ask/#", echo, qos=2)
        for qos in (0, 1, 2):
            c.publish("ask/%d" % qos, "q%d" % qos, qos=qos)
        print(wait_until(lambda: len(seen) == 3))
        time.sleep_ms(300)
        c.disconnect()
        """,
        PORT=broker.port,
    )
    assert "True" in output
    messages = peer.wait_for(3)
    assert sorted((m.topic, m.payload, m.qos) for m in messages) == [
        ("reply/0", b"q0!", 0),
        ("reply/1", b"q1!", 1),
        ("reply/2", b"q2!", 2),
    ]
    peer.close()


@pytest.fixture
def unqueued_broker(tmp_path):
    """A broker that queues any number of messages for a client: mosquitto
    drops what exceeds its 1000 per client (after the 20 in flight) while
    the client is slow to read."""
    server = Broker(tmp_path, settings="allow_anonymous true\nmax_queued_messages 0\n")
    yield server
    server.stop()


def test_publishing_from_main_thread_while_messages_stream_in(unqueued_broker, micropython):
    # The 2000 arrive at once, while the script publishes (and the lwIP
    # firmware reads more slowly meanwhile than the unix one).
    broker = unqueued_broker
    count = 2000
    # The peer listens before the script starts publishing.
    peer = Peer(broker.port)
    peer.subscribe("back", qos=2)
    process = micropython.start(
        """
        got = []
        c = mqtt.Client("busy")
        c.connect(HOST, 30, port=PORT)
        c.subscribe("stream", lambda client, payload, topic: got.append(int(payload)), qos=1)
        print("ready")
        sent = 0
        while len(got) < COUNT and sent < 300:
            c.publish("back", str(sent), qos=sent % 3)
            sent += 1
        wait_until(lambda: len(got) >= COUNT, 20000)
        print("sent", sent)
        print("received", len(got), sorted(got) == list(range(COUNT)))
        c.disconnect()
        """,
        PORT=broker.port,
        COUNT=count,
    )
    expect_line(process, "ready")
    for i in range(count):
        peer.client.publish("stream", str(i), qos=1)
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 0, output
    assert f"received {count} True" in output
    sent = int(output.split("sent ")[1].split()[0])
    back = peer.wait_for(sent)
    assert sorted(int(m.payload) for m in back) == list(range(sent))
    peer.close()


def test_cooperative_cycle_without_a_thread(broker, micropython):
    peer = Peer(broker.port)
    peer.subscribe("coop/out", qos=1)
    process = micropython.start(
        """
        got = []
        c = mqtt.Client("coop")
        c.connect(HOST, 30, port=PORT, start_loop=False)
        c.subscribe("coop/in", lambda client, payload, topic: got.append(payload), qos=1)
        print("ready")
        start = time.ticks_ms()
        while len(got) < 3 and time.ticks_diff(time.ticks_ms(), start) < 10000:
            c.cycle()
        c.publish("coop/out", b"%d" % len(got), qos=1)
        print(got)
        c.disconnect()
        """,
        PORT=broker.port,
    )
    expect_line(process, "ready")
    for i in range(3):
        peer.publish("coop/in", f"m{i}", qos=1)
    output, _ = process.communicate(timeout=30)
    assert process.returncode == 0, output
    assert "[b'm0', b'm1', b'm2']" in output
    assert [m.payload for m in peer.wait_for(1)] == [b"3"]
    peer.close()


def test_cycle_from_an_asyncio_task(broker, micropython):
    output = micropython.run(
        """
        import asyncio
        got = []
        c = mqtt.Client("aio", cycle_timeout=0)
        c.connect(HOST, 30, port=PORT, start_loop=False)
        c.subscribe("aio/#", lambda client, payload, topic: got.append(payload))

        async def pump():
            while len(got) < 5:
                c.cycle()
                await asyncio.sleep_ms(5)

        async def main():
            task = asyncio.create_task(pump())
            for i in range(5):
                c.publish("aio/x", b"%d" % i)
                await asyncio.sleep_ms(1)
            await asyncio.wait_for(task, 10)

        asyncio.run(main())
        print(got)
        c.disconnect()
        """,
        PORT=broker.port,
    )
    assert "[b'0', b'1', b'2', b'3', b'4']" in output


def test_loop_can_be_restarted_and_is_a_noop_while_running(broker, micropython):
    output = micropython.run(
        """
        got = []
        c = mqtt.Client("restart")
        c.connect(HOST, 30, port=PORT)
        c.loop()
        c.subscribe("r", lambda client, payload, topic: got.append(payload))
        try:
            c.cycle()
        except OSError as e:
            print("cycle while looping", e.errno == 16)
        c.disconnect(2000)
        c.connect(HOST, 30, port=PORT, start_loop=False)
        c.subscribe("r", lambda client, payload, topic: got.append(payload))
        c.loop()
        c.publish("r", "again", qos=1)
        print(wait_until(lambda: got), got)
        c.disconnect(2000)
        """,
        PORT=broker.port,
    )
    assert "cycle while looping True" in output
    assert "True [b'again']" in output


def test_callback_exception_is_printed_and_loop_goes_on(broker, micropython):
    output = micropython.run(
        """
        got = []
        def faulty(client, payload, topic):
            if payload == b"boom":
                raise ValueError("callback bug")
            got.append(payload)
        c = mqtt.Client("faulty")
        c.connect(HOST, 30, port=PORT)
        c.subscribe("f", faulty)
        c.publish("f", "boom")
        c.publish("f", "fine")
        print(wait_until(lambda: got), got, c.connected())
        c.disconnect()
        """,
        PORT=broker.port,
    )
    assert "ValueError: callback bug" in output
    assert "True [b'fine'] True" in output


def test_qos2_messages_arrive_exactly_once(broker, micropython):
    count = 200
    process = micropython.start(
        """
        got = []
        c = mqtt.Client("exact")
        c.connect(HOST, 30, port=PORT)
        c.subscribe("once", lambda client, payload, topic: got.append(int(payload)), qos=2)
        print("ready")
        wait_until(lambda: len(got) >= COUNT, 20000)
        time.sleep_ms(500)
        print(len(got), sorted(got) == list(range(COUNT)))
        c.disconnect()
        """,
        PORT=broker.port,
        COUNT=count,
    )
    expect_line(process, "ready")
    peer = Peer(broker.port)
    for i in range(count):
        peer.client.publish("once", str(i), qos=2)
    output, _ = process.communicate(timeout=40)
    assert f"{count} True" in output, output
    peer.close()


def output_until(process, text, timeout=10):
    """Reads a process's output (a binary pipe) until `text` appears;
    returns what was read."""
    deadline = time.monotonic() + timeout
    seen = b""
    source = process.stdout.fileno()
    while text not in seen:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([source], [], [], left)[0]:
            raise AssertionError(f"no {text!r} within {timeout} s; output: {seen!r}")
        chunk = os.read(source, 4096)
        if not chunk:
            raise AssertionError(f"the process ended before {text!r}; output: {seen!r}")
        seen += chunk
    return seen


def test_mosquitto_sub_sees_what_the_firmware_publishes(broker, micropython):
    # With -d, mosquitto_sub reports its SUBACK (line-buffered by stdbuf):
    # the firmware publishes only once the subscription is in place.
    listener = subprocess.Popen(
        ["stdbuf", "-oL", "mosquitto_sub", "-d", "-h", HOST, "-p", str(broker.port),
         "-t", "cli/#", "-C", "3", "-v", "-q", "1"],
        stdout=subprocess.PIPE,
    )
    try:
        early = output_until(listener, b"received SUBACK")
        micropython.run(
            """
            c = mqtt.Client("to-cli")
            c.connect(HOST, 30, port=PORT)
            for qos in (0, 1, 2):
                c.publish("cli/%d" % qos, "value %d" % qos, qos=qos)
            c.disconnect()
            """,
            PORT=broker.port,
        )
        rest, _ = listener.communicate(timeout=10)
    finally:
        if listener.poll() is None:
            listener.kill()
            listener.wait()
    output = (early + rest).decode()
    # Debug lines start with "Client "; the messages with their topic.
    messages = [line for line in output.splitlines() if line.startswith("cli/")]
    assert messages == ["cli/0 value 0", "cli/1 value 1", "cli/2 value 2"], output


def test_objects_survive_garbage_collection_while_messages_flow(broker, micropython):
    """Callbacks, topics and in-flight payloads built at run time stay
    reachable from the client while the GC runs on another thread."""
    output = micropython.run(
        """
        import gc
        got = []

        def make_callback():
            prefix = "p" * 10
            return lambda client, payload, topic: got.append(prefix + payload.decode())

        c = mqtt.Client("gc-" + "stress")
        c.connect(HOST, 30, port=PORT)
        c.subscribe("g/" + "x", make_callback(), qos=1)
        gc.collect()
        for i in range(300):
            c.publish("g/" + "x", ("m%d" % i).encode(), qos=i % 3)
            junk = [bytearray(100) for _ in range(10)]
            if i % 7 == 0:
                gc.collect()
        print(wait_until(lambda: len(got) == 300, 20000))
        print(sorted(got) == sorted("pppppppppp" + "m%d" % i for i in range(300)))
        c.disconnect()
        """,
        PORT=broker.port,
    )
    assert output.split() == ["True", "True"], output


def test_subscribe_and_unsubscribe_from_inside_a_callback(broker, micropython):
    output = micropython.run(
        """
        got = []
        def late(client, payload, topic):
            got.append(("late", payload))
        def control(client, payload, topic):
            if payload == b"subscribe":
                client.subscribe("late", late, qos=1)
            elif payload == b"unsubscribe":
                client.unsubscribe("late")
            got.append(("control", payload))
        c = mqtt.Client("nested")
        c.connect(HOST, 30, port=PORT)
        c.subscribe("control", control, qos=1)
        c.publish("control", "subscribe", qos=1)
        wait_until(lambda: len(got) == 1)
        time.sleep_ms(200)
        c.publish("late", "one", qos=1)
        wait_until(lambda: len(got) == 2)
        c.publish("control", "unsubscribe", qos=1)
        wait_until(lambda: len(got) == 3)
        time.sleep_ms(200)
        c.publish("late", "two", qos=1)
        time.sleep_ms(300)
        print(got)
        c.disconnect()
        """,
        PORT=broker.port,
    )
    assert output.strip() == "[('control', b'subscribe'), ('late', b'one'), ('control', b'unsubscribe')]"


@pytest.mark.long
@needs_threads
def test_disconnect_waits_for_the_loop_only_as_long_as_asked(broker, micropython):
    output = micropython.run(
        """
        entered = []
        def slow(client, payload, topic):
            entered.append(1)
            time.sleep_ms(1500)
        c = mqtt.Client("slow")
        c.connect(HOST, 30, port=PORT)
        c.subscribe("slow", slow)
        c.publish("slow", "x")
        wait_until(lambda: entered)
        # The loop is inside the callback for another 1.5 s: disconnect
        # gives up on it after about 300 ms, long before the callback ends.
        start = time.ticks_ms()
        c.disconnect(300)
        waited = time.ticks_diff(time.ticks_ms(), start)
        print(250 <= waited < 1000, c.connected())
        # Without a loop there is nothing to wait for (cycle_timeout is 500 ms).
        c.connect(HOST, 30, port=PORT, start_loop=False)
        start = time.ticks_ms()
        c.disconnect()
        print(time.ticks_diff(time.ticks_ms(), start) < 400, c.connected())
        # Once the callback returns, the old loop ends; loop() starts a new one.
        time.sleep_ms(1500)
        c.connect(HOST, 30, port=PORT)
        c.subscribe("slow", slow)
        c.publish("slow", "y")
        wait_until(lambda: len(entered) == 2)
        # disconnect returns when the callback does (1.5 s), not at its timeout.
        start = time.ticks_ms()
        c.disconnect(3000)
        print(1000 <= time.ticks_diff(time.ticks_ms(), start) < 2700, len(entered))
        """,
        PORT=broker.port,
    )
    assert output.split() == ["True", "False", "True", "False", "True", "2"], output


def test_a_qos0_message_without_memory_is_dropped_reported_and_the_client_goes_on(broker, micropython):
    """The heap is filled until a 100,000-byte payload cannot be allocated:
    that QoS 0 message is dropped with a line on stderr, the link stays
    up, and the next message arrives."""
    process = micropython.start(
        """
        import gc, sys
        got = []
        c = mqtt.Client("squeezed")
        c.connect(HOST, 30, port=PORT)
        c.subscribe("fill/#", lambda client, payload, topic: got.append((topic, len(payload))))
        gc.collect()
        hog = bytearray(gc.mem_free() - 30000)
        print("ready")
        sys.stdin.readline()
        print(wait_until(lambda: got, 10000), got, c.connected())
        c.disconnect()
        """,
        PORT=broker.port,
    )
    expect_line(process, "ready")
    peer = Peer(broker.port)
    peer.publish("fill/big", b"x" * 100_000)
    peer.publish("fill/small", b"after")
    output, _ = process.communicate("go\n", timeout=30)
    peer.close()
    assert "mqtt: message of 100000 bytes on fill/big dropped: out of memory" in output, output
    assert output.strip().splitlines()[-1] == "True [('fill/small', 5)] True", output
