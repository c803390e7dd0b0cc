"""Code-completion prompts cut from held-out files, in Spec-Bench's jsonl format.

Each line of a prompt file is {"question_id": int, "category": str, "turns": [str]},
as in Spec-Bench's question.jsonl, so one reader serves our prompts and theirs.

Our prompts come in three kinds, all ending at the end of a source line (no
trailing newline, so the model's first token is the newline-plus-indent that
BPE learned as one piece, not a rarely seen split of it):
  function: a function's decorators, signature and docstring; the body is the completion;
  class:    a class header and its first body lines (its docstring whole);
  test:     a test function's signature and first body lines (its docstring whole).
"""

from __future__ import annotations

import ast
import json
import random
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from easyspec.zoo.corpus import SourceFile

CATEGORIES = ("function", "class", "test")
MAX_PROMPT_CHARS = 1200  # keeps prompt + generation well inside the training context
_CLASS_BODY_LINES = 4
_TEST_BODY_LINES = 2


@dataclass(frozen=True)
class Prompt:
    question_id: int
    category: str
    turns: tuple[str, ...]
    source: str = ""  # where it was cut from ("path:line"); not part of the jsonl format

    def to_json(self) -> str:
        return json.dumps({"question_id": self.question_id, "category": self.category,
                           "turns": list(self.turns)})


def _candidates(file: SourceFile) -> dict[str, list[tuple[str, str]]]:
    """category -> [(source, prompt text)] for one file; unparsable files give none."""
    found: dict[str, list[tuple[str, str]]] = {c: [] for c in CATEGORIES}
    try:
        tree = ast.parse(file.text)
    except (SyntaxError, ValueError):
        return found
    lines = file.text.splitlines()
    for node in ast.walk(tree):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) or not node.body:
            continue
        start = min([node.lineno] + [d.lineno for d in node.decorator_list])  # 1-based
        first = node.body[0]
        has_doc = isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
            and isinstance(first.value.value, str)
        # Never stop inside a docstring: it is always given whole.
        doc_end = first.end_lineno if has_doc else 0
        if isinstance(node, ast.ClassDef):
            category, end = "class", max(doc_end, first.lineno - 1 + _CLASS_BODY_LINES)
        elif node.name.startswith("test"):
            category, end = "test", max(doc_end, first.lineno - 1 + _TEST_BODY_LINES)
        elif has_doc and len(node.body) > 1:
            category, end = "function", doc_end
        else:
            continue
        if end >= node.end_lineno:
            continue  # the whole definition would be in the prompt: nothing left to complete
        # Methods are dedented: no training file starts indented, and every prompt starts a document.
        text = textwrap.dedent("\n".join(lines[start - 1:end])).rstrip()
        if 0 < len(text) <= MAX_PROMPT_CHARS:
            found[category].append((f"{file.path}:{start}", text))
    return found


def make_prompts(val_files: Sequence[SourceFile], n: int, seed: int = 0) -> list[Prompt]:
    """`n` prompts spread evenly over the categories, drawn with a seeded shuffle.

    A category short of candidates leaves its share to the others. Question ids
    run from 1 in category order, then source order.
    """
    pools: dict[str, list[tuple[str, str]]] = {c: [] for c in CATEGORIES}
    for file in sorted(val_files, key=lambda f: f.path):
        for category, items in _candidates(file).items():
            pools[category].extend(items)
    rng = random.Random(seed)
    for category in CATEGORIES:
        rng.shuffle(pools[category])
    chosen: dict[str, list[tuple[str, str]]] = {c: [] for c in CATEGORIES}
    # Round-robin so the categories stay balanced until one runs dry.
    while sum(map(len, chosen.values())) < n and any(pools.values()):
        for category in CATEGORIES:
            if pools[category] and sum(map(len, chosen.values())) < n:
                chosen[category].append(pools[category].pop())
    prompts: list[Prompt] = []
    for category in CATEGORIES:
        for source, text in sorted(chosen[category], key=lambda item: _source_key(item[0])):
            prompts.append(Prompt(len(prompts) + 1, category, (text,), source))
    return prompts


def _source_key(source: str) -> tuple[str, int]:
    path, line = source.rsplit(":", 1)
    return path, int(line)


def write_prompts(prompts: Sequence[Prompt], path: str | Path) -> None:
    Path(path).write_text("".join(p.to_json() + "\n" for p in prompts))


def read_prompts(path: str | Path) -> list[Prompt]:
    """Read any Spec-Bench-format jsonl file; extra keys are ignored, blank lines skipped.

    Raises ValueError naming the file and line number of the first malformed line.
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise ValueError(f"{path}: prompt file not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: cannot be read ({err})") from None
    prompts = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            item = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: invalid JSON ({err.msg})") from None
        if not isinstance(item, dict):
            raise ValueError(f"{where}: expected a JSON object")
        qid, category, turns = item.get("question_id"), item.get("category"), item.get("turns")
        if not isinstance(qid, int) or isinstance(qid, bool):
            raise ValueError(f"{where}: 'question_id' must be an integer")
        if not isinstance(category, str):
            raise ValueError(f"{where}: 'category' must be a string")
        if not isinstance(turns, list) or not turns or not all(isinstance(t, str) for t in turns):
            raise ValueError(f"{where}: 'turns' must be a non-empty list of strings")
        prompts.append(Prompt(qid, category, tuple(turns), where))
    return prompts
