"""Projected end-to-end speedups: per-stage latencies measured at real shapes with random weights,
combined with the acceptance measured end to end on a real model pair. Projected, never measured.

Random weights make the draft useless (acceptance ~0), but every round still drafts k tokens and
verifies k + 1, so the time of one round is real. With a real pair a round commits on average
`mean accepted length` tokens (bonus counted), hence

    projected time per token = (draft + calibrate + verify per round) / mean accepted length
    projected speedup        = vanilla time per step / projected time per token

Only the timed stages count, on both sides: prefill and host time between stages are left out.
The acceptance for a row with k draft tokens is read from the real run's per-position counts
(1 + sum of the first k acceptance rates), so a real run with k=8 also serves rows with k=4.
"""

from __future__ import annotations

import json
from pathlib import Path

from easyspec.bench.core import MethodResult
from easyspec.options import Method

NOTE = "projected, not measured"
# Drafters whose round cost does not depend on the text: those with a draft model.
PROJECTED_METHODS = tuple(m.value for m in Method if m.uses_draft_model)


def load_acceptance(path: str) -> dict[str, dict]:
    """Method label -> acceptance totals over all prompts, from an end-to-end bench.json."""
    try:
        payload = json.loads(Path(path).read_text())
        rows = payload["results"]
        meta = payload.get("meta", {})
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"--acceptance-from {path}: not a readable bench.json ({type(err).__name__})") from None
    if meta.get("preset") or meta.get("draft_preset"):
        raise ValueError(f"--acceptance-from {path} is itself a random-weight (--preset) run; "
                         "give the bench.json of an end-to-end run on a trained pair")
    table = {}
    for row in rows:
        stats = row.get("stats") or []
        rounds = sum(s.get("rounds", 0) for s in stats)
        options = row.get("options", {})
        if options.get("method") not in PROJECTED_METHODS or options.get("adaptive_draft") or not rounds:
            continue
        per_position: list[int] = []
        for s in stats:
            counts = s.get("accepted_per_position", [])
            per_position += [0] * (len(counts) - len(per_position))
            for i, count in enumerate(counts):
                per_position[i] += count
        table[row["label"]] = {"rounds": rounds, "accepted": sum(s["accepted"] for s in stats),
                               "accepted_per_position": per_position, "num_draft": drafted_per_round(options),
                               "source": path}
    return table


def drafted_per_round(options: dict) -> int:
    """Draft positions per round: k for a chain, the depth for a tree (the first levels of a deeper
    tree of the same width are the whole shallower tree, so per-depth acceptance carries over)."""
    if options.get("tree_width", 1) > 1:
        return options.get("tree_depth") or options["num_draft"]
    return options["num_draft"]


def accepted_length(k: int, source: dict) -> float | None:
    """Mean accepted length (bonus counted) with k draft tokens, from per-position acceptance
    measured with k' >= k; None when the source drafted fewer than k."""
    if k > source["num_draft"]:
        return None
    if k == source["num_draft"]:
        return 1.0 + source["accepted"] / source["rounds"]
    return 1.0 + sum(source["accepted_per_position"][:k]) / source["rounds"]


def stage_ms_per_round(stats: list[dict]) -> dict[str, float]:
    """Draft, calibrate and verify milliseconds per round, totalled over prompts."""
    rounds = sum(s["rounds"] for s in stats) or 1
    return {k: 1000 * sum(s[f"{k}_s"] for s in stats) / rounds for k in ("draft", "calibrate", "verify")}


def projected_row(label: str, k: int, draft_ms: float, calibrate_ms: float, verify_ms: float, length: float,
                  vanilla_ms: float) -> dict:
    """One row of a projection: a round's stages (ms) and its measured mean accepted length."""
    round_ms = draft_ms + calibrate_ms + verify_ms
    return {"label": label, "k": k, "draft_ms": draft_ms, "calibrate_ms": calibrate_ms, "verify_ms": verify_ms,
            "round_ms": round_ms, "mean_accepted_length": length, "tokens_per_s": 1000 * length / round_ms,
            "speedup": vanilla_ms * length / round_ms}


def project(results: list[MethodResult], acceptance: dict[str, dict]) -> tuple[list[dict], list[str]]:
    """Projected rows (vanilla first) for every sd/easyspec row with an acceptance of the same label,
    and one line for each such row that could not be projected."""
    vanilla_ms = stage_ms_per_round(results[0].stats)["verify"]  # one step commits one token
    if vanilla_ms <= 0:
        raise ValueError("the vanilla row has no timed decoding steps, so nothing can be projected from it")
    rows = [projected_row(results[0].label, 0, 0.0, 0.0, vanilla_ms, 1.0, vanilla_ms)]
    missing = []
    for r in results[1:]:
        if r.options.get("method") not in PROJECTED_METHODS:
            continue
        k = drafted_per_round(r.options)
        source = acceptance.get(r.label)
        length = accepted_length(k, source) if source and not r.options.get("adaptive_draft") else None
        if length is None:
            if r.options.get("adaptive_draft"):
                why = "adaptive k makes the cost of a round vary"
            elif source:
                why = f"the source drafted k={source['num_draft']}, fewer than {k}"
            else:
                why = "no row of that label in the acceptance file"
            missing.append(f"{r.label}: not projected, {why}")
            continue
        ms = stage_ms_per_round(r.stats)
        rows.append(projected_row(r.label, k, ms["draft"], ms["calibrate"], ms["verify"], length, vanilla_ms))
    return rows, missing


def projected_table(rows: list[dict], source: str) -> str:
    head = (f"Projected, not measured: stage latencies of this run x acceptance measured end to end in {source}\n\n"
            "| method | k | draft ms/round | calibrate ms/round | verify ms/round | mean accepted length (measured) "
            "| projected tok/s | projected speedup |")
    lines = [head, "|" + "---|" * 8]
    for p in rows:
        lines.append(f"| {p['label']} | {p['k']} | {p['draft_ms']:.2f} | {p['calibrate_ms']:.2f} "
                     f"| {p['verify_ms']:.2f} | {p['mean_accepted_length']:.2f} | {p['tokens_per_s']:.1f} "
                     f"| {p['speedup']:.2f}x |")
    return "\n".join(lines)


def project_steps(rows: list[dict], acceptance: dict[str, dict], k: int) -> tuple[list[dict], list[str]]:
    """The same projection from `easyspec bench-steps` rows (rank 0's): a round is the draft's opening
    forward of k+1 tokens, k-1 draft steps and one verification of k+1 tokens, per context length."""
    mine = {(r["what"], r["context"]): r["ms"] for r in rows if r["rank"] == 0}
    base = next((w.split(" ")[1], w.rsplit("TP=", 1)[1]) for w, _ in mine if w.startswith("base ") and " decode " in w)
    draft = next((w.split(" ")[1] for w, _ in mine if w.startswith("draft ") and w.endswith(" step TP=1")), None)
    if draft is None:
        raise ValueError("--acceptance-from needs a bench-steps run with a draft (--draft-preset)")
    name, n = base
    # Drafting variant in bench-steps -> (bench row label whose acceptance applies, opening forward's TP).
    variants = {"step TP=1": ("sd draft TP=1", "1"), f"step TP={n}": (f"sd draft TP={n}", n)}
    for policy in ("attention", "attention+tp-mlp", "layer"):
        variants[f"step layer-parallel N={n} {policy}"] = (f"easyspec N={n} {policy} every-round", "1")
    out, missing = [], []
    for ctx in sorted({c for _, c in mine if c}):
        vanilla = mine.get((f"base {name} decode TP={n}", ctx))
        verify = mine.get((f"base {name} verify {k + 1} tokens TP={n}", ctx))
        if vanilla is None or verify is None:
            missing.append(f"context {ctx}: no base decode/verify rows for k={k}")
            continue
        out.append(projected_row(f"vanilla TP={n} @{ctx}", 0, 0.0, 0.0, vanilla, 1.0, vanilla))
        for variant, (label, opening_tp) in variants.items():
            step = mine.get((f"draft {draft} {variant}", ctx))
            opening = mine.get((f"draft {draft} opening forward {k + 1} tokens TP={opening_tp}", ctx))
            source = acceptance.get(label)
            length = accepted_length(k, source) if source else None
            if step is None or opening is None or length is None:
                if step is not None:
                    missing.append(f"{label} @{ctx}: not projected (no acceptance row of that label with k >= {k}"
                                   " or no opening-forward row)")
                continue
            out.append(projected_row(f"{label} @{ctx}", k, (k - 1) * step, opening, verify, length, vanilla))
    return out, missing


def print_step_projection(rows: list[dict], acceptance: dict[str, dict], source: str, k: int) -> None:
    """The projection from bench-steps rows as a table, then a line per row it could not make."""
    projected, missing = project_steps(rows, acceptance, k)
    print(projected_table(projected, source))
    for line in missing:
        print(f"- {line}")


def main(argv: list[str] | None = None) -> None:
    """`python -m easyspec.bench.project STEPS_JSON BENCH_JSON`: the projection from saved runs."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m easyspec.bench.project", description=main.__doc__)
    p.add_argument("steps", help="the JSON that `easyspec bench-steps --out` wrote")
    p.add_argument("acceptance", help="an end-to-end bench.json on a trained pair")
    p.add_argument("--num-draft", type=int, default=4, help="k of the projected rounds")
    args = p.parse_args(argv)
    rows = json.loads(Path(args.steps).read_text())["rows"]
    print_step_projection(rows, load_acceptance(args.acceptance), args.acceptance, args.num_draft)


if __name__ == "__main__":
    main()
