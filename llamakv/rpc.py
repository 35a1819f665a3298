"""llama.cpp's RPC backend: a model's layers, and their KV cache, on `rpc-server` processes of
other hosts, as llama.cpp's `--rpc host:port,...` does it.

A server is registered as ggml devices once per process; every model loaded afterwards with
layers to offload (-ngl) spreads them over the RPC devices first, then the local GPUs, as
llama.cpp does. llamakv needs nothing else from it: the capture reads each layer's query from the
backend that computes it, sequence states are read and written through llama.cpp, and
compaction moves every layer's cells where they live.

The server and the client must speak the same RPC protocol, so `server_binary()` builds
llama.cpp's `rpc-server` from the source of the installed llama-cpp-python (its sdist, fetched
with pip once, compiled in seconds against the installed ggml) rather than trusting an
`rpc-server` of another llama.cpp found on the PATH.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path

from .errors import LlamaKVError

_ENDPOINT = re.compile(r"^(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+):(?P<port>\d{1,5})$")
_REGISTERED: dict[str, int] = {}  # endpoint -> devices it serves, registered in this process
_SERVER_SOURCE = "vendor/llama.cpp/tools/rpc/rpc-server.cpp"


def supported() -> bool:
    """True where the installed llama-cpp-python was built with the RPC backend
    (CMAKE_ARGS="-DGGML_RPC=on")."""
    import llama_cpp

    return bool(llama_cpp.llama_supports_rpc())


def parse_servers(servers: str | Iterable[str]) -> list[str]:
    """`host:port,host:port` (or a list of them) -> the endpoints, checked."""
    items = servers.split(",") if isinstance(servers, str) else list(servers)
    endpoints = [s.strip() for s in items if s.strip()]
    if not endpoints:
        raise LlamaKVError("no RPC server given: expected host:port[,host:port...]")
    for e in endpoints:
        m = _ENDPOINT.match(e)
        if m is None or not 0 < int(m["port"]) < 65536:
            raise LlamaKVError(f"RPC server {e!r} is not host:port (e.g. 192.168.1.7:50052)")
    return endpoints


def _probe(endpoint: str, timeout: float = 5.0) -> None:
    host, port = endpoint.rsplit(":", 1)
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except OSError as e:
        raise LlamaKVError(f"the RPC server {endpoint} did not answer ({e.strerror or e}): is "
                           "`llamakv rpc-server -H <host> -p <port>` running there, and reachable from here?") from e


def add_servers(servers: str | Iterable[str]) -> list[str]:
    """Register RPC servers as devices for the models loaded after this call (once per endpoint
    and process: llama.cpp keeps them registered until the process ends). Returns the endpoints.

    An unreachable server is refused with a sentence. Past that point llama.cpp is in charge: a
    server of another RPC protocol version, or one lost while in use, ends the process (ggml
    aborts), which is why `server_binary` builds the server from this llama.cpp."""
    endpoints = parse_servers(servers)
    if not supported():
        raise LlamaKVError(
            "this llama-cpp-python was built without the RPC backend; reinstall it with "
            'CMAKE_ARGS="-DGGML_RPC=on" pip install --force-reinstall --no-cache-dir --no-binary '
            "llama-cpp-python llama-cpp-python==" + metadata.version("llama_cpp_python"))
    from ._shim import load

    lib = load().lib
    for e in endpoints:
        if e in _REGISTERED:
            continue
        _probe(e)  # ggml ends the process when it cannot connect: fail here with a sentence instead
        n = lib.llamakv_rpc_add_server(e.encode())
        if n == -2 or n == 0:
            raise LlamaKVError(f"the RPC server {e} serves no device")
        if n < 0:
            raise LlamaKVError("ggml's RPC backend is not loaded although llama.cpp reports RPC support")
        _REGISTERED[e] = int(n)
    return endpoints


def _source_tree(work: Path) -> Path:
    """The installed llama-cpp-python's rpc-server.cpp: $LLAMAKV_LLAMA_CPP_PYTHON_SRC (an unpacked
    sdist), else its sdist fetched by pip into `work`."""
    local = os.environ.get("LLAMAKV_LLAMA_CPP_PYTHON_SRC")
    if local:
        path = Path(local) / _SERVER_SOURCE
        if not path.exists():
            raise LlamaKVError(f"{path} does not exist (LLAMAKV_LLAMA_CPP_PYTHON_SRC)")
        return path
    version = metadata.version("llama_cpp_python")
    print(f"llamakv: fetching the llama-cpp-python {version} source for rpc-server (pip download)",
          file=sys.stderr)
    proc = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary",
                           ":all:", "--dest", str(work), f"llama-cpp-python=={version}"],
                          capture_output=True, text=True)
    sdists = sorted(work.glob("llama_cpp_python-*.tar.gz"))
    if proc.returncode != 0 or not sdists:
        raise LlamaKVError(f"could not download the llama-cpp-python {version} source:\n{proc.stderr[-2000:]}")
    with tarfile.open(sdists[0]) as tar:
        member = next((m for m in tar.getmembers() if m.name.endswith("/" + _SERVER_SOURCE)), None)
        if member is None:
            raise LlamaKVError(f"{sdists[0].name} has no {_SERVER_SOURCE}")
        tar.extractall(work, members=[member], filter="data")
    return work / member.name


def server_binary(verbose: bool = False) -> Path:
    """Path of an `rpc-server` matching the installed llama.cpp: $LLAMAKV_RPC_SERVER, else one
    built here before, else built now (seconds, plus a one-time source download)."""
    explicit = os.environ.get("LLAMAKV_RPC_SERVER")
    if explicit:
        if not os.access(explicit, os.X_OK):
            raise LlamaKVError(f"LLAMAKV_RPC_SERVER={explicit} is not an executable")
        return Path(explicit)
    from ._shim import cache_dir, llama_cpp_dirs

    include_dir, lib_dir = llama_cpp_dirs()
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if not cxx:
        raise LlamaKVError("building rpc-server needs a C++ compiler (c++, g++ or clang++; or set CXX)")
    key = hashlib.sha256(f"{metadata.version('llama_cpp_python')} {lib_dir} {cxx}".encode()).hexdigest()[:16]
    out = cache_dir() / "rpc-server" / key / "rpc-server"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        src = _source_tree(Path(tmp))
        exe = Path(tmp) / "rpc-server"
        cmd = [cxx, "-std=c++17", "-O2", "-pthread", str(src), f"-I{include_dir}", f"-L{lib_dir}",
               "-lggml", "-lggml-base", f"-Wl,-rpath,{lib_dir}", "-o", str(exe)]
        if verbose:
            print("llamakv: building rpc-server:", " ".join(cmd), file=sys.stderr)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise LlamaKVError(f"building rpc-server failed:\n{' '.join(cmd)}\n{proc.stderr[-4000:]}")
        os.replace(exe, out)  # atomic: a concurrent builder never runs a half-written file
    return out


def add_rpc_parser(sub) -> None:
    """`llamakv rpc-server`: llama.cpp's rpc-server, built for this llama.cpp, on this host."""
    p = sub.add_parser(
        "rpc-server", help="run llama.cpp's rpc-server here, for `--rpc` on another host",
        description="Serve this host's devices (its CPU, or its GPUs in a GPU build) to llamakv and "
                    "llama.cpp clients over the network (llama.cpp's rpc-server, built once from the "
                    "source of the installed llama-cpp-python so that its protocol matches). The RPC "
                    "protocol has no authentication or encryption: bind it to a trusted network only.")
    p.add_argument("-H", "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("-p", "--port", type=int, default=50052, help="port (default 50052)")
    p.add_argument("-t", "--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("-d", "--device", default=None, help="devices to serve, e.g. CUDA0,CUDA1 (default: all)")
    p.add_argument("-c", "--cache", action="store_true", help="cache received tensors in a local file cache")
    p.add_argument("--print-path", action="store_true", help="build if needed, print the binary's path, exit")
    p.set_defaults(func=_run_server)


def _run_server(args) -> int:
    exe = server_binary(verbose=True)
    if args.print_path:
        print(exe)
        return 0
    argv = [str(exe), "-H", args.host, "-p", str(args.port), "-t", str(args.threads or os.cpu_count() or 1)]
    if args.device:
        argv += ["-d", args.device]
    if args.cache:
        argv.append("-c")
    sys.stdout.flush()
    os.execv(argv[0], argv)
    return 1  # not reached: execv replaces this process
