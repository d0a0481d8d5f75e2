"""What the purge screens say, Textual-free so it reads (and is tested) on its own.

The target a row names, the text typed to confirm, the impact's headline and a certificate
field by field, as console markup; and which kinds are data, models, or no target at all.
"""

from __future__ import annotations

from typing import Any

from rich.markup import escape

from appliance.console.session import human_bytes, short

# Kinds that hold the data itself: the service always erases them with their target (its
# ``appliance.service.datakeys.SEALED_KINDS``; a test keeps the two equal). They head the list.
DATA_KINDS = ("raw-documents", "ingest-rejects", "dataset", "dropped-samples", "token-shards", "finetune-examples")
# Recorded but never stored: not a target on their own (a source file is named ``source:PATH``).
NOT_TARGETS = ("source", "base-model-file")
# What a purge keeps but cannot take back: what they learned stays in them.
MODEL_KINDS = ("model", "finetuned-model", "adapter", "checkpoint")
CONFIRM_WORD = "purge"


def target_of(row: dict[str, Any]) -> str:
    """The purge target a row of ``artifact.list`` names: a source as ``source:PATH``, else its digest."""
    return f"source:{row['name']}" if row["kind"] == "source" else str(row["digest"])


def root_digest(impact: dict[str, Any]) -> str | None:
    """The digest an artifact target (a digest or a prefix) names; None for run: and source: targets."""
    target = str(impact["target"]).lower().removeprefix("sha256:")
    if target.startswith(("run:", "source:")):
        return None
    return next((a["digest"] for a in impact["purge"] if a["digest"].startswith(target)), None)


def confirm_text(impact: dict[str, Any]) -> str:
    """What the operator types to confirm: the target's short digest for an artifact, else "purge"."""
    root = root_digest(impact)
    return short(root) if root else CONFIRM_WORD


def how_erased(a: dict[str, Any]) -> str:
    """How the purge erases artifact ``a``: crypto-erase where it is sealed, else overwrite (or nothing stored)."""
    if a.get("sealed"):
        return "crypto-erase"
    return "overwrite only (stored before encryption at rest)" if a.get("stored") else "recorded, not stored"


def short_name(a: dict[str, Any]) -> str:
    """Artifact ``a``'s name without its run: the runs touched are listed once, above the table."""
    # "RUN/dataset" reads as "dataset".
    run = a.get("run_id")
    return str(a["name"]).removeprefix(f"{run}/") if run else str(a["name"])


def impact_summary(impact: dict[str, Any], also: list[str]) -> str:
    """The impact's headline, sources, exports, runs and warnings, as console markup."""
    erased = impact["purge"]
    size = sum(int(a.get("size_bytes") or 0) for a in erased)
    subject = str(impact["subject"])
    said = subject == impact["target"]  # the label names the target already; the subject says more only with also
    lines = [
        f"[b]{escape(impact['label'])}[/b]" + ("" if said else f"  subject [i]{escape(subject)}[/i]"),
        f"[red]erase {len(erased)} artifact(s), {human_bytes(size)}[/red]"
        + (" (crypto-erasable)" if impact.get("crypto_erasable") else " [yellow](not all crypto-erasable)[/yellow]")
        + f"   [yellow]keep {len(impact['keep'])} marked 'derived from purged data'[/yellow]"
        + (f"   also: {'everything derived' if 'all' in also else ', '.join(short(a, 8) for a in also)}" if also else ""),
    ]
    if impact["runs"]:
        lines.append(f"runs touched: {escape(', '.join(impact['runs']))}")
    for s in impact["sources"]:
        where = "in the home: overwritten and unlinked" if s["in_home"] else "outside the home: remove it there yourself"
        lines.append(f"source file {escape(s['path'])} ({short(s['digest'])}): {where}")
    for e in impact["exports"]:
        lines.append(f"[red]exported beyond reach:[/red] {short(e['digest'])} to {escape(str(e['destination']))} at {str(e['ts'])[:19]}")
    lines += [f"[yellow]⚠ {escape(w)}[/yellow]" for w in impact["warnings"]]
    if impact["keep"]:
        lines.append("[dim]here: a on a kept row erases it too; the palette's 'also erase everything derived' is --also all[/dim]")
    if impact.get("two_person"):
        lines.append("[b]two-person rule:[/b] data.purge needs a second person's approval (p: the dialog requests it)")
    return "\n".join(lines)


def certificate_text(r: dict[str, Any]) -> str:
    """A purge's certificate (``purge.run`` or ``purge.show``), field by field, as console markup."""
    c = r["certificate"]
    people, media, san, ver = c["person_performing"], c["media"], c["sanitization"], c["verification"]
    approver = (people.get("approved_by") or {}).get("user") or "nobody (no two-person rule)"
    colour = "green" if ver["result"] == "passed" else "red"
    scan = ver.get("marker_scan")
    scanned = (
        escape(scan)
        if isinstance(scan, str)
        else f"{ver.get('markers', 0)} markers searched in {scan['files']} files ({human_bytes(scan['bytes'])}): found in {len(scan['files_with_markers'])}"
        if isinstance(scan, dict)
        else "no marker scan"
    )
    lines = [
        f"[b]Certificate of sanitization {escape(r['purge_id'])}[/b]  ({escape(c['standard'])})",
        "",
        f"[b]requested by[/b]   {escape(people['requested_by']['user'])}",
        f"[b]approved by[/b]    {escape(str(approver))}" + (f" (request {escape(people['approval_request'])})" if people.get("approval_request") else ""),
        f"[b]what[/b]           {escape(media['description'])}: {len(media['artifacts'])} artifact(s), {human_bytes(media['total_bytes'])}",
        *[f"                 {short(a['digest'])}  {escape(str(a['kind'])):<16} {escape(short_name(a))}" for a in media["artifacts"]],
        f"[b]method[/b]         {escape(san['method_type'])}: {escape(san['technique'])}",
        f"[b]cipher[/b]         {escape(str(san['cipher']))}, keys wrapped with {escape(str(san['key_wrap']))}",
        f"[b]keys destroyed[/b] {len(san['data_keys_destroyed'])}; {san['bytes_overwritten']} bytes overwritten",
        f"[b]tool[/b]           {escape(san['tool'])} {escape(str(san['tool_version']))}; {san['started']} to {san['completed']}",
        f"[b]verification[/b]   [{colour}]{ver['result']}[/{colour}]: {len(ver.get('key_table_entries_left', []))} key table entries left, "
        f"{len(ver.get('keys_in_memory_left', []))} keys in memory, {ver.get('of_which_decryptable', 0)} files still decryptable",
        f"                 {scanned}",
        f"[b]kept, derived[/b]  {len(c['kept_derived_from_purged_data'])} artifact(s) marked 'derived from purged data'",
        f"[b]beyond reach[/b]   {len(c['exports_beyond_reach'])} export(s)",
        f"[b]media[/b]          {escape(c['post_sanitization'])}",
        f"[b]signed by[/b]      node key {escape(r['key_id'])}",
        f"[b]signature[/b]      {escape(short(r['signature'], 48))}…",
    ]
    if r.get("file"):
        lines.append(f"[b]file[/b]           {escape(str(r['file']))}")
    return "\n".join(lines)
