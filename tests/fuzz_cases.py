"""The fuzzer's generators and judge, shared by tests/test_fuzz.py (a few dozen cases per kind) and
bench/fuzz.py (a thousand and more, some as real subprocesses).

A case is data: the argv of one `llmkit` command (with `{fix}` = the shared, read-only fixtures and `{case}` =
the case's own folder), the files to write into its folder first, and optionally a fixture folder to copy in
and corrupt. So the same case runs in-process (fast) or as `python -m llmkit.cli.main` (the real exit status).

The promise under test: exit status 0 (the input was valid) or 2 with exactly one `error:` line on stderr; never
a traceback, never a hang, and nothing outside the case's folder changed.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml
from hypothesis import strategies as st

TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:  # helpers_convert imports conftest as a module
    sys.path.insert(0, str(TESTS))

# ------------------------------------------------------------------------------------------- fixtures

RECIPE = {"model": {"arch": "gpt2", "n_layer": 1, "n_head": 2, "n_embd": 16, "block_size": 16},
          "data": {"path": "{fix}/data", "batch_size": 2},
          "train": {"max_steps": 2, "warmup_steps": 0, "eval_interval": 0, "eval_iters": 1, "log_interval": 1,
                    "device": "cpu", "dtype": "float32"}}
SAFETY = ["--train.max_minutes", "0.02", "--train.device", "cpu"]  # appended unless the case fuzzes them


def build_fixtures(root: Path) -> Path:
    """The read-only inputs every case may use: a corpus, a tokenizer, token shards, a tiny run folder (gpt2),
    its HF export, a recipe, labelled rows and passages. Built once per session (~ seconds)."""
    from helpers_convert import make_run_folder
    from llmkit.data.corpora import corpus_documents
    from llmkit.data.shards import prepare
    from llmkit.data.tokenizer import Tokenizer
    from llmkit.interop.convert import convert

    root.mkdir(parents=True, exist_ok=True)
    text = next(text for _, text in corpus_documents("shakespeare"))[:60_000]
    (root / "corpus.txt").write_text(text, encoding="utf-8")
    tok = Tokenizer.train_bpe([text], vocab_size=300)
    tok.save(root / "tok")
    prepare(str(root / "corpus.txt"), root / "tok", root / "data", quiet=True)
    make_run_folder(root / "run", "gpt2", tok, block_size=32, n_layer=1, n_head=2, n_embd=16)
    convert(str(root / "run"), root / "hf", to="hf")
    recipe = json.loads(json.dumps(RECIPE).replace("{fix}", str(root)))
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    lines = [ln.strip().replace(",", " ") for ln in text.splitlines() if len(ln.strip()) > 10][:40]
    (root / "labels.csv").write_text("text,label\n" + "".join(f"{t},{'ab'[i % 2]}\n" for i, t in enumerate(lines)))
    (root / "passages.txt").write_text("\n".join(lines[:8]) + "\n")
    return root


def snapshot(folder: Path) -> dict[str, str]:
    """path -> sha1 of every file below `folder` (what a case must not change)."""
    return {str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------------------- generators

BAD_VALUES = ["0", "-1", "-7", str(2**63), str(-2**63), "1" + "0" * 30, "1e400", "1e-400", "nan", "NaN", "inf",
              "-inf", "", " ", "abc", "1.5", "0.0", "None", "true", "[1, 2]", "{a: 1}", "💥", "--", "3e-4", "0x10",
              "cuda:x", "\t"]


def values() -> st.SearchStrategy[str]:
    """Option values: mostly wrong (zero, negative, beyond any limit, NaN, empty, garbage), sometimes fine."""
    return st.one_of(st.sampled_from(BAD_VALUES), st.integers(1, 4).map(str),
                     st.floats(0.01, 0.99).map(lambda f: f"{f:.3g}"), st.text(max_size=8))


def _dotted_keys(cls: type, prefix: str = "") -> list[str]:
    out = []
    for f in fields(cls):
        tp = cls.__dataclass_fields__[f.name].type
        sub = getattr(sys.modules[cls.__module__], str(tp), None) if isinstance(tp, str) else tp
        if is_dataclass(sub):
            out += _dotted_keys(sub, f"{prefix}{f.name}.")
        else:
            out.append(prefix + f.name)
    return out


def config_keys() -> list[str]:
    from llmkit.config import FinetuneRunConfig

    return _dotted_keys(FinetuneRunConfig)


def override_args(finetune: bool) -> st.SearchStrategy[list[str]]:
    """Dotted overrides: real keys (any section), misspelt ones (--train.lrr), random ones; random values."""
    keys = [k for k in config_keys() if finetune or not k.startswith("finetune.")]
    key = st.one_of(st.sampled_from(keys), st.sampled_from(keys).map(lambda k: k + "r"),
                    st.from_regex(r"[a-z]{1,6}\.[a-z_]{1,8}", fullmatch=True))
    pair = st.tuples(key, values()).map(lambda kv: [f"--{kv[0]}", kv[1]])
    return st.lists(pair, max_size=3).map(lambda pairs: [a for p in pairs for a in p])


# verb -> (argv that works, options to fuzz)
VERBS: dict[str, tuple[list[str], list[str]]] = {
    "tokenizer": (["tokenizer", "train", "--corpus", "{fix}/corpus.txt", "--vocab-size", "280", "--out", "{case}/tok"],
                  ["--kind", "--vocab-size", "--text-field", "--corpus"]),
    "prepare": (["prepare", "--corpus", "{fix}/corpus.txt", "--tokenizer", "{fix}/tok", "--out", "{case}/d",
                 "--quiet"], ["--val-fraction", "--text-field", "--tokenizer", "--corpus"]),
    "pretrain": (["pretrain", "--config", "{fix}/recipe.yaml", "--out", "{case}/run", "--quiet"],
                 ["--max-steps", "--data", "--config"]),
    "finetune": (["finetune", "--model", "{fix}/run", "--data", "{fix}/labels.csv", "--out", "{case}/ft", "--quiet",
                  "--max-steps", "2", "--data.batch_size", "4"], ["--epochs", "--max-steps", "--task", "--model"]),
    "generate": (["generate", "--model", "{fix}/run", "--prompt", "KING:", "--max-new-tokens", "3", "--device", "cpu"],
                 ["--max-new-tokens", "--temperature", "--top-p", "--top-k", "--repetition-penalty", "--seed",
                  "--stop", "--prompt", "--device", "--dtype"]),
    "eval": (["eval", "--model", "{fix}/run", "--data", "{fix}/data", "--device", "cpu", "--quiet", "--json"],
             ["--batch-size", "--split", "--device", "--dtype", "--data"]),
    "classify": (["classify", "--model", "{fix}/run", "--text", "a fine play"], ["--batch-size", "--text", "--file"]),
    "embed": (["embed", "--model", "{fix}/run", "--text", "to be", "--out", "{case}/e.npy"],
              ["--batch-size", "--max-length", "--text", "--text-field"]),
    "search": (["search", "--model", "{fix}/run", "--corpus", "{fix}/passages.txt", "--query", "king"],
               ["--top-k", "--max-length", "--query", "--text-field"]),
    "convert": (["convert", "--in", "{fix}/run", "--out", "{case}/hf", "--to", "hf"], ["--to", "--dtype", "--in"]),
}


@dataclass
class Case:
    kind: str
    argv: list[str]
    files: dict[str, bytes] = field(default_factory=dict)  # written into the case folder first
    copy: str | None = None  # a fixture folder copied to {case}/m before `files` are written (and may corrupt it)
    truncate: dict[str, int] = field(default_factory=dict)  # {case}-relative file -> keep this many bytes
    delete: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "argv": self.argv, "files": {k: v[:200].decode("latin1") for k, v in
                self.files.items()}, "copy": self.copy, "truncate": self.truncate, "delete": self.delete}


def _with_safety(argv: list[str]) -> list[str]:
    if argv[0] not in ("pretrain", "finetune"):
        return argv
    fuzzed = set(argv)
    extra = [] if "--train.max_minutes" in fuzzed or "--train.max_steps" in fuzzed else SAFETY[:2]
    return argv + extra + ([] if "--train.device" in fuzzed else SAFETY[2:])


@st.composite
def cli_cases(draw: st.DrawFn) -> Case:
    """One verb, a few of its options set to random values, maybe config overrides and an unknown option."""
    verb = draw(st.sampled_from(sorted(VERBS)))
    base, options = VERBS[verb]
    argv = list(base)
    for opt in draw(st.lists(st.sampled_from(options), min_size=1, max_size=3, unique=True)):
        argv += [opt, draw(values())]
    if verb in ("pretrain", "finetune"):
        argv += draw(override_args(verb == "finetune"))
    if draw(st.integers(0, 9)) == 0:
        argv += [draw(st.sampled_from(["--bogus", "--train.lrr", "-x", "--", "extra"]))]
    return Case("cli", _with_safety(argv))


def _yaml_value() -> st.SearchStrategy[Any]:
    scalar = st.one_of(st.integers(-3, 5), st.sampled_from([0, -1, 2**63, 10**30]), st.floats(allow_nan=True),
                       st.booleans(), st.none(), st.text(max_size=6), st.sampled_from(["tiny", "llama", "val_acc"]))
    return st.one_of(scalar, st.lists(scalar, max_size=2), st.dictionaries(st.text(max_size=4), scalar, max_size=2))


@st.composite
def config_cases(draw: st.DrawFn) -> Case:
    """A random YAML recipe: the working one with random keys changed, added or misspelt, or random text."""
    keys = [k for k in config_keys() if not k.startswith("finetune.")]
    recipe = json.loads(json.dumps(RECIPE))
    for key in draw(st.lists(st.one_of(st.sampled_from(keys), st.sampled_from(keys).map(lambda k: k + "x")),
                             min_size=1, max_size=4)):
        sec, name = key.split(".", 1)
        if isinstance(recipe.get(sec), dict):
            recipe[sec][name] = draw(_yaml_value())
    if draw(st.integers(0, 5)) == 0:
        sec = draw(st.sampled_from(["model", "data", "train", "extra"]))
        recipe[sec] = draw(_yaml_value())
        if isinstance(recipe[sec], dict) and sec in RECIPE:  # keep the model small: a default GPT-2 is valid but slow
            recipe[sec] = {**RECIPE[sec], **recipe[sec]}
    try:
        body = yaml.safe_dump(recipe, allow_unicode=True).encode()
    except (yaml.YAMLError, ValueError):
        body = b"model: {"
    body = draw(st.one_of(st.just(body), st.just(body), st.binary(max_size=60),
                          st.just(b"- a\n- b\n"), st.just(b"model: [\n"), st.just(b"\xff\xfe\x00model:")))
    return Case("config", _with_safety(["pretrain", "--config", "{case}/r.yaml", "--out", "{case}/run", "--quiet"]),
                files={"r.yaml": body.replace(b"{fix}", b"FIXROOT")})


def jsonl_rows() -> st.SearchStrategy[bytes]:
    """JSONL with objects missing keys or holding the wrong types, non-objects, broken and deeply nested JSON."""
    value = st.one_of(st.text(max_size=12), st.integers(), st.none(), st.lists(st.integers(), max_size=2))
    item = st.one_of(st.dictionaries(st.sampled_from(["text", "label", "body"]), value, max_size=3).map(json.dumps),
                     st.sampled_from(['[1, 2]', '"text"', "3", "null", "{", "[" * 5000, '{"text": "ok"}']))
    return st.lists(item, max_size=12).map(lambda rows: "\n".join(rows).encode())


@st.composite
def data_files(draw: st.DrawFn) -> tuple[str, bytes]:
    """(suffix, content) of a hostile data file."""
    suffix = draw(st.sampled_from([".txt", ".jsonl", ".csv", ".tsv", ".md", ".bin"]))
    good = b"text,label\n" + b"".join(b"line %d of the play,%s\n" % (i, b"ab"[i % 2:i % 2 + 1]) for i in range(30))
    content = draw(st.one_of(
        st.binary(max_size=300),
        st.just(b""), st.just(b"\n \n"),
        st.just(b"caf\xe9 au lait\n" * 5), st.just(b"\xef\xbb\xbf" + good),
        st.just(b"x" * 2_100_000),  # one huge line, no line break
        st.just(b"text,label\n" + b"y" * 200_000 + b",a\n"),
        st.just(b"a,b\n1,2\n"), st.just(b"text\nonly text\n"), st.just(good.replace(b",a\n", b",\n")),
        st.just(good), st.just(b'text,label\n"unterminated,a\n'), st.just(b"text,label\nnul\x00byte,a\n"),
        jsonl_rows(),
    ))
    return suffix, content


DATA_VERBS = [
    ["prepare", "--corpus", "{case}/in{sfx}", "--tokenizer", "{fix}/tok", "--out", "{case}/d", "--quiet"],
    ["prepare", "--corpus", "{case}/dir", "--tokenizer", "{fix}/tok", "--out", "{case}/d", "--quiet"],
    ["tokenizer", "train", "--corpus", "{case}/in{sfx}", "--kind", "char", "--out", "{case}/t"],
    ["tokenizer", "train", "--corpus", "{case}/in{sfx}", "--vocab-size", "270", "--out", "{case}/t"],
    ["classify", "--model", "{fix}/run", "--file", "{case}/in{sfx}"],
    ["embed", "--model", "{fix}/run", "--file", "{case}/in{sfx}"],
    ["search", "--model", "{fix}/run", "--corpus", "{case}/in{sfx}", "--query", "king"],
    ["finetune", "--model", "{fix}/run", "--data", "{case}/in{sfx}", "--out", "{case}/ft", "--quiet", "--max-steps",
     "1", "--data.batch_size", "4"],
]


@st.composite
def data_cases(draw: st.DrawFn) -> Case:
    suffix, content = draw(data_files())
    argv = [a.replace("{sfx}", suffix) for a in draw(st.sampled_from(DATA_VERBS))]
    name = "dir/in" + suffix if "{case}/dir" in argv else "in" + suffix
    return Case("data", _with_safety(argv), files={name: content})


MODEL_USERS = {
    "model": [["generate", "--model", "{case}/m", "--prompt", "KING:", "--max-new-tokens", "2", "--device", "cpu"],
              ["eval", "--model", "{case}/m", "--data", "{fix}/data", "--device", "cpu", "--quiet"],
              ["convert", "--in", "{case}/m", "--out", "{case}/o", "--to", "hf"],
              ["convert", "--in", "{case}/m", "--out", "{case}/o", "--to", "llmkit"],
              ["embed", "--model", "{case}/m", "--text", "to be"],
              ["classify", "--model", "{case}/m", "--text", "to be"]],
    "data": [["eval", "--model", "{fix}/run", "--data", "{case}/m", "--device", "cpu", "--quiet"],
             ["pretrain", "--config", "{fix}/recipe.yaml", "--data", "{case}/m", "--out", "{case}/r", "--quiet"]],
}
MODEL_FILES = {"run": ["config.yaml", "model.safetensors", "tokenizer/tokenizer.json",
                       "tokenizer/tokenizer_config.json"],
               "hf": ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"],
               "data": ["meta.json", "train.bin", "val.bin", "tokenizer/tokenizer.json"]}


def _garbage() -> st.SearchStrategy[bytes]:
    return st.one_of(st.binary(max_size=64), st.just(b"{"), st.just(b"[]"), st.just(b"{}"), st.just(b"\xff\xfe"),
                     st.just(b"model: 3\n"), st.just(b'{"model_type": "gpt2", "n_embd": -1}'),
                     st.just(b"model:\n  n_embd: 7\n"), st.just(b'{"dtype": "uint16", "vocab_size": 0}'))


@st.composite
def model_cases(draw: st.DrawFn) -> Case:
    """A copy of a working model (run folder or HF folder) or shard folder with one file truncated, deleted,
    replaced by garbage, or holding weights of the wrong shape; then a verb that loads it."""
    which = draw(st.sampled_from(sorted(MODEL_FILES)))
    argv = list(draw(st.sampled_from(MODEL_USERS["data" if which == "data" else "model"])))
    target = "m/" + draw(st.sampled_from(MODEL_FILES[which]))
    case = Case("model", _with_safety(argv), copy=which)
    how = draw(st.sampled_from(["truncate", "delete", "garbage", "shapes"]))
    if how == "truncate":
        case.truncate[target] = draw(st.integers(0, 4096))
    elif how == "delete":
        case.delete.append(target)
    elif how == "garbage":
        case.files[target] = draw(_garbage())
    else:
        case.files["m/model.safetensors"] = _wrong_shapes(draw(st.integers(0, 3)))
    return case


def _wrong_shapes(seed: int) -> bytes:
    """A safetensors file whose tensors have the names of a tiny gpt2 but other shapes (or a name missing)."""
    import torch
    from safetensors.torch import save

    torch.manual_seed(seed)
    tensors = {"transformer.wte.weight": torch.randn(300 + seed, 16), "transformer.wpe.weight": torch.randn(32, 8),
               "transformer.h.0.ln_1.weight": torch.randn(16 + seed)}
    return save(tensors)


def all_cases() -> st.SearchStrategy[Case]:
    return st.one_of(cli_cases(), config_cases(), data_cases(), model_cases())


# ------------------------------------------------------------------------------------------- running


class CaseTimeout(BaseException):
    """Raised by SIGALRM inside a hung case (a BaseException, so no `except Exception` swallows it)."""


@dataclass
class Outcome:
    code: int | None
    stderr: str
    traceback: str = ""
    hung: bool = False
    changed: list[str] = field(default_factory=list)
    seconds: float = 0.0


def materialise(case: Case, fix: Path, case_dir: Path) -> list[str]:
    """Write the case's files into its folder; returns the argv with placeholders filled in."""
    case_dir.mkdir(parents=True, exist_ok=True)
    if case.copy:
        shutil.copytree(fix / case.copy, case_dir / "m")
    for name, content in case.files.items():
        (case_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (case_dir / name).write_bytes(content.replace(b"FIXROOT", str(fix).encode()))
    for name, n in case.truncate.items():
        with open(case_dir / name, "r+b") as f:
            f.truncate(n)
    for name in case.delete:
        (case_dir / name).unlink()
    return [a.replace("{fix}", str(fix)).replace("{case}", str(case_dir)) for a in case.argv]


def run_in_process(case: Case, fix: Path, case_dir: Path, timeout: int = 60) -> Outcome:
    """Run one case through `llmkit.cli.main.main` with cwd = the case folder and stdout/stderr captured."""
    import torch

    from llmkit.cli.main import main

    argv = materialise(case, fix, case_dir)
    err, out = io.StringIO(), io.StringIO()
    old_cwd, threads, env = os.getcwd(), torch.get_num_threads(), os.environ.get("LLMKIT_HOME")
    os.environ["LLMKIT_HOME"] = str(case_dir / "home")  # a built-in model's conversion cache stays in the case

    def on_alarm(*_: Any) -> None:
        raise CaseTimeout

    previous = signal.signal(signal.SIGALRM, on_alarm)
    outcome = Outcome(None, "")
    t0 = time.perf_counter()
    try:
        os.chdir(case_dir)
        signal.alarm(timeout)
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            try:
                outcome.code = main(argv)
            except SystemExit as e:  # argparse's usage errors (2) and --help (0)
                outcome.code = e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    except CaseTimeout:
        outcome.hung = True
    except BaseException:  # noqa: BLE001 - the judge records any escape as a traceback
        outcome.traceback = traceback.format_exc()
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
        os.chdir(old_cwd)
        torch.set_num_threads(threads)
        if env is None:
            os.environ.pop("LLMKIT_HOME", None)
        else:
            os.environ["LLMKIT_HOME"] = env
    outcome.seconds = time.perf_counter() - t0
    outcome.stderr = err.getvalue()
    return outcome


def run_subprocess(case: Case, fix: Path, case_dir: Path, timeout: int = 120) -> Outcome:
    """The same case as a real process: `python -m llmkit.cli.main ...`, its real exit status and stderr."""
    argv = materialise(case, fix, case_dir)
    env = {**os.environ, "LLMKIT_HOME": str(case_dir / "home")}
    t0 = time.perf_counter()
    try:
        p = subprocess.run([sys.executable, "-m", "llmkit.cli.main", *argv], cwd=case_dir, env=env,
                           capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return Outcome(None, "", hung=True, seconds=time.perf_counter() - t0)
    tb = p.stderr if "Traceback (most recent call last)" in p.stderr else ""
    return Outcome(p.returncode, p.stderr, traceback=tb, seconds=time.perf_counter() - t0)


def problems(outcome: Outcome) -> list[str]:
    """What is wrong with an outcome (empty when the promise held)."""
    found = []
    if outcome.hung:
        found.append("hang")
    if outcome.traceback or "Traceback (most recent call last)" in outcome.stderr:
        found.append("traceback:\n" + (outcome.traceback or outcome.stderr)[-3000:])
    if not outcome.hung and not outcome.traceback and outcome.code not in (0, 2):
        found.append(f"exit status {outcome.code}")
    error_lines = [line for line in outcome.stderr.splitlines() if "error:" in line]
    if outcome.code == 2 and len(error_lines) != 1:
        found.append(f"{len(error_lines)} error: lines in\n{outcome.stderr[-2000:]}")
    if outcome.changed:
        found.append(f"changed outside the case folder: {outcome.changed}")
    return found


def judge(case: Case, fix: Path, case_dir: Path, subprocess_run: bool = False, timeout: int = 60) -> Outcome:
    """Run a case and compare the fixtures before and after."""
    before = snapshot(fix)
    outcome = (run_subprocess if subprocess_run else run_in_process)(case, fix, case_dir, timeout)
    after = snapshot(fix)
    outcome.changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    return outcome
