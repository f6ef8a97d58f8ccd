"""The pytest side of :mod:`.evidence`: when it is gathered, the report section, the JUnit
properties and the JSON files (``--smolvm-evidence``, ``--smolvm-evidence-dir``).

- A function-scoped VM's host-measured figures are read at the end of its use (just before
  it is closed), for every test: they cost a few system calls. They go to
  ``item.user_properties`` (JUnit ``<property>`` entries, and they travel under xdist).
- The guest-reported part costs a command in the guest, so it is asked for only when the
  report shows it: a failing test's call (``failed``, the default), every test (``all``).
- The JSON of a test rides on its teardown report (``report.smolvm_evidence``, which xdist
  serialises), and the process that logs reports (the controller under xdist) writes it.
- ``--smolvm-evidence-files``: with the guest part, the guest tars the changed regular files
  (at most :data:`ARCHIVE_LIMIT` bytes); the tar rides on the report too (base64) and is
  written beside the JSON as ``<name>.<vm>.tar``. It is the guest's bytes: never extracted.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import re
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from .errors import SmolVMError
from .evidence import Evidence, combined_properties, safe_file_name
from .reports import redact_all

if TYPE_CHECKING:
    from .vm import SmolVM

#: The function-scoped VMs of a test, and their evidence by VM name.
EVIDENCE_VMS = pytest.StashKey[list["SmolVM"]]()
EVIDENCE_KEY = pytest.StashKey[dict[str, Evidence]]()
EVIDENCE_ARCHIVES = pytest.StashKey[dict[str, bytes]]()
REPORT_ATTR = "smolvm_evidence"
#: Bytes of one VM's changed-files archive (``--smolvm-evidence-files``); beyond, it is cut.
ARCHIVE_LIMIT = 8 * 1024 * 1024


class EvidenceHooks:
    """Registered by the plugin; ``mode`` is ``failed``, ``all`` or ``none``."""

    def __init__(self, mode: str, directory: str | None, writer: bool, files: bool = False) -> None:
        self.mode = mode
        self.files = files and directory is not None
        self.directory = Path(directory) if directory else None
        self.writer = writer  # not an xdist worker: this process writes the files
        self.written = 0

    def track(self, item: pytest.Item, vm: SmolVM) -> None:
        item.stash.setdefault(EVIDENCE_VMS, []).append(vm)

    def on_report(self, item: pytest.Item, report: pytest.TestReport, failed: bool) -> None:
        """From the plugin's makereport: the section for a failed setup or call (and a passing
        call with ``all``), while the VMs still run; the JSON on the teardown report."""
        if report.when == "teardown":
            found = item.stash.get(EVIDENCE_KEY, {})
            if found and (self.directory is not None or self.mode != "none"):
                archives = item.stash.get(EVIDENCE_ARCHIVES, {})
                vms = item.stash.get(EVIDENCE_VMS, [])
                setattr(report, REPORT_ATTR, {"nodeid": item.nodeid, "outcome": "failed" if failed else "passed",
                                              "vms": [_redacted(ev.to_dict(), vms) for ev in found.values()],
                                              "archives": {vm: base64.b64encode(blob).decode()
                                                           for vm, blob in archives.items()}})
            return
        if self.mode == "none" or not (report.failed or (self.mode == "all" and report.when == "call")):
            return
        for vm in item.stash.get(EVIDENCE_VMS, []):
            if not vm.alive:
                continue
            try:
                ev = vm.evidence(archive_limit=ARCHIVE_LIMIT if self.files else 0)
            except SmolVMError as exc:
                report.sections.append((f"smolvm evidence {vm.name}", f"not gathered: {exc}"))
                continue
            item.stash.setdefault(EVIDENCE_KEY, {})[vm.name] = ev
            if ev.archive:
                item.stash.setdefault(EVIDENCE_ARCHIVES, {})[vm.name] = ev.archive
            report.sections.append((f"smolvm evidence {vm.name}", ev.render()))

    def finish(self, item: pytest.Item, vm: SmolVM) -> None:
        """Just before ``vm`` is closed: its final host-measured figures (the guest part, if
        the report gathered one, is kept) and the test's JUnit properties."""
        if self.mode == "none" and self.directory is None:
            return  # evidence off: not even the host's figures
        found = item.stash.setdefault(EVIDENCE_KEY, {})
        try:
            now = vm.evidence(guest=False)
        except SmolVMError:
            return
        earlier = found.get(vm.name)
        found[vm.name] = dataclasses.replace(now, guest_reported=earlier.guest_reported if earlier else None)
        props = dict(combined_properties(found.values()))
        item.user_properties[:] = [(k, v) for k, v in item.user_properties if k not in props] + list(props.items())

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        data = getattr(report, REPORT_ATTR, None)
        if not self.writer or self.directory is None or report.when != "teardown" or not isinstance(data, dict):
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        target = self.directory / safe_file_name(str(data.get("nodeid", report.nodeid)))
        archives = data.pop("archives", None)
        if isinstance(archives, dict) and archives:
            data["archives"] = {}
            for vm, text in list(archives.items())[:16]:
                name = f"{target.stem}.{re.sub(r'[^A-Za-z0-9._-]', '_', str(vm))[:60]}.tar"
                blob = base64.b64decode(str(text), validate=False)[:ARCHIVE_LIMIT]
                self._write(self.directory / name, blob)
                data["archives"][str(vm)] = {"file": name, "bytes": len(blob), "cut": len(blob) >= ARCHIVE_LIMIT}
        self._write(target, json.dumps(data, indent=1, sort_keys=True).encode())
        self.written += 1

    def _write(self, target: Path, data: bytes) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".tmp-")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, target)  # readers never see half a file

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if self.written and self.directory is not None:
            terminalreporter.write_line(f"smolvm: evidence of {self.written} test(s) written to {self.directory}")


def _redacted(data: Any, vms: list[SmolVM]) -> Any:
    """``data`` with the VMs' env secrets masked in every string (as in the report's text):
    a leftover process's argv or a path may hold one."""
    if isinstance(data, str):
        return redact_all(data, vms)
    if isinstance(data, dict):
        return {k: _redacted(v, vms) for k, v in data.items()}
    if isinstance(data, (list, tuple)):  # dataclasses.asdict keeps tuples
        return [_redacted(v, vms) for v in data]
    return data
