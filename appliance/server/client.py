"""The client every command uses: the service over its socket, or the same service in-process.

Both clients take an operation name from the API table (`appliance.service.api`) and its
parameters, and return the operation's result (``call``) or its stream (``stream``: run
events for ``ndjson`` operations, byte chunks for ``tar``). Errors the service raises arrive
as the same `ApplianceError` classes, with the same message and hint, either way.

Which one a command gets (`connect`): ``--socket``/``APPLIANCE_SOCKET`` → the socket;
``--home``/``APPLIANCE_HOME`` → local mode; neither → the default socket if a service
listens there, else local mode on the default home.
"""

from __future__ import annotations

import io
import json
import os
import ssl
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote

from appliance.service.api import BY_NAME, Op
from keys.errors import ApplianceError

ENV_SOCKET = "APPLIANCE_SOCKET"
DEFAULT_SOCKET = Path("/run/appliance/appliance.sock")
# A run can stream for days; only connecting and each read of a plain answer are bounded.
CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 3600.0


class Client(Protocol):
    def call(self, op: str, **params: Any) -> Any: ...
    def stream(self, op: str, **params: Any) -> Iterator[Any]: ...
    def close(self) -> None: ...


class ServiceUnavailable(ApplianceError):
    """The service's socket cannot be reached."""


def error_from(body: dict[str, Any]) -> ApplianceError:
    """Rebuild the service's error on the client side: the same class where we know it."""
    from airgap.errors import AirgapError
    from keys.approval import ApprovalSignatureError
    from keys.errors import KeyStoreError, SigningError
    from keys.truststore import TrustStoreError, UntrustedKeyError
    from pipeline.errors import ConfigError, DataError, Problem, ShardIntegrityError, TrainingError
    from policies.errors import ApprovalError, PolicyError, PolicyFileError, PolicySignatureError
    from registry.dsse import EnvelopeError
    from registry.errors import BundleError, LedgerError, StoreError

    known: dict[str, type[ApplianceError]] = {
        c.__name__: c
        for c in (
            ConfigError,
            DataError,
            ShardIntegrityError,
            TrainingError,
            PolicyError,
            PolicyFileError,
            PolicySignatureError,
            LedgerError,
            StoreError,
            KeyStoreError,
            SigningError,
            TrustStoreError,
            UntrustedKeyError,
            ApprovalError,
            ApprovalSignatureError,
            BundleError,
            EnvelopeError,
            AirgapError,
        )
    }
    err = body.get("error") or {}
    cls = known.get(str(err.get("type")), ApplianceError)
    exc = cls(str(err.get("message", "the service failed")), str(err.get("hint", "")))
    if isinstance(exc, ConfigError) and isinstance(err.get("problems"), list):
        exc.problems = [Problem(str(p.get("key", "")), str(p.get("message", "")), str(p.get("fix", ""))) for p in err["problems"] if isinstance(p, dict)]
    exc.exit_code = int(err.get("exit_code", 2))
    return exc


class LocalClient:
    """Local mode: the same `Service` in this process, acting for this process's user."""

    def __init__(self, svc: Any) -> None:
        from appliance.service.caller import Caller

        self.svc, self.caller = svc, Caller.current()

    def call(self, op: str, **params: Any) -> Any:
        from appliance.service.api import dispatch

        return _plain(dispatch(self.svc, self.caller, op, params))

    def stream(self, op: str, **params: Any) -> Iterator[Any]:
        from appliance.service.api import dispatch

        return iter(dispatch(self.svc, self.caller, op, params))

    def close(self) -> None:
        self.svc.close()


def _plain(value: Any) -> Any:
    # What the socket client would get back: JSON types only (tuples become lists, and so on).
    return json.loads(json.dumps(value, default=str))


class ServiceClient:
    """The service over its Unix socket: HTTP/1.1 with JSON bodies and NDJSON streams (httpx)."""

    def __init__(self, socket_path: Path) -> None:
        httpx = _import_httpx()

        self.socket_path = Path(socket_path)
        # Plain HTTP over a Unix socket: no TLS ever. httpx would otherwise build a context with
        # the whole CA bundle (~40 ms a command); this one trusts nothing, so it fails closed.
        no_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        transport = httpx.HTTPTransport(uds=str(self.socket_path), verify=no_tls)
        timeout = httpx.Timeout(READ_TIMEOUT_S, connect=CONNECT_TIMEOUT_S)
        self._http = httpx.Client(transport=transport, base_url="http://appliance", timeout=timeout)

    def _request(self, op: Op, params: dict[str, Any]) -> tuple[str, str, dict[str, Any]]:
        path_params = {k: params.pop(k) for k in list(params) if "{" + k + "}" in op.path}
        path = op.path.format(**{k: quote(str(v), safe="") for k, v in path_params.items()})
        params = {k: v for k, v in params.items() if v is not None}
        if "POST" in op.methods and (op.methods == ("POST",) or any(isinstance(v, (list, dict)) for v in params.values())):
            return "POST", path, {"json": params}
        return "GET", path, {"params": params}

    def call(self, op: str, **params: Any) -> Any:
        import httpx

        method, path, kw = self._request(BY_NAME[op], dict(params))
        try:
            response = self._http.request(method, path, **kw)
        except httpx.TransportError as exc:
            raise self._unavailable(exc) from None
        return self._body(response)

    def stream(self, op: str, **params: Any) -> Iterator[Any]:
        import httpx

        spec = BY_NAME[op]
        method, path, kw = self._request(spec, dict(params))
        started = False
        try:
            with self._http.stream(method, path, **kw) as response:
                if response.status_code >= 400:
                    response.read()
                    self._body(response)
                started = True
                if spec.result == "ndjson":
                    for line in response.iter_lines():
                        if line.strip():
                            item = json.loads(line)
                            # An error after the stream began arrives as its last line.
                            if isinstance(item, dict) and "error" in item and "event" not in item:
                                raise error_from(item)
                            yield item
                else:
                    yield from response.iter_bytes()
        except httpx.TransportError as exc:
            if started:
                # The service dropped the stream on purpose (a tar it could not finish) or died.
                raise ApplianceError(
                    f"the service ended the {op} stream before its end ({exc})", "check the service's log (`journalctl -u appliance`) and try again"
                ) from None
            raise self._unavailable(exc) from None

    def _body(self, response: Any) -> Any:
        try:
            body = response.json()
        except ValueError:
            raise ApplianceError(f"the service answered HTTP {response.status_code} without JSON", "check the service's log") from None
        if response.status_code >= 400:
            raise error_from(body)
        return body.get("result")

    def _unavailable(self, exc: Exception) -> ServiceUnavailable:
        return ServiceUnavailable(
            f"cannot reach the appliance service at {self.socket_path}: {exc}",
            "start it (`appliance serve`, or `systemctl start appliance`), check --socket / APPLIANCE_SOCKET, or use local mode with --home DIR",
        )

    def close(self) -> None:
        self._http.close()


def _import_httpx() -> Any:
    # `import httpx` also imports httpx's own command-line tool (httpx._main: click, pygments and
    # four rich modules, ~70 ms of a ~170 ms import here) whenever those are installed, as they
    # are beside model-signing and rich. The client never runs it; a None entry in sys.modules
    # makes that one import fail, and httpx then defines a stub `main` instead.
    if "httpx" not in sys.modules:
        sys.modules.setdefault("httpx._main", None)  # type: ignore[arg-type]
    import httpx

    return httpx


def socket_from(args_socket: str | None) -> Path | None:
    """The socket a command should talk to, or None for local mode."""
    if args_socket:
        return Path(args_socket)
    env = os.environ.get(ENV_SOCKET)
    if env:
        return Path(env)
    return None


def unpack_export(stream: Iterator[bytes], out: Path) -> Path:
    """Client side of `model_export`: unpack the tar stream into a new folder ``out``."""
    import shutil
    import tarfile  # here, not at the top: every command imports this module, few export

    from keys.tarsafe import extract_plain

    out = Path(out)
    if out.exists():
        raise ApplianceError(f"export target {out} already exists", "choose a new --out folder")
    out.mkdir(parents=True)
    buffer = _StreamReader(stream)
    try:
        with tarfile.open(fileobj=buffer, mode="r|") as tar:
            # Absolute paths, .. and links are refused: a stream cannot write outside out/.
            extract_plain(tar, out)
    except (ValueError, tarfile.TarError) as exc:
        shutil.rmtree(out, ignore_errors=True)
        raise ApplianceError(f"the export stream for {out} was refused: {exc}", "export again; if it happens again, report it") from None
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    return out


class _StreamReader(io.RawIOBase):
    """A file object over an iterator of byte chunks (what tarfile's stream mode reads)."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks, self._buf = iter(chunks), b""

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        while not self._buf:
            try:
                self._buf = next(self._chunks)
            except StopIteration:
                return 0
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n
