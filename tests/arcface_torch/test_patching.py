"""The patch engine against the real upstream arcface_torch files, with a patch set generated here from edits that
look like the real ones (so these tests do not depend on the shipped patches, which evolve separately)."""

from __future__ import annotations

import os
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
from facedistill.arcface_torch.make_patches import make_patch_set, unified_diff
from facedistill.arcface_torch.patching import (
    FilePatch,
    FileState,
    PatchError,
    PatchSet,
    apply,
    default_patch_dir,
    parse_diff,
    revert,
    status,
)

# The upstream snapshot lives beside the repository (../shared) and is never copied into it.
UPSTREAM = Path(__file__).resolve().parents[2].parent / "shared" / "upstream" / "arcface_torch"
FILES = ["partial_fc_v2.py", "train_v2.py", "utils/utils_config.py"]
BACKEND_LINE = b'backend = "nccl" if torch.cuda.is_available() else "gloo"\n'


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


def hunk_containing(fp: FilePatch, line: bytes):
    """The hunk whose upstream side contains ``line`` (to modify a checkout inside a known hunk)."""
    return next(h for h in fp.hunks if line in h.old_lines)


# ------------------------------------------------------------------------------------------------------ generator


def test_generated_patch_set_layout(trees: Trees) -> None:
    names = sorted(p.name for p in trees.patches.iterdir())
    assert names == [
        "manifest.json",
        "partial_fc_v2.py.diff",
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
    assert len(loaded.files["train_v2.py"].hunks) >= 3


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
        assert parse_diff(gnu, rel) == fp.hunks  # "--- a/train_v2.py<TAB>2024-11-06 ..." is accepted
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
    assert names == ["README.md", "manifest.json", "train_v2.py.diff", "upstream.json"]


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
    """Any pair of contents (CRLF, blank lines, with or without a final newline) diffs, parses, applies and reverts
    to the exact bytes."""
    old_bytes = (ending.join(old) + (ending if old_final and old else "")).encode()
    new_bytes = (ending.join(new) + (ending if new_final and new else "")).encode()
    if old_bytes == new_bytes:
        return
    hunks = parse_diff(unified_diff("f.py", old_bytes, new_bytes), "f.py")
    fp = FilePatch("f.py", "0" * 64, "1" * 64, "f.py.diff", hunks)
    assert fp.patch_bytes(old_bytes) == new_bytes
    assert fp.unpatch_bytes(new_bytes) == old_bytes


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


def test_modified_file_in_a_hunk_is_refused_and_nothing_is_written(trees: Trees) -> None:
    line = b'    distributed.init_process_group("nccl")\n'
    hunk = hunk_containing(trees.patch_set.files["train_v2.py"], line)
    edit(trees.target / "train_v2.py", line, b'    distributed.init_process_group("gloo")\n')
    before_stats, before_bytes = tree_stats(trees.target), tree_bytes(trees.target)
    with pytest.raises(PatchError) as err:
        apply(trees.target, trees.patch_set)
    message = str(err.value)
    assert f"train_v2.py.diff: hunk {hunk.number} ({hunk.header}) does not apply" in message
    assert 'distributed.init_process_group("nccl")\' but is \'    distributed.init_process_group("gloo")\'' in message
    assert "differs from upstream arcface_torch 0159b24d" in message
    assert "git checkout 0159b24d44cbc91abbd07b7a6fab0ba923a7fddf -- FILE" in message
    assert "nothing was changed" in message
    assert [p for p in err.value.problems if "train_v2.py" in p] and len(err.value.problems) == 1
    # partial_fc_v2.py comes first and could have been patched: all or nothing means it was not.
    assert tree_stats(trees.target) == before_stats
    assert tree_bytes(trees.target) == before_bytes
    assert status(trees.target, trees.patch_set)["partial_fc_v2.py"] == FileState.UPSTREAM


def test_shifted_lines_are_reported_with_their_offset(trees: Trees) -> None:
    edit(trees.target / "train_v2.py", b"import argparse\n", b"import argparse\nimport sys\n")
    with pytest.raises(PatchError, match=r"hunk 1 \(@@ .* @@\) does not apply.*lines away: lines were added"):
        apply(trees.target, trees.patch_set)


def edit_line_outside_hunks(path: Path, fp: FilePatch, patched: bool) -> None:
    """Change one non-blank line that no hunk covers (in upstream or patched coordinates), keeping line numbers."""
    spans = [(h.new_index, h.new_count) if patched else (h.old_index, h.old_count) for h in fp.hunks]
    covered = {i for start, count in spans for i in range(start, start + count)}
    lines = path.read_bytes().split(b"\n")
    free = next(i for i in range(len(lines)) if i not in covered and lines[i].strip())
    lines[free] += b"  # local edit"
    path.write_bytes(b"\n".join(lines))


def test_modified_file_whose_hunks_still_match_is_refused(trees: Trees) -> None:
    edit_line_outside_hunks(trees.target / "train_v2.py", trees.patch_set.files["train_v2.py"], patched=False)
    with pytest.raises(PatchError, match=r"train_v2\.py: differs .*all hunks of train_v2\.py\.diff match but the file"):
        apply(trees.target, trees.patch_set)


def test_patched_file_with_local_edits_is_recognised(trees: Trees) -> None:
    apply(trees.target, trees.patch_set)
    edit_line_outside_hunks(trees.target / "train_v2.py", trees.patch_set.files["train_v2.py"], patched=True)
    with pytest.raises(PatchError, match="looks like a patched file with local edits"):
        apply(trees.target, trees.patch_set)
    with pytest.raises(PatchError, match=r"differs from the facedistill-patched version.*all hunks .* match"):
        revert(trees.target, trees.patch_set)


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
    hunk = hunk_containing(trees.patch_set.files["train_v2.py"], b"try:\n")
    assert BACKEND_LINE in hunk.new_lines
    edit(trees.target / "train_v2.py", BACKEND_LINE, b'backend = "gloo"\n')
    before = tree_bytes(trees.target)
    with pytest.raises(PatchError) as err:
        revert(trees.target, trees.patch_set)
    assert f"train_v2.py.diff: hunk {hunk.number} ({hunk.header}, reversed) does not apply" in str(err.value)
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


# ------------------------------------------------------------------------------------------- loading a patch set


def _one_file_set(tmp_path: Path, diff: bytes, path: str = "train_v2.py") -> Path:
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "x.diff").write_bytes(diff)
    entry = {"upstream_sha256": "0" * 64, "patched_sha256": "1" * 64, "diff": "x.diff"}
    (folder / "manifest.json").write_text(patching.json.dumps({"commit": "0159b24d", "files": {path: entry}}))
    return folder


@pytest.mark.parametrize(
    ("diff", "path", "message"),
    [
        (b"--- /dev/null\n+++ b/train_v2.py\n@@ -0,0 +1 @@\n+x\n", "train_v2.py", "creates train_v2.py"),
        (b"--- a/train_v2.py\n+++ /dev/null\n@@ -1 +0,0 @@\n-x\n", "train_v2.py", "deletes train_v2.py"),
        (b"diff --git a/x b/y\nrename from x\n", "train_v2.py", "renames a file"),
        (b"--- a/losses.py\n+++ b/losses.py\n@@ -1 +1 @@\n-x\n+y\n", "train_v2.py", "manifest lists it for"),
        (b"--- a/train_v2.py\n+++ b/train_v2.py\n@@ -1,2 +1,2 @@\n-x\n+y\n", "train_v2.py", "truncated"),
        (
            b"--- a/train_v2.py\n+++ b/train_v2.py\n@@ -1 +1 @@\n-x\n+y\n--- a/losses.py\n+++ b/losses.py\n",
            "train_v2.py",
            "more than one file",
        ),
        (b"--- a/x\n+++ b/x\n@@ -1 +1 @@\n-x\n+y\n", "../x", "invalid file path"),
    ],
)
def test_load_rejects_unsupported_diffs(tmp_path: Path, diff: bytes, path: str, message: str) -> None:
    with pytest.raises(PatchError, match=message):
        PatchSet.load(_one_file_set(tmp_path, diff, path))


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
