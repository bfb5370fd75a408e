"""The synthetic two-domain benchmark: determinism, exact masks, layout readable by the MVTec reader."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ssvp.data import CATEGORIES, DOMAINS, make_synthetic, open_dataset, render_item

KW = dict(size=48, n_train=2, n_test=5)  # 2 good + 3 defective test images per class


def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("syn0")
    summary = make_synthetic(out, seed=0, **KW)
    return out, summary


def test_deterministic_by_seed(bench, tmp_path):
    out, _ = bench
    again = tmp_path / "again"
    make_synthetic(again, seed=0, **KW)
    first, second = _digest(out), _digest(again)
    assert first.keys() == second.keys()
    # README.txt names the output folder; every image, mask and meta.json is byte-identical
    assert {k: v for k, v in first.items() if k != "README.txt"} == {
        k: v for k, v in second.items() if k != "README.txt"
    }
    other = tmp_path / "seed1"
    make_synthetic(other, seed=1, **KW)
    third = _digest(other)
    pngs = [k for k in first if k.endswith(".png")]
    assert sum(first[k] != third[k] for k in pngs) == len(pngs)  # every image differs with the seed


def test_layout_counts_and_summary(bench):
    out, summary = bench
    assert set(summary["domains"]) == {"domain_a", "domain_b"}
    cats_a, cats_b = set(DOMAINS["domain_a"].categories), set(DOMAINS["domain_b"].categories)
    assert len(cats_a) >= 5 and len(cats_b) >= 5 and not cats_a & cats_b  # disjoint category sets
    for dname, dom in DOMAINS.items():
        for cname in dom.categories:
            c = out / dname / cname
            assert len(list((c / "train" / "good").glob("*.png"))) == 2
            assert len(list((c / "test" / "good").glob("*.png"))) == 2
            n_bad = sum(len(list((c / "test" / d).glob("*.png"))) for d in CATEGORIES[cname].defects)
            n_masks = sum(len(list((c / "ground_truth" / d).glob("*_mask.png"))) for d in CATEGORIES[cname].defects)
            assert n_bad == n_masks == 3
            assert summary["domains"][dname][cname]["test_good"] == 2
    assert "domain_b" in summary["text"] and "washer" in summary["text"]
    assert (out / "domain_a" / "meta.json").is_file()


@pytest.mark.parametrize("domain", list(DOMAINS))
def test_mvtec_reader_reads_it(bench, domain):
    out, _ = bench
    for fmt in ("synthetic", "mvtec", "meta"):
        ds = open_dataset(f"{fmt}:{out / domain}", "test")
        assert ds.classes == sorted(DOMAINS[domain].categories)
        assert len(ds) == 5 * 5 and int(ds.labels.sum()) == 5 * 3
    ds = open_dataset(f"synthetic:{out / domain}", "test")
    for i in range(len(ds)):
        s = ds[i]
        assert s.image.shape == (3, 48, 48) and s.mask.shape == (48, 48)
        # masks are non-empty exactly for the anomalous images
        assert (float(s.mask.sum()) > 0) == bool(s.label) == (s.defect != "good")
    assert len(open_dataset(f"synthetic:{out / domain}", "train")) == 5 * 2


def test_saved_files_are_render_item_outputs(bench):
    """The saved test image i of a class is render_item with the generator seeded (seed, d, c, 1, i)."""
    out, _ = bench
    cat = CATEGORIES["pill"]
    plan = [None, None] + [cat.defects[i % 3] for i in range(3)]
    per_folder: dict[str, int] = {}
    for i, defect in enumerate(plan):
        rng = np.random.default_rng([0, 0, DOMAINS["domain_a"].categories.index("pill"), 1, i])
        _, image, mask = render_item("domain_a", "pill", defect, rng, 48)
        folder = defect or "good"
        j = per_folder.get(folder, 0)
        per_folder[folder] = j + 1
        saved = np.asarray(Image.open(out / "domain_a" / "pill" / "test" / folder / f"{j:03d}.png"))
        assert np.array_equal(saved, image)
        if defect:
            saved_mask = np.asarray(Image.open(out / "domain_a" / "pill" / "ground_truth" / folder / f"{j:03d}_mask.png"))
            assert np.array_equal(saved_mask > 0, mask)


@pytest.mark.parametrize("category", list(CATEGORIES))
def test_masks_lie_where_the_image_changed(category):
    domain = next(d for d, dom in DOMAINS.items() if category in dom.categories)
    for defect in CATEGORIES[category].defects:
        for rep in range(2):
            rng = np.random.default_rng([7, rep, len(defect)])
            clean, image, mask = render_item(domain, category, defect, rng, 64)
            changed = np.any(clean != image, axis=-1)
            assert mask.any()
            assert not (changed & ~mask).any(), f"{category}/{defect}: pixels changed outside the mask"
            frac = changed[mask].mean()
            assert frac >= 0.9, f"{category}/{defect}: only {frac:.2f} of the mask changed"
            # visible: the mean absolute change inside the mask is at least 12 grey levels
            delta = np.abs(image.astype(int) - clean.astype(int)).max(-1)[mask].mean()
            assert delta >= 12, f"{category}/{defect}: mean change {delta:.1f} is too faint"
        rng = np.random.default_rng([7, 0])
        clean, image, mask = render_item(domain, category, None, rng, 64)
        assert np.array_equal(clean, image) and not mask.any()


def test_domains_look_different():
    """Mean colours of the two domains differ (warm vs cool light and palettes)."""
    means = {}
    for dname, dom in DOMAINS.items():
        imgs = [
            render_item(dname, c, None, np.random.default_rng([1, i]), 48)[1].reshape(-1, 3).mean(0)
            for i, c in enumerate(dom.categories)
        ]
        means[dname] = np.mean(imgs, axis=0)
    warm, cool = means["domain_a"], means["domain_b"]
    assert warm[0] - warm[2] > 0.15 * 255  # red over blue
    assert cool[2] - cool[0] > 0.03 * 255  # blue over red


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="size"):
        make_synthetic(tmp_path, size=8)
    with pytest.raises(ValueError, match="unknown synthetic domain"):
        make_synthetic(tmp_path, domains=("domain_z",))
