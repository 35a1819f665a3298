#!/usr/bin/env python3
"""Where the scoring time of a compression goes: value norms, Expected Attention's scores and the
aggregation on 1, 4, 8 and 16 threads of llamakv's pool, then one layer's stages on one thread.
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
s.cache.get_state(s._state_in)  # the first read allocates the pinned buffer
raw = s.cache.get_state(s._state_in)
press = make_press("expected_attention")


def timed(f, *a):
    t0 = time.perf_counter()
    r = f(*a)
    return r, (time.perf_counter() - t0) * 1e3


for th in (1, 4, 8, 16):
    _shim._POOL = ThreadPoolExecutor(max_workers=th)
    inputs = s.score_inputs(raw)
    _, tv = timed(lambda: inputs.vnorm)
    sc, ts = timed(press.score, inputs)
    _, ta = timed(aggregate, sc, "mean", n // 2)
    print(f"threads {th}: vnorm {tv:.0f} ms, press.score {ts:.0f} ms, aggregate {ta:.0f} ms", flush=True)
inputs = s.score_inputs(raw)
inputs.vnorm
z, tl = timed(press.layer_logits, inputs, 5)


def soft(z):
    z -= z.max(axis=-1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=-1, keepdims=True)
    return z.reshape(inputs.n_head_kv, -1, z.shape[1]).mean(axis=1)


_, tsm = timed(soft, z)
_, tf = timed(press._folded, inputs, 5)
print(f"one layer, one thread: folded {tf:.1f} ms, logits (C) {tl:.1f} ms, softmax+group mean {tsm:.1f} ms", flush=True)
