"""VPT training: the loop (`loop.train`), checkpoints (`checkpoint`), batch -> model inputs (`data`), metrics."""
