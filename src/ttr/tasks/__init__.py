"""Synthetic data: MQAR (paper Section 6) and online regression (Section 5)."""
