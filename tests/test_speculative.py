"""Speculative decoding: greedy output identical to plain decoding, the sampled distribution preserved, caches
rewound, limits (eos, stop strings, max_new_tokens, context) as plain `generate`, bad drafts refused."""

import copy
import json
from dataclasses import replace

import pytest
import torch
from scipy.stats import chisquare

from conftest import tiny_model_config
from llmkit.data.tokenizer import Tokenizer
from llmkit.errors import ConfigError
from llmkit.infer.generate import SamplingConfig, generate, process_logits
from llmkit.infer.speculative import NgramDraft, Speculation
from llmkit.model import build_model

PROMPTS = ["ROMEO:", "But soft, what light through yonder window breaks? It is the east", "O"]


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return Tokenizer.load(tokenizer_dir)


@pytest.fixture(scope="module")
def target():
    torch.manual_seed(0)
    return build_model(tiny_model_config("llama", block_size=128)).eval()


@pytest.fixture(scope="module")
def student():
    """Another architecture, other weights, a shorter context than the target: the same tokenizer."""
    torch.manual_seed(1)
    return build_model(tiny_model_config("gpt2", block_size=48)).eval()


def drafts(target, student) -> dict[str, Speculation]:
    return {"student": Speculation(student, draft_tokens=3), "self": Speculation(target, draft_tokens=4, name="self"),
            "ngram": Speculation(None, draft_tokens=5, ngram_size=2)}


@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_greedy_output_is_plain_greedy_output(target, student, tok, penalty):
    cfg = SamplingConfig(max_new_tokens=40, temperature=0, repetition_penalty=penalty)
    plain = [generate(target, tok, [p], cfg, eos_ids=set())[0] for p in PROMPTS]
    for name, spec in drafts(target, student).items():
        got = generate(target, tok, PROMPTS, cfg, eos_ids=set(), draft=spec)
        assert [g.token_ids for g in got] == [p.token_ids for p in plain], name
        assert [g.text for g in got] == [p.text for p in plain] and all(g.finish_reason == "length" for g in got)
        for g in got:  # every verify pass yields its accepted drafts plus one token of its own
            prefill = len(tok.encode(g.prompt)) > 1  # a one-token prompt goes straight into the first verify pass
            assert 0 <= g.accepted <= g.drafted and g.decode_seconds > 0
            assert g.accepted + g.target_forwards - prefill == 40
        if name == "self":  # a draft that is the target is always right
            assert all(g.acceptance_rate == 1.0 and g.tokens_per_target_forward > 4 for g in got)


def test_eos_stop_strings_and_max_new_tokens_end_mid_block(target, student, tok):
    """Accepted drafts past eos, a stop string or max_new_tokens are never emitted."""
    cfg = SamplingConfig(max_new_tokens=30, temperature=0)
    prompt = PROMPTS[1]
    full = generate(target, tok, [prompt], cfg, eos_ids=set())[0].token_ids
    eos = {next(full[i] for i in range(9, 30) if full[i] not in full[:i])}  # a token first produced mid-way
    stop = tok.decode(full[17:19])
    cases = [(cfg, eos), (SamplingConfig(max_new_tokens=30, temperature=0, stop=[stop]), set()),
             (SamplingConfig(max_new_tokens=7, temperature=0), set())]
    for case_cfg, eos_ids in cases:
        plain = generate(target, tok, [prompt], case_cfg, eos_ids=eos_ids)[0]
        for name, spec in drafts(target, student).items():
            pieces: list[str] = []
            got = generate(target, tok, [prompt], case_cfg, eos_ids=eos_ids, draft=spec,
                           on_text=lambda _, text, into=pieces: into.append(text))[0]
            assert (got.token_ids, got.text, got.finish_reason) == (plain.token_ids, plain.text,
                                                                    plain.finish_reason), name
            assert "".join(pieces) == got.text
    assert plain.finish_reason == "length" and len(plain.token_ids) == 7


def test_context_window_ends_generation_as_plain_does(target, student, tok):
    ids = tok.encode(PROMPTS[1])
    prompt = (ids * 10)[:120]  # 8 positions left in the target's context; past the student's
    cfg = SamplingConfig(max_new_tokens=20, temperature=0)
    plain = generate(target, tok, [prompt], cfg, eos_ids=set())[0]
    assert plain.context_full and len(plain.token_ids) == 8
    for name, spec in drafts(target, student).items():
        got = generate(target, tok, [prompt], cfg, eos_ids=set(), draft=spec)[0]
        assert got.token_ids == plain.token_ids and got.context_full, name


def test_ngram_proposes_what_followed_the_last_match():
    assert NgramDraft(3).propose([5, 6, 7, 8, 1, 6, 7], 3) == [8, 1, 6]  # the 2-gram (6, 7) matched
    assert NgramDraft(3).propose([1, 2, 9, 1, 2, 3, 1, 2], 2) == [3, 1]  # the latest match of (1, 2) wins
    assert NgramDraft(3).propose([4, 4], 3) == [4, 4, 4]  # periodic text keeps copying its own drafts
    assert NgramDraft(3).propose([1, 2, 3], 4) == []  # nothing repeats: no proposal, the target decodes one token
    growing, seq = NgramDraft(2), [1, 2, 3]  # one instance follows a growing sequence (its index grows with it)
    assert growing.propose(seq, 2) == []
    seq += [9, 2, 3, 5, 1, 2]
    assert growing.propose(seq, 3) == [3, 9, 2]  # (1, 2) began at 0: the text repeats with period 7
    seq += [3, 9, 2, 3]
    assert growing.propose(seq, 2) == [9, 2]  # (2, 3) last began at 8 (not 4, nor the tail itself)


@pytest.fixture(scope="module")
def peaked():
    """A target with sharp next-token distributions (scaled output head) and a draft that is a noisy copy of it:
    their distributions overlap by about a third, so sampling from the draft alone would be visibly wrong."""
    torch.manual_seed(0)
    target = build_model(tiny_model_config("llama", block_size=32)).eval()
    with torch.no_grad():
        target.lm_head.weight.mul_(40)
        draft = copy.deepcopy(target)
        draft.lm_head.weight.add_(torch.randn_like(draft.lm_head.weight) * draft.lm_head.weight.std() * 0.4)
    return target, draft


def next_token_probs(model, ids: list[int], cfg: SamplingConfig) -> torch.Tensor:
    """(V,) the target's law of the token after `ids`, as sampling sees it (the same `process_logits`)."""
    ctx = torch.tensor([ids])  # (1, T)
    with torch.no_grad():
        return process_logits(model(ctx).logits[:, -1, : model.cfg.vocab_size], ctx, cfg).softmax(-1)[0]


def exact_distribution(model, prompt: list[int], cfg: SamplingConfig, n: int) -> dict[tuple[int, ...], float]:
    """The target's own probability of each sequence of its first n sampled tokens, by enumeration."""
    dist = {(): 1.0}
    for _ in range(n):
        deeper = {}
        for prefix, pr in dist.items():
            probs = next_token_probs(model, prompt + list(prefix), cfg)
            for t in probs.nonzero().flatten().tolist():
                deeper[prefix + (t,)] = pr * probs[t].item()
        dist = deeper
    return dist


def lookup_prompt(model, cfg: SamplingConfig) -> list[int]:
    """A prompt [a, b, a] whose n-gram draft b (what followed a before) the target gives probability 0.25-0.75,
    so both the acceptance and the residual draw of the point-mass rule happen often."""
    for a in range(3, 200):
        for b in next_token_probs(model, [a], cfg).nonzero().flatten().tolist():
            if 0.25 < next_token_probs(model, [a, b, a], cfg)[b] < 0.75:
                return [a, b, a]
    raise AssertionError("no prompt for which the n-gram draft is plausible")


@pytest.mark.slow
def test_sampling_keeps_the_target_distribution(peaked, tok):
    """The first three sampled tokens (two drafted in one block, then one) over 600 seeded runs against their
    exact law under the target, with temperature, top-k, top-p and the repetition penalty: a chi-square test at
    p > 1e-4 (seeded, so it cannot flake; accepting drafts without the p/q rule gives p < 1e-20)."""
    target, draft = peaked
    cfg = SamplingConfig(max_new_tokens=3, temperature=0.9, top_k=4, top_p=0.95, repetition_penalty=1.3)
    prompt = lookup_prompt(target, cfg)
    exact = exact_distribution(target, prompt, cfg, 3)
    for spec in (Speculation(draft, draft_tokens=2, name="model"), Speculation(None, draft_tokens=2)):
        counts: dict[tuple[int, ...], int] = {}
        drafted = accepted = 0
        for seed in range(600):
            g = generate(target, tok, [prompt], replace(cfg, seed=seed), eos_ids=set(), draft=spec)[0]
            counts[tuple(g.token_ids)] = counts.get(tuple(g.token_ids), 0) + 1
            drafted, accepted = drafted + g.drafted, accepted + g.accepted
        assert set(counts) <= set(exact), "a sequence the target cannot produce"
        n = sum(counts.values())
        big = [s for s, p in exact.items() if p * n >= 5]  # chi-square bins: rare sequences pooled
        observed = [counts.get(s, 0) for s in big] + [n - sum(counts.get(s, 0) for s in big)]
        expected = [exact[s] * n for s in big] + [n - sum(exact[s] * n for s in big)]
        pvalue = chisquare(observed, expected).pvalue
        print(spec.name, f"acceptance {accepted / drafted:.3f}, {len(big)} bins, p-value {pvalue:.3g}")
        assert len(big) >= 6 and pvalue > 1e-4, (spec.name, observed, expected)
        assert 0.1 < accepted / drafted < 0.9, spec.name  # acceptance and the residual draw are both exercised


def test_bad_drafts_are_one_line_errors(tmp_path, tok, capsys):
    from helpers_convert import make_run_folder
    from llmkit.cli.main import main

    run = make_run_folder(tmp_path / "target", "llama", tok)
    other_tok = Tokenizer.train_bpe(["a small other corpus " * 50], vocab_size=300)
    other = make_run_folder(tmp_path / "other", "llama", other_tok)
    argv = ["generate", "--model", str(run), "--prompt", "ROMEO:", "--temperature", "0", "--device", "cpu"]
    assert main([*argv, "--draft", str(other)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: --draft ") and str(other) in err and str(run) in err
    assert f"{other_tok.vocab_size:,} tokens" in err and f"{tok.vocab_size:,} tokens" in err, err
    with pytest.raises(SystemExit) as e:
        main([*argv, "--draft", "ngram", "--draft-tokens", "0"])
    assert e.value.code == 2 and "--draft-tokens: must be an integer from 1" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="--draft-tokens must be at least 1"):
        Speculation(None, draft_tokens=0)


def test_cli_json_reports_speculation(tmp_path, tok, capsys):
    from helpers_convert import make_run_folder
    from llmkit.cli.main import main

    run = make_run_folder(tmp_path / "target", "llama", tok, block_size=128)
    argv = ["generate", "--model", str(run), "--prompt", "ROMEO:", "--prompt", "O", "--temperature", "0",
            "--max-new-tokens", "24", "--device", "cpu"]
    assert main([*argv, "--json"]) == 0
    plain = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert all(row["decode_seconds"] > 0 and row["new_tokens"] == 24 for row in plain)
    for draft, rate in ((str(run), 1.0), ("ngram", None)):
        assert main([*argv, "--json", "--draft", draft, "--draft-tokens", "4"]) == 0
        rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert [r["text"] for r in rows] == [r["text"] for r in plain]
        for r in rows:
            assert r["new_tokens"] == 24 and r["decode_seconds"] > 0 and r["draft_tokens"] == 4
            assert r["acceptance_rate"] == (round(r["accepted"] / r["drafted"], 4) if r["drafted"] else 0.0)
            assert r["tokens_per_target_forward"] == round(24 / r["target_forwards"], 4)
            assert rate is None or r["acceptance_rate"] == rate
    assert main([*argv, "--draft", "ngram"]) == 0
    out, err = capsys.readouterr()
    assert err.count("acceptance rate") == 2 and out.count("ROMEO:") == 1


def test_python_api_takes_a_model_or_ngram_as_draft(target, student, tok, tmp_path, corpus_file):
    from llmkit.infer.api import LLM

    lm = LLM(target, tok, tmp_path / "target")
    cfg = SamplingConfig(max_new_tokens=12, temperature=0)
    plain = lm.generate(PROMPTS[:2], config=cfg)
    for draft in (LLM(student, tok, tmp_path / "student"), "ngram", lm.speculation("ngram", draft_tokens=2)):
        got = lm.generate(PROMPTS[:2], config=cfg, draft=draft, draft_tokens=3)
        assert [g.token_ids for g in got] == [p.token_ids for p in plain] and got[0].drafted is not None
    assert plain[0].drafted is None and plain[0].acceptance_rate is None and plain[0].decode_seconds > 0
    other = Tokenizer.train_bpe([corpus_file.read_text()[:50_000][::-1]], vocab_size=tok.vocab_size)
    assert other.vocab_size == tok.vocab_size  # the same size is not enough: the tokens must be the same
    with pytest.raises(ConfigError, match="different tokenizer"):
        lm.generate("ROMEO:", config=cfg, draft=LLM(student, other, tmp_path / "other"))
