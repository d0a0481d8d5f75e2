"""The data stages join only a Ray cluster that demands a token, and only with a token kept private.

Ray without token authentication (its default before 2.61) runs any code for anyone who can
reach the head's GCS port: another account on a node of the cluster, or a host on its
network, could run code as the user who started Ray and read the documents in flight. So
before a stage sends a batch (and before a run naming the cluster starts), the stage checks,
in this order:

1. the token file: Ray's own lookup (``RAY_AUTH_TOKEN_PATH``, else ``~/.ray/auth_token`` of
   the user running the stage), which must exist, be non-empty, belong to that user and be
   readable by nobody else (Ray's ``get-auth-token --generate`` writes it with the umask's
   mode, often 0644);
2. that the cluster refuses a call without a token (one ``GetClusterId`` to the GCS, the
   call any client makes first), so an open cluster is refused, not trusted;
3. that it accepts the call with the token, so a cluster started with another token is named.

The stage's driver then connects with ``RAY_AUTH_MODE=token`` and exactly that file
(`driver_env`). The token is a shared secret of the cluster: every node starts with
``RAY_AUTH_MODE=token`` and a copy of it (README, "Data stages on a Ray cluster").
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from pipeline.errors import ClusterError
from pipeline.settings.cluster import START_HINT

ENV_TOKEN_PATH = "RAY_AUTH_TOKEN_PATH"
# A call every Ray client makes first; it reads nothing but the cluster's id.
PROBE_METHOD = "/ray.rpc.NodeInfoGcsService/GetClusterId"
PROBE_TIMEOUT_S = 10.0
# Ray's own tokens are 64 hex characters; a file far larger is not a token (and is not read whole).
MAX_TOKEN_BYTES = 4096
MAKE_TOKEN = "ray get-auth-token --generate && chmod 600 ~/.ray/auth_token"


def token_path() -> Path:
    """Where Ray looks for the token of the user running this process (its own precedence, less the
    ``RAY_AUTH_TOKEN`` variable: a secret in the environment is readable in /proc by its own user's processes)."""
    explicit = os.environ.get(ENV_TOKEN_PATH, "").strip()
    return Path(explicit) if explicit else Path.home() / ".ray" / "auth_token"


def read_token(path: Path | None = None) -> tuple[str, Path]:
    """The token and its file, once the file is this user's alone; ClusterError naming the file and the fix."""
    path = path or token_path()
    where = f"{ENV_TOKEN_PATH}" if os.environ.get(ENV_TOKEN_PATH, "").strip() else "the default place, ~/.ray/auth_token"
    try:
        # Opened once, and every check made on the open file (fstat), so the file read is the file
        # checked, not one swapped in between; O_NONBLOCK so a FIFO put there cannot hang the stage.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ClusterError(
            f"no Ray token at {path} ({where}): the stage joins only a Ray cluster that demands a token",
            f"as the user the service runs as: `{MAKE_TOKEN}`; start every node with RAY_AUTH_MODE=token and a copy of that file "
            f'(README: Data stages on a Ray cluster), or set [cluster] executor = "local"',
        ) from None
    except OSError as exc:
        raise ClusterError(f"cannot read the Ray token {path}: {exc.strerror or exc}", f"make {path} readable by the user the service runs as") from None
    try:
        raw = _checked_read(fd, path)
    finally:
        os.close(fd)
    try:
        token = raw.decode("utf-8").strip()
    except UnicodeDecodeError as exc:
        raise ClusterError(f"cannot read the Ray token {path}: {exc}", f"recreate it with `{MAKE_TOKEN}`") from None
    if not token:
        raise ClusterError(f"the Ray token {path} is empty", f"recreate it with `{MAKE_TOKEN}`, and restart the cluster with it")
    return token, path


def _checked_read(fd: int, path: Path) -> bytes:
    """The bytes of the open token file, once it is a regular file of this user's alone and token-sized."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise ClusterError(f"the Ray token {path} is not a regular file", f"point {ENV_TOKEN_PATH} at the token file, or create it with `{MAKE_TOKEN}`")
    if st.st_uid != os.geteuid():
        raise ClusterError(
            f"the Ray token {path} belongs to uid {st.st_uid}, not to the user running the stage (uid {os.geteuid()})",
            f"give the service user its own copy: `install -m 600 -o SERVICE_USER {path} ~SERVICE_USER/.ray/auth_token`",
        )
    if st.st_mode & 0o077:
        raise ClusterError(
            f"the Ray token {path} can be read or changed by other users (mode {stat.S_IMODE(st.st_mode):04o}): whoever reads it can run code on the cluster",
            f"`chmod 600 {path}`, and the same for its copy on every node",
        )
    if st.st_size > MAX_TOKEN_BYTES:
        raise ClusterError(
            f"the Ray token {path} is {st.st_size:,} bytes, not a token (at most {MAX_TOKEN_BYTES:,})",
            f"point {ENV_TOKEN_PATH} at the token file, or recreate it with `{MAKE_TOKEN}`",
        )
    try:
        # One byte more than allowed: a file that grew since fstat is refused, not cut.
        raw = os.read(fd, MAX_TOKEN_BYTES + 1)
    except OSError as exc:
        raise ClusterError(f"cannot read the Ray token {path}: {exc.strerror or exc}", f"recreate it with `{MAKE_TOKEN}`") from None
    if len(raw) > MAX_TOKEN_BYTES:
        raise ClusterError(f"the Ray token {path} grew past {MAX_TOKEN_BYTES:,} bytes while it was read", f"recreate it with `{MAKE_TOKEN}`")
    return raw


def gcs_answer(address: str, token: str | None, timeout: float = PROBE_TIMEOUT_S) -> tuple[str, str]:
    """One ``GetClusterId`` call to the GCS at ``address``, with the token or without any:
    ("ok", ""), ("refused", detail) for a missing or wrong token, or ("error", detail)."""
    import grpc  # Ray's own dependency: present wherever Ray is installed

    metadata = (("authorization", f"Bearer {token}"),) if token is not None else ()
    with grpc.insecure_channel(address) as channel:
        call = channel.unary_unary(PROBE_METHOD)
        try:
            # An empty message is a valid (all-default) GetClusterIdRequest.
            call(b"", timeout=timeout, metadata=metadata)
        except grpc.RpcError as exc:
            code, details = exc.code(), exc.details() or ""
            if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
                return "refused", details
            return "error", f"{code.name}: {details}"
    return "ok", ""


def require_token_auth(address: str) -> Path:
    """The cluster at ``address`` demands a token and takes ours; the token file that does it."""
    token, path = read_token()
    state, detail = gcs_answer(address, None)
    if state == "ok":
        raise ClusterError(
            f"the Ray cluster at {address} accepts clients without a token: anyone who can reach that port, from any account "
            "on its nodes or network, can run code as the user who started Ray and read the documents in flight; nothing was sent to it",
            f"restart every node with token authentication: `ray stop`, then `RAY_AUTH_MODE=token {ENV_TOKEN_PATH}={path} ray start …` "
            f"on each (with a copy of {path}, mode 600); the head: `{ENV_TOKEN_PATH}={path} {START_HINT}`",
        )
    if state == "error":
        raise ClusterError(
            f"the Ray cluster at {address} did not answer as a Ray head ({detail})",
            f"check that {address} is the GCS address `ray start --head` printed (`ray status --address={address}` on the head)",
        )
    state, detail = gcs_answer(address, token)
    if state == "refused":
        raise ClusterError(
            f"the Ray cluster at {address} refuses the token in {path} ({detail})",
            f"start every node with that token ({ENV_TOKEN_PATH}={path} or a copy of it), or point the service's {ENV_TOKEN_PATH} at the cluster's token",
        )
    if state == "error":
        raise ClusterError(f"the Ray cluster at {address} did not answer with the token ({detail})", f"`ray status --address={address}` on the head says why")
    return path


def driver_env(path: Path) -> dict[str, str]:
    """What the stage's driver joins with: token mode and exactly the checked file (no token in the environment)."""
    return {"RAY_AUTH_MODE": "token", ENV_TOKEN_PATH: str(path)}
