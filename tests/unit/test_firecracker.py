"""Unit tests of the Firecracker driver: API payloads against the published API specification,
the API client and the hybrid-vsock handshake against fake servers, process handling with a
fake ``firecracker`` executable, and backend selection.

``SPEC`` below is our own table, written from reading Firecracker's
``src/firecracker/swagger/firecracker.yaml`` (version 1.17.0-dev, commit 81b38b9d): for each
request body we send, the field names, their JSON types, required fields and enum values.
The spec itself is not needed at test time.
"""

from __future__ import annotations

import http.server
import json
import os
import socket
import socketserver
import stat
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pytest_smolvm.config import VMConfig
from pytest_smolvm.drivers import default_driver
from pytest_smolvm.drivers import firecracker as fc
from pytest_smolvm.drivers.base import TEMPLATE_MAC, Accel, Nic
from pytest_smolvm.errors import BootError, ConfigError
from pytest_smolvm.images import Image

RATE_LIMITER = "object"
# definition -> (required fields, {field: json type}, {field: allowed values})
SPEC: dict[str, tuple[set[str], dict[str, str], dict[str, tuple[str, ...]]]] = {
    "BootSource": ({"kernel_image_path"},
                   {"boot_args": "string", "initrd_path": "string", "kernel_image_path": "string"}, {}),
    "Drive": ({"drive_id", "is_root_device"},
              {"drive_id": "string", "partuuid": "string", "is_root_device": "boolean", "cache_type": "string",
               "is_read_only": "boolean", "path_on_host": "string", "rate_limiter": RATE_LIMITER,
               "io_engine": "string", "socket": "string"},
              {"cache_type": ("Unsafe", "Writeback"), "io_engine": ("Sync", "Async")}),
    "MachineConfiguration": ({"mem_size_mib", "vcpu_count"},
                             {"cpu_template": "string", "smt": "boolean", "mem_size_mib": "integer",
                              "track_dirty_pages": "boolean", "vcpu_count": "integer", "huge_pages": "string"},
                             {"huge_pages": ("None", "Transparent", "2M")}),
    "NetworkInterface": ({"host_dev_name", "iface_id"},
                         {"guest_mac": "string", "host_dev_name": "string", "iface_id": "string", "mtu": "integer",
                          "rx_rate_limiter": RATE_LIMITER, "tx_rate_limiter": RATE_LIMITER}, {}),
    "Vsock": ({"guest_cid", "uds_path"}, {"guest_cid": "integer", "uds_path": "string", "vsock_id": "string"}, {}),
    "InstanceActionInfo": ({"action_type"}, {"action_type": "string"},
                           {"action_type": ("FlushMetrics", "InstanceStart", "SendCtrlAltDel")}),
    "Vm": ({"state"}, {"state": "string"}, {"state": ("Paused", "Resumed")}),
    "SnapshotCreateParams": ({"mem_file_path", "snapshot_path"},
                             {"mem_file_path": "string", "snapshot_path": "string", "snapshot_type": "string"},
                             {"snapshot_type": ("Full", "Diff")}),
    "SnapshotLoadParams": ({"snapshot_path"},
                           {"enable_diff_snapshots": "boolean", "track_dirty_pages": "boolean",
                            "mem_file_path": "string", "mem_backend": "MemoryBackend", "snapshot_path": "string",
                            "resume_vm": "boolean", "network_overrides": "array:NetworkOverride",
                            "vsock_override": "VsockOverride", "clock_realtime": "boolean", "huge_pages": "string"},
                           {"huge_pages": ("Snapshot", "None", "Transparent", "2M")}),
    "MemoryBackend": ({"backend_type", "backend_path"}, {"backend_type": "string", "backend_path": "string"},
                      {"backend_type": ("File", "Uffd")}),
    "NetworkOverride": ({"iface_id", "host_dev_name"}, {"iface_id": "string", "host_dev_name": "string"}, {}),
    "VsockOverride": ({"uds_path"}, {"uds_path": "string"}, {}),
}
# (method, path template) -> body definition
ENDPOINTS = {
    ("PUT", "/boot-source"): "BootSource",
    ("PUT", "/drives/{drive_id}"): "Drive",
    ("PUT", "/machine-config"): "MachineConfiguration",
    ("PUT", "/network-interfaces/{iface_id}"): "NetworkInterface",
    ("PUT", "/vsock"): "Vsock",
    ("PUT", "/actions"): "InstanceActionInfo",
    ("PATCH", "/vm"): "Vm",
    ("PUT", "/snapshot/create"): "SnapshotCreateParams",
    ("PUT", "/snapshot/load"): "SnapshotLoadParams",
}
FULL_VM_CONFIGURATION_KEYS = {"balloon", "drives", "boot-source", "cpu-config", "logger", "machine-config",
                              "metrics", "memory-hotplug", "mmds-config", "network-interfaces", "pmem", "vsock",
                              "entropy"}
JSON_TYPES: dict[str, type | tuple[type, ...]] = {"string": str, "boolean": bool, "integer": int,
                                                  "object": dict}


def conforms(definition: str, body: Any, where: str = "") -> None:
    """Assert ``body`` is a valid ``definition`` per :data:`SPEC` (names, types, required, enums)."""
    required, props, enums = SPEC[definition]
    where = where or definition
    assert isinstance(body, dict), f"{where}: not an object"
    assert required <= body.keys(), f"{where}: missing required {required - body.keys()}"
    assert body.keys() <= props.keys(), f"{where}: fields not in the spec: {body.keys() - props.keys()}"
    for key, value in body.items():
        kind = props[key]
        if kind.startswith("array:"):
            assert isinstance(value, list), f"{where}.{key}: not an array"
            for i, item in enumerate(value):
                conforms(kind.split(":", 1)[1], item, f"{where}.{key}[{i}]")
        elif kind in SPEC:
            conforms(kind, value, f"{where}.{key}")
        else:
            py = JSON_TYPES[kind]
            assert isinstance(value, py) and not (kind == "integer" and isinstance(value, bool)), \
                f"{where}.{key}={value!r}: not {kind}"
        if key in enums:
            assert value in enums[key], f"{where}.{key}={value!r}: not in {enums[key]}"


def endpoint(method: str, path: str) -> str:
    for (m, template), definition in ENDPOINTS.items():
        prefix = template.split("{", 1)[0]
        if m == method and (path == template or ("{" in template and path.startswith(prefix)
                                                  and "/" not in path[len(prefix):])):
            return definition
    raise AssertionError(f"{method} {path} is not an endpoint of the spec we use")


def fake_image(tmp_path: Path) -> Image:
    d = tmp_path / "img"
    (d / "modules").mkdir(parents=True, exist_ok=True)
    for name in ("vmlinux", "boot-abc.cpio", "rootfs.ext4"):
        (d / name).write_bytes(b"x")
    return Image(name="default", path=d, kernel=d / "vmlinux", initrd=d / "boot-abc.cpio", rootfs=d / "rootfs.ext4",
                 rootfs_mib=1, digest="d" * 16, kernel_release="6.1", ssh_host_key_pub="")


KVM = Accel("kvm", "test")


# ---------------------------------------------------------------- payloads vs the spec


def test_two_vcpu_512mib_isolated_tap_vm_matches_the_spec(tmp_path: Path) -> None:
    config = VMConfig(vcpus=2, memory_mib=512, disk_mode="isolated", network="isolated")
    reqs = fc.boot_requests(config, fake_image(tmp_path), KVM, tap="smv0a1b2c3", guest_mac=TEMPLATE_MAC)
    for method, path, body in reqs:
        conforms(endpoint(method, path), body, f"{method} {path}")
    by_path = {path: body for _, path, body in reqs}
    assert by_path["/machine-config"] == {"vcpu_count": 2, "mem_size_mib": 512, "smt": False,
                                          "track_dirty_pages": False}
    assert by_path["/drives/rootfs"] == {"drive_id": "rootfs", "path_on_host": "disk.ext4", "is_root_device": False,
                                         "is_read_only": False, "cache_type": "Unsafe"}
    assert by_path["/network-interfaces/eth0"] == {"iface_id": "eth0", "host_dev_name": "smv0a1b2c3",
                                                   "guest_mac": TEMPLATE_MAC}
    assert by_path["/vsock"] == {"guest_cid": 3, "uds_path": "v.sock"}
    boot = by_path["/boot-source"]
    assert boot["kernel_image_path"].endswith("vmlinux") and boot["initrd_path"].endswith("boot-abc.cpio")
    flags = set(boot["boot_args"].split())
    assert {"smolvm.vsock=1", "smolvm.net=1", "reboot=k", "pci=off", "possible_cpus=2"} <= flags
    # configuration first, InstanceStart last
    assert reqs[-1] == ("PUT", "/actions", {"action_type": "InstanceStart"})
    assert [p for _, p, _ in reqs[:-1]] == ["/machine-config", "/boot-source", "/drives/rootfs", "/vsock",
                                           "/network-interfaces/eth0"]


def test_no_network_means_no_interface_and_shared_disk_writes_back(tmp_path: Path) -> None:
    reqs = fc.boot_requests(VMConfig(disk_mode="shared"), fake_image(tmp_path), KVM)
    assert not any(p.startswith("/network-interfaces") for _, p, _ in reqs)
    drive = next(b for _, p, b in reqs if p.startswith("/drives/"))
    assert drive["cache_type"] == "Writeback"
    with pytest.raises(ConfigError, match="needs a TAP"):
        fc.boot_requests(VMConfig(network="isolated"), fake_image(tmp_path), KVM)
    with pytest.raises(ConfigError, match="must not get a TAP"):
        fc.boot_requests(VMConfig(), fake_image(tmp_path), KVM, tap="t0")


def test_config_file_uses_full_vm_configuration_keys(tmp_path: Path) -> None:
    config = VMConfig(vcpus=2, memory_mib=512, network="isolated")
    doc = fc.config_file(fc.boot_requests(config, fake_image(tmp_path), KVM, tap="t0", guest_mac=TEMPLATE_MAC))
    assert set(doc) <= FULL_VM_CONFIGURATION_KEYS
    assert set(doc) == {"machine-config", "boot-source", "drives", "vsock", "network-interfaces"}
    conforms("MachineConfiguration", doc["machine-config"])
    conforms("BootSource", doc["boot-source"])
    conforms("Vsock", doc["vsock"])
    for d in doc["drives"]:
        conforms("Drive", d)
    for n in doc["network-interfaces"]:
        conforms("NetworkInterface", n)


def test_snapshot_payloads_match_the_spec(tmp_path: Path) -> None:
    create = fc.snapshot_create_payload(tmp_path / "state", tmp_path / "mem")
    conforms("SnapshotCreateParams", create)
    assert create["snapshot_type"] == "Full"
    load = fc.snapshot_load_payload(tmp_path / "state", tmp_path / "mem", network_overrides=[("eth0", "tap9")],
                                    vsock_uds_path="v.sock")
    conforms("SnapshotLoadParams", load)
    # exactly one of mem_file_path / mem_backend (the spec's rule)
    assert "mem_file_path" not in load and load["mem_backend"] == {"backend_type": "File",
                                                                    "backend_path": str(tmp_path / "mem")}
    assert load["resume_vm"] is True
    assert load["network_overrides"] == [{"iface_id": "eth0", "host_dev_name": "tap9"}]
    plain = fc.snapshot_load_payload("s", "m")
    conforms("SnapshotLoadParams", plain)
    assert "network_overrides" not in plain and "vsock_override" not in plain
    conforms("Vm", fc.vm_state_payload("Paused"))
    conforms("Vm", fc.vm_state_payload("Resumed"))
    for action in ("InstanceStart", "SendCtrlAltDel", "FlushMetrics"):
        conforms("InstanceActionInfo", fc.action_payload(action))


@pytest.mark.parametrize(("call", "match"), [
    (lambda: fc.machine_config_payload(3, 256), "vcpus=3.*use vcpus=4"),
    (lambda: fc.machine_config_payload(0, 256), "vcpus=0.*use vcpus=1"),
    (lambda: fc.machine_config_payload(34, 256), "vcpus=34"),
    (lambda: fc.drive_payload("r", "/d", cache_type="None"), "cache_type='None'"),
    (lambda: fc.vsock_payload("/v", guest_cid=2), "guest_cid=2"),
    (lambda: fc.action_payload("Reboot"), "action_type='Reboot'"),
    (lambda: fc.vm_state_payload("Stopped"), "state='Stopped'"),
    (lambda: fc.snapshot_create_payload("s", "m", "Incremental"), "snapshot_type='Incremental'"),
])
def test_values_firecracker_refuses_are_config_errors(call: Any, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        call()


@pytest.mark.parametrize("vcpus", [1, 2, 4, 32])
def test_vcpu_counts_firecracker_accepts(vcpus: int) -> None:
    conforms("MachineConfiguration", fc.machine_config_payload(vcpus, 128))


def test_argv() -> None:
    assert fc.firecracker_argv("/usr/bin/firecracker", Path("/r/vm/api.sock")) == \
        ["/usr/bin/firecracker", "--api-sock", "/r/vm/api.sock"]
    argv = fc.firecracker_argv("fc", Path("/a"), vm_id="vm1", config_file=Path("/c.json"), log_path=Path("/l"))
    assert argv == ["fc", "--api-sock", "/a", "--id", "vm1", "--config-file", "/c.json",
                    "--log-path", "/l", "--level", "Warning"]


# ---------------------------------------------------------------- API client over AF_UNIX


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


def fake_api(path: Path, log: list[tuple[str, str, Any]], fail: dict[str, str] | None = None) -> _Server:
    """A stand-in for Firecracker's API: records requests, answers 204 (or 400 + fault_message)."""

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _body(self) -> Any:
            n = int(self.headers.get("Content-Length") or 0)
            return json.loads(self.rfile.read(n)) if n else None

        def _reply(self, code: int, obj: Any = None) -> None:
            data = json.dumps(obj).encode() if obj is not None else b""
            self.send_response(code)
            self.send_header("Content-Length", str(len(data)))
            if data:
                self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            log.append(("GET", self.path, None))
            self._reply(200, {"id": "anonymous-instance", "state": "Not started", "vmm_version": "1.x",
                              "app_name": "Firecracker"})

        def _write(self) -> None:
            body = self._body()
            log.append((self.command, self.path, body))
            if fail and self.path in fail:
                self._reply(400, {"fault_message": fail[self.path]})
            else:
                self._reply(204)

        do_PUT = do_PATCH = _write

        def log_message(self, *args: Any) -> None:
            pass

        def address_string(self) -> str:
            return "uds"

    server = _Server(str(path), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """AF_UNIX paths must be short: pytest's tmp_path can be too long."""
    import tempfile

    d = Path(tempfile.mkdtemp(prefix="fct-", dir="/tmp"))
    yield d
    import shutil

    shutil.rmtree(d, ignore_errors=True)


def test_api_client_sends_json_and_maps_faults(short_dir: Path) -> None:
    log: list[tuple[str, str, Any]] = []
    server = fake_api(short_dir / "api.sock", log, fail={"/vsock": "Invalid CID"})
    try:
        api = fc.FirecrackerAPI(short_dir / "api.sock")
        api.wait_ready(lambda: True, 5)
        assert api.request("PUT", "/machine-config", fc.machine_config_payload(2, 512)) is None
        assert api.request("PATCH", "/vm", fc.vm_state_payload("Paused")) is None
        with pytest.raises(BootError, match=r"PUT /vsock returned 400: Invalid CID"):
            api.request("PUT", "/vsock", fc.vsock_payload("v.sock"))
    finally:
        server.shutdown()
        server.server_close()
    assert log[1] == ("PUT", "/machine-config", {"vcpu_count": 2, "mem_size_mib": 512, "smt": False,
                                                  "track_dirty_pages": False})
    assert log[2] == ("PATCH", "/vm", {"state": "Paused"})


def test_api_client_unreachable_socket_is_boot_error(short_dir: Path) -> None:
    with pytest.raises(BootError, match=r"api\.sock failed"):
        fc.FirecrackerAPI(short_dir / "api.sock", timeout=1).request("GET", "/")
    with pytest.raises(BootError, match="exited before its API socket"):
        fc.FirecrackerAPI(short_dir / "api.sock").wait_ready(lambda: False, 1)


# ---------------------------------------------------------------- hybrid vsock, host side


def fake_vsock(path: Path, *, refuse_first: int = 0, greeting: bytes = b"AGENT") -> tuple[socket.socket, list[bytes]]:
    """Firecracker's hybrid-vsock socket: reads ``CONNECT <port>\\n``; closes the first
    ``refuse_first`` connections (nobody listening in the guest), then answers ``OK 1073741824\\n``
    immediately followed by ``greeting`` (the agent's first bytes) and echoes what it receives."""
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(8)
    seen: list[bytes] = []

    def serve() -> None:
        n = 0
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            line = b""
            while not line.endswith(b"\n"):
                ch = conn.recv(1)
                if not ch:
                    break
                line += ch
            seen.append(line)
            n += 1
            if n <= refuse_first:
                conn.close()
                continue
            try:
                conn.sendall(b"OK 1073741824\n" + greeting)
                conn.sendall(conn.recv(100))
            except OSError:
                pass
            conn.close()

    threading.Thread(target=serve, daemon=True).start()
    return srv, seen


class _Proc:
    """Enough of Popen for a machine whose VMM 'runs'."""

    pid = 424242

    def __init__(self) -> None:
        self.code: int | None = None

    def poll(self) -> int | None:
        return self.code

    def wait(self, timeout: float | None = None) -> int | None:
        return self.code


def test_vsock_connect_handshake_keeps_the_first_bytes(short_dir: Path) -> None:
    srv, seen = fake_vsock(short_dir / "v.sock")
    try:
        sock = fc.vsock_connect(short_dir / "v.sock", 1024, timeout=5)
        with sock:
            assert sock.recv(5) == b"AGENT"  # not swallowed by the handshake
            sock.sendall(b"ping")
            assert sock.recv(4) == b"ping"
    finally:
        srv.close()
    assert seen == [b"CONNECT 1024\n"]


def test_machine_connect_retries_until_the_agent_listens(short_dir: Path) -> None:
    srv, seen = fake_vsock(short_dir / "v.sock", refuse_first=2)
    machine = fc.FirecrackerMachine(_Proc(), KVM, short_dir, short_dir / "disk.ext4")  # type: ignore[arg-type]
    try:
        with machine.connect(timeout=5) as sock:
            assert sock.recv(5) == b"AGENT"
    finally:
        srv.close()
    assert seen == [b"CONNECT 1024\n"] * 3


def test_machine_connect_gives_up_with_boot_error(short_dir: Path) -> None:
    proc = _Proc()
    machine = fc.FirecrackerMachine(proc, KVM, short_dir, short_dir / "disk.ext4")  # type: ignore[arg-type]
    t0 = time.monotonic()
    with pytest.raises(BootError, match=r"did not accept vsock port 1024 within 0\.5s"):
        machine.connect(timeout=0.5)
    assert time.monotonic() - t0 < 3
    proc.code = 1
    with pytest.raises(BootError, match="Firecracker exited with status 1"):
        machine.connect(timeout=5)


def test_unexpected_reply_is_refused(short_dir: Path) -> None:
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(short_dir / "v.sock"))
    srv.listen(1)

    def serve() -> None:
        conn, _ = srv.accept()
        conn.recv(100)
        conn.sendall(b"HTTP/1.1 400 Bad\n")
        time.sleep(0.5)
        conn.close()

    threading.Thread(target=serve, daemon=True).start()
    try:
        with pytest.raises(ConnectionError, match="unexpected hybrid-vsock reply"):
            fc.vsock_connect(short_dir / "v.sock", 1024, timeout=5)
    finally:
        srv.close()


# ---------------------------------------------------------------- process handling (fake binary)

FAKE_FIRECRACKER = r'''#!{python}
import json, os, sys, socketserver, http.server
args = sys.argv[1:]
sock = args[args.index("--api-sock") + 1]
log = open("requests.jsonl", "a")
print("fake firecracker serial console", flush=True)
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def address_string(self): return "uds"
    def log_message(self, *a): pass
    def reply(self, code, obj=None):
        data = json.dumps(obj).encode() if obj is not None else b""
        self.send_response(code); self.send_header("Content-Length", str(len(data))); self.end_headers()
        self.wfile.write(data)
    def do_GET(self): self.reply(200, {{"state": "Not started"}})
    def do_PUT(self):
        n = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(n)) if n else None
        log.write(json.dumps([self.command, self.path, body, os.getcwd()]) + "\n"); log.flush()
        if body and body.get("vcpu_count") == 8:
            return self.reply(400, {{"fault_message": "The vCPU number is invalid!"}})
        self.reply(204)
    do_PATCH = do_PUT
class S(socketserver.UnixStreamServer): pass
S(sock, H).serve_forever()
'''


@pytest.fixture
def fake_binary(short_dir: Path, monkeypatch: pytest.MonkeyPatch) -> fc.FirecrackerDriver:
    exe = short_dir / "bin" / "firecracker"
    exe.parent.mkdir()
    exe.write_text(FAKE_FIRECRACKER.format(python=sys.executable))
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    driver = fc.FirecrackerDriver(str(exe))
    monkeypatch.setattr(driver, "select_accel", lambda requested, image: KVM)
    monkeypatch.setattr(fc, "guest_vsock_support", lambda image: (True, "test"))
    return driver


def test_launch_configures_over_the_api_and_kill_reaps(short_dir: Path, fake_binary: fc.FirecrackerDriver) -> None:
    image = fake_image(short_dir)
    vmdir = short_dir / "vm"
    vmdir.mkdir()
    config = VMConfig(vcpus=2, memory_mib=512, network="isolated")
    nic = Nic(-1, "smv0tap", TEMPLATE_MAC)
    machine = fake_binary.launch(config, image, vmdir, nic)
    try:
        assert machine.alive()
        assert machine.disk_path == vmdir / "disk.ext4" and machine.disk_path.read_bytes() == b"x"
        assert json.loads((vmdir / "vmm.json").read_text())["pid"] == machine.pid
        assert not (vmdir / "firecracker.pid").exists()  # vmm.json is the one record the reaper needs
    finally:
        machine.kill()
    machine.kill()  # idempotent
    assert not machine.alive() and machine.exit_status() == -9
    sent = [json.loads(line) for line in (vmdir / "requests.jsonl").read_text().splitlines()]
    expected = fc.boot_requests(config, image, KVM, tap="smv0tap", guest_mac=TEMPLATE_MAC)
    assert [(m, p, b) for m, p, b, _ in sent] == expected
    assert {cwd for *_, cwd in sent} == {str(vmdir)}  # relative disk/vsock paths resolve in the VM dir
    assert "fake firecracker serial console" in (vmdir / "console.log").read_text()


def test_launch_failure_names_the_fault_and_leaves_no_process(short_dir: Path,
                                                              fake_binary: fc.FirecrackerDriver) -> None:
    vmdir = short_dir / "vm"
    vmdir.mkdir()
    with pytest.raises(BootError, match="vCPU number is invalid"):
        fake_binary.launch(VMConfig(vcpus=8), fake_image(short_dir), vmdir)
    pid = json.loads((vmdir / "vmm.json").read_text())["pid"]
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_snapshot_clone_loads_with_relative_paths(short_dir: Path, fake_binary: fc.FirecrackerDriver) -> None:
    image = fake_image(short_dir)
    snap = short_dir / "snap"
    snap.mkdir()
    (snap / "disk.ext4").write_bytes(b"snapdisk")
    vmdir = short_dir / "clone"
    vmdir.mkdir()
    machine = fake_binary.launch_clone(VMConfig(), image, snap, vmdir)
    machine.kill()
    sent = [json.loads(line) for line in (vmdir / "requests.jsonl").read_text().splitlines()]
    assert sent == [["PUT", "/snapshot/load", fc.snapshot_load_payload(snap / "state", snap / "mem"), str(vmdir)]]
    assert (vmdir / "disk.ext4").read_bytes() == b"snapdisk"
    key = fake_binary.snapshot_key(VMConfig(), image)
    assert key.startswith("fc-") and len(key) == 20
    assert key != fake_binary.snapshot_key(VMConfig(memory_mib=512), image)


# ---------------------------------------------------------------- selection


def test_missing_binary_is_a_config_error_with_the_fix(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ConfigError, match="firecracker binary, which is not on PATH; install"):
        fc.FirecrackerDriver()
    with pytest.raises(ConfigError, match=r"backend='firecracker'.*not on PATH.*releases.*or use backend='qemu'"):
        default_driver(VMConfig(backend="firecracker"))


def test_auto_falls_back_to_qemu_without_firecracker(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("shutil.which", lambda name: "/usr/bin/qemu-system-x86_64" if "qemu" in name else None)
    assert default_driver(VMConfig(backend="auto")).name == "qemu"


def test_auto_picks_firecracker_only_when_everything_works(monkeypatch: pytest.MonkeyPatch) -> None:
    import pytest_smolvm.drivers as drivers

    monkeypatch.setattr("shutil.which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(drivers, "firecracker_status", lambda image="default": (True, "ok"))
    monkeypatch.setattr(fc, "guest_vsock_support", lambda image: (True, "ok"))
    assert default_driver(VMConfig(backend="auto")).name == "firecracker"
    assert default_driver(VMConfig(backend="auto", accel="tcg")).name == "qemu"
    monkeypatch.setattr(fc, "guest_vsock_support", lambda image: (False, "no vsock"))
    assert default_driver(VMConfig(backend="auto")).name == "qemu"
    monkeypatch.setattr(drivers, "firecracker_status", lambda image="default": (False, "KVM canary failed"))
    with pytest.raises(ConfigError, match="backend='firecracker': KVM canary failed"):
        default_driver(VMConfig(backend="firecracker"))


def test_firecracker_runs_on_kvm_only(tmp_path: Path) -> None:
    driver = fc.FirecrackerDriver("/usr/bin/firecracker")
    with pytest.raises(ConfigError, match="accel='tcg' for backend 'firecracker'"):
        driver.select_accel("tcg", fake_image(tmp_path))


def test_image_without_vsock_modules_is_refused(tmp_path: Path) -> None:
    ok, why = fc.guest_vsock_support(fake_image(tmp_path))
    assert not ok and "vmw_vsock_virtio_transport" in why and "image build --force" in why
