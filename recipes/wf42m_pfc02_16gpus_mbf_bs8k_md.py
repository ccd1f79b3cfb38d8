"""wf42m_pfc02_16gpus_mbf_bs8k.py of arcface_torch, distilled from its r100 twin with MarginDistillation.

Identical to the framework's configs/wf42m_pfc02_16gpus_mbf_bs8k.py but for the distillation keys at the end. The
teacher is the run of configs/wf42m_pfc02_16gpus_r100 (work_dirs/wf42m_pfc02_16gpus_r100: model.pt, and
checkpoint_gpu_*.pt when it ran with save_all_states = True, whose PartialFC shards give the teacher's own class
centres; without them the centres are the per-class means of the cached teacher embeddings). Embed WebFace42M
with it once, then train:

    torchrun --nproc_per_node 8 -m facedistill.cli arcface-torch cache-teacher configs/wf42m_pfc02_16gpus_mbf_bs8k_md
    torchrun --nproc_per_node 8 train_v2.py configs/wf42m_pfc02_16gpus_mbf_bs8k_md
"""

from easydict import EasyDict as edict

# make training faster
# our RAM is 256G
# mount -t tmpfs -o size=140G  tmpfs /train_tmp

config = edict()
config.margin_list = (1.0, 0.0, 0.4)
config.network = "mbf"
config.resume = False
config.output = None
config.embedding_size = 512
config.sample_rate = 0.2
config.fp16 = True
config.momentum = 0.9
config.weight_decay = 1e-4
config.batch_size = 512
config.lr = 0.4
config.verbose = 10000
config.dali = False

config.rec = "/train_tmp/WebFace42M"
config.num_classes = 2059906
config.num_image = 42474557
config.num_epoch = 20
config.warmup_epoch = 2
config.val_targets = []

# Distillation (facedistill): MarginDistillation against the teacher's frozen class centres, preset "facedistill":
# the paper's s = 64 and m from 0.2 to 0.5, with the dataset-level normaliser, clamp, guard and the angle term over
# the frozen centres (kd_weight 1, T 4) that facedistill validated; preset="official" is the paper's code exactly.
# The r100 teacher run's PartialFC shards are its own centres, so the teacher space is not centred (centring
# applies to mean centres: config.teacher_subtract_mean = True is refused with a head). A run saved without
# save_all_states has no shards: set config.teacher_centres = "mean" and config.teacher_subtract_mean = True then.
config.loss = "margin_distillation"
# 2,059,906 identities: the frozen centres in half precision (unit vectors; see facedistill.heads.partial_fc),
# sampled at the recipe's sample_rate like the framework's PartialFC_V2.
config.loss_params = dict(preset="facedistill", centre_dtype="float16")
config.teacher = "work_dirs/wf42m_pfc02_16gpus_r100"
config.teacher_network = "r100"
config.teacher_cache = "work_dirs/wf42m_pfc02_16gpus_r100/teacher_cache"
