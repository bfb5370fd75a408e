"""Redaction of secrets before anything reaches the record (MLflow params, tags, artifacts, logs).

Pure functions, no I/O::

    redact_text("postgresql://optuna:s3cret@db:5432/optuna")   -> "postgresql://optuna:***@db:5432/optuna"
    redact_text("https://h/x?token=abc&page=2")                -> "https://h/x?token=***&page=2"
    redact({"optuna_storage": "mysql://u:pw@h/db", "api_key": "k", "lr": 0.1})
        -> {"optuna_storage": "mysql://u:***@h/db", "api_key": "***", "lr": 0.1}

What counts as a secret:

* the password of a URL's user info (``scheme://user:PASSWORD@host``), any scheme, also when it
  holds ``/`` or ``@`` and in the ``scheme:/user:PASSWORD@host`` form ``pathlib.Path`` makes of a URL;
* the value of a query-string parameter, ``NAME=value`` / ``--name value`` pair on a command
  line, or mapping entry whose name is a secret name (``is_secret_name``): it contains
  password / passwd / secret / token / credential / passphrase, or one of its words is
  ``key`` / ``pwd`` / ``auth`` / ``authorization`` / ``apikey`` (``api_key``, ``AWS_SECRET_ACCESS_KEY``,
  ``accessToken``), but not a count such as ``n_latent_tokens``;
* ``Bearer`` / ``Basic`` credentials in an ``Authorization`` header.

User names, hosts, ports, database names and every other value stay, so a redacted URL
still tells where a store lives.
"""
from __future__ import annotations

import contextlib
import re
from typing import Any

__all__ = ["REDACTED", "is_secret_name", "redact_text", "redact", "RedactingClient", "split_userinfo"]

REDACTED = "***"

_SECRET_PARTS = ("password", "passwd", "secret", "token", "credential", "passphrase")
_SECRET_WORDS = {"key", "pwd", "pass", "auth", "authorization", "apikey", "sig", "signature"}
_NOT_SECRET_WORDS = {"tokens", "tokenizer", "keys"}  # counts and tools, not credentials
_WHERE_WORDS = {"file", "path", "dir", "env", "var"}


def _words(name: str) -> list[str]:
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1 \2", name)  # accessToken -> access Token
    return [w for w in re.split(r"[^a-z0-9]+", spaced.lower()) if w]


def is_secret_name(name: Any) -> bool:
    """Whether a parameter / key / variable called ``name`` holds a secret."""
    if not isinstance(name, str):
        return False
    words = _words(name)
    if words and words[-1] in _WHERE_WORDS:  # password_file, token_path: where a secret lives, not it
        return False
    for w in words:
        if w in _NOT_SECRET_WORDS:
            continue
        if w in _SECRET_WORDS or any(part in w for part in _SECRET_PARTS):
            return True
        if w.endswith("key") and w[:-3] in {"api", "access", "private", "secret", "client", "auth", "signing"}:
            return True
    return False


# scheme://[user][:password]@host: the password runs to the last '@' of the URL and may hold '/', ':'
# or '@'; "scheme:/user:pw@host" too (pathlib.Path collapses '//' in a URL it is handed)
_URL_USERINFO = re.compile(
    r"(?P<head>\b(?:[a-zA-Z][a-zA-Z0-9+.\-]*://|[a-zA-Z][a-zA-Z0-9+.\-]+:/)[^/\s:@'\"]*:)(?P<pw>[^\s'\"]*)(?=@[^\s@/?#'\"]*(?:[/?#\s'\"]|$))"
)
_QUERY_PARAM = re.compile(r"(?P<sep>[?&;])(?P<name>[^=&#\s;]+)=(?P<value>[^&#\s;'\"]*)")
# NAME=value, name: value, "name": "value", --name=value
_ASSIGN = re.compile(
    r"(?P<name>(?<![\w])[A-Za-z_][\w.-]*)(?P<q1>['\"]?)(?P<op>\s*[=:]\s*)(?P<quote>['\"]?)(?P<value>[^\s'\",;&}]+)"
)
_FLAG = re.compile(r"(?P<flag>(?<!\S)--?[A-Za-z][\w-]*)(?P<sp>\s+)(?P<value>[^\s-]\S*)")
_KEEP_VALUES = {REDACTED, "Bearer", "Basic", "Token"}
_AUTH_HEADER = re.compile(r"(?P<head>\b(?:Bearer|Basic|Token)\s+)(?P<value>[A-Za-z0-9._~+/=\-]{8,})")


def redact_text(text: str) -> str:
    """``text`` with every secret it spells out replaced by ``***`` (see the module docstring)."""
    if not isinstance(text, str) or not text:
        return text
    out = _AUTH_HEADER.sub(lambda m: m["head"] + REDACTED, text)
    out = _URL_USERINFO.sub(lambda m: m["head"] + (REDACTED if m["pw"] else ""), out)
    out = _QUERY_PARAM.sub(
        lambda m: f"{m['sep']}{m['name']}={REDACTED if is_secret_name(m['name']) and m['value'] else m['value']}", out
    )
    out = _ASSIGN.sub(
        lambda m: (m["name"] + m["q1"] + m["op"] + m["quote"] + REDACTED)
        if is_secret_name(m["name"]) and m["value"] not in _KEEP_VALUES and not m["value"].startswith("//") else m[0],
        out,
    )
    return _FLAG.sub(lambda m: (m["flag"] + m["sp"] + REDACTED) if is_secret_name(m["flag"]) else m[0], out)


def redact(obj: Any, name: Any = None) -> Any:
    """A copy of ``obj`` (mappings, lists, tuples, strings, scalars, nested) with secrets
    replaced: the whole value under a secret name, and the secrets inside every string."""
    if (name is not None and is_secret_name(name) and not isinstance(obj, (dict, list, tuple, bool))
            and obj not in (None, "")):
        return REDACTED
    if isinstance(obj, dict):
        return {k: redact(v, k) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        items = [redact(v) for v in obj]
        return type(obj)(items) if isinstance(obj, list) or type(obj) is tuple else items
    if isinstance(obj, str):
        return redact_text(obj)
    return obj


def split_userinfo(uri: str) -> tuple[str, str | None, str | None]:
    """``(uri without user info, user, password)`` of an ``http(s)://user:password@host/...`` URI
    (a redacted password counts as none); any other URI comes back unchanged with ``None, None``."""
    from urllib.parse import unquote, urlsplit, urlunsplit

    if not isinstance(uri, str) or not uri.startswith(("http://", "https://")) or "@" not in uri.split("/", 3)[2]:
        return uri, None, None
    parts = urlsplit(uri)
    host = parts.netloc.rpartition("@")[2]
    user = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password and parts.password != REDACTED else None
    return urlunsplit(parts._replace(netloc=host)), user, password


class RedactingClient:
    """An MLflow client whose every written text is redacted: tags (a trial's ``error``,
    ``retry_N_error``), params, text and dict artifacts. Reads and everything else pass through."""

    def __init__(self, client: Any):
        self._client = client

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    def set_tag(self, run_id: str, key: str, value: Any, *args, **kwargs):
        return self._client.set_tag(run_id, key, redact(value, key), *args, **kwargs)

    def set_experiment_tag(self, experiment_id: str, key: str, value: Any):
        return self._client.set_experiment_tag(experiment_id, key, redact(value, key))

    def log_param(self, run_id: str, key: str, value: Any, *args, **kwargs):
        return self._client.log_param(run_id, key, redact(value, key), *args, **kwargs)

    def log_text(self, run_id: str, text: str, artifact_file: str):
        return self._client.log_text(run_id, redact_text(text), artifact_file)

    def log_dict(self, run_id: str, dictionary: Any, artifact_file: str):
        return self._client.log_dict(run_id, redact(dictionary), artifact_file)


def error_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of ``exc``'s text (its class name when it has none), redacted, at most ``limit``
    characters: what a one-line error message quotes of a library's exception."""
    lines = str(exc).strip().splitlines()
    return redact_text(lines[0] if lines else type(exc).__name__)[:limit]


def redacted_exception(exc: BaseException) -> BaseException:
    """``exc`` if its text holds no secret, else an exception of the same type (so that its class
    name still says what failed: see ``trial.DETERMINISTIC_ERRORS``) whose text is redacted, with
    the original's traceback frames (they hold code, not values) and no chained cause or context.

    A trial raises this at its process boundary: Ray Train's controller logs, Tune's
    ``<trial>/error.txt`` and ``error.pkl`` and the console then only ever see the redacted text."""
    texts = [str(a) for a in getattr(exc, "args", ())] or [str(exc)]
    clean = [redact_text(t) for t in texts]
    if clean == texts and not any(redact_text(str(e)) != str(e) for e in _chain(exc)):
        return exc
    message = "; ".join(clean)
    try:
        new = type(exc)(message)
    except Exception:  # noqa: BLE001 - a constructor with other arguments
        new = RuntimeError(f"{type(exc).__name__}: {message}")
    new.__suppress_context__ = True
    new.__cause__ = None
    return new.with_traceback(exc.__traceback__)


def _chain(exc: BaseException):
    """Every exception ``exc`` chains to (causes and contexts, at any depth), each once."""
    seen, todo = {id(exc)}, [exc.__cause__, exc.__context__]
    while todo:
        e = todo.pop()
        if e is not None and id(e) not in seen:
            seen.add(id(e))
            yield e
            todo += [e.__cause__, e.__context__]


@contextlib.contextmanager
def errors_redacted():
    """Exceptions leave the block as :func:`redacted_exception` makes them (unchanged when clean)."""
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - re-raised, redacted
        clean = redacted_exception(exc)
        if clean is exc:
            raise
        raise clean from None
