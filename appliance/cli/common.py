"""What every command shares: finding the service (socket or local mode), output, flags."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from appliance.home import ENV_HOME, Home, default_home
from appliance.server.client import DEFAULT_SOCKET, Client, LocalClient, ServiceClient, socket_from
from keys.errors import ApplianceError


def home_of(args: argparse.Namespace) -> Home:
    return Home(Path(args.home).expanduser().resolve() if getattr(args, "home", None) else default_home().resolve())


def local_mode(args: argparse.Namespace) -> bool:
    """Local mode (the service in-process) unless a socket is named, or none is named and a
    service listens on the default socket."""
    if socket_from(getattr(args, "socket", None)) is not None:
        return False
    import os

    if getattr(args, "home", None) or os.environ.get(ENV_HOME):
        return True
    return not DEFAULT_SOCKET.exists()


def open_local(home: Home, *, create: bool = False) -> Any:
    """The service in this process (local mode): unlock the node key, take the home."""
    from appliance.service import Caller, Service
    from keys.passphrase import read_passphrase

    if create and home.is_empty():
        passphrase = read_passphrase(purpose=f"protect the new node key in {home.root}", confirm=True)
        return Service.initialise(home.root, passphrase, Caller.current())
    home.require()
    return Service.open(home.root, read_passphrase(purpose=f"unlock the node key of {home.root}"))


@contextmanager
def connect(args: argparse.Namespace, *, create: bool = False) -> Iterator[Client]:
    """The client for this command: the service's socket, or the service in-process."""
    if local_mode(args):
        client: Client = LocalClient(open_local(home_of(args), create=create))
    else:
        path = socket_from(getattr(args, "socket", None)) or DEFAULT_SOCKET
        if create:
            raise ApplianceError(
                f"this command creates a home, which the service at {path} already has", "run it without --socket, as the service user, with --home DIR"
            )
        client = ServiceClient(path)
    try:
        yield client
    finally:
        client.close()


def emit(args: argparse.Namespace, payload: Any, text: str) -> None:
    """--json: the payload on stdout; else the text."""
    print(json.dumps(payload, indent=2, default=str, ensure_ascii=False) if getattr(args, "json", False) else text)


def read_key_pems(paths: list[str]) -> list[str]:
    """Public keys the caller wants to trust, read here (with the caller's rights) and sent as text."""
    out = []
    for p in paths:
        try:
            out.append(Path(p).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as exc:
            raise ApplianceError(f"cannot read trusted key {p}: {exc}", "pass a public key PEM file you can read") from None
    return out


def note(text: str) -> None:
    print(text, file=sys.stderr)
