"""arcface_torch's training and validation data, read by facedistill instead of mxnet and torchvision.

The patched ``dataset.py`` serves ``train.rec``/``train.idx`` and image folders through these datasets, and the
patched ``eval/verification.py`` loads ``.bin`` verification packs through :func:`load_bin`. They return exactly
what upstream's did: a float image normalised to [-1, 1] (``ToTensor`` then ``Normalize(0.5, 0.5)``), randomly
mirrored with probability 0.5 (``RandomHorizontalFlip``), and its label; with ``config.shift = K`` (a facedistill
key, 0 by default) the image is then translated by up to K pixels (``random_shift``). With ``sample_info`` (a
facedistill method is on) each sample also carries its record index and whether it was mirrored, so the head can
read the teacher's cached embedding of that very view.

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


def normalise_like_upstream(image_uint8_chw: torch.Tensor) -> torch.Tensor:
    """``transforms.ToTensor()`` then ``Normalize(mean=0.5, std=0.5)``: float32 in [-1, 1]."""
    return (image_uint8_chw.float() / 255.0 - 0.5) / 0.5


class FrameworkFaces(Dataset):
    """A facedistill ``FaceDataset`` served the way arcface_torch's datasets serve samples.

    Items are ``(image, label)``, or ``(image, label, index, mirrored)`` with ``sample_info``. ``index`` is the
    sample's position in the dataset, which is its row in the teacher cache; ``mirrored`` says whether the image
    was flipped, which selects the cache's mirror row. The flip draws ``torch.rand(1) < 0.5`` like torchvision's
    ``RandomHorizontalFlip``, so the framework's worker seeding governs it as before. ``shift`` translates the
    image after the flip by dy, dx drawn from [-shift, shift] (black border), drawn from the same generator; with
    ``shift=0`` nothing more is drawn, so the flips are upstream's. The teacher's cached row stays the target.
    """

    def __init__(self, faces: FaceDataset, sample_info: bool = False, flip: bool = True, shift: int = 0) -> None:
        if shift < 0:
            raise ValueError(f"config.shift must be >= 0 pixels, got {shift}")
        self.faces = faces
        self.sample_info = sample_info
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
        if not self.sample_info:
            return image, label_tensor
        return image, label_tensor, torch.tensor(index, dtype=torch.long), torch.tensor(mirrored)


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

    def __init__(self, root_dir: str | Path, sample_info: bool = False, shift: int = 0) -> None:
        super().__init__(RecordDataset(Path(root_dir) / "train.rec"), sample_info, shift=shift)


class FolderFaceDataset(FrameworkFaces):
    """Identity folders (upstream's torchvision ``ImageFolder`` branch), read without torchvision."""

    def __init__(self, root_dir: str | Path, sample_info: bool = False, shift: int = 0) -> None:
        # open_framework_dataset: a config.rec that is neither a pack nor a folder is refused saying what to do
        super().__init__(open_framework_dataset(root_dir), sample_info, shift=shift)


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
