"""Data tooling for the submission: shard I/O, shard building, downloads, sample corpus."""
