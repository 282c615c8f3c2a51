"""The main job on the embedded synthetic lesion data (no download), sized for a CPU.

    gmic-jax train --config configs/synthetic.py --workdir runs/demo

Cost: 12 epochs of 50 steps of 16 images of 256 x 192; measured 7.0 min (median of seeds 0-4, 6.7-7.2
min) on a quiet 2-core Intel Xeon (family 6 model 207, AVX-512, no AMX), evaluations included.

A scale model of the paper's setting: the images are 1/11.5 of 2944 x 1920 across, so the global
network keeps two of its four stride-2 stages (global_strides (1, 2, 1, 2, 1): a 16 x 12 saliency
grid, 1/16 of the image, where the paper's grid is 1/64 of an image 11.5x larger) -- with the
paper's strides a 256 x 192 image has a 4 x 3 grid whose cells are bigger than any lesion, and
the saliency maps cannot localise (measured: Dice 1.2x that of random maps). The local network is
ResNet-18 at a quarter of the width on K = 6 crops of 48 x 48 (the paper's ResNet-18 costs 5x
the whole step here). Cosine learning-rate decay lets the batch-norm running statistics catch up
with the weights by the end (with a constant rate, y_local evaluated with running statistics
was worse than chance). The paper's augmentation is off: on this short schedule it cost more
than it gave (measured: val_auc_malignant 0.78 after 5 epochs with it, 0.975 without); turn it
on with --config.augment.enabled=True.

Localisation (the saliency map's peak on the finding; `val_pointing_*`, gmic_jax.metrics). With
3x3 convs everywhere every saliency cell of a 256 x 192 image sees 227 x 227 pixels, nearly the
whole image, so image-level labels leave the place of the evidence free: a map may peak two
rows from the finding and stay dark on it (measured: benign peaks ~2 cells off on seeds 2 and 3,
the map on the finding 0.3% of its peak, benign pointing 0.09 and 0.03). What is kept, and why (tuned on seeds
0, 1, 2; 200 validation images):
* global_kernels (3, 3, 3, 1, 1) with global_strides (1, 2, 1, 2, 1): the last two stages are
  pointwise (the stride 2 moved before them), so a cell sees 83 x 83 pixels around itself
  (models/global_net.py receptive_field) and can only hold evidence of what lies near it. Seed 2:
  pointing malignant / benign 0.97 / 0.90 against 0.74 / 0.09 with 3x3 convs everywhere;
* saliency_symmetry="rot180": h_g averaged over the image and its 180-degree turn, so evidence
  offset from a finding splits into two half-height peaks and only evidence on the finding adds
  up (with 3x3 convs everywhere: malignant pointing 0.96-0.99 against 0.10 without it on seed 0);
* percent_t 0.05 (top-t pools the 10 highest of 192 cells; a finding covers 1 to 4): with 0.1 (19
  cells) a map lit only on its findings gives y_global ~0.1-0.2 on a positive image, so lighting
  many cells pays as well; on another generator's images (benchmarks/heldout_localization.py,
  data and training seed 0) at most one class's map learned per run (0.1: neither, 0.02: benign
  alone), 0.05: both (test pointing 0.84 / 0.91); seeds 0-2 here: benign pointing 0.90 each (0.86-0.90
  with 0.1). Not solved by it: on that generator's data seed 1 (training seed 1) neither map learned
  (0.00 / 0.00); the next item solves it;
* loss.gap_weight 4 with loss.gap_margin 0.25 (train/loss.py gap_bce; not in the paper): a BCE on
  each image's grid-mean saliency logit, centred over the batch, and no pull on an image past the
  margin. Top-t pools ten cells and the L1 term saturates the sigmoid of all others, so a finding
  outside the top ten never pulls the head (measured on that failed run's frozen h_g: a probe
  trained with the masks finds the findings, a fresh head with the paper's loss does not); the
  grid mean reaches every cell. The margin limits the saturation: margin 2, which a sparse map
  never reaches, let malignant logits grow to ~10 over a background of -7, the map sat at exactly
  1.0 over several cells and the first argmax left the finding (seeds 0-2: malignant pointing
  0.60 / 0.74 / 0.59; seed 0, images with a tie at the malignant maximum: 32% at margin 2, 24% at
  0.25). Tuned on seed 0 here and held-out data seed 1 (training seed 1),
  pointing malignant / benign: margin 0.5: 0.86 / 0.84 and 0.63 / 0.99; 0.25: 0.90 / 0.89 and
  0.71 / 0.99; 0.1: 0.97 / 0.91 and 0.00 / 1.00 (the malignant map lost again). Weight 1 (margin
  2): 0.96 / 0.90 and 0.00 / 0.86. Confirmed with margin 0.25: seeds 1 and 2 here 0.97 / 0.84 and
  0.91 / 0.89, held-out data seed 0 0.79 / 0.92; reported only (untouched while tuning): seeds 3
  and 4 here 0.97 / 0.89 and 0.99 / 0.71, held-out data seeds 4 and 5 0.92 / 0.98 and 0.66 / 0.90.
  The cost here: Dice 0.21-0.23 against 0.25-0.28 without the term.
* loss.beta 0.07 (L1 on the maps): sparse maps, Dice 0.22 vs 0.06-0.09 at beta 1e-4;
* global_blocks (1, 1, 1, 1, 1): half the global network's cost, which pays for the second turn;
* best_min_delta 0.01: the maps may find the findings later than val_auc_malignant stops rising
  (within 0.01); the later step wins.
Tried and not kept (code at commit 2f7bfe7, removed since): a top-t warm-up (the loss pools from
the mean down to top-t; on the held-out generator it rescued data seed 1 and broke data seed 0);
the saliency head trained also on max-pooled h_g (localised data seed 0 there, nothing learned on
data seed 1); a cell seeing 51 x 51 pixels (global_kernels (3, 3, 1, 1, 1), strides
(1, 2, 2, 1, 1): seed 2 benign pointing 0.80 but malignant 0.70 and AUC 0.954, the global head
alone 0.83); top-t 0.02 with 3x3 convs everywhere (seed 2: pointing 0.00 for both classes after 7
epochs); late strides (1, 1, 1, 2, 2) (malignant pointing 0.30-0.43); beta 0.07 without the
symmetry (0.10 / 0.01).
Per-seed results and timings: benchmarks/RESULTS.md ("Localisation").
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
