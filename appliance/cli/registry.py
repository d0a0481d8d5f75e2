"""`appliance registry list|show|lineage|verify|tag`: models by name, version and tag."""

from __future__ import annotations

import argparse
from collections import Counter
from typing import Any

from appliance.cli.common import connect, emit

# Children of one kind beyond this many are summarised (a model has one source per file).
FOLD_AFTER = 6


def _ref(row: dict[str, Any]) -> str:
    return f"{row['name']}:{row['version']}"


def cmd_registry_list(args: argparse.Namespace) -> int:
    """Every model (or every version of one name): name:version, kind, tags, digest, signer."""
    with connect(args) as client:
        rows = client.call("registry.list", name=args.name)
    lines = [f"{'model':32} {'kind':16} {'tags':20} {'digest':18} {'signer':18} recorded"]
    for r in rows:
        tags = ",".join(r["tags"]) or "-"
        lines.append(f"{_ref(r):32} {r['kind']:16} {tags:20} {r['digest'][:16]}… {str(r['signer'])[:16]}… {r['ts']}")
    emit(args, rows, "\n".join(lines) if rows else "no models recorded yet")
    return 0


def cmd_registry_show(args: argparse.Namespace) -> int:
    """One model: NAME:VERSION, NAME@TAG, NAME (latest) or a digest prefix."""
    with connect(args) as client:
        r = client.call("registry.show", ref=args.model)
    lines = [
        f"{_ref(r)}  ({r['kind']})",
        f"  digest     {r['digest']}",
        f"  run        {r['run_id']}",
        f"  recorded   {r['ts']} by {r['recorded_by']}, signed by node key {r['signer'][:16]}…",
        f"  tags       {', '.join(r['tags']) or '-'}",
        f"  parents    {len(r['parents'])}",
    ]
    for h in r["tag_history"]:
        where = f"→ version {h['version']}" if h["version"] is not None else "removed"
        lines.append(f"  tag move   {h['ts']} {h['actor']}: {h['tag']} {where}")
    emit(args, r, "\n".join(lines))
    return 0


def cmd_registry_tag(args: argparse.Namespace) -> int:
    """Point a tag of the model's name at this version (or --remove it); recorded, under model.promote."""
    with connect(args) as client:
        r = client.call("registry.tag", ref=args.model, tag=args.tag, remove=bool(args.remove))
    was = f" (was version {r['previous_version']})" if r["previous_version"] is not None else ""
    if r.get("unchanged"):
        was = " already; nothing recorded"
    text = f"{r['name']}@{r['tag']} removed{was}" if r["version"] is None else f"{r['name']}@{r['tag']} → version {r['version']}{was}"
    emit(args, r, text)
    return 0


def cmd_registry_verify(args: argparse.Namespace) -> int:
    """Check a model end to end: digest, signature file, ledger record, its signer trusted when it signed, model-signing."""
    with connect(args) as client:
        r = client.call("registry.verify", ref=args.model)
    emit(args, r, f"{_ref(r)} OK ({r['digest'][:16]}…): " + ", ".join(r["checked"]) + f"; signed by {r['signer'][:16]}… ({r['signer_owner']})")
    return 0


def cmd_registry_lineage(args: argparse.Namespace) -> int:
    """A model's lineage as a tree: what it was made from (down to the source files), and what was made from it."""
    with connect(args) as client:
        r = client.call("registry.lineage", ref=args.model)
    emit(args, r, render_lineage(r))
    return 0


def render_lineage(r: dict[str, Any]) -> str:
    """The ancestors as a tree below the model, then its descendants; a node met twice is shown once."""
    nodes, edges, root = r["nodes"], r["edges"], r["model"]["digest"]
    parents: dict[str, list[str]] = {}
    children: dict[str, list[str]] = {}
    for child, parent in edges:
        parents.setdefault(child, []).append(parent)
        children.setdefault(parent, []).append(child)

    def label(d: str) -> str:
        n = nodes.get(d, {"kind": "?", "name": "?"})
        return f"{n['kind']} {n['name']} ({d[:12]}…)"

    out = [f"{_ref(r['model'])}  {label(root)}"]

    def walk(d: str, links: dict[str, list[str]], prefix: str, seen: set[str]) -> None:
        kids = sorted(set(links.get(d, [])), key=lambda k: (nodes.get(k, {}).get("kind", ""), nodes.get(k, {}).get("name", "")))
        per_kind: Counter[str] = Counter()
        shown = []
        for k in kids:
            kind = nodes.get(k, {}).get("kind", "?")
            per_kind[kind] += 1
            if per_kind[kind] <= FOLD_AFTER:
                shown.append(k)
        folded = {kind: n - FOLD_AFTER for kind, n in per_kind.items() if n > FOLD_AFTER}
        entries: list[tuple[str, str | None]] = [(label(k), k) for k in shown] + [(f"… and {n} more {kind}", None) for kind, n in folded.items()]
        for i, (text, k) in enumerate(entries):
            last = i == len(entries) - 1
            again = k is not None and k in seen
            out.append(f"{prefix}{'└── ' if last else '├── '}{text}{' (above)' if again else ''}")
            if k is not None and not again:
                seen.add(k)
                walk(k, links, prefix + ("    " if last else "│   "), seen)

    out.append("made from:")
    walk(root, parents, "", {root})
    if children.get(root):
        out.append("used by:")
        walk(root, children, "", {root})
    return "\n".join(out)


def register(sub: Any, add: Any) -> None:
    reg = sub.add_parser("registry", help="models by name, version and tag; lineage; verification").add_subparsers(
        dest="registry_command", required=True, metavar="COMMAND"
    )
    p = add("list", cmd_registry_list, reg)
    p.add_argument("--name", help="only the versions of this name")
    for name, fn in (("show", cmd_registry_show), ("lineage", cmd_registry_lineage), ("verify", cmd_registry_verify)):
        p = add(name, fn, reg)
        p.add_argument("model", help="NAME:VERSION, NAME@TAG, NAME (its latest version) or a digest prefix")
    p = add("tag", cmd_registry_tag, reg)
    p.add_argument("model", help="NAME:VERSION, NAME@TAG, NAME or a digest prefix")
    p.add_argument("tag", help="e.g. production, candidate")
    p.add_argument("--remove", action="store_true", help="remove the tag from the name instead")
