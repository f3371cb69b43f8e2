"""`ddps suggest` and `ddps data add-labels` on a tiny workspace with a real (tiny) teacher:
the batch folder, one pick per duplicated image, the masks' checks, and the labels joining
the training split through stage data."""

import io
import json
import shutil
import zipfile

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from ddps.cli import main
from ddps_core import stages
from ddps_core.active import add_labels, decode_mask, suggest
from ddps_core.config import parse_settings
from ddps_core.errors import DataError
from ddps_core.viz.palette import IGNORE_COLOR, palette
from tests.helpers import pool_workspace

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """Pool: 5 distinct images, each 3 times under other ids (15 images)."""
    root = tmp_path_factory.mktemp("ws")
    return root, pool_workspace(root)


def _copy(workspace, tmp_path):
    """A private copy of the workspace (add-labels changes its dataset)."""
    root, raw = workspace
    mine = tmp_path / "ws"
    shutil.copytree(root, mine)
    text = yaml.safe_dump(raw).replace(str(root), str(mine))
    (mine / "params.yaml").write_text(text)
    return mine, parse_settings(yaml.safe_load(text))


def _distinct(path):
    return path.name.split("_", 1)[1] if path.name[:2] in ("b_", "c_") else path.name


def test_suggest_writes_a_batch_with_one_pick_per_duplicated_image(workspace, tmp_path):
    root, raw = workspace
    s = parse_settings(raw)
    out = tmp_path / "batch"
    summary = suggest(s, 5, out, candidates=15)
    table = pd.read_parquet(out / "suggestions.parquet")
    assert summary["picked"] == 5 and list(table["rank"]) == [1, 2, 3, 4, 5]
    picked = sorted(out.joinpath("images").iterdir())
    assert len({_distinct(p) for p in picked}) == 5  # one of each of the 5 distinct images
    assert table["score"].iloc[0] == table["score"].max() and table["why"].iloc[0].endswith("most uncertain image")
    # a sixth pick would be a near-copy: none is made
    assert suggest(s, 6, tmp_path / "more", candidates=15)["picked"] == 5
    k = 7
    for p in picked:
        pre = Image.open(out / "prelabels" / p.name)
        assert pre.mode == "P" and pre.size == Image.open(p).size
        labels = np.asarray(pre)
        assert labels.max() < k
        assert np.array_equal(decode_mask(out / "prelabels" / p.name, k, 255), labels)
        assert (out / "uncertainty" / p.name).is_file()
    with zipfile.ZipFile(out / "cvat_segmentation_mask.zip") as z:
        names = set(z.namelist())
        labelmap = z.read("labelmap.txt").decode().splitlines()
        assert z.read("ImageSets/Segmentation/default.txt").decode().split() == list(table["image_id"])
        first = np.asarray(Image.open(io.BytesIO(z.read(f"SegmentationClass/{picked[0].name}"))))
    assert {f"SegmentationClass/{p.name}" for p in picked} <= names
    assert labelmap[1] == "background:0,0,0::" and len(labelmap) == 1 + k
    # CVAT's class colours are the pre-labels' palette
    assert np.array_equal(first, palette(k)[np.asarray(Image.open(out / "prelabels" / picked[0].name))])
    assert Image.open(out / "batch.png").size[1] == 5 * 96


def test_a_colour_mask_with_a_foreign_colour_is_refused_naming_the_file(workspace, tmp_path, capsys):
    mine, s = _copy(workspace, tmp_path)
    pool = sorted((mine / "imported/unlabeled").glob("*.png"))[:2]
    masks = tmp_path / "masks"
    masks.mkdir()
    good = np.zeros((32, 32), dtype=np.uint8)
    good[8:16, 8:16] = 3
    Image.fromarray(palette(7)[good]).save(masks / pool[0].name)  # RGB colour mask
    bad = palette(7)[good].copy()
    bad[0, 0] = (1, 2, 3)
    Image.fromarray(bad).save(masks / pool[1].name)
    with pytest.raises(DataError, match=rf"{pool[1].name}: colour \(1, 2, 3\) on 1 pixels is not a class colour"):
        add_labels(s, masks, images=mine / "imported/unlabeled")
    assert not (mine / "added").exists()  # nothing added when one mask is wrong
    # the CLI: one error line naming the file, exit 1
    with pytest.raises(SystemExit) as info:
        main(["data", "add-labels", str(masks), "--images", str(mine / "imported/unlabeled"),
              "--params", str(mine / "params.yaml")])
    err = capsys.readouterr().err
    assert info.value.code == 1 and pool[1].name in err and "Traceback" not in err
    assert len([line for line in err.splitlines() if line.startswith("error:")]) == 1
    # fixed: both accepted, the ignore colour is the ignore index
    fixed = palette(7)[good].copy()
    fixed[0, 0] = IGNORE_COLOR
    Image.fromarray(fixed).save(masks / pool[1].name)
    summary = add_labels(s, masks, images=mine / "imported/unlabeled")
    assert summary["added"] == 2
    label = np.load(mine / "added" / f"{pool[1].stem}.npy")
    assert label[0, 0] == 255 and label[9, 9] == 3 and (label[1:, :] != 255).all()
    train = mine / "imported/real/train"
    assert np.array_equal(np.load(train / f"{pool[0].stem}.npy"), good)
    assert not (mine / "imported/unlabeled" / pool[0].name).exists()
    assert summary["counts"]["train"] == 6 and summary["counts"]["unlabeled"] == 13


@pytest.mark.parametrize("case, message", [
    ("size", r"mask is 16x32 \(WxH\), its image .* is 32x32"),
    ("range", r"class id 9 on 4 pixels is outside 0\.\.6"),
    ("jpeg", r"lossy|JPEG"),
    ("test", r"is an image of the test split"),
    ("orphan", r"no image nothere\.\*"),
])
def test_add_labels_refuses_wrong_masks(workspace, tmp_path, case, message):
    mine, s = _copy(workspace, tmp_path)
    pool = sorted((mine / "imported/unlabeled").glob("*.png"))
    images = mine / "imported/unlabeled"
    masks = tmp_path / "masks"
    masks.mkdir()
    ids = np.zeros((32, 32), dtype=np.uint8)
    if case == "size":
        Image.fromarray(ids[:, :16]).save(masks / pool[0].name)
    elif case == "range":
        ids[:2, :2] = 9
        Image.fromarray(ids).save(masks / pool[0].name)  # grey: the values are class ids
    elif case == "jpeg":
        Image.fromarray(palette(7)[ids]).save(masks / f"{pool[0].stem}.jpg")
    elif case == "test":
        test = sorted((mine / "imported/real/test").glob("*.png"))[0]
        images = test.parent
        np.save(masks / f"{test.stem}.npy", ids)
    else:
        np.save(masks / "nothere.npy", ids)
    with pytest.raises(DataError, match=message):
        add_labels(s, masks, images=images)
    assert not (mine / "added").exists()


def test_the_loop_suggest_correct_add_then_suggest_again(workspace, tmp_path):
    mine, s = _copy(workspace, tmp_path)
    batch = mine / "batch"
    first = suggest(s, 2, batch, candidates=15)
    picked = [r["image_id"] for r in first["picks"]]
    # a correction in place: one pixel of the first pre-label becomes class 2
    pre = batch / "prelabels" / f"{picked[0]}.png"
    im = Image.open(pre)
    arr = np.array(im)
    arr[0, 0] = 2
    fixed = Image.fromarray(arr)
    fixed.putpalette(im.getpalette())
    fixed.save(pre)
    # an edited batch is the user's work: suggest refuses to replace it
    with pytest.raises(DataError, match=r"pre-label edited since `ddps suggest` wrote it"):
        suggest(s, 2, batch, candidates=15)
    summary = add_labels(s, batch)
    assert summary["added"] == 2 and np.load(mine / "added" / f"{picked[0]}.npy")[0, 0] == 2
    # the picks left the pool; the stage data rerun is a reuse (same added content)
    pool = {p.stem for p in (mine / "imported/unlabeled").glob("*.png")}
    assert not pool & set(picked) and len(pool) == 13
    again = stages.get("data").run(s)
    assert again["reused"] and again["counts"]["train"] == 6
    # the next batch replaces the added one and never picks a labelled image
    second = suggest(s, 2, batch, candidates=15)
    assert not {r["image_id"] for r in second["picks"]} & set(picked)
    record = json.loads((batch / ".batch.json").read_text())
    assert "added" not in record and set(record["prelabels"]) == {r["image_id"] for r in second["picks"]}
    # removing an added label puts its image back into the pool
    (mine / "added" / f"{picked[1]}.png").unlink()
    (mine / "added" / f"{picked[1]}.npy").unlink()
    back = stages.get("data").run(s)
    assert not back["reused"] and back["counts"]["train"] == 5 and back["counts"]["unlabeled"] == 14


def test_suggest_reuses_the_pool_labels_of_stage_label(workspace, tmp_path):
    mine, s = _copy(workspace, tmp_path)
    stages.get("label").run(s)  # labels the test split and the pool with the teacher
    summary = suggest(s, 2, mine / "batch", candidates=15)
    assert summary["pool_labels_reused"] is True
    assert not (mine / ".batch.pool").exists()  # nothing labelled again
