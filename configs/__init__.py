"""Experiment configs, one file per stage family; `--config configs/X.py[:variant]` finds them here."""
