"""Fault-injection helpers for tests: an LD_PRELOAD shim for failing syscalls,
byte-level damage to files, and readers for the server's JSON log."""
