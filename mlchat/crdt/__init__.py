"""The CRDT core: hybrid logical clocks, the pycrdt message log, LWW status registers, username
claims, version vectors, deltas and state digests. Pure: no I/O, no clock reads, no randomness."""
