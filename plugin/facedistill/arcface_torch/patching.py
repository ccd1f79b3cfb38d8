"""Apply and revert facedistill's patches to upstream arcface_torch, byte-exactly and all-or-nothing.

A patch set (``patches/arcface_torch``) is ``manifest.json`` (each file's sha256 upstream, patched, and patched by each
earlier release), the whole files (``upstream.json``, ``patched.json``) and a diff per file to read. A file is upstream,
patched, outdated (an earlier release's) or modified: apply writes the patched file over an upstream or outdated one,
revert the upstream file over a patched or outdated one; a modified file is refused, showing its first line that departs
from the version it is closer to. Nothing is written unless every file can be handled; writes are atomic, keep the mode,
are read back, and are undone if one fails. Maintainers regenerate the set with ``make_patches``."""

from __future__ import annotations

import difflib
import hashlib
import importlib.resources
import json
import os
import re
import stat
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

UPSTREAM_NAME = "insightface recognition/arcface_torch"
UPSTREAM_COMMIT = "0159b24d44cbc91abbd07b7a6fab0ba923a7fddf"
MANIFEST_NAME = "manifest.json"
UPSTREAM_TEXTS_NAME = "upstream.json"  # the pinned upstream file of every patched path: what revert writes
PATCHED_TEXTS_NAME = "patched.json"  # the patched file of every path: what apply writes
EARLIER_KEY = "earlier_patched_sha256"  # in a manifest entry: the sha256 of each earlier release's patched file
SHA256 = r"[0-9a-f]{64}"  # a sha256 as the manifest writes it
MARKER_FILE = "train_v2.py"  # the file whose presence identifies an arcface_torch folder
INSIGHTFACE_SUBDIR = ("recognition", "arcface_torch")  # where arcface_torch lives in insightface


class PatchError(ValueError):
    """A patch set that cannot be loaded or made, or a checkout refused (``problems``: one line per file)."""

    def __init__(self, message: str, problems: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.problems: tuple[str, ...] = tuple(problems)


class FileState(str, Enum):
    """Where one patched file of a checkout stands; a ``str`` so that it compares equal to its plain name."""

    UPSTREAM = "upstream"
    PATCHED = "patched"
    OUTDATED = "outdated"  # patched by an earlier facedistill: apply upgrades it, revert restores upstream
    MODIFIED = "modified"
    MISSING = "missing"


@dataclass(frozen=True)
class FilePatch:
    """One upstream file: both versions (checked when loaded), its diff's name, earlier releases' patched sha256s."""

    path: str
    diff: str
    upstream: bytes
    patched: bytes
    earlier: frozenset[str] = frozenset()

    def state(self, data: bytes | None) -> FileState:
        if data is None:
            return FileState.MISSING
        known = {self.patched: FileState.PATCHED, self.upstream: FileState.UPSTREAM}.get(data)
        return known or (FileState.OUTDATED if sha256_bytes(data) in self.earlier else FileState.MODIFIED)


@dataclass(frozen=True)
class PatchSet:
    """A loaded patch set: which upstream commit it is pinned to and, per relative POSIX path, its ``FilePatch``."""

    directory: str
    commit: str
    files: dict[str, FilePatch]

    @classmethod
    def load(cls, directory: str | os.PathLike[str] | Traversable | None = None) -> PatchSet:
        """Read the manifest and both texts of every file; ``None`` loads the set shipped with facedistill. A text
        whose sha256 is not the manifest's is refused here, so a stale set never writes an untested file."""
        base = default_patch_dir() if directory is None else directory
        base = Path(base) if isinstance(base, (str, os.PathLike)) else base
        manifest, *texts = (_read_json(base, name) for name in (MANIFEST_NAME, UPSTREAM_TEXTS_NAME, PATCHED_TEXTS_NAME))
        commit = manifest.get("commit")
        if not isinstance(commit, str) or not re.fullmatch(r"[0-9a-f]{7,40}", commit) or not manifest["files"]:
            raise PatchError(f"{MANIFEST_NAME} in {base}: needs a 'commit' hash and at least one file")
        files = {}
        for path, entry in manifest["files"].items():
            both = [text["files"].get(check_relative_path(path)) for text in texts]
            both = [data.encode("utf-8", "surrogateescape") if isinstance(data, str) else b"" for data in both]
            entry = entry if isinstance(entry, dict) else {}
            if [entry.get("upstream_sha256"), entry.get("patched_sha256")] != [sha256_bytes(data) for data in both]:
                why = f"{path} in {UPSTREAM_TEXTS_NAME} or {PATCHED_TEXTS_NAME} is missing or not {MANIFEST_NAME}'s"
                raise PatchError(f"patch set {base}: {why} (another sha256); regenerate the patch set")
            earlier = entry.get(EARLIER_KEY, [])
            if not isinstance(earlier, list) or not all(re.fullmatch(SHA256, str(h)) for h in earlier):
                raise PatchError(f"{MANIFEST_NAME} in {base}: {path}'s {EARLIER_KEY} is not a list of sha256 hashes")
            files[path] = FilePatch(path, str(entry.get("diff", "")), *both, frozenset(earlier))
        return cls(str(base), commit, files)


def _read_json(base: Path | Traversable, name: str) -> dict:
    """A JSON file of the set, with its ``files`` object (the manifest and both texts have one)."""
    try:
        data = json.loads(base.joinpath(name).read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise PatchError(f"no patch set at {base}: {name} is missing") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        data = f"not valid JSON ({exc})"
    if not isinstance(data, dict) or not isinstance(data.get("files"), dict):
        raise PatchError(f"{name} in {base}: {data if isinstance(data, str) else 'no files'}; regenerate the patch set")
    return data


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def split_lines(data: bytes) -> list[bytes]:
    """Split on ``\\n`` only, keeping it: ``\\r\\n`` stays inside the line, so CRLF files round-trip unchanged."""
    lines = data.split(b"\n")  # not bytes.splitlines: it also splits on a bare "\r", which diff tools do not
    return [line + b"\n" for line in lines[:-1]] + ([lines[-1]] if lines[-1] else [])


def check_relative_path(path: str) -> str:
    """A clean relative POSIX path inside the checkout; anything that could escape it is refused."""
    if not isinstance(path, str) or "\\" in path or "\0" in path or {"", ".", ".."} & set(path.split("/")):
        raise PatchError(f"invalid file path {path!r}: use a path relative to arcface_torch, with '/', inside it")
    return path


@dataclass(frozen=True)
class PatchReport:
    """What ``apply``/``revert`` did, per file: "patched", "upgraded", "reverted", "already patched|upstream"."""

    root: Path
    action: str
    files: dict[str, str]

    @property
    def changed(self) -> list[str]:
        return [path for path, outcome in self.files.items() if not outcome.startswith("already")]

    def __str__(self) -> str:
        lines = [f"{self.action} {self.root}: {len(self.changed)} of {len(self.files)} file(s) changed"]
        return "\n".join(lines + [f"  {path}: {outcome}" for path, outcome in self.files.items()])


def default_patch_dir() -> Traversable:
    """The patch set shipped inside the package (``patches/arcface_torch`` of the repository)."""
    return importlib.resources.files("facedistill.arcface_torch.patches") / "arcface_torch"


def resolve_root(root: str | os.PathLike[str]) -> Path:
    """The arcface_torch folder for ``root``: the folder itself, or ``recognition/arcface_torch`` of an insightface
    checkout, so users can pass whichever they have at hand."""
    path = Path(root).expanduser()
    for candidate in (path, path.joinpath(*INSIGHTFACE_SUBDIR)):
        if (candidate / MARKER_FILE).is_file():
            return candidate
    what = f"not an arcface_torch folder (no {MARKER_FILE} in it nor in recognition/arcface_torch/)"
    what = what if path.is_dir() else "not a directory"
    raise PatchError(f"{path} is {what}; PATH must be insightface's recognition/arcface_torch or the repository root")


def read_file(root: Path, rel: str) -> bytes | None:
    try:
        return (root / rel).read_bytes()
    except FileNotFoundError:
        return None
    except IsADirectoryError as exc:
        raise PatchError(f"{rel}: {root / rel} is a directory, not a file") from exc


def status(root: str | os.PathLike[str], patch_set: PatchSet | None = None) -> dict[str, FileState]:
    """Per patched file: upstream, patched, outdated, modified (refused by apply and revert) or missing. Reads only."""
    base = resolve_root(root)
    return {rel: fp.state(read_file(base, rel)) for rel, fp in (patch_set or PatchSet.load()).files.items()}


def apply(root: str | os.PathLike[str], patch_set: PatchSet | None = None) -> PatchReport:
    """Patch (or upgrade an outdated) every file in ``root`` or none: patched ones stay, a modified one refuses."""
    return _transform(root, patch_set or PatchSet.load(), reverse=False)


def revert(root: str | os.PathLike[str], patch_set: PatchSet | None = None) -> PatchReport:
    """Undo ``apply`` (any release's), byte for byte and all or nothing: upstream files stay, others as ``apply``."""
    return _transform(root, patch_set or PatchSet.load(), reverse=True)


def _transform(root: str | os.PathLike[str], patch_set: PatchSet, reverse: bool) -> PatchReport:
    base = resolve_root(root)
    source, target = (FileState.PATCHED, FileState.UPSTREAM) if reverse else (FileState.UPSTREAM, FileState.PATCHED)
    outcomes, problems, pending = {}, [], []  # pending: (rel, path, old bytes, new bytes)
    for rel, fp in patch_set.files.items():
        data = read_file(base, rel)
        state = fp.state(data)
        if state == FileState.MISSING:
            problems.append(f"{rel}: missing ({base / rel} does not exist)")
        elif state == target:
            outcomes[rel] = f"already {target.value}"
        elif state in (source, FileState.OUTDATED):
            pending.append((rel, base / rel, data, getattr(fp, target.value)))
            outcomes[rel] = "reverted" if reverse else "upgraded" if state == FileState.OUTDATED else "patched"
        else:
            problems.append(_explain_modified(fp, data, patch_set, reverse))
    if problems:
        raise PatchError(_refusal_message(base, patch_set, reverse, problems), problems)
    _write_all(pending)
    return PatchReport(base, "revert" if reverse else "apply", {rel: outcomes[rel] for rel in patch_set.files})


def _explain_modified(fp: FilePatch, data: bytes, patch_set: PatchSet, reverse: bool) -> str:
    """Why a file that is neither upstream nor patched is refused: its first line that departs from the pinned version
    it is closer to (an upstream file with local edits, or a patched one), numbered as in the user's file."""
    wanted, other = (FileState.PATCHED, FileState.UPSTREAM) if reverse else (FileState.UPSTREAM, FileState.PATCHED)
    names = {FileState.UPSTREAM: f"upstream arcface_torch {patch_set.commit[:8]}"}
    names[FileState.PATCHED] = "the facedistill-patched version"
    lines = split_lines(data)
    match = {k: difflib.SequenceMatcher(None, split_lines(getattr(fp, k.value)), lines, False) for k in names}
    closer = other if match[other].ratio() > match[wanted].ratio() else wanted
    name, pinned = names[closer], match[closer].a
    tag, i, _, j, _ = next(op for op in match[closer].get_opcodes() if op[0] != "equal")  # the bytes differ
    if tag == "replace":
        where = f"line {j + 1} is {_show(lines[j])} where {name} has {_show(pinned[i])}"
    elif tag == "insert":
        where = f"line {j + 1}, {_show(lines[j])}, is not in {name}"
    else:
        where = f"{name}'s line {i + 1}, {_show(pinned[i])}, is missing after line {j}"
    kind = "an upstream" if closer == FileState.UPSTREAM else "a patched"
    return (
        f"{fp.path}: differs from {names[wanted]} (and is not {other.value} either); it looks like {kind} file "
        f"with local edits: {where}"
    )


def _show(line: bytes) -> str:
    """A line as messages show it: quoted, its newline dropped, a CR or tab visible."""
    return repr(line.removesuffix(b"\n").decode("utf-8", "replace"))


def _refusal_message(base: Path, patch_set: PatchSet, reverse: bool, problems: list[str]) -> str:
    remedy = (
        f"Patches are pinned to upstream arcface_torch commit {patch_set.commit}. Either restore the listed files "
        f"to that commit (in the checkout: git checkout {patch_set.commit} -- FILE) or revert your local edits to "
        "them, then run again."
    )
    if reverse:
        remedy += " Restoring a file from upstream also discards its facedistill patch, which is what revert wants."
    # One sentence per file: the CLI prints the refusal on one line, where a missing full stop runs them together.
    body = "\n".join(f"  - {problem}{'' if problem.endswith('.') else '.'}" for problem in problems)
    return f"cannot {'revert' if reverse else 'patch'} {base}; nothing was changed:\n{body}\n{remedy}"


def _write_all(pending: list[tuple[str, Path, bytes, bytes]]) -> None:
    """Write every new file atomically and check it on disk; on any failure put back what was already written."""
    written: list[tuple[Path, bytes]] = []
    try:
        for rel, path, old, new in pending:
            _atomic_write(path, new)
            written.append((path, old))
            if path.read_bytes() != new:
                raise PatchError(f"{rel}: the file on disk is not what was written")
    except BaseException as exc:
        lost = []
        for path, old in reversed(written):
            try:
                _atomic_write(path, old)
            except OSError as restore_exc:
                lost.append(f"{path} ({restore_exc})")
        if lost:
            raise PatchError(f"writing failed ({exc}) and these could not be restored: {', '.join(lost)}") from exc
        if isinstance(exc, (OSError, PatchError)):
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
