"""The one doorway between devices and the aggregator: topics, control messages, chunking, adapter codec, transport."""

from edge_sdk.protocol.chunks import DEFAULT_CHUNK_SIZE, ChunkError, Reassembler, parse_chunk, split_payload
from edge_sdk.protocol.codec import (
    CODEC_VERSION, DTYPES, AdapterHeader, ChecksumError, CodecError, DTypeError, HeaderError, MissingTensorError,
    NonFiniteError, NotAnAdapterError, PayloadTooLargeError, RankError, ShapeError, UnknownTensorError, VersionError,
    decode_adapter, encode_adapter, max_payload_bytes,
)
from edge_sdk.protocol.messages import (
    PROTOCOL_VERSION, ClientStatus, FederationConfig, GlobalAdapterRef, MessageError, Notice, RoundResult, RoundTask,
    TrainingConfig, UnsupportedVersionError, decode_message, encode_message,
)
from edge_sdk.protocol.topics import Topics, check_identifier

__all__ = [
    "CODEC_VERSION", "DEFAULT_CHUNK_SIZE", "DTYPES", "PROTOCOL_VERSION", "AdapterHeader", "ChecksumError",
    "ChunkError", "ClientStatus", "CodecError", "DTypeError", "FederationConfig", "GlobalAdapterRef", "HeaderError",
    "MessageError", "MissingTensorError", "NonFiniteError", "NotAnAdapterError", "Notice", "PayloadTooLargeError",
    "RankError", "Reassembler", "RoundResult", "RoundTask", "ShapeError", "Topics", "TrainingConfig",
    "UnknownTensorError", "UnsupportedVersionError", "VersionError", "check_identifier", "decode_adapter",
    "decode_message", "encode_adapter", "encode_message", "max_payload_bytes", "parse_chunk", "split_payload",
]
