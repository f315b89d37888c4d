"""Training: streaming shard dataset with length buckets, spatial split, the loop, checkpoints, DDP."""
