"""One Tokenizer over Hugging Face `tokenizers`: byte-level BPE (trained or GPT-2's), char-level, chat templates.

A tokenizer folder holds `tokenizer.json` and an HF-style `tokenizer_config.json` (special tokens, chat
template), so `transformers.AutoTokenizer` reads the same folder.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from tokenizers import Regex, decoders, models, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as HFTokenizer

from llmkit.data.corpora import gpt2_vocab_files
from llmkit.errors import DataError
from llmkit.files import atomic_write_text, read_json

EOS = "<|endoftext|>"
PAD = "<|pad|>"
# Tokens that end an assistant turn in common chat templates; generation stops at any the vocabulary has.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "</s>")

# ChatML, as SmolLM2 and many others use; a tokenizer may carry its own.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class Tokenizer:
    """Text <-> token ids, with the special tokens and chat template a model needs."""

    def __init__(self, tk: HFTokenizer, eos_token: str = EOS, pad_token: str | None = PAD,
                 bos_token: str | None = None, chat_template: str | None = None, kind: str = "bpe",
                 add_bos: bool = False) -> None:
        self.tk = tk
        self.kind = kind
        self.eos_token, self.bos_token = eos_token, bos_token
        # The model was trained with BOS before every document (Llama, Gemma...): prompts must start with it too,
        # or generation and scores are silently worse. `encode` stays plain; `encode_prompt` adds it.
        self.add_bos = bool(add_bos and bos_token and tk.token_to_id(bos_token) is not None)
        self.pad_token = pad_token if pad_token and tk.token_to_id(pad_token) is not None else eos_token
        self.chat_template = chat_template
        for name, tok in (("eos", eos_token), ("pad", self.pad_token)):
            if tk.token_to_id(tok) is None:
                raise DataError(f"tokenizer has no {name} token {tok!r}")

    # ------------------------------------------------------------------ ids
    @property
    def vocab_size(self) -> int:
        return self.tk.get_vocab_size(with_added_tokens=True)

    @property
    def eos_id(self) -> int:
        return self.tk.token_to_id(self.eos_token)

    @property
    def pad_id(self) -> int:
        return self.tk.token_to_id(self.pad_token)

    @property
    def bos_id(self) -> int | None:
        return self.tk.token_to_id(self.bos_token) if self.bos_token else None

    def token_to_id(self, token: str) -> int | None:
        return self.tk.token_to_id(token)

    def encode(self, text: str) -> list[int]:
        return self.tk.encode(text, add_special_tokens=False).ids

    def encode_prompt(self, text: str) -> list[int]:
        """Ids of a text the model reads from its start (a prompt, a document to score): BOS first when the model
        wants it, unless the text already begins with it (chat templates often write it)."""
        ids = self.encode(text)
        return self.with_bos(ids)

    def with_bos(self, ids: list[int]) -> list[int]:
        """`ids` with BOS in front when the model wants it and it is not there yet (never doubled)."""
        bos = self.bos_id
        if not self.add_bos or bos is None or ids[:1] == [bos]:
            return list(ids)
        return [bos, *ids]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tk.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.tk.decode(list(ids), skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------------ chat
    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """Render a conversation with the tokenizer's Jinja chat template (the same engine transformers uses)."""
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise DataError(f"chat template: {message}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        template = env.from_string(self.chat_template or DEFAULT_CHAT_TEMPLATE)
        return template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                               bos_token=self.bos_token or "", eos_token=self.eos_token)

    # ------------------------------------------------------------------ files
    def save(self, out_dir: str | Path) -> Path:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "tokenizer.json", self._file_tokenizer().to_str())
        config: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast", "llmkit_kind": self.kind,
            "eos_token": self.eos_token, "pad_token": self.pad_token, "bos_token": self.bos_token,
            "model_max_length": 1_000_000, "clean_up_tokenization_spaces": False, "add_bos_token": self.add_bos,
        }
        if self.kind == "wordpiece":  # BERT's roles and inputs, so transformers' pipelines and pairs work
            config.update(cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]", unk_token="[UNK]",
                          model_input_names=["input_ids", "token_type_ids", "attention_mask"])
        if self.chat_template:
            config["chat_template"] = self.chat_template
        atomic_write_text(out / "tokenizer_config.json", json.dumps(config, indent=2))
        return out

    def _file_tokenizer(self) -> HFTokenizer:
        """The tokenizer to write: when the model wants BOS, a post-processor that adds it (as Llama 3's file
        has), so transformers' `tokenizer(text)` gives what the model expects; llmkit's `encode` never uses it."""
        bos = self.bos_id
        if not self.add_bos or bos is None or self.tk.encode("a", add_special_tokens=True).ids[:1] == [bos]:
            return self.tk
        tk = HFTokenizer.from_str(self.tk.to_str())
        b = self.bos_token
        add = processors.TemplateProcessing(single=f"{b} $A", pair=f"{b} $A {b}:1 $B:1", special_tokens=[(b, bos)])
        tk.post_processor = add if tk.post_processor is None else processors.Sequence([tk.post_processor, add])
        return tk

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        p = Path(path)
        if str(path) == "gpt2" and not p.exists():
            return cls.gpt2()
        file = p / "tokenizer.json" if p.is_dir() else p
        if not file.is_file():
            raise DataError(f"no tokenizer at {p} (expected {file.name}; make one with `llmkit tokenizer train`)")
        try:
            tk = HFTokenizer.from_file(str(file))
        except Exception as e:  # the Rust error is long; the first line says what is wrong
            raise DataError(f"{file}: not a valid tokenizer.json ({str(e).splitlines()[0][:200]})") from None
        config: dict[str, Any] = {}
        cfg_file = file.parent / "tokenizer_config.json"
        if cfg_file.is_file():
            config = read_json(cfg_file, DataError)

        def token(key: str, default: str | None) -> str | None:
            v = config.get(key, default)
            return v.get("content") if isinstance(v, dict) else v

        return cls(tk, eos_token=token("eos_token", EOS), pad_token=token("pad_token", PAD),
                   bos_token=token("bos_token", None), chat_template=config.get("chat_template"),
                   kind=config.get("llmkit_kind", "bpe"), add_bos=config.get("add_bos_token") is True)

    # ------------------------------------------------------------------ builders
    @classmethod
    def train_bpe(cls, texts: Iterable[str], vocab_size: int, special_tokens: tuple[str, ...] = (EOS, PAD),
                  length: int | None = None, progress: bool = True) -> Tokenizer:
        """Byte-level BPE (GPT-2's scheme): every UTF-8 string round-trips exactly, no unknown tokens.
        `progress=False` silences the trainer, whose bars leave blank lines on stdout even when it is not a
        terminal (they would break a caller's JSON-lines output)."""
        if vocab_size < 256 + len(special_tokens) + 1:
            raise DataError(f"--vocab-size {vocab_size} is too small for byte-level BPE (at least 259)")
        tk = HFTokenizer(models.BPE())
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tk.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special_tokens),
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=progress)
        tk.train_from_iterator(_nonempty(texts), trainer=trainer, length=length)
        return cls(tk, kind="bpe")

    @classmethod
    def train_char(cls, texts: Iterable[str], special_tokens: tuple[str, ...] = (EOS, PAD)) -> Tokenizer:
        """One token per character seen, plus 256 byte tokens so unseen characters still round-trip."""
        chars: set[str] = set()
        for t in _nonempty(texts):
            chars.update(t)
        vocab: dict[str, int] = {}
        for tok in [*special_tokens, *(f"<0x{b:02X}>" for b in range(256)), *sorted(chars)]:
            vocab.setdefault(tok, len(vocab))
        tk = HFTokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True))
        # Split into single characters: BPE with no merges then maps each to its id (or its bytes).
        tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
        tk.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
        tk.add_special_tokens(list(special_tokens))
        return cls(tk, kind="char")

    @classmethod
    def gpt2(cls) -> Tokenizer:
        """The real GPT-2 vocabulary (50,257 tokens) from the packaged encoder.json / vocab.bpe."""
        vocab_file, merges_file = gpt2_vocab_files()
        tk = HFTokenizer(models.BPE.from_file(str(vocab_file), str(merges_file)))
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tk.decoder = decoders.ByteLevel()
        tk.add_special_tokens([EOS])
        return cls(tk, eos_token=EOS, pad_token=None, bos_token=EOS, kind="gpt2")


def _nonempty(texts: Iterable[str]) -> Iterator[str]:
    blank = True
    for t in texts:
        if t:
            blank = blank and not t.strip()
            yield t
    if blank:
        raise DataError("the corpus is empty: no text to train a tokenizer on")


def end_of_turn_ids(tok: Tokenizer) -> list[int]:
    """eos plus every end-of-turn token the vocabulary has: generation stops at any of them."""
    ids = [tok.eos_id] + [tok.token_to_id(t) for t in END_OF_TURN_TOKENS]
    return sorted({i for i in ids if i is not None})
