"""Evaluations that are more than a metric."""
