"""Run an ablation grid (variants x seeds) on Ray and write the paper-style tables and plots.

    python ablations/grid.py --grid ablations/configs/quick.yaml --local            # this machine
    ray job submit --working-dir . -- python ablations/grid.py --grid ablations/configs/table3.yaml
    python ablations/grid.py --grid ablations/configs/table3.yaml --resume          # continue / retry report

Each variant-seed pair is one Ray Tune trial of a plain grid (``BasicVariantGenerator``:
``seed`` is a grid key, the variant a named bundle of overrides), each trial one Ray
Train run (``tuning.runner.run_trials``), all under one MLflow parent run with a child
run per trial. Every finished trial evaluates its best heads on the grid's target
datasets (``target_eval="all"``); the grid then aggregates the per-seed results into
``results.md`` / ``results.csv`` / ``paired.csv`` and PNG plots (``ablations.aggregate``),
writes them under ``--out`` and logs them to the parent run.

A failed variant-seed stays in the table as failed ("E: 2/3 seeds, 1 failed").
``--resume`` continues an interrupted grid (same ``--name``/storage): finished and failed
trials are kept, unfinished ones continue from their last checkpoint, and the MLflow
parent run is reopened rather than duplicated.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

if __package__ in (None, ""):
    # Run as a script (`python ablations/grid.py`, also what `ray job submit -- ...` runs): Python put
    # ablations/ first on sys.path; its modules must be imported as ablations.*, from the repo root.
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(_here.parent))

from ablations.aggregate import METRICS, metric_columns, rebuild_report, write_report
from ablations.spec import Grid, GridError, load_grid
from ssvp.config import Config
from tuning.settings import MlflowSettings, ResourceSettings, SearchSettings, SweepConfig

__all__ = [
    "build_parser", "main", "run_grid", "plan_grid", "grid_sweep", "GridRun", "records_from_summary",
    "ensure_synthetic", "GRID_STATE", "cell_protocols",
]

GRID_STATE = "grid.json"  # what was run: grid file, seeds, sweep name, MLflow ids (in --out)
SEED_KEY = "seed"
EXPERIMENT = "ssvp-ablations"


# --------------------------------------------------------------------------- data
def ensure_synthetic(cfg) -> list[Path]:
    """Generate the built-in synthetic benchmark where a ``synthetic:`` root is missing.

    Only roots named like a synthetic domain (``.../domain_a``) are generated, into
    their parent folder, with seed 0 (the quick grid's data); returns the folders written.
    """
    from ssvp.data.synthetic import DOMAINS, make_synthetic

    written = []
    for spec in [cfg.data.source, *cfg.data.targets]:
        fmt, _, root = spec.partition(":")
        path = Path(root)
        if fmt != "synthetic" or path.exists():
            continue
        if path.name not in DOMAINS:
            raise GridError(f"dataset {spec}: {path} does not exist (and is not a synthetic domain: {', '.join(DOMAINS)})")
        print(f"[ablations] generating the synthetic benchmark under {path.parent}", flush=True)
        make_synthetic(path.parent, seed=0)
        written.append(path.parent)
    return written


# --------------------------------------------------------------------------- results
def _target_metrics(trial_metrics: Mapping[str, float], targets: list[str]) -> dict[str, dict[str, Any]]:
    from tuning.trial import target_metric_name

    out: dict[str, dict[str, Any]] = {}
    for spec in targets:
        mean = {}
        for key, _ in METRICS:
            value = trial_metrics.get(target_metric_name(spec, key))
            if value is not None:
                mean[key] = float(value)
        if mean:
            out[spec] = {"mean": mean}
    return out


def _placement(train_dir, trial_id: str) -> dict[str, Any]:
    f = train_dir / trial_id / "placement" / "rank0.json"
    try:
        return json.loads(f.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def records_from_summary(summary, base_cfg) -> list[dict[str, Any]]:
    """One record per variant-seed trial of a ``tuning.runner.ResultSummary``.

    Finished trials with target metrics are ``ok``; failed ones (and finished ones whose
    target evaluation produced nothing) are ``failed`` with the reason; interrupted
    trials give no record (they show as missing until resumed).
    """
    from tuning.storage import storage_path

    exp = storage_path(summary.experiment_path)
    train_dir = exp.parent / f"{exp.name}.train"  # a local folder or s3://
    targets = list(base_cfg.data.targets)
    records = []
    for t in summary.trials:
        variant = t.variant or t.params.get("variant")
        seed = t.params.get(SEED_KEY)
        if variant is None or seed is None or t.status == "KILLED":
            continue
        place = _placement(train_dir, t.trial_id)
        rec: dict[str, Any] = {
            "trial_id": t.trial_id,
            "variant": variant,
            "seed": int(seed),
            "run_id": t.run_id,
            "checkpoint": t.checkpoint,
            "node_id": place.get("node_id"),
            "hostname": place.get("hostname"),
        }
        report = getattr(t, "target_report", None)  # full per-class report when the runner provides it
        metrics = {spec: table for spec, table in report.items()} if report else _target_metrics(t.metrics, targets)
        if t.status in ("FINISHED", "EARLY_STOPPED") and metrics:
            rec.update(status="ok", metrics=metrics,
                       val={k: v for k, v in t.metrics.items() if k.startswith(("best_", "final_"))})
        else:
            rec.update(status="failed", error=t.error or f"trial {t.status.lower()} without target metrics")
        records.append(rec)
    return records


def _evaluate_checkpoint(cfg_dict: dict, checkpoint: str) -> dict:
    """Ray task: the full per-class target report of one trial's best heads (``--per-class``)."""
    import torch

    from ssvp import engine
    from ssvp.config import Config

    from tuning.storage import local_copy

    device = "cuda:0" if torch.cuda.is_available() else "cpu"
    with local_copy(checkpoint) as local:  # read back from the storage path (s3:// too)
        return engine.evaluate(Config.from_dict(cfg_dict).override({"device": device}), str(local))


def add_per_class(records: list[dict[str, Any]], base_cfg, variants: Mapping[str, Any], use_gpu: bool, cpus: float) -> None:
    """Fill per-class tables by evaluating each ok trial's best heads (when the runner gave only means)."""
    import ray

    from tuning.trial import resolve_trial_config

    todo = [r for r in records if r["status"] == "ok" and r.get("checkpoint")
            and not any(len(t) > 1 or "per_class" in t for t in r["metrics"].values())]
    if not todo:
        return
    remote = ray.remote(_evaluate_checkpoint).options(num_cpus=cpus, num_gpus=1 if use_gpu else 0)
    refs = []
    for r in todo:
        cfg, _ = resolve_trial_config(base_cfg.to_dict(), {"variant": r["variant"], SEED_KEY: r["seed"]}, variants)
        refs.append(remote.remote(cfg.to_dict(), r["checkpoint"]))
    for r, ref in zip(todo, refs):
        try:
            r["metrics"] = ray.get(ref)
        except Exception as exc:  # noqa: BLE001 - keep the means, say why per-class is absent
            r["per_class_error"] = f"{type(exc).__name__}: {exc}"


def write_records(records: list[dict[str, Any]], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for r in records:
            f.write(json.dumps(r, default=_json_default) + "\n")
    return path


def _json_default(obj: Any):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if hasattr(obj, "item"):
        return obj.item()
    return str(obj)


# --------------------------------------------------------------------------- CLI
def _key_value(text: str) -> tuple[str, Any]:
    import yaml

    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--set expects KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError:
        parsed = value
    if isinstance(parsed, str) and "," in parsed and key.strip() in ("targets", "data.targets"):
        parsed = [v.strip() for v in parsed.split(",") if v.strip()]
    if key.strip() in ("targets", "data.targets") and isinstance(parsed, str):
        parsed = [parsed]
    return key.strip(), parsed if parsed is not None else value


def _bool_or_auto(text: str):
    t = text.lower()
    if t == "auto":
        return "auto"
    if t in ("1", "true", "yes", "on"):
        return True
    if t in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected auto, true or false; got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ablations/grid.py",
        description="Run an SSVP ablation grid (variants x seeds) with Ray Tune + Ray Train, recorded in MLflow.",
    )
    p.add_argument("--grid", required=True, help="grid YAML (ablations/configs/NAME.yaml, or just NAME)")
    p.add_argument("--seeds", type=int, default=None, help="seeds per variant (default: the grid's 'seeds')")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--local", action="store_true", help="start Ray in this process (127.0.0.1 only)")
    where.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else local)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of a --local Ray (default: all)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted grid (same --name and storage)")
    p.add_argument("--name", default=None, help="grid run name: Tune experiment + MLflow parent run (default: grid name)")
    p.add_argument("--out", default=None, help="folder for records.jsonl, tables and plots (default runs/ablations/NAME)")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else sqlite:////CWD/runs/mlflow.db)")
    p.add_argument("--artifact-location", default=None,
                   help="artifact root for a new experiment on a SQLite store (default: mlartifacts/ beside the .db)")
    p.add_argument("--experiment", default=EXPERIMENT, help=f"MLflow experiment (default {EXPERIMENT})")
    p.add_argument("--register-model", default="", metavar="NAME",
                   help="register each finished variant-seed's best heads as a version of the MLflow model NAME "
                        "(tagged variant, seed; models:/NAME/<version>)")
    p.add_argument("--storage-path", default=None,
                   help="Ray Tune/Train storage, a shared folder or s3://BUCKET/PATH (default: SSVP_STORAGE_PATH, else runs/ray)")
    p.add_argument("--data-root", default=None, help="folder that data/ in dataset paths stands for "
                   "(default: SSVP_DATA_ROOT, else ./data)")
    p.add_argument("--feature-cache", default=None,
                   help="frozen-feature cache folder (default: SSVP_FEATURE_CACHE, else the grid's feature_cache)")
    p.add_argument("--variants", default=None, help="comma-separated subset of variants (names or letters)")
    p.add_argument("--set", type=_key_value, action="append", default=[], metavar="KEY=VALUE",
                   help="override a base config key for every variant (repeatable), e.g. --set source=visa:/data/VisA")
    p.add_argument("--per-class", action="store_true", help="also tabulate each class of each target")
    p.add_argument("--columns", default=None, metavar="I-AUROC,P-AUROC,...",
                   help="metric columns of results.md / results.tex, in order (default: the grid's 'columns', "
                        f"else all: {','.join(t for _, t in METRICS)})")
    p.add_argument("--use-gpu", type=_bool_or_auto, default=None, help="auto | true | false (default: auto)")
    p.add_argument("--cpus-per-trial", type=float, default=None, help="CPUs of a trial's Train worker (default: grid resources.cpu)")
    p.add_argument("--gpus-per-trial", type=float, default=None, help="GPUs of a trial's Train worker (default: grid resources.gpu)")
    p.add_argument("--resources-per-trial", type=json.loads, default=None, metavar="JSON",
                   help='extra custom Ray resources per trial, e.g. \'{"gpu_node": 1}\'')
    p.add_argument("--max-concurrent", type=int, default=None, help="trials at once (default: grid max_concurrent, else what fits)")
    p.add_argument("--reuse-processes", action="store_true",
                   help="trials train in reused Tune actors (imports and the text tower once per process; "
                        "no Ray Train worker-group restarts: --max-failures does not apply)")
    p.add_argument("--max-failures", type=int, default=1,
                   help="Ray Train restarts of a failing trial's worker group before it counts as failed (default 1)")
    p.add_argument("--dry-run", action="store_true", help="check the grid and print its trials; start nothing")
    p.add_argument("--print-config", action="store_true",
                   help="print the sweep the grid runs (tuning.settings.SweepConfig as YAML); start nothing")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--quiet", action="store_true", help="print only the tables at the end (no line per trial)")
    out.add_argument("--verbose", action="store_true",
                     help="also Tune's progress table and Ray's own logs (default: one line per finished trial)")
    return p


def _grid_path(text: str) -> Path:
    p = Path(text)
    if p.is_file():
        return p
    candidate = Path(__file__).resolve().parent / "configs" / f"{text}.yaml"
    if candidate.is_file():
        return candidate
    raise GridError(f"grid file {text} does not exist (nor ablations/configs/{text}.yaml)")


@dataclass
class GridRun:
    """What the command line asks of a grid: which variants and seeds, on what base, written where."""

    grid: Grid
    seeds: list[int]
    chosen: list[str]  # variant names (the reference always among them)
    base: Config  # --set applied, paths absolute
    name: str  # Tune experiment + MLflow parent run
    out: Path  # records.jsonl, grid.json, tables and plots

    @property
    def variants(self) -> dict[str, dict[str, Any]]:
        return {v: self.grid.variant(v).overrides for v in self.chosen}


def plan_grid(args: argparse.Namespace) -> GridRun:
    """Load the grid file and check every chosen variant builds, before anything starts."""
    from ssvp.paths import apply_flags, resolve_local
    from tuning.runner import absolutize_paths

    apply_flags(args.data_root, args.feature_cache)
    grid = load_grid(_grid_path(args.grid))
    seeds = grid.seed_values(args.seeds)
    chosen = [grid.variant(v.strip()).name for v in args.variants.split(",")] if args.variants else grid.variant_names
    if args.variants and grid.reference not in chosen:
        chosen.append(grid.reference)  # the paired comparison needs the reference
    if getattr(args, "columns", None):  # a mistyped column fails now, not after the grid ran
        try:
            metric_columns(args.columns)
        except ValueError as exc:
            raise GridError(f"--columns: {exc}") from None
    extra = dict(args.set)
    for v in chosen:  # every variant must build before anything starts
        grid.variant_config(v, seeds[0], extra)
    name = args.name or grid.name
    out = resolve_local(args.out or Path("runs") / "ablations" / name, what="output folder",
                        origin="--out" if args.out else "default", flag="--out", env=None)
    return GridRun(grid=grid, seeds=seeds, chosen=chosen, base=absolutize_paths(grid.base_config(extra)),
                   name=name, out=out)


def check_resume(run: GridRun) -> None:
    """A resume must ask for the seeds and variants the grid was started with."""
    state_file = run.out / GRID_STATE
    if not state_file.is_file():
        return
    state = json.loads(state_file.read_text())
    if state.get("seeds") != run.seeds or state.get("variants") != run.chosen:
        raise GridError(
            f"--resume: {state_file} was run with seeds {state.get('seeds')} and variants {state.get('variants')}; "
            f"now {run.seeds} and {run.chosen}. Resume with the same --seeds/--variants, or use another --name/--out."
        )


def print_dry_run(run: GridRun) -> dict[str, Any]:
    grid, base, n = run.grid, run.base, len(run.chosen) * len(run.seeds)
    print(f"grid {grid.name} ({grid.path}): {len(run.chosen)} variants x {len(run.seeds)} seeds = {n} trials")
    for v in run.chosen:
        var = grid.variant(v)
        print(f"  {var.label:<28} {json.dumps(var.overrides)}")
    print(f"seeds: {run.seeds}; reference: {grid.reference}; resources per trial: {grid.resources}")
    print(f"base: source={base.data.source} targets={base.data.targets} clip={base.model.clip_model} "
          f"dino={base.model.dino_model} epochs={base.train.epochs}")
    protocols = cell_protocols(run)
    print("protocol: " + (next(iter(protocols.values())) if len(set(protocols.values())) == 1
                          else ", ".join(f"{v}={p}" for v, p in protocols.items())))
    return {"dry_run": True, "trials": n}


def _connect(args: argparse.Namespace) -> None:
    from tuning.runner import init_ray

    ray_logs = bool(getattr(args, "verbose", False))  # Ray's worker logs and start-up lines only with --verbose
    if args.local:
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        init_ray(None, num_cpus=args.num_cpus, log_to_driver=ray_logs)
    else:
        address = args.address or os.environ.get("RAY_ADDRESS")
        init_ray(address or None, num_cpus=args.num_cpus if not address else None, log_to_driver=ray_logs)


def _trial_resources(run: GridRun, args: argparse.Namespace) -> tuple[float, float, Any]:
    """(cpus, gpus, use_gpu) of one trial's Train worker: the flags, else the grid's ``resources``."""
    cpus = args.cpus_per_trial if args.cpus_per_trial is not None else run.grid.resources["cpu"]
    gpus = args.gpus_per_trial if args.gpus_per_trial is not None else run.grid.resources["gpu"]
    use_gpu = args.use_gpu if args.use_gpu is not None else ("auto" if gpus > 0 else False)
    return cpus, gpus, use_gpu


def cell_protocols(run: GridRun) -> dict[str, str]:
    """Each chosen variant's ``train.protocol``: ``paper`` (the config default, arXiv 2601.09147 §4.1-4.2:
    all source classes, the last epoch is the model) unless the grid's base, ``--set`` or the variant
    asks for ``select`` (held-out source classes pick the epoch)."""
    return {v: run.base.override(run.grid.variant(v).overrides).train.protocol for v in run.chosen}


def _grid_metric(run: GridRun) -> dict[str, str]:
    """What the console and the summary rank cells by: ``val_objective`` when every cell selects on
    held-out source classes, else ``train_loss`` (the paper protocol holds nothing out)."""
    if set(cell_protocols(run).values()) == {"select"}:
        return {"metric": "val_objective", "mode": "max"}
    return {"metric": "train_loss", "mode": "min"}


def grid_sweep(run: GridRun, args: argparse.Namespace, grid_copy: Path) -> SweepConfig:
    """The grid as a :class:`tuning.settings.SweepConfig`: a plain grid over ``seed`` x variants.

    No scheduler (every variant-seed trains its full schedule: no early stopping in
    ablations), and every finished trial is evaluated on the targets (``target_eval="all"``)
    with the model its protocol produced (:func:`cell_protocols`; no protocol is forced, unlike a
    search, whose trials all select).
    """
    grid, seeds = run.grid, run.seeds
    cpus, gpus, use_gpu = _trial_resources(run, args)
    from tuning.paths import resolve_locations, source_tags

    where = resolve_locations(tracking_uri=args.tracking_uri, storage_path=args.storage_path,
                              artifact_location=args.artifact_location)
    tracking_uri, artifact_location = where.tracking_uri, where.artifact_location
    return SweepConfig(
        name=run.name, base=run.base, space={SEED_KEY: {"type": "grid", "values": seeds}}, variants=run.variants,
        search=SearchSettings(
            algorithm="grid", num_samples=1, seed=0, points_to_evaluate=None, scheduler=None, **_grid_metric(run),
            max_concurrent_trials=args.max_concurrent if args.max_concurrent is not None else (grid.max_concurrent or None),
        ),
        resources=ResourceSettings(
            use_gpu=use_gpu, cpus_per_worker=cpus, gpus_per_worker=gpus if gpus > 0 else 1.0,
            extra=dict(args.resources_per_trial or {}), max_failures=args.max_failures,
            reuse_processes=bool(getattr(args, "reuse_processes", False)),
        ),
        mlflow=MlflowSettings(
            tracking_uri=tracking_uri, artifact_location=artifact_location, experiment=args.experiment,
            parent_tags={**source_tags(grid.path), "role_detail": "ablation_grid", "grid": grid.name,
                         "seeds": ",".join(map(str, seeds)), "reference": grid.reference},
            parent_params={"grid.name": grid.name, "grid.seeds": len(seeds), "grid.variants": ",".join(run.chosen),
                           "grid.reference": grid.reference},
            parent_artifacts={"ablation": str(grid_copy)},
            run_labels={v.name: f"{v.letter}/{v.name}" if v.letter else v.name for v in grid.variants},
            register_model=getattr(args, "register_model", "") or "",
        ),
        storage_path=where.storage_path,
        target_eval="all",
        protocol=None,  # each cell's own train.protocol: paper (all source classes, last epoch) unless asked
        verbose=0 if args.quiet else 2 if getattr(args, "verbose", False) else 1,
    )


def run_grid(args: argparse.Namespace) -> dict[str, Any]:
    """Run (or resume) the grid described by parsed CLI ``args``; returns a summary dict."""
    run = plan_grid(args)
    if args.resume:
        check_resume(run)
    if args.dry_run:
        return print_dry_run(run)
    if args.print_config:
        print(grid_sweep(run, args, run.out / "grid.yaml").to_yaml(), end="", flush=True)
        return {"dry_run": True}
    if not args.resume and (run.out / GRID_STATE).is_file():
        return reprint_finished(run, args)  # nothing is started: its report again, or the way out
    ensure_synthetic(run.base)
    from tuning.preflight import check_writable
    from tuning.runner import run_trials

    check_writable(run.out, "--out folder")  # a bad --out fails now, in one line, not after the grid ran
    _connect(args)
    run.out.mkdir(parents=True, exist_ok=True)
    grid_copy = run.out / "grid.yaml"
    grid_copy.write_text(Path(run.grid.path).read_text())
    started = time.time()
    summary = run_trials(grid_sweep(run, args, grid_copy), resume=args.resume)
    return write_outputs(run, summary, args, started)


def write_outputs(run: GridRun, summary, args: argparse.Namespace, started: float) -> dict[str, Any]:
    """records.jsonl, grid.json, the tables and plots under ``run.out``, logged on the parent run."""
    from ssvp.paths import launch_dir
    from tuning.paths import config_name

    records = records_from_summary(summary, run.base)
    if args.per_class:
        import ray

        cpus, gpus, use_gpu = _trial_resources(run, args)
        gpu_eval = gpus > 0 and (use_gpu is True or (use_gpu == "auto" and ray.cluster_resources().get("GPU", 0) >= 1))
        add_per_class(records, run.base, run.variants, use_gpu=gpu_eval, cpus=cpus)
    out, grid = run.out, run.grid
    write_records(records, out / "records.jsonl")
    state = {
        # the grid file as the user named it and where they launched from (not a `ray job submit` copy)
        "grid": grid.name, "grid_file": config_name(grid.path), "launch_dir": str(launch_dir()),
        "name": run.name, "seeds": run.seeds,
        "variants": run.chosen, "reference": grid.reference, "tracking_uri": summary.tracking_uri,
        "experiment": summary.experiment, "parent_run_id": summary.parent_run_id,
        "experiment_path": summary.experiment_path, "interrupted": summary.interrupted,
        "seconds": round(time.time() - started, 1), "set": dict(args.set),
    }
    (out / GRID_STATE).write_text(json.dumps(state, indent=2))
    written = write_report(_subgrid(grid, run.chosen), records, out, seeds=run.seeds, per_class=args.per_class,
                           columns=getattr(args, "columns", None))
    _log_to_parent(summary, out, [out / GRID_STATE, out / "records.jsonl", *written.values()])
    print((out / "results.md").read_text(), flush=True)
    print(f"[ablations] tables and plots in {out}; MLflow parent run {summary.parent_run_id} "
          f"(experiment {summary.experiment!r}): {summary.how_to_view()}", flush=True)
    return {"summary": summary, "records": records, "out": out, "written": written, "state": state}


def reprint_finished(run: GridRun, args: argparse.Namespace) -> dict[str, Any]:
    """The command of a grid that finished in ``run.out``, run again: its report, rebuilt from
    records.jsonl (nothing runs), and how to start a new run. ``GridError`` when ``run.out`` holds
    an interrupted run (--resume) or another one (other seeds, variants, name or --set)."""
    state = json.loads((run.out / GRID_STATE).read_text())
    was = (f"grid {state.get('grid')!r} as {state.get('name')!r}, seeds {state.get('seeds')}, "
           f"variants {', '.join(state.get('variants') or [])}" + (f", --set {state['set']}" if state.get("set") else ""))
    new = f"--name {run.name}-2" + (" --out OTHER_FOLDER" if args.out else "")
    if (state.get("name"), state.get("seeds"), state.get("variants"), state.get("set") or {}) != (
            run.name, run.seeds, run.chosen, dict(args.set)):
        raise GridError(f"{run.out} already holds another run ({was}); start a new one with {new}, "
                        "or continue that one with --resume and its --seeds/--variants")
    if state.get("interrupted"):
        raise GridError(f"{run.out} holds an interrupted run ({was}): continue it with the same command and "
                        f"--resume, or start a new one with {new}")
    try:
        text, written = rebuild_report(_subgrid(run.grid, run.chosen), run.out, seeds=run.seeds,
                                       per_class=args.per_class, columns=getattr(args, "columns", None))
    except FileNotFoundError as exc:
        raise GridError(f"{run.out} holds a finished run ({was}) but {exc}; start a new one with {new}") from None
    print(text, flush=True)
    print(f"[ablations] this grid already finished in {run.out} ({was}; {state.get('seconds', '?')} s; MLflow parent "
          f"run {state.get('parent_run_id')} in experiment {state.get('experiment')!r} at {state.get('tracking_uri')}): "
          f"its report is above, rebuilt from records.jsonl; nothing was run.\n"
          f"[ablations] to run it again from scratch add {new}; for per-class tables add --resume --per-class",
          flush=True)
    return {"dry_run": True, "finished_before": state, "written": written}


def _subgrid(grid: Grid, chosen: list[str]) -> Grid:
    import copy

    sub = copy.copy(grid)
    sub.variants = [v for v in grid.variants if v.name in chosen]
    return sub


def _log_to_parent(summary, out: Path, files: list[Path]) -> None:
    """The grid's tables, plots and records as artifacts of the MLflow parent run (folder ``ablation/``)."""
    from tuning.tracking import SweepTracker

    tracker = SweepTracker(summary.tracking_uri, summary.experiment, sweep_id=summary.name,
                           parent_run_id=summary.parent_run_id, experiment_id=summary.experiment_id)
    for f in files:
        if Path(f).is_file():
            tracker.log_artifact(summary.parent_run_id, f, "ablation")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from ssvp.config import ConfigError

    try:
        result = run_grid(args)
    except (GridError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        if type(exc).__name__ != "SweepExistsError" and "already has a sweep" not in str(exc):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # pre-flight (data, storage, tracking, --out), space and sweep settings
        from tuning.redact import redact_text

        print(f"error: {redact_text(str(exc))}", file=sys.stderr)
        return 2
    except OSError as exc:  # disk full, unwritable folder: the MLflow runs are closed by run_trials
        print(f"error: {exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else ""), file=sys.stderr)
        return 1
    if result.get("dry_run"):
        return 0
    summary = result["summary"]
    failed = [r for r in result["records"] if r["status"] != "ok"]
    if summary.interrupted:
        print("[ablations] the grid was interrupted: rerun the same command with --resume", file=sys.stderr)
        return 3
    return 1 if failed and len(failed) == len(result["records"]) else 0


if __name__ == "__main__":
    sys.exit(main())
