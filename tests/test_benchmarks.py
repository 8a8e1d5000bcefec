"""The benchmark harness runs end to end in seconds at toy sizes."""

import json

from benchmarks import run


def test_harness_smoke(tmp_path, capsys):
    out = tmp_path / "result.json"
    result = run.main(
        [
            "--models=bc100",
            "--depth=10",
            "--batch-size=4",
            "--image-size=8",
            "--steps=1",
            "--warmup=1",
            "--devices",
            "1",
            "2",
            "--implementations",
            "plain",
            "scan",
            "--depths",
            "10",
            "16",
            "--memory-batch-size=4",
            "--memory-image-size=8",
            "--no-rss",
            f"--json={out}",
        ]
    )
    printed = capsys.readouterr().out
    assert "| torch channels_last |" in printed and "| 16 | scan |" in printed
    saved = json.loads(out.read_text())
    speeds = saved["throughput"]["bc100"]["images_per_s"]
    assert speeds.keys() == {
        "dnl_zoo plain",
        "dnl_zoo scan",
        "dnl_zoo plain x2",
        "dnl_zoo scan x2",
        "torch",
        "torch channels_last",
    }
    assert all(v > 0 for v in result["throughput"]["bc100"]["images_per_s"].values())
    assert saved["pointwise_gflops"]["conv"] > 0
    assert saved["pointwise_gflops"]["matmul"] > 0
    assert [(d["depth"], d["implementation"]) for d in saved["depths"]] == [
        (10, "plain"),
        (10, "scan"),
        (16, "plain"),
        (16, "scan"),
    ]
    assert all(d["temp_bytes"] > 0 and d["compile_s"] > 0 for d in saved["depths"])


def test_peak_resident_memory_of_one_step_in_a_fresh_process():
    assert run.peak_rss(10, 2, 8, "lean") > 50 * 2**20
