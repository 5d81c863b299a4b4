"""llmkit: make language models end to end, in one readable PyTorch codebase."""

from llmkit.infer.api import LLM, load

__all__ = ["LLM", "load"]
__version__ = "0.1.0"
