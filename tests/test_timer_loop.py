"""The loop as it runs on rp2 and lwIP boards: no thread of its own, turns
scheduled when the socket signals arriving data (lwIP's socket option 20)
and when a machine.Timer expires.

These run on a unix firmware built with MQTT_TIMER_LOOP=1
(`MQTT_TIMER_LOOP=1 ports/unix/build.sh`), given by MQTT_TIMER_FIRMWARE;
they skip without one. The unix port has neither lwIP sockets nor
machine.Timer, so the scripts bring stand-ins that behave as the boards'
do: the timer schedules its callback (micropython.schedule) when it
expires, and the socket schedules its callback when data arrives
(tests/micropython/board_standins.py)."""

import os
import textwrap
from pathlib import Path

import pytest

from conftest import Script, expect_line
from peer import Peer

FIRMWARE = os.environ.get("MQTT_TIMER_FIRMWARE")

@pytest.fixture
def timer_firmware(tmp_path):
    if not FIRMWARE:
        pytest.skip("set MQTT_TIMER_FIRMWARE to a firmware from MQTT_TIMER_LOOP=1 ports/unix/build.sh")
    firmware = Path(FIRMWARE)
    assert firmware.exists(), f"no firmware at {firmware}"
    scripts = Script(firmware, tmp_path)
    yield scripts
    scripts.stop_all()


def script(code):
    """The test's code after the board stand-ins (tests/micropython/)."""
    return "from board_standins import *\n" + textwrap.dedent(code)


def test_data_and_keepalive_drive_the_loop_without_a_thread(broker, timer_firmware):
    """Messages arrive while the program sleeps, turns start from the
    arrival signal, and the timer alone keeps an idle link alive."""
    peer = Peer(broker.port)
    peer.subscribe("board/out", qos=1)
    process = timer_firmware.start(
        script(
            """
            got = []
            link = LwipSocket(PORT)
            c = mqtt.Client("timer-loop")
            c.connect("broker", 2, stream=link)
            print("loop", mqtt.LOOP)
            c.subscribe("board/in", lambda client, payload, topic: got.append(payload), qos=2)
            print("ready")
            print("received", wait_until(lambda: len(got) == 3, 10000), sorted(got))
            print("signalled", link.signals > 0)
            # Idle for three keepalive periods: only the timer's pings keep
            # the broker from closing the link (it waits 1.5 periods).
            # (sleep_ms: on the unix port, unlike the boards, time.sleep()
            # runs no scheduled callback until it returns.)
            time.sleep_ms(6000)
            print("still connected", c.connected())
            c.publish("board/out", b"after the idle time", qos=1)
            c.disconnect()
            link.close()
            """
        ),
        PORT=broker.port,
    )
    expect_line(process, "loop scheduled")
    expect_line(process, "ready")
    for qos in (0, 1, 2):
        peer.publish("board/in", b"qos %d" % qos, qos=qos)
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 0, output
    assert "received True [b'qos 0', b'qos 1', b'qos 2']" in output
    assert "signalled True" in output
    assert "still connected True" in output
    assert [m.payload for m in peer.wait_for(1)] == [b"after the idle time"]
    peer.close()


def test_a_stream_without_arrival_signal_is_polled_by_the_timer(broker, timer_firmware):
    """A UART has no option 20: the timer then wakes the loop every
    cycle_timeout, and messages still arrive while the program sleeps."""
    peer = Peer(broker.port)
    process = timer_firmware.start(
        script(
            """
            got = []
            link = LwipSocket(PORT, signals=False)
            c = mqtt.Client("polled", cycle_timeout=50)
            c.connect("broker", 30, stream=link)
            c.subscribe("board/in", lambda client, payload, topic: got.append(payload), qos=1)
            print("ready")
            print("received", wait_until(lambda: got, 5000), got)
            c.disconnect()
            link.close()
            """
        ),
        PORT=broker.port,
    )
    expect_line(process, "ready")
    peer.publish("board/in", b"polled", qos=1)
    output, _ = process.communicate(timeout=30)
    assert process.returncode == 0, output
    assert "received True [b'polled']" in output
    peer.close()


def test_a_lost_link_reaches_loop_failure(broker, timer_firmware):
    """When the broker goes away, a turn finds the closed link and calls
    loop_failure on the main thread; BREAK_LOOP ends the loop."""
    process = timer_firmware.start(
        script(
            """
            failures = []
            def on_failure(client):
                failures.append(client.connected())
                return mqtt.BREAK_LOOP
            link = LwipSocket(PORT)
            c = mqtt.Client("orphan")
            c.connect("broker", 30, stream=link, loop_failure=on_failure)
            print("ready")
            print("reported", wait_until(lambda: failures, 10000), failures)
            time.sleep_ms(300)
            print("reported once", failures == [False])
            link.close()
            """
        ),
        PORT=broker.port,
    )
    expect_line(process, "ready")
    broker.terminate()
    output, _ = process.communicate(timeout=30)
    assert process.returncode == 0, output
    assert "reported True [False]" in output
    assert "reported once True" in output
