"""The services of a cluster, started on loopback by the end-to-end tests, each in its own process group.

- :func:`s3_server`: an S3-compatible server (moto's server mode) with one bucket;
- :func:`mlflow_server`: ``mlflow server`` with a SQLite backend and served artifacts (into a
  folder or ``s3://``), optionally behind MLflow's basic-auth app, as cluster/README.md runs it;
- :func:`ray_head`: ``ray start --head --node-ip-address 127.0.0.1 --dashboard-host 127.0.0.1`` with its
  own ``--temp-dir`` and ports, and a :class:`JobSubmissionClient` on its dashboard.

Each is a context manager that stops exactly the processes it started (their process group), never
every Ray instance on the machine as ``ray stop`` would.
"""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterator

VENV_BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without Ray's or MLflow's variables, loopback-only Ray, plus ``extra``."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RAY_", "MLFLOW_", "SSVP_", "AWS_")) and k != "PYTHONPATH"}
    env.update(
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
        PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        HF_HUB_OFFLINE="1",
        MPLBACKEND="Agg",
        RAY_USAGE_STATS_ENABLED="0",
    )
    env.update(extra)
    return env


def kill_group(pgid: int) -> None:
    """SIGTERM the process group ``pgid`` (its leader is a child of this process), SIGKILL what is left
    after 10 s. The leader is reaped as soon as it exits: an unreaped leader stays a zombie, and a
    group holding a zombie still answers ``killpg(pgid, 0)``, which would make every stop wait 20 s."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        for _ in range(100):
            _reap(pgid)
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:  # not our child, or already reaped
        pass


def _wait_http(url: str, proc: subprocess.Popen, log: Path, seconds: float = 120) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: the server exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except Exception:  # noqa: BLE001 - not up yet
            time.sleep(0.5)
    raise RuntimeError(f"{url} did not answer in {seconds} s:\n{log.read_text()[-3000:]}")


S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@contextlib.contextmanager
def s3_server(workdir: Path, bucket: str = "ssvp-test") -> Iterator[dict[str, str]]:
    """moto's S3 server on 127.0.0.1 with ``bucket``; yields the client environment
    (credentials and ``AWS_ENDPOINT_URL``, which boto3, pyarrow and so Ray and MLflow honour)."""
    import boto3

    port = free_port()
    log = workdir / "moto.log"
    proc = subprocess.Popen([str(VENV_BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        endpoint = f"http://127.0.0.1:{port}"
        _wait_http(f"{endpoint}/", proc, log)
        env = {**S3_CREDENTIALS, "AWS_ENDPOINT_URL": endpoint}
        boto3.client("s3", endpoint_url=endpoint, **_boto_kw()).create_bucket(Bucket=bucket)
        yield env
    finally:
        kill_group(proc.pid)


def _boto_kw() -> dict[str, str]:
    return {"aws_access_key_id": S3_CREDENTIALS["AWS_ACCESS_KEY_ID"],
            "aws_secret_access_key": S3_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
            "region_name": S3_CREDENTIALS["AWS_DEFAULT_REGION"]}


def s3_keys(endpoint: str, bucket: str, prefix: str = "") -> list[str]:
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, **_boto_kw())
    keys, token = [], None
    while True:
        kw = {"Bucket": bucket, "Prefix": prefix, **({"ContinuationToken": token} if token else {})}
        page = client.list_objects_v2(**kw)
        keys += [o["Key"] for o in page.get("Contents", [])]
        if not page.get("IsTruncated"):
            return keys
        token = page["NextContinuationToken"]


@contextlib.contextmanager
def mlflow_server(workdir: Path, artifacts: str, env: dict[str, str], password: str | None = None) -> Iterator[str]:
    """``mlflow server`` on 127.0.0.1 (SQLite backend, artifacts served from ``artifacts``); with
    ``password``, behind the basic-auth app with admin/``password``. Yields the tracking URI."""
    port = free_port()
    log = workdir / "mlflow-server.log"
    server_env = {**env}
    args = [str(VENV_BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{workdir / 'mlflow.db'}",
            "--artifacts-destination", artifacts, "--serve-artifacts", "--host", "127.0.0.1", "--port", str(port),
            "--workers", "1"]
    if password:
        ini = workdir / "basic_auth.ini"
        ini.write_text("[mlflow]\ndefault_permission = READ\n"
                       f"database_uri = sqlite:///{workdir / 'auth.db'}\nadmin_username = admin\n"
                       "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
        server_env.update(MLFLOW_AUTH_CONFIG_PATH=str(ini), MLFLOW_AUTH_ADMIN_PASSWORD=password,
                          MLFLOW_FLASK_SERVER_SECRET_KEY=os.urandom(16).hex())
        args += ["--app-name", "basic-auth"]
    proc = subprocess.Popen(args, env=server_env, cwd=workdir, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        uri = f"http://127.0.0.1:{port}"
        _wait_http(f"{uri}/health", proc, log, seconds=180)
        yield uri
    finally:
        kill_group(proc.pid)


@contextlib.contextmanager
def ray_head(env: dict[str, str], num_cpus: int = 2) -> Iterator[dict]:
    """A Ray head on loopback; yields ``{"address": dashboard URL, "gcs": host:port, "client", "temp_dir"}``."""
    from ray.job_submission import JobSubmissionClient

    gcs_port, dash_port = free_port(), free_port()
    temp_dir = Path("/tmp") / f"ssvp_head_{os.getpid()}_{gcs_port}"  # short: Ray's socket paths have a length limit
    # on a busy machine the dashboard's modules take longer than Ray's default 30 s to come up
    # and Ray's memory monitor would kill trials for the memory other processes hold (0 = off)
    env = {"RAY_DASHBOARD_SUBPROCESS_MODULE_WAIT_READY_TIMEOUT": "300", "RAY_memory_monitor_refresh_ms": "0", **env}
    head = subprocess.Popen(
        [str(VENV_BIN / "ray"), "start", "--head", "--node-ip-address", "127.0.0.1", "--dashboard-host", "127.0.0.1",
         "--port", str(gcs_port), "--dashboard-port", str(dash_port), "--num-cpus", str(num_cpus),
         # every port free and its own: Ray's fixed defaults (agent 52365, client 10001, ...) clash with
         # other Ray instances on the machine, and a job agent that cannot bind takes no job
         *[a for flag in ("--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--metrics-export-port",
                          "--runtime-env-agent-port", "--ray-client-server-port", "--node-manager-port",
                          "--object-manager-port") for a in (flag, str(free_port()))],
         "--include-dashboard", "true", "--temp-dir", str(temp_dir), "--disable-usage-stats"],
        env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        out, _ = head.communicate(timeout=180)
        if head.returncode != 0:
            raise RuntimeError(f"ray start failed:\n{out}")
        address = f"http://127.0.0.1:{dash_port}"
        client = None
        for _ in range(120):
            try:
                client = JobSubmissionClient(address)
                client.list_jobs()
                break
            except Exception:  # noqa: BLE001 - dashboard still starting
                client = None
                time.sleep(1)
        if client is None:
            raise RuntimeError(f"the dashboard at {address} did not answer")
        yield {"address": address, "gcs": f"127.0.0.1:{gcs_port}", "client": client, "temp_dir": temp_dir}
    finally:
        kill_group(head.pid)
        import shutil

        shutil.rmtree(temp_dir, ignore_errors=True)


def wait_job(client, job_id: str, seconds: float = 900) -> tuple[object, str]:
    """Wait for a submitted job to end; returns (status, logs)."""
    from ray.job_submission import JobStatus

    status = None
    deadline = time.time() + seconds
    while time.time() < deadline:
        status = client.get_job_status(job_id)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            break
        time.sleep(2)
    return status, client.get_job_logs(job_id)


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()} if root.exists() else set()
