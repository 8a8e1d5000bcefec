"""The benchmark harness runs end to end in seconds at toy sizes."""

import json

from benchmarks import run


def test_harness_smoke(tmp_path, capsys):
    out = tmp_path / "result.json"
    result = run.main(
        [
            "--depth=10",
            "--batch-size=4",
            "--image-size=8",
            "--steps=1",
            "--warmup=1",
            "--depths",
            "10",
            "16",
            f"--json={out}",
        ]
    )
    printed = capsys.readouterr().out
    assert "| torch_channels_last |" in printed and "| 16 |" in printed
    saved = json.loads(out.read_text())
    assert saved["throughput_images_per_s"].keys() == {
        "dnl_zoo",
        "torch",
        "torch_channels_last",
    }
    assert all(v > 0 for v in result["throughput_images_per_s"].values())
    assert saved["pointwise_gflops"]["conv"] > 0
    assert saved["pointwise_gflops"]["matmul"] > 0
    assert [d["depth"] for d in saved["depths"]] == [10, 16]
    assert all(d["temp_bytes"] > 0 and d["compile_s"] > 0 for d in saved["depths"])
