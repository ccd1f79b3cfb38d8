"""Apply and revert facedistill's patches to upstream arcface_torch, byte-exactly and all-or-nothing.

facedistill ships one unified diff per upstream file it changes (``patches/arcface_torch/<path, '/' as '__'>.diff``)
plus ``manifest.json`` with the sha256 of every file before and after patching. The hashes, not the hunks, decide
what happens: a file is patched only when it is byte-identical to upstream arcface_torch at the pinned commit, and
reverted only when it is byte-identical to the patched version. That is stricter than ``patch``/``git apply`` on
purpose: a fuzzy apply onto a different upstream revision would produce a training script nobody has tested, and a
silently half-patched checkout is worse than an error. The hunks are still parsed and checked, because when a file
is refused the first hunk that does not match (and the line that differs) is what tells the user *why*. A file
whose hunks all match but that has other local edits is compared line by line with the pinned upstream file
(``upstream.json``, shipped beside the diffs, or the patched file rebuilt from it) to show the first line that differs.

Every operation reads every file first and writes nothing unless all of them can be handled; writes are atomic
(temporary file + ``os.replace``, keeping the file mode) and verified against the manifest's hash afterwards, with
the originals restored if anything goes wrong. Files are handled as bytes, so CRLF line endings and a missing
newline at end of file survive a patch/revert round trip unchanged.

Maintainers regenerate the patch set from an edited copy of upstream with ``facedistill arcface-torch
make-patches`` (``facedistill.arcface_torch.make_patches``).
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import importlib.resources
import json
import os
import re
import stat
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path, PurePosixPath

try:
    from importlib.resources.abc import Traversable
except ImportError:  # Python 3.10 has it only in importlib.abc
    from importlib.abc import Traversable

UPSTREAM_NAME = "insightface recognition/arcface_torch"
UPSTREAM_COMMIT = "0159b24d44cbc91abbd07b7a6fab0ba923a7fddf"
MANIFEST_NAME = "manifest.json"
# The pinned upstream text of every patched file: a diff only holds the lines around its hunks, so without it a local
# edit elsewhere in the file could be detected (by its hash) but not shown.
UPSTREAM_TEXTS_NAME = "upstream.json"
NO_NEWLINE_MARKER = b"\\ No newline at end of file"
# The file whose presence identifies an arcface_torch folder (it is the script the patches exist for).
MARKER_FILE = "train_v2.py"
# Inside an insightface checkout, arcface_torch lives here.
INSIGHTFACE_SUBDIR = ("recognition", "arcface_torch")

_HUNK_HEADER = re.compile(rb"^@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
# Header lines of unified/git diffs that describe something other than an in-place edit of one existing file.
_UNSUPPORTED_HEADERS = (
    (b"new file mode", "creates a new file"),
    (b"deleted file mode", "deletes a file"),
    (b"rename from", "renames a file"),
    (b"rename to", "renames a file"),
    (b"copy from", "copies a file"),
    (b"copy to", "copies a file"),
    (b"old mode", "changes a file mode"),
    (b"new mode", "changes a file mode"),
    (b"Binary files", "is a binary diff"),
    (b"GIT binary patch", "is a binary diff"),
)


class PatchError(ValueError):
    """A patch set that cannot be loaded or generated, or a checkout it refuses to touch; nothing was written.

    ``problems`` holds one line per offending file (each naming the file and, where one applies, the hunk), so a
    caller can show all of them at once rather than making the user fix one file per run.
    """

    def __init__(self, message: str, problems: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.problems: tuple[str, ...] = tuple(problems)


class FileState(str, Enum):
    """Where one patched file of a checkout stands; a ``str`` so that it compares equal to its plain name."""

    UPSTREAM = "upstream"
    PATCHED = "patched"
    MODIFIED = "modified"
    MISSING = "missing"


@dataclass(frozen=True)
class Hunk:
    """One ``@@`` hunk: ``lines`` are ``(tag, line)`` with tag ``' '``, ``'-'`` or ``'+'`` and the line's own bytes.

    A line keeps its line ending (``\\n`` or ``\\r\\n``); the last line of a file without a final newline has none,
    which is how ``\\ No newline at end of file`` is represented. ``old_index``/``new_index`` are 0-based positions in
    the upstream and patched file where the hunk's lines start.
    """

    number: int
    header: str
    old_start: int
    old_count: int
    new_start: int
    new_count: int
    lines: tuple[tuple[str, bytes], ...]

    @property
    def old_lines(self) -> list[bytes]:
        """The hunk's lines as they are in the upstream file (context and removed lines)."""
        return [line for tag, line in self.lines if tag != "+"]

    @property
    def new_lines(self) -> list[bytes]:
        """The hunk's lines as they are in the patched file (context and added lines)."""
        return [line for tag, line in self.lines if tag != "-"]

    @property
    def old_index(self) -> int:
        """0-based start in the upstream file; an empty range is written as the line *before* it, as diff does."""
        return self.old_start - 1 if self.old_count else self.old_start

    @property
    def new_index(self) -> int:
        """0-based start in the patched file (same convention as ``old_index``)."""
        return self.new_start - 1 if self.new_count else self.new_start


@dataclass(frozen=True)
class FilePatch:
    """Everything the patch set knows about one upstream file: its diff, parsed, and both hashes."""

    path: str
    upstream_sha256: str
    patched_sha256: str
    diff: str
    hunks: tuple[Hunk, ...]
    # The pinned upstream file itself (``upstream.json``), when the patch set ships it; None otherwise.
    upstream_bytes: bytes | None = None

    def patch_bytes(self, data: bytes) -> bytes:
        """``data`` (upstream bytes) with the hunks applied; ``PatchError`` naming the first hunk that does not fit."""
        result = _apply_hunks(split_lines(data), self.hunks, reverse=False)
        if isinstance(result, _Mismatch):
            raise PatchError(f"{self.path}: {result.describe()}")
        return b"".join(result)

    def unpatch_bytes(self, data: bytes) -> bytes:
        """``data`` (patched bytes) with the hunks reverse-applied; ``PatchError`` naming the first misfit."""
        result = _apply_hunks(split_lines(data), self.hunks, reverse=True)
        if isinstance(result, _Mismatch):
            raise PatchError(f"{self.path}: {result.describe()}")
        return b"".join(result)


@dataclass(frozen=True)
class PatchSet:
    """A loaded patch set: which upstream commit it is pinned to and, per relative POSIX path, its ``FilePatch``."""

    directory: str
    upstream: str
    commit: str
    files: dict[str, FilePatch] = field(default_factory=dict)

    @classmethod
    def load(cls, directory: str | os.PathLike[str] | Traversable | None = None) -> PatchSet:
        """Read and validate ``manifest.json`` and every diff it names; ``None`` loads the set shipped with facedistill.

        Validation happens here, not at apply time, so a broken patch set is reported as such (naming the diff and
        line) instead of surfacing as a confusing refusal of the user's checkout.
        """
        base: Traversable = default_patch_dir() if directory is None else _as_traversable(directory)
        manifest_file = base.joinpath(MANIFEST_NAME)
        if not manifest_file.is_file():
            raise PatchError(f"no patch set at {base}: {MANIFEST_NAME} is missing")
        try:
            manifest = json.loads(manifest_file.read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise PatchError(f"{manifest_file}: not valid JSON ({exc})") from exc
        if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict) or not manifest["files"]:
            raise PatchError(f"{MANIFEST_NAME} in {base}: expected an object with a non-empty 'files' object")
        commit = manifest.get("commit")
        if not isinstance(commit, str) or not re.fullmatch(r"[0-9a-f]{7,40}", commit):
            raise PatchError(f"{MANIFEST_NAME} in {base}: 'commit' must be a git commit hash, got {commit!r}")
        upstream = manifest.get("upstream", UPSTREAM_NAME)
        files: dict[str, FilePatch] = {}
        for raw_path, entry in manifest["files"].items():
            path = check_relative_path(raw_path)
            if not isinstance(entry, dict):
                raise PatchError(f"{MANIFEST_NAME} in {base}: entry for {path} must be an object")
            for key in ("upstream_sha256", "patched_sha256"):
                if not isinstance(entry.get(key), str) or not _SHA256.match(entry[key]):
                    raise PatchError(f"{MANIFEST_NAME} in {base}: {path}: {key} must be 64 lowercase hex digits")
            diff_name = entry.get("diff")
            if not isinstance(diff_name, str) or "/" in diff_name or "\\" in diff_name or diff_name in ("", ".", ".."):
                raise PatchError(f"{MANIFEST_NAME} in {base}: {path}: 'diff' must be a file name in the patch folder")
            diff_file = base.joinpath(diff_name)
            if not diff_file.is_file():
                raise PatchError(f"patch set {base}: {diff_name} (the diff of {path}) is missing")
            hunks = parse_diff(diff_file.read_bytes(), path, source=diff_name)
            files[path] = FilePatch(path, entry["upstream_sha256"], entry["patched_sha256"], diff_name, hunks)
        texts = _load_upstream_texts(base, files)
        files = {path: dataclasses.replace(fp, upstream_bytes=texts.get(path)) for path, fp in files.items()}
        return cls(str(base), str(upstream), commit, files)

    @property
    def short_commit(self) -> str:
        """The pinned commit as people quote it (8 hex digits)."""
        return self.commit[:8]


def _load_upstream_texts(base: Traversable, files: dict[str, FilePatch]) -> dict[str, bytes]:
    """The pinned upstream bytes of each patched file from ``upstream.json`` (absent: none), each checked against
    the manifest's hash, so a refusal never shows a line of some other revision."""
    texts_file = base.joinpath(UPSTREAM_TEXTS_NAME)
    if not texts_file.is_file():
        return {}
    try:
        texts = json.loads(texts_file.read_bytes().decode("utf-8"))["files"]
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise PatchError(
            f"{texts_file}: not a facedistill {UPSTREAM_TEXTS_NAME} ({exc}); regenerate the patch set"
        ) from None
    out: dict[str, bytes] = {}
    for path, fp in files.items():
        if not isinstance(texts.get(path), str):
            continue
        data = texts_bytes(texts[path])
        if sha256_bytes(data) != fp.upstream_sha256:
            raise PatchError(
                f"{UPSTREAM_TEXTS_NAME} in {base}: {path} is not the upstream file of {MANIFEST_NAME} (another "
                "sha256); regenerate the patch set"
            )
        out[path] = data
    return out


def texts_str(data: bytes) -> str:
    """A file's bytes as ``upstream.json`` stores them: UTF-8, any other byte kept as a lone surrogate (which JSON
    writes as ``\\udcXX``), so every file round-trips byte for byte."""
    return data.decode("utf-8", "surrogateescape")


def texts_bytes(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


@dataclass(frozen=True)
class PatchReport:
    """What ``apply``/``revert`` did: per file ``"patched"``, ``"already patched"``, ``"reverted"`` or ``"already
    upstream"``."""

    root: Path
    action: str
    files: dict[str, str]

    @property
    def changed(self) -> list[str]:
        """The files that were written (the others already were in the requested state)."""
        return [path for path, outcome in self.files.items() if not outcome.startswith("already")]

    def __str__(self) -> str:
        lines = [f"{self.action} {self.root}: {len(self.changed)} of {len(self.files)} file(s) changed"]
        lines += [f"  {path}: {outcome}" for path, outcome in self.files.items()]
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------------- diffs, bytes


def split_lines(data: bytes) -> list[bytes]:
    """Split on ``\\n`` only, keeping it: ``\\r\\n`` stays inside the line, so CRLF files round-trip unchanged."""
    # Not bytes.splitlines: it also splits on a bare "\r", and diff tools only know "\n" as a line end.
    lines = data.split(b"\n")
    out = [line + b"\n" for line in lines[:-1]]
    if lines[-1]:
        out.append(lines[-1])
    return out


def sha256_bytes(data: bytes) -> str:
    """Hex sha256, the identity of a file's exact bytes in the manifest."""
    return hashlib.sha256(data).hexdigest()


def diff_name_for(path: str) -> str:
    """The diff file of an upstream path: ``/`` replaced by ``__`` (``utils/utils_config.py`` ->
    ``utils__utils_config.py.diff``), so the patch folder stays flat and ships as plain package data."""
    return check_relative_path(path).replace("/", "__") + ".diff"


def parse_diff(data: bytes, expected_path: str, source: str = "<diff>") -> tuple[Hunk, ...]:
    """Parse a one-file unified diff that modifies ``expected_path``; ``PatchError`` for anything else.

    Accepts what ``diff -u``, ``git diff`` and ``unified_diff`` write (``a/``/``b/`` prefixes, timestamps, ``diff
    --git``/``index`` lines, section names after ``@@``). Refuses new, deleted, renamed, binary and multi-file
    diffs, since the manifest's model is "these existing upstream files, edited in place".
    """
    lines = split_lines(data)
    i = _skip_file_header(lines, expected_path, source)
    hunks: list[Hunk] = []
    while i < len(lines):
        hunk, i = _parse_hunk(lines, i, len(hunks) + 1, source)
        _check_hunk_position(hunk, hunks, source)
        hunks.append(hunk)
    if not hunks:
        raise PatchError(f"{source}: the diff of {expected_path} has no hunks")
    return tuple(hunks)


def _skip_file_header(lines: list[bytes], expected_path: str, source: str) -> int:
    """The index of the first hunk header, after checking that the ``---``/``+++`` pair names ``expected_path``."""
    i = 0
    while i < len(lines) and not lines[i].startswith(b"--- "):
        for prefix, what in _UNSUPPORTED_HEADERS:
            if lines[i].startswith(prefix):
                raise PatchError(f"{source}: the diff {what}; only edits of existing upstream files are supported")
        i += 1
    if i + 1 >= len(lines) or not lines[i + 1].startswith(b"+++ "):
        raise PatchError(f"{source}: not a unified diff (no '--- a/{expected_path}' / '+++ b/{expected_path}' header)")
    old_path = _header_path(lines[i][4:], b"a/")
    new_path = _header_path(lines[i + 1][4:], b"b/")
    if old_path == "/dev/null":
        raise PatchError(f"{source}: the diff creates {new_path}; only edits of existing upstream files are supported")
    if new_path == "/dev/null":
        raise PatchError(f"{source}: the diff deletes {old_path}; only edits of existing upstream files are supported")
    if old_path != expected_path or new_path != expected_path:
        raise PatchError(
            f"{source}: the diff is for {old_path!r} -> {new_path!r}, but the manifest lists it for {expected_path!r}"
        )
    return i + 2


def _parse_hunk(lines: list[bytes], i: int, number: int, source: str) -> tuple[Hunk, int]:
    """Hunk ``number`` starting at ``lines[i]`` (its ``@@`` header) and the index after it."""
    match = _HUNK_HEADER.match(lines[i])
    if match is None:
        if lines[i].startswith(b"--- ") or lines[i].startswith(b"diff "):
            raise PatchError(f"{source}: the diff changes more than one file; write one diff per file")
        raise PatchError(f"{source}, line {i + 1}: expected a '@@' hunk header, found {_show(lines[i])}")
    header = lines[i].rstrip(b"\r\n").decode("utf-8", "replace")
    old_start, new_start = int(match[1]), int(match[3])
    old_count = 1 if match[2] is None else int(match[2])
    new_count = 1 if match[4] is None else int(match[4])
    i += 1
    body: list[tuple[str, bytes]] = []
    old_seen = new_seen = 0
    while old_seen < old_count or new_seen < new_count:
        if i >= len(lines):
            raise PatchError(f"{source}: hunk {number} ({header}) ends early: the diff is truncated")
        line = lines[i]
        tag, content = line[:1].decode("latin-1"), line[1:]
        if line in (b"\n", b"\r\n"):
            tag, content = " ", line  # context "blank line" whose leading space an editor stripped
        if tag not in (" ", "-", "+"):
            raise PatchError(f"{source}, line {i + 1}: hunk {number} ({header}) has fewer lines than its header says")
        body.append((tag, content))
        old_seen += tag != "+"
        new_seen += tag != "-"
        i += 1
        if i < len(lines) and lines[i].rstrip(b"\r\n") == NO_NEWLINE_MARKER:
            if not content.endswith(b"\n"):
                raise PatchError(f"{source}, line {i + 1}: misplaced '{NO_NEWLINE_MARKER.decode()}'")
            body[-1] = (tag, content[:-1])
            i += 1
    if old_seen != old_count or new_seen != new_count:
        raise PatchError(f"{source}: hunk {number} ({header}) has more lines than its header says")
    return Hunk(number, header, old_start, old_count, new_start, new_count, tuple(body)), i


def _check_hunk_position(hunk: Hunk, before: list[Hunk], source: str) -> None:
    """Hunks in file order, not overlapping, their ``+`` starts shifted by exactly what the earlier ones changed."""
    old_end = before[-1].old_index + before[-1].old_count if before else 0
    delta = sum(h.new_count - h.old_count for h in before)
    where = f"{source}: hunk {hunk.number} ({hunk.header})"
    if hunk.old_index < old_end:
        raise PatchError(f"{where} overlaps or precedes the hunk before it")
    if hunk.new_index != hunk.old_index + delta:
        raise PatchError(f"{where}: its '+' start does not match the lines added and removed by the hunks before it")
    if any(not line.endswith(b"\n") for line in hunk.old_lines[:-1] + hunk.new_lines[:-1]):
        raise PatchError(f"{where}: a line without newline must be the last line")


def _header_path(raw: bytes, prefix: bytes) -> str:
    # "a/train_v2.py\t2024-01-01 ..." -> "train_v2.py": diff -u appends a tab and a timestamp.
    name = raw.rstrip(b"\r\n").split(b"\t", 1)[0]
    if name != b"/dev/null" and name.startswith(prefix):
        name = name[len(prefix) :]
    return name.decode("utf-8", "replace")


def _show(line: bytes | None) -> str:
    """A line as it appears in messages: quoted, its newline dropped, a CR or tab visible."""
    if line is None:
        return "end of file"
    return repr(line.removesuffix(b"\n").decode("utf-8", "replace"))


@dataclass(frozen=True)
class _Mismatch:
    """Where a hunk does not fit: its 1-based file line, what the hunk expects there, and what the file has."""

    hunk: Hunk
    reverse: bool
    line_number: int
    expected: bytes
    found: bytes | None
    found_at: int | None  # 0-based position where the hunk's lines do occur, when they occur elsewhere

    def describe(self) -> str:
        side = ", reversed" if self.reverse else ""
        text = (
            f"hunk {self.hunk.number} ({self.hunk.header}{side}) does not apply: line {self.line_number} should be "
            f"{_show(self.expected)} but is {_show(self.found)}"
        )
        start = self.hunk.new_index if self.reverse else self.hunk.old_index
        if self.found_at is not None:
            offset = self.found_at - start
            text += (
                f" (the hunk's lines do occur at line {self.found_at + 1}, {offset:+d} lines away: "
                "lines were added or removed above it)"
            )
        return text


def _apply_hunks(lines: list[bytes], hunks: Sequence[Hunk], reverse: bool) -> list[bytes] | _Mismatch:
    """Apply hunks at exactly their stated positions (no fuzz, no offset); the first misfit instead of a result."""
    out: list[bytes] = []
    pos = 0
    for hunk in hunks:
        start = hunk.new_index if reverse else hunk.old_index
        before, after = (hunk.new_lines, hunk.old_lines) if reverse else (hunk.old_lines, hunk.new_lines)
        for k, expected in enumerate(before):
            found = lines[start + k] if start + k < len(lines) else None
            if found != expected:
                return _Mismatch(hunk, reverse, start + k + 1, expected, found, _find_elsewhere(lines, before, start))
        out.extend(lines[pos:start])
        out.extend(after)
        pos = start + len(before)
    out.extend(lines[pos:])
    return out


def _find_elsewhere(lines: list[bytes], block: list[bytes], start: int) -> int | None:
    """The position nearest ``start`` where ``block`` occurs, if any: a hint that lines were inserted above."""
    if not block:
        return None
    hits = [i for i in range(len(lines) - len(block) + 1) if lines[i : i + len(block)] == block and i != start]
    return min(hits, key=lambda i: abs(i - start)) if hits else None


# ------------------------------------------------------------------------------------------------ the checkout


def default_patch_dir() -> Traversable:
    """The patch set shipped inside the package (``patches/arcface_torch`` of the repository)."""
    return importlib.resources.files("facedistill.arcface_torch.patches") / "arcface_torch"


def resolve_root(root: str | os.PathLike[str]) -> Path:
    """The arcface_torch folder for ``root``: the folder itself, or ``recognition/arcface_torch`` of an insightface
    checkout, so users can pass whichever they have at hand."""
    path = Path(root).expanduser()
    if (path / MARKER_FILE).is_file():
        return path
    nested = path.joinpath(*INSIGHTFACE_SUBDIR)
    if (nested / MARKER_FILE).is_file():
        return nested
    if not path.is_dir():
        raise PatchError(f"{path} is not a directory; PATH must be an arcface_torch folder (containing {MARKER_FILE})")
    raise PatchError(
        f"{path} is not an arcface_torch folder: there is no {MARKER_FILE} in it nor in {'/'.join(INSIGHTFACE_SUBDIR)}/"
        f"; PATH must be insightface's recognition/arcface_torch folder (or the insightface repository root)"
    )


def _file_in_root(root: Path, rel: str) -> Path:
    return root.joinpath(*PurePosixPath(rel).parts)


def read_file(root: Path, rel: str) -> bytes | None:
    path = _file_in_root(root, rel)
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None
    except IsADirectoryError as exc:
        raise PatchError(f"{rel}: {path} is a directory, not a file") from exc


def status(root: str | os.PathLike[str], patch_set: PatchSet | None = None) -> dict[str, FileState]:
    """Per patched file: ``upstream``, ``patched``, ``modified`` (neither; refused by apply and revert) or
    ``missing``. Reads only."""
    patch_set = patch_set or PatchSet.load()
    base = resolve_root(root)
    out: dict[str, FileState] = {}
    for rel, fp in patch_set.files.items():
        data = read_file(base, rel)
        if data is None:
            out[rel] = FileState.MISSING
        else:
            digest = sha256_bytes(data)
            if digest == fp.patched_sha256:
                out[rel] = FileState.PATCHED
            elif digest == fp.upstream_sha256:
                out[rel] = FileState.UPSTREAM
            else:
                out[rel] = FileState.MODIFIED
    return out


def apply(root: str | os.PathLike[str], patch_set: PatchSet | None = None) -> PatchReport:
    """Patch every file of ``patch_set`` in the arcface_torch checkout ``root``, or none of them.

    Already patched files are left alone (so applying twice changes nothing); any file that is neither upstream nor
    patched, or missing, makes the whole call refuse with a ``PatchError`` listing each such file and the first hunk
    that does not fit.
    """
    return _transform(root, patch_set or PatchSet.load(), reverse=False)


def revert(root: str | os.PathLike[str], patch_set: PatchSet | None = None) -> PatchReport:
    """Undo ``apply``: patched files go back to the exact upstream bytes; already-upstream files are left alone;
    all or nothing, refused like ``apply`` for a file that is neither."""
    return _transform(root, patch_set or PatchSet.load(), reverse=True)


def _transform(root: str | os.PathLike[str], patch_set: PatchSet, reverse: bool) -> PatchReport:
    base = resolve_root(root)
    action = "revert" if reverse else "apply"
    done_label, todo_label = ("already upstream", "reverted") if reverse else ("already patched", "patched")
    outcomes: dict[str, str] = {}
    pending: list[tuple[FilePatch, Path, bytes, bytes]] = []
    problems: list[str] = []
    for rel, fp in patch_set.files.items():
        data = read_file(base, rel)
        if data is None:
            problems.append(f"{rel}: missing ({_file_in_root(base, rel)} does not exist)")
            continue
        digest = sha256_bytes(data)
        if digest == (fp.upstream_sha256 if reverse else fp.patched_sha256):
            outcomes[rel] = done_label
            continue
        source_sha = fp.patched_sha256 if reverse else fp.upstream_sha256
        if digest != source_sha:
            problems.append(_explain_modified(fp, data, patch_set, reverse))
            continue
        try:
            new = fp.unpatch_bytes(data) if reverse else fp.patch_bytes(data)
        except PatchError as exc:  # the manifest's hash matched but the hunks do not: the patch set is broken
            problems.append(f"{exc} (the patch set itself is inconsistent: regenerate it)")
            continue
        target_sha = fp.upstream_sha256 if reverse else fp.patched_sha256
        if sha256_bytes(new) != target_sha:
            problems.append(
                f"{rel}: the hunks applied but the result does not match the manifest's "
                f"{'upstream' if reverse else 'patched'} sha256 (the patch set itself is inconsistent: regenerate it)"
            )
            continue
        pending.append((fp, _file_in_root(base, rel), data, new))
        outcomes[rel] = todo_label
    if problems:
        raise PatchError(_refusal_message(base, patch_set, reverse, problems), problems)
    _write_all(pending, reverse)
    return PatchReport(base, action, {rel: outcomes[rel] for rel in patch_set.files})


def _explain_modified(fp: FilePatch, data: bytes, patch_set: PatchSet, reverse: bool) -> str:
    """Why a file that is neither upstream nor patched is refused, in the terms of the diff the user can open."""
    lines = split_lines(data)
    wanted = "the facedistill-patched version" if reverse else f"upstream arcface_torch {patch_set.short_commit}"
    head = f"{fp.path}: differs from {wanted} (and is not {'upstream' if reverse else 'patched'} either)"
    mismatch = _apply_hunks(lines, fp.hunks, reverse)
    if isinstance(mismatch, _Mismatch):
        text = f"{head}; {fp.diff}: {mismatch.describe()}"
        if not isinstance(_apply_hunks(lines, fp.hunks, not reverse), _Mismatch):
            kind = "upstream" if reverse else "patched"
            text += f"; it looks like a {kind} file with local edits"
        return text
    text = f"{head}; all hunks of {fp.diff} match but the file has other local changes"
    if fp.upstream_bytes is None:  # a patch set without upstream.json: the hash says it differs, not where
        return text
    pinned = fp.patch_bytes(fp.upstream_bytes) if reverse else fp.upstream_bytes
    return f"{text}: {_first_difference(split_lines(pinned), lines, wanted)}"


def _first_difference(pinned: list[bytes], lines: list[bytes], wanted: str) -> str:
    """The first line where ``lines`` (the user's file) departs from ``pinned``, in the user's line numbers."""
    matcher = difflib.SequenceMatcher(None, pinned, lines, autojunk=False)
    for tag, i1, _, j1, _ in matcher.get_opcodes():
        if tag == "replace":
            return f"line {j1 + 1} is {_show(lines[j1])} where {wanted} has {_show(pinned[i1])}"
        if tag == "insert":
            return f"line {j1 + 1}, {_show(lines[j1])}, is not in {wanted}"
        if tag == "delete":
            return f"{wanted}'s line {i1 + 1}, {_show(pinned[i1])}, is missing after line {j1}"
    return f"the lines equal {wanted}'s but the bytes do not"


def _refusal_message(base: Path, patch_set: PatchSet, reverse: bool, problems: list[str]) -> str:
    what = "revert" if reverse else "patch"
    remedy = (
        f"Patches are pinned to upstream arcface_torch commit {patch_set.commit}. Either restore the listed files "
        f"to that commit (in the checkout: git checkout {patch_set.commit} -- FILE) or revert your local edits to "
        "them, then run again."
    )
    if reverse:
        remedy += " Restoring a file from upstream also discards its facedistill patch, which is what revert wants."
    # One sentence per file: the CLI prints the refusal on one line, where a missing full stop runs them together.
    body = "\n".join(f"  - {problem}{'' if problem.endswith('.') else '.'}" for problem in problems)
    return f"cannot {what} {base}; nothing was changed:\n{body}\n{remedy}"


def _write_all(pending: list[tuple[FilePatch, Path, bytes, bytes]], reverse: bool) -> None:
    """Write every new file atomically and check it on disk; on any failure put back what was already written."""
    written: list[tuple[Path, bytes]] = []
    try:
        for fp, path, old, new in pending:
            _atomic_write(path, new)
            written.append((path, old))
            expected = fp.upstream_sha256 if reverse else fp.patched_sha256
            if sha256_bytes(path.read_bytes()) != expected:
                raise PatchError(f"{fp.path}: the file on disk does not have the expected sha256 after writing")
    except BaseException as exc:
        failed = []
        for path, old in reversed(written):
            try:
                _atomic_write(path, old)
            except OSError as restore_exc:
                failed.append(f"{path} ({restore_exc})")
        if failed:
            lost = ", ".join(failed)
            raise PatchError(f"writing failed ({exc}) and these files could not be restored: {lost}") from exc
        if isinstance(exc, PatchError):
            raise PatchError(f"{exc}; all files were restored") from exc
        if isinstance(exc, OSError):
            raise PatchError(f"writing failed ({exc}); all files were restored") from exc
        raise


def _atomic_write(path: Path, data: bytes) -> None:
    """Replace ``path`` by ``data`` via a temporary file in the same folder, so a crash never leaves half a file;
    the mode (e.g. the executable bit of scripts) is kept. A symlink is followed and its target rewritten."""
    target = Path(os.path.realpath(path))
    mode = stat.S_IMODE(target.stat().st_mode)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".facedistill-tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_relative_path(path: str) -> str:
    """A clean relative POSIX path inside the checkout; anything that could escape it is refused."""
    if not isinstance(path, str) or not path or "\\" in path or "\0" in path:
        raise PatchError(f"invalid file path {path!r}: use a relative path with '/' separators")
    pure = PurePosixPath(path)
    if pure.is_absolute() or any(part in ("..", ".", "") for part in path.split("/")):
        raise PatchError(f"invalid file path {path!r}: it must be relative to arcface_torch and stay inside it")
    return str(pure)


def _as_traversable(directory: str | os.PathLike[str] | Traversable) -> Traversable:
    if isinstance(directory, (str, os.PathLike)):
        return Path(directory)
    return directory
