"""Named recipes: the settings of a published configuration, chosen with one key.

``recipe: NAME`` in ``params.yaml`` (or ``--set recipe=NAME``) puts the recipe's values under
the settings: a recipe replaces the *code defaults*, and every key written in the settings
file or given with ``--set`` still wins over it (:func:`ddps_core.config.parse_settings`).
``ddps config show`` prints the resolved values, ``ddps config recipes`` every recipe.

The values and where each comes from (docs/method.md, "Recipes"):

``ddpm-seg-256``
    DDPM-Seg's reference setting (``yandex-research/ddpm-segmentation``): the guided-diffusion
    256 x 256 model of ``scripts/ddpm/train_interpreter.sh`` (``adm-256-lsun``: 1000 linear
    steps), features at steps [50, 150, 250] of decoder blocks [5, 6, 7, 8, 12], 10 pixel
    MLPs trained as ``train_interpreter.py`` trains them (``experiments/<dataset>/ddpm.json``),
    DatasetDDPM's filter, and the student at the export's size.
``ddps-<ade20k|cityscapes>-<segformer|deeplabv3plus>``
    The supervised setting of DDPS (Lai et al. 2023): the segmentor trained on the dataset's
    own labelled training split with mmsegmentation's recipe for it (the config files are named
    in docs/method.md), and the DDPS refiner with T = 20 steps. ``student.encoder`` picks the
    paper's backbone (MiT-B0 / B2 / B5; MobileNetV2 / ResNet-50 / ResNet-101).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

__all__ = ["RECIPES", "apply_recipe", "merge"]

_DDPM_SEG_256: dict[str, Any] = {
    "ddpm": {"preset": "adm-256-lsun", "schedule": "linear", "num_timesteps": 1000},
    "features": {"steps": [50, 150, 250], "blocks": [5, 6, 7, 8, 12], "noise_seed": 0},
    "teacher": {"members": 10, "batch_size": 64, "lr": 0.001, "max_epochs": 100, "patience": 50, "min_epoch": 4,
                "min_class_pixels": 20},
    # scripts/datasetDDPM/generate_dataset.sh: 10000 samples, all 1000 ancestral steps;
    # train_deeplab.py: slice [30 : -int(0.1 N) + 30], the real images only for selection
    "generate": {"source": "generated", "n_samples": 10000, "sample_method": "ancestral", "sample_steps": 1000,
                 "filter": "reference", "drop_certain": 30, "drop_uncertain": 0.1, "include_real": False},
    # train_deeplab.py: DeepLab (V3, ResNet-101 in torchvision; V3+ here), Adam lr 1e-3 without
    # decay or schedule, batch 8, 20 epochs, no augmentation, at the images' size (256), the
    # epoch chosen on the real labelled images
    "student": {"source": "generated", "image_size": None, "arch": "deeplabv3plus", "encoder": "resnet101",
                "optimizer": "adamw", "lr": 0.001, "weight_decay": 0.0, "warmup_steps": 0, "poly_power": 0.0,
                "batch_size": 8, "epochs": 20, "hflip": False, "scale_min": 1.0, "scale_max": 1.0,
                "select_on": "real"},
}

# mmsegmentation's pipelines: Resize(img_scale, ratio_range=(0.5, 2.0)), RandomCrop(crop,
# cat_max_ratio=0.75), RandomFlip(0.5); crops padded with the ignore label
_LABELLED = {"source": "labelled", "ratio_range": [0.5, 2.0], "cat_max_ratio": 0.75, "hflip": True,
             "select_on": "last"}
_ADE20K = {"data": {"source": "ade20k"},
           "student": {**_LABELLED, "base_scale": [2048, 512], "crop_size": [512, 512], "iterations": 160000,
                       "batch_size": 16}}
_CITYSCAPES = {"data": {"source": "cityscapes"},
               "student": {**_LABELLED, "base_scale": [2048, 1024]}}
# AdamW 6e-5, head lr x 10, no decay on norms, 1500 warm-up iterations, poly power 1
_SEGFORMER = {"arch": "segformer", "encoder": "mit_b0", "optimizer": "adamw", "lr": 6e-5, "weight_decay": 0.01,
              "head_lr_mult": 10.0, "norm_weight_decay": False, "warmup_steps": 1500, "poly_power": 1.0,
              "min_lr": 0.0}
# SGD 0.01, momentum 0.9, weight decay 5e-4, poly power 0.9 down to 1e-4, no warm-up
_DEEPLAB = {"arch": "deeplabv3plus", "encoder": "mobilenet_v2", "optimizer": "sgd", "lr": 0.01, "momentum": 0.9,
            "weight_decay": 0.0005, "head_lr_mult": 1.0, "norm_weight_decay": True, "warmup_steps": 0,
            "poly_power": 0.9, "min_lr": 1e-4}
_REFINER_T20 = {"refiner": {"num_timesteps": 20}}


def merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``over`` on top: nested mappings merged key by key, anything else from
    ``over`` replacing ``base``'s (copies; neither input changes)."""
    out = copy.deepcopy(dict(base))
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


RECIPES: dict[str, dict[str, Any]] = {
    "ddpm-seg-256": _DDPM_SEG_256,
    "ddps-ade20k-segformer": merge(merge(_ADE20K, {"student": _SEGFORMER}), _REFINER_T20),
    "ddps-ade20k-deeplabv3plus": merge(merge(_ADE20K, {"student": _DEEPLAB}), _REFINER_T20),
    "ddps-cityscapes-segformer": merge(merge(_CITYSCAPES, {"student": {
        **_SEGFORMER, "crop_size": [1024, 1024], "iterations": 160000, "batch_size": 8}}), _REFINER_T20),
    "ddps-cityscapes-deeplabv3plus": merge(merge(_CITYSCAPES, {"student": {
        **_DEEPLAB, "crop_size": [512, 1024], "iterations": 80000, "batch_size": 8}}), _REFINER_T20),
}


def apply_recipe(raw: Mapping[str, Any]) -> dict[str, Any]:
    """``raw`` settings with the values of its ``recipe`` underneath (unchanged without one).
    An unknown name is left for the settings' validation to name."""
    name = raw.get("recipe")
    if not isinstance(name, str) or name not in RECIPES:
        return dict(raw)
    return merge(RECIPES[name], raw)
