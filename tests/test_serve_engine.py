"""The continuous-batching engine: rows joining and leaving a running batch compute exactly what they would alone."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch

from conftest import tiny_model_config
from llmkit.data.tokenizer import Tokenizer
from llmkit.errors import ConfigError
from llmkit.infer.generate import SamplingConfig, generate
from llmkit.model import build_model
from llmkit.serve.engine import Engine, Event, Handle, QueueFull, Request

GREEDY = SamplingConfig(max_new_tokens=24, temperature=0)
PROMPTS = ["Hi", "It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
           "foolishness, it was the epoch", "A", "The quick brown fox jumps over"]


@pytest.fixture(scope="module")
def tok(tokenizer_dir) -> Tokenizer:
    return Tokenizer.load(tokenizer_dir)  # byte-level BPE, 512 tokens: a small head keeps the tests quick


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def model(request, tok) -> torch.nn.Module:
    torch.manual_seed(0)
    m = build_model(tiny_model_config(request.param, vocab_size=tok.vocab_size, block_size=128)).eval()
    with torch.no_grad():  # sharper logits: varied greedy text instead of one token repeated (a weak test)
        for name, p in m.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                p.mul_(10 if request.param == "gpt2" else 1)
    return m


class Steps:
    """Records each forward's input shape and slows it a little, so requests reliably overlap in time."""

    def __init__(self, model: torch.nn.Module, delay: float = 0.003) -> None:
        self.shapes: list[tuple[int, int]] = []
        self.delay = delay
        self.hook = model.register_forward_pre_hook(self._pre)

    def _pre(self, module, args) -> None:
        self.shapes.append(tuple(args[0].shape))
        time.sleep(self.delay)

    @property
    def decode_batches(self) -> list[int]:
        return [b for b, t in self.shapes if t == 1]


@contextmanager
def serving(model, tok, delay: float = 0.003, start: bool = True, **kw) -> Iterator[tuple[Engine, Steps]]:
    steps = Steps(model, delay)
    engine = Engine(model, tok, **kw)
    if start:
        engine.start()
    try:
        yield engine, steps
    finally:
        engine.close()
        steps.hook.remove()


def alone(model, tok, prompt: str, cfg: SamplingConfig, eos: set[int] | None = None):
    return generate(model, tok, [tok.encode(prompt)], cfg, eos_ids=eos or set())[0]


def staggered(engine: Engine, reqs: list[Request], gap: int = 2) -> tuple[list[Handle], list]:
    """Submit each request once the previous one has produced `gap` events: they join a running batch at
    different steps. The iterators are returned so they stay alive (abandoning one cancels its request)."""
    handles, iters = [], []
    for req in reqs:
        handles.append(engine.submit(req))
        iters.append(iter(handles[-1]))
        for _ in range(gap):
            next(iters[-1], None)
    return handles, iters


@pytest.mark.parametrize("grow", [256, 1], ids=["cache-sized-once", "cache-grows-while-decoding"])
def test_batched_greedy_equals_alone_with_ragged_prompts_joining_at_different_steps(model, tok, grow, monkeypatch):
    monkeypatch.setattr("llmkit.serve.batch.GROW", grow)  # 1: the shared cache outgrows its capacity mid-answer
    long_first = SamplingConfig(max_new_tokens=40, temperature=0)
    reqs = [Request(tok.encode(p), long_first if i == 0 else GREEDY, set()) for i, p in enumerate(PROMPTS)]
    with serving(model, tok) as (engine, steps):
        handles, _ = staggered(engine, reqs)  # short, then longer than the span (others shift right), then short
        results = [h.result() for h in handles]
    for p, req, got in zip(PROMPTS, reqs, results):
        want = alone(model, tok, p, req.sampling)
        assert got.token_ids == want.token_ids and got.text == want.text
        assert got.finish_reason == "length"
        assert got.completion_tokens == len(got.token_ids) == req.sampling.max_new_tokens
        assert got.prompt_tokens == len(req.prompt_ids)
    assert max(steps.decode_batches) == len(PROMPTS)  # they really ran together
    assert engine.stats["steps_total"] < sum(r.completion_tokens for r in results)  # steps were shared


def test_each_row_keeps_its_own_sampling_settings_and_seed(model, tok):
    cfgs = [SamplingConfig(max_new_tokens=20, temperature=0.9, top_k=40, seed=1),
            SamplingConfig(max_new_tokens=20, temperature=1.3, top_p=0.8, seed=2),
            SamplingConfig(max_new_tokens=20, temperature=0, repetition_penalty=1.5),
            SamplingConfig(max_new_tokens=20, temperature=0.7, repetition_penalty=1.2, seed=3)]
    reqs = [Request(tok.encode(p), c, set()) for p, c in zip(PROMPTS, cfgs)]
    with serving(model, tok) as (engine, _):
        first = [h.result() for h in staggered(engine, reqs)[0]]
        again = [h.result() for h in [engine.submit(r) for r in reversed(reqs)]][::-1]  # all at once, other order
    for p, c, a, b in zip(PROMPTS, cfgs, first, again):
        want = alone(model, tok, p, c).token_ids
        assert a.token_ids == want and b.token_ids == want


def test_stop_string_across_two_tokens_never_reaches_any_event(model, tok):
    prompt = PROMPTS[3]
    full = alone(model, tok, prompt, GREEDY)
    pieces = [tok.decode([t]) for t in full.token_ids]
    # A stop string made of the end of one token and the start of the next, not occurring earlier.
    k = next(i for i in range(3, len(pieces) - 1) if len(pieces[i].strip("\ufffd")) >= 2
             and len(pieces[i + 1].strip("\ufffd")) >= 2 and len(full.text) > 0)
    stop = pieces[k][-2:] + pieces[k + 1][:2]
    assert stop in full.text
    cut = full.text.index(stop)
    cfg = SamplingConfig(max_new_tokens=24, temperature=0, stop=["never-there", stop])
    with serving(model, tok) as (engine, _):
        other = engine.submit(Request(tok.encode(PROMPTS[1]), GREEDY, set()))
        handle = engine.submit(Request(tok.encode(prompt), cfg, set()))
        events = list(handle)
        other.result()
    want = alone(model, tok, prompt, cfg)
    text = ""
    ids: list[int] = []
    for ev in events:
        text, ids = text + ev.text, ids + ev.token_ids
        assert stop not in text and ev.completion_tokens == len(ids)
        if ev.finish_reason is None:  # a token is released only once all of its text has been
            assert text.startswith(tok.decode(ids))
    assert text == full.text[:cut] == want.text and ids == want.token_ids
    assert events[-1].finish_reason == "stop" and all(ev.finish_reason is None for ev in events[:-1])
    assert len(events) > 2  # it streamed


def test_eos_ends_the_text_without_counting_it(model, tok):
    full = alone(model, tok, PROMPTS[0], GREEDY).token_ids
    cut = next(i for i in range(1, len(full)) if full[i] not in full[:i])
    with serving(model, tok) as (engine, _):
        got = engine.submit(Request(tok.encode(PROMPTS[0]), GREEDY, {full[cut]})).result()
    assert got.finish_reason == "stop" and got.token_ids == full[:cut] and got.completion_tokens == cut


def test_logprobs_are_the_raw_log_softmax_with_top_alternatives(model, tok):
    ids = tok.encode(PROMPTS[3])
    cfg = SamplingConfig(max_new_tokens=8, temperature=1.5, seed=0)  # temperature must not change them
    with serving(model, tok) as (engine, _):
        got = engine.submit(Request(ids, cfg, set(), logprobs=3)).result()
    assert len(got.logprobs) == len(got.token_ids) == 8
    with torch.no_grad():
        logits = model(torch.tensor([ids + got.token_ids])).logits[0, len(ids) - 1:-1, : model.cfg.vocab_size]
    want = torch.log_softmax(logits.float(), -1)  # (8, V)
    for i, (t, lp) in enumerate(zip(got.token_ids, got.logprobs)):
        assert lp.logprob == pytest.approx(want[i, t].item(), abs=1e-4)
        assert [x for _, x in lp.top] == pytest.approx(want[i].topk(3).values.tolist(), abs=1e-4)
        assert lp.token == tok.decode([t])
    assert bytes(b for lp in got.logprobs for b in lp.bytes).decode("utf-8", "replace") == got.text


def test_cancel_frees_the_slot_for_a_waiting_request(model, tok):
    long = SamplingConfig(max_new_tokens=100, temperature=0)
    with serving(model, tok, max_batch=1) as (engine, steps):
        first = engine.submit(Request(tok.encode("Hi"), long, set()))
        waiting = engine.submit(Request(tok.encode("A"), GREEDY, set()))
        it = iter(first)
        next(it)
        assert engine.stats["queue_depth"] == 1
        first.cancel()
        done = waiting.result()
        cancelled = first.result()
    assert done.finish_reason == "length" and done.token_ids == alone(model, tok, "A", GREEDY).token_ids
    assert cancelled.finish_reason == "stop" and cancelled.completion_tokens < 100
    assert max(steps.decode_batches) == 1


def test_async_iteration_leaves_the_loop_free_and_a_cancelled_task_frees_the_slot(model, tok):
    long = SamplingConfig(max_new_tokens=100, temperature=0)

    async def main() -> tuple[Event, int, list[Event]]:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.001)
                ticks += 1

        async def consume(handle: Handle, got: list[Event]) -> None:
            async for ev in handle:
                got.append(ev)

        ticking = asyncio.create_task(ticker())
        events: list[Event] = []
        await consume(engine.submit(Request(tok.encode("A"), GREEDY, set())), events)
        handle, started = engine.submit(Request(tok.encode("Hi"), long, set())), []
        streaming = asyncio.create_task(consume(handle, started))
        while not started:
            await asyncio.sleep(0.001)
        streaming.cancel()  # the client went away while waiting for the next token
        ticking.cancel()
        return await asyncio.to_thread(handle.result), ticks, events

    with serving(model, tok, delay=0.005, max_batch=1) as (engine, _):
        cancelled, ticks, events = asyncio.run(main())
    assert "".join(ev.text for ev in events) == alone(model, tok, "A", GREEDY).text
    assert events[-1].finish_reason == "length" and ticks > 10  # the loop kept running while tokens were awaited
    assert cancelled.finish_reason == "stop" and cancelled.completion_tokens < 100


def test_max_batch_rows_run_at_once_the_rest_wait_in_order(model, tok):
    reqs = [Request(tok.encode(p), GREEDY, set()) for p in PROMPTS + ["Once upon a time"]]
    with serving(model, tok, start=False, max_batch=2) as (engine, steps):
        handles = [engine.submit(r) for r in reqs]
        assert engine.stats["queue_depth"] == 3  # two take the free slots at once, three wait
        engine.start()
        results = [h.result() for h in handles]
        stats = engine.stats
    assert max(steps.decode_batches) == 2
    prefills = [s for s in steps.shapes if s[1] > 1]
    assert [t for _, t in prefills] == [len(r.prompt_ids) for r in reqs if len(r.prompt_ids) > 1]  # FIFO
    for p, got in zip(PROMPTS, results):
        assert got.token_ids == alone(model, tok, p, GREEDY).token_ids
    assert stats["requests_total"] == 5 and stats["requests_running"] == 0 and stats["queue_depth"] == 0
    assert stats["completion_tokens_total"] == 5 * 24 and len(stats["time_to_first_token_seconds"]) == 5


def test_full_queue_and_close_end_waiting_requests(model, tok):
    with serving(model, tok, start=False, max_batch=1, max_queue=1) as (engine, _):
        a = engine.submit(Request(tok.encode("A"), GREEDY, set()))  # takes the free slot
        b = engine.submit(Request(tok.encode("B"), GREEDY, set()))  # waits
        with pytest.raises(QueueFull, match="1 requests are already waiting"):
            engine.submit(Request(tok.encode("C"), GREEDY, set()))
    for h in (a, b):  # closed before it ever started: they end, empty, with "length"
        got = h.result()
        assert got.finish_reason == "length" and got.text == "" and got.completion_tokens == 0
    with pytest.raises(ConfigError, match="closed"):
        engine.submit(Request(tok.encode("A"), GREEDY, set()))


def test_requests_that_cannot_fit_are_config_errors(model, tok):
    engine = Engine(model, tok, max_context=32)
    with pytest.raises(ConfigError, match=r"prompt is 20 tokens and max_new_tokens is 20: 40 is over the context "
                                          r"of 32 tokens \(at most 12"):
        engine.submit(Request([1] * 20, SamplingConfig(max_new_tokens=20), set()))
    engine.submit(Request([1] * 20, SamplingConfig(max_new_tokens=12), set()))  # exactly fits
    with pytest.raises(ConfigError, match="empty"):
        engine.submit(Request([], GREEDY, set()))
    with pytest.raises(ConfigError, match=f"id {tok.vocab_size + 5} is outside"):
        engine.submit(Request([tok.vocab_size + 5], GREEDY, set()))
    with pytest.raises(ConfigError, match="model's context \\(128\\)"):
        Engine(model, tok, max_context=1000)
    engine.close()


@pytest.mark.slow
def test_smollm2_chat_requests_batched_equal_alone(tmp_path_factory, monkeypatch):
    import llmkit
    from llmkit.data.tokenizer import end_of_turn_ids

    home = os.environ.get("LLMKIT_HOME") or str(tmp_path_factory.mktemp("llmkit_home"))
    monkeypatch.setenv("LLMKIT_HOME", home)
    lm = llmkit.load("smollm2-135m-instruct", device="cpu", dtype="float32")
    tok, model = lm.tokenizer, lm.model
    questions = ["What is the capital of France?", "Name three primary colors."]
    prompts = [tok.encode_prompt(tok.apply_chat_template([{"role": "user", "content": q}])) for q in questions]
    cfg = SamplingConfig(max_new_tokens=16, temperature=0)
    eos = set(end_of_turn_ids(tok))
    engine = Engine(model, tok)
    engine.start()
    try:
        handles, _ = staggered(engine, [Request(p, cfg, eos) for p in prompts])
        results = [h.result() for h in handles]
    finally:
        engine.close()
    for p, got in zip(prompts, results):
        assert got.token_ids == generate(model, tok, [p], cfg, eos_ids=eos)[0].token_ids
    assert "Paris" in results[0].text


def test_text_stream_never_shows_half_a_character_and_token_bytes_are_exact():
    from llmkit.infer.textstream import TextStream, token_bytes

    tok = Tokenizer.gpt2()
    ids = tok.encode("Hi 🙂 über world")
    assert any("\ufffd" in tok.decode([t]) for t in ids)  # the emoji spans several byte-level tokens
    stream, shown, released = TextStream(tok, ["wor"]), "", []
    for t in ids:
        stopped = stream.push(t)
        text, new = stream.take()
        shown, released = shown + text, released + new
        assert "\ufffd" not in shown
        if stopped:
            break
        assert shown.startswith(tok.decode(released))  # a token is released once its whole text is shown
    # The text ends where the stop string begins; the last token " world" holds the space before it.
    assert stopped and shown == "Hi 🙂 über " and tok.decode(released) == "Hi 🙂 über world"
    assert b"".join(token_bytes(tok, t) for t in ids) == "Hi 🙂 über world".encode()
