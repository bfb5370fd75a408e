"""Fast tier: Pareto front, knee, refit rule, class folds, replica aggregation, lockstep runs and
the refusals of bad multi-objective / fold settings (no Ray)."""
from __future__ import annotations

import threading

import pytest

from tuning.folds import FoldError, aggregate, assign_folds, best_epoch, replicas, risk_adjusted, run_lockstep
from tuning.pareto import PickError, choose, dominates, knee, metric_key, pareto_front, parse_pick
from tuning.settings import SearchSettings, SweepConfig, SweepConfigError

MAXMAX = ["max", "max"]


def test_metric_names_both_ways():
    assert metric_key("val/image_auroc") == "val_image_auroc"
    assert metric_key("val_pixel_aupro") == "val_pixel_aupro"
    assert metric_key("train/loss") == "train_loss"


def test_front_by_hand():
    pts = {0: [0.9, 0.1], 1: [0.5, 0.5], 2: [0.1, 0.9], 3: [0.4, 0.4], 4: [0.5, 0.5], 5: [float("nan"), 1.0]}
    assert dominates([0.5, 0.5], [0.4, 0.4], MAXMAX) and not dominates([0.5, 0.5], [0.5, 0.5], MAXMAX)
    # 3 is dominated by 1; 1 and 4 are equal (neither dominates); 5 has no finite point
    assert pareto_front(pts, MAXMAX) == [0, 1, 2, 4]
    # minimising the second objective turns the picture round: 0 dominates 1, 3 and 4
    assert pareto_front(pts, ["max", "min"]) == [0]


def test_knee_is_the_point_nearest_the_ideal():
    # scaled over the front: 0 -> (1, 0), 1 -> (0.5, 0.625), 2 -> (0, 1): distances 1, 0.625, 1
    pts = {0: [0.9, 0.1], 1: [0.5, 0.6], 2: [0.1, 0.9]}
    assert knee(pts, MAXMAX) == 1
    # a lopsided front: 2 is nearly ideal on both
    assert knee({0: [1.0, 0.0], 1: [0.5, 0.5], 2: [0.95, 0.95], 3: [0.0, 1.0]}, MAXMAX) == 2
    assert knee({3: [0.7]}, ["max"]) == 3 and knee({}, MAXMAX) is None
    # ties go to the lower trial number; one objective: the knee is the best trial
    assert knee({4: [0.2, 0.8], 2: [0.8, 0.2]}, MAXMAX) == 2
    assert knee({0: [0.2], 1: [0.9], 2: [0.5]}, ["max"]) == 1 and knee({0: [0.2], 1: [0.9]}, ["min"]) == 0


def test_pick_rules():
    objs = ["val_image_auroc", "val_pixel_aupro"]
    pts = {0: [0.9, 0.1], 1: [0.5, 0.6], 2: [0.1, 0.9], 3: [0.05, 0.05]}
    assert choose(pts, "knee", objs, MAXMAX) == 1
    assert choose(pts, "best:val/image_auroc", objs, MAXMAX) == 0
    assert choose(pts, "best:val_pixel_aupro", objs, MAXMAX) == 2
    assert choose(pts, "trial:3", objs, MAXMAX) == 3  # off the front, picked by number
    assert parse_pick("trial:t07", objs) == ("trial", 7)
    with pytest.raises(PickError, match="trial:9 has no finished result"):
        choose(pts, "trial:9", objs, MAXMAX)
    with pytest.raises(PickError, match="not one of the sweep's objectives"):
        parse_pick("best:val/pixel_ap", objs)
    with pytest.raises(PickError, match="knee, best:<metric> or trial:<n>"):
        parse_pick("median", objs)


def test_folds_are_disjoint_cover_the_classes_and_are_seeded():
    classes = ["e", "a", "d", "c", "b"]
    folds = assign_folds(classes, 3, seed=0)
    assert sorted(c for f in folds for c in f) == sorted(classes) and all(folds)
    assert sorted(len(f) for f in folds) == [1, 2, 2]
    assert assign_folds(list(reversed(classes)), 3, seed=0) == folds  # listing order does not matter
    assert any(assign_folds(classes, 3, seed=s) != folds for s in range(1, 6))
    with pytest.raises(FoldError, match="class_folds: 6 folds need at least 6 source classes"):
        assign_folds(classes, 6, seed=0)
    with pytest.raises(FoldError, match="at least 2 source classes"):
        assign_folds(["a", "a"], 2, seed=0)


def test_replicas_labels():
    assert replicas([], 1) == [] and replicas([["a", "b", "c"]], 1) == []
    two = replicas([["a"], ["b"]], 1)
    assert [r["label"] for r in two] == ["fold0", "fold1"] and two[1]["val_classes"] == ["b"]
    seeds = replicas([], 2)
    assert [(r["label"], r["val_classes"], r["seed_offset"]) for r in seeds] == [("seed0", None, 0), ("seed1", None, 1)]
    both = replicas([["a"], ["b"]], 2)
    assert [r["label"] for r in both] == ["fold0_seed0", "fold0_seed1", "fold1_seed0", "fold1_seed1"]


def test_aggregate_mean_spread_per_fold_and_risk():
    rows = [{"epoch": 1.0, "val_objective": 0.6, "train_loss": 1.0},
            {"epoch": 1.0, "val_objective": 0.8, "train_loss": 3.0}]
    out = aggregate(rows, ["fold0", "fold1"], {"val_objective": "max"})
    assert out["val_objective"] == pytest.approx(0.7) and out["train_loss"] == pytest.approx(2.0)
    assert out["val_objective_std"] == pytest.approx(0.1414213, rel=1e-5)  # sample std of 0.6, 0.8
    assert out["val_objective_fold0"] == 0.6 and out["val_objective_fold1"] == 0.8 and out["epoch"] == 1.0
    assert "train_loss_fold0" not in out
    risky = aggregate(rows, ["fold0", "fold1"], {"val_objective": "max"}, kappa=1.0)
    assert risky["val_objective"] == pytest.approx(0.7 - 0.1414213, rel=1e-5) and risky["val_objective_mean"] == pytest.approx(0.7)
    assert risk_adjusted(1.0, 0.5, 2.0, "min") == 2.0
    # a fold whose metric is undefined does not poison the mean
    nan_rows = [{"epoch": 1.0, "val_objective": float("nan")}, {"epoch": 1.0, "val_objective": 0.5}]
    assert aggregate(nan_rows, ["a", "b"], {"val_objective": "max"})["val_objective"] == 0.5


def test_best_epoch_first_of_ties():
    hist = [{"epoch": 1, "val_objective": 0.5}, {"epoch": 2, "val_objective": 0.7}, {"epoch": 3, "val_objective": 0.7}]
    assert best_epoch(hist) == 2 and best_epoch(hist, mode="min") == 1 and best_epoch([]) is None


def _fake_fit(name: str, epochs: int, log: list, fail_at: int | None = None):
    def fit(on_epoch):
        for e in range(1, epochs + 1):
            log.append((name, e))
            if e == fail_at:
                raise RuntimeError(f"{name} broke")
            on_epoch(e, {"epoch": e, "val_objective": e / 10 + (0.05 if name == "b" else 0.0)}, f"/ck/{name}/{e}")
        return name
    return fit


def test_lockstep_takes_turns_and_reports_each_round():
    log, rounds = [], []
    res = run_lockstep([_fake_fit("a", 3, log), _fake_fit("b", 3, log)],
                       lambda e, rows, ck: rounds.append((e, [r["val_objective"] for r in rows], ck)))
    assert res == ["a", "b"]
    assert log == [("a", 1), ("b", 1), ("a", 2), ("b", 2), ("a", 3), ("b", 3)]  # one epoch each, in turn
    assert [r[0] for r in rounds] == [1, 2, 3]
    assert rounds[1][1] == pytest.approx([0.2, 0.25]) and rounds[2][2] == ["/ck/a/3", "/ck/b/3"]


def test_lockstep_stop_and_failure_end_every_replica():
    log = []

    def stop_after_first(e, rows, ck):
        if e == 1:
            raise KeyboardInterrupt("stopped by Tune")

    with pytest.raises(KeyboardInterrupt):
        run_lockstep([_fake_fit("a", 5, log), _fake_fit("b", 5, log)], stop_after_first)
    assert log == [("a", 1), ("b", 1)]  # nothing trained after the stop
    log.clear()
    with pytest.raises(RuntimeError, match="b broke"):
        run_lockstep([_fake_fit("a", 5, log), _fake_fit("b", 5, log, fail_at=2)], lambda *a: None)
    assert ("a", 3) not in log and threading.active_count() < 50


# --------------------------------------------------------------------------- refusals, before Ray
def _sweep(**search) -> SweepConfig:
    return SweepConfig(search=SearchSettings(**search))


@pytest.mark.parametrize("search, message", [
    (dict(objectives=["val/image_auroc", "val/nope"]), r"search: objectives: unknown objective 'val/nope'"),
    (dict(objectives=["val/image_auroc", "val/pixel_aupro"], modes=["max"], scheduler=None),
     r"search: modes: 1 mode\(s\) \['max'\] for 2 objective"),
    (dict(objectives=["val/image_auroc", "val/pixel_aupro"], modes=["max", "up"], scheduler=None), "modes must each"),
    (dict(objectives=["val/image_auroc", "val/pixel_aupro"]), "scheduler: asha cannot rank 2 objectives"),
    (dict(sampler="cmaes"), "sampler must be one of tpe, nsga2"),
    (dict(class_folds=0), "class_folds must be an integer >= 1"),
    (dict(seeds_per_trial=1, risk=1.0), "risk needs class_folds > 1"),
    (dict(seeds_per_trial=2, risk=-1.0), "risk must be a number kappa >= 0"),
])
def test_bad_objective_settings_are_refused_naming_the_key(search, message):
    with pytest.raises(SweepConfigError, match=message):
        _sweep(**search).validate()


def test_several_objectives_set_metric_and_refit_pick_is_checked():
    sweep = _sweep(objectives=["val/image_auroc", "val/pixel_aupro"], modes=["max", "min"], scheduler="asha",
                   scheduler_metric="val/objective")
    sweep.validate()
    assert sweep.search.metric == "val_image_auroc" and sweep.search.mode == "max" and sweep.search.multi
    sweep.refit_pick = "best:val/image_ap"
    with pytest.raises(SweepConfigError, match="refit: refit.pick: 'best:val/image_ap'"):
        sweep.validate()
    assert "pick: knee" in SweepConfig().to_yaml()


def test_too_many_folds_for_the_source_classes_is_refused(synthetic_root):
    from conftest import synthetic_config

    base = synthetic_config(synthetic_root)
    sweep = SweepConfig(base=base, search=SearchSettings(class_folds=6))
    with pytest.raises(SweepConfigError, match=r"search.class_folds: 6 folds need at least 6 source classes; the "
                       r"source has 5 \(bottle_cap, fabric, pill, tile, wood\)"):
        sweep.validate()
    sweep.search.class_folds = 2
    sweep.validate()
    folds = sweep.fold_classes()
    assert len(folds) == 2 and sorted(sum(folds, [])) == ["bottle_cap", "fabric", "pill", "tile", "wood"]
    with pytest.raises(SweepConfigError, match="target_eval: 'all' evaluates one model per trial"):
        sweep.replace(target_eval="all").validate()
    with pytest.raises(SweepConfigError, match="remove data.val_classes"):
        sweep.replace(base=base.override({"val_classes": ["wood"]})).validate()


def test_command_line_refuses_bad_objectives_and_folds_before_ray(synthetic_root, tmp_path, capsys):
    from tuning.sweep import main

    cfg = tmp_path / "s.yaml"
    cfg.write_text(f"name: s\nbase:\n  preset: tiny\n  overrides:\n    source: synthetic:{synthetic_root}/domain_a\n"
                   f"    targets: [synthetic:{synthetic_root}/domain_b]\nspace:\n  gamma: {{type: uniform, low: 0, high: 1}}\n")
    common = ["--config", str(cfg), "--local", "--storage-path", str(tmp_path / "ray"),
              "--tracking-uri", f"sqlite:///{tmp_path}/m.db"]
    cases = [
        (["--objectives", "val/image_auroc,val/typo", "--scheduler", "none"], "unknown objective 'val/typo'"),
        (["--objectives", "val/image_auroc,val/pixel_aupro", "--modes", "max", "--scheduler", "none"],
         "modes: 1 mode(s)"),
        (["--objectives", "val/image_auroc,val/pixel_aupro"], "scheduler: asha cannot rank 2 objectives"),
        (["--class-folds", "9"], "class_folds: 9 folds need at least 9 source classes"),
    ]
    import ray

    for extra, message in cases:
        assert main(common + extra) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("error:") == 1
    assert not ray.is_initialized()  # refused before Ray starts
    assert main(common + ["--objectives", "val/image_auroc,val/pixel_aupro", "--modes", "max,min", "--sampler",
                          "nsga2", "--scheduler", "none", "--class-folds", "2", "--risk", "0.5", "--pick",
                          "best:val/pixel_aupro", "--print-config"]) == 0
    import yaml

    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["search"]["objectives"] == ["val/image_auroc", "val/pixel_aupro"]
    assert printed["search"]["modes"] == ["max", "min"] and printed["search"]["sampler"] == "nsga2"
    assert printed["search"]["class_folds"] == 2 and printed["search"]["risk"] == 0.5
    assert printed["refit"] == {"enabled": True, "pick": "best:val/pixel_aupro"}
