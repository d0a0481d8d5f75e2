"""Keys & approvals: the trust store, the policy in force, and the two-person requests to decide.

Deciding a request is signed here, in the operator's own process, with their user key, as
`appliance approve` does: the console reads the request (``approvals.show``), unlocks the
user key (``$APPLIANCE_USER_KEY`` or ``~/.config/appliance/user.key``) with the passphrase
typed in a modal (or ``$APPLIANCE_USER_PASSPHRASE``), signs the statement for that request
and sends it (``approvals.decide``). The service gets the signature, never the key, and
checks it against the root-signed trust store.
"""

from __future__ import annotations

import datetime as dt
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from rich.text import Text
from textual import events, on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.content import Content
from textual.message import Message
from textual.screen import ModalScreen
from textual.widgets import Button, DataTable, Input, Label, Static, TextArea

from appliance.cli.approvals import describe as describe_request
from appliance.console.base import Gated, Loaded, ServicePane
from appliance.console.ledger import keep_focus_out_while_hidden, reveal
from appliance.console.session import Grants, short

DECIDE = "approvals.decide"
# Seeing every request (not only one's own and those one may decide) is reading the ledger.
SEE_ALL = "ledger.query"


def decide_block(grants: Grants, req: dict[str, Any] | None) -> str:
    """Why the caller may not decide ``req`` ("" when they may): the service's own rules, told before it refuses."""
    if not grants.allows(DECIDE):
        return grants.reason(DECIDE)
    if req is None:
        return "select a request to decide"
    approvers = " or ".join(req.get("approvers") or []) or "an approver"
    if req["requester"]["user"] == grants.user:
        return f"you made request {req['id']}: nobody approves their own request; ask another holder of {approvers}"
    if req["status"] != "pending":
        return f"request {req['id']} is {req['status']}: only a pending request is decided"
    if req["permission"] not in grants.may_approve:
        held = ", ".join(grants.roles) or "no role"
        return f"{req['permission']} is approved by {approvers}; {grants.user} holds {held}"
    return ""


def two_person_rules(policy_text: str) -> dict[str, list[str]]:
    """Permission -> approver roles, from the signed policy's text (policy.show sends it)."""
    try:
        rules = tomllib.loads(policy_text).get("two_person", [])
    except tomllib.TOMLDecodeError:
        return {}
    return {str(r.get("permission")): [str(a) for a in r.get("approvers", [])] for r in rules if isinstance(r, dict)}


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

    DEFAULT_CSS = """
    DecideScreen { align: center middle; }
    DecideScreen #decide-box { width: 84; height: auto; border: round $accent; background: $panel; padding: 1 2; }
    DecideScreen #decide-what { margin-bottom: 1; }
    DecideScreen .field { color: $text-muted; }
    DecideScreen #decide-buttons { height: auto; margin-top: 1; }
    DecideScreen #decide-buttons Button { margin-right: 2; }
    """
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


class PolicyTextScreen(ModalScreen[None]):
    """The signed policy file itself, to read every rule (two-person rules, descriptions)."""

    DEFAULT_CSS = """
    PolicyTextScreen { align: center middle; }
    PolicyTextScreen #policy-text { width: 100; height: 90%; border: round $accent; }
    """
    BINDINGS: ClassVar[list[Binding | tuple[str, str] | tuple[str, str, str]]] = [
        Binding("escape,q", "dismiss", "Close", id="policy-text.close"),
    ]

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def compose(self) -> ComposeResult:
        yield TextArea(self.text, language="toml", read_only=True, id="policy-text")


class Decided(Message):
    """``approvals.decide`` answered: the request as it now stands."""

    def __init__(self, result: dict[str, Any]) -> None:
        super().__init__()
        self.result = result


class AdminPane(ServicePane):
    DEFAULT_CSS = """
    AdminPane #admin-keys-box { height: auto; max-height: 11; }
    AdminPane #admin-keys { height: auto; max-height: 6; }
    AdminPane #admin-middle { height: 1fr; }
    AdminPane #admin-approvals-box { width: 1fr; height: 100%; }
    AdminPane #admin-approvals { height: 1fr; }
    AdminPane #admin-actions { height: auto; }
    AdminPane #admin-actions Button { margin-right: 1; min-width: 14; }
    AdminPane #admin-request-box { width: 42; height: 100%; }
    AdminPane #admin-request-scroll { height: 1fr; }
    AdminPane #admin-decide-reason { color: $warning; width: 1fr; }
    AdminPane #admin-bottom { height: 1fr; }
    AdminPane #admin-policy-box { width: 80; height: 100%; }
    AdminPane #admin-policy { height: 1fr; }
    AdminPane #admin-bindings-box { width: 1fr; height: 100%; }
    AdminPane #admin-bindings-scroll { height: 1fr; }
    AdminPane .denied { color: $warning; }
    AdminPane .muted { color: $text-muted; }
    """

    BINDINGS: ClassVar[list[Binding | tuple[str, str] | tuple[str, str, str]]] = [
        Binding("a", "decide('approve')", "Approve", id="admin.approve"),
        Binding("d", "decide('deny')", "Deny", id="admin.deny"),
        Binding("v", "toggle_all", "All requests", id="admin.all"),
        Binding("p", "policy_text", "Policy file", id="admin.policy"),
        Binding("r", "refresh_data", "Refresh", id="admin.refresh"),
    ]
    PALETTE: ClassVar[list[tuple[str, str, str]]] = [
        ("Approvals: approve the selected request", "sign an approval with your user key (a)", "palette_approve"),
        ("Approvals: deny the selected request", "sign a denial with your user key (d)", "palette_deny"),
        ("Approvals: every request / mine and pending", "switch what the approvals table lists (v)", "palette_toggle_all"),
        ("Policy: read the signed policy file", "the policy in force, every rule (p)", "palette_policy_text"),
        ("Keys & approvals: refresh", "reload keys, policy and requests (r)", "palette_refresh"),
    ]

    show_all = False
    _shown = False

    def __init__(self) -> None:
        super().__init__()
        self.requests: dict[str, dict[str, Any]] = {}
        self.decided: dict[str, dict[str, Any]] = {}  # decided in this console
        self.selected: str | None = None
        self.policy: dict[str, Any] = {}

    def compose(self) -> ComposeResult:
        # Requests first: the app focuses a pane's first focusable widget, the one to decide from.
        with Horizontal(id="admin-middle"):
            with Vertical(id="admin-approvals-box", classes="card"):
                yield Label("Approvals: your requests and those waiting for you", classes="title", id="admin-approvals-title")
                yield DataTable(id="admin-approvals", zebra_stripes=True, cursor_type="row")
                with Horizontal(id="admin-actions"):
                    yield Gated("Approve (a)", DECIDE, id="admin-approve", variant="success")
                    yield Gated("Deny (d)", DECIDE, id="admin-deny", variant="error")
                    yield Gated("All (v)", SEE_ALL, id="admin-all")
                    yield Label("", id="admin-decide-reason")
            with Vertical(id="admin-request-box", classes="card"):
                yield Label("Request", classes="title")
                with VerticalScroll(id="admin-request-scroll"):
                    yield Static("no request selected", id="admin-request")
        with Vertical(id="admin-keys-box", classes="card"):
            yield Label("Keys", classes="title", id="admin-keys-title")
            yield Label("", id="admin-keys-reason", classes="denied")
            yield Label("", id="admin-keys-anchor", classes="muted")
            yield DataTable(id="admin-keys", zebra_stripes=True, cursor_type="row")
        with Horizontal(id="admin-bottom"):
            with Vertical(id="admin-policy-box", classes="card"):
                yield Label("Policy", classes="title", id="admin-policy-title")
                yield Label("", id="admin-policy-reason", classes="denied")
                yield DataTable(id="admin-policy", zebra_stripes=True, header_height=2, fixed_columns=1, cursor_type="row")
            with Vertical(id="admin-bindings-box", classes="card"):
                yield Label("Bindings and two-person rules", classes="title")
                with VerticalScroll(id="admin-bindings-scroll"):
                    yield Static("", id="admin-bindings")

    def on_mount(self) -> None:
        self.query_one("#admin-keys", DataTable).add_columns("role", "status", "key id", "owner", "valid from", "valid until", "note")
        self.query_one("#admin-approvals", DataTable).add_columns("request", "action", "subject", "by", "status", "yours")
        for perm, label, hide in (("keys.read", "#admin-keys-reason", "#admin-keys"), ("policy.read", "#admin-policy-reason", "#admin-policy")):
            reason = self.session.grants.reason(perm)
            self.query_one(label, Label).update(Content(reason))
            self.query_one(label, Label).display = bool(reason)
            if reason:  # the card stays, saying why it is empty
                self.query_one(hide).display = False
        if not self.allowed("keys.read"):
            self.query_one("#admin-keys-anchor", Label).display = False
        if not self.allowed("policy.read"):
            self.query_one("#admin-bindings", Static).update(Content(self.session.grants.reason("policy.read")))
        self._update_decide()

    def on_show(self) -> None:
        # Load on first sight.
        if not self._shown:
            self._shown = True
            self.refresh_data()

    def on_descendant_focus(self, event: events.DescendantFocus) -> None:
        keep_focus_out_while_hidden(self, event)

    def refresh_data(self) -> None:
        calls: dict[str, tuple[str, dict[str, Any]]] = {}
        if self.allowed("approvals.read"):
            calls["approvals"] = ("approvals.list", {"all": self.show_all})
        if self.allowed("keys.read"):
            calls["keys"] = ("keys.list", {})
        if self.allowed("policy.read"):
            calls["policy"] = ("policy.show", {})
        self.load_many(calls)

    def action_refresh_data(self) -> None:
        self.refresh_data()

    def on_loaded(self, message: Loaded) -> None:
        if message.key == "approvals":
            self._approvals(message.result)
        elif message.key == "keys":
            self._keys(message.result)
        elif message.key == "policy":
            self._policy(message.result)
        elif message.key == "request":
            self._request(message.result)

    # -- keys and policy --------------------------------------------------------------------

    def _keys(self, result: dict[str, Any]) -> None:
        self.query_one("#admin-keys-title", Label).update(
            f"Keys: trust store v{result.get('version')}, issued {str(result.get('issued_at', ''))[:19]}, signed by the root key"
        )
        self.query_one("#admin-keys-anchor", Label).update(Content(f"root key anchor: {result.get('anchor', '?')}"))
        table = self.query_one("#admin-keys", DataTable)
        table.clear()
        for k in result.get("keys", []):
            note = "this node" if k["key_id"] == result.get("node_key_id") else "root of trust" if k["key_id"] == result.get("root_key_id") else ""
            if k.get("revoked_reason"):
                note = f"revoked: {k['revoked_reason']}"
            status = Text(k["status"], style="green" if k["status"] == "valid" else "red")
            table.add_row(
                k["role"],
                status,
                f"{short(k['key_id'], 16)}…",
                Text(k["owner"]),
                str(k["not_before"])[:19],
                str(k.get("not_after") or "—")[:19],
                Text(note),
                key=k["key_id"],
            )

    def _policy(self, result: dict[str, Any]) -> None:
        self.policy = result
        rules = two_person_rules(result.get("text", ""))
        you = ", ".join(r for r in result.get("your_roles", []) if r != "everyone") or "no role"
        self.query_one("#admin-policy-title", Label).update(
            f"Policy {result['name']} v{result['version']}  sha256 {short(result['digest'], 16)}…  you: {you}  (p: the file)"
        )
        table = self.query_one("#admin-policy", DataTable)
        table.clear(columns=True)
        roles = [role for role, _ in result["table"]]
        table.add_column("permission")
        for role in roles:
            table.add_column(Text(role.replace("-", "-\n", 1)), key=role)
        granted = {role: set(perms) for role, perms in result["table"]}
        for perm in sorted({p for perms in granted.values() for p in perms} | set(rules)):
            label = Text(perm) + (Text(" 2p", style="bold yellow") if perm in rules else Text(""))
            table.add_row(label, *[Text("✓", style="green") if perm in granted[r] else Text("·", style="dim") for r in roles], key=perm)
        lines = [Text("users", style="bold")]
        lines += [Text(f"  {u:<10} {', '.join(r)}") for u, r in sorted(result.get("users", {}).items())]
        if result.get("groups"):
            lines.append(Text("groups", style="bold"))
            lines += [Text(f"  {g:<10} {', '.join(r)}") for g, r in sorted(result["groups"].items())]
        lines.append(Text("two-person (2p) ← approvers", style="bold"))
        lines += [Text(f"  {p} ← {', '.join(a)}") for p, a in sorted(rules.items())] or [Text("  none")]
        self.query_one("#admin-bindings", Static).update(Text("\n").join(lines))

    def action_policy_text(self) -> None:
        reason = self.session.grants.reason("policy.read")
        if reason:
            self.console.report_message(f"the policy is not yours to read: {reason}", "ask an admin for the role it names")
            return
        if not self.policy:
            self.console.report_message("the policy has not loaded yet", "wait a moment, or press r to reload")
            return
        self.app.push_screen(PolicyTextScreen(self.policy.get("text", "")))

    # -- approvals ----------------------------------------------------------------------------

    def _approvals(self, rows: list[dict[str, Any]]) -> None:
        # A request decided here leaves the caller's list (it is neither theirs nor waiting):
        # keep it in sight, with its new status, until the console closes.
        listed = {r["id"] for r in rows}
        rows = rows + [r for rid, r in self.decided.items() if rid not in listed]
        self.requests = {r["id"]: r for r in rows}
        table = self.query_one("#admin-approvals", DataTable)
        table.clear()
        for r in rows:
            status = Text(r["status"], style={"pending": "yellow", "approved": "green", "executed": "green", "denied": "red"}.get(r["status"], ""))
            yours = Text("yes", style="bold green") if r.get("you_may_decide") else Text("")
            table.add_row(r["id"], r["action"], Text(short(r["subject"], 14)), Text(r["requester"]["user"]), status, yours, key=r["id"])
        title = "every request" if self.show_all else "your requests and those waiting for you"
        self.query_one("#admin-approvals-title", Label).update(f"Approvals: {title} ({len(rows)})")
        self.query_one("#admin-all", Gated).label = "Mine (v)" if self.show_all else "All (v)"
        target = self.selected if self.selected in self.requests else None
        if target is None and rows:
            # The first one waiting for this caller, else the newest.
            target = next((r["id"] for r in rows if r.get("you_may_decide")), rows[-1]["id"])
        self._select(target)
        if target is not None:
            table.move_cursor(row=table.get_row_index(target))

    @on(DataTable.RowHighlighted, "#admin-approvals")
    def _highlighted(self, event: DataTable.RowHighlighted) -> None:
        rid = event.row_key.value
        if rid is not None and rid in self.requests and rid != self.selected:
            self._select(rid)

    def _select(self, rid: str | None) -> None:
        self.selected = rid
        if rid is None:
            self.query_one("#admin-request", Static).update("no requests of yours, and none waiting for you")
        else:
            self._request(self.requests[rid])
            self.load("request", "approvals.show", id=rid)  # the request as it stands now
        self._update_decide()

    def _request(self, req: dict[str, Any]) -> None:
        if req.get("id") != self.selected:
            return
        self.requests[req["id"]] = {**self.requests.get(req["id"], {}), **req}
        text = describe_request(req) + (f"\n\n{req['policy_text']}" if req.get("policy_text") else "")
        self.query_one("#admin-request", Static).update(Text(text))
        self._update_decide()

    def _update_decide(self) -> None:
        req = self.requests.get(self.selected) if self.selected else None
        reason = decide_block(self.session.grants, req)
        for button_id in ("#admin-approve", "#admin-deny"):
            button = self.query_one(button_id, Gated)
            button.disabled = bool(reason)
            button.tooltip = reason or None
        self.query_one("#admin-decide-reason", Label).update(Content(reason))

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        needs = {"decide": DECIDE, "toggle_all": SEE_ALL, "policy_text": "policy.read"}.get(action)
        if needs is not None and not self.allowed(needs):
            return None  # dimmed in the footer; the reason is shown beside the control
        return True

    # The palette calls these (from any tab: they show this one).
    def palette_approve(self) -> None:
        reveal(self)
        self.action_decide("approve")

    def palette_deny(self) -> None:
        reveal(self)
        self.action_decide("deny")

    def palette_toggle_all(self) -> None:
        reveal(self)
        self.action_toggle_all()

    def palette_policy_text(self) -> None:
        self.action_policy_text()

    def palette_refresh(self) -> None:
        reveal(self)
        self.refresh_data()

    def action_decide(self, decision: str) -> None:
        req = self.requests.get(self.selected) if self.selected else None
        reason = decide_block(self.session.grants, req)
        if reason or req is None:
            self.console.report_message(f"cannot {decision}: {reason}", "select a pending request that is not yours and that your role approves")
            return
        self.app.push_screen(
            DecideScreen(req, decision, ask_passphrase=not passphrase_from_env()),
            lambda signing: self._signed(req["id"], decision, signing),
        )

    @on(Button.Pressed, "#admin-approve")
    def _approve_pressed(self) -> None:
        self.action_decide("approve")

    @on(Button.Pressed, "#admin-deny")
    def _deny_pressed(self) -> None:
        self.action_decide("deny")

    @on(Button.Pressed, "#admin-all")
    def _all_pressed(self) -> None:
        self.action_toggle_all()

    def action_toggle_all(self) -> None:
        reason = self.session.grants.reason(SEE_ALL)
        if reason:
            self.console.report_message(f"listing every request needs {SEE_ALL}: {reason}", "your own requests and those you may decide are listed")
            return
        self.show_all = not self.show_all
        self.refresh_data()

    def _signed(self, rid: str, decision: str, signing: Signing | None) -> None:
        if signing is None:
            return
        self.query_one("#admin-decide-reason", Label).update(f"unlocking your user key and signing the {decision}…")
        self._decide(rid, decision, signing)

    @work(thread=True, exclusive=True, exit_on_error=False, group="admin-decide")
    def _decide(self, rid: str, decision: str, signing: Signing) -> None:
        from keys.approval import sign_statement, statement

        try:
            # The request as the service holds it now: the statement binds its every field.
            req = self.session.call("approvals.show", id=rid)
            key = unlock(signing)
            body = statement(req, decision=decision, approver=self.session.grants.user, key_id=key.key_id, signed_at=dt.datetime.now(dt.UTC).isoformat())
            result = self.session.call("approvals.decide", id=rid, statement=body, signature=sign_statement(body, key))
        except Exception as exc:  # every error goes to the one handler, with its fix
            self.console.call_from_thread(self.console.report, exc)
            self.console.call_from_thread(self._update_decide)
            return
        self.post_message(Decided(result))

    def on_decided(self, message: Decided) -> None:
        r = message.result
        outcome = r.get("outcome")
        if outcome:
            text = f"carried out: policy v{outcome.get('version')} in force" if outcome.get("executed") else f"approved, but it failed: {outcome.get('error')}"
        elif r["status"] == "approved":
            text = f"{r['requester']['user']} may now use it: {r.get('use')}"
        else:
            text = f"{r['requester']['user']} is told it was {r['status']}"
        self.app.notify(f"request {r['id']} {r['status']}\n{text}", title="decided")
        self.requests[r["id"]] = self.decided[r["id"]] = {**self.requests.get(r["id"], {}), **r, "you_may_decide": False}
        self._request(r)
        self.refresh_data()
