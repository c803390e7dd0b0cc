"""A CPU smoke run of `easyspec bench` on tiny models over 2 processes."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest
import torch


def test_bench_smoke(pair_dir, tmp_path):
    cmd = [sys.executable, "-m", "easyspec", "bench", "--model", str(pair_dir / "base"), "--draft",
           str(pair_dir / "deep"), "--devices", "2", "--methods", "vanilla,sd-tp1,ngram,easyspec",
           "--num-prompts", "2", "--prompt-len", "12", "--max-new-tokens", "12", "--repeats", "2",
           "--out", str(tmp_path)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stderr[-2000:]
    table = out.stdout.strip().splitlines()
    assert any(line.startswith("| method | tok/s | speedup") for line in table)
    rows = [line for line in table if line.startswith("| ") and "method" not in line]
    assert [r.split("|")[1].strip() for r in rows] == ["vanilla", "sd draft TP=1", "ngram",
                                                        "easyspec N=2 attention every-round"]
    assert all(r.rstrip(" |").endswith("2/2") for r in rows), "greedy outputs must equal vanilla's"
    payload = json.loads((tmp_path / "bench.json").read_text())
    results = payload["results"]
    assert results[1]["stats"][0]["rounds"] > 0
    # Achieved bandwidth of plain decoding: float32 weights but the embedding (tied head counts), split over 2.
    cfg = json.loads((pair_dir / "base" / "config.json").read_text())
    hidden, inter, layers, vocab = (cfg[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                     "vocab_size"))
    head_dim = hidden // cfg["num_attention_heads"]
    q, kv = hidden, cfg["num_key_value_heads"] * head_dim
    per_layer = hidden * (q + 2 * kv) + q * hidden + 3 * hidden * inter + 2 * hidden
    streamed = layers * per_layer + hidden + vocab * hidden
    bw = payload["vanilla_bandwidth"]
    assert bw["weight_mb_per_gpu"] == pytest.approx(streamed * 4 / 2 / 1e6)
    assert bw["gb_per_s_per_gpu"] == pytest.approx(bw["weight_mb_per_gpu"] / bw["step_ms"])
    assert any(line.startswith("vanilla: ") and "GB/s per device" in line for line in table)  # CPU: not "GPU"
    try:
        import matplotlib  # noqa: F401
    except ImportError:  # said, not skipped silently
        assert "bench.png not written: matplotlib is not installed" in out.stderr
    else:
        assert (tmp_path / "bench.png").exists()


def test_bench_rejects_unknown_method(pair_dir):
    out = subprocess.run([sys.executable, "-m", "easyspec", "bench", "--model", str(pair_dir / "base"),
                          "--methods", "vanilla,warp"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "unknown bench method 'warp'" in out.stderr


def _bench(*args: str, timeout: int = 400) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "easyspec", "bench", *args], capture_output=True, text=True,
                          timeout=timeout)


def _rows(stdout: str) -> list[list[str]]:
    """Cells of the main table's rows (the first table printed)."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| method | tok/s | speedup"))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("| "):
            break
        rows.append([c.strip() for c in line.strip(" |").split("|")])
    return rows


def test_bench_sweep_and_hf_row(pair_dir, tmp_path):
    # Two runnable settings and two that cannot run (a group of 3 layers on N=2), plus the HF baseline.
    out = _bench("--model", str(pair_dir / "base"), "--draft", str(pair_dir / "deep"), "--devices", "2",
                 "--methods", "vanilla,hf", "--sweep", "num_draft=2,3;groups=auto|0-2,3,4,5,6,7",
                 "--num-prompts", "1", "--prompt-len", "10", "--max-new-tokens", "10", "--repeats", "1",
                 "--out", str(tmp_path))
    assert out.returncode == 0, out.stderr[-2000:]
    rows = _rows(out.stdout)
    labels = [r[0] for r in rows]
    assert sorted(labels) == sorted(["vanilla", "hf transformers (1 device)", "easyspec k=2 groups=auto",
                                     "easyspec k=3 groups=auto"])
    speedups = [float(r[2].rstrip("x")) for r in rows]
    assert speedups == sorted(speedups, reverse=True), "a sweep prints its rows by speedup"
    hf = rows[labels.index("hf transformers (1 device)")]
    assert hf[5:8] == ["-", "-", "-"] and hf[-1] == "1/1", "HF greedy must equal ours; it has no stage times"
    assert out.stdout.count("skipped, --groups: group (0, 1, 2) has more layers") == 2
    swept = [r for r in rows if r[0].startswith("easyspec")]
    last = out.stdout.strip().splitlines()[-1]
    assert last.startswith(f"best setting: {max(swept, key=lambda r: float(r[2].rstrip('x')))[0]} (")
    data = json.loads((tmp_path / "bench.json").read_text())
    assert len(data["results"]) == 4 and len(data["not_run"]) == 2
    assert data["sweep"]["grid"] == {"num_draft": [2, 3], "groups": [None, "0-2,3,4,5,6,7"]}
    assert data["sweep"]["best"] == last
    # Not a terminal: one plain progress line per timed run (4 rows x 1 prompt x 1 repeat), no \r.
    assert "\r" not in out.stderr and out.stderr.count("prompt 1/1 repeat 1/1") == 4


def test_bench_rejects_malformed_sweep(pair_dir):
    out = _bench("--model", str(pair_dir / "base"), "--sweep", "num_draft=3;num_draft=4", timeout=60)
    assert out.returncode == 2 and out.stderr.strip().splitlines() == [
        "error: --sweep: num_draft is given twice; list all its values once"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
def test_bench_on_cuda_without_a_gpu_is_one_line(tmp_path):
    """Refused before a preset checkpoint is built on the missing device or a row's process starts."""
    out = _bench("--preset", "tiny", "--device", "cuda", "--methods", "vanilla", "--workdir", str(tmp_path),
                 "--out", str(tmp_path / "out"), timeout=60)
    assert out.returncode == 2 and out.stderr.strip().splitlines() == [
        "error: --device cuda was asked for but no CUDA device is visible; use --device cpu"]
    assert not (tmp_path / "tiny").exists()


def test_parse_sweep():
    from easyspec.bench.sweep import parse_sweep

    grid = parse_sweep(" layer-parallel=1,2 ; groups=auto|0,1-2,3 ;num_draft=3,4,5;calibrate=every-round,on-mismatch")
    assert grid == {"layer_parallel": [1, 2], "groups": [None, "0,1-2,3"], "num_draft": [3, 4, 5],
                    "calibrate": ["every-round", "on-mismatch"]}
    bad = {"num_draft": "cannot read", "k=3": "unknown key 'k'", "num_draft=0": "whole numbers >= 1",
           "keep_first=x": "whole numbers >= 0", "calibrate=sometimes": "not one of",
           "groups=0,a": "is not like 0,1,2-3,4", "num_draft=3,,4": "empty or repeated", ";": "is empty",
           "parallel_policy=layer,layer": "empty or repeated"}
    for text, message in bad.items():
        with pytest.raises(ValueError, match=message):
            parse_sweep(text)


def test_sweep_specs_skip_settings_that_cannot_run(pair_dir):
    from easyspec.bench.sweep import parse_sweep, sweep_specs
    from easyspec.options import EngineOptions

    base = EngineOptions(model=str(pair_dir / "base"), draft=str(pair_dir / "deep"), devices=2)
    specs, skipped = sweep_specs(parse_sweep("layer_parallel=1,2,3;groups=auto|0,1-2,3-4,5,6,7"), base)
    assert [s.label for s in specs] == ["easyspec N=1 groups=auto", "easyspec N=2 groups=auto",
                                        "easyspec N=2 groups=0,1-2,3-4,5,6,7"]
    assert specs[2].changes == {"method": "easyspec", "layer_parallel": 2, "groups": "0,1-2,3-4,5,6,7"}
    assert len(skipped) == 3 and all("skipped" in s for s in skipped)
    with pytest.raises(ValueError, match="no setting can run"):
        sweep_specs(parse_sweep("layer_parallel=3"), base)


def _stats(rounds: int, draft: float, calibrate: float, verify: float, accepted: int = 0,
           per_position: list[int] | None = None) -> dict:
    return {"rounds": rounds, "accepted": accepted, "accepted_per_position": per_position or [],
            "draft_s": draft, "calibrate_s": calibrate, "verify_s": verify, "generated": rounds}


def test_projection_arithmetic(tmp_path):
    from easyspec.bench.core import MethodResult
    from easyspec.bench.project import load_acceptance, project

    # The real pair drafted k=4: 300 of 4 x 100 drafted tokens accepted over two prompts, per position 90/80/70/60.
    source = {"meta": {}, "results": [
        {"label": "vanilla", "options": {"method": "vanilla", "num_draft": 4}, "stats": [_stats(50, 0, 0, 1)]},
        {"label": "sd", "options": {"method": "sd", "num_draft": 4},
         "stats": [_stats(60, 0, 0, 0, 180, [55, 50, 45, 30]), _stats(40, 0, 0, 0, 120, [35, 30, 25, 30])]},
        {"label": "ngram", "options": {"method": "ngram", "num_draft": 4}, "stats": [_stats(9, 0, 0, 0, 9, [9])]},
    ]}
    path = tmp_path / "real.json"
    path.write_text(json.dumps(source))
    acceptance = load_acceptance(str(path))
    assert set(acceptance) == {"sd"} and acceptance["sd"]["accepted_per_position"] == [90, 80, 70, 60]

    def row(label: str, method: str, k: int, stats: dict) -> MethodResult:
        return MethodResult(label, {"method": method, "num_draft": k}, stats=[stats])

    # Random-weight run: a vanilla step takes 10 ms; an sd round drafts 6 ms, calibrates 2 ms, verifies 12 ms.
    results = [row("vanilla", "vanilla", 4, _stats(100, 0, 0, 1.0)),
               row("sd", "sd", 4, _stats(10, 0.06, 0.02, 0.12)),
               row("sd", "sd", 2, _stats(10, 0.02, 0.02, 0.11)),
               row("sd", "sd", 8, _stats(10, 0.1, 0.02, 0.2)),
               row("easyspec", "easyspec", 4, _stats(10, 0.05, 0.02, 0.12)),
               row("ngram", "ngram", 4, _stats(10, 0, 0, 0.1))]
    rows, missing = project(results, acceptance)
    assert [r["label"] for r in rows] == ["vanilla", "sd", "sd"]
    vanilla, k4, k2 = rows
    assert vanilla["tokens_per_s"] == pytest.approx(100.0) and vanilla["speedup"] == 1.0
    # k=4: 20 ms per round / 4.0 tokens = 5 ms per token -> 200 tok/s, 2x.
    assert k4["round_ms"] == pytest.approx(20.0) and k4["mean_accepted_length"] == pytest.approx(4.0)
    assert k4["tokens_per_s"] == pytest.approx(200.0) and k4["speedup"] == pytest.approx(2.0)
    # k=2 from the first two positions: 1 + (90 + 80) / 100 = 2.7 tokens per 15 ms round.
    assert k2["mean_accepted_length"] == pytest.approx(2.7) and k2["speedup"] == pytest.approx(10 * 2.7 / 15)
    assert missing == ["sd: not projected, the source drafted k=4, fewer than 8",
                       "easyspec: not projected, no row of that label in the acceptance file"]
    source["meta"]["preset"] = "llama-3.1-8b"
    path.write_text(json.dumps(source))
    with pytest.raises(ValueError, match="random-weight"):
        load_acceptance(str(path))
    with pytest.raises(ValueError, match="not a readable bench.json"):
        load_acceptance(str(tmp_path / "missing.json"))


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar():
    from easyspec.bench.progress import Progress

    log = io.StringIO()
    p = Progress(4, stream=log)
    p.begin("vanilla", 1, 2)
    p.step("prompt 1/2")
    p.note("hf transformers (1 device): not run, no transformers")
    p.close()
    lines = log.getvalue().splitlines()
    assert len(lines) == 3 and "\r" not in log.getvalue()
    assert lines[1].startswith("[" + "#" * 6 + "." * 18 + "] 1/4  25%") and lines[1].endswith("vanilla: prompt 1/2")
    term = _Terminal()
    p = Progress(2, stream=term)
    p.begin("vanilla", 1, 1)
    p.step("a")
    p.step("b")
    p.close()
    text = term.getvalue()
    assert text.count("\r") == 3 and text.endswith("vanilla: b\n") and text.count("\n") == 1
    quiet = _Terminal()
    p = Progress(2, quiet=True, stream=quiet)
    p.begin("vanilla", 1, 1)
    p.step("a")
    p.note("x")
    p.close()
    assert quiet.getvalue() == ""


def test_bench_goes_on_without_transformers(pair_dir, tmp_path, monkeypatch, capsys):
    import easyspec.bench.hf
    from easyspec.cli.main import build_parser

    monkeypatch.setattr(easyspec.bench.hf, "find_spec", lambda name: None)
    args = build_parser().parse_args(["bench", "--model", str(pair_dir / "base"), "--methods", "vanilla,hf",
                                      "--num-prompts", "1", "--prompt-len", "8", "--max-new-tokens", "4",
                                      "--repeats", "1", "--warmup", "0", "--quiet", "--out", str(tmp_path)])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert [r[0] for r in _rows(out)] == ["vanilla"]
    note = "hf transformers (1 device): not run, transformers is not installed (pip install transformers)"
    assert note in out.splitlines()
    assert json.loads((tmp_path / "bench.json").read_text())["not_run"] == [note]


def test_bench_steps_needs_cuda_devices_and_tables_rank0_rows():
    from easyspec.bench.steps import markdown

    if not __import__("torch").cuda.is_available():
        out = subprocess.run([sys.executable, "-m", "easyspec", "bench-steps", "--devices", "2"],
                             capture_output=True, text=True)
        assert out.returncode == 2
        assert out.stderr.strip().splitlines() == ["error: bench-steps needs 2 CUDA device(s); this machine has 0"]
    rows = [
        {"what": "base m decode TP=2", "context": 512, "ms": 2.0, "floor_ms": 1.5, "floor_pct": 75.0, "rank": 0},
        {"what": "base m decode TP=1", "context": 512, "ms": 3.0, "floor_ms": 2.7, "floor_pct": 90.0, "rank": 0},
        {"what": "draft d step TP=1", "context": 512, "ms": 1.2, "rank": 0},
        {"what": "draft d step layer-parallel N=2 attention", "context": 512, "ms": 1.0, "rank": 0},
        {"what": "draft d step layer-parallel N=2 attention", "context": 512, "ms": 9.0, "rank": 1},
    ]
    table = markdown(rows).splitlines()
    assert len(table) == 2 + 4  # rank 1's row stays in the JSON only
    assert table[2] == "| base m decode TP=2 | 512 | 2.000 | 75.0% | 1.50x |"
    assert table[5] == "| draft d step layer-parallel N=2 attention | 512 | 1.000 |  | 1.20x |"


def test_projection_from_bench_steps_rows():
    from easyspec.bench.project import project_steps

    def r(what: str, ms: float, rank: int = 0) -> dict:
        return {"what": what, "context": 512, "ms": ms, "rank": rank}

    rows = [r("base b decode TP=2", 3.0), r("base b verify 5 tokens TP=2", 3.2),
            r("draft d step TP=1", 1.0), r("draft d opening forward 5 tokens TP=1", 1.1),
            r("draft d step TP=2", 0.9), r("draft d opening forward 5 tokens TP=2", 1.0),
            r("draft d step layer-parallel N=2 attention+tp-mlp", 0.8), r("draft d step TP=1", 9.0, rank=1)]
    acceptance = {label: {"rounds": 10, "accepted": 20, "accepted_per_position": [8, 6, 4, 2], "num_draft": 4}
                  for label in ("sd draft TP=1", "easyspec N=2 attention+tp-mlp every-round")}
    out, missing = project_steps(rows, acceptance, 4)
    by_label = {row["label"]: row for row in out}
    assert set(by_label) == {"vanilla TP=2 @512", "sd draft TP=1 @512",
                             "easyspec N=2 attention+tp-mlp every-round @512"}
    sd = by_label["sd draft TP=1 @512"]
    # A round: opening 1.1 + 3 steps x 1.0 + verify 3.2 = 7.3 ms for 1 + 20/10 = 3 tokens.
    assert sd["round_ms"] == pytest.approx(7.3) and sd["speedup"] == pytest.approx(3.0 * 3 / 7.3)
    easy = by_label["easyspec N=2 attention+tp-mlp every-round @512"]
    assert easy["round_ms"] == pytest.approx(1.1 + 3 * 0.8 + 3.2)
    # k=2 from the per-position counts: 1 + (8 + 6) / 10 tokens per round.
    two, _ = project_steps([*rows, r("base b verify 3 tokens TP=2", 3.1), r("draft d opening forward 3 tokens TP=1",
                                                                           1.05)], acceptance, 2)
    assert {row["label"]: row for row in two}["sd draft TP=1 @512"]["mean_accepted_length"] == pytest.approx(2.4)
    assert missing == ["sd draft TP=2 @512: not projected (no acceptance row of that label with k >= 4 "
                       "or no opening-forward row)"]


def test_projection_from_saved_runs_on_the_command_line(tmp_path):
    steps = tmp_path / "steps.json"
    steps.write_text(json.dumps({"rows": [
        {"what": w, "context": 512, "ms": ms, "rank": 0}
        for w, ms in (("base b decode TP=2", 3.0), ("base b verify 5 tokens TP=2", 3.2), ("draft d step TP=1", 1.0),
                      ("draft d opening forward 5 tokens TP=1", 1.1))]}))
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"meta": {}, "results": [
        {"label": "sd draft TP=1", "options": {"method": "sd", "num_draft": 4}, "stats": [_stats(60, 0, 0, 0, 20,
                                                                                           [8, 6, 4, 2])]}]}))
    out = subprocess.run([sys.executable, "-m", "easyspec.bench.project", str(steps), str(bench)],
                         capture_output=True, text=True, check=True).stdout
    assert "Projected, not measured" in out and "| sd draft TP=1 @512 | 4 |" in out


def test_spread_is_shown_only_for_repeated_runs_and_prompts_cover_categories():
    from easyspec.bench.core import MethodResult, spread_over_categories

    once, twice = MethodResult("once", {}), MethodResult("twice", {})
    once.add_prompt("function", [100.0], [1, 2], {})
    twice.add_prompt("function", [90.0, 110.0], [1, 2], {})
    assert once.spread == [None] and once.spread_text() == "-"
    assert twice.tokens_per_s == [100.0] and twice.spread_text() == "20.0%"
    rows = [("function", [1]), ("function", [2]), ("class", [3]), ("test", [4]), ("test", [5])]
    assert [ids[0] for _, ids in spread_over_categories(rows, 4)] == [1, 3, 4, 2]


def test_table_breaks_time_down_per_token_and_names_the_first_divergence():
    from easyspec.bench.core import MethodResult, markdown_table

    def stats(drafted: int) -> dict:
        # 10 tokens in 50 ms: 5 prefill, 10 draft, 5 calibrate, 20 verify, so 10 ms untimed.
        return {"generated": 10, "drafted": drafted, "acceptance_rate": 0.5, "mean_accepted_length": 2.0,
                "prefill_s": 0.005, "draft_s": 0.010, "calibrate_s": 0.005, "verify_s": 0.020, "total_s": 0.050}

    vanilla = MethodResult("vanilla", {}, tokens_per_s=[200.0], stats=[stats(0)], divergence=[None], speedup=1.0)
    sd = MethodResult("sd", {}, tokens_per_s=[250.0], stats=[stats(8)], divergence=[7], speedup=1.25)
    hf = MethodResult("hf", {}, tokens_per_s=[50.0], divergence=[None],
                      stats=[{"generated": 10, "drafted": 0, "mean_accepted_length": 1.0, "acceptance_rate": 0.0,
                              "total_s": 0.2}])
    assert sd.ms_per_token("verify") == pytest.approx(2.0)
    assert sd.ms_per_token("host") == pytest.approx(1.0)
    assert sd.ms_per_token("other") == pytest.approx(1.5)
    assert hf.ms_per_token("other") is None
    rows = markdown_table([vanilla, sd, hf]).splitlines()
    assert rows[2].split("|")[5].strip() == "-"  # vanilla drafts nothing: no acceptance
    assert rows[3].split("|")[9].strip() == "1.50" and rows[3].endswith("0/1 (first at token 7) |")
    assert rows[4].split("|")[6:10] == [" - "] * 4


def test_ideal_speedup_and_weight_bytes_per_token(pair_dir):
    from easyspec.bench.core import MethodResult, markdown_table, summarise
    from easyspec.bench.efficiency import decode_weight_bytes
    from easyspec.model.checkpoint import load_config

    def stats(rounds: int, drafted: int, draft_s: float, verify_s: float, total_s: float) -> dict:
        return {"rounds": rounds, "drafted": drafted, "generated": 40, "acceptance_rate": 0.5,
                "mean_accepted_length": 40 / rounds, "prefill_s": 0.01, "draft_s": draft_s, "calibrate_s": 0.0,
                "verify_s": verify_s, "total_s": total_s}

    base, draft = str(pair_dir / "base"), str(pair_dir / "far")
    options = {"model": base, "draft": draft, "dtype": "bfloat16"}
    # vanilla: 40 steps of 10 ms (400 ms staged) in 500 ms. sd: 10 rounds of 4 drafts + verify, 240 ms staged.
    vanilla = MethodResult("vanilla", {**options, "method": "vanilla", "draft": None}, tokens_per_s=[80.0],
                           outputs=[[1]], stats=[stats(40, 0, 0.0, 0.4, 0.5)])
    sd = MethodResult("sd", {**options, "method": "sd"}, tokens_per_s=[120.0], outputs=[[1]],
                      stats=[stats(10, 40, 0.08, 0.16, 0.3)])
    hf = MethodResult("hf", {**options, "method": "hf"}, tokens_per_s=[20.0], outputs=[[1]],
                      stats=[{"generated": 40, "drafted": 0, "mean_accepted_length": 1.0, "total_s": 2.0}])
    summarise([vanilla, sd, hf])
    assert vanilla.ideal_speedup == pytest.approx(1.0)
    assert sd.ideal_speedup == pytest.approx(10.0 / 6.0)  # 10 ms/tok of vanilla's stages over 6 of sd's
    assert hf.ideal_speedup is None and hf.weight_mb_per_token is None
    base_bytes = decode_weight_bytes(load_config(base), "bfloat16")
    draft_bytes = decode_weight_bytes(load_config(draft), "bfloat16")
    assert vanilla.weight_mb_per_token == pytest.approx(base_bytes * 40 / 40 / 1e6)
    assert sd.weight_mb_per_token == pytest.approx((base_bytes * 10 + draft_bytes * 40) / 40 / 1e6)
    rows = [[c.strip() for c in line.strip(" |").split("|")] for line in markdown_table([vanilla, sd, hf]).splitlines()]
    assert rows[0][9:12] == ["ideal", "of ideal", "weight MB/tok"]
    assert rows[2][9:11] == ["1.00x", "100%"] and rows[3][9:11] == ["1.67x", "90%"]  # 1.5x measured of 1.67x
    assert rows[4][9:12] == ["-", "-", "-"]


def test_compare_matches_rows_by_label(tmp_path):
    def bench_json(name: str, outputs: list[list[int]], accepted: int) -> str:
        rows = [{"label": "vanilla", "outputs": outputs, "speedup": 1.0, "stats": [{"rounds": 8, "accepted": 0}]},
                {"label": "sd draft TP=1", "outputs": outputs, "speedup": 1.5,
                 "stats": [{"rounds": 4, "accepted": accepted}]},
                {"label": name, "outputs": outputs, "speedup": 2.0, "stats": [{"rounds": 1, "accepted": 0}]}]
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({"meta": {}, "results": rows}))
        return str(path)

    reference = bench_json("only-in-reference", [[1, 2, 3], [4, 5]], accepted=8)
    same = bench_json("only-in-same", [[1, 2, 3], [4, 5]], accepted=8)
    other = bench_json("only-in-other", [[1, 2, 3], [4, 6]], accepted=9)

    def compare(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "easyspec.bench.compare", *args], capture_output=True,
                              text=True, timeout=60)

    ok = compare(reference, same, "--require-equal")
    assert ok.returncode == 0 and "| sd draft TP=1 | 2/2 | 3.000 | 3.000 | +0.00% | 1.50x | 1.50x |" in ok.stdout
    assert "only-in" not in ok.stdout.split("\n", 1)[1]
    differ = compare(reference, other, "--require-equal")
    assert differ.returncode == 1
    assert "| sd draft TP=1 | 1/2 (first at token 1) | 3.000 | 3.250 | +8.33% |" in differ.stdout
