"""Run the test suite as `make test` does: one pytest process per test file, `--jobs` at a time.

One process a file because twice, after ~450 tests in one process, XLA:CPU (jaxlib 0.10.2)
segfaulted while compiling (SmolLM2's forward once, a sharded program once); every file passes in
its own process. Two at a time because a test process keeps about 1.3 of 2 CPU cores busy (XLA
compiles mostly on one thread; the tiny models' programs run mostly on one), so two at a time
take about two thirds of the wall time on 2 cores (README, "CPUs without AVX-512"). The processes
share `.test-cache/` (see conftest.py), built under a file lock.

Files start longest first, by the times earlier passing runs on this checkout recorded in
`.test-cache/file-times.json` (files without one first), else in `FIRST`'s order. A line names each
file as it starts; its pytest output is printed whole when it ends. A file still running after
`--file-timeout` seconds is killed and fails. Exit status 1 if any file failed (naming them), 130
on Ctrl-C (the files not started are not run).
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

ROOT = Path(__file__).resolve().parents[1]
TIMES = ROOT / ".test-cache" / "file-times.json"

# The files of 100 s or more on a 2-core Zen 3, longest first (docs/make-test-one-at-a-time-zen3.txt):
# the order used when no earlier run has recorded its times here (a clean clone, as in CI).
FIRST = ["test_exactness.py", "test_sharding.py", "test_hsd.py", "test_cpu_kernel.py", "test_reliability.py",
         "test_distill.py", "test_dtypes.py", "test_cli.py", "test_stream.py", "test_device_check.py",
         "test_smollm2.py", "test_schedule.py", "test_accelerator_drafts.py"]


def _recorded_times() -> dict[str, float]:
    """The times file, or nothing if it is missing or torn (it is rewritten whole, not atomically:
    a torn file only costs the order)."""
    try:
        times = json.loads(TIMES.read_text())
        return {str(name): float(seconds) for name, seconds in times.items()}
    except (OSError, ValueError, AttributeError, TypeError):
        return {}


def _order(files: list[Path], times: dict[str, float]) -> list[Path]:
    if times:
        return sorted(files, key=lambda f: (-times.get(f.name, float("inf")), f.name))
    rank = {name: i for i, name in enumerate(FIRST)}
    return sorted(files, key=lambda f: (rank.get(f.name, len(FIRST)), f.name))


def _name(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def _run(path: Path, timeout_s: float) -> tuple[Path, int, float, str]:
    """(file, pytest's exit status or 124 on timeout, seconds, output)."""
    sys.stdout.write(f"-- {_name(path)} started\n")
    sys.stdout.flush()
    start = time.perf_counter()
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(path)]
    try:
        run = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             errors="replace", cwd=ROOT, timeout=timeout_s)
        code, output = run.returncode, run.stdout
    except subprocess.TimeoutExpired as e:
        partial = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        code, output = 124, f"{partial}\nkilled after {timeout_s:.0f} s (--file-timeout)\n"
    return path, code, time.perf_counter() - start, output


def _jobs(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, got {text!r}")
    return int(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=_jobs, default=os.environ.get("HSD_TEST_JOBS") or "2",
                        help="test files run at once (default: $HSD_TEST_JOBS, else 2)")
    parser.add_argument("--file-timeout", type=float, default=1800.0,
                        help="seconds before a file's process is killed and the file fails (default 1800)")
    parser.add_argument("files", nargs="*", type=Path, help="test files (default: tests/test_*.py)")
    args = parser.parse_args(argv)
    files = [f.resolve() for f in args.files] or sorted((ROOT / "tests").glob("test_*.py"))
    recorded = _recorded_times()
    start = time.perf_counter()
    failed, passed_times = [], {}
    pool = ThreadPoolExecutor(args.jobs)
    try:
        futures = [pool.submit(_run, f, args.file_timeout) for f in _order(files, recorded)]
        for future in as_completed(futures):
            path, code, seconds, output = future.result()
            verdict = "passed" if code == 0 else f"FAILED (exit {code})"
            print(f"== {_name(path)}: {verdict} in {seconds:.0f} s\n{output}", flush=True)
            if code == 0:
                passed_times[path.name] = round(seconds, 1)
            else:
                failed.append(_name(path))
    except KeyboardInterrupt:
        print("interrupted: the files not yet started were not run", file=sys.stderr)
        return 130
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    if not args.files:
        TIMES.parent.mkdir(exist_ok=True)
        TIMES.write_text(json.dumps(dict(sorted({**recorded, **passed_times}.items())), indent=1) + "\n")
    minutes = (time.perf_counter() - start) / 60
    if failed:
        print(f"FAILED ({minutes:.1f} min): {' '.join(sorted(failed))}")
        return 1
    print(f"all {len(files)} test files passed in {minutes:.1f} min ({args.jobs} at a time)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
