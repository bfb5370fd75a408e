"""Per-trial fixed cost, per-epoch cost from the feature cache, and K concurrent trials.

Measures what a sweep trial pays with a warm feature cache, eager build ("before": the
whole ``SSVP``, vision towers included) against lazy build ("after":
``ssvp.lazy_backbones``, text tower and heads only), in one run, on real-format weight
files with random values:

* full size (default): an open_clip ``ViT-L-14`` state dict (``torch.save``, 224 px as
  released; resampled to the 37 x 37 grid when loaded) and a transformers DINOv3 ViT-L/16
  ``save_pretrained`` folder (safetensors), both built from their configs with random
  init, written once under ``--weights`` (~2.9 GB; nothing is downloaded).
* ``--tiny``: the tiny CLIP / DINOv3 architectures saved the same way (a smoke check).

Every trial is a fresh Python process (as a Ray Train worker is) that runs
``ssvp.engine.fit`` on a warm cache and records, from interpreter start: imports, model
build, weights read, cache open, first training step, then the steady per-epoch times.
Ray's share (placement group + worker group of a one-worker ``TorchTrainer`` with an empty
loop, on a local Ray started here) is measured apart. Then K = 1, 2, 4 trials (other
gamma per trial) run concurrently, one torch thread each, and their metrics are compared
with the same trials run one after the other. Finally it prints a projection of the
100-trial paper sweep on one H200 from these figures and the anchors of DESIGN.md, each
input named.

    python bench/bench_trials.py --tiny                      # smoke check, ~3-6 min here
    python bench/bench_trials.py --json runs/bench_trials.json   # full size (~30-40 min on 2 cores)
    python bench/bench_trials.py --device cuda ...           # on a GPU (bench/gpu_run.sh --trials)
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

T_START = time.time()  # interpreter start of a trial process is measured from the parent's spawn time
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# ---------------------------------------------------------------------------------- anchors
# H200 figures from /work/shared/DESIGN.md (bf16, batch 32, random weights)
H200_BACKBONES_IMG_S = 285.0  # both backbones, DINO stopped after block 12, minimal SDPA ViT
# FLOPs per image at full size (bench/bench_sweep.py --flops, bench/README.md "Compute bound")
GFLOP_BACKBONE, GFLOP_HEAD_TRAIN, GFLOP_HEAD_EVAL = 944.0, 154.0, 70.0
# VisA (paper's source domain): 10,821 images (9,621 normal + 1,200 anomalous), 12 classes
VISA_IMAGES = 10821
FEATURE_MIB_PER_IMAGE = 18.7  # fp16, 4 taps x 1369 tokens x (768 + 1024)


def _rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


# ---------------------------------------------------------------------------------- setup
def make_weights(wdir: Path, tiny: bool) -> tuple[str, str]:
    """(CLIP state dict file, DINOv3 folder); written once, random values, real formats."""
    import torch

    wdir.mkdir(parents=True, exist_ok=True)
    tag = "tiny" if tiny else "vitl"
    clip_file, dino_dir = wdir / f"open_clip_{tag}.bin", wdir / f"dinov3_{tag}"
    if not clip_file.is_file():
        import open_clip
        from open_clip.model import CLIP

        from ssvp.backbones import tiny_clip_config

        torch.manual_seed(1)
        model = CLIP(**tiny_clip_config(8)) if tiny else open_clip.create_model("ViT-L-14")  # 224 px, as released
        tmp = clip_file.with_suffix(".tmp")
        torch.save(model.state_dict(), tmp)
        tmp.replace(clip_file)
        del model
    if not (dino_dir / "config.json").is_file():
        from transformers import DINOv3ViTConfig, DINOv3ViTModel

        from ssvp.backbones import DINO_REGISTRY

        spec = DINO_REGISTRY["dinov3_tiny" if tiny else "dinov3_vitl16"]
        torch.manual_seed(2)
        model = DINOv3ViTModel(DINOv3ViTConfig(**spec.arch, patch_size=spec.patch, image_size=224))
        model.save_pretrained(str(dino_dir))
        del model
    return str(clip_file), str(dino_dir)


def trial_config(args, data: Path, cache: Path, clip_file: str, dino_dir: str, gamma: float) -> dict:
    from ssvp.config import Config

    common = dict(
        source=f"synthetic:{data}/domain_a", targets=[f"synthetic:{data}/domain_b"],
        clip_pretrained=clip_file, dino_weights=dino_dir, epochs=args.epochs, max_per_class=args.max_per_class,
        batch_size=args.batch_size, eval_batch_size=args.batch_size, device=args.device, progress=False,
        feature_cache=str(cache), gamma=gamma, seed=0, max_steps_per_epoch=args.max_steps,
    )
    cfg = Config.tiny(**common) if args.tiny else Config.from_dict(common)
    return cfg.to_dict()


# ---------------------------------------------------------------------------------- one trial (child)
def run_trial(spec: dict) -> dict:
    """Runs in a fresh process: fit() on a warm cache, timed from interpreter start."""
    t_imp = time.time()
    import torch

    torch.set_num_threads(spec["threads"])
    import open_clip  # noqa: F401 - timed with the imports, as a trial pays them
    import transformers  # noqa: F401

    from ssvp import backbones as bb_mod
    from ssvp import engine
    from ssvp.config import Config

    marks: dict[str, float] = {"spawn": spec["spawn_time"], "interp": T_START, "imports_start": t_imp,
                               "imports_end": time.time()}
    acc: dict[str, float] = {}

    def timed(owner, name, key):
        real = getattr(owner, name)

        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return real(*a, **k)
            finally:
                acc[key] = acc.get(key, 0.0) + time.perf_counter() - t

        setattr(owner, name, wrapper)

    import open_clip.factory as ocf

    timed(ocf, "load_checkpoint", "clip_checkpoint_read")  # eager: read + copy into the model
    timed(bb_mod, "build_clip", "build_clip")
    timed(bb_mod, "build_dino_model", "dino_from_pretrained")  # construct on meta + read (transformers)
    timed(bb_mod, "weights_fingerprint", "fingerprints")
    real_build = engine.build_model
    holder = {}

    def build(cfg, device, lazy=None):
        marks["build_start"] = time.time()
        m = real_build(cfg, device, lazy=spec["mode"] != "eager")
        marks["build_end"] = time.time()
        holder["model"] = m
        return m

    engine.build_model = build
    real_fs = engine.FeatureSource.__init__

    def fs_init(self, *a, **k):
        marks["cache_start"] = time.time()
        real_fs(self, *a, **k)
        marks["cache_end"] = time.time()

    engine.FeatureSource.__init__ = fs_init
    step_starts: list[float] = []
    real_batch = engine.FeatureSource.batch

    def batch(self, b):
        step_starts.append(time.time())
        return real_batch(self, b)

    engine.FeatureSource.batch = batch
    cfg = Config.from_dict(spec["cfg"])
    cuda = cfg.train.device.startswith("cuda") and torch.cuda.is_available()
    if cuda and spec.get("gpu_fraction"):
        # each of K trials on one GPU gets its own memory budget (what gpus_per_worker = 1/K gives in Ray)
        torch.cuda.set_per_process_memory_fraction(float(spec["gpu_fraction"]), torch.device(cfg.train.device))
    runs = []
    for i in range(2 if spec["mode"] == "reused" else 1):
        # "reused": a second trial in the same process (what resources.reuse_processes gives): the
        # imports are paid and the text tower is kept (SSVP_KEEP_TEXT_TOWER, set by spawn_trial)
        acc.clear()
        step_starts.clear()
        epoch_ends: list[float] = []
        marks["fit_start"] = time.time()
        result = engine.fit(cfg, on_epoch=lambda e, m, p: epoch_ends.append(time.time()))
        marks["fit_end"] = time.time()
        runs.append(_fit_figures(spec, cfg, marks, acc, holder["model"].backbones, step_starts, epoch_ends, result))
        if i == 1:
            runs[1].update(python_start_s=0.0, imports_s=0.0, total_s=marks["fit_end"] - marks["fit_start"],
                           first_history=runs[0]["history"], first_trial_s=runs[0]["total_s"])
    out = runs[-1]
    out["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
    return out


def _fit_figures(spec, cfg, marks, acc, bb, step_starts, epoch_ends, result) -> dict:
    lazy_t = getattr(bb, "timings", {})
    if spec["mode"] in ("lazy", "reused"):
        read = lazy_t.get("weights_read_s", 0.0)
    else:
        read = acc.get("clip_checkpoint_read", 0.0) + acc.get("dino_from_pretrained", 0.0)
    build_total = marks["build_end"] - marks["build_start"]
    steps_per_epoch = max(1, len(step_starts) // max(1, len(epoch_ends)))
    # steady step: the train steps of the last epoch (validation batches also call batch())
    epochs = [epoch_ends[0] - marks["cache_end"]] + [b - a for a, b in zip(epoch_ends, epoch_ends[1:])]
    return {
        "mode": spec["mode"],
        "gamma": cfg.model.gamma,
        "python_start_s": T_START - spec["spawn_time"],
        "imports_s": marks["imports_end"] - marks["imports_start"],
        "datasets_s": marks["build_start"] - marks["fit_start"],
        "model_build_s": build_total - read,
        "weights_read_s": read,
        "cache_open_s": marks["cache_end"] - marks["cache_start"],
        "first_step_s": (step_starts[1] - marks["cache_end"]) if len(step_starts) > 1 else float("nan"),
        "epoch_s": epochs,
        "steps_per_epoch_calls": steps_per_epoch,
        "timers": dict(acc),
        "lazy_timings": dict(lazy_t),
        "text_source": getattr(bb, "text_source", "eager"),
        "vision_built": bool(getattr(bb, "built", True)),
        "backbone_forward_calls": int(bb.forward_calls),
        "history": result.history,
        "peak_rss_gib": _rss_gib(),
        "gpu_fraction": spec.get("gpu_fraction"),
        "total_s": marks["fit_end"] - spec["spawn_time"],
    }


def spawn_trial(cfg: dict, mode: str, threads: int, work: Path, name: str, env_extra: dict | None = None,
                gpu_fraction: float | None = None) -> subprocess.Popen:
    spec = {"cfg": cfg, "mode": mode, "threads": threads, "spawn_time": time.time(), "out": str(work / f"{name}.json"),
            "gpu_fraction": gpu_fraction}
    path = work / f"{name}.spec.json"
    path.write_text(json.dumps(spec))
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), **(env_extra or {}))
    if mode == "reused":
        env["SSVP_KEEP_TEXT_TOWER"] = "1"
    spec["spawn_time"] = time.time()
    path.write_text(json.dumps(spec))
    return subprocess.Popen([sys.executable, __file__, "--run-trial", str(path)], env=env,
                            stdout=open(work / f"{name}.log", "w"), stderr=subprocess.STDOUT)


def wait_all(procs: list[subprocess.Popen], work: Path, names: list[str]) -> list[dict]:
    out = []
    for p, n in zip(procs, names):
        rc = p.wait()
        if rc != 0:
            raise RuntimeError(f"trial {n} failed (exit {rc}); see {work / (n + '.log')}:\n"
                               + (work / f"{n}.log").read_text()[-3000:])
        out.append(json.loads((work / f"{n}.json").read_text()))
    return out


# ---------------------------------------------------------------------------------- Ray share
def _stamp(config: dict) -> None:
    with open(config["stamps"], "a") as fh:
        fh.write(f"{time.time()} {os.getpid()}\n")


def _tune_train_trial(config: dict) -> None:
    """What a Train-mode trial pays Ray: a one-worker ``TorchTrainer`` (empty loop) from its Tune actor."""
    import ray.train
    from ray.train.torch import TorchTrainer

    _stamp(config)
    TorchTrainer(
        lambda: None,
        scaling_config=ray.train.ScalingConfig(num_workers=1, use_gpu=False, resources_per_worker={"CPU": 1}),
        run_config=ray.train.RunConfig(name=f"noop{config['i']}", storage_path=config["storage"]),
    ).fit()


def _tune_reused_trial(config: dict) -> None:
    """What a ``reuse_processes`` trial pays Ray: its turn on a reused Tune actor (nothing else)."""
    _stamp(config)


def _tune_gaps(fn, resources: dict, n: int, work: Path, name: str) -> dict:
    """n empty trials one after the other in one Tune run; per-trial cost = gap between trial starts."""
    from ray import tune

    stamps = work / f"{name}.stamps"
    stamps.unlink(missing_ok=True)
    tuner = tune.Tuner(
        tune.with_resources(fn, resources),
        param_space={"i": tune.grid_search(list(range(n))), "stamps": str(stamps), "storage": str(work / "ray_runs")},
        tune_config=tune.TuneConfig(max_concurrent_trials=1, reuse_actors=True),
        run_config=tune.RunConfig(name=name, storage_path=str(work / "ray_runs"), verbose=0),
    )
    t = time.perf_counter()
    tuner.fit()
    wall = time.perf_counter() - t
    rows = [ln.split() for ln in stamps.read_text().splitlines()]
    starts = sorted(float(r[0]) for r in rows)
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    return {"wall_s": wall, "gaps_s": gaps, "per_trial_s": sorted(gaps)[len(gaps) // 2],
            "processes": len({r[1] for r in rows}), "trials": n}


def ray_overhead(repeats: int, work: Path) -> dict:
    """Seconds Ray adds per trial, both ways, on a local Ray head started here: Train mode (the
    trial's Tune actor runs a one-worker ``TorchTrainer``: placement group, worker group start with
    its imports of torch and Ray Train, teardown) and reused processes (the next trial on the same
    Tune actor). ``repeats + 1`` empty trials each, one at a time; the median gap between starts."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    t = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=str(Path(tempfile.gettempdir()) / "ssvp_bench_ray"),
             _node_ip_address="127.0.0.1", log_to_driver=False)
    init_s = time.perf_counter() - t
    try:
        train = _tune_gaps(_tune_train_trial, {"cpu": 0.01}, repeats + 1, work, "ray_train")
        reused = _tune_gaps(_tune_reused_trial, {"cpu": 1}, repeats + 1, work, "ray_reused")
    finally:
        ray.shutdown()
    return {"ray_init_s": init_s, "train": train, "reused": reused,
            "trial_best_s": train["per_trial_s"], "reused_per_trial_s": reused["per_trial_s"]}


# ---------------------------------------------------------------------------------- driver
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run-trial", default="", help=argparse.SUPPRESS)
    ap.add_argument("--tiny", action="store_true", help="tiny architectures (smoke check)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--weights", default="", help="folder for the random-value weight files (default: /tmp/ssvp_bench_weights)")
    ap.add_argument("--work", default="", help="work folder (data, cache, logs); default: a temp folder")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--max-per-class", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1, help="eager/lazy start-up pairs (alternating)")
    ap.add_argument("--ks", default="1,2,4", help="concurrency levels")
    ap.add_argument("--no-ray", action="store_true", help="skip the Ray share")
    ap.add_argument("--stages", default="cold,startup,ray,concurrency",
                    help="what to run; with fewer stages the figures are added to an existing --json")
    ap.add_argument("--max-steps", type=int, default=0, help="train steps per epoch (0: all)")
    ap.add_argument("--max-rss-gib", type=float, default=10.0, help="skip a K whose K x trial peak RSS exceeds this")
    ap.add_argument("--json", default="")
    args = ap.parse_args(argv)
    if args.run_trial:
        spec = json.loads(Path(args.run_trial).read_text())
        res = run_trial(spec)
        Path(spec["out"]).write_text(json.dumps(res, default=float))
        return 0

    import torch

    from ssvp.data import make_synthetic

    stages = set(args.stages.split(","))
    res: dict = {}
    if args.json and Path(args.json).is_file() and stages != {"cold", "startup", "ray", "concurrency"}:
        res = json.loads(Path(args.json).read_text())  # add the stages run now to an earlier run's figures
    res.update({"args": vars(args), "machine": {"cpus": os.cpu_count(), "torch": torch.__version__,
                                                "load_avg_start": os.getloadavg()}})
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_trials_"))
    work.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    clip_file, dino_dir = make_weights(Path(args.weights or "/tmp/ssvp_bench_weights"), args.tiny)
    res["weights"] = {"clip": clip_file, "clip_bytes": Path(clip_file).stat().st_size, "dino": dino_dir,
                      "dino_bytes": sum(f.stat().st_size for f in Path(dino_dir).iterdir()),
                      "prepare_s": time.perf_counter() - t}
    data = work / "data"
    if not data.is_dir():
        make_synthetic(data, seed=0, size=112 if args.tiny else 518, n_train=1, n_test=args.max_per_class)
    cache = work / "cache"
    gammas = [0.5, 0.3, 0.7, 0.1]
    cfgs = [trial_config(args, data, cache, clip_file, dino_dir, g) for g in gammas]

    def log(msg):
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)
        if args.json:  # what was measured so far survives a timeout
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(res, indent=2, default=float))

    # 0. warm the cache (eager, one epoch): the cold trial, for reference
    if "cold" in stages:
        log("warming the cache (cold trial, eager)")
        warm_cfg = dict(cfgs[0], train=dict(cfgs[0]["train"], epochs=1))
        res["cold"] = wait_all([spawn_trial(warm_cfg, "eager", 2, work, "cold")], work, ["cold"])[0]
    res["cache_bytes"] = sum(f.stat().st_size for f in cache.glob("*/*/*.npy"))
    res["cache_files"] = len(list(cache.glob("*/*/*.npy")))

    # 1. start-up, eager vs lazy vs reused (a second trial in a lazy trial's process), alternating,
    #    2 threads each (alone on the machine's cores)
    if "startup" in stages:
        res["startup"] = {"eager": [], "lazy": [], "reused": []}
    for r in range(args.repeats if "startup" in stages else 0):
        for mode in ("eager", "lazy", "reused"):
            log(f"start-up {mode} #{r + 1}")
            name = f"startup_{mode}_{r}"
            res["startup"][mode].append(wait_all([spawn_trial(cfgs[0], mode, 2, work, name)], work, [name])[0])

    # 2. Ray's share per trial
    if not args.no_ray and "ray" in stages:
        log("Ray share")
        try:
            res["ray"] = ray_overhead(3, work)
        except Exception as exc:  # noqa: BLE001 - report and go on
            res["ray"] = {"error": f"{type(exc).__name__}: {exc}"}

    # 3. K concurrent lazy trials (1 torch thread each) vs the same trials one after the other
    if "concurrency" in stages:
        ks = [int(k) for k in args.ks.split(",") if k]
        # K trials must fit in memory: estimate from the lazy start-up trial's peak RSS
        est = max(t["peak_rss_gib"] for t in res["startup"]["lazy"]) if res.get("startup") else 3.0
        skipped = {k: f"{k} x {est:.2f} GiB (lazy trial peak RSS) > --max-rss-gib {args.max_rss_gib}"
                   for k in ks if k > 1 and k * est > args.max_rss_gib}
        ks = [k for k in ks if k not in skipped]
        n = max(ks)
        log(f"sequential reference: {n} trials")
        seq = []
        for i in range(n):
            seq += wait_all([spawn_trial(cfgs[i], "lazy", 1, work, f"seq{i}")], work, [f"seq{i}"])
        res["sequential"] = seq
        # K = 1 is the sequential run itself (one trial at a time)
        res["concurrent"] = {"1": {"wall_s": sum(t["total_s"] for t in seq), "trials": seq, "same_metrics_as_sequential": True}}
        for k, why in skipped.items():
            log(f"K = {k} skipped: {why}")
            res["concurrent"][str(k)] = {"skipped": why}
        for k in [k for k in ks if k > 1]:
            log(f"K = {k} concurrent trials")
            t = time.perf_counter()
            names = [f"k{k}_{i}" for i in range(k)]
            procs = [spawn_trial(cfgs[i], "lazy", 1, work, names[i], gpu_fraction=1.0 / k) for i in range(k)]
            out = wait_all(procs, work, names)
            wall = time.perf_counter() - t
            same = all(o["history"] == s["history"] for o, s in zip(out, seq))
            res["concurrent"][str(k)] = {"wall_s": wall, "trials": out, "same_metrics_as_sequential": same}
    res["machine"]["load_avg_end"] = os.getloadavg()
    summary = summarise(res, args)
    res["summary"] = summary
    print(report(res, args))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=2, default=float))
    return 0


def _steady(trial: dict) -> float:
    e = trial["epoch_s"]
    return float(sum(e[1:]) / len(e[1:])) if len(e) > 1 else float(e[0])


def _fixed(t: dict) -> dict:
    """The per-trial fixed cost parts (seconds)."""
    steady_step = _steady(t) / max(1, t["steps_per_epoch_calls"])
    first_extra = max(0.0, t["first_step_s"] - steady_step) if t["first_step_s"] == t["first_step_s"] else 0.0
    parts = {
        "python_start": t["python_start_s"], "imports": t["imports_s"], "datasets": t["datasets_s"],
        "model_build": t["model_build_s"], "weights_read": t["weights_read_s"], "cache_open": t["cache_open_s"],
        "first_batch_extra": first_extra,
    }
    parts["in_process"] = parts["model_build"] + parts["weights_read"] + parts["cache_open"] + parts["first_batch_extra"]
    parts["total_no_ray"] = sum(v for k, v in parts.items() if k != "in_process")
    return parts


MODES = ("eager", "lazy", "reused")  # before; lazy build in a fresh process; lazy, second trial of a process


def summarise(res: dict, args) -> dict:
    s: dict = {}
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    startup = res.get("startup") or {}
    for mode in [m for m in MODES if startup.get(m)]:
        fx = [_fixed(t) for t in startup[mode]]
        s[mode] = {k: mean([f[k] for f in fx]) for k in fx[0]}
        s[mode]["peak_rss_gib"] = max(t["peak_rss_gib"] for t in startup[mode])
        s[mode]["steady_epoch_s"] = mean([_steady(t) for t in startup[mode]])
    histories = [t["history"] for m in MODES for t in startup.get(m, [])]
    histories += [t["first_history"] for t in startup.get("reused", [])]
    s["same_history_all_modes"] = bool(histories) and all(h == histories[0] for h in histories)
    ray = res.get("ray", {})
    ray_train = float(ray.get("trial_best_s", 0.0))
    s["ray_per_trial_s"] = {"eager": ray_train, "lazy": ray_train,
                            "reused": float(ray.get("reused_per_trial_s", ray_train))}
    if "eager" in s:
        e = s["eager"]
        for mode in [m for m in ("lazy", "reused") if m in s]:
            m = s[mode]
            s[f"ratio_{mode}"] = {
                "in_process": e["in_process"] / max(m["in_process"], 1e-9),
                "no_ray": e["total_no_ray"] / max(m["total_no_ray"], 1e-9),
                "with_ray": (e["total_no_ray"] + ray_train) / max(m["total_no_ray"] + s["ray_per_trial_s"][mode], 1e-9),
            }
    conc = {}
    base = None
    for k, c in res.get("concurrent", {}).items():
        if "skipped" in c:
            conc[k] = {"skipped": c["skipped"]}
            continue
        per_epoch = mean([_steady(t) for t in c["trials"]])
        thr = int(k) / per_epoch  # trial-epochs per second while K run together
        base = base or thr
        conc[k] = {"steady_epoch_s": per_epoch, "trial_epochs_per_s": thr, "speedup_vs_k1": thr / base,
                   "wall_s": c["wall_s"], "same_metrics": c["same_metrics_as_sequential"],
                   "peak_rss_gib_per_trial": max(t["peak_rss_gib"] for t in c["trials"]),
                   "peak_gpu_gib_per_trial": max(t.get("peak_gpu_gib", 0.0) for t in c["trials"])}
    s["concurrency"] = conc
    s["projection"] = projection(s, res, args) if "eager" in s else {}
    return s


def projection(s: dict, res: dict, args) -> dict:
    """100 trials, 15 epochs max, ASHA (grace 1, reduction 2), VisA source, one H200."""
    trials, max_epochs, rf = 100, 15, 2
    # expected epochs per trial under ASHA rungs 1, 2, 4, 8 (survival 1/rf per rung)
    rungs, e_mean, prev, surv = [1, 2, 4, 8], 0.0, 0, 1.0
    for r in rungs:
        e_mean += surv * (r - prev)
        prev, surv = r, surv / rf
    e_mean += surv * (max_epochs - prev)
    val_fraction = 0.25
    n_train, n_val = VISA_IMAGES * (1 - val_fraction), VISA_IMAGES * val_fraction
    eff_tflops = H200_BACKBONES_IMG_S * GFLOP_BACKBONE / 1e3  # what the backbone anchor achieves
    head_train_img_s = eff_tflops * 1e3 / GFLOP_HEAD_TRAIN
    head_eval_img_s = eff_tflops * 1e3 / GFLOP_HEAD_EVAL
    epoch_compute_s = n_train / head_train_img_s + n_val / head_eval_img_s
    epoch_gib = (n_train + n_val) * FEATURE_MIB_PER_IMAGE / 1024
    read_gib_s = 5.0  # assumed local NVMe; page cache when the cache fits in RAM is faster
    epoch_io_s = epoch_gib / read_gib_s
    fixed = {m: s[m]["total_no_ray"] + s["ray_per_trial_s"][m] for m in MODES if m in s}
    fixed_eager = fixed.get("eager", 0.0)
    fixed_lazy = fixed.get("reused", fixed.get("lazy", 0.0))  # what a sweep with reuse_processes pays
    # fixed costs measured here on the CPU; on the GPU node imports and Ray are similar, the
    # eager build adds moving ~2.9 GB of weights to the device (not counted: favours eager)
    out = {
        "inputs": {
            "trials": trials, "max_epochs": max_epochs, "asha_reduction_factor": rf, "asha_grace": 1,
            "expected_epochs_per_trial": e_mean, "visa_images": VISA_IMAGES, "val_fraction": val_fraction,
            "H200_backbones_img_s (DESIGN.md)": H200_BACKBONES_IMG_S,
            "GFLOP/img backbone, head train, head eval (bench_sweep --flops)": [GFLOP_BACKBONE, GFLOP_HEAD_TRAIN, GFLOP_HEAD_EVAL],
            "effective_TFLOP_s (= anchor x backbone GFLOP)": eff_tflops,
            "head_train_img_s (same efficiency)": head_train_img_s, "head_eval_img_s": head_eval_img_s,
            "feature_MiB_per_image": FEATURE_MIB_PER_IMAGE, "assumed_read_GiB_s": read_gib_s,
            "fixed_s_per_trial_lazy (reused process if measured; here, incl. Ray)": fixed_lazy,
            "fixed_s_per_trial_eager (measured here, incl. Ray)": fixed_eager,
        },
        "epoch_compute_s": epoch_compute_s, "epoch_read_gib": epoch_gib, "epoch_io_s": epoch_io_s,
    }
    for k in (1, 2, 4):
        # K concurrent trials share the GPU's compute: epochs stay compute- or I/O-bound in total;
        # fixed costs overlap with other trials' epochs.
        epoch_s = max(epoch_compute_s, epoch_io_s)
        for label, fixed in (("lazy", fixed_lazy), ("eager", fixed_eager)):
            total = trials * e_mean * epoch_s + trials * fixed / k
            out[f"hours_K{k}_{label}"] = total / 3600
        out[f"hours_K{k}_lazy_ram_resident_cache"] = (trials * e_mean * epoch_compute_s + trials * fixed_lazy / k) / 3600
    return out


def report(res: dict, args) -> str:
    s = res["summary"]
    L = []
    w = res["weights"]
    L.append(f"preset {'tiny' if args.tiny else 'full (CLIP ViT-L/14 @518 + DINOv3 ViT-L/16, grid 37)'}, device {args.device}, "
             f"{res['machine']['cpus']} CPUs, load avg {res['machine']['load_avg_start'][0]:.1f} -> {res['machine']['load_avg_end'][0]:.1f}")
    L.append(f"weights: CLIP {w['clip_bytes'] / 2**30:.2f} GiB ({Path(w['clip']).name}), DINOv3 {w['dino_bytes'] / 2**30:.2f} GiB (folder)")
    L.append(f"cache: {res['cache_files']} images, {res['cache_bytes'] / 2**20:.1f} MiB (fp16, read by np.load mmap: one page-cache copy per node)")
    modes = [m for m in MODES if m in s]
    L.append("trial start-up with a warm cache, seconds (mean of runs; eager and lazy: a fresh process each; "
             "reused: the second trial in a lazy trial's process):")
    keys = ["python_start", "imports", "datasets", "model_build", "weights_read", "cache_open", "first_batch_extra",
            "in_process", "total_no_ray"]
    L.append(f"  {'part':22s}" + "".join(f" {m:>10s}" for m in modes))
    for k in keys:
        L.append(f"  {k:22s}" + "".join(f" {s[m][k]:10.2f}" for m in modes))
    L.append(f"  {'Ray per trial':22s}" + "".join(f" {s['ray_per_trial_s'][m]:10.2f}" for m in modes))
    L.append(f"  {'whole start-up':22s}" + "".join(f" {s[m]['total_no_ray'] + s['ray_per_trial_s'][m]:10.2f}" for m in modes))
    for m in ("lazy", "reused"):
        if f"ratio_{m}" in s:
            r = s[f"ratio_{m}"]
            L.append(f"  eager / {m}: build+read+cache+first batch {r['in_process']:.1f}x; without Ray {r['no_ray']:.1f}x; "
                     f"with Ray {r['with_ray']:.1f}x")
    L.append(f"  every start-up trial (and the reused process's first trial) has the same history: "
             f"{s['same_history_all_modes']}")
    for t in (res.get("startup") or {}).get("reused", [])[:1]:
        L.append(f"  reused trial's text tower: {t['text_source']}; vision towers built: {t['vision_built']}")
    L.append("  peak RSS " + ", ".join(f"{m} {s[m]['peak_rss_gib']:.2f} GiB" for m in modes))
    L.append("steady epoch from the cache (2 threads): " + ", ".join(f"{m} {s[m]['steady_epoch_s']:.2f} s" for m in modes))
    L.append("K concurrent trials (1 torch thread each):")
    for k, c in s["concurrency"].items():
        if "skipped" in c:
            L.append(f"  K={k}: skipped ({c['skipped']})")
            continue
        L.append(f"  K={k}: epoch {c['steady_epoch_s']:.2f} s per trial, {c['trial_epochs_per_s']:.3f} trial-epochs/s "
                 f"({c['speedup_vs_k1']:.2f}x K=1), wall {c['wall_s']:.0f} s, peak RSS/trial {c['peak_rss_gib_per_trial']:.2f} GiB, "
                 f"peak GPU/trial {c['peak_gpu_gib_per_trial']:.2f} GiB, "
                 f"metrics == sequential: {c['same_metrics']}")
    p = s["projection"]
    if not p:
        return "\n".join(L)
    L.append("projection, 100-trial sweep on one H200:")
    for k, v in p["inputs"].items():
        L.append(f"  input {k}: {v:.3g}" if isinstance(v, float) else f"  input {k}: {v}")
    L.append(f"  epoch: compute {p['epoch_compute_s']:.1f} s, features {p['epoch_read_gib']:.0f} GiB -> I/O {p['epoch_io_s']:.1f} s")
    after = "reused" if "reused" in s else "lazy"
    for k in (1, 2, 4):
        L.append(f"  K={k}: {p[f'hours_K{k}_lazy']:.2f} h {after}, {p[f'hours_K{k}_eager']:.2f} h eager; "
                 f"{p[f'hours_K{k}_lazy_ram_resident_cache']:.2f} h {after} with the cache resident in RAM")
    return "\n".join(L)


if __name__ == "__main__":
    raise SystemExit(main())
