"""Knowledge distillation: a student learns from a teacher's output distribution, in the one training loop.

Loss = (1 - alpha) * CE(student, data) + alpha * T^2 * D(teacher_T || student_T), with D one of forward KL,
reverse KL or Jensen-Shannon over temperature-T softmaxes. The teacher runs in eval mode without gradients. Its
logits come either on the fly (the full distribution) or from a top-k cache filled the first time a window is
seen (values fp16 + ids int32 per position), so later epochs do not pay the teacher's forward pass.

With the cache, both distributions are renormalised over the teacher's k ids and the rest of the vocabulary is
ignored (not lumped into a tail bucket): the tail's mass at temperature T needs the teacher's full log-sum-exp at
that T, which a cache of raw logits (one cache serves every temperature and divergence) cannot give; over a
shared support all three divergences stay true divergences; and k = vocabulary size gives exactly the on-the-fly
loss. The (1 - alpha) cross-entropy term still scores the student's full distribution.

Both models are scored on the real vocabulary only (`vocab_size`), never on the padding rows of an embedding
table rounded up for speed: padded sizes differ between models that share a tokenizer.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from llmkit.config import DistillRunConfig, build, load_yaml, model_preset, read_run_folder_config, save_yaml, to_dict
from llmkit.data.batches import TokenBatches
from llmkit.data.shards import load_meta
from llmkit.data.tokenizer import Tokenizer
from llmkit.errors import CheckpointError, ConfigError
from llmkit.files import atomic_write_text, read_json
from llmkit.infer.load import Loaded, load_model
from llmkit.model import build_model
from llmkit.model.loss import linear_forward_kl, lm_figures
from llmkit.model.weights import load_into, load_weights
from llmkit.runtime import resolve_device
from llmkit.train.checkpoint import start_run_folder
from llmkit.train.distributed import setup_distributed
from llmkit.train.loop import TrainResult, train

ROWS_PER_CHUNK = 512  # positions whose (rows, vocab) logits exist at once: memory stays flat in B x T


def divergence(kind: str, t_logp: Tensor, s_logp: Tensor) -> Tensor:
    """Per-position D(p || q) from log-probabilities (N, K) of teacher p and student q -> (N,)."""
    if kind == "forward_kl":  # KL(p || q): the student must cover every token the teacher likes
        return (t_logp.exp() * (t_logp - s_logp)).sum(-1)
    if kind == "reverse_kl":  # KL(q || p): the student may drop modes but not put mass where the teacher has none
        return (s_logp.exp() * (s_logp - t_logp)).sum(-1)
    if kind == "jsd":  # 0.5 KL(p || m) + 0.5 KL(q || m), m = (p + q) / 2: bounded by log 2
        m_logp = torch.logsumexp(torch.stack([t_logp, s_logp]), dim=0) - math.log(2.0)  # (N, K)
        return 0.5 * ((t_logp.exp() * (t_logp - m_logp)).sum(-1) + (s_logp.exp() * (s_logp - m_logp)).sum(-1))
    raise ConfigError(f"kd.loss: unknown divergence {kind!r} (valid: forward_kl, reverse_kl, jsd)")


def kd_terms(s_logits: Tensor, labels: Tensor, t_logits: Tensor, t_ids: Tensor | None, kind: str,
             temperature: float) -> tuple[Tensor, Tensor]:
    """Summed cross-entropy and summed divergence over N positions (labels -100 are skipped).

    s_logits (N, V) over the real vocabulary; t_logits (N, V) over it too, or (N, K) at the ids t_ids (N, K).
    With the top-k cache the teacher's mass outside its k best tokens is unknown, so the teacher is its top k
    renormalised. Forward KL then compares it with the student's full distribution at those ids (the student's
    mass elsewhere counts as a miss, so the divergence also pulls it onto the teacher's choices: a KL over k + 1
    outcomes whose last the teacher gives 0). Reverse KL and JSD would be infinite against such a zero, so they
    compare the two renormalised over the k ids, and only the cross-entropy term governs the rest."""
    s_logits = s_logits.float()
    ce = F.cross_entropy(s_logits, labels, ignore_index=-100, reduction="sum")
    t_logp = F.log_softmax(t_logits.float() / temperature, dim=-1)  # (N, K)
    if t_ids is None:
        s_logp = F.log_softmax(s_logits / temperature, dim=-1)  # (N, V)
    elif kind == "forward_kl":
        s_logp = F.log_softmax(s_logits / temperature, dim=-1).gather(-1, t_ids.long())  # (N, K), sums to <= 1
    else:
        s_logp = F.log_softmax(s_logits.gather(-1, t_ids.long()) / temperature, dim=-1)  # (N, K)
    d = divergence(kind, t_logp, s_logp)  # (N,)
    return ce, (d * (labels != -100)).sum()


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DDP (`.module`) and torch.compile (`._orig_mod`): its head is called directly."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


class TopKCache:
    """The teacher's k largest logits per position of every fixed training window, filled on first sight.

    Three .npy memmaps in `folder`: values (W, T, K) fp16, ids (W, T, K) int32 and filled (W,) uint8, written
    in that order so that a killed run leaves a window unfilled (recomputed) rather than half-written. meta.json
    records what the cache was made from; a cache made from another teacher, data or shape is refused."""

    def __init__(self, folder: Path, windows: int, T: int, k: int, identity: dict) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        meta = {**identity, "windows": windows, "block_size": T, "top_k": k}
        meta_file = folder / "meta.json"
        if meta_file.is_file():
            old = read_json(meta_file, ConfigError)
            if old != meta:
                diff = ", ".join(f"{key} {old.get(key)!r} here vs {meta[key]!r} now" for key in meta
                                 if old.get(key) != meta[key])
                raise ConfigError(f"kd.cache_dir {folder}: this cache was made for another run ({diff}); point "
                                  "kd.cache_dir at a fresh folder")
        mode = "r+" if meta_file.is_file() else "w+"
        open_ = np.lib.format.open_memmap
        self.values = open_(folder / "values.npy", mode=mode, dtype=np.float16, shape=(windows, T, k))
        self.ids = open_(folder / "ids.npy", mode=mode, dtype=np.int32, shape=(windows, T, k))
        self.filled = open_(folder / "filled.npy", mode=mode, dtype=np.uint8, shape=(windows,))
        if mode == "w+":
            atomic_write_text(meta_file, json.dumps(meta, indent=2, sort_keys=True))
        self.k, self.hits, self.misses = k, 0, 0

    def missing(self, windows: Tensor) -> Tensor:
        """Rows of the batch (indices into `windows`) whose teacher logits are not cached yet."""
        have = torch.from_numpy(self.filled[windows.cpu().numpy()].astype(bool))  # (B,)
        self.hits += int(have.sum())
        self.misses += int((~have).sum())
        return (~have).nonzero().flatten()

    def store(self, windows: Tensor, logits: Tensor) -> None:
        """logits (b, T, V) of the real vocabulary for `windows` (b,) -> their top k, written, then marked filled."""
        vals, ids = logits.float().topk(self.k, dim=-1)  # (b, T, K)
        w = windows.cpu().numpy()
        self.values[w] = vals.cpu().numpy().astype(np.float16)
        self.ids[w] = ids.cpu().numpy().astype(np.int32)
        self.filled[w] = 1

    def read(self, windows: Tensor, device: torch.device) -> tuple[Tensor, Tensor]:
        w = windows.cpu().numpy()
        vals = torch.from_numpy(np.ascontiguousarray(self.values[w])).to(device)  # (B, T, K) fp16
        ids = torch.from_numpy(np.ascontiguousarray(self.ids[w])).to(device)  # (B, T, K) int32
        return vals, ids


class WindowBatches(TokenBatches):
    """TokenBatches on a fixed grid of windows (no per-epoch shift), each batch naming its windows: a window's
    teacher logits are then the same in every epoch, which is what makes them cacheable."""

    def _permutation(self, epoch: int) -> np.ndarray:
        n = (len(self.data) - 1) // self.T
        return self.T * np.random.default_rng([self.seed, epoch]).permutation(n)  # window start offsets

    @property
    def windows(self) -> int:
        return (len(self.data) - 1) // self.T

    def rows(self, windows: np.ndarray) -> Tensor:
        """(b,) window indices -> (b, T + 1) their tokens and the one after (the next window's first)."""
        return torch.from_numpy(np.stack([self.data[w * self.T:(w + 1) * self.T + 1] for w in windows])
                                .astype(np.int64))

    def __next__(self) -> dict[str, Tensor]:
        starts = self.take(self.B * self.world)[self.rank * self.B:(self.rank + 1) * self.B]
        t = self.rows(starts // self.T)  # (B, T+1)
        return {"input_ids": t[:, :-1], "labels": t[:, 1:], "window": torch.from_numpy(starts // self.T)}


class Distill:
    """The distillation objective: `(student, batch) -> (loss, {"ce", "kd"})` for the one loop.

    In eval mode it returns the student's plain next-token cross-entropy: validation perplexity then measures
    the student as a language model (comparable with a model trained without a teacher) and costs no teacher
    forward pass."""

    name = "distill"

    def __init__(self, teacher: nn.Module, vocab_size: int, kind: str, temperature: float, alpha: float,
                 cache: TopKCache | None = None) -> None:
        self.teacher = teacher.eval().requires_grad_(False)
        self.V, self.kind, self.T, self.alpha, self.cache = vocab_size, kind, temperature, alpha, cache

    @torch.no_grad()
    def teacher_logits(self, input_ids: Tensor) -> Tensor:
        """(B, T) -> (B, T, V) the teacher's logits over the real vocabulary, in its own dtype (no autocast)."""
        with torch.autocast(input_ids.device.type, enabled=False):
            hidden = self.teacher(input_ids, logits_slice=slice(0, 0)).hidden  # (B, T, C)
            return self.teacher.lm_head(hidden)[..., : self.V].float()  # (B, T, V)

    def __call__(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        x, labels = batch["input_ids"], batch["labels"]
        if not model.training:
            return model(x, labels=labels).loss, {}
        hidden = model(x, logits_slice=slice(0, 0)).hidden  # (B, T, C): the head runs per chunk below
        weight = unwrap(model).lm_head.weight[: self.V]  # (V, C): never the padding rows
        if self.cache is not None:
            todo = self.cache.missing(batch["window"])
            if len(todo):
                self.cache.store(batch["window"][todo], self.teacher_logits(x[todo]))
            t_vals, t_ids = self.cache.read(batch["window"], x.device)  # (B, T, K) each
            t_vals, t_ids = t_vals.flatten(0, 1), t_ids.flatten(0, 1)  # (N, K)
        else:
            t_vals, t_ids = self.teacher_logits(x).flatten(0, 1), None  # (N, V)
        h, y = hidden.flatten(0, 1), labels.flatten()  # (N, C), (N,)
        if self.kind == "forward_kl":  # the fused head + loss: a step costs what a plain one does
            loss, ce, kd = linear_forward_kl(h, weight, y, t_vals, t_ids, self.T, self.alpha)
            return loss, {"ce": ce, "kd": kd}
        ce_sum = hidden.new_zeros((), dtype=torch.float32)
        kd_sum = hidden.new_zeros((), dtype=torch.float32)
        for i in range(0, h.shape[0], ROWS_PER_CHUNK):
            rows = slice(i, i + ROWS_PER_CHUNK)
            ids = None if t_ids is None else t_ids[rows]
            # Recomputed in backward: only one chunk's (rows, V) logits are ever alive.
            ce, kd = checkpoint(self._chunk, h[rows], weight, y[rows], t_vals[rows], ids, use_reentrant=False)
            ce_sum, kd_sum = ce_sum + ce, kd_sum + kd
        n = (y != -100).sum().clamp(min=1)
        ce, kd = ce_sum / n, kd_sum / n
        loss = (1 - self.alpha) * ce + self.alpha * self.T ** 2 * kd
        return loss, {"ce": ce.detach(), "kd": kd.detach()}

    def _chunk(self, h: Tensor, weight: Tensor, y: Tensor, t_vals: Tensor, t_ids: Tensor | None
               ) -> tuple[Tensor, Tensor]:
        return kd_terms(h @ weight.T, y, t_vals, t_ids, self.kind, self.T)  # logits (rows, V)


# ----------------------------------------------------------------------------------------------- the pipeline


def student_model_values(student: str) -> tuple[dict[str, Any], Path | None]:
    """`kd.student` -> the student's model section and, for a run folder, the weights it starts from."""
    path = Path(student)
    if path.is_dir():
        return to_dict(read_run_folder_config(path).model), path / "model.safetensors"
    if path.suffix in (".yaml", ".yml") or path.is_file():
        model = load_yaml(path).get("model")
        if isinstance(model, str):
            model = {"preset": model}
        if not isinstance(model, dict):
            raise ConfigError(f"kd.student {student}: the YAML file has no `model` section to build the student from")
        return model, None
    try:
        return model_preset(student), None
    except ConfigError:
        raise ConfigError(f"kd.student {student!r}: not a model preset, a YAML file or a run folder") from None


def distill_config(config_file: str | Path | None, overrides: dict[str, Any]) -> DistillRunConfig:
    """The recipe (if any) with the command line's overrides; `kd.student` gives the model section, and the
    recipe's or command line's own `model.*` keys are changes on top of it."""
    from llmkit.config import apply_overrides

    values = apply_overrides(load_yaml(config_file) if config_file else {}, overrides)
    student = (values.get("kd") or {}).get("student")
    if student:
        base, _ = student_model_values(str(student))
        own = values.get("model") or {}
        values["model"] = {**base, **({"preset": own} if isinstance(own, str) else own)}
    return build(DistillRunConfig, values)


def load_teacher(src: str, device: str, dtype: str) -> Loaded:
    if not src:
        raise ConfigError("kd.teacher: missing: pass --teacher SRC (a run folder, HF folder, .gguf or built-in name)")
    try:
        return load_model(src, device=device, dtype=dtype, need="decoder")
    except CheckpointError as e:  # an encoder or a classifier: say it is the teacher that cannot be used
        raise ConfigError(f"--teacher {e}") from None


def check_same_tokenizer(teacher: str, t_vocab: int, t_tok: Tokenizer, student: str, s_vocab: int,
                         s_tok: Tokenizer, where: str) -> None:
    """Distillation compares distributions id by id: another vocabulary size is a broadcast error at best, another
    tokenizer of the same size silently scores the wrong pieces. Both are refused here, naming both models."""
    fix = f"prepare the data with the teacher's tokenizer (save it with load_model({teacher!r}).tokenizer.save(DIR))"
    if t_vocab != s_vocab:
        raise ConfigError(f"teacher {teacher} has a {t_vocab:,}-token vocabulary but student {student} ({where}) "
                          f"has {s_vocab:,}: teacher and student must share a tokenizer; {fix}")
    tv, sv = t_tok.tk.get_vocab(), s_tok.tk.get_vocab()
    if tv != sv:
        piece = next(iter(sorted(set(tv.items()) ^ set(sv.items()), key=lambda kv: kv[1])), ("?", -1))
        raise ConfigError(f"teacher {teacher} and student {student} ({where}) both have {t_vocab:,} tokens but "
                          f"different tokenizers (e.g. id {piece[1]} is {piece[0]!r} in one only): {fix}")


def open_cache(cfg: DistillRunConfig, V: int, meta: dict[str, Any], windows: int, run_dir: Path) -> TopKCache:
    """The top-k cache of this teacher over this data's training windows (kd.cache_dir, else in the run)."""
    kd = cfg.kd
    identity = {"teacher": str(kd.teacher), "teacher_dtype": kd.teacher_dtype, "vocab_size": V,
                "data": str(Path(cfg.data.path).resolve()), "train_tokens": int(meta["splits"]["train"]["tokens"])}
    return TopKCache(Path(kd.cache_dir) if kd.cache_dir else run_dir / "teacher-cache", windows,
                     cfg.model.block_size, kd.cache_top_k, identity)


def fill_cache(cfg: DistillRunConfig, quiet: bool = False) -> dict[str, float]:
    """Run the teacher once over every training window into kd.cache_dir, as the first epoch would step by
    step: later runs (a sweep of divergences and temperatures, a resumed run) then only read it. Returns
    {windows, computed, seconds}."""
    from tqdm.auto import tqdm

    if not (cfg.kd.cache_top_k and cfg.kd.cache_dir):
        raise ConfigError("kd.cache_top_k and kd.cache_dir: filling a teacher cache needs both (e.g. 64 and a "
                          "folder)")
    meta = load_meta(cfg.data.path)
    teacher = load_teacher(cfg.kd.teacher, cfg.train.device, cfg.kd.teacher_dtype)
    V = teacher.cfg.vocab_size
    check_same_tokenizer(cfg.kd.teacher, V, teacher.tokenizer, "data", meta["vocab_size"],
                         Tokenizer.load(Path(cfg.data.path) / meta.get("tokenizer", "tokenizer")),
                         f"data {cfg.data.path}")
    T, B = cfg.model.block_size, cfg.data.batch_size
    batches = WindowBatches(cfg.data.path, "train", T, B, seed=cfg.data.seed)
    cache = open_cache(cfg, V, meta, batches.windows, Path(cfg.kd.cache_dir))
    objective = Distill(teacher.model, V, cfg.kd.loss, cfg.kd.temperature, cfg.kd.alpha, cache)
    device = next(teacher.model.parameters()).device
    t0, todo = time.perf_counter(), np.flatnonzero(cache.filled[:] == 0)
    for i in tqdm(range(0, len(todo), B), desc="teacher cache", unit="batch", disable=quiet):
        w = torch.from_numpy(todo[i:i + B])  # (b,) window indices
        cache.store(w, objective.teacher_logits(batches.rows(w.numpy())[:, :-1].to(device)))  # inputs (b, T)
    cache.values.flush(), cache.ids.flush(), cache.filled.flush()
    return {"windows": batches.windows, "computed": len(todo), "seconds": time.perf_counter() - t0}


def distill(cfg: DistillRunConfig, run_dir: str | Path, resume: bool = False, quiet: bool = False,
            callbacks=(), overwrite: bool = False) -> TrainResult:
    """Train cfg.kd.student from cfg.kd.teacher on cfg.data into `run_dir`, a run folder every verb loads.

    Every check (teacher kind, shared tokenizer, sizes) happens before anything is written to `run_dir`."""
    run_dir, kd = Path(run_dir), cfg.kd
    if cfg.train.objective != "causal_lm" or cfg.model.arch == "bert":
        raise ConfigError(f"train.objective {cfg.train.objective!r} / model.arch {cfg.model.arch!r}: a distilled "
                          "student is a next-token predictor (causal_lm, a gpt2 or llama decoder)")
    meta = load_meta(cfg.data.path)
    student_name = kd.student or "model section"
    data_tok = Tokenizer.load(Path(cfg.data.path) / meta.get("tokenizer", "tokenizer"))
    init = student_model_values(kd.student)[1] if kd.student and not resume else None
    if init is not None:  # a run folder: its own tokenizer must be the teacher's too
        run_cfg = read_run_folder_config(Path(kd.student))
        if run_cfg.model.vocab_size != meta["vocab_size"]:
            raise ConfigError(f"student {kd.student} has a {run_cfg.model.vocab_size:,}-token vocabulary but the "
                              f"data {cfg.data.path} has {meta['vocab_size']:,}: use data made with its tokenizer")
    teacher = load_teacher(kd.teacher, cfg.train.device, kd.teacher_dtype)
    V = teacher.cfg.vocab_size
    check_same_tokenizer(kd.teacher, V, teacher.tokenizer, student_name, meta["vocab_size"], data_tok,
                         f"data {cfg.data.path}")
    if init is not None:
        check_same_tokenizer(kd.teacher, V, teacher.tokenizer, kd.student, V,
                             Tokenizer.load(Path(kd.student) / "tokenizer"), "its tokenizer/")
    if kd.cache_top_k > V:
        raise ConfigError(f"kd.cache_top_k: must be at most the vocabulary size {V:,}, got {kd.cache_top_k}")
    cfg.model.vocab_size = V
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model)
    if init is not None:
        load_into(model, load_weights(init), init)
    T, B = cfg.model.block_size, cfg.data.batch_size
    ddp = setup_distributed(resolve_device(cfg.train.device))
    kind = WindowBatches if kd.cache_top_k else TokenBatches
    batches = kind(cfg.data.path, "train", T, B, seed=cfg.data.seed, rank=ddp.rank, world=ddp.world)
    val = TokenBatches(cfg.data.path, "val", T, B, seed=0, rank=ddp.rank, world=ddp.world).fixed(cfg.train.eval_iters)

    start_run_folder(run_dir, resume=resume, overwrite=overwrite)  # the first write: every check has passed
    run_dir.mkdir(parents=True, exist_ok=True)
    save_yaml(cfg, run_dir / "config.yaml")
    teacher.tokenizer.save(run_dir / "tokenizer")
    cache = open_cache(cfg, V, meta, batches.windows, run_dir) if kd.cache_top_k else None  # type: ignore
    objective = Distill(teacher.model, V, kd.loss, kd.temperature, kd.alpha, cache)
    split = meta["splits"]["val"]

    def val_metrics(res: dict[str, float]) -> dict[str, float]:
        return {f"val_{k}": v for k, v in lm_figures(res["loss"], split["tokens"], split["bytes"]).items()}

    if not quiet:
        print(f"student: {cfg.model.arch} {model.num_params() / 1e6:.2f} M parameters ({student_name}); teacher: "
              f"{kd.teacher} {teacher.model.num_params() / 1e6:.2f} M; {kd.loss} at T={kd.temperature}, "
              f"alpha={kd.alpha}; teacher logits " + (f"cached (top {kd.cache_top_k})" if cache else "on the fly"))
    teacher_flops = teacher.model.flops_per_token(T) / 3 if cache is None else 0.0  # a forward pass: 2N of 6N
    try:
        return train(model, objective, cfg.train, batches, val, run_dir, resume=resume, tokens_per_batch=B * T,
                     flops_per_token=model.flops_per_token(T) + teacher_flops, val_metrics=val_metrics,
                     callbacks=list(callbacks), quiet=quiet)
    finally:
        if cache is not None and not quiet:
            print(f"teacher cache: {cache.hits} windows read, {cache.misses} computed")
