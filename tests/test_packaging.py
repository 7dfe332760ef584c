"""``pipelines/`` ships with the package: ``distflow run grpo`` works outside the checkout."""
from __future__ import annotations

import subprocess
import sys
import zipfile

import pytest

from harness import REPO


def test_builtin_pipeline_by_name_from_another_directory(tmp_path):
    code = ("from distflow.run import load_pipeline, builtin_pipelines\n"
            "print(sorted(builtin_pipelines()), load_pipeline('grpo').name, load_pipeline('sft.py').name)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("] ")[1].split() == ["grpo", "sft"]
    assert {"grpo", "ppo", "sft", "bandit", "lm_diloco"} <= set(eval(out.stdout.split("] ")[0] + "]"))


def test_unknown_pipeline_name_lists_the_builtins(tmp_path):
    from distflow.run import load_pipeline
    with pytest.raises(FileNotFoundError, match=r"not a built-in pipeline \(bandit, grpo, .*sft"):
        load_pipeline("grpoo")


def test_wheel_contains_the_pipelines(tmp_path):
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation",
                          "-q", "-w", str(tmp_path)], capture_output=True, text=True, timeout=110)
    if out.returncode != 0:
        pytest.fail(out.stderr[-2000:])
    names = zipfile.ZipFile(next(tmp_path.glob("distflow-*.whl"))).namelist()
    for name in ("grpo", "ppo", "sft", "bandit", "lm_diloco", "__init__"):
        assert f"distflow/pipelines/{name}.py" in names
    assert "distflow/data/dataset.py" in names
