"""A link that dies without closing (a proxy swallows everything), or is
cut: the loop notices in time, calls loop_failure, no call hangs, and
connected() tells the truth throughout."""

import pytest

from conftest import expect_line

KEEPALIVE_S = 2


@pytest.mark.long
def test_dead_link_is_found_within_one_and_a_half_keepalive(proxy, micropython):
    process = micropython.start(
        """
        import sys
        failures = []
        def failed(client):
            failures.append((time.ticks_ms(), client.connected()))
            return mqtt.BREAK_LOOP
        c = mqtt.Client("silent", command_timeout=10000)
        c.connect(HOST, KEEPALIVE, port=PORT, loop_failure=failed)
        print("connected", c.connected())
        sys.stdin.readline()
        swallowed = time.ticks_ms()
        print(c.connected())
        wait_until(lambda: failures, 10000)
        elapsed = time.ticks_diff(failures[0][0], swallowed)
        print("found after", elapsed, "ms; connected then:", failures[0][1], "now:", c.connected())
        # 1.5 periods, with room for a loaded machine; a client that waited a
        # whole period for PINGRESP would take 2.
        print(elapsed <= 1500 * KEEPALIVE + 400)
        """,
        PORT=proxy.port,
        KEEPALIVE=KEEPALIVE_S,
    )
    expect_line(process, "connected True")
    proxy.swallow()
    output, _ = process.communicate("go\n", timeout=30)
    lines = output.strip().splitlines()
    assert lines[0] == "True", output
    assert lines[1].endswith("connected then: False now: False"), output
    assert lines[2] == "True", output


def test_no_call_hangs_on_a_dead_link(proxy, micropython):
    process = micropython.start(
        """
        import sys
        failures = []
        def failed(client):
            failures.append(client.connected())
            return mqtt.BREAK_LOOP
        # Connecting is bounded by the command timeout too: 2 s leaves room
        # for a loaded machine (three suites at once, TLS handshakes beside).
        c = mqtt.Client("stuck", command_timeout=TIMEOUT)
        c.connect(HOST, 30, port=PORT, loop_failure=failed)
        print("connected")
        sys.stdin.readline()
        def attempt(name, call):
            start = time.ticks_ms()
            try:
                call()
                outcome = "returned"
            except mqtt.MQTTException as e:
                outcome = "timeout" if e.args[0] == mqtt.TIMEOUT else repr(e)
            except OSError as e:
                outcome = "OSError %d" % e.errno
            print(name, outcome, time.ticks_diff(time.ticks_ms(), start) < TIMEOUT + 600, c.connected())
        attempt("publish0", lambda: c.publish("t", "x"))
        attempt("publish1", lambda: c.publish("t", "x", qos=1))
        attempt("publish2", lambda: c.publish("t", "x", qos=2))
        attempt("subscribe", lambda: c.subscribe("t", print))
        attempt("unsubscribe", lambda: c.unsubscribe("t"))
        attempt("disconnect", lambda: c.disconnect(TIMEOUT))
        attempt("publish-after", lambda: c.publish("t", "x", qos=1))
        """,
        PORT=proxy.port,
        TIMEOUT=2000,
    )
    expect_line(process, "connected")
    proxy.swallow()
    output, _ = process.communicate("go\n", timeout=40)
    assert output.strip().splitlines() == [
        "publish0 returned True True",
        "publish1 timeout True True",
        "publish2 timeout True True",
        "subscribe timeout True True",
        "unsubscribe timeout True True",
        "disconnect returned True False",
        "publish-after OSError 107 True False",
    ], output


def test_loop_failure_reconnects_and_the_loop_goes_on(proxy, micropython):
    process = micropython.start(
        """
        import sys
        events = []
        got = []
        def on_message(client, payload, topic):
            got.append(payload)
        def before(client):
            events.append("before reconnect, connected=%s" % client.connected())
        def after(client):
            events.append("after connect, connected=%s" % client.connected())
            client.subscribe("back", on_message, qos=1)
        def failed(client):
            events.append("failure, connected=%s" % client.connected())
            while True:
                try:
                    code = client.reconnect()
                    events.append("reconnect returned %d" % code)
                    if code == 0:
                        return mqtt.RECOVERED
                except OSError as e:
                    events.append("reconnect raised")
                time.sleep_ms(100)
        c = mqtt.Client("phoenix")
        c.connect(HOST, 30, port=PORT, breconnect_cb=before, aconnect_cb=after, loop_failure=failed)
        print("connected")
        sys.stdin.readline()
        wait_until(lambda: "reconnect returned 0" in events, 10000)
        c.publish("back", "after the cut", qos=1)
        wait_until(lambda: got, 5000)
        for event in events:
            print(event)
        print(got, c.connected())
        c.disconnect()
        """,
        PORT=proxy.port,
    )
    expect_line(process, "connected")
    proxy.cut()
    output, _ = process.communicate("go\n", timeout=30)
    assert output.strip().splitlines() == [
        "after connect, connected=True",
        "failure, connected=False",
        "before reconnect, connected=False",
        "after connect, connected=True",
        "reconnect returned 0",
        "[b'after the cut'] True",
    ], output
