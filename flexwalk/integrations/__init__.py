"""Integrations with model libraries; the only place that knows they exist."""
