"""One Tune trial = one Ray Train run of ``ssvp.engine.fit`` on N workers.

``trial_driver`` is the Tune *function trainable* (Ray Train V2 style): it resolves the
trial's config, builds a ``TorchTrainer`` whose ``ScalingConfig`` gives each worker one
GPU (or CPU only), and passes ``TuneReportCallback`` so every ``ray.train.report`` of
rank 0 reaches Tune (metrics plus ``checkpoint_path``). With N > 1 workers Ray Train
initialises ``torch.distributed`` and ``fit`` wraps the heads in DDP by itself.

``train_loop_per_worker`` runs on each worker: it picks the worker's device
(:func:`select_device`), writes a placement record, resumes from
``ray.train.get_checkpoint()`` when Ray Train restarted the worker group after a
failure (``FailureConfig(max_failures)``) or when Tune restarted / resumed the trial
(the Train run keeps its name, so its checkpoints are found again), calls
``fit(cfg, on_epoch=..., checkpoint_dir=..., resume_from=...)`` and reports per-epoch
metrics with the epoch's checkpoint directory (``last/`` and ``best/`` heads).
With ``target_eval="all"`` rank 0 then evaluates the best heads on the target
datasets (``ssvp.engine.evaluate``) and one final report carries ``target_*`` metrics.

With ``TrialSettings.reuse_processes`` (``resources.reuse_processes``, one worker per trial)
there is no ``TorchTrainer``: :func:`run_in_process` runs the same body (``_train``) in the
Tune actor, which holds the worker's resources and which Tune keeps for the next trial
(``reuse_actors``), so imports, the kept text tower and the actor itself are paid once per
process. It writes the records a Train run writes (checkpoints under the trial's folder,
placement, starts, fatal) and reports ``checkpoint_path`` as ``TuneReportCallback`` does.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import socket
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

from .redact import errors_redacted

__all__ = [
    "TrialSettings",
    "select_device",
    "apply_gpu_share",
    "gpu_index_for_worker",
    "resolve_trial_config",
    "trial_driver",
    "train_loop_per_worker",
    "target_metric_name",
    "flatten_target_report",
    "release_trial_placement_group",
    "newest_checkpoint",
    "read_history",
    "read_starts",
    "is_deterministic",
    "ended_by_its_driver",
    "root_cause",
    "VARIANT_KEY",
]

VARIANT_KEY = "variant"  # param-space key that selects a named bundle of overrides
TARGET_DONE_KEY = "target_eval_done"
HISTORY_FILE = "history.json"  # in every Train checkpoint: each epoch's report so far, best epoch
STARTS_FILE = "starts.jsonl"  # <trial_dir>/starts.jsonl: one line per worker-group start
FATAL_FILE = "fatal.json"  # <trial_dir>/fatal.json: the deterministic error that ended the trial


@dataclass
class TrialSettings:
    """What every trial of a sweep needs besides its hyperparameters (picklable)."""

    base: dict[str, Any]  # Config.to_dict() of the base config (fixed keys already applied)
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)
    workers_per_trial: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0
    extra_resources: dict[str, float] = field(default_factory=dict)  # custom resources per worker
    max_failures: int = 1  # Ray Train retries of the worker group inside a trial
    torch_backend: str = ""  # "" = Ray's choice (nccl with GPUs, gloo without)
    train_storage: str = ""  # absolute folder for the Train runs (shared storage on a cluster)
    target_eval: str = "best"  # best | all | none ("all": every finished trial is evaluated on targets)
    checkpoints_to_keep: int = 1
    reuse_processes: bool = False  # one-worker trials train in their (reused) Tune actor, no Train run
    # class folds x seeds (tuning.folds.replicas): each trial trains these in lockstep; [] = one fit
    replicas: list[dict[str, Any]] = field(default_factory=list)
    selected: dict[str, str] = field(default_factory=dict)  # metric -> mode: reported per replica and as spread
    risk: float | None = None  # kappa: a selected metric is mean - kappa * std over the replicas

    def __post_init__(self) -> None:
        if self.reuse_processes and self.workers_per_trial != 1:
            raise ValueError(f"resources.reuse_processes needs workers_per_trial: 1 (got {self.workers_per_trial}); "
                             "multi-worker trials run as Ray Train runs")
        frac = float(self.gpus_per_worker)
        if self.use_gpu and 0 < frac < 1 and self.workers_per_trial > 1 and self.torch_backend != "gloo":
            raise ValueError(
                f"resources.gpus_per_worker={frac} with workers_per_trial={self.workers_per_trial}: Ray may put two "
                "ranks of one trial on the same GPU, which NCCL refuses; use whole GPUs for multi-worker trials "
                "(fractions are for several one-worker trials per GPU) or torch_backend: gloo"
            )

    def resources_per_worker(self) -> dict[str, float]:
        res: dict[str, float] = {"CPU": float(self.cpus_per_worker)}
        if self.use_gpu:
            res["GPU"] = float(self.gpus_per_worker)
        res.update({k: float(v) for k, v in self.extra_resources.items()})
        return res

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------- devices
def gpu_index_for_worker(local_rank: int, gpu_ids: list[str] | None, cuda_visible_devices: str | None) -> int:
    """CUDA ordinal (inside this process's CUDA_VISIBLE_DEVICES) of the GPU Ray gave this worker.

    Ray Train makes every worker on a node see all GPUs of that node's workers
    (``CUDA_VISIBLE_DEVICES="0,1"``) and ``ray.get_gpu_ids()`` names the worker's own;
    its position in the visible list is the ordinal. Without that information the
    local rank is the ordinal (one GPU per worker, workers numbered per node).
    """
    visible = [v.strip() for v in (cuda_visible_devices or "").split(",") if v.strip()]
    if gpu_ids:
        own = str(gpu_ids[0])
        if own in visible:
            return visible.index(own)
        if not visible and own.isdigit():
            return int(own)
    return int(local_rank)


def select_device(
    local_rank: int,
    use_gpu: bool,
    cuda_device_count: int,
    gpu_ids: list[str] | None = None,
    cuda_visible_devices: str | None = None,
) -> str:
    """The ``train.device`` for a worker: ``cuda:<ordinal>`` when it holds a GPU, else ``cpu``.

    ``cuda_device_count`` is ``torch.cuda.device_count()`` in the worker; with no CUDA
    device visible the worker trains on the CPU (the same code path).
    """
    if not use_gpu or cuda_device_count <= 0:
        return "cpu"
    index = gpu_index_for_worker(local_rank, gpu_ids, cuda_visible_devices)
    return f"cuda:{index % cuda_device_count}"


# --------------------------------------------------------------------------- config
def resolve_trial_config(base: Mapping[str, Any], trial_config: Mapping[str, Any], variants: Mapping[str, Any] | None = None):
    """``(Config, variant_name)`` for a trial: base, then the variant's overrides, then the sampled keys."""
    from ssvp.config import Config, ConfigError

    params = dict(trial_config)
    variant = params.pop(VARIANT_KEY, None)
    cfg = Config.from_dict(base)
    if variant is not None:
        variants = variants or {}
        if variant not in variants:
            raise ConfigError(f"unknown variant {variant!r}; known: {', '.join(variants) or '(none)'}")
        cfg = cfg.override(variants[variant] or {})
    return cfg.override(params), variant


# --------------------------------------------------------------------------- target metrics
def target_metric_name(spec: str, metric: str) -> str:
    """The metric name of a target dataset: ``target/<dataset>/<metric>`` (the MLflow UI groups
    ``target/…`` in one chart section)."""
    fmt, _, root = spec.partition(":")
    name = Path(root.rstrip("/")).name or fmt
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)
    return f"target/{name}/{metric}"


def flatten_target_report(report: Mapping[str, Any]) -> dict[str, float]:
    """``evaluate()``'s ``{spec: {"mean": {...}}}`` -> flat ``target/<ds>/<metric>`` floats (+ ``target/mean/…``
    over the targets)."""
    out: dict[str, float] = {}
    per_metric: dict[str, list[float]] = {}
    for spec, table in report.items():
        mean = table.get("mean", {}) if isinstance(table, Mapping) else {}
        for metric, value in mean.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                out[target_metric_name(spec, metric)] = float(value)
                per_metric.setdefault(metric, []).append(float(value))
    if len(report) > 1:
        for metric, values in per_metric.items():
            finite = [v for v in values if math.isfinite(v)]
            out[f"target/mean/{metric}"] = float(sum(finite) / len(finite)) if finite else float("nan")
    return out


# --------------------------------------------------------------------------- worker side
def _numeric(metrics: Mapping[str, Any]) -> dict[str, float]:
    out = {}
    for k, v in metrics.items():
        if isinstance(v, bool):
            continue
        if isinstance(v, (int, float)):
            out[k] = float(v)
        elif hasattr(v, "item"):
            try:
                out[k] = float(v.item())
            except Exception:  # noqa: BLE001 - skip non-scalars
                pass
    return out


def _current_pg_hex() -> str | None:
    import ray.util

    pg = ray.util.get_current_placement_group()
    return pg.id.hex() if pg is not None else None


def release_trial_placement_group(train_storage: str, trial_id: str) -> bool:
    """Remove the worker group's placement group of a trial that Tune stopped (ASHA) or lost.

    Ray Train V2 ties the worker group's placement group to the job; when Tune kills a
    trial's driver (early stopping) the controller dies with it and only Train's
    ``PlacementGroupCleaner`` (which needs the dashboard's state API) would free the
    resources. The driver calls this after every trial ends, using the id rank 0
    wrote into its placement record, so the next trial never waits for them.
    Returns True when a placement group was removed.
    """
    import ray
    from ray.util.placement_group import PlacementGroup

    from .storage import storage_path

    record = storage_path(train_storage) / trial_id / "placement" / "rank0.json"
    try:
        pg_hex = json.loads(record.read_text()).get("placement_group_id")
    except (OSError, ValueError):
        return False
    if not pg_hex:
        return False
    try:
        pg = PlacementGroup(ray.PlacementGroupID(bytes.fromhex(pg_hex)))
        state = ray.util.placement_group_table(pg).get("state")
        if state in ("CREATED", "PENDING", "RESCHEDULING"):
            ray.util.remove_placement_group(pg)
            return True
    except Exception:  # noqa: BLE001 - already gone, or no longer known to the GCS
        return False
    return False


def apply_gpu_share(device: str, gpus_per_worker: float) -> float | None:
    """Memory budget of a worker that holds a fraction of a GPU (``gpus_per_worker`` < 1).

    Ray places ``floor(1 / gpus_per_worker)`` such workers on one GPU; each caps its CUDA
    caching allocator at that fraction of the device's memory
    (``torch.cuda.set_per_process_memory_fraction``), so one trial cannot starve the others:
    it gets an out-of-memory error of its own instead. Returns the fraction recorded in the
    placement (also on a CPU worker, where nothing is capped), None for whole GPUs.
    How many fit: K = floor(1 / gpus_per_worker) with K x (peak trial memory + ~0.5 GiB CUDA
    context) <= device memory; a warm-cache trial's peak is printed by bench/bench_trials.py.
    """
    frac = float(gpus_per_worker or 0.0)
    if not 0.0 < frac < 1.0:
        return None
    if str(device).startswith("cuda"):
        import torch

        torch.cuda.set_per_process_memory_fraction(frac, torch.device(device))
    return frac


def _where(use_gpu: bool, local_rank: int) -> dict[str, Any]:
    """Node, process, GPUs Ray gave this process and the device it takes (``placement/rank<r>.json``)."""
    import ray
    import torch

    gpu_ids = [str(g) for g in ray.get_gpu_ids()] if use_gpu else []
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return {
        "local_rank": local_rank,
        "node_id": ray.get_runtime_context().get_node_id(),
        "hostname": socket.gethostname(),
        "pid": os.getpid(),
        "gpu_ids": gpu_ids,
        "cuda_visible_devices": visible,
        "assigned_resources": ray.get_runtime_context().get_assigned_resources(),
        "device": select_device(local_rank, use_gpu, torch.cuda.device_count(), gpu_ids, visible),
        # the device this worker takes when CUDA is present (what the placement logic decides)
        "gpu_ordinal": gpu_index_for_worker(local_rank, gpu_ids, visible) if use_gpu else None,
        "started_at": time.time(),
    }


def _placement_record(ctx, use_gpu: bool) -> dict[str, Any]:
    """Where this Ray Train worker runs and which device it takes."""
    import torch

    return {
        "world_rank": ctx.get_world_rank(), "world_size": ctx.get_world_size(),
        **_where(use_gpu, ctx.get_local_rank()),
        "distributed": bool(torch.distributed.is_available() and torch.distributed.is_initialized()),
        "placement_group_id": _current_pg_hex(),
    }


def train_loop_per_worker(loop_config: dict) -> None:
    """Ray Train worker body: train with ``ssvp.engine.fit`` and report each epoch."""
    import ray.train

    ctx = ray.train.get_context()

    def report(metrics: dict, ckpt_dir: str | None) -> None:
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(ckpt_dir) if ckpt_dir else None)

    placement = _placement_record(ctx, bool(loop_config["use_gpu"]))
    with errors_redacted():  # Ray Train's controller, Tune's error.txt and the console see only redacted text
        _train(loop_config, placement, ray.train.get_checkpoint(), report)


def _train(loop_config: dict, placement: dict, checkpoint, report) -> None:
    """One trial's training on this process: ``fit`` from the newest checkpoint, ``report(metrics,
    checkpoint folder or None)`` after each epoch (rank 0 passes its folder: last/, best/, history.json)."""
    from ssvp import engine

    from .storage import storage_path

    rank = placement["world_rank"]
    cfg, resume_from, history, work = _start(loop_config, placement, checkpoint)
    if loop_config.get("replicas"):  # class folds x seeds: several fits in lockstep, one report per epoch
        try:
            _train_replicas(cfg, loop_config, work, resume_from, history, rank, report)
        finally:
            _clean_up(work, resume_from)
        return
    last: dict[str, float] = {}

    def on_epoch(epoch: int, metrics: dict, ckpt_path: str | None) -> None:
        report_now = _numeric(metrics)
        report_now["epoch"] = float(epoch)
        last.clear()
        last.update(report_now)
        history[:] = [h for h in history if int(h.get("epoch", 0)) < epoch] + [dict(report_now)]
        ckpt = None
        if rank == 0 and ckpt_path:
            best_epoch = int(engine.load_checkpoint(work / "best").get("best_epoch", epoch)) if (work / "best").is_dir() else epoch
            (work / HISTORY_FILE).write_text(json.dumps({"epochs": history, "best_epoch": best_epoch}))
            ckpt = str(work)
        report(report_now, ckpt)

    try:
        result = engine.fit(cfg, on_epoch=on_epoch, checkpoint_dir=str(work), resume_from=resume_from)
        if loop_config.get("target_eval") == "all" and last:
            target: dict[str, float] = {}
            if rank == 0:
                best = work / "best"
                if best.is_dir():
                    target_report = engine.evaluate(cfg, str(best))
                    target = flatten_target_report(target_report)
                    if loop_config.get("trial_dir"):
                        # the full per-class report: logged as target_report.json on the child run
                        out = storage_path(loop_config["trial_dir"]) / "target_report.json"
                        out.write_text(json.dumps(target_report, indent=2, default=float))
            report({**last, **target, TARGET_DONE_KEY: 1.0, "best_epoch": float(result.best_epoch)}, None)
    finally:
        _clean_up(work, resume_from)


def _start(loop_config: dict, placement: dict, checkpoint) -> tuple[Any, str | None, list, Path]:
    """A trial's set-up on this process: its GPU share, its config on this device, the newest checkpoint
    and epoch history restored, its start and placement recorded (rank 0 / every rank), and a fresh
    work folder holding the earlier best heads. Returns (cfg, resume_from, history, work)."""
    from ssvp.config import Config

    from .storage import storage_path

    rank = placement["world_rank"]
    placement["gpu_memory_fraction"] = apply_gpu_share(placement["device"], loop_config.get("gpus_per_worker", 0.0))
    cfg = Config.from_dict(loop_config["cfg"]).override({"device": placement["device"]})
    resume_from, history = _restore(checkpoint, loop_config.get("trial_dir"))
    placement["resumed_epochs"] = len(history)
    if rank == 0 and loop_config.get("trial_dir"):
        record_start(loop_config["trial_dir"], placement)
    placement_dir = loop_config.get("placement_dir")
    if placement_dir:  # on the shared storage: a local folder or s3://
        storage_path(placement_dir).mkdir(parents=True, exist_ok=True)
        (storage_path(placement_dir) / f"rank{rank}.json").write_text(json.dumps(placement, indent=2, default=str))

    work = Path(tempfile.mkdtemp(prefix=f"ssvp-trial-rank{rank}-"))
    if resume_from and (Path(resume_from).parent / "best").is_dir():
        # fit rewrites best/ only when a later epoch improves on it: carry the earlier best over
        shutil.copytree(Path(resume_from).parent / "best", work / "best")
    return cfg, resume_from, history, work


def _clean_up(work: Path, resume_from: str | None) -> None:
    """The trial's work folder and the restored checkpoint's local copy go."""
    shutil.rmtree(work, ignore_errors=True)
    if resume_from:
        shutil.rmtree(Path(resume_from).parent, ignore_errors=True)


# --------------------------------------------------------------------------- class folds and seeds
REPLICA_DIR = "replica_{}"  # replica i >= 1 in <checkpoint>/replica_<i>/{last,best}; replica 0 in last/, best/


def replica_config(cfg, replica: Mapping[str, Any]):
    """A replica's config: its fold's classes held out (``data.val_classes``), the trial's seed + its offset."""
    over: dict[str, Any] = {"seed": cfg.train.seed + int(replica.get("seed_offset", 0))}
    if replica.get("val_classes") is not None:
        over["val_classes"] = list(replica["val_classes"])
    return cfg.override(over)


def _replica_starts(resume_from: str | None, n: int) -> list[str | None] | None:
    """Each replica's ``last/`` to resume from, all at the same epoch; None when they are not all there."""
    from ssvp import engine

    if not resume_from:
        return [None] * n
    root = Path(resume_from).parent
    lasts = [root / "last"] + [root / REPLICA_DIR.format(i) / "last" for i in range(1, n)]
    try:
        epochs = {int(engine.load_checkpoint(p)["epoch"]) for p in lasts}
    except Exception:  # noqa: BLE001 - a replica without a checkpoint: the trial starts over
        return None
    return [str(p) for p in lasts] if len(epochs) == 1 else None


def _train_replicas(cfg, loop_config: dict, work: Path, resume_from: str | None, history: list, rank: int,
                    report) -> None:
    """The trial's replicas (``tuning.folds``) in lockstep; each epoch one report of their aggregate, the
    checkpoint folder holding every replica's heads (replica 0's as the trial's ``last/`` and ``best/``)."""
    from ssvp import engine

    from .folds import aggregate, best_epoch, run_lockstep

    reps = loop_config["replicas"]
    labels = [r["label"] for r in reps]
    dirs = [work] + [work / REPLICA_DIR.format(i) for i in range(1, len(reps))]
    starts = _replica_starts(resume_from, len(reps))
    if starts is None:
        starts, resume_from = [None] * len(reps), None
        history.clear()
        shutil.rmtree(work / "best", ignore_errors=True)
    for i in range(1, len(reps)):
        if starts[i] and (Path(starts[i]).parent / "best").is_dir():
            shutil.copytree(Path(starts[i]).parent / "best", dirs[i] / "best")
    selected = dict(loop_config.get("selected") or {"val_objective": "max"})

    def fit_of(i: int):
        rcfg = replica_config(cfg, reps[i])
        return lambda on_epoch: engine.fit(rcfg, on_epoch=on_epoch, checkpoint_dir=str(dirs[i]), resume_from=starts[i])

    def on_round(epoch: int, rows: list[dict], ckpts: list[str | None]) -> None:
        agg = aggregate([_numeric(r) for r in rows], labels, selected, loop_config.get("risk"))
        agg["epoch"] = float(epoch)
        history[:] = [h for h in history if int(h.get("epoch", 0)) < epoch] + [dict(agg)]
        ckpt = None
        if rank == 0 and all(ckpts):
            best = best_epoch(history, "val_objective", selected.get("val_objective", "max")) or epoch
            (work / HISTORY_FILE).write_text(json.dumps({"epochs": history, "best_epoch": best, "replicas": labels}))
            ckpt = str(work)
        report(agg, ckpt)

    run_lockstep([fit_of(i) for i in range(len(reps))], on_round, start=len(history) if resume_from else 0)


# --------------------------------------------------------------------------- reused trial processes
TRIALS_IN_PROCESS = [0]  # trials this process has run (reuse_processes: the Tune actor lives on)
THREAD_END_WAIT_S = 300  # how long Tune waits for a stopped trial's thread before reusing its actor


def _process_placement(use_gpu: bool) -> dict[str, Any]:
    """Placement record of a trial that runs in its Tune actor (one worker, rank 0, no Train group)."""
    return {
        "world_rank": 0, "world_size": 1, **_where(use_gpu, 0), "distributed": False,
        "placement_group_id": None,  # Tune's own (kept for the next trial): never released by the driver
        "process": "reused Tune actor",
        "trial_in_process": TRIALS_IN_PROCESS[0],
    }


def _persist_checkpoint(work: str, trial_dir: str, epoch: int, keep: int) -> str:
    """Copy a trial's checkpoint folder to ``<trial_dir>/checkpoint_epoch_<NNNN>`` (local or s3://),
    keeping the ``keep`` newest; returns its path, as Ray Train's ``checkpoint_path`` would be."""
    from .storage import delete_dir, is_remote, join, list_dirs, upload_dir

    name = f"checkpoint_epoch_{epoch:04d}"
    dest = join(trial_dir, name)
    if is_remote(trial_dir):
        upload_dir(work, dest)
    else:
        Path(trial_dir).mkdir(parents=True, exist_ok=True)
        tmp = Path(trial_dir) / f".{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(work, tmp)
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(tmp, dest)
    older = sorted(n for n, _mtime in list_dirs(trial_dir) if n.startswith("checkpoint_epoch_") and n < name)
    for old in older[: max(0, len(older) - (keep - 1))]:
        delete_dir(join(trial_dir, old))
    return dest


def run_in_process(loop_config: dict, keep: int = 1) -> None:
    """``resources.reuse_processes``: the trial trains in this Tune actor, which Tune keeps for the next
    trial (``reuse_actors``): no worker group, no imports and, with a feature cache, no text-tower read
    after the first trial. Checkpoints and records go where a one-worker Ray Train run puts them."""
    import gc

    import ray.tune
    import torch

    from ssvp.lazy_backbones import KEEP_TEXT_ENV

    os.environ.setdefault(KEEP_TEXT_ENV, "1")
    # Tune hands this actor the next trial only after this trial's training thread has ended; a
    # trial ASHA stopped ends at its next report and unwinds (loaders, temporary folders), which
    # can take longer than Tune's default 2 s wait, and a failed wait fails the *next* trial
    os.environ.setdefault("TUNE_FUNCTION_THREAD_TIMEOUT_S", str(THREAD_END_WAIT_S))
    gc.collect()  # what a stopped previous trial left
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    TRIALS_IN_PROCESS[0] += 1
    trial_dir = loop_config["trial_dir"]

    def report(metrics: dict, ckpt_dir: str | None) -> None:
        if ckpt_dir:
            metrics = {**metrics, "checkpoint_path": _persist_checkpoint(ckpt_dir, trial_dir, int(metrics["epoch"]), keep)}
        ray.tune.report(metrics)

    with errors_redacted():  # Tune's error.txt and the console see only redacted text
        _train(loop_config, _process_placement(bool(loop_config["use_gpu"])), None, report)


# --------------------------------------------------------------------------- restore and restarts
def _checkpoint_epochs(folder: Path) -> int:
    """Epochs a Train checkpoint folder holds (0: incomplete or unreadable, e.g. a save cut short)."""
    from ssvp import engine

    try:
        epochs = json.loads((folder / HISTORY_FILE).read_text())["epochs"]
        state = engine.load_checkpoint(folder / "last")
        if not (folder / "best" / "head.pt").is_file():
            return 0
    except Exception:  # noqa: BLE001 - a partial or foreign folder is no checkpoint
        return 0
    n = int(state["epoch"]) + 1
    return n if len(epochs) >= n and int(epochs[n - 1].get("epoch", 0)) == n else 0


def newest_checkpoint(trial_dir: str | os.PathLike | None, also: str | os.PathLike | None = None) -> Path | None:
    """The complete Train checkpoint with the most epochs among ``trial_dir/checkpoint_*`` (and ``also``).

    Ray Train hands a restarted worker group the newest checkpoint it *registered*; one
    a worker wrote just before it was killed (or a driver kill cut the registration
    short) is on disk too, and training resumes from whichever holds more epochs.
    """
    cands = [Path(also)] if also else []
    if trial_dir and Path(trial_dir).is_dir():
        cands += [p for p in Path(trial_dir).glob("checkpoint_*") if p.is_dir()]
    scored = [(_checkpoint_epochs(c), c) for c in cands]
    scored = [(n, c) for n, c in scored if n > 0]
    return max(scored, key=lambda nc: nc[0])[1] if scored else None


def read_history(checkpoint: str | os.PathLike | None) -> tuple[list[dict[str, float]], int | None]:
    """``(per-epoch reports, best epoch)`` a checkpoint folder recorded (``[]``, None without one)."""
    try:
        data = json.loads((Path(checkpoint) / HISTORY_FILE).read_text())
        return [dict(e) for e in data["epochs"]], (int(data["best_epoch"]) if data.get("best_epoch") else None)
    except (OSError, ValueError, KeyError, TypeError):
        return [], None


def _restore(checkpoint, trial_dir: str | None) -> tuple[str | None, list[dict[str, float]]]:
    """``(resume_from = <ckpt>/last, history so far)`` from the newest complete checkpoint."""
    registered = None
    if checkpoint is not None:
        registered = Path(tempfile.mkdtemp(prefix="ssvp-restore-"))
        checkpoint.to_directory(str(registered))
    src = newest_checkpoint(trial_dir, registered)
    if src is None:
        return None, []
    if src != registered:
        if registered is not None:
            shutil.rmtree(registered, ignore_errors=True)
        local = Path(tempfile.mkdtemp(prefix="ssvp-restore-"))
        shutil.copytree(src, local, dirs_exist_ok=True)
        src = local
    return str(src / "last"), read_history(src)[0]


def record_start(trial_dir: str | os.PathLike, placement: Mapping[str, Any]) -> None:
    """Append this worker group's start to ``<trial_dir>/starts.jsonl`` (restarts = lines - 1);
    ``trial_dir`` on the shared storage: a local folder or an object-store URI (``s3://...``)."""
    import time

    from .storage import join, read_text, write_text

    line = {"time": time.time(), "pid": placement.get("pid"), "hostname": placement.get("hostname"),
            "resumed_epochs": placement.get("resumed_epochs", 0)}
    path = join(str(trial_dir), STARTS_FILE)  # an object has no append: read, add the line, write
    write_text(path, (read_text(path) or "") + json.dumps(line) + "\n")


def read_starts(trial_dir: str | os.PathLike | None) -> list[dict[str, Any]]:
    from .storage import join, read_text

    if not trial_dir:
        return []
    try:
        return [json.loads(ln) for ln in (read_text(join(str(trial_dir), STARTS_FILE)) or "").splitlines() if ln.strip()]
    except ValueError:
        return []


# --------------------------------------------------------------------------- failures
# errors that fail the same way on every attempt: retrying them only burns the cluster
DETERMINISTIC_ERRORS = ("NonFiniteLossError", "ConfigError", "DatasetError", "CheckpointError", "PathError",
                        "BackboneWeightsError", "GridMismatchError", "FeatureCacheError", "SpaceError")


def _causes(exc: BaseException | None):
    """``exc`` and what it wraps: Train's worker failures / controller failure, Ray task causes."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        failures = getattr(e, "worker_failures", None)
        if isinstance(failures, Mapping):
            todo.extend(failures[k] for k in sorted(failures))
        todo.extend([getattr(e, "controller_failure", None), getattr(e, "cause", None), e.__cause__])


# Ray's exit detail of a worker destroyed because its placement group was removed
PLACEMENT_GROUP_REMOVED = "placement group was removed"


def ended_by_its_driver(exc: BaseException) -> bool:
    """Whether Train's workers died because their placement group was removed.

    The sweep's driver removes a trial's placement group only once Tune has ended the trial (an
    ASHA stop, an error, a lost trial: :func:`release_trial_placement_group`), and Ray Train's own
    cleaner when it finds the controller dead. A retry would then start a new worker group whose
    placement group nobody frees once Tune kills the trial. Measured: such a retry left two
    placement groups behind, and a later trial waited for their resources for good. (Should a
    removal ever hit a trial that is not ending, the trial fails and ``trial_max_failures`` applies.)
    """
    return any(PLACEMENT_GROUP_REMOVED in str(e) for e in _causes(exc))


def is_deterministic(exc: BaseException) -> bool:
    """Whether a failure (possibly wrapped by Ray Train / Ray) is one of :data:`DETERMINISTIC_ERRORS`."""
    return any(c.__name__ in DETERMINISTIC_ERRORS for e in _causes(exc) for c in type(e).__mro__)


def root_cause(exc: BaseException) -> BaseException:
    """The exception the trial's code raised, dug out of Ray Train's wrappers (``exc`` if none)."""
    wrappers = {"TrainingFailedError", "WorkerGroupError", "ControllerError", "RayTaskError", "RayActorError",
                "ActorDiedError", "TuneError", "PreemptionError"}
    inner = [e for e in _causes(exc) if not any(c.__name__ in wrappers for c in type(e).__mro__)]
    return inner[0] if inner else exc


def _failure_policy(failure_config):
    """Ray Train's default policy, except that deterministic errors, and workers whose placement group
    was removed (the trial is being ended: :func:`ended_by_its_driver`), are raised at once (no retry)."""
    from ray.train.v2._internal.execution.failure_handling import DefaultFailurePolicy, FailurePolicy
    from ray.train.v2._internal.execution.failure_handling.failure_policy import FailureDecision

    class _NoRetryWhenFutile(DefaultFailurePolicy):
        def make_decision(self, training_failed_error):
            if is_deterministic(training_failed_error) or ended_by_its_driver(training_failed_error):
                return FailureDecision.RAISE
            return super().make_decision(training_failed_error)

    assert issubclass(_NoRetryWhenFutile, FailurePolicy)
    return _NoRetryWhenFutile(failure_config)


def trial_driver(config: dict, settings: TrialSettings) -> None:
    """Tune function trainable: one ``TorchTrainer`` run for this trial's config (or, with
    ``settings.reuse_processes``, the training itself in this reused actor: :func:`run_in_process`).
    What it raises is redacted (Tune writes it to ``<trial>/error.txt`` and the console)."""
    with errors_redacted():
        _trial_driver(config, settings)


def _trial_driver(config: dict, settings: TrialSettings) -> None:
    import ray.tune

    from .storage import join as storage_join
    from .storage import storage_path

    trial_id = ray.tune.get_context().get_trial_id()
    storage = settings.train_storage or os.path.join(tempfile.gettempdir(), "ssvp-train-runs")
    _refuse_known_fatal(storage_path(storage) / trial_id)  # Tune's retry of a deterministic failure: no rerun
    cfg, _variant = resolve_trial_config(settings.base, config, settings.variants)
    loop_config = {
        "cfg": cfg.to_dict(),
        "use_gpu": settings.use_gpu,
        "gpus_per_worker": float(settings.gpus_per_worker) if settings.use_gpu else 0.0,
        "placement_dir": storage_join(storage, trial_id, "placement"),
        "trial_dir": storage_join(storage, trial_id),
        "target_eval": settings.target_eval,
        "replicas": list(settings.replicas), "selected": dict(settings.selected), "risk": settings.risk,
    }
    try:
        if settings.reuse_processes:
            run_in_process(loop_config, keep=settings.checkpoints_to_keep)
        else:
            _train_run(settings, loop_config, trial_id, storage)
    except Exception as exc:  # noqa: BLE001 - Tune records the trial's own error, not Train's wrapper
        cause = root_cause(exc)
        if is_deterministic(cause):
            _remember_fatal(storage_path(storage) / trial_id, cause)
        if cause is exc:
            raise
        raise cause from None


def _train_run(settings: TrialSettings, loop_config: dict, trial_id: str, storage: str) -> None:
    """The trial as a Ray Train ``TorchTrainer`` run (its own worker group)."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    class _Trainer(TorchTrainer):  # Ray Train V2 has no public hook for the failure policy
        def _initialize_and_run_controller(self, **kwargs):
            kwargs["failure_policy"] = _failure_policy(self.run_config.failure_config)
            return super()._initialize_and_run_controller(**kwargs)

    _Trainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=settings.workers_per_trial,
            use_gpu=settings.use_gpu,
            resources_per_worker=settings.resources_per_worker(),
        ),
        torch_config=TorchConfig(backend=settings.torch_backend) if settings.torch_backend else None,
        run_config=ray.train.RunConfig(
            name=trial_id,  # stable name: a restarted / resumed trial finds its checkpoints again
            storage_path=storage,
            failure_config=ray.train.FailureConfig(max_failures=settings.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=settings.checkpoints_to_keep),
            callbacks=[TuneReportCallback()],
        ),
    ).fit()


def _remember_fatal(trial_dir, exc: BaseException) -> None:  # a Path or a storage.RemotePath
    try:
        trial_dir.mkdir(parents=True, exist_ok=True)
        (trial_dir / FATAL_FILE).write_text(json.dumps({"type": type(exc).__name__, "message": str(exc)[:4000]}))
    except OSError:
        pass


def _refuse_known_fatal(trial_dir) -> None:  # a Path or a storage.RemotePath
    """A trial that already failed deterministically fails again at once (``trial_max_failures``
    retries it otherwise, rebuilding the worker group to hit the same error)."""
    try:
        fatal = json.loads((trial_dir / FATAL_FILE).read_text())
    except (OSError, ValueError):
        return
    raise RuntimeError(f"{fatal.get('type')}: {fatal.get('message')} (deterministic: not retried)")
