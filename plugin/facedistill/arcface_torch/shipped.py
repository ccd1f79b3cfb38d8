"""facedistill's arcface_torch recipes (the repository's ``recipes/*.py``), and their installation into a
checkout's ``configs/`` so that ``train_v2.py configs/NAME`` finds them exactly like the framework's own."""

from __future__ import annotations

import shutil
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path


def shipped_recipes() -> dict[str, Traversable]:
    """The easydict recipes shipped with facedistill, by file name."""
    folder = resources.files("facedistill.arcface_torch.recipes")
    return {
        entry.name: entry for entry in folder.iterdir() if entry.name.endswith(".py") and not entry.name.startswith("_")
    }


def install_recipes(root: Path) -> tuple[list[str], list[str]]:
    """Copy every shipped recipe into ``root/configs``; a file of the same name with other content is the user's
    and is kept. Returns (names written, names kept)."""
    configs = Path(root) / "configs"
    if not configs.is_dir():
        raise FileNotFoundError(f"{root} has no configs/ folder; is it an arcface_torch checkout?")
    written, kept = [], []
    for name, source in sorted(shipped_recipes().items()):
        data = source.read_bytes()
        target = configs / name
        if target.exists():
            if target.read_bytes() != data:
                kept.append(name)
            continue
        with resources.as_file(source) as path:
            shutil.copyfile(path, target)
        written.append(name)
    return written, kept


def remove_recipes(root: Path) -> list[str]:
    """Delete the installed recipes that are still byte-identical to facedistill's; the user's edits stay."""
    removed = []
    for name, source in sorted(shipped_recipes().items()):
        target = Path(root) / "configs" / name
        if target.is_file() and target.read_bytes() == source.read_bytes():
            target.unlink()
            removed.append(name)
    return removed
