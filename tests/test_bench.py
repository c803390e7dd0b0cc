"""A CPU smoke run of `easyspec bench` on tiny models over 2 processes."""

from __future__ import annotations

import json
import subprocess
import sys


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
    results = json.loads((tmp_path / "bench.json").read_text())["results"]
    assert results[1]["stats"][0]["rounds"] > 0


def test_bench_rejects_unknown_method(pair_dir):
    out = subprocess.run([sys.executable, "-m", "easyspec", "bench", "--model", str(pair_dir / "base"),
                          "--methods", "vanilla,warp"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "unknown bench method 'warp'" in out.stderr
