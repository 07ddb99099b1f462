"""Fault-injection helpers for tests: an LD_PRELOAD shim for failing syscalls,
byte-level damage to files, readers for the server's JSON log, and a TCP proxy
that cuts, black-holes, stalls, delays and replays traffic between nodes."""
