"""Full finetune of the MiniCPM-V family.

- ``__main__``: the stage (``python -m stages.finetune``): resolves the base model, checks
  every document fits ``model_max_length`` before training, launches ``train`` under torchrun
  and reports what it produced.
- ``train``: what each torchrun process runs: HF Trainer (DeepSpeed optional), resume from the
  latest complete checkpoint, metrics into the stage's MLflow run and TensorBoard.
- ``data``: the exported examples, their images, and the batches the adapter builds.
- ``adapters``: one module per model family (native transformers classes, remote code).
"""
