"""``python -m pytest_smolvm``: image build|list|prune, checkpoint list|prune|rm|export|import,
doctor, reap, shell. No pytest here."""

from __future__ import annotations

import argparse
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import SmolVMError

if TYPE_CHECKING:
    from .config import VMConfig
    from .vm import SmolVM


def _make_vm(config: VMConfig, name: str) -> SmolVM:
    from .vm import SmolVM

    return SmolVM(config, name=name)


def _cmd_image_build(args: argparse.Namespace) -> int:
    from .images.build import build
    from .images.declared import find_pyproject, load
    from .images.provision import ensure_declared
    from .images.recipe import DEFAULT_PACKAGES, Recipe, arm64_recipe

    pyproject = Path(args.pyproject) if args.pyproject else find_pyproject(Path.cwd())
    declared = load(pyproject) if pyproject is not None and args.name != "default" else {}
    if args.print_digest and args.name in declared:
        from .images.declared import key
        from .images.provision import base_id

        print(key(declared[args.name], base_id(declared[args.name])))
        return 0
    if args.name in declared:
        if args.include or args.arch != "amd64":
            print(f"error: image {args.name!r} is declared in {pyproject}; --include and --arch do not apply "
                  f"(declare apt packages there)", file=sys.stderr)
            return 2
        image = ensure_declared(declared[args.name], _make_vm, force=args.force)
        print(f"{image.name}: {image.path}")
        return 0
    packages = DEFAULT_PACKAGES + tuple(p for p in (args.include or "").split(",") if p)
    if args.name == "default" and args.include:
        print("error: --include needs --name: the 'default' image is fixed by this version", file=sys.stderr)
        return 2
    if args.arch == "arm64":
        name = "default-arm64" if args.name == "default" else args.name
        recipe = arm64_recipe(name, packages=packages, rootfs_mib=args.size_mib)
    else:
        recipe = Recipe(name=args.name, packages=packages, rootfs_mib=args.size_mib)
    if args.print_digest:
        print(recipe.digest())
        return 0
    image = build(recipe, force=args.force)
    print(f"{image.name}: {image.path}")
    return 0


def _cmd_image_import(args: argparse.Namespace) -> int:
    from .images.imported import import_image

    image = import_image(args.source, args.name, max_mib=args.max_mib, force=args.force, arch=args.arch)
    print(f"{image.name}: {image.path}")
    return 0


def _cmd_image_list(args: argparse.Namespace) -> int:
    from .images.build import verify
    from .images.recipe import Recipe
    from .images.store import list_images

    current = Recipe().digest()
    rows = list_images()
    if not rows:
        print("no images built; build one with: python -m pytest_smolvm image build")
    for name, path, manifest in rows:
        tag = " (current default)" if name == "default" and path.name == current else ""
        status = ""
        if args.verify and "files" in manifest:
            problems = verify(path)
            status = "  OK" if not problems else "  CORRUPT: " + "; ".join(problems)
        print(f"{name:12} {path.name}  kernel {manifest.get('kernel_release', '?')}  "
              f"built {manifest.get('built_at', '?')}  {path}{tag}{status}")
    return 0


def _cmd_image_prune(args: argparse.Namespace) -> int:
    from .images.recipe import Recipe, boot_digest
    from .images.store import list_images

    keep_default = Recipe().digest()
    removed = 0
    for name, path, manifest in list_images():
        current = (path.parent / "current").resolve() if (path.parent / "current").exists() else None
        if (name == "default" and path.name == keep_default) or path == current:
            keep = {f"boot-{boot_digest()}.cpio", _boot_layer_name(manifest)}  # and a cross-built agent's
            for cpio in path.glob("boot-*.cpio"):  # boot layers of older agents
                if cpio.name not in keep and not args.dry_run:
                    cpio.unlink()
            continue
        print(f"removing {path}")
        if not args.dry_run:
            shutil.rmtree(path)
        removed += 1
    print(f"{removed} image build(s) {'would be ' if args.dry_run else ''}removed")
    from .snapshots import default_store

    store = default_store()
    snaps = [d for d in store.root.iterdir() if d.is_dir()] if store.root.is_dir() else []
    if not args.dry_run:
        store.prune()
    print(f"{len(snaps)} snapshot(s) {'would be ' if args.dry_run else ''}removed (rebuilt on demand)")
    from .prepared import default_store as prepared_store
    from .volumes import prune_images

    orphans = [e for e in prepared_store().entries() if not Path(str(e.manifest.get("image_rootfs", ""))).is_file()]
    if not args.dry_run:
        orphans = prepared_store().prune(orphans_only=True)
    print(f"{len(orphans)} cached checkpoint(s) of removed images {'would be ' if args.dry_run else ''}removed")
    n = prune_images(dry_run=args.dry_run)
    print(f"{n} volume image(s) {'would be ' if args.dry_run else ''}removed (rebuilt on demand)")
    from .images.kernel import prune_kernels

    n = prune_kernels(dry_run=args.dry_run)
    print(f"{n} older fetched kernel(s) {'would be ' if args.dry_run else ''}removed")
    from .images.agentbin import prune_binaries

    n = prune_binaries(dry_run=args.dry_run)
    print(f"{n} older guest agent build(s) {'would be ' if args.dry_run else ''}removed")
    return 0


def _boot_layer_name(manifest: dict[str, object]) -> str:
    """The current boot layer's name for an image of the manifest's architecture ("" if no
    compiler here builds its agent: then it cannot be rebuilt, and nothing is kept for it)."""
    from .images.agentbin import boot_key
    from .images.recipe import boot_digest
    from .images.store import image_arch

    try:
        return f"boot-{boot_digest(boot_key(image_arch(manifest)))}.cpio"
    except SmolVMError:
        return ""


def _cmd_doctor(args: argparse.Namespace) -> int:
    """Each backend x accelerator: works, or why not and the command that fixes it."""
    from .doctor import collect, report

    lines, any_works = report(collect(args.image))
    for line in lines:
        print(line)
    return 0 if any_works else 1


def _cmd_reap(args: argparse.Namespace) -> int:
    from .reaper import reap

    items = reap(include_kept=args.kept, dry_run=args.dry_run)
    for item in items:
        verb = "would remove" if args.dry_run else "removed" if item.removed else "could not remove"
        print(f"{verb} {item.path} (run {item.run_id}, VMM pid {item.vmm_pid or '-'}: {item.reason})")
    stuck = sum(not (args.dry_run or item.removed) for item in items)
    print(f"{len(items)} leftover VM(s) {'found' if args.dry_run else 'reaped'}"
          + (f", {stuck} could not be removed" if stuck else ""))
    return 1 if stuck else 0


def _cmd_shell(args: argparse.Namespace) -> int:
    """A line-at-a-time shell into a kept VM, through its control socket. What the guest
    prints is shown sanitised (it cannot drive this terminal) and its replies are validated."""
    from .drivers import connect_kept
    from .errors import GuestDied, GuestTimeout
    from .guest.replies import AgentError
    from .reporting import clip, sanitize
    from .session import GuestSession

    workdir = Path(args.workdir)
    try:
        sock = connect_kept(workdir)
    except OSError as exc:  # ConnectionError included
        print(f"cannot connect to the VM kept in {workdir}: {exc}", file=sys.stderr)
        return 1
    session = GuestSession.attach(workdir.name, sock, max_body=64 << 20)
    try:
        session.call("hello", lambda guest: guest.hello(timeout=10))
        print(f"connected to {sanitize(workdir.name)}; commands run with /bin/sh -c; Ctrl-D to leave")
        while True:
            try:
                line = input("smolvm# ")
            except EOFError:
                print()
                return 0
            if not line.strip():
                continue
            result = session.call("run", lambda guest, line=line: guest.exec(  # type: ignore[misc]
                ["/bin/sh", "-c", line], timeout=args.timeout, wait=args.timeout + 10, max_output=16 << 20))
            if isinstance(result, AgentError):
                print(f"[agent error: {result.message}]")
                continue
            sys.stdout.write(sanitize(result.stdout.decode(errors="replace")))
            sys.stdout.write(sanitize(result.stderr.decode(errors="replace")))
            if result.exit_code or result.timed_out:
                print(f"[exit {result.exit_code}{', timed out' if result.timed_out else ''}]")
    except GuestTimeout:
        print("the guest agent did not answer; the VM may be overloaded or its agent stopped", file=sys.stderr)
    except GuestDied as exc:
        print(f"the VM went away: {clip(str(exc), 200)}", file=sys.stderr)
    finally:
        session.close()
    return 1


def _cmd_checkpoint_list(args: argparse.Namespace) -> int:
    import time

    from .prepared import default_store

    entries = default_store().entries()
    for e in reversed(entries):  # most recently used first
        age = (time.time() - e.last_used) / 86400
        print(f"{e.digest[:16]}  {e.key:<24} image={e.manifest.get('image_name', '?')} "
              f"{e.disk_usage / 2**20:7.1f} MiB  used {age:5.1f} d ago{'  in use' if e.in_use else ''}")
    total = sum(e.disk_usage for e in entries)
    print(f"{len(entries)} cached checkpoint(s), {total / 2**20:.1f} MiB in {default_store().root}")
    return 0


def _cmd_checkpoint_prune(args: argparse.Namespace) -> int:
    from .prepared import default_store

    store = default_store()
    before = {e.digest for e in store.entries()}
    removed = store.prune(older_than_days=args.older_than)
    for e in removed:
        print(f"removed {e.digest[:16]} {e.key}")
    kept_in_use = [e for e in store.entries() if e.in_use and e.digest in before]
    print(f"{len(removed)} cached checkpoint(s) removed; {len(kept_in_use)} in use left alone")
    return 0


def _cmd_checkpoint_rm(args: argparse.Namespace) -> int:
    from .prepared import default_store

    store = default_store()
    found = store.match(args.key)
    if not found:
        print(f"error: no cached checkpoint with key or digest {args.key!r}", file=sys.stderr)
        return 1
    busy = [e for e in found if not store.remove(e.digest)]
    for e in busy:
        print(f"error: {e.digest[:16]} ({e.key}) is in use by a running process; not removed", file=sys.stderr)
    print(f"{len(found) - len(busy)} cached checkpoint(s) removed")
    return 1 if busy else 0


def _one_entry(key: str) -> str:
    from .errors import SmolVMError
    from .prepared import default_store

    found = default_store().match(key)
    if len(found) != 1:
        raise SmolVMError(f"{len(found)} cached checkpoints match {key!r}"
                          f"{': ' + ', '.join(e.digest[:16] for e in found) if found else ''}; "
                          f"name one by its digest (python -m pytest_smolvm checkpoint list)")
    return found[0].digest


def _cmd_checkpoint_export(args: argparse.Namespace) -> int:
    from .prepared import default_store
    from .prepared_archive import export

    size = export(default_store(), _one_entry(args.key), Path(args.file))
    print(f"exported {args.key} to {args.file} ({size / 2**20:.1f} MiB)")
    return 0


def _cmd_checkpoint_import(args: argparse.Namespace) -> int:
    from .prepared import default_store
    from .prepared_archive import import_archive

    key, digest = import_archive(default_store(), Path(args.file))
    print(f"imported {key} ({digest[:16]}) from {args.file}")
    return 0


def _checkpoint_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    cp = sub.add_parser("checkpoint", help="list, prune, remove, export or import cached prepared state "
                                           "(smolvm_prepared)").add_subparsers(dest="sub", required=True)
    cp.add_parser("list", help="list cached checkpoints").set_defaults(func=_cmd_checkpoint_list)
    pr = cp.add_parser("prune", help="remove cached checkpoints no running process uses")
    pr.add_argument("--older-than", type=float, metavar="DAYS", help="only those unused for DAYS days")
    pr.set_defaults(func=_cmd_checkpoint_prune)
    rm = cp.add_parser("rm", help="remove the cached checkpoints of KEY (or one digest)")
    rm.add_argument("key", metavar="KEY")
    rm.set_defaults(func=_cmd_checkpoint_rm)
    ex = cp.add_parser("export", help="write the cached checkpoint KEY to FILE (one tar.gz, for CI caches)")
    ex.add_argument("key", metavar="KEY")
    ex.add_argument("file", metavar="FILE")
    ex.set_defaults(func=_cmd_checkpoint_export)
    im = cp.add_parser("import", help="verify FILE and add it to the cache (refused unless it matches this host)")
    im.add_argument("file", metavar="FILE")
    im.set_defaults(func=_cmd_checkpoint_import)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pytest_smolvm", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    img = sub.add_parser("image", help="build, list or prune guest images").add_subparsers(dest="sub", required=True)
    b = img.add_parser("build", help="build the default image, an image declared in pyproject.toml, or one "
                                      "from Debian packages (--include; needs root or mmdebstrap unshare)")
    b.add_argument("--name", default="default",
                   help="image name (default: default); an image declared in pyproject.toml "
                        "([tool.smolvm.images.NAME]) is built as declared")
    b.add_argument("--pyproject", help="the pyproject.toml declaring images (default: the nearest one up from here)")
    b.add_argument("--include", help="extra Debian packages, comma-separated (with --name)")
    b.add_argument("--size-mib", type=int, default=1024, help="rootfs size in MiB (default 1024)")
    b.add_argument("--force", action="store_true", help="rebuild even if an identical build exists")
    b.add_argument("--arch", choices=("amd64", "arm64"), default="amd64",
                   help="guest architecture (arm64: for HVF on Apple silicon; name default-arm64; "
                        "a foreign architecture needs dpkg --add-architecture and qemu-user-static)")
    b.add_argument("--print-digest", action="store_true",
                   help="print the content digest of the image these options name and build nothing "
                        "(a CI cache key: the same digest means the same image build)")
    b.set_defaults(func=_cmd_image_build)
    im = img.add_parser("import", help="import a container image (no root needed)",
                        description="Import a container image as a guest image, with our kernel and boot layer. "
                                    "SRC is oci:DIR[:TAG] (an OCI image layout) or docker-archive:FILE[:REF] "
                                    "('docker save'); get one from a registry with: "
                                    "skopeo copy docker://debian:12 oci:DIR:12")
    im.add_argument("source", metavar="SRC", help="oci:DIR[:TAG] or docker-archive:FILE[:REF]")
    im.add_argument("--name", required=True, help="the image name tests use: @pytest.mark.smolvm(image=NAME)")
    im.add_argument("--max-mib", type=int, default=8192, help="refuse images larger than this uncompressed")
    im.add_argument("--force", action="store_true", help="import again even if an identical import exists")
    im.add_argument("--arch", choices=("amd64", "arm64"), default="amd64",
                    help="the image's architecture (its linux/ARCH image, and our kernel for it)")
    im.set_defaults(func=_cmd_image_import)
    ls = img.add_parser("list", help="list built images")
    ls.add_argument("--verify", action="store_true", help="check every file against its sha256")
    ls.set_defaults(func=_cmd_image_list)
    pr = img.add_parser("prune", help="remove image builds no recipe points at")
    pr.add_argument("--dry-run", action="store_true")
    pr.set_defaults(func=_cmd_image_prune)
    _checkpoint_parser(sub)
    doc = sub.add_parser("doctor", help="what works on this host, and why not")
    doc.add_argument("--image", default="default", help="image the canary boots (default: default)")
    doc.set_defaults(func=_cmd_doctor)
    r = sub.add_parser("reap", help="remove leftovers of dead runs (never a live run's)")
    r.add_argument("--kept", action="store_true", help="also remove VMs kept by --smolvm-keep-failed")
    r.add_argument("--dry-run", action="store_true", help="only list what would be removed")
    r.set_defaults(func=_cmd_reap)
    sh = sub.add_parser("shell", help="run commands in a VM kept by --smolvm-keep-failed")
    sh.add_argument("workdir", help="the VM directory printed by pytest")
    sh.add_argument("--timeout", type=float, default=300.0)
    sh.set_defaults(func=_cmd_shell)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except SmolVMError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
