"""Every training setting with its default; ``configs/*.py`` start from here and override."""

from __future__ import annotations

import dataclasses

import ml_collections

from gmic_jax.augment import AugmentConfig
from gmic_jax.config import GMICConfig
from gmic_jax.data.pipeline import default_workers

GAP_WEIGHT = 0.0  # loss.gap_weight: 0 is the paper's loss (no gap term)
GAP_MARGIN = 2.0  # loss.gap_margin: the gap term's centred score past which an image pulls no more (sigmoid(2) = 0.88)


def default_config():
    c = ml_collections.ConfigDict()
    c.seed = 0
    # GMICConfig fields (the model); rotate_crops is the paper's training-time crop rotation.
    c.model = GMICConfig(rotate_crops=True).to_dict()
    c.model.crop_shape = tuple(c.model.crop_shape)
    c.model.image_shape = tuple(c.model.image_shape)
    c.model.global_strides = tuple(c.model.global_strides)
    c.model.global_blocks = tuple(c.model.global_blocks)
    c.model.global_widths = tuple(c.model.global_widths)
    c.model.global_kernels = tuple(c.model.global_kernels)

    c.data = ml_collections.ConfigDict()
    c.data.source = "synthetic"  # 'synthetic' or 'cache' (a `gmic-jax cache` directory)
    c.data.image_shape = (256, 192)  # synthetic only; caches carry their window shape
    c.data.num_train = 1000  # synthetic only
    c.data.num_val = 200  # synthetic only
    c.data.seed = 0  # synthetic only
    c.data.p_benign = 0.35  # synthetic only: share of breasts with each finding
    c.data.p_malignant = 0.35
    c.data.lesion_area = (0.002, 0.006)  # synthetic only: one finding's mask area / image area
    c.data.train_cache = ""  # cache only
    c.data.val_cache = ""
    c.data.normalization = "standardize"  # 'standardize' (original) or 'unit_range' (CBIS-DDSM)
    c.data.balanced_sampling = True  # each epoch: all positives + as many random negatives
    c.data.window_noise = False  # cache only: the original's window noise (shift + size around
    # the best centre) on training images, a fresh draw per epoch;
    # needs a train cache built with `gmic-jax cache --window-noise`
    c.data.workers = default_workers()  # input worker processes (0: load in the training process); by
    # default the usable cores less one (0 if that is 1), at most 16

    c.loss = ml_collections.ConfigDict()
    c.loss.beta = 3.26e-6  # saliency regularisation weight (paper: tuned per run)
    c.loss.saliency_reduction = "sum"  # 'sum' over the grid (Eq. 12) or 'mean'
    c.loss.gap_weight = GAP_WEIGHT  # not in the paper: + weight * BCE of the grid-mean saliency
    # logit (train/loss.py); 0 is the paper's loss
    c.loss.gap_margin = GAP_MARGIN  # that term's centred score past which an image pulls no more

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.learning_rate = 1e-4
    c.optimizer.schedule = "constant"  # 'constant', 'cosine', 'warmup_cosine'
    c.optimizer.warmup_steps = 0
    c.optimizer.weight_decay = 0.0
    c.optimizer.grad_clip_norm = 0.0  # 0: no clipping
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.999

    c.batch_size = 16  # global, over all devices and processes
    c.num_epochs = 10
    c.batch_norm = "local"  # 'local' (per device), 'sync' or 'frozen'
    c.augment = ml_collections.ConfigDict(dataclasses.asdict(AugmentConfig()))
    c.augment.enabled = True
    c.augment.scale = tuple(c.augment.scale)

    c.eval = ml_collections.ConfigDict()
    c.eval.batch_size = 32
    c.eval.every_epochs = 1
    c.eval.tta_draws = 0  # test-time augmentation draws (paper: 10)
    c.eval.prediction = "fusion"  # which head the val_* metrics score

    c.checkpoint_every_steps = 200  # plus one at every evaluation
    c.keep_latest = 2
    # The checkpoint load_checkpoint / predict / evaluate use (gmic_jax.checkpoint.SelectionRule):
    # the latest evaluated step whose best_metric is within best_min_delta of the best evaluated
    # value (0: the best step; larger: differences this small are noise and the later step wins).
    c.best_metric = "val_auc_malignant"  # any val_* key of metrics.jsonl (all higher-is-better)
    c.best_min_delta = 0.0
    c.keep_evaluated = False  # keep every evaluated step (for `gmic-jax compare-steps`)
    c.log_every_steps = 10
    c.init_from = ""  # a checkpoint directory gmic_jax.load_checkpoint reads
    c.progress_bar = True
    # A jax.profiler trace of steps FIRST to LAST ('FIRST:LAST', 1-based as the log counts them,
    # both included) written to WORKDIR/profile (TensorBoard's profile plugin, Perfetto); '' is off.
    c.profile_steps = ""
    return c


def augment_config(c):
    """AugmentConfig from the config's ``augment`` section, or None when disabled."""
    return AugmentConfig.from_section(c.augment.to_dict())
