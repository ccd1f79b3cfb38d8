"""``facedistill arcface-torch ...``: patch an arcface_torch checkout, cache the teacher of a recipe."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

arcface_torch_app = typer.Typer(
    no_args_is_help=True,
    help="The arcface_torch plugin: patch a checkout of insightface's arcface_torch, cache a recipe's teacher.",
)


def _fail(error: Exception) -> None:
    """One line, once per job (rank 0 under torchrun; see ``refusals``), exit status 2."""
    from facedistill.arcface_torch.refusals import report

    report(error)
    raise typer.Exit(2)


@arcface_torch_app.command()
def patch(
    root: Annotated[Path, typer.Argument(help="The arcface_torch folder (or the insightface repository root).")],
    revert: Annotated[bool, typer.Option(help="Restore the upstream files byte for byte.")] = False,
    status: Annotated[
        bool, typer.Option(help="Only say, per file: upstream, patched, outdated (an earlier facedistill's), modified.")
    ] = False,
) -> None:
    """Apply facedistill's patches (pinned to upstream commit 0159b24d) and install its recipes into configs/.

    Every file is checked against the pinned upstream first; a file patched by an earlier facedistill is upgraded
    (or reverted), one that is neither upstream nor patched by any facedistill is refused, naming the file and its
    first line that differs, and nothing is written. Applying twice changes nothing."""
    from facedistill.arcface_torch.patching import FileState, PatchError, resolve_root
    from facedistill.arcface_torch.patching import apply as apply_patches
    from facedistill.arcface_torch.patching import revert as revert_patches
    from facedistill.arcface_torch.patching import status as patch_status
    from facedistill.arcface_torch.shipped import install_recipes, remove_recipes

    try:
        if status:
            for path, state in patch_status(root).items():
                note = " (patched by an earlier facedistill: patch upgrades it)" if state == FileState.OUTDATED else ""
                typer.echo(f"{state.value:9s} {path}{note}")
            return
        if revert:
            # The files first: a refused revert changes nothing, the recipes included.
            typer.echo(str(revert_patches(root)))
            removed = remove_recipes(resolve_root(root))
            typer.echo(f"removed {len(removed)} unchanged facedistill recipes from configs/")
        else:
            report = apply_patches(root)
            installed, kept = install_recipes(resolve_root(root))
            typer.echo(str(report))
            if installed:
                typer.echo(f"installed {len(installed)} facedistill recipes into configs/")
            else:
                typer.echo("facedistill's recipes are already in configs/")
            for name in kept:
                typer.secho(f"kept your configs/{name} (it differs from facedistill's recipe)", err=True)
    except (PatchError, FileNotFoundError, OSError) as error:
        _fail(error)


@arcface_torch_app.command("make-patches")
def make_patches(
    upstream: Annotated[Path, typer.Argument(help="Unmodified arcface_torch at the pinned commit.")],
    edited: Annotated[Path, typer.Argument(help="The edited copy of it.")],
    out: Annotated[Path, typer.Argument(help="The patch folder to write (the repository's patches/arcface_torch).")],
    files: Annotated[
        list[str] | None,
        typer.Argument(help="Paths relative to arcface_torch (default: every upstream file EDITED changes)."),
    ] = None,
    commit: Annotated[str | None, typer.Option(help="Upstream commit the set is pinned to.")] = None,
) -> None:
    """Maintainers: regenerate the patch set from an edited copy: one diff per file, the whole files that patch and
    --revert write (patched.json, upstream.json) and the manifest of their hashes."""
    from facedistill.arcface_torch.make_patches import make_patch_set
    from facedistill.arcface_torch.patching import (
        MANIFEST_NAME,
        PATCHED_TEXTS_NAME,
        UPSTREAM_COMMIT,
        UPSTREAM_TEXTS_NAME,
        PatchError,
    )

    try:
        made = make_patch_set(upstream, edited, out, files, commit=commit or UPSTREAM_COMMIT)
    except (PatchError, OSError) as error:
        _fail(error)
    for rel, patch in made.files.items():
        hunks = (out / patch.diff).read_bytes().count(b"\n@@ ")
        typer.echo(f"{patch.diff}: {rel}, {hunks} hunk(s)")
    typer.echo(f"wrote {out / MANIFEST_NAME}, {out / UPSTREAM_TEXTS_NAME}, {out / PATCHED_TEXTS_NAME}")


@arcface_torch_app.command("cache-teacher")
def cache_teacher(
    config: Annotated[str, typer.Argument(help="The recipe, as train_v2.py takes it (configs/NAME or a file).")],
    root: Annotated[Path, typer.Option(help="The patched arcface_torch checkout the run starts in.")] = Path("."),
    batch_size: int = 64,
    workers: int = 2,
    overwrite: bool = False,
    wait_hours: Annotated[
        float,
        typer.Option(
            min=0.0, max=720.0, help="Under torchrun: how long a process that finished its share waits for the others."
        ),
    ] = 24.0,
) -> None:
    """Embed every record of the recipe's config.rec, and its mirror image, with config.teacher (resumable).

    Under torchrun each process embeds a share of the records on GPU LOCAL_RANK; training then reads the rows by
    record index."""
    import datetime

    from facedistill.arcface_torch import refusals
    from facedistill.arcface_torch.cache import cache_recipe_teacher
    from facedistill.arcface_torch.recipe import RecipeError

    # What this try does not catch reaches the hook: a refusal of a kind not listed here is still one line, and a
    # rank whose wait broke because another rank stopped says nothing (the stopped rank holds the error).
    refusals.install()
    try:
        wait = datetime.timedelta(hours=wait_hours)
        message = cache_recipe_teacher(config, root, batch_size, workers, overwrite, wait)
    except (RecipeError, ValueError, FileNotFoundError, OSError) as error:
        _fail(error)
    if refusals.rank() == 0:
        typer.echo(message)
