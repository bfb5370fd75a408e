"""Benchmark: sweep cost with the frozen-feature cache vs from images (same config, same run).

Default (tiny preset, CPU): a synthetic two-domain benchmark, then three trials of
``ssvp.engine.fit`` with the same config:

  A  from images            (backbones run every step and every validation pass)
  B  cache, first trial     (epoch 1 computes and stores features, later epochs read them)
  C  cache, second trial    (another gamma; every feature read from the cache)

and prints per-epoch and per-trial wall time (train + validation), the per-epoch ratio
images / cached, and a per-image breakdown of one training step (decode, backbone forward,
cache read, head step) that explains the ratio: the cache removes the backbone forward and
the image decode (the path index knows unchanged files), not the head, so the ratio is
bounded by (decode + backbone + head) / (mask read + cache read + head).

``--full``: full-size random-weight backbones (CLIP ViT-L/14 @ 518 px and DINOv3 ViT-L/16
@ 592 px stopped after block 11, grid 37, the paper's heads) on a few random images;
reports per-image figures of the same breakdown (a full trial on a CPU would take hours).

    .venv/bin/python bench/bench_sweep.py                       # tiny, ~1-2 min on 2 cores
    .venv/bin/python bench/bench_sweep.py --full --images 2     # ViT-L, a few minutes
    .venv/bin/python bench/bench_sweep.py --json out.json       # also write the figures
    .venv/bin/python bench/bench_sweep.py --flops --images 1    # FLOPs: backbones vs head, tiny and full

Prints figures; asserts nothing about time (the test of equality is
tests/test_feature_training.py).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402


class VisionForwards:
    """Counts forward calls of the frozen vision backbones through a global forward hook."""

    def __init__(self):
        from ssvp.backbones import Backbones

        self.kind = Backbones
        self.calls = 0
        self.handle = torch.nn.modules.module.register_module_forward_hook(self._hook)

    def _hook(self, module, args, output):
        if isinstance(module, self.kind):
            self.calls += 1

    def close(self):
        self.handle.remove()


_CPU_BEST: dict[int, float] = {}


def _best(fn, repeats: int) -> float:
    """Best-of-``repeats`` wall time of ``fn()`` after one warm-up call (the best process CPU
    time of the same calls is kept in ``_CPU_BEST[id(fn)]``: steadier on a loaded machine)."""
    fn()
    times, cpu = [], []
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        fn()
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    _CPU_BEST[id(fn)] = min(cpu)
    return min(times)


def _best_both(fn, repeats: int) -> tuple[float, float]:
    """(best wall, best process CPU) seconds of ``fn()``."""
    wall = _best(fn, repeats)
    return wall, _CPU_BEST.pop(id(fn))


def _once(fn) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call."""
    w, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w, time.process_time() - c


def _timed_fit(cfg):
    """Run ``fit``; per-epoch wall times from the epoch callback, and the total."""
    from ssvp.engine import fit

    marks = [(time.perf_counter(), time.process_time())]
    counter = VisionForwards()
    try:
        result = fit(cfg, on_epoch=lambda e, m, p: marks.append((time.perf_counter(), time.process_time())))
    finally:
        counter.close()
    return {
        "total_s": marks[-1][0] - marks[0][0],
        "epoch_s": [b[0] - a[0] for a, b in zip(marks, marks[1:])],
        "total_cpu_s": marks[-1][1] - marks[0][1],
        "epoch_cpu_s": [b[1] - a[1] for a, b in zip(marks, marks[1:])],
        "backbone_calls": counter.calls,
        "val_objective": [h.get("val_objective") for h in result.history],
        "train_loss": [h["train_loss"] for h in result.history],
    }


def _head_step_fn(model, feats, batch, cfg, size):
    """One optimizer step of the heads on given features (what a cached step costs)."""
    from ssvp.engine import make_optimizer
    from ssvp.losses import total_loss

    opt = make_optimizer(cfg, model)
    model.head.train()

    def step():
        out = model.head(feats, list(batch["cls_name"]), size)
        loss, _ = total_loss(out, batch["mask"], batch["label"], cfg.model)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def _head_eval_fn(model, feats, batch, size):
    """One no-grad head forward (what a validation batch costs on cached features)."""

    def run():
        model.head.eval()
        with torch.no_grad():
            model.head(feats, list(batch["cls_name"]), size)
        model.head.train()

    return run


def breakdown(cfg, model, ds, batch_size: int, cache_dir: Path, repeats: int) -> dict:
    """Per-image seconds of one training step's parts, through the engine's own feature path:
    decode (full item), item of a cached image (mask and labels only, image not decoded),
    backbone forward, cache read (by the keys the path index gives), head train step."""
    from ssvp.data import collate
    from ssvp.engine import FeatureSource, _collate_keyed

    batch = collate([ds[i % len(ds)] for i in range(batch_size)])
    images = batch["image"]
    size = images.shape[-1]
    source = FeatureSource(cfg.override({"feature_cache": str(cache_dir)}), model, torch.device("cpu"))
    wrapped = source.dataset(ds)
    idx = [i % len(ds) for i in range(batch_size)]
    source.batch(_collate_keyed([wrapped[i] for i in idx]))  # decode, hash, store, index
    light = _collate_keyed([wrapped[i] for i in idx])
    assert light["image"] is None, "the second read of a cached item must not decode its image"
    feats = model.backbones(images)
    fns = {
        "decode": lambda: [ds[i] for i in idx],
        "cached_item": lambda: [wrapped[i] for i in idx],
        "backbone": lambda: model.backbones(images),
        "cache_read": lambda: source.batch(light),
        "content_hash": lambda: [source.cache.key_for(im) for im in images],
        "head_step": _head_step_fn(model, feats, batch, cfg, size),
        "head_eval": _head_eval_fn(model, feats, batch, size),
    }
    out, cpu = {}, {}
    for name, fn in fns.items():
        out[name], cpu[name] = _best_both(fn, repeats)
    per_image = {k: v / batch_size for k, v in out.items()}
    per_image["cpu"] = {k: v / batch_size for k, v in cpu.items()}
    from_images = per_image["decode"] + per_image["backbone"] + per_image["head_step"]
    cached = per_image["cached_item"] + per_image["cache_read"] + per_image["head_step"]
    per_image["step_from_images"] = from_images
    per_image["step_cached"] = cached
    per_image["ratio_step"] = from_images / cached
    per_image["ratio_features"] = (per_image["decode"] + per_image["backbone"]) / (per_image["cached_item"] + per_image["cache_read"])
    per_image["head_share_of_image_step"] = per_image["head_step"] / from_images
    c = per_image["cpu"]
    c["step_from_images"] = c["decode"] + c["backbone"] + c["head_step"]
    c["step_cached"] = c["cached_item"] + c["cache_read"] + c["head_step"]
    c["ratio_step"] = c["step_from_images"] / c["step_cached"]
    per_image["feature_bytes"] = int(source.cache.path_for(light["feature_key"][0]).stat().st_size)
    return per_image


def run_tiny(args) -> dict:
    from ssvp.config import Config
    from ssvp.data import make_synthetic, zero_shot_splits
    from ssvp.engine import build_model

    work = Path(tempfile.mkdtemp(prefix="bench_sweep_"))
    try:
        if args.data:
            root = Path(args.data)
        else:
            root = work / "data"
            make_synthetic(root, seed=0, size=args.image_px, n_train=1, n_test=args.max_per_class)
        cfg = Config.tiny(
            source=f"synthetic:{root}/domain_a",
            targets=[f"synthetic:{root}/domain_b"],
            epochs=args.epochs,
            max_per_class=args.max_per_class,
            batch_size=args.batch_size,
            eval_batch_size=args.batch_size,
            device="cpu",
            progress=False,
        )
        os.environ["SSVP_FEATURE_CACHE_DTYPE"] = args.dtype
        train_ds, val_ds, _ = zero_shot_splits(cfg.data, 14 * cfg.model.grid)
        model = build_model(cfg, torch.device("cpu"))  # also pays the one-off imports outside the timings
        cache = work / "cache"
        res: dict = {"train_images": len(train_ds), "val_images": len(val_ds)}
        res["A_images"] = _timed_fit(cfg)
        res["B_cache_first"] = _timed_fit(cfg.override({"feature_cache": str(cache)}))
        res["C_cache_second"] = _timed_fit(cfg.override({"feature_cache": str(cache), "gamma": 0.2}))
        # steady state: epochs 2..n (epoch 1 also holds fit's setup: model build, datasets, cache spec)
        steady = slice(1, None) if args.epochs > 1 else slice(0, None)
        img_epoch = float(np.mean(res["A_images"]["epoch_s"][steady]))
        warm = res["C_cache_second"]["epoch_s"][steady] + res["B_cache_first"]["epoch_s"][steady]
        cached_epoch = float(np.mean(warm))
        res["epoch_images_s"] = img_epoch
        res["epoch_cached_s"] = cached_epoch
        res["ratio_epoch"] = img_epoch / cached_epoch
        res["ratio_trial"] = res["A_images"]["total_s"] / res["C_cache_second"]["total_s"]
        # process CPU time: the steadier figure on a shared machine (equal to wall time when idle, 1 thread)
        img_cpu = float(np.mean(res["A_images"]["epoch_cpu_s"][steady]))
        cached_cpu = float(np.mean(res["C_cache_second"]["epoch_cpu_s"][steady] + res["B_cache_first"]["epoch_cpu_s"][steady]))
        res["epoch_images_cpu_s"], res["epoch_cached_cpu_s"] = img_cpu, cached_cpu
        res["ratio_epoch_cpu"] = img_cpu / cached_cpu
        res["ratio_trial_cpu"] = res["A_images"]["total_cpu_s"] / res["C_cache_second"]["total_cpu_s"]
        res["breakdown_per_image_s"] = breakdown(cfg, model, train_ds, args.batch_size, work / "cache_b", args.repeats)
        return res
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run_full(args) -> dict:
    """Full-size backbones, random weights, a few random images: per-image figures."""
    from ssvp.config import Config
    from ssvp.engine import build_model
    from ssvp.features import FeatureCache

    cfg = Config.from_dict({"clip_pretrained": "", "dino_weights": "", "device": "cpu", "batch_size": args.batch_size})
    t = time.perf_counter()
    model = build_model(cfg, torch.device("cpu"))
    build_s = time.perf_counter() - t
    size = 14 * cfg.model.grid
    gen = torch.Generator().manual_seed(0)
    n = args.images
    images = torch.rand(n, 3, size, size, generator=gen)
    masks = (torch.rand(n, size, size, generator=gen) > 0.97).float()
    labels = torch.tensor([i % 2 for i in range(n)])
    batch = {"image": images, "mask": masks, "label": labels, "cls_name": ["bottle"] * n}
    work = Path(tempfile.mkdtemp(prefix="bench_sweep_full_"))
    try:
        cache = FeatureCache(work, model.backbones, cfg.model, dtype=args.dtype)
        keys = [cache.key_for(im) for im in images]
        miss_s, miss_cpu = _once(lambda: cache.get_batch(images, keys))  # misses: forward + store (warms up too)
        feats = model.backbones(images[:1])  # noqa: F841 - (keeps the allocator warm)
        bb_s, bb_cpu = _once(lambda: model.backbones(images))
        read_s = _best(lambda: cache.get_batch(images, keys), args.repeats)
        step = _head_step_fn(model, cache.get_batch(images, keys), batch, cfg, size)
        step()  # warm-up
        head_s, head_cpu = _once(step)
        per = {
            "build_models_s": build_s,
            "backbone": bb_s / n,
            "backbone_cpu": bb_cpu / n,
            "cache_first_pass": miss_s / n,
            "cache_read": read_s / n,
            "head_step": head_s / n,
            "head_step_cpu": head_cpu / n,
        }
        per["step_from_images"] = per["backbone"] + per["head_step"]
        per["step_cached"] = per["cache_read"] + per["head_step"]
        per["ratio_step"] = per["step_from_images"] / per["step_cached"]
        per["ratio_features"] = per["backbone"] / per["cache_read"]
        per["head_share_of_image_step"] = per["head_step"] / per["step_from_images"]
        # CPU-time ratio: steadier than wall time on a shared machine (cache reads are I/O, ~no CPU)
        per["ratio_step_cpu"] = (per["backbone_cpu"] + per["head_step_cpu"]) / (per["cache_read"] + per["head_step_cpu"])
        per["feature_bytes"] = int(cache.path_for(keys[0]).stat().st_size)
        return {"images": n, "batch": n, "per_image_s": per}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _flops(fn) -> int:
    """Matmul / attention / conv FLOPs of one call (``torch.utils.flop_counter``)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def run_flops(args) -> dict:
    """FLOPs per image of the backbone forward, a head train step (forward + backward) and a
    no-grad head forward, tiny and full size: the compute bound of the cache's speedup,
    independent of the machine and its load."""
    from ssvp.config import Config
    from ssvp.engine import build_model

    presets = {
        "tiny": Config.tiny(device="cpu"),
        "full": Config.from_dict({"clip_pretrained": "", "dino_weights": "", "device": "cpu"}),
    }
    out = {}
    for name, cfg in presets.items():
        torch.manual_seed(0)
        model = build_model(cfg, torch.device("cpu"))
        size = 14 * cfg.model.grid
        n = args.images
        images = torch.rand(n, 3, size, size)
        batch = {"image": images, "mask": (torch.rand(n, size, size) > 0.97).float(),
                 "label": torch.tensor([i % 2 for i in range(n)]), "cls_name": ["bottle"] * n}
        with torch.no_grad():
            backbone = _flops(lambda: model.backbones(images))
            feats = model.backbones(images)
        head_train = _flops(_head_step_fn(model, feats, batch, cfg, size))
        head_eval = _flops(_head_eval_fn(model, feats, batch, size))
        r = {"backbone": backbone / n, "head_train_step": head_train / n, "head_eval": head_eval / n}
        r["bound_train_step"] = (r["backbone"] + r["head_train_step"]) / r["head_train_step"]
        r["bound_eval"] = (r["backbone"] + r["head_eval"]) / r["head_eval"]
        t, v = args.flops_train, args.flops_val  # images per epoch
        r["bound_epoch"] = ((t + v) * r["backbone"] + t * r["head_train_step"] + v * r["head_eval"]) / (
            t * r["head_train_step"] + v * r["head_eval"])
        out[name] = r
        del model, feats
    return {"flops_per_image": out, "epoch_images": [args.flops_train, args.flops_val]}


def _ms(x: float) -> str:
    return f"{x * 1e3:9.2f} ms"


def report(res: dict, args) -> str:
    lines = [
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, "
        f"torch {torch.__version__}, cache dtype {args.dtype}"
    ]
    if args.flops:
        t, v = res["epoch_images"]
        lines.append(f"FLOPs per image (matmul, attention, conv; torch.utils.flop_counter), batch {args.images}; "
                     f"an epoch = {t} train + {v} val images")
        lines.append(f"  {'preset':6s} {'backbone fwd':>14s} {'head train step':>16s} {'head eval':>12s}   "
                     f"bound images/cached: train step, eval, epoch")
        for name, r in res["flops_per_image"].items():
            lines.append(f"  {name:6s} {r['backbone'] / 1e9:11.2f} GF {r['head_train_step'] / 1e9:13.2f} GF "
                         f"{r['head_eval'] / 1e9:9.2f} GF   {r['bound_train_step']:.2f} x, {r['bound_eval']:.2f} x, "
                         f"{r['bound_epoch']:.2f} x")
        return "\n".join(lines)
    if args.full:
        p = res["per_image_s"]
        lines += [
            f"full size (CLIP ViT-L/14 @518 + DINOv3 ViT-L/16 @592 to block 11, grid 37), {res['images']} random images, "
            f"batch {res['batch']}; models built in {p['build_models_s']:.1f} s",
            "per image:",
            f"  backbone forward        {_ms(p['backbone'])}   (CPU time {_ms(p['backbone_cpu'])})",
            f"  cache first pass        {_ms(p['cache_first_pass'])}   (forward + store)",
            f"  cache read (hit)        {_ms(p['cache_read'])}   ({p['feature_bytes'] / 2**20:.1f} MiB per image on disk)",
            f"  head train step         {_ms(p['head_step'])}   (CPU time {_ms(p['head_step_cpu'])})",
            f"  step from images        {_ms(p['step_from_images'])}",
            f"  step from cache         {_ms(p['step_cached'])}",
            f"  ratio step              {p['ratio_step']:9.1f} x   (features alone: {p['ratio_features']:.0f} x; "
            f"from CPU times: {p['ratio_step_cpu']:.1f} x)",
        ]
        return "\n".join(lines)
    a, b, c = res["A_images"], res["B_cache_first"], res["C_cache_second"]
    fmt = lambda xs: ", ".join(f"{x:.2f}" for x in xs)  # noqa: E731
    lines += [
        f"tiny preset, {res['train_images']} train + {res['val_images']} val images per epoch, {args.epochs} epochs, batch {args.batch_size}",
        f"  A from images        trial {a['total_s']:7.2f} s   epochs [{fmt(a['epoch_s'])}] s   backbone calls {a['backbone_calls']}",
        f"  B cache, 1st trial   trial {b['total_s']:7.2f} s   epochs [{fmt(b['epoch_s'])}] s   backbone calls {b['backbone_calls']}",
        f"  C cache, 2nd trial   trial {c['total_s']:7.2f} s   epochs [{fmt(c['epoch_s'])}] s   backbone calls {c['backbone_calls']}",
        f"  per epoch (train + validation, epochs 2..n): images {res['epoch_images_s']:.3f} s, cached {res['epoch_cached_s']:.3f} s -> {res['ratio_epoch']:.2f} x; "
        f"per trial (A vs C): {res['ratio_trial']:.2f} x",
        f"  same in process CPU time: epoch images {res['epoch_images_cpu_s']:.3f} s, cached {res['epoch_cached_cpu_s']:.3f} s "
        f"-> {res['ratio_epoch_cpu']:.2f} x; per trial {res['ratio_trial_cpu']:.2f} x "
        f"(trial CPU s: A {a['total_cpu_s']:.2f}, B {b['total_cpu_s']:.2f}, C {c['total_cpu_s']:.2f})",
    ]
    p = res["breakdown_per_image_s"]
    c = p["cpu"]
    lines += [
        "  one training step, per image (best wall; best process CPU time in brackets):",
        f"    decode item (PNG+resize, mask)   {_ms(p['decode'])}   [{_ms(c['decode'])}]",
        f"    cached item (mask only)          {_ms(p['cached_item'])}   [{_ms(c['cached_item'])}]",
        f"    backbone forward                 {_ms(p['backbone'])}   [{_ms(c['backbone'])}]",
        f"    cache read (hit, known key)      {_ms(p['cache_read'])}   [{_ms(c['cache_read'])}]   ({p['feature_bytes'] / 1024:.0f} KiB per image; a content hash costs {_ms(p['content_hash'])})",
        f"    head train step                  {_ms(p['head_step'])}   [{_ms(c['head_step'])}]   ({100 * p['head_share_of_image_step']:.0f} % of the step from images)",
        f"    head forward, no grad (eval)     {_ms(p['head_eval'])}   [{_ms(c['head_eval'])}]",
        f"    step images / cached             {p['ratio_step']:.2f} x   [CPU {c['ratio_step']:.2f} x]   (features alone, item + backbone vs item + read: {p['ratio_features']:.1f} x)",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--full", action="store_true", help="full-size ViT-L random-weight backbones, per-image figures")
    ap.add_argument("--images", type=int, default=2, help="--full / --flops: number of random images (one batch)")
    ap.add_argument("--flops", action="store_true",
                    help="count FLOPs per image of backbones vs head (tiny and full size): the compute bound of the ratio")
    ap.add_argument("--flops-train", type=int, default=36, help="--flops: train images per epoch")
    ap.add_argument("--flops-val", type=int, default=24, help="--flops: validation images per epoch")
    ap.add_argument("--data", default="", help="tiny: synthetic benchmark root (default: generate one in a temp dir)")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--max-per-class", type=int, default=12)
    ap.add_argument("--image-px", type=int, default=128, help="tiny: synthetic image size on disk")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dtype", default="float16", choices=("float16", "float32"), help="cache storage dtype")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--json", default="", help="also write the figures as JSON here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    res = run_flops(args) if args.flops else run_full(args) if args.full else run_tiny(args)
    res["args"] = vars(args)
    res["torch_threads"] = torch.get_num_threads()
    print(report(res, args))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
