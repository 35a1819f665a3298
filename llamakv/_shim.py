"""Build (once, cached) and load the C capture shim against the installed llama-cpp-python.

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

from .errors import ShimBuildError

_SRC_DIR = Path(__file__).resolve().parent / "csrc"
_SOURCES = ("llamakv_shim.c", "llamakv_shim.h")
_LOCK = threading.Lock()
_LOADED = None


def _llama_cpp_dirs() -> tuple[Path, Path]:
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


def build(verbose: bool = False) -> Path:
    """Compile the shim if no cached build matches; return the path of the shared library."""
    include_dir, lib_dir = _llama_cpp_dirs()
    cc = _compiler()
    flags = ["-O3", "-shared", "-fPIC", "-std=c11", f"-I{include_dir}", f"-I{_SRC_DIR}"]
    libs = [f"-L{lib_dir}", "-lggml-base", f"-Wl,-rpath,{lib_dir}"]
    h = hashlib.sha256()
    h.update(metadata.version("llama_cpp_python").encode())
    h.update(str(lib_dir).encode())
    h.update(" ".join([cc, *flags, *libs]).encode())
    for name in _SOURCES:
        h.update((_SRC_DIR / name).read_bytes())
    out_dir = cache_dir() / "shim" / h.hexdigest()[:16]
    lib = out_dir / "libllamakv_shim.so"
    if lib.exists():
        return lib
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".build-", suffix=".so", dir=out_dir)
    os.close(fd)
    cmd = [cc, *flags, str(_SRC_DIR / "llamakv_shim.c"), "-o", tmp, *libs]
    if verbose:
        print("llamakv: building the capture shim:", " ".join(cmd), file=sys.stderr)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as e:
        os.unlink(tmp)
        raise ShimBuildError(f"could not run the C compiler {cc!r}: {e}") from e
    if proc.returncode != 0:
        os.unlink(tmp)
        raise ShimBuildError(
            f"compiling the capture shim failed (exit {proc.returncode}):\n{' '.join(cmd)}\n{proc.stderr}"
        )
    os.replace(tmp, lib)  # atomic: concurrent builders never load a half-written file
    return lib


class Shim:
    """The loaded shim: cffi handle, library and the address of the eval callback."""

    def __init__(self, path: Path):
        self.ffi = cffi.FFI()
        self.ffi.cdef(_header_cdef())
        self.ffi.cdef(
            "bool llamakv_eval_callback(void * tensor, bool ask, void * user_data);"
            "const char * llamakv_error_string(int32_t code);"
            "int32_t llamakv_op_code(const char * name);"
        )
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
