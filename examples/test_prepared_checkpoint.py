"""Set up once, isolate every test: clone a prepared VM for each test.

The expensive set-up (install the project, seed a database, start a service) runs once per
session (per xdist worker) in a session-scoped fixture, which returns ``vm.checkpoint()``.
Every test then gets its own clone of that exact state from ``smolvm_factory(checkpoint=...)``:
the files are there, the server is listening, and nothing one test changes is seen by the
next. The checkpoint is removed at the end of the session.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from pytest_smolvm import Checkpoint, SmolVM

#: A few seconds of set-up without network: a small "project" compiled by the guest's Python,
#: a seeded SQLite database, and a web server started in the background.
SETUP = r"""
set -e
mkdir -p /srv/app && cd /srv/app
python3 - <<'PY'
import pathlib, sqlite3
for i in range(200):
    pathlib.Path(f"mod{i}.py").write_text(f"def value():\n    return {i}\n")
db = sqlite3.connect("app.db")
db.execute("create table items (id integer primary key, name text)")
db.executemany("insert into items (name) values (?)", [(f"item{i}",) for i in range(1000)])
db.commit()
PY
python3 -m compileall -q /srv/app
(python3 -m http.server 8000 --directory /srv/app >/dev/null 2>&1 &)
for i in $(seq 100); do
  python3 -c "import socket; socket.create_connection(('127.0.0.1', 8000))" 2>/dev/null && exit 0
  sleep 0.1
done
exit 1
"""
FETCH = ("python3 -c \"import urllib.request; "
         "print(urllib.request.urlopen('http://127.0.0.1:8000/mod7.py').read().decode())\"")


@pytest.fixture(scope="session")
def prepared(smolvm_session: SmolVM) -> Iterator[Checkpoint]:
    """The session VM after set-up, saved; it keeps running for tests that share it."""
    smolvm_session.run(SETUP, check=True, timeout=300)
    cp = smolvm_session.checkpoint()
    yield cp
    cp.remove()  # also done at session end; here it goes as soon as the fixture does


@pytest.fixture
def app_vm(prepared: Checkpoint, smolvm_factory: Callable[..., SmolVM]) -> SmolVM:
    """A fresh clone of the prepared VM for one test."""
    return smolvm_factory(checkpoint=prepared)


def test_the_server_started_in_set_up_still_answers(app_vm: SmolVM) -> None:
    assert "return 7" in app_vm.run(FETCH, check=True).stdout


def test_a_test_may_wreck_its_clone(app_vm: SmolVM) -> None:
    app_vm.run("rm -rf /srv/app/*", check=True)
    assert app_vm.run("ls /srv/app").stdout == ""


COUNT = ("python3 -c \"import sqlite3; "
         "print(sqlite3.connect('/srv/app/app.db').execute('select count(*) from items').fetchone()[0])\"")


@pytest.mark.parametrize("n", range(3))
def test_each_clone_starts_from_the_prepared_state(app_vm: SmolVM, n: int) -> None:
    count = COUNT
    assert app_vm.run(count, check=True).stdout == "1000\n"  # the test before wrecked only its own clone
    app_vm.run(f"python3 -c \"import sqlite3; d = sqlite3.connect('/srv/app/app.db'); "
               f"d.execute('delete from items where id > {n}'); d.commit()\"", check=True)
    assert app_vm.run(count).stdout == f"{n}\n"
