"""tests/run_suite.py, what `make test` runs: every file in its own process; a failed, crashed,
empty or hung file fails the run and is named; the output of each file whole; longest first."""

from __future__ import annotations

from pathlib import Path

import pytest
import run_suite


def _write(path: Path, body: str) -> Path:
    path.write_text(body)
    return path.resolve()


def test_failed_crashed_and_empty_files_fail_the_run_and_are_named(tmp_path, capsys):
    passing = _write(tmp_path / "test_passing.py", "def test_ok():\n    assert 1 + 1 == 2\n")
    failing = _write(tmp_path / "test_failing.py", "def test_bad():\n    assert 1 + 1 == 3, 'arithmetic'\n")
    crashing = _write(tmp_path / "test_crashing.py",  # killed as a segfault would be (SIGKILL: no core file)
                      "import os, signal\n\ndef test_killed():\n    os.kill(os.getpid(), signal.SIGKILL)\n")
    empty = _write(tmp_path / "test_empty.py", "")
    assert run_suite.main(["--jobs", "2", *map(str, (passing, failing, crashing, empty))]) == 1
    out = capsys.readouterr().out
    assert f"{passing}: passed" in out and f"{failing}: FAILED (exit 1)" in out
    assert f"{crashing}: FAILED (exit -9)" in out
    assert f"{empty}: FAILED (exit 5)" in out  # pytest: no tests collected
    assert "AssertionError: arithmetic" in out  # the failing file's own report, printed whole
    assert out.count(" started\n") == 4
    last = out.rstrip().splitlines()[-1]
    assert last.startswith("FAILED (") and last.endswith(": " + " ".join(sorted(map(str, (
        failing, crashing, empty))))), last


def test_a_hung_file_is_killed_and_fails(tmp_path, capsys):
    hung = _write(tmp_path / "test_hung.py", "import time\n\ndef test_sleep():\n    print('before')\n"
                  "    time.sleep(600)\n")
    assert run_suite.main(["--jobs", "1", "--file-timeout", "5", str(hung)]) == 1
    assert f"{hung}: FAILED (exit 124)" in capsys.readouterr().out


def test_every_passing_file_passes_the_run(tmp_path, capsys):
    files = [_write(tmp_path / f"test_ok{i}.py", f"def test_ok():\n    assert {i} == {i}\n")
             for i in range(3)]
    assert run_suite.main(["--jobs", "1", *map(str, files)]) == 0
    assert "all 3 test files passed" in capsys.readouterr().out


def test_longest_first_and_files_without_a_time_before_them():
    files = [Path(f"/t/{name}") for name in ("test_a.py", "test_b.py", "test_c.py", "test_new.py")]
    times = {"test_a.py": 10.0, "test_b.py": 300.0, "test_c.py": 50.0}
    order = run_suite._order(files, times)
    assert [f.name for f in order] == ["test_new.py", "test_b.py", "test_c.py", "test_a.py"]
    unrecorded = [Path(f"/t/{name}") for name in ("test_zz.py", "test_hsd.py", "test_exactness.py")]
    order = run_suite._order(unrecorded, {})  # nothing recorded: FIRST's order, then the others
    assert [f.name for f in order] == ["test_exactness.py", "test_hsd.py", "test_zz.py"]


def test_a_bad_job_count_is_refused(monkeypatch, capsys):
    monkeypatch.setenv("HSD_TEST_JOBS", "two")
    with pytest.raises(SystemExit) as exit_info:
        run_suite.main([])
    assert exit_info.value.code == 2
    assert "must be a whole number of at least 1, got 'two'" in capsys.readouterr().err
