"""The patch engine against the real upstream arcface_torch files, with a patch set generated here from edits that
look like the real ones (so these tests do not depend on the shipped patches, which evolve separately), and the
shipped set's diffs checked against its shipped whole files."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from facedistill.arcface_torch import patching
from facedistill.arcface_torch.make_patches import (
    NO_NEWLINE_MARKER,
    changed_files,
    fill_earlier_from_git,
    make_patch_set,
    unified_diff,
)
from facedistill.arcface_torch.patching import (
    FileState,
    PatchError,
    PatchSet,
    apply,
    default_patch_dir,
    revert,
    sha256_bytes,
    split_lines,
    status,
)

# The upstream snapshot lives beside the repository (../shared) and is never copied into it.
UPSTREAM = Path(__file__).resolve().parents[2].parent / "shared" / "upstream" / "arcface_torch"
FILES = ["partial_fc_v2.py", "train_v2.py", "utils/utils_config.py"]
BACKEND_LINE = b'backend = "nccl" if torch.cuda.is_available() else "gloo"\n'
UPSTREAM_NAME = "upstream arcface_torch 0159b24d"
PATCHED_NAME = "the facedistill-patched version"
# A line of train_v2.py that none of the edits below touches (and none of the shipped patches).
DESCRIPTION = b"Distributed Arcface Training in Pytorch"


@pytest.fixture(scope="module")
def upstream() -> Path:
    """The read-only upstream arcface_torch; skips when the shared snapshot is not there."""
    if not (UPSTREAM / "train_v2.py").is_file():
        pytest.skip(f"upstream arcface_torch snapshot not found at {UPSTREAM} (expected in ../shared beside the repo)")
    return UPSTREAM


def copy_tree(src: Path, dst: Path) -> Path:
    """A writable copy (the shared snapshot is read-only, and copytree keeps modes)."""
    shutil.copytree(src, dst)
    for folder, dirs, files in os.walk(dst):
        for name in [*dirs, *files]:
            path = Path(folder) / name
            path.chmod(path.stat().st_mode | stat.S_IWUSR)
    Path(dst).chmod(Path(dst).stat().st_mode | stat.S_IWUSR)
    return dst


def tree_bytes(root: Path) -> dict[str, bytes]:
    """Every file of a tree by relative path, to compare whole trees byte for byte."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def tree_stats(root: Path) -> dict[str, tuple[int, int]]:
    """(mtime_ns, inode) of every file: an atomic replace changes the inode even when the bytes are equal."""
    return {p.relative_to(root).as_posix(): (p.stat().st_mtime_ns, p.stat().st_ino) for p in root.rglob("*")}


def edit(path: Path, old: bytes, new: bytes) -> None:
    data = path.read_bytes()
    assert old in data, f"{old!r} not in {path}: the upstream snapshot changed"
    path.write_bytes(data.replace(old, new))


def make_edits(root: Path) -> None:
    """Edits of the kind the real patches make: replaced tokens, added and deleted lines, a changed last line."""
    train = root / "train_v2.py"
    edit(train, b'init_process_group("nccl")', b"init_process_group(backend)")
    edit(train, b'backend="nccl",', b"backend=backend,")
    edit(train, b"\ntry:\n", b"\n" + BACKEND_LINE + b"\ntry:\n")
    edit(train, b"from torch.utils.data import DataLoader\n", b"")
    edit(
        train,
        b"    torch.cuda.set_device(local_rank)\n",
        b"    if torch.cuda.is_available():\n        torch.cuda.set_device(local_rank)\n",
    )
    # utils_config.py ends without a newline upstream; the edit keeps it that way and changes that last line.
    config = root / "utils" / "utils_config.py"
    assert not config.read_bytes().endswith(b"\n")
    edit(config, b"    return cfg", b"    cfg.setdefault('loss', 'arcface')\n    return cfg  # facedistill")
    # partial_fc_v2.py ends with a newline upstream; the edited copy does not.
    pfc = root / "partial_fc_v2.py"
    edit(pfc, b"AllGather = AllGatherFunc.apply\n", b"AllGather = AllGatherFunc.apply  # facedistill")


@dataclass
class Trees:
    upstream: Path  # writable copy of upstream, the generator's input
    edited: Path  # the edited copy: what a patched checkout must equal byte for byte
    patches: Path  # the generated patch folder
    target: Path  # a fresh copy of upstream to patch
    patch_set: PatchSet


@pytest.fixture
def trees(tmp_path: Path, upstream: Path) -> Trees:
    up = copy_tree(upstream, tmp_path / "upstream")
    edited = copy_tree(upstream, tmp_path / "edited")
    make_edits(edited)
    patch_set = make_patch_set(up, edited, tmp_path / "patches", FILES)
    target = copy_tree(upstream, tmp_path / "checkout")
    return Trees(up, edited, tmp_path / "patches", target, patch_set)


def line_number(path: Path, text: bytes) -> int:
    """The 1-based number of the first line of ``path`` that contains ``text``."""
    return next(i for i, line in enumerate(split_lines(path.read_bytes()), 1) if text in line)


def apply_unified(diff: bytes, old: bytes) -> bytes:
    """A strict unified-diff applier (hunks at their stated lines, no fuzz) for checking the generator's output."""
    src, lines, out, pos, i = split_lines(old), split_lines(diff)[2:], [], 0, 0
    while i < len(lines):
        match = re.match(rb"@@ -(\d+)(?:,(\d+))? \+\d+(?:,\d+)? @@\n$", lines[i])
        assert match, lines[i]
        start = int(match[1]) - (match[2] != b"0")  # an empty range names the line before it
        out += src[pos:start]
        pos, i = start, i + 1
        while i < len(lines) and not lines[i].startswith(b"@@"):
            tag, text = lines[i][:1], lines[i][1:]
            i += 1
            if i < len(lines) and lines[i] == NO_NEWLINE_MARKER + b"\n":
                text, i = text[:-1], i + 1
            if tag in (b" ", b"-"):
                assert src[pos] == text
                pos += 1
            if tag in (b" ", b"+"):
                out.append(text)
    return b"".join(out + src[pos:])


# ------------------------------------------------------------------------------------------------------ generator


def test_generated_patch_set_layout(trees: Trees) -> None:
    names = sorted(p.name for p in trees.patches.iterdir())
    assert names == [
        "manifest.json",
        "partial_fc_v2.py.diff",
        "patched.json",
        "train_v2.py.diff",
        "upstream.json",
        "utils__utils_config.py.diff",
    ]
    loaded = PatchSet.load(trees.patches)
    assert loaded.commit == "0159b24d44cbc91abbd07b7a6fab0ba923a7fddf"
    assert sorted(loaded.files) == FILES
    diff = (trees.patches / "utils__utils_config.py.diff").read_bytes()
    assert diff.startswith(b"--- a/utils/utils_config.py\n+++ b/utils/utils_config.py\n@@ -")
    assert b"\n\\ No newline at end of file\n" in diff
    assert (trees.patches / "train_v2.py.diff").read_bytes().count(b"\n@@ -") >= 3
    for rel in FILES:  # the whole files, byte for byte
        assert loaded.files[rel].upstream == (trees.upstream / rel).read_bytes()
        assert loaded.files[rel].patched == (trees.edited / rel).read_bytes()


def test_diffs_are_what_standard_tools_write_and_read(trees: Trees, tmp_path: Path) -> None:
    """GNU diff writes the same hunks, and GNU patch applies our diffs to the same bytes: the format is standard."""
    if shutil.which("diff") is None or shutil.which("patch") is None:
        pytest.skip("GNU diff/patch not installed")
    (tmp_path / "a").symlink_to(trees.upstream)
    (tmp_path / "b").symlink_to(trees.edited)
    for rel in FILES:
        fp = trees.patch_set.files[rel]
        gnu = subprocess.run(["diff", "-u", f"a/{rel}", f"b/{rel}"], cwd=tmp_path, capture_output=True).stdout
        ours = (trees.patches / fp.diff).read_bytes()
        assert gnu.split(b"\n", 2)[2] == ours.split(b"\n", 2)[2], rel  # equal apart from the ---/+++ timestamps
    by_patch = copy_tree(trees.upstream, tmp_path / "by_patch")
    for rel in FILES:
        diff = (trees.patches / trees.patch_set.files[rel].diff).read_bytes()
        subprocess.run(["patch", "-p1", "--quiet"], input=diff, cwd=by_patch, check=True)
    assert tree_bytes(by_patch) == tree_bytes(trees.edited)


def test_make_command_line_writes_the_same_set(trees: Trees, tmp_path: Path) -> None:
    out = tmp_path / "cli_patches"
    cmd = [
        sys.executable,
        "-m",
        "facedistill.cli",
        "arcface-torch",
        "make-patches",
        str(trees.upstream),
        str(trees.edited),
    ]
    result = subprocess.run([*cmd, str(out), *FILES], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert tree_bytes(out) == tree_bytes(trees.patches)
    # Without FILE arguments: every upstream file the edited tree changes, which here are the same three.
    (trees.edited / "configs" / "my_recipe.py").write_text("only in the edited tree\n")
    (trees.edited / "__pycache__").mkdir(exist_ok=True)
    every = tmp_path / "every_changed"
    result = subprocess.run([*cmd, str(every)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert tree_bytes(every) == tree_bytes(trees.patches)
    assert "train_v2.py.diff: train_v2.py, " in result.stdout and "patched.json" in result.stdout


def test_changed_files_are_the_edited_upstream_files(trees: Trees) -> None:
    (trees.edited / "configs" / "my_recipe.py").write_text("x = 1\n")  # not an upstream file: left out
    assert changed_files(trees.upstream, trees.edited) == sorted(FILES)
    (trees.edited / "losses.py").unlink()
    with pytest.raises(PatchError, match=r"losses\.py: not in the edited tree .*deleting files is not supported"):
        changed_files(trees.upstream, trees.edited)


def test_make_refuses_unchanged_or_absent_files_and_drops_stale_diffs(trees: Trees) -> None:
    with pytest.raises(PatchError, match=r"losses\.py: identical"):
        make_patch_set(trees.upstream, trees.edited, trees.patches, ["losses.py"])
    with pytest.raises(PatchError, match=r"no_such\.py: not in the upstream tree"):
        make_patch_set(trees.upstream, trees.edited, trees.patches, ["no_such.py"])
    with pytest.raises(PatchError, match="invalid file path"):
        make_patch_set(trees.upstream, trees.edited, trees.patches, ["../train_v2.py"])
    (trees.patches / "README.md").write_text("kept")
    make_patch_set(trees.upstream, trees.edited, trees.patches, ["train_v2.py"])
    names = sorted(p.name for p in trees.patches.iterdir())
    assert names == ["README.md", "manifest.json", "patched.json", "train_v2.py.diff", "upstream.json"]


@settings(max_examples=300, deadline=None)
@given(
    old=st.lists(st.sampled_from(["a", "b", "c", ""]), max_size=12),
    new=st.lists(st.sampled_from(["a", "b", "d", ""]), max_size=12),
    ending=st.sampled_from(["\n", "\r\n"]),
    old_final=st.booleans(),
    new_final=st.booleans(),
)
def test_generated_diffs_round_trip(
    old: list[str], new: list[str], ending: str, old_final: bool, new_final: bool
) -> None:
    """Any pair of contents (CRLF, blank lines, with or without a final newline) gives a diff that rebuilds the new
    bytes from the old exactly, and the diff the other way the old from the new."""
    old_bytes = (ending.join(old) + (ending if old_final and old else "")).encode()
    new_bytes = (ending.join(new) + (ending if new_final and new else "")).encode()
    if old_bytes == new_bytes:
        return
    assert apply_unified(unified_diff("f.py", old_bytes, new_bytes), old_bytes) == new_bytes
    assert apply_unified(unified_diff("f.py", new_bytes, old_bytes), new_bytes) == old_bytes


# ----------------------------------------------------------------------------------------------- apply / revert


def test_apply_produces_the_edited_bytes(trees: Trees) -> None:
    report = apply(trees.target, trees.patch_set)
    assert report.files == dict.fromkeys(FILES, "patched")
    assert report.changed == FILES
    assert tree_bytes(trees.target) == tree_bytes(trees.edited)  # the patched files, and nothing else touched
    assert not (trees.target / "utils" / "utils_config.py").read_bytes().endswith(b"\n")
    assert (trees.target / "partial_fc_v2.py").read_bytes().endswith(b"# facedistill")


def test_apply_twice_writes_nothing(trees: Trees) -> None:
    apply(trees.target, trees.patch_set)
    before_stats, before_bytes = tree_stats(trees.target), tree_bytes(trees.target)
    report = apply(trees.target, trees.patch_set)
    assert report.files == dict.fromkeys(FILES, "already patched")
    assert report.changed == []
    assert tree_stats(trees.target) == before_stats
    assert tree_bytes(trees.target) == before_bytes == tree_bytes(trees.edited)


def test_apply_keeps_the_file_mode(trees: Trees) -> None:
    train = trees.target / "train_v2.py"
    train.chmod(0o750)
    apply(trees.target, trees.patch_set)
    assert stat.S_IMODE(train.stat().st_mode) == 0o750
    assert not list(trees.target.rglob("*.facedistill-tmp"))


def test_modified_file_is_refused_naming_the_line_and_nothing_is_written(trees: Trees) -> None:
    line = b'    distributed.init_process_group("nccl")\n'
    number = line_number(trees.target / "train_v2.py", line)
    edit(trees.target / "train_v2.py", line, b'    distributed.init_process_group("gloo")\n')
    before_stats, before_bytes = tree_stats(trees.target), tree_bytes(trees.target)
    with pytest.raises(PatchError) as err:
        apply(trees.target, trees.patch_set)
    message = str(err.value)
    assert f"train_v2.py: differs from {UPSTREAM_NAME} (and is not patched either)" in message
    assert "it looks like an upstream file with local edits" in message
    shown = f"""line {number} is '    distributed.init_process_group("gloo")' where {UPSTREAM_NAME} has"""
    assert shown + """ '    distributed.init_process_group("nccl")'.""" in message
    assert "git checkout 0159b24d44cbc91abbd07b7a6fab0ba923a7fddf -- FILE" in message
    assert "nothing was changed" in message
    assert [p for p in err.value.problems if "train_v2.py" in p] and len(err.value.problems) == 1
    # partial_fc_v2.py comes first and could have been patched: all or nothing means it was not.
    assert tree_stats(trees.target) == before_stats
    assert tree_bytes(trees.target) == before_bytes
    assert status(trees.target, trees.patch_set)["partial_fc_v2.py"] == FileState.UPSTREAM


def test_an_added_or_removed_line_is_named_in_the_users_numbering(trees: Trees) -> None:
    train = trees.target / "train_v2.py"
    edit(train, b"import argparse\n", b"import argparse\nimport sys\n")
    with pytest.raises(PatchError, match=f"line 2, 'import sys', is not in {UPSTREAM_NAME}"):
        apply(trees.target, trees.patch_set)
    edit(train, b"import argparse\nimport sys\n", b"")
    with pytest.raises(PatchError, match=f"{UPSTREAM_NAME}'s line 1, 'import argparse', is missing after line 0"):
        apply(trees.target, trees.patch_set)


def test_patched_file_with_local_edits_is_recognised(trees: Trees) -> None:
    apply(trees.target, trees.patch_set)
    train = trees.target / "train_v2.py"
    number = line_number(train, DESCRIPTION)
    edit(train, DESCRIPTION, b"my training")
    with pytest.raises(PatchError, match=f"looks like a patched file with local edits: line {number} is .*my training"):
        apply(trees.target, trees.patch_set)
    with pytest.raises(PatchError) as err:
        revert(trees.target, trees.patch_set)
    message = str(err.value)
    assert f"differs from {PATCHED_NAME} (and is not upstream either)" in message and "cannot revert" in message
    assert f"line {number} is" in message and f"where {PATCHED_NAME} has" in message
    assert "my training" in message and DESCRIPTION.decode() in message


def test_revert_restores_upstream_byte_for_byte(trees: Trees, upstream: Path) -> None:
    apply(trees.target, trees.patch_set)
    report = revert(trees.target, trees.patch_set)
    assert report.files == dict.fromkeys(FILES, "reverted")
    assert tree_bytes(trees.target) == tree_bytes(upstream)
    before = tree_stats(trees.target)
    assert revert(trees.target, trees.patch_set).files == dict.fromkeys(FILES, "already upstream")
    assert tree_stats(trees.target) == before


def test_revert_of_a_half_patched_checkout(trees: Trees, upstream: Path) -> None:
    """Files already upstream are left alone while the others are reverted (e.g. after a manual checkout)."""
    apply(trees.target, trees.patch_set)
    shutil.copyfile(upstream / "train_v2.py", trees.target / "train_v2.py")
    report = revert(trees.target, trees.patch_set)
    assert report.files["train_v2.py"] == "already upstream"
    assert report.changed == ["partial_fc_v2.py", "utils/utils_config.py"]
    assert tree_bytes(trees.target) == tree_bytes(upstream)


def test_revert_refuses_an_edited_patched_file(trees: Trees) -> None:
    apply(trees.target, trees.patch_set)
    number = line_number(trees.target / "train_v2.py", BACKEND_LINE)
    edit(trees.target / "train_v2.py", BACKEND_LINE, b'backend = "gloo"\n')
    before = tree_bytes(trees.target)
    with pytest.raises(PatchError) as err:
        revert(trees.target, trees.patch_set)
    shown = f"""line {number} is 'backend = "gloo"' where {PATCHED_NAME} has '{BACKEND_LINE.decode().strip()}'"""
    assert shown in str(err.value)
    assert "cannot revert" in str(err.value)
    assert tree_bytes(trees.target) == before


def test_crlf_files_round_trip(tmp_path: Path, upstream: Path) -> None:
    up, edited, target = tmp_path / "up", tmp_path / "edited", tmp_path / "checkout"
    for root in (up, edited, target):
        (root / "utils").mkdir(parents=True)
    for rel in FILES:
        crlf = (upstream / rel).read_bytes().replace(b"\n", b"\r\n")
        for root in (up, edited, target):
            (root / rel).write_bytes(crlf)
    edit(edited / "train_v2.py", b'init_process_group("nccl")\r\n', b"init_process_group(backend)\r\n")
    edit(edited / "utils" / "utils_config.py", b"    return cfg", b"    cfg.loss = 'arcface'\r\n    return cfg")
    edit(edited / "partial_fc_v2.py", b"AllGatherFunc.apply\r\n", b"AllGatherFunc.apply\r\nAllGatherFn = AllGather")
    patch_set = make_patch_set(up, edited, tmp_path / "patches", FILES)
    diff = (tmp_path / "patches" / "train_v2.py.diff").read_bytes()
    assert b"+    distributed.init_process_group(backend)\r\n" in diff
    apply(target, patch_set)
    assert tree_bytes(target) == tree_bytes(edited)
    revert(target, patch_set)
    assert tree_bytes(target) == tree_bytes(up)
    # A CRLF checkout is not the LF upstream: refused, the CR shown.
    shown = rf"line 1 is 'import argparse\\r' where {UPSTREAM_NAME} has 'import argparse'"
    with pytest.raises(PatchError, match=shown):
        apply(target, PatchSet.load(default_patch_dir()))


def test_missing_file_is_refused_by_name(trees: Trees) -> None:
    (trees.target / "utils" / "utils_config.py").unlink()
    before = tree_bytes(trees.target)
    with pytest.raises(PatchError, match=r"utils/utils_config\.py: missing"):
        apply(trees.target, trees.patch_set)
    assert tree_bytes(trees.target) == before
    assert status(trees.target, trees.patch_set)["utils/utils_config.py"] == FileState.MISSING


def test_wrong_root_is_refused_saying_what_path_should_be(tmp_path: Path, trees: Trees) -> None:
    with pytest.raises(PatchError, match=r"no train_v2\.py in it.*PATH must be insightface's recognition/arcface"):
        apply(tmp_path, trees.patch_set)
    with pytest.raises(PatchError, match="is not a directory"):
        apply(tmp_path / "nowhere", trees.patch_set)


def test_insightface_root_resolves_to_arcface_torch(tmp_path: Path, upstream: Path, trees: Trees) -> None:
    nested = copy_tree(upstream, tmp_path / "insightface" / "recognition" / "arcface_torch")
    report = apply(tmp_path / "insightface", trees.patch_set)
    assert report.root == nested
    assert tree_bytes(nested) == tree_bytes(trees.edited)


def test_status_reports_each_state(trees: Trees) -> None:
    assert status(trees.target, trees.patch_set) == dict.fromkeys(FILES, FileState.UPSTREAM)
    apply(trees.target, trees.patch_set)
    assert status(trees.target, trees.patch_set) == dict.fromkeys(FILES, "patched")
    edit(trees.target / "train_v2.py", b"import argparse", b"import argparse  # local")
    (trees.target / "partial_fc_v2.py").unlink()
    states = status(trees.target, trees.patch_set)
    assert states == {"partial_fc_v2.py": "missing", "train_v2.py": "modified", "utils/utils_config.py": "patched"}


def test_failed_write_restores_the_files_already_written(trees: Trees, monkeypatch: pytest.MonkeyPatch) -> None:
    real_write = patching._atomic_write
    calls = []

    def failing_write(path: Path, data: bytes) -> None:
        calls.append(path.name)
        if len(calls) == 2:
            raise OSError("disk full")
        real_write(path, data)

    monkeypatch.setattr(patching, "_atomic_write", failing_write)
    before = tree_bytes(trees.target)
    with pytest.raises(PatchError, match=r"writing failed \(disk full\); all files were restored"):
        apply(trees.target, trees.patch_set)
    assert calls[:2] == ["partial_fc_v2.py", "train_v2.py"] and len(calls) == 3  # 3rd call: restoring the 1st
    assert tree_bytes(trees.target) == before


# ------------------------------------------------------------------------------ upgrading an earlier release


def next_release(trees: Trees, old: bytes, new: bytes) -> PatchSet:
    """The next facedistill release: train_v2.py's patch edited again and the set regenerated over the last one."""
    edit(trees.edited / "train_v2.py", old, new)
    return make_patch_set(trees.upstream, trees.edited, trees.patches, FILES)


def test_a_checkout_patched_by_an_earlier_release_is_upgraded_and_reverts(trees: Trees, upstream: Path) -> None:
    apply(trees.target, trees.patch_set)  # the earlier release
    earlier = (trees.target / "train_v2.py").read_bytes()
    current = next_release(trees, BACKEND_LINE, b'backend = "gloo"  # facedistill 2\n')
    assert current.files["train_v2.py"].earlier == {sha256_bytes(earlier)}
    assert current.files["partial_fc_v2.py"].earlier == frozenset()  # unchanged: nothing to carry
    manifest = json.loads((trees.patches / "manifest.json").read_text())
    assert manifest["files"]["train_v2.py"]["earlier_patched_sha256"] == [sha256_bytes(earlier)]
    states = status(trees.target, current)
    assert states == {**dict.fromkeys(FILES, FileState.PATCHED), "train_v2.py": FileState.OUTDATED}
    report = apply(trees.target, current)
    assert report.files == {**dict.fromkeys(FILES, "already patched"), "train_v2.py": "upgraded"}
    assert report.changed == ["train_v2.py"]
    assert tree_bytes(trees.target) == tree_bytes(trees.edited)  # byte for byte the current release
    (trees.target / "train_v2.py").write_bytes(earlier)
    assert revert(trees.target, current).files == dict.fromkeys(FILES, "reverted")
    assert tree_bytes(trees.target) == tree_bytes(upstream)


def test_every_earlier_release_is_carried_forward(trees: Trees) -> None:
    first = trees.patch_set.files["train_v2.py"].patched
    second = next_release(trees, BACKEND_LINE, b'backend = "gloo"  # facedistill 2\n').files["train_v2.py"].patched
    third = next_release(trees, b"# facedistill 2", b"# facedistill 3")
    assert third.files["train_v2.py"].earlier == {sha256_bytes(first), sha256_bytes(second)}
    assert make_patch_set(trees.upstream, trees.edited, trees.patches, FILES) == third  # same text: same list
    for data in (first, second):
        (trees.target / "train_v2.py").write_bytes(data)
        assert status(trees.target, third)["train_v2.py"] == FileState.OUTDATED
    # Another upstream pin starts afresh: a checkout of another upstream commit is refused anyway.
    other = make_patch_set(trees.upstream, trees.edited, trees.patches, FILES, commit="1234567")
    assert other.files["train_v2.py"].earlier == frozenset()


def test_an_earlier_release_with_local_edits_is_still_refused(trees: Trees) -> None:
    apply(trees.target, trees.patch_set)
    current = next_release(trees, BACKEND_LINE, b'backend = "gloo"  # facedistill 2\n')
    edit(trees.target / "train_v2.py", DESCRIPTION, b"my training")
    before = tree_bytes(trees.target)
    assert status(trees.target, current)["train_v2.py"] == FileState.MODIFIED
    for transform in (apply, revert):
        with pytest.raises(PatchError, match=r"train_v2\.py: differs from ") as err:
            transform(trees.target, current)
        assert len(err.value.problems) == 1 and "nothing was changed" in str(err.value)
    assert tree_bytes(trees.target) == before


def test_earlier_hashes_are_filled_from_git_history(trees: Trees, tmp_path: Path) -> None:
    """The maintainers' one-off: every patched file a commit of the set shipped becomes an earlier hash, checked by
    applying that commit's diff to upstream; the rest of the set is untouched."""
    if shutil.which("git") is None:
        pytest.skip("git not installed")
    repo, out = tmp_path / "repo", tmp_path / "repo" / "patches" / "arcface_torch"
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t"}
    env["GIT_COMMITTER_EMAIL"] = "t@t"

    def commit() -> None:
        subprocess.run(["git", "add", "-A"], cwd=repo, check=True, env=env)
        subprocess.run(["git", "commit", "-qm", "release"], cwd=repo, check=True, env=env)

    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    first = make_patch_set(trees.upstream, trees.edited, out, FILES)
    commit()
    edit(trees.edited / "train_v2.py", BACKEND_LINE, b'backend = "gloo"  # facedistill 2\n')
    (out / "manifest.json").unlink()  # as the sets made before earlier hashes existed: nothing carried
    make_patch_set(trees.upstream, trees.edited, out, FILES)
    commit()
    edit(trees.edited / "train_v2.py", b"# facedistill 2", b"# facedistill 3")  # not committed yet
    make_patch_set(trees.upstream, trees.edited, out, FILES)
    manifest = json.loads((out / "manifest.json").read_text())
    del manifest["files"]["train_v2.py"]["earlier_patched_sha256"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    texts = {name: (out / name).read_bytes() for name in ("patched.json", "upstream.json", "train_v2.py.diff")}
    filled = fill_earlier_from_git(trees.upstream, repo)
    second = subprocess.run(["git", "show", "HEAD:patches/arcface_torch/patched.json"], cwd=repo, capture_output=True)
    second_train = json.loads(second.stdout)["files"]["train_v2.py"].encode()
    wanted = [sha256_bytes(first.files["train_v2.py"].patched), sha256_bytes(second_train)]
    assert json.loads((out / "manifest.json").read_text())["files"]["train_v2.py"]["earlier_patched_sha256"] == wanted
    assert {rel: fp.earlier for rel, fp in filled.files.items()} == {
        **dict.fromkeys(FILES, frozenset()),
        "train_v2.py": set(wanted),
    }
    assert texts == {name: (out / name).read_bytes() for name in texts}
    assert fill_earlier_from_git(trees.upstream, repo) == filled  # once or twice: the same


# ------------------------------------------------------------------------------------------- loading a patch set


def _rewrite_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def test_load_refuses_a_stale_or_broken_set(trees: Trees) -> None:
    """Every whole file must be the manifest's (the sha256), so a set edited by hand never writes an untested file."""
    texts = trees.patches / "patched.json"
    _rewrite_json(texts, lambda d: d["files"].update({"train_v2.py": d["files"]["train_v2.py"] + "# by hand\n"}))
    with pytest.raises(PatchError, match=r"train_v2\.py in upstream\.json or patched\.json .*regenerate the patch set"):
        PatchSet.load(trees.patches)
    texts.unlink()
    with pytest.raises(PatchError, match="patched.json is missing"):
        PatchSet.load(trees.patches)
    (trees.patches / "upstream.json").write_text("{")
    with pytest.raises(PatchError, match="not valid JSON"):
        PatchSet.load(trees.patches)
    make_patch_set(trees.upstream, trees.edited, trees.patches, FILES)  # what the messages say to do
    assert PatchSet.load(trees.patches) == trees.patch_set
    _rewrite_json(
        trees.patches / "manifest.json", lambda d: d["files"]["train_v2.py"].update(earlier_patched_sha256="x")
    )
    with pytest.raises(PatchError, match=r"train_v2\.py's earlier_patched_sha256 is not a list of sha256 hashes"):
        PatchSet.load(trees.patches)
    assert make_patch_set(trees.upstream, trees.edited, trees.patches, FILES) == trees.patch_set  # regenerated
    _rewrite_json(trees.patches / "manifest.json", lambda d: d["files"].update({"../x": {}}))
    with pytest.raises(PatchError, match="invalid file path"):
        PatchSet.load(trees.patches)


def test_load_without_manifest_says_so(tmp_path: Path) -> None:
    with pytest.raises(PatchError, match="manifest.json is missing"):
        PatchSet.load(tmp_path)


def test_shipped_patch_set_applies_and_reverts(tmp_path: Path, upstream: Path) -> None:
    if not default_patch_dir().joinpath("manifest.json").is_file():
        pytest.skip("patches/arcface_torch/manifest.json is not in the repository yet")
    shipped = PatchSet.load()
    assert shipped.commit == "0159b24d44cbc91abbd07b7a6fab0ba923a7fddf"
    target = copy_tree(upstream, tmp_path / "arcface_torch")
    report = apply(target, shipped)
    assert set(report.changed) == set(shipped.files)
    assert status(target, shipped) == dict.fromkeys(shipped.files, FileState.PATCHED)
    revert(target, shipped)
    assert tree_bytes(target) == tree_bytes(upstream)


def test_a_checkout_patched_by_an_earlier_shipped_release_upgrades(tmp_path: Path, upstream: Path) -> None:
    """A real earlier release from this repository's history (6328adb, before resume and the ONNX hunks): its
    patched train_v2.py and dataset.py are outdated; patch upgrades them to the shipped files, --revert restores
    upstream. The shipped manifest must list them (``fill_earlier_from_git``)."""
    repo = Path(__file__).resolve().parents[2]
    old = "6328adb:patches/arcface_torch"
    found = subprocess.run(["git", "show", f"{old}/manifest.json"], cwd=repo, capture_output=True, check=False)
    if shutil.which("git") is None or found.returncode != 0:
        pytest.skip("no git history of the patch set here")
    shipped = PatchSet.load()
    target = copy_tree(upstream, tmp_path / "arcface_torch")
    for entry in json.loads(found.stdout)["files"].values():
        diff = subprocess.run(["git", "show", f"{old}/{entry['diff']}"], cwd=repo, capture_output=True, check=True)
        subprocess.run(["git", "apply", "-p1"], input=diff.stdout, cwd=target, check=True)
    earlier = tree_bytes(target)
    states = status(target, shipped)
    assert states["train_v2.py"] == FileState.OUTDATED and states["dataset.py"] == FileState.PATCHED
    assert states["torch2onnx.py"] == FileState.UPSTREAM and states["lr_scheduler.py"] == FileState.PATCHED
    cmd = [sys.executable, "-m", "facedistill.cli", "arcface-torch", "patch", str(target)]
    shown = subprocess.run([*cmd, "--status"], capture_output=True, text=True, check=True).stdout
    assert "outdated  train_v2.py (patched by an earlier facedistill: patch upgrades it)\n" in shown
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert "  train_v2.py: upgraded\n" in result.stdout and "  torch2onnx.py: patched\n" in result.stdout
    assert {rel: (target / rel).read_bytes() for rel in shipped.files} == {
        rel: fp.patched for rel, fp in shipped.files.items()
    }
    for rel, data in earlier.items():
        (target / rel).write_bytes(data)
    revert(target, shipped)
    assert {rel: (target / rel).read_bytes() for rel in shipped.files} == {
        rel: fp.upstream for rel, fp in shipped.files.items()
    }


def test_shipped_diffs_are_the_shipped_files() -> None:
    """The diffs people read (and ``git apply``) say exactly what apply writes: each one, regenerated from the shipped
    upstream and patched files, is byte for byte the shipped diff, and the folder holds no other diff."""
    if not default_patch_dir().joinpath("manifest.json").is_file():
        pytest.skip("patches/arcface_torch/manifest.json is not in the repository yet")
    shipped = PatchSet.load()
    folder = default_patch_dir()
    for rel, fp in shipped.files.items():
        assert folder.joinpath(fp.diff).read_bytes() == unified_diff(rel, fp.upstream, fp.patched), fp.diff
    diffs = {entry.name for entry in folder.iterdir() if entry.name.endswith(".diff")}
    assert diffs == {fp.diff for fp in shipped.files.values()}
