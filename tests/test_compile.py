"""torch.compile of the training step: the loop's compiled model with its fused head+loss is one graph (no graph
breaks), compiles once (no recompiles from step to step, nor for a second model of the same shape), gives the
eager loss and gradients, and joins the loss's chunks without whole-buffer copies."""

from __future__ import annotations

import functools

import pytest
import torch
from torch._dynamo.backends.debugging import aot_eager, boxed_nop
from torch._dynamo.utils import counters

from conftest import tiny_model_config
from llmkit.model import build_model, loss
from llmkit.model.loss import IGNORE_INDEX
from llmkit.train.distributed import Dist, Parallel
from llmkit.train.objectives import CausalLM


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    """64-token chunks, so these small batches (192 tokens) span three of the loss's CPU chunks."""
    monkeypatch.setattr(loss, "CHUNK", 64)


def _batch(cfg, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, cfg.vocab_size, (2, cfg.block_size + 1), generator=g)  # (B, T + 1)
    labels = x[:, 1:].clone()  # (B, T)
    labels[0, :5] = IGNORE_INDEX  # rows without a target: the mean must skip them compiled too
    return {"input_ids": x[:, :-1], "labels": labels}


def _compiled_pair():
    """An eager model and its compiled twin (same weights), compiled as the training loop compiles."""
    cfg = tiny_model_config(vocab_size=1000, block_size=96)  # 192 tokens: three chunks (small_chunks)
    eager = build_model(cfg).train()
    twin = build_model(cfg).train()
    twin.load_state_dict(eager.state_dict())
    net = Parallel("auto", Dist(), torch.device("cpu")).wrap(twin, compile=True)
    return cfg, eager, twin, net


@pytest.mark.slow  # Inductor compiles C++ kernels: tens of seconds on 2 cores
def test_compiled_step_matches_eager_in_one_graph_without_recompiles() -> None:
    torch._dynamo.reset()
    counters.clear()
    cfg, eager, twin, net = _compiled_pair()
    for seed in (1, 2, 3):  # three steps: the second and third must reuse the first one's graph
        batch = _batch(cfg, seed)
        want = CausalLM()(eager, batch)[0]
        got = CausalLM()(net, batch)[0]
        want.backward()
        got.backward()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        for (name, p), q in zip(eager.named_parameters(), twin.parameters()):
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
            p.grad = q.grad = None
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 1  # the whole forward, head and loss included, is one graph
    assert sum(counters["recompiles"].values()) == 0, dict(counters["recompiles"])


@pytest.mark.slow
def test_a_second_model_of_the_same_shape_reuses_the_compiled_graph() -> None:
    """The benchmark (and a sweep) builds a fresh model per run: it must not compile again, or hit dynamo's
    recompile limit and silently fall back to eager."""
    torch._dynamo.reset()
    counters.clear()
    for _ in range(2):
        cfg, _, _, net = _compiled_pair()
        CausalLM()(net, _batch(cfg, 0))[0].backward()
    assert counters["stats"]["unique_graphs"] == 1
    assert sum(counters["recompiles"].values()) == 0, dict(counters["recompiles"])


def test_compiled_loss_writes_each_chunk_into_its_rows() -> None:
    """Traced, a slice assignment per chunk becomes a `slice_scatter` of the whole (N, V) gradient buffer, which
    Inductor keeps functional: the loss must join its chunks with one `cat` instead (model/loss._GradRows).
    AOTAutograd's forward graph is what Inductor receives; recording it needs no C++ compilation."""
    graphs: list[torch.fx.GraphModule] = []

    def record(gm: torch.fx.GraphModule, inputs: list) -> object:
        graphs.append(gm)
        return boxed_nop(gm, inputs)

    torch._dynamo.reset()
    cfg = tiny_model_config(vocab_size=1000, block_size=96)
    net = torch.compile(build_model(cfg).train(), backend=functools.partial(aot_eager, fw_compiler=record))
    CausalLM()(net, _batch(cfg, 0))
    ops = [(str(n.target), tuple(n.meta["val"].shape)) for n in graphs[0].graph.nodes
           if n.op == "call_function" and hasattr(n.meta.get("val"), "shape")]
    tokens = 2 * cfg.block_size
    assert ("aten.cat.default", (tokens, cfg.vocab_size)) in ops  # the head's gradient, in the compiled graph
    assert not [op for op in ops if "slice_scatter" in op[0]], ops
