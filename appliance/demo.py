"""The embedded default corpus: the running Python's own standard-library documentation.

Real English technical prose that needs no download: every module's docstrings (read with
``ast``, so no module is imported) and the reference topics pydoc ships. The text differs
between Python versions, so the version and the corpus digest are recorded with the run.
"""

from __future__ import annotations

import ast
import inspect
import json
import os
import shutil
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from keys.digest import sha256_path
from keys.files import publish_dir

# Test suites and IDLE's tests hold fixtures, not prose; site-packages is not the stdlib.
SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__", "lib2to3"}


@dataclass(frozen=True)
class Corpus:
    path: Path
    digest: str
    python: str
    documents: int
    bytes: int


def _module_text(path: Path, module: str) -> str | None:
    try:
        tree = ast.parse(path.read_bytes(), filename=str(path))
    except (SyntaxError, ValueError, UnicodeDecodeError):
        return None
    parts = []
    doc = ast.get_docstring(tree)
    if doc:
        parts.append(f"Module {module}\n\n{inspect.cleandoc(doc)}")
    for node in ast.walk(tree):
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc and not node.name.startswith("_"):
                kind = "class" if isinstance(node, ast.ClassDef) else "function"
                parts.append(f"{module}.{node.name} ({kind})\n\n{inspect.cleandoc(doc)}")
    return "\n\n".join(parts) if parts else None


def _stdlib_modules() -> list[tuple[Path, str]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    found = []
    for dirpath, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.startswith("."))
        for name in sorted(files):
            if name.endswith(".py"):
                path = Path(dirpath) / name
                rel = path.relative_to(root).with_suffix("")
                parts = [p for p in rel.parts if p != "__init__"]
                found.append((path, ".".join(parts)))
    return found


def build_stdlib_corpus(dest: Path, *, max_bytes: int = 0) -> Corpus:
    """Write the corpus into ``dest`` (docstrings.jsonl + topics/*.txt); idempotent.

    ``max_bytes`` > 0 stops early (tests use a small corpus); 0 takes everything.
    """
    dest = Path(dest)
    # The folder appears only by an atomic rename, so its existence means it is complete.
    if not dest.is_dir():
        tmp = dest.with_name(dest.name + ".partial")
        if tmp.exists():
            shutil.rmtree(tmp)
        (tmp / "topics").mkdir(parents=True)
        total = 0
        with open(tmp / "docstrings.jsonl", "w", encoding="utf-8") as f:
            for path, module in _stdlib_modules():
                text = _module_text(path, module)
                if text:
                    line = json.dumps({"module": module, "text": text}, ensure_ascii=False)
                    f.write(line + "\n")
                    total += len(line)
                    if max_bytes and total >= max_bytes:
                        break
        try:
            from pydoc_data.topics import topics
        except ImportError:  # some distributions strip pydoc_data; docstrings alone still work
            topics = {}
        for name in sorted(topics):
            if max_bytes and total >= max_bytes * 1.2:
                break
            safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in name)
            (tmp / "topics" / f"{safe}.txt").write_text(topics[name], encoding="utf-8")
            total += len(topics[name])
        publish_dir(tmp, dest)
    files = [p for p in dest.rglob("*") if p.is_file()]
    docs = sum(1 for _ in open(dest / "docstrings.jsonl", encoding="utf-8")) + len(list((dest / "topics").glob("*.txt")))
    return Corpus(
        path=dest,
        digest=sha256_path(dest),
        python=sys.version.split()[0],
        documents=docs,
        bytes=sum(p.stat().st_size for p in files),
    )


def demo_corpus_folder(where: Path) -> Path:
    """Where the demo corpus of the running Python goes under ``where``."""
    return Path(where) / f"python-{sys.version.split()[0]}-stdlib-docs"


def demo_request(where: Path) -> dict:
    """Build the demo corpus under ``where`` (if not already there) and return the ``run.start``
    parameters for the packaged demo recipe on it: the CLI's `appliance demo` and the console's
    Demo button start the same run, with the corpus's provenance (Python version, digest) as
    the run's context.

    Over the socket the service reads the corpus as the caller could, so ``where`` is a folder
    the caller writes (their working folder); in local mode, the home's corpora folder.
    """
    from appliance.recipe import packaged_recipe

    corpus = build_stdlib_corpus(demo_corpus_folder(where))
    context = {"corpus": {"name": "python-stdlib-docs", "python": corpus.python, "sha256": corpus.digest, "documents": corpus.documents, "bytes": corpus.bytes}}
    return {"recipe": str(packaged_recipe("demo")), "source": str(corpus.path), "context": context}
