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
    # main-text readings where the paper contradicts itself (docs/PAPER_MAP.md); Eq. 19's global term
    # as Eq. 14's probability on V_global (issue 20: both terms of Eq. 19 in [0, 1])
    assert (m.dino_taps, m.s_local, m.s_global, m.l_seg_on) == ("as_written", "max", "prob", "p_anom")
    assert (m.ln_eq4_eq11, m.l_class_sigma, m.vae_reduction, m.z_infer) == (True, True, "sum", "sample")
    assert m.n_latent_tokens == 1 and t.protocol == "paper"
    assert t.grad_clip == 0.0  # §4.2 names no gradient clipping (issue 20 point 4); the option stays
    assert Config().override({"grad_clip": 1.0}).train.grad_clip == 1.0


@pytest.mark.parametrize("s_global", ["inner", "cosine", "logit"])
def test_bce_on_s_final_itself_needs_s_final_in_0_1(s_global):
    """Issue 20 point 7: l_class_sigma=false reads S_final as a probability; with a reading of Eq. 19
    whose S_final leaves [0, 1] the score saturates and the clamp stops the gradient: refused, naming both keys."""
    with pytest.raises(ConfigError, match=r"model\.l_class_sigma=false.*model\.s_global"):
        Config().override({"l_class_sigma": False, "s_global": s_global})
    assert not Config().override({"l_class_sigma": False, "s_global": "prob"}).model.l_class_sigma


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


# --------------------------------------------------------------------------- mistakes on the command line
@pytest.mark.parametrize("override, message", [
    ({"gama": 0.3}, "unknown config key 'gama'; did you mean gamma?"),
    ({"lr_promt": 1e-3}, "unknown config key 'lr_promt'; did you mean lr_prompt?"),
    ({"model.gama": 0.3}, "unknown config key model.gama; did you mean model.gamma?"),
    ({"train.gama": 0.3}, "unknown config key train.gama; did you mean model.gamma?"),
    ({"train.gamma": 0.3}, "unknown config key train.gamma: 'gamma' is in section 'model' (model.gamma)"),
    ({"modle.gamma": 0.3}, "unknown config section 'modle' (in key modle.gamma); did you mean model?"),
    ({"model": {"gama": 0.3}}, "unknown config key model.gama; did you mean model.gamma?"),
    ({"zzqqxx": 1}, "unknown config key 'zzqqxx'; ssvp train --print-config lists every key"),
])
def test_mistyped_key_names_the_closest_not_all_keys(override, message):
    with pytest.raises(ConfigError) as info:
        Config().override(override)
    assert str(info.value) == message  # one suggestion, not the ~70 keys


@pytest.mark.parametrize("override, message", [
    ({"gamma": "abc"}, "model.gamma must be a number, e.g. gamma=0.5; got 'abc'"),
    ({"epochs": "1.5"}, "train.epochs must be an integer, e.g. epochs=15; got '1.5'"),
    ({"vcpg": "maybe"}, "model.vcpg must be true or false (vcpg=true or vcpg=false); got 'maybe'"),
    ({"clip_layers": "[6, 12, x]"},
     "model.clip_layers must be a list of integers, e.g. clip_layers=6,12,18,24 or clip_layers=[6, 12, 18, 24]"),
    ({"data.targets": "[meta:/data/loco"}, "data.targets: unbalanced brackets in '[meta:/data/loco'; write it as "
                                           "targets=mvtec:data/mvtec_anomaly_detection or targets=[mvtec:"),
    ({"targets": 3}, "data.targets must be a list, e.g. targets=mvtec:data/mvtec_anomaly_detection or targets=["),
])
def test_unparsable_value_names_the_key_and_a_valid_form(override, message):
    with pytest.raises(ConfigError) as info:
        Config().override(override)
    assert str(info.value).startswith(message)


@pytest.mark.parametrize("text, want", [
    ("meta:/data/loco", ["meta:/data/loco"]),  # a bare FORMAT:ROOT for a list key
    ("[meta:/data/loco]", ["meta:/data/loco"]),  # YAML-style flow list, unquoted (was a JSON error)
    ("[meta:/data/loco, visa:/data/VisA]", ["meta:/data/loco", "visa:/data/VisA"]),
    ('["meta:/data/loco", "visa:/data/VisA"]', ["meta:/data/loco", "visa:/data/VisA"]),
    ("meta:/a,mvtec:/b", ["meta:/a", "mvtec:/b"]),
])
def test_list_key_accepts_the_forms_a_person_types(text, want):
    assert Config().override({"data.targets": text}).data.targets == want


def test_ssvp_cli_set_mistakes(capsys):
    import yaml

    from ssvp.cli import main

    assert main(["train", "--set", "gama=0.3", "--print-config"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'gama'; did you mean gamma?" in err and "focal_lambda" not in err
    assert main(["train", "--set", "data.targets=[meta:/data/loco]", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert yaml.safe_load(out.split("\n", 1)[1])["data"]["targets"] == ["meta:/data/loco"]
    assert main(["train", "--set", "gamma=high", "--print-config"]) == 2
    assert "model.gamma must be a number, e.g. gamma=0.5; got 'high'" in capsys.readouterr().err


def test_grid_and_sweep_files_suggest_the_key_and_variant_meant(tmp_path):
    """Grid keys and variant names, sweep sections and sweep --set (search space keys and the sweep
    file's other sections: tests/test_tuning_space.py)."""
    from ablations.spec import GridError, parse_grid
    from tuning.settings import SweepConfigError, load_sweep

    grid = {"name": "g", "base": {"preset": "tiny"}, "variants": [{"name": "full", "letter": "E"}, {"name": "no_vtam"}]}
    with pytest.raises(GridError, match=r"unknown key\(s\) refernce; did you mean reference\?$"):
        parse_grid({**grid, "refernce": "full"})
    with pytest.raises(GridError, match=r"variants\[0\]: unknown key\(s\) overides; did you mean overrides\?$"):
        parse_grid({**grid, "variants": [{"name": "a", "overides": {}}]})
    with pytest.raises(GridError, match=r"no variant named 'no_vtm'; did you mean no_vtam\?$"):
        parse_grid(grid).variant("no_vtm")
    with pytest.raises(GridError, match=r"no variant named 'zz'; variants: full, no_vtam$"):
        parse_grid(grid).variant("zz")
    sweep = tmp_path / "s.yaml"
    sweep.write_text("name: s\nsearch: {algorithm: optuna, schedular: asha}\n")
    with pytest.raises(SweepConfigError, match=r"search: unknown key\(s\) schedular; did you mean scheduler\?$"):
        load_sweep(sweep)
    sweep.write_text("name: s\n")
    with pytest.raises(SweepConfigError, match=r"--set: unknown config key 'gama'; did you mean gamma\?$"):
        load_sweep(sweep, {"gama": 0.3})


@pytest.mark.parametrize("key", ["clip_pretrained", "dino_weights"])
def test_weights_url_is_refused_with_its_password_masked(key):
    """A weights value is a tag, an hf-hub:/Hugging Face id or a local path. A URL would not load, and
    its password would land in every checkpoint's config.json: refused, naming the field, password masked."""
    with pytest.raises(ConfigError) as info:
        Config.tiny(**{key: "https://u:pa/ss@host:9/w.pt"})
    text = str(info.value)
    assert f"model.{key}" in text and "u:***@host:9/w.pt" in text and "pa/ss" not in text
    for fine in ("openai", "hf-hub:org/repo", "/weights/w.pt", "C:/weights/w.pt", "facebook/dinov3-vits16"):
        assert getattr(Config.tiny(**{key: fine}).model, key) == fine
