"""Chains: specs, sandboxed templates, the hop graph runner, runs and the context store."""
