"""The notebooks run headless, in order, on the tiny config: 01..03 train into one OUT_DIR, 04 samples
from it. Each notebook's first code cell holds its parameters; the test replaces it."""
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
TINY = ROOT / "configs" / "tiny.yaml"
ORDER = ["01_text_tokenizer", "02_image_tokenizer", "03_train_dalle", "04_sample_and_evaluate"]


def parameters(name: str, out_dir: Path) -> str:
    if name == "04_sample_and_evaluate":
        return (f"MODEL_DIR = {str(out_dir)!r}\nPROMPTS = ['a red circle', 'two blue squares']\n"
                "NUM_IMAGES = 2\nSEED = 0")
    return f"CONFIG = {str(TINY)!r}\nOUT_DIR = {str(out_dir)!r}\nOVERRIDES = []"


def run_notebook(name: str, out_dir: Path, workdir: Path) -> nbformat.NotebookNode:
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    first_code = next(cell for cell in nb.cells if cell.cell_type == "code")
    assert "Parameters" in first_code.source, f"{name}: the first code cell should be the parameters cell"
    first_code.source = parameters(name, out_dir)
    NotebookClient(nb, kernel_name="python3", timeout=300,
                   resources={"metadata": {"path": str(workdir)}}).execute()  # raises on a cell error
    return nb


def test_notebooks_ship_without_outputs():
    for name in ORDER:
        nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
        nbformat.validate(nb)
        assert all(not cell.get("outputs") and cell.get("execution_count") is None
                   for cell in nb.cells if cell.cell_type == "code"), f"{name} has outputs"


@pytest.mark.slow
def test_notebooks_run_in_order_on_the_tiny_config(tmp_path):
    out_dir = tmp_path / "run"
    executed = {name: run_notebook(name, out_dir, tmp_path) for name in ORDER}
    for folder in ("text_tokenizer", "image_tokenizer", "transformer"):
        assert (out_dir / folder).is_dir(), folder

    def images(name):
        return [output for cell in executed[name].cells if cell.cell_type == "code"
                for output in cell.get("outputs", []) if "image/png" in output.get("data", {})]

    assert images("01_text_tokenizer") and images("02_image_tokenizer") and images("03_train_dalle")
    assert len(images("04_sample_and_evaluate")) >= 3  # the samples and the two guidance grids
    text = "".join(output.get("text", "") for cell in executed["04_sample_and_evaluate"].cells
                   if cell.cell_type == "code" for output in cell.get("outputs", []))
    assert "whole caption correct:" in text
