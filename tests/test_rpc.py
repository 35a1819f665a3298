"""llama.cpp's RPC backend: SmolLM2's layers, and their KV cache, on two real rpc-servers on
loopback (llama.cpp's own server, built from the installed llama-cpp-python's source). Capture,
compress(0.5), compaction and greedy decoding must give what the local run gives. Each run is a
process of its own (tests/rpc_child.py): RPC devices stay registered in a process once added.
Skipped where llama-cpp-python was built without -DGGML_RPC=on."""
from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from llamakv import rpc
from llamakv.errors import LlamaKVError

CHILD = Path(__file__).resolve().parent / "rpc_child.py"
needs_rpc = pytest.mark.skipif(not rpc.supported(), reason="llama-cpp-python built without -DGGML_RPC=on")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_listening(port: int, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"rpc-server exited with {proc.returncode}: {proc.stdout.read()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"rpc-server did not listen on {port} within {timeout} s")


@pytest.fixture(scope="module")
def servers():
    exe = rpc.server_binary()
    procs, endpoints = [], []
    try:
        for _ in range(2):
            port = _free_port()
            proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(port), "-t", "1"],
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            procs.append(proc)
            _wait_listening(port, proc)
            endpoints.append(f"127.0.0.1:{port}")
        yield endpoints
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=10)


def _run(tmp_path: Path, name: str, *args: str) -> dict:
    out = tmp_path / f"{name}.npz"
    proc = subprocess.run([sys.executable, str(CHILD), str(out), *args], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with np.load(out) as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("rpc"), "local")


def _same_as_local(remote: dict, local: dict) -> None:
    np.testing.assert_array_equal(remote["count"], local["count"])
    np.testing.assert_allclose(remote["mean"], local["mean"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(remote["m2"], local["m2"], rtol=1e-5, atol=1e-4)
    assert np.array_equal(remote["cells"], local["cells"]) and local["cells"][1] < local["cells"][0]
    np.testing.assert_array_equal(remote["positions"], local["positions"])
    assert str(remote["reply"]) == str(local["reply"])
    assert str(local["answer"]) in str(local["reply"])  # the needle survives compression


@needs_rpc
@pytest.mark.parametrize("where", ["device", "host"])
def test_layers_split_over_two_rpc_servers_compress_like_the_local_run(servers, local, tmp_path, where):
    remote = _run(tmp_path, "rpc", "--rpc", ",".join(servers), "--device", where)
    # the cache really is on the two servers: its layers on two devices, each scored and compacted
    # where its layers live (or all read by the host)
    assert str(remote["cache_devices"]) == "RPC0+RPC1" and str(local["device"]) == ""
    assert str(remote["device"]) == ("RPC0+RPC1" if where == "device" else "")
    _same_as_local(remote, local)


@needs_rpc
def test_one_rpc_server_compresses_on_its_device_like_the_local_run(servers, local, tmp_path):
    remote = _run(tmp_path, "rpc1", "--rpc", servers[0])  # the default: where the cache is
    assert str(remote["device"]) == "RPC0"  # scored and compacted on the server, only scores back
    _same_as_local(remote, local)


@needs_rpc
def test_an_unreachable_rpc_server_is_a_sentence_not_an_abort():
    port = _free_port()  # nothing listens there
    with pytest.raises(LlamaKVError, match="did not answer"):
        rpc.add_servers(f"127.0.0.1:{port}")


@pytest.mark.parametrize("bad", ["", "nohost", "host:0", "host:70000", "a:1,b", " , "])
def test_malformed_rpc_endpoints_are_refused(bad):
    with pytest.raises(LlamaKVError, match="host:port"):
        rpc.parse_servers(bad)


def test_endpoints_parse_as_llama_cpp_writes_them():
    assert rpc.parse_servers("10.0.0.2:50052, host-b:50053") == ["10.0.0.2:50052", "host-b:50053"]
    assert rpc.parse_servers(["[::1]:50052"]) == ["[::1]:50052"]
