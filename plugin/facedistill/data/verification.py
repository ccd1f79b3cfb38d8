"""Face-verification pair sets: LFW ``pairs.txt``, generic TSV pair lists and insightface ``.bin`` packs.

insightface ``.bin`` packs are pickles of ``(images, issame)``: ``images`` a list of encoded image bytes in
which images ``2k`` and ``2k+1`` form pair ``k``, ``issame`` one bool per pair. Most public packs were
written under Python 2 (so they need ``encoding='bytes'``) and some hold numpy bools. Unpickling runs
code named by the file, so :func:`read_bin` uses an unpickler that only rebuilds bytes, bools and numpy
arrays and refuses every other global.
"""

from __future__ import annotations

import codecs
import importlib
import io
import numbers
import os
import pickle
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "PairList",
    "PairsFormatError",
    "UnsafePickleError",
    "check_bin_folds",
    "contiguous_folds",
    "pack_pairs_to_bin",
    "read_bin",
    "read_bin_pairs",
    "read_lfw_pairs",
    "read_pairs_tsv",
    "write_bin",
]

BIN_KEY_PREFIX = "bin:"


class PairsFormatError(ValueError):
    """A pairs file or ``.bin`` pack is malformed or inconsistent."""


class UnsafePickleError(ValueError):
    """A ``.bin`` pack references a Python global that could run code when unpickled."""


def contiguous_folds(num_pairs: int, num_folds: int = 10) -> np.ndarray:
    """Fold index per pair for ``num_folds`` contiguous folds.

    Matches ``sklearn.model_selection.KFold(num_folds, shuffle=False)`` as insightface uses it: the first
    ``num_pairs % num_folds`` folds get one extra pair.
    """
    if num_folds < 1:
        raise ValueError(f"num_folds must be >= 1, got {num_folds}")
    if num_pairs < num_folds:
        raise ValueError(f"{num_pairs} pairs cannot be split into {num_folds} folds")
    sizes = np.full(num_folds, num_pairs // num_folds, dtype=np.int64)
    sizes[: num_pairs % num_folds] += 1
    return np.repeat(np.arange(num_folds, dtype=np.int64), sizes)


BIN_FOLDS = 10


def check_bin_folds(issame: Sequence[bool] | np.ndarray, source: str | os.PathLike[str]) -> None:
    """Refuse a ``.bin`` pair order that insightface's verification cannot score.

    A ``.bin`` stores no folds: arcface_torch's ``eval/verification.py`` splits its pairs into 10 contiguous
    folds in file order (``KFold(10, shuffle=False)``) and divides by each fold's genuine and impostor counts
    (``calculate_val_far``), so a fold with only one kind ends the run in ``ZeroDivisionError`` at the first
    validation. Every fold needs both kinds; LFW's pairs.txt order (10 sets, each N genuine then N impostor)
    gives them.
    """
    flags = np.asarray(issame, dtype=bool).reshape(-1)
    layout = (
        "a .bin is scored in 10 contiguous folds in file order and each needs genuine and impostor pairs: order "
        "the pairs as LFW's pairs.txt does (a '10 N' header, then 10 sets of N genuine and N impostor pairs)"
    )
    if len(flags) < 2 * BIN_FOLDS:
        raise PairsFormatError(f"{source}: {len(flags)} pairs, fewer than 20; {layout}")
    folds = contiguous_folds(len(flags), BIN_FOLDS)
    for fold in range(BIN_FOLDS):
        members = np.flatnonzero(folds == fold)
        genuine = int(flags[members].sum())
        if genuine == 0 or genuine == len(members):
            kind = "impostor" if genuine == len(members) else "genuine"
            raise PairsFormatError(
                f"{source}: pairs {members[0]}-{members[-1]} (fold {fold + 1} of 10) hold no {kind} pair; {layout}"
            )


@dataclass
class PairList:
    """Verification pairs: ``left[k]`` vs ``right[k]``, same identity iff ``issame[k]``, in fold ``folds[k]``.

    ``left``/``right`` are image paths, or ``"bin:<i>"`` keys into the image list of a ``.bin`` pack.
    """

    left: list[str]
    right: list[str]
    issame: np.ndarray
    folds: np.ndarray

    def __post_init__(self) -> None:
        self.left = [str(p) for p in self.left]
        self.right = [str(p) for p in self.right]
        self.issame = np.asarray(self.issame, dtype=bool).reshape(-1)
        self.folds = np.asarray(self.folds, dtype=np.int64).reshape(-1)
        n = len(self.left)
        if not (len(self.right) == n == self.issame.shape[0] == self.folds.shape[0]):
            raise ValueError(
                f"PairList fields disagree in length: left {n}, right {len(self.right)}, "
                f"issame {self.issame.shape[0]}, folds {self.folds.shape[0]}"
            )
        if n and (self.folds.min() < 0 or set(np.unique(self.folds).tolist()) != set(range(self.num_folds))):
            raise ValueError(f"fold indices must cover 0..K-1, got {sorted(set(self.folds.tolist()))}")

    def __len__(self) -> int:
        return len(self.left)

    @property
    def num_folds(self) -> int:
        return int(self.folds.max()) + 1 if len(self.folds) else 0

    def unique_images(self) -> list[str]:
        """Every distinct image once, in order of first appearance (pair by pair, left before right)."""
        return list(dict.fromkeys(x for pair in zip(self.left, self.right, strict=True) for x in pair))

    def index_arrays(self) -> tuple[list[str], np.ndarray, np.ndarray]:
        """``(unique_images(), left_idx, right_idx)`` so that ``left[k] == images[left_idx[k]]``.

        Lets an evaluator embed each image once even when it appears in many pairs.
        """
        images = self.unique_images()
        position = {name: i for i, name in enumerate(images)}
        left_idx = np.fromiter((position[x] for x in self.left), dtype=np.int64, count=len(self.left))
        right_idx = np.fromiter((position[x] for x in self.right), dtype=np.int64, count=len(self.right))
        return images, left_idx, right_idx


def _check_images_exist(paths: Sequence[str], source: Path) -> None:
    missing = [p for p in dict.fromkeys(paths) if not os.path.isfile(p)]
    if missing:
        shown = "\n  ".join(missing[:5])
        raise FileNotFoundError(
            f"{source}: {len(missing)} image(s) named by the pairs do not exist, e.g.\n  {shown}\n"
            f"Check image_root (and ext for LFW pairs)."
        )


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError
    return value


def read_lfw_pairs(
    pairs_file: str | os.PathLike[str],
    image_root: str | os.PathLike[str],
    ext: str = "jpg",
    *,
    check_exists: bool = True,
) -> PairList:
    """Read the official LFW ``pairs.txt`` (View 2, or the one-fold View 1 ``pairsDevTest.txt``).

    The first line is ``<folds> <pairs per class per fold>`` (View 1: just ``<pairs per class>``); each
    fold is that many ``name i j`` same-identity lines followed by that many ``name1 i name2 j`` lines.
    Images are ``image_root/name/name_{i:04d}.{ext}``; pairs are in file order, folds contiguous.
    """
    pairs_file = Path(pairs_file)
    image_root = Path(image_root)
    ext = ext.lstrip(".")
    lines = pairs_file.read_text(encoding="utf-8", errors="replace").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise PairsFormatError(f"{pairs_file}: file is empty")
    head = lines[0].split()
    try:
        if len(head) == 2:
            num_folds, per_class = _positive_int(head[0]), _positive_int(head[1])
        elif len(head) == 1:
            num_folds, per_class = 1, _positive_int(head[0])
        else:
            raise ValueError
    except ValueError:
        raise PairsFormatError(
            f"{pairs_file}:1: expected '<folds> <pairs per class per fold>' (e.g. '10\\t300'), got {lines[0]!r}"
        ) from None
    expected = 2 * num_folds * per_class
    if len(lines) - 1 != expected:
        raise PairsFormatError(
            f"{pairs_file}: header says {num_folds} fold(s) x 2 x {per_class} pairs = {expected} pair lines, "
            f"but the file has {len(lines) - 1}"
        )

    def image(name: str, number: str) -> str:
        return str(image_root / name / f"{name}_{_positive_int(number):04d}.{ext}")

    left: list[str] = []
    right: list[str] = []
    issame: list[bool] = []
    folds: list[int] = []
    for offset, line in enumerate(lines[1:]):
        lineno = offset + 2
        fold, within = divmod(offset, 2 * per_class)
        same = within < per_class
        fields = line.split()
        try:
            if same:
                if len(fields) != 3:
                    raise ValueError
                a, b = image(fields[0], fields[1]), image(fields[0], fields[2])
            else:
                if len(fields) != 4:
                    raise ValueError
                a, b = image(fields[0], fields[1]), image(fields[2], fields[3])
        except ValueError:
            kind = "'name i j' (same identity)" if same else "'name1 i name2 j' (different identities)"
            raise PairsFormatError(
                f"{pairs_file}:{lineno}: expected {kind} for pair {within % per_class + 1} of fold "
                f"{fold + 1}, got {line!r}"
            ) from None
        left.append(a)
        right.append(b)
        issame.append(same)
        folds.append(fold)
    if check_exists:
        _check_images_exist(left + right, pairs_file)
    return PairList(left, right, np.asarray(issame, dtype=bool), np.asarray(folds, dtype=np.int64))


_TRUE = {"1", "true", "same", "yes"}
_FALSE = {"0", "false", "diff", "different", "no"}


def _is_header_word(text: str) -> bool:
    # Only a non-numeric word is a header, so a bad label such as "2" on the first line is still reported.
    if text.lower() in _TRUE | _FALSE:
        return False
    try:
        float(text)
    except ValueError:
        return True
    return False


def _tsv_rows(path: Path) -> list[tuple[int, list[str]]]:
    """(line number, tab-separated fields) of every pair line: blank lines, ``#`` comments and a header skipped."""
    rows: list[tuple[int, list[str]]] = []
    for lineno, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = raw.rstrip("\r\n")
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        fields = [f.strip() for f in line.split("\t")]
        if not rows and len(fields) >= 3 and _is_header_word(fields[2]):
            continue
        rows.append((lineno, fields))
    if not rows:
        raise PairsFormatError(f"{path}: no pairs found")
    return rows


def _fold_number(text: str, where: str) -> int:
    try:
        fold = int(text)
    except ValueError:
        fold = -1
    if fold < 0:
        raise PairsFormatError(f"{where}: fold must be a non-negative integer, got {text!r}")
    return fold


def read_pairs_tsv(
    path: str | os.PathLike[str],
    image_root: str | os.PathLike[str] | None = None,
    *,
    num_folds: int = 10,
    check_exists: bool = False,
) -> PairList:
    """Read ``left<TAB>right<TAB>label[<TAB>fold]`` lines (label 0/1, fold 0..K-1).

    A first line whose label column is not a label (e.g. ``left\\tright\\tissame``) is a header; blank
    lines and ``#`` comments are skipped. Without a fold column, pairs are split into ``num_folds``
    contiguous folds as insightface does. Relative paths resolve against ``image_root``, or the TSV's
    folder when it is not given.
    """
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    rows = _tsv_rows(path)
    width = len(rows[0][1])
    left: list[str] = []
    right: list[str] = []
    issame: list[bool] = []
    given_folds: list[int] = []
    for lineno, fields in rows:
        if len(fields) != width or width not in (3, 4):
            raise PairsFormatError(
                f"{path}:{lineno}: expected {width if width in (3, 4) else '3 or 4'} tab-separated columns "
                f"'left, right, label[, fold]', got {len(fields)}"
            )
        label = fields[2].lower()
        if label not in _TRUE | _FALSE:
            raise PairsFormatError(f"{path}:{lineno}: label must be 0 or 1, got {fields[2]!r}")
        if not fields[0] or not fields[1]:
            raise PairsFormatError(f"{path}:{lineno}: empty image path")
        if width == 4:
            given_folds.append(_fold_number(fields[3], f"{path}:{lineno}"))
        left.append(str(root / fields[0]))
        right.append(str(root / fields[1]))
        issame.append(label in _TRUE)
    if width == 4:
        folds = np.asarray(given_folds, dtype=np.int64)
        present = set(folds.tolist())
        if present != set(range(max(present) + 1)):
            raise PairsFormatError(f"{path}: fold column must use every fold 0..K-1, got {sorted(present)}")
    else:
        try:
            folds = contiguous_folds(len(left), num_folds)
        except ValueError as exc:
            raise PairsFormatError(f"{path}: {exc}; add a fold column or lower num_folds") from None
    if check_exists:
        _check_images_exist(left + right, path)
    return PairList(left, right, np.asarray(issame, dtype=bool), folds)


# --- insightface .bin packs -------------------------------------------------------------------------


def _numpy_attr(module: str, name: str) -> Callable[..., object]:
    # numpy 2 moved numpy.core to numpy._core; importing the old name warns, so resolve to whichever exists.
    for candidate in (
        module.replace("numpy.core", "numpy._core"),
        module.replace("numpy._core", "numpy.core"),
    ):
        try:
            return getattr(importlib.import_module(candidate), name)
        except (ImportError, AttributeError):
            continue
    raise AttributeError(f"{module}.{name}")


def _latin1_encode(text: str, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    # Python 3 pickles bytes as _codecs.encode(text, 'latin1') under protocols 0-2; allow only that use,
    # since other codec names make the codec registry import modules.
    if not isinstance(encoding, str) or encoding.replace("-", "").replace("_", "").lower() not in (
        "latin1",
        "iso88591",
    ):
        raise UnsafePickleError(f"_codecs.encode with encoding {encoding!r}")
    return codecs.encode(text, "latin-1", errors)


# (module, name) -> loader. Exactly what rebuilding bytes, bools and numpy bool/uint8 arrays needs.
_NUMPY_CALLABLES = {
    "_reconstruct": ("numpy.core.multiarray", "numpy._core.multiarray"),  # ndarray, protocols 0-4
    "scalar": ("numpy.core.multiarray", "numpy._core.multiarray"),  # numpy.bool_ scalars
    "_frombuffer": ("numpy.core.numeric", "numpy._core.numeric"),  # ndarray, protocol 5
}
_ALLOWED_GLOBALS: dict[tuple[str, str], Callable[[], object]] = {
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
    ("_codecs", "encode"): lambda: _latin1_encode,
}
for _name, _modules in _NUMPY_CALLABLES.items():
    for _module in _modules:
        _ALLOWED_GLOBALS[(_module, _name)] = lambda m=_module, n=_name: _numpy_attr(m, n)


class _SafeUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BufferedIOBase, source: Path):
        super().__init__(file, encoding="bytes")
        self._source = source

    def find_class(self, module: str, name: str) -> object:
        loader = _ALLOWED_GLOBALS.get((module, name))
        if loader is None:
            raise UnsafePickleError(
                f"{self._source}: refused: the pack references the Python global '{module}.{name}', and "
                f"loading it could run arbitrary code. A verification .bin should only hold image bytes "
                f"and booleans; re-create it from trusted images with "
                f"facedistill.data.verification.write_bin()."
            )
        return loader()

    def persistent_load(self, pid: object) -> object:
        raise UnsafePickleError(f"{self._source}: refused: the pack uses pickle persistent IDs")


def _as_bool(value: object) -> bool:
    if isinstance(value, bool | np.bool_):
        return bool(value)
    if isinstance(value, numbers.Integral) and int(value) in (0, 1):
        return bool(value)
    raise TypeError(value)


def read_bin(path: str | os.PathLike[str]) -> tuple[list[bytes], np.ndarray]:
    """Load an insightface verification ``.bin``: ``(images, issame)`` with ``images[2k], images[2k+1]``
    forming pair ``k``. Refuses (``UnsafePickleError``) any pickle that names other globals than the
    numpy array/bool builders."""
    path = Path(path)
    with open(path, "rb") as f:
        try:
            obj = _SafeUnpickler(f, path).load()
        except UnsafePickleError as exc:
            if str(exc).startswith(str(path)):
                raise
            raise UnsafePickleError(
                f"{path}: refused: the pack calls {exc}, and loading it could run arbitrary code"
            ) from None
        except Exception as exc:  # a corrupt pickle can fail in many ways; all mean "not a valid pack"
            raise PairsFormatError(f"{path}: not a readable .bin pack ({type(exc).__name__}: {exc})") from None
    if not isinstance(obj, tuple | list) or len(obj) != 2:
        raise PairsFormatError(f"{path}: expected a pickled (images, issame) pair, got {type(obj).__name__}")
    images_obj, issame_obj = obj
    if isinstance(images_obj, np.ndarray) and images_obj.dtype == object:
        images_obj = images_obj.tolist()
    if not isinstance(images_obj, list | tuple):
        raise PairsFormatError(f"{path}: images must be a list of encoded images, got {type(images_obj).__name__}")
    images: list[bytes] = []
    for i, item in enumerate(images_obj):
        if isinstance(item, bytes):
            images.append(item)
        elif isinstance(item, bytearray):
            images.append(bytes(item))
        elif isinstance(item, np.ndarray) and item.dtype == np.uint8 and item.ndim == 1:
            images.append(item.tobytes())
        else:
            raise PairsFormatError(f"{path}: image {i} is {type(item).__name__}, expected encoded image bytes")
    if isinstance(issame_obj, np.ndarray):
        issame_obj = issame_obj.reshape(-1).tolist()
    if not isinstance(issame_obj, list | tuple):
        raise PairsFormatError(f"{path}: issame must be a list of bools, got {type(issame_obj).__name__}")
    try:
        issame = np.asarray([_as_bool(v) for v in issame_obj], dtype=bool)
    except TypeError as exc:
        raise PairsFormatError(f"{path}: issame holds {exc.args[0]!r}, expected booleans") from None
    if len(images) != 2 * len(issame):
        raise PairsFormatError(
            f"{path}: {len(images)} images for {len(issame)} pairs; a pack needs exactly 2 images per pair"
        )
    return images, issame


def write_bin(path: str | os.PathLike[str], images: Sequence[bytes], issame: Sequence[bool]) -> None:
    """Write an insightface-compatible ``.bin``: pickle protocol 4 of plain ``(list[bytes], list[bool])``."""
    path = Path(path)
    image_list = [bytes(b) for b in images]
    flags = [bool(v) for v in issame]
    if len(image_list) != 2 * len(flags):
        raise ValueError(f"{len(image_list)} images for {len(flags)} pairs; need exactly 2 images per pair")
    tmp = path.with_name(path.name + ".partial")
    try:
        with open(tmp, "wb") as f:
            pickle.dump((image_list, flags), f, protocol=4)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_bin_pairs(path: str | os.PathLike[str], *, num_folds: int = 10) -> tuple[list[bytes], PairList]:
    """A ``.bin`` pack as ``(images, PairList)``; pair ``k`` is ``"bin:2k"`` vs ``"bin:2k+1"``, keys into
    ``images``; folds are ``num_folds`` contiguous folds, as insightface evaluates packs."""
    images, issame = read_bin(path)
    n = len(issame)
    try:
        folds = contiguous_folds(n, num_folds)
    except ValueError as exc:
        raise PairsFormatError(f"{path}: {exc}") from None
    left = [f"{BIN_KEY_PREFIX}{2 * k}" for k in range(n)]
    right = [f"{BIN_KEY_PREFIX}{2 * k + 1}" for k in range(n)]
    return images, PairList(left, right, issame, folds)


def pack_pairs_to_bin(pairs: PairList, out_path: str | os.PathLike[str]) -> Path:
    """Write ``pairs`` as an insightface ``.bin``, storing each image file's bytes unchanged.

    A ``.bin`` cannot store folds: readers assume 10 contiguous folds, so other fold assignments warn, and an order
    whose contiguous folds lack genuine or impostor pairs is refused (:func:`check_bin_folds`).
    """
    out_path = Path(out_path)
    n = len(pairs)
    if n == 0:
        raise ValueError("no pairs to pack")
    check_bin_folds(pairs.issame, out_path)
    if not np.array_equal(pairs.folds, contiguous_folds(n, BIN_FOLDS)):
        warnings.warn(
            f"{out_path}: the pairs' folds are not 10 contiguous folds; a .bin stores no folds, so readers "
            f"will evaluate it with 10 contiguous folds instead",
            stacklevel=2,
        )
    cache: dict[str, bytes] = {}
    images: list[bytes] = []
    for name in (x for pair in zip(pairs.left, pairs.right, strict=True) for x in pair):
        if name.startswith(BIN_KEY_PREFIX):
            raise ValueError(f"pair image {name!r} refers to a .bin pack, not a file; it cannot be re-packed")
        data = cache.get(name)
        if data is None:
            try:
                data = cache[name] = Path(name).read_bytes()
            except FileNotFoundError:
                raise FileNotFoundError(f"image {name} (named by the pairs) does not exist") from None
        images.append(data)
    write_bin(out_path, images, pairs.issame.tolist())
    return out_path
