"""VPT training: the loop (`loop.train`), checkpoints (`checkpoint`; on-disk layout in `layout`), batch -> model
inputs (`data`), metrics."""
