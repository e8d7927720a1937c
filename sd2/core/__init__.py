"""The base library every stage imports: errors, model resolution and loading, artifacts, and the
stage context. Nothing here imports sd2.pipeline (the orchestration) or sd2.stages."""
