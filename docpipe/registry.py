"""Model Registry: a version per published model, lineage as tags, aliases for roles.

``challenger`` marks the newest registered version; ``champion`` the one serving, moved only
by a passed gate and a passed smoke test; ``previous-champion`` the one it replaced. Each
champion version carries ``replaced_version``, so rollbacks can walk back more than once.
"""

from __future__ import annotations

from typing import Any

CHALLENGER, CHAMPION, PREVIOUS = "challenger", "champion", "previous-champion"
REPLACED = "replaced_version"
EVALUATION_METRICS = "evaluation.metrics"  # where the version's metrics.json is: the champion comparison reads it


class Registry:
    def __init__(self, tracking_uri: str, name: str):
        import mlflow

        self.client = mlflow.MlflowClient(tracking_uri)
        self.name = name

    def register(self, source: str, run_id: str, tags: dict[str, str]) -> str:
        """A new version from the model files at ``source`` (an artifact URI), alias challenger."""
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_registered_model(self.name)
        except MlflowException:
            self.client.create_registered_model(self.name, description="Document extraction (MiniCPM-V finetune)")
        version = self.client.create_model_version(self.name, source, run_id=run_id, tags=tags).version
        self.client.set_registered_model_alias(self.name, CHALLENGER, version)
        return str(version)

    def version_of(self, alias: str) -> Any | None:
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_model_version_by_alias(self.name, alias)
        except MlflowException:
            return None

    def tag(self, version: str, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_model_version_tag(self.name, version, key, value)

    def promote(self, version: str) -> str | None:
        """``version`` becomes champion; the champion it replaces, previous-champion. Returns that one."""
        current = self.version_of(CHAMPION)
        replaced = current.version if current and str(current.version) != version else None
        if replaced:
            self.client.set_registered_model_alias(self.name, PREVIOUS, replaced)
            self.client.set_model_version_tag(self.name, version, REPLACED, str(replaced))
        self.client.set_registered_model_alias(self.name, CHAMPION, version)
        return str(replaced) if replaced else None

    def rollback(self) -> tuple[str, str]:
        """Champion back to the version the current one replaced; returns (from, to)."""
        current = self.version_of(CHAMPION)
        if current is None or REPLACED not in current.tags:
            raise LookupError(f"{self.name}: no champion with an earlier one to roll back to")
        previous = current.tags[REPLACED]
        self.client.set_registered_model_alias(self.name, CHAMPION, previous)
        self.client.set_model_version_tag(self.name, current.version, "rolled_back", "true")
        before = self.client.get_model_version(self.name, previous).tags.get(REPLACED)
        if before:
            self.client.set_registered_model_alias(self.name, PREVIOUS, before)
        else:
            self.client.delete_registered_model_alias(self.name, PREVIOUS)
        return str(current.version), str(previous)


def champion_model(tracking_uri: str, registered: str, cache: str) -> tuple[str | None, str]:
    """The registered model's champion downloaded into ``cache`` and its name, or None and why not."""
    import mlflow

    champion = Registry(tracking_uri, registered).version_of(CHAMPION)
    if champion is None:
        return None, f"no champion of {registered}: pre-filled by the OCR baseline"
    folder = mlflow.artifacts.download_artifacts(
        artifact_uri=champion.source, dst_path=cache, tracking_uri=tracking_uri
    )
    return folder, f"{registered} version {champion.version}"
