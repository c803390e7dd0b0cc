"""`--sweep`: the cartesian product of EasySpec knob values, one bench row per setting.

Syntax: `key=v1,v2;key=v1,...`, keys separated by ';', values by ','. A --groups value itself
holds commas, so groups values are separated by '|' instead (`auto` = the grouping built from
--layer-parallel, --keep-first and --keep-last). Keys may be written with '-' or '_'.
"""

from __future__ import annotations

import itertools
import re
import statistics

from easyspec.bench.core import MethodResult, MethodSpec
from easyspec.model.loader import load_config
from easyspec.options import Calibration, EngineOptions, ParallelPolicy
from easyspec.parallel.layer_parallel import LayerLayout

# Knob -> short name in row labels.
SHORT = {"layer_parallel": "N", "num_draft": "k", "groups": "groups", "calibrate": "calibrate",
         "parallel_policy": "policy", "keep_first": "keep_first", "keep_last": "keep_last",
         "tree_width": "W", "tree_depth": "D"}
_INT_MIN = {"layer_parallel": 1, "num_draft": 1, "keep_first": 0, "keep_last": 0, "tree_width": 1, "tree_depth": 1}
_CHOICES = {"calibrate": Calibration.names(), "parallel_policy": ParallelPolicy.names()}
_GROUPS = re.compile(r"\d+(-\d+)?(,\d+(-\d+)?)*")


def parse_sweep(text: str) -> dict[str, list]:
    """`key=v1,v2;...` -> {knob: [values]} in the order written; a one-line ValueError if malformed."""
    grid: dict[str, list] = {}
    for part in (p.strip() for p in text.split(";") if p.strip()):
        key, sep, values = part.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not values.strip():
            raise ValueError(f"--sweep: cannot read {part!r}; write key=v1,v2 (e.g. num_draft=3,4,5)")
        if key not in SHORT:
            raise ValueError(f"--sweep: unknown key {key!r}; choose from {', '.join(SHORT)}")
        if key in grid:
            raise ValueError(f"--sweep: {key} is given twice; list all its values once")
        items = [v.strip() for v in values.split("|" if key == "groups" else ",")]
        if len(set(items)) != len(items) or "" in items:
            raise ValueError(f"--sweep: {key} has an empty or repeated value in {values!r}")
        grid[key] = [_value(key, v) for v in items]
    if not grid:
        raise ValueError("--sweep is empty; write e.g. 'layer_parallel=2;num_draft=3,4,5'")
    return grid


def _value(key: str, text: str) -> object:
    if key in _INT_MIN:
        if not text.isdigit() or int(text) < _INT_MIN[key]:
            raise ValueError(f"--sweep: {key} needs whole numbers >= {_INT_MIN[key]}, got {text!r}")
        return int(text)
    if key in _CHOICES:
        if text not in _CHOICES[key]:
            raise ValueError(f"--sweep: {key} {text!r} is not one of {', '.join(_CHOICES[key])}")
        return text
    if text == "auto":
        return None
    if not _GROUPS.fullmatch(text.replace(" ", "")):
        raise ValueError(f"--sweep: groups value {text!r} is not like 0,1,2-3,4 (separate several with '|')")
    return text.replace(" ", "")


def sweep_specs(grid: dict[str, list], base: EngineOptions) -> tuple[list[MethodSpec], list[str]]:
    """One easyspec row per setting of the grid, and one line per setting that cannot run (e.g. a
    group wider than N), checked here against the configs so no process is started for it."""
    num_layers = load_config(base.draft).num_layers if base.draft else 0
    specs, skipped = [], []
    for values in itertools.product(*grid.values()):
        changes = dict(zip(grid, values, strict=True))
        label = "easyspec " + " ".join(f"{SHORT[k]}={'auto' if v is None else v}" for k, v in changes.items())
        options = base.replace(method="easyspec", **changes)
        try:
            options.validate()
            LayerLayout.choose(options.groups, num_layers, options.layer_parallel, options.keep_first,
                               options.keep_last)
        except ValueError as err:
            skipped.append(f"{label}: skipped, {err}")
            continue
        specs.append(MethodSpec(label, {"method": "easyspec", **changes}))
    if not specs:
        raise ValueError(f"--sweep: no setting can run; the first reason: {skipped[0].split(', ', 1)[1]}")
    return specs, skipped


def ranked(results: list[MethodResult]) -> list[MethodResult]:
    """Rows by speedup, fastest first (ties keep their run order)."""
    return sorted(results, key=lambda r: -r.speedup)


def best_line(results: list[MethodResult], labels: set[str]) -> str:
    """The final line of a sweep: the fastest of the swept rows."""
    best = ranked([r for r in results if r.label in labels])[0]
    return (f"best setting: {best.label} ({best.speedup:.2f}x vanilla, {statistics.fmean(best.tokens_per_s):.1f} "
            f"tok/s, mean accepted length {best.mean('mean_accepted_length'):.2f}, spread {best.spread_text()})")
