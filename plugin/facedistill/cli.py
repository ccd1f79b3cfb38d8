"""The ``facedistill`` command line: thin commands that build objects from a validated config and call the layers."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal, NoReturn

import typer
from typer.core import TyperCommand

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    help="Distil face-recognition models into small, fast students, and prove how good they are.",
)

SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a config value, e.g. --set train.epochs=20 (repeatable)."),
]


# An .onnx teacher's preprocessing, for a file that does not say it (facedistill export writes it in the model's
# metadata, which these may repeat but not contradict); every command that takes --teacher takes them.
TeacherColourOrder = Annotated[
    str | None,
    typer.Option(
        "--teacher-colour-order",
        help="An .onnx teacher's channel order, RGB or BGR, when the file does not say (facedistill export's do).",
    ),
]
TeacherMean = Annotated[
    str | None,
    typer.Option(
        "--teacher-mean",
        help="An .onnx teacher's input mean on raw 0..255 values: a number, or three comma-separated, one per "
        "channel in the model's channel order.",
    ),
]
TeacherStd = Annotated[
    str | None,
    typer.Option(
        "--teacher-std", help="An .onnx teacher's input std on raw 0..255 values: a number, or three comma-separated."
    ),
]


def _flag_numbers(text: str | None, flag: str) -> float | tuple[float, ...] | None:
    """``"127.5"`` -> 127.5, ``"1,2,3"`` -> (1.0, 2.0, 3.0); anything else is refused naming ``flag``."""
    if text is None:
        return None
    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError:
        values = ()
    if len(values) not in (1, 3):
        raise ValueError(f"{flag} must be a number or three numbers separated by commas, got {text!r}")
    return values[0] if len(values) == 1 else values


def _preprocessing_flags(colour_order: str | None, mean: str | None, std: str | None) -> dict[str, Any]:
    """The --teacher-* preprocessing flags that were given, numbers parsed."""
    from facedistill.teachers import CLI_PREPROCESSING_KEYS

    values = {
        "colour_order": colour_order,
        "mean": _flag_numbers(mean, CLI_PREPROCESSING_KEYS.mean),
        "std": _flag_numbers(std, CLI_PREPROCESSING_KEYS.std),
    }
    return {field: value for field, value in values.items() if value is not None}


def _teacher_preprocessing(
    teacher: str | None, colour_order: str | None, mean: str | None, std: str | None
) -> dict[str, Any]:
    """The --teacher-* preprocessing flags that were given, numbers parsed; refused without --teacher."""
    from facedistill.teachers import CLI_PREPROCESSING_KEYS

    given = _preprocessing_flags(colour_order, mean, std)
    if given and teacher is None:
        flag = CLI_PREPROCESSING_KEYS.of(next(iter(given)))
        raise ValueError(f"{flag} goes with --teacher: it says how an .onnx teacher's input is normalised")
    return given


def _cli_teacher(teacher: str, colour_order: str | None, mean: str | None, std: str | None) -> Any:
    """The teacher --teacher names, with the --teacher-* preprocessing flags (refused for a teacher not .onnx)."""
    from facedistill.teachers import CLI_PREPROCESSING_KEYS, create_teacher

    preprocessing = _teacher_preprocessing(teacher, colour_order, mean, std)
    return create_teacher(teacher, preprocessing=preprocessing, preprocessing_keys=CLI_PREPROCESSING_KEYS)


def _fail(error: Exception) -> NoReturn:
    """Report ``error`` as one line, ``error: ...``, and exit with code 2: what failed is the user's input (a config
    value, a path), and the message names what to fix; a traceback would bury it."""
    # A KeyError's str() is the repr of its message, quotes and all.
    message = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
    typer.secho(f"error: {' '.join(message.split())}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


# Stands in the help of a --method option for the registered method names, filled in when the help is shown.
KNOWN_METHODS = "{known methods}"


class MethodsInHelp(TyperCommand):
    """A command whose option help lists the registered methods (``KNOWN_METHODS``). They are looked up only when
    the help is shown: the registry fills as the method modules are imported, with torch, which the command line
    otherwise imports only in the commands that need it."""

    def format_help(self, ctx: Any, formatter: Any) -> None:
        from facedistill.distill import METHODS

        for param in self.params:
            text = getattr(param, "help", None)
            if text and KNOWN_METHODS in text:
                param.help = text.replace(KNOWN_METHODS, ", ".join(METHODS.names()))
        super().format_help(ctx, formatter)


DEFAULT_DISTILL_METHOD = "margin_distillation"


def _train_from(config: Path | None, overrides: list[str], resume: bool, default_method: str | None = None) -> None:
    """Build the config of a run (YAML, then ``overrides``), validate it, train, print the summary.

    ``default_method`` names the method when neither the recipe nor the overrides do (``distill``); ``train``
    has none, so a recipe that names no method is refused before anything runs.
    """
    import os

    from facedistill.config import Config, ConfigError, from_dict, read_config_data
    from facedistill.train.loop import train as run_training
    from facedistill.train.recipe import validate_config

    try:
        data = read_config_data(config, overrides)
        if default_method is not None:
            _default_method(data, default_method)
        cfg = from_dict(Config, data)
        validate_config(cfg)
        summary = run_training(cfg, resume=resume)
    except (ConfigError, ValueError, FileNotFoundError, OSError) as error:
        _fail(error)
    # Under torchrun only rank 0 has the test results; one summary is enough.
    if os.environ.get("RANK", "0") == "0":
        typer.echo(json.dumps(summary.to_dict(), indent=2, default=str))


def _default_method(data: dict[str, Any], name: str) -> None:
    """Name the method ``name`` in the config data unless it already names one; its hyper-parameters stay."""
    section = data.get("method")
    if section is None:
        section = data["method"] = {}
    if isinstance(section, dict) and section.get("name") is None:  # a mistyped section is from_dict's to report
        section["name"] = name


@app.command()
def train(
    config: Annotated[Path | None, typer.Argument(help="YAML config; defaults apply to what it leaves out.")] = None,
    overrides: SetOption = None,
    resume: Annotated[bool, typer.Option(help="Continue from the run directory's last checkpoint.")] = False,
) -> None:
    """Train a student with the method the config names in method.name (arcface, margin_distillation, ...); under
    torchrun on several processes (see README, "Multi-GPU and multi-node")."""
    _train_from(config, list(overrides or []), resume)


@app.command(cls=MethodsInHelp)
def distill(
    data: Annotated[Path | None, typer.Option(help="Training set: identity folders or RecordIO.")] = None,
    teacher: Annotated[str | None, typer.Option(help="sface, an .onnx file or a .pth checkpoint.")] = None,
    teacher_colour_order: TeacherColourOrder = None,
    teacher_mean: TeacherMean = None,
    teacher_std: TeacherStd = None,
    cache: Annotated[Path | None, typer.Option(help="Teacher cache directory (cache-teacher).")] = None,
    method: Annotated[
        str | None,
        typer.Option(
            "--method",
            "-m",
            help=f"Distillation method: {KNOWN_METHODS}. Default: the config's method, else "
            f"{DEFAULT_DISTILL_METHOD}; the config's other method keys stay.",
        ),
    ] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Run directory.")] = None,
    config: Annotated[Path | None, typer.Option(help="YAML config with the rest of the recipe.")] = None,
    overrides: SetOption = None,
    resume: bool = False,
) -> None:
    """Distil a teacher into a student; flags are shorthands for config keys (a --set of the same key wins)."""
    sets = [f"method.name={method}"] if method else []
    if data:
        sets.append(f"data.train={data}")
    if teacher:
        sets.append(f"teacher.spec={teacher}")
    try:
        # teacher.colour_order, teacher.mean, teacher.std; written as JSON, which YAML reads back as the same values
        # (a bare "1,2,3" would be one string). The config refuses them where teacher.spec (here or in the config's
        # file) is not an .onnx model.
        preprocessing = _preprocessing_flags(teacher_colour_order, teacher_mean, teacher_std)
    except ValueError as error:
        _fail(error)
    sets += [f"teacher.{field}={json.dumps(value)}" for field, value in preprocessing.items()]
    if cache:
        sets.append(f"teacher.cache={cache}")
    if output:
        sets.append(f"run.output_dir={output}")
    _train_from(config, sets + list(overrides or []), resume, default_method=DEFAULT_DISTILL_METHOD)


@app.command("cache-teacher")
def cache_teacher(
    teacher: Annotated[str, typer.Option(help="sface, an .onnx file or a .pth checkpoint.")],
    data: Annotated[Path, typer.Option(help="Training set: identity folders or RecordIO.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Cache directory.")],
    teacher_colour_order: TeacherColourOrder = None,
    teacher_mean: TeacherMean = None,
    teacher_std: TeacherStd = None,
    batch_size: int = 64,
    workers: int = 2,
    overwrite: bool = False,
    exclude: Annotated[
        Path | None,
        typer.Option(help="Identity list (e.g. val_identities.txt) left out, as data.exclude_identities does."),
    ] = None,
) -> None:
    """Embed every training image and its mirror with the teacher, once (resumable)."""
    from facedistill.data.datasets import open_training_set
    from facedistill.data.splits import read_identity_list
    from facedistill.teachers.cache import build_teacher_cache

    try:
        excluded = read_identity_list(exclude) if exclude is not None else None
        model = _cli_teacher(teacher, teacher_colour_order, teacher_mean, teacher_std)
        cache = build_teacher_cache(
            model, open_training_set(data, exclude=excluded), out, batch_size, workers, overwrite
        )
    except (ValueError, FileNotFoundError, OSError) as error:
        _fail(error)
    typer.echo(f"cached {cache.num_images} images x 2 views of {cache.teacher_id} in {out}")


@app.command("cache-images")
def cache_images(
    data: Annotated[Path, typer.Argument(help="Training set: identity folders or RecordIO.")],
    out: Annotated[Path, typer.Argument(help="Cache directory; train with --set data.decoded_cache=OUT.")],
    workers: int = 4,
    skip_bad: Annotated[bool, typer.Option(help="Record unreadable images as skipped rows.")] = False,
    overwrite: bool = False,
) -> None:
    """Decode every training image once into a uint8 memory map (37.6 KB an image; resumable)."""
    from facedistill.data.datasets import open_training_set
    from facedistill.data.decoded_cache import build_decoded_cache

    try:
        cache = build_decoded_cache(open_training_set(data, skip_bad), out, num_workers=workers, overwrite=overwrite)
    except (ValueError, FileNotFoundError, OSError) as error:
        _fail(error)
    typer.echo(f"decoded {len(cache)} images of {cache.num_classes} identities into {out}")


# The models a run directory holds, in the order `facedistill eval RUN_DIR` takes them when its results.json does not
# name one: arcface_torch's train_v2.py writes model.pt (the backbone after the last epoch), facedistill's loop
# last.pt and, with data.val_pairs, best.pt.
RUN_MODELS = ("model.pt", "last.pt", "best.pt")


def _run_model(path: Path) -> Path:
    """``path`` itself, or for a run directory the model it reports: the checkpoint its ``results.json`` selected
    (facedistill's loop: ``train.select``), else the first of ``RUN_MODELS`` there. Said on stderr, so the results
    on stdout stay as they are; a directory with none of them is refused naming what was looked for."""
    if not path.is_dir():
        return path
    selected = None
    # No results.json (an arcface_torch run, an unfinished facedistill run): the file names decide.
    with contextlib.suppress(OSError, ValueError, AttributeError):
        selected = json.loads((path / "results.json").read_text()).get("selected")
    names = [selected] if isinstance(selected, str) else []
    for name in [*names, *RUN_MODELS]:
        if (path / name).is_file():
            typer.echo(f"evaluating {path / name}", err=True)
            return path / name
    raise ValueError(
        f"{path} is a run directory with no model in it: looked for results.json's selected checkpoint, model.pt "
        "(arcface_torch's train_v2.py), last.pt and best.pt (facedistill's training); name the checkpoint file"
    )


@app.command("eval")
def evaluate(
    model: Annotated[
        Path | None,
        typer.Argument(help="A checkpoint (facedistill's last.pt/best.pt, arcface_torch's model.pt) or run directory."),
    ] = None,
    pairs: Annotated[Path | None, typer.Option(help="LFW pairs.txt, a .bin pack or a pairs TSV.")] = None,
    protocol: Annotated[
        str, typer.Option(help="pairs (needs --pairs), lfw, cfp-fp, cfp-ff, ijbb, ijbc or megaface (need --root).")
    ] = "pairs",
    root: Annotated[Path | None, typer.Option(help="Dataset folder of the protocol (LFW, CFP, IJB, MegaFace).")] = None,
    images: Annotated[Path | None, typer.Option(help="Image root for pairs.txt/TSV.")] = None,
    aligned: Annotated[Path | None, typer.Option(help="Aligned 112x112 copies of the protocol's images.")] = None,
    teacher: Annotated[
        str | None, typer.Option(help="Evaluate a teacher instead (sface, .onnx, .pth), e.g. an exported student.")
    ] = None,
    teacher_colour_order: TeacherColourOrder = None,
    teacher_mean: TeacherMean = None,
    teacher_std: TeacherStd = None,
    out: Annotated[Path | None, typer.Option(help="Write results JSON and ROC plot here.")] = None,
    flip: bool = True,
    batch_size: int = 256,
    workers: int = 2,
    detector_scores: Annotated[bool, typer.Option(help="IJB: weight image features by detector score.")] = True,
    feature_norm: Annotated[bool, typer.Option(help="IJB: keep feature norms in the template averages.")] = True,
) -> None:
    """Verification (LFW, pairs, CFP: 10-fold accuracy, TAR@FAR), IJB-B/C TAR@FAR 1e-6..1e-1 or MegaFace rank-1."""
    import numpy as np

    from facedistill.eval.metrics import VerificationResult, format_tar, plot_roc, unestimated_tar_note
    from facedistill.eval.protocols import PROTOCOLS, evaluate_protocol, load_protocol, write_result
    from facedistill.eval.verify import student_embedder

    try:
        if (model is None) == (teacher is None):
            raise ValueError("give either a checkpoint or --teacher")
        if protocol.lower() not in PROTOCOLS:
            raise ValueError(f"--protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
        _teacher_preprocessing(teacher, teacher_colour_order, teacher_mean, teacher_std)
        if teacher is not None:
            embed = _cli_teacher(teacher, teacher_colour_order, teacher_mean, teacher_std).embed
            label = teacher
        else:
            from facedistill.train.checkpoint import load_student

            model = _run_model(model)
            student, _ = load_student(model)
            embed = student_embedder(student)
            label = model.parent.name or model.stem
        loaded = load_protocol(protocol, root, pairs=pairs, images=images, aligned_dir=aligned)
        result = evaluate_protocol(
            embed,
            loaded,
            flip=flip,
            batch_size=batch_size,
            num_workers=workers,
            keep_feature_norm=feature_norm,
            use_detector_scores=detector_scores,
        )
    except (ValueError, FileNotFoundError, OSError) as error:
        _fail(error)

    def tars(values: dict[str, float | None]) -> str:
        # The tables' spelling (format_tar): "-" where a TAR could not be estimated, said why below the line.
        shown = {far: format_tar(tar) for far, tar in values.items()}
        return "  ".join(f"TAR@FAR={float(far):g}: {text}{'' if text == '-' else '%'}" for far, text in shown.items())

    name = result["protocol"]
    if result["kind"] == "identification":
        typer.echo(
            f"{name}: rank-1 {100 * result['rank1']:.2f}% over {result['num_trials']} trials, "
            f"{result['num_distractors']} distractors"
        )
    elif result["kind"] == "ijb":
        typer.echo(
            f"{name}: {result['num_templates']} templates, {result['num_pairs']} pairs  {tars(result['tar_at_far'])}"
        )
        typer.echo(f"{name} (insightface, nearest FAR): {tars(result['tar_at_far_nearest'])}")
    else:
        summary = VerificationResult.from_dict(result).summary()
        typer.echo(f"{name}: accuracy {summary}  {tars(result['tar_at_far'])}")
        impostors = {"this set": result.get("num_impostor")}
        for far, tar in result["tar_at_far"].items():
            if format_tar(tar) == "-":
                typer.echo(unestimated_tar_note(float(far), f"{float(far):g}", impostors))
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        write_result(result, out / f"eval_{name}.json")
        if result["kind"] == "verification":
            plot_roc({label: VerificationResult.from_dict(result)}, out / f"roc_{name}.png", f"{name}: {label}")
        elif result["kind"] == "ijb":
            curve = tuple(np.array([np.nan if v is None else v for v in result[k]]) for k in ("roc_fpr", "roc_tpr"))
            auc_text = "n/a" if result["auc"] is None else f"{result['auc']:.4f}"
            plot_roc({f"{label} (AUC {auc_text})": curve}, out / f"roc_{name}.png", f"{name}: {label}")


@app.command()
def export(
    checkpoint: Annotated[
        Path, typer.Argument(help="A checkpoint: facedistill's last.pt/best.pt or arcface_torch's model.pt.")
    ],
    output: Annotated[Path, typer.Option("--output", "-o", help="ONNX file to write.")] = Path("model.onnx"),
    opset: int = 17,
    int8: Annotated[
        bool, typer.Option("--int8", help="Also write a dynamic int8 model beside it (model.onnx -> model.int8.onnx).")
    ] = False,
) -> None:
    """Export the student to ONNX: float32 NCHW RGB 112x112, (x-127.5)/127.5 in; raw embedding out."""
    from facedistill.export.onnx import export_onnx
    from facedistill.train.checkpoint import load_student

    int8_path = None
    try:
        student, cfg = load_student(checkpoint)
        report = export_onnx(
            student,
            output,
            opset=opset,
            metadata={"facedistill.model": cfg["model"]["name"], "facedistill.method": cfg["method"]["name"]},
        )
        if int8:
            from facedistill.export.quantize import quantize_dynamic_int8, read_quantization_info

            int8_path = quantize_dynamic_int8(report.path, report.path.with_suffix(".int8.onnx"))
            quantization = read_quantization_info(int8_path) or {}
    except (ValueError, FileNotFoundError, OSError) as error:
        _fail(error)
    typer.echo(
        f"wrote {report.path} (opset {report.opset}); onnxruntime vs PyTorch max abs diff {report.max_abs_diff:.2e}"
    )
    if int8_path is not None:
        typer.echo(
            f"wrote {int8_path} ({int8_path.stat().st_size / 1e6:.2f} MB, fp32 {report.path.stat().st_size / 1e6:.2f}"
            f" MB): integer ops {quantization['quantized_ops']}, float compute ops left "
            f"{quantization['float_compute_ops']}; min cosine to fp32 on random inputs "
            f"{quantization.get('cosine_vs_fp32_random_min')} (evaluate on real pairs for the accuracy change)"
        )


@app.command()
def latency(
    checkpoint: Annotated[
        Path, typer.Argument(help="A checkpoint: facedistill's last.pt/best.pt or arcface_torch's model.pt.")
    ],
    threads: Annotated[int | None, typer.Option(help="Intra-op threads of every backend (default: torch's).")] = None,
    batch_sizes: Annotated[
        list[int] | None, typer.Option("--batch-size", "-b", help="Batch size to time (repeatable; default 1 and 32).")
    ] = None,
    repeats: Annotated[int, typer.Option(help="Timed calls per batch size and round.")] = 10,
    rounds: Annotated[int, typer.Option(help="Interleaved rounds; the table shows their medians.")] = 3,
    int8: Annotated[bool, typer.Option(help="Also time a dynamic int8 ONNX model.")] = True,
    out: Annotated[Path | None, typer.Option(help="Write the results as JSON here.")] = None,
) -> None:
    """CPU latency at batch 1 and throughput at batch 32: PyTorch fp32, onnxruntime fp32 and int8."""
    import tempfile

    from facedistill.export.latency import compare_latency, latency_report_markdown
    from facedistill.export.onnx import export_onnx
    from facedistill.export.quantize import quantize_dynamic_int8
    from facedistill.models.complexity import count_macs, count_parameters, format_count
    from facedistill.train.checkpoint import load_student

    try:
        student, cfg = load_student(checkpoint)
        with tempfile.TemporaryDirectory(prefix="facedistill-latency-") as work:
            fp32 = export_onnx(student, Path(work) / "model.onnx", metadata={"facedistill.model": cfg["model"]["name"]})
            candidates = {"PyTorch fp32": student, "ORT fp32": fp32.path}
            if int8:
                candidates["ORT int8 (dynamic)"] = quantize_dynamic_int8(fp32.path, Path(work) / "model.int8.onnx")
            results = compare_latency(
                candidates, rounds=rounds, batch_sizes=batch_sizes or [1, 32], repeats=repeats, threads=threads
            )
    except (ValueError, FileNotFoundError, OSError) as error:
        _fail(error)
    typer.echo(
        f"{cfg['model']['name']} (embedding {cfg['model']['embedding_size']}): params "
        f"{format_count(count_parameters(student))}, MACs {format_count(count_macs(student))} at 112x112; "
        f"threads {results[0]['threads']}, medians of {rounds} interleaved rounds of {repeats} calls\n"
    )
    typer.echo(latency_report_markdown(results))
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2))


@app.command()
def info(
    model: Annotated[str, typer.Argument(help="Backbone name, e.g. mobilefacenet, iresnet50.")],
    embedding_size: int = 512,
) -> None:
    """Params and MACs of a backbone at 112x112."""
    from facedistill.models import BACKBONES, create_model
    from facedistill.models.complexity import count_macs, count_parameters, format_count

    if model not in BACKBONES:
        _fail(KeyError(f"unknown backbone '{model}'; known: {', '.join(BACKBONES.names())}"))
    net = create_model(model, embedding_size=embedding_size)
    typer.echo(
        f"{model} (embedding {embedding_size}): params {format_count(count_parameters(net))}, "
        f"MACs {format_count(count_macs(net))} at 112x112"
    )


@app.command()
def align(
    src: Annotated[Path, typer.Argument(help="Raw photos: SRC/<identity>/<image>.")],
    dst: Annotated[Path, typer.Argument(help="Aligned faces go to DST/<identity>/<image>.jpg, the report beside.")],
    workers: Annotated[int, typer.Option(help="Worker processes, each with its own detector.")] = 2,
    no_face: Annotated[
        Literal["skip", "center_crop"],
        typer.Option("--no-face", help="Faceless images: skip them, or write their centre square."),
    ] = "skip",
    score_threshold: Annotated[float, typer.Option(help="YuNet score threshold (0.5 made the shared data).")] = 0.5,
    fit: Annotated[
        Literal["lstsq", "lmeds"],
        typer.Option(
            help="Landmark fit: lstsq (least squares, the crops of insightface's norm_crop) or lmeds (robust, may "
            "drop a landmark; made the shared data)."
        ),
    ] = "lstsq",
    resume: Annotated[bool, typer.Option(help="Skip images the report already lists as done.")] = True,
) -> None:
    """Detect faces (YuNet), align them to the ArcFace template at 112x112; every image is listed in
    DST/align_report.tsv (aligned, no_face, center_crop or unreadable)."""
    from facedistill.data.align import align_folder

    try:
        report = align_folder(src, dst, workers, score_threshold, no_face, resume, fit=fit)
    except (ValueError, FileNotFoundError, ModuleNotFoundError, RuntimeError, OSError) as error:
        _fail(error)
    typer.echo(report.summary())


@app.command()
def pack(
    source: Annotated[Path, typer.Argument(help="Identity folders to pack (root/<identity>/<image>).")],
    out: Annotated[Path, typer.Argument(help="Output directory for train.rec/.idx/property, or a .bin file.")],
    pairs: Annotated[
        Path | None,
        typer.Option(help="Pack these pairs (LFW pairs.txt, or a TSV with paths relative to SOURCE) into a .bin."),
    ] = None,
    exclude: Annotated[
        Path | None,
        typer.Option(help="Identity list (e.g. val_identities.txt) to leave out of the RecordIO pack."),
    ] = None,
) -> None:
    """Folder -> insightface RecordIO (train.rec/.idx/property), or pairs -> .bin verification pack."""
    from facedistill.data.datasets import ImageFolderDataset
    from facedistill.data.recordio import pack_folder_to_recordio
    from facedistill.data.splits import read_identity_list
    from facedistill.data.verification import pack_pairs_to_bin

    try:
        if pairs is not None:
            from facedistill.eval.verify import load_pairs_set

            if exclude is not None:
                raise ValueError(
                    "--exclude applies to a training pack, not to --pairs: a pairs pack holds exactly the pairs given"
                )
            out.parent.mkdir(parents=True, exist_ok=True)
            pack_pairs_to_bin(load_pairs_set(pairs, source).pairs, out)
            typer.echo(f"wrote {out}")
            return
        excluded = read_identity_list(exclude) if exclude is not None else None
        folder = ImageFolderDataset(source, exclude=excluded)
        samples = [
            (folder.root / rel, int(label)) for rel, label in zip(folder.relative_paths, folder.labels, strict=True)
        ]
        pack_folder_to_recordio(samples, out)
    except (ValueError, FileNotFoundError, OSError) as error:
        _fail(error)
    left_out = f" ({len(folder.excluded)} identities of {exclude} left out)" if folder.excluded else ""
    typer.echo(f"packed {len(folder)} images of {folder.num_classes} identities into {out}{left_out}")


@app.command()
def split(
    data: Annotated[Path, typer.Argument(help="Identity folders (root/<identity>/<image>) to hold identities out of.")],
    out_dir: Annotated[Path, typer.Argument(help="Writes OUT_DIR/val_identities.txt and OUT_DIR/val_pairs.tsv.")],
    val_identities: Annotated[int, typer.Option(help="Identities held out of training.")] = 30,
    pairs_per_fold: Annotated[
        int, typer.Option(help="Same-identity pairs per fold; each fold has as many different-identity pairs.")
    ] = 30,
    folds: Annotated[int, typer.Option(help="Folds of the pairs.")] = 10,
    seed: Annotated[int, typer.Option(help="Seed of the identity and pair draws.")] = 0,
    overwrite: Annotated[bool, typer.Option(help="Replace existing split files (not once results use them).")] = False,
) -> None:
    """A fixed, seeded validation split: held-out identities and their same/different pairs (paths relative to
    DATA), to choose on instead of a test set. Train with --set data.exclude_identities=OUT_DIR/val_identities.txt
    --set data.val_pairs=OUT_DIR/val_pairs.tsv --set data.val_images=DATA."""
    from facedistill.data.splits import make_identity_split, write_split

    try:
        made = make_identity_split(data, val_identities, pairs_per_fold, folds, seed)
        identities_path, pairs_path = write_split(made, out_dir, overwrite=overwrite)
    except (ValueError, FileNotFoundError, OSError) as error:
        _fail(error)
    typer.echo(f"{made.summary()}\nwrote {identities_path} and {pairs_path}")


def parse_method_variant(entry: str) -> tuple[str, dict[str, Any]]:
    """``"kd"`` -> ("kd", {}); ``"margin_distillation:m_max=0.4,clamp=false"`` -> (name, {m_max: 0.4, clamp: False})."""
    import yaml

    name, _, rest = entry.partition(":")
    options: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, equals, value = item.partition("=")
        if not equals or not key.strip():
            raise ValueError(f"--methods {entry!r}: expected NAME:key=value,key=value, got {item!r}")
        try:
            options[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise ValueError(f"--methods {entry!r}: {value!r} is not a valid YAML value") from None
    return name.strip(), options


@app.command(cls=MethodsInHelp)
def compare(
    methods: Annotated[
        list[str],
        typer.Option(
            "--methods",
            "-m",
            help=f"Methods to compare (repeatable): {KNOWN_METHODS}; NAME or NAME:key=value,key=value for a variant "
            "with its own hyper-parameters, e.g. margin_distillation:embedding_weight=1.",
        ),
    ],
    data: Annotated[Path, typer.Option(help="Training set: identity folders or RecordIO.")],
    teacher: Annotated[str, typer.Option(help="sface, an .onnx file or a .pth checkpoint.")],
    pairs: Annotated[Path, typer.Option(help="Test pairs: LFW pairs.txt, .bin or TSV.")],
    teacher_colour_order: TeacherColourOrder = None,
    teacher_mean: TeacherMean = None,
    teacher_std: TeacherStd = None,
    images: Annotated[Path | None, typer.Option(help="Image root of --pairs.")] = None,
    config: Annotated[Path | None, typer.Option(help="Shared recipe (a train config).")] = None,
    overrides: SetOption = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Comparison directory.")] = Path("runs/compare"),
) -> None:
    """Train one student per method with the same data, teacher cache, recipe and seed; evaluate all; write
    results.md, results.json, ROC curves and angle histograms. Keys of the config's method section apply to every
    method that has them (e.g. scale)."""
    import dataclasses

    from facedistill.config import ConfigError, load_config
    from facedistill.distill import method_class
    from facedistill.pipeline import compare_methods, markdown_table
    from facedistill.train.recipe import validate_config

    try:
        recipe = load_config(config, overrides or [])
        shared = {key: value for key, value in recipe.method.items() if key != "name"}
        # Every student is validated before the teacher is cached and the first students train, with the data and
        # the teacher cache that compare_methods gives each of them.
        student_data = dataclasses.replace(recipe.data, train=str(data))
        student_teacher = dataclasses.replace(recipe.teacher, cache=str(out / "teacher_cache"))
        specs = {}
        for entry in methods:
            name, own = parse_method_variant(entry)
            try:
                known = {field.name for field in dataclasses.fields(method_class(name).Params)}
                method = {"name": name, **{k: v for k, v in shared.items() if k in known}, **own}
                validate_config(dataclasses.replace(recipe, method=method, data=student_data, teacher=student_teacher))
            except ConfigError as error:
                raise ConfigError(f"--methods {entry}: {error}") from None
            specs[entry.replace(":", "+").replace(",", "+")] = {"method": method}
        base = recipe.to_dict()
        base.pop("method")
        model = _cli_teacher(teacher, teacher_colour_order, teacher_mean, teacher_std)
        rows, _ = compare_methods(out, data, model, pairs, images, specs, base)
    except (ConfigError, KeyError, ValueError, FileNotFoundError, OSError) as error:
        _fail(error)
    typer.echo(markdown_table(rows, pairs.stem))


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Where the demo writes everything.")] = Path("runs/demo"),
    data: Annotated[Path | None, typer.Option(help="Real training faces (identity folders).")] = None,
    pairs: Annotated[Path | None, typer.Option(help="Real test pairs (LFW pairs.txt).")] = None,
    images: Annotated[Path | None, typer.Option(help="Image root of --pairs.")] = None,
    teacher: Annotated[str | None, typer.Option(help="Teacher for real data, e.g. sface.")] = None,
    teacher_colour_order: TeacherColourOrder = None,
    teacher_mean: TeacherMean = None,
    teacher_std: TeacherStd = None,
    epochs: Annotated[float | None, typer.Option(help="Student epochs (default: 4 generated, 6 real).")] = None,
) -> None:
    """The whole pipeline: teacher, cache, ArcFace and MarginDistillation students, evaluation, table, plot."""
    from facedistill.demo import run_demo

    try:
        chosen: Any = teacher
        if _teacher_preprocessing(teacher, teacher_colour_order, teacher_mean, teacher_std) and data is not None:
            # Built here, where the flags are named; without --data the demo refuses --teacher itself.
            chosen = _cli_teacher(teacher, teacher_colour_order, teacher_mean, teacher_std)  # type: ignore[arg-type]
        run_demo(out, data=data, pairs=pairs, images=images, teacher=chosen, epochs=epochs)
    except (ValueError, FileNotFoundError, OSError) as error:
        _fail(error)


def _register_arcface_torch() -> None:
    from facedistill.arcface_torch.cli import arcface_torch_app

    app.add_typer(arcface_torch_app, name="arcface-torch")


_register_arcface_torch()

if __name__ == "__main__":
    app()
