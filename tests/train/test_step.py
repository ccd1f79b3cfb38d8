import pytest
import torch
import torch.nn.functional as F
from torch import nn

from facedistill.data.datasets import Batch
from facedistill.data.images import normalise, random_horizontal_flip, random_shift
from facedistill.distill.base import DistillMethod
from facedistill.teachers.cache import centre_rows
from facedistill.train.step import TrainingDivergedError, TrainStep, step_generator


class RecordingMethod(DistillMethod):
    """Pulls embeddings towards the teacher rows it is handed, and remembers what it saw."""

    name = "recording"

    def __init__(self, poison: bool = False) -> None:
        nn.Module.__init__(self)
        self.poison = poison
        self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, embeddings, labels, teacher):
        self.seen.append((labels, teacher))
        loss = (1 - F.cosine_similarity(embeddings, teacher)).mean()
        return {"pull": loss * float("nan") if self.poison else loss}


class TwoViewCache:
    """Row i, view v is the vector [i, v, 1, ...]: the rows handed to the method say which view was taken."""

    def rows(
        self, indices: torch.Tensor, mirrored: torch.Tensor | None = None, offset: torch.Tensor | None = None
    ) -> torch.Tensor:
        view = torch.zeros(len(indices)) if mirrored is None else mirrored.float()
        return centre_rows(torch.stack([indices.float(), view, *torch.ones(6, len(indices))], dim=1), offset)


def _step(method: DistillMethod, model: nn.Module, **options) -> TrainStep:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    return TrainStep(
        model, method, optimizer, scheduler, scaler, torch.device("cpu"), 10, 4, seed=3, cache=TwoViewCache(), **options
    )


def _batch() -> Batch:
    images = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    return Batch(images, torch.tensor([0, 1, 2, 3]), torch.tensor([10, 11, 12, 13]), skipped=0)


def test_the_student_sees_the_mirror_and_the_method_gets_the_mirror_rows() -> None:
    seen_images: list[torch.Tensor] = []
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 8))
    model.register_forward_pre_hook(lambda module, args: seen_images.append(args[0].clone()))
    method = RecordingMethod()
    train_step = _step(method, model, memory_format=torch.contiguous_format, grad_clip=1.0)
    batch = _batch()
    before = [p.detach().clone() for p in model.parameters()]
    terms, values, skipped, rows = train_step(batch, step=5)

    flipped, mirrored = random_horizontal_flip(batch.images, step_generator(3, 5))
    assert 0 < int(mirrored.sum()) < 4, "this seed must mirror some images and not others"
    assert torch.equal(seen_images[0], normalise(flipped))
    labels, teacher = method.seen[0]
    assert torch.equal(teacher[:, 0], batch.indices.float()) and torch.equal(teacher[:, 1], mirrored.float())
    assert set(terms) == {"pull"} and values.shape == (2,) and values[0] == values[1]
    assert (skipped, rows) == (0, 4)
    # One SGD step, clipped to a global norm of 1 at lr 0.1: no weight moved by more than 0.1.
    moved = [(p.detach() - b).abs().max().item() for p, b in zip(model.parameters(), before, strict=True)]
    assert 0 < max(moved) <= 0.1 + 1e-6


def test_shift_translates_after_the_same_flip_and_keeps_the_mirror_rows() -> None:
    seen_images: list[torch.Tensor] = []
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 8))
    model.register_forward_pre_hook(lambda module, args: seen_images.append(args[0].clone()))
    method = RecordingMethod()
    batch = _batch()
    _step(method, model, memory_format=torch.contiguous_format, shift=2)(batch, step=5)

    generator = step_generator(3, 5)
    flipped, mirrored = random_horizontal_flip(batch.images, generator)
    expected = random_shift(flipped, generator, 2)
    assert not torch.equal(expected, flipped), "this seed must move some image"
    assert torch.equal(seen_images[0], normalise(expected))
    # The teacher rows are those of the unshifted (possibly mirrored) image, as without the shift.
    _, teacher = method.seen[0]
    assert torch.equal(teacher[:, 1], mirrored.float())


def test_a_non_finite_loss_stops_before_the_update_with_the_hint() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 8))
    before = [p.detach().clone() for p in model.parameters()]
    train_step = _step(RecordingMethod(poison=True), model, divergence_hint="; resume from last.pt")
    with pytest.raises(TrainingDivergedError, match="loss is nan at step 7; resume from last.pt"):
        train_step(_batch(), step=7)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))


def test_teacher_offset_is_subtracted_from_the_normalised_rows() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 8))
    method = RecordingMethod()
    offset = torch.linspace(0.0, 0.7, 8)
    batch = _batch()
    _step(method, model, teacher_offset=offset, flip=False)(batch, step=0)
    _, teacher = method.seen[0]
    raw = TwoViewCache().rows(batch.indices)
    torch.testing.assert_close(teacher, F.normalize(raw, dim=1) - offset)


def test_the_loaders_batch_goes_to_the_device_itself_not_a_host_copy_of_it(monkeypatch) -> None:
    """On a GPU run the loader's batch is in pinned memory, and only a copy from it is asynchronous: a host-side
    clone first (for the flip or the shift) would make every step's transfer unpinned and synchronous. The step
    hands the batch tensor itself to the device copy, and leaves it unchanged."""
    copied: list[int] = []
    to = torch.Tensor.to

    def recording_to(self, *args, **kwargs):
        if self.dtype == torch.uint8 and self.dim() == 4:
            copied.append(self.data_ptr())
        return to(self, *args, **kwargs)

    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 8))
    train_step = _step(RecordingMethod(), model, memory_format=torch.contiguous_format, shift=2)
    batch = _batch()
    original = batch.images.clone()
    monkeypatch.setattr(torch.Tensor, "to", recording_to)
    train_step(batch, step=5)  # this seed mirrors some of the images (see the test above)
    assert copied[:1] == [batch.images.data_ptr()]
    assert torch.equal(batch.images, original)
