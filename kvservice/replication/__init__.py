"""Asynchronous primary -> replica replication (see README, "Replication")."""
