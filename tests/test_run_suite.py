"""tests/run_suite.py, what `make test` runs: every file in its own process, a failed file named and
the exit status 1, the output of each file whole."""

from __future__ import annotations

import run_suite


def test_a_failing_file_is_named_and_fails_the_run(tmp_path, capsys):
    passing = tmp_path / "test_passing.py"
    passing.write_text("def test_ok():\n    assert 1 + 1 == 2\n")
    failing = tmp_path / "test_failing.py"
    failing.write_text("def test_bad():\n    assert 1 + 1 == 3, 'arithmetic'\n")
    assert run_suite.main(["--jobs", "2", str(passing), str(failing)]) == 1
    out = capsys.readouterr().out
    assert "test_passing.py: passed" in out and "test_failing.py: FAILED (exit 1)" in out
    assert "AssertionError: arithmetic" in out  # the failing file's own report, printed whole
    last = out.rstrip().splitlines()[-1]
    assert last.startswith("FAILED (") and last.endswith(f": {failing}"), last


def test_every_passing_file_passes_the_run(tmp_path, capsys):
    files = []
    for i in range(3):
        files.append(tmp_path / f"test_ok{i}.py")
        files[-1].write_text(f"def test_ok():\n    assert {i} == {i}\n")
    assert run_suite.main(["--jobs", "1", *map(str, files)]) == 0
    assert "all 3 test files passed" in capsys.readouterr().out
