"""Llama / Qwen2-style decoder LMs, HF checkpoint I/O and tokenizers."""
from distflow.models.cache import KVCache
from distflow.models.config import PRESETS, ModelConfig, preset
from distflow.models.decoder import DecoderLM
from distflow.models.hf import load_pretrained, save_pretrained
from distflow.models.tokenizer import CharTokenizer, HFTokenizer, Tokenizer, load_tokenizer

__all__ = ["PRESETS", "CharTokenizer", "DecoderLM", "HFTokenizer", "KVCache", "ModelConfig", "Tokenizer",
           "load_pretrained", "load_tokenizer", "preset", "save_pretrained"]
