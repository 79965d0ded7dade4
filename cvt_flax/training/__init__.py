"""The trainer: `loop.train_and_evaluate(config, workdir)` is what `train.py` runs.

  config         the training config and its checks
  run            what a run resolves from its config before the loop (steps, model, mesh, state)
  loop           the training loop: steps, logging, evaluation, checkpoints, preemption, divergence
  steps          the train state and the pure train step
  optim          AdamW with the official schedule and weight-decay mask
  mixup          Mixup / CutMix on device
  checkpointing  Orbax checkpoints of the train state, the workdir probe, SIGTERM
  init_from      starting from another checkpoint (fine-tuning)
  metrics        metrics.jsonl, TensorBoard, the progress line

Importing this package imports nothing; `steps` and `optim` import without TensorFlow.
"""
