"""Keys & approvals: the trust store, the policy in force, and the two-person requests to decide.

Deciding a request is signed here, in the operator's own process, with their user key, as
`appliance approve` does: the console reads the request (``approvals.show``), unlocks the
user key (``$APPLIANCE_USER_KEY`` or ``~/.config/appliance/user.key``) with the passphrase
typed in the decide dialog (`admin_decide`; or ``$APPLIANCE_USER_PASSPHRASE``), signs the
statement for that request and sends it (``approvals.decide``). The service gets the
signature, never the key, and checks it against the root-signed trust store.
"""

from __future__ import annotations

import datetime as dt
import tomllib
from typing import Any, ClassVar

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.content import Content
from textual.message import Message
from textual.widgets import Button, DataTable, Label, Static

from appliance.cli.approvals import describe as describe_request
from appliance.console.admin_decide import DecideScreen, Signing, passphrase_from_env, unlock
from appliance.console.admin_policy import PolicyTextScreen
from appliance.console.base import Gated, Loaded, ServicePane, reveal
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


class Decided(Message):
    """``approvals.decide`` answered: the request as it now stands."""

    def __init__(self, result: dict[str, Any]) -> None:
        super().__init__()
        self.result = result


class AdminPane(ServicePane):
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

    def __init__(self) -> None:
        super().__init__()
        self.listed: dict[str, dict[str, Any]] = {}  # every request in the table, by id (not only pending ones)
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
        self.query_one("#admin-approvals", DataTable).add_columns("request", "action", "subject", "by", "status", "you decide")
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

    def refresh_data(self) -> None:
        calls: dict[str, tuple[str, dict[str, Any]]] = {}
        if self.allowed("approvals.read"):
            # What this console decided left the list: read its state again (used, expired…) too.
            calls.update({f"decided:{rid}": ("approvals.show", {"id": rid}) for rid in self.decided})
            calls["approvals"] = ("approvals.list", {"all": self.show_all})
        if self.allowed("keys.read"):
            calls["keys"] = ("keys.list", {})
        if self.allowed("policy.read"):
            calls["policy"] = ("policy.show", {})
        self.load_many(calls)

    def action_refresh_data(self) -> None:
        self.refresh_data()

    def on_loaded(self, message: Loaded) -> None:
        if message.key.startswith("decided:"):
            self.decided[message.result["id"]] = {**message.result, "you_may_decide": False}
        elif message.key == "approvals":
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
        rows.sort(key=lambda r: not r.get("you_may_decide"))  # what waits for this caller first (stable otherwise)
        self.listed = {r["id"]: r for r in rows}
        table = self.query_one("#admin-approvals", DataTable)
        table.clear()
        for r in rows:
            status = Text(r["status"], style={"pending": "yellow", "approved": "green", "executed": "green", "denied": "red"}.get(r["status"], ""))
            yours = Text("yes", style="bold green") if r.get("you_may_decide") else Text("")
            table.add_row(r["id"], r["action"], Text(short(r["subject"], 14)), Text(r["requester"]["user"]), status, yours, key=r["id"])
        title = "every request" if self.show_all else "your requests and those waiting for you"
        self.query_one("#admin-approvals-title", Label).update(f"Approvals: {title} ({len(rows)})")
        self.query_one("#admin-all", Gated).label = "Mine (v)" if self.show_all else "All (v)"
        target = self.selected if self.selected in self.listed else None
        if target is not None and not self.listed[target].get("you_may_decide") and any(r.get("you_may_decide") for r in rows):
            target = None  # a request now waits for this caller: take them to it, not to one already decided
        if target is None and rows:
            # The first one waiting for this caller, else the newest.
            target = next((r["id"] for r in rows if r.get("you_may_decide")), rows[-1]["id"])
        self._select(target)
        if target is not None:
            table.move_cursor(row=table.get_row_index(target))

    @on(DataTable.RowHighlighted, "#admin-approvals")
    def _highlighted(self, event: DataTable.RowHighlighted) -> None:
        rid = event.row_key.value
        if rid is not None and rid in self.listed and rid != self.selected:
            self._select(rid)

    def _select(self, rid: str | None) -> None:
        self.selected = rid
        if rid is None:
            self.query_one("#admin-request", Static).update("no requests of yours, and none waiting for you")
        else:
            self._request(self.listed[rid])
            self.load("request", "approvals.show", id=rid)  # the request as it stands now
        self._update_decide()

    def _request(self, req: dict[str, Any]) -> None:
        if req.get("id") != self.selected:
            return
        self.listed[req["id"]] = {**self.listed.get(req["id"], {}), **req}
        text = describe_request(req) + (f"\n\n{req['policy_text']}" if req.get("policy_text") else "")
        self.query_one("#admin-request", Static).update(Text(text))
        self._update_decide()

    def _update_decide(self) -> None:
        req = self.listed.get(self.selected) if self.selected else None
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
        req = self.listed.get(self.selected) if self.selected else None
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
        self.listed[r["id"]] = self.decided[r["id"]] = {**self.listed.get(r["id"], {}), **r, "you_may_decide": False}
        self._request(r)
        self.refresh_data()
