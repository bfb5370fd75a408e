"""Trust boundary of the storage path: Ray's pickled sweep state is loaded only when this user wrote it.

``--resume`` hands ``<storage>/<name>`` to ``Tuner.restore``, which unpickles ``tuner.pkl``,
the searcher's state, the experiment state (JSON with pickled parts) and trials' ``error.pkl``.
The storage path is shared by design (EFS, ``s3://``): whoever can write there could otherwise
run code in the resuming user's process, with their MLflow and S3 credentials. So:

* every file Ray may unpickle on a resume (:func:`state_files`), and the project's ``launch.json`` and
  ``ssvp_sweep.json`` (which say what a resume runs and where it records), get an HMAC-SHA256 at save time,
  with a key kept *outside* the storage path (:func:`state_key`), written to
  ``<storage>/<name>/ssvp_state.hmac.json`` (:class:`StateSigner`: ``tuner.pkl`` when the Tuner is
  built, the rest each time Tune checkpoints the experiment, in its local staging folder before
  Ray copies it to the storage path);
* before ``Tuner.restore`` :func:`verify_sweep_state` recomputes each one and refuses a missing
  or different signature with one :class:`UntrustedStateError` naming the file.

The key: ``SSVP_STATE_KEY`` (set it from a secret on a cluster, the same for every job that
resumes the sweep), else ``$XDG_CONFIG_HOME/ssvp/state.key`` (``~/.config/ssvp/state.key``,
created on first use, mode 0600). The signature binds each file's path inside the sweep folder,
so files cannot be swapped between names. Optuna's SQLite study is read as data, never unpickled.
"""
from __future__ import annotations

import fnmatch
import hashlib
import hmac
import json
import os
import secrets
from pathlib import Path

try:  # the callback base class; signing and checking also work without Ray
    from ray.tune import Callback as _TuneCallback
except Exception:  # noqa: BLE001
    _TuneCallback = object  # type: ignore[assignment,misc]

__all__ = ["SIGNATURE_FILE", "KEY_ENV", "UntrustedStateError", "state_key", "state_files", "sign_files",
           "verify_sweep_state", "StateSigner", "SigningCallback"]

SIGNATURE_FILE = "ssvp_state.hmac.json"
# written straight to the storage folder: Tune's tuner.pkl, and the project's launch.json (the command line a
# resume re-applies) and ssvp_sweep.json (where its MLflow record is): a planted one could redirect a resume
STORAGE_FILES = ("tuner.pkl", "launch.json", "ssvp_sweep.json")
KEY_ENV = "SSVP_STATE_KEY"
# what Tune unpickles on a restore: tuner.pkl, searcher / search-generator / variant-generator state,
# callback state, trials' params.pkl / error.pkl, and the experiment state (cloudpickle fall-backs inside)
_CODE_PATTERNS = ("*.pkl", "experiment_state*.json", "*-state-*.json", "*_state-*.json")


class UntrustedStateError(ValueError):
    """A file of the sweep folder that would be unpickled is not signed with this user's key."""


def _key_file() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "ssvp" / "state.key"


def state_key(create: bool = True) -> bytes:
    """The signing key: ``SSVP_STATE_KEY``, else the user's key file (created with mode 0600)."""
    env = os.environ.get(KEY_ENV)
    if env:
        return env.encode()
    path = _key_file()
    if path.is_file():
        return path.read_bytes().strip()
    if not create:
        raise UntrustedStateError(f"this user has no signing key ({KEY_ENV} is unset and {path} does not exist)")
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    return path.read_bytes().strip()


def is_state_file(rel: str) -> bool:
    """Whether ``rel`` (a path inside the sweep folder) is signed: what Tune unpickles, and :data:`STORAGE_FILES`."""
    name = rel.rsplit("/", 1)[-1]
    return rel in STORAGE_FILES or (name != SIGNATURE_FILE and any(fnmatch.fnmatch(name, p) for p in _CODE_PATTERNS))


def _digest(key: bytes, rel: str, data: bytes) -> str:
    return hmac.new(key, rel.encode() + b"\0" + data, hashlib.sha256).hexdigest()


def _walk(folder: str) -> dict[str, bytes]:
    """``{relative path: content}`` of the state files under ``folder`` (a local path or URI)."""
    import pyarrow.fs as pafs

    from .storage import filesystem

    fs, root = filesystem(folder)
    out = {}
    for info in fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True)):
        rel = info.path[len(root):].lstrip("/")
        if info.type == pafs.FileType.File and is_state_file(rel):
            with fs.open_input_stream(info.path) as f:
                out[rel] = f.read()
    return out


def state_files(folder: str | os.PathLike) -> list[str]:
    """The files under ``folder`` that Tune may unpickle (relative paths)."""
    return sorted(_walk(str(folder)))


def sign_files(folder: str | os.PathLike, key: bytes | None = None) -> dict[str, str]:
    """``{relative path: HMAC}`` of every state file under ``folder``."""
    key = key or state_key()
    return {rel: _digest(key, rel, data) for rel, data in _walk(str(folder)).items()}


def _read_signatures(folder: str) -> dict[str, str] | None:
    from .storage import join, read_text

    text = read_text(join(folder, SIGNATURE_FILE))
    if text is None:
        return None
    try:
        sigs = json.loads(text)["files"]
    except (ValueError, KeyError, TypeError):
        return {}
    return {str(k): str(v) for k, v in sigs.items()} if isinstance(sigs, dict) else {}


def verify_sweep_state(folder: str | os.PathLike) -> dict[str, str]:
    """Check every state file of the sweep folder against its signature; the verified signatures.

    Raises :class:`UntrustedStateError` naming the first file that is unsigned or changed.
    """
    from .storage import join

    folder = str(folder)
    files = _walk(folder)
    sigs = _read_signatures(folder)
    hint = (f"refusing to load it (it could run code or redirect the record). Resume only sweeps this user "
            f"started, with the same signing secret ({KEY_ENV} or {_key_file()}); otherwise start a new sweep "
            "(another --name)")
    key = None
    for rel in sorted(files):
        want = (sigs or {}).get(rel)
        if want is None:
            why = "has no signature" if sigs is not None else f"has no signature ({SIGNATURE_FILE} is missing)"
            raise UntrustedStateError(f"untrusted sweep state: {join(folder, rel)} {why}; {hint}")
        try:
            key = key or state_key(create=False)
        except UntrustedStateError as exc:
            raise UntrustedStateError(f"untrusted sweep state: {join(folder, rel)} cannot be checked: {exc}") from None
        if not hmac.compare_digest(want, _digest(key, rel, files[rel])):
            raise UntrustedStateError(f"untrusted sweep state: {join(folder, rel)} does not match its signature "
                                      f"(changed since this user's sweep wrote it, or signed with another key); {hint}")
    return {rel: sigs[rel] for rel in files} if sigs else {}


class StateSigner:
    """Signs what Tune saves: ``sign_storage()`` after the Tuner wrote ``tuner.pkl``; :meth:`sign_staging`
    each time Tune checkpoints the experiment (from :class:`SigningCallback`), into the staging folder
    Ray then copies to the storage path. Keeps the signatures of earlier sessions (a resumed sweep)."""

    def __init__(self, experiment: str | os.PathLike, known: dict[str, str] | None = None):
        self.experiment = str(experiment)
        self.key = state_key()
        self.signatures = dict(known or {})

    def _write(self, folder: str) -> None:
        from .storage import join, write_text

        write_text(join(folder, SIGNATURE_FILE), json.dumps({"files": self.signatures}, indent=1, sort_keys=True))

    def sign_storage(self) -> None:
        """Sign :data:`STORAGE_FILES` as they are now in the storage folder (written by this process)."""
        new = sign_files(self.experiment, self.key)
        self.signatures.update({k: v for k, v in new.items() if k in STORAGE_FILES})
        self._write(self.experiment)

    def sign_staging(self, staging: str) -> None:
        self.signatures.update(sign_files(staging, self.key))
        self._write(staging)


class SigningCallback(_TuneCallback):
    """Tune callback: signs the state Tune has just written, each time it checkpoints the experiment.

    Tune's ``save_to_dir`` writes the experiment state, then the search algorithm's, then asks the
    callbacks for their state (:meth:`get_state`, here: sign the staging folder, keep no state) and
    copies the staging folder, signatures included, to the storage path.
    """

    def __init__(self, signer: StateSigner):
        self.signer = signer
        self._staging: str | None = None

    def __getstate__(self) -> dict:  # pickled into tuner.pkl: no key, no signatures
        return {"signer": None, "_staging": None}

    def on_step_begin(self, iteration, trials, **info):
        if self._staging is None and trials:
            self._staging = str(trials[0].storage.experiment_driver_staging_path)

    def get_state(self):
        if self.signer is not None and self._staging is not None and Path(self._staging).is_dir():
            self.signer.sign_staging(self._staging)
        return None
