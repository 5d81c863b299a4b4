"""Training: the one loop, its objectives, optimiser and schedule, checkpoints, processes (DDP/FSDP).

Nothing on the inference side (infer/, serving, evaluation) imports this package."""
