"""The bundled demo model, so `textgen serve` works out of the box and offline.

``DEMO_MODEL_PATH`` is the absolute path of the ``model`` folder next to this file: a small
(~4M parameter, float32, ~16 MB) Llama-architecture causal LM in the ordinary Hugging Face layout
(``config.json``, ``generation_config.json``, ``model.safetensors``, ``tokenizer.json``,
``tokenizer_config.json``, ``chat_template.jinja``), trained by ``scripts/train_demo_model.py`` on the
Python standard library's sources. It writes Python-looking code after prompts such as ``"def "``;
it has never seen chat data. ``model/TRAINING.md`` records the data, hyperparameters, training time
and its validation loss against the same architecture with random weights.

This module imports nothing heavy (no torch, no transformers), so it is cheap to import from a CLI.
"""
from __future__ import annotations

import os

__all__ = ["DEMO_MODEL_PATH"]

DEMO_MODEL_PATH: str = os.path.join(os.path.dirname(os.path.abspath(__file__)), "model")
"""Absolute path of the demo model folder; pass it wherever a model id or local path is accepted."""
