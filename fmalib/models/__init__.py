"""Foundation models: open_clip CLIP and segment-anything SAM (real or tiny), and the only code that knows
checkpoints (``checkpoints``)."""
