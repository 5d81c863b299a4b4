"""The knowledge-distillation section (`kd`) of a `llmkit distill` run, beside the model, data and train sections.

A distillation run folder's config.yaml holds all four, so the run says which teacher, divergence, temperature
and mixing weight made it; `read_run_folder_config` recognises it by its `kd` section.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from llmkit.config.sections import RunConfig, _require

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")


@dataclass
class KDConfig:
    """Knowledge distillation: which teacher, and how the student is pulled towards its distribution."""

    teacher: str = ""
    """The teacher: llmkit run folder, Hugging Face folder, .gguf file or built-in name (a gpt2/llama decoder that
    shares the student's tokenizer). It runs in eval mode without gradients and never trains."""
    student: str = ""
    """The student: a model preset name (e.g. `smollm2-draft`), a YAML file whose `model` section describes it, or
    an llmkit run folder (its config and weights are the starting point). Empty = the recipe's `model` section."""
    loss: str = "forward_kl"
    """Divergence D(teacher || student) between the temperature-softened distributions: `forward_kl` (KL(p||q),
    mass-covering, Hinton's), `reverse_kl` (KL(q||p), mode-seeking, MiniLLM's) or `jsd` (Jensen-Shannon with
    beta 0.5, bounded, GKD's)."""
    temperature: float = 2.0
    """Softmax temperature T for both models' logits; the divergence is scaled by T^2 so its gradients keep their
    size as T changes (Hinton et al.)."""
    alpha: float = 0.5
    """Loss = (1 - alpha) * cross-entropy on the data + alpha * T^2 * D. 0 = plain pretraining, 1 = teacher only."""
    cache_top_k: int = 0
    """0 = the teacher runs on every batch (full distribution). K > 0 = the teacher's K largest logits per position
    (fp16 values + int32 ids) are stored the first time a window is seen and read back afterwards, so later epochs
    (and later runs over the same data) skip the teacher; the divergence is then taken over those K ids, both
    distributions renormalised over them."""
    cache_dir: str = ""
    """Where the top-k cache lives ('' = <out>/teacher-cache). Point several runs at one folder to share it: it
    holds raw logits, valid for every divergence and temperature."""
    teacher_dtype: str = "float32"
    """The teacher's weights: `float32` or `bfloat16` (faster on GPUs; on CPUs often slower, even with bf16
    instructions: measure)."""

    def __post_init__(self) -> None:
        _require(self.loss in DIVERGENCES, "kd.loss", self.loss, f"one of {', '.join(DIVERGENCES)}")
        _require(0 < self.temperature < math.inf, "kd.temperature", self.temperature,
                 "a positive number (1 = the models' own distributions; 0 would divide the logits by zero)")
        _require(0 <= self.alpha <= 1, "kd.alpha", self.alpha, "in [0, 1] (the share of the distillation term)")
        _require(0 <= self.cache_top_k < 1 << 24, "kd.cache_top_k", self.cache_top_k,
                 "0 (teacher on the fly) or a number of logits to keep per position")
        _require(self.teacher_dtype in ("float32", "fp32", "bfloat16", "bf16"), "kd.teacher_dtype",
                 self.teacher_dtype, "float32 or bfloat16")


@dataclass
class DistillRunConfig(RunConfig):
    """A distillation run: the student's model, data and train sections plus the teacher and the divergence."""

    kd: KDConfig = field(default_factory=KDConfig)
