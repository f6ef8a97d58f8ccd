"""Networking for VMs: addressing (pure), slot allocation across processes (filelock), the
run's namespace, TAPs and nftables policies (hub, netns, policy), names in ``allow`` and the
run's resolver (names, dns, resolver), ``vm.network`` and its live changes (state).
"""
