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
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import socket
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

__all__ = [
    "TrialSettings",
    "select_device",
    "gpu_index_for_worker",
    "resolve_trial_config",
    "trial_driver",
    "train_loop_per_worker",
    "target_metric_name",
    "flatten_target_report",
    "release_trial_placement_group",
    "VARIANT_KEY",
]

VARIANT_KEY = "variant"  # param-space key that selects a named bundle of overrides
TARGET_DONE_KEY = "target_eval_done"


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
    """MLflow-safe metric name for a target dataset: ``target_<dataset>_<metric>``."""
    fmt, _, root = spec.partition(":")
    name = Path(root.rstrip("/")).name or fmt
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)
    return f"target_{name}_{metric}"


def flatten_target_report(report: Mapping[str, Any]) -> dict[str, float]:
    """``evaluate()``'s ``{spec: {"mean": {...}}}`` -> flat ``target_<ds>_<metric>`` floats (+ means over targets)."""
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
            out[f"target_mean_{metric}"] = float(sum(finite) / len(finite)) if finite else float("nan")
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


def _placement_record(ctx, use_gpu: bool) -> dict[str, Any]:
    """Where this Ray Train worker runs and which device it takes (``placement/rank<r>.json``)."""
    import ray
    import torch

    local_rank = ctx.get_local_rank()
    gpu_ids = [str(g) for g in ray.get_gpu_ids()] if use_gpu else []
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    device = select_device(local_rank, use_gpu, torch.cuda.device_count(), gpu_ids, visible)
    return {
        "world_rank": ctx.get_world_rank(),
        "local_rank": local_rank,
        "world_size": ctx.get_world_size(),
        "node_id": ray.get_runtime_context().get_node_id(),
        "hostname": socket.gethostname(),
        "pid": os.getpid(),
        "gpu_ids": gpu_ids,
        "cuda_visible_devices": visible,
        "assigned_resources": ray.get_runtime_context().get_assigned_resources(),
        "device": device,
        # the device this worker takes when CUDA is present (what the placement logic decides)
        "gpu_ordinal": gpu_index_for_worker(local_rank, gpu_ids, visible) if use_gpu else None,
        "distributed": bool(torch.distributed.is_available() and torch.distributed.is_initialized()),
        "placement_group_id": _current_pg_hex(),
    }


def train_loop_per_worker(loop_config: dict) -> None:
    """Ray Train worker body: train with ``ssvp.engine.fit`` and report each epoch."""
    import ray
    import ray.train

    from ssvp import engine
    from ssvp.config import Config

    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    placement = _placement_record(ctx, bool(loop_config["use_gpu"]))
    cfg = Config.from_dict(loop_config["cfg"]).override({"device": placement["device"]})
    resume_from = None
    checkpoint = ray.train.get_checkpoint()  # set when Train restarted the workers or the trial resumed
    if checkpoint is not None:
        restored = Path(tempfile.mkdtemp(prefix="ssvp-restore-"))
        checkpoint.to_directory(str(restored))
        if (restored / "last").is_dir():
            resume_from = str(restored / "last")
    placement["resumed_epochs"] = int(engine.load_checkpoint(resume_from)["epoch"]) + 1 if resume_from else 0
    placement_dir = loop_config.get("placement_dir")
    from .storage import storage_path

    if placement_dir:  # on the shared storage: a local folder or s3://
        storage_path(placement_dir).mkdir(parents=True, exist_ok=True)
        (storage_path(placement_dir) / f"rank{rank}.json").write_text(json.dumps(placement, indent=2, default=str))

    work = Path(tempfile.mkdtemp(prefix=f"ssvp-trial-rank{rank}-"))
    if resume_from and (Path(resume_from).parent / "best").is_dir():
        # fit rewrites best/ only when a later epoch improves on it: carry the earlier best over
        shutil.copytree(Path(resume_from).parent / "best", work / "best")
    last: dict[str, float] = {}

    def on_epoch(epoch: int, metrics: dict, ckpt_path: str | None) -> None:
        report = _numeric(metrics)
        report["epoch"] = float(epoch)
        last.clear()
        last.update(report)
        ckpt = None
        if rank == 0 and ckpt_path:
            ckpt = ray.train.Checkpoint.from_directory(str(work))  # holds last/ and best/
        ray.train.report(report, checkpoint=ckpt)

    try:
        result = engine.fit(cfg, on_epoch=on_epoch, checkpoint_dir=str(work), resume_from=resume_from)
        if loop_config.get("target_eval") == "all" and last:
            target: dict[str, float] = {}
            if rank == 0:
                best = work / "best"
                if best.is_dir():
                    report = engine.evaluate(cfg, str(best))
                    target = flatten_target_report(report)
                    if loop_config.get("trial_dir"):
                        # the full per-class report: logged as target_report.json on the child run
                        out = storage_path(loop_config["trial_dir"]) / "target_report.json"
                        out.write_text(json.dumps(report, indent=2, default=float))
            final = {**last, **target, TARGET_DONE_KEY: 1.0, "best_epoch": float(result.best_epoch)}
            ray.train.report(final, checkpoint=None)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if resume_from:
            shutil.rmtree(Path(resume_from).parent, ignore_errors=True)


def trial_driver(config: dict, settings: TrialSettings) -> None:
    """Tune function trainable: one ``TorchTrainer`` run for this trial's config."""
    import ray.train
    import ray.tune
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    from .storage import join as storage_join

    trial_id = ray.tune.get_context().get_trial_id()
    cfg, _variant = resolve_trial_config(settings.base, config, settings.variants)
    storage = settings.train_storage or os.path.join(tempfile.gettempdir(), "ssvp-train-runs")
    loop_config = {
        "cfg": cfg.to_dict(),
        "use_gpu": settings.use_gpu,
        "placement_dir": storage_join(storage, trial_id, "placement"),
        "trial_dir": storage_join(storage, trial_id),
        "target_eval": settings.target_eval,
    }
    trainer = TorchTrainer(
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
    )
    trainer.fit()
