"""The DDPM-Seg pixel classifier ensemble: the batched reference MLP ensemble
(:mod:`.ensemble`), one-pass training with per-member bootstrap weights and per-member
stopping (:mod:`.train`), majority-vote / Jensen-Shannon prediction (:mod:`.predict`) and
non-diffusion feature sources for baselines (:mod:`.sources`)."""

from .ensemble import PixelEnsemble, ReferenceMLP, default_widths, init_reference_, reference_mlp, source_id_of
from .predict import image_score, js_divergence, majority_vote, predict_image, predict_store, vote_and_uncertainty
from .sources import ArraySource, RGBXYSource, rgbxy_features
from .train import MemberAdam, TrainingError, TrainSummary, load_checkpoint, member_losses, train_ensemble

__all__ = [
    "ArraySource",
    "MemberAdam",
    "PixelEnsemble",
    "RGBXYSource",
    "ReferenceMLP",
    "TrainSummary",
    "TrainingError",
    "default_widths",
    "image_score",
    "init_reference_",
    "js_divergence",
    "load_checkpoint",
    "majority_vote",
    "member_losses",
    "predict_image",
    "predict_store",
    "reference_mlp",
    "rgbxy_features",
    "source_id_of",
    "train_ensemble",
    "vote_and_uncertainty",
]
