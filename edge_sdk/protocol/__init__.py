"""The one doorway between devices and the aggregator: topics, control messages, chunking, adapter codec, transport.

Its data types (the bundle manifest, adapters, the rank policy and device profile) are plain
dataclasses over numpy, JSON and safetensors: the aggregator imports this package without the
device runtime (onnxruntime, tokenizers).
"""

from edge_sdk.protocol.adapter import Adapter
from edge_sdk.protocol.chunks import DEFAULT_CHUNK_SIZE, ChunkError, Reassembler, parse_chunk, split_payload
from edge_sdk.protocol.codec import (
    CODEC_VERSION, DTYPES, AdapterHeader, BadStatisticsError, ChecksumError, CodecError, DTypeError, HeaderError, MissingTensorError,
    NonFiniteError, NotAnAdapterError, PayloadTooLargeError, RankError, ShapeError, UnknownTensorError, VersionError,
    decode_adapter, encode_adapter, max_payload_bytes,
)
from edge_sdk.protocol.manifest import BundleError, LoraSettings, Manifest, read_manifest
from edge_sdk.protocol.messages import (
    PROTOCOL_VERSION, ClientStatus, DType, FederationConfig, GlobalAdapterRef, HeadMode, MessageError, Notice,
    RoundResult, RoundTask, Schedule, TrainingConfig, UnsupportedVersionError, decode_message, encode_message,
)
from edge_sdk.protocol.ranking import DeviceProfile, RankChoice, RankPolicy
from edge_sdk.protocol.statistics import FeatureStatistics, PriorStatistics, StatisticsError
from edge_sdk.protocol.topics import Topics, check_identifier

__all__ = [
    "CODEC_VERSION", "DEFAULT_CHUNK_SIZE", "DTYPES", "PROTOCOL_VERSION", "Adapter", "AdapterHeader", "BadStatisticsError", "BundleError",
    "ChecksumError", "ChunkError", "ClientStatus", "CodecError", "DType", "DTypeError", "DeviceProfile",
    "FeatureStatistics", "FederationConfig", "GlobalAdapterRef", "HeadMode", "HeaderError", "LoraSettings", "Manifest", "MessageError",
    "MissingTensorError", "NonFiniteError", "NotAnAdapterError", "Notice", "PayloadTooLargeError", "PriorStatistics",
    "RankChoice",
    "RankError", "RankPolicy", "Reassembler", "RoundResult", "RoundTask", "Schedule", "ShapeError", "StatisticsError", "Topics",
    "TrainingConfig", "UnknownTensorError", "UnsupportedVersionError", "VersionError", "check_identifier",
    "decode_adapter", "decode_message", "encode_adapter", "encode_message", "max_payload_bytes", "parse_chunk",
    "read_manifest", "split_payload",
]
