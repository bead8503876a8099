"""The asyncio API: the client's loop as an asyncio task, awaitable calls,
and messages() with its bounded queue, against mosquitto (checked by a
paho peer) and scripted brokers."""

import re
import shutil
import subprocess
import textwrap
import time

import pytest

from broker import Broker
from conftest import SOCKETS, expect_line
from peer import Peer
from scripted_broker import CONNECT, PUBACK, PUBLISH, SUBSCRIBE, ScriptedBroker
from test_malicious_broker import GARBAGE, hostile
from test_restarts import check_every_number_arrives



def asynchronous(code):
    """A script's code after what every script here starts with: asyncio,
    and run(main), which runs the coroutine function `main` and then prints
    "done" (an exception escaping it prints a traceback instead)."""
    prelude = "import asyncio\n\ndef run(main):\n    asyncio.run(main())\n    print('done')\n"
    return prelude + textwrap.dedent(code)


def test_tasks_publish_consume_and_tick_at_once(broker, micropython):
    """Two tasks publish QoS 1 at once while a third consumes messages() and
    a fourth ticks: every message arrives exactly once, at the firmware and
    at a paho peer; the retained one says so."""
    count = 100
    peer = Peer(broker.port)
    peer.subscribe("load/#", qos=1)
    peer.publish("load/kept", b"retained", qos=1, retain=True)
    process = micropython.start(
        asynchronous(
        """
        import sys
        got = []
        ticks = [0]

        async def publisher(name):
            for i in range(COUNT):
                await c.apublish("load/" + name, str(i), qos=1)

        async def consumer():
            async for topic, payload in c.messages():
                got.append((topic, payload, c.message_flags() & 1))
                if len(got) == 2 * COUNT + PEER_COUNT + 1:
                    return

        async def ticker():
            while True:
                ticks[0] += 1
                await asyncio.sleep_ms(10)

        async def main():
            global c
            c = mqtt.Client("async-load", command_timeout=10000)
            await c.aconnect(HOST, 30, port=PORT)
            print("granted", await c.asubscribe("load/#", qos=1))
            tick = asyncio.create_task(ticker())
            consuming = asyncio.create_task(consumer())
            print("ready")
            # The peer's messages come while both publishers run.
            await asyncio.sleep_ms(0)
            await asyncio.gather(publisher("a"), publisher("b"))
            await asyncio.wait_for_ms(consuming, 20000)
            tick.cancel()
            await c.adisconnect()
            print("ticks", ticks[0] > 0)
            retained = [entry for entry in got if entry[2]]
            print("retained", retained)
            for name in ("a", "b", "peer"):
                numbers = sorted(int(p) for t, p, r in got if t == "load/" + name)
                print(name, numbers == list(range(COUNT if name != "peer" else PEER_COUNT)))

        run(main)
        """),
        PORT=broker.port,
        COUNT=count,
        PEER_COUNT=50,
    )
    expect_line(process, "granted 1")
    expect_line(process, "ready")
    for i in range(50):
        peer.client.publish("load/peer", str(i), qos=1)
    output, _ = process.communicate(timeout=60)
    assert peer.wait_for(2 * count + 50 + 1), output
    peer.close()
    assert output.split("\n")[:6] == [
        "ticks True",
        "retained [('load/kept', b'retained', 1)]",
        "a True",
        "b True",
        "peer True",
        "done",
    ], output
    # The peer saw each of the firmware's messages exactly once.
    for name in ("a", "b"):
        seen = sorted(int(m.payload) for m in peer.messages if m.topic == "load/" + name)
        assert seen == list(range(count)), name


def test_other_tasks_run_while_a_publish_awaits_its_acknowledgement(micropython):
    """The broker answers the QoS 1 publish only after five QoS 0 'tick'
    messages came from another task: the test ends only if the event loop
    ran while apublish() awaited."""

    def withholding(connection):
        assert connection.read().kind == CONNECT
        connection.connack()
        held = connection.read_until(PUBLISH)
        assert held.qos == 1
        ticks = 0
        while ticks < 5:
            packet = connection.read()
            if packet.kind == PUBLISH and packet.publish_fields()[0] == "tick":
                ticks += 1
        connection.ack(PUBACK, held.publish_fields()[1])
        connection.read_until(14)  # DISCONNECT

    scripted = ScriptedBroker([withholding])
    try:
        output = micropython.run(
            asynchronous(
            """
            ticks = [0]
            async def ticker():
                while True:
                    await c.apublish("tick", "x")
                    ticks[0] += 1
                    await asyncio.sleep_ms(20)

            async def main():
                global c
                c = mqtt.Client("withheld", command_timeout=10000)
                await c.aconnect(HOST, 30, port=PORT)
                tick = asyncio.create_task(ticker())
                await c.apublish("held", "y", qos=1)
                print("acknowledged after", ticks[0] >= 5, "ticks")
                tick.cancel()
                await c.adisconnect()

            run(main)
            """),
            PORT=scripted.port,
        )
    finally:
        scripted.close()
    assert output.split("\n")[:2] == ["acknowledged after True ticks", "done"], output
    assert scripted.errors == []


def test_the_queue_bounds_qos0_and_acknowledges_qos1_when_taken(micropython):
    """aconnect(queue=4): of ten QoS 0 messages nobody takes, four wait and
    six are dropped and counted; ten QoS 1 messages all wait, and each is
    acknowledged only when messages() gives it."""
    acks = []

    def flooding(connection):
        assert connection.read().kind == CONNECT
        connection.connack()
        for _ in range(3):
            subscribe = connection.read_until(SUBSCRIBE)
            connection.send(bytes([0x90, 3]) + subscribe.body[:2] + subscribe.body[-1:])
        for i in range(10):
            connection.send(publish(b"q0", str(i).encode()))
        for i in range(10):
            connection.send(publish(b"q1", str(i).encode(), qos=1, packet_id=i + 1))
        connection.send(publish(b"go", b""))
        for step in ("took 7", "took all"):
            while True:
                packet = connection.read()
                if packet.kind == PUBLISH:
                    assert packet.publish_fields()[0] == step
                    acks.append(step)
                    break
                assert packet.kind == PUBACK
                acks.append(packet.packet_id())
        connection.read_until(14)  # DISCONNECT

    scripted = ScriptedBroker([flooding])
    try:
        output = micropython.run(
            asynchronous(
            """
            go = asyncio.Event()
            async def main():
                c = mqtt.Client("queued", command_timeout=10000)
                await c.aconnect(HOST, 30, port=PORT, queue=4)
                await c.asubscribe("q0")
                await c.asubscribe("go", lambda client, payload, topic: go.set())
                await c.asubscribe("q1", qos=1)
                await go.wait()
                messages = c.messages()
                taken = []
                async for topic, payload in messages:
                    taken.append(payload)
                    if len(taken) == 7:
                        break
                await c.apublish("took 7", "")
                async for topic, payload in messages:
                    taken.append(payload)
                    if len(taken) == 14:
                        break
                await c.apublish("took all", "")
                print("dropped", messages.dropped)
                print(b" ".join(taken).decode())
                await c.adisconnect()
                # With the loop task ended and the queue empty, the iteration ends.
                async for message in messages:
                    print("unexpected", message)

            run(main)
            """),
            PORT=scripted.port,
        )
    finally:
        scripted.close()
    assert output.split("\n")[:3] == ["dropped 6", "0 1 2 3 0 1 2 3 4 5 6 7 8 9", "done"], output
    # The QoS 1 messages were the 5th to 14th taken: acknowledged then.
    assert acks == [1, 2, 3, "took 7", 4, 5, 6, 7, 8, 9, 10, "took all"], acks
    assert scripted.errors == []


def test_a_cancelled_await_and_a_disconnect_leave_the_client_usable(micropython):
    """A task awaiting a PUBACK that never comes is cancelled (wait_for); the
    next publish is acknowledged; a blocking disconnect() and an aconnect()
    at once start a new loop task while the old one ends."""

    def first(connection):
        assert connection.read().kind == CONNECT
        connection.connack()
        connection.read_until(PUBLISH)  # never acknowledged
        second = connection.read_until(PUBLISH)
        connection.ack(PUBACK, second.publish_fields()[1])
        connection.read_until(14)  # DISCONNECT

    def again(connection):
        assert connection.read().kind == CONNECT
        connection.connack()
        third = connection.read_until(PUBLISH)
        connection.ack(PUBACK, third.publish_fields()[1])
        connection.read_until(14)

    scripted = ScriptedBroker([first, again])
    try:
        output = micropython.run(
            asynchronous(
                """
                async def main():
                    c = mqtt.Client("cancelled", command_timeout=10000)
                    await c.aconnect(HOST, 30, port=PORT)
                    try:
                        await asyncio.wait_for_ms(c.apublish("a", "1", qos=1), 200)
                    except asyncio.TimeoutError:
                        print("cancelled")
                    await c.apublish("b", "2", qos=1)
                    print("second acknowledged")
                    c.disconnect()
                    await c.aconnect(HOST, 30, port=PORT)
                    await c.apublish("c", "3", qos=1)
                    print("third acknowledged on a new link")
                    await c.adisconnect()

                run(main)
                """),
            PORT=scripted.port,
        )
    finally:
        scripted.close()
    assert output.split("\n")[:4] == ["cancelled", "second acknowledged", "third acknowledged on a new link", "done"], output
    assert scripted.errors == []


def publish(topic, payload, qos=0, packet_id=1):
    body = len(topic).to_bytes(2, "big") + topic + (packet_id.to_bytes(2, "big") if qos else b"") + payload
    return bytes([0x30 | (qos << 1), len(body)]) + body


def test_errors_of_the_awaitable_calls(broker, micropython):
    """Refusals, unreachable brokers and misuse raise the blocking API's
    exceptions, and leave the client usable."""
    output = micropython.run(
        asynchronous(
        """
        import socket
        async def main():
            c = mqtt.Client("errors", command_timeout=2000)
            # Nobody listens on the closed port.
            try:
                await c.aconnect(HOST, 30, port=CLOSED)
            except OSError as e:
                print("unreachable", e.errno in (111, 104, 113))
            try:
                await c.apublish("t", "x")
            except OSError as e:
                print("publish without a link", e.errno == 107)
            try:
                await c.asubscribe("a/#/b")
            except ValueError as e:
                print("bad filter", e)
            try:
                c.aconnect(HOST, 30, port=PORT, queue=-1)
            except ValueError as e:
                print("bad queue", e)
            await c.aconnect(HOST, 30, port=PORT)
            try:
                await c.aconnect(HOST, 30, port=PORT)
            except OSError as e:
                print("again while connected", e.errno == 16)
            try:
                c.cycle()
            except OSError as e:
                print("cycle while the task runs", e.errno == 16)
            print("granted", await c.asubscribe("ok/#", qos=2))
            await c.apublish("ok/1", "x", qos=2)
            await c.adisconnect()
            print("connected", c.connected())

        run(main)
        """),
        PORT=broker.port,
        CLOSED=closed_port(),
    )
    assert output.split("\n")[:9] == [
        "unreachable True",
        "publish without a link True",
        "bad filter invalid topic filter",
        "bad queue queue must be 0-32767",
        "again while connected True",
        "cycle while the task runs True",
        "granted 2",
        "connected False",
        "done",
    ], output


def closed_port():
    from broker import free_port

    return free_port()


def test_over_tls_a_burst_arrives_whole(tls_broker, certificates, micropython):
    """Over TLS, several messages decrypted at once wait in TLS's buffer,
    which asyncio's poll of the socket cannot see: the loop task empties it
    before each wait, so a burst of 200 small messages and a large one all
    arrive without waiting for more traffic."""
    peer = Peer(tls_broker.port)
    process = micropython.start(
        asynchronous(
            """
            from tls_context import context
            async def main():
                c = mqtt.Client("tls-async")
                await c.aconnect(HOST, 30, port=PORT, ssl_ctx=context(CA))
                await c.asubscribe("burst/#", qos=1)
                print("ready")
                got = []
                async for topic, payload in c.messages():
                    got.append(payload)
                    if len(got) == 201:
                        break
                print(got[:200] == [b"%d" % i for i in range(200)], got[200] == bytes(range(256)) * 100)
                await c.apublish("burst/back", "thanks", qos=1)
                await c.adisconnect()

            run(main)
            """),
        PORT=tls_broker.tls_ports["tls"],
        CA=certificates.path("ca.crt.der"),
    )
    expect_line(process, "ready")
    for i in range(200):
        peer.client.publish("burst/small", str(i), qos=1)
    peer.publish("burst/big", bytes(range(256)) * 100, qos=1)
    output, _ = process.communicate(timeout=30)
    peer.close()
    assert output.split("\n")[:2] == ["True True", "done"], output


@pytest.mark.parametrize(
    "listener, ca, reason",
    [
        ("tls", "other-ca.crt.der", "The certificate is not correctly signed by the trusted CA"),
        ("wrong_host", "ca.crt.der", "The certificate Common Name (CN) does not match with the expected CN"),
    ],
    ids=["wrong CA", "certificate for another host"],
)
def test_an_untrusted_server_fails_aconnect_as_it_fails_connect(
    tls_broker, certificates, micropython, listener, ca, reason
):
    """aconnect()'s handshake goes step by step; a certificate that does not
    verify raises what the tls module reports, as connect() does, and the
    client then connects to the right listener."""
    output = micropython.run(
        asynchronous(
            """
            from tls_context import context
            async def main():
                c = mqtt.Client("careful-async", command_timeout=5000)
                try:
                    await c.aconnect(HOST, 30, port=PORT, ssl_ctx=context(CA))
                    print("connected: WRONG")
                except ValueError as e:
                    print(" ".join(str(e).split()))
                print(c.connected())
                await c.aconnect(HOST, 30, port=GOOD, ssl_ctx=context(GOOD_CA))
                print(c.connected())
                await c.adisconnect()

            run(main)
            """),
        PORT=tls_broker.tls_ports[listener],
        GOOD=tls_broker.tls_ports["tls"],
        CA=certificates.path(ca),
        GOOD_CA=certificates.path("ca.crt.der"),
        timeout=30,
    )
    assert output.split("\n")[:4] == [reason, "False", "True", "done"], output


def test_the_blocking_calls_work_on_a_client_of_the_loop_task(broker, micropython):
    """publish(), subscribe() and unsubscribe() from a task of a client that
    aconnect() connected: they hold the event loop until answered (their
    cycles read the answers), and the loop task then delivers as before."""
    peer = Peer(broker.port)
    peer.subscribe("mixed/#", qos=1)
    output = micropython.run(
        asynchronous(
            """
            got = []
            async def main():
                c = mqtt.Client("mixed", command_timeout=5000)
                await c.aconnect(HOST, 30, port=PORT)
                print("granted", c.subscribe("mixed/in", lambda client, payload, topic: got.append(payload), qos=1))
                c.publish("mixed/out", "blocking", qos=1)
                await c.apublish("mixed/in", "to myself", qos=1)
                for _ in range(200):
                    if got:
                        break
                    await asyncio.sleep_ms(10)
                c.unsubscribe("mixed/in")
                print(got)
                await c.adisconnect()

            run(main)
            """),
        PORT=broker.port,
    )
    assert output.split("\n")[:3] == ["granted 1", "[b'to myself']", "done"], output
    assert sorted((m.topic, m.payload) for m in peer.wait_for(2)) == [
        ("mixed/in", b"to myself"),
        ("mixed/out", b"blocking"),
    ]
    peer.close()


def test_a_refused_connection_raises_its_code(tmp_path, micropython):
    locked = Broker(tmp_path, settings="allow_anonymous false\n")
    try:
        output = micropython.run(
            asynchronous(
            """
            async def main():
                c = mqtt.Client("refused")
                try:
                    await c.aconnect(HOST, 30, port=PORT)
                except mqtt.MQTTException as e:
                    print("refused", e.args[0] == mqtt.CONNECTION_REFUSED_NOT_AUTHORIZED, c.connected())

            run(main)
            """),
            PORT=locked.port,
        )
    finally:
        locked.stop()
    assert output.split("\n")[:2] == ["refused True False", "done"], output


# --- The loop task on a link that dies, a broker that restarts, a broker that lies


def test_a_dead_link_is_found_and_no_await_hangs(proxy, micropython):
    process = micropython.start(
        asynchronous(
        """
        import sys
        failures = []
        def failed(client):
            failures.append((time.ticks_ms(), client.connected()))
            return mqtt.BREAK_LOOP

        async def main():
            c = mqtt.Client("silent-async", command_timeout=1500)
            await c.aconnect(HOST, 2, port=PORT, loop_failure=failed)
            print("connected", c.connected())
            sys.stdin.readline()
            swallowed = time.ticks_ms()
            try:
                await c.apublish("t", "x", qos=1)
            except mqtt.MQTTException as e:
                print("publish", e.args[0] == mqtt.TIMEOUT)
            while not failures:
                await asyncio.sleep_ms(10)
            elapsed = time.ticks_diff(failures[0][0], swallowed)
            print("found", elapsed <= 3000 + 400, failures[0][1], c.connected())
            try:
                await c.asubscribe("t")
            except OSError as e:
                print("subscribe", e.errno == 107)

        run(main)
        """),
        PORT=proxy.port,
    )
    expect_line(process, "connected True")
    proxy.swallow()
    output, _ = process.communicate("go\n", timeout=30)
    assert output.split("\n")[:4] == ["publish True", "found True False False", "subscribe True", "done"], output


def test_a_qos1_apublish_waits_for_built_in_reconnection(broker, proxy, micropython):
    """While auto_reconnect brings the link back, a QoS 1 apublish() waits for
    it and then goes (a QoS 0 one raises at once); the peer gets it."""
    peer = Peer(broker.port)
    peer.subscribe("outage/#", qos=1)
    process = micropython.start(
        asynchronous(
            """
            import sys
            async def main():
                c = mqtt.Client("outage-async", command_timeout=5000)
                await c.aconnect(HOST, 30, port=PORT, auto_reconnect=(100, 200))
                print("connected")
                sys.stdin.readline()
                while c.connected():
                    await asyncio.sleep_ms(5)
                try:
                    await c.apublish("outage/0", "lost")
                except OSError as e:
                    print("qos 0 while down", e.errno == 107)
                print("publishing")
                await c.apublish("outage/1", "kept", qos=1)
                print("acknowledged", c.connected())
                await c.adisconnect()

            run(main)
            """),
        PORT=proxy.port,
    )
    expect_line(process, "connected")
    proxy.refuse()
    process.stdin.write("go\n")
    process.stdin.flush()
    expect_line(process, "qos 0 while down True")
    expect_line(process, "publishing")
    time.sleep(0.5)
    proxy.forward()
    output, _ = process.communicate(timeout=30)
    assert output.split("\n")[:2] == ["acknowledged True", "done"], output
    assert [(m.topic, m.payload) for m in peer.wait_for(1)] == [("outage/1", b"kept")]
    peer.close()


@pytest.mark.long
@pytest.mark.parametrize("qos", [1, 2])
def test_messages_arrive_through_broker_restarts(persistent_broker, micropython, qos):
    """auto_reconnect on the asyncio task, messages() with acknowledgements
    deferred until taken: every number arrives through ten restarts (QoS 2
    exactly once)."""
    count = 300
    process = micropython.start(
        asynchronous(
        """
        got = []
        failures = []
        def failed(client):
            failures.append(1)

        async def main():
            c = mqtt.Client("async-sink-%d" % QOS, clean_session=False, command_timeout=3000)
            await c.aconnect(HOST, 5, port=PORT, loop_failure=failed, auto_reconnect=(50, 400))
            await c.asubscribe("numbers", qos=QOS)
            print("ready")
            async for topic, payload in c.messages():
                got.append(int(payload))
                if len(set(got)) == COUNT:
                    break
            await asyncio.sleep_ms(300)
            async def rest():
                async for topic, payload in c.messages():
                    got.append(int(payload))
            try:
                await asyncio.wait_for_ms(rest(), 300)
            except asyncio.TimeoutError:
                pass
            print("distinct", len(set(got)) == COUNT, "duplicates", len(got) - len(set(got)))
            print("link failures", len(failures))
            await c.adisconnect()

        run(main)
        """),
        PORT=persistent_broker.port,
        QOS=qos,
        COUNT=count,
    )
    check_every_number_arrives(persistent_broker, process, count, qos, f"async-source-{qos}")


# The engine reads the same bytes whichever loop runs it: one case of each
# kind is enough to show what the loop task does with it.
GARBAGE_KINDS = [
    "remaining length in five bytes",
    "CONNACK with code 6",
    "topic not UTF-8",
    "packet id 0",
    "a SUBACK larger than max_packet_size",
    "truncated packet, then close",
    "PUBACK for an unknown id",
]


@pytest.mark.parametrize("name", GARBAGE_KINDS)
def test_garbage_from_the_broker_ends_the_loop_task(name, broker, micropython):
    garbage, expected = GARBAGE[name]
    scripted = ScriptedBroker([hostile(garbage, then_close=name.startswith("truncated"))])
    try:
        output = micropython.run(
            asynchronous(
            """
            failures = []
            got = []
            def failed(client):
                failures.append(client.connected())
                return mqtt.BREAK_LOOP

            async def main():
                c = mqtt.Client("victim-async", command_timeout=2000, max_packet_size=4096)
                await c.aconnect(HOST, 30, port=HOSTILE, loop_failure=failed)
                try:
                    await c.asubscribe("t", lambda client, payload, topic: got.append(payload))
                except OSError as e:
                    # The loop task found the bad packet first.
                    print("subscribe: link lost", e.errno)
                for _ in range(300):
                    if failures:
                        break
                    await asyncio.sleep_ms(10)
                print("failure" if failures else "ignored", c.connected(), got)
                await c.adisconnect()
                # The same client then works with a healthy broker.
                await c.aconnect(HOST, 30, port=HEALTHY)
                await c.asubscribe("t", qos=1)
                await c.apublish("t", "healthy", qos=1)
                async for topic, payload in c.messages():
                    print(payload)
                    break
                await c.adisconnect()

            run(main)
            """),
            HOSTILE=scripted.port,
            HEALTHY=broker.port,
            timeout=30,
        )
    finally:
        scripted.close()
    lines = [line for line in output.strip().splitlines() if not line.startswith("subscribe:")]
    if expected == "failure":
        assert lines[0] == "failure False []", output
    else:
        assert lines[0] == "ignored True []", output
    assert lines[1:3] == ["b'healthy'", "done"], output


# --- Idle: no system call between keepalive pings


@pytest.mark.long
@pytest.mark.skipif(SOCKETS == "lwip", reason="lwIP's sockets have no descriptor: asyncio's poll looks every ms")
@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed")
def test_an_idle_client_makes_no_system_call_between_pings(broker, micropython, tmp_path):
    """30 s connected with keepalive 10 and no traffic: every system call
    after start-up belongs to a ping (within 200 ms of a PINGREQ sent)."""
    script = micropython.source(
        asynchronous(
        """
        async def main():
            c = mqtt.Client("idle")
            await c.aconnect(HOST, 10, port=PORT)
            await c.asubscribe("idle/#")
            print("idle from now")
            await asyncio.sleep(31)
            print("idle until now")
            await c.adisconnect()

        run(main)
        """),
        PORT=broker.port,
    )
    path = tmp_path / "idle.py"
    path.write_text(script)
    trace = tmp_path / "trace"
    result = subprocess.run(
        ["strace", "-f", "-ttt", "-e", "trace=all", "-o", str(trace), str(micropython.firmware), str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.stdout.split("\n")[:3] == ["idle from now", "idle until now", "done"], result.stdout
    calls = []
    started = ended = None
    for line in trace.read_text().splitlines():
        match = re.match(r"\d+\s+(\d+\.\d+) (\w+)\((.*)", line)
        if not match:
            continue
        stamp, name, rest = float(match.group(1)), match.group(2), match.group(3)
        if name == "write" and '"idle from now"' in rest:
            started = stamp
        elif name == "write" and '"idle until now"' in rest:
            ended = stamp
        elif started is not None and ended is None and not (name == "write" and rest.startswith("1,")):
            # Not the script's own prints.
            calls.append((stamp, name, rest))
    assert started is not None and ended is not None
    # PINGREQ is the two bytes 0xC0 0x00.
    pings = [stamp for stamp, name, rest in calls if name == "write" and rest.split(", ")[1] == '"\\300\\0"']
    assert len(pings) == 3, calls
    # Every call belongs to a ping, or to the start and end of the script's
    # own 31 s sleep.
    moments = pings + [started, ended]
    strays = [call for call in calls if not any(abs(call[0] - moment) < 0.2 for moment in moments)]
    assert strays == [], strays
    print(f"{len(calls)} system calls in 31 s idle, {len(pings)} pings")
