"""Training: engine, teacher sharing, the per-worker step loop, the schedule driver, metrics."""
