"""scripts/device_check.py --smoke runs end to end on this CPU and writes the JSON the README describes."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_device_check_smoke(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("XLA_FLAGS", None)  # the check sees the machine as it is, not the 8 fake test devices
    command = [sys.executable, str(ROOT / "scripts" / "device_check.py"), "--smoke", "--out", str(tmp_path),
               "--budget-s", "900"]  # a loaded CI machine must not skip sections
    proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "device_check.json").read_text())
    assert (tmp_path / "device_check.log").read_text().strip()
    assert result["smoke"] is True and result["ok"] is True and not result["errors"], result["errors"]
    sections = result["sections"]
    expected = {"devices", "identity", "pytest", "c_k", "overhead", "throughput"}
    assert set(sections) == expected, result["skipped"]
    assert sections["devices"]["device_count"] >= 1 and sections["devices"]["backend"]
    assert sections["identity"]["all_identical"] is True
    assert sections["pytest"]["ran"] is False or sections["pytest"]["passed"] is True
    for shape in sections["c_k"].values():
        assert set(shape["ms"]) == {"batch_1", "batch_2"}
        assert all(v > 0 for v in shape["ms"]["batch_1"].values())
    overhead = sections["overhead"]
    # a difference of two timings: its sign is noise on a busy machine, its presence is the check
    assert math.isfinite(overhead["while_loop_iteration_us"]) and len(overhead["hsd_rounds"]) == 1
    for batch in ("batch_2",):
        assert set(sections["throughput"][batch]) == {"ar", "hsd"}
        assert sections["throughput"][batch]["ar"]["tokens_per_s"] > 0
