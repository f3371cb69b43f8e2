"""Pixel classifier ensemble: batched evaluation vs separate reference MLPs, init, majority
vote / Jensen-Shannon / score against hand computations, per-member stopping with frozen
members, bootstrap diversity, training, save / load, checkpoint resume, the RGB-XY source."""

from __future__ import annotations

import math
import shutil

import numpy as np
import pytest
import torch

from ddps_core.errors import CheckpointError, DDPSError
from ddps_core.features.sampler import PixelSampler
from ddps_core.progress import CallbackReporter
from ddps_core.teacher import (
    ArraySource,
    MemberAdam,
    PixelEnsemble,
    ReferenceMLP,
    RGBXYSource,
    image_score,
    js_divergence,
    load_checkpoint,
    majority_vote,
    predict_image,
    predict_store,
    reference_mlp,
    train_ensemble,
)
from ddps_core.teacher import train as train_mod
from ddps_core.teacher.train import TrainingError
from ddps_core.teacher.predict import vote_maps

pytestmark = pytest.mark.usefixtures("one_thread")


def _randomise(ens: PixelEnsemble, seed: int = 0) -> None:
    """Non-trivial values for every parameter and buffer (BN affine, running stats, counts)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in ens.member_tensors().items():
            if t.dtype == torch.long:
                t.copy_(torch.randint(0, 100, t.shape, generator=g))
            elif name.endswith("_var"):
                t.copy_(torch.rand(t.shape, generator=g) * 2 + 0.1)
            else:
                t.copy_(torch.randn(t.shape, generator=g) * 0.5)


def _easy_source(n_images=4, S=16, D=6, seed=0) -> ArraySource:
    """Labels are a linear function of the features (3 classes): easily separable."""
    rng = np.random.default_rng(seed)
    f = rng.standard_normal((n_images, D, S, S)).astype(np.float32)
    lab = (f[:, 0] > 0).astype(np.uint8) + (f[:, 1] > 0.6).astype(np.uint8)
    return ArraySource(f, lab, num_classes=3)


# --------------------------------------------------------------------------------------------
# Batched ensemble == separate reference MLPs
# --------------------------------------------------------------------------------------------


def test_batched_equals_reference_eval_and_train():
    D, K, M = 7, 4, 3
    ens = PixelEnsemble(D, K, members=M, widths=(8, 5), seed=3)
    _randomise(ens, 1)
    refs = [ReferenceMLP(D, K, (8, 5)) for _ in range(M)]
    for m, ref in enumerate(refs):
        ref.load_state_dict(ens.export_member(m))
        assert set(ref.state_dict()) == {
            "layers.0.weight", "layers.0.bias",
            "layers.2.weight", "layers.2.bias", "layers.2.running_mean", "layers.2.running_var",
            "layers.2.num_batches_tracked",
            "layers.3.weight", "layers.3.bias",
            "layers.5.weight", "layers.5.bias", "layers.5.running_mean", "layers.5.running_var",
            "layers.5.num_batches_tracked",
            "layers.6.weight", "layers.6.bias",
        }
    x = torch.randn(11, D, generator=torch.Generator().manual_seed(5))

    ens.eval()
    out = ens(x)
    assert out.shape == (M, 11, K)
    for m, ref in enumerate(refs):
        torch.testing.assert_close(out[m], ref.eval()(x), atol=1e-5, rtol=1e-5)
    # per-member inputs
    xs = torch.randn(M, 9, D)
    out3 = ens(xs)
    for m, ref in enumerate(refs):
        torch.testing.assert_close(out3[m], ref(xs[m]), atol=1e-5, rtol=1e-5)

    # train mode: batch statistics, and the running-stat updates of nn.BatchNorm1d
    ens.train()
    out = ens(x)
    for m, ref in enumerate(refs):
        ref.train()
        torch.testing.assert_close(out[m], ref(x), atol=1e-5, rtol=1e-5)
        mine = ens.export_member(m)
        for k, v in ref.state_dict().items():
            torch.testing.assert_close(mine[k], v, atol=1e-5, rtol=1e-5, msg=f"member {m} {k}")

    # update_stats: only the selected members' running statistics move
    before = [ens.export_member(m) for m in range(M)]
    ens(x, update_stats=torch.tensor([False, True, False]))
    for m in range(M):
        after = ens.export_member(m)
        changed = not torch.equal(after["layers.2.running_mean"], before[m]["layers.2.running_mean"])
        assert changed == (m == 1)
        if m != 1:
            for k in before[m]:
                assert torch.equal(after[k], before[m][k])
        else:
            assert int(after["layers.5.num_batches_tracked"]) == int(before[m]["layers.5.num_batches_tracked"]) + 1


def test_member_init_matches_independent_reference_and_load_member():
    D, K, M, seed = 20, 5, 3, 7
    ens = PixelEnsemble(D, K, members=M, seed=seed)
    for m in range(M):
        ref = reference_mlp(D, K, seed=seed + m)  # built independently, same generator
        mine = ens.export_member(m)
        for k, v in ref.state_dict().items():
            assert torch.equal(mine[k], v), k
    # load_member round trip with a foreign module
    other = reference_mlp(D, K, seed=123)
    _randomise_module(other)
    ens.load_member(1, other.state_dict())
    for k, v in other.state_dict().items():
        assert torch.equal(ens.export_member(1)[k], v)
    assert torch.equal(ens.export_member(0)["layers.0.weight"], reference_mlp(D, K, seed=seed).layers[0].weight)
    with pytest.raises(CheckpointError):
        ens.load_member(0, {"layers.0.weight": torch.zeros(3)})


def _randomise_module(mod):
    with torch.no_grad():
        for k, t in mod.state_dict().items():
            if t.dtype == torch.long:
                t.fill_(17)
            else:
                t.copy_(torch.rand(t.shape) + 0.1)


def test_init_statistics_and_widths():
    ens = PixelEnsemble(512, 10, members=4, seed=0)
    assert ens.widths == (128, 32)
    assert PixelEnsemble(8, 30, members=1).widths == (256, 128)
    assert PixelEnsemble(8, 29, members=1).widths == (128, 32)
    w1 = ens.w1.detach()
    assert abs(w1.std().item() - 0.02) < 0.001 and abs(w1.mean().item()) < 0.001
    assert abs(ens.w2.detach().std().item() - 0.02) < 0.002
    for b in (ens.b1, ens.b2, ens.b3, ens.bn1_bias, ens.bn2_bias):
        assert torch.count_nonzero(b) == 0
    assert torch.all(ens.bn1_weight == 1) and torch.all(ens.bn2_weight == 1)
    members = [ens.export_member(m)["layers.0.weight"] for m in range(4)]
    for a in range(4):
        for b in range(a + 1, 4):
            assert not torch.allclose(members[a], members[b])
    again = PixelEnsemble(512, 10, members=4, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(ens.state_dict().values(), again.state_dict().values()))


# --------------------------------------------------------------------------------------------
# Prediction: vote, JS, score
# --------------------------------------------------------------------------------------------


def _entropy(p):
    p = np.asarray(p, dtype=np.float64)
    return -sum(v * math.log(v) for v in p if v > 0)


def test_js_divergence_and_vote_by_hand():
    probs = np.array(
        [  # member, pixel, class
            [[0.7, 0.2, 0.1], [1.0, 0.0, 0.0]],
            [[0.1, 0.8, 0.1], [0.5, 0.5, 0.0]],
            [[0.2, 0.2, 0.6], [0.0, 0.25, 0.75]],
        ]
    )
    expected = []
    for px in range(2):
        mean = probs[:, px].mean(axis=0)
        expected.append(_entropy(mean) - np.mean([_entropy(probs[m, px]) for m in range(3)]))
    got = js_divergence(torch.tensor(probs)).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-12)
    # identical members: 0; disjoint one-hot members: ln M
    same = torch.tensor([[[0.3, 0.7]]] * 4, dtype=torch.float64)
    assert js_divergence(same).item() == pytest.approx(0.0, abs=1e-12)
    onehot = torch.eye(3, dtype=torch.float64)[:, None, :]
    assert js_divergence(onehot).item() == pytest.approx(math.log(3))

    # majority vote: mode, ties -> smallest class id
    member_labels = torch.tensor([[0, 2, 3, 1], [2, 2, 1, 2], [1, 1, 3, 1]])  # [M=3, n=4]
    assert majority_vote(member_labels, 4).tolist() == [0, 2, 3, 1]
    assert majority_vote(torch.tensor([[2], [1], [1], [2]]), 3).tolist() == [1]


def test_image_score_top_ten_percent_rounded_down():
    # the reference: the mean of the int(n / 10) largest pixel scores
    u = np.arange(20, dtype=np.float32).reshape(4, 5)  # int(2.0) = 2 -> mean(19, 18)
    assert image_score(u) == pytest.approx(18.5)
    u = np.zeros((5, 5), dtype=np.float32)
    u[0, :3] = [4.0, 1.0, 7.0]  # int(2.5) = 2 -> mean(7, 4), not the 3 of a ceil
    assert image_score(u) == pytest.approx(5.5)
    assert image_score(torch.from_numpy(u)) == pytest.approx(5.5)
    u = np.zeros(19)
    u[[3, 11]] = [0.5, 0.25]  # int(1.9) = 1 -> the largest alone
    assert image_score(u) == pytest.approx(0.5)
    # below 10 pixels the reference's slice [-0:] is the whole map: the mean of every pixel
    assert image_score(np.array([[0.25]])) == pytest.approx(0.25)
    u = np.array([[0.9, 0.0, 0.0], [0.3, 0.0, 0.0], [0.0, 0.0, 0.6]])  # 9 pixels
    assert image_score(u) == pytest.approx(1.8 / 9)
    with pytest.raises(ValueError, match="empty"):
        image_score(np.zeros((0, 4)))


def test_predict_image_matches_independent_computation():
    D, K, M, S = 5, 4, 5, 9
    ens = PixelEnsemble(D, K, members=M, widths=(16, 8), seed=2)
    _randomise(ens, 4)
    ens.eval()
    feats = np.random.default_rng(1).standard_normal((D, S, S)).astype(np.float32)
    labels, unc, score = predict_image(ens, feats, chunk=7)
    assert labels.shape == (S, S) and labels.dtype == np.uint8 and unc.dtype == np.float32
    x = torch.from_numpy(feats.reshape(D, -1).T.copy())
    with torch.no_grad():
        probs = np.stack([torch.softmax(ens.member_module(m)(x).double(), -1).numpy() for m in range(M)])
    votes = probs.argmax(-1)  # [M, n]
    want_lab = np.array([np.bincount(votes[:, p], minlength=K).argmax() for p in range(S * S)])
    want_js = np.array([
        _entropy(probs[:, p].mean(0)) - np.mean([_entropy(probs[m, p]) for m in range(M)]) for p in range(S * S)
    ])
    assert np.array_equal(labels.ravel(), want_lab)
    np.testing.assert_allclose(unc.ravel(), want_js, atol=2e-5)
    k = int(S * S / 10)  # the reference's top int(n / 10): 8 of 81 pixels
    assert score == pytest.approx(np.sort(want_js)[-k:].mean(), abs=2e-5)
    assert 0 < score <= math.log(M)
    # the callable path gives the same result
    # (another chunk size changes the matmul blocking, so floats may differ in the last ulp)
    lab2, unc2, score2 = predict_image(ens, lambda ys, xs: feats[:, ys, xs].T, chunk=10, image_size=S)
    assert np.array_equal(lab2, labels)
    np.testing.assert_allclose(unc2, unc, rtol=0, atol=1e-6)
    assert score2 == pytest.approx(score, abs=1e-6)
    # the soft labels: the members' mean softmax, beside the same votes and uncertainty
    shares, js, mean = vote_maps(ens, feats, chunk=7, mean_probs=True)
    assert mean.shape == (K, S, S)
    np.testing.assert_allclose(mean.numpy().reshape(K, -1).T, probs.mean(0), atol=1e-6)
    np.testing.assert_allclose(js.numpy().ravel(), want_js, atol=2e-5)
    assert np.array_equal(shares.numpy().argmax(0).ravel(), want_lab)


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def test_member_adam_equals_torch_adam_when_all_active():
    ens = PixelEnsemble(6, 3, members=2, widths=(8, 4), seed=0)
    ref = PixelEnsemble(6, 3, members=2, widths=(8, 4), seed=0)
    opt, topt = MemberAdam(ens, lr=1e-2), torch.optim.Adam(ref.parameters(), lr=1e-2, fused=True)
    g = torch.Generator().manual_seed(0)
    for _ in range(4):
        x, y = torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)
        for model, o in ((ens, opt), (ref, topt)):
            o.zero_grad()
            train_mod.member_losses(model(x), y, None)[0].sum().backward()
        opt.step(torch.tensor([True, True]))
        topt.step()
    for (k, a), b in zip(ens.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-6, msg=k)
    assert opt.steps.tolist() == [4, 4]


def test_training_reduces_loss_and_reaches_high_accuracy():
    src = _easy_source()
    sampler = PixelSampler(src, batch_size=64, buffer_images=2, seed=0, ignore_index=None, min_class_pixels=1)
    ens = PixelEnsemble(src.feature_dim, 3, members=4, seed=0)
    calls = []
    summary = train_ensemble(sampler, ens, max_epochs=8, progress_every=10,
                             report=CallbackReporter(lambda *a, **v: calls.append((*a, v))))
    assert summary.epochs == 8 and summary.reason == "max_epochs"
    assert summary.epoch_losses[-1] < 0.5 * summary.epoch_losses[0]
    E = len(sampler)
    # the first report comes before the first batch; then every 10 updates and each epoch end
    assert calls[0] == ("teacher", 0, None, {"epoch": 0, "active": 4})
    assert all(c[0] == "teacher" and c[2] == 8 * E and c[3]["active"] == 4 and "loss" in c[3] for c in calls[1:])
    done = [c[1] for c in calls[1:]]
    assert done == sorted(done) and {10, 20, E, 8 * E} <= set(done)
    assert [c[3]["epoch"] for c in calls] == sorted(c[3]["epoch"] for c in calls) and calls[-1][3]["epoch"] == 7
    results = list(predict_store(ens, src))
    assert [r[0] for r in results] == src.image_ids
    acc = np.mean([(r[1] == src.label(i)).mean() for i, r in enumerate(results)])
    assert acc > 0.95


def _patched_losses(monkeypatch, member_offsets):
    """Add a detached, per-call growing offset to each member's loss: gradients unchanged, the
    stopping rule sees losses that never improve (positive slope) or always improve (negative)."""
    real = train_mod.member_losses
    calls = [0]

    def patched(logits, labels, weights):
        losses, wsum = real(logits, labels, weights)
        calls[0] += 1
        offset = torch.tensor(member_offsets, dtype=losses.dtype) * calls[0]
        return losses + offset, wsum

    monkeypatch.setattr(train_mod, "member_losses", patched)


def test_stopped_member_is_frozen_bit_identical(monkeypatch, tmp_path):
    src = _easy_source(n_images=2, S=16)
    sampler = PixelSampler(src, batch_size=64, buffer_images=2, ignore_index=None, min_class_pixels=1)
    E = len(sampler)  # 8 batches per epoch
    patience, min_epoch, max_epochs = 3, 4, 7
    _patched_losses(monkeypatch, [10.0, -10.0, -10.0])
    ck = tmp_path / "train.ckpt"
    snap = tmp_path / "at_stop.ckpt"
    seen = []

    def progress(task, updates, total, epoch, active, loss=None):
        seen.append((epoch, updates, active))
        if active == 2 and not snap.exists():
            shutil.copy(ck, snap)  # the checkpoint written at the update where member 0 stopped

    ens = PixelEnsemble(src.feature_dim, 3, members=3, widths=(16, 8), seed=0)
    s = train_ensemble(
        sampler, ens, max_epochs=max_epochs, patience=patience, min_epoch=min_epoch,
        report=CallbackReporter(progress), progress_every=1, checkpoint_path=ck, checkpoint_every=1,
        inputs={"features": "easy"},
    )
    # the rule starts at epoch index 4: best set at its first batch, stops after patience + 1 misses
    assert s.stopped == [True, False, False]
    assert s.stop_epoch[0] == min_epoch
    assert s.stop_update[0] == min_epoch * E + patience + 2
    assert s.epochs == max_epochs and s.reason == "max_epochs" and s.updates == max_epochs * E
    assert all(a == 3 for _, u, a in seen if u < s.stop_update[0])

    at_stop, final = load_checkpoint(snap), load_checkpoint(ck)
    assert at_stop["state"]["updates"] == s.stop_update[0]
    M = 3
    for name, before in at_stop["model"].items():
        after = final["model"][name]
        b, a = before.view(M, -1), after.view(M, -1)
        assert torch.equal(a[0], b[0]), f"frozen member changed: {name}"
        if name.startswith(("w", "b", "bn")) and not name.endswith("tracked"):
            assert not torch.equal(a[1], b[1]), f"active member did not train: {name}"
    for key in ("exp_avg", "exp_avg_sq"):
        for name, before in at_stop["optimizer"][key].items():
            assert torch.equal(final["optimizer"][key][name].view(M, -1)[0], before.view(M, -1)[0])
    assert final["optimizer"]["steps"].tolist() == [s.stop_update[0], s.updates, s.updates]
    assert torch.equal(ens.export_member(0)["layers.2.running_var"], at_stop["model"]["bn1_var"][:16])
    assert int(ens.bn1_tracked[0]) == s.stop_update[0] and int(ens.bn1_tracked[1]) == s.updates


def test_all_members_stop_ends_training(monkeypatch):
    src = _easy_source(n_images=1, S=16)
    sampler = PixelSampler(src, batch_size=64, ignore_index=None, min_class_pixels=1)
    _patched_losses(monkeypatch, [10.0, 10.0])
    ens = PixelEnsemble(src.feature_dim, 3, members=2, widths=(8, 4))
    s = train_ensemble(sampler, ens, max_epochs=50, patience=2, min_epoch=1)
    assert s.reason == "all_stopped" and s.stopped == [True, True]
    assert s.stop_epoch == [1, 1] and s.epochs == 2 and s.updates == len(sampler) + 4


def test_bootstrap_members_disagree_where_labels_are_noisy():
    rng = np.random.default_rng(0)
    n = 2048
    X = rng.uniform(-1, 1, (n, 2)).astype(np.float32)
    y = (X[:, 0] > 0).astype(np.int64)
    noisy = X[:, 1] > 0  # upper half: random labels; lower half: clean threshold on x0
    y[noisy] = rng.integers(0, 2, int(noisy.sum()))

    def batches(epoch):
        p = np.random.default_rng([1, epoch]).permutation(n)
        for b in range(0, n, 64):
            i = p[b : b + 64]
            yield torch.from_numpy(X[i]), torch.from_numpy(y[i])

    grid = np.stack(np.meshgrid(np.linspace(-0.95, 0.95, 30), np.linspace(-0.95, 0.95, 30)), -1).reshape(-1, 2)
    grid = torch.from_numpy(grid.astype(np.float32))
    up = grid[:, 1] > 0

    def disagreement(bootstrap):
        ens = PixelEnsemble(2, 2, members=6, seed=0)
        train_ensemble(batches, ens, max_epochs=8, patience=10**9, bootstrap=bootstrap, seed=0)
        with torch.no_grad():
            pred = ens(grid).argmax(-1)
        vote = majority_vote(pred, 2)
        off = (pred != vote[None]).float().mean(0)  # fraction of members against the vote
        return off[up].mean().item(), off[~up].mean().item()

    noisy_b, clean_b = disagreement(True)
    noisy_p, _ = disagreement(False)
    assert noisy_b > 0.08 and noisy_b > 4 * clean_b
    assert noisy_b > 1.5 * noisy_p  # the bootstrap weights are what makes members diverse there


# --------------------------------------------------------------------------------------------
# Save / load, checkpoints, resume
# --------------------------------------------------------------------------------------------


def test_save_load_roundtrip_and_errors(tmp_path):
    ens = PixelEnsemble(9, 4, members=3, widths=(8, 4), seed=5, source_id="rgbxy-32")
    _randomise(ens, 2)
    path = ens.save(tmp_path / "ens.safetensors")
    back = PixelEnsemble.load(path, feature_dim=9, num_classes=4, members=3, source_id="rgbxy-32")
    assert back.widths == (8, 4) and back.seed == 5 and back.source_id == "rgbxy-32"
    for (k, a), b in zip(ens.state_dict().items(), back.state_dict().values()):
        assert torch.equal(a, b), k
    x = torch.randn(5, 9)
    assert torch.equal(ens.eval()(x), back.eval()(x))

    with pytest.raises(CheckpointError, match="ens.safetensors.*num_classes"):
        PixelEnsemble.load(path, num_classes=5)
    with pytest.raises(CheckpointError, match="source_id"):
        PixelEnsemble.load(path, source_id="features-abc")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="bad.safetensors"):
        PixelEnsemble.load(bad)
    from safetensors.torch import save_file

    other = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(other))
    with pytest.raises(CheckpointError, match="other.safetensors.*not a pixel ensemble"):
        PixelEnsemble.load(other)
    with pytest.raises(CheckpointError, match="missing.safetensors"):
        PixelEnsemble.load(tmp_path / "missing.safetensors")


class _Kill(Exception):
    pass


def test_resume_gives_identical_weights(tmp_path):
    src = _easy_source(n_images=2, S=16)

    def sampler(batch_size=48):
        return PixelSampler(src, batch_size=batch_size, buffer_images=1, seed=3, ignore_index=None, min_class_pixels=1)

    def run(ck, kill_at=None):
        ens = PixelEnsemble(src.feature_dim, 3, members=3, widths=(16, 8), seed=1)

        def progress(task, updates, total, **values):
            if kill_at is not None and updates >= kill_at:
                raise _Kill

        s = train_ensemble(sampler(), ens, max_epochs=9, patience=4, min_epoch=2, seed=7,
                           report=CallbackReporter(progress, logs.append), progress_every=1,
                           checkpoint_path=ck, checkpoint_every=5, inputs={"features": "easy"})
        return ens, s

    logs = []

    full, s_full = run(tmp_path / "a.ckpt")
    # the stopping state is part of what must resume exactly
    assert s_full.reason == "all_stopped" and sorted(s_full.stop_update)[:2] == [34, 35]
    ck = tmp_path / "b.ckpt"
    with pytest.raises(_Kill):
        run(ck, kill_at=29)  # mid-epoch 2 (11 batches per epoch); last checkpoint at update 25
    assert load_checkpoint(ck)["state"]["updates"] == 25
    with pytest.raises(_Kill):
        run(ck, kill_at=47)  # after two members stopped (updates 34, 35); checkpoint at 45
    resumed, s_res = run(ck)
    assert s_res.resumed_from == 45 and logs[-1] == f"resuming from update 45 ({ck})"
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k
    assert s_res.stopped == s_full.stopped and s_res.stop_update == s_full.stop_update
    assert s_res.epoch_losses == s_full.epoch_losses
    # the checkpoint and the record too (the run's own resume point and timing aside)
    assert ck.read_bytes() == (tmp_path / "a.ckpt").read_bytes()
    assert s_res.record() == s_full.record() and "seconds" not in s_res.record()
    # a finished run resumes to a no-op; other settings or other inputs start over
    again, s_again = run(ck)
    assert s_again.updates == s_full.updates
    same = {"patience": 4, "min_epoch": 2, "seed": 7, "max_epochs": 1, "inputs": {"features": "easy"}}
    for change in ({"lr": 0.5}, {"inputs": {"features": "other"}}, {"sampler": sampler(batch_size=32)}):
        what = sorted(change)
        train_ensemble(change.pop("sampler", sampler()), PixelEnsemble(src.feature_dim, 3, members=3, widths=(16, 8), seed=1),
                       **{**same, **change}, checkpoint_path=ck, report=CallbackReporter(log=logs.append))
        assert logs[-1] == f"{ck} was trained with other settings or inputs: starting over", what
        train_ensemble(sampler(), PixelEnsemble(src.feature_dim, 3, members=3, widths=(16, 8), seed=1),
                       **same, checkpoint_path=ck)  # back to the first run's identity (from scratch)


def test_non_finite_loss_raises_and_keeps_checkpoint(tmp_path):
    rng = np.random.default_rng(0)
    X = rng.standard_normal((128, 4)).astype(np.float32)
    y = (X[:, 0] > 0).astype(np.int64)

    def poisoned(bad_epoch):
        def batches(epoch):
            for b in range(0, 128, 32):
                xb = X[b : b + 32].copy()
                if epoch == bad_epoch and b == 64:
                    xb[3, 1] = np.nan
                yield torch.from_numpy(xb), torch.from_numpy(y[b : b + 32])
        return batches

    batches = poisoned(1)
    ck = tmp_path / "t.ckpt"
    ens = PixelEnsemble(4, 2, members=2, widths=(8, 4))
    with pytest.raises(TrainingError, match=r"member\(s\) \[0, 1\] at epoch 1, batch 2 \(update 7\); "
                                            r"the last good checkpoint \(.*t.ckpt, update 4\) is kept") as err:
        train_ensemble(batches, ens, max_epochs=3, checkpoint_path=ck, checkpoint_every=0, inputs={"x": "nan"})
    assert isinstance(err.value, DDPSError)
    state = load_checkpoint(ck)
    assert state["state"]["epoch"] == 1 and state["state"]["updates"] == 4
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    # before any checkpoint: the message says none was written (it does not name a missing file)
    with pytest.raises(TrainingError, match="no checkpoint was written yet"):
        train_ensemble(poisoned(0), PixelEnsemble(4, 2, members=2, widths=(8, 4)), max_epochs=3,
                       checkpoint_path=tmp_path / "new.ckpt", checkpoint_every=100, inputs={"x": "nan"})
    assert not (tmp_path / "new.ckpt").exists()
    ck.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="t.ckpt.*delete it to start over"):
        train_ensemble(batches, PixelEnsemble(4, 2, members=2, widths=(8, 4)), checkpoint_path=ck,
                       inputs={"x": "nan"})


# --------------------------------------------------------------------------------------------
# RGB-XY source
# --------------------------------------------------------------------------------------------


def test_rgbxy_source_values_and_sampler():
    image = np.array(
        [[[0, 0, 0], [255, 0, 51], [10, 20, 30]],
         [[255, 255, 255], [0, 102, 204], [1, 2, 3]]],
        dtype=np.uint8,
    )  # 2 x 3
    label = np.array([[0, 1, 1], [2, 2, 1]], dtype=np.uint8)
    # to_square(size 2): the short side is already 2, the long side is centre-cropped to
    # columns 0..1 (offset (3 - 2) // 2 = 0)
    src = RGBXYSource([(image, label, "a"), (image[:, ::-1].copy(), label[:, ::-1].copy(), "b")], image_size=2)
    assert len(src) == 2 and src.feature_dim == 5 and src.image_size == 2 and src.image_ids == ["a", "b"]
    assert src.has_labels
    f = src.image_features(0)
    assert f.shape == (5, 2, 2) and f.dtype == np.float32
    want_rgb = image[:, :2].astype(np.float64).transpose(2, 0, 1) / 127.5 - 1
    np.testing.assert_allclose(f[:3], want_rgb, atol=1e-6)
    np.testing.assert_allclose(f[:3, 0, 0], [-1, -1, -1])
    np.testing.assert_allclose(f[:3, 1, 1], [-1, 102 / 127.5 - 1, 204 / 127.5 - 1], atol=1e-6)
    np.testing.assert_array_equal(f[3], [[-1, 1], [-1, 1]])  # x
    np.testing.assert_array_equal(f[4], [[-1, -1], [1, 1]])  # y
    np.testing.assert_array_equal(src.label(0), label[:, :2])
    px = src.pixels(0, np.array([1, 0]), np.array([0, 1]))
    assert px.shape == (2, 5)
    np.testing.assert_array_equal(px, f[:, [1, 0], [0, 1]].T)

    # the real sampler and the predictor run on it unchanged
    sampler = PixelSampler(src, batch_size=3, ignore_index=None, min_class_pixels=1)
    got = list(sampler)
    assert sum(len(b[1]) for b in got) == 8 and all(b[0].shape[1] == 5 for b in got)
    ens = PixelEnsemble(5, 3, members=2, widths=(8, 4))
    out = list(predict_store(ens, src))
    assert [o[0] for o in out] == ["a", "b"] and out[0][1].shape == (2, 2) and out[0][2].shape == (2, 2)
    assert src.source_id == "rgbxy-2"


def test_rgbxy_source_on_a_dataset_reader(tmp_path):
    from ddps_core.datasets import DDPMSegFolder, make_synthetic, to_square

    make_synthetic(tmp_path / "syn", image_size=32, n_unlabeled=1, n_labeled=3, n_test=1, seed=0)
    reader = DDPMSegFolder(tmp_path / "syn", "train")
    src = RGBXYSource(reader, image_size=8)  # downscaled by to_square (32 -> 8)
    assert src.image_ids == reader.ids and src.has_labels and src.num_classes == reader.num_classes
    sample = reader[1]
    img, lab = to_square(sample.image, sample.label, 8)
    f = src.image_features(1)
    np.testing.assert_allclose(f[:3], img.transpose(2, 0, 1) / 127.5 - 1, atol=1e-6)
    np.testing.assert_allclose(f[3, 0], np.linspace(-1, 1, 8), atol=1e-6)
    np.testing.assert_array_equal(src.label(1), lab)
    sampler = PixelSampler(src, batch_size=32, ignore_index=reader.ignore_index, min_class_pixels=1)
    ens = PixelEnsemble(5, reader.num_classes, members=2, widths=(8, 4))
    s = train_ensemble(sampler, ens, max_epochs=1)
    assert s.updates == len(sampler) and np.isfinite(s.epoch_losses[0])


def test_predict_store_on_a_feature_store(tmp_path):
    from ddps_core.features.store import FeatureStore
    from ddps_core.teacher import source_id_of

    rng = np.random.default_rng(0)
    store = FeatureStore.create(
        tmp_path / "fs", model_id="m", steps=[5], blocks=[2, 3], image_size=8, image_ids=["a", "b"],
        shapes={"t5_b2": (3, 4, 4), "t5_b3": (2, 2, 2)}, shard_images=2, num_classes=3, ignore_index=255,
    )
    store.write_shard(
        0, {"t5_b2": rng.standard_normal((2, 3, 4, 4)), "t5_b3": rng.standard_normal((2, 2, 2, 2))},
        rng.integers(0, 3, (2, 8, 8)),
    )
    ens = PixelEnsemble(store.feature_dim, 3, members=3, widths=(8, 4), source_id=source_id_of(store))
    _randomise(ens, 3)
    seen = []
    out = list(predict_store(ens, store, progress=lambda d, t, i: seen.append((d, t, i)), chunk=13))
    assert seen == [(1, 2, "a"), (2, 2, "b")]
    for i, (iid, lab, unc, score) in enumerate(out):
        lab2, unc2, score2 = predict_image(ens, store.image_features(i))
        assert iid == store.image_ids[i] and np.array_equal(lab, lab2)
        np.testing.assert_allclose(unc, unc2, atol=1e-5)
        assert score == pytest.approx(score2, abs=1e-5)
    assert ens.source_id.startswith("features-") and ens.source_id == source_id_of(FeatureStore.open(tmp_path / "fs"))
