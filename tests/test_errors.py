"""Bad arguments, calls in the wrong state, refused and unreachable brokers:
each gives a clear exception and leaves the client usable."""

import pytest

from broker import Broker, free_port
from conftest import expect_line

# Each case: (expression run against a connected client `c`, expected exception).
BAD_CALLS = [
    ("c.publish(123, 'x')", "TypeError"),
    ("c.publish(b'topic', 'x')", "TypeError"),
    ("c.publish('t', 42)", "TypeError"),
    ("c.publish('t', None)", "TypeError"),
    ("c.publish('t', 'x', qos=3)", "ValueError"),
    ("c.publish('t', 'x', qos=-1)", "ValueError"),
    ("c.publish('t', 'x', qos='1')", "TypeError"),
    ("c.publish('a/+', 'x')", "ValueError"),
    ("c.publish('a/#', 'x')", "ValueError"),
    ("c.publish('', 'x')", "ValueError"),
    ("c.publish('x' * 65536, 'x')", "ValueError"),
    ("c.publish('a\\x00b', 'x')", "ValueError"),
    ("c.publish()", "TypeError"),
    ("c.subscribe('t', None)", "TypeError"),
    ("c.subscribe('t', 5)", "TypeError"),
    ("c.subscribe(5, print)", "TypeError"),
    ("c.subscribe('t', print, qos=3)", "ValueError"),
    ("c.subscribe('a/#/b', print)", "ValueError"),
    ("c.subscribe('a+', print)", "ValueError"),
    ("c.subscribe('', print)", "ValueError"),
    ("c.subscribe('t')", "TypeError"),
    ("c.unsubscribe('a/#/b')", "ValueError"),
    ("c.unsubscribe(None)", "TypeError"),
    ("c.set_will('a/+', 'x')", "ValueError"),
    ("c.set_will('w', 'x', qos=5)", "ValueError"),
    ("c.set_will('w', 7)", "TypeError"),
    ("c.set_username_pw(None)", "TypeError"),
    ("c.set_username_pw('u', 5)", "TypeError"),
    ("c.disconnect('soon')", "TypeError"),
    ("c.disconnect(-1)", "ValueError"),
    ("mqtt.Client(None)", "TypeError"),
    ("mqtt.Client(b'id')", "TypeError"),
    ("mqtt.Client('', clean_session=False)", "ValueError"),
    ("mqtt.Client('x', cycle_timeout=-1)", "ValueError"),
    ("mqtt.Client('x', command_timeout=0)", "ValueError"),
    ("mqtt.Client('x' * 65536)", "ValueError"),
    ("mqtt.Client()", "TypeError"),
    ("c2.connect(HOST, -1, port=PORT)", "ValueError"),
    ("c2.connect(HOST, 70000, port=PORT)", "ValueError"),
    ("c2.connect(HOST, 30, port=0)", "ValueError"),
    ("c2.connect(None, 30)", "TypeError"),
    ("c2.connect(HOST, 30, port=PORT, loop_failure=5)", "TypeError"),
    ("c2.connect(HOST)", "TypeError"),
    ("c.connected(1)", "TypeError"),
    ("c.get_return_code(1)", "TypeError"),
    ("c.loop(1)", "TypeError"),
    ("c.cycle(1)", "TypeError"),
    ("c.reconnect(1)", "TypeError"),
    ("c.unsubscribe()", "TypeError"),
    ("c.set_will('w')", "TypeError"),
    ("c.disconnect(1, 2)", "TypeError"),
]


def test_bad_arguments_raise_and_leave_the_client_usable(broker, micropython):
    output = micropython.run(
        """
        got = []
        c = mqtt.Client("victim")
        c2 = mqtt.Client("spare")
        c.connect(HOST, 30, port=PORT)
        c.subscribe("ok", lambda client, payload, topic: got.append(payload))
        for expression, expected in CASES:
            try:
                eval(expression)
                print("NO EXCEPTION", expression)
            except Exception as e:
                name = type(e).__name__
                print("ok" if name == expected else "WRONG %s for %s: %r" % (name, expression, e))
        c.publish("ok", "still works", qos=1)
        print(wait_until(lambda: got), got, c.connected())
        c.disconnect()
        """,
        PORT=broker.port,
        CASES=BAD_CALLS,
    )
    lines = output.strip().splitlines()
    assert lines[:-1] == ["ok"] * len(BAD_CALLS), output
    assert lines[-1] == "True [b'still works'] True"


def test_calls_that_need_a_connection(broker, micropython):
    output = micropython.run(
        """
        import errno
        c = mqtt.Client("idle")
        for call in (lambda: c.publish("t", "x"), lambda: c.publish("t", "x", qos=1),
                     lambda: c.subscribe("t", print), lambda: c.unsubscribe("t"), c.reconnect):
            try:
                call()
                print("no exception")
            except OSError as e:
                print(e.errno == errno.ENOTCONN)
        c.disconnect()
        c.connect(HOST, 30, port=PORT)
        c.disconnect()
        try:
            c.publish("t", "after")
        except OSError as e:
            print(e.errno == errno.ENOTCONN)
        print(c.reconnect(), c.connected())
        c.disconnect()
        """,
        PORT=broker.port,
    )
    assert output.split() == ["True"] * 6 + ["0", "True"]


def test_refused_connection_reports_the_brokers_code(tmp_path, micropython):
    # A broker that allows no anonymous client answers CONNACK 5.
    broker = Broker(tmp_path, settings="allow_anonymous false\n")
    try:
        output = micropython.run(
            """
            c = mqtt.Client("nobody")
            try:
                c.connect(HOST, 30, port=PORT)
            except mqtt.MQTTException as e:
                print("refused", e.args[0], e.args[0] == mqtt.CONNECTION_REFUSED_NOT_AUTHORIZED, "authorized" in e.args[1])
            print(c.get_return_code(), c.connected())
            print(c.reconnect(), c.connected())
            """,
            PORT=broker.port,
        )
    finally:
        broker.stop()
    assert output.strip().splitlines() == ["refused 5 True True", "5 False", "5 False"]


def test_unreachable_broker_raises_oserror(micropython):
    """connect() and reconnect() raise what the port's own socket raises
    when nothing listens: ECONNREFUSED from the unix port's sockets,
    ECONNRESET from lwIP's (modlwip.c reports the broker's RST so)."""
    output = micropython.run(
        """
        import socket
        plain = socket.socket()
        try:
            plain.connect(socket.getaddrinfo(HOST, PORT)[0][-1])
        except OSError as e:
            print("socket", e.errno)
        plain.close()
        c = mqtt.Client("lonely", command_timeout=2000)
        try:
            c.connect(HOST, 30, port=PORT)
        except OSError as e:
            print("OSError", e.errno)
        print(c.connected())
        try:
            c.reconnect()
        except OSError as e:
            print("OSError", e.errno)
        """,
        PORT=free_port(),
    )
    words = output.split()
    assert words[:2] in (["socket", "111"], ["socket", "104"])
    refused = words[1]
    assert words[2:] == ["OSError", refused, "False", "OSError", refused]


def output_after_the_broker_goes(tmp_path, micropython, code):
    """Runs `code` (which prints "connected" once connected) against a
    broker that is stopped at that point; returns what the script printed
    after."""
    broker = Broker(tmp_path)
    process = micropython.start(code, PORT=broker.port)
    try:
        expect_line(process, "connected")
        broker.stop()
        output, _ = process.communicate(timeout=20)
    finally:
        broker.stop()
        if process.poll() is None:
            process.kill()
    return output


def test_loop_failure_is_called_when_the_broker_goes_away(tmp_path, micropython):
    output = output_after_the_broker_goes(
        tmp_path,
        micropython,
        """
        calls = []
        def failed(client):
            calls.append(client.connected())
            return mqtt.BREAK_LOOP
        c = mqtt.Client("orphan")
        c.connect(HOST, 30, port=PORT, loop_failure=failed)
        print("connected")
        wait_until(lambda: calls, 10000)
        print(calls)
        """,
    )
    assert output.strip() == "[False]"


def test_loop_failure_that_raises_is_printed_and_ends_the_loop(tmp_path, micropython):
    output = output_after_the_broker_goes(
        tmp_path,
        micropython,
        """
        calls = []
        def failed(client):
            calls.append(1)
            raise RuntimeError("handler bug")
        c = mqtt.Client("fragile")
        c.connect(HOST, 30, port=PORT, loop_failure=failed)
        print("connected")
        wait_until(lambda: calls, 10000)
        time.sleep_ms(1500)
        print("calls", len(calls))
        # The loop ended with the link; loop() needs a link to start again.
        try:
            c.loop()
        except OSError as e:
            print("loop", e.errno)
        """,
    )
    assert "RuntimeError: handler bug" in output
    assert "calls 1" in output and "loop 107" in output


def test_cycle_raises_the_link_failure_without_loop_failure(tmp_path, micropython):
    output = output_after_the_broker_goes(
        tmp_path,
        micropython,
        """
        c = mqtt.Client("manual")
        c.connect(HOST, 30, port=PORT, start_loop=False)
        print("connected")
        try:
            for i in range(100):
                c.cycle()
        except OSError as e:
            print("OSError", e.errno)
        print(c.connected())
        """,
    )
    assert output.split() == ["OSError", "104", "False"], output
