"""The device check ``benchmarks/gpu_check.sh`` keeps working where CI can run it: its preflight refuses in one line
within seconds, and its ``--dry-run`` (every step on the CPU: gloo, fp32, tiny sizes) passes.

The GPU run itself never runs in CI; the dry run runs the same steps, script and launcher, so that a lent GPU's
minutes are not spent finding a broken path in the script.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

from tests.multiprocess import run_command

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"
PREPARED_UPSTREAM = REPO / ".gpu_check" / "upstream" / "arcface_torch"
SHARED_UPSTREAM = REPO.parent / "shared" / "upstream" / "arcface_torch"
STEPS = ("prepare", "sampling", "heads", "throughput", "resume", "bad_record")


def check_environment(tmp_path: Path, **extra: str) -> dict[str, str]:
    """This interpreter runs the check (a bare ``python3`` on PATH may lack torch), writing only under tmp_path."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("GPU_CHECK_") and key != "OUT"}
    env.update(GPU_CHECK_PYTHON=sys.executable, OUT=str(tmp_path / "out"), GPU_CHECK_WORK=str(tmp_path / "work"))
    env.update(extra)
    return env


def test_preflight_refuses_in_one_line_naming_what_is_missing_and_how_to_prepare_it(tmp_path: Path) -> None:
    missing = tmp_path / "not_prepared"
    env = check_environment(tmp_path, GPU_CHECK_DIR=str(missing), GPU_CHECK_UPSTREAM=str(missing / "upstream"))
    started = time.monotonic()
    result = run_command(["bash", str(SCRIPT)], cwd=REPO, timeout=60, env=env, check=False)
    seconds = time.monotonic() - started
    output = (result.stdout + result.stderr).strip().splitlines()
    assert result.returncode == 1
    assert len(output) == 1, output
    assert output[0].startswith("gpu_check: cannot run: missing ")
    assert str(missing / "upstream") in output[0] and "bash benchmarks/gpu_check.sh --prepare" in output[0]
    assert seconds < 10  # nothing is imported before a missing folder is refused
    assert not (tmp_path / "out").exists() and not (tmp_path / "work").exists()


def test_dry_run_passes_every_step_and_writes_the_json_and_the_log(tmp_path: Path) -> None:
    if not PREPARED_UPSTREAM.is_dir() and not SHARED_UPSTREAM.is_dir():
        pytest.skip(
            f"no upstream arcface_torch: neither {PREPARED_UPSTREAM} (bash benchmarks/gpu_check.sh --prepare) "
            f"nor {SHARED_UPSTREAM} (../shared beside the repository)"
        )
    result = run_command(["bash", str(SCRIPT), "--dry-run"], cwd=REPO, timeout=400, env=check_environment(tmp_path))
    out = tmp_path / "out"
    report = json.loads((out / "gpu_check.json").read_text())
    log = (out / "gpu_check.log").read_text()
    assert report["passed"] and list(report["steps"]) == list(STEPS)
    assert all(report["steps"][name]["passed"] for name in STEPS), report["steps"]
    for name in STEPS:
        assert f"gpu_check: PASS {name}: " in result.stdout and f"gpu_check: PASS {name}: " in log
    # What each step measured is in the JSON: (a) both medians and their ratio, (c) both heads, (d) the resume,
    # (e) the one line.
    throughput = report["steps"]["throughput"]
    assert throughput["medians"]["arcface"] > 0 and throughput["ratio_md_over_arcface"] > 0
    assert {row["kind"] for row in report["steps"]["heads"]["rows"]} == {"arcface", "md"}
    resume = report["steps"]["resume"]
    assert resume["resumed_first_step"] == resume["checkpoint_step"] + 1 and resume["final_step"] == resume["planned"]
    assert "data/bad/train.rec" in report["steps"]["bad_record"]["error_lines"][0]
    assert len(list(out.rglob("*"))) <= 8  # what the device tool brings back
