"""bench/bench_clip_vision.py runs (tiny tower on the CPU)."""

import importlib.util
import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_smoke(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_clip_vision", os.path.join(ROOT, "bench", "bench_clip_vision.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "r.json"
    results = bench.main(["--smoke", "--json", str(out)])
    assert json.loads(out.read_text()) == results
    assert [r["weights"] for r in results["runs"]] == ["bf16", "fp8_e4m3fn"]
    assert results["runs"][1]["weight_MB"] < results["runs"][0]["weight_MB"]
