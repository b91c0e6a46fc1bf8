"""Adapters that customise a model at run time: textual-inversion embeddings and LoRA."""
