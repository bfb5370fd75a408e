"""``tuning.storage``: the same reads and writes on a local storage path and on an S3-compatible one
(moto's server on loopback, the endpoint given in AWS_ENDPOINT_URL or in the URI's query)."""
from __future__ import annotations

import pytest

from tuning import storage

pytest.importorskip("moto", reason="pip install 'moto[server]' (the test extra)")


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    from cluster_services import s3_server

    with s3_server(tmp_path_factory.mktemp("moto")) as env:
        yield env


def test_join_keeps_the_endpoint_query_last():
    assert storage.join("s3://b/ray?endpoint_override=h:1&scheme=http", "sweep", "t1/x.json") == \
        "s3://b/ray/sweep/t1/x.json?endpoint_override=h:1&scheme=http"
    assert storage.join("s3://b/ray/", "a") == "s3://b/ray/a"
    assert storage.join("/mnt/ray", "a", "b") == "/mnt/ray/a/b"


def _roundtrip(base: str) -> None:
    f = storage.join(base, "exp", "t1", "placement", "rank0.json")
    assert storage.read_text(f) is None and not storage.exists(f)
    storage.write_text(f, '{"node_id": "n"}')
    assert storage.read_text(f) == '{"node_id": "n"}' and storage.exists(f)
    assert storage.is_dir(storage.join(base, "exp", "t1")) and not storage.is_dir(f)
    storage.write_text(storage.join(base, "exp", "t2", "x.txt"), "2")
    assert sorted(n for n, _ in storage.list_dirs(storage.join(base, "exp"))) == ["t1", "t2"]
    assert storage.list_dirs(storage.join(base, "missing")) == []


def test_local_and_s3_storage_behave_alike(s3, tmp_path, monkeypatch):
    _roundtrip(str(tmp_path / "ray"))
    for k, v in s3.items():
        monkeypatch.setenv(k, v)
    _roundtrip("s3://ssvp-test/env-endpoint")
    got = storage.download("s3://ssvp-test/env-endpoint/exp", tmp_path / "dl")
    assert (got / "t1" / "placement" / "rank0.json").read_text() == '{"node_id": "n"}'
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    host = s3["AWS_ENDPOINT_URL"].removeprefix("http://")
    _roundtrip(f"s3://ssvp-test/query-endpoint?endpoint_override={host}&scheme=http")
    from cluster_services import s3_keys

    keys = s3_keys(s3["AWS_ENDPOINT_URL"], "ssvp-test", "query-endpoint/")
    assert "query-endpoint/exp/t1/placement/rank0.json" in keys


def test_remote_path_acts_like_a_path(s3, monkeypatch):
    for k, v in s3.items():
        monkeypatch.setenv(k, v)
    root = storage.storage_path("s3://ssvp-test/rp")
    assert isinstance(root, storage.RemotePath) and str(root / "a" / "b.json") == "s3://ssvp-test/rp/a/b.json"
    f = root / "exp" / "ssvp_sweep.json"
    assert not f.exists() and not f.is_file()
    (root / "exp").mkdir(parents=True, exist_ok=True)
    f.write_text("{}")
    assert f.read_text() == "{}" and f.is_file() and (root / "exp").is_dir()
    assert f.name == "ssvp_sweep.json" and str(f.parent) == "s3://ssvp-test/rp/exp"
    assert [p.name for p in root.iterdir()] == ["exp"] and root.stat().st_mtime >= 0
    with pytest.raises(FileNotFoundError):
        (root / "missing.json").read_text()
    with storage.local_copy(root / "exp") as local:
        assert (local / "ssvp_sweep.json").read_text() == "{}"
    assert not local.exists()  # the temporary download is gone
    assert storage.as_uri("ssvp-test/rp/x/checkpoint_1", "s3://ssvp-test/rp?endpoint_override=h:1") == \
        "s3://ssvp-test/rp/x/checkpoint_1?endpoint_override=h:1"
    assert storage.as_uri("/mnt/x", "/mnt") == "/mnt/x"
    assert isinstance(storage.storage_path("/mnt/x"), type(storage.Path("/")))
