"""Built-in reconnection's rules, each seen once: what loop_failure's answer
does, which failures wait longest, subscriptions sent again in turns, a
QoS 1 publish that waits for the link, and disconnect() ending it all."""

import threading
import time

from conftest import RESET_NOTICE_S, expect_line
from peer import Peer
from proxy import Proxy
from scripted_broker import CONNECT, DISCONNECT, ScriptedBroker


def accept_then_close(connection):
    connection.read_until(CONNECT)
    connection.connack()
    time.sleep(0.3)


def refuse(connection):
    connection.read_until(CONNECT)
    connection.connack(code=5)


def accept_until_disconnect(connection):
    connection.read_until(CONNECT)
    connection.connack()
    connection.read_until(DISCONNECT)


def test_a_refusal_is_retried_at_the_longest_gap_and_printed(micropython):
    """After a lost link the first attempt comes within min_ms; the broker
    then refuses twice (not authorized): each next attempt waits at least
    max_ms / 2, and each refusal is printed. The third attempt connects."""
    scripted = ScriptedBroker([accept_then_close, refuse, refuse, accept_until_disconnect])
    try:
        output = micropython.run(
            """
            times = []
            def before(client):
                times.append(time.ticks_ms())
            connects = []
            client = mqtt.Client('refused')
            client.connect(HOST, 30, port=PORT, breconnect_cb=before,
                           aconnect_cb=lambda client: connects.append(client.get_return_code()),
                           auto_reconnect=(100, 1500))
            print(wait_until(lambda: len(connects) == 2, 10000), connects, client.connected())
            print('gaps', [time.ticks_diff(b, a) for a, b in zip(times, times[1:])])
            client.disconnect()
            """,
            PORT=scripted.port,
        )
    finally:
        scripted.close()
    assert scripted.errors == []
    lines = output.strip().splitlines()
    assert "True [0, 0] True" in lines, output
    assert output.count("mqtt: connection refused: not authorized; next attempt in") == 2, output
    gaps = eval(next(line for line in lines if line.startswith("gaps "))[5:])
    assert len(gaps) == 2 and all(750 <= gap <= 1500 + 150 for gap in gaps), output


def test_loop_failure_decides_first(broker, micropython):
    """loop_failure runs before the client reconnects: returning None lets
    it reconnect, BREAK_LOOP ends the loop (and the client stays down)."""
    process = micropython.start(
        """
        answers = [None, mqtt.BREAK_LOOP]
        calls = []
        connects = []
        def failed(client):
            calls.append(client.connected())
            return answers[len(calls) - 1]
        client = mqtt.Client('decides')
        client.connect(HOST, 30, port=PORT, loop_failure=failed, auto_reconnect=(100, 400),
                       aconnect_cb=lambda client: connects.append(1))
        print('ready')
        import sys
        sys.stdin.readline()
        print(wait_until(lambda: len(connects) == 2, 10000), calls)
        print('again')
        sys.stdin.readline()
        print(wait_until(lambda: len(calls) == 2, 10000), calls)
        time.sleep_ms(1500)
        print(len(connects), client.connected())
        """,
        PORT=broker.port,
    )
    expect_line(process, "ready")
    broker.restart()
    process.stdin.write("go\n")
    process.stdin.flush()
    expect_line(process, "True [False]")
    expect_line(process, "again")
    time.sleep(RESET_NOTICE_S)
    broker.restart()
    output, _ = process.communicate("go\n", timeout=30)
    assert output.split("\n")[:2] == ["True [False, False]", "2 False"], output


def test_more_subscriptions_than_in_flight_slots_come_back(broker, micropython):
    """Twelve subscriptions (the client has 8 in-flight slots), a broker
    restarted without its sessions: every one is subscribed again with its
    function, and messages to each arrive."""
    process = micropython.start(
        """
        got = set()
        connects = []
        client = mqtt.Client('many')
        client.connect(HOST, 30, port=PORT, auto_reconnect=(100, 400),
                       aconnect_cb=lambda client: connects.append(1))
        for i in range(12):
            client.subscribe('many/%d' % i, lambda client, payload, topic, i=i: got.add((i, topic)), 1)
        print('ready')
        wait_until(lambda: len(connects) == 2, 10000)
        print('back')
        wait_until(lambda: len(got) == 12, 10000)
        print(sorted(got) == [(i, 'many/%d' % i) for i in range(12)])
        client.disconnect()
        """,
        PORT=broker.port,
    )
    expect_line(process, "ready")
    broker.restart()
    expect_line(process, "back")
    peer = Peer(broker.port, client_id="many-publisher")
    publishing = threading.Event()
    publishing.set()

    def publish_rounds():
        # The subscriptions go in turns after the CONNACK: a message to one
        # the broker does not have yet is not kept for the client.
        while publishing.is_set():
            for i in range(12):
                peer.publish(f"many/{i}", b"x", qos=1)
            time.sleep(0.2)

    publisher = threading.Thread(target=publish_rounds, daemon=True)
    publisher.start()
    try:
        output, _ = process.communicate(timeout=30)
    finally:
        publishing.clear()
        publisher.join()
        peer.close()
    assert output.strip() == "True", output


def test_a_qos1_publish_waits_for_the_link_and_a_qos0_one_does_not(broker, micropython):
    """While the broker is down, a QoS 0 publish raises ENOTCONN at once;
    a QoS 1 publish waits for the client to reconnect, then goes (retained,
    so that a peer subscribing afterwards sees that the broker has it)."""
    process = micropython.start(
        """
        client = mqtt.Client('waiter', command_timeout=10000)
        client.connect(HOST, 30, port=PORT, auto_reconnect=(100, 400))
        print('ready')
        wait_until(lambda: not client.connected(), 10000)
        start = time.ticks_ms()
        try:
            client.publish('wait/qos0', 'lost')
        except OSError as error:
            print('qos0', error.errno, time.ticks_diff(time.ticks_ms(), start) < 100)
        client.publish('wait/qos1', 'kept', qos=1, retain=True)
        print('qos1 sent', client.connected())
        client.disconnect()
        """,
        PORT=broker.port,
    )
    expect_line(process, "ready")
    broker.terminate()
    expect_line(process, "qos0 107 True")
    time.sleep(1)
    broker.start()
    output, _ = process.communicate(timeout=30)
    assert output.strip() == "qos1 sent True", output
    watcher = Peer(broker.port, client_id="watcher")
    try:
        watcher.subscribe("wait/#", qos=1)
        messages = watcher.wait_for(1)
    finally:
        watcher.close()
    assert [(m.topic, m.payload) for m in messages] == [("wait/qos1", b"kept")]


def test_disconnect_ends_a_reconnecting_loop_promptly(broker, micropython):
    """The broker gone, the client keeps trying; disconnect() ends that at
    once: no attempt afterwards, and the loop is over within cycle_timeout."""
    process = micropython.start(
        """
        attempts = []
        client = mqtt.Client('quits', cycle_timeout=200)
        client.connect(HOST, 30, port=PORT, auto_reconnect=(50, 100),
                       breconnect_cb=lambda client: attempts.append(time.ticks_ms()))
        print('ready')
        wait_until(lambda: len(attempts) >= 3, 10000)
        start = time.ticks_ms()
        client.disconnect(timeout=1000)
        took = time.ticks_diff(time.ticks_ms(), start)
        count = len(attempts)
        time.sleep_ms(500)
        print(took < 400, len(attempts) == count, client.connected())
        """,
        PORT=broker.port,
    )
    expect_line(process, "ready")
    broker.terminate()
    output, _ = process.communicate(timeout=30)
    assert output.strip() == "True True False", output


def test_a_certificate_that_does_not_verify_is_retried_at_the_longest_gap(tls_broker, certificates, micropython):
    """Through the proxy, the broker's TLS listener is replaced by one whose
    certificate names another host: each handshake fails, is printed, and
    the next attempt waits at least max_ms / 2. Back to the right listener,
    the client connects again by itself."""
    proxy = Proxy(tls_broker.tls_ports["tls"])
    # The script prints only at the start and once connected again: a line
    # of its own while the loop prints would cut the loop's lines in two.
    process = micropython.start(
        """
        from tls_context import context
        times = []
        connects = []
        client = mqtt.Client('tls-retry')
        client.connect(HOST, 30, port=PORT, ssl_ctx=context(CA), auto_reconnect=(100, 1500),
                       breconnect_cb=lambda client: times.append(time.ticks_ms()),
                       aconnect_cb=lambda client: connects.append(1))
        print('ready')
        wait_until(lambda: len(connects) == 2, 20000)
        print('gaps', [time.ticks_diff(b, a) for a, b in zip(times, times[1:])])
        print('connected', client.connected())
        client.disconnect()
        """,
        PORT=proxy.port,
        CA=certificates.path("ca.crt.der"),
    )
    try:
        expect_line(process, "ready")
        proxy.target_port = tls_broker.tls_ports["wrong_host"]
        proxy.cut()
        # Long enough for two failed handshakes or more (each next attempt
        # within 1.5 s).
        time.sleep(4)
        proxy.target_port = tls_broker.tls_ports["tls"]
        output, _ = process.communicate(timeout=30)
    finally:
        proxy.close()
    failures = output.count("mqtt: TLS handshake failed; next attempt in")
    assert failures >= 2, output
    gaps = eval(next(line for line in output.splitlines() if line.startswith("gaps "))[5:])
    # Each attempt after a failed handshake waited in [max/2, max].
    assert len(gaps) == failures and all(750 <= gap <= 1500 + 150 for gap in gaps), output
    assert "connected True" in output, output
