"""The built-in pipelines, shipped with the package as ``distflow.pipelines``:
``distflow run grpo`` finds ``grpo.py`` here (see ``distflow.run.load_pipeline``)."""
