"""Orchestration: recipe schema, stage registry, runner, artifact store, model loading, CLI."""
