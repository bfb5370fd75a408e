"""Dataset readers, meta.json interop, error handling and the zero-shot splits."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from ssvp.config import DataConfig  # noqa: E402
from ssvp.data import (  # noqa: E402
    FORMATS,
    DatasetError,
    collate,
    make_synthetic,
    open_dataset,
    write_meta,
    zero_shot_splits,
)

REPO = Path(__file__).resolve().parents[1]
TIRE = (REPO / ".." / "shared" / "data" / "mvtec3d_tire_rgb").resolve()

W, H = 20, 16  # tiny test images are W x H
RECT = (4, 3, 10, 8)  # x0, y0, x1, y1 (exclusive) of every anomaly mask
RECT_AREA = (RECT[2] - RECT[0]) * (RECT[3] - RECT[1])


# --------------------------------------------------------------------------- tiny trees
def img(path: Path, color=(10, 128, 250), size=(W, H), fmt=None, mode="RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "L":
        Image.new("L", size, color[0]).save(path, format=fmt)
    else:
        Image.new("RGB", size, color).save(path, format=fmt)
    return path


def mask(path: Path, value=255, size=(W, H), rect=RECT, fmt=None, empty=False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.zeros((size[1], size[0]), np.uint8)
    if not empty:
        x0, y0, x1, y1 = rect
        arr[y0:y1, x0:x1] = value
    Image.fromarray(arr, mode="L").save(path, format=fmt)
    return path


def make_mvtec(root: Path, classes=("bottle", "cable"), defects=("broken", "scratch")) -> Path:
    for cls in classes:
        for i in range(2):
            img(root / cls / "train" / "good" / f"{i:03d}.png")
        img(root / cls / "test" / "good" / "000.png")
        for d in defects:
            for i in range(2):
                img(root / cls / "test" / d / f"{i:03d}.png", color=(200, 30, 30))
                mask(root / cls / "ground_truth" / d / f"{i:03d}_mask.png")
    (root / "license.txt").write_text("not a category")
    return root


def make_dtd(root: Path) -> Path:
    for cls in ("Woven_001", "Blotchy_099"):
        img(root / cls / "train" / "good" / "000.png")
        img(root / cls / "test" / "good" / "000.png")
        img(root / cls / "test" / "bad" / "000.png")
        img(root / cls / "test" / "bad" / "001.png")
        mask(root / cls / "ground_truth" / "bad" / "000_mask.png")
        mask(root / cls / "ground_truth" / "bad" / "001_mask.png")
    return root


def make_btad(root: Path) -> Path:
    for cls, ext, fmt in (("01", ".bmp", "BMP"), ("02", ".png", "PNG")):
        img(root / cls / "train" / "ok" / f"0000{ext}", fmt=fmt)
        img(root / cls / "test" / "ok" / f"0000{ext}", fmt=fmt)
        img(root / cls / "test" / "ko" / f"0001{ext}", fmt=fmt)
        img(root / cls / "test" / "ko" / f"0002{ext}", fmt=fmt)
        mask(root / cls / "ground_truth" / "ko" / "0001.png")
        mask(root / cls / "ground_truth" / "ko" / "0002.png")
    return root


def make_visa(root: Path) -> Path:
    rows = ["object,split,label,image,mask"]
    for obj in ("candle", "pcb1"):
        for i in range(3):
            rel = f"{obj}/Data/Images/Normal/{i:04d}.JPG"
            img(root / rel, fmt="JPEG")
            rows.append(f"{obj},{'train' if i < 2 else 'test'},normal,{rel},")
        for i in range(2):
            rel = f"{obj}/Data/Images/Anomaly/{i:03d}.JPG"
            mrel = f"{obj}/Data/Masks/Anomaly/{i:03d}.png"
            img(root / rel, fmt="JPEG")
            mask(root / mrel, value=1)  # VisA-style small label values
            rows.append(f"{obj},test,anomaly,{rel},{mrel}")
    (root / "split_csv").mkdir(parents=True)
    (root / "split_csv" / "1cls.csv").write_text("\n".join(rows) + "\n")
    (root / "candle" / "image_anno.csv").write_text(
        "image,label,mask\n"
        "candle/Data/Images/Anomaly/000.JPG,chunk of wax missing,candle/Data/Masks/Anomaly/000.png\n"
        "candle/Data/Images/Anomaly/001.JPG,\"weird candle wick,damaged corner\",candle/Data/Masks/Anomaly/001.png\n"
    )
    return root


def make_ksdd2(root: Path) -> Path:
    for split, n in (("train", 3), ("test", 4)):
        for i in range(n):
            img(root / split / f"{10000 + i}.png", mode="L")
            mask(root / split / f"{10000 + i}_GT.png", empty=(i % 2 == 0))
    return root


def make_rsdd(root: Path) -> Path:
    for sub, n in (("Type-I RSDDs dataset", 2), ("Type-II RSDDs dataset", 3)):
        for i in range(1, n + 1):
            img(root / sub / "Rail surface images" / f"rail_{i}.jpg", fmt="JPEG", mode="L")
            mask(root / sub / "GroundTruth" / f"rail_{i}.jpg", fmt="JPEG")
    return root


def make_dagm(root: Path, with_labels_txt=True) -> Path:
    for cls in ("Class1", "Class2", "Class10"):
        for split in ("Train", "Test"):
            d = root / cls / split
            lines = ["1"]
            for i in range(1, 5):
                name = f"{i:04d}.PNG"
                img(d / name, mode="L", fmt="PNG")
                if i % 2 == 0:
                    mask(d / "Label" / f"{i:04d}_label.PNG", fmt="PNG")
                    lines.append(f"{i}\t1\t{name}\t0\t{i:04d}_label.PNG")
                else:
                    lines.append(f"{i}\t0\t{name}\t0\t")
            if with_labels_txt:
                (d / "Label").mkdir(exist_ok=True)
                (d / "Label" / "Labels.txt").write_text("\n".join(lines) + "\n")
    return root


# --------------------------------------------------------------------------- readers
def _check_items(ds, expect_anomalous: int):
    """Decode every item: shapes, value ranges, masks binary and exactly the drawn rectangle."""
    n_anom = 0
    for i in range(len(ds)):
        s = ds[i]
        assert s.image.shape == (3, H, W) and s.image.dtype == torch.float32
        assert 0.0 <= float(s.image.min()) and float(s.image.max()) <= 1.0
        assert s.mask.shape == (H, W)
        assert set(torch.unique(s.mask).tolist()) <= {0.0, 1.0}
        if s.label:
            n_anom += 1
            assert s.defect != "good"
            assert int(s.mask.sum()) == RECT_AREA
            x0, y0, x1, y1 = RECT
            assert float(s.mask[y0:y1, x0:x1].min()) == 1.0
        else:
            assert s.defect == "good" and float(s.mask.sum()) == 0.0
    assert n_anom == expect_anomalous


def test_mvtec_reader(tmp_path):
    root = make_mvtec(tmp_path / "mvtec")
    test = open_dataset(f"mvtec:{root}", "test")
    assert test.classes == ["bottle", "cable"]
    assert len(test) == 2 * (1 + 2 * 2)
    assert test.counts()["bottle"] == {"normal": 1, "anomalous": 4, "good": 1, "broken": 2, "scratch": 2}
    _check_items(test, 8)
    s = next(test[i] for i in range(len(test)) if test[i].label == 0)
    assert torch.allclose(s.image[:, 0, 0], torch.tensor([10, 128, 250]) / 255.0)
    train = open_dataset(f"mvtec:{root}", "train", classes=["cable"])
    assert len(train) == 2 and train.classes == ["cable"] and train.labels.sum() == 0


def test_dtd_reader(tmp_path):
    ds = open_dataset(f"dtd:{make_dtd(tmp_path / 'dtd')}", "test")
    assert ds.classes == ["Blotchy_099", "Woven_001"] and len(ds) == 6
    assert {s.defect for s in (ds[i] for i in range(len(ds))) if s.label} == {"bad"}
    _check_items(ds, 4)


def test_btad_reader(tmp_path):
    root = make_btad(tmp_path / "btad")
    ds = open_dataset(f"btad:{root}", "test")
    assert ds.classes == ["01", "02"] and len(ds) == 6
    assert ds.counts()["01"] == {"normal": 1, "anomalous": 2, "good": 1, "ko": 2}
    _check_items(ds, 4)
    assert len(open_dataset(f"btad:{root}", "train")) == 2


def test_visa_reader(tmp_path):
    root = make_visa(tmp_path / "visa")
    test = open_dataset(f"visa:{root}", "test")
    assert test.classes == ["candle", "pcb1"]
    assert test.counts()["pcb1"] == {"normal": 1, "anomalous": 2, "good": 1, "anomaly": 2}
    # defect names from candle/image_anno.csv, made file-safe
    assert test.counts()["candle"]["chunk_of_wax_missing"] == 1
    assert test.counts()["candle"]["weird_candle_wick_damaged_corner"] == 1
    for i in range(len(test)):  # JPEG images, masks with value 1 count as anomalous pixels
        s = test[i]
        assert s.image.shape == (3, H, W)
        assert int(s.mask.sum()) == (RECT_AREA if s.label else 0)
    train = open_dataset(f"visa:{root}", "train")
    assert len(train) == 4 and train.labels.sum() == 0


def test_ksdd2_reader(tmp_path):
    root = make_ksdd2(tmp_path / "ksdd2")
    test = open_dataset(f"ksdd2:{root}", "test")
    # label from the GT mask: images 10001 and 10003 have a non-empty mask
    assert test.classes == ["ksdd2"] and len(test) == 4 and list(test.labels) == [0, 1, 0, 1]
    _check_items(test, 2)
    assert test[0].image.shape == (3, H, W)  # grayscale replicated to RGB
    assert torch.equal(test[0].image[0], test[0].image[2])
    train = open_dataset(f"ksdd2:{root}", "train")
    assert len(train) == 3 and int(train.labels.sum()) == 1


def test_rsdd_reader(tmp_path):
    root = make_rsdd(tmp_path / "rsdd")
    ds = open_dataset(f"rsdd:{root}", "test")
    assert ds.classes == ["rail_type_i", "rail_type_ii"] and len(ds) == 5
    assert int(ds.labels.sum()) == 5
    # JPEG masks: thresholded at 128 so compression ringing stays out
    _check_items(ds, 5)
    with pytest.raises(DatasetError, match="no 'train' split"):
        open_dataset(f"rsdd:{root}", "train")
    # a single subset folder works as ROOT too
    one = open_dataset(f"rsdd:{root / 'Type-II RSDDs dataset'}", "test")
    assert one.classes == ["rail_type_ii"] and len(one) == 3


@pytest.mark.parametrize("with_labels_txt", [True, False])
def test_dagm_reader(tmp_path, with_labels_txt):
    root = make_dagm(tmp_path / "dagm", with_labels_txt)
    ds = open_dataset(f"dagm:{root}", "test")
    assert ds.classes == ["Class1", "Class10", "Class2"] and len(ds) == 12
    assert ds.counts()["Class10"] == {"normal": 2, "anomalous": 2, "good": 2, "defect": 2}
    _check_items(ds, 6)
    assert len(open_dataset(f"dagm:{root}", "train", classes=["Class2"])) == 4


def test_image_size_and_dataloader(tmp_path):
    root = make_mvtec(tmp_path / "mvtec")
    ds = open_dataset(f"mvtec:{root}", "test", image_size=32)
    s = next(ds[i] for i in range(len(ds)) if ds[i].label)
    assert s.image.shape == (3, 32, 32) and s.mask.shape == (32, 32)
    # nearest resize of the 6x5 rectangle in a 20x16 image to 32x32: x 4..9 -> 7..15 (~9.6 px), y 3..7 -> 6..15
    assert set(torch.unique(s.mask).tolist()) == {0.0, 1.0}
    assert abs(float(s.mask.sum()) - RECT_AREA * (32 / W) * (32 / H)) <= 32
    assert s["image"] is s.image  # key access
    batch = next(iter(DataLoader(ds, batch_size=4, collate_fn=collate)))
    assert batch["image"].shape == (4, 3, 32, 32) and batch["mask"].shape == (4, 32, 32)
    assert batch["label"].dtype == torch.long and len(batch["path"]) == 4
    assert isinstance(batch["cls_name"][0], str)
    native = open_dataset(f"mvtec:{root}", "test").transform(24)
    assert native[0].image.shape == (3, 24, 24)


def test_max_per_class_keeps_both_labels(tmp_path):
    root = make_mvtec(tmp_path / "mvtec", defects=("a", "b", "c"))  # 1 good + 6 anomalous per class
    ds = open_dataset(f"mvtec:{root}", "test", max_per_class=3)
    assert len(ds) == 6
    for cls in ds.classes:
        labels = [r.label for r in ds.records if r.cls_name == cls]
        assert len(labels) == 3 and 0 in labels and 1 in labels
    again = open_dataset(f"mvtec:{root}", "test", max_per_class=3)
    assert [r.image_path for r in again.records] == [r.image_path for r in ds.records]


# --------------------------------------------------------------------------- the real tire images
@pytest.mark.skipif(not TIRE.is_dir(), reason=f"{TIRE} not present")
def test_mvtec_reader_on_real_tire_images():
    test = open_dataset(f"mvtec:{TIRE}", "test")
    assert test.classes == ["tire"]
    counts = test.counts()["tire"]
    assert counts == {
        "normal": 25, "anomalous": 87, "good": 25, "combined": 5, "contamination": 28, "cut": 27, "hole": 27,
    }
    assert len(open_dataset(f"mvtec:{TIRE}", "train")) == 60
    for i in range(len(test)):
        s = test[i]
        assert s.image.shape == (3, 400, 300)  # 300 x 400 (W x H) photographs
        assert s.mask.shape == (400, 300)
        assert bool(((s.mask == 0) | (s.mask == 1)).all())
        folder = Path(s.path).parent.name
        assert s.defect == folder and s.label == int(folder != "good")
        assert (float(s.mask.sum()) > 0) == bool(s.label)
    # at model resolution
    small = open_dataset(f"mvtec:{TIRE}", "test", image_size=112, max_per_class=8)
    batch = collate([small[i] for i in range(len(small))])
    assert batch["image"].shape == (8, 3, 112, 112) and 0 < int(batch["label"].sum()) < 8


# --------------------------------------------------------------------------- meta.json
def _as_tuples(ds):
    return sorted((r.image_path, r.mask_path, r.label, r.cls_name, r.defect) for r in ds.records)


def test_meta_round_trip(tmp_path):
    root = make_mvtec(tmp_path / "mvtec")
    out = write_meta(f"mvtec:{root}")
    assert out == (root / "meta.json").resolve()
    data = json.loads(out.read_text())
    entry = next(e for e in data["test"]["bottle"] if e["anomaly"] == 1)
    assert set(entry) == {"img_path", "mask_path", "cls_name", "specie_name", "anomaly"}
    assert entry["img_path"].startswith("bottle/test/") and entry["mask_path"].startswith("bottle/ground_truth/")
    good = next(e for e in data["test"]["bottle"] if e["anomaly"] == 0)
    assert good["mask_path"] == "" and good["specie_name"] == "good"
    for split in ("train", "test"):
        assert _as_tuples(open_dataset(f"meta:{root}", split)) == _as_tuples(open_dataset(f"mvtec:{root}", split))
    # written elsewhere: paths relative to the file's folder climb out of it ('../'), so
    # reading it back needs the explicit permission; then they resolve
    other = write_meta(f"mvtec:{root}", tmp_path / "elsewhere" / "bottle_meta.json", classes=["bottle"])
    with pytest.raises(DatasetError, match="outside the dataset root"):
        open_dataset(f"meta:{other}", "test")
    back = open_dataset(f"meta:{other}", "test", allow_outside_root=True)
    assert _as_tuples(back) == _as_tuples(open_dataset(f"mvtec:{root}", "test", classes=["bottle"]))
    _check_items(back, 4)


@pytest.mark.parametrize("how", ["absolute", "dotdot", "mask_dotdot"])
def test_meta_paths_outside_the_root_are_refused(tmp_path, how):
    """Issue 11: a meta.json naming files outside its folder (absolute or '../') is refused
    with an error naming the file and the entry, even with skip_bad_files; allowed only
    by the explicit flag / config key."""
    root = make_mvtec(tmp_path / "mvtec")
    secret = tmp_path / "outside" / "secret.png"
    secret.parent.mkdir()
    secret.write_bytes((root / "bottle" / "test" / "good" / "000.png").read_bytes())
    out = write_meta(f"mvtec:{root}")
    data = json.loads(out.read_text())
    entry = next(e for e in data["test"]["bottle"] if e["anomaly"] == 1)
    i = data["test"]["bottle"].index(entry)
    key = "mask_path" if how == "mask_dotdot" else "img_path"
    entry[key] = str(secret) if how == "absolute" else "../outside/secret.png"
    out.write_text(json.dumps(data))
    for skip in (False, True):
        with pytest.raises(DatasetError) as err:
            open_dataset(f"meta:{root}", "test", skip_bad_files=skip)
        msg = str(err.value)
        assert str(out) in msg and f"test/bottle[{i}]" in msg and key in msg and "outside the dataset root" in msg
    ds = open_dataset(f"meta:{root}", "test", allow_outside_root=True)
    assert str(secret) in {r.image_path for r in ds.records} | {r.mask_path for r in ds.records}
    # the config key reaches the reader through the zero-shot splits
    src = make_mvtec(tmp_path / "src")
    with pytest.raises(DatasetError, match="outside the dataset root"):
        zero_shot_splits(DataConfig(source=f"mvtec:{src}", targets=[f"meta:{root}"]))
    _, _, targets = zero_shot_splits(
        DataConfig(source=f"mvtec:{src}", targets=[f"meta:{root}"], allow_paths_outside_root=True)
    )
    assert str(secret) in {r.image_path for r in targets[f"meta:{root}"].records} | {
        r.mask_path for r in targets[f"meta:{root}"].records
    }


def test_meta_write_for_rsdd_has_empty_train(tmp_path):
    root = make_rsdd(tmp_path / "rsdd")
    data = json.loads(write_meta(f"rsdd:{root}").read_text())
    assert data["train"] == {} and sum(len(v) for v in data["test"].values()) == 5


def test_meta_reads_anomalyclip_style_file(tmp_path):
    root = tmp_path / "ds"
    img(root / "pcb" / "a.png")
    img(root / "pcb" / "b.png")
    mask(root / "pcb" / "b_mask.png")
    meta = {
        "test": {
            "pcb": [
                {"img_path": "pcb/a.png", "mask_path": "", "cls_name": "pcb", "specie_name": "good", "anomaly": 0},
                {"img_path": "pcb/b.png", "mask_path": "pcb/b_mask.png", "cls_name": "pcb", "specie_name": "bent", "anomaly": 1},
            ]
        }
    }
    (root / "meta.json").write_text(json.dumps(meta))
    ds = open_dataset(f"meta:{root}", "test")
    assert [(r.label, r.defect) for r in ds.records] == [(0, "good"), (1, "bent")]
    assert int(ds[1].mask.sum()) == RECT_AREA
    with pytest.raises(DatasetError, match="has no 'train' split"):
        open_dataset(f"meta:{root}", "train")


# --------------------------------------------------------------------------- errors
def test_unknown_format_lists_formats(tmp_path):
    with pytest.raises(DatasetError) as exc:
        open_dataset(f"kaggle:{tmp_path}")
    for fmt in FORMATS:
        assert fmt in str(exc.value)
    with pytest.raises(DatasetError, match="FORMAT:ROOT"):
        open_dataset(str(tmp_path))


def test_missing_root_names_it(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(DatasetError, match=f"{missing}.*does not exist"):
        open_dataset(f"mvtec:{missing}")


def test_unknown_class_lists_available(tmp_path):
    root = make_mvtec(tmp_path / "mvtec")
    with pytest.raises(DatasetError, match="unknown class.*'carpet'.*bottle, cable"):
        open_dataset(f"mvtec:{root}", classes=["carpet"])


def test_empty_category_names_folder(tmp_path):
    root = make_mvtec(tmp_path / "mvtec")
    (root / "carpet" / "test" / "good").mkdir(parents=True)
    with pytest.raises(DatasetError, match=f"'carpet' has no images under {root / 'carpet' / 'test'}"):
        open_dataset(f"mvtec:{root}", "test")
    with pytest.warns(UserWarning, match="carpet"):
        ds = open_dataset(f"mvtec:{root}", "test", skip_bad_files=True)
    assert ds.classes == ["bottle", "cable"]
    assert ds.skipped[0][0] == str(root / "carpet" / "test")


def test_corrupt_image_names_file_and_skip_mode(tmp_path):
    root = make_mvtec(tmp_path / "mvtec")
    bad = root / "bottle" / "test" / "broken" / "001.png"
    bad.write_bytes(b"this is not a png")
    ds = open_dataset(f"mvtec:{root}", "test")  # existence only at construction: lazy decoding
    idx = next(i for i, r in enumerate(ds.records) if r.image_path == str(bad))
    with pytest.raises(DatasetError, match=f"cannot read image {bad}"):
        ds[idx]
    with pytest.warns(UserWarning, match="001.png"):
        ds = open_dataset(f"mvtec:{root}", "test", skip_bad_files=True)
    assert len(ds) == 9 and ds.skipped[0][0] == str(bad) and "cannot read image" in ds.skipped[0][1]
    assert str(bad) not in {r.image_path for r in ds.records}


def test_truncated_image_skipped_during_iteration(tmp_path):
    root = make_mvtec(tmp_path / "mvtec")
    ds = open_dataset(f"mvtec:{root}", "test", skip_bad_files=True)
    victim = ds.records[0].image_path
    Path(victim).write_bytes(b"garbage after construction")
    with pytest.warns(UserWarning, match="skipping bad file"):
        s = ds[0]
    assert s.path == ds.records[1].image_path  # replaced by the next readable item
    assert len(ds.skipped) == 1 and ds.skipped[0][0] == victim
    assert ds.skipped[0][1].startswith(f"cannot read image {victim}")
    assert ds.verify() == ds.skipped


def test_missing_mask_names_files(tmp_path):
    root = make_mvtec(tmp_path / "mvtec")
    gone = root / "cable" / "ground_truth" / "scratch" / "000_mask.png"
    gone.unlink()
    image = root / "cable" / "test" / "scratch" / "000.png"
    with pytest.raises(DatasetError, match=f"mask missing for anomalous image {image}: expected {gone}"):
        open_dataset(f"mvtec:{root}", "test")
    with pytest.warns(UserWarning):
        ds = open_dataset(f"mvtec:{root}", "test", skip_bad_files=True)
    assert len(ds) == 9 and ds.skipped[0][0] == str(image)


def test_mask_of_other_size_names_both(tmp_path):
    root = make_mvtec(tmp_path / "mvtec")
    m = root / "bottle" / "ground_truth" / "broken" / "000_mask.png"
    mask(m, size=(W + 2, H))
    ds = open_dataset(f"mvtec:{root}", "test", image_size=16)
    idx = next(i for i, r in enumerate(ds.records) if r.mask_path == str(m))
    with pytest.raises(DatasetError, match=f"mask {m} is {W + 2}x{H}.*image .*000.png is {W}x{H}"):
        ds[idx]
    with pytest.warns(UserWarning):
        ds = open_dataset(f"mvtec:{root}", "test", skip_bad_files=True)
    assert ds.skipped[0][0] == str(m) and len(ds) == 9


def test_meta_entry_pointing_nowhere(tmp_path):
    root = make_mvtec(tmp_path / "mvtec")
    out = write_meta(f"mvtec:{root}")
    data = json.loads(out.read_text())
    data["test"]["bottle"][0]["img_path"] = "bottle/test/good/999.png"
    data["test"]["cable"][1]["mask_path"] = "cable/ground_truth/broken/nowhere_mask.png"
    out.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match=r"bottle\[0\]: img_path points nowhere: .*999.png"):
        open_dataset(f"meta:{root}", "test")
    with pytest.warns(UserWarning):
        ds = open_dataset(f"meta:{root}", "test", skip_bad_files=True)
    assert len(ds) == 8
    assert {Path(p).name for p, _ in ds.skipped} == {"999.png", "nowhere_mask.png"}


def test_visa_missing_split_csv(tmp_path):
    with pytest.raises(DatasetError, match=r"split_csv/1cls.csv does not exist"):
        open_dataset(f"visa:{tmp_path}")


def test_synthetic_parent_folder_hint(tmp_path):
    make_synthetic(tmp_path / "syn", seed=1, size=32, n_train=1, n_test=2)
    with pytest.raises(DatasetError, match="name one, e.g. synthetic:"):
        open_dataset(f"synthetic:{tmp_path / 'syn'}")


# --------------------------------------------------------------------------- zero-shot splits
@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    make_synthetic(out, seed=3, size=32, n_train=1, n_test=6)
    return out


def test_zero_shot_splits_hold_out_classes(synth):
    cfg = DataConfig(source=f"synthetic:{synth / 'domain_a'}", targets=[f"synthetic:{synth / 'domain_b'}"])
    train, val, targets = zero_shot_splits(cfg, image_size=32)
    # 5 sorted classes, val_fraction 0.25 -> ceil(1.25) = 2 held out: the last two
    assert val.classes == ["tile", "wood"]
    assert train.classes == ["bottle_cap", "fabric", "pill"]
    assert not set(train.classes) & set(val.classes)
    assert not {r.image_path for r in train.records} & {r.image_path for r in val.records}
    assert len(train) == 3 * 6 and len(val) == 2 * 6  # the mask-bearing test split
    assert int(train.labels.sum()) == 3 * 4
    assert list(targets) == cfg.targets
    assert targets[cfg.targets[0]].classes == ["leather", "mesh", "metal_plate", "screw", "washer"]
    assert train[0].image.shape == (3, 32, 32)

    cfg2 = DataConfig(source=cfg.source, targets=cfg.targets, val_classes=["pill"], max_per_class=4)
    train2, val2, targets2 = zero_shot_splits(cfg2, image_size=32)
    assert val2.classes == ["pill"] and "pill" not in train2.classes and len(train2) == 4 * 4
    assert all(len(v) == 5 * 4 for v in targets2.values())
    with pytest.raises(DatasetError, match="not source classes"):
        zero_shot_splits(DataConfig(source=cfg.source, targets=[], val_classes=["screw"]))


def test_zero_shot_refuses_training_on_target(synth):
    src = f"synthetic:{synth / 'domain_a'}"
    with pytest.raises(DatasetError, match="refusing to train on target"):
        zero_shot_splits(DataConfig(source=src, targets=[f"mvtec:{synth / 'domain_a'}"]))
    # the same images through a meta.json (another root string) are caught too
    with pytest.raises(DatasetError, match="refusing to train on target"):
        zero_shot_splits(DataConfig(source=src, targets=[f"meta:{synth / 'domain_a' / 'meta.json'}"]))
    train, val, targets = zero_shot_splits(
        DataConfig(source=src, targets=[f"mvtec:{synth / 'domain_a'}"], force_target_training=True)
    )
    assert len(train) > 0 and len(targets) == 1


def test_pick_val_classes_edge_cases():
    from ssvp.data import pick_val_classes

    assert pick_val_classes(["a"], [], 0.25) == []  # one class: nothing to hold out
    assert pick_val_classes(["b", "a"], [], 0.25) == ["b"]  # at least one of two
    assert pick_val_classes(list("abcdefghij"), [], 0.25) == ["h", "i", "j"]  # ceil(2.5) = 3
    assert pick_val_classes(list("abcd"), [], 0.0) == []
    assert pick_val_classes(list("abcd"), [], 0.99) == ["b", "c", "d"]  # one class always left to train
    with pytest.raises(DatasetError, match="nothing is left to train on"):
        pick_val_classes(["a", "b"], ["a", "b"], 0.25)


def test_single_category_root(tmp_path):
    root = make_mvtec(tmp_path / "mvtec")
    ds = open_dataset(f"mvtec:{root / 'bottle'}", "test")
    assert ds.classes == ["bottle"] and len(ds) == 5


# --------------------------------------------------------------------------- issue 25: one rule for every reader
def test_visa_csv_paths_that_leave_the_root_are_refused(tmp_path):
    """VisA's ``split_csv/1cls.csv`` paths were joined unchecked: ``../..`` images and ``/etc/hostname`` as a
    mask were read. Now refused naming the csv line and the column, unless allowed explicitly."""
    root = make_visa(tmp_path / "visa")
    outside = tmp_path / "outside.png"
    img(outside)
    csv_file = root / "split_csv" / "1cls.csv"
    rows = csv_file.read_text().splitlines()
    for column, row in (("image", "candle,test,normal,../outside.png,"),
                        ("mask", f"candle,test,anomaly,candle/Data/Images/Anomaly/000.JPG,{outside}")):
        csv_file.write_text("\n".join(rows + [row]) + "\n")
        for skip in (False, True):
            with pytest.raises(DatasetError) as err:
                open_dataset(f"visa:{root}", "test", skip_bad_files=skip)
            msg = str(err.value)
            assert f"{csv_file} line {len(rows) + 1}: {column}" in msg and "outside the dataset root" in msg, msg
        ds = open_dataset(f"visa:{root}", "test", allow_outside_root=True)
        assert str(outside) in {r.image_path for r in ds.records} | {r.mask_path for r in ds.records}


@pytest.mark.parametrize("fmt", ["meta", "mvtec"])
def test_symlinks_leading_out_of_the_root_are_refused(tmp_path, fmt):
    """The meta.json check was lexical (a symlink inside the root was followed) and the folder readers had
    none: real paths are compared now, for every format."""
    root = make_mvtec(tmp_path / "mvtec")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    img(outside / "secret.png")
    link = root / "bottle" / "test" / "good" / "zz_link.png"
    if fmt == "meta":
        write_meta(f"mvtec:{root}")
    os.symlink(outside / "secret.png", link)
    if fmt == "meta":
        meta = root / "meta.json"
        data = json.loads(meta.read_text())
        data["test"]["bottle"].append({"img_path": "bottle/test/good/zz_link.png", "mask_path": "",
                                       "cls_name": "bottle", "specie_name": "good", "anomaly": 0})
        meta.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match=r"zz_link\.png.* resolves to .*elsewhere/secret\.png, outside the "
                                           r"dataset root .* \(a symlink\)"):
        open_dataset(f"{fmt}:{root}", "test")
    ds = open_dataset(f"{fmt}:{root}", "test", allow_outside_root=True)
    assert str(link) in {r.image_path for r in ds.records}
    inner = root / "bottle" / "test" / "good" / "zz_inner.png"  # a symlink that stays inside is fine
    link.unlink()
    os.symlink(root / "bottle" / "test" / "good" / "000.png", inner)
    if fmt == "meta":
        data["test"]["bottle"][-1]["img_path"] = "bottle/test/good/zz_inner.png"
        meta.write_text(json.dumps(data))
    assert str(inner) in {r.image_path for r in open_dataset(f"{fmt}:{root}", "test").records}


def test_meta_infinite_anomaly_names_file_entry_and_key(tmp_path):
    root = make_mvtec(tmp_path / "mvtec")
    meta = write_meta(f"mvtec:{root}")
    text = meta.read_text()
    data = json.loads(text)
    data["test"]["bottle"][1]["anomaly"] = "@INF@"
    meta.write_text(json.dumps(data).replace('"@INF@"', "Infinity"))
    with pytest.raises(DatasetError, match=rf"meta file {meta}, test/bottle\[1\]: 'anomaly' must be 0 or 1, got inf"):
        open_dataset(f"meta:{root}", "test")
