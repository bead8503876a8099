# A round trip through a broker: subscribe, publish at each QoS, receive.
# Run by ports/unix/demo.sh with BROKER_PORT defined before this code.
import mqtt
import time

received = []


def on_message(client, payload, topic):
    received.append((topic, payload))


client = mqtt.Client("mqtt-demo")
client.connect("127.0.0.1", 30, port=BROKER_PORT)
client.subscribe("demo/#", on_message, qos=2)
for qos in (0, 1, 2):
    start = time.ticks_us()
    client.publish("demo/qos%d" % qos, b"hello at QoS %d" % qos, qos=qos)
    while len(received) <= qos:
        time.sleep_ms(1)
    elapsed = time.ticks_diff(time.ticks_us(), start)
    print("round trip QoS %d: %r on %s in %d us" % (qos, received[qos][1], received[qos][0], elapsed))
client.disconnect()
