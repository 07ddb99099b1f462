"""On-disk state: record codec, write-ahead log, snapshots, recovery and repair."""
