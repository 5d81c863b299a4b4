"""Sentence embeddings and semantic search: `llmkit embed` and `llmkit search`.

An embedding is the mean of a text's token states, L2-normalised, exactly as sentence-transformers computes it
for all-MiniLM-L6-v2 (its modules.json: Transformer -> mean Pooling -> Normalize), so cosine similarity is a
dot product. Any llmkit model works (a BERT run folder, a fine-tuned classifier's backbone, a decoder), but
only models trained for it (all-minilm-l6-v2) give good semantic matches.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from llmkit.data.batches import fixed_batches
from llmkit.data.wordpiece import encode_texts
from llmkit.errors import DataError
from llmkit.infer.load import Loaded, load_model
from llmkit.model.encoder import mean_pool


class SentenceEncoder:
    """Texts -> (N, C) unit vectors with a pretrained model (built-in name, HF folder or run folder)."""

    def __init__(self, model: str | Loaded, max_length: int = 256, device: str = "cpu") -> None:
        """`model` is a source to load, or a model already loaded (`llmkit serve` embeds with the model it serves)."""
        got = model if isinstance(model, Loaded) else load_model(model, device=device)
        self.model, self.tokenizer, self.cfg = got.model, got.tokenizer, got.cfg
        self.max_length = min(max_length, got.cfg.block_size)
        self.device = next(got.model.parameters()).device

    @property
    def dim(self) -> int:
        return self.cfg.n_embd

    def encode(self, texts: list[str], batch_size: int = 64, normalize: bool = True) -> np.ndarray:
        """Mean-pooled (and L2-normalised) embeddings (N, C), float32, in the order of `texts`."""
        return self.embed_ids(self.tokenize(texts), batch_size, normalize)

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        """The ids the model reads for each text (framed and cut to `max_length`, as `encode` feeds them)."""
        return encode_texts(self.tokenizer, texts, self.max_length)

    @torch.inference_mode()
    def embed_ids(self, ids: list[list[int]], batch_size: int = 64, normalize: bool = True) -> np.ndarray:
        """`encode` for texts already tokenized by `tokenize` (a caller that also counts their tokens)."""
        if not ids:
            return np.zeros((0, self.dim), dtype=np.float32)
        batches, order = fixed_batches(ids, None, batch_size, self.tokenizer.pad_id)
        chunks = []
        for b in batches:
            x, mask = b["input_ids"].to(self.device), b["attention_mask"].to(self.device)
            if self.cfg.arch == "bert":
                hidden = self.model(x, attention_mask_2d=mask).hidden  # (B, T, C)
            else:
                hidden = self.model(x, attention_mask_2d=mask, logits_slice=slice(0, 0)).hidden
            e = mean_pool(hidden.float(), mask)  # (B, C)
            chunks.append(F.normalize(e, dim=-1) if normalize else e)
        out = np.empty((len(ids), self.dim), dtype=np.float32)
        out[order] = torch.cat(chunks).cpu().numpy()
        return out


def search(encoder: SentenceEncoder, corpus: list[str], queries: list[str], top_k: int = 5,
           corpus_emb: np.ndarray | None = None) -> list[list[dict]]:
    """For each query, the `top_k` corpus texts by cosine similarity: [{rank, score, index, text}, ...]."""
    if top_k < 1:
        raise DataError(f"--top-k must be at least 1, got {top_k}")
    emb = encoder.encode(corpus) if corpus_emb is None else corpus_emb  # (N, C)
    q = encoder.encode(queries)  # (Q, C)
    scores = q @ emb.T  # (Q, N) cosine similarities: the vectors are unit length
    results = []
    for row in scores:
        top = np.argsort(-row, kind="stable")[:top_k]
        results.append([{"rank": r + 1, "score": float(row[i]), "index": int(i), "text": corpus[i]}
                        for r, i in enumerate(top)])
    return results
