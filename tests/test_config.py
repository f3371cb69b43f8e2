from pathlib import Path

import pytest
import yaml

from ddps_core.config import Settings, load_settings, parse_assignment, parse_settings
from ddps_core.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


# params.yaml spells out every default. Where it differs from the embedded (reference)
# defaults, the README documents why: (section, key) -> (params.yaml value, embedded value).
DOCUMENTED = {
    ("teacher", "min_class_pixels"): (1, 20),  # the reference's 20 drops every mouth at 32 px
    ("student", "image_size"): (64, None),  # 2x the 32 px domain; None = the export's size
    # the make-run profile's budgets, cut to fit 15 minutes (README: How long)
    ("ddpm", "steps"): (500, 700),
    ("student", "epochs"): (10, 40),
    ("student", "batch_size"): (16, 32),  # more updates in the make run's 10 epochs (docs/method.md)
    ("student", "lr"): (0.002, 0.001),  # a short training gains from the higher rate
    ("student", "scale_min"): (1.0, 0.75),  # no random scales in 10 epochs (docs/method.md)
    ("student", "scale_max"): (1.0, 1.25),
    ("student", "distill"): ("soft", "hard"),  # the teacher's soft labels: the gap to it shrinks by 2-4 points
    ("teacher", "soft_labels"): (True, False),  # what student.distill: soft trains on
    ("refiner", "steps"): (900, 2000),  # 600 left the later steps to chance (docs/method.md)
    ("refiner", "single_step_steps"): (150, 400),
    ("ddpm", "t_focus"): (0.75, 0.0),  # the teacher gains 8-9 mIoU at the same DDPM steps (docs/method.md)
    ("refiner", "num_timesteps"): (5, 20),  # the largest gain of the later steps at 900 steps (docs/method.md)
    ("refiner", "guidance"): (1.0, 0.0),  # on the distilled student the later steps gain (docs/method.md)
    ("student", "head_lr_mult"): (10.0, 1.0),  # mmseg's SegFormer recipe, +0.2 / +0.5 on validation
    # written out for dvc.yaml's ${student.train_data} dependency; None derives the same folder
    ("student", "train_data"): ("data/generated", None),
}


def test_repo_params_yaml_is_valid_and_differs_only_where_documented():
    s = load_settings(REPO / "params.yaml")
    d = Settings()
    updates: dict[str, dict] = {}
    for (section, key), (ours, embedded) in DOCUMENTED.items():
        assert getattr(getattr(s, section), key) == ours and getattr(getattr(d, section), key) == embedded
        updates.setdefault(section, {})[key] = embedded
    reverted = s.model_copy(update={sec: getattr(s, sec).model_copy(update=kv) for sec, kv in updates.items()})
    assert reverted == d


def test_missing_file_means_defaults_only_when_asked(tmp_path):
    assert load_settings(None) == Settings()
    with pytest.raises(ConfigError, match="file not found"):
        load_settings(tmp_path / "nope.yaml")


@pytest.mark.parametrize(
    "raw, key, phrase",
    [
        ({"data": {"synthetic": {"sizee": 32}}}, "data.synthetic.sizee", "unknown key"),
        ({"dataa": {}}, "dataa", "unknown key"),
        ({"data": {"synthetic": {"n_test": "many"}}}, "data.synthetic.n_test", "valid integer"),
        ({"data": {"synthetic": {"image_size": 48}}}, "data.synthetic.image_size", "32, 64 or 128"),
        ({"data": {"synthetic": {"n_labeled": 0}}}, "data.synthetic.n_labeled", "greater than or equal"),
        ({"device": "tpu"}, "device", "'auto', 'cpu' or 'cuda'"),
        ({"data": {"source": "ade20k"}}, "data", "data.root is required"),
        ({"refiner": {"report_steps": [0, 7]}}, "refiner", "refiner.report_steps: [7] is not a run step"),
        ({"refiner": {"report_steps": "0, x"}}, "refiner.report_steps", "step numbers"),
        ({"evaluate": {"scales": [0.5, 0]}}, "evaluate.scales", "must be positive"),
        ({"evaluate": {"flip": "sometimes"}}, "evaluate.flip", "valid boolean"),
        ({"student": {"distill": "soft"}}, "(top level)", "set teacher.soft_labels to true"),
        ({"student": {"distill": "soft", "source": "labelled"}, "teacher": {"soft_labels": True}}, "(top level)",
         "needs student.source 'generated' and data.resize 'whole'"),
        ({"student": {"temperature": 0}}, "student.temperature", "greater than 0"),
    ],
)
def test_bad_settings_name_the_key(tmp_path, raw, key, phrase):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    msg = str(info.value)
    assert f"{path}: {key}:" in msg
    assert phrase in msg


def test_all_errors_reported_at_once():
    with pytest.raises(ConfigError) as info:
        parse_settings({"data": {"synthetic": {"a": 1, "seed": -1}}})
    assert "data.synthetic.a: unknown key" in str(info.value)
    assert "data.synthetic.seed:" in str(info.value)


def test_overrides_replace_file_values_and_are_validated(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("data:\n  synthetic:\n    seed: 5\n    n_test: 7\n")
    s = load_settings(path, {"data.synthetic.seed": 9, "data.synthetic.n_test": None})
    assert s.data.synthetic.seed == 9  # overridden
    assert s.data.synthetic.n_test == 7  # None = option not given: file value kept
    with pytest.raises(ConfigError, match="override: data.synthetic.seed.x: 'seed' is not a section"):
        load_settings(path, {"data.synthetic.seed.x": 1})
    with pytest.raises(ConfigError, match="data.synthetic.bogus: unknown key"):
        load_settings(path, {"data.synthetic.bogus": 1})


def test_invalid_yaml_and_non_mapping(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings(bad)
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping of sections"):
        load_settings(bad)


def test_parse_assignment_keeps_yaml_types():
    assert parse_assignment("a.b=3") == ("a.b", 3)
    assert parse_assignment("a=true") == ("a", True)
    assert parse_assignment("a=[1, 2]") == ("a", [1, 2])
    assert parse_assignment("a=text") == ("a", "text")
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_assignment("novalue")


def test_split_map_defaults_and_overrides():
    s = parse_settings({"data": {"source": "ade20k", "root": "x", "splits": {"test": "training"}}})
    assert s.data.split_map() == {"train": "training", "test": "training", "unlabeled": None}


def test_report_steps_and_test_time_augmentation():
    from ddps_core.config import run_steps
    from ddps_core.refiner.sample import refinement_steps

    assert all(run_steps(t, n) == refinement_steps(t, n) for t in range(2, 41) for n in range(1, t + 1))
    s = parse_settings({"refiner": {"num_timesteps": 20, "refine_steps": 2, "report_steps": "19, 0,10"}})
    assert s.refiner.report_steps == [19, 0, 10]
    assert parse_settings({}).refiner.report_steps is None  # every run step
    e = parse_settings({"evaluate": {"flip": True, "scales": [0.75, 1, 1.25]}}).evaluate
    assert e.flip is True and e.scales == [0.75, 1.0, 1.25]
    assert parse_settings({}).evaluate.flip is False and parse_settings({}).evaluate.scales is None
