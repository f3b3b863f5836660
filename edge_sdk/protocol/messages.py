"""Control messages (JSON): federation config, client status, round task, round result, notices.

Every message carries `version`; a peer refuses versions it does not speak with
`UnsupportedVersionError`. Decoding checks types and required fields and never trusts the
sender: anything malformed raises `MessageError` with the reason.
"""

from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass
from types import UnionType
from typing import Any, Literal, TypeVar, get_args, get_origin, get_type_hints

from edge_sdk.protocol.framing import json_object
from edge_sdk.protocol.ranking import DeviceProfile, RankChoice, RankPolicy
from edge_sdk.protocol.topics import check_identifier

PROTOCOL_VERSION = 1
MAX_MESSAGE_BYTES = 1 << 20


class MessageError(ValueError):
    """A control message is malformed."""


class UnsupportedVersionError(MessageError):
    """The peer speaks a protocol version this one does not."""


DType = Literal["float32", "float16", "int8"]
"""Element type of the adapter tensors a client uploads (int8: per-rank-component scales)."""
HeadMode = Literal["shared", "local"]
"""Whether the task head is averaged by the federation or stays on each device."""
Schedule = Literal["constant", "linear", "cosine"]
"""Learning-rate schedule of local training (after the warm-up)."""


@dataclass(frozen=True)
class TrainingConfig:
    """Local training each sampled client runs per round."""

    steps: int | None = None
    epochs: int = 1
    batch_size: int = 16
    lr: float = 1e-3
    schedule: Schedule = "linear"
    warmup_steps: int = 0
    proximal_mu: float = 0.0
    """FedProx's μ (0: plain local training); > 0 needs a `--proximal` bundle."""
    logit_adjustment: float = 0.0
    """τ of logit-adjusted local cross-entropy: each device trains on logits + τ·log of its own label
    frequencies (0: plain cross-entropy); > 0 needs a trainable head with an output bias."""
    feature_statistics: bool = False
    """Devices send, with each update, the feature statistics of their training examples at the
    received global, from which the server solves the head in closed form; needs a bundle with
    `Manifest.feature_width`."""
    statistics_rounds: int | None = None
    """With `feature_statistics`: devices send them in rounds up to this one only, and the server keeps
    the head it solved last from then on (None: every round)."""
    prior_calibration: bool = False
    """Devices send, with each update, per class the label count and the received global's predicted
    count on a sample of their training examples (`edge_sdk.client.PRIOR_SAMPLE`), and the server offsets
    each tier's output bias until its devices' pooled predicted counts match their label counts
    (`aggregator.calibration`); needs an output bias."""

    def sends_statistics(self, round_number: int) -> bool:
        """Whether devices send feature statistics with their update of `round_number`."""
        return self.feature_statistics and (self.statistics_rounds is None or round_number <= self.statistics_rounds)


@dataclass(frozen=True)
class FederationConfig:
    """Announced once (retained): what every client needs to profile itself, choose a tier and train."""

    federation: str
    bundle_id: str
    ranks: list[int]
    rank_policy: RankPolicy
    head: HeadMode
    dtype: DType
    chunk_size: int
    training: TrainingConfig
    rounds: int


@dataclass(frozen=True)
class ClientStatus:
    """A client's join message and presence (retained; the broker publishes the 'offline' last will)."""

    client_id: str
    state: Literal["online", "offline"]
    rank: int | None = None
    profile: DeviceProfile | None = None
    rank_choice: RankChoice | None = None


@dataclass(frozen=True)
class GlobalAdapterRef:
    """Where a tier's global adapter for this round is: its chunk count, size and SHA-256."""

    sha256: str
    num_bytes: int
    chunks: int


@dataclass(frozen=True)
class RoundTask:
    """The open round (retained): who trains, until when, from which global adapter per tier."""

    round: int
    attempt: int
    deadline: float
    sampled: list[str]
    seed: int
    globals: dict[str, GlobalAdapterRef] = field(default_factory=dict)
    finished: bool = False
    population: int | None = None
    """Clients online when the round's first sample was drawn (the privacy accountant's N)."""

    def global_for(self, rank: int) -> GlobalAdapterRef | None:
        return self.globals.get(str(rank))


@dataclass(frozen=True)
class RoundResult:
    """What a closed round produced; `metrics` holds the aggregator's per-round figures."""

    round: int
    participants: list[str]
    dropouts: list[str]
    rejected: dict[str, str]
    metrics: dict[str, float]


@dataclass(frozen=True)
class Notice:
    """Aggregator → one client: `verdict` is 'refused' (cannot take part) or 'rejected' (an update was dropped)."""

    client_id: str
    verdict: Literal["refused", "rejected"]
    reason: str
    round: int | None = None


Message = TypeVar("Message", FederationConfig, ClientStatus, RoundTask, RoundResult, Notice)
_KINDS = {cls.__name__: cls for cls in (FederationConfig, ClientStatus, RoundTask, RoundResult, Notice)}


def encode_message(message: FederationConfig | ClientStatus | RoundTask | RoundResult | Notice) -> bytes:
    """JSON bytes with the protocol version and the message kind."""
    body = {"version": PROTOCOL_VERSION, "kind": type(message).__name__, **asdict(message)}
    return json.dumps(body, sort_keys=True, allow_nan=False).encode()


def decode_message(payload: bytes, expected: type[Message]) -> Message:
    """Parse and validate a message of type `expected`."""
    if len(payload) > MAX_MESSAGE_BYTES:
        raise MessageError(f"Control message of {len(payload)} bytes exceeds {MAX_MESSAGE_BYTES}.")
    data = json_object(payload, "A control message", MessageError)
    version = data.pop("version", None)
    if version != PROTOCOL_VERSION:
        raise UnsupportedVersionError(
            f"Peer speaks FedPEFT protocol version {version!r}; this one speaks {PROTOCOL_VERSION}. "
            "Upgrade the older side."
        )
    kind = data.pop("kind", None)
    if kind != expected.__name__:
        raise MessageError(f"Expected a {expected.__name__} message, got {kind!r}.")
    return message_from_dict(expected, data)


def message_from_dict(cls: type[Message], data: dict[str, Any]) -> Message:
    """Build and check a message from its fields (without version and kind), e.g. read back from disk."""
    message = _build(cls, data)
    _check(message)
    return message


_T = TypeVar("_T")


def _build(cls: type[_T], data: dict[str, Any]) -> _T:
    hints = get_type_hints(cls)
    names = {f.name for f in fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise MessageError(f"{cls.__name__}: unexpected fields {sorted(unknown)}.")
    values = {}
    for f in fields(cls):
        if f.name not in data:
            if f.default is not MISSING or f.default_factory is not MISSING:
                continue
            raise MessageError(f"{cls.__name__}: missing field {f.name!r}.")
        values[f.name] = _convert(data[f.name], hints[f.name], f"{cls.__name__}.{f.name}")
    try:
        return cls(**values)
    except (TypeError, ValueError) as err:
        raise MessageError(f"{cls.__name__}: {err}") from err


def _convert(value: Any, hint: Any, where: str) -> Any:
    origin, args = get_origin(hint), get_args(hint)
    if is_dataclass(hint):
        if not isinstance(value, dict):
            raise MessageError(f"{where} must be an object.")
        return _build(hint, value)
    if origin is Literal:
        if not any(value == a and type(value) is type(a) for a in args):
            raise MessageError(f"{where} must be one of {list(args)}, got {value!r}.")
        return value
    if origin is UnionType:  # X | None
        return None if value is None else _convert(value, next(a for a in args if a is not type(None)), where)
    if origin is list:
        if not isinstance(value, list):
            raise MessageError(f"{where} must be a list.")
        return [_convert(v, args[0], where) for v in value]
    if origin is tuple:
        if not isinstance(value, list) or len(value) != len(args):
            raise MessageError(f"{where} must be a list of {len(args)} values.")
        return tuple(_convert(v, a, where) for v, a in zip(value, args))
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise MessageError(f"{where} must be an object with string keys.")
        return {k: _convert(v, args[1], where) for k, v in value.items()}
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise MessageError(f"{where} must be {hint.__name__}, got {type(value).__name__}.")
    return value


def _check(message: Any) -> None:
    """Semantic checks beyond types (identifiers, ranges)."""
    try:
        if isinstance(message, ClientStatus):
            check_identifier(message.client_id, "Client id")
        elif isinstance(message, RoundTask):
            for client in message.sampled:
                check_identifier(client, "Client id")
            if message.round < 0 or message.attempt < 0:
                raise MessageError("RoundTask.round and attempt must not be negative.")
            if message.population is not None and message.population < 0:
                raise MessageError("RoundTask.population must not be negative.")
        elif isinstance(message, FederationConfig):
            check_identifier(message.federation, "Federation id")
            if message.chunk_size < 1024 or not message.ranks:
                raise MessageError("FederationConfig needs chunk_size ≥ 1024 and tiers.")
        elif isinstance(message, Notice):
            check_identifier(message.client_id, "Client id")
    except ValueError as err:
        if isinstance(err, MessageError):
            raise
        raise MessageError(str(err)) from err
