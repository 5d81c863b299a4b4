import pytest
import torch
import transformers

from conftest import tiny_model_config
from llmkit.config import MODEL_PRESETS, ModelConfig
from llmkit.interop.hf import from_hf_state_dict, hf_config, to_hf_state_dict
from llmkit.model import build_model


def hf_twin(cfg: ModelConfig):
    """A transformers model of the same shape, random weights, and llmkit's copy of those weights."""
    kw = {k: v for k, v in hf_config(cfg).items() if k not in ("architectures", "model_type")}
    if cfg.arch == "gpt2":
        hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**kw, attn_implementation="sdpa"))
    else:
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw, attn_implementation="sdpa"))
    hf.eval()
    ours = build_model(cfg).eval()
    ours.load_state_dict(from_hf_state_dict(hf.state_dict(), cfg, ours.state_dict()), strict=False)
    return hf, ours


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_logits_equal_transformers(arch):
    cfg = tiny_model_config(arch, pad_vocab_multiple=1)
    if arch == "llama":
        assert cfg.n_kv_head < cfg.n_head  # grouped-query attention is exercised
    hf, ours = hf_twin(cfg)
    x = torch.randint(0, cfg.vocab_size, (3, 40))
    with torch.no_grad():
        diff = (ours(x).logits - hf(x).logits).abs().max().item()
    assert diff <= 1e-4


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_left_padded_logits_equal_transformers(arch):
    cfg = tiny_model_config(arch, pad_vocab_multiple=1)
    hf, ours = hf_twin(cfg)
    x = torch.randint(0, cfg.vocab_size, (2, 12))
    mask = torch.ones_like(x)
    mask[0, :5] = 0
    with torch.no_grad():
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        theirs = hf(x, attention_mask=mask, position_ids=pos).logits
        mine = ours(x, attention_mask_2d=mask).logits
    assert (mine - theirs)[mask.bool()].abs().max().item() <= 1e-4


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_state_dict_round_trips_through_hf_names(arch):
    cfg = tiny_model_config(arch)
    m = build_model(cfg)
    back = build_model(cfg)
    hf = to_hf_state_dict(m.state_dict(), cfg)
    assert all(t.shape[0] == cfg.vocab_size for n, t in hf.items() if "wte" in n or "embed_tokens" in n)
    back.load_state_dict(from_hf_state_dict(hf, cfg, back.state_dict()), strict=False)
    for (n, a), (_, b) in zip(m.state_dict().items(), back.state_dict().items()):
        if n in ("embed.weight", "lm_head.weight"):
            a, b = a[: cfg.vocab_size], b[: cfg.vocab_size]  # the padding rows are not exported
        assert torch.equal(a, b), n


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_kv_cache_logits_equal_full_forward(arch):
    cfg = tiny_model_config(arch)
    m = build_model(cfg).eval()
    x = torch.randint(0, cfg.vocab_size, (2, 30))
    with torch.no_grad():
        full = m(x).logits
        cache = m.new_cache(2, 40)
        parts = [m(x[:, :7], cache=cache).logits]  # prefill, then a chunk, then single tokens
        parts.append(m(x[:, 7:12], cache=cache).logits)
        parts += [m(x[:, i:i + 1], cache=cache).logits for i in range(12, 30)]
    assert (torch.cat(parts, 1) - full).abs().max().item() <= 1e-5


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_eager_attention_equals_sdpa_and_returns_weights(arch):
    cfg = tiny_model_config(arch)
    m = build_model(cfg).eval()
    x = torch.randint(0, cfg.vocab_size, (2, 16))
    with torch.no_grad():
        fast = m(x)
        eager = m(x, need_weights=True)
    assert (fast.logits - eager.logits).abs().max().item() <= 1e-5
    att = eager.attentions
    assert len(att) == cfg.n_layer and att[0].shape == (2, cfg.n_head, 16, 16)
    assert torch.allclose(att[0].sum(-1), torch.ones(2, cfg.n_head, 16), atol=1e-5)
    assert att[0].triu(1).abs().max() == 0  # causal: nothing attends to the future


def test_presets_build_with_expected_sizes():
    gpt2 = ModelConfig(**{**MODEL_PRESETS["gpt2-124m"], "pad_vocab_multiple": 1})
    smol = ModelConfig(**MODEL_PRESETS["smollm2-135m"])
    with torch.device("meta"):  # the published parameter counts of GPT-2 small and SmolLM2-135M
        assert build_model(gpt2).num_params(non_embedding=False) == 124_439_808
        assert build_model(smol).num_params(non_embedding=False) == 134_515_008
    assert ModelConfig(**MODEL_PRESETS["gpt2-124m"]).padded_vocab_size == 50304


def test_vocab_padding_and_weight_tying():
    m = build_model(tiny_model_config("gpt2", vocab_size=500))
    assert m.embed.weight.shape[0] == 512 and m.lm_head.weight is m.embed.weight


@pytest.mark.parametrize("chunk", [16, 64, 1024])
def test_fused_head_loss_equals_cross_entropy_at_any_chunk(chunk, monkeypatch):
    """model/loss.linear_cross_entropy against F.cross_entropy(h @ W.T) through autograd, whether the 150 tokens
    take ten chunks, three or one: the same mean over targets (ignored rows skipped), the same gradients."""
    from llmkit.model import loss

    monkeypatch.setattr(loss, "CHUNK", chunk)
    torch.manual_seed(0)
    h, w = torch.randn(150, 16, requires_grad=True), torch.randn(40, 16, requires_grad=True)  # (N, C), (V, C)
    labels = torch.randint(0, 40, (150,))
    labels[::7] = loss.IGNORE_INDEX
    got = loss.linear_cross_entropy(h, w, labels)
    got.backward()
    g_fused = (h.grad.clone(), w.grad.clone())
    h.grad = w.grad = None
    want = torch.nn.functional.cross_entropy(h @ w.T, labels, ignore_index=loss.IGNORE_INDEX)
    want.backward()
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    torch.testing.assert_close(g_fused[0], h.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(g_fused[1], w.grad, rtol=1e-4, atol=1e-6)
