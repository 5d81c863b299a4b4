"""BERT-style WordPiece tokenizers (over HF `tokenizers`) and the one place texts become model inputs.

An encoder reads `[CLS] text [SEP]` (pairs: `[CLS] a [SEP] b [SEP]` with token types 0/1) and needs a `[MASK]`
token to pretrain; a decoder reads the plain token ids. `encode_texts` hides that difference from fine-tuning,
classification and embeddings, so every caller truncates and frames text the same way.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

from llmkit.data.tokenizer import Tokenizer
from llmkit.errors import DataError

SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def wrap_bert_tokenizer(tk: HFTokenizer) -> Tokenizer:
    """An HF WordPiece tokenizer -> llmkit Tokenizer: [SEP] ends a document, [PAD] pads, [CLS] begins.

    Padding and truncation stored in the file (all-MiniLM-L6-v2 pads every text to 128) are switched off: llmkit
    pads per batch and truncates in `encode_texts`.
    """
    for t in SPECIALS:
        if tk.token_to_id(t) is None:
            raise DataError(f"WordPiece tokenizer lacks the special token {t} (BERT needs {', '.join(SPECIALS)})")
    tk.no_padding()
    tk.no_truncation()
    return Tokenizer(tk, eos_token="[SEP]", pad_token="[PAD]", bos_token="[CLS]", kind="wordpiece")


def train_wordpiece(texts: Iterable[str], vocab_size: int, lowercase: bool = True) -> Tokenizer:
    """Train BERT's tokenizer (normaliser, pre-tokenizer, WordPiece, [CLS]/[SEP] template) on a corpus."""
    if vocab_size < 100:
        raise DataError(f"--vocab-size {vocab_size} is too small for WordPiece (at least 100)")
    tk = HFTokenizer(models.WordPiece(unk_token="[UNK]"))
    tk.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    tk.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tk.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS), show_progress=False)
    seen = [0]

    def nonempty() -> Iterable[str]:
        for t in texts:
            if t.strip():
                seen[0] += 1
                yield t

    tk.train_from_iterator(nonempty(), trainer=trainer)
    if seen[0] == 0:
        raise DataError("the corpus is empty: no text to train a tokenizer on")
    tk.model = models.WordPiece(vocab=_reproducible_ids(tk.get_vocab()), unk_token="[UNK]")
    cls, sep = tk.token_to_id("[CLS]"), tk.token_to_id("[SEP]")
    tk.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return wrap_bert_tokenizer(tk)


def _reproducible_ids(vocab: dict[str, int]) -> dict[str, int]:
    """Renumber a trained vocabulary so the same corpus always gives the same ids.

    The trainer numbers characters in hash-map order and breaks ties between equally frequent merges by those
    numbers, so the ids change from process to process. WordPiece splits words by longest
    match, not by id, so sorting the pieces changes no tokenization and makes a retrained tokenizer, and a model
    initialised over it with a seed, reproducible.
    """
    def rank(token: str) -> tuple:
        if token in SPECIALS:
            return (0, SPECIALS.index(token))
        if len(token) == 1 or (len(token) == 3 and token.startswith("##")):
            return (1, token.startswith("##"), token)
        return (2, token.startswith("##"), token)

    return {token: new for new, token in enumerate(sorted(vocab, key=rank))}


def special_ids(tok: Tokenizer) -> dict[str, int]:
    """Ids of [PAD] [UNK] [CLS] [SEP] [MASK]; a one-line error if the tokenizer is not BERT-style."""
    out = {}
    for t in SPECIALS:
        i = tok.token_to_id(t)
        if i is None:
            raise DataError(f"the tokenizer has no {t} token: masked-LM pretraining needs a WordPiece tokenizer "
                            "(make one with `llmkit tokenizer train --kind wordpiece`)")
        out[t.strip("[]").lower()] = i
    return out


def encode_texts(tok: Tokenizer, texts: list[str], max_length: int) -> list[list[int]]:
    """Texts -> token id lists of at most `max_length`, framed the way the model was pretrained.

    WordPiece (encoders): `[CLS] text [SEP]`, the text truncated so [SEP] stays. Other tokenizers (decoders):
    the plain ids, truncated at the end (the start of a text is kept).
    """
    if tok.kind == "wordpiece":
        cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
        return [[cls, *ids[: max(0, max_length - 2)], sep] for ids in tok.encode_batch(texts)]
    return [ids[:max_length] for ids in tok.encode_batch(texts)]
