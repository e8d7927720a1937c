"""Orchestration: recipe schema, stage registry, runner, CLI and its commands (eval, compare).

The base library that stages import (errors, models, artifacts, context) is sd2.core."""
