import pytest
import torch

from conftest import tiny_model_config
from llmkit.data.tokenizer import Tokenizer
from llmkit.errors import ConfigError
from llmkit.infer.generate import SamplingConfig, generate, process_logits
from llmkit.model import build_model

PROMPTS = ["ROMEO:", "But soft, what light through yonder window breaks? It is the east", "O"]


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return Tokenizer.load(tokenizer_dir)


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def model(request):
    torch.manual_seed(0)
    return build_model(tiny_model_config(request.param, block_size=128)).eval()


def test_left_padded_batch_equals_one_prompt_at_a_time(model, tok):
    cfg = SamplingConfig(max_new_tokens=20, temperature=0)
    batch = generate(model, tok, PROMPTS, cfg, eos_ids=set())
    for prompt, got in zip(PROMPTS, batch):
        alone = generate(model, tok, [prompt], cfg, eos_ids=set())[0]
        assert got.token_ids == alone.token_ids
        assert len(got.token_ids) == 20 and got.finish_reason == "length"


def test_greedy_matches_argmax_of_full_forward(model, tok):
    ids = tok.encode(PROMPTS[1])
    out = generate(model, tok, [ids], SamplingConfig(max_new_tokens=8, temperature=0), eos_ids=set())[0]
    seq = list(ids)
    with torch.no_grad():
        for _ in range(8):
            logits = model(torch.tensor([seq])).logits[0, -1, : model.cfg.vocab_size]
            seq.append(int(logits.argmax()))
    assert out.token_ids == seq[len(ids):]


def test_sampling_is_reproducible_with_a_seed(model, tok):
    cfg = SamplingConfig(max_new_tokens=15, temperature=1.0, top_k=50, top_p=0.9, seed=3)
    a = generate(model, tok, ["ROMEO:"], cfg, eos_ids=set())[0]
    b = generate(model, tok, ["ROMEO:"], cfg, eos_ids=set())[0]
    assert a.token_ids == b.token_ids


def test_eos_and_stop_strings_end_generation(model, tok):
    cfg = SamplingConfig(max_new_tokens=10, temperature=0)
    first = generate(model, tok, ["ROMEO:"], cfg, eos_ids=set())[0]
    ids = first.token_ids
    cut_at = next((i for i in range(1, len(ids)) if ids[i] not in ids[:i]), 0)  # a token not produced before
    ended = generate(model, tok, ["ROMEO:"], cfg, eos_ids={ids[cut_at]})[0]
    assert ended.finish_reason == "eos" and ended.token_ids == ids[:cut_at]
    stop = first.text[len(first.text) // 2:][:3]
    if stop:
        cut = generate(model, tok, ["ROMEO:"], SamplingConfig(max_new_tokens=10, temperature=0, stop=[stop]),
                       eos_ids=set())[0]
        assert cut.finish_reason == "stop" and stop not in cut.text and first.text.startswith(cut.text)


def test_streaming_yields_exactly_the_final_text(model, tok):
    pieces: list[str] = []
    out = generate(model, tok, ["ROMEO:"], SamplingConfig(max_new_tokens=25, temperature=0, stop=["zzz"]),
                   on_text=lambda _, t: pieces.append(t), eos_ids=set())[0]
    assert "".join(pieces) == out.text and len(pieces) > 1


def test_process_logits_filters():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    k = process_logits(logits, None, SamplingConfig(temperature=1.0, top_k=2))
    assert torch.isinf(k[0, [0, 3]]).all() and torch.isfinite(k[0, [1, 2]]).all()
    p = process_logits(logits, None, SamplingConfig(temperature=1.0, top_p=0.5))
    assert torch.isfinite(p[0]).sum() == 1  # the top token alone holds > 50 %
    r = process_logits(logits, torch.tensor([[1]]), SamplingConfig(temperature=0, repetition_penalty=2.0))
    assert r[0, 1] == 1.5 and r[0, 2] == 2.0


def test_bad_sampling_values_are_errors():
    with pytest.raises(ConfigError, match="top-p"):
        SamplingConfig(top_p=0)
    with pytest.raises(ConfigError, match="temperature"):
        SamplingConfig(temperature=-1)
