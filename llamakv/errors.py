"""Errors llamakv raises for bad input; each message says what to do."""


class LlamaKVError(Exception):
    """Base class of llamakv's errors."""


class ModelError(LlamaKVError):
    """The model file is missing, unreadable or not a GGUF llama.cpp can load."""


class UnsupportedModelError(LlamaKVError):
    """The model's architecture (or rope mode) is not one llamakv can score."""


class ShimBuildError(LlamaKVError):
    """The C capture shim could not be compiled."""


class CacheFullError(LlamaKVError):
    """The prompt or generation does not fit in the free cells of the KV cache."""


class StateError(LlamaKVError):
    """A saved state is unreadable or belongs to another model."""


class CaptureError(LlamaKVError):
    """The eval callback saw something it could not handle."""


class DeviceError(LlamaKVError):
    """Scoring or compaction on the cache's device failed (out of device memory, an op the backend lacks)."""
