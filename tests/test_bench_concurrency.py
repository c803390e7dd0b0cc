"""`easyspec bench --concurrency`: each method's engine serving several requests at once, on tiny CPU models."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from easyspec.bench.concurrency import Trace, level_result, levels_table, parse_levels, percentile, summarise_levels
from easyspec.bench.core import MethodResult
from easyspec.engine.request import Chunk
from easyspec.runtime.stats import SpecStats

NEW_TOKENS = 10
DEMO_BASE = Path(__file__).resolve().parent.parent / "easyspec" / "models" / "demo" / "base"  # has a tokenizer


def _bench(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "easyspec", "bench", *args], capture_output=True, text=True,
                          timeout=timeout)


def _last_table(stdout: str) -> list[list[str]]:
    """Cells of the table that ends the output, header first (its separator line left out)."""
    lines = stdout.strip().splitlines()
    start = max(i for i, line in enumerate(lines) if not line.startswith("|")) + 1
    return [[c.strip() for c in line.strip(" |").split("|")] for i, line in enumerate(lines[start:]) if i != 1]


def test_every_method_at_every_level_over_two_processes(pair_dir, tmp_path):
    # Four prompts at levels 1, 2 and 4: the last level runs them all at once, the middle one in two pairs.
    out = _bench("--model", str(pair_dir / "base"), "--draft", str(pair_dir / "deep"), "--devices", "2",
                 "--methods", "vanilla,sd-tp1,ngram,easyspec", "--concurrency", "1,2,4", "--num-prompts", "4",
                 "--prompt-len", "9", "--max-new-tokens", str(NEW_TOKENS), "--repeats", "1", "--warmup", "1",
                 "--out", str(tmp_path))
    assert out.returncode == 0, out.stderr[-2000:]
    methods = ["vanilla", "sd draft TP=1", "ngram", "easyspec N=2 attention every-round"]
    table = _last_table(out.stdout)
    assert table[0] == ["concurrency", "method", "tok/s", "speedup", "x level 1", "TTFT p50 ms", "ITL p50 ms",
                        "ITL p99 ms", "mean accepted length", "equal to alone"]
    assert [(r[0], r[1]) for r in table[1:]] == [(str(c), m) for c in (1, 2, 4) for m in methods]
    assert all(r[-1] == "4/4" for r in table[1:]), "greedy outputs at every level must equal those served alone"
    payload = json.loads((tmp_path / "bench.json").read_text())
    section = payload["concurrency"]
    assert section["levels"] == [1, 2, 4] and section["requests_per_level"] == 4 and section["not_run"] == []
    alone = {r["label"]: r["outputs"] for r in payload["results"]}
    rows = {(r["label"], r["level"]): r for r in section["rows"]}
    assert len(rows) == 12
    for (label, level), row in rows.items():
        assert row["requests"] == 4 and row["finish_reasons"] == ["length"] * 4, "every request finishes"
        assert [len(o) for o in row["outputs"]] == [NEW_TOKENS] * 4
        assert row["generated"] == 4 * NEW_TOKENS == sum(s["generated"] for s in row["stats"])
        assert row["outputs"] == alone[label] == rows[(label, 1)]["outputs"]
        assert row["divergence"] == [None] * 4
        assert row["tokens_per_s"] == pytest.approx(row["generated"] / row["wall_s"])
        assert len(row["ttft_ms"]) == 4 and min(row["ttft_ms"]) > 0
        assert 0 < row["itl_p50_ms"] <= row["itl_p99_ms"]
        vanilla = rows[("vanilla", level)]
        assert row["speedup"] == pytest.approx(row["tokens_per_s"] / vanilla["tokens_per_s"])
        assert row["scaling"] == pytest.approx(row["tokens_per_s"] / rows[(label, 1)]["tokens_per_s"])
        drafted = sum(s["drafted"] for s in row["stats"])
        if label == "vanilla":
            assert row["mean_accepted_length"] == 1.0 and drafted == 0
        else:
            assert row["mean_accepted_length"] >= 1.0 and drafted > 0
            assert {s["rounds"] for s in row["stats"]} != {0}
    assert rows[("sd draft TP=1", 4)]["speedup"] == pytest.approx(float(table[10][3].rstrip("x")), abs=0.006)
    # Progress: one line per level and method after the main table's timed runs.
    assert out.stderr.count("concurrency 4: ") == 4


def test_without_the_flag_there_is_no_section(pair_dir, tmp_path):
    out = _bench("--model", str(pair_dir / "base"), "--methods", "vanilla", "--num-prompts", "1",
                 "--prompt-len", "6", "--max-new-tokens", "4", "--repeats", "1", "--warmup", "0", "--quiet",
                 "--out", str(tmp_path))
    assert out.returncode == 0, out.stderr[-2000:]
    assert "concurrency" not in json.loads((tmp_path / "bench.json").read_text())
    assert "| concurrency |" not in out.stdout and "Concurrency" not in out.stdout


@pytest.mark.parametrize(("args", "message"), [
    (["--concurrency", "1,0"], "error: --concurrency takes increasing whole numbers >= 1, comma-separated, "
                               "e.g. 1,2,4,8,16; got '1,0'"),
    (["--concurrency", "4,2"], "error: --concurrency takes increasing whole numbers >= 1, comma-separated, "
                               "e.g. 1,2,4,8,16; got '4,2'"),
    (["--concurrency", "1,16"], "error: --concurrency 16 keeps 16 requests in flight, more than --num-prompts 8; "
                                "raise --num-prompts to 16 or more"),
    (["--concurrency", "1,4", "--num-prompts", "4", "--max-num-seqs", "2"],
     "error: --concurrency 4 needs --max-num-seqs 4 or more, got 2; leave --max-num-seqs out to size it to the "
     "largest level"),
])
def test_bad_levels_get_one_line(pair_dir, tmp_path, args, message):
    out = _bench("--model", str(pair_dir / "base"), "--methods", "vanilla", "--out", str(tmp_path), *args,
                 timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [message]
    assert not (tmp_path / "bench.json").exists()


def test_a_prompts_file_shorter_than_the_level_is_refused(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    rows = [{"question_id": i, "category": "qa", "turns": [f"question {i}"]} for i in range(3)]
    prompts.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = _bench("--model", str(DEMO_BASE), "--methods", "vanilla", "--prompts", str(prompts), "--raw",
                 "--num-prompts", "8", "--concurrency", "1,4", "--out", str(tmp_path / "out"), timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        f"error: {prompts} holds 3 prompts, fewer than --concurrency 4 keeps in flight; lower the largest level "
        "or use a larger prompts file"]


def test_parse_levels_and_percentile():
    assert parse_levels("1,2,4,8,16") == [1, 2, 4, 8, 16] and parse_levels(" 3 ") == [3]
    for bad in ("", "1,,2", "2,2", "0", "-1,2", "1.5"):
        with pytest.raises(ValueError, match="increasing whole numbers"):
            parse_levels(bad)
    assert percentile([], 50) is None
    assert percentile([5.0], 99) == 5.0
    assert percentile([4.0, 1.0, 3.0, 2.0], 50) == pytest.approx(2.5)
    assert percentile(list(map(float, range(101))), 99) == pytest.approx(99.0)
    assert percentile([0.0, 10.0], 99) == pytest.approx(9.9)


def _chunk(tokens: list[int], finished: bool = False, accepted: int = 0, rounds: int = 1) -> Chunk:
    stats = SpecStats(rounds=rounds, drafted=2 * rounds, accepted=accepted, generated=len(tokens))
    return Chunk(tokens, finished=finished, finish_reason="length" if finished else None, stats=stats)


def test_itl_counts_each_token_of_an_output_once():
    # Request a: added at 0, first token at 0.5 s, then 4 tokens 20 ms later and 1 token 10 ms after that.
    a = Trace(added=0.0)
    a.record(_chunk([7]), 0.5)
    a.record(_chunk([]), 0.51)  # an output without tokens is no gap of its own
    a.record(_chunk([1, 2, 3, 4]), 0.52)
    a.record(_chunk([5], finished=True, accepted=3, rounds=2), 0.53)
    # Request b: added at 0.2, first token at 0.6 s (its prefill waited), then 2 tokens 30 ms later.
    b = Trace(added=0.2)
    b.record(_chunk([9]), 0.6)
    b.record(_chunk([8, 6], finished=True, accepted=1, rounds=2), 0.63)
    row = level_result(2, "sd", [a, b], wall_s=0.8)
    assert row.outputs == [[7, 1, 2, 3, 4, 5], [9, 8, 6]] and row.generated == 9
    assert row.tokens_per_s == pytest.approx(9 / 0.8)
    assert row.ttft_ms == pytest.approx([500.0, 400.0]) and row.ttft_p50_ms == pytest.approx(450.0)
    # Samples: 5, 5, 5, 5 (a's 4 tokens), 10 (a's last), 15, 15 (b's 2 tokens): median 5, p99 near 15.
    assert row.itl_p50_ms == pytest.approx(5.0)
    assert row.itl_p99_ms == pytest.approx(15.0)
    assert row.mean_accepted_length == pytest.approx((2.5 + 1.5) / 2)
    assert row.finish_reasons == ["length", "length"]
    single = Trace(added=0.0)
    single.record(_chunk([3], finished=True), 0.1)
    alone = level_result(1, "sd", [single], wall_s=0.1)
    assert alone.itl_p50_ms is None and alone.itl_p99_ms is None


def test_summary_and_table_against_vanilla_and_level_one():
    def row(label: str, level: int, tokens_per_s: float, outputs: list[list[int]]) -> object:
        trace = Trace(added=0.0)
        for tokens in outputs:
            trace.record(_chunk(tokens[:1]), 0.01)
            trace.record(_chunk(tokens[1:], finished=True), 0.02)
        result = level_result(level, label, [trace], wall_s=1.0)
        result.tokens_per_s = tokens_per_s
        return result

    alone = [MethodResult("vanilla", {}, outputs=[[1, 2, 3]]), MethodResult("sd", {}, outputs=[[1, 2, 3]])]
    rows = [row("vanilla", 1, 100.0, [[1, 2, 3]]), row("sd", 1, 150.0, [[1, 2, 3]]),
            row("vanilla", 4, 300.0, [[1, 2, 3]]), row("sd", 4, 600.0, [[1, 2, 4]])]
    summarise_levels(rows, alone)
    assert [r.speedup for r in rows] == pytest.approx([1.0, 1.5, 1.0, 2.0])
    assert [r.scaling for r in rows] == pytest.approx([1.0, 1.0, 3.0, 4.0])
    assert rows[3].divergence == [2]
    lines = levels_table(rows).splitlines()
    assert lines[5] == "| 4 | sd | 600.0 | 2.00x | 4.00x | 10.0 | 5.00 | 5.00 | 1.00 | 0/1 (first at token 2) |"
    without_one = rows[2:]
    summarise_levels(without_one, alone)
    assert without_one[0].scaling is None and "| 4 | vanilla | 300.0 | 1.00x | - |" in levels_table(without_one)


def test_the_hf_row_has_no_levels_and_says_so(pair_dir, tmp_path):
    pytest.importorskip("transformers")
    out = _bench("--model", str(pair_dir / "base"), "--methods", "vanilla,hf", "--concurrency", "1",
                 "--num-prompts", "1", "--prompt-len", "6", "--max-new-tokens", "3", "--repeats", "1", "--warmup", "0",
                 "--quiet", "--out", str(tmp_path))
    assert out.returncode == 0, out.stderr[-2000:]
    note = "hf transformers (1 device): no concurrency levels (the HF baseline runs one prompt at a time)"
    assert note in out.stdout.splitlines()
    assert [r[1] for r in _last_table(out.stdout)[1:]] == ["vanilla"]
    section = json.loads((tmp_path / "bench.json").read_text())["concurrency"]
    assert section["not_run"] == [note] and [r["label"] for r in section["rows"]] == ["vanilla"]
