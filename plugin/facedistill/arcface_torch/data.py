"""arcface_torch's training and validation data, read by facedistill instead of mxnet and torchvision.

The patched ``dataset.py`` serves ``train.rec``/``train.idx`` and image folders through these datasets, and the
patched ``eval/verification.py`` loads ``.bin`` verification packs through :func:`load_bin`. They return exactly
what upstream's did: a float image normalised to [-1, 1] (``ToTensor`` then ``Normalize(0.5, 0.5)``), randomly
mirrored with probability 0.5 (``RandomHorizontalFlip``), and its label; with ``config.shift = K`` (a facedistill
key, 0 by default) the image is then translated by up to K pixels (``random_shift``). With a ``teacher`` (a
facedistill method is on) each sample also carries the teacher cache's rows of its record (:class:`TeacherRows`),
read by the DataLoader worker that makes the sample: the training process neither copies record indices back from
the GPU nor reads the memory-mapped cache while the GPU waits.

What upstream does unsafely or not at all on a current stack, fixed here:
- RecordIO is read without mxnet (``facedistill.data.recordio``; mxnet cannot import with numpy >= 1.24);
- ``.bin`` packs are read with a restricted unpickler that only builds bytes, lists, bools and numpy arrays,
  where upstream calls ``pickle.load`` on a downloaded file (which can run arbitrary code);
- on machines without CUDA, batches come from a plain DataLoader (upstream's ``DataLoaderX`` needs CUDA streams).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from facedistill.data.datasets import FaceDataset, ImageFolderDataset, RecordDataset
from facedistill.data.images import decode_image, random_shift
from facedistill.data.verification import check_bin_folds, read_bin
from facedistill.teachers.cache import TeacherCache


def normalise_like_upstream(image_uint8_chw: torch.Tensor) -> torch.Tensor:
    """``transforms.ToTensor()`` then ``Normalize(mean=0.5, std=0.5)``: float32 in [-1, 1]."""
    return (image_uint8_chw.float() / 255.0 - 0.5) / 0.5


class TeacherRows:
    """The teacher cache's rows of one sample, read where the sample is made (a DataLoader worker).

    ``row(index, mirrored)`` is float32 [2, d]: the row of record ``index``'s original image, then the row of the
    view the sample shows (the mirror's when ``mirrored``). The head picks one of the two by its method's
    ``mirror_rows`` and centres it (``config.teacher_subtract_mean``) on its own device, so the dataset, which the
    framework builds before the head, needs neither the method nor the offset. Only the cache's directory is
    pickled: each process opens the memory map itself (a pickled ``np.memmap`` would be a copy of the whole cache),
    and lazily, so that a missing or stale cache is still refused by the head's checks, before any sample is read.
    """

    def __init__(self, directory: str | Path, command: str) -> None:
        self.directory = Path(directory)
        self.command = command  # named in the cache's refusals
        self._cache: TeacherCache | None = None

    def __getstate__(self) -> dict[str, object]:
        state = self.__dict__.copy()
        state["_cache"] = None
        return state

    @property
    def cache(self) -> TeacherCache:
        if self._cache is None:
            self._cache = TeacherCache(self.directory, self.command)
        return self._cache

    def row(self, index: int, mirrored: bool) -> torch.Tensor:
        return self.cache.rows(torch.tensor([index, index]), torch.tensor([False, mirrored]))


class FrameworkFaces(Dataset):
    """A facedistill ``FaceDataset`` served the way arcface_torch's datasets serve samples.

    Items are ``(image, label)``, or ``(image, label, teacher_rows)`` with a ``teacher``: the [2, d] rows of
    :meth:`TeacherRows.row` for the sample's position in the dataset (its row in the teacher cache) and whether the
    image was flipped. The flip draws ``torch.rand(1) < 0.5`` like torchvision's ``RandomHorizontalFlip``, so the
    framework's worker seeding governs it as before. ``shift`` translates the image after the flip by dy, dx drawn
    from [-shift, shift] (black border), drawn from the same generator; with ``shift=0`` nothing more is drawn, so
    the flips are upstream's. The teacher's cached row of the unshifted view stays the target.
    """

    def __init__(
        self, faces: FaceDataset, teacher: TeacherRows | None = None, flip: bool = True, shift: int = 0
    ) -> None:
        if shift < 0:
            raise ValueError(f"config.shift must be >= 0 pixels, got {shift}")
        self.faces = faces
        self.teacher = teacher
        self.flip = flip
        self.shift = shift

    def __len__(self) -> int:
        return len(self.faces)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, ...]:
        item = self.faces[index]
        if item is None:  # only with skip_bad, which the framework's datasets never set
            raise ValueError(f"training image #{index} is unreadable")
        image, label, _ = item
        mirrored = self.flip and bool(torch.rand(1) < 0.5)
        if mirrored:
            image = image.flip(-1)
        if self.shift:
            image = random_shift(image[None], None, self.shift)[0]
        image = normalise_like_upstream(image)
        label_tensor = torch.tensor(label, dtype=torch.long)
        if self.teacher is None:
            return image, label_tensor
        return image, label_tensor, self.teacher.row(index, mirrored)


def open_framework_dataset(root_dir: str | Path) -> FaceDataset:
    """The facedistill dataset behind an arcface_torch ``config.rec``: ``train.rec`` + ``train.idx`` in
    ``root_dir``, else identity folders (torchvision ``ImageFolder``'s layout, classes in sorted order)."""
    root = Path(root_dir)
    if (root / "train.rec").exists() and (root / "train.idx").exists():
        return RecordDataset(root / "train.rec")
    if not root.is_dir():
        raise FileNotFoundError(
            f"config.rec = {str(root_dir)!r}: no train.rec/train.idx and no image folder there; pack one with "
            "`facedistill pack FACES/ DIR` or point config.rec at it"
        )
    return ImageFolderDataset(root)


class RecordFaceDataset(FrameworkFaces):
    """``train.rec``/``train.idx`` in ``root_dir`` (upstream's ``MXFaceDataset``), read without mxnet."""

    def __init__(self, root_dir: str | Path, teacher: TeacherRows | None = None, shift: int = 0) -> None:
        super().__init__(RecordDataset(Path(root_dir) / "train.rec"), teacher, shift=shift)


class FolderFaceDataset(FrameworkFaces):
    """Identity folders (upstream's torchvision ``ImageFolder`` branch), read without torchvision."""

    def __init__(self, root_dir: str | Path, teacher: TeacherRows | None = None, shift: int = 0) -> None:
        # open_framework_dataset: a config.rec that is neither a pack nor a folder is refused saying what to do
        super().__init__(open_framework_dataset(root_dir), teacher, shift=shift)


class CPUDataLoader(DataLoader):
    """``DataLoaderX``'s signature (a ``local_rank`` keyword) on machines without CUDA: batches stay on the CPU,
    where the model is; pinning memory only matters for copies to a GPU, so it is turned off."""

    def __init__(self, local_rank: int, **kwargs: object) -> None:
        kwargs["pin_memory"] = False
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.local_rank = local_rank


@torch.no_grad()
def load_bin(path: str | Path, image_size: tuple[int, int] = (112, 112)) -> tuple[list[torch.Tensor], list[bool]]:
    """An insightface ``.bin`` verification pack as upstream's ``load_bin`` returns it: ``([images, mirrored],
    issame)``, each a float32 [2P, 3, H, W] tensor of RGB values in 0..255, pair k being images 2k and 2k+1.

    A pair order whose 10 contiguous folds lack genuine or impostor pairs is refused (the framework's scoring
    divides by both counts). Images must already be ``image_size``; upstream resized the short side, which for
    the square 112x112 packs of this field is a no-op, so another size is refused with the pack and image named
    rather than silently resized.
    """
    images, issame = read_bin(path)
    check_bin_folds(issame, path)  # before decoding: the framework would only fail at its first validation
    height, width = image_size
    data = torch.empty((len(images), 3, height, width))
    for index, encoded in enumerate(images):
        pixels = decode_image(encoded, f"{path} image #{index}", expected_size=(width, height))
        data[index] = torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))
    return [data, data.flip(-1)], [bool(value) for value in np.asarray(issame).tolist()]
