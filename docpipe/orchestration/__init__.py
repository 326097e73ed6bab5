"""What the Airflow DAG (``dags/doc_extraction.py``) needs beyond wiring, kept light so the DAG
parses fast: no torch, transformers or mlflow at import time (boto3 and mlflow only inside the
functions that run in tasks).

- ``plan``: a run decided before any stage starts: the form validated into config overrides,
  the batches to ingest, the run's folder, each stage's command line; the gate's decision and
  the run's summary read back from the stages' manifests.
- ``launchers``: one factory turning a stage into an operator: ``local`` (a subprocess),
  ``docker`` (DockerOperator) or ``kubernetes`` (KubernetesPodOperator).
"""
