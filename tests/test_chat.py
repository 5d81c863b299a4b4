"""`llmkit chat` and `generate --chat` on a tiny random model: history, commands, context overflow, pipes."""

from __future__ import annotations

import io
import json

import pytest

from helpers_convert import chat_tokenizer, make_run_folder
from llmkit.cli.main import main
from llmkit.infer.chat import ChatSession, run_chat
from llmkit.infer.generate import SamplingConfig


@pytest.fixture(scope="module")
def run(tmp_path_factory, corpus_file):
    tok = chat_tokenizer(corpus_file.read_text()[:100_000])
    return make_run_folder(tmp_path_factory.mktemp("chat") / "run", "llama", tok, block_size=96)


@pytest.fixture(scope="module")
def llm(run):
    import llmkit

    return llmkit.load(run, device="cpu")


def session(llm, **kw) -> ChatSession:
    return ChatSession(llm, SamplingConfig(max_new_tokens=6, temperature=0), **kw)


def test_turns_accumulate_and_reset(llm):
    s = session(llm, system="Be brief.")
    s.reply("hello")
    s.reply("again")
    assert [m["role"] for m in s.history] == ["user", "assistant", "user", "assistant"]
    msgs = s.messages("third")
    assert msgs[0] == {"role": "system", "content": "Be brief."} and msgs[-1]["content"] == "third"
    s.reset()
    assert s.history == []


def test_oldest_turns_are_dropped_when_the_context_is_full(llm):
    s = session(llm)
    dropped = []
    for i in range(8):
        s.reply(f"tell me about the king, number {i}", on_dropped=dropped.append)
    assert sum(dropped) > 0
    ids, _ = s.fit("next")
    assert len(ids) + 6 <= llm.model.cfg.block_size
    assert s.history[-2]["content"] == "tell me about the king, number 7"  # the newest turn is always kept


def test_piped_repl_reads_one_turn_per_line_until_exit(llm):
    stdin = io.StringIO("hello there\n\n/reset\n/bogus\nhow are you\n/exit\nnever read\n")
    out, err = io.StringIO(), io.StringIO()
    n = run_chat(session(llm), stdin=stdin, stdout=out, stderr=err)
    assert n == 2 and out.getvalue().count("\n") == 2
    assert "(history cleared)" in err.getvalue() and "unknown command /bogus" in err.getvalue()


def test_repl_says_when_it_drops_turns(llm):
    stdin = io.StringIO("".join(f"a rather long question about Rome, number {i}\n" for i in range(8)))
    err = io.StringIO()
    assert run_chat(session(llm), stdin=stdin, stdout=io.StringIO(), stderr=err) == 8
    assert "context full: dropped" in err.getvalue()


def test_message_longer_than_the_context_is_reported_not_fatal(llm):
    stdin = io.StringIO("word " * 200 + "\nshort\n")
    out, err = io.StringIO(), io.StringIO()
    assert run_chat(session(llm), stdin=stdin, stdout=out, stderr=err) == 1
    assert "the context holds 96" in err.getvalue()


def test_chat_cli_reads_stdin(run, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\nhello\n"))
    assert main(["chat", "--model", str(run), "--max-new-tokens", "4", "--temperature", "0", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.count("\n") == 2


def test_generate_chat_wraps_the_prompt_in_the_template(run, llm, capsys):
    assert main(["generate", "--model", str(run), "--chat", "--prompt", "hi", "--max-new-tokens", "5",
                 "--temperature", "0", "--json", "--device", "cpu"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["prompt"] == "hi"
    ids = llm.tokenizer.encode(llm.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}]))
    want = llm.generate([ids], max_new_tokens=5, temperature=0, eos_ids={llm.tokenizer.eos_id})[0]
    assert out["text"] == want.text


def test_bf16_chat_runs(run, llm):
    """bf16 weights really are bf16, and they answer like fp32: logits within 2 % of the largest fp32 logit
    (measured: 0.5 %) and the same first greedy tokens."""
    import torch

    import llmkit

    lm = llmkit.load(run, device="cpu", dtype="bfloat16")
    assert all(p.dtype == torch.bfloat16 for p in lm.model.parameters())
    msgs = [{"role": "user", "content": "hi there, my lord"}]
    ids = torch.tensor([llm.tokenizer.encode_prompt(llm.tokenizer.apply_chat_template(msgs))])
    V = llm.model.cfg.vocab_size
    with torch.no_grad():
        want, got = llm.model(ids).logits[0, :, :V], lm.model(ids).logits[0, :, :V]
    assert got.dtype == torch.bfloat16
    assert (got.float() - want).abs().max().item() <= 2e-2 * want.abs().max().item()
    r16 = lm.chat(msgs, max_new_tokens=4, temperature=0)
    r32 = llm.chat(msgs, max_new_tokens=4, temperature=0)
    assert r16.token_ids == r32.token_ids and len(r16.token_ids) >= 2


def test_chat_prompts_start_with_one_bos_when_the_tokenizer_asks(llm):
    from llmkit.data.tokenizer import DEFAULT_CHAT_TEMPLATE, Tokenizer
    from llmkit.infer.api import LLM

    tk = llm.tokenizer.tk
    plain = Tokenizer(tk, eos_token="<|im_end|>", bos_token="<|endoftext|>", add_bos=True)
    writes_bos = Tokenizer(tk, eos_token="<|im_end|>", bos_token="<|endoftext|>", add_bos=True,
                           chat_template="{{ bos_token }}" + DEFAULT_CHAT_TEMPLATE)
    bos = plain.bos_id
    for tok in (plain, writes_bos):
        ids, _ = ChatSession(LLM(llm.model, tok, llm.path), SamplingConfig(max_new_tokens=2)).fit("hello")
        assert ids[0] == bos and ids[1] != bos and ids[1] == tk.token_to_id("<|im_start|>")
    ids, _ = session(llm).fit("hello")  # the test tokenizer does not ask for BOS
    assert ids[0] == tk.token_to_id("<|im_start|>")
