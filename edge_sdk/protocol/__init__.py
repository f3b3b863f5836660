"""The one doorway between devices and the aggregator: adapter codec (and, with the service, topics and messages)."""

from edge_sdk.protocol.codec import (
    CODEC_VERSION, DTYPES, AdapterHeader, ChecksumError, CodecError, DTypeError, HeaderError, MissingTensorError,
    NonFiniteError, NotAnAdapterError, PayloadTooLargeError, RankError, ShapeError, UnknownTensorError,
    VersionError, decode_adapter, encode_adapter, max_payload_bytes,
)

__all__ = [
    "CODEC_VERSION", "DTYPES", "AdapterHeader", "ChecksumError", "CodecError", "DTypeError", "HeaderError",
    "MissingTensorError", "NonFiniteError", "NotAnAdapterError", "PayloadTooLargeError", "RankError", "ShapeError",
    "UnknownTensorError", "VersionError", "decode_adapter", "encode_adapter", "max_payload_bytes",
]
