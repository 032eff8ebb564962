"""Model builders: real checkpoints by name/path for users, tiny random ones built locally for tests and the demo."""
