"""A representative session under valgrind's memcheck: no invalid read or
write, in the binding or the engine. (MicroPython's GC scans memory it
never wrote, on purpose, so uninitialised-value reports are off.)"""

import subprocess

VALGRIND = [
    "valgrind",
    "--error-exitcode=99",
    "--undef-value-errors=no",
    "--leak-check=no",
]


def test_session_under_memcheck(broker, micropython, tmp_path):
    script = tmp_path / "session.py"
    script.write_text(
        micropython.source(
            """
            got = []
            c = mqtt.Client("memcheck")
            c.set_will("m/will", b"gone")
            c.connect(HOST, 30, port=PORT)
            c.subscribe("m/#", lambda client, payload, topic: got.append((topic, len(payload))), qos=2)
            for qos in (0, 1, 2):
                c.publish("m/%d" % qos, b"x" * (1000 * qos), qos=qos)
            print(wait_until(lambda: len(got) == 3, 20000), sorted(got))
            c.unsubscribe("m/#")
            c.disconnect()
            """,
            PORT=broker.port,
        )
    )
    run = subprocess.run(
        VALGRIND + [str(micropython.firmware), str(script)], capture_output=True, text=True, timeout=300
    )
    assert "True [('m/0', 0), ('m/1', 1000), ('m/2', 2000)]" in run.stdout, run.stdout + run.stderr
    assert "Memcheck" in run.stderr, run.stderr
    assert "Invalid read" not in run.stderr and "Invalid write" not in run.stderr, run.stderr
    assert "ERROR SUMMARY: 0 errors" in run.stderr, run.stderr
    assert run.returncode == 0, run.stderr
