"""Recipes: one key sets a published configuration; every key written beside it wins. The
expected values are the references' own numbers, written out here by hand:

* DDPM-Seg: ``scripts/ddpm/train_interpreter.sh`` (MODEL_FLAGS), ``experiments/<name>/ddpm.json``
  and ``train_interpreter.py`` of yandex-research/ddpm-segmentation;
* DDPS's segmentors: mmsegmentation's ``segformer_mit-b0_512x512_160k_ade20k.py``,
  ``segformer_mit-b0_8x1_1024x1024_160k_cityscapes.py``, ``_base_/schedules/schedule_160k.py``
  (SGD) and ``_base_/datasets/{ade20k,cityscapes}.py``; T = 20 from OpenGVLab/DDPS.
"""

from __future__ import annotations

import pytest
import yaml

from ddps.cli import main
from ddps_core.config import load_settings, parse_settings
from ddps_core.errors import ConfigError
from ddps_core.recipes import RECIPES


def test_ddpm_seg_256_resolves_to_the_reference_settings():
    s = parse_settings({"recipe": "ddpm-seg-256", "data": {"dataset": "ffhq_34", "root": "/data/ffhq_34"},
                        "ddpm": {"checkpoint": "/models/ffhq.pt"}})
    assert s.features.steps == [50, 150, 250] and s.features.blocks == [5, 6, 7, 8, 12]
    assert s.features.noise_seed == 0  # the reference's --seed 0 draws the shared noise
    t = s.teacher
    assert (t.members, t.batch_size, t.lr, t.max_epochs, t.patience, t.min_epoch, t.min_class_pixels) == \
        (10, 64, 0.001, 100, 50, 4, 20)
    assert (s.ddpm.schedule, s.ddpm.num_timesteps, s.ddpm.checkpoint) == ("linear", 1000, "/models/ffhq.pt")
    assert (s.generate.filter, s.generate.drop_certain, s.generate.drop_uncertain) == ("reference", 30, 0.1)
    # DatasetDDPM: generate_dataset.sh (--num_samples 10000 --timestep_respacing 1000 --use_ddim False);
    # train_deeplab.py (Adam lr 0.001, batch 8, 20 epochs, no augmentation, real images for selection only)
    g = s.generate
    assert (g.source, g.n_samples, g.sample_steps, g.sample_method, g.include_real) == \
        ("generated", 10000, 1000, "ancestral", False)
    st = s.student
    assert (st.source, st.image_size, st.arch, st.encoder) == ("generated", None, "deeplabv3plus", "resnet101")
    assert (st.optimizer, st.lr, st.weight_decay, st.batch_size, st.epochs) == ("adamw", 0.001, 0.0, 8, 20)
    assert (st.hflip, st.scale_min, st.scale_max, st.poly_power, st.warmup_steps, st.selection) == \
        (False, 1.0, 1.0, 0.0, 0, "real")
    assert s.features.splits == ["train"]  # only what the teacher trains on is stored
    # the preset is guided-diffusion's MODEL_FLAGS: --attention_resolutions 32,16,8 --dropout 0.1
    # --image_size 256 --learn_sigma True --num_channels 256 --num_head_channels 64
    # --num_res_blocks 2 --resblock_updown True --use_fp16 True --use_scale_shift_norm True
    from ddps_core.diffusion.presets import get_preset

    c = get_preset(s.ddpm.preset)
    assert (c.image_size, c.num_channels, c.num_res_blocks, c.num_head_channels, c.attention_resolutions) == \
        (256, 256, 2, 64, "32,16,8")
    assert (c.learn_sigma, c.resblock_updown, c.use_fp16, c.use_scale_shift_norm, c.dropout) == \
        (True, True, True, True, 0.1)


def test_explicit_settings_and_overrides_win_over_the_recipe(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"recipe": "ddpm-seg-256", "features": {"steps": [10, 20]},
                                      "teacher": {"members": 3}}))
    s = load_settings(params, {"teacher.min_class_pixels": 5})
    assert s.features.steps == [10, 20] and s.features.blocks == [5, 6, 7, 8, 12]  # blocks from the recipe
    assert s.teacher.members == 3 and s.teacher.min_class_pixels == 5 and s.teacher.patience == 50
    assert s.ddpm.preset == "adm-256-lsun"
    # an override can choose the recipe too
    assert load_settings(None, {"recipe": "ddpm-seg-256"}).features.steps == [50, 150, 250]


def test_no_recipe_keeps_the_code_defaults_and_an_unknown_one_is_named():
    assert parse_settings({}).features.steps == [10, 50, 100]
    with pytest.raises(ConfigError, match=r"recipe: Input should be 'ddpm-seg-256'"):
        parse_settings({"recipe": "ddpm-seg-512"})


@pytest.mark.parametrize("name, arch, optimizer, lr, wd, crop, base, iters, batch", [
    ("ddps-ade20k-segformer", "segformer", "adamw", 6e-5, 0.01, [512, 512], [2048, 512], 160000, 16),
    ("ddps-ade20k-deeplabv3plus", "deeplabv3plus", "sgd", 0.01, 0.0005, [512, 512], [2048, 512], 160000, 16),
    ("ddps-cityscapes-segformer", "segformer", "adamw", 6e-5, 0.01, [1024, 1024], [2048, 1024], 160000, 8),
    ("ddps-cityscapes-deeplabv3plus", "deeplabv3plus", "sgd", 0.01, 0.0005, [512, 1024], [2048, 1024], 80000, 8),
])
def test_ddps_recipes_resolve_to_mmsegmentations_numbers(name, arch, optimizer, lr, wd, crop, base, iters, batch):
    s = parse_settings({"recipe": name, "data": {"root": "/data/x"}})
    st = s.student
    assert (st.source, st.arch, st.optimizer, st.lr, st.weight_decay) == ("labelled", arch, optimizer, lr, wd)
    assert (st.crop_size, st.base_scale, st.iterations, st.batch_size) == (crop, base, iters, batch)
    assert (st.ratio_range, st.cat_max_ratio, st.hflip, st.selection) == ([0.5, 2.0], 0.75, True, "last")
    assert s.refiner.num_timesteps == 20
    assert s.data.source == ("ade20k" if "ade20k" in name else "cityscapes")
    if arch == "segformer":  # paramwise_cfg: head lr_mult 10, norm decay_mult 0; warm-up 1500, poly power 1
        assert (st.head_lr_mult, st.norm_weight_decay, st.warmup_steps, st.poly_power, st.min_lr) == \
            (10.0, False, 1500, 1.0, 0.0)
    else:  # schedule_160k / 80k: momentum 0.9, poly power 0.9, min_lr 1e-4, no warm-up
        assert (st.momentum, st.poly_power, st.min_lr, st.warmup_steps) == (0.9, 0.9, 1e-4, 0)
    # the paper's other backbones are one key away
    other = {"segformer": "mit_b5", "deeplabv3plus": "resnet101"}[arch]
    assert parse_settings({"recipe": name, "data": {"root": "/d"}, "student": {"encoder": other}}).student.encoder == other


def test_config_show_prints_the_resolved_values(tmp_path, capsys):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"recipe": "ddpm-seg-256", "teacher": {"members": 4}}))
    with pytest.raises(SystemExit) as done:
        main(["config", "show", "--params", str(params)])
    assert done.value.code == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["recipe"] == "ddpm-seg-256" and shown["features"]["steps"] == [50, 150, 250]
    assert shown["teacher"]["members"] == 4 and shown["ddpm"]["preset"] == "adm-256-lsun"
    # the printout is a complete settings file: read back, it gives the same settings
    again = tmp_path / "again.yaml"
    again.write_text(yaml.safe_dump(shown))
    assert load_settings(again) == load_settings(params)
    with pytest.raises(SystemExit):
        main(["config", "recipes"])
    assert set(yaml.safe_load(capsys.readouterr().out)) == set(RECIPES)
