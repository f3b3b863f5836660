"""The framing every binary message of the protocol shares: MAGIC (8 bytes) | uint32 LE header length | JSON | body.

Adapter payloads and transfer chunks differ only in their magic, their header schema and the
error class a peer raises; the framing and the JSON parsing are checked once, here.
"""

from __future__ import annotations

import json
import math
import struct

PREFIX = struct.Struct("<8sI")
MAX_INT_DIGITS = 18
"""Integers in protocol JSON have at most this many digits (below 2^63), so every count fits int64/float64."""


def frame(magic: bytes, header: dict, body: bytes) -> bytes:
    """`header` as sorted, NaN-free JSON between the magic and `body`."""
    text = json.dumps(header, sort_keys=True, allow_nan=False).encode()
    return PREFIX.pack(magic, len(text)) + text + body


def unframe(message: bytes, magic: bytes, max_header: int, what: str,
            not_framed: type[ValueError], bad_header: type[ValueError]) -> tuple[dict, bytes]:
    """(header, body) of a framed `what`; `not_framed` for short or foreign bytes, `bad_header` for the header."""
    if len(message) < PREFIX.size:
        raise not_framed(f"{len(message)} bytes are too short for a {what}.")
    found, header_len = PREFIX.unpack_from(message)
    if found != magic:
        raise not_framed(f"Not a FedPEFT {what} (wrong magic).")
    if header_len > max_header or PREFIX.size + header_len > len(message):
        raise bad_header(f"The {what}'s header length {header_len} is out of bounds.")
    header = json_object(message[PREFIX.size:PREFIX.size + header_len], f"The {what}'s header", bad_header)
    return header, message[PREFIX.size + header_len:]


def json_object(raw: bytes, what: str, error: type[ValueError]) -> dict:
    """`raw` parsed as one JSON object, or `error` saying why not: bad UTF-8 or JSON, NaN or infinite
    numbers, integers of more than MAX_INT_DIGITS digits, too deep nesting, or not an object."""
    try:
        value = json.loads(raw.decode("utf-8"), parse_constant=_refuse_constant, parse_float=_finite_float,
                           parse_int=_bounded_int)
    except ValueError as err:
        raise error(f"{what} is not valid JSON: {err}") from err
    except RecursionError:
        raise error(f"{what} nests too deeply.") from None
    if not isinstance(value, dict):
        raise error(f"{what} must be a JSON object.")
    return value


def _refuse_constant(name: str) -> float:
    raise ValueError(f"{name} is not a number the protocol accepts")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:20]} overflows a float")
    return value


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError(f"an integer of {len(text)} digits is out of bounds")
    return int(text)
