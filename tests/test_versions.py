"""Peers of another protocol version get a clear refusal on both sides (real mosquitto)."""

from __future__ import annotations

import json

import pytest

from edge_sdk.client import ClientRefusedError, FederatedClient
from edge_sdk.datasets import rotten_tomatoes
from edge_sdk.protocol import ClientStatus, Topics, encode_message
from edge_sdk.protocol.transport import BrokerSettings
from tests.federation import ReplayClient, aggregator_thread, wait_for


def _as_version(payload: bytes, version: int) -> bytes:
    return json.dumps({**json.loads(payload), "version": version}).encode()


def test_a_client_refuses_an_aggregator_of_another_protocol_version(minilm_bundle, mosquitto, tmp_path):
    settings = BrokerSettings.from_url(mosquitto.url)
    announcer = ReplayClient(settings, "future", "announcer", rank=2).join()
    announcer.connection.publish_all([(Topics("future").config, json.dumps(
        {"version": 2, "kind": "FederationConfig", "federation": "future"}).encode(), True)], timeout=5)
    client = FederatedClient(minilm_bundle, settings, "future", data=rotten_tomatoes()[:16], client_id="dev0",
                             state_dir=tmp_path / "client")
    with pytest.raises(ClientRefusedError, match="protocol version 2; this one speaks 1"):
        client.start(timeout=20)
    client.close()
    announcer.close()


def test_the_aggregator_refuses_a_client_of_another_protocol_version(minilm_bundle, mosquitto, tmp_path):
    settings = BrokerSettings.from_url(mosquitto.url)
    aggregator, thread, errors = aggregator_thread(minilm_bundle, settings, tmp_path / "state", "versions",
                                                   rounds=1, min_clients=1, round_timeout=30)
    old = ReplayClient(settings, "versions", "old-device", rank=2)
    old.connection.start(10)
    status = encode_message(ClientStatus(client_id="old-device", state="online", rank=2))
    old.connection.publish_all([(Topics("versions").status("old-device"), _as_version(status, 0), True)], timeout=5)
    wait_for(lambda: old.notices, 20, "a refusal notice")
    assert old.notices[0]["verdict"] == "refused"
    assert "version 0; this one speaks 1" in old.notices[0]["reason"]
    assert "old-device" not in aggregator.online
    aggregator.stop()
    thread.join(10)
    assert not errors
    old.close()
