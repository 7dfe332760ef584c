"""Data: users' data sets (JSONL / Parquet rows, per-epoch shuffling, a resumable cursor),
chat templates, and the Python stdlib corpus that ships with every machine (lm_diloco).

``from distflow.data import stdlib_corpus, windows, window_starts`` keeps working as before
this module became a package.
"""
from distflow.data.corpus import stdlib_corpus, window_starts, windows
from distflow.data.dataset import Cursor, Dataset, load_rows

__all__ = ["Cursor", "Dataset", "load_rows", "stdlib_corpus", "window_starts", "windows"]
