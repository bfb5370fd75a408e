"""Issue 11, the ssvp side: hostile checkpoints, atomic checkpoint and report writes,
decompression bombs and corrupt images, one-line CLI errors, progress flags that do not
change results. Real files, real subprocesses and real signals; no mocks of the libraries."""
from __future__ import annotations

import builtins
import json
import os
import random
import signal
import struct
import subprocess
import sys
import textwrap
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import synthetic_config
from ssvp import engine
from ssvp.config import Config
from ssvp.data import DatasetError, load_image, open_dataset

REPO = Path(__file__).resolve().parents[1]


def run_py(code: str, cwd: Path, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, capture_output=True, text=True,
                          env=env, **kw)


def ssvp_cli(*args, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "ssvp.cli", *args], cwd=cwd, capture_output=True, text=True, env=env)


def one_clean_line(stderr: str) -> str:
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


class _Head(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 3)


class _Model:
    """What ``save_checkpoint`` reads of a model: its trainable head."""

    def __init__(self):
        self.head = _Head()


# --------------------------------------------------------------------------- hostile checkpoints
class _Payload:
    """Unpickling this runs ``exec`` of code that creates ``marker``: what an attacker ships."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return builtins.exec, (f"open({self.marker!r}, 'w').write('pwned')",)


def _malicious_checkpoint(folder: Path, marker: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"head": _Head().state_dict(), "epoch": 0, "evil": _Payload(marker)}, folder / engine.CHECKPOINT_FILE)
    return folder


def test_crafted_pickle_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "marker"
    ckpt = _malicious_checkpoint(tmp_path / "ckpt", marker)
    # the payload is real: an unsafe load runs it
    probe = _malicious_checkpoint(tmp_path / "probe", tmp_path / "probe_marker")
    torch.load(probe / engine.CHECKPOINT_FILE, weights_only=False)
    assert (tmp_path / "probe_marker").read_text() == "pwned"
    # the project's loaders refuse it, with the file named, and run nothing
    for load in (engine.load_checkpoint, lambda p: engine.load_head(_Model(), p)):
        with pytest.raises(engine.CheckpointError) as err:
            load(ckpt)
        msg = str(err.value)
        assert str(ckpt / engine.CHECKPOINT_FILE) in msg and "refusing" in msg and "nothing in it was run" in msg
        assert "\n" not in msg
    assert not marker.exists()


def test_cli_eval_refuses_a_crafted_checkpoint_in_one_line(tmp_path, synthetic_root):
    marker = tmp_path / "marker"
    ckpt = _malicious_checkpoint(tmp_path / "ckpt", marker)
    synthetic_config(synthetic_root).save(ckpt / engine.CONFIG_FILE)
    proc = ssvp_cli("eval", "--checkpoint", str(ckpt), cwd=tmp_path)
    assert proc.returncode == 2
    line = one_clean_line(proc.stderr)
    assert line.startswith("ssvp eval: error: refusing to load checkpoint") and str(ckpt) in line
    assert not marker.exists()


def test_checkpoint_round_trip_is_weights_only_and_restores_rng(tmp_path):
    model = _Model()
    opt = torch.optim.AdamW(model.head.parameters(), lr=1e-3)
    model.head.lin(torch.ones(2, 4)).sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=4)
    engine.seed_everything(5)
    path = engine.save_checkpoint(tmp_path / "last", Config(), model, opt, sched, 3, {"history": [{"a": 1.0}]})
    expect = (torch.rand(3), np.random.rand(3), random.random())
    torch.load(path / engine.CHECKPOINT_FILE, weights_only=True)  # plain tensors and data only
    assert json.loads((path / engine.CONFIG_FILE).read_text())["model"]["gamma"] == Config().model.gamma
    engine.seed_everything(99)
    other = _Model()
    state = engine.load_head(other, path)
    assert torch.equal(other.head.lin.weight, model.head.lin.weight) and state["epoch"] == 3
    opt2 = torch.optim.AdamW(other.head.parameters(), lr=1e-3)
    opt2.load_state_dict(state["optimizer"])
    engine._set_rng_state(state["rng"])
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(got[0], expect[0]) and np.array_equal(got[1], expect[1]) and got[2] == expect[2]


def test_checkpoint_with_a_numpy_rng_array_still_loads(tmp_path):
    # checkpoints written before the tensor RNG state kept numpy's state as an ndarray
    (tmp_path / "old").mkdir()
    torch.save({"head": _Head().state_dict(), "epoch": 1,
                "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}},
               tmp_path / "old" / engine.CHECKPOINT_FILE)
    state = engine.load_checkpoint(tmp_path / "old")
    engine._set_rng_state(state["rng"])
    assert state["epoch"] == 1


def test_garbage_checkpoint_gets_a_clear_error(tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / engine.CHECKPOINT_FILE).write_bytes(b"not a checkpoint at all")
    with pytest.raises(engine.CheckpointError, match="cannot read checkpoint .*head.pt"):
        engine.load_checkpoint(tmp_path / "c")


# --------------------------------------------------------------------------- atomic checkpoint saves
def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_interrupted_save_leaves_no_temporary_folder_and_keeps_the_previous(tmp_path, monkeypatch):
    model = _Model()
    engine.save_checkpoint(tmp_path / "last", Config(), model, None, None, 1, {})
    real_save = torch.save

    def save_then_ctrl_c(obj, f, *a, **k):
        real_save(obj, f, *a, **k)  # a full file in the temporary folder, then Ctrl-C
        raise KeyboardInterrupt

    monkeypatch.setattr(engine.torch, "save", save_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        engine.save_checkpoint(tmp_path / "last", Config(), model, None, None, 2, {})
    monkeypatch.setattr(engine.torch, "save", real_save)
    assert _hidden(tmp_path) == []
    assert engine.load_checkpoint(tmp_path / "last")["epoch"] == 1


def test_save_killed_by_sigkill_is_cleaned_by_the_next_save(tmp_path):
    # a real process killed (SIGKILL) in the middle of writing its checkpoint
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time, torch
        from ssvp import engine
        from ssvp.config import Config
        class M:
            head = torch.nn.Linear(4, 3)
        def slow(obj, f, *a, **k):
            open(f, "wb").write(b"partial")
            print("writing", flush=True)
            time.sleep(600)
        engine.torch.save = slow
        engine.save_checkpoint({str(tmp_path / 'last')!r}, Config(), M(), None, None, 0, {{}})
    """)], cwd=tmp_path, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert proc.stdout.readline().strip() == "writing"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert _hidden(tmp_path) and not (tmp_path / "last").exists()  # the stray folder of the killed writer
    engine.save_checkpoint(tmp_path / "last", Config(), _Model(), None, None, 1, {})
    assert _hidden(tmp_path) == [] and engine.load_checkpoint(tmp_path / "last")["epoch"] == 1


# --------------------------------------------------------------------------- bad images
def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims width x height pixels (a decompression bomb's shape)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))
    return path


def test_decompression_bomb_and_corrupt_images_name_the_file(tmp_path, monkeypatch):
    bomb = _png_header_only(tmp_path / "bomb.png", 200_000, 200_000)  # 4e10 pixels: PIL's error
    with pytest.raises(DatasetError, match=f"cannot read image {bomb}.*(DecompressionBomb|decompression)"):
        load_image(bomb)
    # between PIL's limit and twice it PIL only warns and would decode: refused too
    img = tmp_path / "big.png"
    Image.new("RGB", (64, 64)).save(img)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 3000)
    with pytest.raises(DatasetError, match=f"cannot read image {img}: 64 x 64 = 4096 pixels exceeds"):
        load_image(img)
    monkeypatch.undo()
    bad = tmp_path / "corrupt.png"
    bad.write_bytes(img.read_bytes()[:60])
    with pytest.raises(DatasetError, match=f"cannot read image {bad}"):
        load_image(bad)


def test_bomb_inside_a_dataset_is_a_data_error(tmp_path):
    root = tmp_path / "ds"
    for sub in ("train/good", "test/good"):
        (root / "bottle" / sub).mkdir(parents=True)
        Image.new("RGB", (16, 16)).save(root / "bottle" / sub / "000.png")
    bomb = _png_header_only(root / "bottle" / "test" / "good" / "001.png", 200_000, 200_000)
    with pytest.raises(DatasetError, match=str(bomb)):
        ds = open_dataset(f"mvtec:{root}", "test")
        [ds[i] for i in range(len(ds))]
    ds = open_dataset(f"mvtec:{root}", "test", skip_bad_files=True)  # skip-and-report
    assert [p for p, _ in ds.skipped] == [str(bomb)] and len(ds) == 1


# --------------------------------------------------------------------------- progress does not change results
def test_progress_bar_does_not_touch_the_loader():
    # tqdm.auto's class calls iter() on what it wraps when built: with a shuffled DataLoader
    # that drew from the loader's generator and changed the order of every epoch
    def order(enabled: bool) -> list[int]:
        loader = torch.utils.data.DataLoader(list(range(40)), batch_size=4, shuffle=True,
                                             generator=torch.Generator().manual_seed(3))
        bar = engine._progress(loader, enabled, total=len(loader), desc="x")
        return [int(x) for batch in bar for x in batch]

    assert order(True) == order(False)


@pytest.mark.slow  # two training runs
def test_same_seed_same_metrics_with_or_without_progress(synthetic_root):
    runs = {}
    for progress in (False, True):
        cfg = synthetic_config(synthetic_root, max_per_class=2, epochs=1, max_steps_per_epoch=2, protocol="select",
                               progress=progress)
        runs[progress] = engine.fit(cfg).history
    assert runs[True] == runs[False]


# --------------------------------------------------------------------------- CLI: one line, non-zero, nothing half-written
def _tiny_checkpoint(tmp_path: Path, synthetic_root: Path) -> Path:
    ckpt = tmp_path / "ckpt"
    engine.save_checkpoint(ckpt, synthetic_config(synthetic_root), _Model(), None, None, 0, {})
    return ckpt


def test_cli_bad_out_is_one_line_before_any_work(tmp_path, synthetic_root):
    """A bad --out is refused up front: the evaluation (which would build the model and read every
    image) is never called."""
    ckpt = _tiny_checkpoint(tmp_path, synthetic_root)
    (tmp_path / "a_file").write_text("x")
    for out, expect in ((tmp_path, "is a folder"), (tmp_path / "a_file" / "eval.json", "cannot create its folder")):
        proc = run_py(f"""
            import sys
            from ssvp import cli, engine
            def evaluate(*args, **kwargs):
                raise SystemExit("evaluate was called before the --out check")
            engine.evaluate = evaluate
            sys.exit(cli.main(["eval", "--checkpoint", {str(ckpt)!r}, "--out", {str(out)!r}]))
        """, cwd=tmp_path)
        assert proc.returncode == 2, proc.stderr[-2000:]
        line = one_clean_line(proc.stderr)
        assert expect in line and str(out) in line and "--out" in line
    proc = ssvp_cli("train", "--config", str(tmp_path / "missing.yaml"), "--out", str(tmp_path / "r"), cwd=tmp_path)
    assert proc.returncode == 2 and "missing.yaml" in one_clean_line(proc.stderr)
    proc = ssvp_cli("train", "--out", str(tmp_path / "a_file" / "run"), "--set", "train.epochs=1", cwd=tmp_path)
    assert proc.returncode != 0 and "a_file" in one_clean_line(proc.stderr)


def test_cli_disk_full_while_writing_the_report(tmp_path, synthetic_root):
    """The write of the report fails in the kernel (file-size limit, as a full disk does):
    one line naming the file, exit 1, no half-written report and no temporary file."""
    ckpt = _tiny_checkpoint(tmp_path, synthetic_root)
    out = tmp_path / "reports" / "eval.json"
    proc = run_py(f"""
        import resource, signal, sys
        from ssvp import cli, engine
        big = {{"per_class": {{f"c{{i}}": {{"image_auroc": 0.5}} for i in range(2000)}}, "mean": {{"image_auroc": 0.5}}}}
        engine.evaluate = lambda cfg, ckpt, datasets=None: {{"synthetic:x": big}}
        cli._metric_table = lambda report: "(table)"
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
        sys.exit(cli.main(["eval", "--checkpoint", {str(ckpt)!r}, "--out", {str(out)!r}]))
    """, cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr[-3000:]
    line = one_clean_line(proc.stderr)
    assert line.startswith("ssvp eval: error: cannot write") and str(out) in line and "too large" in line.lower()
    assert list(out.parent.iterdir()) == []  # no report, no temporary file


# --------------------------------------------------------------------------- issue 25: nothing from the storage path runs
def _sweep_yaml(tmp_path: Path, synthetic_root: Path) -> Path:
    cfg = tmp_path / "s.yaml"
    cfg.write_text(f"name: s\nbase:\n  preset: tiny\n  synthetic: {{root: {synthetic_root}}}\n")
    return cfg


def _resume_args(cfg: Path, tmp_path: Path, *extra: str) -> list[str]:
    return ["--config", str(cfg), "--storage-path", str(tmp_path / "ray"), "--tracking-uri",
            f"sqlite:///{tmp_path}/m.db", "--local", "--resume", *extra]


@pytest.fixture()
def own_key(tmp_path, monkeypatch):
    """This user's signing key lives outside the storage path (here: a private config folder)."""
    monkeypatch.delenv("SSVP_STATE_KEY", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))


def test_planted_tuner_pkl_is_refused_and_its_payload_never_runs(tmp_path, synthetic_root, own_key, capsys):
    """A ``tuner.pkl`` someone else wrote under the shared storage path (whose payload would create a
    marker file) is refused by ``--resume`` before anything is unpickled: exit 2, one line naming it."""
    import pickle

    from tuning.sweep import main

    planted = tmp_path / "ray" / "s-29990101-000000"
    planted.mkdir(parents=True)
    marker = tmp_path / "pwned"
    (planted / "tuner.pkl").write_bytes(pickle.dumps(_Payload(marker)))
    (planted / "launch.json").write_text(json.dumps({"argv": ["--set", "epochs=1"]}))
    cfg = _sweep_yaml(tmp_path, synthetic_root)
    assert main(_resume_args(cfg, tmp_path, "--name", planted.name)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "untrusted sweep state" in err and "has no signature" in err, err
    assert str(planted / "launch.json") in err or str(planted / "tuner.pkl") in err
    assert not marker.exists()
    # signed with another user's key: refused too, naming the file that does not match
    from tuning.integrity import StateSigner, state_key, verify_sweep_state

    state_key()  # this user's key (created on first use, mode 0600)
    assert oct((tmp_path / "config" / "ssvp" / "state.key").stat().st_mode & 0o777) == "0o600"
    os.environ["SSVP_STATE_KEY"] = "someone-else"
    try:
        StateSigner(str(planted)).sign_storage()
    finally:
        del os.environ["SSVP_STATE_KEY"]
    assert main(_resume_args(cfg, tmp_path, "--name", planted.name)) == 2
    err = capsys.readouterr().err
    assert "does not match its signature" in err and "launch.json" in err, err
    assert not marker.exists()
    # this user's own signatures pass; a byte changed afterwards in a searcher state is named
    StateSigner(str(planted)).sign_storage()
    signer = StateSigner(str(planted), verify_sweep_state(planted))
    (planted / "searcher-state-x.pkl").write_bytes(b"\x80\x04K\x01.")
    signer.sign_staging(str(planted))
    assert set(verify_sweep_state(planted)) == {"tuner.pkl", "launch.json", "searcher-state-x.pkl"}
    (planted / "searcher-state-x.pkl").write_bytes(b"\x80\x04K\x02.")
    with pytest.raises(ValueError, match=r"searcher-state-x\.pkl does not match"):
        verify_sweep_state(planted)
    assert not marker.exists()


def test_resume_never_picks_a_sweep_by_itself(tmp_path, synthetic_root, own_key, capsys):
    """``--resume`` without ``--name`` lists the sweeps of that config and starts none; a misspelt
    ``--name`` is refused with the sweeps that exist (it used to start a new sweep silently)."""
    from tuning.sweep import main

    for name in ("s-20260101-000000", "s-20260202-000000", "other-1"):
        (tmp_path / "ray" / name).mkdir(parents=True)
        (tmp_path / "ray" / name / "launch.json").write_text('{"argv": []}')
        time.sleep(0.01)
    cfg = _sweep_yaml(tmp_path, synthetic_root)
    assert main(_resume_args(cfg, tmp_path)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --resume needs --name") and "s-20260202-000000, s-20260101-000000" in err, err
    assert "other-1" not in err
    assert main(_resume_args(cfg, tmp_path, "--name", "s-2026010-000000")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --resume --name 's-2026010-000000': no such sweep") and "other-1" in err, err
    assert not (tmp_path / "ray" / "s-2026010-000000").exists()


# --------------------------------------------------------------------------- issue 25: corrupt checkpoints are never quiet
def test_flipped_bytes_in_a_checkpoint_are_one_checkpoint_error_naming_the_file(tmp_path):
    """torch does not check its zip's CRCs: bytes flipped in a tensor's storage load as other weights.
    ``save_checkpoint`` records each file's SHA-256 (``checksums.json``) and loading checks it."""
    model = _Model()
    path = engine.save_checkpoint(tmp_path / "last", Config(), model, None, None, 1, {})
    file = path / engine.CHECKPOINT_FILE
    data = bytearray(file.read_bytes())
    raw = model.head.lin.weight.detach().numpy().astype("<f4").tobytes()
    at = bytes(data).find(raw[:16])
    assert at > 0  # the weight's storage, uncompressed in the zip
    data[at + 3] ^= 0x7F  # one exponent byte: a weight becomes huge, the zip still loads
    file.write_bytes(bytes(data))
    assert not torch.equal(torch.load(file, weights_only=True)["head"]["lin.weight"], model.head.lin.weight)
    for load in (engine.load_checkpoint, lambda p: engine.load_head(_Model(), p)):
        with pytest.raises(engine.CheckpointError, match=rf"checkpoint file {file} is corrupt: its SHA-256 differs"):
            load(path)
    (path / engine.CONFIG_FILE).write_text((path / engine.CONFIG_FILE).read_text().replace('"gamma"', ' "gamma"'))
    with pytest.raises(engine.CheckpointError, match="config.json is corrupt"):
        engine.config_from_checkpoint(path)


@pytest.mark.parametrize("kind", ["list_head", "safetensors", "nan_weights"])
def test_malformed_heads_get_a_message_naming_the_file_and_never_unsafe_advice(tmp_path, kind):
    folder = tmp_path / "c"
    folder.mkdir()
    file = folder / engine.CHECKPOINT_FILE
    if kind == "list_head":
        torch.save({"head": [1, 2, 3]}, file)
        expect = "'head' is list; expected a state dict"
    elif kind == "safetensors":
        from safetensors.torch import save_file

        save_file(_Head().state_dict(), str(file))
        expect = "a safetensors file; expected head.pt as ssvp writes it"
    else:
        state = _Head().state_dict()
        state["lin.weight"][0, 0] = float("nan")
        torch.save({"head": state, "epoch": 0}, file)
        expect = "head weight 'lin.weight' holds 1 NaN/infinite value(s)"
    for load in (engine.load_checkpoint, lambda p: engine.load_head(_Model(), p)):
        with pytest.raises(engine.CheckpointError) as err:
            load(folder)
        msg = str(err.value)
        assert str(file) in msg and expect in msg and "weights_only" not in msg and "\n" not in msg, msg


def test_non_finite_scores_or_maps_are_an_error_not_a_label():
    """``nan >= threshold`` is False: ``ssvp predict`` printed 'nan  normal' and exited 0. A non-finite
    score or map is now an error naming the image (a ValueError: the CLI's one line, exit 2)."""
    from types import SimpleNamespace

    paths = [Path("a.png"), Path("b.png")]
    ok = SimpleNamespace(score=torch.tensor([0.1, 0.2]), anomaly_map=torch.zeros(2, 1, 4, 4))
    engine._check_finite_output(ok, paths, "ck")
    for score, amap in ((torch.tensor([0.1, float("nan")]), torch.zeros(2, 1, 4, 4)),
                        (torch.tensor([0.1, 0.2]), torch.zeros(2, 1, 4, 4).index_fill_(0, torch.tensor([1]), float("inf")))):
        with pytest.raises(engine.NonFiniteOutputError, match=r"non-finite anomaly score or map for b\.png \(1 of 2"):
            engine._check_finite_output(SimpleNamespace(score=score, anomaly_map=amap), paths, "ck")
    assert issubclass(engine.NonFiniteOutputError, ValueError)
