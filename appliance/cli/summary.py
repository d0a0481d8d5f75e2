"""The end-of-run summary: figures a person checks, and the commands that prove them."""

from __future__ import annotations

from typing import Any


def _n(value: Any) -> str:
    if not isinstance(value, (int, float)):
        return str(value)
    for unit, size in (("M", 1e6), ("k", 1e3)):
        if abs(value) >= size:
            return f"{value / size:.2f}{unit}"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def render_summary(summary: dict[str, Any], *, local: bool) -> tuple[dict[str, Any], str]:
    """(JSON payload, text) for a finished run; ``local``: name --home in the commands shown."""
    s = summary["stats"]
    if "finetune" in s:
        return _finetune_summary(summary, local=local)
    context = summary.get("context") or {}
    clean, shard, train, ev = s.get("curate", {}), s.get("shard", {}), s.get("train", {}), s.get("evaluate", {})
    tokens = shard.get("train_tokens", 0) + shard.get("val_tokens", 0)
    payload = {
        "run_id": summary["run_id"],
        "recipe": summary["recipe_name"],
        "recipe_sha256": summary["recipe_digest"],
        "wall_s": round(summary["wall_s"], 2),
        "documents_in": clean.get("documents_in"),
        "documents": clean.get("documents_out"),
        "tokens": tokens,
        "train_steps": train.get("steps"),
        "final_loss": train.get("final_loss"),
        "tokens_per_s": train.get("tokens_per_s"),
        "val_loss": ev.get("val_loss"),
        "perplexity": ev.get("perplexity"),
        "samples": ev.get("samples", []),
        "artifacts_recorded": summary["artifacts_recorded"],
        "provenance_s": round(summary.get("provenance_s", 0.0), 3),
        "model_id": f"sha256:{summary['model_digest']}",
        "model_path": str(summary["model_path"]),
        "public_key": str(summary["public_key_file"]),
        "context": context,
    }
    h = f" --home {summary['home']}" if local else ""
    lines = [
        f"run {summary['run_id']} ({summary['recipe_name']}) succeeded in {summary['wall_s']:.0f} s",
        f"  documents   {clean.get('documents_in')} in, {clean.get('documents_out')} kept ({_drops(clean)})",
        f"  tokens      {_n(tokens)} (train {_n(shard.get('train_tokens', 0))}, val {_n(shard.get('val_tokens', 0))})",
        f"  training    {train.get('steps')} steps, final loss {_n(train.get('final_loss'))}, {_n(train.get('tokens_per_s'))} tokens/s",
        f"  evaluation  val loss {_n(ev.get('val_loss'))}, perplexity {_n(ev.get('perplexity'))}",
        f"  provenance  {summary['artifacts_recorded']} artifacts recorded in {summary['ledger_file']}",
        f"              hashing, signing and recording took {summary.get('provenance_s', 0.0):.1f} s, {_share(summary)} of the run",
    ]
    for sample in ev.get("samples", [])[:2]:
        text = " ".join((sample["prompt"] + sample["completion"]).split())
        lines.append(f"  sample      {text[:100]!r}")
    if "corpus" in context:
        c = context["corpus"]
        lines.append(f"  corpus      Python {c['python']} stdlib docs, sha256 {c['sha256'][:16]}…")
    lines += ["", f"model id: sha256:{summary['model_digest']}", "", *_verify_lines(summary, h)]
    lines += [
        f"  appliance{h} data card {summary['run_id']}",
        f"  appliance{h} request model.export {summary['model_digest'][:16]}   # export is two-person: once approved, model export --approval ID",
    ]
    return payload, "\n".join(lines)


def _share(summary: dict[str, Any]) -> str:
    wall = summary.get("wall_s") or 0.0
    return f"{100 * summary.get('provenance_s', 0.0) / wall:.1f} %" if wall else "n/a"


def _drops(curate: dict[str, Any]) -> str:
    """The three rules that dropped most, e.g. "dedup.near 120, c4.curly_bracket 80, …"."""
    dropped = sorted(curate.get("dropped", {}).items(), key=lambda kv: (-kv[1], kv[0]))
    text = ", ".join(f"{name} {count}" for name, count in dropped[:3])
    return ("dropped: " + text + (", …" if len(dropped) > 3 else "")) if text else "nothing dropped"


def _scores(scores: dict[str, Any] | None) -> str:
    if not scores:
        return "n/a"
    return f"exact {scores.get('exact_match', 0):.2f}, BLEU {scores.get('bleu', 0):.1f}, chrF {scores.get('chrf', 0):.1f}"


def _finetune_summary(summary: dict[str, Any], *, local: bool) -> tuple[dict[str, Any], str]:
    s = summary["stats"]
    base, ex, ft, ev, pkg = (s.get(k, {}) for k in ("base", "examples", "finetune", "ft_evaluate", "ft_package"))
    payload = {
        "run_id": summary["run_id"],
        "recipe": summary["recipe_name"],
        "recipe_sha256": summary["recipe_digest"],
        "wall_s": round(summary["wall_s"], 2),
        "base": base,
        "examples": ex,
        "finetune": ft,
        "evaluation": ev,
        "packaged": pkg.get("packaged", False),
        "model_id": f"sha256:{summary['model_digest']}",
        "model_path": str(summary["model_path"]),
    }
    h = f" --home {summary['home']}" if local else ""
    what = "packaged" if pkg.get("packaged") else "NOT promoted (not packaged): " + "; ".join(ev.get("reasons", []))
    lines = [
        f"run {summary['run_id']} ({summary['recipe_name']}) finished in {summary['wall_s']:.0f} s: {what}",
        f"  base        {base.get('model_type')} {_n(base.get('parameters'))} parameters, {base.get('files')} files recorded, {base.get('verification')}"
        + (f" by {str(base.get('signer'))[:16]}…" if base.get("signer") else ""),
        f"  examples    {ex.get('train_examples')} train, {ex.get('val_examples')} val, {ex.get('skipped', 0)} skipped",
        f"  fine-tune   {ft.get('method')}: {ft.get('steps')} steps, final loss {_n(ft.get('final_loss'))}, {_n(ft.get('tokens_per_s'))} tokens/s",
        f"  evaluation  val loss {_n(ev.get('val_loss'))}, perplexity {_n(ev.get('perplexity'))}",
    ]
    if ev.get("tuned_scores"):
        lines.append(f"  tasks       base  {_scores(ev.get('base_scores'))}")
        lines.append(f"              tuned {_scores(ev.get('tuned_scores'))}")
    for sample in ev.get("samples", [])[:3]:
        lines += [
            f"  prompt      {sample['prompt'][:90]}",
            f"    reference {sample['reference'][:90]!r}",
            f"    base      {' '.join(sample['base'].split())[:90]!r}",
            f"    tuned     {' '.join(sample['tuned'].split())[:90]!r}",
        ]
    lines += ["", f"{'model' if pkg.get('packaged') else 'adapter'} id: sha256:{summary['model_digest']}", "", *_verify_lines(summary, h)]
    return payload, "\n".join(lines)


def _verify_lines(summary: dict[str, Any], h: str) -> list[str]:
    """The commands that prove a run's model: the ledger, the stored copy, its signature, its lineage."""
    mp, digest = summary["model_path"], summary["model_digest"]
    return [
        "verify it:",
        f"  appliance{h} ledger verify",
        f"  appliance{h} artifact verify {digest[:16]}",
        f"  model_signing verify key {mp} --signature {mp}/model.sig --public_key {summary['public_key_file']}",
        f"  appliance{h} ledger query \"SELECT kind, name, depth FROM ancestors('{digest}') ORDER BY depth\"",
    ]
