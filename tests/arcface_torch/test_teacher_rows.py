"""The teacher's cached rows are read by the DataLoader workers, with each sample, not by the training process.

On a GPU the training process must not stop each step to copy the batch's record indices back to the host and
read the memory-mapped teacher cache while the GPU waits. These tests make the cache refuse every read in the
training process (``get_worker_info() is None``) and check that a real run of the patched ``train_v2.py`` with a
worker still trains, and that the loss of the head fed with the dataset's rows is the loss it computed when it
read the rows itself.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import get_worker_info

from facedistill.arcface_torch.data import normalise_like_upstream
from facedistill.arcface_torch.head import DistillHead
from facedistill.teachers.cache import TeacherCache
from tests.arcface_torch.helpers import import_patched_dataset, run, tiny_md_recipe, torchrun

MAIN_PROCESS_READ = "the training process read the teacher cache; its rows belong to the DataLoader workers"

# Runs train_v2.py (argv[2:]) in the torchrun rank with TeacherCache.rows refusing reads outside DataLoader workers;
# the workers, forked from the rank, inherit the guard. A worker's read touches argv[1].
GUARD = r"""
import runpy, sys
from pathlib import Path

from torch.utils.data import get_worker_info

from facedistill.teachers.cache import TeacherCache

marker, original = Path(sys.argv[1]), TeacherCache.rows


def rows(self, *args, **kwargs):
    if get_worker_info() is None:
        raise RuntimeError("MESSAGE")
    marker.touch()
    return original(self, *args, **kwargs)


TeacherCache.rows = rows
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
""".replace("MESSAGE", MAIN_PROCESS_READ)


def test_a_real_run_with_a_worker_never_reads_the_teacher_cache_in_the_training_process(
    patched_checkout: Path,
) -> None:
    root = patched_checkout
    recipe = (root / "configs" / "tiny_md.py").read_text()
    recipe += "config.num_workers = 1\nconfig.num_epoch = 1\nconfig.val_targets = []\n"
    (root / "configs" / "tiny_md_worker.py").write_text(recipe)
    (root / "guard_teacher_rows.py").write_text(GUARD)
    marker = root / "work_dirs" / "teacher_rows_read_in_a_worker"
    marker.unlink(missing_ok=True)
    result = run(
        torchrun(1, "guard_teacher_rows.py", str(marker), "train_v2.py", "configs/tiny_md_worker"),
        cwd=root,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert MAIN_PROCESS_READ not in result.stderr
    log = (root / "work_dirs" / "tiny_md_worker" / "training.log").read_text()
    values = [float(value) for value in re.findall(r"Loss (\d+\.\d+)", log)]
    assert len(values) >= 4 and all(value > 0 for value in values), log[-2000:]
    assert marker.exists(), "no DataLoader worker read a teacher row"


def _old_forward(
    head: DistillHead,
    cache: TeacherCache,
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    index: torch.Tensor,
    mirrored: torch.Tensor,
) -> torch.Tensor:
    """``DistillHead.forward`` as it was when it read the teacher rows itself, from the batch's index and flags."""
    rows = mirrored if head.method.mirror_rows else None
    teacher = cache.rows(index, rows, head.teacher_offset)
    if head.training:
        head.method.set_progress(head.step, head.step / head.steps_per_epoch)
        head.step += 1
    return sum(head.method(embeddings, labels, teacher).values())  # type: ignore[return-value]


@pytest.mark.parametrize(
    "changes",
    [
        {},  # the recipe's preset "facedistill": a mirrored image reads the mirror's row; centred teacher space
        {"loss_params": {"preset": "official"}, "teacher_subtract_mean": False},  # a mirror reads the original's row
    ],
    ids=["mirror-rows-centred", "official-original-rows"],
)
def test_workers_serve_the_rows_and_the_head_gives_the_loss_it_gave_reading_them_itself(
    patched_checkout: Path, monkeypatch: pytest.MonkeyPatch, changes: dict[str, object]
) -> None:
    from facedistill.arcface_torch import hooks
    from facedistill.arcface_torch.head import build_distill_head

    monkeypatch.chdir(patched_checkout)
    cfg = tiny_md_recipe(patched_checkout, **changes)
    head = build_distill_head(cfg, 0, 1).train()
    assert (head.teacher_offset is not None) == bool(cfg.teacher_subtract_mean)
    before = copy.deepcopy(head)
    reader = TeacherCache(Path("data/tiny/teacher_cache"))
    original_rows = TeacherCache.rows

    def rows_in_workers_only(self: TeacherCache, *args: Any, **kwargs: Any) -> torch.Tensor:
        if get_worker_info() is None:
            raise RuntimeError(MAIN_PROCESS_READ)
        return original_rows(self, *args, **kwargs)

    monkeypatch.setattr(TeacherCache, "rows", rows_in_workers_only)
    dataset = import_patched_dataset(patched_checkout, "patched_dataset_teacher_rows")
    loader = dataset.get_dataloader("data/tiny", 0, 8, num_workers=1, teacher=hooks.teacher_rows(cfg))
    images, labels, teacher = next(iter(loader))
    torch.manual_seed(0)
    embeddings = torch.randn(8, 128, requires_grad=True)
    loss = head(embeddings, labels, teacher)  # no read of the cache in this process, or rows_in_workers_only raises
    loss.backward()

    # The same batch the old way: its record indices (the sampler's first 8) and mirror flags (read off the images).
    index = torch.tensor(list(loader.sampler)[:8])
    mirrored = []
    for image, record in zip(images, index.tolist(), strict=True):
        face = loader.dataset.faces[record][0]
        mirrored.append(torch.equal(image, normalise_like_upstream(face.flip(-1))))
        assert mirrored[-1] or torch.equal(image, normalise_like_upstream(face))
    assert 0 < sum(mirrored) < 8, mirrored  # both kinds of view in the batch
    monkeypatch.setattr(TeacherCache, "rows", original_rows)
    old_embeddings = embeddings.detach().clone().requires_grad_(True)
    old_loss = _old_forward(before, reader, old_embeddings, labels, index, torch.tensor(mirrored))
    old_loss.backward()
    assert torch.equal(loss.detach(), old_loss.detach()), (loss.item(), old_loss.item())
    assert embeddings.grad is not None and old_embeddings.grad is not None
    assert torch.equal(embeddings.grad, old_embeddings.grad)
    assert head.step == before.step == 1
