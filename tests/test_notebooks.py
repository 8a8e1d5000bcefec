"""The Colab notebooks run headless, start to end, with small parameters.

Each notebook's cell tagged "parameters" is replaced by the values below (as
papermill does), then nbclient executes every cell in a fresh kernel.
"""

import nbclient
import nbformat
import pytest
from conftest import NAME, ROOT


def run_notebook(name: str, parameters: dict, cwd) -> nbformat.NotebookNode:
    notebook = nbformat.read(ROOT / "colab" / name, as_version=4)
    cells = [c for c in notebook.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(cells) == 1, f"{name} needs exactly one cell tagged 'parameters'"
    known = cells[0].source
    for key in parameters:
        assert f"\n{key} = " in f"\n{known}", f"{name} has no parameter {key}"
    cells[0].source = (
        known
        + "\n"
        + "\n".join(f"{key} = {value!r}" for key, value in parameters.items())
    )
    client = nbclient.NotebookClient(
        notebook,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": cwd}},
    )
    client.execute()
    return notebook


def _text(notebook) -> str:
    return "\n".join(
        output.get("text", "") + str(output.get("data", {}).get("text/plain", ""))
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.outputs
    )


def test_finetune_notebook(checkpoints, fashion_mnist_dir, tmp_path):
    parameters = dict(
        MODEL=NAME, DATASET="fashion_mnist", DATA_DIR=fashion_mnist_dir, STEPS=6
    )
    out = _text(run_notebook("finetune.ipynb", parameters, tmp_path))
    assert "fine-tuned:" in out and "reloaded:" in out
    assert (tmp_path / "runs/colab_finetune_model/model.json").is_file()


def test_depth_table_notebook_on_the_shipped_ladder(fashion_mnist_dir, tmp_path):
    # The real checkpoints/: the two smallest DNL rungs, and N = 2 moved to 4.
    parameters = dict(
        NAMES=["dnl_conv_n1", "dnl_conv_n2"],
        DATA_DIR=fashion_mnist_dir,
        TRANSFER_FROM="dnl_conv_n2",
        TRANSFER_TO=4,
    )
    out = _text(run_notebook("depth_table.ipynb", parameters, tmp_path))
    assert "every row equals the manifest: True" in out
    assert "transferred to N=4:" in out
    assert (tmp_path / "runs/depth_table_colab.png").is_file()


@pytest.mark.parametrize("name", ["finetune.ipynb", "depth_table.ipynb"])
def test_notebooks_open_with_a_badge_and_a_setup_cell(name):
    notebook = nbformat.read(ROOT / "colab" / name, as_version=4)
    assert "colab-badge.svg" in notebook.cells[0].source
    setup = notebook.cells[1].source
    assert "google.colab" in setup and "jax[tpu]" in setup and "jax[cuda12]" in setup
