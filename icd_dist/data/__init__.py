"""Data: raw dataset readers, label files, shards and manifest, input pipelines."""
