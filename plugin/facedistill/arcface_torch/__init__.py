"""The arcface_torch plugin: what insightface's patched ``train_v2.py`` calls to train with a facedistill method.

``facedistill arcface-torch patch PATH`` applies ``patches/arcface_torch`` to a checkout of arcface_torch (pinned
to upstream commit 0159b24d). The patched recipe then runs unchanged with ``config.loss`` absent or ``"arcface"``
(the framework's own CombinedMarginLoss + PartialFC_V2) and distils with ``config.loss = "margin_distillation"``
(or any other facedistill method the recipe can serve), on GPUs with NCCL or on CPUs with gloo.
"""
