"""`ssvp train` then `ssvp eval` then `ssvp predict`, as a user runs them (subprocesses)."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from conftest import synthetic_config
from ssvp.engine import NonFiniteLossError, fit


def ssvp(*args, cwd, **extra_env):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **extra_env}
    proc = subprocess.run([sys.executable, "-m", "ssvp.cli", *args], cwd=cwd, capture_output=True, text=True, env=env)
    return proc


def _assert_recorded_in_mlflow(store: str, history: list) -> None:
    """`ssvp train --mlflow` and `ssvp eval` (MLFLOW_TRACKING_URI set) under the sweeps' names."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=store)
    exp = client.get_experiment_by_name("ssvp-runs")
    runs = {r.data.tags["role"]: r for r in client.search_runs([exp.experiment_id])}
    train, ev = runs["train"], runs["eval"]
    assert train.info.status == ev.info.status == "FINISHED" and train.data.params["gamma"] == "0.4"
    steps = {m.step: m.value for m in client.get_metric_history(train.info.run_id, "val/objective")}
    assert steps == pytest.approx({h["epoch"]: h["val_objective"] for h in history})
    assert {m.step for m in client.get_metric_history(train.info.run_id, "train/loss")} == {1, 2}
    assert train.data.metrics["best_val_objective"] == pytest.approx(max(steps.values()))
    assert "epoch" not in train.data.metrics
    assert "checkpoints/best/head.pt" in {a.path for a in client.list_artifacts(train.info.run_id, "checkpoints/best")}
    for run in (train, ev):
        assert 0.0 <= run.data.metrics["target/domain_b/image_auroc"] <= 1.0
    import mlflow

    mlflow.set_tracking_uri(store)  # MlflowClient.load_table searches the runs through the global URI
    table = client.load_table(exp.experiment_id, "target_per_class.json", run_ids=[ev.info.run_id])
    assert len(table) == 6 and "mean" in set(table["class"])  # five classes + mean


@pytest.mark.slow
def test_train_eval_predict(tmp_path, synthetic_root):
    cfg_file = tmp_path / "tiny.yaml"
    cfg_file.write_text(
        "preset: tiny\n"
        "train: {epochs: 2, max_steps_per_epoch: 3, protocol: select}\n"
        f"data: {{source: 'synthetic:{synthetic_root}/domain_a', targets: ['synthetic:{synthetic_root}/domain_b'], max_per_class: 4}}\n"
    )
    out = tmp_path / "run"
    proc = ssvp("train", "--config", str(cfg_file), "--set", "gamma=0.4", "--out", str(out), "--mlflow", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "MLflow run: http://127.0.0.1:5000/#/experiments/" in proc.stdout
    assert "best epoch" in proc.stdout and "mean" in proc.stdout
    epoch_lines = [line for line in proc.stdout.splitlines() if line.startswith("epoch ")]
    assert [line.split(" | ")[0] for line in epoch_lines] == ["epoch 1/2", "epoch 2/2"]  # tiny preset too
    assert all("loss " in line and "val I-AUROC" in line and "best " in line for line in epoch_lines)
    history = json.loads((out / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2]
    assert all(0.0 <= h["val_image_auroc"] <= 1.0 for h in history)
    best = out / "checkpoints" / "best"
    assert (best / "head.pt").is_file() and (best / "config.json").is_file()
    saved = json.loads((best / "config.json").read_text())
    assert saved["model"]["gamma"] == 0.4
    # checkpoints hold the heads only, never the frozen backbones
    import torch

    state = torch.load(best / "head.pt", weights_only=False)
    assert not any(k.startswith(("backbones", "clip", "dino")) for k in state["head"])

    csv_out = tmp_path / "eval.csv"
    store = f"sqlite:///{tmp_path}/runs/mlflow.db"  # where `--mlflow` recorded the training run
    proc = ssvp("eval", "--checkpoint", str(best), "--out", str(csv_out), cwd=tmp_path, MLFLOW_TRACKING_URI=store)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _assert_recorded_in_mlflow(store, history)
    rows = list(csv.DictReader(csv_out.open()))
    classes = {r["class"] for r in rows}
    assert "mean" in classes and len(classes) == 6  # five domain-B classes + mean
    assert all(0.0 <= float(r["image_auroc"]) <= 1.0 for r in rows)

    cls = sorted((synthetic_root / "domain_b").iterdir())[0].name
    images = synthetic_root / "domain_b" / cls / "test"
    pred = tmp_path / "pred"
    proc = ssvp("predict", "--checkpoint", str(best), "--input", str(images), "--class-name", cls, "--out", str(pred), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    scores = list(csv.DictReader((pred / "scores.csv").open()))
    n_images = len(list(images.rglob("*.png")))
    assert len(scores) == n_images
    # the validation F1-max threshold stored with the checkpoint labels every image
    stored = state["thresholds"]
    assert stored["image"] is not None and stored["classes"] and "validation F1-max" in proc.stdout
    for r in scores:
        assert 0.0 <= float(r["score"]) <= 1.0
        assert float(r["threshold"]) == pytest.approx(stored["image"], abs=1e-6)
        assert r["label"] == ("anomalous" if float(r["score"]) >= stored["image"] else "normal")
        photo = Image.open(r["path"])
        assert Image.open(r["overlay"]).size == photo.size == (int(r["width"]), int(r["height"]))
        assert Image.open(r["panel"]).height > photo.height
        assert bool(r["mask"]) == ("/good/" not in r["path"])  # MVTec layout: masks found for defects

    # real photos with masks (MVTec 3D-AD tire, 300 x 400 portrait): full-size outputs, given threshold
    from conftest import TIRE

    tire = TIRE / "tire" / "test"
    if tire.is_dir():
        out = tmp_path / "tire_pred"
        proc = ssvp("predict", "--checkpoint", str(best), "--input", str(tire / "combined"), "--class-name", "tire",
                    "--threshold", "0.3", "--pixel-threshold", "0.5", "--out", str(out), cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        rows = list(csv.DictReader((out / "scores.csv").open()))
        assert len(rows) == len(list((tire / "combined").glob("*.png"))) and "(--threshold)" in proc.stdout
        for r in rows:
            assert (int(r["width"]), int(r["height"])) == Image.open(r["path"]).size == (300, 400)
            assert Image.open(r["overlay"]).size == (300, 400)
            assert r["label"] == ("anomalous" if float(r["score"]) >= 0.3 else "normal")
            assert r["mask"].endswith("_mask.png")
            panel = Image.open(r["panel"])
            assert 4 * 300 < panel.width < 4 * 300 + 250 and 400 < panel.height < 400 + 150  # 4 tiles


@pytest.mark.slow  # three training runs (27 s of CPU)
def test_resume_continues_from_checkpoint(tmp_path, synthetic_root):
    cfg = synthetic_config(synthetic_root, max_per_class=3, epochs=2, max_steps_per_epoch=2, protocol="select")
    full = fit(cfg, checkpoint_dir=tmp_path / "full")

    class Interrupted(Exception):
        pass

    def stop_after_first(epoch, metrics, ckpt):
        assert metrics == full.history[0]  # same seed, same result
        raise Interrupted

    with pytest.raises(Interrupted):
        fit(cfg, checkpoint_dir=tmp_path / "part", on_epoch=stop_after_first)
    seen = []
    resumed = fit(cfg, checkpoint_dir=tmp_path / "part", resume_from=tmp_path / "part" / "last",
                  on_epoch=lambda e, m, c: seen.append(e))
    assert seen == [2]
    assert resumed.history[1]["val_objective"] == pytest.approx(full.history[1]["val_objective"], abs=1e-6)


def test_nan_loss_stops_with_step(tmp_path, synthetic_root):
    cfg = synthetic_config(synthetic_root, max_per_class=3, epochs=1, lr_head=1e30, lr_prompt=1e30, grad_clip=0.0)
    with pytest.raises(NonFiniteLossError, match=r"epoch 1, step \d+"):
        fit(cfg)


def test_cli_reports_bad_config_value(tmp_path):
    proc = ssvp("train", "--set", "gamma=3", "--out", str(tmp_path / "x"), cwd=tmp_path)
    assert proc.returncode == 2 and "model.gamma" in proc.stderr


def test_cli_help_version_and_print_config(tmp_path, synthetic_root):
    proc = ssvp("--help", cwd=tmp_path)
    assert proc.returncode == 0 and "examples:" in proc.stdout and "--version" in proc.stdout
    proc = ssvp("--version", cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout.startswith("ssvp ")
    proc = ssvp("train", "--help", cwd=tmp_path)
    assert "--print-config" in proc.stdout and "examples:" in proc.stdout
    out = tmp_path / "never"
    proc = ssvp("train", "--config", str(_tiny_file(tmp_path, synthetic_root)),
                "--set", "gamma=0.3", "--set", "train.epochs=7", "--print-config", "--out", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    import yaml

    cfg = yaml.safe_load(proc.stdout)
    assert cfg["model"]["gamma"] == 0.3 and cfg["train"]["epochs"] == 7 and cfg["model"]["clip_model"] == "tiny"
    assert not out.exists()  # printed, nothing run


def _tiny_file(tmp_path, root):
    f = tmp_path / "tiny.yaml"
    f.write_text(f"preset: tiny\ndata: {{source: 'synthetic:{root}/domain_a', targets: ['synthetic:{root}/domain_b']}}\n")
    return f


def test_missing_checkpoint_folder_is_named_as_missing(tmp_path, capsys):
    """--checkpoint pointing at a folder that is not there says so (it said 'has no config.json'),
    with the closest folder beside it; a folder that exists but holds no checkpoint keeps its message."""
    from ssvp.cli import main

    ckpts = tmp_path / "run" / "checkpoints"
    (ckpts / "best").mkdir(parents=True)
    (ckpts / "last").mkdir()
    assert main(["eval", "--checkpoint", str(ckpts / "bset")]) == 2
    err = capsys.readouterr().err
    assert f"--checkpoint {ckpts / 'bset'}: the folder does not exist; did you mean {ckpts / 'best'}?" in err
    assert "config.json" not in err
    assert main(["predict", "--checkpoint", str(tmp_path / "nope" / "best"), "--input", str(tmp_path),
                 "--class-name", "x", "--config", str(tmp_path / "c.yaml")]) == 2
    assert f"{tmp_path / 'nope' / 'best'}: the folder does not exist (nor does {tmp_path / 'nope'})" in \
        capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(ckpts / "best")]) == 2  # there, but empty
    assert "has no config.json" in capsys.readouterr().err


def test_train_help_states_the_protocols_and_docs_cite_the_paper_not_a_path():
    """`ssvp train --help` says what the default (paper) protocol keeps and what select does; README and
    the paper map cite the paper (arXiv 2601.09147), never a file of the development machine."""
    import argparse
    import re

    from ssvp.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    text = " ".join(sub.choices["train"].format_help().split())
    assert "select the best epoch on held-out" not in text
    assert "protocol=paper (default" in text and "last epoch is the model" in text and "protocol=select" in text
    repo = Path(__file__).resolve().parents[1]
    for doc in ("README.md", "docs/PAPER_MAP.md"):
        body = (repo / doc).read_text(encoding="utf-8")
        assert "arXiv 2601.09147" in body, doc
        assert not re.search(r"/work/|shared/paper|ssvp-paper\.md", body), doc
