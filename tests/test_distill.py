"""Knowledge distillation: the divergences, the mixing weight, the top-k cache, the padded-vocabulary trap, a
student pulled towards its teacher through the CLI, and bad input refused before anything is written."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from conftest import tiny_model_config
from llmkit.cli.main import main
from llmkit.config import ModelConfig, RunConfig, save_yaml
from llmkit.data.tokenizer import Tokenizer
from llmkit.model import build_model
from llmkit.model.weights import save_weights
from llmkit.train.distill import Distill, TopKCache, divergence

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")


def direct(kind: str, t: torch.Tensor, s: torch.Tensor, T: float) -> torch.Tensor:
    """The textbook formulas on probabilities, in float64."""
    p, q = torch.softmax(t.double() / T, -1), torch.softmax(s.double() / T, -1)
    kl = lambda a, b: (a * (a / b).log()).sum(-1)  # noqa: E731
    if kind == "forward_kl":
        return kl(p, q)
    if kind == "reverse_kl":
        return kl(q, p)
    m = (p + q) / 2
    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


@pytest.mark.parametrize("kind", DIVERGENCES)
@pytest.mark.parametrize("T", [0.5, 1.0, 3.0])
def test_divergences_equal_a_direct_computation(kind, T):
    t, s = torch.randn(6, 11) * 3, torch.randn(6, 11) * 3
    got = divergence(kind, torch.log_softmax(t / T, -1), torch.log_softmax(s / T, -1))
    torch.testing.assert_close(got.double(), direct(kind, t, s, T), rtol=1e-5, atol=1e-6)
    assert (got >= -1e-6).all()
    assert divergence(kind, torch.log_softmax(t, -1), torch.log_softmax(t, -1)).abs().max() < 1e-6


def pair(V: int = 500) -> tuple[torch.nn.Module, torch.nn.Module]:
    """A teacher whose table is exact (V rows) and a student whose table is padded to 512: different padded sizes,
    one tokenizer (the trap where kl_div fails to broadcast, or padding rows get scored)."""
    teacher = build_model(tiny_model_config("llama", vocab_size=V, pad_vocab_multiple=1, n_layer=2))
    student = build_model(tiny_model_config("llama", vocab_size=V, pad_vocab_multiple=64, n_layer=1, n_embd=16))
    with torch.no_grad():
        teacher.lm_head.weight.mul_(20)  # a peaked teacher: far from a fresh student
    return teacher, student


def batch(V: int = 500, B: int = 3, T: int = 20) -> dict[str, torch.Tensor]:
    x = torch.randint(0, V, (B, T + 1))
    return {"input_ids": x[:, :-1], "labels": x[:, 1:], "window": torch.arange(B)}


def test_alpha_zero_is_plain_cross_entropy_and_padding_is_never_scored():
    teacher, student = pair()
    b = batch()
    loss, metrics = Distill(teacher.train(), 500, "forward_kl", 2.0, alpha=0.0)(student.train(), b)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())  # it never trains
    torch.testing.assert_close(loss, student(b["input_ids"], labels=b["labels"]).loss, rtol=1e-5, atol=1e-6)
    assert metrics["kd"] > 0.1  # measured even when it does not count
    full = Distill(teacher, 500, "jsd", 2.0, alpha=0.7)(student, b)[0]
    with torch.no_grad():  # padding rows of the student's table: huge logits there must change nothing
        student.lm_head.weight[500:] = 1e3
    torch.testing.assert_close(Distill(teacher, 500, "jsd", 2.0, alpha=0.7)(student, b)[0], full)


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_cached_top_k_with_k_equal_to_the_vocabulary_is_the_on_the_fly_loss(tmp_path, kind):
    teacher, student = pair()
    b = batch()
    fly_loss, fly = Distill(teacher, 500, kind, 2.0, 0.5)(student.train(), b)
    fly_loss.backward()
    fly_grad = student.blocks[0].mlp.fc.weight.grad.clone()
    student.zero_grad()
    cache = TopKCache(tmp_path / "c", windows=3, T=20, k=500, identity={"teacher": "t"})
    obj = Distill(teacher, 500, kind, 2.0, 0.5, cache)
    first, m1 = obj(student, b)
    assert (cache.hits, cache.misses) == (0, 3)
    second, m2 = obj(student, b)  # read back from the cache: no teacher forward
    assert (cache.hits, cache.misses) == (3, 3)
    second.backward()
    # fp16 values in the cache: equal to the on-the-fly loss within fp16 rounding of the logits
    torch.testing.assert_close(m1["kd"], fly["kd"], rtol=2e-3, atol=2e-4)
    torch.testing.assert_close(second, first)
    torch.testing.assert_close(second, fly_loss, rtol=2e-3, atol=2e-4)
    torch.testing.assert_close(student.blocks[0].mlp.fc.weight.grad, fly_grad, rtol=5e-2, atol=1e-4)


def test_cache_made_for_another_run_is_refused(tmp_path):
    TopKCache(tmp_path / "c", windows=3, T=20, k=8, identity={"teacher": "a"})
    with pytest.raises(Exception, match="made for another run .*teacher 'a' here vs 'b' now"):
        TopKCache(tmp_path / "c", windows=3, T=20, k=8, identity={"teacher": "b"})


# --------------------------------------------------------------------------------------------- through the CLI


def write_run(folder: Path, cfg: ModelConfig, tokenizer_dir: Path, scale: float = 1.0) -> Path:
    """A model run folder (config.yaml + model.safetensors + tokenizer/) that every verb loads."""
    torch.manual_seed(1)
    model = build_model(cfg)
    if scale != 1.0 and hasattr(model, "lm_head"):
        with torch.no_grad():
            model.lm_head.weight.mul_(scale)
    folder.mkdir(parents=True)
    save_yaml(RunConfig(model=cfg), folder / "config.yaml")
    save_weights(model, folder / "model.safetensors")
    Tokenizer.load(tokenizer_dir).save(folder / "tokenizer")
    return folder


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory, tokenizer_dir) -> Path:
    V = Tokenizer.load(tokenizer_dir).vocab_size
    cfg = tiny_model_config("llama", vocab_size=V, n_layer=2, n_embd=32, block_size=64)
    return write_run(tmp_path_factory.mktemp("teacher") / "t", cfg, tokenizer_dir, scale=8.0)


def student_yaml(tmp_path: Path) -> Path:
    path = tmp_path / "student.yaml"
    path.write_text("model:\n  arch: llama\n  n_layer: 1\n  n_head: 2\n  n_kv_head: 1\n  n_embd: 16\n"
                    "  block_size: 32\n  tie_embeddings: true\n  bias: false\n")
    return path


def kl_to_teacher(student: torch.nn.Module, teacher: torch.nn.Module, data_dir: Path, V: int) -> float:
    from llmkit.data.batches import TokenBatches

    b = TokenBatches(data_dir, "val", 32, 8, seed=0).fixed(1)[0]
    with torch.no_grad():
        t = teacher(b["input_ids"]).logits[..., :V]
        s = student.eval()(b["input_ids"]).logits[..., :V]
    return float(divergence("forward_kl", torch.log_softmax(t, -1), torch.log_softmax(s, -1)).mean())


@pytest.mark.slow
def test_distilled_student_moves_towards_its_teacher(capsys, tmp_path, teacher_run, data_dir):
    from llmkit.infer.load import load_model

    out = tmp_path / "run"
    code = main(["distill", "--teacher", str(teacher_run), "--student", str(student_yaml(tmp_path)), "--data",
                 str(data_dir), "--out", str(out), "--max-steps", "30", "--kd.alpha", "1", "--kd.temperature", "1",
                 "--train.lr", "1e-2", "--train.warmup_steps", "2", "--train.eval_interval", "0", "--data.batch_size",
                 "8", "--train.dtype", "float32", "--quiet"])
    assert code == 0, capsys.readouterr().err
    teacher, done = load_model(teacher_run), load_model(out)  # the run folder loads like any model
    V = teacher.cfg.vocab_size
    torch.manual_seed(1337)  # train.seed: the student the run started from
    start = build_model(done.cfg)
    before, after = kl_to_teacher(start, teacher.model, data_dir, V), kl_to_teacher(done.model, teacher.model,
                                                                                      data_dir, V)
    assert after < 0.7 * before, (before, after)
    assert (out / "tokenizer" / "tokenizer.json").is_file() and (out / "metrics.jsonl").is_file()
    assert "kd:" in (out / "config.yaml").read_text()


def other_tokenizer(tmp_path: Path, corpus_file: Path, vocab_size: int) -> Path:
    text = corpus_file.read_text()[::-1]  # other text: other merges, other pieces
    return Tokenizer.train_bpe([text], vocab_size=vocab_size).save(tmp_path / f"tok{vocab_size}")


@pytest.mark.parametrize("case, message", [
    ("size", "has a 400-token vocabulary but student"),
    ("pieces", "different tokenizers"),
    ("encoder", "this verb needs a text generator"),
    ("temperature", "kd.temperature: must be a positive number"),
    ("alpha", "kd.alpha: must be in [0, 1]"),
    ("loss", "kd.loss: must be one of forward_kl, reverse_kl, jsd"),
    ("top_k", "kd.cache_top_k: must be at most the vocabulary size"),
])
def test_bad_input_is_one_line_and_writes_nothing(capsys, tmp_path, case, message, teacher_run, data_dir,
                                                  tokenizer_dir, corpus_file):
    V = Tokenizer.load(tokenizer_dir).vocab_size
    teacher, extra = teacher_run, []
    if case in ("size", "pieces"):
        tok = other_tokenizer(tmp_path, corpus_file, 400 if case == "size" else V)
        assert Tokenizer.load(tok).vocab_size == (400 if case == "size" else V)
        teacher = write_run(tmp_path / "t2", tiny_model_config("llama", vocab_size=Tokenizer.load(tok).vocab_size),
                            tok)
    elif case == "encoder":
        teacher = write_run(tmp_path / "bert", tiny_model_config("bert", vocab_size=V), tokenizer_dir)
    else:
        extra = {"temperature": ["--kd.temperature", "0"], "alpha": ["--kd.alpha", "1.5"],
                 "loss": ["--kd.loss", "kl"], "top_k": ["--kd.cache-top-k", str(V + 1)]}[case]
    out = tmp_path / "out"
    code = main(["distill", "--teacher", str(teacher), "--student", str(student_yaml(tmp_path)), "--data",
                 str(data_dir), "--out", str(out), "--max-steps", "2", "--quiet", *extra])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err
    if case == "size":
        assert str(teacher) in lines[0] and f"{V:,}" in lines[0]
    assert not out.exists()
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_top_k_forward_kl_counts_the_students_mass_outside_the_teachers_top_k():
    """With a top-k cache, forward KL scores the student's full distribution at the teacher's k ids: a student
    that puts mass on a token outside them pays for it (so distillation also pulls perplexity down), while the
    renormalised divergences (reverse KL, JSD) cannot see that mass and stay equal."""
    from llmkit.train.distill import kd_terms

    t_vals, t_ids = torch.tensor([[2.0, 1.0]]), torch.tensor([[0, 1]])  # the teacher's top 2 of 6 ids
    labels = torch.tensor([0])
    tidy = torch.tensor([[2.0, 1.0, -5.0, -5.0, -5.0, -5.0]])
    stray = torch.tensor([[2.0, 1.0, -5.0, -5.0, -5.0, 4.0]])  # same on ids 0, 1; much mass on id 5
    fwd = [kd_terms(s, labels, t_vals, t_ids, "forward_kl", 1.0)[1].item() for s in (tidy, stray)]
    assert fwd[0] < 0.01 < 1.0 < fwd[1], fwd
    for kind in ("reverse_kl", "jsd"):
        a, b = (kd_terms(s, labels, t_vals, t_ids, kind, 1.0)[1].item() for s in (tidy, stray))
        assert a == pytest.approx(b, abs=1e-6) and a == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("top_k,temperature", [(None, 1.0), (None, 2.0), (7, 1.0), (7, 3.0)])
def test_fused_forward_kl_equals_the_autograd_loss_and_gradients(top_k, temperature, monkeypatch):
    """model/loss.linear_forward_kl (gradient formed in the forward pass, chunked) against kd_terms through autograd:
    the same loss, CE, KD and gradients for h and the head, with the full teacher and with its top k."""
    from llmkit.model import loss as loss_module
    from llmkit.model.loss import linear_forward_kl
    from llmkit.train.distill import kd_terms

    monkeypatch.setattr(loss_module, "CHUNK", 64)
    torch.manual_seed(0)
    N, C, V, alpha = 150, 16, 40, 0.3  # N spans three 64-token chunks
    h, w = torch.randn(N, C, requires_grad=True), torch.randn(V, C, requires_grad=True)
    labels = torch.randint(0, V, (N,))
    labels[::7] = -100
    t_full = torch.randn(N, V) * 3
    t_vals, t_ids = (t_full, None) if top_k is None else t_full.topk(top_k, dim=-1)
    loss, ce, kd = linear_forward_kl(h, w, labels, t_vals, t_ids, temperature, alpha)
    loss.backward()
    g_fused = (h.grad.clone(), w.grad.clone())
    h.grad = w.grad = None
    ce_sum, kd_sum = kd_terms(h @ w.T, labels, t_vals, t_ids, "forward_kl", temperature)
    n = (labels != -100).sum()
    ref = (1 - alpha) * ce_sum / n + alpha * temperature ** 2 * kd_sum / n
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    assert ce.item() == pytest.approx((ce_sum / n).item(), rel=1e-5) and kd.item() == pytest.approx((kd_sum / n).item(),
                                                                                                    rel=1e-4, abs=1e-6)
    torch.testing.assert_close(g_fused[0], h.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(g_fused[1], w.grad, rtol=1e-4, atol=1e-6)


def test_fill_cache_stores_every_windows_teacher_top_k_once(tmp_path, teacher_run, data_dir):
    """fill_cache runs the teacher once over every training window (a second call computes none), and what it
    stores for a window is the teacher's top k on exactly that window's tokens (the last window included)."""
    import numpy as np

    from llmkit.config import DistillRunConfig, build
    from llmkit.train.distill import Distill, WindowBatches, fill_cache, load_teacher

    cfg = build(DistillRunConfig, {"model": {"block_size": 32}, "data": {"path": str(data_dir), "batch_size": 4},
                                   "kd": {"teacher": str(teacher_run), "cache_top_k": 5,
                                          "cache_dir": str(tmp_path / "cache")}})
    first = fill_cache(cfg, quiet=True)
    windows = WindowBatches(data_dir, "train", 32, 4, seed=0)
    assert first["computed"] == first["windows"] == windows.windows > 1
    assert fill_cache(cfg, quiet=True)["computed"] == 0
    teacher = load_teacher(str(teacher_run), "cpu", cfg.kd.teacher_dtype)
    last = windows.windows - 1
    x = torch.from_numpy(np.asarray(windows.data[last * 32:(last + 1) * 32], dtype=np.int64))[None]  # (1, 32)
    vals, ids = Distill(teacher.model, teacher.cfg.vocab_size, "forward_kl", 1.0, 0.5).teacher_logits(x).topk(5)
    stored_ids = np.load(tmp_path / "cache" / "ids.npy", mmap_mode="r")[last]
    stored_vals = np.load(tmp_path / "cache" / "values.npy", mmap_mode="r")[last]
    assert np.array_equal(stored_ids, ids[0].numpy())
    assert np.allclose(stored_vals, vals[0].numpy(), rtol=1e-3, atol=1e-2)
