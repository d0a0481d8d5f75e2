"""Deciding a two-person request: the dialog that shows what is signed, and the user key that signs it.

The decision is signed here, in the operator's own process, as `appliance approve` does: the
dialog asks for the user key's passphrase (unless ``$APPLIANCE_USER_PASSPHRASE`` gives it),
and `unlock` opens the key in a worker. The service gets the signature, never the key.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, Static

from appliance.cli.approvals import describe as describe_request


def passphrase_from_env() -> bool:
    """Whether the user key's passphrase comes from the environment (no need to type it)."""
    from keys.userkey import ENV_USER_PASSPHRASE, ENV_USER_PASSPHRASE_FILE

    return bool(os.environ.get(ENV_USER_PASSPHRASE) or os.environ.get(ENV_USER_PASSPHRASE_FILE))


@dataclass(frozen=True)
class Signing:
    """What the decide dialog returns: the user key to sign with, and its passphrase (None: from the environment)."""

    key_path: Path
    passphrase: bytes | None


def unlock(signing: Signing) -> Any:
    """The caller's user key, unlocked (in a worker: Argon2id takes a moment)."""
    from keys.errors import KeyStoreError
    from keys.keystore import load_key
    from keys.userkey import ENV_USER_PASSPHRASE, load_user_key

    if signing.passphrase is None:
        return load_user_key(signing.key_path)
    if not signing.key_path.exists():
        load_user_key(signing.key_path)  # raises the one "no user key at …" error, with how to make one
    try:
        return load_key(signing.key_path, signing.passphrase)
    except KeyStoreError as exc:
        if "wrong passphrase" not in exc.message:
            raise
        raise KeyStoreError(exc.message, f"decide again and type the passphrase you chose at `appliance keys create` (or set {ENV_USER_PASSPHRASE})") from None


class DecideScreen(ModalScreen[Signing | None]):
    """Shows exactly what the decision signs, and asks for the user key's passphrase."""

    BINDINGS: ClassVar[list[Binding | tuple[str, str] | tuple[str, str, str]]] = [
        Binding("escape", "cancel", "Cancel", id="decide.cancel"),
    ]

    def __init__(self, req: dict[str, Any], decision: str, *, ask_passphrase: bool) -> None:
        super().__init__()
        self.req, self.decision, self.ask_passphrase = req, decision, ask_passphrase

    def compose(self) -> ComposeResult:
        from keys.userkey import ENV_USER_PASSPHRASE, default_user_key_path

        verb = "Approve" if self.decision == "approve" else "Deny"
        with Vertical(id="decide-box"):
            yield Label(f"{verb} request {self.req['id']}, signed with your user key", classes="title")
            yield Static(Text(describe_request(self.req)), id="decide-what")
            yield Label("your user key", classes="field")
            yield Input(str(default_user_key_path()), id="decide-key")
            if self.ask_passphrase:
                yield Label("its passphrase", classes="field")
                yield Input(password=True, placeholder="passphrase of your user key", id="decide-passphrase")
            else:
                yield Label(f"passphrase: from ${ENV_USER_PASSPHRASE}", classes="field")
            with Horizontal(id="decide-buttons"):
                yield Button(f"{verb} (enter)", id="decide-ok", variant="success" if self.decision == "approve" else "error")
                yield Button("Cancel (esc)", id="decide-cancel")

    def on_mount(self) -> None:
        self.query_one("#decide-passphrase" if self.ask_passphrase else "#decide-ok").focus()

    @on(Input.Submitted)
    @on(Button.Pressed, "#decide-ok")
    def _ok(self) -> None:
        path = Path(self.query_one("#decide-key", Input).value.strip()).expanduser()
        passphrase: bytes | None = None
        if self.ask_passphrase:
            box = self.query_one("#decide-passphrase", Input)
            passphrase = box.value.encode("utf-8")
            box.value = ""  # not kept on screen longer than it takes to read it
            if not passphrase:
                self.app.notify("type the passphrase of your user key, or press esc", severity="warning")
                box.focus()
                return
        self.dismiss(Signing(path, passphrase))

    @on(Button.Pressed, "#decide-cancel")
    def action_cancel(self) -> None:
        self.dismiss(None)
