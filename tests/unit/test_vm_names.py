"""VM names are unique across threads (the warm pool and the test both create VMs)."""

from __future__ import annotations

import threading

from pytest_smolvm import SmolVM, VMConfig


def test_names_from_many_threads_never_repeat_their_number() -> None:
    names: list[str] = []
    lock = threading.Lock()

    def make() -> None:
        for _ in range(200):
            name = SmolVM(VMConfig()).name  # not started: nothing is created on the host
            with lock:
                names.append(name.rsplit("-", 1)[0])

    threads = [threading.Thread(target=make) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(names) == 1600 and len(set(names)) == 1600
