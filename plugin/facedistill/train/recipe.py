"""Whether a config can run, checked as soon as it is built: before a run directory is made or any data is read.

``facedistill.config`` checks each value on its own (type, allowed set, range) and knows no registry, because the
plug-ins (methods, backbones) import it. This module sits above both: it checks the names against the registries
and the values that only make sense together, each in this one place, so that a typo or a missing key is one line
at the start instead of a traceback after the data is read, or a failure after hours of training. The ``train``,
``distill`` and ``compare`` commands call ``validate_config`` right after building a config, and ``train.loop.train``
calls it first, for runs built in Python.
"""

from __future__ import annotations

from typing import Any

import torch

from facedistill.config import Config, ConfigError
from facedistill.distill import DistillMethod, method_params
from facedistill.models import BACKBONES


def validate_config(config: Config) -> tuple[type[DistillMethod], Any]:
    """Raise a one-line ``ConfigError`` naming the dotted key when ``config`` cannot run; return the method class and
    its validated hyper-parameters."""
    method_cls, params = method_params(config.method)
    name = method_cls.name
    if config.model.name not in BACKBONES:
        raise ConfigError(f"model.name: unknown backbone {config.model.name!r}; known: {', '.join(BACKBONES.names())}")
    if not config.data.train:
        # An empty path would open the working directory as a folder of identities.
        raise ConfigError("data.train: not set; give the training set (identity folders or RecordIO)")
    if method_cls.needs_identity_balanced_batches and config.data.sampler != "identity_balanced":
        raise ConfigError(
            f"method '{name}' compares images of the same identity within a batch; "
            "set data.sampler=identity_balanced (and data.images_per_identity)"
        )
    if method_cls.needs_teacher and not config.teacher.cache:
        raise ConfigError(
            f"method '{name}' reads the teacher's embeddings from a cache: set teacher.cache "
            "(build it with `facedistill cache-teacher`)"
        )
    if config.teacher.subtract_mean and config.teacher.centres == "head":
        raise ConfigError(
            "teacher.subtract_mean centres the mean class centres; a trained head has its own: "
            "set teacher.centres=mean, or teacher.subtract_mean=false"
        )
    if config.train.select == "best_val" and not config.data.val_pairs:
        raise ConfigError("train.select=best_val needs data.val_pairs (a validation set, never a test set)")
    if config.run.device != "auto":
        try:
            torch.device(config.run.device)
        except (RuntimeError, ValueError):
            raise ConfigError(
                f"run.device: {config.run.device!r} is not a device; use auto, cpu, cuda or cuda:N"
            ) from None
    return method_cls, params
