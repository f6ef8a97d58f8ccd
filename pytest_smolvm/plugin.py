"""pytest hooks of pytest-smolvm. Thin: the engine lives outside this module."""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import sys
import threading
import warnings
from collections.abc import Callable, Generator
from typing import Any

import pytest

from . import hookspecs
from .checkpoints import Checkpoint
from .checkpoints import remove_all as remove_checkpoints
from .config import VMConfig, config_from_layers
from .drivers import Driver, default_driver
from .errors import BootError, ConfigError, ImageError, SmolVMError
from .evidence_hooks import EvidenceHooks
from .fixtures import PLUGIN_NAME, smolvm, smolvm_config, smolvm_factory, smolvm_prepared, smolvm_session
from .host import host_name
from .images.declared import load as load_declared
from .images.provision import default_built
from .markers import MARKER_DOC, marker_layers
from .network.userns import unavailable as network_unavailable
from .paths import runtime_dir
from .pool import VMPool, shape_group
from .prepared import release_all as release_prepared
from .reaper import Leftover, reap
from .reporting import LiveOutput, sanitize
from .reports import host_lines, redact_all, vm_sections
from .runs import current_run_id, set_run_id
from .settings import (
    EVIDENCE,
    EVIDENCE_DIR,
    OPTIONS,
    POOL,
    UPSTREAM_CA,
    evidence_settings,
    exceeds_ceiling,
    network_ceiling,
    pool_size,
    session_layers,
    upstream_ca_bundle,
)
from .vm import SmolVM

__all__ = ["smolvm", "smolvm_config", "smolvm_factory", "smolvm_prepared", "smolvm_session"]

VM_FIXTURES = frozenset({"smolvm", "smolvm_factory", "smolvm_config"})
CONFIG_KEY = pytest.StashKey[VMConfig]()
VMS_KEY = pytest.StashKey[list[tuple[SmolVM, int]]]()
REPORTS_KEY = pytest.StashKey[dict[str, pytest.TestReport]]()
CONSOLE_TAIL_LINES = 60
INFRA_PROPERTY = "smolvm_infra_failure"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("smolvm", "hardware-isolated microVMs (pytest-smolvm)")
    for opt in OPTIONS:
        group.addoption(opt.cli, dest=f"smolvm_{opt.field}", default=None, metavar="VALUE",
                        help=f"{opt.help} [env {opt.env}, ini {opt.ini}]")
        parser.addini(opt.ini, help=opt.help, default="")
    group.addoption("--smolvm-no-snapshot", action="store_const", const="false", dest="smolvm_snapshot",
                    help="cold-boot every VM instead of restoring snapshot clones")
    group.addoption(POOL.cli, dest="smolvm_pool", default=None, metavar="N",
                    help=f"{POOL.help} [env {POOL.env}, ini {POOL.ini}]")
    parser.addini(POOL.ini, help=POOL.help, default="")
    group.addoption(UPSTREAM_CA.cli, dest="smolvm_upstream_ca_bundle", default=None, metavar="PEM",
                    help=f"{UPSTREAM_CA.help} [env {UPSTREAM_CA.env}, ini {UPSTREAM_CA.ini}]")
    parser.addini(UPSTREAM_CA.ini, help=UPSTREAM_CA.help, default="")
    for opt, metavar in ((EVIDENCE, "MODE"), (EVIDENCE_DIR, "DIR")):
        group.addoption(opt.cli, dest=f"smolvm_{opt.field}", default=None, metavar=metavar,
                        help=f"{opt.help} [env {opt.env}, ini {opt.ini}]")
        parser.addini(opt.ini, help=opt.help, default="")
    group.addoption("--smolvm-evidence-files", action="store_true", default=None, dest="smolvm_evidence_files",
                    help="with --smolvm-evidence-dir: also the changed files of each VM whose guest part was "
                         "gathered, as a tar the guest makes (hostile content, never extracted; at most "
                         "8 MiB a VM) [ini smolvm_evidence_files]")
    parser.addini("smolvm_evidence_files", type="bool", default=False, help="see --smolvm-evidence-files")
    group.addoption("--smolvm-keep-failed", action="store_true", default=None, dest="smolvm_keep_failed",
                    help="keep a failed test's VM running and print how to reach it [ini smolvm_keep_failed]")
    parser.addini("smolvm_keep_failed", type="bool", default=False,
                  help="keep a failed test's VM running and print how to reach it")
    group.addoption("--smolvm-group-by-shape", action="store_true", default=None, dest="smolvm_group_by_shape",
                    help="give every VM test an xdist_group per VM shape, so --dist loadgroup keeps tests "
                         "of one shape on one worker and its warm pool and snapshot are reused "
                         "[ini smolvm_group_by_shape]")
    parser.addini("smolvm_group_by_shape", type="bool", default=False,
                  help="an xdist_group per VM shape for every VM test (use with --dist loadgroup)")


def pytest_addhooks(pluginmanager: pytest.PytestPluginManager) -> None:
    pluginmanager.add_hookspecs(hookspecs)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", MARKER_DOC)
    workerinput = getattr(config, "workerinput", None)
    if workerinput is not None and "smolvm_run_id" in workerinput:
        set_run_id(workerinput["smolvm_run_id"])
    elif "SMOLVM_RUN_ID" not in os.environ:
        set_run_id(secrets.token_hex(4))
    try:
        state = SmolVMPlugin(config)
    except ConfigError as exc:
        raise pytest.UsageError(f"pytest-smolvm: {exc}") from None
    if workerinput is None or workerinput.get("smolvm_domain") != reap_domain():
        # Leftovers of runs whose owner died (kill -9, OOM, CI timeout); never a live run's.
        # The controller reaps its own host; a worker on another host (xdist --tx ssh=/socket=)
        # reaps that host, which the controller cannot see.
        try:
            state.reaped = reap()
        except ConfigError as exc:  # an unsafe runtime directory: stop before using it
            raise pytest.UsageError(f"pytest-smolvm: {exc}") from None
    config.pluginmanager.register(state, PLUGIN_NAME)
    config.pluginmanager.register(state.evidence, "smolvm-evidence")
    state.signals.install()
    if state.group_by_shape:
        config.pluginmanager.register(_ShapeGrouping(state), "smolvm-shape-groups")
    if config.pluginmanager.hasplugin("xdist"):
        config.pluginmanager.register(_XdistHooks(state), "smolvm-xdist")


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived (a cancelled CI job): pytest unwinds as for Ctrl-C, so every fixture
    tears its VMs down instead of leaving them to the parent-death signal and the next reap."""


class SignalUnwinder:
    """While installed, SIGTERM raises :class:`Terminated` in the main thread; a second one
    kills the process at once (the default action), as a second Ctrl-C would. An inherited
    SIG_IGN for SIGINT is replaced by Python's KeyboardInterrupt handler."""

    def __init__(self) -> None:
        self.previous: Any = None
        self.previous_int: Any = None

    def install(self) -> None:
        # Only the main thread may set handlers, and a handler someone else installed (or an
        # inherited SIG_IGN) is their decision: only the default action is replaced.
        if threading.current_thread() is not threading.main_thread():
            return
        # A shell starts background jobs (`pytest … &` in a script) with SIGINT ignored, and
        # Python then installs no KeyboardInterrupt handler: `kill -INT` was swallowed and the
        # run went on to report a pass. A test run that was asked to stop must stop.
        if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
            self.previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
        if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
            return
        self.previous = signal.signal(signal.SIGTERM, self._raise)

    def _raise(self, signum: int, frame: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        raise Terminated(f"pytest-smolvm: {signal.Signals(signum).name} received, tearing the VMs down")

    def restore(self) -> None:
        if self.previous_int is not None:
            if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
                signal.signal(signal.SIGINT, self.previous_int)
            self.previous_int = None
        if self.previous is None:
            return
        if signal.getsignal(signal.SIGTERM) in (self._raise, signal.SIG_DFL):
            signal.signal(signal.SIGTERM, self.previous)
        self.previous = None


def reap_domain() -> str:
    """What one reap covers: this host's runtime directory. Workers whose domain is not the
    controller's (on another host, or with another runtime directory) reap their own."""
    return f"{host_name()}:{runtime_dir()}"


class _XdistHooks:
    """Shares the controller's run id with its workers (resources of one run share a stamp),
    and collects what each worker did (its host, VMs, pool hits, leftovers it reaped)."""

    def __init__(self, state: SmolVMPlugin) -> None:
        self.state = state

    @pytest.hookimpl(optionalhook=True)
    def pytest_configure_node(self, node: Any) -> None:
        node.workerinput["smolvm_run_id"] = current_run_id()
        node.workerinput["smolvm_domain"] = reap_domain()

    @pytest.hookimpl(optionalhook=True)
    def pytest_testnodedown(self, node: Any, error: object) -> None:
        out = getattr(node, "workeroutput", None) or {}
        if isinstance(out.get("smolvm"), dict):
            self.state.workers[str(node.gateway.id)] = out["smolvm"]


class _ShapeGrouping:
    """``--smolvm-group-by-shape``: an ``xdist_group`` per VM shape (:func:`shape_group`) on
    every test that starts VMs and has no group of its own, so ``--dist loadgroup`` sends the
    tests of one shape to one worker, whose warm pool and snapshot then serve them all."""

    def __init__(self, state: SmolVMPlugin) -> None:
        self.state = state

    # tryfirst: xdist's worker turns groups into node id suffixes in its own (plain)
    # implementation of this hook, so the marks must be there before it runs.
    @pytest.hookimpl(tryfirst=True)
    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        for item in items:
            if not {"smolvm", "smolvm_factory"} & set(getattr(item, "fixturenames", ())):
                continue
            if item.get_closest_marker("xdist_group") is not None:
                continue  # the user's own grouping wins
            try:
                cfg = config_from_layers(self.state.layers + marker_layers(item))
            except ConfigError:
                continue  # the plugin's own collection hook reports it as a usage error
            item.add_marker(pytest.mark.xdist_group(name=shape_group(cfg)))


class SmolVMPlugin:
    """Per-session state: resolved options, drivers, and the VMs tests are using."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        cli = {opt.field: config.getoption(f"smolvm_{opt.field}") for opt in OPTIONS}
        ini = {opt.field: config.getini(opt.ini) for opt in OPTIONS}
        self.layers = session_layers(cli, os.environ, ini)
        self.ceiling = network_ceiling(self.layers)
        keep = config.getoption("smolvm_keep_failed")
        self.keep_failed = bool(keep if keep is not None else config.getini("smolvm_keep_failed"))
        self.drivers: dict[str, Driver] = {}
        bundle = upstream_ca_bundle({"upstream_ca_bundle": config.getoption("smolvm_upstream_ca_bundle")},
                                    os.environ, {"upstream_ca_bundle": config.getini(UPSTREAM_CA.ini)})
        if bundle:  # the proxy (and xdist workers, started later) read it from the environment
            os.environ[UPSTREAM_CA.env] = bundle
        self.pool = VMPool(size=pool_size({"pool": config.getoption("smolvm_pool")}, os.environ,
                                          {"pool": config.getini(POOL.ini)}))
        self.kept: list[tuple[str, SmolVM]] = []
        self.reaped: list[Leftover] = []
        self.session_cfg = config_from_layers(self.layers)
        self.signals = SignalUnwinder()
        ev_opts = (EVIDENCE, EVIDENCE_DIR)
        mode, where = evidence_settings({o.field: config.getoption(f"smolvm_{o.field}") for o in ev_opts},
                                        os.environ, {o.field: config.getini(o.ini) for o in ev_opts})
        files = config.getoption("smolvm_evidence_files")
        files = bool(files if files is not None else config.getini("smolvm_evidence_files"))
        if files and where is None:
            raise pytest.UsageError("pytest-smolvm: --smolvm-evidence-files (or ini smolvm_evidence_files) needs "
                                    "--smolvm-evidence-dir: the directory the archives go to")
        self.evidence = EvidenceHooks(mode, where, writer=getattr(config, "workerinput", None) is None, files=files)
        # Declared images are checked now (a bad table stops the run before any test) and
        # built on first use; `ensured` holds the names this process has made sure of.
        self.pyproject = config.rootpath / "pyproject.toml"
        self.declared = load_declared(self.pyproject) if self.pyproject.is_file() else {}
        self.ensured: set[str] = set()
        self.failed: dict[str, str] = {}
        group = config.getoption("smolvm_group_by_shape")
        self.group_by_shape = bool(group if group is not None else config.getini("smolvm_group_by_shape"))
        #: What each xdist worker reported at its end (controller only): gateway id -> summary.
        self.workers: dict[str, dict[str, Any]] = {}

    def ensure_image(self, name: str) -> None:
        """Build ``name`` first if it is ``default`` or declared and not built for its current
        content, showing progress on the terminal (capture suspended). Other processes of the
        run (xdist workers) wait on the image's build lock and then find it built."""
        if name in self.ensured or (name not in self.declared and name != "default"):
            return
        if name in self.failed:  # one failed build per run, not one per test that wants it
            raise ImageError(f"image {name!r} could not be built earlier in this run: {self.failed[name]}")
        from .images.provision import ensure

        capman = self.config.pluginmanager.getplugin("capturemanager")
        reporter = self.config.pluginmanager.getplugin("terminalreporter")

        started: list[bool] = []

        def progress(msg: str) -> None:
            if reporter is None:
                print(msg, file=sys.stderr, flush=True)
                return
            if not started:  # off the line of the test that triggered the build
                started.append(True)
                reporter.write_line("")
            reporter.write_line(msg)

        with capman.global_and_fixture_disabled() if capman is not None else contextlib.nullcontext():
            try:
                ensure(name, lambda cfg, vm_name: SmolVM(cfg, name=vm_name),
                       pyproject=self.pyproject if name in self.declared else None, progress=progress)
            except SmolVMError as exc:
                self.failed[name] = str(exc).splitlines()[0][:500]
                raise
        self.ensured.add(name)

    # ------------------------------------------------------------- configs

    def session_config(self) -> VMConfig:
        return self.session_cfg

    def config_for_item(self, item: pytest.Item) -> VMConfig:
        if CONFIG_KEY not in item.stash:
            item.stash[CONFIG_KEY] = config_from_layers(self.layers + marker_layers(item))
        return item.stash[CONFIG_KEY]

    def ceiling_violation(self, cfg: VMConfig) -> str | None:
        return exceeds_ceiling(cfg.network, cfg.allow, self.ceiling)

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        # Every marker is parsed before any test runs, so a bad value stops the run with a
        # usage error before a single VM has started.
        for item in items:
            uses_vm = bool(VM_FIXTURES & set(getattr(item, "fixturenames", ())))
            if not uses_vm and item.get_closest_marker("smolvm") is None:
                continue
            try:
                cfg = self.config_for_item(item)
            except ConfigError as exc:
                raise pytest.UsageError(f"pytest-smolvm: {item.nodeid}: {exc}") from None
            reason = self.ceiling_violation(cfg)
            if reason and uses_vm:
                item.add_marker(pytest.mark.skip(reason=reason))

    # ------------------------------------------------------------- VM lifecycle

    @pytest.hookimpl(trylast=True)
    def pytest_smolvm_make_driver(self, config: VMConfig, pytestconfig: pytest.Config) -> Driver:
        if config.backend not in self.drivers:
            driver = default_driver(config)
            if self.keep_failed and hasattr(driver, "die_with_parent"):
                driver.die_with_parent = False  # a kept VM must outlive this process
            self.drivers[config.backend] = driver
        return self.drivers[config.backend]

    def start_vm(self, request: pytest.FixtureRequest, cfg: VMConfig, checkpoint: Checkpoint | None = None) -> SmolVM:
        # The last word before any VM starts: a pytest_smolvm_configure hook or a conftest's
        # smolvm_config override may have raised the policy after the markers were checked.
        reason = self.ceiling_violation(cfg)
        if reason:
            pytest.skip(f"{reason} (the config after smolvm_config overrides and pytest_smolvm_configure hooks)")
        unavailable = network_unavailable(cfg.network)  # e.g. no user namespaces for a non-root user
        if unavailable:
            pytest.skip(unavailable)
        driver = self.driver_for(cfg)
        vm = self._start_with_retry(request, cfg, driver, checkpoint)
        vm.network.ceiling = self.ceiling  # vm.network.set() may not loosen past it either
        if self.config.option.capture == "no":  # -s: show each command's output as it runs
            redact = vm.redact
            vm.live_output = lambda label: LiveOutput(label, _terminal_write, redact)
        if request.scope == "function":
            request.node.stash.setdefault(VMS_KEY, []).append((vm, 0))
            self.evidence.track(request.node, vm)
        try:
            self.config.hook.pytest_smolvm_ready(vm=vm, request=request)
        except BaseException:
            vm.close()
            raise
        return vm

    def driver_for(self, cfg: VMConfig) -> Driver:
        """The driver for ``cfg``, its image built first if it is ours to build."""
        self.ensure_image(cfg.image)
        driver: Driver = self.config.hook.pytest_smolvm_make_driver(config=cfg, pytestconfig=self.config)
        return driver

    def _start_with_retry(self, request: pytest.FixtureRequest, cfg: VMConfig, driver: Driver,
                          checkpoint: Checkpoint | None = None) -> SmolVM:
        """Start a VM; an infrastructure failure (the VM did not come up) is retried once on
        a fresh VM. Errors in the test's own use of a VM are never retried."""
        for attempt in (1, 2):
            try:
                if request.scope == "function":
                    return self.pool.acquire(cfg, driver, checkpoint=checkpoint)
                if checkpoint is not None:
                    return SmolVM(cfg, driver=driver, checkpoint=checkpoint).start()
                return SmolVM(cfg, driver=driver).start()
            except BootError as exc:
                if attempt == 2:
                    raise
                warnings.warn(f"pytest-smolvm: VM failed to boot, retrying once on a fresh VM: "
                              f"{str(exc).splitlines()[0]}", stacklevel=2)
        raise AssertionError("unreachable")

    def finish_vm(self, request: pytest.FixtureRequest, vm: SmolVM) -> None:
        if request.scope == "function":
            self.evidence.finish(request.node, vm)  # the end of its use: host figures, JUnit properties
        if self.keep_failed and request.scope == "function" and _failed(request.node) and vm.alive:
            vm.detach()
            self.kept.append((request.node.nodeid, vm))
            return
        vm.close()

    # ------------------------------------------------------------- reports

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_call(self, item: pytest.Item) -> Generator[None, None, None]:
        session_vm = getattr(item, "funcargs", {}).get("smolvm_session")
        if isinstance(session_vm, SmolVM):
            item.stash.setdefault(VMS_KEY, []).append((session_vm, len(session_vm.transcript)))
        return (yield)

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(
        self, item: pytest.Item, call: pytest.CallInfo[None]
    ) -> Generator[None, pytest.TestReport, pytest.TestReport]:
        report = yield
        item.stash.setdefault(REPORTS_KEY, {})[report.when] = report
        exc = call.excinfo.value if call.excinfo is not None else None
        if report.failed and isinstance(exc, SmolVMError) and exc.infra:
            # Carried in user_properties so it survives xdist's report serialisation.
            report.user_properties.append((INFRA_PROPERTY, f"{type(exc).__name__}: {str(exc).splitlines()[0]}"))
        vms: dict[str, tuple[SmolVM, int]] = {}
        for vm, start in item.stash.get(VMS_KEY, []):
            vms.setdefault(vm.name, (vm, start))
        if report.failed:
            for vm, start in vms.values():
                report.sections.extend(vm_sections(vm, start, CONSOLE_TAIL_LINES))
        self.evidence.on_report(item, report, _failed(item))
        if vms:
            _scrub(report, lambda text: sanitize(redact_all(text, [vm for vm, _ in vms.values()])))
        return report

    def pytest_report_teststatus(self, report: pytest.TestReport) -> tuple[str, str, Any] | None:
        """Infrastructure failures (VMM crash, agent silent) are ERRORs, not test FAILUREs."""
        # Collection reports have no user_properties (and are never infrastructure failures).
        if report.failed and any(k == INFRA_PROPERTY for k, _ in getattr(report, "user_properties", ())):
            return "error", "E", ("ERROR (infrastructure)", {"red": True})
        return None

    def pytest_report_header(self, config: pytest.Config) -> list[str]:
        cfg = self.session_cfg
        lines = [f"smolvm: run {current_run_id()}, defaults {cfg.describe()}"
                 + (f", network ceiling {self.ceiling[0]} ({self.ceiling[1]})" if self.ceiling else "")
                 + f"; snapshots {'on' if cfg.snapshot else 'off'}, pool {self.pool.size}"]
        if cfg.image in self.declared or (cfg.image == "default" and not default_built()):
            where = f"declared in {self.pyproject}" if cfg.image in self.declared else "this version's build is missing"
            lines.append(f"smolvm: image {cfg.image} ({where}): built on first use when missing or changed")
            return lines
        try:
            from .images import resolve

            image = resolve(cfg.image)
            driver = config.hook.pytest_smolvm_make_driver(config=cfg, pytestconfig=config)
            accel = driver.select_accel(cfg.accel, image)
            lines.append(f"smolvm: image {image.name} {image.id} (kernel {image.kernel_release}); "
                         f"backend {driver.name}, accel {accel.name}: {accel.reason}")
        except SmolVMError as exc:
            lines.append(f"smolvm: not ready: {exc}")
        return lines

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if self.reaped:
            terminalreporter.write_line(f"smolvm: removed {len(self.reaped)} leftover VM(s) of dead runs "
                                        f"({', '.join(sorted({r.run_id for r in self.reaped}))})")
        for line in host_lines(self.workers or {"main": self.summary()}):
            terminalreporter.write_line(line)
        if not self.kept:
            return
        terminalreporter.section("smolvm: kept VMs of failed tests")
        for nodeid, vm in self.kept:
            terminalreporter.write_line(
                f"{nodeid}: {vm.name} (pid {vm.pid}) still running. Shell: python -m pytest_smolvm "
                f"shell {vm.workdir}   Remove: python -m pytest_smolvm reap --kept")

    def summary(self) -> dict[str, Any]:
        """What this process did, for the controller's terminal summary (JSON-safe)."""
        return {"host": host_name(), "runtime_dir": str(runtime_dir()), "run_id": current_run_id(),
                "hits": self.pool.stats["hits"], "misses": self.pool.stats["misses"],
                "reaped": len(self.reaped)}

    def pytest_sessionfinish(self) -> None:
        self.pool.close()
        remove_checkpoints()  # session fixtures are torn down by now: no clone can want them
        release_prepared()  # cached ones stay, for the next run; prune may remove them now
        workeroutput = getattr(self.config, "workeroutput", None)
        if workeroutput is not None:  # an xdist worker: tell the controller (pytest_testnodedown)
            workeroutput["smolvm"] = self.summary()
        workerinput = getattr(self.config, "workerinput", None)
        if workerinput is None or workerinput.get("smolvm_domain") != reap_domain():
            # The controller (its workers are done), or a worker on another host, whose
            # process may outlive the session (an execnet socket server runs one session
            # after another), so the exit hook that would drop the slot table never runs.
            # Either way the table goes only once no live VM holds a slot in it.
            from .network.hub import forget_run

            forget_run(current_run_id())
        for driver in self.drivers.values():
            close = getattr(driver, "close", None)
            if callable(close):
                close()

    def pytest_unconfigure(self) -> None:
        self.signals.restore()


def _terminal_write(text: str) -> None:
    """Live output under ``-s``: straight to the terminal, at once."""
    sys.stdout.write(text)
    sys.stdout.flush()


def _scrub(report: pytest.TestReport, scrub: Callable[[str], str]) -> None:
    """Pass everything of a VM-using test's report that reaches the terminal through
    ``scrub`` (sanitise guest text, mask env secrets): sections (captured output included) and
    the traceback, whose assertion messages and ``-l`` locals may hold guest output. A
    traceback that needed changes is kept as text (it loses colour, nothing else)."""
    report.sections = [(title, scrub(content)) for title, content in report.sections]
    if report.longrepr is None or isinstance(report.longrepr, tuple):
        return
    text = report.longreprtext
    clean = scrub(text)
    if clean != text:
        report.longrepr = clean


def _failed(item: pytest.Item) -> bool:
    reports = item.stash.get(REPORTS_KEY, {})
    return any(r.failed for r in reports.values())
