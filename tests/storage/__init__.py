"""Tests of the storage package: repository, backends, prune, GC, verify, CLI."""
