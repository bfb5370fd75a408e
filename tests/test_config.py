import json
import subprocess
import sys

import pytest

from ssvp.config import Config, ConfigError, all_keys, load_config


def test_defaults_are_the_papers():
    cfg = Config()
    m, t = cfg.model, cfg.train
    assert (m.gamma, m.xi, m.alpha_init) == (0.5, 0.85, 0.0)
    assert m.clip_model == "ViT-L-14" and m.clip_layers == [6, 12, 18, 24]
    assert m.dino_model == "dinov3_vitl16" and m.dino_layers == [3, 6, 9, 11]
    assert m.grid == 37 and m.fusion == "atf" and m.vcpg and m.vtam
    assert (t.epochs, t.batch_size, t.lr_prompt, t.lr_head) == (15, 8, 5e-4, 1e-4)
    # §4.2 loss weights, 3 + 3 prompts
    assert (m.beta, m.lambda1, m.lambda2, m.n_prompts) == (0.1, 1.0, 0.5, 3)
    # main-text readings where the paper contradicts itself (docs/PAPER_MAP.md)
    assert (m.dino_taps, m.s_local, m.s_global, m.l_seg_on) == ("as_written", "max", "inner", "p_anom")
    assert (m.ln_eq4_eq11, m.l_class_sigma, m.vae_reduction, m.z_infer) == (True, True, "sum", "sample")
    assert m.n_latent_tokens == 1 and t.protocol == "paper"


@pytest.mark.parametrize("key, bad", [("dino_taps", "middle"), ("s_global", "dot"), ("l_seg_on", "both"),
                                      ("vae_reduction", "max"), ("z_infer", "mode"), ("protocol", "best")])
def test_paper_options_reject_unknown_values(key, bad):
    with pytest.raises(ConfigError, match=key):
        Config().override({key: bad})


def test_keys_unique_across_sections():
    keys = all_keys()
    assert len(keys) == len(set(keys))


@pytest.mark.parametrize(
    "override, field",
    [
        ({"gamma": 1.2}, "model.gamma"),
        ({"gamma": -0.1}, "model.gamma"),
        ({"xi": 1.5}, "model.xi"),
        ({"beta": -1e-3}, "model.beta"),
        ({"lambda2": -1}, "model.lambda2"),
        ({"tau": 0}, "model.tau"),
        ({"lr_head": 0}, "train.lr_head"),
        ({"fusion": "sum"}, "model.fusion"),
        ({"epochs": 0}, "train.epochs"),
        ({"gama": 0.5}, "gama"),
        ({"model.nope": 1}, "model.nope"),
        ({"dino_layers": [3, 6, 9]}, "dino_layers"),
        ({"grid": "x"}, "model.grid"),
        ({"vcpg": "maybe"}, "model.vcpg"),
        ({"source": "no-format"}, "data"),
    ],
)
def test_bad_values_name_the_field(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        Config().override(override)


def test_flat_dotted_and_nested_overrides_agree():
    a = Config().override({"gamma": 0.3, "lr_prompt": 1e-3})
    b = Config().override({"model.gamma": 0.3, "train.lr_prompt": 1e-3})
    c = Config.from_dict({"model": {"gamma": 0.3}, "train": {"lr_prompt": 1e-3}})
    assert a.to_dict() == b.to_dict() == c.to_dict()
    assert a.model.gamma == 0.3 and a.train.lr_prompt == 1e-3


def test_cli_strings_are_coerced():
    cfg = Config().override({"gamma": "0.25", "epochs": "3", "vcpg": "false", "clip_layers": "1,2,3,4", "targets": "a:b,c:d"})
    assert cfg.model.gamma == 0.25 and cfg.train.epochs == 3 and cfg.model.vcpg is False
    assert cfg.model.clip_layers == [1, 2, 3, 4] and cfg.data.targets == ["a:b", "c:d"]


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_round_trip(tmp_path, suffix):
    cfg = Config.tiny(gamma=0.2, fusion="concat", targets=["mvtec:/x"])
    path = cfg.save(tmp_path / f"c{suffix}")
    assert load_config(path).to_dict() == cfg.to_dict()


def test_tiny_preset_in_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("preset: tiny\nmodel:\n  gamma: 0.7\n")
    cfg = load_config(path)
    assert cfg.model.clip_model == "tiny" and cfg.model.gamma == 0.7


def test_unreadable_config_names_file(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="bad.json"):
        load_config(path)
    with pytest.raises(ConfigError, match="missing.yaml"):
        load_config(tmp_path / "missing.yaml")


def test_import_ssvp_pulls_in_neither_ray_nor_mlflow():
    code = (
        "import sys, ssvp, ssvp.config, ssvp.engine, ssvp.model, ssvp.backbones, ssvp.data, ssvp.metrics, ssvp.cli;"
        "bad=[m for m in sys.modules if m.split('.')[0] in ('ray','mlflow','optuna')];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
