"""The paper's MarginDistillation in arcface_torch: the official code's method, on the CPU protocol.

celeba299_mbf.py (the framework's ArcFace baseline: same data, seed, schedule, steps, val target) plus the preset
``official``, which reproduces david-svitov/margindistillation's loss exactly: s = 64, m from 0.2 to 0.5, the max of
c_i over each process's own share of the batch, no clamp, no guard, plain cos(theta + m) past pi, and the teacher
row of the original image for a mirrored one (the official code stores one embedding per image). Two differences
remain, both of the setting rather than the loss: SFace ships no classifier, so the centres are the per-class means
of its cached embeddings (the official code used its teacher's fc7), and the framework's random flip stays on as in
the baseline (the official recipe did not mirror: set it off in the data pipeline to match that too).

Data as in celeba299_mbf.py, then (the cache is the same as celeba299_mbf_md's):

    facedistill arcface-torch cache-teacher configs/celeba299_mbf_md_official
    torchrun --nproc_per_node 2 train_v2.py configs/celeba299_mbf_md_official
"""

from easydict import EasyDict as edict

config = edict()
config.margin_list = (1.0, 0.5, 0.0)
config.network = "mbf"
config.resume = False
config.output = None
config.embedding_size = 128
config.sample_rate = 1.0
config.fp16 = False
config.momentum = 0.9
config.weight_decay = 5e-4
config.batch_size = 64  # per process: 2 processes make a global batch of 128
config.lr = 0.1
config.verbose = 176  # the last step of 4 epochs: 5686 // (2 x 64) = 44 steps an epoch (validated once, at the end)
config.frequent = 10
config.dali = False
config.num_workers = 1
config.seed = 2048

config.rec = "data/celeba299"
config.num_classes = 269
config.num_image = 5686
config.num_epoch = 4
config.warmup_epoch = 1
config.val_targets = ["celeba299_val"]

# Distillation: MarginDistillation exactly as the official code computes it.
config.loss = "margin_distillation"
config.loss_params = dict(preset="official")
config.teacher = "sface"
config.teacher_cache = "data/celeba299/teacher_sface"
