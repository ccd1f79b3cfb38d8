"""A fixed, seeded validation split of an identity-folder training set: held-out identities and their pairs.

A test set (LFW in the CPU protocol) must never choose anything: not a checkpoint, not a hyper-parameter, not a
method. Choices need a validation set instead, and for a face model a fair one holds out whole identities: pairs of
images the model saw in training would measure memorisation. :func:`make_identity_split` holds out
``num_val_identities`` identities of the training folder and draws verification pairs among their images only;
:func:`write_split` stores the result as two lists (never images):

    val_identities.txt   one held-out identity per line, sorted; train with
                         ``--set data.exclude_identities=val_identities.txt`` (or ``facedistill pack --exclude``)
    val_pairs.tsv        ``left<TAB>right<TAB>label<TAB>fold`` with a header line, the project's pairs TSV
                         (``facedistill.data.verification.read_pairs_tsv``); paths relative to the data root, so read
                         it with ``data.val_images`` set to that root

Every choice is drawn from SHA-256 of the seed and a counter (not from ``random`` or numpy, whose streams may change
between versions), over identities and images in sorted order (not file-system order), so the same folder and seed
give byte-identical files on every machine, now and later. A committed split must stay so: results reported on it
are only comparable while it does not change.

Pairs: in each of ``num_folds`` folds, ``pairs_per_fold`` same-identity pairs followed by as many different-identity
pairs (LFW's convention: its header ``10 300`` means 300 of each per fold). Folds are contiguous blocks in file order,
which is also how a ``.bin`` pack is read back (10 contiguous folds), so the TSV and ``facedistill pack --pairs``'s
``.bin`` evaluate identically. Same pairs go round-robin over the held-out identities, so that each identity weighs
about equally whatever its image count; different pairs take their first identity round-robin and the second at
random. No pair repeats and no pair is an image with itself. Folds share identities (with 30 identities,
identity-disjoint folds would have 3 identities each and almost no different-identity variety): the fold spread
measures threshold choice, not generalisation to unseen identities across folds.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import TypeVar

import numpy as np

from facedistill.data.datasets import scan_identity_folders
from facedistill.data.verification import PairList

__all__ = [
    "IDENTITIES_FILE",
    "PAIRS_FILE",
    "Split",
    "make_identity_split",
    "read_identity_list",
    "write_split",
]

IDENTITIES_FILE = "val_identities.txt"
PAIRS_FILE = "val_pairs.tsv"
# The pairs TSV header that facedistill.data.synthetic.write_pairs_tsv also writes; read_pairs_tsv skips it.
PAIRS_HEADER = "left\tright\tlabel\tfold"

T = TypeVar("T")


class _SeededStream:
    """Uniform integers from SHA-256 in counter mode: identical on every platform, Python and numpy version, which
    a committed split needs (``random`` guarantees only ``random()``'s stream, numpy's ``Generator`` none)."""

    def __init__(self, seed: int, purpose: str) -> None:
        self._key = f"facedistill.split:{seed}:{purpose}:"
        self._counter = 0

    def below(self, n: int) -> int:
        """An integer in ``[0, n)``; rejection sampling keeps it exactly uniform."""
        if n < 1:
            raise ValueError(f"cannot draw below {n}")
        span = 1 << 64
        limit = span - span % n
        while True:
            digest = hashlib.sha256(f"{self._key}{self._counter}".encode()).digest()
            self._counter += 1
            value = int.from_bytes(digest[:8], "big")
            if value < limit:
                return value % n

    def shuffled(self, items: Sequence[T]) -> list[T]:
        """A Fisher-Yates shuffle of ``items`` (a new list)."""
        out = list(items)
        for i in range(len(out) - 1, 0, -1):
            j = self.below(i + 1)
            out[i], out[j] = out[j], out[i]
        return out


@dataclass(frozen=True)
class Split:
    """A validation split of the identity folders under ``root``.

    ``pairs`` holds paths relative to ``root`` (``identity/image.jpg``), as ``val_pairs.tsv`` stores them.
    """

    root: Path
    val_identities: tuple[str, ...]
    train_identities: tuple[str, ...]
    num_val_images: int
    num_train_images: int
    pairs: PairList
    pairs_per_fold: int
    num_folds: int
    seed: int

    def summary(self) -> str:
        """One line for the command line and the split's README."""
        same = int(self.pairs.issame.sum())
        return (
            f"{len(self.val_identities)} held-out identities ({self.num_val_images} images), "
            f"{len(self.train_identities)} training identities ({self.num_train_images} images); "
            f"{len(self.pairs)} pairs: {self.num_folds} folds x ({self.pairs_per_fold} same + "
            f"{self.pairs_per_fold} different), {same} same in all; seed {self.seed}"
        )


def make_identity_split(
    root: str | Path,
    num_val_identities: int = 30,
    pairs_per_fold: int = 30,
    num_folds: int = 10,
    seed: int = 0,
) -> Split:
    """Hold out ``num_val_identities`` identities of the identity folders in ``root`` and draw their pairs.

    Held-out identities are drawn (seeded) from those with at least 2 images, which a same-identity pair needs.
    The defaults suit celeba299 (299 identities, 2 to 30 images each, 6,300 images): 30 identities (10%) keep 90%
    of a small training set while giving 300 same pairs of 30 people, about 10 each, and 435 identity pairs to draw
    300 different pairs from; 10 folds x (30 same + 30 different) = 600 pairs, LFW's layout at a tenth of its size,
    so the 10-fold accuracy and its spread read like LFW's. ``pairs_per_fold`` counts the same pairs of a fold (the
    fold has as many different pairs).

    Raises ``ValueError`` naming what to change when the folder has too few identities or images for the sizes.
    """
    root = Path(root)
    for name, value, minimum in (
        ("num_val_identities", num_val_identities, 2),
        ("pairs_per_fold", pairs_per_fold, 1),
        ("num_folds", num_folds, 1),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    folders = scan_identity_folders(root)
    eligible = [identity for identity, files in folders.items() if len(files) >= 2]
    if num_val_identities > len(eligible):
        raise ValueError(
            f"{root}: {num_val_identities} held-out identities asked for, but only {len(eligible)} of its "
            f"{len(folders)} identity folders have the 2 images a same pair needs; lower num_val_identities"
        )
    if num_val_identities >= sum(1 for files in folders.values() if files):
        raise ValueError(
            f"{root}: holding out {num_val_identities} identities would leave no identity with images to train on; "
            "lower num_val_identities"
        )
    held = sorted(_SeededStream(seed, "identities").shuffled(eligible)[:num_val_identities])
    needed = pairs_per_fold * num_folds
    images = {identity: [f"{identity}/{name}" for name in folders[identity]] for identity in held}
    same = _same_pairs(images, needed, _SeededStream(seed, "same"), root)
    different = _different_pairs(images, needed, _SeededStream(seed, "different"), root)

    left: list[str] = []
    right: list[str] = []
    issame: list[bool] = []
    folds: list[int] = []
    for fold in range(num_folds):
        block = slice(fold * pairs_per_fold, (fold + 1) * pairs_per_fold)
        for label, chosen in ((True, same[block]), (False, different[block])):
            for a, b in chosen:
                left.append(a)
                right.append(b)
                issame.append(label)
                folds.append(fold)
    held_set = set(held)
    train = tuple(identity for identity, files in folders.items() if identity not in held_set and files)
    return Split(
        root=root,
        val_identities=tuple(held),
        train_identities=train,
        num_val_images=sum(len(folders[identity]) for identity in held),
        num_train_images=sum(len(folders[identity]) for identity in train),
        pairs=PairList(left, right, np.asarray(issame, dtype=bool), np.asarray(folds, dtype=np.int64)),
        pairs_per_fold=pairs_per_fold,
        num_folds=num_folds,
        seed=seed,
    )


def _same_pairs(images: dict[str, list[str]], needed: int, stream: _SeededStream, root: Path) -> list[tuple[str, str]]:
    """``needed`` distinct same-identity pairs, round-robin over the identities in a seeded order."""
    available = sum(len(files) * (len(files) - 1) // 2 for files in images.values())
    if available < needed:
        raise ValueError(
            f"{root}: the held-out identities have only {available} distinct same-identity pairs, {needed} needed; "
            "lower pairs_per_fold or num_folds, or hold out more identities"
        )
    queues = {identity: stream.shuffled(list(combinations(files, 2))) for identity, files in images.items()}
    order = stream.shuffled(sorted(images))
    pairs: list[tuple[str, str]] = []
    while len(pairs) < needed:
        for identity in order:
            if queues[identity] and len(pairs) < needed:
                pairs.append(queues[identity].pop())
    return pairs


def _different_pairs(
    images: dict[str, list[str]], needed: int, stream: _SeededStream, root: Path
) -> list[tuple[str, str]]:
    """``needed`` distinct different-identity pairs: first identity round-robin, the second and both images drawn."""
    identities = sorted(images)
    counts = [len(images[identity]) for identity in identities]
    available = (sum(counts) ** 2 - sum(c * c for c in counts)) // 2
    if available < needed:
        raise ValueError(
            f"{root}: the held-out identities allow only {available} distinct different-identity pairs, {needed} "
            "needed; lower pairs_per_fold or num_folds, or hold out more identities"
        )
    order = stream.shuffled(identities)
    seen: set[frozenset[str]] = set()
    pairs: list[tuple[str, str]] = []
    attempts = 0
    while len(pairs) < needed:
        attempts += 1
        if attempts > 1000 * needed:
            raise ValueError(
                f"{root}: could not draw {needed} distinct different-identity pairs from the held-out images; "
                "lower pairs_per_fold or num_folds, or hold out more identities"
            )
        first = order[len(pairs) % len(order)]
        others = [identity for identity in identities if identity != first]
        second = others[stream.below(len(others))]
        a = images[first][stream.below(len(images[first]))]
        b = images[second][stream.below(len(images[second]))]
        key = frozenset((a, b))
        if key not in seen:
            seen.add(key)
            pairs.append((a, b))
    return pairs


def write_split(split: Split, directory: str | Path, overwrite: bool = False) -> tuple[Path, Path]:
    """Write ``directory/val_identities.txt`` and ``directory/val_pairs.tsv``; returns their paths.

    Existing files are kept unless ``overwrite``: a committed split must not change once results are reported on it.
    """
    directory = Path(directory)
    identities_path, pairs_path = directory / IDENTITIES_FILE, directory / PAIRS_FILE
    if not overwrite:
        existing = [str(path) for path in (identities_path, pairs_path) if path.exists()]
        if existing:
            raise FileExistsError(
                f"{', '.join(existing)} already exist(s); a split must not change once results are reported on it. "
                "Write to another directory, or pass overwrite (--overwrite) if no result uses it yet"
            )
    directory.mkdir(parents=True, exist_ok=True)
    pairs = split.pairs
    rows = zip(pairs.left, pairs.right, pairs.issame, pairs.folds, strict=True)
    lines = [PAIRS_HEADER] + [f"{a}\t{b}\t{int(same)}\t{int(fold)}" for a, b, same, fold in rows]
    _write_atomic(identities_path, "".join(f"{identity}\n" for identity in split.val_identities))
    _write_atomic(pairs_path, "\n".join(lines) + "\n")
    return identities_path, pairs_path


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".partial")
    try:
        tmp.write_text(text, encoding="utf-8", newline="\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_identity_list(path: str | Path) -> list[str]:
    """The identity names of a list such as ``val_identities.txt``: one per line; blank lines and ``#`` comments
    are skipped. Refuses a missing or empty list, a repeated name and a name that is not a single folder name, each
    with the file and line, because a wrong list would silently train on held-out identities."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(
            f"identity list {path} does not exist; write one with `facedistill split DATA OUT_DIR` "
            f"(it writes OUT_DIR/{IDENTITIES_FILE})"
        ) from None
    except UnicodeDecodeError:
        raise ValueError(f"identity list {path} is not UTF-8 text; expected one identity folder name a line") from None
    names: list[str] = []
    first_line: dict[str, int] = {}
    for lineno, raw in enumerate(text.splitlines(), start=1):
        name = raw.strip()
        if not name or name.startswith("#"):
            continue
        if "/" in name or "\\" in name or "\t" in name or name in (".", ".."):
            raise ValueError(
                f"{path}:{lineno}: {name!r} is not an identity folder name (one name a line, no paths or tabs)"
            )
        if name in first_line:
            raise ValueError(f"{path}:{lineno}: identity {name!r} is listed again (first on line {first_line[name]})")
        first_line[name] = lineno
        names.append(name)
    if not names:
        raise ValueError(f"identity list {path} names no identities; expected one identity folder name a line")
    return names
