"""Build (once, cached) and load the C shim against the installed llama-cpp-python.

The shim is compiled from `csrc/` with the system C compiler, against the headers and shared
libraries that llama-cpp-python installed (`site-packages/include`, `llama_cpp/lib`), so llama.cpp
is never built twice. The cache key covers the llama-cpp-python version, the shim sources and the
compiler command, so upgrading either rebuilds.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from importlib import metadata
from pathlib import Path

import cffi
import numpy as np

from .errors import ShimBuildError

_SRC_DIR = Path(__file__).resolve().parent / "csrc"
_SOURCES = ("llamakv_shim.c", "llamakv_device.c", "llamakv_shim.h")
_LOCK = threading.Lock()
_LOADED = None


def llama_cpp_dirs() -> tuple[Path, Path]:
    import llama_cpp

    pkg = Path(llama_cpp.__file__).resolve().parent
    lib_dir = pkg / "lib"
    include_dir = pkg.parent / "include"
    if not (include_dir / "ggml.h").exists():
        raise ShimBuildError(
            f"llama-cpp-python's headers were not found in {include_dir}; "
            "reinstall it with `pip install --force-reinstall llama-cpp-python==0.3.36`"
        )
    if not any(lib_dir.glob("libggml-base*")):
        raise ShimBuildError(f"libggml-base was not found in {lib_dir}")
    return include_dir, lib_dir


def cache_dir() -> Path:
    root = os.environ.get("LLAMAKV_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "llamakv"
    )
    return Path(root)


def _compiler() -> str:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not cc:
        raise ShimBuildError(
            "llamakv compiles a small C shim on first use and needs a C compiler: none was found "
            "(tried $CC, cc, gcc, clang). Install one, e.g. `apt-get install gcc` or "
            "`xcode-select --install`, or set CC."
        )
    return cc


def _header_cdef() -> str:
    text = (_SRC_DIR / "llamakv_shim.h").read_text()
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    return "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        return ""


def _compile(cc: str, flags: list[str], libs: list[str], out_dir: Path, verbose: bool) -> tuple[Path | None, str]:
    fd, tmp = tempfile.mkstemp(prefix=".build-", suffix=".so", dir=out_dir)
    os.close(fd)
    cmd = [cc, *flags, *(str(_SRC_DIR / name) for name in _SOURCES if name.endswith(".c")), "-o", tmp, *libs]
    if verbose:
        print("llamakv: building the C shim:", " ".join(cmd), file=sys.stderr)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as e:
        os.unlink(tmp)
        raise ShimBuildError(f"could not run the C compiler {cc!r}: {e}") from e
    if proc.returncode != 0:
        os.unlink(tmp)
        return None, f"{' '.join(cmd)}\n{proc.stderr}"
    return Path(tmp), ""


def build(verbose: bool = False) -> Path:
    """Compile the shim if no cached build matches; return the path of the shared library."""
    include_dir, lib_dir = llama_cpp_dirs()
    cc = _compiler()
    # built where it runs: -march=native vectorises the state kernels for this CPU (the CPU's
    # flags are part of the cache key, so a cache shared with another machine rebuilds);
    # -std=c11 alone turns off fused multiply-adds (-ffp-contract=off): 12% of the logits' time
    flags = ["-O3", "-march=native", "-shared", "-fPIC", "-pthread", "-std=c11", "-ffp-contract=fast",
             f"-I{include_dir}", f"-I{_SRC_DIR}"]
    libs = [f"-L{lib_dir}", "-lggml-base", "-lggml", f"-Wl,-rpath,{lib_dir}"]
    h = hashlib.sha256()
    h.update(metadata.version("llama_cpp_python").encode())
    h.update(str(lib_dir).encode())
    h.update(" ".join([cc, *flags, *libs]).encode())
    h.update(_cpu_flags().encode())
    for name in _SOURCES:
        h.update((_SRC_DIR / name).read_bytes())
    out_dir = cache_dir() / "shim" / h.hexdigest()[:16]
    lib = out_dir / "libllamakv_shim.so"
    if lib.exists():
        return lib
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp, err = _compile(cc, flags, libs, out_dir, verbose)
    if tmp is None:
        raise ShimBuildError(f"compiling the llamakv C shim failed:\n{err}")
    os.replace(tmp, lib)  # atomic: concurrent builders never load a half-written file
    return lib


class Shim:
    """The loaded shim: cffi handle, library and the address of the eval callback."""

    def __init__(self, path: Path):
        self.ffi = cffi.FFI()
        self.ffi.cdef(_header_cdef())
        self.path = path
        self.lib = self.ffi.dlopen(str(path))
        self.callback_address = int(self.ffi.cast("uintptr_t", self.ffi.addressof(self.lib, "llamakv_eval_callback")))

    def op_code(self, name: str) -> int:
        code = self.lib.llamakv_op_code(name.encode())
        if code < 0:
            raise ValueError(f"unknown ggml op {name!r}")
        return code

    def error_string(self, code: int) -> str:
        return self.ffi.string(self.lib.llamakv_error_string(code)).decode()


def load(verbose: bool = False) -> Shim:
    global _LOADED
    with _LOCK:
        if _LOADED is None:
            _LOADED = Shim(build(verbose))
        return _LOADED


def ptr(ctype: str, array: np.ndarray):
    """A cffi pointer of type `ctype` to a C-contiguous numpy array's data."""
    assert array.flags.c_contiguous
    return load().ffi.cast(ctype, array.ctypes.data)


_POOL = None


def parallel_map(fn, items) -> list:
    """fn over items on a pool of threads (one per core): the shim's kernels and most numpy work
    release the GIL, so per-layer work runs in parallel."""
    global _POOL
    items = list(items)
    if len(items) <= 1 or (os.cpu_count() or 1) == 1:
        return [fn(x) for x in items]
    with _LOCK:
        if _POOL is None:
            from concurrent.futures import ThreadPoolExecutor
            _POOL = ThreadPoolExecutor(max_workers=os.cpu_count(), thread_name_prefix="llamakv")
    return list(_POOL.map(fn, items))


_SCRATCH = threading.local()


def scratch(name: str, shape: tuple, dtype=np.float32) -> np.ndarray:
    """A per-thread work array, kept between calls: the pool's threads score layer after layer
    and compression after compression, and fresh multi-MB arrays cost page faults each time."""
    arrays = _SCRATCH.__dict__.setdefault("arrays", {})
    size = int(np.prod(shape)) * np.dtype(dtype).itemsize
    buf = arrays.get(name)
    if buf is None or len(buf) < size:
        buf = arrays[name] = np.empty(size, dtype=np.uint8)
    return buf[:size].view(dtype).reshape(shape)


class HostBuffer:
    """A reusable host buffer that grows on demand: pinned memory of the GPU when llama.cpp has a
    GPU backend (device copies into it run at bus speed), ordinary memory otherwise."""

    def __init__(self):
        self._handle = None
        self._array = np.empty(0, dtype=np.uint8)
        self.pinned = False

    def view(self, size: int) -> np.ndarray:
        if size > len(self._array):
            self.free()
            shim = load()
            handle = shim.ffi.new("void **")
            ptr = shim.lib.llamakv_pinned_alloc(size, handle)
            if ptr != shim.ffi.NULL:
                self._handle = handle[0]
                self._array = np.frombuffer(shim.ffi.buffer(ptr, size), dtype=np.uint8)
                self.pinned = True
            else:
                self._array = np.empty(size, dtype=np.uint8)
                self.pinned = False
        return self._array[:size]

    def free(self) -> None:
        self._array = np.empty(0, dtype=np.uint8)
        if self._handle is not None:
            load().lib.llamakv_pinned_free(self._handle)
            self._handle = None

    def __del__(self):
        if _LOADED is not None:
            self.free()
