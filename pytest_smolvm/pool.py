"""A warm pool: while a test runs, the next VM of the same shape is already being started.

The pool works in one long-lived thread (a VMM's lifetime is tied to this process by a
watchdog, not to the thread that started it). A pooled VM is started (normally as a
snapshot clone) and warmed up: one ``sh -c true`` translates the exec path under TCG, so the
test's first command doesn't pay for it. The pool never starts a VM the host cannot afford (:func:`capacity_allows`);
a test that finds no ready VM starts its own in its own thread, as if there were no pool.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import os
import re
import threading
from typing import Any

from .checkpoints import Checkpoint
from .config import VMConfig
from .drivers import Driver
from .runs import live_vm_count
from .vm import SmolVM

#: Host memory kept free beyond the guests' own RAM (MiB), and the per-VM VMM overhead
#: (TCG's translation cache dominates: ~120 MiB measured).
RESERVE_MIB = 1024
VMM_OVERHEAD_MIB = 160
#: Shapes (configs) the pool keeps spares for: the most recently asked-for ones. A suite that
#: walks through many shapes must not end up holding a spare of each.
MAX_SHAPES = 2
MAX_ERRORS = 20


def mem_available_mib() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) // 1024
    except OSError:
        pass
    return None


def capacity_allows(memory_mib: int) -> bool:
    """Whether one more VM of ``memory_mib`` fits in the host's RAM and CPUs."""
    avail = mem_available_mib()
    if avail is not None and avail < memory_mib + VMM_OVERHEAD_MIB + RESERVE_MIB:
        return False
    return live_vm_count() < 4 * (os.cpu_count() or 1)


def poolable(config: VMConfig) -> bool:
    """Only disposable, interchangeable VMs are started ahead: a shared disk must not be
    mounted by the next VM while the current one still writes to it, and a VM whose disk is
    to be retained is one the test asked for, not a spare."""
    return config.disk_mode == "isolated" and not config.retain_disk_on_delete


def config_key(config: VMConfig) -> str:
    """A stable key for configs that produce interchangeable VMs."""
    fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    fields["env"] = dict(sorted(config.env.items()))
    return json.dumps(fields, sort_keys=True, default=list)


def shape_group(config: VMConfig) -> str:
    """A name for the VMs ``config`` makes, the same for every config whose VMs a pool can
    hand out for one another (:func:`config_key`), readable first (image, vCPUs, memory,
    disk, network), then a digest of the rest. Safe as an xdist group name. ``env`` values
    never reach it (a name ends up in node ids and logs; a short secret could be guessed
    from a digest): configs that differ only in them share a name."""
    fields = json.loads(config_key(config.replace(env={k: "" for k in config.env})))
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:8]
    image = re.sub(r"[^A-Za-z0-9_.-]", "_", config.image)[-40:]
    disk = f"{config.disk_size_mib}m" if config.disk_size_mib else "base"
    return f"smolvm-{image}-{config.vcpus}cpu-{config.memory_mib}m-{disk}-{config.network}-{digest}"


class VMPool:
    """Keeps up to ``size`` started VMs ready per config. ``size=0`` disables pre-starting."""

    def __init__(self, size: int = 1, warmup: str | None = "true") -> None:
        self.size = size
        self.warmup = warmup
        self._ready: dict[str, collections.deque[SmolVM]] = collections.defaultdict(collections.deque)
        self._wanted: collections.OrderedDict[str, tuple[VMConfig, Driver, Checkpoint | None]] = \
            collections.OrderedDict()
        self._cond = threading.Condition()
        self._closed = False
        self._busy = False
        self._inflight: str | None = None
        #: What went wrong in the pool thread, most recent last (bounded).
        self.errors: collections.deque[BaseException] = collections.deque(maxlen=MAX_ERRORS)
        self.stats = {"hits": 0, "misses": 0, "prestarted": 0}
        self._thread: threading.Thread | None = None

    def _ensure_thread(self) -> None:
        # (Re)started on demand: should the thread ever end, the next acquire brings it back.
        if (self._thread is None or not self._thread.is_alive()) and self.size > 0:
            self._thread = threading.Thread(target=self._loop, name="smolvm-pool", daemon=True)
            self._thread.start()

    def acquire(self, config: VMConfig, driver: Driver, *, checkpoint: Checkpoint | None = None,
                **kw: Any) -> SmolVM:
        """A started VM for ``config`` (a clone of ``checkpoint``, if given): a ready one
        from the pool, else one started now.

        Either way the pool is asked to have the next one ready.
        """
        key = config_key(config) + (f" checkpoint {checkpoint.path}" if checkpoint is not None else "")
        evicted: list[SmolVM] = []
        with self._cond:
            vm = None
            if checkpoint is not None and not checkpoint.exists:  # removed: no spares, and the start below says why
                self._wanted.pop(key, None)
                evicted.extend(self._ready.pop(key, ()))
            # The pool is starting exactly this shape right now: starting a second one in
            # parallel would only compete with it for the CPU, so wait for it.
            self._cond.wait_for(lambda: self._inflight != key or bool(self._ready[key]), timeout=120)
            while self._ready[key]:
                candidate = self._ready[key].popleft()
                if candidate.alive:
                    vm = candidate
                    break
                candidate.close()
            if self.size > 0 and not self._closed and poolable(config) and (checkpoint is None or checkpoint.exists):
                self._wanted[key] = (config, driver, checkpoint)
                self._wanted.move_to_end(key)
                while len(self._wanted) > MAX_SHAPES:
                    old, _ = self._wanted.popitem(last=False)
                    evicted.extend(self._ready.pop(old, ()))
                self._ensure_thread()
                self._cond.notify_all()
        for spare in evicted:
            spare.close()
        if vm is not None:
            self.stats["hits"] += 1
            vm.arm_lifetime()
            return vm
        self.stats["misses"] += 1
        return SmolVM(config, driver=driver, checkpoint=checkpoint, **kw).start()

    def _next_job(self) -> tuple[str, VMConfig, Driver, Checkpoint | None] | None:
        for key, (config, driver, checkpoint) in reversed(self._wanted.items()):
            if len(self._ready[key]) < self.size and (checkpoint is None or checkpoint.exists):
                return key, config, driver, checkpoint
        return None

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._closed and ((job := self._next_job()) is None
                                            or not capacity_allows(job[1].memory_mib)):
                    self._cond.wait(timeout=0.5)
                if self._closed or job is None:
                    return
                self._busy = True
                self._inflight = job[0]
            key, config, driver, checkpoint = job
            vm = self._prestart(config, driver, checkpoint)
            with self._cond:
                self._busy, self._inflight = False, None
                if vm is None:
                    # The test that asks next starts its own VM and meets the error itself.
                    self._wanted.pop(key, None)
                unwanted = self._closed or key not in self._wanted  # evicted while it started
                if vm is not None and not unwanted:
                    self._ready[key].append(vm)
                    self.stats["prestarted"] += 1
                self._cond.notify_all()
            if vm is not None and unwanted:
                self._close_quietly(vm)
            if self._closed:
                return

    def _prestart(self, config: VMConfig, driver: Driver, checkpoint: Checkpoint | None = None) -> SmolVM | None:
        """A started, warmed-up VM, or None. Nothing escapes: whatever goes wrong (a driver
        bug, a MemoryError, a hook that exits) is recorded and the VM is torn down, so the
        thread lives on and a failed warm-up leaves no VMM, directory or TAP behind."""
        vm = None
        try:
            vm = SmolVM(config, driver=driver, checkpoint=checkpoint).start()
            if self.warmup:
                vm.run(self.warmup)
                vm.transcript.clear()
            return vm
        except BaseException as exc:
            self.errors.append(exc)
            if vm is not None:
                self._close_quietly(vm)
            return None

    def _close_quietly(self, vm: SmolVM) -> None:
        try:
            vm.close()
        except BaseException as exc:
            self.errors.append(exc)

    def wait_idle(self, timeout: float = 60.0) -> bool:
        """Block until the pool has nothing left to start (benchmarks and tests)."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._busy and self._next_job() is None, timeout=timeout)

    def close(self) -> None:
        """Stop pre-starting and close every idle VM. Idempotent."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            idle = [vm for q in self._ready.values() for vm in q]
            self._ready.clear()
        if self._thread is not None:
            self._thread.join(timeout=120)
        for vm in idle:
            vm.close()
