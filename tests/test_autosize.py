"""`model.preset: auto`: the rule picks the shape a budget makes compute-optimal from measured throughput; the
choice is recorded in the run folder; bad input is a one-line error before anything is written."""

from __future__ import annotations

import json
import math

import pytest
import yaml

from llmkit.config import ModelConfig, RunConfig, build, load_run_config
from llmkit.errors import ConfigError
from llmkit.model import build_model
from llmkit.train import autosize
from llmkit.train.pretrain import pretrain


def ladder(vocab: int = 4096, block: int = 256) -> tuple[list[int], list[float]]:
    base = ModelConfig(arch="llama", vocab_size=vocab, block_size=block, bias=False)
    _, params, flops = autosize.candidates(base)
    return params, flops


def machine(flop_s: float, flops: list[float], efficiency=lambda i: 1.0):
    """A machine that runs `flop_s` FLOP/s (times an efficiency per candidate); counts what was measured."""
    calls: list[int] = []

    def measure(i: int) -> float:
        calls.append(i)
        return flop_s * efficiency(i) / flops[i]
    return measure, calls


def nearest_k(params: list[int], tokens_per_s, budget_s: float) -> int:
    """The rule written out over every candidate: budget tokens per parameter nearest k, in log."""
    k = autosize.TOKENS_PER_PARAM
    ratios = [tokens_per_s(j) * budget_s / params[j] for j in range(len(params))]
    ok = [j for j in range(len(params)) if ratios[j] > 0]
    return min(ok, key=lambda j: (abs(math.log(ratios[j] / k)), j))


def test_rule_picks_the_shape_whose_tokens_per_parameter_are_nearest_k():
    params, flops = ladder()
    picked = set()
    for budget_s in (60, 120, 300, 600, 1800, 3600, 7200):
        measure, _ = machine(2e11, flops)
        c = autosize.choose(params, flops, measure, budget_s)
        i = c.index
        assert i == nearest_k(params, measure, budget_s)
        assert i in c.measured  # only a measured shape is chosen
        k, ratio = autosize.TOKENS_PER_PARAM, c.ratio(i)
        for j in (i - 1, i + 1):  # neither neighbour is nearer k
            if 0 <= j < len(params):
                assert abs(math.log(ratio / k)) <= abs(math.log(measure(j) * budget_s / params[j] / k))
        picked.add(ratio >= k)
    assert picked == {True, False}  # some budgets round down to the rung that reaches k, some up to the next


def test_bigger_budgets_and_faster_machines_pick_bigger_models():
    params, flops = ladder()
    by_budget = [autosize.choose(params, flops, machine(2e11, flops)[0], b).index for b in (120, 300, 600, 1800, 7200)]
    assert by_budget == sorted(by_budget) and by_budget[-1] > by_budget[0]
    by_speed = [autosize.choose(params, flops, machine(s, flops)[0], 600).index for s in (5e10, 2e11, 1e13, 5e14)]
    assert by_speed == sorted(by_speed) and len(set(by_speed)) == 4
    # 10,000 x the FLOP/s: ~sqrt(10,000) = 100 x the parameters (D = kN and D ∝ FLOP/s / N), give or take a rung
    assert 30 * params[by_speed[0]] < params[by_speed[-1]] < 300 * params[by_speed[0]]


def test_only_the_shapes_around_the_answer_are_timed():
    params, flops = ladder()
    # small shapes run at a fraction of the big ones' FLOP/s (as on real hardware): predictions are corrected
    measure, calls = machine(1e14, flops, efficiency=lambda i: min(1.0, 0.05 * (i + 1)))
    c = autosize.choose(params, flops, measure, 600)
    assert calls[0] == 0 and len(calls) == len(set(calls)) <= autosize.MAX_PROBES
    assert len(calls) < len(params) // 2
    below_k = c.ratio(c.index) < autosize.TOKENS_PER_PARAM  # rounded up to the rung above k's crossing
    assert (c.index - 1 if below_k else c.index + 1) in c.measured  # the rungs on both sides of k were timed
    assert c.index == nearest_k(params, measure, 600)


def test_nothing_fits_or_out_of_memory():
    params, flops = ladder()
    c = autosize.choose(params, flops, lambda i: 1.0, 1.0)  # a hopeless budget: the smallest, said so
    assert c.index == 0 and "even the smallest" in c.reason()
    # out of memory (0 tokens/s) above candidate 3 on a fast machine: the largest that runs
    c = autosize.choose(params, flops, lambda i: 1e15 / flops[i] if i <= 3 else 0.0, 3600)
    assert c.index == 3


def test_bad_input_is_one_line_errors(tmp_path, data_dir):
    no_budget = load_run_config(None, {"model": "auto", "data.path": str(data_dir)})
    with pytest.raises(ConfigError, match="needs train.max_minutes"):
        pretrain(no_budget, tmp_path / "run", quiet=True)
    assert not (tmp_path / "run").exists()  # nothing written
    with pytest.raises(ConfigError, match="n_layer: model.preset auto chooses it"):
        load_run_config(None, {"model.preset": "auto", "model.n_layer": 4, "train.max_minutes": 1})
    with pytest.raises(ConfigError, match="sizes decoders only"):
        autosize.check(build(RunConfig, {"model": {"preset": "auto", "arch": "bert"}, "train": {"max_minutes": 1,
                                                                                               "objective": "mlm"}}))
    with pytest.raises(ConfigError, match="sized by `llmkit pretrain`"):  # distill, finetune...: not silently 12x768
        build_model(build(ModelConfig, {"preset": "auto", "vocab_size": 512}))
    resumed = load_run_config(None, {"model": "auto", "data.path": str(data_dir), "train.max_minutes": 1})
    (tmp_path / "other").mkdir()
    with pytest.raises(ConfigError, match="autosize.json is missing"):
        autosize.resolve(resumed, tmp_path / "other", resume=True)


@pytest.mark.slow
def test_pretrain_with_auto_records_its_choice(tmp_path, data_dir, capsys):
    cfg = load_run_config(None, {"model": "auto", "model.block_size": 64, "data.path": str(data_dir),
                                 "data.batch_size": 4, "train.max_minutes": 0.05, "train.eval_interval": 0,
                                 "train.eval_iters": 2, "train.warmup_steps": 2})
    out = tmp_path / "run"
    pretrain(cfg, out, quiet=False)
    err = capsys.readouterr().err
    assert "model.preset auto, 0.05 min" in err and "chose" in err
    record = json.loads((out / "autosize.json").read_text())
    saved = yaml.safe_load((out / "config.yaml").read_text())["model"]
    chosen = record["chosen"]
    assert saved["autosize"] is False  # the run folder holds a fixed shape: it loads, resumes and exports as is
    assert (saved["n_layer"], saved["n_embd"]) == (chosen["n_layer"], chosen["n_embd"])
    assert chosen["shape"] == f"{saved['n_layer']}x{saved['n_embd']}"
    assert record["measured"] and all(m["tokens_per_s"] > 0 for m in record["measured"])
    assert record["tokens_per_param"] == autosize.TOKENS_PER_PARAM and record["budget_s"] == 3.0
    assert chosen["shape"] in record["reason"] and (out / "model.safetensors").is_file()
