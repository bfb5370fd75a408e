"""A two-node Ray cluster on loopback runs a small ablation grid across both nodes.

Node A is the head (``ray start --head --node-ip-address 127.0.0.1 --dashboard-host
127.0.0.1``, custom resource ``node_a``), node B joins it (``node_b``), each with its own
ports. The grid (2 working variants + 1 that fails at start-up, 2 seeds, tiny backbones,
synthetic data) is submitted the way a cluster user does: ``python ablations/grid.py
--address 127.0.0.1:PORT`` from the repo root. Checks: every trial of the working variants
finished and recorded the node it ran on, trials ran on both nodes, the failing variant
shows as "0/2 seeds, 2 failed", one MLflow parent run holds a child per trial and the
tables/plots as artifacts, and ``--resume`` reuses that parent without rerunning trials.

Teardown stops only the processes this test started (found by a marker in their
environment), not every Ray instance on the machine as ``ray stop`` would.
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
RAY = str(Path(sys.executable).parent / "ray")
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


def _node_ports(ports: list[int]) -> list[str]:
    node_manager, object_manager, agent_grpc, agent_http, metrics, runtime_env, wmin = ports
    return [
        f"--node-manager-port={node_manager}", f"--object-manager-port={object_manager}",
        f"--dashboard-agent-grpc-port={agent_grpc}", f"--dashboard-agent-listen-port={agent_http}",
        f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={runtime_env}",
        f"--min-worker-port={wmin}", f"--max-worker-port={wmin + 40}",
    ]


@pytest.fixture()
def loopback_cluster(synthetic_root):
    token = uuid.uuid4().hex[:12]
    env = _env(token)
    temp_dir = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths have a length limit
    gcs, dash, client = _free_ports(3)
    # worker ports: two disjoint ranges well above the ephemeral ones just handed out
    base = 20000 + (os.getpid() % 200) * 100
    head = [RAY, "start", "--head", "--node-ip-address", "127.0.0.1", f"--port={gcs}",
            "--dashboard-host", "127.0.0.1", f"--dashboard-port={dash}", f"--ray-client-server-port={client}",
            "--num-cpus=2", "--num-gpus=0", "--resources", json.dumps({"node_a": 1}),
            "--object-store-memory", str(200 * 1024 * 1024), f"--temp-dir={temp_dir}", "--disable-usage-stats",
            *_node_ports(_free_ports(6) + [base])]
    worker = [RAY, "start", f"--address=127.0.0.1:{gcs}", "--node-ip-address", "127.0.0.1",
              "--num-cpus=2", "--num-gpus=0", "--resources", json.dumps({"node_b": 1}),
              "--object-store-memory", str(200 * 1024 * 1024), "--disable-usage-stats",
              *_node_ports(_free_ports(6) + [base + 50])]
    # `ray start --address` refuses to join with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (the flag only
    # switches Ray's own IP detection to loopback and blocks joining); the joining node names its
    # loopback address explicitly instead, so every node still lives on 127.0.0.1.
    join_env = {**env, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1"}
    try:
        for cmd, cmd_env in ((head, env), (worker, join_env)):
            out = subprocess.run(cmd, env=cmd_env, capture_output=True, text=True, timeout=180)
            assert out.returncode == 0, f"{' '.join(cmd)}\n{out.stdout}\n{out.stderr}"
        yield {"address": f"127.0.0.1:{gcs}", "env": env, "token": token}
    finally:
        _stop_marked(token)


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
           "--max-failures", "0", "--max-concurrent", "3", "--quiet"]
    t0 = time.time()
    run = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    first_seconds = time.time() - t0
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]

    records = [json.loads(line) for line in (out_dir / "records.jsonl").read_text().splitlines()]
    by = {(r["variant"], r["seed"]): r for r in records}
    assert set(by) == {(v, s) for v in ("full", "concat", "broken") for s in (0, 1)}
    ok = [r for r in records if r["variant"] != "broken"]
    assert all(r["status"] == "ok" for r in ok), [r.get("error") for r in ok]
    assert all(by[("broken", s)]["status"] == "failed" and "no-such-weights" in by[("broken", s)]["error"]
               for s in (0, 1))
    used = {r["node_id"] for r in ok}
    assert used <= set(nodes) and used == {by_resource["node_a"], by_resource["node_b"]}, (used, by_resource)

    md = (out_dir / "results.md").read_text()
    assert "| X: broken | 0/2 seeds, 2 failed | — |" in md
    assert "| E: full (ref) | 2/2 seeds |" in md and "| B: concat | 2/2 seeds |" in md
    assert (out_dir / "bars_synthetic_domain_b.png").stat().st_size > 10_000

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
    arts = {a.path for a in client.list_artifacts(parent.info.run_id, "ablation")}
    assert {"ablation/results.md", "ablation/results.csv", "ablation/paired.csv", "ablation/records.jsonl"} <= arts

    # --resume: the same parent run, no trial runs again, the same table
    t0 = time.time()
    again = subprocess.run(cmd + ["--resume"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-4000:]
    state2 = json.loads((out_dir / "grid.json").read_text())
    assert state2["parent_run_id"] == state["parent_run_id"]
    children2 = client.search_runs([parent.info.experiment_id],
                                   filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len([c for c in children2 if c.data.tags.get("role") == "trial"]) == 6
    assert "| X: broken | 0/2 seeds, 2 failed | — |" in (out_dir / "results.md").read_text()
    print(f"grid on 2 loopback nodes: {first_seconds:.0f} s; resume: {time.time() - t0:.0f} s")
