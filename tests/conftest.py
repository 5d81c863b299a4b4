"""Shared fixtures: a small real corpus (a slice of Shakespeare), its tokenizer and token shards, tiny configs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from llmkit.config import ModelConfig
from llmkit.data.corpora import corpus_documents
from llmkit.data.shards import prepare
from llmkit.data.tokenizer import Tokenizer


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory) -> Path:
    """~200 KB of real Shakespeare in one UTF-8 file."""
    text = "".join(text for _, text in corpus_documents("shakespeare"))[:200_000]
    path = tmp_path_factory.mktemp("corpus") / "shakespeare.txt"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory, corpus_file) -> Path:
    tok = Tokenizer.train_bpe([corpus_file.read_text()], vocab_size=512)
    return tok.save(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory, corpus_file, tokenizer_dir) -> Path:
    out = tmp_path_factory.mktemp("data")
    prepare(str(corpus_file), tokenizer_dir, out, quiet=True)
    return out


def tiny_model_config(arch: str = "gpt2", **kw) -> ModelConfig:
    base = dict(arch=arch, vocab_size=512, block_size=64, n_layer=2, n_head=4, n_embd=32)
    if arch == "llama":
        base.update(n_kv_head=2, bias=False, tie_embeddings=False)
    base.update(kw)
    return ModelConfig(**base)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


CHROMIUM = "/usr/bin/chromium"
# Flags the closed network needs: without the background-networking ones Chromium keeps dialling Google.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


@pytest.fixture
def browser_page():
    """A Playwright page in Debian's headless Chromium. .ci/run (LLMKIT_CI set) installs Chromium and fails without
    it; a developer machine without it skips."""
    import os
    import shutil

    if shutil.which(CHROMIUM) is None and shutil.which("chromium") is None:
        if os.environ.get("LLMKIT_CI"):
            pytest.fail("chromium is not installed (.ci/run installs Debian's chromium package)")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which(CHROMIUM) or shutil.which("chromium"),
                                    args=CHROMIUM_ARGS)
        try:
            yield browser.new_page(viewport={"width": 1280, "height": 900})
        finally:
            browser.close()
