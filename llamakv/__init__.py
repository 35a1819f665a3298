"""llamakv: Expected Attention KV-cache compression for llama.cpp (through llama-cpp-python)."""
# llama.cpp's shared libraries are loaded before numpy: with CUDA builds, loading them after
# numpy (or LLVM) segfaulted at model load on the H100 test machine (see README, GPU).
import llama_cpp  # noqa: F401  isort: skip
from .errors import (CacheFullError, CaptureError, LlamaKVError, ModelError, ShimBuildError,
                     StateError, UnsupportedModelError)
from .models import load_llama
from .scoring import ExpectedAttention, aggregate
from .session import CompressionReport, KVSession

__version__ = "0.1.0"
__all__ = ["KVSession", "load_llama", "CompressionReport", "ExpectedAttention", "aggregate",
           "LlamaKVError", "ModelError", "UnsupportedModelError", "ShimBuildError", "CacheFullError",
           "StateError", "CaptureError"]
