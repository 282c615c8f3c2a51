"""The main job on the embedded synthetic lesion data (no download), sized for a CPU.

    gmic-jax train --config configs/synthetic.py --workdir runs/demo

Cost: 12 epochs of 50 steps of 16 images of 256 x 192; measured 7.0 min (median of seeds 0-4, 6.7-7.2
min) on a quiet 2-core Intel Xeon (family 6 model 207, AVX-512, no AMX), evaluations included.

A scale model of the paper's setting (images 1/11.5 of 2944 x 1920 across). Settings not the paper's:
* data: 800 training / 200 validation images of 256 x 192 from the embedded generator;
* global_strides (1, 2, 1, 2, 1): two of the four stride-2 stages, a 16 x 12 saliency grid (the
  paper's strides give 4 x 3 cells larger than any lesion here);
* global_kernels (3, 3, 3, 1, 1): the last two stages pointwise, so a saliency cell sees 83 x 83
  pixels around itself and holds evidence only of what lies near it;
* global_blocks (1, 1, 1, 1, 1): one block per stage, half the global network's cost;
* saliency_symmetry "rot180": h_g averaged over the image and its 180-degree turn, so evidence
  offset from a finding splits into two half peaks and only evidence on it adds up;
* crop_shape 48 x 48, local_net "resnet18_narrow" (ResNet-18 at a quarter of the width);
* percent_t 0.05: top-t pools the 10 highest of the 192 cells (a finding covers 1 to 4);
* loss.beta 0.07: the L1 weight on the maps, for sparse maps;
* loss.gap_weight 4, loss.gap_margin 0.25 (train/loss.py gap_bce): a BCE on each image's grid-mean
  saliency logit, centred over the batch, with no pull past the margin; it lets the maps localise
  on another generator's images;
* optimizer: learning rate 1e-3 with cosine decay (the BatchNorm running statistics catch up
  with the weights by the end);
* augment.enabled False: the paper's augmentation costs more than it gives on this short schedule
  (turn it on with --config.augment.enabled=True);
* checkpoint_every_steps 50, eval.batch_size 40: bookkeeping, no effect on the numbers;
* best_min_delta 0.01: the kept step is the latest within 0.01 val_auc_malignant of the best, so
  maps that find the findings after the AUC stops rising are kept.
Why each value, what was tried and not kept, and per-seed results: benchmarks/RESULTS.md
("Localisation").
"""

from gmic_jax.train.defaults import default_config


def get_config():
    c = default_config()
    c.data.source = "synthetic"
    c.data.image_shape = (256, 192)
    c.data.num_train = 800
    c.data.num_val = 200
    c.model.image_shape = (256, 192)
    c.model.global_strides = (1, 2, 1, 2, 1)
    c.model.global_blocks = (1, 1, 1, 1, 1)
    c.model.global_kernels = (3, 3, 3, 1, 1)
    c.model.saliency_symmetry = "rot180"
    c.model.crop_shape = (48, 48)
    c.model.K = 6
    c.model.local_net = "resnet18_narrow"
    c.model.percent_t = 0.05
    c.loss.beta = 0.07
    c.loss.gap_weight = 4.0
    c.loss.gap_margin = 0.25
    c.optimizer.learning_rate = 1e-3
    c.optimizer.schedule = "cosine"
    c.augment.enabled = False
    c.batch_size = 16
    c.num_epochs = 12
    c.eval.batch_size = 40
    c.checkpoint_every_steps = 50
    c.best_min_delta = 0.01
    return c
