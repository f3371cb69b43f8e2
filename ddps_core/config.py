"""Typed settings parsed from ``params.yaml``: the single source of configuration.

``params.yaml`` has one section per pipeline stage. It is parsed into :class:`Settings`
(pydantic, ``extra="forbid"``), so an unknown key or a wrong type is one :class:`ConfigError`
that names the dotted key. CLI options and deployment parameters override the same fields
through :func:`load_settings` ``overrides`` (dotted keys), which are validated the same way.

Three mistakes YAML and pydantic would let through are errors too: a key given twice in one
mapping (YAML keeps the last value silently), a boolean where a number is expected (pydantic
reads ``true`` as 1), and values that only the settings of two sections together rule out
(a feature timestep beyond ``ddpm.num_timesteps``, a decoder block the preset does not have):
:func:`cross_check`. An ignore index that is a class id is allowed: that class is then the
ignored class (DDPM-Seg's ``bedroom_28`` ignores its class 0; docs/method.md).
"""

from __future__ import annotations

import copy
import os
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from ddps_core.errors import ConfigError

DEFAULT_PARAMS = Path("params.yaml")


def _admits_bool(annotation: Any) -> bool:
    """Whether a field of this type may hold a boolean (``bool``, ``Any``, a union or
    container holding one, a section); numbers, strings and literals may not."""
    if annotation is bool or annotation is Any:
        return True
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return True
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return any(isinstance(v, bool) for v in typing.get_args(annotation))
    if origin is typing.Union or origin is types.UnionType:
        return any(_admits_bool(a) for a in typing.get_args(annotation))
    if origin in (list, tuple, set, frozenset):
        return any(_admits_bool(a) for a in typing.get_args(annotation) if a is not Ellipsis)
    if origin is dict:
        args = typing.get_args(annotation)
        return not args or _admits_bool(args[-1])
    return False


def _number_kind(annotation: Any) -> str:
    """What a numeric field wants, in pydantic's words."""
    args = {annotation, *typing.get_args(annotation)}
    for a in list(args):
        args.update(typing.get_args(a))
    return "a valid integer" if int in args else "a valid number" if float in args else "of the field's type"


def _holds_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return True
    if isinstance(value, (list, tuple)):
        return any(isinstance(v, bool) for v in value)
    if isinstance(value, Mapping):
        return any(isinstance(v, bool) for v in value.values())
    return False


class Section(BaseModel):
    """Base of every settings section: unknown keys are errors, assignment is validated, and
    a boolean is refused where a number (or a list of numbers) is expected, instead of being
    read as 0 or 1 (``members: true`` is a mistake, not one member)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_a_number(cls, value: Any, info: ValidationInfo) -> Any:
        field = cls.model_fields.get(info.field_name or "")
        if field is not None and _holds_bool(value) and not _admits_bool(field.annotation):
            raise ValueError(f"Input should be {_number_kind(field.annotation)}, not a boolean")
        return value


def _known_location(value: str) -> str:
    """A folder or an fsspec URL whose protocol has an installed implementation."""
    from ddps_core.storage import check_protocol

    try:
        check_protocol(value)
    except ConfigError as exc:
        raise ValueError(str(exc)) from None
    return value


class SyntheticSettings(Section):
    """The embedded synthetic face-parts domain (``ddps data synthetic``)."""

    image_size: Literal[32, 64, 128] = 32
    n_unlabeled: int = Field(2000, ge=0)
    n_labeled: int = Field(20, ge=1)
    n_test: int = Field(100, ge=1)
    seed: int = Field(0, ge=0)


DatasetSource = Literal["synthetic", "ddpm-seg", "ade20k", "cityscapes", "folder"]

# Reader split names that make up our canonical train / test / unlabeled splits, per source.
# A default split whose folder is absent is skipped (train aside); one set in data.splits
# must exist.
DEFAULT_SPLITS: dict[str, dict[str, str | None]] = {
    "synthetic": {"train": "train", "test": "test", "unlabeled": "unlabeled"},
    "ddpm-seg": {"train": "train", "test": "test", "unlabeled": "unlabeled"},
    "ade20k": {"train": "training", "test": "validation", "unlabeled": None},
    "cityscapes": {"train": "train", "test": "val", "unlabeled": None},
    "folder": {"train": "train", "test": "test", "unlabeled": "unlabeled"},
}


ReferenceDatasetName = Literal["ffhq_34", "bedroom_28", "cat_15", "horse_21", "celeba_19", "ade_bedroom_30"]


class DataSettings(Section):
    """Stage ``data``: make (synthetic) or import (user data) the canonical dataset.

    The stage writes ``out`` in the DDPM-Seg folder layout (``real/{train,test}`` with
    ``.npy`` labels, ``unlabeled/``, ``classes.yaml``); every later stage reads that.

    ``dataset`` names one of the six datasets DDPM-Seg distributes
    (:mod:`ddps_core.datasets.reference`): ``root`` is then its folder as the reference ships it,
    and the source (``ddpm-seg``), the class count, the class names, the palette and the ignore
    index come from the reference. A ``source``, ``num_classes`` or ``ignore_index`` written
    next to it must agree.
    """

    dataset: ReferenceDatasetName | None = Field(
        None, description="A DDPM-Seg reference dataset by name: its classes, palette and ignore index are known.")
    source: DatasetSource = "synthetic"
    root: str | None = Field(None, description="Input dataset folder (not for synthetic).")
    out: str = "data/dataset"
    added: str | None = Field(
        "data/added", description="Labels added by `ddps data add-labels` (<id>.png + <id>.npy), joined to the "
        "training split; an absent folder adds none.")
    num_classes: int | None = Field(None, ge=1, le=65535)
    ignore_index: int = Field(255, ge=0, le=65535)
    splits: dict[Literal["train", "test", "unlabeled"], str | None] | None = None
    resize: Literal["whole", "slide"] = Field(
        "whole", description="How an image of any size meets the S x S models: resized whole, or S x S "
        "windows of the image scaled to short side S; predictions go back to the image's size (docs/method.md).")
    stride: int | None = Field(None, ge=1, description="slide: window stride in pixels of the scaled image "
                               "(default: two thirds of S).")
    synthetic: SyntheticSettings = SyntheticSettings()

    @model_validator(mode="before")
    @classmethod
    def _reference_dataset(cls, raw: Any) -> Any:
        """Fill ``source``, ``num_classes`` and ``ignore_index`` from ``dataset``; a value
        written that disagrees with the reference is an error naming the key."""
        if not isinstance(raw, Mapping) or raw.get("dataset") is None:
            return raw
        from ddps_core.datasets.reference import REFERENCE_DATASETS

        ref = REFERENCE_DATASETS.get(raw["dataset"])
        if ref is None:
            return raw  # the field's validation names the unknown dataset
        raw = dict(raw)
        fixed = {"source": "ddpm-seg", "num_classes": ref.num_classes, "ignore_index": ref.ignore_index}
        for key, value in fixed.items():
            given = raw.get(key)
            if given is not None and given != value:
                raise ValueError(f"data.{key} is {given!r}, but data.dataset {ref.name!r} has {key} {value!r} "
                                 f"(remove data.{key} or set it to {value!r})")
            raw[key] = value
        return raw

    @model_validator(mode="after")
    def _check_source(self) -> DataSettings:
        if self.source != "synthetic" and not self.root:
            raise ValueError(f"data.root is required when data.source is {self.source!r}")
        return self

    def split_map(self) -> dict[str, str | None]:
        """Reader split name for each canonical split (train, test, unlabeled)."""
        merged = dict(DEFAULT_SPLITS[self.source])
        merged.update(self.splits or {})
        return merged


class DDPMSettings(Section):
    """Stage ``train_ddpm``: the diffusion model every feature comes from.

    With ``checkpoint`` set (an official guided-diffusion ``.pt`` or a ``.safetensors``),
    training is skipped and that checkpoint is used with ``preset``'s architecture.
    """

    preset: str = "tiny32"
    checkpoint: str | None = None
    out: str = "data/models/ddpm"
    schedule: Literal["linear", "cosine"] = "linear"
    num_timesteps: int = Field(1000, ge=2)
    steps: int = Field(700, ge=1, description="Optimiser steps (total, across resumes).")
    time_budget_s: float | None = Field(
        None, gt=0, description="Stop early (with a checkpoint) after this many seconds."
    )
    batch_size: int = Field(32, ge=1)
    lr: float = Field(1e-3, gt=0)
    warmup_steps: int = Field(100, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    ema_rate: float = Field(0.999, ge=0, lt=1)
    grad_clip: float | None = Field(1.0, gt=0)
    hflip: bool = True
    t_focus: float = Field(
        0.0, ge=0, le=1, description="Share of each batch whose timestep is drawn from 0..t_focus_below-1 "
        "instead of the whole schedule: training weighted toward the small steps the features come from; "
        "the rest stays uniform, so sampling still works.")
    t_focus_below: int = Field(200, ge=1, description="The focused timesteps' bound (exclusive).")
    t_focus_mode: Literal["truncated", "importance"] = Field(
        "truncated", description="truncated: train on the mixture as drawn (more weight on the small steps); "
        "importance: weigh each sample's loss by 1 / (T p(t)), so the objective stays the uniform one and "
        "only its small-step terms are drawn more often.")
    min_snr_gamma: float | None = Field(
        None, gt=0, description="Min-SNR-gamma loss weighting (Hang et al. 2023): each sample's noise MSE times "
        "min(SNR_t, gamma) / SNR_t; None: unweighted (the reference).")
    checkpoint_every: int = Field(250, ge=1)
    log_every: int = Field(10, ge=1)
    compile: bool = False
    threads: int | None = Field(None, ge=1)
    sample_count: int = Field(16, ge=0)
    sample_steps: int = Field(250, ge=1)
    # Ancestral, not DDIM, by default: a short CPU run's eps is rough at small t, and
    # deterministic DDIM turns that into speckle where ancestral sampling averages it out.
    sample_method: Literal["ddim", "ancestral"] = "ancestral"


class FeaturesSettings(Section):
    """Stage ``extract``: DDPM-Seg features of each split into a Zarr store at native size.

    ``steps`` / ``blocks`` are the reference's knobs (docs/method.md: [50, 150, 250] and
    output blocks [5, 6, 7, 8, 12] of the 256 model). Our defaults for the small synthetic
    domain are a documented choice: early steps [10, 50, 100] and all decoder blocks
    (``blocks: null``), which measured better on a small domain (docs/method.md).
    """

    steps: list[int] = Field(default_factory=lambda: [10, 50, 100], min_length=1)
    blocks: list[int] | None = None
    noise_seed: int = Field(0, ge=0)
    noise_device: Literal["cpu", "model"] = Field(
        "cpu",
        description="Where the shared noise is drawn. cpu (default): the same noise, hence the same features, on "
                    "any machine, which resume across machines and the tests rely on. model: on the model's "
                    "device, as the reference does, so features can match a CUDA reference run (CPU and CUDA "
                    "generators differ: the stores are then not interchangeable, and noise_id says @cuda). On a "
                    "CPU model both are the same noise.")
    splits: list[Literal["train", "test", "unlabeled"]] = Field(
        default_factory=lambda: ["train"], min_length=1,
        description="The splits whose features are stored: the ones the teacher learns from (train). The test "
                    "split and the pool are labelled streaming (stage label), without a store; add them only to "
                    "keep their features for your own use.")
    out: str = "data/features"
    shard_images: int = Field(16, ge=1)
    batch_size: int = Field(16, ge=1)
    workers: int = Field(1, ge=1, description="Concurrent shard writers (each owns shards).")
    on_change: Literal["rebuild", "error"] = Field(
        "rebuild", description="An existing store made with other settings: rebuild or fail.")

    _check_out = field_validator("out")(_known_location)


class TeacherSettings(Section):
    """Stages ``train_teacher`` and ``label``: the DDPM-Seg pixel-MLP ensemble (the teacher) on
    the diffusion model's features, and the baselines: the same ensemble, trained and scored
    the same way, on other pixel features. ``random_unet``: a randomly initialised UNet of the
    same preset (its features are extracted by stage ``extract``); ``rgbxy``: raw RGB and
    normalised (x, y). They show what the trained diffusion model buys.
    """

    baselines: list[Literal["random_unet", "rgbxy"]] = Field(default_factory=lambda: ["random_unet", "rgbxy"])
    members: int = Field(10, ge=1)
    n_train: int | None = Field(None, ge=1, description="Use the first N labelled images.")
    batch_size: int = Field(64, ge=2)
    lr: float = Field(1e-3, gt=0)
    max_epochs: int = Field(100, ge=1)
    patience: int = Field(50, ge=1)
    min_epoch: int = Field(4, ge=0)
    bootstrap: bool = True
    buffer_images: int = Field(8, ge=1)
    # The reference drops, per image, classes with < 20 pixels (tuned for 256 x 256). At
    # 32 x 32 that drops every mouth and nose; params.yaml sets 1 for the synthetic domain.
    min_class_pixels: int = Field(20, ge=0)
    seed: int = Field(0, ge=0)
    checkpoint_every: int = Field(1000, ge=1)
    out: str = Field("data/models/teacher", description="The teacher's folder.")
    baselines_out: str = Field("data/models/baselines", description="One folder per baseline in here.")
    labels_out: str = Field("data/labels", description="Labels, uncertainty maps and scores: <labels_out>/<teacher or baseline>/<split>/.")
    soft_labels: bool = Field(False, description="The teacher's labels of the pool and of generated images also keep "
                              "the members' mean softmax (<id>_probs.npy), which the export carries (soft/) for "
                              "student.distill: soft.")


class GenerateSettings(Section):
    """Stage ``generate``: label-efficient dataset generation (DDPM-Seg's DatasetDDPM).

    Candidates come from ``source``: ``pool`` (the unlabelled images, labelled by the
    ``label`` stage), ``generated`` (``n_samples`` images sampled from the DDPM here, their
    features extracted with the same shared noise and labelled by the teacher) or ``both``.
    Each source is filtered on its own by the image uncertainty score, sorted ascending
    (:mod:`ddps_core.generate.filter`):

    - ``reference``: DDPM-Seg's rule. ``int(drop_uncertain * N)`` images are dropped in all:
      the ``drop_certain`` most certain and the rest from the uncertain end (the reference's
      slice ``[30 : -int(0.1 N) + 30]``: 1,800 of 2,000 kept). Like the reference it keeps
      NOTHING when ``int(drop_uncertain * N) <= drop_certain`` (N < 310 with the defaults),
      and everything when ``drop_uncertain`` is 0.
    - ``drop_both``: ours. The ``drop_certain`` most certain and, on top of them, the
      ``ceil(drop_uncertain * N)`` most uncertain are dropped (1,770 of 2,000 kept).
    - ``threshold``: the images whose score is at most ``max_score`` are kept.

    The kept images (plus the real labelled images, ``include_real``) are exported to ``out``
    as ``images/``, ``masks/``, ``manifest.parquet``, ``classes.yaml``.
    """

    source: Literal["pool", "generated", "both"] = "pool"
    n_samples: int = Field(1000, ge=0, description="Images sampled from the DDPM (generated / both).")
    sample_method: Literal["ancestral", "ddim"] = "ancestral"
    sample_steps: int = Field(50, ge=1, description="Respaced sampling steps (the full schedule is 1000).")
    batch_size: int = Field(64, ge=1, description="Images sampled, extracted and labelled at once.")
    seed: int = Field(0, ge=0)
    filter: Literal["reference", "drop_both", "threshold"] = "reference"
    drop_certain: int = Field(
        30, ge=0, description="reference, drop_both: the most certain images dropped (the reference's constant 30).")
    drop_uncertain: float = Field(
        0.1, ge=0, lt=1,
        description="reference: the fraction dropped in all, int(f * N), drop_certain included (the reference's "
                    "uncertainty_portion); drop_both: ceil(f * N) most uncertain dropped on top of drop_certain.")
    max_score: float | None = Field(None, ge=0, description="threshold: keep images with score <= this.")
    include_real: bool = Field(True, description="Export the real labelled training images too (source real).")
    format: Literal["folder", "ddpm-seg"] = Field(
        "folder", description="ddpm-seg: also write the DDPM-Seg layout (<out>/ddpm-seg/real/train, .npy labels).")
    contact_sheet: int = Field(8, ge=0, description="Most and least certain images shown in contact_sheet.png.")
    out: str = "data/generated"
    work: str = Field("data/work/generate", description="Scratch space (samples and their labels); resumable.")

    @model_validator(mode="after")
    def _check_filter(self) -> GenerateSettings:
        if self.filter == "threshold" and self.max_score is None:
            raise ValueError("generate.max_score is required when generate.filter is 'threshold'")
        return self


STUDENT_ENCODERS: dict[str, tuple[str, ...]] = {
    "deeplabv3plus": ("mobilenet_v2", "resnet50", "resnet101"),
    "segformer": ("mit_b0", "mit_b2", "mit_b5"),
}


class StudentSettings(Section):
    """Stage ``train_student``: a standalone segmentor, trained on ``source``:

    * ``generated`` (DDPM-Seg): the ``generate`` stage's filtered, teacher-labelled export, each
      image S x S as ``data.resize`` makes it (``image_size``, else the diffusion model's size),
      with random flips and scales ``scale_min`` .. ``scale_max``; selected by mIoU on the real
      labelled images (``select_on: real``);
    * ``labelled`` (the supervised setting of DDPS): the dataset's own labelled training split at
      its own resolution, mmsegmentation's way: each image rescaled to fit ``base_scale`` times a
      ratio drawn from ``ratio_range``, a random ``crop_size`` crop (``cat_max_ratio``: no class
      above that share of it, 10 tries), a flip, the ignore label where the image is smaller than
      the crop; the last weights are kept (``select_on: last``).

    ``arch`` / ``encoder``: DeepLabV3+ with MobileNetV2 / ResNet-50 / ResNet-101, or SegFormer
    with MiT-B0 / B2 / B5 (segmentation-models-pytorch). ``encoder_weights``: None (random
    init, the default: nothing is downloaded), smp's name of a weight set (e.g.
    ``imagenet``, when smp can fetch or has cached it) or a path to a ``.safetensors`` /
    ``.pth`` file of the encoder's state dict.

    ``train_data`` is the folder the stage reads for ``source``, written out for DVC (whose
    dependencies cannot be conditional): ``generate.out`` for ``generated``,
    ``<data.out>/real/train`` for ``labelled``; None derives it, a value that disagrees is an error.
    """

    source: Literal["generated", "labelled"] = Field(
        "generated", description="generated: the generate stage's export; labelled: the dataset's training split.")
    train_data: str | None = Field(
        None, description="The folder source reads (what dvc.yaml tracks); None: derived from source.")
    arch: Literal["deeplabv3plus", "segformer"] = "segformer"
    encoder: str = "mit_b0"
    encoder_weights: str | None = None
    image_size: int | None = Field(None, ge=8, description="generated: training / inference size (None: the "
                                   "diffusion model's).")
    epochs: int = Field(40, ge=1)
    iterations: int | None = Field(None, ge=1, description="Optimiser steps in all; when set, epochs is not used "
                                   "(mmsegmentation counts its schedules in iterations).")
    batch_size: int = Field(32, ge=1)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(1e-3, gt=0)
    min_lr: float = Field(0.0, ge=0, description="The poly decay ends here (mmsegmentation's min_lr).")
    momentum: float = Field(0.9, ge=0, lt=1, description="sgd only.")
    weight_decay: float = Field(1e-2, ge=0)
    norm_weight_decay: bool = Field(True, description="False: no weight decay on normalisation layers "
                                    "(mmsegmentation's SegFormer recipe).")
    head_lr_mult: float = Field(1.0, gt=0, description="Learning-rate factor of the decoder and head "
                                "(mmsegmentation's SegFormer recipe: 10).")
    poly_power: float = Field(0.9, ge=0)
    warmup_steps: int = Field(50, ge=0)
    hflip: bool = True
    scale_min: float = Field(0.75, gt=0, description="generated: random scale range.")
    scale_max: float = Field(1.25, gt=0, description="generated: random scale range.")
    crop_size: list[int] = Field(default_factory=lambda: [512, 512], min_length=2, max_length=2,
                                 description="labelled: [height, width] of the random crops.")
    base_scale: list[int] | None = Field(
        default_factory=lambda: [2048, 512], min_length=2, max_length=2,
        description="labelled: [long, short] edge bound an image is rescaled to fit (keeping its aspect ratio) before "
                    "the random ratio; None: the image's own size.")
    ratio_range: list[float] = Field(default_factory=lambda: [0.5, 2.0], min_length=2, max_length=2,
                                     description="labelled: the random scale ratio's range.")
    cat_max_ratio: float | None = Field(
        0.75, gt=0, le=1, description="labelled: a crop is redrawn (up to 10 times) while one class covers more than "
                                      "this share of its labelled pixels; None: any crop.")
    select_on: Literal["real", "last"] | None = Field(
        None, description="Checkpoint selection: mIoU on the real labelled images (the reference), or the last epoch; "
                          "None: real for source generated, last for labelled.")
    distill: Literal["hard", "soft"] = Field(
        "hard", description="hard: cross-entropy on the teacher's majority-vote labels (the reference); soft: also "
                            "the KL divergence to the members' mean softmax (needs teacher.soft_labels).")
    temperature: float = Field(1.0, gt=0, description="soft: the distillation temperature (both sides softened; the "
                               "term is scaled by its square).")
    soft_weight: float = Field(1.0, ge=0, le=1, description="soft: the KL term's share of the loss; the rest is the "
                               "hard cross-entropy.")
    uncertainty_weight: bool = Field(True, description="soft: weigh each pixel's KL term by 1 - JS / ln M, the "
                                     "members' agreement (the real labelled images weigh 1).")
    ema_rate: float | None = Field(
        None, ge=0, lt=1, description="An exponential moving average of the weights (and BatchNorm statistics) with "
        "this decay, updated after every step; it is what is scored, selected and saved. None: the weights as trained.")
    seed: int = Field(0, ge=0)
    threads: int | None = Field(None, ge=1)
    out: str = "data/models/student"

    @model_validator(mode="after")
    def _check_encoder(self) -> StudentSettings:
        known = STUDENT_ENCODERS[self.arch]
        if self.encoder not in known:
            raise ValueError(f"student.encoder {self.encoder!r} is not one of {list(known)} for arch {self.arch!r}")
        if self.scale_min > self.scale_max:
            raise ValueError(f"student.scale_min ({self.scale_min}) > student.scale_max ({self.scale_max})")
        if not 0 < self.ratio_range[0] <= self.ratio_range[1]:
            raise ValueError(f"student.ratio_range {self.ratio_range}: expected 0 < low <= high")
        if min(self.crop_size) < 1 or (self.base_scale is not None and min(self.base_scale) < 1):
            raise ValueError("student.crop_size and student.base_scale must be positive")
        if self.source == "labelled" and self.select_on == "real":
            raise ValueError("student.select_on: real scores the real labelled images, which student.source: labelled "
                             "trains on; use last (or null)")
        return self

    @property
    def selection(self) -> Literal["real", "last"]:
        """``select_on``, or its default for ``source``."""
        if self.select_on is not None:
            return self.select_on
        return "real" if self.source == "generated" else "last"


class RefinerSettings(Section):
    """Stages ``train_refiner`` and ``refine``: the DDPS mask prior on the frozen student
    (docs/method.md). The denoiser fields are those of
    :class:`~ddps_core.refiner.train.DDPSTrainConfig` (``preset`` plus optional overrides of its
    width, channel_mult and num_res_blocks).
    """

    # denoiser and schedule
    preset: str = "tiny"
    width: int | None = Field(None, ge=1)
    channel_mult: list[int] | None = Field(None, min_length=1)
    num_res_blocks: int | None = Field(None, ge=1)
    embed_dim: int = Field(16, ge=1)
    dropout: float = Field(0.0, ge=0, lt=1)
    num_timesteps: int = Field(20, ge=2)
    schedule: Literal["linear", "cosine"] = "linear"
    x0_source: Literal["first_prediction", "gt"] = "first_prediction"
    # training
    data: Literal["generated", "real"] = Field(
        "generated", description="Training images: the generated export (teacher labels + real) or the real labelled images only.")
    steps: int = Field(2000, ge=1)
    single_step_steps: int = Field(400, ge=0, description="Reference pre-stage: the first steps train t = 0 only.")
    train_guidance: float = Field(
        0.0, ge=0, description="w of the first prediction Diffusion-on-First-Prediction re-noises in training "
        "(0: unguided, the reference); set it to `guidance` so that training sees the guided step-0 masks "
        "refinement re-noises.")
    feature_drop: float = Field(
        0.0, ge=0, lt=1, description="Share of training images whose features are zeroed (after the first "
        "prediction), so the feature-less branch that guidance subtracts is trained (classifier-free style).")
    batch_size: int = Field(16, ge=1)
    lr: float = Field(1e-3, gt=0)
    warmup_steps: int = Field(100, ge=0)
    weight_decay: float = Field(1e-2, ge=0)
    ema_rate: float = Field(0.999, ge=0, lt=1)
    grad_clip: float | None = Field(1.0, gt=0)
    hflip: bool = True
    checkpoint_every: int = Field(250, ge=1)
    log_every: int = Field(10, ge=1)
    time_budget_s: float | None = Field(None, gt=0)
    seed: int = Field(0, ge=0)
    threads: int | None = Field(None, ge=1)
    out: str = "data/models/refiner"
    ablation: bool = Field(False, description="Also train x0_source=gt with the same budget (<out>/ablation-gt); doubles train_refiner.")
    # refinement (Free-Re-noising)
    refine_steps: int = Field(2, ge=1, description="n: network steps range(0, T, T // n) plus T - 1.")
    report_steps: list[int] | None = Field(
        None, min_length=1, description="The run steps stage refine writes and scores (e.g. [0, 10, 19] or "
        "\"0, 10, 19\"); null: every run step.")
    guidance: float = Field(0.0, ge=0, description="w: logits = (1 + w) f(F, x) - w f(0, x).")
    guidance_from: Literal["every", "first"] = Field(
        "every", description="f(0, x) of every step on its own mask (the reference), or the one of step 0 "
        "(from the uniformly random mask: the class prior) at every step.")
    refined_out: str = "data/refined"

    @field_validator("report_steps", mode="before")
    @classmethod
    def _steps_from_text(cls, value: Any) -> Any:
        """``"0, 10, 19"`` (as ``--set refiner.report_steps=0,10,19`` gives it) is the list."""
        if isinstance(value, str):
            try:
                return [int(v) for v in value.replace(",", " ").split()]
            except ValueError:
                raise ValueError(f"expected step numbers such as \"0, 10, 19\", got {value!r}") from None
        return value

    @model_validator(mode="after")
    def _check_steps(self) -> RefinerSettings:
        if self.refine_steps > self.num_timesteps:
            raise ValueError(f"refiner.refine_steps ({self.refine_steps}) must be <= refiner.num_timesteps ({self.num_timesteps})")
        if self.report_steps is not None:
            run = run_steps(self.num_timesteps, self.refine_steps)
            unknown = sorted(set(self.report_steps) - set(run))
            if unknown:
                raise ValueError(f"refiner.report_steps: {unknown} {'is' if len(unknown) == 1 else 'are'} not a run "
                                 f"step; refiner.refine_steps {self.refine_steps} with refiner.num_timesteps "
                                 f"{self.num_timesteps} runs steps {run}")
        return self


def run_steps(num_timesteps: int, n: int) -> list[int]:
    """The network steps Free-Re-noising runs: ``range(0, T, T // n)`` plus ``T - 1`` (the
    rule of :func:`ddps_core.refiner.sample.refinement_steps`, here without importing torch)."""
    steps = list(range(0, num_timesteps, max(1, num_timesteps // n)))
    return steps if steps[-1] == num_timesteps - 1 else [*steps, num_timesteps - 1]


class EvaluateSettings(Section):
    """Stage ``evaluate`` and the metric conventions every evaluation shares (docs/method.md)."""

    boundary_ratio: float = Field(0.02, gt=0, le=0.5)
    flip: bool = Field(False, description="Test-time augmentation when scoring: also predict the horizontally "
                                          "flipped image and average the class probabilities.")
    scales: list[float] | None = Field(
        None, min_length=1, description="Test-time augmentation when scoring: also predict the image rescaled by "
        "each ratio (e.g. [0.75, 1.0, 1.25]) and average; null: the image's own scale only. Used in slide mode "
        "(whole resizes every scale to S x S anyway).")
    student: bool = Field(True, description="Stage evaluate also scores the student (needs train_student).")
    reports: str = Field(
        "reports", description="Folder or fsspec URL of the reports: evaluate.parquet, refine.parquet, metrics/, "
                               "and stage report's plots/ and figures/.")

    _check_reports = field_validator("reports")(_known_location)

    @field_validator("scales")
    @classmethod
    def _positive_scales(cls, value: list[float] | None) -> list[float] | None:
        if value is not None and any(not v > 0 for v in value):
            raise ValueError(f"every scale must be positive, got {value}")
        return value


class ReportSettings(Section):
    """Stage ``report``: how many pictures to draw (nothing here changes a score)."""

    overlays: int = Field(8, ge=0, description="Overlay pictures per method in <reports>/figures/overlays.")
    refinement: int = Field(8, ge=0, description="Test images (rows) in <reports>/figures/refinement.png.")


class DaskSettings(Section):
    """``runner: dask``: the Dask cluster the fan-out stages (extract, label, generate) use.

    With ``address`` (a running scheduler, ``tcp://host:8786``) the tasks go there; without,
    each flow starts a ``distributed.LocalCluster`` of ``n_workers`` worker processes with
    ``threads_per_worker`` threads each, and closes it at the end.
    """

    address: str | None = None
    n_workers: int = Field(2, ge=1)
    threads_per_worker: int = Field(1, ge=1)
    tasks_per_split: int | None = Field(
        None, ge=1, description="Labelling / generation tasks per split (None: n_workers).")


class StorageSettings(Section):
    """fsspec storage options for URL locations (``features.out``, ``evaluate.reports``).

    Credentials and endpoints are best left to the environment (s3fs reads the usual
    ``AWS_*`` variables); ``options`` is passed to the filesystem as keyword arguments.
    """

    options: dict[str, Any] = Field(default_factory=dict)


RecipeName = Literal["ddpm-seg-256", "ddps-ade20k-segformer", "ddps-ade20k-deeplabv3plus",
                     "ddps-cityscapes-segformer", "ddps-cityscapes-deeplabv3plus"]


class Settings(Section):
    """Everything in ``params.yaml``. ``recipe`` names a set of values (:mod:`ddps_core.recipes`)
    that replaces the code defaults; keys written in the file or given with ``--set`` win."""

    recipe: RecipeName | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = Field(0, ge=0)
    runner: Literal["thread", "dask"] = "thread"
    dask: DaskSettings = DaskSettings()
    storage: StorageSettings = StorageSettings()
    data: DataSettings = DataSettings()
    ddpm: DDPMSettings = DDPMSettings()
    features: FeaturesSettings = FeaturesSettings()
    teacher: TeacherSettings = TeacherSettings()
    generate: GenerateSettings = GenerateSettings()
    student: StudentSettings = StudentSettings()
    refiner: RefinerSettings = RefinerSettings()
    evaluate: EvaluateSettings = EvaluateSettings()
    report: ReportSettings = ReportSettings()

    def student_train_data(self) -> str:
        """The folder ``train_student`` reads: ``generate.out`` (source generated) or
        ``<data.out>/real/train`` (source labelled)."""
        if self.student.source == "generated":
            return self.generate.out
        return str(Path(self.data.out) / "real" / "train")

    @model_validator(mode="after")
    def _check_soft_labels(self) -> Settings:
        if self.student.distill == "soft":
            if not self.teacher.soft_labels:
                raise ValueError("student.distill 'soft' trains on the teacher's soft labels: set teacher.soft_labels "
                                 "to true (stage label then keeps them)")
            if self.student.source != "generated" or self.data.resize != "whole":
                raise ValueError("student.distill 'soft' needs student.source 'generated' and data.resize 'whole' "
                                 f"(got {self.student.source!r} and {self.data.resize!r}); set student.distill "
                                 "to 'hard' for these")
        return self

    @model_validator(mode="after")
    def _check_student_data(self) -> Settings:
        given, wanted = self.student.train_data, self.student_train_data()
        if given is not None and os.path.normpath(given) != os.path.normpath(wanted):
            raise ValueError(f"student.train_data is {given!r}, but student.source {self.student.source!r} reads "
                             f"{wanted!r}; set student.train_data to {wanted!r} (the folder dvc.yaml's train_student "
                             "depends on) or to null")
        return self


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            lines.append(f"{source}: {key}: unknown key")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            got = e.get("input")
            shown = "" if isinstance(got, Mapping) else f" (got {got!r})"
            lines.append(f"{source}: {key}: {msg}{shown}")
    return "invalid settings:\n  " + "\n  ".join(lines)


def _set_dotted(tree: dict[str, Any], key: str, value: Any, source: str) -> None:
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{source}: {key}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def _output_blocks(preset: str) -> int | None:
    """How many decoder (output) blocks the UNet of ``preset`` has, from its configuration
    alone (no weights are built); None for an unknown preset."""
    from ddps_core.diffusion.presets import PRESETS

    cfg = PRESETS.get(preset)
    return None if cfg is None else len(cfg.resolved_channel_mult()) * (cfg.num_res_blocks + 1)


def cross_check(s: Settings) -> list[tuple[str, str]]:
    """``(key, fault)`` for every value that another section's settings rule out."""
    faults: list[tuple[str, str]] = []
    t = s.ddpm.num_timesteps
    f = s.features
    bad = [v for v in f.steps if not 0 <= v < t]
    if bad:
        faults.append(("features.steps", f"{bad[0]} is not a timestep of the diffusion model (ddpm.num_timesteps "
                                         f"is {t}: 0..{t - 1})"))
    if len(set(f.steps)) != len(f.steps):
        faults.append(("features.steps", f"duplicate entries in {f.steps}"))
    if f.blocks is not None:
        n = _output_blocks(s.ddpm.preset)
        if n is None:
            from ddps_core.diffusion.presets import list_presets

            faults.append(("ddpm.preset", f"unknown UNet preset {s.ddpm.preset!r}; valid presets: "
                                          f"{', '.join(list_presets())}"))
        elif not f.blocks:
            faults.append(("features.blocks", f"must not be empty (null: all {n} output blocks)"))
        else:
            bad = [v for v in f.blocks if not 0 <= v < n]
            if bad:
                faults.append(("features.blocks", f"{bad[0]} is not an output block of preset "
                                                  f"{s.ddpm.preset!r} (it has {n}: 0..{n - 1})"))
            if len(set(f.blocks)) != len(f.blocks):
                faults.append(("features.blocks", f"duplicate entries in {f.blocks}"))
    for key, steps in (("ddpm.sample_steps", s.ddpm.sample_steps), ("generate.sample_steps", s.generate.sample_steps)):
        if steps > t:
            faults.append((key, f"{steps} sampling steps are more than the model's {t} diffusion steps "
                                "(ddpm.num_timesteps)"))
    return faults


def parse_settings(raw: Mapping[str, Any] | None, source: str = "params.yaml") -> Settings:
    """Validate a raw mapping into :class:`Settings`; raise :class:`ConfigError` naming keys."""
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{source}: the top level must be a mapping of sections")
    from ddps_core.recipes import apply_recipe

    try:
        settings = Settings.model_validate(apply_recipe(raw))
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source)) from None
    faults = cross_check(settings)
    if faults:
        raise ConfigError("invalid settings:\n  " + "\n  ".join(f"{source}: {key}: {fault}" for key, fault in faults))
    return settings


_MERGE_TAG = "tag:yaml.org,2002:merge"


def _duplicate_keys(node: yaml.Node, path: str = "") -> tuple[str, int, int] | None:
    """The first key given twice in one mapping under ``node``: (dotted key, first line,
    second line), 1-based; None when there is none. Merge keys (``<<``) are YAML's own
    overriding and are not duplicates."""
    if isinstance(node, yaml.MappingNode):
        seen: dict[Any, int] = {}
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG:
                continue
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else repr(key_node)
            dotted = f"{path}.{key}" if path else str(key)
            line = key_node.start_mark.line + 1
            if key in seen:
                return dotted, seen[key], line
            seen[key] = line
            found = _duplicate_keys(value_node, dotted)
            if found:
                return found
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            found = _duplicate_keys(item, f"{path}[{i}]")
            if found:
                return found
    return None


def load_yaml_unique(text: str, source: str) -> Any:
    """``yaml.safe_load(text)``, except that a key given twice in one mapping is a
    :class:`ConfigError` naming ``source``, the dotted key and both lines."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        dup = _duplicate_keys(node)
        if dup:
            key, first, second = dup
            raise ConfigError(f"{source}: {key}: key given twice (lines {first} and {second}); YAML would keep "
                              "only the last value: delete one")
        return loader.construct_document(node)
    finally:
        loader.dispose()


def read_params(path: str | Path) -> dict[str, Any]:
    """Read a params YAML file into a dict (an empty file is an empty dict)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        raw = load_yaml_unique(text, str(path))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return raw


def load_settings(
    path: str | Path | None = DEFAULT_PARAMS,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Load ``params.yaml`` (or the defaults when ``path`` is None) and apply overrides.

    ``overrides`` maps dotted keys (``"data.synthetic.seed"``) to values; ``None`` values are
    ignored, so unset CLI options leave the file's value in place.
    """
    raw: dict[str, Any] = read_params(path) if path is not None else {}
    source = str(path) if path is not None else "defaults"
    if overrides:
        raw = copy.deepcopy(raw)
        for key, value in overrides.items():
            if value is not None:
                _set_dotted(raw, key, value, "override")
        source = f"{source} + overrides"
    return parse_settings(raw, source)


def parse_assignment(text: str) -> tuple[str, Any]:
    """Parse ``key=value`` (value as YAML, so ``5``, ``true``, ``[1, 2]`` keep their types)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r}: expected KEY=VALUE, e.g. data.synthetic.seed=3")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        parsed = value
    return key.strip(), parsed


def dump_defaults() -> str:
    """The default settings as YAML (what an empty ``params.yaml`` means)."""
    return yaml.safe_dump(Settings().model_dump(mode="json"), sort_keys=False)
