"""`llamakv serve` on loopback with the real SmolLM2, through the official openai client and raw HTTP."""
from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
pytest.importorskip("sse_starlette")

from conftest import ROOT, needle_prompt

GREEDY = {"temperature": 0, "max_tokens": 8}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(tmp: Path, *extra: str, model: str = "smollm2-135m-instruct", ctx: int = 4096):
    """`llamakv serve` as a subprocess on a free loopback port, up when /health answers."""
    port = _free_port()
    log = tmp / f"server-{port}.log"
    # one thread: on a loaded 2-core machine, two threads spinning on each other decode 5-10x slower
    cmd = [sys.executable, "-m", "llamakv.cli", "serve", "-m", model, "-c", str(ctx),
           "--port", str(port), "-t", "1", *extra]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the server exited with {proc.returncode}:\n{log.read_text()}")
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.time() > deadline:
                pytest.fail(f"the server did not answer /health in 120 s:\n{log.read_text()}")
            time.sleep(0.3)
        yield {"url": url, "proc": proc, "log": log}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.returncode in (0, -15), log.read_text()[-3000:]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    save_dir = tmp_path_factory.mktemp("slots")
    # two slots of 4096 cells each (llama.cpp divides the context between them)
    with running_server(tmp_path_factory.mktemp("log"), "-np", "2", "--slot-save-path", str(save_dir),
                        ctx=8192) as srv:
        srv["model"] = httpx.get(srv["url"] + "/v1/models").json()["data"][0]["id"]
        srv["save_dir"] = save_dir
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server["url"] + "/v1", api_key="x", max_retries=0, timeout=120)


def post(server, path, body, **kw):
    return httpx.post(server["url"] + path, json=body, timeout=120, **kw)


def metrics(server) -> dict[str, float]:
    text = httpx.get(server["url"] + "/metrics").text
    return {k: float(v) for k, v in (line.split() for line in text.splitlines() if not line.startswith("#"))}


def history(prompt_n: int, predicted_n: int, stopped_by_eos: bool) -> int:
    """Tokens a slot holds after a request: the last sampled token is decoded only if it was
    followed by an end-of-generation token (a limit or a stop string leave it undecoded)."""
    return prompt_n + predicted_n - (0 if stopped_by_eos else 1)


def wait_idle(server, timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        slots = httpx.get(server["url"] + "/slots").json()
        if not any(s["is_processing"] for s in slots):
            return slots
        time.sleep(0.1)
    raise AssertionError(f"a slot is still processing: {slots}")


QUESTION = [{"role": "user", "content": "Name three colours. Answer briefly."}]


def test_chat_completions_streaming_and_not(server, client):
    r = client.chat.completions.create(model=server["model"], messages=QUESTION, **GREEDY)
    text = r.choices[0].message.content
    assert text and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 8
    assert r.usage.total_tokens == r.usage.prompt_tokens + 8
    chunks = list(client.chat.completions.create(model=server["model"], messages=QUESTION, stream=True,
                                                 stream_options={"include_usage": True}, **GREEDY))
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text  # greedy: the same answer either way
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
    # the second request had the same prompt: all but the last prompt token came from the cache
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == r.usage.prompt_tokens - 1


def test_completions_streaming_and_not(server, client):
    prompt = "The first three planets from the sun are"
    r = client.completions.create(model=server["model"], prompt=prompt, **GREEDY)
    assert r.choices[0].text and r.usage.completion_tokens == 8
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=server["model"], prompt=prompt, stream=True, **GREEDY) if c.choices)
    assert streamed == r.choices[0].text
    r = client.completions.create(model=server["model"], prompt=prompt, stop=["\n", " is"], temperature=0,
                                  max_tokens=16)
    assert "\n" not in r.choices[0].text and " is" not in r.choices[0].text


def test_native_endpoints(server):
    url = server["url"]
    assert httpx.get(url + "/health").json() == {"status": "ok"}
    props = httpx.get(url + "/props").json()
    assert props["total_slots"] == 2 and props["default_generation_settings"]["n_ctx"] == 4096
    assert "expected_attention" in props["llamakv"]["methods"]
    toks = post(server, "/tokenize", {"content": "Hello world"}).json()["tokens"]
    assert len(toks) >= 2 and all(isinstance(t, int) for t in toks)
    assert post(server, "/detokenize", {"tokens": toks}).json()["content"] == "Hello world"
    pieces = post(server, "/tokenize", {"content": "Hello world", "with_pieces": True}).json()["tokens"]
    assert "".join(p["piece"] for p in pieces) == "Hello world"

    body = {"prompt": "The capital of France is", "n_predict": 6, "temperature": 0, "cache_prompt": False}
    r = post(server, "/completion", body).json()
    assert r["stop"] is True and r["tokens_predicted"] == 6 and r["stop_type"] == "limit"
    assert r["tokens_cached"] == 0 and r["timings"]["prompt_n"] == r["tokens_evaluated"]
    events = []
    with httpx.stream("POST", url + "/completion", json={**body, "stream": True}, timeout=120) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        for line in resp.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
    assert "".join(e["content"] for e in events) == r["content"]
    assert events[-1]["stop"] is True and all(not e["stop"] for e in events[:-1])
    assert events[-1]["tokens_predicted"] == 6

    # cache_prompt (the default): the same prompt again reuses all but its last token
    again = post(server, "/completion", {**body, "cache_prompt": True}).json()
    assert again["tokens_cached"] == r["tokens_evaluated"] - 1
    assert again["content"] == r["content"]


def test_errors_are_json_4xx_and_the_server_survives(server):
    url = server["url"]
    bad = httpx.post(url + "/v1/chat/completions", content=b"{not json", timeout=30,
                     headers={"content-type": "application/json"})
    assert bad.status_code == 400 and "JSON" in bad.json()["error"]["message"]
    cases = [
        ("/v1/chat/completions", {"messages": "hello"}, 400),
        ("/v1/chat/completions", {"messages": QUESTION, "llamakv": {"ratio": 1.5}}, 400),
        ("/v1/chat/completions", {"messages": QUESTION, "llamakv": {"method": "magic"}}, 400),
        ("/v1/chat/completions", {"messages": QUESTION, "kv_compress_ratio": -0.1}, 400),
        ("/v1/completions", {"prompt": "hi", "temperature": "hot"}, 400),
        ("/completion", {"prompt": [10**9]}, 400),
        ("/completion", {}, 400),
        ("/tokenize", {"content": 3}, 400),
    ]
    for path, body, status in cases:
        r = post(server, path, body)
        assert r.status_code == status, (path, body, r.text)
        err = r.json()["error"]
        assert err["code"] == status and err["message"] and err["type"]
    # a prompt larger than the context (4096 cells), as text and streamed
    too_long = "word " * 5000
    for stream in (False, True):
        r = post(server, "/v1/completions", {"prompt": too_long, "max_tokens": 4, "stream": stream})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["type"] == "exceed_context_size_error"
        assert "context" in r.json()["error"]["message"]
    assert httpx.get(url + "/v1/nothing-here").status_code == 404
    assert post(server, "/completion", {"prompt": "Hi", "n_predict": 2}).status_code == 200


def test_compression_and_prefix_reuse_after_eviction(server, client):
    doc, question, _ = needle_prompt(n_repeats=20, at=7)
    kv = {"ratio": 0.5, "min_tokens": 0}
    before = metrics(server)
    messages = [{"role": "user", "content": doc + "\n\n" + question}]
    r1 = client.chat.completions.create(model=server["model"], messages=messages, max_tokens=12, temperature=0,
                                        extra_body={"llamakv": kv})
    info1 = r1.model_extra["llamakv"]
    comp = info1["compression"]
    assert comp is not None and comp["evicted"] > 100 and comp["cells_after"] < comp["cells_before"]
    assert info1["cells"] < r1.usage.prompt_tokens * 0.7  # about half of the prompt's cells are gone
    after = metrics(server)
    assert after["llamakv:kv_cells_evicted_total"] - before["llamakv:kv_cells_evicted_total"] == comp["evicted"]
    assert after["llamakv:compress_seconds_total"] > before["llamakv:compress_seconds_total"]
    assert after["llamakv:compressions_total"] == before["llamakv:compressions_total"] + 1

    # the next turn: everything of the first (its prompt and the answer but for its last token,
    # which was never decoded) comes from the compressed cache; only the new turn is prefilled
    messages += [{"role": "assistant", "content": r1.choices[0].message.content},
                 {"role": "user", "content": "Say it again."}]
    r2 = client.chat.completions.create(model=server["model"], messages=messages, max_tokens=8, temperature=0,
                                        extra_body={"llamakv": kv})
    cached = r2.usage.prompt_tokens_details.cached_tokens
    assert cached == history(r1.usage.prompt_tokens, r1.usage.completion_tokens, r1.choices[0].finish_reason == "stop")
    assert r2.model_extra["timings"]["prompt_n"] == r2.usage.prompt_tokens - cached
    assert r2.model_extra["timings"]["prompt_n"] < 40
    slots = httpx.get(server["url"] + "/slots").json()
    slot = max(slots, key=lambda s: s["id_task"])  # the one that served the last request
    assert slot["n_past"] == history(r2.usage.prompt_tokens, r2.usage.completion_tokens,
                                     r2.choices[0].finish_reason == "stop")
    assert slot["n_cells"] < slot["n_past"] * 0.7  # the conversation lives compressed
    assert metrics(server)["llamakv:kv_cells_used"] == sum(s["n_cells"] for s in slots)
    # query-agnostic (the default): the earlier turns were compressed before the new question came in
    comp2 = r2.model_extra["llamakv"]["compression"]
    assert comp2["before_last_message"] is True
    assert comp2["cells_before"] < info1["cells"] + r2.model_extra["timings"]["prompt_n"]

    # query-aware: the earlier turns are compressed with the new message decoded after them for the
    # scoring (then removed and prefilled in its place)
    messages += [{"role": "assistant", "content": r2.choices[0].message.content},
                 {"role": "user", "content": question}]
    r3 = client.chat.completions.create(model=server["model"], messages=messages, max_tokens=4, temperature=0,
                                        extra_body={"llamakv": {**kv, "query_aware": True}})
    info3 = r3.model_extra["llamakv"]
    comp3 = info3["compression"]
    assert info3["query_aware"] and comp3["before_last_message"] is True and comp3["question_tokens"] > 0
    assert comp3["cells_before"] + comp3["question_tokens"] == slot["n_cells"] + r3.model_extra["timings"]["prompt_n"]
    assert comp2["question_tokens"] == 0

    # the same request again: the slot is rewound inside its compressed cache to the prompt's last token
    r4 = client.chat.completions.create(model=server["model"], messages=messages, max_tokens=4, temperature=0,
                                        extra_body={"llamakv": {**kv, "query_aware": True}})
    assert r4.usage.prompt_tokens_details.cached_tokens == r3.usage.prompt_tokens - 1
    assert r4.model_extra["timings"]["prompt_n"] == 1
    assert r4.choices[0].message.content


def test_cache_budget(server):
    doc, _, _ = needle_prompt(n_repeats=10, at=3)
    r = post(server, "/completion", {"prompt": doc, "n_predict": 2, "temperature": 0, "cache_prompt": False,
                                     "llamakv": {"ratio": 0, "budget": 64, "min_tokens": 0}}).json()
    comp = r["llamakv"]["compression"]
    assert r["tokens_evaluated"] > 200
    assert comp["cells_before"] == r["tokens_evaluated"] and comp["cells_after"] == 64


def test_prefix_reuse_gives_the_answer_of_a_fresh_prefill(server):
    """Without compression, reusing the slot's cache must give exactly the fresh answer."""
    doc, question, _ = needle_prompt(n_repeats=6, at=2)
    first = {"prompt": doc, "n_predict": 4, "temperature": 0, "llamakv": {"ratio": 0}}
    r1 = post(server, "/completion", first).json()
    follow = {**first, "prompt": doc + r1["content"] + " " + question, "n_predict": 10}
    reused = post(server, "/completion", follow).json()
    fresh = post(server, "/completion", {**follow, "cache_prompt": False}).json()
    assert reused["tokens_cached"] > r1["tokens_evaluated"] - 2
    assert fresh["tokens_cached"] == 0
    assert reused["content"] == fresh["content"]


def test_concurrent_clients_each_get_their_own_answer(server, client):
    prompts = [f"Write the number {n} in words:" for n in (7, 12, 31)]
    alone = [client.completions.create(model=server["model"], prompt=p, temperature=0, max_tokens=10,
                                       extra_body={"cache_prompt": False}).choices[0].text for p in prompts]

    def ask(i):
        c = openai.OpenAI(base_url=server["url"] + "/v1", api_key="x", max_retries=0, timeout=120)
        # fresh prefills, as the runs alone: the same computation, so greedy answers must be equal
        kw = {"model": server["model"], "prompt": prompts[i], "temperature": 0, "max_tokens": 10,
              "extra_body": {"cache_prompt": False}}
        if i % 2:  # half of them streamed
            return "".join(ch.choices[0].text for ch in c.completions.create(stream=True, **kw) if ch.choices)
        return c.completions.create(**kw).choices[0].text

    with ThreadPoolExecutor(3) as pool:  # all three at once; .result() raises what a thread raised
        results = [f.result(timeout=300) for f in [pool.submit(ask, i) for i in range(3)]]
    assert results == alone
    assert len(set(results)) == 3
    wait_idle(server)


def test_client_disconnect_mid_stream_frees_the_slot(server):
    body = {"prompt": "Once upon a time", "n_predict": 400, "temperature": 0, "stream": True}
    before = metrics(server)["llamacpp:tokens_predicted_total"]
    with httpx.stream("POST", server["url"] + "/completion", json=body, timeout=120) as resp:
        for line in resp.iter_lines():
            if line.startswith("data: "):
                assert not json.loads(line[6:])["stop"]
                break  # leave after the first chunk: the connection is closed
    slots = wait_idle(server)
    assert not any(s["is_processing"] for s in slots)
    generated = metrics(server)["llamacpp:tokens_predicted_total"] - before
    assert generated < 400  # generation stopped early
    r = post(server, "/completion", {"prompt": "Hello", "n_predict": 3, "temperature": 0})
    assert r.status_code == 200 and r.json()["tokens_predicted"] == 3

    # not streamed: the client gives up waiting; the server notices and stops generating too
    before = metrics(server)["llamacpp:tokens_predicted_total"]
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server["url"] + "/completion", json={**body, "stream": False}, timeout=1.0)
    wait_idle(server)
    assert metrics(server)["llamacpp:tokens_predicted_total"] - before < 400
    assert post(server, "/completion", {"prompt": "Hello", "n_predict": 3, "temperature": 0}).status_code == 200


def test_slot_save_erase_restore(server):
    prompt = "A list of fruits: apple, banana, cherry,"
    r = post(server, "/completion", {"prompt": prompt, "n_predict": 4, "temperature": 0, "id_slot": 1}).json()
    assert r["id_slot"] == 1
    saved = post(server, "/slots/1?action=save", {"filename": "fruits.llamakv"}).json()
    assert saved["n_saved"] == history(r["tokens_evaluated"], r["tokens_predicted"], r["stop_type"] == "eos")
    assert saved["n_written"] > 0
    assert (server["save_dir"] / "fruits.llamakv").stat().st_size == saved["n_written"]
    assert post(server, "/slots/1?action=erase", {}).json()["n_erased"] == saved["n_saved"]
    assert httpx.get(server["url"] + "/slots").json()[1]["n_past"] == 0
    restored = post(server, "/slots/1?action=restore", {"filename": "fruits.llamakv"}).json()
    assert restored["n_restored"] == saved["n_saved"]
    follow = {"prompt": prompt + r["content"] + " and", "n_predict": 4, "temperature": 0, "id_slot": 1}
    again = post(server, "/completion", follow).json()
    assert again["tokens_cached"] >= saved["n_saved"] - 1
    for body, status in [({"filename": "../escape"}, 400), ({"filename": "missing.llamakv"}, 404)]:
        assert post(server, "/slots/1?action=restore", body).status_code == status
    assert post(server, "/slots/9?action=save", {"filename": "x"}).status_code == 404


def test_api_key(tmp_path):
    with running_server(tmp_path, "--api-key", "sekret", "-a", "tiny") as srv:
        assert httpx.get(srv["url"] + "/health").status_code == 200  # open, as in llama-server
        denied = httpx.get(srv["url"] + "/v1/models")
        assert denied.status_code == 401 and denied.json()["error"]["type"] == "authentication_error"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=srv["url"] + "/v1", api_key="wrong", max_retries=0).models.list()
        ok = openai.OpenAI(base_url=srv["url"] + "/v1", api_key="sekret", max_retries=0)
        assert [m.id for m in ok.models.list()] == ["tiny"]
        r = ok.chat.completions.create(model="tiny", messages=QUESTION, temperature=0, max_tokens=3)
        assert r.usage.completion_tokens == 3


# -- four slots decoded together ------------------------------------------------------------------
@pytest.fixture(scope="module")
def server4(tmp_path_factory):
    save_dir = tmp_path_factory.mktemp("slots4")
    with running_server(tmp_path_factory.mktemp("log4"), "-np", "4", "--slot-save-path", str(save_dir),
                        ctx=4 * 2048) as srv:
        srv["model"] = httpx.get(srv["url"] + "/v1/models").json()["data"][0]["id"]
        yield srv


def _client(server):
    return openai.OpenAI(base_url=server["url"] + "/v1", api_key="x", max_retries=0, timeout=300)


def _stream_chat(server, content: str, max_tokens: int, **extra) -> str:
    chunks = _client(server).chat.completions.create(
        model="any-name", messages=[{"role": "user", "content": content}], temperature=0, max_tokens=max_tokens,
        stream=True, extra_body={"cache_prompt": False, **extra})
    return "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)


def test_four_concurrent_streams_each_equal_their_answer_alone(server4):
    """Four chat streams at once, through the official client: each is its greedy answer alone,
    and the slots share decode calls (far fewer llama_decode calls than tokens)."""
    topics = ["the sea", "a mountain", "the moon", "a forest"]
    prompts = [f"Write one sentence about {t}." for t in topics]
    alone = [_stream_chat(server4, p, 24) for p in prompts]
    before = metrics(server4)
    with ThreadPoolExecutor(4) as pool:
        together = [f.result(timeout=300) for f in [pool.submit(_stream_chat, server4, p, 24) for p in prompts]]
    after = metrics(server4)
    assert together == alone
    assert len(set(together)) == 4
    tokens = after["llamacpp:tokens_predicted_total"] - before["llamacpp:tokens_predicted_total"]
    calls = after["llamacpp:n_decode_total"] - before["llamacpp:n_decode_total"]
    assert tokens >= 40 and calls < 0.75 * tokens, (calls, tokens)
    wait_idle(server4)


def test_a_compression_in_one_slot_leaves_another_slot_unchanged(server4):
    short = "Count from one to twenty in words."
    alone = _stream_chat(server4, short, 40)
    doc, question, _ = needle_prompt(n_repeats=8, at=3)
    long_body = {"prompt": doc + " " + question, "n_predict": 8, "temperature": 0, "cache_prompt": False,
                 "llamakv": {"ratio": 0.5, "min_tokens": 0}}
    with ThreadPoolExecutor(2) as pool:
        f_short = pool.submit(_stream_chat, server4, short, 40)
        time.sleep(0.3)  # the short answer is under way when the long prompt arrives
        f_long = pool.submit(post, server4, "/completion", long_body)
        compressed = f_long.result(timeout=300).json()
        assert f_short.result(timeout=300) == alone
    comp = compressed["llamakv"]["compression"]
    assert comp and comp["evicted"] > 0.3 * compressed["tokens_evaluated"]


def test_a_client_leaving_frees_its_slot_while_the_others_go_on(server4):
    other = "Name the planets of the solar system."
    alone = _stream_chat(server4, other, 32)
    body = {"prompt": "Once upon a time", "n_predict": 400, "temperature": 0, "stream": True}
    before = metrics(server4)["llamacpp:tokens_predicted_total"]
    with ThreadPoolExecutor(1) as pool:
        with httpx.stream("POST", server4["url"] + "/completion", json=body, timeout=120) as resp:
            f = pool.submit(_stream_chat, server4, other, 32)
            for line in resp.iter_lines():
                if line.startswith("data: "):
                    break  # leave after the first chunk: the connection is closed
        assert f.result(timeout=300) == alone
    wait_idle(server4)
    assert metrics(server4)["llamacpp:tokens_predicted_total"] - before < 400 + 32


def test_a_slot_saved_and_restored_into_another_continues_identically(server4):
    doc, question, _ = needle_prompt(n_repeats=6, at=2)
    kv = {"ratio": 0.5, "min_tokens": 0}
    r = post(server4, "/completion", {"prompt": doc, "n_predict": 4, "temperature": 0, "id_slot": 0,
                                      "cache_prompt": False, "llamakv": kv}).json()
    assert r["llamakv"]["compression"]["evicted"] > 0
    saved = post(server4, "/slots/0?action=save", {"filename": "moved.llamakv"}).json()
    restored = post(server4, "/slots/2?action=restore", {"filename": "moved.llamakv"}).json()
    assert restored["n_restored"] == saved["n_saved"] and restored["n_cells"] == saved["n_cells"]
    follow = {"prompt": doc + r["content"] + " " + question, "n_predict": 12, "temperature": 0,
              "llamakv": {"ratio": 0}}
    on_2 = post(server4, "/completion", {**follow, "id_slot": 2}).json()
    on_0 = post(server4, "/completion", {**follow, "id_slot": 0}).json()
    assert on_2["tokens_cached"] == on_0["tokens_cached"] >= saved["n_saved"] - 1
    assert on_2["content"] == on_0["content"]


def test_token_log_probabilities(server4):
    client = _client(server4)
    # fresh prefills: llama.cpp's logits of a prompt's last token decoded alone (a reused prefix)
    # differ from those of the whole prompt decoded at once by up to ~0.7 in log-probability
    fresh = {"cache_prompt": False}
    r = client.chat.completions.create(model="whatever", messages=QUESTION, temperature=0, max_tokens=6,
                                       logprobs=True, top_logprobs=3, extra_body=fresh)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert "".join(c.token for c in content) == r.choices[0].message.content
    for c in content:
        tops = [t.logprob for t in c.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True) and tops[0] <= 0
        assert c.top_logprobs[0].token == c.token and c.logprob == pytest.approx(tops[0])  # greedy
    streamed = client.chat.completions.create(model="whatever", messages=QUESTION, temperature=0, max_tokens=6,
                                              logprobs=True, top_logprobs=2, stream=True, extra_body=fresh)
    lps = [c.logprob for ch in streamed if ch.choices and ch.choices[0].logprobs
           for c in ch.choices[0].logprobs.content]
    assert lps == pytest.approx([c.logprob for c in content], abs=1e-4)
    text = client.completions.create(model="whatever", prompt="The capital of France is", temperature=0,
                                     max_tokens=4, logprobs=2, extra_body=fresh)
    lp = text.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == text.usage.completion_tokens
    assert "".join(lp.tokens) == text.choices[0].text and lp.text_offset[0] == 0
    native = post(server4, "/completion", {"prompt": "The capital of France is", "n_predict": 4,
                                           "temperature": 0, "n_probs": 5, **fresh}).json()
    probs = native["completion_probabilities"]
    assert len(probs) == native["tokens_predicted"] and all(len(p["top_logprobs"]) == 5 for p in probs)
    assert [p["logprob"] for p in probs] == pytest.approx(lp.token_logprobs, abs=1e-4)
    assert post(server4, "/v1/chat/completions", {"messages": QUESTION, "top_logprobs": 2}).status_code == 400


def test_the_model_field_is_ignored_unless_strict(server4, tmp_path):
    r = post(server4, "/v1/chat/completions", {"model": "x", "messages": QUESTION, "max_tokens": 2})
    assert r.status_code == 200
    with running_server(tmp_path, "--strict-model", "-a", "tiny") as srv:
        r = post(srv, "/v1/chat/completions", {"model": "x", "messages": QUESTION, "max_tokens": 2})
        assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
        assert post(srv, "/v1/chat/completions", {"model": "tiny", "messages": QUESTION,
                                                  "max_tokens": 2}).status_code == 200


# -- structured output and the samplers ------------------------------------------------------------
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 150},
                                           "colours": {"type": "array", "items": {"enum": ["red", "green", "blue"]},
                                                       "maxItems": 3}},
          "required": ["name", "age", "colours"], "additionalProperties": False}


def test_json_schema_answers_validate(server4):
    jsonschema = pytest.importorskip("jsonschema")
    client = _client(server4)
    ask = [{"role": "user", "content": "Describe a person called Ann as JSON."}]
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    r = client.chat.completions.create(model="m", messages=ask, temperature=0, max_tokens=80, response_format=fmt)
    assert r.choices[0].finish_reason == "stop", r.choices[0].message.content
    jsonschema.validate(json.loads(r.choices[0].message.content), PERSON)
    streamed = client.chat.completions.create(model="m", messages=ask, temperature=0.9, max_tokens=80, seed=3,
                                              response_format=fmt, stream=True)
    text = "".join(ch.choices[0].delta.content or "" for ch in streamed if ch.choices)
    jsonschema.validate(json.loads(text), PERSON)
    # any JSON object: this small model loops inside the object until the limit, but from the first
    # token on it writes JSON where it otherwise writes prose
    free, any_json = (client.chat.completions.create(model="m", messages=ask, temperature=0, max_tokens=12, **kw)
                      .choices[0].message.content for kw in ({}, {"response_format": {"type": "json_object"}}))
    assert any_json.lstrip().startswith("{") and not free.lstrip().startswith("{")
    native = post(server4, "/completion", {"prompt": "A person:", "n_predict": 80, "temperature": 0,
                                           "json_schema": PERSON}).json()
    jsonschema.validate(json.loads(native["content"]), PERSON)
    gbnf = post(server4, "/completion", {"prompt": "Yes or no?", "n_predict": 8, "temperature": 0,
                                         "grammar": 'root ::= ("yes" | "no") "."'}).json()
    assert gbnf["content"] in ("yes.", "no.")
    for bad in ({"grammar": "root ::= ("}, {"response_format": {"type": "xml"}}, {"json_schema": "object"}):
        assert post(server4, "/completion", {"prompt": "x", "n_predict": 2, **bad}).status_code == 400


def test_penalties_and_logit_bias_change_the_output(server4):
    prompt = "Repeat after me: the cat the cat the cat the cat the cat"
    base = {"prompt": prompt, "n_predict": 24, "temperature": 0, "cache_prompt": False}
    plain = post(server4, "/completion", base).json()
    words = plain["content"].split()
    assert words, plain
    # ban every token of the answer's first word, as text and as ids: it never appears
    ids = httpx.post(server4["url"] + "/tokenize", json={"content": " " + words[0]}).json()["tokens"]
    banned = post(server4, "/completion", {**base, "logit_bias": [[t, False] for t in ids]}).json()
    toks = httpx.post(server4["url"] + "/tokenize", json={"content": banned["content"]}).json()["tokens"]
    assert banned["content"] != plain["content"] and not set(ids) & set(toks)
    openai_bias = _client(server4).completions.create(model="m", prompt=prompt, max_tokens=24, temperature=0,
                                                      logit_bias={str(t): -100 for t in ids},
                                                      extra_body={"cache_prompt": False})
    assert openai_bias.choices[0].text == banned["content"]
    # a strong repeat penalty breaks the repetition that greedy decoding continues
    rep = post(server4, "/completion", {**base, "repeat_penalty": 1.8}).json()
    assert rep["content"] != plain["content"]
    assert rep["content"].count("cat") < plain["content"].count("cat")
    assert post(server4, "/completion", {**base, "repeat_penalty": 1.3, "presence_penalty": 0.5,
                                         "frequency_penalty": 0.5, "dry_multiplier": 0.8, "xtc_probability": 0.5,
                                         "typical_p": 0.9, "top_n_sigma": 1.5, "temperature": 0.7}).status_code == 200
    assert post(server4, "/completion", {**base, "mirostat": 2, "temperature": 0.7}).status_code == 200
    for bad in ({"repeat_penalty": "high"}, {"mirostat": 3}, {"logit_bias": 5}, {"dry_sequence_breakers": [1]}):
        assert post(server4, "/completion", {**base, **bad}).status_code == 400
    assert post(server4, "/completion", {**base, "n_predict": 2, "some_unknown_field": 1}).status_code == 200


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
ADD = {"type": "function", "function": {
    "name": "add", "description": "Add two integers",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                   "required": ["a", "b"], "additionalProperties": False}}}


def test_tool_calls(server4):
    jsonschema = pytest.importorskip("jsonschema")
    client = _client(server4)
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    r = client.chat.completions.create(model="m", messages=ask, tools=[WEATHER, ADD], tool_choice="required",
                                       temperature=0, max_tokens=80)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
    call = choice.message.tool_calls[0]
    schema = {WEATHER["function"]["name"]: WEATHER, ADD["function"]["name"]: ADD}[call.function.name]
    jsonschema.validate(json.loads(call.function.arguments), schema["function"]["parameters"])
    # a named function, streamed: the call comes in one delta before the end
    chunks = list(client.chat.completions.create(
        model="m", messages=ask, tools=[WEATHER, ADD], tool_choice={"type": "function", "function": {"name": "add"}},
        temperature=0, max_tokens=60, stream=True))
    deltas = [tc for ch in chunks if ch.choices and ch.choices[0].delta.tool_calls for tc in ch.choices[0].delta.tool_calls]
    assert len(deltas) == 1 and deltas[0].function.name == "add"
    jsonschema.validate(json.loads(deltas[0].function.arguments), ADD["function"]["parameters"])
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason] == ["tool_calls"]
    # the call and its result sent back; "auto" may answer in text or call again, either well formed
    follow = ask + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                    {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 degrees"}]
    r2 = client.chat.completions.create(model="m", messages=follow, tools=[WEATHER, ADD], temperature=0, max_tokens=80)
    m2 = r2.choices[0].message
    assert (m2.content is not None and not m2.tool_calls) or (m2.tool_calls and r2.choices[0].finish_reason == "tool_calls")
    none = client.chat.completions.create(model="m", messages=ask, tools=[WEATHER], tool_choice="none",
                                          temperature=0, max_tokens=8)
    assert not none.choices[0].message.tool_calls and none.choices[0].message.content
    for bad in ({"tools": [{"type": "function"}]}, {"tools": [WEATHER], "tool_choice": "sometimes"},
                {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
                {"tools": [WEATHER], "response_format": {"type": "json_object"}}):
        assert post(server4, "/v1/chat/completions", {"messages": ask, "max_tokens": 4, **bad}).status_code == 400


def test_tool_calls_in_the_templates_own_format(tmp_path):
    """Qwen 2.5's template writes calls in <tool_call> tags: the tools, calls and results go
    through the template, and a required call is constrained to those tags."""
    jsonschema = pytest.importorskip("jsonschema")
    with running_server(tmp_path, model="qwen2.5-coder-0.5b-instruct", ctx=2048) as srv:
        client = _client(srv)
        ask = [{"role": "user", "content": "What is the weather in Paris, in celsius?"}]
        r = client.chat.completions.create(model="m", messages=ask, tools=[WEATHER, ADD], tool_choice="required",
                                           temperature=0, max_tokens=80)
        calls = r.choices[0].message.tool_calls
        assert r.choices[0].finish_reason == "tool_calls" and calls and calls[0].function.name == "get_weather"
        jsonschema.validate(json.loads(calls[0].function.arguments), WEATHER["function"]["parameters"])
        follow = ask + [{"role": "assistant", "content": None, "tool_calls": [calls[0].model_dump()]},
                        {"role": "tool", "tool_call_id": calls[0].id, "content": "sunny, 21 degrees"}]
        r2 = client.chat.completions.create(model="m", messages=follow, tools=[WEATHER, ADD], temperature=0,
                                            max_tokens=40)
        m2 = r2.choices[0].message
        assert m2.content or m2.tool_calls
        tokens = r2.usage.prompt_tokens
        assert tokens > r.usage.prompt_tokens  # the call and its result are in the prompt


# a Llama 3.1-style template, written for this test: tools in a system turn that asks for
# {"name", "parameters"} JSON, results in "ipython" turns
LLAMA3_STYLE = """{%- if tools %}<|start_header_id|>system<|end_header_id|>

Environment: ipython
Answer a function call as JSON: {"name": function name, "parameters": dictionary of its arguments}.
{%- for t in tools %}
{{ t | tojson }}
{%- endfor %}<|eot_id|>
{%- endif %}
{%- for m in messages %}
{%- if m.role == 'tool' or m.role == 'ipython' %}<|start_header_id|>ipython<|end_header_id|>

{{ m.content }}<|eot_id|>
{%- elif m.tool_calls %}<|start_header_id|>assistant<|end_header_id|>

{%- for c in m.tool_calls %}{"name": "{{ c.function.name }}", "parameters": {{ c.function.arguments | tojson }}}{%- endfor %}<|eot_id|>
{%- else %}<|start_header_id|>{{ m.role }}<|end_header_id|>

{{ m.content }}<|eot_id|>
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>

{% endif %}"""


def test_tool_calls_in_the_llama3_format(tmp_path):
    """A template of Llama 3's shape: a required call is constrained to its {"name", "parameters"}
    JSON, which comes back as an OpenAI tool call; the call and its result go back through it.
    Random weights: only the constraint makes the call valid."""
    jsonschema = pytest.importorskip("jsonschema")
    from llamakv.random_gguf import write_random_gguf
    from llamakv.tools import style_of

    assert style_of(LLAMA3_STYLE) == "llama3"
    model = write_random_gguf(tmp_path / "llama3-style.gguf", chat_template=LLAMA3_STYLE)
    with running_server(tmp_path, model=str(model), ctx=2048) as srv:
        client = _client(srv)
        ask = [{"role": "user", "content": "What is 2 + 3?"}]
        r = client.chat.completions.create(model="m", messages=ask, tools=[ADD], tool_choice="required",
                                           temperature=0, max_tokens=120)
        calls = r.choices[0].message.tool_calls
        assert r.choices[0].finish_reason == "tool_calls" and len(calls) == 1 and calls[0].function.name == "add"
        jsonschema.validate(json.loads(calls[0].function.arguments), ADD["function"]["parameters"])
        follow = ask + [{"role": "assistant", "content": None, "tool_calls": [calls[0].model_dump()]},
                        {"role": "tool", "tool_call_id": calls[0].id, "content": "5"}]
        r2 = client.chat.completions.create(model="m", messages=follow, tools=[ADD], tool_choice="none",
                                            temperature=0, max_tokens=4)
        assert r2.usage.prompt_tokens > r.usage.prompt_tokens
