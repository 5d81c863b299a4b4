"""Where the loop's figures go besides metrics.jsonl: TensorBoard event files (`train.report_to: tensorboard`).

metrics.jsonl stays the record the project reads back (plots, tests, resume); TensorBoard is for people who
watch runs live or compare many of them. Both get the same records: training lines (loss, lr, tokens/s, MFU,
grad norm, objective metrics) as `train/<name>` and every validation figure as `val/<name>`. Only rank 0 writes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmkit.errors import ConfigError


class Reporter:
    """Mirrors metrics.jsonl records into `<run>/tensorboard/`; a no-op unless `tensorboard` is in report_to."""

    def __init__(self, run_dir: Path, report_to: list[str], main: bool, resumed_at: int | None = None) -> None:
        self.writer = None
        if "tensorboard" not in report_to or not main:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError("train.report_to: tensorboard is not installed "
                              "(pip install 'llmkit[tensorboard]', or set train.report_to none)") from None
        # A resumed run appends a new event file; purge_step makes TensorBoard drop what the killed run logged
        # after its checkpoint, as metrics.jsonl is truncated, so no step shows twice.
        purge = resumed_at + 1 if resumed_at is not None else None
        self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=purge)

    def write(self, record: dict[str, Any]) -> None:
        if self.writer is None:
            return
        step = int(record["step"])
        for key, value in record.items():
            if key == "step" or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            tag = f"val/{key[4:]}" if key.startswith("val_") else f"train/{key}"
            self.writer.add_scalar(tag, value, step)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
