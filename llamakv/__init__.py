"""llamakv: Expected Attention KV-cache compression for llama.cpp (through llama-cpp-python)."""
from .errors import (CacheFullError, CaptureError, LlamaKVError, ModelError, ShimBuildError,
                     StateError, UnsupportedModelError)
from .scoring import ExpectedAttention, aggregate
from .session import CompressionReport, KVSession

__version__ = "0.1.0"
__all__ = ["KVSession", "CompressionReport", "ExpectedAttention", "aggregate", "LlamaKVError",
           "ModelError", "UnsupportedModelError", "ShimBuildError", "CacheFullError",
           "StateError", "CaptureError"]
