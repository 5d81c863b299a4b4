"""Fuzz the CLI's promise at scale: random arguments, YAML recipes, data files and corrupted model folders.

Every case runs in-process (`llmkit.cli.main.main`, with a SIGALRM timeout) and a sample of them again as a
real `python -m llmkit.cli.main` subprocess, to prove the real exit status and stderr. The generators and the
judge are tests/fuzz_cases.py, the same ones tests/test_fuzz.py uses. Prints one JSON object: cases, by kind,
exit-status counts, tracebacks, hangs, files changed outside the case folder (all three must be 0), wall time;
failing cases go to --failures (JSON lines) with their argv and traceback.

    python bench/fuzz.py [--cases 1000] [--subprocess 50] [--seed 0] [--timeout 60] [--failures fuzz-failures.jsonl]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from hypothesis import HealthCheck, Phase, given, seed, settings  # noqa: E402

from fuzz_cases import Case, Outcome, all_cases, build_fixtures, judge, problems  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=1000, help="in-process cases")
    ap.add_argument("--subprocess", type=int, default=50, help="of those, how many to run again as subprocesses")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=int, default=60, help="seconds per case before it counts as a hang")
    ap.add_argument("--memory-gb", type=float, default=8.0, help="address-space limit of this process (safety)")
    ap.add_argument("--failures", default="fuzz-failures.jsonl", help="where failing cases are written")
    args = ap.parse_args()
    limit = int(args.memory_gb * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))  # a runaway allocation fails here, not the machine

    import torch

    torch.set_num_threads(1)
    # Native code under test (the tokenizers trainer's progress output) writes to file descriptor 1 itself, past
    # Python's redirection: keep fd 1 for the one JSON line this script prints.
    real_stdout = os.dup(1)
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
    t0 = time.perf_counter()
    root = Path(tempfile.mkdtemp(prefix="llmkit-fuzz-"))
    fix = build_fixtures(root / "fixtures")
    cases: list[Case] = []

    @settings(max_examples=args.cases, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @seed(args.seed)
    @given(case=all_cases())
    def collect(case: Case) -> None:
        cases.append(case)

    collect()
    by_kind: collections.Counter[str] = collections.Counter()
    statuses: collections.Counter[str] = collections.Counter()
    tracebacks = hangs = changed = 0
    failures = []

    def tally(outcome: Outcome, case: Case, mode: str) -> None:
        """Count one judged run: traceback, hang, files changed outside its folder; keep it if it failed."""
        nonlocal tracebacks, hangs, changed
        found = problems(outcome)
        tracebacks += any(p.startswith("traceback") for p in found)
        hangs += outcome.hung
        changed += bool(outcome.changed)
        if found:
            failures.append({"mode": mode, **case.to_json(), "problems": found})

    in_process_codes = []
    for i, case in enumerate(cases):
        outcome = judge(case, fix, root / "cases" / f"c{i}", timeout=args.timeout)
        by_kind[case.kind] += 1
        statuses[str(outcome.code)] += 1
        in_process_codes.append(outcome.code)
        tally(outcome, case, "in-process")
    step = max(1, len(cases) // max(1, args.subprocess))
    sample = list(range(0, len(cases), step))[: args.subprocess]
    sub_status: collections.Counter[str] = collections.Counter()
    agree = 0
    for i in sample:  # the same case again as a real process: its exit status must be the in-process one
        outcome = judge(cases[i], fix, root / "sub" / f"c{i}", subprocess_run=True, timeout=2 * args.timeout)
        sub_status[str(outcome.code)] += 1
        agree += outcome.code == in_process_codes[i]
        tally(outcome, cases[i], "subprocess")
    sys.stdout.flush()
    os.dup2(real_stdout, 1)
    if failures:
        Path(args.failures).write_text("".join(json.dumps(f) + "\n" for f in failures))
    print(json.dumps({
        "cases": len(cases), "by_kind": dict(sorted(by_kind.items())),
        "exit_status": dict(sorted(statuses.items())),
        "subprocess_cases": len(sample), "subprocess_exit_status": dict(sorted(sub_status.items())),
        "subprocess_same_status_as_in_process": agree,
        "tracebacks": tracebacks, "hangs": hangs, "changed_outside_case_folder": changed,
        "failures_file": args.failures if failures else None, "wall_s": round(time.perf_counter() - t0, 1),
    }))
    import shutil

    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
