"""`python -m easyspec.bench.compare REFERENCE OTHER`: two bench runs on the same prompts, row by row.

Made for an inflated pair (easyspec.zoo.inflate) against the pair it was inflated from: the
same function at another shape must give the same greedy outputs (exactly, in float32) and
the same acceptance (within bfloat16 noise). Rows are matched by label; for each it prints how
many prompts' outputs are equal (and the earliest differing token), the overall mean accepted
length of both runs and its relative change, and both speedups.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from easyspec.bench.core import first_divergence


def _rows(path: str) -> dict[str, dict]:
    try:
        payload = json.loads(Path(path).read_text())
        return {row["label"]: row for row in payload["results"]}
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: not a readable bench.json ({type(err).__name__})") from None


def accepted_length(row: dict) -> float:
    """Overall mean accepted length (bonus counted): 1 + accepted / rounds over every prompt."""
    rounds = sum(s.get("rounds", 0) for s in row["stats"])
    return 1.0 + sum(s.get("accepted", 0) for s in row["stats"]) / rounds if rounds else 0.0


def compare(reference: str, other: str) -> tuple[str, bool]:
    """The comparison table, and whether every shared row's outputs are equal."""
    ref_rows, other_rows = _rows(reference), _rows(other)
    shared = [label for label in ref_rows if label in other_rows]
    if not shared:
        raise ValueError(f"{reference} and {other} have no row label in common")
    lines = [f"{other} against {reference}\n",
             "| method | outputs equal | mean accepted length (reference) | (other) | change | speedup (reference) "
             "| (other) |", "|" + "---|" * 7]
    all_equal = True
    for label in shared:
        a, b = ref_rows[label], other_rows[label]
        if len(a["outputs"]) != len(b["outputs"]):
            raise ValueError(f"row {label!r}: {len(a['outputs'])} prompts in {reference}, {len(b['outputs'])} in "
                             f"{other}; run both on the same prompts")
        diverged = [d for d in map(first_divergence, a["outputs"], b["outputs"]) if d is not None]
        equal = f"{len(a['outputs']) - len(diverged)}/{len(a['outputs'])}"
        if diverged:
            equal += f" (first at token {min(diverged)})"
            all_equal = False
        la, lb = accepted_length(a), accepted_length(b)
        change = f"{100 * (lb - la) / la:+.2f}%" if la else "-"
        lines.append(f"| {label} | {equal} | {la:.3f} | {lb:.3f} | {change} | {a['speedup']:.2f}x "
                     f"| {b['speedup']:.2f}x |")
    return "\n".join(lines), all_equal


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m easyspec.bench.compare", description=__doc__.splitlines()[0])
    p.add_argument("reference", help="bench.json of the reference run (e.g. the pair before inflation)")
    p.add_argument("other", help="bench.json of the run to check against it")
    p.add_argument("--require-equal", action="store_true", help="exit 1 unless every shared row's outputs are equal")
    args = p.parse_args(argv)
    try:
        table, all_equal = compare(args.reference, args.other)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print(table)
    if args.require_equal and not all_equal:
        print("outputs differ", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
