"""Run the test suite as `make test` does: one pytest process per test file, `--jobs` at a time.

One process a file because twice, after ~450 tests in one process, XLA:CPU (jaxlib 0.10.2)
segfaulted while compiling (SmolLM2's forward once, a sharded program once); every file passes in
its own process. Two at a time because a test process keeps about 1.32 of 2 CPU cores busy (XLA
compiles mostly on one thread; the tiny models' programs run mostly on one): on a 2-core Zen 3 the
suite took 27.7 minutes instead of 41.6, with the same CPU time (README, "CPUs without AVX-512").
The processes share `.test-cache/` (see conftest.py), built under a file lock.

Files start longest first, by the times the last run on this checkout recorded in
`.test-cache/file-times.json`, else by `FIRST` below; each file's pytest output is printed whole
when it ends. Exit status 1 if any file failed, naming them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from hsd_jax.io.files import write_json

TESTS = Path(__file__).resolve().parent
TIMES = TESTS.parent / ".test-cache" / "file-times.json"

# The files of 100 s or more on a 2-core Zen 3, longest first (docs/make-test-one-at-a-time-zen3.txt):
# the order used when no earlier run has recorded its times here (a clean clone, as in CI).
FIRST = ["test_exactness.py", "test_sharding.py", "test_hsd.py", "test_cpu_kernel.py", "test_reliability.py",
         "test_distill.py", "test_dtypes.py", "test_cli.py", "test_stream.py", "test_device_check.py",
         "test_smollm2.py", "test_schedule.py", "test_accelerator_drafts.py"]


def _order(files: list[Path]) -> list[Path]:
    try:
        times = json.loads(TIMES.read_text())
    except (OSError, ValueError):
        times = {}
    if times:
        return sorted(files, key=lambda f: -float(times.get(f.name, 0.0)))
    rank = {name: i for i, name in enumerate(FIRST)}
    return sorted(files, key=lambda f: (rank.get(f.name, len(FIRST)), f.name))


def _name(path: Path) -> str:
    return str(path.relative_to(TESTS.parent)) if path.is_relative_to(TESTS.parent) else str(path)


def _run(path: Path) -> tuple[Path, int, float, str]:
    start = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(path)],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=TESTS.parent)
    return path, run.returncode, time.perf_counter() - start, run.stdout


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=int(os.environ.get("HSD_TEST_JOBS", "2")),
                        help="test files run at once (default: $HSD_TEST_JOBS or 2)")
    parser.add_argument("files", nargs="*", type=Path, help="test files (default: tests/test_*.py)")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}")
    files = [f.resolve() for f in args.files] or sorted(TESTS.glob("test_*.py"))
    start = time.perf_counter()
    failed, times = [], {}
    with ThreadPoolExecutor(args.jobs) as pool:
        for future in as_completed([pool.submit(_run, f) for f in _order(files)]):
            path, code, seconds, output = future.result()
            times[path.name] = round(seconds, 1)
            verdict = "passed" if code == 0 else f"FAILED (exit {code})"
            print(f"== {_name(path)}: {verdict} in {seconds:.0f} s\n{output}", flush=True)
            if code != 0:
                failed.append(_name(path))
    if not args.files:
        write_json(TIMES, dict(sorted(times.items())), indent=1)
    minutes = (time.perf_counter() - start) / 60
    if failed:
        print(f"FAILED ({minutes:.1f} min): {' '.join(sorted(failed))}")
        return 1
    print(f"all {len(files)} test files passed in {minutes:.1f} min ({args.jobs} at a time)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
