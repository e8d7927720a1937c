"""Data shared by stages: prompt sources (prompts.py) and the distilled dataset (dataset.py)."""
