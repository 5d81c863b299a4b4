"""A real `llmkit serve` process for tests: a free loopback port, wait for /health, always stopped afterwards."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from helpers_convert import chat_tokenizer, make_run_folder
from llmkit.data.corpora import corpus_documents

START_TIMEOUT = 120  # seconds: importing torch on a busy 2-core machine is most of it


@dataclass
class Server:
    url: str  # http://127.0.0.1:PORT
    proc: subprocess.Popen
    log: Path

    def alive(self) -> bool:
        return self.proc.poll() is None

    def post(self, path: str, body: bytes | dict, headers: dict[str, str] | None = None) -> tuple[int, dict | str]:
        """Raw POST (urllib, no client-side checks): (status, parsed JSON body or text)."""
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method="POST",
                                     headers={"content-type": "application/json", **(headers or {})})
        return _open(req)

    def get(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, dict | str]:
        return _open(urllib.request.Request(self.url + path, headers=headers or {}))


def _open(req: urllib.request.Request) -> tuple[int, dict | str]:
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            status, raw = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    text = raw.decode("utf-8", errors="replace")
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_server(model: str | Path, log_dir: Path, *extra: str) -> Iterator[Server]:
    """`python -m llmkit.cli.main serve --model MODEL --port <free> EXTRA...`; killed on exit whatever happens."""
    port = free_port()
    log = log_dir / f"serve-{port}.log"
    cmd = [sys.executable, "-m", "llmkit.cli.main", "serve", "--model", str(model), "--port", str(port), *extra]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    server = Server(url=f"http://127.0.0.1:{port}", proc=proc, log=log)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"llmkit serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if server.get("/health")[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"llmkit serve not healthy after {START_TIMEOUT} s:\n{log.read_text()[-3000:]}")
            time.sleep(0.25)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)


def shakespeare(chars: int = 60_000) -> str:
    return "".join(text for _, text in corpus_documents("shakespeare"))[:chars]


def tiny_chat_run(out: Path, block_size: int = 256, seed: int = 0) -> Path:
    """A random-init Llama-flavour run folder with a ChatML tokenizer (template, <|im_end|> ends a turn)."""
    return make_run_folder(out, "llama", chat_tokenizer(shakespeare(), vocab_size=400), seed=seed,
                           block_size=block_size)
