"""The decode step (infer/step.py): the fast path must compute what the plain forward computes."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import tiny_model_config
from llmkit.infer.generate import SamplingConfig, generate
from llmkit.infer.step import decode_layout, fast_forward
from llmkit.model import build_model
from llmkit.model.weights import weights_for_save


def _pair(arch: str = "llama", **kw):
    """A tiny model and an untouched copy of it (the reference)."""
    model = build_model(tiny_model_config(arch, **kw)).eval()
    return model, copy.deepcopy(model)


def _storage_bytes(model: torch.nn.Module) -> int:
    return sum({p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in model.parameters()}.values())


@pytest.mark.parametrize("arch,kw", [("llama", {}), ("gpt2", {}), ("llama", {"tie_embeddings": True})])
def test_fast_forward_matches_plain_forward_prefill_decode_and_verify(arch, kw):
    """Prefill (left-padded batch), single-token decoding and a k+1-token verification pass over the cache give
    the plain model's logits up to float rounding, and the weights really were re-laid (column-major)."""
    model, ref = _pair(arch, **kw)
    fwd = fast_forward(model)
    assert all(m.weight.stride() == (1, m.weight.shape[0]) for m in model.modules() if isinstance(m, torch.nn.Linear))
    ids = torch.randint(0, 512, (2, 7))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :3] = 0  # row 1 is left-padded
    with torch.inference_mode():
        caches = [m.new_cache(2, 12) for m in (model, ref)]
        outs = [f(ids, attention_mask_2d=mask[:, :7], cache=c, logits_slice=slice(-1, None))
                for f, c in zip((fwd, ref), caches)]
        torch.testing.assert_close(outs[0].logits, outs[1].logits, rtol=1e-5, atol=1e-5)
        step = ids[:, -1:]
        outs = [f(step, attention_mask_2d=mask[:, :8], cache=c) for f, c in zip((fwd, ref), caches)]
        torch.testing.assert_close(outs[0].logits, outs[1].logits, rtol=1e-5, atol=1e-5)
        verify = torch.randint(0, 512, (2, 4))  # T = k + 1 = 4 drafted positions at once
        outs = [f(verify, attention_mask_2d=mask, cache=c) for f, c in zip((fwd, ref), caches)]
        torch.testing.assert_close(outs[0].logits, outs[1].logits, rtol=1e-5, atol=1e-5)


def test_greedy_tokens_identical_to_the_plain_model_in_fp32():
    """generate() calls the model through fast_forward; its greedy tokens equal a plain step loop's."""
    model, ref = _pair("llama", n_layer=3)
    prompts = [[5, 9, 200, 17], [1, 2]]
    cfg = SamplingConfig(max_new_tokens=12, temperature=0)
    got = [g.token_ids for g in generate(model, _NoTokenizer(), prompts, cfg, eos_ids=set())]
    with torch.inference_mode():
        for row, prompt in zip(got, prompts):
            seq = list(prompt)
            for _ in range(12):  # no cache, no fast path: the full sequence every step
                seq.append(int(ref(torch.tensor([seq])).logits[0, -1, :512].argmax()))
            assert row == seq[len(prompt):]
    assert model.lm_head.weight.stride() == (1, 512)  # generate took the re-laid path


def test_relayout_keeps_one_copy_ties_and_saved_values_and_training_still_works():
    model, ref = _pair("llama", tie_embeddings=True)
    before = _storage_bytes(model)
    with torch.inference_mode():  # as generate calls it
        assert decode_layout(model) > 0
    assert decode_layout(model) == 0  # idempotent: nothing moves twice
    assert _storage_bytes(model) == before  # one copy of every weight, not two
    assert model.lm_head.weight is model.embed.weight
    saved = weights_for_save(model)
    for name, t in weights_for_save(ref).items():
        assert saved[name].is_contiguous() and torch.equal(saved[name], t)
    model.train()  # the re-laid parameters are ordinary tensors: gradients flow
    loss = model(torch.randint(0, 512, (2, 8)), labels=torch.randint(0, 512, (2, 8))).loss
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_a_model_built_under_inference_mode_decodes_through_the_fast_path():
    """Weights that are inference tensors stay inference tensors (mixing the kinds fails at the embedding)."""
    with torch.inference_mode():
        model = build_model(tiny_model_config("llama", tie_embeddings=True)).eval()
        before = model(torch.tensor([[1, 2, 3]])).logits
        after = fast_forward(model)(torch.tensor([[1, 2, 3]])).logits
    assert model.lm_head.weight.stride() == (1, 512)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


def test_bf16_and_training_models_are_left_alone():
    """bf16's transposed GEMV measured ~10x slower: no re-layout; a training model is returned untouched."""
    model = build_model(tiny_model_config("llama")).to(torch.bfloat16).eval()
    assert fast_forward(model) is model and decode_layout(model) == 0
    training = build_model(tiny_model_config("llama")).train()
    assert fast_forward(training) is training
    assert training.lm_head.weight.is_contiguous()
    with pytest.raises(ValueError, match="compile"):
        fast_forward(model, compile="yes")


class _NoTokenizer:
    """generate() with id prompts needs only these (ids are decoded for the streamed text)."""

    eos_id, pad_id = 0, 0

    def decode(self, ids: list[int]) -> str:
        return " ".join(map(str, ids))

    def with_bos(self, ids: list[int]) -> list[int]:
        return ids
