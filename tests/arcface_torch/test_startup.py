"""What a CPU start of the patched ``train_v2.py`` prints (issue 41, item 6): no warning that is not about the
user's config, one line saying what a distillation run distils, a true word on ``fp16`` without CUDA; and the
plugin's other messages: ``facedistill eval RUN_DIR`` and the patch refusal of a locally edited file."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import torch

from tests.arcface_torch.helpers import copy_upstream, facedistill, run, torchrun
from tests.arcface_torch.test_refusals import _child_lines, _variant
from tests.arcface_torch.test_train_v2 import losses

# Python's warnings ("file:line: FutureWarning: ..."), c10's ("[W1207 ...] ..."), facedistill's ("warning: ...").
WARNING = re.compile(r"\b\w*Warning: |^\[W\d*|^warning: ", re.IGNORECASE)
ONE_EPOCH = "config.num_epoch = 1\nconfig.verbose = 1000\n"


def _warnings(stderr: str) -> list[str]:
    return [line for line in _child_lines(stderr) if WARNING.search(line)]


def _forget_bytecode(root: Path) -> None:
    """Compile-time warnings (a SyntaxWarning) show only when a module is compiled: start from source, as a fresh
    checkout does."""
    for folder in list(root.rglob("__pycache__")):
        shutil.rmtree(folder, ignore_errors=True)


def test_a_cpu_start_prints_no_warning_and_fp16_there_trains_exactly_as_fp32(patched_checkout: Path) -> None:
    root = patched_checkout
    _forget_bytecode(root)
    plain = _variant(root, "tiny_quiet", "tiny", ONE_EPOCH)
    result = run(torchrun(2, "train_v2.py", plain), cwd=root)
    assert _warnings(result.stderr) == [], result.stderr[-4000:]
    assert "Required: -0" not in result.stdout, result.stdout[-2000:]

    half = _variant(root, "tiny_quiet_fp16", "tiny", ONE_EPOCH + "config.fp16 = True\n")
    result = run(torchrun(2, "train_v2.py", half), cwd=root)
    warnings = _warnings(result.stderr)
    assert len(warnings) == 1 and warnings[0].startswith("warning: config.fp16 = True"), result.stderr[-4000:]
    assert "float32" in warnings[0] and "emulat" not in warnings[0], warnings[0]
    # What the warning says: without CUDA, autocast and the grad scaler are off, so the run is fp32's, bit for bit.
    expected = losses(root / "work_dirs" / "tiny_quiet" / "training.log")
    assert expected and losses(root / "work_dirs" / "tiny_quiet_fp16" / "training.log") == expected


def test_a_distillation_start_says_in_one_line_what_it_distils(patched_checkout: Path) -> None:
    root = patched_checkout
    recipe = _variant(root, "tiny_md_quiet", "tiny_md", ONE_EPOCH)
    result = run(torchrun(2, "train_v2.py", recipe), cwd=root)
    assert _warnings(result.stderr) == [], result.stderr[-4000:]
    said = [line for line in (result.stdout + result.stderr).splitlines() if "facedistill: " in line]
    assert len(said) == 1, result.stdout[-3000:]
    line = said[0]
    for needle in ("margin_distillation", "preset facedistill", "mean", "data/tiny/teacher_cache", "sface"):
        assert needle in line, line


def test_eval_of_a_run_directory_finds_its_model(patched_checkout: Path, tmp_path: Path) -> None:
    root = patched_checkout
    run_dir = root / "work_dirs" / "tiny_eval_dir"
    run_dir.mkdir(parents=True, exist_ok=True)
    pairs = str(root / "data" / "tiny" / "tinylfw.bin")
    empty = run(facedistill("eval", str(run_dir), "--pairs", pairs), cwd=root, check=False)
    assert empty.returncode == 2, empty.stderr[-2000:]
    errors = [line for line in empty.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: "), empty.stderr[-2000:]
    for name in ("model.pt", "last.pt", "best.pt"):
        assert name in errors[0], errors[0]
    assert "Is a directory" not in errors[0]

    from facedistill.models import create_model

    torch.save(create_model("mbf", embedding_size=128).state_dict(), run_dir / "model.pt")
    found = run(facedistill("eval", str(run_dir), "--pairs", pairs), cwd=root)
    assert "accuracy" in found.stdout.lower() and str(run_dir / "model.pt") in found.stdout + found.stderr


def _description_line(text: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), 1) if "Distributed Arcface Training" in line)


def test_the_patch_refusal_of_a_locally_edited_file_shows_the_first_line_that_differs(
    upstream: Path, tmp_path: Path
) -> None:
    # An upstream checkout with a local edit that no hunk covers: every hunk still matches.
    root = copy_upstream(tmp_path / "edited")
    train = root / "train_v2.py"
    number = _description_line(train.read_text())
    train.write_text(train.read_text().replace("Distributed Arcface Training in Pytorch", "my training"))
    result = run(facedistill("arcface-torch", "patch", str(root)), cwd=tmp_path, check=False)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: "), result.stderr
    line = errors[0]
    assert f"line {number} is" in line and "my training" in line, line
    assert "Distributed Arcface Training in Pytorch" in line, line
    assert re.search(r"\. Patches are pinned", line), line  # two sentences, not one run-on

    # A patched checkout with the same edit: the line is shown against the patched file, for --revert.
    patched = copy_upstream(tmp_path / "patched")
    run(facedistill("arcface-torch", "patch", str(patched)), cwd=tmp_path)
    train = patched / "train_v2.py"
    number = _description_line(train.read_text())
    train.write_text(train.read_text().replace("Distributed Arcface Training in Pytorch", "my training"))
    result = run(facedistill("arcface-torch", "patch", str(patched), "--revert"), cwd=tmp_path, check=False)
    line = [line for line in result.stderr.splitlines() if line.strip()][-1]
    assert f"line {number} is" in line and "my training" in line and "Distributed Arcface" in line, line
    # "nothing was changed" holds for the recipes too: the refused revert leaves every installed one in configs/.
    assert "nothing was changed" in line, line
    from facedistill.arcface_torch.shipped import shipped_recipes

    assert all((patched / "configs" / name).is_file() for name in shipped_recipes()), sorted(
        path.name for path in (patched / "configs").iterdir()
    )
    # Patching again says the recipes are there instead of "installed 0".
    train.write_text(train.read_text().replace("my training", "Distributed Arcface Training in Pytorch"))
    again = run(facedistill("arcface-torch", "patch", str(patched)), cwd=tmp_path)
    assert "facedistill's recipes are already in configs/" in again.stdout, again.stdout
