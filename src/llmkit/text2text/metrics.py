"""Corpus scores of predictions against references, computed by the reference libraries themselves.

- BLEU and chrF++ come from sacreBLEU (corpus-level, its default 13a tokenisation), with the signature sacreBLEU
  prints, because a BLEU figure without its signature (tokeniser, smoothing, case) is not comparable to another.
  chrF++ is `CHRF(word_order=2)`: character 6-grams plus word uni- and bigrams.
- ROUGE-1/2/L/Lsum come from Google's `rouge-score` (Porter stemming on, as in the summarisation papers), the
  F-measure averaged over examples (what HF `evaluate` reports), times 100 like sacreBLEU's figures.
- ROUGE-Lsum is the summary-level LCS over sentences, and rouge-score finds sentences only by newlines: text
  without them makes Lsum silently equal L. So both sides are split into sentences first, one per line. nltk's
  `sent_tokenize` needs the trained `punkt_tab` data, which is a download (nothing may download here); nltk's
  Punkt tokenizer with its default, untrained parameters splits on sentence-final punctuation (quotes and
  ellipses handled) without it. Without learned abbreviations it also splits after "Mr." — a small, consistent
  over-split on both sides, documented rather than hidden.
- Exact match: the share of predictions equal to their reference after stripping surrounding whitespace.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from llmkit.errors import DataError

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")


@lru_cache(maxsize=1)
def _sentence_splitter() -> Any:
    from nltk.tokenize.punkt import PunktSentenceTokenizer

    return PunktSentenceTokenizer()  # default parameters: no trained data needed, nothing downloads


def split_sentences(text: str) -> str:
    """`text` with one sentence per line: the form rouge-score's Lsum needs (existing line breaks are kept)."""
    lines = [s.strip() for line in text.splitlines() for s in _sentence_splitter().tokenize(line)]
    return "\n".join(s for s in lines if s)


def text2text_scores(predictions: list[str], references: list[str]) -> dict[str, Any]:
    """bleu, chrf (chrF++), rouge1, rouge2, rougeL, rougeLsum (0-100), exact_match (0-1), examples, and
    bleu_signature / chrf_signature. One reference per prediction."""
    if not predictions:
        raise DataError("no predictions to score: the evaluation set is empty")
    if len(predictions) != len(references):
        raise DataError(f"{len(predictions)} predictions but {len(references)} references: one reference each")
    from rouge_score import rouge_scorer
    from sacrebleu.metrics import BLEU, CHRF

    bleu, chrf = BLEU(), CHRF(word_order=2)
    bleu_score = bleu.corpus_score(predictions, [references])
    chrf_score = chrf.corpus_score(predictions, [references])
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    sums = dict.fromkeys(ROUGE_TYPES, 0.0)
    for pred, ref in zip(predictions, references):
        # Sentence splitting changes only Lsum: the other types tokenise the text and ignore line breaks.
        s = scorer.score(split_sentences(ref), split_sentences(pred))
        for k in ROUGE_TYPES:
            sums[k] += s[k].fmeasure
    n = len(predictions)
    exact = sum(p.strip() == r.strip() for p, r in zip(predictions, references)) / n
    return {"bleu": bleu_score.score, "chrf": chrf_score.score,
            **{k: 100.0 * v / n for k, v in sums.items()},
            "exact_match": exact, "examples": n,
            "bleu_signature": str(bleu.get_signature()), "chrf_signature": str(chrf.get_signature())}
