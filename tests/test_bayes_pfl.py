"""Bayes-PFL (ssvp/bayes_pfl.py): flows, sample averaging and losses checked numerically; it learns;
it trains / evaluates / predicts through the CLI and rebuilds from its checkpoint; it runs as a
variant of an ablation grid."""
from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from conftest import synthetic_config
from ssvp.bayes_pfl import (
    BayesPFLHead,
    PromptFlow,
    average_samples,
    balanced_focal_loss,
    bayes_pfl_loss,
    dice_loss,
    orthogonal_loss,
    planar_flow,
)
from ssvp.config import Config, ConfigError
from ssvp.model import SSVP, SSVPHead, SSVPOutput

REPO = Path(__file__).resolve().parents[1]


def tiny_pfl(**overrides) -> Config:
    return Config.tiny(prompting="bayes_pfl", fusion="none", **overrides)


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return SSVP(tiny_pfl(pfl_samples=3, pfl_flows=2).model)


# ----------------------------------------------------------------------------------- flows
def test_planar_flow_logdet_matches_autograd_jacobian():
    torch.manual_seed(0)
    for trial in range(4):
        z = torch.randn(5, dtype=torch.float64)
        w = torch.randn(5, dtype=torch.float64)
        u = -2.0 * w / w.dot(w) if trial == 0 else torch.randn(5, dtype=torch.float64)  # w.u = -2: u^ needed
        b = torch.randn((), dtype=torch.float64)
        jac = torch.autograd.functional.jacobian(lambda x: planar_flow(x, u, w, b)[0], z)
        _, logdet = planar_flow(z, u, w, b)
        sign, expected = torch.linalg.slogdet(jac)
        assert sign > 0  # u^ keeps the flow orientation-preserving (invertible)
        torch.testing.assert_close(logdet, expected, rtol=1e-10, atol=1e-10)


def test_prompt_flow_kl_is_the_change_of_variables_estimate():
    torch.manual_seed(1)
    flow = PromptFlow(z_dim=3, n_flows=2, cond_dim=4).double()
    cond = torch.randn(2, 4, dtype=torch.float64)
    eps = torch.randn((1, 1, 3), generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    zk, kl = flow(cond, 1, eps)
    # by hand: same draws, base density, flows, standard-normal prior
    mu, logvar, u, w, b = flow.base_and_flows(cond)
    z0 = mu + torch.exp(0.5 * logvar) * eps
    z, ld = z0, 0.0
    for k in range(2):
        z, l_k = planar_flow(z, u[:, k], w[:, k], b[:, k])
        ld = ld + l_k
    var = logvar.exp()
    log_q0 = (-0.5 * (math.log(2 * math.pi) + logvar + (z0 - mu) ** 2 / var)).sum(-1)
    log_p = (-0.5 * (math.log(2 * math.pi) + z**2)).sum(-1)
    torch.testing.assert_close(zk, z)
    torch.testing.assert_close(kl, (log_q0 - ld - log_p)[0])
    # no flows, zero-mean unit-variance base: q = p, so the estimate is exactly 0
    plain = PromptFlow(z_dim=3, n_flows=0).double()
    assert torch.allclose(plain(None, 4)[1], torch.zeros(1, dtype=torch.float64))


# ------------------------------------------------------------------------- sample averaging
def test_score_and_map_average_the_prompt_samples(tiny_model):
    head = tiny_model.head
    head.eval()
    feats = tiny_model.backbones(torch.rand(3, 3, 112, 112, generator=torch.Generator().manual_seed(0)))
    with torch.no_grad():
        out = head(feats, ["wood", "wood", "tile"], 112)
        again = head(feats[2:3], ["tile"], 112)
    logits = out.aux["image_logits"]  # [B, S, 2, Bp]
    assert logits.shape == (3, 3, 2, 3) and out.aux["samples"] == 3
    # the score is the mean over S samples x B_p prompts of the abnormal softmax probability
    p = torch.exp(logits[:, :, 1]) / (torch.exp(logits[:, :, 0]) + torch.exp(logits[:, :, 1]))
    torch.testing.assert_close(out.score, p.mean(dim=(1, 2)))
    assert torch.equal(average_samples(torch.tensor([[0.2, 0.4], [0.6, 1.0]]), (0, 1)), torch.tensor(0.55))
    # the samples differ (a distribution, not a point), the map is the upsampled grid mean
    text = out.aux["text_samples"]  # [B, S, 2, Bp, D]
    assert (text[:, 0] - text[:, 1]).abs().max() > 1e-4
    up = F.interpolate(out.aux["map_grid"][:, 1:], size=(112, 112), mode="bilinear", align_corners=False)[:, 0]
    torch.testing.assert_close(out.anomaly_map, up)
    assert ((out.anomaly_map >= 0) & (out.anomaly_map <= 1)).all()
    # seeded inference draws: a prediction does not depend on its batch
    torch.testing.assert_close(again.score, out.score[2:3], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(again.anomaly_map, out.anomaly_map[2:3], rtol=1e-5, atol=1e-6)
    # TIR-FG / SCD inputs are there
    assert out.aux["t_init"].shape == out.aux["text"].shape == (3, 2, text.shape[-1])
    torch.testing.assert_close(out.aux["text"], F.normalize(text.mean(dim=(1, 3)), dim=-1))


def test_inference_draws_are_a_function_of_the_image_and_z_seed(tiny_model):
    """Issue 20 point 3: the image-specific flow draws eps from the image (its frozen CLIP global
    token) and z_seed, the image-agnostic flows from z_seed: same image, same draws and prediction
    in any batch and order; another image or another z_seed, other draws."""
    head = tiny_model.head.eval()
    feats = tiny_model.backbones(torch.rand(3, 3, 112, 112, generator=torch.Generator().manual_seed(3)))
    names = ["wood", "tile", "wood"]
    with torch.no_grad():
        out = head(feats, names, 112)
        order = torch.tensor([2, 0, 1])
        shuffled = head(feats[order], [names[i] for i in order.tolist()], 112)
        twice = head(feats[torch.tensor([1, 1])], ["tile", "tile"], 112)
    torch.testing.assert_close(shuffled.score, out.score[order], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(shuffled.anomaly_map, out.anomaly_map[order], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(twice.score, out.score[torch.tensor([1, 1])], rtol=1e-5, atol=1e-6)
    eps_ctx, eps_n, eps_a = head.inference_eps(feats.clip_global, 3)  # [S, B, W], [S, 1, W] x 2
    assert eps_ctx.shape[:2] == (3, 3) and eps_n.shape[:2] == (3, 1)
    assert (eps_ctx[:, 0] - eps_ctx[:, 1]).abs().max() > 1e-3  # each image its own draws
    torch.testing.assert_close(head.inference_eps(feats.clip_global[1:2], 3)[0][:, 0], eps_ctx[:, 1])
    bb = tiny_model.backbones
    seeded = BayesPFLHead(tiny_pfl(pfl_samples=3, pfl_flows=2, z_seed=4).model, bb.clip_dim, bb.dino_dim, bb.text)
    other = seeded.inference_eps(feats.clip_global, 3)
    assert all((a - b).abs().max() > 1e-3 for a, b in zip(other, (eps_ctx, eps_n, eps_a)))


# ------------------------------------------------------------------------------------ losses
def test_balanced_focal_and_dice_on_hand_computed_inputs():
    prob = torch.tensor([[[0.8, 0.3], [0.1, 0.5]]])  # one 2 x 2 map
    mask = torch.tensor([[[1.0, 1.0], [0.0, 0.0]]])
    fg = (0.2**2 * -math.log(0.8) + 0.7**2 * -math.log(0.3)) / 2
    bg = (0.1**2 * -math.log(0.9) + 0.5**2 * -math.log(0.5)) / 2
    assert balanced_focal_loss(prob, mask, 2.0).item() == pytest.approx(fg + bg, rel=1e-5)
    # no defect pixel: only the background mean
    assert balanced_focal_loss(prob, torch.zeros_like(mask), 0.0).item() == pytest.approx(
        -(math.log(0.2) + math.log(0.7) + math.log(0.9) + math.log(0.5)) / 4, rel=1e-5)
    inter, total = 0.8 + 0.3, 1.7 + 2.0
    assert dice_loss(prob, mask).item() == pytest.approx(1 - (2 * inter + 1e-5) / (total + 1e-5), rel=1e-6)


def test_orthogonal_loss_on_hand_computed_inputs():
    e = torch.eye(3)
    normal = torch.stack([e[0], e[1], e[0] + e[1]])  # cos^2: (0, 1/2, 1/2) off the diagonal
    abnormal = torch.stack([e[0], e[1], e[2]])  # orthogonal: 0
    text = torch.stack([normal, abnormal])[None, None]  # [1, 1, 2, 3, 3]
    assert orthogonal_loss(text).item() == pytest.approx((0 + 0.5 + 0.5) * 2 / 9, rel=1e-6)


def test_bayes_pfl_loss_sums_its_terms_with_their_weights():
    cfg = tiny_pfl(pfl_kl_weight=0.5, pfl_orth_weight=2.0, focal_lambda=2.0).model
    logits = torch.tensor([[[[2.0], [0.0]]], [[[0.0], [1.0]]]])  # [B=2, S=1, 2, Bp=1]
    prob = torch.tensor([[[0.8, 0.3], [0.1, 0.5]]])
    maps = torch.cat([prob, prob])[:, None, None]  # [B, L=1, 1, 2, 2]
    masks = torch.tensor([[[1.0, 1.0], [0.0, 0.0]], [[1.0, 1.0], [0.0, 0.0]]])
    text = torch.stack([torch.eye(2), torch.eye(2)])[None, None].expand(2, 1, 2, 2, 2)
    aux = {"image_logits": logits, "prompt_maps": maps, "text_samples": text,
           "kl_ctx": torch.tensor(1.0), "kl_normal": torch.tensor(2.0), "kl_abnormal": torch.tensor(3.0)}
    out = SSVPOutput(anomaly_map=maps[:, 0, 0], score=torch.zeros(2), score_logit=torch.zeros(2), aux=aux)
    loss, parts = bayes_pfl_loss(out, masks, torch.tensor([0, 1]), cfg)
    ce = (-math.log(math.exp(2) / (math.exp(2) + 1)) - math.log(math.e / (math.e + 1))) / 2
    assert parts["cls"].item() == pytest.approx(ce, rel=1e-6)
    assert parts["focal"].item() == pytest.approx(balanced_focal_loss(maps[:, 0, 0], masks, 2.0).item(), rel=1e-6)
    assert parts["dice"].item() == pytest.approx(dice_loss(maps[:, 0, 0], masks).item(), rel=1e-6)
    assert parts["kl"].item() == pytest.approx(6.0) and parts["orth"].item() == pytest.approx(0.0, abs=1e-7)
    want = ce + parts["focal"].item() + parts["dice"].item() + 0.5 * 6.0
    assert loss.item() == pytest.approx(want, rel=1e-6)
    with pytest.raises(ValueError, match="training-mode"):
        bayes_pfl_loss(SSVPOutput(out.anomaly_map, out.score, out.score_logit, {**aux, "prompt_maps": None}),
                       masks, torch.tensor([0, 1]), cfg)


# ---------------------------------------------------------------------- config and learning
def test_prompting_key_is_validated_and_kept_in_step_with_vcpg():
    base = Config.tiny()
    assert base.model.prompting == "vcpg" and base.model.vcpg
    assert base.override({"vcpg": False}).model.prompting == "static"  # old configs keep working
    pfl = base.override({"prompting": "bayes_pfl"})
    assert (pfl.model.vcpg, pfl.model.vtam) == (False, False)
    assert Config.from_dict(pfl.to_dict()).model.prompting == "bayes_pfl"  # what a checkpoint restores
    assert "prompting" in pfl.flat() and pfl.flat()["pfl_flows"] == 10
    for bad, match in (({"prompting": "flows"}, "model.prompting"), ({"prompting": "bayes_pfl", "vtam": True}, "vtam"),
                       ({"prompting": "static", "vcpg": True}, "contradicts"), ({"pfl_samples": 0}, "pfl_samples")):
        with pytest.raises(ConfigError, match=match):
            base.override(bad)


def test_row_d_head_is_row_c_with_vcpg_in_place_of_the_prompt_flows():
    """Table 3 row D (prompting=bayes_pfl_vcpg): Bayes-PFL's head (bank, RCA, class mapping, scales,
    HSVS) with VCPG instead of the three prompt flows; its loss is row C's (CE + focal + Dice + orth)
    plus lambda1 L_VAE + lambda2 L_reg (Eq. 9, 12), and every part of it receives gradient."""
    from ssvp.backbones import BackboneFeatures
    from ssvp.losses import margin_loss, total_loss, vae_loss
    from ssvp.pfl_vcpg import PFLVCPGHead

    c_cfg = Config.tiny(prompting="bayes_pfl", fusion="atf", pfl_flows=2).model
    d_cfg = Config.tiny(prompting="bayes_pfl_vcpg", fusion="atf", pfl_flows=2, lambda1=0.7, lambda2=0.3).model
    assert (d_cfg.vcpg, d_cfg.vtam) == (True, False)
    assert Config.tiny(prompting="bayes_pfl").override({"vcpg": True}).model.prompting == "bayes_pfl_vcpg"
    model_c = SSVP(c_cfg)
    head_c, head_d = model_c.head, PFLVCPGHead(d_cfg, 64, 64, model_c.backbones.text)
    c_keys, d_keys = set(head_c.state_dict()), set(head_d.state_dict())
    assert {k.split(".")[0] for k in c_keys - d_keys} == {"flow_ctx", "flow_normal", "flow_abnormal"}
    assert {k.split(".")[0] for k in d_keys - c_keys} == {"vcpg"}
    assert {k.split(".")[0] for k in c_keys & d_keys} == {"fusion", "prompts", "class_mapping", "rca",
                                                          "log_scale_image", "log_scale_pixel"}
    gen = torch.Generator().manual_seed(0)
    b, g = 4, d_cfg.grid
    feats = BackboneFeatures(torch.randn(b, 4, g * g, 64, generator=gen), torch.randn(b, 64, generator=gen),
                             torch.randn(b, 4, g * g, 64, generator=gen), torch.randn(b, 64, generator=gen))
    masks = (torch.rand(b, 4 * g, 4 * g, generator=gen) > 0.9).float()
    labels = torch.tensor([0, 1, 0, 1])
    head_d.train()
    out = head_d(feats, ["wood", "tile"] * 2, 4 * g)
    loss, parts = total_loss(out, masks, labels, d_cfg)
    vae, _, _ = vae_loss(out.aux["recon"], out.aux["v_global"], out.aux["mu"], out.aux["logvar"], d_cfg.beta)
    margin = margin_loss(out.aux["text_samples"][:, 0], out.aux["t_init_prompts"], d_cfg.xi)
    row_c = parts["cls"] + parts["focal"] + parts["dice"] + d_cfg.pfl_orth_weight * parts["orth"]
    assert parts["kl"].item() == 0.0 and parts["dice"].item() > 0 and parts["orth"].item() > 0
    assert loss.item() == pytest.approx((row_c + 0.7 * vae + 0.3 * margin).item(), rel=1e-5)
    loss.backward()
    for name in ("vcpg.f_mu.0.weight", "vcpg.alpha", "rca.q.weight", "class_mapping.weight", "prompts.ctx"):
        grad = dict(head_d.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
    groups = head_d.trainable_parameters()  # SSVP's groups: the bank at lr_prompt, VCPG at lr_head
    assert {id(p) for p in groups["prompt"]} == {id(p) for p in head_d.prompts.parameters()}
    head_d.eval()  # one z per image at inference: the score is that of the one VCPG sample
    assert head_d(feats, ["wood", "tile"] * 2, 4 * g).aux["samples"] == 1


@pytest.mark.slow  # learning: 30 steps of the head, measured by the loss
def test_training_lowers_the_loss_on_synthetic_data(tiny_model):
    """Synthetic frozen features: defect patches lie along one direction of the joint space, the
    mask marks them. Thirty steps of the Bayes-PFL head lower its full loss (all terms), measured
    on the same prompt-sample draws before and after (single training draws are noisy: the
    prompt samples start at unit variance, as in the authors' code)."""
    from ssvp.backbones import BackboneFeatures
    from ssvp.losses import total_loss

    import copy

    tiny_model = copy.deepcopy(tiny_model)  # trained here: the module's other tests keep the untrained one
    gen = torch.Generator().manual_seed(0)
    head, cfg = tiny_model.head, tiny_model.model_cfg
    b, n_layers, g, d = 8, len(cfg.clip_layers), cfg.grid, tiny_model.backbones.clip_dim
    direction = F.normalize(torch.randn(d, generator=gen), dim=0)
    patch_mask = torch.zeros(b, g, g)
    for i in range(b // 2):  # anomalous images: a 3 x 3 defect at a random place
        r, c = torch.randint(0, g - 3, (2,), generator=gen).tolist()
        patch_mask[i, r:r + 3, c:c + 3] = 1.0
    patches = torch.randn(b, n_layers, g * g, d, generator=gen) + 3.0 * patch_mask.view(b, 1, -1, 1) * direction
    feats = BackboneFeatures(patches, torch.randn(b, d, generator=gen) + 2.0 * patch_mask.amax(dim=(1, 2))[:, None] * direction,
                             torch.zeros(b, 0, g * g, 0), torch.zeros(b, 0))
    masks = F.interpolate(patch_mask[:, None], size=(4 * g, 4 * g), mode="nearest")[:, 0]
    labels = (patch_mask.amax(dim=(1, 2)) > 0).long()
    names = ["wood", "tile"] * (b // 2)
    groups = head.trainable_parameters()
    opt = torch.optim.Adam([{"params": groups["prompt"], "lr": 1e-2}, {"params": groups["head"], "lr": 1e-2}])
    head.train()

    def loss_at_fixed_draws() -> float:  # the training loss, same prompt samples before and after
        with torch.no_grad():
            values = []
            for seed in (101, 102, 103):
                torch.manual_seed(seed)
                values.append(total_loss(head(feats, names, 4 * g), masks, labels, cfg)[0].item())
        return sum(values) / len(values)

    before = loss_at_fixed_draws()
    for _ in range(30):
        loss, _ = total_loss(head(feats, names, 4 * g), masks, labels, cfg)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = loss_at_fixed_draws()
    assert after < 0.9 * before, (before, after)  # measured 8.51 -> 7.02


# ------------------------------------------------------------------------------- CLI, grid
def _ssvp(*args, cwd):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "ssvp.cli", *args], cwd=cwd, capture_output=True, text=True, env=env)


@pytest.mark.slow
def test_train_eval_predict_through_the_cli_and_rebuild_from_checkpoint(tmp_path, synthetic_root):
    from ssvp.engine import build_model, config_from_checkpoint, load_head

    cfg_file = tmp_path / "pfl.yaml"
    cfg_file.write_text(
        "preset: tiny\n"
        "model: {prompting: bayes_pfl, fusion: none, pfl_samples: 2, pfl_flows: 2}\n"
        "train: {epochs: 1, max_steps_per_epoch: 2, protocol: select}\n"
        f"data: {{source: 'synthetic:{synthetic_root}/domain_a', targets: ['synthetic:{synthetic_root}/domain_b'], max_per_class: 3}}\n"
    )
    out = tmp_path / "run"
    proc = _ssvp("train", "--config", str(cfg_file), "--out", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    history = json.loads((out / "history.json").read_text())
    assert {"train_cls", "train_focal", "train_dice", "train_kl", "train_orth"} <= set(history[0])
    ckpt = out / "checkpoints" / "last"
    saved = json.loads((ckpt / "config.json").read_text())
    assert saved["model"]["prompting"] == "bayes_pfl" and saved["model"]["pfl_samples"] == 2

    # the checkpoint alone rebuilds the Bayes-PFL head, and its weights load strictly
    cfg = config_from_checkpoint(ckpt)
    model = build_model(cfg, torch.device("cpu"))
    assert isinstance(model.head, BayesPFLHead) and not isinstance(model.head, SSVPHead)
    load_head(model, ckpt)

    csv_out = tmp_path / "eval.csv"
    proc = _ssvp("eval", "--checkpoint", str(ckpt), "--out", str(csv_out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = list(csv.DictReader(csv_out.open()))
    mean = next(r for r in rows if r["class"] == "mean")
    for key in ("image_auroc", "pixel_auroc", "pixel_aupro"):
        assert 0.0 <= float(mean[key]) <= 1.0, key

    cls = sorted((synthetic_root / "domain_b").iterdir())[0].name
    images = synthetic_root / "domain_b" / cls / "test"
    pred = tmp_path / "pred"
    proc = _ssvp("predict", "--checkpoint", str(ckpt), "--input", str(images), "--class-name", cls, "--out", str(pred),
                 cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    scores = list(csv.DictReader((pred / "scores.csv").open()))
    assert len(scores) == len(list(images.rglob("*.png")))
    assert all(0.0 <= float(r["score"]) <= 1.0 for r in scores)


@pytest.mark.slow
def test_runs_as_a_variant_of_the_quick_ablation_grid(tmp_path, synthetic_root):
    """`python ablations/grid.py --grid <quick> --variants bayes_pfl --local`, as a user runs it."""
    grid = yaml.safe_load((REPO / "ablations" / "configs" / "quick.yaml").read_text())
    grid["base"].update(source=f"synthetic:{synthetic_root}/domain_a", targets=[f"synthetic:{synthetic_root}/domain_b"],
                        max_per_class=3, max_steps_per_epoch=1)
    grid_file = tmp_path / "quick.yaml"
    grid_file.write_text(yaml.safe_dump(grid))
    out, db = tmp_path / "out", tmp_path / "mlflow.db"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    proc = subprocess.run(
        [sys.executable, "ablations/grid.py", "--grid", str(grid_file), "--variants", "bayes_pfl", "--seeds", "1",
         "--local", "--num-cpus", "2", "--out", str(out), "--tracking-uri", f"sqlite:///{db}",
         "--storage-path", str(tmp_path / "ray"), "--quiet", "--register-model", "grid-heads"],
        cwd=REPO, capture_output=True, text=True, env=env, timeout=900,
    )
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-3000:])
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines() if line.strip()]
    by_variant = {r["variant"]: r for r in records}  # the grid's reference variant (full SSVP) runs too
    assert "bayes_pfl" in by_variant and by_variant["bayes_pfl"]["status"] == "ok", by_variant
    (mean,) = [table["mean"] for table in by_variant["bayes_pfl"]["metrics"].values()]
    for key in ("image_auroc", "pixel_auroc", "pixel_aupro"):
        assert 0.0 <= mean[key] <= 1.0, (key, mean)
    table = (out / "results.md").read_text()
    assert "bayes_pfl" in table or "Bayes-PFL" in table

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    # the grid's parent carries the grid's artifacts, none of a search's ("best" cell, objective plot, importance)
    state = json.loads((out / "grid.json").read_text())
    assert state["grid_file"] == str(grid_file) and state["launch_dir"] == str(REPO)  # as named, not resolved copies
    parent = client.get_run(state["parent_run_id"])
    top = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert "ablation" in top and "results.csv" in top
    assert not top & {"best_config.json", "objective_vs_trial.png", "param_importance.json", "param_importance.png",
                      "results.md"}, top
    assert "best_trial_id" not in parent.data.tags and "best_val_objective" not in parent.data.metrics
    # --register-model: each finished cell's heads, one registered version per variant-seed
    versions = client.search_model_versions("name = 'grid-heads'")
    assert sorted(v.tags["variant"] for v in versions) == ["bayes_pfl", "full"]
    assert len({v.tags["seed"] for v in versions}) == 1  # one seed, both variants
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    trial = [r for r in runs if r.data.params.get("prompting")]
    # the switch is an MLflow param of every trial run: Bayes-PFL next to the reference (full SSVP, vcpg)
    assert {r.data.params["prompting"] for r in trial} == {"bayes_pfl", "vcpg"}
    # grid cells train with the paper protocol (all source classes, the last epoch is the model; the
    # quick grid's val_classes are not held out) and record it: no val/* metric
    assert {r.data.params["protocol"] for r in trial} == {"paper"}
    assert not any(k.startswith("val/") for r in trial for k in r.data.metrics), [r.data.metrics for r in trial]
