"""The CPU protocol's ArcFace baseline in arcface_torch: MobileFaceNet ("mbf", 128-d) on CelebA-299, LFW as val.

Sized for 2 CPU cores (gloo; fp16 off, as CPUs without native half precision only emulate it). Data, packed once
from ../shared/data, relative to the arcface_torch checkout the run starts in:

    facedistill pack ../shared/data/celeba299 data/celeba299
    facedistill pack ../shared/data/lfw data/celeba299/lfw.bin --pairs ../shared/data/lfw_pairs.txt
    torchrun --nproc_per_node 2 train_v2.py configs/celeba299_mbf

Its twin celeba299_mbf_md.py differs only in the distillation keys. LFW here is the framework's val target and is
read, never used to choose anything (benchmarks/arcface_torch_cpu.py reports the last model).
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
config.verbose = 294  # the last step of 6 epochs at 2 x 64 (LFW once, at the end)
config.frequent = 10
config.dali = False
config.num_workers = 1
config.seed = 2048

config.rec = "data/celeba299"
config.num_classes = 299
config.num_image = 6300
config.num_epoch = 6
config.warmup_epoch = 1
config.val_targets = ["lfw"]
