"""Packaging beyond pyproject.toml: the top-level ``pipelines/`` directory also ships inside
the package as ``distflow.pipelines`` (so ``distflow run grpo`` works outside a checkout),
without moving the files. Everything else is configured in pyproject.toml."""
from setuptools import find_packages, setup

setup(packages=find_packages(include=["distflow", "distflow.*"]) + ["distflow.pipelines"],
      package_dir={"distflow.pipelines": "pipelines"})
