from collections import Counter

import numpy as np
import pytest

from facedistill.data.samplers import IdentityBalancedSampler

# 12 identities: sizes 1 (a singleton), 2, 3 and then 5..13 images.
SIZES = [1, 2, 3, 5, 6, 7, 8, 9, 10, 11, 12, 13]
LABELS = np.repeat(np.arange(len(SIZES)), SIZES)
rng = np.random.default_rng(0)
SHUFFLED = LABELS[rng.permutation(len(LABELS))]  # datasets need not be sorted by label


def test_batches_hold_distinct_identities_with_k_images_each() -> None:
    sampler = IdentityBalancedSampler(SHUFFLED, batch_size=12, images_per_identity=3, seed=0)
    batches = sampler.epoch_batches(0)
    assert len(sampler) == len(batches) == len(LABELS) // 12
    for batch in batches:
        assert len(batch) == 12
        counts = Counter(SHUFFLED[batch].tolist())
        assert len(counts) == 4 and set(counts.values()) == {3}


def test_deterministic_from_seed_and_epoch() -> None:
    sampler = IdentityBalancedSampler(SHUFFLED, batch_size=12, images_per_identity=3, seed=7)
    again = IdentityBalancedSampler(SHUFFLED, batch_size=12, images_per_identity=3, seed=7)
    assert sampler.epoch_batches(2) == again.epoch_batches(2)
    assert sampler.epoch_batches(2) != sampler.epoch_batches(3)
    other = IdentityBalancedSampler(SHUFFLED, batch_size=12, images_per_identity=3, seed=8)
    assert sampler.epoch_batches(2) != other.epoch_batches(2)


def test_every_identity_appears_about_equally_over_an_epoch() -> None:
    labels = np.repeat(np.arange(7), 20)
    sampler = IdentityBalancedSampler(labels, batch_size=6, images_per_identity=2, seed=1)
    batches = sampler.epoch_batches(0)  # 23 batches x 3 identities = 69 slots over 7 identities
    slots = Counter(label for batch in batches for label in set(labels[batch].tolist()))
    assert sum(slots.values()) == 69
    assert max(slots.values()) - min(slots.values()) <= 2


def test_small_identities_give_all_their_images_then_repeat_them() -> None:
    sampler = IdentityBalancedSampler(SHUFFLED, batch_size=12, images_per_identity=3, seed=0)
    by_identity = {label: set(np.flatnonzero(label == SHUFFLED).tolist()) for label in range(len(SIZES))}
    seen_large = False
    for epoch in range(3):
        for batch in sampler.epoch_batches(epoch):
            for start in range(0, 12, 3):
                slot = batch[start : start + 3]
                label = int(SHUFFLED[slot[0]])
                assert set(slot) <= by_identity[label]
                if SIZES[label] < 3:
                    assert set(slot) == by_identity[label]  # every image, the rest drawn again from them
                else:
                    assert len(set(slot)) == 3  # no repeat while the identity has enough images
                    seen_large = True
    assert seen_large


def test_images_of_an_identity_are_cycled_through() -> None:
    labels = np.repeat(np.arange(4), 9)
    sampler = IdentityBalancedSampler(labels, batch_size=8, images_per_identity=2, seed=3)
    used = {index for batch in sampler.epoch_batches(0) for index in batch}
    # 4 batches x 8 = 32 draws over 36 images, each identity drawn 8 times from a shuffled cycle of 9.
    assert len(used) == 32


def test_singletons_repeat_their_image_or_are_left_out() -> None:
    labels = np.array([0, 1, 1, 2, 2, 3, 3, 3])
    with_singletons = IdentityBalancedSampler(labels, batch_size=4, images_per_identity=2, seed=0)
    slots = [b[i : i + 2] for e in range(5) for b in with_singletons.epoch_batches(e) for i in (0, 2)]
    assert [0, 0] in slots
    without = IdentityBalancedSampler(labels, batch_size=4, images_per_identity=2, seed=0, min_images=2)
    assert all(0 not in batch for e in range(5) for batch in without.epoch_batches(e))


def test_bad_arguments_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="multiple of images_per_identity"):
        IdentityBalancedSampler(LABELS, batch_size=10, images_per_identity=4, seed=0)
    with pytest.raises(ValueError, match="images_per_identity must be >= 2"):
        IdentityBalancedSampler(LABELS, batch_size=10, images_per_identity=1, seed=0)
    with pytest.raises(ValueError, match="distinct identities"):
        IdentityBalancedSampler(LABELS, batch_size=26, images_per_identity=2, seed=0)
    with pytest.raises(ValueError, match="fewer than one batch"):
        IdentityBalancedSampler(np.arange(4), batch_size=8, images_per_identity=2, seed=0)
    with pytest.raises(ValueError, match="epoch must be >= 0"):
        IdentityBalancedSampler(LABELS, batch_size=4, images_per_identity=2, seed=0).epoch_batches(-1)
