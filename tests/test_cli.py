"""The `dnl-zoo` command line: listing, metadata, summary and its errors."""

import json

from dnl_zoo import cli, pretrained


def test_models_lists_a_table_filtered_by_pattern(capsys):
    assert cli.main(["models", "densenet_bc*"]) == 0
    out = capsys.readouterr().out
    assert "| densenet_bc100_k12 | 0.77M |" in out
    assert "| 95.49% cifar10 (standard augmentation) | - |" in out  # no weights
    assert "densenet121" not in out
    assert cli.main(["models", "nothing*"]) == 1


def test_models_marks_and_filters_the_shipped_weights(capsys, monkeypatch):
    monkeypatch.delenv("DNL_ZOO_CHECKPOINTS", raising=False)
    assert cli.main(["models", "dnl_conv_n*", "--pretrained"]) == 0
    out = capsys.readouterr().out
    top1 = pretrained.manifest()["dnl_conv_n1"]["test"]["eval_top1"]
    assert "| dnl_conv_n1 | 0.02M |" in out and f"| {top1}% fashion_mnist |" in out
    assert "dnl_conv_n16" not in out  # registered, no weights shipped


def test_info_prints_json_with_the_reference(capsys):
    assert cli.main(["info", "densenet121"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["params"] == 7_978_856
    assert info["reference"]["value"] == 74.98
    assert info["pretrained"] is False


def test_summary_builds_runs_and_reports(capsys):
    argv = ["summary", "densenet40_k12", "--batch-size", "2", "--in-channels", "1"]
    assert cli.main([*argv, "--image-size", "28"]) == 0
    out = capsys.readouterr().out
    assert "| blocks.2 (12 layers) | (2, 7, 7, 448) |" in out
    assert "logits (2, 10)" in out


def test_unknown_model_is_a_readable_error(capsys):
    assert cli.main(["summary", "densenet12"]) == 2
    err = capsys.readouterr().err
    assert "no model named 'densenet12'; did you mean densenet121" in err


def test_a_run_that_cannot_go_on_is_one_line_without_traceback(tmp_path, capsys):
    argv = ["eval", "dnl_conv_n1", "--data-dir", str(tmp_path)]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("dnl-zoo eval: error: fashion_mnist is not prepared in")
    assert "dnl-zoo data prepare fashion_mnist" in err
    assert "Traceback" not in err


def test_eval_of_a_shipped_name_refuses_config_overrides(capsys):
    argv = ["eval", "dnl_conv_n1", "--config.dataset.data_dir=/elsewhere"]
    assert cli.main(argv) == 2
    assert "not both" in capsys.readouterr().err
