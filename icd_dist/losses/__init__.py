"""Losses: the CSS baselines (css.py), ICD's reference distillation (icd.py), and one loss
object per method (methods.py)."""
