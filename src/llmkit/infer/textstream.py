"""One row's tokens -> the text that may be shown so far: stop strings across token boundaries, UTF-8 pieces.

generate() and the serving engine (serve/engine.py) both stream through this class, so a stop string is cut and
held back the same way everywhere: a client never sees the first half of a stop string, nor half a character.
"""

from __future__ import annotations

import re
from functools import lru_cache

from llmkit.data.tokenizer import Tokenizer

_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class TextStream:
    """Feed tokens with push(); take() returns the newly showable text and the tokens it completes.

    `ids` are the tokens of `text`: after a stop string, none past it (the last may also hold its start).
    """

    def __init__(self, tokenizer: Tokenizer, stop: list[str]) -> None:
        self.tokenizer, self.stop = tokenizer, stop
        self.ids: list[int] = []
        self.text = ""
        self.stopped = False  # a stop string ended the text
        self.done = False  # no more tokens will come (stop string, eos, length)
        self.shown = 0  # characters already returned by take()
        self.shown_ids = 0  # tokens already returned by take()

    def push(self, token: int) -> bool:
        """Add one generated token; True when a stop string now ends the text (the stream is then done)."""
        self.ids.append(token)
        self.text = self.tokenizer.decode(self.ids)
        hit = [self.text.find(s) for s in self.stop if s in self.text]
        if hit:
            self.text = self.text[: min(hit)]
            self.ids = _tokens_of(self.tokenizer, self.ids, len(self.text))
            self.stopped = self.done = True
        return self.stopped

    def finish(self) -> None:
        """No more tokens (eos or a length limit): everything held back may now be shown."""
        self.done = True

    def take(self) -> tuple[str, list[int]]:
        """(new text, new token ids) that are safe to show now; everything left once the stream is done.

        Text is held back while it may still become a stop string or is an incomplete UTF-8 character; a token
        is released once all of its text has been released, so the ids always spell (at most) the text shown."""
        safe = len(self.text) if self.done else _stream_safe(self.text, self.stop)
        piece = self.text[self.shown:safe] if safe > self.shown else ""
        self.shown = max(self.shown, safe)
        if self.done:
            new_ids = self.ids[self.shown_ids:]
        else:
            n = self.shown_ids
            for k in range(self.shown_ids + 1, len(self.ids) + 1):
                prefix = self.tokenizer.decode(self.ids[:k])
                if len(prefix.rstrip("\ufffd")) > self.shown:
                    break
                if not prefix.endswith("\ufffd"):
                    n = k
            new_ids = self.ids[self.shown_ids:n]
        self.shown_ids += len(new_ids)
        return piece, new_ids


def _tokens_of(tokenizer: Tokenizer, ids: list[int], n_chars: int) -> list[int]:
    """The shortest prefix of `ids` whose text covers the first `n_chars` characters: the tokens of a text cut
    at a stop string, without those that only spell the stop string (or what came after it)."""
    for k in range(len(ids) + 1):
        if len(tokenizer.decode(ids[:k])) >= n_chars:
            return ids[:k]
    return ids


def _stream_safe(text: str, stops: list[str]) -> int:
    """How much of `text` can be shown now: not a trailing partial character nor a possible stop-string prefix."""
    end = len(text.rstrip("\ufffd"))
    for s in stops:
        for k in range(min(len(s) - 1, end), 0, -1):
            if text[:end].endswith(s[:k]):
                end = min(end, len(text[:end]) - k)
                break
    return end


def token_bytes(tokenizer: Tokenizer, token: int) -> bytes:
    """A token's exact UTF-8 bytes, even when it holds only part of a character (its decoded text would then be
    U+FFFD): byte-fallback tokens (`<0xE2>`) and byte-level BPE spellings are mapped back to their bytes."""
    text = tokenizer.decode([token])
    if "\ufffd" not in text:
        return text.encode("utf-8")
    spelling = tokenizer.tk.id_to_token(token) or ""
    m = _BYTE_TOKEN.fullmatch(spelling)
    if m:
        return bytes([int(m.group(1), 16)])
    table = _byte_level_table()
    if spelling and all(c in table for c in spelling):
        return bytes(table[c] for c in spelling)
    return text.encode("utf-8")


@lru_cache(maxsize=1)
def _byte_level_table() -> dict[str, int]:
    from llmkit.interop.gguf import bytes_to_unicode

    return {c: b for b, c in bytes_to_unicode().items()}
