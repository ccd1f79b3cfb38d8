"""Regenerate facedistill's patch set from an upstream arcface_torch tree and an edited copy of it (maintainers).

``facedistill arcface-torch make-patches UPSTREAM EDITED patches/arcface_torch FILE...`` writes one unified diff per
file, the manifest of hashes that ``facedistill.arcface_torch.patching`` applies and reverts by, and ``upstream.json``
(the pinned upstream text of each file, from which a refusal shows the first line a local edit changed).
"""

from __future__ import annotations

import difflib
import json
import os
from collections.abc import Iterable
from pathlib import Path

from facedistill.arcface_torch.patching import (
    MANIFEST_NAME,
    NO_NEWLINE_MARKER,
    UPSTREAM_COMMIT,
    UPSTREAM_NAME,
    UPSTREAM_TEXTS_NAME,
    FilePatch,
    PatchError,
    PatchSet,
    check_relative_path,
    diff_name_for,
    parse_diff,
    read_file,
    sha256_bytes,
    split_lines,
    texts_str,
)

CONTEXT_LINES = 3


def unified_diff(path: str, old: bytes, new: bytes, context: int = CONTEXT_LINES) -> bytes:
    """A unified diff of one file as ``diff -u``/``git diff`` write it, byte-exact (CRLF, missing final newline).

    ``difflib.unified_diff`` cannot be used directly: it has no ``\\ No newline at end of file`` marker, so a file
    whose last line lacks a newline would produce a diff no tool (including ours) can apply.
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


def make_patch_set(
    upstream_dir: str | os.PathLike[str],
    patched_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    files: Iterable[str],
    commit: str = UPSTREAM_COMMIT,
) -> PatchSet:
    """Write one ``.diff`` per file plus ``manifest.json`` and ``upstream.json`` into ``out_dir`` from an upstream tree
    and an edited copy.

    Each diff is parsed back and applied to the upstream bytes before anything is written, so a set that does not
    reproduce the edited copy byte-for-byte is never produced. Diffs named by an older manifest in ``out_dir`` but
    no longer listed are removed (only those: ``out_dir`` may hold other files). Returns the set as loaded back.
    """
    upstream_root, patched_root, out = Path(upstream_dir), Path(patched_dir), Path(out_dir)
    rels = [check_relative_path(rel) for rel in files]
    if not rels:
        raise PatchError("make_patch_set: no files given")
    names: dict[str, str] = {}
    entries: dict[str, dict[str, str]] = {}
    diffs: dict[str, bytes] = {}
    originals: dict[str, str] = {}
    for rel in sorted(set(rels)):
        old = read_file(upstream_root, rel)
        new = read_file(patched_root, rel)
        if old is None:
            raise PatchError(f"{rel}: not in the upstream tree {upstream_root} (only edits of existing files)")
        if new is None:
            raise PatchError(f"{rel}: not in the patched tree {patched_root} (deleting files is not supported)")
        if old == new:
            raise PatchError(f"{rel}: identical in {upstream_root} and {patched_root}; drop it from the file list")
        name = diff_name_for(rel)
        if name in names:
            raise PatchError(f"{rel} and {names[name]} would both be written to {name}")
        names[name] = rel
        diff = unified_diff(rel, old, new)
        check = FilePatch(rel, sha256_bytes(old), sha256_bytes(new), name, parse_diff(diff, rel, source=name))
        if check.patch_bytes(old) != new or check.unpatch_bytes(new) != old:
            raise PatchError(f"{rel}: the generated diff does not reproduce the file (a bug in the generator)")
        diffs[name] = diff
        originals[rel] = texts_str(old)
        entries[rel] = {"upstream_sha256": check.upstream_sha256, "patched_sha256": check.patched_sha256, "diff": name}
    out.mkdir(parents=True, exist_ok=True)
    stale = _previous_diffs(out) - set(diffs)
    for name, diff in diffs.items():
        (out / name).write_bytes(diff)
    manifest = {"upstream": UPSTREAM_NAME, "commit": commit, "files": entries}
    (out / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    texts = {"upstream": UPSTREAM_NAME, "commit": commit, "files": originals}
    # ASCII JSON: a byte that is not UTF-8 is written as its lone-surrogate escape and read back as the same byte.
    (out / UPSTREAM_TEXTS_NAME).write_text(json.dumps(texts, indent=1) + "\n", encoding="utf-8")
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
