"""Running a finished grid's command again: its report again (rebuilt from records.jsonl, nothing
run, no Ray started) and how to start a new run; another run in the same folder is refused with
the way out, before anything starts."""
from __future__ import annotations

import json
from pathlib import Path

from ablations.grid import GRID_STATE, main

REPO = Path(__file__).resolve().parents[1]
QUICK = REPO / "ablations" / "configs" / "quick.yaml"
KEYS = ["image_auroc", "image_f1max", "image_ap", "pixel_auroc", "pixel_aupro", "pixel_ap"]


def _finished(out: Path, variants=("full", "no_vtam"), seeds=(0, 1), interrupted=False, name="quick") -> None:
    out.mkdir(parents=True)
    records = []
    for i, v in enumerate(variants):
        for s in seeds:
            value = 0.7 + 0.05 * i + 0.01 * s
            records.append({"trial_id": f"{v}__seed{s}", "variant": v, "seed": s, "status": "ok",
                            "metrics": {"synthetic:/x/data/synthetic/domain_b": {"mean": {k: value for k in KEYS}}}})
    (out / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (out / GRID_STATE).write_text(json.dumps({
        "grid": "quick", "name": name, "seeds": list(seeds), "variants": list(variants), "reference": "full",
        "tracking_uri": "sqlite:////x/mlflow.db", "experiment": "ssvp-ablations", "parent_run_id": "abc123",
        "interrupted": interrupted, "seconds": 12.5,
    }))


def test_rerun_of_a_finished_grid_reprints_its_report(tmp_path, capsys):
    out = tmp_path / "quick"
    _finished(out)
    rc = main(["--grid", str(QUICK), "--variants", "full,no_vtam", "--seeds", "2", "--out", str(out), "--local"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "# Ablation grid `quick`" in captured.out and "## synthetic domain_b" in captured.out
    assert "| D | w/o VTAM |" in captured.out  # the table, from the records
    assert "already finished" in captured.out and "--name" in captured.out and "nothing was run" in captured.out
    assert "abc123" in captured.out  # where its MLflow record is
    assert (out / "results.md").is_file() and (out / "points_synthetic_domain_b.png").is_file()


def test_another_run_in_the_same_folder_is_refused_with_the_way_out(tmp_path, capsys):
    out = tmp_path / "quick"
    _finished(out)
    rc = main(["--grid", str(QUICK), "--variants", "full,concat", "--seeds", "2", "--out", str(out), "--local"])
    err = capsys.readouterr().err
    assert rc == 2 and "--name" in err and "full, no_vtam" in err
    out2 = tmp_path / "interrupted"
    _finished(out2, interrupted=True)
    rc = main(["--grid", str(QUICK), "--variants", "full,no_vtam", "--seeds", "2", "--out", str(out2), "--local"])
    err = capsys.readouterr().err
    assert rc == 2 and "--resume" in err and "interrupted" in err


def test_finished_state_without_records_is_a_clear_error(tmp_path, capsys):
    out = tmp_path / "quick"
    _finished(out)
    (out / "records.jsonl").unlink()
    rc = main(["--grid", str(QUICK), "--variants", "full,no_vtam", "--seeds", "2", "--out", str(out), "--local"])
    err = capsys.readouterr().err
    assert rc == 2 and "no records in" in err and "--name" in err
