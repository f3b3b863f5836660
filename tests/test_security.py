"""The shipped production broker config (examples/mosquitto): TLS, passwords, per-client ACL, forged senders."""

from __future__ import annotations

import subprocess
import threading
import time
from dataclasses import replace

import pytest

from edge_sdk.protocol import AdapterHeader, encode_adapter
from edge_sdk.protocol.transport import BrokerSettings, BrokerUnavailableError, MqttConnection
from aggregator.broker import AGGREGATOR_USER, TOPIC_ACL, Mosquitto, free_port, local_broker
from tests.conftest import ROOT
from tests.federation import ReplayClient, aggregator_thread

EXAMPLE = ROOT / "examples" / "mosquitto"
PASSWORDS = {"aggregator": "agg-secret", "dev0": "dev0-secret", "dev1": "dev1-secret"}


@pytest.fixture
def secure_broker(tmp_path):
    etc = tmp_path / "etc"
    subprocess.run(["bash", str(EXAMPLE / "make-certs.sh"), str(etc)], check=True, capture_output=True)
    (etc / "acl").write_text((EXAMPLE / "acl").read_text())
    for i, (user, password) in enumerate(PASSWORDS.items()):
        flags = ["-c"] if i == 0 else []
        subprocess.run(["mosquitto_passwd", *flags, "-b", str(etc / "passwords"), user, password], check=True)
    port = free_port()
    config = (EXAMPLE / "mosquitto.conf").read_text() \
        .replace("/etc/mosquitto/fedpeft", str(etc)) \
        .replace("listener 8883", f"listener {port} 127.0.0.1") \
        .replace("/var/lib/mosquitto/", f"{tmp_path}/") + f"log_dest file {tmp_path}/mosquitto.log\n"
    broker = Mosquitto(tmp_path / "broker", config=config, port=port).start()
    yield BrokerSettings(host="127.0.0.1", port=port, tls_ca=etc / "ca.crt")
    broker.stop()


def _login(settings: BrokerSettings, user: str | None, password: str | None = None) -> BrokerSettings:
    return BrokerSettings(settings.host, settings.port, settings.tls_ca, user, password or PASSWORDS.get(user or ""))


def test_anonymous_wrong_password_and_plaintext_connections_are_refused(secure_broker):
    for settings, expected in [
        (_login(secure_broker, None), "refused"),
        (_login(secure_broker, "dev0", "guess"), "refused"),
        (BrokerSettings("127.0.0.1", secure_broker.port, None, "dev0", PASSWORDS["dev0"]), "no answer"),
    ]:
        with pytest.raises(BrokerUnavailableError, match=expected):
            MqttConnection("intruder", settings, lambda m: None).start(timeout=3)
    ok = MqttConnection("fedpeft-f-dev0", _login(secure_broker, "dev0"), lambda m: None).start(timeout=5)
    ok.stop()


def test_acl_lets_a_client_publish_only_under_its_own_id(secure_broker):
    seen: list[str] = []
    arrived = threading.Event()

    def record(message) -> None:
        seen.append(message.topic)
        if message.topic == "fedpeft/f/clients/dev1/update":
            arrived.set()

    watcher = MqttConnection("fedpeft-f-aggregator", _login(secure_broker, "aggregator"), record,
                             subscriptions=["fedpeft/#"]).start(5)
    attacker = MqttConnection("fedpeft-f-dev1", _login(secure_broker, "dev1"), lambda m: None).start(5)
    time.sleep(0.3)
    forbidden = ["fedpeft/f/clients/dev0/update", "fedpeft/f/clients/dev0/status", "fedpeft/f/task",
                 "fedpeft/f/global/r8/0", "fedpeft/f/config", "fedpeft/f/result", "fedpeft/f/notice/dev0"]
    attacker.publish_all([(topic, b"forged", False) for topic in forbidden], timeout=5)
    attacker.publish_all([("fedpeft/f/clients/dev1/update", b"own topic", False)], timeout=5)
    assert arrived.wait(5), "the client's own update topic must stay writable"
    time.sleep(0.3)
    assert seen == ["fedpeft/f/clients/dev1/update"], seen
    attacker.stop()
    watcher.stop()


def test_a_device_cannot_take_over_the_aggregators_session(secure_broker):
    """use_username_as_clientid: a device connecting under the aggregator's client id gets its own
    username as id, so the aggregator is never disconnected (MQTT's session takeover)."""
    arrived, connects = threading.Event(), []
    watcher = MqttConnection("fedpeft-f-aggregator", _login(secure_broker, "aggregator"),
                             lambda m: arrived.set() if m.topic == "fedpeft/f/clients/dev1/update" else None,
                             subscriptions=["fedpeft/#"], on_connect=lambda: connects.append(time.time())).start(5)
    attackers = [MqttConnection("fedpeft-f-aggregator", _login(secure_broker, "dev1"), lambda m: None).start(5)
                 for _ in range(3)]
    time.sleep(1.5)
    attackers[-1].publish_all([("fedpeft/f/clients/dev1/update", b"own topic", False)], timeout=5)
    assert arrived.wait(5)
    assert watcher.connected and len(connects) == 1, "the aggregator was knocked off and reconnected"
    for attacker in attackers:
        attacker.stop()
    watcher.stop()


def test_aggregator_over_tls_rejects_a_forged_sender_and_accepts_the_real_one(secure_broker, minilm_bundle,
                                                                              trained_adapters, tmp_path):
    aggregator, thread, errors = aggregator_thread(
        minilm_bundle, _login(secure_broker, "aggregator"), tmp_path / "state", "sec",
        rounds=1, clients_per_round=1, min_clients=1, round_timeout=60,
    )
    dev1 = ReplayClient(_login(secure_broker, "dev1"), "sec", "dev1", rank=2).join()
    task = dev1.next_task()
    adapter = trained_adapters["r2-0"]
    header = dict(federation="sec", round=task.round, rank=2, num_samples=50)
    dev1.upload(encode_adapter(adapter, AdapterHeader(client_id="dev0", **header)))
    dev1.upload(encode_adapter(adapter, AdapterHeader(client_id="dev1", **header)))
    thread.join(60)
    assert not thread.is_alive() and not errors
    record = aggregator.records[0]
    assert record.participants == ["dev1"]
    assert "forged sender" in record.rejected_reasons["dev1"]
    assert any("forged sender" in n["reason"] for n in dev1.notices)
    dev1.close()


def test_the_local_mosquitto_admits_only_its_devices_and_the_aggregator_under_the_shipped_acl(tmp_path):
    """The simulator's local broker: anonymous and unknown logins are refused, a device can neither forge another's
    update nor read it, nor knock the aggregator off by reusing its client id; the rules are the shipped ACL's."""
    shipped = [line for line in (EXAMPLE / "acl").read_text().splitlines() if line and not line.startswith("#")]
    assert shipped == [line for line in TOPIC_ACL.splitlines() if line]
    with local_broker(tmp_path / "broker", ["dev0", "dev1"]) as broker:
        assert isinstance(broker, Mosquitto) and "allow_anonymous false" in broker.config.read_text()
        for settings in (broker.settings, replace(broker.login("dev0"), password="guess"),
                         replace(broker.login("dev0"), username="dev9")):
            with pytest.raises(BrokerUnavailableError, match="refused"):
                MqttConnection("intruder", settings, lambda m: None).start(timeout=3)
        seen, connects, arrived = [], [], threading.Event()

        def record(message) -> None:
            seen.append(message.topic)
            if message.topic == "fedpeft/f/clients/dev1/update":
                arrived.set()

        watcher = MqttConnection("fedpeft-f-aggregator", broker.login(AGGREGATOR_USER), record,
                                 subscriptions=["fedpeft/#"], on_connect=lambda: connects.append(1)).start(5)
        snooped: list[str] = []
        attacker = MqttConnection("fedpeft-f-aggregator", broker.login("dev1"), lambda m: snooped.append(m.topic),
                                  subscriptions=["fedpeft/f/clients/+/update"]).start(5)
        time.sleep(0.3)
        attacker.publish_all([("fedpeft/f/clients/dev0/update", b"forged", False),
                              ("fedpeft/f/task", b"forged", False)], timeout=5)
        attacker.publish_all([("fedpeft/f/clients/dev1/update", b"own topic", False)], timeout=5)
        assert arrived.wait(5), "a device's own update topic stays writable"
        time.sleep(0.5)
        assert seen == ["fedpeft/f/clients/dev1/update"] and snooped == [], (seen, snooped)
        assert watcher.connected and connects == [1], "the aggregator's session was taken over"
        attacker.stop()
        watcher.stop()
