"""Regenerate facedistill's patch set from an upstream arcface_torch tree and an edited copy of it (maintainers).

``facedistill arcface-torch make-patches UPSTREAM EDITED patches/arcface_torch [FILE...]`` writes all of it: one
unified diff per file (for people, ``git apply`` and GNU ``patch``), the whole files that ``patching`` writes
(``upstream.json`` for revert, ``patched.json`` for apply) and ``manifest.json`` with their sha256. Without FILE
arguments it takes every file of UPSTREAM that EDITED changes (files only in EDITED, such as recipes installed into
``configs/``, are not upstream files and are left out).
"""

from __future__ import annotations

import difflib
import json
import os
from collections.abc import Iterable
from pathlib import Path

from facedistill.arcface_torch.patching import (
    MANIFEST_NAME,
    PATCHED_TEXTS_NAME,
    UPSTREAM_COMMIT,
    UPSTREAM_NAME,
    UPSTREAM_TEXTS_NAME,
    PatchError,
    PatchSet,
    check_relative_path,
    read_file,
    sha256_bytes,
    split_lines,
)

NO_NEWLINE_MARKER = b"\\ No newline at end of file"
CONTEXT_LINES = 3


def unified_diff(path: str, old: bytes, new: bytes, context: int = CONTEXT_LINES) -> bytes:
    """A unified diff of one file as ``diff -u``/``git diff`` write it, byte-exact (CRLF, missing final newline).

    ``difflib.unified_diff`` cannot be used directly: it has no ``\\ No newline at end of file`` marker, so a file
    whose last line lacks a newline would produce a diff that ``patch`` and ``git apply`` refuse or misapply.
    """
    old_lines, new_lines = split_lines(old), split_lines(new)
    out = [f"--- a/{path}\n".encode(), f"+++ b/{path}\n".encode()]
    matcher = difflib.SequenceMatcher(None, old_lines, new_lines, autojunk=False)
    for group in matcher.get_grouped_opcodes(context):
        first, last = group[0], group[-1]
        old_range = _format_range(first[1], last[2])
        new_range = _format_range(first[3], last[4])
        out.append(f"@@ -{old_range} +{new_range} @@\n".encode())
        for tag, i1, i2, j1, j2 in group:
            if tag == "equal":
                out += _diff_lines(b" ", old_lines[i1:i2])
                continue
            if tag in ("replace", "delete"):
                out += _diff_lines(b"-", old_lines[i1:i2])
            if tag in ("replace", "insert"):
                out += _diff_lines(b"+", new_lines[j1:j2])
    return b"".join(out)


def _format_range(start: int, stop: int) -> str:
    # Same convention as diff/difflib: "start,count" 1-based; count 1 omitted; an empty range names the line before.
    length = stop - start
    if length == 1:
        return f"{start + 1}"
    if length == 0:
        return f"{start},0"
    return f"{start + 1},{length}"


def _diff_lines(prefix: bytes, lines: list[bytes]) -> list[bytes]:
    out = []
    for line in lines:
        if line.endswith(b"\n"):
            out.append(prefix + line)
        else:
            out.append(prefix + line + b"\n" + NO_NEWLINE_MARKER + b"\n")
    return out


def diff_name_for(path: str) -> str:
    """The diff of an upstream path, ``/`` as ``__`` (``utils/utils_config.py`` -> ``utils__utils_config.py.diff``),
    so the patch folder stays flat and ships as plain package data."""
    return check_relative_path(path).replace("/", "__") + ".diff"


def changed_files(upstream_dir: str | os.PathLike[str], edited_dir: str | os.PathLike[str]) -> list[str]:
    """Every file of the upstream tree whose bytes differ in the edited tree (``__pycache__`` and dot-files aside)."""
    upstream_root, edited_root = Path(upstream_dir), Path(edited_dir)
    changed = []
    for path in sorted(upstream_root.rglob("*")):
        rel = path.relative_to(upstream_root).as_posix()
        if not path.is_file() or any(part.startswith(".") or part == "__pycache__" for part in rel.split("/")):
            continue
        new = read_file(edited_root, rel)
        if new is None:
            raise PatchError(f"{rel}: not in the edited tree {edited_root} (deleting files is not supported)")
        if new != path.read_bytes():
            changed.append(rel)
    return changed


def make_patch_set(
    upstream_dir: str | os.PathLike[str],
    patched_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    files: Iterable[str] | None = None,
    commit: str = UPSTREAM_COMMIT,
) -> PatchSet:
    """Write one ``.diff`` per file, ``upstream.json``, ``patched.json`` and ``manifest.json`` into ``out_dir`` from an
    upstream tree and an edited copy; ``files`` empty or None: every upstream file the copy changes.

    Diffs named by an older manifest in ``out_dir`` but no longer listed are removed (only those: ``out_dir`` may
    hold other files). Returns the set as ``patching`` loads it back."""
    upstream_root, patched_root, out = Path(upstream_dir), Path(patched_dir), Path(out_dir)
    rels = sorted({check_relative_path(rel) for rel in files or ()}) or changed_files(upstream_root, patched_root)
    if not rels:
        raise PatchError(f"make_patch_set: no files given, and {patched_root} changes no file of {upstream_root}")
    entries: dict[str, dict[str, str]] = {}
    diffs: dict[str, bytes] = {}
    texts: dict[str, dict[str, str]] = {UPSTREAM_TEXTS_NAME: {}, PATCHED_TEXTS_NAME: {}}
    for rel in rels:
        old, new = read_file(upstream_root, rel), read_file(patched_root, rel)
        if old is None:
            raise PatchError(f"{rel}: not in the upstream tree {upstream_root} (only edits of existing files)")
        if new is None:
            raise PatchError(f"{rel}: not in the patched tree {patched_root} (deleting files is not supported)")
        if old == new:
            raise PatchError(f"{rel}: identical in {upstream_root} and {patched_root}; drop it from the file list")
        name = diff_name_for(rel)
        if name in diffs:
            raise PatchError(f"{rel} and another file would both be written to {name}")
        diffs[name] = unified_diff(rel, old, new)
        # The texts as JSON strings: UTF-8, any other byte a lone surrogate (written as its "\\udcXX" escape).
        texts[UPSTREAM_TEXTS_NAME][rel] = old.decode("utf-8", "surrogateescape")
        texts[PATCHED_TEXTS_NAME][rel] = new.decode("utf-8", "surrogateescape")
        entries[rel] = {"upstream_sha256": sha256_bytes(old), "patched_sha256": sha256_bytes(new), "diff": name}
    out.mkdir(parents=True, exist_ok=True)
    stale = _previous_diffs(out) - set(diffs)
    for name, diff in diffs.items():
        (out / name).write_bytes(diff)
    for name, by_path in texts.items():
        text = {"upstream": UPSTREAM_NAME, "commit": commit, "files": by_path}
        (out / name).write_text(json.dumps(text, indent=1) + "\n", encoding="utf-8")
    manifest = {"upstream": UPSTREAM_NAME, "commit": commit, "files": entries}
    (out / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    for name in stale:
        (out / name).unlink(missing_ok=True)
    return PatchSet.load(out)


def _previous_diffs(out: Path) -> set[str]:
    try:
        manifest = json.loads((out / MANIFEST_NAME).read_text(encoding="utf-8"))
        return {
            entry["diff"]
            for entry in manifest["files"].values()
            if isinstance(entry.get("diff"), str) and "/" not in entry["diff"] and entry["diff"].endswith(".diff")
        }
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return set()
