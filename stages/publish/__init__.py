"""Publishing a gated model: the MLflow Model Registry and a vLLM serving image.

- ``__main__``: the stage (``python -m stages.publish``): registers the patched model as
  ``challenger``; where the gate passed, builds, pushes and smoke-tests the serving image,
  then makes it ``champion`` (the one it replaces becomes ``previous-champion``).
- ``registry``: versions, lineage tags and aliases in the Model Registry.
- ``image``: the serving image: its flags, build, push and smoke test.
- ``rollback``: ``python -m stages.publish.rollback``: the champion alias back to the one before.
"""
