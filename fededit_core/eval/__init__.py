"""Evaluation: CounterFact / zsRE metrics, the centralised reference and plain-text tables."""
