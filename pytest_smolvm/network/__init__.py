"""Networking for VMs: addressing (pure), slot allocation across processes (filelock).

TAP devices, the per-run network namespace and nftables policies build on these (issue 4).
"""
