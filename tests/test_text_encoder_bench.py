"""bench/bench_text_encoder.py runs (tiny model on the CPU, --smoke)."""

import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_smoke(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_text_encoder",
                                                  os.path.join(ROOT, "bench", "bench_text_encoder.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "r.json"
    res = bench.main(["--smoke", "--tokens", "64", "--json", str(out)])
    assert [r["weights"] for r in res["runs"]] == ["bf16", "fp8_e4m3fn"]
    assert all(r["resident_s"]["best"] > 0 and r["offloaded_s"]["best"] > 0 for r in res["runs"])
    assert out.exists()
