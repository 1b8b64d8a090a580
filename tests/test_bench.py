"""The benchmark command runs end to end on a tiny shape and reports every case (a smoke test, not a timing)."""

from __future__ import annotations

import argparse
import json

import pytest

from rwkv_stream import bench


@pytest.mark.usefixtures("one_torch_thread")
def test_bench_reports_every_case_for_engine_and_peers(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    out = tmp_path / "bench.json"
    args = parser.parse_args(["--shape", "tiny", "--dtypes", "float32,w8a8", "--steps", "2", "--long-stream",
                              "1000", "--out", str(out)])
    assert bench.run(args) == 0
    result = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == result
    engine_cases = {"batch1", "streams16", "streams16_hidden_only", "streams16_fragments8"}
    for impl in ("rwkv-stream float32", "rwkv-stream w8a8"):
        assert set(result["results"][impl]) == engine_cases
    for peer in ("transformers", "rwkv"):
        assert {"batch1", "streams16"} <= set(result["results"][peer]) and "version" in result["results"][peer]
    for impl in result["results"].values():
        for case in (v for v in impl.values() if isinstance(v, dict)):
            assert case["tokens_per_s"] > 0 and case["ms_per_step_min"] <= case["ms_per_step_p50"]
    assert result["long_stream"]["tokens"] == 1000
