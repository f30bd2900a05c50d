"""What every training job shares.

  loop            the run skeleton of every job that trains: resume, config checks, steps, evaluations, checkpoint
                  cadence, SIGTERM/SIGINT, segments, FINISHED, cleanup (`TrainingRun`, `Evaluation`)
  optim           Adam/AdamW with warmup and cosine or constant schedules
  step            the pure pretraining train step, its state, layout and jitted forms; the evaluation step
  lease           one writer per workdir: the lease a running run holds (heartbeat, take-over of a stale one)
  checkpoint      Orbax checkpoints: save, resume from the newest readable step, read a step's config and palette
  run_log         metrics (progress line, TensorBoard, ``metrics.jsonl``) and the preemption watcher (SIGTERM/SIGINT)
  metric_writers  the progress line and TensorBoard event files
  mfu             FLOP accounting: model FLOPs per token (causal attention counted once), device peaks, TFLOP/s, MFU
  segments        each invocation's steps and wall time (``segments.json``)
  validation      exact held-out NLL over a whole split
  lr_ladder       the learning-rate search's ladder and its stopping rule

May import: the leaves, data, models, reports and config.
"""
