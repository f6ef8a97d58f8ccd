"""A local, offline wheel index for the tests of declared images' ``pip`` step, so no test
reaches PyPI: a pure-Python wheel written by hand, and Debian's own pip wheel
(python3-pip-whl), which the build installs in a guest that has no pip."""

from __future__ import annotations

import base64
import hashlib
import shutil
import zipfile
from pathlib import Path

DEBIAN_WHEELS = Path("/usr/share/python-wheels")
PACKAGE, VERSION = "smolvm-testpkg", "1.0"
MODULE = "smolvm_testpkg"


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def write_wheel(dest: Path) -> Path:
    """``smolvm_testpkg-1.0-py3-none-any.whl`` in ``dest``: one module with ``__version__``."""
    info = f"{MODULE}-{VERSION}.dist-info"
    files = {
        f"{MODULE}.py": f'__version__ = "{VERSION}"\n'.encode(),
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {PACKAGE}\nVersion: {VERSION}\n".encode(),
        f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: smolvm-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = "\n".join([*(_record_line(n, d) for n, d in files.items()), f"{info}/RECORD,,"]) + "\n"
    wheel = dest / f"{MODULE}-{VERSION}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
        z.writestr(f"{info}/RECORD", record)
    return wheel


def offline_index(dest: Path) -> dict[str, str]:
    """Fill ``dest`` with the test wheel and Debian's pip wheel; the environment that makes
    pip use only it (``PIP_NO_INDEX``, ``PIP_FIND_LINKS``)."""
    dest.mkdir(parents=True, exist_ok=True)
    write_wheel(dest)
    pips = sorted(DEBIAN_WHEELS.glob("pip-*-py3-none-any.whl"))
    if not pips:
        raise RuntimeError(f"no pip wheel in {DEBIAN_WHEELS}: apt-get install python3-pip-whl")
    shutil.copy(pips[-1], dest)
    return {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(dest)}
