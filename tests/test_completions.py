"""KVSession.create_completion / create_chat_completion against llama-cpp-python's own Llama on the
same model and prompt: the same result structure, streamed and not, and (greedy, uncompressed)
the same text."""
from __future__ import annotations

import pytest

from llamakv.models import load_llama, resolve_model

PROMPT = "The capital of France is"
MESSAGES = [{"role": "user", "content": "Name three primary colours."}]


def shape(x):
    """The structure of a result: keys and value types, recursively."""
    if isinstance(x, dict):
        return {k: shape(v) for k, v in x.items()}
    if isinstance(x, list):
        return [shape(v) for v in x]
    return None if x is None else type(x).__name__


@pytest.fixture(scope="module")
def llama():
    m = load_llama(resolve_model(None), n_ctx=2048, n_threads=2, verbose=False)
    yield m
    m.close()


def test_completion_has_llama_cpp_pythons_shape_and_text(fresh, llama):
    ours = fresh.create_completion(PROMPT, max_tokens=12, temperature=0.0)
    theirs = llama.create_completion(PROMPT, max_tokens=12, temperature=0.0)
    assert shape(ours) == shape(theirs)
    assert ours["choices"][0]["text"] == theirs["choices"][0]["text"]
    assert ours["usage"] == theirs["usage"]
    assert ours["choices"][0]["finish_reason"] == theirs["choices"][0]["finish_reason"] == "length"


def test_streamed_completion_chunks_have_llama_cpp_pythons_shape(fresh, llama):
    ours = list(fresh.create_completion(PROMPT, max_tokens=8, temperature=0.0, stream=True))
    theirs = list(llama.create_completion(PROMPT, max_tokens=8, temperature=0.0, stream=True))
    assert {str(shape(c)) for c in ours} <= {str(shape(c)) for c in theirs}
    assert "".join(c["choices"][0]["text"] for c in ours) == "".join(c["choices"][0]["text"] for c in theirs)
    assert ours[-1]["choices"][0]["finish_reason"] == theirs[-1]["choices"][0]["finish_reason"]


def test_chat_completion_has_llama_cpp_pythons_shape_and_text(fresh, llama):
    ours = fresh.create_chat_completion(MESSAGES, max_tokens=16, temperature=0.0)
    theirs = llama.create_chat_completion(MESSAGES, max_tokens=16, temperature=0.0)
    assert shape(ours) == shape(theirs)
    assert ours["choices"][0]["message"]["content"] == theirs["choices"][0]["message"]["content"]
    streamed = list(fresh.create_chat_completion(MESSAGES, max_tokens=16, temperature=0.0, stream=True))
    reference = list(llama.create_chat_completion(MESSAGES, max_tokens=16, temperature=0.0, stream=True))
    assert shape(streamed[0]) == shape(reference[0]) and streamed[0]["choices"][0]["delta"] == {"role": "assistant"}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in streamed) == ours["choices"][0]["message"]["content"]
    assert streamed[-1]["choices"][0]["finish_reason"] == reference[-1]["choices"][0]["finish_reason"]


def test_compression_options_compress_the_prompt_before_answering(fresh):
    doc = "The lighthouse keeper's name is Tomas. " + "The sea was calm that night. " * 60
    out = fresh.create_completion(doc + "\nThe keeper's name is", max_tokens=4, temperature=0.0, ratio=0.5)
    report = fresh.last_report
    assert report is not None and report.cells_after < report.cells_before
    assert out["usage"]["prompt_tokens"] == report.cells_before
    bounded = fresh.create_completion(doc, max_tokens=4, temperature=0.0, budget=256, target=128)
    assert fresh.n_cells <= 256 and len(fresh.reports) >= 1 and bounded["choices"][0]["finish_reason"] == "length"


def test_json_response_format_and_unsupported_arguments(fresh):
    import json
    schema = {"type": "object", "properties": {"colour": {"enum": ["red", "green", "blue"]}}, "required": ["colour"]}
    out = fresh.create_chat_completion(MESSAGES, max_tokens=64, temperature=0.0,
                                       response_format={"type": "json_object", "schema": schema})
    assert json.loads(out["choices"][0]["message"]["content"])["colour"] in ("red", "green", "blue")
    with pytest.raises(NotImplementedError, match="echo"):
        fresh.create_completion(PROMPT, echo=True)
    with pytest.raises(NotImplementedError, match="tools"):
        fresh.create_chat_completion(MESSAGES, tools=[{"type": "function", "function": {"name": "f"}}])
