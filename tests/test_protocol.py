"""Protocol module: control messages and versions, chunking and reassembly, topics, reconnect backoff."""

from __future__ import annotations

import json
import os
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_sdk.protocol import (
    ChunkError, ClientStatus, FederationConfig, GlobalAdapterRef, MessageError, Notice, Reassembler, RoundTask, Topics,
    TrainingConfig, UnsupportedVersionError, decode_message, encode_message, parse_chunk, split_payload,
)
from edge_sdk.protocol.ranking import DeviceProfile, RankChoice, RankPolicy
from edge_sdk.protocol.transport import BrokerSettings, backoff_delay


def _task() -> RoundTask:
    return RoundTask(round=3, attempt=1, deadline=1e9, sampled=["a", "b"], seed=7,
                     globals={"8": GlobalAdapterRef(sha256="ab" * 32, num_bytes=10, chunks=1)})


def test_messages_round_trip_with_version_and_kind():
    config = FederationConfig("fed", "0123", [2, 8], RankPolicy.balanced(8, 2**30, 4.0, 100), "shared", "int8", 1 << 20,
                              TrainingConfig(steps=5, lr=2e-3, proximal_mu=0.01), 3)
    profile = DeviceProfile(memory_bytes=2**30, compute=1.5, num_samples=40, cpu_cores=2, threads=1, device="cpu",
                            providers=["CPUExecutionProvider"], preset="low")
    choice = RankChoice(rank=8, raw_rank=9, formula_tier=8, memory_needed_bytes=2**28, memory_available_bytes=2**30)
    for message in (config, _task(), ClientStatus("dev-1", "online", rank=8, profile=profile, rank_choice=choice)):
        payload = encode_message(message)
        assert json.loads(payload)["version"] == 1
        assert decode_message(payload, type(message)) == message


def test_unknown_protocol_version_is_refused_clearly():
    data = json.loads(encode_message(_task()))
    data["version"] = 2
    with pytest.raises(UnsupportedVersionError, match="version 2; this one speaks 1"):
        decode_message(json.dumps(data).encode(), RoundTask)


@pytest.mark.parametrize("mutate, match", [
    (lambda d: d.pop("seed"), "missing field 'seed'"),
    (lambda d: d.update(seed=True), "seed must be int"),
    (lambda d: d.update(sampled=["a/b"]), "not valid"),
    (lambda d: d.update(extra=1), "unexpected fields"),
    (lambda d: d.update(kind="Notice"), "Expected a RoundTask"),
    (lambda d: d["globals"]["8"].pop("chunks"), "missing field 'chunks'"),
])
def test_malformed_messages_raise_message_error(mutate, match):
    data = json.loads(encode_message(_task()))
    mutate(data)
    with pytest.raises(MessageError, match=match):
        decode_message(json.dumps(data).encode(), RoundTask)


@pytest.mark.parametrize("kind, field, value", [
    (ClientStatus, "state", "sleeping"), (FederationConfig, "head", "global"), (FederationConfig, "dtype", "int4"),
    (Notice, "verdict", "maybe"),
])
def test_fields_with_fixed_choices_refuse_other_values(kind, field, value):
    config = FederationConfig("fed", "0123", [2, 8], RankPolicy.balanced(8, 2**30, 4.0, 100), "shared", "int8",
                              1 << 20, TrainingConfig(), 3)
    message = {ClientStatus: ClientStatus("dev-1", "online"), FederationConfig: config,
               Notice: Notice("dev-1", "rejected", "late")}[kind]
    data = {**json.loads(encode_message(message)), field: value}
    with pytest.raises(MessageError, match=f"{field} must be one of"):
        decode_message(json.dumps(data).encode(), kind)
    data = json.loads(encode_message(config))
    data["training"]["schedule"] = "step"
    with pytest.raises(MessageError, match="schedule must be one of"):
        decode_message(json.dumps(data).encode(), FederationConfig)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_never_decode_into_a_task(payload):
    with pytest.raises(MessageError):
        decode_message(payload, RoundTask)


def test_chunks_reassemble_in_any_order_with_checksums():
    payload = os.urandom(10_000)
    chunks = split_payload(payload, chunk_size=1024)
    assert len(chunks) == 10
    random.Random(0).shuffle(chunks)
    reassembler = Reassembler(max_size=20_000)
    results = [reassembler.add("dev", c) for c in chunks]
    assert [r[0] for r in results[:-1]] == [None] * 9
    assert results[-1] == (payload, None)


def test_corrupt_chunk_fails_that_transfer_only():
    reassembler = Reassembler(max_size=20_000)
    good, bad = split_payload(b"x" * 3000, 1024), split_payload(b"y" * 3000, 1024)
    flipped = bytearray(bad[1])
    flipped[-1] ^= 1
    reassembler.add("mallory", bad[0])
    with pytest.raises(ChunkError, match="SHA-256"):
        reassembler.add("mallory", bytes(flipped))
    assert reassembler.pending() == {}
    assert [reassembler.add("dev", c)[0] for c in good][-1] == b"x" * 3000


def test_missing_chunk_is_reported_when_a_new_transfer_starts_or_expires():
    reassembler = Reassembler(max_size=20_000)
    first, second = split_payload(b"a" * 3000, 1024), split_payload(b"b" * 2000, 1024)
    reassembler.add("dev", first[0])
    reassembler.add("dev", first[2])
    complete, failed = reassembler.add("dev", second[0])
    assert complete is None and "incomplete (2/3 chunks)" in failed
    assert reassembler.expire(older_than=0) == {"dev": "missing chunks: 1/2 arrived"}


@pytest.mark.parametrize("message, match", [
    (b"", "too short"),
    (b"NOTCHUNK" + b"\0" * 8, "wrong magic"),
    (split_payload(b"z" * 5000, 1024)[0], "exceeds"),
])
def test_bad_chunk_frames(message, match):
    with pytest.raises(ChunkError, match=match):
        parse_chunk(message, max_size=4096)


def test_topics_are_namespaced_and_reject_wildcards():
    topics = Topics("fed-1")
    assert topics.update("dev.7") == "fedpeft/fed-1/clients/dev.7/update"
    assert topics.client_of("fedpeft/fed-1/clients/dev.7/update") == "dev.7"
    assert topics.client_of("fedpeft/other/clients/dev.7/update") is None
    for bad in ("dev/1", "dev+", "#", "", "x" * 65):
        with pytest.raises(ValueError, match="not valid"):
            topics.update(bad)


def test_backoff_grows_exponentially_with_jitter_and_a_cap():
    rng = random.Random(1)
    delays = [backoff_delay(attempt, base=0.5, cap=8.0, rng=rng) for attempt in range(8)]
    for attempt, delay in enumerate(delays):
        ceiling = min(8.0, 0.5 * 2 ** attempt)
        assert ceiling / 2 <= delay <= ceiling
    assert len({round(backoff_delay(5, rng=rng), 6) for _ in range(20)}) > 1, "jitter spreads reconnects"


def test_broker_urls():
    assert BrokerSettings.from_url("mqtt://10.0.0.2:1999") == BrokerSettings("10.0.0.2", 1999)
    assert BrokerSettings.from_url("broker.local").port == 1883
    with pytest.raises(ValueError, match="CA certificate"):
        BrokerSettings.from_url("mqtts://broker.local")
    with pytest.raises(ValueError, match="mqtt://host:port"):
        BrokerSettings.from_url("http://broker.local")
