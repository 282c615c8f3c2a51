"""`gmic-jax predict`: screening exams in; predictions, saliency maps and patch figures out.

    gmic-jax predict --exam-list exams.pkl --images DIR --checkpoint DIR [--checkpoint DIR ...]
                     --output OUT [--preprocessed] [--tta N] [--seed S] [--visualize]
                     [--segmentations DIR] [--batch-size B]
    gmic-jax predict --dicom DIR|FILE --checkpoint DIR ... --output OUT [...]
    gmic-jax predict --synthetic N --checkpoint WORKDIR --output OUT --visualize

The package follows the data's way: :mod:`~gmic_jax.predict.exams` (inputs -> image tasks),
:mod:`~gmic_jax.predict.images` (one task -> its window), :mod:`~gmic_jax.predict.ensemble`
(checkpoints, the compiled function), :mod:`~gmic_jax.predict.runner` (batches, the run),
:mod:`~gmic_jax.predict.outputs` (CSVs, saliency maps, figures), :mod:`~gmic_jax.predict.cli`.

Inputs
    Exam list (the original's pickle, read by :func:`gmic_jax.data.exam_list.read_exam_list`):
    every image of every view list is predicted; a view (or a whole breast) whose list is empty or
    absent simply has no image, and an exam without any image is a failure. Without
    ``--preprocessed`` the images are the stored mammograms (``DIR/<name>.png`` or ``.dcm``) and
    the preprocessing the checkpoint records is run on them (for converted original checkpoints:
    the original pipeline -- crop, flip by ``horizontal_flip``, optimal centre, window). With
    ``--preprocessed`` the exam list and images are ``gmic-jax preprocess`` output (cropped
    images, ``best_center`` in the exam list), read as the original's model runner reads them.
    A label missing from ``cancer_label`` is unknown: its cell stays empty.
    DICOM: every DICOM file under DIR (or one FILE); exams are grouped by StudyInstanceUID,
    laterality and view come from the headers, the breast's orientation from the image; labels
    are unknown (empty cells).
    Synthetic (``--synthetic N``, for checkpoints trained on :mod:`gmic_jax.data.synthetic`): the
    first N exams of its held-out 'test' split, drawn with the settings config.json records
    (seed, finding rates, lesion sizes), with labels and masks (-> localization.csv).

Checkpoints
    Any directory :func:`gmic_jax.load_checkpoint` reads, whatever gmic-jax version wrote its
    config.json. Several = an ensemble: the prediction is the mean of the models' y_fusion, each
    model with its own configuration (its own t). Saliency maps, patches and figures are those of
    the first checkpoint (as the original's ensemble visualises its first model). All checkpoints
    must take the same window and preprocessing (config.json's ``preprocessing`` section, see
    :mod:`gmic_jax.preprocessing`). Of a training workdir, the step its selection rule keeps is
    loaded (:func:`gmic_jax.checkpoint.select_checkpoint`); the log names each checkpoint's step and
    why, and run.json records them.

Test-time augmentation (``--tta N``, seeded by ``--seed``)
    The prediction becomes the mean over N augmented draws of each image (saliency maps, patches
    and localisation stay those of the un-augmented window, which is aligned with the masks). A
    draw is :func:`gmic_jax.augment.tta_augment`'s, the same rule as ``gmic-jax evaluate --tta``:
    the augmentation the first checkpoint was trained with (config.json ``train.augment``, when
    enabled), else the paper's ranges, applied on device to the normalised window. Draw d of an
    image uses the key ``fold_in(fold_in(key(seed), crc32(image name)), d)``: it depends only on
    (seed, image name, draw), never on batching.

Outputs (in OUT)
    predictions.csv           image_index, benign_pred, malignant_pred, benign_label, malignant_label
    breast_predictions.csv    exam, breast, benign_pred, malignant_pred, benign_label, malignant_label
                              (prediction = mean of the breast's CC and MLO view predictions; one
                              row per breast with images)
    saliency/<image>.npy      float32 (2, h, w): benign then malignant, in the model's window frame
    visualization/<image>.png with --visualize (see :mod:`gmic_jax.visualize`)
    localization.csv          with --segmentations (exam-list mode; masks in the window frame as
                              the original's): image_index, dice_benign, dice_malignant,
                              pxap_benign, pxap_malignant, pointing_benign,
                              pointing_malignant, roi_hit -- one row per image with a
                              lesion; an empty cell is undefined (no lesion of that class).
                              Definitions in :mod:`gmic_jax.metrics`.
    failures.txt              one line per failure, when anything failed
    run.json                  how the outputs were made: per checkpoint (in --checkpoint order)
                              checkpoint, checkpoint_step and checkpoint_selection (rule, reason);
                              the inputs and settings; num_exams, num_images, num_failures; the
                              outputs written; the command line and the versions

Loading: the images are read and preprocessed by the input pipeline (:mod:`gmic_jax.data.pipeline`)
in ``--workers`` processes (default: the usable cores less one, 0 below 3 cores; 0 = in this
process), in exam order; no output depends on the number of workers.

Batching: images of all exams go through ONE compiled function with a fixed batch size (the
last batch is padded), split over the local devices; nothing about an image's result depends on
the batch size or on its batch neighbours.

Bad input: a missing or corrupt image, an unknown view, a malformed exam, ... is reported with the
exam and the file; that exam is left out of every output and the others are predicted; the exit
status is then 1. A checkpoint that cannot be used (unreadable, parameters that do not fit its
configuration, ensemble members that disagree on the input) affects every exam: nothing is
predicted, failures.txt is the only output (no CSVs, no run.json) and the exit status is 1.
"""

import importlib

# name -> the module that defines it. Imported on first use: `gmic-jax predict --help` (which
# imports gmic_jax.predict.cli, hence this package) and the input pipeline's worker processes
# (which unpickle gmic_jax.predict.images.ImageExamples) need none of JAX, Flax or Orbax.
_DEFINED_IN = {
    "FAILURES_TXT": "gmic_jax.files",
    "Exam": "gmic_jax.predict.exams",
    "ImageTask": "gmic_jax.predict.exams",
    "PredictError": "gmic_jax.predict.exams",
    "exams_from_dicom": "gmic_jax.predict.exams",
    "exams_from_exam_list": "gmic_jax.predict.exams",
    "exams_from_synthetic": "gmic_jax.predict.exams",
    "LoadedImage": "gmic_jax.predict.images",
    "load_image": "gmic_jax.predict.images",
    "check_variables": "gmic_jax.predict.ensemble",
    "compiled_forward": "gmic_jax.predict.ensemble",
    "load_models": "gmic_jax.predict.ensemble",
    "BREAST_CSV": "gmic_jax.predict.outputs",
    "LOCALIZATION_CSV": "gmic_jax.predict.outputs",
    "PREDICTIONS_CSV": "gmic_jax.predict.outputs",
    "RUN_JSON": "gmic_jax.predict.outputs",
    "SALIENCY_DIR": "gmic_jax.predict.outputs",
    "VISUALIZATION_DIR": "gmic_jax.predict.outputs",
    "PredictResult": "gmic_jax.predict.outputs",
    "predict": "gmic_jax.predict.runner",
}


def __getattr__(name):
    if name in _DEFINED_IN:
        return getattr(importlib.import_module(_DEFINED_IN[name]), name)
    raise AttributeError(f"module 'gmic_jax.predict' has no attribute {name!r}")


__all__ = sorted(_DEFINED_IN)
