"""Property-based fuzzing of the CLI's promise: whatever the arguments, config, data files or model folders, the
exit status is 0 (valid input) or 2 with exactly one `error:` line; never a traceback or a hang, and no file
outside the case's own folder changes. Generators and judge: tests/fuzz_cases.py (bench/fuzz.py runs 1,000+)."""

from __future__ import annotations

import itertools
import shutil

import pytest
from hypothesis import HealthCheck, given, settings

from fuzz_cases import Case, build_fixtures, cli_cases, config_cases, data_cases, judge, model_cases, problems

pytestmark = pytest.mark.slow
FUZZ = settings(max_examples=15, deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large])
_counter = itertools.count()


@pytest.fixture(scope="module")
def fix(tmp_path_factory):
    return build_fixtures(tmp_path_factory.mktemp("fuzz-fixtures"))


@pytest.fixture(scope="module")
def cases_root(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz-cases")


def check(case: Case, fix, cases_root) -> None:
    outcome = judge(case, fix, cases_root / f"c{next(_counter)}", timeout=60)
    found = problems(outcome)
    assert not found, f"{case.to_json()}\n" + "\n".join(found)


@FUZZ
@given(case=cli_cases())
def test_cli_arguments(fix, cases_root, case):
    check(case, fix, cases_root)


@FUZZ
@given(case=config_cases())
def test_yaml_recipes(fix, cases_root, case):
    check(case, fix, cases_root)


@FUZZ
@given(case=data_cases())
def test_data_files(fix, cases_root, case):
    check(case, fix, cases_root)


@FUZZ
@given(case=model_cases())
def test_model_folders(fix, cases_root, case):
    check(case, fix, cases_root)


def test_the_judge_sees_tracebacks_and_changes(fix, cases_root, monkeypatch):
    """The fuzz tests can fail: an escaping exception, a second error line and a changed fixture are all caught."""
    import llmkit.cli.data

    def boom(args):
        raise ValueError("a bug")

    monkeypatch.setattr(llmkit.cli.data, "cmd_prepare", boom)
    case = Case("cli", ["prepare", "--corpus", "x", "--tokenizer", "y", "--out", "{case}/d"])
    assert any(p.startswith("traceback") for p in problems(judge(case, fix, cases_root / "judge1")))
    writes_fixture = Case("cli", ["tokenizer", "train", "--corpus", "{fix}/corpus.txt", "--kind", "char", "--out",
                                  "{fix}/extra-tok"])
    try:
        assert any(p.startswith("changed outside") for p in problems(judge(writes_fixture, fix, cases_root / "j2")))
    finally:
        shutil.rmtree(fix / "extra-tok", ignore_errors=True)
