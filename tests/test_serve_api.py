"""`llmkit serve` through the official `openai` client, against a real server process on 127.0.0.1.

What the server answers is checked against llmkit itself: greedy text equals `LLM.generate` / `LLM.chat`, usage
equals the tokenizer's counts, embeddings equal `llmkit embed`'s. One module-scoped server (tiny Llama with a
ChatML tokenizer, an API key, a small queue and body limit) serves every test but the slow SmolLM2 one.
"""

from __future__ import annotations

import re
import time
import urllib.request

import numpy as np
import pytest
from starlette.testclient import TestClient

import llmkit
from helpers_serve import running_server, tiny_chat_run
from llmkit.data.tokenizer import Tokenizer

openai = pytest.importorskip("openai")

KEY = "sk-test-key"
MAX_BODY = 20_000
CONTEXT = 256


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return tiny_chat_run(tmp_path_factory.mktemp("serve-run") / "chat", block_size=CONTEXT)


@pytest.fixture(scope="module")
def server(run_dir, tmp_path_factory):
    with running_server(run_dir, tmp_path_factory.mktemp("serve-log"), "--api-key", KEY, "--max-batch", "4",
                        "--max-queue", "2", "--max-body-bytes", str(MAX_BODY), "--served-model-name", "tiny") as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def lm(run_dir):
    return llmkit.load(run_dir, device="cpu")


AUTH = {"authorization": f"Bearer {KEY}"}
HELLO = [{"role": "user", "content": "Good morrow, sweet lord."}]


def is_openai_error(body) -> bool:
    err = body.get("error") if isinstance(body, dict) else None
    return isinstance(err, dict) and set(err) == {"message", "type", "param", "code"} and bool(err["message"])


def test_health_and_models(server, client):
    assert server.get("/health")[0] == 200
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_completion_is_llmkit_generate_and_usage_is_exact(client, lm):
    tok: Tokenizer = lm.tokenizer
    out = client.completions.create(model="tiny", prompt="ROMEO:", max_tokens=8, temperature=0, logprobs=2)
    want = lm.generate("ROMEO:", max_new_tokens=8, temperature=0)
    choice = out.choices[0]
    assert choice.text == want.text
    assert out.usage.prompt_tokens == len(tok.encode_prompt("ROMEO:"))
    assert out.usage.completion_tokens == len(want.token_ids) == len(choice.logprobs.tokens)
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    assert choice.finish_reason == ("length" if want.finish_reason == "length" else "stop")
    for top, lp in zip(choice.logprobs.top_logprobs, choice.logprobs.token_logprobs):
        # a dict by token text: two ids that decode alike (half characters) share a key, as in OpenAI's format
        assert 1 <= len(top) <= 2 and max(top.values()) == pytest.approx(lp)  # greedy took the likeliest


def test_chat_is_llmkit_chat(client, lm):
    out = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=12, temperature=0)
    want = lm.chat(HELLO, max_new_tokens=12, temperature=0)
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == want.text
    prompt = lm.tokenizer.encode_prompt(lm.tokenizer.apply_chat_template(HELLO, add_generation_prompt=True))
    assert out.usage.prompt_tokens == len(prompt)
    assert out.usage.completion_tokens == len(want.token_ids)


def test_stream_equals_the_whole_answer(client):
    args = dict(model="tiny", messages=HELLO, max_tokens=24, temperature=0.9, seed=7)
    whole = client.chat.completions.create(**args)
    chunks = list(client.chat.completions.create(**args, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len({c.id for c in chunks}) == 1
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content and text
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == \
        [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage


def test_n_choices_are_seeded_one_by_one(client):
    args = dict(model="tiny", prompt="KING:", max_tokens=10, temperature=1.0)
    both = client.completions.create(**args, n=2, seed=11, logprobs=0)
    assert [c.index for c in both.choices] == [0, 1]
    texts = [c.text for c in both.choices]
    assert texts[0] != texts[1]
    assert texts == [client.completions.create(**args, seed=s).choices[0].text for s in (11, 12)]
    assert both.usage.completion_tokens == sum(len(c.logprobs.tokens) for c in both.choices)
    assert both.usage.prompt_tokens == client.completions.create(**args, seed=11).usage.prompt_tokens  # once, not n


def test_chat_logprobs(client):
    out = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=6, temperature=0, logprobs=True,
                                         top_logprobs=3)
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens
    for item in content:
        tops = [t.logprob for t in item.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True)
        assert item.token == item.top_logprobs[0].token and item.logprob == pytest.approx(tops[0])  # greedy
        assert sum(np.exp(tops)) <= 1 + 1e-5
    assert bytes(b for i in content for b in i.bytes).decode("utf-8", "replace") == out.choices[0].message.content


def _spanning_stop(tokens: list[str]) -> tuple[str, int]:
    """A 2-character stop string made of the end of one generated token and the start of the next, first seen at
    that boundary; and where the text must be cut."""
    text = "".join(tokens)
    pos = 0
    for a, b in zip(tokens, tokens[1:]):
        pos += len(a)
        stop = a[-1:] + b[:1]
        if len(stop) == 2 and "\ufffd" not in stop and not stop.isspace() and text.find(stop) == pos - 1:
            return stop, pos - 1
    raise AssertionError(f"no clean token boundary in {tokens!r}")


def test_stop_string_spanning_two_tokens_is_not_leaked(client):
    args = dict(model="tiny", prompt="To be, or not", max_tokens=40, temperature=0)
    full = client.completions.create(**args, logprobs=0).choices[0]
    stop, cut = _spanning_stop(full.logprobs.tokens)
    want = full.text[:cut]
    out = client.completions.create(**args, stop=[stop, "never-seen"]).choices[0]
    assert (out.text, out.finish_reason) == (want, "stop")
    pieces = [c.choices[0].text for c in client.completions.create(**args, stop=stop, stream=True) if c.choices]
    assert "".join(pieces) == want  # not even the first half of the stop string reached the client
    chat = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=40, temperature=0, logprobs=True)
    stop, cut = _spanning_stop([t.token for t in chat.choices[0].logprobs.content])
    streamed = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=40, temperature=0,
                                              stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == \
        chat.choices[0].message.content[:cut]


def test_embeddings_equal_llmkit_embed(client, run_dir, capsys):
    from llmkit.cli.main import main

    texts = ["Good morrow.", "What light through yonder window breaks?"]
    assert main(["embed", "--model", str(run_dir), "--text", texts[0], "--text", texts[1]]) == 0
    import json

    cli = np.array([json.loads(line)["embedding"] for line in capsys.readouterr().out.splitlines()])
    as_floats = client.embeddings.create(model="tiny", input=texts, encoding_format="float")
    as_base64 = client.embeddings.create(model="tiny", input=texts)  # the client's default: base64 float32
    for got in (as_floats, as_base64):
        emb = np.array([d.embedding for d in got.data])
        assert emb.shape == cli.shape and np.abs(emb - cli).max() <= 5e-7  # the CLI rounds to 6 decimals
    assert np.array_equal(np.array([d.embedding for d in as_floats.data]),
                          np.array([d.embedding for d in as_base64.data]))
    assert as_floats.usage.prompt_tokens > 0


def test_api_key_is_required(server, client):
    status, body = server.get("/v1/models")
    assert status == 401 and is_openai_error(body)
    status, body = server.post("/v1/chat/completions", {"model": "tiny", "messages": HELLO},
                               {"authorization": "Bearer wrong"})
    assert status == 401 and is_openai_error(body)
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model="tiny", messages=HELLO)
    assert server.get("/health")[0] == 200  # monitors need no key


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=HELLO)
    assert e.value.body["code"] == "model_not_found" and "tiny" in e.value.body["message"]


def test_body_over_the_limit_is_413(server):
    status, body = server.post("/v1/completions", {"model": "tiny", "prompt": "x" * MAX_BODY}, AUTH)
    assert status == 413 and is_openai_error(body) and f"{MAX_BODY:,}" in body["error"]["message"]


BAD = [
    (b'{"model": "tiny", "messages": [', "invalid_json", None),
    ({"model": "tiny"}, "missing_field", "messages"),
    ({"model": "tiny", "messages": HELLO, "temperature": "hot"}, "invalid_type", "temperature"),
    ({"model": "tiny", "messages": [{"role": "user", "content": 5}]}, "invalid_type", "messages[0].content"),
    ({"model": "tiny", "messages": HELLO, "max_tokens": 0}, "invalid_value", "max_tokens"),
    ({"model": "tiny", "messages": HELLO, "n": 0}, "invalid_value", "n"),
    ({"model": "tiny", "messages": HELLO, "top_logprobs": 2}, "invalid_value", "top_logprobs"),
    ({"model": "tiny", "messages": HELLO, "response_format": {"type": "json_object"}}, "unsupported",
     "response_format"),
    ({"model": "tiny", "messages": HELLO, "max_tokens": CONTEXT}, "context_length_exceeded", "messages"),
]


@pytest.mark.parametrize("body,code,param", BAD, ids=[b[1] + "-" + str(b[2]) for b in BAD])
def test_bad_requests_are_400_in_openai_shape(server, body, code, param):
    status, got = server.post("/v1/chat/completions", body, AUTH)
    assert status == 400 and is_openai_error(got), got
    assert (got["error"]["code"], got["error"]["param"]) == (code, param)


def test_prompt_longer_than_context_names_the_numbers(server, lm):
    prompt = "O Romeo, Romeo, wherefore art thou Romeo? " * 40
    n = len(lm.tokenizer.encode_prompt(prompt))
    assert n > CONTEXT
    status, body = server.post("/v1/completions", {"model": "tiny", "prompt": prompt}, AUTH)
    assert status == 400 and body["error"]["code"] == "context_length_exceeded"
    assert f"maximum context length is {CONTEXT} tokens" in body["error"]["message"]
    assert str(n) in body["error"]["message"]


def _metric(server, name: str) -> float:
    text = server.get("/metrics")[1]
    return float(re.search(rf"^{re.escape(name)} (\S+)$", text, re.M).group(1))


def test_full_queue_is_429_and_refused_requests_leave_nothing_behind(server, client):
    # --max-batch 4 --max-queue 2: sixteen long choices cannot all be taken; the request is refused whole.
    with pytest.raises(openai.RateLimitError) as e:
        client.completions.create(model="tiny", prompt="x", n=16, max_tokens=200)
    assert e.value.status_code == 429 and e.value.body["code"] == "queue_full"
    _wait_idle(server)
    assert client.completions.create(model="tiny", prompt="x", max_tokens=2).usage.completion_tokens >= 1


def _wait_idle(server, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while _metric(server, "llmkit_requests_running") or _metric(server, "llmkit_queue_depth"):
        assert time.monotonic() < deadline, "requests still running after their clients left"
        time.sleep(0.05)


def test_disconnect_mid_stream_frees_the_slot(server):
    _wait_idle(server)
    before = _metric(server, "llmkit_completion_tokens_total")
    req = urllib.request.Request(server.url + "/v1/completions", method="POST", headers={**AUTH},
                                 data=b'{"model": "tiny", "prompt": "x", "max_tokens": 250, "stream": true, '
                                      b'"temperature": 0, "stop": ["\\u0000never"]}')
    with urllib.request.urlopen(req, timeout=30) as r:
        assert r.readline().startswith(b"data: ")  # generation has started
    _wait_idle(server)  # the connection is closed: the row must leave the batch
    assert _metric(server, "llmkit_completion_tokens_total") - before < 250


def test_metrics_count_requests_tokens_and_time_to_first_token(server, client):
    client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=3)
    text = server.get("/metrics")[1]
    assert re.search(r'^llmkit_http_requests_total\{path="/v1/chat/completions",status="200"\} [1-9]', text, re.M)
    assert re.search(r'^llmkit_http_requests_total\{path="/v1/chat/completions",status="400"\} [1-9]', text, re.M)
    assert _metric(server, "llmkit_time_to_first_token_seconds_count") >= 1
    assert _metric(server, "llmkit_completion_tokens_total") >= 3
    assert "llmkit_queue_depth 0" in text


def _in_process(run) -> TestClient:
    """The same app in this process (no socket): for the refusals that depend on what kind of model is served."""
    from llmkit.infer.load import load_model
    from llmkit.serve.app import create_app
    from llmkit.serve.served import serve_model

    return TestClient(create_app(serve_model(load_model(run), "m")))


def test_encoder_embeds_and_refuses_to_generate(tmp_path):
    from helpers_convert import chat_tokenizer, make_run_folder
    from helpers_serve import shakespeare
    from llmkit.tasks.embed import SentenceEncoder

    run = make_run_folder(tmp_path / "bert", "bert", chat_tokenizer(shakespeare(20_000)))
    with _in_process(run) as c:
        for path, body in (("/v1/completions", {"prompt": "hi"}), ("/v1/chat/completions", {"messages": HELLO})):
            r = c.post(path, json={"model": "m", **body})
            assert r.status_code == 400 and is_openai_error(r.json())
            assert "BERT encoder" in r.json()["error"]["message"] and "/v1/embeddings" in r.json()["error"]["message"]
        r = c.post("/v1/embeddings", json={"model": "m", "input": ["Good morrow.", "Adieu."]})
        assert r.status_code == 200
        got = np.array([d["embedding"] for d in r.json()["data"]], dtype=np.float32)
        assert np.array_equal(got, SentenceEncoder(str(run)).encode(["Good morrow.", "Adieu."]))
        assert c.get("/v1/models").json()["data"][0]["generates"] is False


def test_model_without_chat_template_says_so(tmp_path):
    from helpers_convert import make_run_folder
    from helpers_serve import shakespeare

    run = make_run_folder(tmp_path / "plain", "gpt2", Tokenizer.train_bpe([shakespeare(20_000)], vocab_size=300))
    with _in_process(run) as c:
        r = c.post("/v1/chat/completions", json={"model": "m", "messages": HELLO})
        assert r.status_code == 400 and r.json()["error"]["code"] == "no_chat_template"
        assert "/v1/completions" in r.json()["error"]["message"]
        r = c.post("/v1/completions", json={"model": "m", "prompt": "KING:", "max_tokens": 3})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1


def test_a_failing_model_is_a_500_in_openai_shape(run_dir, monkeypatch):
    from llmkit.infer.load import load_model
    from llmkit.serve.app import create_app
    from llmkit.serve.served import serve_model

    served = serve_model(load_model(run_dir), "m")

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(served.loaded.model, "forward", broken)
    with TestClient(create_app(served)) as c:
        r = c.post("/v1/completions", json={"model": "m", "prompt": "hi", "max_tokens": 2})
        assert r.status_code == 500 and r.json()["error"]["code"] == "engine_error"
        assert "simulated" in r.json()["error"]["message"]
        r = c.post("/v1/completions", json={"model": "m", "prompt": "hi", "max_tokens": 2, "stream": True})
        assert r.status_code == 200 and '"code":"engine_error"' in r.text and r.text.endswith("data: [DONE]\n\n")


@pytest.mark.slow
def test_smollm2_knows_the_capital_of_france(tmp_path):
    with running_server("smollm2-135m-instruct", tmp_path) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        out = client.chat.completions.create(model="smollm2-135m-instruct", temperature=0, max_tokens=30,
                                             messages=[{"role": "user", "content": "What is the capital of France?"}])
    answer = out.choices[0].message.content
    print(f"smollm2-135m-instruct: {answer!r}")
    assert "Paris" in answer
    tok = llmkit.load("smollm2-135m-instruct", device="cpu").tokenizer
    assert out.usage.completion_tokens == len(tok.encode(answer))
