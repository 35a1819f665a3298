#!/usr/bin/env python3
"""Where the scoring time of a compression goes: Expected Attention's scores (value norms included;
also alone) and the aggregation on 1, 4, 8 and 16 threads of llamakv's pool; on 16 threads the
parts of ea_keydiff (KeyDiff's anchors, Expected Attention with KeyDiff in the same pass, rank
percentiles); then one layer's stages on one thread.
For the GPU machine (all layers offloaded, flash attention):

    python3 scripts/profile_scoring.py /tmp/l8b.gguf 32768
"""
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import llamakv  # noqa: E402  (llama.cpp's libraries before numpy)
from llamakv import KVSession, _shim  # noqa: E402
from llamakv.scoring import aggregate, make_press  # noqa: E402

import numpy as np  # noqa: E402

path, n = sys.argv[1], int(sys.argv[2])
s = KVSession.from_model(path, n_ctx=n + 512, n_gpu_layers=99, flash_attn=True, n_threads=16)
doc = Path(llamakv.__file__).parent / "data" / "sample_document.txt"
t = s.tokenize(doc.read_text())
t = (t * (n // len(t) + 1))[:n]
s.prefill(t)
s.cache.get_state(s.context.state_in)  # the first read allocates the pinned buffer
raw = s.cache.get_state(s.context.state_in)
press = make_press("expected_attention")


def timed(f, *a):
    t0 = time.perf_counter()
    r = f(*a)
    return r, (time.perf_counter() - t0) * 1e3


for th in (1, 4, 8, 16):
    _shim._POOL = ThreadPoolExecutor(max_workers=th)
    _, tv = timed(lambda: s.score_inputs(raw).vnorm)
    sc, ts = timed(press.score, s.score_inputs(raw))
    _, ta = timed(aggregate, sc, "mean", n // 2)
    print(f"threads {th}: value norms alone {tv:.0f} ms; press.score (value norms included) {ts:.0f} ms, "
          f"aggregate {ta:.0f} ms", flush=True)
from llamakv.scoring import _cell_ranks, key_anchor  # noqa: E402

ea_kd = make_press("ea_keydiff")
for rep in range(2):
    inputs = s.score_inputs(raw)
    inputs.vnorm
    scored = np.ones(inputs.n_cells, np.uint8)
    _, tan = timed(lambda: _shim.parallel_map(lambda layer: key_anchor(inputs, layer, scored, 4096),
                                              range(inputs.n_layer)))
    _, te = timed(press.score, inputs)
    sums = np.empty((inputs.n_layer, inputs.n_cells), np.float32)
    ea, tk = timed(press.score, inputs, sums, 4096)
    _, ta = timed(aggregate, ea, "mean", n // 2)
    _, tr = timed(_cell_ranks, ea)
    _, tw = timed(ea_kd.score, s.score_inputs(raw))
    print(f"threads 16 (value norms computed before): anchors (4096 cells) {tan:.0f} ms; EA score {te:.0f} ms, "
          f"with KeyDiff {tk:.0f} ms; aggregate {ta:.0f} ms; rank percentiles (aggregate + argsort) {tr:.0f} ms; "
          f"ea_keydiff.score (value norms included) {tw:.0f} ms", flush=True)
inputs, tin = timed(s.score_inputs, raw)
print(f"score_inputs {tin:.1f} ms", flush=True)
inputs.vnorm
folded, tf = timed(press._folded, inputs)
z, tl = timed(press.layer_logits, inputs, 5, folded)
anchor = key_anchor(inputs, 5, np.ones(inputs.n_cells, np.uint8), 4096)
kd = np.empty((inputs.n_head_kv, inputs.n_cells), np.float32)
_, tlk = timed(press.layer_logits, inputs, 5, folded, None, anchor, kd)
out = np.empty((inputs.n_head_kv, inputs.n_cells), np.float32)
scored = np.ones(inputs.n_cells, np.uint8)
lib, ffi = _shim.load().lib, _shim.load().ffi
_, ta = timed(lib.llamakv_ea_attention, ffi.cast("float *", z.ctypes.data), inputs.n_cells, inputs.n_head,
              inputs.n_head_kv, ffi.cast("uint8_t *", scored.ctypes.data), ffi.NULL, 0, 0.0,
              ffi.cast("float *", out.ctypes.data))
print(f"one thread: folded weights of every layer {tf:.1f} ms; one layer: logits (C) {tl:.1f} ms "
      f"(with KeyDiff {tlk:.1f} ms), softmax + group mean (C) {ta:.1f} ms", flush=True)
