# QoS 0, 1 and 2 round trips through a connected client without a loop of
# its own: subscribes, publishes, runs cycles until all three came back.


def round_trips(client, cycles=200):
    got = []
    client.subscribe("stream/#", lambda client, payload, topic: got.append((topic, payload)), qos=2)
    for qos in (0, 1, 2):
        client.publish("stream/%d" % qos, b"qos %d" % qos, qos=qos)
    for _ in range(cycles):
        if len(got) == 3:
            break
        client.cycle()
    print("got", sorted(got))
