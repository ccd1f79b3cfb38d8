"""What every distillation method plugs into.

A method is an ``nn.Module`` registered by name. It receives the student's embeddings, the labels and the cached
teacher embeddings of the same images (mirror rows for mirrored images), and returns a dict of named loss terms;
the training loop sums them and logs each. Its parameters (a learnable head, say) are trained with the student.
Hyper-parameters are a dataclass per method, validated like the rest of the config.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from facedistill.config import ConfigError, from_dict
from facedistill.heads import MarginHead
from facedistill.heads.sharded import ShardedMarginHead
from facedistill.registry import Registry


@dataclass
class MethodContext:
    """What a method may need besides its own hyper-parameters, prepared once before training."""

    num_classes: int
    embedding_size: int
    # Frozen, L2-normalised teacher class centres [C, d] (None for methods without a teacher).
    centres: torch.Tensor | None = None
    # cos(teacher embedding, its class centre) for every cached image and its mirror, [N, 2].
    typicality: torch.Tensor | None = None
    # At scale no rank holds the full centres or the typicality of every image: this rank's block of the centres
    # (PartialFC's split, ``heads.sharded.shard_range``) and the max typicality over the whole training set.
    local_centres: torch.Tensor | None = None
    typicality_max: float | None = None
    steps_per_epoch: int = 1
    # Several processes (torchrun) and a method whose head only scores the margin loss: build ShardedMarginHead,
    # the class centres split over the ranks (set by the training loop, from ``DistillMethod.shards_head``).
    shard_heads: bool = False


class DistillMethod(nn.Module):
    name: ClassVar[str]
    needs_teacher: ClassVar[bool] = True
    # Pair-based losses (triplet, EKD) need several images per identity in a batch: data.sampler=identity_balanced.
    needs_identity_balanced_batches: ClassVar[bool] = False
    # Its head is used only through its loss terms (never its logits or weights), so with several
    # processes it may be a ShardedMarginHead; methods that read the full logits or move the centres keep a full,
    # frozen head on every rank.
    shards_head: ClassVar[bool] = False
    # It builds its head from this rank's block of the centres alone (``MethodContext.local_centres``), so at
    # millions of identities no rank needs the full matrix.
    takes_local_centres: ClassVar[bool] = False
    Params: ClassVar[type]

    def __init__(self, params: Any, context: MethodContext) -> None:
        super().__init__()
        self.params = params
        self.context = context

    @classmethod
    def head_can_shard(cls, params: Any) -> bool:
        """``shards_head`` for these hyper-parameters (an option that reads the full logits turns sharding off)."""
        return cls.shards_head

    def forward(
        self, embeddings: torch.Tensor, labels: torch.Tensor, teacher: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def set_progress(self, step: int, epoch: float) -> None:
        """Called before every step, for methods with warm-ups or moving statistics."""

    @property
    def mirror_rows(self) -> bool:
        """Whether a mirrored image reads the teacher row of the mirror image (else the original's)."""
        return True


def build_margin_head(
    context: MethodContext,
    scale: float,
    m1: float,
    m2: float,
    m3: float,
    learnable: bool = True,
    centres: torch.Tensor | None = None,
    target_form: str = "continue",
) -> MarginHead | ShardedMarginHead:
    """``MarginHead``, or with ``context.shard_heads`` its sharded twin holding this rank's block of centres."""
    if not context.shard_heads:
        return MarginHead(
            context.num_classes, context.embedding_size, scale, m1, m2, m3, learnable, centres, target_form
        )
    if centres is None and learnable:
        # Drawn in full, as MarginHead draws them, then sliced: the run starts from the centres one process would,
        # and consumes the same random numbers.
        centres = torch.randn(context.num_classes, context.embedding_size) * 0.01
    return ShardedMarginHead(
        context.num_classes,
        context.embedding_size,
        scale,
        m1,
        m2,
        m3,
        learnable,
        centres,
        # The backbone is under DDP, which averages what the sharded head already made exact per rank.
        undo_ddp_average=True,
        target_form=target_form,
    )


# ArcFace's and CosFace's usual margins.
DEFAULT_MARGINS = {"arc": 0.5, "cos": 0.35}


def margin_head(
    context: MethodContext,
    scale: float,
    margin: float | None,
    head: Literal["frozen", "learnable"] = "frozen",
    variant: Literal["arc", "cos"] = "arc",
) -> MarginHead | ShardedMarginHead:
    """ArcFace (``arc``) or CosFace (``cos``) head; ``frozen`` uses the teacher's centres, ``learnable`` starts
    from small random centres like the ArcFace baseline."""
    margin = DEFAULT_MARGINS[variant] if margin is None else margin
    m2, m3 = (margin, 0.0) if variant == "arc" else (0.0, margin)
    if head == "frozen":
        if context.centres is None:
            raise ValueError("method.head=frozen needs the teacher's class centres (set teacher.cache)")
        return build_margin_head(context, scale, 1.0, m2, m3, learnable=False, centres=context.centres)
    return build_margin_head(context, scale, 1.0, m2, m3)


METHODS = Registry[type[DistillMethod]]("method")


def method_class(name: Any) -> type[DistillMethod]:
    """The method registered as ``name``. A missing or unknown name is a ConfigError of one line that lists the
    known methods: it is what a user typed (``--method``, ``method.name``), and the list is the fix."""
    known = ", ".join(METHODS.names())
    if name is None:
        raise ConfigError(f"method.name: not set; set method.name to one of {known}")
    if not isinstance(name, str) or name not in METHODS:
        raise ConfigError(f"method.name: unknown method {name!r}; known: {known}")
    return METHODS.get(name)


def method_params(spec: dict[str, Any]) -> tuple[type[DistillMethod], Any]:
    """The method class and its validated hyper-parameters from the config section ``{name: ..., ...}``: unknown
    keys, wrong types and out-of-range values are ConfigErrors naming ``method.<key>``."""
    spec = dict(spec)
    method_cls = method_class(spec.pop("name", None))
    return method_cls, from_dict(method_cls.Params, spec, prefix="method")


def create_method(spec: dict[str, Any], context: MethodContext) -> DistillMethod:
    """Build a method from its config section ``{name: ..., <hyper-parameters>}``."""
    method_cls, params = method_params(spec)
    name = method_cls.name
    if method_cls.needs_teacher and context.centres is None and context.local_centres is None:
        raise ValueError(f"method '{name}' needs a teacher: set teacher.spec and teacher.cache")
    return method_cls(params, context)


def register_method(cls: type[DistillMethod]) -> type[DistillMethod]:
    METHODS.register(cls.name)(cls)
    return cls
