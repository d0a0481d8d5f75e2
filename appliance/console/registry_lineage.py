"""A model's lineage as a tree (Registry tab): what it was made from, and what was made from it."""

from __future__ import annotations

from typing import Any

from textual.widgets import Tree
from textual.widgets.tree import TreeNode

from appliance.console.session import short


def fill_lineage(tree: Tree[str], result: dict[str, Any]) -> None:
    """The model at the root, its ancestors and descendants below; each artifact shown whole once, at its
    shallowest place (breadth first), and only named again elsewhere (a lineage is a graph, not a tree)."""
    model, nodes = result["model"], result["nodes"]
    parents: dict[str, list[str]] = {}
    children: dict[str, list[str]] = {}
    for child, parent in result["edges"]:
        parents.setdefault(child, []).append(parent)
        children.setdefault(parent, []).append(child)

    run = f"{model.get('run_id')}/"

    def label(digest: str) -> str:
        # The model's own run is implied: "checkpoint 75ba2638", not "checkpoint run-…/checkpoint 75ba2638".
        node = nodes.get(digest, {})
        kind, name = node.get("kind", "?"), str(node.get("name", ""))
        name = name.removeprefix(run) if name.startswith(run) else name
        return f"{kind}  {short(digest, 8)}" if name in (kind, "") or name == kind.split("-")[0] else f"{kind}  {name}  {short(digest, 8)}"

    def order(digest: str) -> tuple[str, str]:
        return (nodes.get(digest, {}).get("kind", ""), nodes.get(digest, {}).get("name", ""))

    tree.reset(f"{model['name']}:{model['version']}  {model['kind']}  {short(model['digest'])}", model["digest"])
    for title, links in (("ancestors: what it was made from", parents), ("descendants: what was made from it", children)):
        branch = tree.root.add(title, expand=True)
        seen = {model["digest"]}
        queue: list[tuple[TreeNode[str], str]] = [(branch, model["digest"])]
        while queue:
            node, digest = queue.pop(0)
            for d in sorted(links.get(digest, []), key=order):
                if d in seen:
                    node.add_leaf(f"{label(d)}  [dim](again)[/]", d)
                    continue
                seen.add(d)
                if links.get(d):
                    queue.append((node.add(label(d), d, expand=True), d))
                else:
                    node.add_leaf(label(d), d)
        if not branch.children:
            branch.add_leaf("none")
    tree.root.expand()
