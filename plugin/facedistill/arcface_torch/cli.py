"""``facedistill arcface-torch ...``: patch an arcface_torch checkout, cache the teacher of a recipe."""

from __future__ import annotations

import typer

arcface_torch_app = typer.Typer(
    no_args_is_help=True,
    help="The arcface_torch plugin: patch a checkout of insightface's arcface_torch, cache a recipe's teacher.",
)
