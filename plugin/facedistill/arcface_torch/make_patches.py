"""Regenerate facedistill's patch set from an upstream arcface_torch tree and an edited copy of it (maintainers).

``facedistill arcface-torch make-patches UPSTREAM EDITED patches/arcface_torch [FILE...]`` writes all of it: one
unified diff per file (for people, ``git apply`` and GNU ``patch``), the whole files that ``patching`` writes
(``upstream.json`` for revert, ``patched.json`` for apply) and ``manifest.json`` with their sha256. Without FILE
arguments it takes every file of UPSTREAM that EDITED changes (files only in EDITED, such as recipes installed into
``configs/``, are not upstream files and are left out).

The manifest also keeps, per file, the sha256 of every earlier release's patched file (``earlier_patched_sha256``), so
that ``patch`` upgrades a checkout an earlier facedistill patched: a regeneration that changes a file's patched text
adds the previous one to its list. ``fill_earlier_from_git`` builds the lists once from the repository's history.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import subprocess
import tempfile
from collections.abc import Iterable
from pathlib import Path

from facedistill.arcface_torch.patching import (
    EARLIER_KEY,
    MANIFEST_NAME,
    PATCHED_TEXTS_NAME,
    SHA256,
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
    hold other files); its earlier patched sha256s are carried forward (``carried_earlier``). Returns the set as
    ``patching`` loads it back."""
    upstream_root, patched_root, out = Path(upstream_dir), Path(patched_dir), Path(out_dir)
    rels = sorted({check_relative_path(rel) for rel in files or ()}) or changed_files(upstream_root, patched_root)
    if not rels:
        raise PatchError(f"make_patch_set: no files given, and {patched_root} changes no file of {upstream_root}")
    previous = _previous_manifest(out)
    entries: dict[str, dict] = {}
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
        if earlier := carried_earlier(previous, rel, commit, entries[rel]):
            entries[rel][EARLIER_KEY] = earlier
    out.mkdir(parents=True, exist_ok=True)
    stale = _previous_diffs(previous) - set(diffs)
    for name, diff in diffs.items():
        (out / name).write_bytes(diff)
    for name, by_path in texts.items():
        text = {"upstream": UPSTREAM_NAME, "commit": commit, "files": by_path}
        (out / name).write_text(json.dumps(text, indent=1) + "\n", encoding="utf-8")
    _write_manifest(out, commit, entries)
    for name in stale:
        (out / name).unlink(missing_ok=True)
    return PatchSet.load(out)


def _write_manifest(out: Path, commit: str, entries: dict[str, dict]) -> None:
    manifest = {"upstream": UPSTREAM_NAME, "commit": commit, "files": entries}
    (out / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


def _previous_manifest(out: Path) -> dict:
    """The manifest already in ``out`` (``{}`` when there is none or it is unreadable)."""
    try:
        manifest = json.loads((out / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    ok = isinstance(manifest, dict) and isinstance(manifest.get("files"), dict)
    return manifest if ok and all(isinstance(entry, dict) for entry in manifest["files"].values()) else {}


def _previous_diffs(previous: dict) -> set[str]:
    diffs = (entry.get("diff") for entry in previous.get("files", {}).values())
    return {name for name in diffs if isinstance(name, str) and "/" not in name and name.endswith(".diff")}


def carried_earlier(previous: dict, rel: str, commit: str, entry: dict[str, str]) -> list[str]:
    """The earlier patched sha256s of ``rel`` for a new manifest ``entry``, oldest first: the previous manifest's list
    and, when the patched file changes, its previous patched sha256. A set pinned to another upstream commit, or to
    another upstream text of the file, starts afresh (a checkout of another upstream is refused anyway)."""
    old = previous.get("files", {}).get(rel)
    if previous.get("commit") != commit or not old or old.get("upstream_sha256") != entry["upstream_sha256"]:
        return []
    listed = old.get(EARLIER_KEY)
    hashes = [*(listed if isinstance(listed, list) else []), old.get("patched_sha256")]
    return [h for h in dict.fromkeys(map(str, hashes)) if re.fullmatch(SHA256, h) and h != entry["patched_sha256"]]


def earlier_from_git(
    upstream_dir: str | os.PathLike[str],
    repo: str | os.PathLike[str] = ".",
    patch_dir: str = "patches/arcface_torch",
    commit: str = UPSTREAM_COMMIT,
) -> dict[str, list[str]]:
    """Per file, oldest first, the sha256 of the patched file of every commit of ``repo`` that changed ``patch_dir``
    and is pinned to upstream ``commit``: the file of ``upstream_dir`` with that commit's diff applied (``git apply``),
    checked against that commit's manifest."""

    def git(*args: str, cwd: str | os.PathLike[str] = repo, data: bytes | None = None) -> bytes:
        return subprocess.run(["git", *args], cwd=cwd, input=data, capture_output=True, check=True).stdout

    def apply_diff(tmp: str, diff: bytes) -> None:  # as GNU patch would, outside any repository (the ceiling)
        env = {**os.environ, "GIT_CEILING_DIRECTORIES": str(Path(tmp).resolve().parent)}
        subprocess.run(["git", "apply", "-p1"], cwd=tmp, input=diff, capture_output=True, check=True, env=env)

    found: dict[str, list[str]] = {}
    for rev in git("log", "--reverse", "--format=%H", "--", patch_dir).decode().split():
        try:
            manifest = json.loads(git("show", f"{rev}:{patch_dir}/{MANIFEST_NAME}"))
        except subprocess.CalledProcessError:  # a commit that removed the set
            continue
        if manifest.get("commit") != commit:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            for rel, entry in manifest["files"].items():
                copy = Path(tmp, check_relative_path(rel))
                copy.parent.mkdir(parents=True, exist_ok=True)
                copy.write_bytes(Path(upstream_dir, rel).read_bytes())
                apply_diff(tmp, git("show", f"{rev}:{patch_dir}/{entry['diff']}"))
                if (patched := sha256_bytes(copy.read_bytes())) != entry["patched_sha256"]:
                    raise PatchError(f"{rel}: {rev[:8]}'s diff applied to {upstream_dir} is not its manifest's")
                found.setdefault(rel, []).append(patched)
    return {rel: list(dict.fromkeys(hashes)) for rel, hashes in found.items()}


def fill_earlier_from_git(
    upstream_dir: str | os.PathLike[str], repo: str | os.PathLike[str] = ".", patch_dir: str = "patches/arcface_torch"
) -> PatchSet:
    """Maintainers, once: add every patched file of the git history (``earlier_from_git``) to the earlier patched
    sha256s of ``repo``/``patch_dir``'s manifest, leaving the rest of the set as it is."""
    out = Path(repo, patch_dir)
    if not (manifest := _previous_manifest(out)):
        raise PatchError(f"no readable {MANIFEST_NAME} in {out}")
    history = earlier_from_git(upstream_dir, repo, patch_dir, manifest["commit"])
    for rel, entry in manifest["files"].items():
        hashes = dict.fromkeys([*history.get(rel, []), *entry.get(EARLIER_KEY, [])])
        hashes.pop(entry["patched_sha256"], None)
        hashes.pop(entry["upstream_sha256"], None)
        entry.pop(EARLIER_KEY, None)
        if hashes:
            entry[EARLIER_KEY] = list(hashes)
    _write_manifest(out, manifest["commit"], manifest["files"])
    return PatchSet.load(out)
