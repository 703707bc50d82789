"""Tests of the restore part: NBD writer, launch descriptions, restore jobs, CLI."""
