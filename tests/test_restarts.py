"""No message is lost while mosquitto (with persistence) is restarted ten
times under a stream of numbered messages: the firmware's loop_failure
reconnects each time with clean_session=False."""

import threading
import time

import pytest

from conftest import RESET_NOTICE_S, expect_line
from peer import Peer

RESTARTS = 10
# Between two restarts: time for the firmware to notice the lost link and
# reconnect, so that each restart hits a live link.
RESTART_PAUSE = 0.4 + RESET_NOTICE_S

# About 30 s in all (a minute on lwIP): once per kind of loop (conftest.py's
# "long").
pytestmark = pytest.mark.long

# The firmware's side: reconnect until the broker answers, then go on.
RECONNECTING = """
        failures = []
        def recover(client):
            failures.append(1)
            while True:
                try:
                    if client.reconnect() == 0:
                        return mqtt.RECOVERED
                except OSError:
                    pass
                time.sleep_ms(50)
"""


def link_failures(output):
    """How often the firmware's loop_failure ran: the restarts must have
    hit it, or the test proves nothing."""
    return int(output.split("link failures")[1].split()[0])


def restart_repeatedly(broker, stop):
    for _ in range(RESTARTS):
        if stop.wait(RESTART_PAUSE):
            break
        broker.restart()


@pytest.mark.parametrize("qos", [1, 2])
def test_firmware_receives_every_number_through_restarts(persistent_broker, micropython, qos):
    count = 400
    process = micropython.start(
        RECONNECTING
        + """
        got = []
        c = mqtt.Client("sink-%d" % QOS, clean_session=False)
        c.connect(HOST, 5, port=PORT, loop_failure=recover)
        c.subscribe("numbers", lambda client, payload, topic: got.append(int(payload)), qos=QOS)
        print("ready")
        wait_until(lambda: len(set(got)) >= COUNT, 60000)
        time.sleep_ms(500)
        print("distinct", len(set(got)) == COUNT, "duplicates", len(got) - len(set(got)))
        print("link failures", len(failures))
        c.disconnect()
        """,
        PORT=persistent_broker.port,
        QOS=qos,
        COUNT=count,
    )
    check_every_number_arrives(persistent_broker, process, count, qos, f"source-{qos}")


def check_every_number_arrives(broker, process, count, qos, source_id):
    """Once the firmware's script printed "ready": a paho source publishes
    the numbers 0 to count - 1 on "numbers" while the broker restarts
    RESTARTS times; the script must have printed that it got each (QoS 2:
    once) and that the restarts hit its link."""
    expect_line(process, "ready")
    source = Peer(broker.port, client_id=source_id, clean_session=False)
    source.client.reconnect_delay_set(min_delay=0.05, max_delay=0.2)
    stop = threading.Event()
    restarter = threading.Thread(target=restart_repeatedly, args=(broker, stop))
    restarter.start()
    try:
        for number in range(count):
            source.client.publish("numbers", str(number), qos=qos)
            # Paced to last as long as the restarts.
            time.sleep(RESTARTS * RESTART_PAUSE / count)
        restarter.join()
        output, _ = process.communicate(timeout=90)
    finally:
        stop.set()
        restarter.join()
        source.close()
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, output
    assert "distinct True" in output, output
    assert link_failures(output) >= RESTARTS // 2, output
    if qos == 2:
        assert "duplicates 0" in output, output


@pytest.mark.parametrize("qos", [1, 2])
def test_subscriber_gets_every_number_the_firmware_publishes_through_restarts(persistent_broker, micropython, qos):
    # Paced to outlast the restarts: half as long again (7 s on unix).
    count = 500
    pace_ms = round(1500 * RESTARTS * RESTART_PAUSE / count)
    sink = Peer(persistent_broker.port, client_id="persistent-sink", clean_session=False)
    sink.client.reconnect_delay_set(min_delay=0.05, max_delay=0.2)
    sink.subscribe("numbers", qos=qos)
    process = micropython.start(
        RECONNECTING
        + """
        import sys
        c = mqtt.Client("source", clean_session=False, command_timeout=3000)
        c.connect(HOST, 5, port=PORT, loop_failure=recover)
        print("ready")
        sys.stdin.readline()
        number = 0
        in_flight_errors = 0
        while number < COUNT:
            try:
                c.publish("numbers", str(number), qos=QOS)
                number += 1
            except mqtt.MQTTException:
                # Taken but not yet acknowledged: it is sent again after the
                # reconnect, so go on with the next number.
                in_flight_errors += 1
                number += 1
            except OSError:
                # Not taken (no link, or the in-flight table is full): retry.
                time.sleep_ms(20)
            time.sleep_ms(PACE_MS)
        print("published", in_flight_errors)
        print("link failures", len(failures))
        wait_until(lambda: False, 3000)
        c.disconnect()
        """,
        PORT=persistent_broker.port,
        COUNT=count,
        QOS=qos,
        PACE_MS=pace_ms,
    )
    expect_line(process, "ready")
    stop = threading.Event()
    restarter = threading.Thread(target=restart_repeatedly, args=(persistent_broker, stop))
    try:
        process.stdin.write("go\n")
        process.stdin.flush()
        restarter.start()
        restarter.join()
        output, _ = process.communicate(timeout=90)
        assert process.returncode == 0, output
        messages = sink.wait_for(count, timeout=30)
        deadline = time.monotonic() + 30
        while len({int(m.payload) for m in sink.messages}) < count and time.monotonic() < deadline:
            time.sleep(0.2)
        numbers = {int(m.payload) for m in sink.messages}
        duplicates = len(sink.messages) - len(numbers)
    finally:
        stop.set()
        if restarter.is_alive():
            restarter.join()
        sink.close()
        if process.poll() is None:
            process.kill()
    assert numbers == set(range(count)), (sorted(set(range(count)) - numbers), output)
    if qos == 2:
        assert duplicates == 0, output
    assert link_failures(output) >= RESTARTS // 2, output
