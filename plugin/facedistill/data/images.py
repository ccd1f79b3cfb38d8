"""Image decoding: encoded bytes or files to uint8 RGB tensors [3, H, W], with errors that name the source."""

from __future__ import annotations

import cv2
import numpy as np
import torch

FACE_SIZE = (112, 112)


class ImageDecodeError(ValueError):
    """An image could not be read or decoded; the message names the file or record."""


def decode_image(data: bytes, source: str, expected_size: tuple[int, int] | None = FACE_SIZE) -> np.ndarray:
    """Decode JPEG/PNG bytes into an HxWx3 uint8 RGB array.

    ``source`` names the file or record in error messages. Faces must already be aligned: a wrong size is an
    error (run ``facedistill align`` first) rather than a silent resize that would change the geometry.
    """
    if not data:
        raise ImageDecodeError(f"{source}: empty image data")
    array = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    if array is None:
        raise ImageDecodeError(f"{source}: not a decodable image (corrupt or truncated JPEG/PNG?)")
    if expected_size is not None and array.shape[:2] != (expected_size[1], expected_size[0]):
        raise ImageDecodeError(
            f"{source}: image is {array.shape[1]}x{array.shape[0]}, expected aligned "
            f"{expected_size[0]}x{expected_size[1]} faces; align it with `facedistill align` first"
        )
    return cv2.cvtColor(array, cv2.COLOR_BGR2RGB)


def to_chw_tensor(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))


def normalise(images: torch.Tensor) -> torch.Tensor:
    """uint8 RGB [B, 3, H, W] -> float32 (x - 127.5) / 127.5, the insightface convention."""
    return images.float().sub_(127.5).div_(127.5)


def _share_of_batch(images: torch.Tensor, global_batch: int | None, offset: int) -> tuple[int, slice]:
    """How many draws a batch augmentation makes (the global batch's size) and which of them are ``images``'."""
    total = images.shape[0] if global_batch is None else global_batch
    if offset < 0 or offset + images.shape[0] > total:
        raise ValueError(f"rows [{offset}, {offset + images.shape[0]}) are not inside a batch of {total}")
    return total, slice(offset, offset + images.shape[0])


def random_horizontal_flip(
    images: torch.Tensor,
    generator: torch.Generator,
    p: float = 0.5,
    *,
    global_batch: int | None = None,
    offset: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mirror a random subset of a uint8 batch; return the batch and the boolean flip mask.

    The flip happens on the batch, not in the dataset, so the mask is known to the training loop: it selects the
    teacher's cached mirror-image embedding for exactly the images the student sees mirrored.

    ``images`` may be rows ``[offset, offset + len(images))`` of a larger batch of ``global_batch`` images (one
    process's share): the mask is then drawn for the whole batch and sliced, so every image flips as it would if
    one process took the whole batch.
    """
    total, rows = _share_of_batch(images, global_batch, offset)
    flipped = (torch.rand(total, generator=generator) < p)[rows]
    # The mask is drawn on the host (the same draws on every device); selecting with it where the batch lives,
    # rather than indexing by it, needs no device-to-host sync and never writes into the caller's batch.
    where = flipped.to(images.device, non_blocking=True).view(-1, *([1] * (images.dim() - 1)))
    return torch.where(where, images.flip(-1), images), flipped


def random_shift(
    images: torch.Tensor,
    generator: torch.Generator | None,
    max_shift: int,
    *,
    global_batch: int | None = None,
    offset: int = 0,
) -> torch.Tensor:
    """Translate each image of a uint8 batch by whole pixels, dy and dx drawn uniformly from [-max_shift, max_shift].

    The uncovered border is black, as in a random crop of the image padded by ``max_shift`` zeros (torchvision's
    ``RandomCrop(112, padding=max_shift)``). The teacher's cached row of the unshifted image stays the target: its
    embedding barely moves under a few pixels of translation (``benchmarks/teacher_shift_invariance.py`` measures
    how little), so the cache serves this augmentation without running the teacher. ``global_batch`` and
    ``offset`` draw for the whole batch and slice, as in :func:`random_horizontal_flip`. ``generator=None`` draws
    from torch's default generator (a DataLoader worker's, seeded by the framework, in the arcface_torch datasets).
    """
    if max_shift < 0:
        raise ValueError(f"max_shift must be >= 0 pixels, got {max_shift}")
    total, rows = _share_of_batch(images, global_batch, offset)
    if max_shift == 0:
        return images
    draws = torch.randint(-max_shift, max_shift + 1, (total, 2), generator=generator)[rows]
    height, width = images.shape[-2:]
    padded = torch.nn.functional.pad(images, (max_shift, max_shift, max_shift, max_shift))
    shifted = torch.empty_like(images)
    for row, (dy, dx) in enumerate(draws.tolist()):
        top, left = max_shift - dy, max_shift - dx
        shifted[row] = padded[row, :, top : top + height, left : left + width]
    return shifted
