"""TLS with MicroPython's tls.SSLContext against mosquitto's TLS listeners,
with certificates made by openssl for this run."""

import pytest

from peer import Peer


# The scripts' SSLContext (tests/micropython/tls_context.py).
CONTEXT = """
        from tls_context import context
"""


def test_publish_and_receive_over_tls(tls_broker, certificates, micropython):
    peer = Peer(tls_broker.port)
    peer.subscribe("secure/#", qos=1)
    output = micropython.run(
        CONTEXT
        + """
        got = []
        c = mqtt.Client("tls-client")
        c.connect(HOST, 30, port=PORT, ssl_ctx=context(CA))
        print(c.connected())
        c.subscribe("secure/#", lambda client, payload, topic: got.append((topic, payload)), qos=2)
        big = bytes(range(256)) * 400
        for qos in (0, 1, 2):
            c.publish("secure/%d" % qos, b"over tls %d" % qos, qos=qos)
        c.publish("secure/big", big, qos=1)
        print(wait_until(lambda: len(got) == 4, 10000))
        print(sorted(got)[:3], sorted(got)[3] == ("secure/big", big))
        c.disconnect()
        print(c.connected())
        """,
        PORT=tls_broker.tls_ports["tls"],
        CA=certificates.path("ca.crt.der"),
    )
    lines = output.strip().splitlines()
    assert lines == [
        "True",
        "True",
        "[('secure/0', b'over tls 0'), ('secure/1', b'over tls 1'), ('secure/2', b'over tls 2')] True",
        "False",
    ], output
    messages = peer.wait_for(4)
    assert sorted(m.topic for m in messages) == ["secure/0", "secure/1", "secure/2", "secure/big"]
    peer.close()


@pytest.mark.parametrize(
    "listener, ca, reason",
    [
        ("tls", "other-ca.crt.der", "The certificate is not correctly signed by the trusted CA"),
        ("wrong_host", "ca.crt.der", "The certificate Common Name (CN) does not match with the expected CN"),
    ],
    ids=["wrong CA", "certificate for another host"],
)
def test_untrusted_server_is_refused_quickly(tls_broker, certificates, micropython, listener, ca, reason):
    output = micropython.run(
        CONTEXT
        + """
        c = mqtt.Client("careful", command_timeout=5000)
        start = time.ticks_ms()
        try:
            c.connect(HOST, 30, port=PORT, ssl_ctx=context(CA))
            print("connected: WRONG")
        except ValueError as e:
            # What the tls module raises: mbedtls's verification report.
            print(" ".join(str(e).split()))
        print(time.ticks_diff(time.ticks_ms(), start) < 5000, c.connected())
        """,
        PORT=tls_broker.tls_ports[listener],
        CA=certificates.path(ca),
        timeout=30,
    )
    lines = output.strip().splitlines()
    assert lines[0] == reason, output
    assert lines[1] == "True False", output


def test_mutual_tls_with_a_client_certificate(tls_broker, certificates, micropython):
    output = micropython.run(
        CONTEXT
        + """
        got = []
        c = mqtt.Client("mutual")
        c.connect(HOST, 30, port=PORT, ssl_ctx=context(CA, CLIENT))
        c.subscribe("m", lambda client, payload, topic: got.append(payload), qos=1)
        c.publish("m", "with client certificate", qos=1)
        print(wait_until(lambda: got), got)
        c.disconnect()
        anonymous = mqtt.Client("no-certificate", command_timeout=5000)
        try:
            anonymous.connect(HOST, 30, port=PORT, ssl_ctx=context(CA))
            print("connected: WRONG")
        except OSError as e:
            print("refused without a certificate:", type(e).__name__)
        print(anonymous.connected())
        """,
        PORT=tls_broker.tls_ports["mutual"],
        CA=certificates.path("ca.crt.der"),
        CLIENT=certificates.path("client"),
        timeout=30,
    )
    assert output.strip().splitlines() == [
        "True [b'with client certificate']",
        "refused without a certificate: OSError",
        "False",
    ], output
