"""ms1mv3_mbf.py of arcface_torch, distilled from its r100 twin (ms1mv3_r100) with MarginDistillation.

Identical to the framework's configs/ms1mv3_mbf.py but for the distillation keys at the end. The teacher is the
run of configs/ms1mv3_r100 (work_dirs/ms1mv3_r100: model.pt, and checkpoint_gpu_*.pt when it ran with
save_all_states = True, whose PartialFC shards give the teacher's own class centres; without them the centres are
the per-class means of the cached teacher embeddings). Embed MS1MV3 (ms1m-retinaface-t1) with it once, then train:

    facedistill arcface-torch cache-teacher configs/ms1mv3_mbf_md        # torchrun works too: each rank a share
    torchrun --nproc_per_node 8 train_v2.py configs/ms1mv3_mbf_md
"""

from easydict import EasyDict as edict

# make training faster
# our RAM is 256G
# mount -t tmpfs -o size=140G  tmpfs /train_tmp

config = edict()
config.margin_list = (1.0, 0.5, 0.0)
config.network = "mbf"
config.resume = False
config.output = None
config.embedding_size = 512
config.sample_rate = 1.0
config.fp16 = True
config.momentum = 0.9
config.weight_decay = 1e-4
config.batch_size = 128
config.lr = 0.1
config.verbose = 2000
config.dali = False

config.rec = "/train_tmp/ms1m-retinaface-t1"
config.num_classes = 93431
config.num_image = 5179510
config.num_epoch = 40
config.warmup_epoch = 0
config.val_targets = ["lfw", "cfp_fp", "agedb_30"]

# Distillation (facedistill): MarginDistillation against the teacher's frozen class centres, preset "facedistill":
# the paper's s = 64 and m from 0.2 to 0.5, with the dataset-level normaliser, clamp, guard and the angle term over
# the frozen centres (kd_weight 1, T 4) that facedistill validated; preset="official" is the paper's code exactly.
# The r100 teacher run's PartialFC shards are its own centres, so the teacher space is not centred (centring
# applies to mean centres: config.teacher_subtract_mean = True is refused with a head). A run saved without
# save_all_states has no shards: set config.teacher_centres = "mean" and config.teacher_subtract_mean = True then.
config.loss = "margin_distillation"
config.loss_params = dict(preset="facedistill")
config.teacher = "work_dirs/ms1mv3_r100"
config.teacher_network = "r100"
config.teacher_cache = "work_dirs/ms1mv3_r100/teacher_cache"
