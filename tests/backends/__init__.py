"""Tests of the in-tree backend plugins (probes, backend classes, attention kernels)."""
