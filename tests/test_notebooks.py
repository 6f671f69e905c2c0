"""Both notebooks run headless (nbclient) against tiny models: the cell tagged `parameters` is replaced, nothing
else, and a failing cell fails the test."""

from __future__ import annotations

import shutil
from pathlib import Path

import nbclient
import nbformat
import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent


def execute(name: str, parameters: str, workdir: Path) -> nbformat.NotebookNode:
    notebook = nbformat.read(REPO / "notebooks" / f"{name}.ipynb", as_version=4)
    cells = [c for c in notebook.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(cells) == 1, "one parameters cell"
    cells[0].source = parameters
    nbclient.NotebookClient(notebook, timeout=500, kernel_name="python3",
                            resources={"metadata": {"path": str(workdir)}}).execute()  # fmt: skip
    return notebook


def outputs(notebook: nbformat.NotebookNode) -> str:
    texts = [o.get("text", "") + o.get("data", {}).get("text/plain", "")
             for c in notebook.cells if c.cell_type == "code" for o in c.get("outputs", [])]  # fmt: skip
    return "".join(texts)


@pytest.mark.timeout(600)
def test_quickstart_runs(built_models, tmp_path):
    from PIL import Image
    from conftest import write_vl_tokenizer

    hf = tmp_path / "hf"
    shutil.copytree(built_models("qwen3_5_vl").hf_dir, hf)
    write_vl_tokenizer(hf)  # conversion copies the tokenizer files
    image = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(image)
    parameters = (f'INSTALL = ""\nHF_CHECKPOINT = "{hf}"\nCONVERTED = "{tmp_path / "converted"}"\n'
                  f'IMAGE = "{image}"\nMAX_NEW_TOKENS = 8')  # fmt: skip
    notebook = execute("quickstart", parameters, tmp_path)
    assert (tmp_path / "converted" / "qwen_jax.json").is_file()
    assert "Model(qwen3_5, 4 layers" in outputs(notebook)


@pytest.mark.timeout(600)
def test_finetune_runs_and_learns(tmp_path):
    parameters = f'INSTALL = ""\nWORK_DIR = "{tmp_path}"\nSTEPS = 6\nSEQ_LEN = 64\nBATCH_SIZE = 2'
    notebook = execute("finetune", parameters, tmp_path)
    text = outputs(notebook)
    assert "before:" in text and "after:" in text and (tmp_path / "model" / "qwen_jax.json").is_file()
    first, last = (float(x) for x in text.split("loss ")[1].split()[0:3:2])
    assert last < first, text  # six steps on six conversations lower the loss
