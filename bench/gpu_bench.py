"""GPU throughput of SSVP: backbones, full train step, inference, head-only step from cached features.

Run on the lent H200 through ``bench/gpu_run.sh`` (installs the carried open_clip wheels);
here, on a CPU, ``--device cpu --tiny`` runs the same stages on the tiny preset.

Stages (random weights, bf16 autocast on CUDA, batch 32, inputs at 14 * grid px):

  backbone_clip    CLIP ViT-L/14 @ 518 px, taps {6,12,18,24}            (images/s)
  backbone_dino    DINOv3 ViT-L/16 @ 592 px, stopped after block 11      (images/s)
  backbones        both, as ``Backbones(images)`` runs them             (images/s)
  train_step       backbones (no grad) + heads + loss + backward + AdamW step
  inference        backbones + heads, no grad
  head_step_gpu    head-only train step on features already on the GPU (the sweep's floor)
  head_step_cache  head-only train step reading features from ``FeatureCache`` (disk, fp16) by
                   known keys, plus read-only and content-hash throughput

and the achieved fraction of the backbone-only ceilings measured in /work/shared/DESIGN.md
(~285 img/s for a step running both backbones with DINO stopped at block 12 at minimal-ViT
efficiency; ~229 img/s with the stock transformers DINOv3). Results go to
``OUT/gpu_bench.json`` and ``OUT/gpu_bench.txt`` (OUT = ``--out``, else ``$OUT``, else
``./bench_out``), rewritten after every stage so a timeout keeps what was measured. Each stage
is skipped once the time budget (``--budget-s``, default 420 s) is spent.

    python bench/gpu_bench.py                         # on the GPU (see gpu_run.sh)
    python bench/gpu_bench.py --device cpu --tiny     # the same stages, tiny preset, CPU
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

CEILING_MINIMAL = 285.0  # img/s, both backbones, DINO to block 12, minimal SDPA ViT (DESIGN.md)
CEILING_STOCK = 229.0  # img/s, same with the stock transformers DINOv3 forward (DESIGN.md)


class Bench:
    def __init__(self, args):
        self.args = args
        self.device = torch.device(args.device)
        self.t0 = time.perf_counter()
        self.out = Path(args.out or os.environ.get("OUT") or "bench_out")
        self.out.mkdir(parents=True, exist_ok=True)
        self.res: dict = {"env": env_info(self.device), "args": vars(args), "stages": {}, "errors": {}}

    # ----- bookkeeping
    def left(self) -> float:
        return self.args.budget_s - (time.perf_counter() - self.t0)

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def timeit(self, fn, batch: int) -> dict:
        """Warm up, then time ``iters`` calls (stops early when the budget runs low)."""
        for _ in range(self.args.warmup):
            fn()
        self.sync()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        times = []
        for _ in range(self.args.iters):
            t = time.perf_counter()
            fn()
            self.sync()
            times.append(time.perf_counter() - t)
            if self.left() < 20:
                break
        times.sort()
        median = times[len(times) // 2]
        out = {
            "iters": len(times),
            "batch": batch,
            "median_s": median,
            "best_s": times[0],
            "img_per_s": batch / median,
        }
        if self.device.type == "cuda":
            out["peak_mem_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        return out

    def stage(self, name: str, fn) -> None:
        if self.left() < 30:
            self.res["stages"][name] = {"skipped": f"time budget spent ({self.args.budget_s} s)"}
            self.save()
            return
        t = time.perf_counter()
        try:
            r = fn()
            r["stage_wall_s"] = time.perf_counter() - t
            self.res["stages"][name] = r
            print(f"[{time.perf_counter() - self.t0:6.1f} s] {name}: {_short(r)}", flush=True)
        except Exception as exc:  # noqa: BLE001 - record and go on with the other stages
            self.res["errors"][name] = f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=6)}"
            print(f"[{time.perf_counter() - self.t0:6.1f} s] {name}: FAILED {type(exc).__name__}: {exc}", flush=True)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        self.save()

    def save(self) -> None:
        self.res["fractions"] = fractions(self.res["stages"])
        self.res["wall_s"] = time.perf_counter() - self.t0
        (self.out / "gpu_bench.json").write_text(json.dumps(self.res, indent=2, default=str))
        (self.out / "gpu_bench.txt").write_text(text_report(self.res))


def env_info(device: torch.device) -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "device": str(device)}
    for mod in ("transformers", "open_clip", "timm"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception as exc:  # noqa: BLE001
            info[mod] = f"missing ({type(exc).__name__})"
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(gpu=p.name, gpu_mem_gib=round(p.total_memory / 2**30, 1), cuda=torch.version.cuda)
    else:
        info.update(cpu=platform.processor() or platform.machine(), cpus=os.cpu_count(), threads=torch.get_num_threads())
    return info


def fractions(stages: dict) -> dict:
    """Achieved fraction of the DESIGN.md backbone-only ceilings for the steps that run both backbones."""
    out = {}
    for name in ("backbones", "train_step", "inference"):
        r = stages.get(name) or {}
        if "img_per_s" in r:
            out[name] = {
                "of_minimal_vit_ceiling_285": r["img_per_s"] / CEILING_MINIMAL,
                "of_stock_dinov3_ceiling_229": r["img_per_s"] / CEILING_STOCK,
            }
    return out


def _short(r: dict) -> str:
    if "img_per_s" in r:
        mem = f", peak {r['peak_mem_gib']:.1f} GiB" if "peak_mem_gib" in r else ""
        return f"{r['img_per_s']:.1f} img/s (batch {r['batch']}, median {r['median_s'] * 1e3:.1f} ms over {r['iters']}{mem})"
    return json.dumps(r, default=str)[:200]


def text_report(res: dict) -> str:
    e = res["env"]
    lines = [f"SSVP GPU bench  {json.dumps(e, default=str)}", ""]
    for name, r in res["stages"].items():
        lines.append(f"{name:16s} {_short(r)}")
    for name, f in res.get("fractions", {}).items():
        lines.append(
            f"{name:16s} {100 * f['of_minimal_vit_ceiling_285']:.0f} % of the 285 img/s ceiling, "
            f"{100 * f['of_stock_dinov3_ceiling_229']:.0f} % of 229 img/s (stock DINOv3)"
        )
    for name, err in res.get("errors", {}).items():
        lines.append(f"{name:16s} ERROR {err.splitlines()[0]}")
    lines.append(f"wall {res.get('wall_s', 0):.1f} s")
    return "\n".join(lines) + "\n"


def build_config(args):
    from ssvp.config import Config

    over = {"device": args.device, "batch_size": args.batch, "progress": False}
    if args.tiny:
        return Config.tiny(**over)
    # the paper's backbones and heads, random weights (nothing to download)
    return Config.from_dict({"clip_pretrained": "", "dino_weights": "", "bf16": True, **over})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="tiny preset (CPU check of the script)")
    ap.add_argument("--batch", type=int, default=0, help="batch size (default 32; 4 with --tiny)")
    ap.add_argument("--warmup", type=int, default=0, help="warm-up calls per stage (default 3; 1 with --tiny)")
    ap.add_argument("--iters", type=int, default=0, help="timed calls per stage (default 10; 3 with --tiny)")
    ap.add_argument("--budget-s", type=float, default=420.0, help="stop starting stages after this many seconds")
    ap.add_argument("--cache-images", type=int, default=0, help="images written to the feature cache (default 2 batches)")
    ap.add_argument("--out", default="", help="output folder (default $OUT, else ./bench_out)")
    args = ap.parse_args(argv)
    args.batch = args.batch or (4 if args.tiny else 32)
    args.warmup = args.warmup or (1 if args.tiny else 3)
    args.iters = args.iters or (3 if args.tiny else 10)
    args.cache_images = args.cache_images or 2 * args.batch
    if args.device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda but CUDA is not available; use --device cpu --tiny")
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    b = Bench(args)
    from ssvp.engine import _autocast, build_model, make_optimizer
    from ssvp.losses import total_loss

    cfg = build_config(args)
    dev = b.device
    t = time.perf_counter()
    try:
        model = build_model(cfg, dev)
    except Exception as exc:  # noqa: BLE001 - e.g. a transformers API change: keep the CLIP figures
        b.res["errors"]["build_model"] = f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=8)}"
        print(f"build_model FAILED ({type(exc).__name__}: {exc}); retrying CLIP only (fusion=none)", flush=True)
        b.save()
        cfg = cfg.override({"fusion": "none"})
        b.res["fallback"] = "fusion=none (CLIP only): building the DINO backbone failed, see errors.build_model"
        model = build_model(cfg, dev)
    b.res["build_model_s"] = time.perf_counter() - t
    bb = model.backbones
    b.res["model"] = {
        "clip": cfg.model.clip_model, "clip_layers": cfg.model.clip_layers, "clip_px": bb.clip_image_size,
        "dino": cfg.model.dino_model, "dino_layers": cfg.model.dino_layers, "dino_px": bb.dino_image_size,
        "dino_blocks_run": len(bb.dino._layers()) if bb.dino is not None else 0, "grid": bb.grid,
        "head_params": sum(p.numel() for p in model.head.parameters() if p.requires_grad),
    }
    B = args.batch
    size = 14 * cfg.model.grid
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(B, 3, size, size, generator=gen).to(dev)
    masks = (torch.rand(B, size, size, generator=gen) > 0.97).float().to(dev)
    labels = torch.tensor([i % 2 for i in range(B)], device=dev)
    names = [("bottle", "screw", "cable", "wood")[i % 4] for i in range(B)]
    print(f"model built in {b.res['build_model_s']:.1f} s: {b.res['model']}", flush=True)

    from ssvp.backbones import _resize_normalise

    @torch.no_grad()
    def clip_only():
        x = _resize_normalise(images, bb.clip_image_size, bb._clip_mean, bb._clip_std)
        with bb._autocast():
            return bb.clip(x)

    @torch.no_grad()
    def dino_only():
        x = _resize_normalise(images, bb.dino_image_size, bb._dino_mean, bb._dino_std)
        with bb._autocast():
            return bb.dino(x)

    b.stage("backbone_clip", lambda: b.timeit(clip_only, B))
    if bb.dino is not None:
        b.stage("backbone_dino", lambda: b.timeit(dino_only, B))
    b.stage("backbones", lambda: b.timeit(lambda: bb(images), B))

    opt = make_optimizer(cfg, model)

    def head_step(feats):
        model.head.train()
        with _autocast(dev, cfg.model.bf16):
            out = model.head(feats, names, size)
        loss, _ = total_loss(out, masks, labels, cfg.model)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    def train_step():
        with torch.no_grad():
            feats = bb(images)
        return head_step(feats)

    @torch.no_grad()
    def inference():
        model.head.eval()
        feats = bb(images)
        with _autocast(dev, cfg.model.bf16):
            return model.head(feats, names, size).score

    b.stage("train_step", lambda: b.timeit(train_step, B))
    b.stage("inference", lambda: b.timeit(inference, B))

    with torch.no_grad():
        gpu_feats = bb(images)
    b.stage("head_step_gpu", lambda: b.timeit(lambda: head_step(gpu_feats), B))

    def cached_stage():
        from ssvp.features import FeatureCache

        root = Path(tempfile.mkdtemp(prefix="ssvp_gpu_bench_cache_"))
        cache = FeatureCache(root, bb, cfg.model, dtype="float16")
        n = max(B, args.cache_images)
        pool = torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(1))
        t = time.perf_counter()
        keys = []
        for s in range(0, n, B):
            chunk = pool[s : s + B].to(dev)
            keys.extend(cache.key_for(im) for im in chunk)
            cache.get_batch(chunk, keys=keys[s : s + B])
        b.sync()
        fill_s = time.perf_counter() - t
        batches = [(pool[s : s + B].to(dev), keys[s : s + B]) for s in range(0, n - B + 1, B)]
        state = {"i": 0}

        def step():  # read by known keys (the engine's path index) + head step
            imgs, ks = batches[state["i"] % len(batches)]
            state["i"] += 1
            return head_step(cache.get_batch(imgs, keys=ks))

        def read_only():
            imgs, ks = batches[state["i"] % len(batches)]
            state["i"] += 1
            return cache.get_batch(imgs, keys=ks)

        def hash_only():  # content keys from the image bytes (files not yet in the path index)
            imgs, _ = batches[state["i"] % len(batches)]
            state["i"] += 1
            return [cache.key_for(im) for im in imgs]

        r = b.timeit(step, B)
        r["read_only_img_per_s"] = b.timeit(read_only, B)["img_per_s"]
        r["content_hash_img_per_s"] = b.timeit(hash_only, B)["img_per_s"]
        r["fill_img_per_s"] = n / fill_s
        r["bytes_per_image"] = cache.path_for(keys[0]).stat().st_size
        r["cached_images"] = n
        import shutil

        shutil.rmtree(root, ignore_errors=True)
        return r

    b.stage("head_step_cache", cached_stage)
    b.save()
    print(text_report(b.res), flush=True)
    print(f"wrote {b.out / 'gpu_bench.json'} and {b.out / 'gpu_bench.txt'}")
    return 0 if not b.res["errors"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
