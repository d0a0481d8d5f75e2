"""The service over its Unix socket: one aiohttp route per row of the API table.

A thin adapter over `Service`: each request is identified by the kernel (``SO_PEERCRED``,
`appliance.server.peercred`), its parameters are taken from the JSON body (POST) or the
query string (GET) plus the path, and `appliance.service.api.dispatch` does the rest,
exactly as in local mode. Nothing else the client sends says who it is: headers are never
read, and a "caller" parameter is an unknown parameter (400).

Service calls block (DuckDB, hashing, waiting for a run's next event), so they run in a
thread pool, never on the event loop. Answers: ``{"result": ...}`` (JSON), one JSON object
per line (NDJSON, written as each event arrives), or raw bytes (tar). Errors:
``{"error": {"type", "message", "hint", "exit_code"}}`` with 403 for a refusal, 400 for any
other error the appliance raises on purpose, 500 for a bug (its traceback goes to the
service's stderr, never to the client).

`serve` runs one `Service` behind one socket until SIGTERM or SIGINT, then stops taking
connections, closes the service (active runs checkpoint and stop) and removes the socket.
"""

from __future__ import annotations

import asyncio
import dataclasses
import fcntl
import grp
import json
import os
import signal
import socket
import stat
import sys
import threading
import traceback
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

from aiohttp import web

from appliance.server.peercred import PeerCred, peer_credentials
from appliance.service.api import OPS, Op, dispatch
from keys.errors import ApplianceError
from pipeline.errors import ConfigError
from policies.errors import PolicyError, PolicyFileError, PolicySignatureError

# Parameters are small (SQL, PEM keys, prompts); a recipe travels as a path, not a body.
MAX_BODY_BYTES = 16 * 1024 * 1024
# Every NDJSON follower holds a thread while it waits for the run's next event (the feed
# beats once a second), so the pool is sized for many followers plus ordinary requests.
API_THREADS = 64
# After the service has closed, connections still open get this long to finish.
SHUTDOWN_GRACE_S = 5.0
_END = object()


class ServiceStopping(ApplianceError):
    """The service is shutting down and takes no new requests."""


# -- answers ------------------------------------------------------------------------------


def _json(payload: Any) -> bytes:
    return json.dumps(payload, default=str).encode()


def _error_payload(type_name: str, message: str, hint: str, exit_code: int) -> dict[str, Any]:
    return {"error": {"type": type_name, "message": message, "hint": hint, "exit_code": exit_code}}


def _appliance_error(exc: ApplianceError) -> web.Response:
    # A policy file that is malformed or badly signed is bad input (400), not a refusal (403).
    refused = isinstance(exc, PolicyError) and not isinstance(exc, (PolicyFileError, PolicySignatureError))
    status = 403 if refused else 503 if isinstance(exc, ServiceStopping) else 400
    body = _error_payload(type(exc).__name__, exc.message, exc.hint, exc.exit_code)
    # A recipe's problems one by one (key, message, fix), so a client can show each beside its key.
    problems = getattr(exc, "problems", None)
    if problems:
        body["error"]["problems"] = [dataclasses.asdict(p) for p in problems]
    return web.Response(status=status, body=_json(body), content_type="application/json")


def _bug(exc: BaseException, request: web.BaseRequest) -> dict[str, Any]:
    print(f"appliance service: {request.method} {request.path} failed (a bug in the service):", file=sys.stderr)
    traceback.print_exception(exc, file=sys.stderr)
    return _error_payload(type(exc).__name__, str(exc) or type(exc).__name__, "this is a bug in the service; its log (stderr) has the traceback", 2)


@web.middleware
async def _json_errors(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    """aiohttp's own refusals (no such path, wrong method, body too large) as JSON errors."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        hints = {
            404: "see `appliance --help` for the operations; the client and service versions may differ",
            405: f"this path takes {exc.headers.get('Allow', 'another method')}",
            413: f"requests are limited to {MAX_BODY_BYTES // (1024 * 1024)} MiB",
        }
        body = _error_payload(type(exc).__name__, f"{request.method} {request.path}: {exc.reason}", hints.get(exc.status, ""), 2)
        return web.Response(status=exc.status, body=_json(body), content_type="application/json")


# -- one request --------------------------------------------------------------------------


class Api:
    """The handlers: identify → parameters → `dispatch` in the pool → answer."""

    def __init__(self, svc: Any, executor: ThreadPoolExecutor) -> None:
        self.svc, self.executor = svc, executor
        self.stopping = False

    def handler(self, op: Op) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def handle(request: web.Request) -> web.StreamResponse:
            return await self.handle(op, request)

        handle.__name__ = f"op_{op.name.replace('.', '_')}"
        return handle

    async def handle(self, op: Op, request: web.Request) -> web.StreamResponse:
        try:
            if self.stopping:
                raise ServiceStopping("the appliance service is stopping", "wait for it to restart (`systemctl status appliance`), then try again")
            transport = request.transport
            peer = peer_credentials(transport.get_extra_info("socket") if transport is not None else None)
            params, from_text = await _params(op, request)
            if op.result == "json":
                body = await self._in_pool(partial(self._answer, peer, op, params, from_text))
                return web.Response(body=body, content_type="application/json")
            stream = await self._in_pool(partial(self._perform, peer, op, params, from_text))
        except ApplianceError as exc:
            return _appliance_error(exc)
        except web.HTTPException:
            raise  # aiohttp's own answers (body too large): `_json_errors` words them
        except Exception as exc:  # the request's top level: a bug becomes a 500, the service lives on
            return web.Response(status=500, body=_json(_bug(exc, request)), content_type="application/json")
        return await self._stream(op, request, iter(stream))

    def _perform(self, peer: PeerCred, op: Op, params: dict[str, Any], from_text: bool) -> Any:
        from appliance.service.caller import Caller

        # Looked up per request (users and groups change; NSS may block, hence in the pool).
        caller = Caller.from_uid(peer.uid, pid=peer.pid)
        return dispatch(self.svc, caller, op.name, params, from_text=from_text)

    def _answer(self, peer: PeerCred, op: Op, params: dict[str, Any], from_text: bool) -> bytes:
        return _json({"result": self._perform(peer, op, params, from_text)})

    async def _in_pool(self, fn: Callable[[], Any]) -> Any:
        return await asyncio.wrap_future(self.executor.submit(fn))

    async def _stream(self, op: Op, request: web.Request, items: Iterator[Any]) -> web.StreamResponse:
        ndjson = op.result == "ndjson"
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson" if ndjson else "application/x-tar"})
        try:
            await response.prepare(request)
            try:
                await self._pump(items, response, ndjson)
            except (ConnectionError, asyncio.CancelledError):
                raise
            except Exception as exc:  # mid-stream: the status line has gone, so the error goes in the stream
                payload = _error_payload(type(exc).__name__, exc.message, exc.hint, exc.exit_code) if isinstance(exc, ApplianceError) else _bug(exc, request)
                await self._close_items(items)
                if not ndjson:
                    # A tar cut short must not end like a whole one: drop the connection, so the
                    # client sees a broken stream instead of a valid-looking truncated archive.
                    print(f"appliance service: {op.name} stream aborted: {payload['error']['message']}", file=sys.stderr)
                    if request.transport is not None:
                        request.transport.abort()
                    return response
                await response.write(_json(payload) + b"\n")
            await response.write_eof()
        except ConnectionError:
            # The client went away (a follower pressed Ctrl-C): stop iterating, quietly.
            await self._close_items(items)
        return response

    async def _pump(self, items: Iterator[Any], response: web.StreamResponse, ndjson: bool) -> None:
        """Write each item as the generator yields it (it blocks, so it steps in the pool)."""
        while True:
            pending: Future[Any] = self.executor.submit(next, items, _END)
            try:
                item = await asyncio.wrap_future(pending)
            except asyncio.CancelledError:
                # Shutting down mid-wait: the generator is still running in its thread;
                # close it there once this step returns.
                pending.add_done_callback(lambda _f: _close(items))
                raise
            if item is _END:
                return
            await response.write(_json(item) + b"\n" if ndjson else bytes(item))

    async def _close_items(self, items: Iterator[Any]) -> None:
        try:
            await self._in_pool(partial(_close, items))
        except RuntimeError:  # the pool has shut down: the service is stopping
            _close(items)


def _close(items: Iterator[Any]) -> None:
    close = getattr(items, "close", None)
    if close is not None:
        try:
            close()
        except ValueError:
            pass  # still running in another thread; it ends on its own at its next step


def _single(query: Any) -> dict[str, str]:
    twice = sorted({k for k in query if len(query.getall(k)) > 1})
    if twice:
        raise ConfigError(f"parameter {', '.join(repr(k) for k in twice)} is given more than once", "give each parameter once")
    return dict(query)


async def _params(op: Op, request: web.Request) -> tuple[dict[str, Any], bool]:
    """The request's parameters, and whether they are text (query string) or JSON values."""
    params: dict[str, Any]
    from_text = True
    if request.method == "GET":
        params = _single(request.query)
    else:
        raw = await request.read()
        if not raw.strip():
            params = _single(request.query)
        elif request.query:
            raise ConfigError(f"{op.name}: parameters came both in the query string and in the body", "send them all in the JSON body")
        else:
            try:
                body = json.loads(raw)
            except (ValueError, RecursionError) as exc:
                raise ConfigError(
                    f"{op.name}: the request body is not valid JSON ({exc})", 'send one JSON object of parameters, e.g. {"sql": "SELECT 1"}'
                ) from None
            if not isinstance(body, dict):
                raise ConfigError(
                    f"{op.name}: the request body must be a JSON object of parameters, not a {type(body).__name__}", 'send e.g. {"sql": "SELECT 1"}'
                )
            params, from_text = body, False
    for name, value in request.match_info.items():
        if name in params and params[name] != value:
            raise ConfigError(f"{op.name}: '{name}' is in the path ({value!r}) and again among the parameters ({params[name]!r})", "give it once, in the path")
        params[name] = value
    return params, from_text


def make_app(api: Api) -> web.Application:
    """One route per (operation, method) of the API table."""
    app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[_json_errors])
    for op in OPS:
        for method in op.methods:
            app.router.add_route(method, op.path, api.handler(op), name=f"{op.name}:{method}")
    return app


# -- the socket ---------------------------------------------------------------------------


def _group_id(group: str | None) -> int | None:
    if group is None:
        return None
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ApplianceError(f"there is no group named '{group}' for the socket", "create it (`groupadd NAME`), or pass an existing --socket-group") from None


def _make_parents(directory: Path) -> None:
    # Created folders are 0755 whatever the umask: the socket's own mode decides who connects.
    missing = [d for d in (directory, *directory.parents) if not d.exists()]
    for d in reversed(missing):
        try:
            d.mkdir()
        except FileExistsError:
            continue
        except OSError as exc:
            raise ApplianceError(f"cannot create {d} for the socket ({exc.strerror})", "create it yourself, or pass a --socket in a writable folder") from None
        os.chmod(d, 0o755)


def _listening(path: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(2.0)
    try:
        probe.connect(str(path))
        return True
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except TimeoutError:
        return True  # a full backlog: someone listens and is busy
    except OSError as exc:
        raise ApplianceError(
            f"cannot tell whether a service listens on {path} ({exc.strerror})", "check the socket's permissions, or pass another --socket"
        ) from None
    finally:
        probe.close()


class SocketClaim:
    """The right to serve on one socket path: an ``flock`` on ``<socket>.lock`` for the
    service's life (two services starting at once cannot both bind), then the connect test
    (a service without the lock still listening is refused) and the removal of a stale file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock_path = path.with_name(path.name + ".lock")
        self.fd: int | None = None

    def acquire(self) -> None:
        try:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise ApplianceError(f"cannot open {self.lock_path} ({exc.strerror})", "pass a --socket in a folder this user can write") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ApplianceError(
                f"another appliance service already serves on {self.path}", "stop it first (`systemctl stop appliance`), or pass another --socket"
            ) from None
        self.fd = fd
        try:
            self._clear()
        except BaseException:
            self.release()
            raise

    def _clear(self) -> None:
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise ApplianceError(f"{self.path} exists and is not a socket", "remove it, or pass another --socket")
        if _listening(self.path):
            raise ApplianceError(f"another service already listens on {self.path}", "stop it first (`systemctl stop appliance`), or pass another --socket")
        # Left by a service that was killed: nothing answers, so it is safe to replace.
        self.path.unlink()

    def secure(self, gid: int | None, mode: int) -> os.stat_result:
        """Give the bound socket its group, then its mode (it was born private: umask 077)."""
        try:
            if gid is not None:
                os.chown(self.path, -1, gid)
            os.chmod(self.path, mode)
        except OSError as exc:
            raise ApplianceError(
                f"cannot set the group or mode of {self.path} ({exc.strerror})", "run the service as root or as a member of --socket-group"
            ) from None
        return os.lstat(self.path)

    def remove(self, bound: os.stat_result | None) -> None:
        """Remove the socket, if it is still the one this service bound."""
        if bound is None:
            return
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if (st.st_dev, st.st_ino) == (bound.st_dev, bound.st_ino):
            self.path.unlink()

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


# -- serve ------------------------------------------------------------------------------


class _Closer:
    """Close the service once, whichever path gets there first."""

    def __init__(self, svc: Any) -> None:
        self.svc, self.done, self._lock = svc, False, threading.Lock()

    def __call__(self) -> None:
        with self._lock:
            if not self.done:
                self.done = True
                self.svc.close()


def serve(
    home: Path,
    socket_path: Path,
    *,
    group: str | None = None,
    mode: int = 0o660,
    config: Any,
    passphrase: bytes,
    ready: Callable[[dict[str, Any]], None] | None = None,
) -> int:
    """Run the service of ``home`` on the Unix socket ``socket_path`` until SIGTERM/SIGINT.

    Opens the `Service` once (resuming the runs a killed service left behind), serves the
    API on the socket (mode ``mode``, group ``group``), and on SIGTERM or SIGINT stops taking
    connections, closes the service (active runs checkpoint and stop) and removes the
    socket. ``ready`` gets the start-up facts once the socket accepts connections. Returns 0.
    """
    from appliance.service.core import Service

    socket_path = Path(socket_path).absolute()
    gid = _group_id(group)
    _make_parents(socket_path.parent)
    claim = SocketClaim(socket_path)
    claim.acquire()
    try:
        svc = Service.open(Path(home), passphrase, config=replace(config, resume_interrupted=True))
        closer = _Closer(svc)
        try:
            asyncio.run(_serve(svc, claim, gid, mode, closer, ready))
        finally:
            closer()
    finally:
        claim.release()
    _say("appliance service: stopped")
    return 0


async def _serve(svc: Any, claim: SocketClaim, gid: int | None, mode: int, closer: _Closer, ready: Callable[[dict[str, Any]], None] | None) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def on_signal(signum: int) -> None:
        if stop.is_set():
            _say("appliance service: already stopping; active runs are saving a checkpoint")
            return
        # Stop first, say so second: Ctrl-C on `serve | tee` kills the reader of stderr too,
        # and a failed write must not leave the service running.
        stop.set()
        _say(f"appliance service: {signal.Signals(signum).name}: stopping (active runs checkpoint and stop)")

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    executor = ThreadPoolExecutor(API_THREADS, thread_name_prefix="api")
    api = Api(svc, executor)
    runner = web.AppRunner(make_app(api), handle_signals=False, access_log=None, shutdown_timeout=SHUTDOWN_GRACE_S)
    await runner.setup()
    bound: os.stat_result | None = None
    try:
        site = web.UnixSite(runner, str(claim.path))
        try:
            await site.start()
        except OSError as exc:
            raise ApplianceError(f"cannot listen on {claim.path} ({exc.strerror})", "pass a --socket in a folder this user can write") from None
        bound = os.lstat(claim.path)
        bound = claim.secure(gid, mode)
        facts = {
            "home": str(svc.home.root),
            "socket": str(claim.path),
            "group": _group_name(bound.st_gid),
            "mode": f"{stat.S_IMODE(bound.st_mode):04o}",
            "node_key": svc.key.key_id,
            "pid": os.getpid(),
        }
        print(
            f"appliance service: home {facts['home']}, socket {facts['socket']} (group {facts['group']}, mode {facts['mode']}), "
            f"node key {facts['node_key']}, pid {facts['pid']}",
            file=sys.stderr,
            flush=True,
        )
        if ready is not None:
            ready(facts)
        await stop.wait()
        api.stopping = True
        await site.stop()  # no new connections; open streams keep going while the runs stop
        await asyncio.to_thread(closer)
    finally:
        api.stopping = True
        await runner.cleanup()
        executor.shutdown(wait=False, cancel_futures=True)
        claim.remove(bound)


def _say(line: str) -> None:
    """A line on stderr, which may be a pipe whose reader is gone (then the line is dropped)."""
    try:
        print(line, file=sys.stderr, flush=True)
    except OSError:
        pass


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)
