"""Benchmark: images/s of the distilled student against the teacher it was distilled from.

(a) the student: the default segmentor (``student.arch`` / ``student.encoder``) on batches of
    the model size, forward + argmax;
(b) the teacher (the baseline): what labelling one new image costs with DDPM-Seg -- the hooked
    UNet forwards at every feature step (``features.steps``, all decoder blocks), then the
    10-member pixel-MLP ensemble on every pixel's on-demand upsampled features with the
    majority vote and the uncertainty (the same code path as the ``label`` stage, with the
    features held in memory instead of read from a store, which only favours the teacher).
Weights are random: speed does not depend on training. Same images, same threads, interleaved
repeats. Target: (a) >= 20x (b).
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ddps_core.config import Settings, load_settings  # noqa: E402
from ddps_core.diffusion.gaussian import GaussianDiffusion  # noqa: E402
from ddps_core.diffusion.presets import get_preset  # noqa: E402
from ddps_core.features import FeatureExtractor  # noqa: E402
from ddps_core.features.store import upsample_pixels  # noqa: E402
from ddps_core.teacher.ensemble import PixelEnsemble  # noqa: E402
from ddps_core.teacher.predict import predict_image  # noqa: E402
from ddps_core.student.model import build_student  # noqa: E402
from ddps_core.student.train import predict_labels  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def run(n_images: int = 64, batch_size: int = 32, num_classes: int = 7, repeats: int = 5,
        device: str = "cpu", settings: Settings | None = None) -> list[dict]:
    s = settings or load_settings(REPO / "params.yaml" if (REPO / "params.yaml").exists() else None)
    cfg = get_preset(s.ddpm.preset)
    size = cfg.image_size
    torch.manual_seed(0)
    unet = cfg.build().eval()
    ext = FeatureExtractor(unet, GaussianDiffusion.from_name("linear", 1000), s.features.steps, None,
                           model_id="bench", device=device)
    teacher = PixelEnsemble(ext.feature_dim, num_classes, members=s.teacher.members).to(device).eval()
    student = build_student(s.student, num_classes).to(device).eval()
    images = torch.rand(n_images, 3, size, size)

    def run_teacher() -> None:
        for a in range(0, n_images, batch_size):
            feats = ext(images[a:a + batch_size] * 2 - 1)
            for j in range(feats[ext.names[0]].shape[0]):
                native = {k: v[j].numpy() for k, v in feats.items()}

                def pixels(ys, xs, native=native):
                    return torch.cat([torch.from_numpy(upsample_pixels(native[k], size, ys, xs))
                                      for k in ext.names], dim=1)

                predict_image(teacher, pixels, image_size=size)

    student_size = s.student.image_size or size

    def run_student() -> None:  # the inference path of the pipeline (resize in, logits back)
        predict_labels(student, images, batch_size, device, student_size)

    def timed(fn) -> float:
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    timed(run_teacher), timed(run_student)  # warm-up
    pairs = [(timed(run_student), timed(run_teacher)) for _ in range(repeats)]
    ours = statistics.median(p[0] for p in pairs)
    base = statistics.median(p[1] for p in pairs)
    ratio = statistics.median(b / a for a, b in pairs)
    return [{
        "name": f"student/{s.student.arch}-{s.student.encoder}-{student_size}",
        "figure": f"images/s ({size}x{size} images, student input {student_size})", "value": n_images / ours, "unit": "img/s",
        "baseline": f"teacher: {s.ddpm.preset} features at steps {s.features.steps} + "
                    f"{s.teacher.members}-member pixel MLPs",
        "baseline_value": n_images / base, "ratio": ratio, "target": ">= 20x",
        "settings": {"n_images": n_images, "batch_size": batch_size, "num_classes": num_classes,
                     "student_size": student_size,
                     "feature_dim": ext.feature_dim, "repeats": repeats, "threads": torch.get_num_threads()},
    }]


if __name__ == "__main__":
    for row in run():
        print(row)
