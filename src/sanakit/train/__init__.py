"""The training system: resumable state, crash-safe checkpoints and the loop."""
