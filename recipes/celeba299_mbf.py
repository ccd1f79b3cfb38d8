"""The CPU protocol's ArcFace baseline in arcface_torch: MobileFaceNet ("mbf", 128-d) on CelebA-299's training split.

The framework's own loss (CombinedMarginLoss + PartialFC_V2), sized for 2 CPU cores (gloo; fp16 off, as CPUs
without native half precision only emulate it). It trains on the 269 training identities of the validation split
(``recipes/splits/celeba299``) and validates on the 600 pairs of the 30 held-out ones, its only val target; LFW,
the test set, is read once after training, never during it. Data, packed once; ``FD`` is the facedistill
repository and ``SHARED`` its ``../shared`` (commands run from the arcface_torch checkout):

    facedistill pack $SHARED/data/celeba299 data/celeba299 --exclude $FD/recipes/splits/celeba299/val_identities.txt
    facedistill pack $SHARED/data/celeba299 data/celeba299/celeba299_val.bin \
        --pairs $FD/recipes/splits/celeba299/val_pairs.tsv
    torchrun --nproc_per_node 2 train_v2.py configs/celeba299_mbf
    facedistill eval work_dirs/celeba299_mbf/model.pt --pairs $SHARED/data/lfw_pairs.txt --images $SHARED/data/lfw

Its twins celeba299_mbf_md.py (facedistill's validated MarginDistillation) and celeba299_mbf_md_official.py (the
paper's) differ only in the distillation keys; benchmarks/arcface_torch_cpu.py runs all three.
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
