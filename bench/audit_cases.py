"""Issue 25's bad-input and trust cases, each run as the real command: a Markdown table of what it did.

Each case runs ``python tuning/sweep.py ...`` or ``python -m ssvp.cli ...`` as a child process in a
fresh work folder ($W: the tiny preset, the built-in synthetic data, a checkpoint of a one-step
``ssvp train``, per-case ``--storage-path`` and SQLite MLflow, the signing key under $W/config) and
records its exit code and the first line of its stderr (of stdout when stderr is empty; argparse's
usage block skipped), with what the case must show (no payload run, no password printed, ...). Every
row is also checked for 'Traceback' (shown only when found); a row whose exit code, message or check
is not the expected one is marked UNEXPECTED (exit 1). Cases 19-20 are real tiny Ray sweeps; their
driver's processes are counted 15 s after it exits. ``--json`` rows also hold stderr's and stdout's tails.

    python bench/audit_cases.py                            # cases 1-18 (~3 min on 2 busy cores)
    python bench/audit_cases.py --with-ray                 # and the sweeps 19-20 (~3 min more)
    python bench/audit_cases.py --with-ray --only 19,20 --json rows.json
    python bench/audit_cases.py --only 5,6 --work /tmp/audit --keep
"""
from __future__ import annotations

import argparse
import builtins
import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]
SECRET = "pa/ss9876"  # a password holding '/'
PLANTED = ("s-20260101-000000", "s-20260202-000000", "other-1")  # sweep folders cases 2 and 12 find


class Payload:
    """Unpickling this creates ``marker``: a planted tuner.pkl's payload."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return builtins.exec, (f"open({self.marker!r}, 'w').write('pwned')",)


class Ctx:
    """The work folder: synthetic data, per-case sweep folders, a trained tiny checkpoint (made on demand)."""

    def __init__(self, root: Path):
        from ssvp.data import make_synthetic

        self.root, self.data, self._ckpt = root, root / "data", None
        make_synthetic(self.data, seed=0)
        self.images = self.data / "domain_b" / "leather" / "test"

    def exec(self, argv: list[str], cmd: str, timeout: float = 300) -> dict:
        proc = subprocess.Popen([sys.executable, *argv], cwd=self.root, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:  # e.g. a pre-flight check that let a sweep start
            os.killpg(proc.pid, 9)
            out, err = proc.communicate()
        return {"rc": proc.returncode, "out": out, "err": err, "cmd": cmd}

    def short(self, args) -> str:
        return " ".join(repr(a) if a.strip() == "" else a.replace(f"{REPO}/", "").replace(str(self.root), "$W")
                        for a in map(str, args))

    def ssvp(self, *args) -> dict:
        return self.exec(["-m", "ssvp.cli", *map(str, args)], "ssvp " + self.short(args))

    def sweep(self, case: str, *args: str, search: str = "", synthetic: str = "", plant=()) -> dict:
        """``sweep.py`` on a tiny sweep file, with its own storage (holding ``plant``'s folders) and store."""
        d = self.root / f"case{case}"
        (d / "ray").mkdir(parents=True, exist_ok=True)
        for name in plant:
            (d / "ray" / name).mkdir()
            (d / "ray" / name / "launch.json").write_text('{"argv": []}')
            time.sleep(0.01)
        (d / "s.yaml").write_text(
            f"name: s\nbase:\n  preset: tiny\n  synthetic: {{root: {self.data}, seed: 0{synthetic}}}\n"
            "  overrides: {epochs: 1, max_steps_per_epoch: 1, max_per_class: 2, progress: false}\n"
            + (f"search: {{{search}}}\n" if search else ""))
        common = ["--config", str(d / "s.yaml"), "--local", "--storage-path", str(d / "ray"),
                  "--tracking-uri", f"sqlite:///{d / 'm.db'}"]
        return self.exec([str(REPO / "tuning" / "sweep.py"), *common, *args],
                         "sweep.py " + self.short(args) + (f" [search: {search}]" if search else "")
                         + (f" [base.synthetic: {synthetic.lstrip(', ')}]" if synthetic else ""))

    @property
    def ckpt(self) -> Path:
        """A real checkpoint: ``ssvp train`` of the tiny preset, one step (~30 s)."""
        if self._ckpt is None:
            out, data = self.root / "train", self.data
            r = self.ssvp("train", "--config", REPO / "configs" / "tiny.yaml", "--no-eval", "--out", out,
                          "--set", f"data.source=synthetic:{data / 'domain_a'}", "--set", "train.epochs=1",
                          "--set", f"data.targets=[synthetic:{data / 'domain_b'}]", "--set", "max_steps_per_epoch=1",
                          "--set", "max_per_class=2")
            if r["rc"] != 0:
                raise RuntimeError(f"ssvp train failed: {r['err'][-300:]}")
            self._ckpt = out / "checkpoints" / "best"
        return self._ckpt

    def tampered(self, name: str, change) -> Path:
        """A copy of the checkpoint whose head.pt ``change`` rewrote, its checksum recorded anew
        (a file written whole by someone, not a damaged one)."""
        from ssvp.engine import CHECKSUM_FILE, _sha256  # the checksum save_checkpoint records

        folder = self.root / name
        shutil.copytree(self.ckpt, folder)
        change(folder / "head.pt")
        sums = json.loads((folder / CHECKSUM_FILE).read_text())
        sums["sha256"]["head.pt"] = _sha256(folder / "head.pt")
        (folder / CHECKSUM_FILE).write_text(json.dumps(sums))
        return folder

    def outside(self) -> Path:
        from PIL import Image

        Image.new("RGB", (32, 32), (10, 128, 250)).save(self.root / "outside.png")
        return self.root / "outside.png"


def row(n: str, case: str, r: dict, rc: int, expect: str, checks: dict | None = None,
        forbid: tuple[str, ...] = ("Traceback",)) -> dict:
    """One table row. ``checks``: name -> value, each must be 'no' or 0 (names starting '=' only inform)."""
    text = r["out"] + r["err"]
    checks = {**(checks or {}), **{f"{f!r} in output": "yes" for f in forbid if f in text}}
    ok = r["rc"] == rc and expect in text and all(v in ("no", 0) or k.startswith("=") for k, v in checks.items())
    return {"n": n, "case": case, "cmd": r["cmd"], "rc": r["rc"], "line": first_line(r["err"] or r["out"]),
            "expected": f"exit {rc}, {expect!r}", "ok": ok, "checks": {k.lstrip("="): v for k, v in checks.items()},
            "stderr_tail": r["err"][-2000:], "stdout_tail": r["out"][-2000:]}


def first_line(text: str) -> str:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if lines and lines[0].startswith("usage:"):  # argparse: the usage block, then 'prog: error: ...'
        lines = [ln for ln in lines[1:] if not ln.startswith(" ")] or lines
    return lines[0][:160] if lines else ""


def leaked(r: dict) -> dict:
    return {"password in output": "yes" if SECRET in r["out"] + r["err"] else "no"}


# --------------------------------------------------------------------------- cases [issue 25 item]
def c01_planted_pickle(ctx):  # [1]
    d = ctx.root / "case1" / "ray" / "s-29990101-000000"
    d.mkdir(parents=True)
    marker = ctx.root / "case1" / "pwned"
    (d / "tuner.pkl").write_bytes(pickle.dumps(Payload(marker)))
    (d / "launch.json").write_text(json.dumps({"argv": ["--set", "epochs=1"]}))
    r = ctx.sweep("1", "--resume", "--name", d.name)
    return [row("1", "planted tuner.pkl, --resume --name", r, 2, "untrusted sweep state",
                {"marker created": "yes" if marker.exists() else "no"})]


def c02_resume_without_name(ctx):  # [1]
    r = ctx.sweep("2", "--resume", plant=PLANTED)
    new = set(p.name for p in (ctx.root / "case2" / "ray").iterdir()) - set(PLANTED)
    return [row("2", "--resume without --name", r, 2, "s-20260202-000000, s-20260101-000000",
                {"new sweep folders": len(new)})]


def c03_storage_password(ctx):  # [2]
    r = ctx.sweep("3", "--print-config", search=f"optuna_storage: 'postgresql://u:{SECRET}@db/o'")
    return [row("3", "optuna_storage password with '/', --print-config", r, 0, "postgresql://u:***@db/o", leaked(r))]


def c04_weights_url(ctx):  # [2]
    url = f"clip_pretrained=https://u:{SECRET}@host/w.pt"
    runs = {"4a": ctx.ssvp("train", "--config", REPO / "configs" / "tiny.yaml", "--set", url, "--print-config"),
            "4b": ctx.sweep("4", "--set", url, "--print-config")}
    return [row(n, "weights URL with a password", r, 2, "u:***@host/w.pt", leaked(r)) for n, r in runs.items()]


def c05_nan_weights(ctx):  # [4]
    import torch

    def nan_head(file):
        state = torch.load(file, weights_only=True)
        next(v for v in state["head"].values() if v.is_floating_point()).view(-1)[0] = float("nan")
        torch.save(state, file)

    ck = ctx.tampered("ck_nan", nan_head)
    predict = ctx.ssvp("predict", "--checkpoint", ck, "--input", ctx.images, "--class-name", "leather",
                       "--out", ctx.root / "pred_nan")
    return [row("5a", "head with a NaN weight", predict, 2, "NaN/infinite value"),
            row("5b", "head with a NaN weight", ctx.ssvp("eval", "--checkpoint", ck), 2, "NaN/infinite value")]


def c06_flipped_bytes(ctx):  # [4]
    import torch

    ck = ctx.root / "ck_flip"
    shutil.copytree(ctx.ckpt, ck)
    file, data = ck / "head.pt", bytearray((ck / "head.pt").read_bytes())
    biggest = max(torch.load(file, weights_only=True)["head"].values(), key=lambda t: t.numel())
    at = bytes(data).find(biggest.contiguous().numpy().astype("<f4").tobytes()[:16])
    data[at + 3 if at > 0 else len(data) // 2] ^= 0x7F  # an exponent byte: the zip still loads
    file.write_bytes(bytes(data))
    return [row("6", "flipped byte in head.pt (checksum kept)", ctx.ssvp("eval", "--checkpoint", ck), 2,
                f"checkpoint file {file} is corrupt", {"=byte in a weight": "yes" if at > 0 else "no (mid-file)"})]


def c07_list_head(ctx):  # [4]
    import torch

    ck = ctx.tampered("ck_list", lambda f: torch.save({"head": [1, 2, 3]}, f))
    return [row("7", "head.pt holding {'head': [1, 2, 3]}", ctx.ssvp("eval", "--checkpoint", ck), 2,
                f"checkpoint {ck / 'head.pt'}: 'head' is list")]


def c08_safetensors(ctx):  # [4]
    import torch
    from safetensors.torch import save_file

    ck = ctx.tampered("ck_st", lambda f: save_file(torch.load(f, weights_only=True)["head"], str(f)))
    return [row("8", "safetensors file named head.pt", ctx.ssvp("eval", "--checkpoint", ck), 2,
                "a safetensors file", forbid=("Traceback", "weights_only"))]


def visa(root: Path) -> Path:
    """VisA's layout as tests/test_data.py builds it: split_csv/1cls.csv, JPEG images, 0/1 masks."""
    import numpy as np
    from PIL import Image

    rows, mask = ["object,split,label,image,mask"], np.zeros((16, 20), np.uint8)
    mask[3:8, 4:10] = 1
    for obj in ("candle", "pcb1"):
        for i, split in enumerate(("train", "train", "test")):
            rows.append(f"{obj},{split},normal,{obj}/Data/Images/Normal/{i:04d}.JPG,")
        for i in range(2):
            rows.append(f"{obj},test,anomaly,{obj}/Data/Images/Anomaly/{i:03d}.JPG,"
                        f"{obj}/Data/Masks/Anomaly/{i:03d}.png")
    for line in rows[1:]:
        for k, rel in enumerate(line.split(",")[3:]):
            if rel:
                (root / rel).parent.mkdir(parents=True, exist_ok=True)
                (Image.fromarray(mask) if k else Image.new("RGB", (20, 16), (200, 30, 30))).save(root / rel)
    (root / "split_csv").mkdir()
    (root / "split_csv" / "1cls.csv").write_text("\n".join(rows) + "\n")
    return root


def c09_visa_paths(ctx):  # [5]
    ctx.outside()  # $W/outside.png, which ../../outside.png names from $W/datasets/visa9a
    out = []
    anomaly = "candle,test,anomaly,candle/Data/Images/Anomaly/000.JPG"
    for n, what, bad in (("9a", "image ../../outside.png", "candle,test,normal,../../outside.png,"),
                         ("9b", "mask /etc/hostname", f"{anomaly},/etc/hostname")):
        root = visa(ctx.root / "datasets" / f"visa{n}")
        with open(root / "split_csv" / "1cls.csv", "a") as fh:
            fh.write(bad + "\n")
        r = ctx.ssvp("eval", "--checkpoint", ctx.ckpt, "--targets", f"visa:{root}")
        out.append(row(n, f"VisA 1cls.csv {what}", r, 2, "outside the dataset root"))
    return out


def c10_symlink(ctx):  # [5]
    root = ctx.root / "datasets" / "mvtec"
    shutil.copytree(ctx.data / "domain_b" / "leather", root / "leather")
    os.symlink(ctx.outside(), root / "leather" / "test" / "good" / "zz_link.png")
    r = ctx.ssvp("eval", "--checkpoint", ctx.ckpt, "--targets", f"mvtec:{root}")
    return [row("10", "symlink in a dataset root pointing outside", r, 2, "outside the dataset root")]


def c11_meta_infinity(ctx):  # [5]
    from ssvp.data import write_meta

    root = ctx.root / "datasets" / "meta"
    shutil.copytree(ctx.data / "domain_b" / "leather", root / "leather")
    meta = write_meta(f"mvtec:{root}")
    data = json.loads(meta.read_text())
    data["test"]["leather"][1]["anomaly"] = "@INF@"
    meta.write_text(json.dumps(data).replace('"@INF@"', "Infinity"))
    r = ctx.ssvp("eval", "--checkpoint", ctx.ckpt, "--targets", f"meta:{root}")
    return [row("11", 'meta.json "anomaly": Infinity', r, 2, f"meta file {meta}, test/leather[1]: 'anomaly'")]


def c12_resume_typo(ctx):  # [6]
    r = ctx.sweep("12", "--resume", "--name", "s-2026010-000000", plant=PLANTED)
    made = (ctx.root / "case12" / "ray" / "s-2026010-000000").exists()
    return [row("12", "--resume --name typo", r, 2, "no such sweep", {"typo folder created": "yes" if made else "no"})]


def c13_synthetic_option(ctx):  # [6]
    r = ctx.sweep("13", "--name", "p", synthetic=", n_trian: 3")
    return [row("13", "unknown base.synthetic option n_trian", r, 2, "unknown option(s) ['n_trian']")]


def c14_empty_class(ctx):  # [6]
    r = ctx.ssvp("predict", "--checkpoint", ctx.root / "train" / "checkpoints" / "best", "--input", ctx.images,
                 "--class-name", "")
    return [row("14", "empty --class-name", r, 2, "--class-name: must not be empty")]


def c15_cpus(ctx):  # [6] (and case 16)
    return [row(n, f"--cpus-per-worker {v}", ctx.sweep(n, "--name", "p", "--cpus-per-worker", v), 2,
                f"resources.cpus_per_worker must be a finite number > 0, got {float(v)}")
            for n, v in (("15", "-1"), ("16", "nan"))]


def c17_storage(ctx):  # [6]
    out = []
    for n, what, url in (("17a", "postgresql, driver missing or port closed", f"postgresql://u:{SECRET}@127.0.0.1:9/x"),
                         ("17b", "unknown scheme", "notadb://h/x")):
        r = ctx.sweep(n, "--name", "p", search=f"optuna_storage: '{url}'")
        out.append(row(n, f"optuna_storage {what}", r, 2,
                       "search.optuna_storage", leaked(r)))
    return out


def c18_brackets(ctx):  # [6]
    r = ctx.sweep("18", "--name", "p", "--set", "clip_layers=[1,2")
    lines = len([ln for ln in r["err"].splitlines() if ln.strip()])
    return [row("18", "--set clip_layers=[1,2", r, 2, "model.clip_layers", {"=stderr lines": lines})]


# --------------------------------------------------------------------------- Ray cases [6]
def ray_sweep(ctx, name: str, yaml_change) -> tuple[dict, dict]:
    """A real sweep on bench/fault_injection's sweep file. Its descendants are noted each second; those
    alive 15 s after it exited are counted, then ended (each by PID and start time)."""
    import psutil
    from fault_injection import Work

    work = Work(ctx.root / f"ray_{name}")
    text = (work.root / "sweep.yaml").read_text().replace(str(work.root / "data"), str(ctx.data))
    (work.root / "sweep.yaml").write_text(yaml_change(text))
    proc, seen = work.start(work.args(name)), {}
    while True:
        try:
            err = proc.communicate(timeout=1)[1] or ""
            break
        except subprocess.TimeoutExpired:
            try:
                seen.update({c.pid: (c.create_time(), c.name()) for c in psutil.Process(proc.pid).children(True)})
            except psutil.Error:
                pass
    time.sleep(15)
    left = []
    for pid, (created, pname) in seen.items():
        try:
            p = psutil.Process(pid)
            if p.create_time() == created and p.status() != psutil.STATUS_ZOMBIE:
                left.append(pname)
                p.kill()
        except psutil.Error:
            pass
    procs = {"=descendants seen": len(seen), "alive 15 s after exit": len(left)}
    out = max(work.root.glob("driver-*.log"), key=os.path.getmtime).read_text()  # the driver's stdout
    return ({"rc": proc.returncode, "out": out, "err": err, "cmd": f"sweep.py --quiet --name {name} (fault_injection)"},
            procs | ({"=left": ", ".join(sorted(left))} if left else {}))


def c19_time_budget(ctx):
    r, procs = ray_sweep(ctx, "budget", lambda y: y.replace("max_concurrent_trials: 1}",
                                                            "max_concurrent_trials: 1, time_budget_s: 1}"))
    return [row("19", "search.time_budget_s: 1", r, 1, "no trial finished an epoch", procs)]


def c20_all_fail(ctx):
    r, procs = ray_sweep(ctx, "allfail", lambda y: y.replace(
        "progress: false}", "progress: false, lr_head: 1.0e+30, lr_prompt: 1.0e+30, grad_clip: 0.0}"))
    tracebacks = sum("Traceback" in ln for ln in r["err"].splitlines())
    return [row("20", "every trial fails (lr 1e30), --quiet", r, 1, "no trial finished",
                {"stderr lines with Traceback": tracebacks, "=cause on stdout": ["no", "yes"][
                    "NonFiniteLossError" in r["out"]], **procs}, forbid=())]


CASES = {1: c01_planted_pickle, 2: c02_resume_without_name, 3: c03_storage_password, 4: c04_weights_url,
         5: c05_nan_weights, 6: c06_flipped_bytes, 7: c07_list_head, 8: c08_safetensors, 9: c09_visa_paths,
         10: c10_symlink, 11: c11_meta_infinity, 12: c12_resume_typo, 13: c13_synthetic_option,
         14: c14_empty_class, 15: c15_cpus, 17: c17_storage, 18: c18_brackets, 19: c19_time_budget, 20: c20_all_fail}
RAY = {19, 20}


def table(rows: list[dict]) -> str:
    out = ["| # | case | command (short) | exit code | first line of stderr (or stdout) |", "|---|---|---|---|---|"]
    for r in rows:
        case = r["case"] + "".join(f"; {k}: {v}" for k, v in r["checks"].items())
        case += "" if r["ok"] else f" **UNEXPECTED** (want {r['expected']})"
        cells = [r["n"], case, f"`{r['cmd']}`", r["rc"], r["line"]]
        out.append("| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in cells) + " |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", type=lambda s: {int(x) for x in s.split(",")}, help="case numbers, e.g. 19,20")
    p.add_argument("--with-ray", action="store_true", help="also the Ray sweeps 19-20")
    p.add_argument("--work", type=Path, help="an empty or new work folder (default: a new one in the temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the work folder")
    p.add_argument("--json", type=Path, metavar="FILE", help="also write the rows as JSON")
    args = p.parse_args(argv)
    if args.work and args.work.exists() and any(args.work.iterdir()):
        p.error(f"--work {args.work} is not empty")
    root = (args.work or Path(tempfile.mkdtemp(prefix="ssvp-audit-"))).resolve()
    root.mkdir(parents=True, exist_ok=True)
    os.environ.update(PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
                      MPLBACKEND="Agg", XDG_CONFIG_HOME=str(root / "config"))  # the signing key stays in $W
    for key in ("SSVP_STATE_KEY", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID"):
        os.environ.pop(key, None)
    only = args.only and args.only | ({15} if 16 in args.only else set())
    rows = []
    try:
        ctx = Ctx(root)
        for n, case in CASES.items():
            if (only and n not in only) or (n in RAY and not args.with_ray):
                continue
            t0 = time.time()
            try:
                rows += case(ctx)
            except Exception as exc:  # noqa: BLE001 - a broken set-up is a row, not the end of the audit
                rows.append({"n": str(n), "case": case.__name__, "cmd": "(set-up)", "rc": None, "ok": False,
                             "line": f"audit error: {type(exc).__name__}: {exc}"[:160], "expected": "", "checks": {}})
            print(f"case {n}: {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
