"""A two-node Ray cluster on loopback runs a small ablation grid across both nodes.

Node A is the head (node IP 127.0.0.1, dashboard on 127.0.0.1, custom resource ``node_a``),
node B joins it (``node_b``), each with its own ports; see ``_HELPER`` for how they start. The grid (2 working variants + 1 that fails at start-up, 2 seeds, tiny backbones,
synthetic data) is submitted the way a cluster user does: ``python ablations/grid.py
--address 127.0.0.1:PORT`` from the repo root. Checks: every trial of the working variants
finished and recorded the node it ran on, trials ran on both nodes, the failing variant
shows as "0/2 seeds, 2 failed", one MLflow parent run holds a child per trial and the
tables/plots as artifacts, and ``--resume`` reuses that parent without rerunning trials.

Teardown stops only the processes this test started (the helper, then anything left that
carries this test's marker in its environment), not every Ray instance on the machine as
``ray stop`` would (other test sessions may be running their own).
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
MARKER = "SSVP_TEST_CLUSTER"

pytestmark = pytest.mark.slow


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def _marked_pids(token: str) -> list[int]:
    needle = f"{MARKER}={token}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes():
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def _stop_marked(token: str, timeout: float = 20.0) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in _marked_pids(token):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + timeout
        while time.time() < deadline and _marked_pids(token):
            time.sleep(0.5)
        if not _marked_pids(token):
            return


def _env(token: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env.pop("PYTHONPATH", None)
    env.update({
        MARKER: token,
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "MPLBACKEND": "Agg",
        "RAY_USAGE_STATS_ENABLED": "0",
        "TOKENIZERS_PARALLELISM": "false",
    })
    return env


# Both nodes are started by Ray's own multi-node-on-one-machine utility (ray.cluster_utils.Cluster,
# what Ray's test suite uses), in a helper process. Why not two `ray start` commands: a joining
# `ray start --address` aborts while RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, and with the flag at 1 the
# CLI rewrites 127.0.0.1 to the machine's outside address. Cluster starts each node with an explicit
# node IP (127.0.0.1, loopback only), and the head with --dashboard-host 127.0.0.1 as `ray start`
# would; every port is chosen free or by the OS.
_HELPER = r"""
import json, signal, sys, time
from ray.cluster_utils import Cluster
spec = json.loads(sys.argv[1])
cluster = Cluster(initialize_head=True, shutdown_at_exit=True, head_node_args=spec["head"])
cluster.add_node(**spec["worker"])
cluster.wait_for_nodes()
def stop(*_):
    cluster.shutdown()
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
print(json.dumps({"address": cluster.address}), flush=True)
while True:
    time.sleep(1)
"""


@pytest.fixture()
def loopback_cluster(synthetic_root):
    token = uuid.uuid4().hex[:12]
    env = _env(token)
    temp_dir = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths have a length limit
    gcs, dash, agent_a, agent_b, metrics_a, metrics_b, rtenv_a, rtenv_b, client = _free_ports(9)
    common = {"node_ip_address": "127.0.0.1", "num_cpus": 2, "num_gpus": 0,
              "object_store_memory": 200 * 1024 * 1024}
    spec = {
        "head": {**common, "resources": {"node_a": 1, "trial_slot": 1}, "gcs_server_port": gcs, "include_dashboard": True,
                 "dashboard_host": "127.0.0.1", "dashboard_port": dash, "dashboard_agent_listen_port": agent_a,
                 "metrics_export_port": metrics_a, "runtime_env_agent_port": rtenv_a,
                 "ray_client_server_port": client, "temp_dir": temp_dir},
        "worker": {**common, "resources": {"node_b": 1, "trial_slot": 1}, "dashboard_agent_listen_port": agent_b,
                   "metrics_export_port": metrics_b, "runtime_env_agent_port": rtenv_b},
    }
    # Every process of this cluster (and the grid driver) names its own GCS in RAY_ADDRESS: Ray Train's
    # PlacementGroupCleaner asks the state API whether the controller is alive, and with several Ray
    # instances on the machine an unset RAY_ADDRESS makes it query "the latest cluster", not finding
    # the controller there and removing a live trial's placement group.
    env["RAY_ADDRESS"] = f"127.0.0.1:{gcs}"
    proc = subprocess.Popen([sys.executable, "-c", _HELPER, json.dumps(spec)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        if not line:
            proc.wait(timeout=30)
            pytest.fail(f"the loopback cluster did not start:\n{proc.stderr.read()[-4000:]}")
        yield {"address": json.loads(line)["address"], "env": env, "token": token}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
        _stop_marked(token)  # anything left of this cluster (found by the marker in its environment)


def _cluster_nodes(address: str, env: dict) -> dict[str, dict]:
    code = ("import json, ray; ray.init(address=%r, log_to_driver=False); "
            "print(json.dumps({n['NodeID']: n['Resources'] for n in ray.nodes() if n['Alive']}))" % address)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_grid_runs_across_two_loopback_nodes(loopback_cluster, synthetic_root, tmp_path):
    address, env = loopback_cluster["address"], loopback_cluster["env"]
    nodes = _cluster_nodes(address, env)
    assert len(nodes) == 2
    by_resource = {res: nid for nid, r in nodes.items() for res in ("node_a", "node_b") if res in r}
    assert set(by_resource) == {"node_a", "node_b"}

    grid = {
        "name": "loopback",
        "base": {
            "preset": "tiny",
            "source": f"synthetic:{synthetic_root / 'domain_a'}",
            "targets": [f"synthetic:{synthetic_root / 'domain_b'}"],
            "max_per_class": 3, "val_classes": ["wood"], "epochs": 1, "batch_size": 8,
            "max_steps_per_epoch": 1, "device": "cpu", "progress": False,
        },
        "seeds": 2,
        "reference": "full",
        "resources": {"cpu": 1, "gpu": 0},
        "variants": [
            {"name": "full", "letter": "E", "overrides": {"fusion": "atf", "vcpg": True, "vtam": True}},
            {"name": "concat", "letter": "B", "overrides": {"fusion": "concat", "vcpg": False, "vtam": False}},
            # passes config validation, fails when the trial loads its backbone
            {"name": "broken", "letter": "X", "overrides": {"dino_weights": str(tmp_path / "no-such-weights")}},
        ],
    }
    grid_file = tmp_path / "loopback.yaml"
    grid_file.write_text(yaml.safe_dump(grid, sort_keys=False))
    out_dir, storage, db = tmp_path / "out", tmp_path / "ray", tmp_path / "mlflow.db"
    cmd = [sys.executable, "ablations/grid.py", "--grid", str(grid_file), "--address", address,
           "--out", str(out_dir), "--storage-path", str(storage), "--tracking-uri", f"sqlite:///{db}",
           # one trial_slot per node: two trials at a time, necessarily one on each node
           "--resources-per-trial", '{"trial_slot": 1}', "--max-failures", "0", "--max-concurrent", "2", "--quiet"]
    t0 = time.time()
    run = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    first_seconds = time.time() - t0
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]

    records = [json.loads(line) for line in (out_dir / "records.jsonl").read_text().splitlines()]
    by = {(r["variant"], r["seed"]): r for r in records}
    assert set(by) == {(v, s) for v in ("full", "concat", "broken") for s in (0, 1)}
    ok = [r for r in records if r["variant"] != "broken"]
    assert all(r["status"] == "ok" for r in ok), [r.get("error") for r in ok]
    assert all(by[("broken", s)]["status"] == "failed" and "Error" in by[("broken", s)]["error"] for s in (0, 1))
    used = {r["node_id"] for r in ok}
    assert used <= set(nodes) and used == {by_resource["node_a"], by_resource["node_b"]}, (used, by_resource)

    md = (out_dir / "results.md").read_text()
    rows: dict[str, str] = {}  # first table (class mean): "| letter | variant" -> its line
    for line in md.splitlines():
        if line.startswith("| ") and line.count(" | ") > 2:
            rows.setdefault(" | ".join(line.split(" | ")[:2]), line)
    assert "| 0/2 seeds, 2 failed | — |" in rows["| X | broken"]
    assert "| 2/2 seeds |" in rows["| E | full (ref)"] and "| 2/2 seeds |" in rows["| B | concat"]
    assert "## synthetic domain_b" in md
    assert (out_dir / "points_synthetic_domain_b.png").stat().st_size > 10_000
    assert (out_dir / "forest_synthetic_domain_b.png").stat().st_size > 10_000

    from mlflow import MlflowClient

    state = json.loads((out_dir / "grid.json").read_text())
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    parent = client.get_run(state["parent_run_id"])
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    trial_children = [c for c in children if c.data.tags.get("role") == "trial"]
    assert len(trial_children) == 6
    assert {(c.data.tags["variant"], c.data.tags["seed"]) for c in trial_children} == {
        (v, str(s)) for v in ("full", "concat", "broken") for s in (0, 1)}
    assert parent.info.artifact_uri.startswith((tmp_path / "mlartifacts").as_uri())  # beside the .db, not in the repo
    arts = {a.path for a in client.list_artifacts(parent.info.run_id, "ablation")}
    assert {"ablation/results.md", "ablation/results.csv", "ablation/paired.csv", "ablation/records.jsonl"} <= arts

    # --resume: the same parent run, no trial runs again, the same table; --per-class adds the
    # per-class tables by evaluating each finished trial's best heads on the cluster
    t0 = time.time()
    again = subprocess.run(cmd + ["--resume", "--per-class"], cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-4000:]
    state2 = json.loads((out_dir / "grid.json").read_text())
    assert state2["parent_run_id"] == state["parent_run_id"]
    children2 = client.search_runs([parent.info.experiment_id],
                                   filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len([c for c in children2 if c.data.tags.get("role") == "trial"]) == 6
    md2 = (out_dir / "results.md").read_text()
    assert any(line.startswith("| X | broken |") and "| 0/2 seeds, 2 failed | — |" in line for line in md2.splitlines())
    classes = sorted(p.name for p in (synthetic_root / "domain_b").iterdir() if p.is_dir())
    for cls in classes:
        assert f", class `{cls}`" in md2
    records2 = [json.loads(line) for line in (out_dir / "records.jsonl").read_text().splitlines()]
    full0 = next(r for r in records2 if (r["variant"], r["seed"]) == ("full", 0))
    table = next(iter(full0["metrics"].values()))
    assert set(table["per_class"]) == set(classes)
    assert table["mean"]["image_auroc"] == pytest.approx(by[("full", 0)]["metrics"][next(iter(by[("full", 0)]["metrics"]))]["mean"]["image_auroc"])
    print(f"grid on 2 loopback nodes: {first_seconds:.0f} s; resume: {time.time() - t0:.0f} s")
