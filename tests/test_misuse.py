"""Calls in the wrong state or at the wrong time: each gives a clear
exception or a documented harmless result, never a crash or a hang."""

from conftest import needs_threads


@needs_threads
def test_two_threads_publish_at_once(broker, micropython):
    output = micropython.run(
        """
        import _thread
        got = []
        done = []
        c = mqtt.Client("twins")
        c.connect(HOST, 30, port=PORT)
        c.subscribe("twins/#", lambda client, payload, topic: got.append(payload), qos=2)
        def worker(name):
            for i in range(200):
                c.publish("twins/" + name, b"%s%d" % (name, i), qos=i % 3)
            done.append(name)
        _thread.start_new_thread(worker, ("a",))
        _thread.start_new_thread(worker, ("b",))
        wait_until(lambda: len(done) == 2, 30000)
        print(wait_until(lambda: len(got) == 400, 20000), len(set(got)))
        c.disconnect()
        """,
        PORT=broker.port,
    )
    assert output.strip() == "True 400", output


def test_callbacks_that_disconnect_or_reconnect(broker, micropython):
    output = micropython.run(
        """
        events = []
        def disconnecting(client, payload, topic):
            events.append("disconnect in callback")
            client.disconnect()
        c = mqtt.Client("impatient")
        c.connect(HOST, 30, port=PORT)
        c.subscribe("bye", disconnecting)
        c.publish("bye", "now")
        wait_until(lambda: events, 5000)
        time.sleep_ms(200)
        print(events, c.connected())

        def reconnecting(client, payload, topic):
            events.append("reconnect returned %d" % client.reconnect())
            client.subscribe("again", reconnecting)
        c.connect(HOST, 30, port=PORT)
        c.subscribe("again", reconnecting)
        c.publish("again", "1")
        wait_until(lambda: len(events) == 2, 5000)
        c.publish("again", "2")
        wait_until(lambda: len(events) == 3, 5000)
        print(events[1:], c.connected())
        c.disconnect()
        """,
        PORT=broker.port,
    )
    assert output.strip().splitlines() == [
        "['disconnect in callback'] False",
        "['reconnect returned 0', 'reconnect returned 0'] True",
    ], output


def test_client_dropped_while_its_loop_runs(broker, micropython):
    output = micropython.run(
        """
        import gc
        got = []
        def start():
            c = mqtt.Client("orphaned")
            c.connect(HOST, 30, port=PORT)
            c.subscribe("orphan", lambda client, payload, topic: got.append(payload))
        start()
        for i in range(5):
            gc.collect()
        # The loop keeps its client alive and still delivers.
        other = mqtt.Client("sender")
        other.connect(HOST, 30, port=PORT, start_loop=False)
        other.publish("orphan", "still here")
        print(wait_until(lambda: got), got)
        other.disconnect()
        """,
        PORT=broker.port,
    )
    assert output.strip() == "True [b'still here']", output


def test_calls_in_the_wrong_state(broker, micropython):
    output = micropython.run(
        """
        import errno
        c = mqtt.Client("confused")
        def attempt(name, call):
            try:
                result = call()
                print(name, "->", result)
            except Exception as e:
                print(name, "->", type(e).__name__, getattr(e, "errno", ""))
        attempt("cycle before connect", c.cycle)
        attempt("loop before connect", c.loop)
        attempt("disconnect before connect", c.disconnect)
        c.connect(HOST, 30, port=PORT)
        attempt("connect while looping", lambda: c.connect(HOST, 30, port=PORT))
        attempt("loop twice", c.loop)
        attempt("disconnect", lambda: c.disconnect(1000))
        attempt("disconnect again", c.disconnect)
        attempt("subscribe after disconnect", lambda: c.subscribe("t", print))
        attempt("reconnect after disconnect", c.reconnect)
        attempt("connected", c.connected)
        c.disconnect(1000)
        """,
        PORT=broker.port,
    )
    assert output.strip().splitlines() == [
        "cycle before connect -> OSError 107",
        "loop before connect -> OSError 107",
        "disconnect before connect -> None",
        "connect while looping -> OSError 16",
        "loop twice -> None",
        "disconnect -> None",
        "disconnect again -> None",
        "subscribe after disconnect -> OSError 107",
        "reconnect after disconnect -> 0",
        "connected -> True",
    ], output


@needs_threads
def test_two_threads_running_cycles_without_a_loop(broker, micropython):
    """With no background loop, each QoS 1 publish reads the link itself;
    two threads doing so at once take turns, and messages reach the
    callback one at a time, in order."""
    output = micropython.run(
        """
        import _thread
        got = []
        inside = [0]
        overlaps = [0]
        def on_message(client, payload, topic):
            inside[0] += 1
            if inside[0] > 1:
                overlaps[0] += 1
            got.append(int(payload))
            inside[0] -= 1
        done = []
        c = mqtt.Client("no-loop")
        c.connect(HOST, 30, port=PORT, start_loop=False)
        c.subscribe("seq", on_message, qos=1)
        def worker(name):
            for i in range(100):
                c.publish("seq", str(name * 1000 + i), qos=1)
            done.append(name)
        _thread.start_new_thread(worker, (1,))
        _thread.start_new_thread(worker, (2,))
        wait_until(lambda: len(done) == 2, 30000)
        while len(got) < 200:
            c.cycle()
        ones = [n for n in got if n < 2000]
        twos = [n for n in got if n >= 2000]
        print(len(got), ones == sorted(ones), twos == sorted(twos), overlaps[0], c.connected())
        c.disconnect()
        """,
        PORT=broker.port,
        timeout=60,
    )
    assert output.strip() == "200 True True 0 True", output
