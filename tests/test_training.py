"""The training toolkit (ddps_core.training): schedules and EMA against closed forms worked out
here, content ids, checkpoint files (atomic, byte-deterministic, weights-only, clear errors),
resume only under the same run id, the loss log, the time budget. What each trainer does with
them (bit-identical resume, start over) is tested with the trainer."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
import torch
from torch import nn

from ddps_core.errors import CheckpointError, ConfigError, DataError, DDPSError
from ddps_core.progress import CallbackReporter
from ddps_core.training import (
    Checkpoint,
    EmaTrainState,
    LossLog,
    TimeBudget,
    TrainingError,
    backward_step,
    content_id,
    ema_decay,
    ema_update,
    epoch_data,
    load_checkpoint,
    optimizer_to,
    read_record,
    run_id,
    save_checkpoint,
    warmup_cosine,
    warmup_poly,
)


# --------------------------------------------------------------------------- schedules
@pytest.mark.parametrize("step,expected", [
    (0, 0.5),     # warm-up: lr * 1/2
    (1, 1.0),     # warm-up: lr * 2/2
    (2, 1.0),     # decay starts: cos(0) = 1
    (6, 0.55),    # half way (4 of 8 steps): 0.1 + 0.9 * (1 + cos(pi/2)) / 2
    (10, 0.1),    # the floor at total
    (25, 0.1),    # and after it
])
def test_warmup_cosine_closed_form(step, expected):
    assert warmup_cosine(step, lr=1.0, total=10, warmup=2, floor=0.1) == pytest.approx(expected, abs=1e-12)


def test_warmup_cosine_quarter_point_and_no_warmup():
    # a quarter of the way through: 1e-3 * (0.1 + 0.9 * (1 + cos(pi/4)) / 2)
    quarter = 1e-3 * (0.1 + 0.45 * (1 + math.sqrt(0.5)))
    assert warmup_cosine(2, lr=1e-3, total=8, warmup=0) == pytest.approx(quarter, rel=1e-12)
    assert warmup_cosine(0, lr=1e-3, total=8, warmup=0) == pytest.approx(1e-3)
    assert warmup_cosine(8, lr=1e-3, total=8, warmup=0, floor=0.0) == pytest.approx(0.0, abs=1e-18)


@pytest.mark.parametrize("step,expected", [
    (0, 2.0 / 3), (2, 2.0),   # warm-up over 3 steps: 2 * 1/3, 2 * 3/3
    (3, 2.0),                 # decay starts: (1 - 0) ** 2
    (8, 0.5),                 # half way (5 of 10): 2 * 0.5 ** 2
    (11, 2.0 * 0.2 ** 2),     # 8 of 10: 2 * 0.2 ** 2
    (13, 0.0), (40, 0.0),
])
def test_warmup_poly_closed_form(step, expected):
    assert warmup_poly(step, lr=2.0, total=13, warmup=3, power=2.0) == pytest.approx(expected, abs=1e-12)


# --------------------------------------------------------------------------- EMA, optimiser step
def test_ema_decay_ramps_then_caps():
    assert ema_decay(0.999, 0) == pytest.approx(1 / 10)
    assert ema_decay(0.999, 90) == pytest.approx(91 / 100)
    assert ema_decay(0.999, 10**6) == 0.999
    assert ema_decay(0.5, 100) == 0.5


def test_ema_update_by_hand():
    model, ema = nn.Linear(1, 1), nn.Linear(1, 1)
    with torch.no_grad():
        model.weight.fill_(1.0), model.bias.fill_(-2.0)
        ema.weight.fill_(0.0), ema.bias.fill_(0.0)
    ema_update(ema, model, rate=0.999, step=0)  # decay 0.1: e = 0.1 e + 0.9 p
    assert ema.weight.item() == pytest.approx(0.9) and ema.bias.item() == pytest.approx(-1.8)
    ema_update(ema, model, rate=0.999, step=8)  # decay 9/18
    assert ema.weight.item() == pytest.approx(0.5 * 0.9 + 0.5 * 1.0)


def test_backward_step_clips_the_global_norm():
    w = nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([w], lr=1.0)
    backward_step((w * torch.tensor([3.0, 4.0])).sum(), opt, [w], grad_clip=1.0)
    # the gradient (3, 4) has norm 5: clipped to (0.6, 0.8), one SGD step of lr 1
    assert torch.allclose(w.detach(), torch.tensor([-0.6, -0.8]), atol=1e-6)
    backward_step((w * torch.tensor([3.0, 4.0])).sum(), opt, [w], grad_clip=None)
    assert torch.allclose(w.detach(), torch.tensor([-3.6, -4.8]), atol=1e-6)


def test_ema_train_state_step_and_round_trip():
    torch.manual_seed(0)
    ts = EmaTrainState(nn.Linear(2, 1), lr=1.0, weight_decay=0.0, seed=3)
    before_ema = ts.ema.weight.detach().clone()
    assert torch.equal(before_ema, ts.model.weight) and not ts.ema.weight.requires_grad
    loss = ts.model(torch.ones(1, 2)).sum()
    ts.step(loss, 0, lr=0.25, grad_clip=None, ema_rate=0.999)
    assert ts.opt.param_groups[0]["lr"] == 0.25
    # AdamW's first step moves each weight by lr * sign(grad) (grad 1 here), decay 0.1 at step 0
    assert torch.allclose(ts.model.weight.detach(), before_ema - 0.25, atol=1e-6)
    assert torch.allclose(ts.ema.weight, 0.1 * before_ema + 0.9 * (before_ema - 0.25), atol=1e-6)
    draws = torch.rand(3, generator=ts.gen)
    state = ts.state_dict()
    again = EmaTrainState(nn.Linear(2, 1), lr=1.0, weight_decay=0.0, seed=99)
    again.load_state_dict(state)
    assert torch.equal(again.ema.weight, ts.ema.weight) and torch.equal(again.model.bias, ts.model.bias)
    assert torch.equal(torch.rand(3, generator=again.gen), torch.rand(3, generator=ts.gen))
    assert not torch.equal(draws, torch.rand(3, generator=again.gen))
    assert again.opt.state_dict()["state"][0]["step"] == 1


@pytest.mark.parametrize("fused", [False, True])
def test_optimizer_to_moves_step_counts_only_for_a_fused_optimiser(fused):
    """A fused kernel reads the step counts on the parameters' device; the for-loop one on the
    CPU. (The meta device stands in for a GPU: moving there needs no memory.)"""
    model = nn.Linear(2, 1)
    opt = torch.optim.AdamW(model.parameters(), fused=fused)
    model(torch.ones(1, 2)).sum().backward()
    opt.step()
    optimizer_to(opt, torch.device("meta"))
    state = opt.state[model.weight]
    assert state["exp_avg"].device.type == "meta" and state["exp_avg_sq"].device.type == "meta"
    assert state["step"].device.type == ("meta" if fused else "cpu")


def test_epoch_data_of_each_kind():
    class Sampler:
        epoch = None

        def set_epoch(self, e):
            self.epoch = e

        def __iter__(self):
            return iter([self.epoch] * 2)

    assert list(epoch_data(Sampler(), 3)) == [3, 3]
    assert list(epoch_data(lambda e: range(e), 2)) == [0, 1]
    assert list(epoch_data([["a"], ["b"]], 5)) == [["a"], ["b"]]
    with pytest.raises(ConfigError, match="int"):
        epoch_data(7, 0)


def test_read_record(tmp_path):
    (tmp_path / "model.json").write_text('{"steps": 4}')
    assert read_record(tmp_path / "model.json", "run it") == {"steps": 4}
    with pytest.raises(DataError, match=r"missing\.json: no model here; run the stage"):
        read_record(tmp_path / "missing.json", "no model here; run the stage")


# --------------------------------------------------------------------------- identity
def test_content_id_follows_content_not_names(tmp_path):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    a.write_bytes(b"one image")
    b.write_bytes(b"one image")
    assert content_id([a]) == content_id([b])  # same bytes under another name
    b.write_bytes(b"one imagE")
    assert content_id([a]) != content_id([b])
    assert content_id([a, b]) != content_id([b, a])  # order counts
    x = np.arange(6, dtype=np.uint8).reshape(2, 3)
    assert content_id([x]) == content_id([x.copy()])
    assert content_id([x]) != content_id([x.reshape(3, 2)])  # shape counts
    assert content_id([x]) != content_id([x.astype(np.int8)])  # dtype counts
    t = torch.arange(6, dtype=torch.float32)
    assert content_id([t]) == content_id([t.clone()]) != content_id([t + 1])
    assert content_id([t[::2]]) == content_id([torch.tensor([0.0, 2.0, 4.0])])  # strided view: its values
    with pytest.raises(TypeError):
        content_id([3.0])


def test_run_id_covers_settings_and_inputs():
    base = run_id({"lr": 1e-3, "mult": (1, 2)}, {"images": "abc"})
    assert base == run_id({"mult": [1, 2], "lr": 1e-3}, {"images": "abc"})  # key order, tuple / list
    assert base != run_id({"lr": 2e-3, "mult": (1, 2)}, {"images": "abc"})
    assert base != run_id({"lr": 1e-3, "mult": (1, 2)}, {"images": "abd"})
    assert len(base) == 16 and int(base, 16) >= 0


# --------------------------------------------------------------------------- checkpoint files
def _state():
    g = torch.Generator().manual_seed(0)
    return {"model": {"w": torch.randn(4, 3, generator=g)}, "step": 7, "rng": g.get_state(),
            "log": LossLog(("step", "loss")).state()}


def test_save_checkpoint_is_atomic_and_byte_deterministic(tmp_path):
    one, two = tmp_path / "a" / "state.pt", tmp_path / "b" / "other-name.pt"
    save_checkpoint(one, _state())
    save_checkpoint(two, _state())
    assert one.read_bytes() == two.read_bytes()  # no file name, no timing inside
    assert [p.name for p in one.parent.iterdir()] == ["state.pt"]  # no temporary left
    back = load_checkpoint(one)
    assert torch.equal(back["model"]["w"], _state()["model"]["w"]) and back["step"] == 7


def test_a_loaded_state_saves_to_the_same_bytes(tmp_path):
    """A resumed run saves a state partly loaded from the checkpoint (its optimiser's keys, say):
    equal values must give equal bytes whichever objects hold them."""
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    state = {"step": 1, "model": model.state_dict(), "optimizer": opt.state_dict()}
    save_checkpoint(tmp_path / "fresh.pt", state)
    loaded = load_checkpoint(tmp_path / "fresh.pt")
    opt.load_state_dict(loaded["optimizer"])  # as a resumed trainer does
    model.load_state_dict(loaded["model"])
    save_checkpoint(tmp_path / "again.pt", {"step": 1, "model": model.state_dict(), "optimizer": opt.state_dict()})
    assert (tmp_path / "again.pt").read_bytes() == (tmp_path / "fresh.pt").read_bytes()
    assert loaded["model"]._metadata == model.state_dict()._metadata  # module versions kept


def test_a_failed_save_leaves_the_old_checkpoint(tmp_path):
    path = tmp_path / "state.pt"
    save_checkpoint(path, _state())
    before = path.read_bytes()

    class Unsaveable:
        def __reduce__(self):
            raise RuntimeError("cannot pickle")

    with pytest.raises(RuntimeError):
        save_checkpoint(path, {"x": Unsaveable()})
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["state.pt"]


def test_unreadable_or_unsafe_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "state.pt"
    save_checkpoint(path, _state())
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(CheckpointError, match=r"state\.pt: cannot read .*delete it to start over"):
        load_checkpoint(path)
    ran = tmp_path / "ran"

    class Code:
        def __reduce__(self):
            return (ran.touch, ())

    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"x": Code()}, protocol=2))
    with pytest.raises(CheckpointError, match="evil.pt"):
        load_checkpoint(evil)
    assert not ran.exists()  # weights_only: the pickle's code never ran
    with pytest.raises(CheckpointError, match="missing.pt"):
        load_checkpoint(tmp_path / "missing.pt")


def test_checkpoint_resumes_only_its_own_run_and_says_so(tmp_path):
    logs = []
    report = CallbackReporter(log=logs.append)
    path = tmp_path / "state.pt"
    first = Checkpoint(path, "run-a", unit="epoch", report=report)
    assert first.resume() is None and first.kept() == "no checkpoint was written yet"
    first.save(3, {"weights": torch.ones(2)})
    assert first.at == 3 and "(" + str(path) + ", epoch 3) is kept" in first.kept()

    same = Checkpoint(path, "run-a", unit="epoch", report=report)
    state = same.resume()
    assert state is not None and same.at == 3 and torch.equal(state["weights"], torch.ones(2))
    assert logs[-1] == f"resuming from epoch 3 ({path})"

    other = Checkpoint(path, "run-b", unit="epoch", report=report)
    assert other.resume() is None and other.at is None
    assert logs[-1] == f"{path} was trained with other settings or inputs: starting over"
    # the other run's file is not "the last good checkpoint" of this run
    assert "no checkpoint was written yet" in str(other.error("boom"))


def test_checkpoint_clears_temporaries_of_killed_writes(tmp_path):
    stale = tmp_path / ".state.pt.abc123.tmp"
    stale.write_bytes(b"half")
    keep = tmp_path / ".other.pt.abc.tmp"
    keep.write_bytes(b"not ours")
    Checkpoint(tmp_path / "state.pt", "x")
    assert not stale.exists() and keep.exists()


def test_non_finite_checks_name_what_is_kept(tmp_path):
    ck = Checkpoint(tmp_path / "state.pt", "x", unit="update", hint="Lower teacher.lr.")
    assert ck.check_loss(torch.tensor(0.25), at=1) == 0.25
    with pytest.raises(TrainingError, match=r"^non-finite loss \(nan\) at update 4; no checkpoint was "
                                            r"written yet\. Lower teacher\.lr\.$") as err:
        ck.check_loss(torch.tensor(float("nan")), at=4)
    assert isinstance(err.value, DDPSError)
    assert not (tmp_path / "state.pt").exists()

    model = nn.Linear(2, 2)
    ck.save(2, {"model": model.state_dict()}, model)
    with torch.no_grad():
        model.bias[0] = float("inf")
    with pytest.raises(TrainingError, match=r"non-finite weights \(bias\) after update 5; the last good "
                                            r"checkpoint \(.*state\.pt, update 2\) is kept"):
        ck.save(5, {"model": model.state_dict()}, model)
    assert torch.isfinite(load_checkpoint(tmp_path / "state.pt")["model"]["bias"]).all()
    assert ck.at == 2


# --------------------------------------------------------------------------- loss log, budget
def test_loss_log_csv_and_exact_round_trip(tmp_path):
    log = LossLog(("step", "stage", "loss", "val"))
    log.add(1, "dfp", 1 / 3, None)
    log.add(2, "dfp", float("nan"), 0.5)
    log.write(tmp_path / "loss.csv")
    assert (tmp_path / "loss.csv").read_text() == "step,stage,loss,val\n1,dfp,0.333333,\n2,dfp,nan,0.5\n"
    back = LossLog(log.columns)
    back.restore(log.state())
    assert back.rows[0] == [1, "dfp", 1 / 3, None]  # exactly, not the CSV's 6 digits
    assert math.isnan(back.last("loss")) and back.last("step") == 2
    assert LossLog(("a",)).last("a") is None
    with pytest.raises(ValueError):
        log.add(3, "dfp")


def test_time_budget(monkeypatch):
    from ddps_core import training

    now = [100.0]
    monkeypatch.setattr(training.time, "perf_counter", lambda: now[0])
    logs = []
    budget = TimeBudget(5.0, CallbackReporter(log=logs.append))
    now[0] = 104.0
    assert not budget.reached("step 3") and budget.elapsed == 4.0
    now[0] = 105.5
    assert budget.reached("step 4") and logs == ["time budget of 5 s reached at step 4"]
    assert not TimeBudget(None).reached("step 1")


# --------------------------------------------------------------------------- shared by the trainers' tests
def assert_same_files(a, b, names):
    """The files ``names`` of the output folders ``a`` and ``b`` exist and are equal byte for
    byte, and neither folder holds any other file (a trainer's whole output is deterministic)."""
    from pathlib import Path

    a, b = Path(a), Path(b)
    listing = lambda d: sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file())
    assert listing(a) == listing(b) == sorted(names)
    differ = [n for n in names if (a / n).read_bytes() != (b / n).read_bytes()]
    assert not differ, f"not byte-identical across two identical runs: {differ}"


def test_assert_same_files_sees_a_difference(tmp_path):
    for name, text in (("a", "x"), ("b", "y")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "f.txt").write_text(text)
    with pytest.raises(AssertionError, match="f.txt"):
        assert_same_files(tmp_path / "a", tmp_path / "b", ["f.txt"])
