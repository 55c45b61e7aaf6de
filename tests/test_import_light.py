"""``import hbird`` and ``hbird --help`` do not import what they do not use (issue 9)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HEAVY = ["torch", "timm", "matplotlib", "torchvision", "hbird.eval", "hbird.predictor"]
SRC = str(Path(__file__).resolve().parents[1] / "src")


def loaded_after(code: str) -> list[str]:
    probe = f"import sys\n{code}\nimport json; print(json.dumps(sorted(sys.modules)))"
    env = {**os.environ, "PYTHONPATH": SRC}
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, env=env, check=True
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "code",
    [
        "import hbird",
        "from hbird.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass",
        "import hbird.io.options, hbird.io.files, hbird.io.seeds",
    ],
)
def test_heavy_rooms_are_not_imported(code):
    loaded = loaded_after(code)
    assert [m for m in HEAVY if m in loaded] == []


def test_reading_a_preset_or_a_report_does_not_load_the_protocols():
    loaded = loaded_after("from hbird.eval.config import resolve_config\nimport hbird.eval.report")
    assert [m for m in ["hbird.eval.retrieval", "hbird.predictor", "torch"] if m in loaded] == []


def test_the_public_names_are_there_on_first_use():
    loaded = loaded_after("import hbird\nassert hbird.LabelSpec(task='depth').task == 'depth'")
    assert "hbird.labelspec" in loaded and "hbird.predictor" not in loaded
    import hbird
    from hbird.predictor import InContextPredictor

    assert hbird.InContextPredictor is InContextPredictor
    assert {"InContextPredictor", "evaluate", "Report", "LabelSpec"} <= set(dir(hbird))
