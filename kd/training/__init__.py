"""Stage two's pieces: losses, the cache loader, optimization settings, checkpoints and metrics."""
