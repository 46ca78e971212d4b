"""The paper's experiments: online regression (Section 5), MQAR (Section 6), the report."""
