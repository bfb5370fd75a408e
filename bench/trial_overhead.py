"""What one Ray Train trial costs before it trains: wall time by phase, and CPU by Ray process kind.

Every trial of a sweep is a Tune function trainable that builds a ``TorchTrainer`` (``tuning.trial``),
so each one starts a Tune actor, a Train controller, its worker(s) and Ray Train's helper actors, each
a new Python process. This script runs ``--trials`` trials whose training loop does nothing, on a
local Ray started as a sweep starts it (``tuning.ray_session.init_ray``), and prints:

* per trial: Tune actor start -> worker loop start (the start-up) -> ``fit()`` returned (the tail
  after the loop ended) -> the next Tune actor ("-" where Tune ended the trial before a mark);
* the machine's CPU seconds (``/proc/stat``, so run it on an idle machine) for Ray's start and for
  the trials, and the CPU seconds of each kind of Ray process, summed over the processes sampled;
* how many of the session's Train logs report a worker destroyed because its placement group
  was removed (``tuning.trial.PLACEMENT_GROUP_REMOVED``).

It is the measurement behind the test-time figures in the README and bench/README.md ("Trial
overhead"). ``--health-check-interval`` sets Ray Train's ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``
(2 s by default) for the run, to measure the tail it governs.

    python bench/trial_overhead.py --trials 4
    python bench/trial_overhead.py --trials 4 --concurrent 2 --health-check-interval 0.25
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def machine_cpu_s() -> float:
    """Busy CPU seconds of the whole machine since boot (user + nice + system + irq + softirq)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:8]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


class ProcessSampler(threading.Thread):
    """Samples every process's CPU time every 0.3 s; keeps the last value seen per (pid, start)."""

    def __init__(self):
        super().__init__(daemon=True)
        self.seen: dict[tuple[int, float], tuple[str, float]] = {}
        self.stop = threading.Event()
        self.since = time.time()

    def run(self):
        import psutil

        while not self.stop.is_set():
            for proc in psutil.process_iter(["pid", "name", "cmdline", "cpu_times", "create_time"]):
                info = proc.info
                if info["create_time"] is None or info["create_time"] < self.since - 1 or info["cpu_times"] is None:
                    continue
                name = kind(info["cmdline"] or [info["name"] or "?"])
                self.seen[(info["pid"], info["create_time"])] = (name, info["cpu_times"].user + info["cpu_times"].system)
            time.sleep(0.3)

    def report(self) -> None:
        print(f"CPU s by process kind ({len(self.seen)} processes started during the run):")
        for name, (n, cpu) in self.by_kind().items():
            if cpu >= 0.2:
                print(f"  {cpu:6.1f}  {n:3d} x {name}")

    def by_kind(self) -> dict[str, tuple[int, float]]:
        out: dict[str, list] = collections.defaultdict(lambda: [0, 0.0])
        names = {name for name, _ in self.seen.values()}
        for name, cpu in self.seen.values():
            # a title seen before Ray finished setting it is cut at 15 characters: count it under the full one
            name = min((full for full in names if full != name and full.startswith(name)), key=len, default=name) \
                if len(name) == 15 else name
            out[name][0] += 1
            out[name][1] += cpu
        return {k: (n, s) for k, (n, s) in sorted(out.items(), key=lambda kv: -kv[1][1])}


def kind(cmdline: list[str]) -> str:
    """A short name for a process: Ray's actor title (``ray::TrainController``), a dashboard module,
    or the program run."""
    first = cmdline[0]
    if first.startswith("ray::"):
        return first.split()[0].split(".")[0][:40]
    if first.startswith("ray-dashboard-"):
        return "ray-dashboard modules"
    prog = Path(first).name
    if prog.startswith("python") and len(cmdline) > 1:
        prog = Path(next((a for a in cmdline[1:] if not a.startswith("-")), cmdline[1])).name
    return prog[:40]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--concurrent", type=int, default=1, help="trials at a time (half a CPU each)")
    parser.add_argument("--health-check-interval", type=float, default=None,
                        help="RAY_TRAIN_HEALTH_CHECK_INTERVAL_S for this run (Ray Train's default: 2 s)")
    args = parser.parse_args(argv)
    if args.health_check_interval is not None:
        os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = str(args.health_check_interval)
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

    work = Path(tempfile.mkdtemp(prefix="ssvp-trial-overhead-"))
    marks = work / "marks.jsonl"
    sampler = ProcessSampler()
    sampler.start()
    t0, c0 = time.time(), machine_cpu_s()
    from tuning.ray_session import init_ray
    from tuning.trial import PLACEMENT_GROUP_REMOVED

    init_ray(object_store_memory=300 * 1024 * 1024, log_to_driver=False)
    t1, c1 = time.time(), machine_cpu_s()

    import ray
    from ray import tune
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    def mark(tag: str, i: int) -> None:
        with open(marks, "a") as f:
            f.write(json.dumps({"t": time.time(), "tag": tag, "i": i}) + "\n")

    def loop(config):
        mark("loop", config["i"])
        ray.train.report({"done": 1})

    def trainable(config):
        mark("actor", config["i"])
        trainer = TorchTrainer(
            loop, train_loop_config=config,
            scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 0.5}),
            run_config=RunConfig(name=f"t{config['i']}", storage_path=str(work / "train"),
                                 callbacks=[TuneReportCallback()]))
        try:
            trainer.fit()
        finally:
            mark("returned", config["i"])

    tuner = tune.Tuner(
        tune.with_resources(trainable, {"cpu": 0.01}),
        param_space={"i": tune.grid_search(list(range(args.trials)))},
        tune_config=tune.TuneConfig(max_concurrent_trials=args.concurrent),
        run_config=tune.RunConfig(storage_path=str(work / "tune"), name="overhead", verbose=0))
    tuner.fit()
    t2, c2 = time.time(), machine_cpu_s()
    logs = Path(ray._private.worker.global_worker.node.get_session_dir_path()) / "logs" / "train"
    removed = sum(PLACEMENT_GROUP_REMOVED in p.read_text(errors="replace") for p in logs.glob("*.log"))
    time.sleep(2)
    sampler.stop.set()
    sampler.join()
    ray.shutdown()

    rows = [json.loads(line) for line in marks.read_text().splitlines()]
    at = {(r["i"], r["tag"]): r["t"] - t1 for r in rows}
    print(f"Ray start: {t1 - t0:.1f} s wall, {c1 - c0:.1f} CPU s (machine)")
    print(f"{args.trials} trials, {args.concurrent} at a time, health-check interval "
          f"{os.environ.get('RAY_TRAIN_HEALTH_CHECK_INTERVAL_S', '2 (default)')} s: "
          f"{t2 - t1:.1f} s wall, {c2 - c1:.1f} CPU s (machine), {(c2 - c1) / args.trials:.1f} CPU s per trial")
    print("trial  actor->loop (start-up)  loop->fit returned (tail)  returned->next actor")
    def span(i: int, start: str, end: str, j: int | None = None) -> str:
        a, b = at.get((i, start)), at.get((i if j is None else j, end))
        return f"{b - a:.1f}" if a is not None and b is not None else "-"

    for i in range(args.trials):
        print(f"{i:5d}  {span(i, 'actor', 'loop'):>21}  {span(i, 'loop', 'returned'):>25}  "
              f"{span(i, 'returned', 'actor', i + args.concurrent):>20}")
    print(f"Train logs reporting a worker destroyed because its placement group was removed: {removed}")
    sampler.report()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
