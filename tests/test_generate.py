import json

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
    # A stop string that must occur, made of generated tokens: the text is cut where they begin, and the
    # token ids end where the text ends (the stop string's tokens and everything after are dropped).
    k, stop = stop_at_token_boundary(tok, ids, first.text)
    cut = generate(model, tok, ["ROMEO:"], SamplingConfig(max_new_tokens=10, temperature=0, stop=[stop]),
                   eos_ids=set())[0]
    assert cut.finish_reason == "stop" and stop not in cut.text
    assert cut.text == tok.decode(ids[:k]) == first.text[: first.text.index(stop)]
    assert cut.token_ids == ids[:k]


def stop_at_token_boundary(tok, ids: list[int], text: str) -> tuple[int, str]:
    """(k, stop): the text of tokens k, k+1 as a stop string whose first occurrence in `text` is where token k
    starts (k >= 3 if the text allows; a repetitive one may only allow k = 0), so the expected cut is tokens[:k]."""
    for k in [*range(3, len(ids) - 1), 0, 1, 2]:
        stop = tok.decode(ids[k:k + 2])
        if stop.strip() and text.startswith(tok.decode(ids[:k])) and text.find(stop) == len(tok.decode(ids[:k])):
            return k, stop
    raise AssertionError(f"no usable stop string in {text!r}")


def test_empty_stop_string_is_an_error():
    with pytest.raises(ConfigError, match="empty stop string"):
        SamplingConfig(stop=["\n", ""])


def test_context_cap_is_reported(model, tok):
    block = model.cfg.block_size
    ids = tok.encode(PROMPTS[1])
    prompt = (ids * block)[: block - 5]  # room for 5 new tokens
    out = generate(model, tok, [prompt], SamplingConfig(max_new_tokens=20, temperature=0), eos_ids=set())[0]
    assert len(out.token_ids) == 5 and out.finish_reason == "length" and out.context_full
    free = generate(model, tok, [prompt], SamplingConfig(max_new_tokens=5, temperature=0), eos_ids=set())[0]
    assert free.token_ids == out.token_ids and not free.context_full  # max_new_tokens ended it, not the context


def test_json_token_ids_end_with_the_text_and_context_cap_warns(tmp_path, tok, capsys):
    from helpers_convert import make_run_folder
    from llmkit.cli.main import main

    run = make_run_folder(tmp_path / "run", "llama", tok, block_size=16)
    argv = ["generate", "--model", str(run), "--prompt", "ROMEO:", "--max-new-tokens", "40", "--temperature", "0",
            "--json", "--device", "cpu"]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    full = json.loads(out)
    assert full["context_full"] and full["finish_reason"] == "length" and "context (16 tokens)" in err
    assert full["tokens"] == len(full["token_ids"]) == 16 - len(tok.encode("ROMEO:"))
    k, stop = stop_at_token_boundary(tok, full["token_ids"], full["text"])
    assert main(argv + ["--stop", stop]) == 0
    cut = json.loads(capsys.readouterr().out)
    assert cut["finish_reason"] == "stop" and cut["text"] == tok.decode(full["token_ids"][:k])
    assert cut["token_ids"] == full["token_ids"][:k] and cut["tokens"] == k and not cut["context_full"]


def test_bos_starts_generation_inputs_when_the_tokenizer_asks(model, tok):
    from llmkit.data.tokenizer import Tokenizer

    seen: list[list[int]] = []
    hook = model.register_forward_pre_hook(lambda _, args: seen.append(args[0][:, :3].tolist()))
    try:
        bos_tok = Tokenizer(tok.tk, bos_token="<|pad|>", add_bos=True)  # any special token serves as BOS here
        bos = bos_tok.bos_id
        for t, want_bos in ((bos_tok, True), (tok, False)):
            seen.clear()
            generate(model, t, ["ROMEO:", "O"], SamplingConfig(max_new_tokens=2, temperature=0), eos_ids=set())
            prompt_rows = seen[0]  # the prefill: (B, L) left-padded prompts
            firsts = [next(i for i in row if i != t.pad_id or i == bos) for row in prompt_rows]
            assert (firsts == [bos, bos]) == want_bos, (prompt_rows, bos)
        seen.clear()  # a prompt that already starts with BOS does not get a second one
        generate(model, bos_tok, [[bos, *tok.encode("ROMEO:")]], SamplingConfig(max_new_tokens=1, temperature=0))
        assert seen[0][0][:2] == [bos, tok.encode("ROMEO:")[0]]
    finally:
        hook.remove()
    assert bos_tok.encode_prompt("ROMEO:") == [bos, *tok.encode("ROMEO:")]
    assert bos_tok.encode_prompt("<|pad|>ROMEO:") == [bos, *tok.encode("ROMEO:")]  # never doubled


def test_left_padded_encoder_rows_equal_unpadded_ones():
    """Position ids count from each row's first real token, as the decoder's do."""
    from conftest import tiny_model_config

    enc = build_model(tiny_model_config("bert", vocab_size=100)).eval()
    ids = torch.randint(5, 100, (1, 7))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], dim=1)  # (1, 10) left padding
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 7, dtype=torch.long)], dim=1)
    with torch.no_grad():
        alone = enc(ids).hidden  # (1, 7, C)
        left = enc(padded, attention_mask_2d=mask).hidden[:, 3:]  # (1, 7, C)
        right = enc(torch.cat([ids, torch.zeros(1, 3, dtype=torch.long)], 1), attention_mask_2d=mask.flip(1)).hidden
    assert (left - alone).abs().max().item() <= 1e-5
    assert (right[:, :7] - alone).abs().max().item() <= 1e-5


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
