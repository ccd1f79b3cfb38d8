"""Identity-balanced batches: P identities x K images each, for losses that need positive pairs in a batch.

Triplet distillation, EKD (and RKD's intra-class relations) compare pairs of images of the same identity inside a
batch; a shuffled batch from tens of thousands of identities has almost none. ``IdentityBalancedSampler`` builds
each batch from ``batch_size // images_per_identity`` distinct identities with ``images_per_identity`` images each
(the "PK" batches of Hermans et al., arXiv 1703.07737; TFace's EKD uses 8 x 4 per GPU).

Over an epoch the identities are visited in random permutations, one after another, so every identity appears
``epoch_batches * identities_per_batch / num_identities`` times, give or take one (a permutation boundary inside a
batch defers a repeated identity to the next batch). Within an identity, images are taken from a shuffled cycle of
its images, so over the epochs every image is used; an identity with fewer than ``images_per_identity`` images
contributes all of them and fills the rest by drawing from them again (sampling with replacement).

An identity with a single image can only be paired with itself: its slots hold that image
``images_per_identity`` times. The copies differ only where the training loop's random flip flips one and not
another (then the pair is image + mirror, which the teacher cache holds as a separate row); otherwise they are
identical, a positive pair at distance 0 that the pair losses treat as an easy positive. They still train the
margin loss, so such identities are kept by default; ``min_images=2`` leaves them (and their images) out.

Everything is a function of (seed, epoch): resuming mid-epoch takes ``epoch_batches(epoch)[offset:]``.
"""

from __future__ import annotations

from collections import deque

import numpy as np


class IdentityBalancedSampler:
    def __init__(
        self, labels: np.ndarray, batch_size: int, images_per_identity: int, seed: int, min_images: int = 1
    ) -> None:
        labels = np.asarray(labels)
        if labels.ndim != 1 or len(labels) == 0:
            raise ValueError("IdentityBalancedSampler needs a non-empty 1-D array of labels")
        if images_per_identity < 2:
            raise ValueError(f"images_per_identity must be >= 2 to give positive pairs, got {images_per_identity}")
        if batch_size < images_per_identity or batch_size % images_per_identity:
            raise ValueError(
                f"batch_size ({batch_size}) must be a positive multiple of images_per_identity ({images_per_identity})"
            )
        if min_images < 1:
            raise ValueError(f"min_images must be >= 1, got {min_images}")
        self.batch_size = batch_size
        self.images_per_identity = images_per_identity
        self.identities_per_batch = batch_size // images_per_identity
        self.seed = seed
        order = np.argsort(labels, kind="stable")
        identities, starts, counts = np.unique(labels[order], return_index=True, return_counts=True)
        keep = counts >= min_images
        self.identities = identities[keep]
        self.images = [order[start : start + count] for start, count in zip(starts[keep], counts[keep], strict=True)]
        if len(self.identities) < self.identities_per_batch:
            raise ValueError(
                f"a batch needs {self.identities_per_batch} distinct identities "
                f"(batch_size {batch_size} / images_per_identity {images_per_identity}) but only "
                f"{len(self.identities)} have >= {min_images} image(s); lower batch_size or raise images_per_identity"
            )
        self.num_batches = len(labels) // batch_size
        if self.num_batches == 0:
            raise ValueError(f"{len(labels)} images are fewer than one batch of {batch_size}")

    def __len__(self) -> int:
        return self.num_batches

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """The epoch's batches of dataset indices; the same for the same (seed, epoch)."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        rng = np.random.default_rng([self.seed % 2**32, epoch])
        positions = np.arange(len(self.identities))
        stream: deque[int] = deque()
        cycles: dict[int, deque[int]] = {}
        batches = []
        for _ in range(self.num_batches):
            chosen: dict[int, None] = {}  # insertion-ordered set
            deferred: list[int] = []
            while len(chosen) < self.identities_per_batch:
                if not stream:
                    stream.extend(rng.permutation(positions).tolist())
                position = stream.popleft()
                if position in chosen:
                    deferred.append(position)
                else:
                    chosen[position] = None
            stream.extendleft(reversed(deferred))
            batch: list[int] = []
            for position in chosen:
                batch.extend(self._draw(position, cycles, rng))
            batches.append(batch)
        return batches

    def _draw(self, position: int, cycles: dict[int, deque[int]], rng: np.random.Generator) -> list[int]:
        images = self.images[position]
        k = self.images_per_identity
        if len(images) < k:
            extra = rng.choice(images, size=k - len(images), replace=True)
            return [int(i) for i in np.concatenate([rng.permutation(images), extra])]
        cycle = cycles.setdefault(position, deque())
        drawn: list[int] = []
        while len(drawn) < k:
            if not cycle:
                # A fresh cycle never repeats an image already drawn for this slot: take the unused ones first.
                fresh = [int(i) for i in rng.permutation(images)]
                cycle.extend([i for i in fresh if i not in drawn] + [i for i in fresh if i in drawn])
            drawn.append(cycle.popleft())
        return drawn
