"""The benchmark harness runs end to end in seconds at toy sizes."""

import json

from benchmarks import profile, run

# A BC-10 on 4 images of 8x8, timed once: seconds per run, not figures.
TOY = ["--depth=10", "--batch-size=4", "--image-size=8", "--steps=1"]


def test_harness_smoke(tmp_path, capsys):
    out = tmp_path / "result.json"
    result = run.main(
        [
            "--models=bc100",
            *TOY,
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


def test_harness_names_rows_of_other_dtypes(capsys):
    args = ["--models=bc100", *TOY, "--warmup=0", "--devices", "1"]
    args += ["--implementations", "lean", "--dtypes", "float32", "bfloat16"]
    args += ["--depths", "--no-torch"]
    speeds = run.main(args)["throughput"]["bc100"]["images_per_s"]
    assert speeds.keys() == {"dnl_zoo lean", "dnl_zoo lean bfloat16"}
    assert all(v > 0 for v in speeds.values())


def test_harness_measures_dnl_blocks_per_implementation(capsys):
    args = ["--models", "--depths", "--steps=1", "--warmup=0", "--devices", "2"]
    args += ["--dnl", "dnl_conv_n1", "--dnl-implementations", "plain", "lean"]
    args += ["--memory-batch-size=4", "--memory-image-size=8"]  # the 1x1 rows
    rows = run.main([*args, "--dnl-batch-size=4"])["dnl"]
    assert "| dnl_conv_n1 | lean |" in capsys.readouterr().out
    assert [(r["model"], r["implementation"]) for r in rows] == [
        ("dnl_conv_n1", "plain"),
        ("dnl_conv_n1", "lean"),
    ]
    assert all(r["temp_bytes"] > 0 and r["images_per_s"] > 0 for r in rows)
    assert all(r["devices"] == 2 for r in rows)


def test_peak_resident_memory_of_one_step_in_a_fresh_process():
    assert run.peak_rss(10, 2, 8, "lean") > 50 * 2**20


def test_profile_smoke_splits_a_step_by_pass_and_kind(tmp_path, capsys):
    out = tmp_path / "profile.json"
    result = profile.main([*TOY, "--warmup=1", "--devices=2", f"--json={out}"])
    assert "| backward | convolution |" in capsys.readouterr().out
    saved = json.loads(out.read_text())
    kinds = {(row["pass"], row["kind"]) for row in saved["rows"]}
    # A training step convolves and multiplies forwards and backwards.
    for pass_ in ("forward", "backward"):
        assert {(pass_, "convolution"), (pass_, "dot")} <= kinds
    assert all(row["ms"] > 0 and row["count"] > 0 for row in result["rows"])
    # The operations ran inside the step, so they cannot outlast it (the
    # two devices' times are averaged).
    assert sum(row["ms"] for row in result["rows"]) <= saved["wall_ms"]


def test_profile_classes_a_fusion_by_its_root_and_pass():
    hlo = "\n".join(
        [
            "%fused_computation.1 (p: f32[4]) -> f32[4] {",
            "  %p = f32[4]{0} parameter(0)",
            '  ROOT %dot.2 = f32[4]{0} dot(%p, %p), metadata={op_name="x/dot"}',
            "}",
            "ENTRY %main (a: f32[4]) -> f32[4] {",
            "  %a = f32[4]{0} parameter(0)",
            "  %fusion.3 = f32[4]{0} fusion(%a), kind=kOutput, "
            'calls=%fused_computation.1, metadata={op_name="transpose(jvp())/dot"}',
            "  ROOT %convolution.4 = f32[4]{0} convolution(%fusion.3, %a)",
            "}",
        ]
    )
    classes = profile.classify(hlo)
    assert classes["fusion.3"] == ("backward", "dot")
    assert classes["dot.2"] == ("forward", "dot")
    assert classes["convolution.4"] == ("backward", "convolution")
    assert classes["a"] == ("unnamed", "elementwise and other")
