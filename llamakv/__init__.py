"""llamakv: Expected Attention KV-cache compression for llama.cpp (through llama-cpp-python)."""
# llama.cpp's shared libraries are loaded before numpy: with CUDA builds, loading them after
# numpy (or LLVM) segfaulted at model load on the H100 test machine (see README, GPU).
import llama_cpp  # noqa: F401  isort: skip
from .errors import (CacheFullError, CaptureError, LlamaKVError, ModelError, ShimBuildError,
                     StateError, UnsupportedModelError)
from .models import load_llama
from .scoring import ExpectedAttention, aggregate
from .compressor import CompressionReport, Compressor
from .context import Context, open_llama
from .generation import Generation, Sampling, decode_step
from .sequence import Sequence
from .session import KVSession

__version__ = "0.1.0"
__all__ = ["KVSession", "load_llama", "open_llama", "Context", "Sequence", "Compressor", "Generation", "Sampling",
           "decode_step", "CompressionReport", "ExpectedAttention", "aggregate",
           "LlamaKVError", "ModelError", "UnsupportedModelError", "ShimBuildError", "CacheFullError",
           "StateError", "CaptureError"]
