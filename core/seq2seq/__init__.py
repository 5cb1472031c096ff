"""Encoder-decoder models (T5, Flan-T5) on the engine's scheduler and routes: see `runner`."""
