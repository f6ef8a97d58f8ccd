"""Reading image sources (images/oci.py): skopeo-style source strings, OCI layouts and
docker-save archives, all treated as untrusted (digests become file names, blobs are checked)."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest

from pytest_smolvm import ImageError
from pytest_smolvm.images import oci


def _blob(layout: Path, data: bytes) -> str:
    digest = hashlib.sha256(data).hexdigest()
    (layout / "blobs/sha256").mkdir(parents=True, exist_ok=True)
    (layout / "blobs/sha256" / digest).write_bytes(data)
    return "sha256:" + digest


def _layer() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        info = tarfile.TarInfo("hello")
        info.size = 2
        t.addfile(info, io.BytesIO(b"hi"))
    return buf.getvalue()


def make_layout(layout: Path, tags: tuple[str, ...] = ("t",)) -> str:
    layout.mkdir()
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    raw = _layer()
    layer = _blob(layout, gzip.compress(raw))
    config = _blob(layout, json.dumps({"rootfs": {"type": "layers", "diff_ids": [
        "sha256:" + hashlib.sha256(raw).hexdigest()]}, "config": {"Env": ["PATH=/bin"]}}).encode())
    manifest = _blob(layout, json.dumps({"schemaVersion": 2, "config": {"digest": config},
                                         "layers": [{"digest": layer}]}).encode())
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": manifest,
         "annotations": {oci.REF_NAME: tag}} for tag in tags]}))
    return layer


def test_source_strings(tmp_path: Path) -> None:
    (tmp_path / "lay").mkdir()
    (tmp_path / "saved.tar").write_bytes(b"")
    assert oci.parse_source("oci:lay:v1", tmp_path) == oci.Source("oci", tmp_path / "lay", "v1", "oci:lay:v1")
    assert oci.parse_source("oci:lay", tmp_path).ref is None
    src = oci.parse_source("docker-archive:saved.tar:repo/x:1.0", tmp_path)
    assert (src.path, src.ref) == (tmp_path / "saved.tar", "repo/x:1.0")
    for bad in ("docker://debian:12", "oci:", "lay", "containers-storage:x"):
        with pytest.raises(ImageError, match="expected oci:DIR"):
            oci.parse_source(bad, tmp_path)
    with pytest.raises(ImageError, match="missing does not exist"):
        oci.parse_source("oci:missing:t", tmp_path)


def test_layout_by_tag_and_its_errors(tmp_path: Path) -> None:
    make_layout(tmp_path / "l", tags=("a", "b"))
    layers = oci.read_layers(oci.parse_source("oci:l:b", tmp_path))
    assert len(layers.openers) == 1 and layers.diff_ids[0].startswith("sha256:")
    assert oci.image_env(layers.config) == {"Env": ["PATH=/bin"]}
    with pytest.raises(ImageError, match=r"holds 2 images; name one with :TAG \(tags: a, b\)"):
        oci.read_layers(oci.parse_source("oci:l", tmp_path))
    with pytest.raises(ImageError, match=r"no image tagged 'c' \(tags: a, b\)"):
        oci.read_layers(oci.parse_source("oci:l:c", tmp_path))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImageError, match=r"is not an OCI image layout .* skopeo copy docker://IMAGE"):
        oci.read_layers(oci.parse_source("oci:empty", tmp_path))


def test_a_digest_that_is_a_path_is_refused(tmp_path: Path) -> None:
    make_layout(tmp_path / "l")
    index = json.loads((tmp_path / "l/index.json").read_text())
    index["manifests"][0]["digest"] = "sha256:../../../../etc/passwd"
    (tmp_path / "l/index.json").write_text(json.dumps(index))
    with pytest.raises(ImageError, match="only sha256:<64 hex> is supported"):
        oci.read_layers(oci.parse_source("oci:l:t", tmp_path))


def test_a_tampered_blob_is_refused(tmp_path: Path) -> None:
    layer = make_layout(tmp_path / "l")
    layers = oci.read_layers(oci.parse_source("oci:l:t", tmp_path))
    (tmp_path / "l/blobs/sha256" / layer.split(":")[1]).write_bytes(gzip.compress(b"other"))
    with pytest.raises(ImageError, match="does not match its digest"):
        layers.openers[0][1]()


def test_docker_archive_picks_by_repo_tag(tmp_path: Path) -> None:
    raw = _layer()
    config = json.dumps({"rootfs": {"diff_ids": ["sha256:" + hashlib.sha256(raw).hexdigest()]}}).encode()
    members = {"c.json": config, "x/layer.tar": raw, "manifest.json": json.dumps(
        [{"Config": "c.json", "RepoTags": ["me/app:1"], "Layers": ["x/layer.tar"]}]).encode()}
    with tarfile.open(tmp_path / "saved.tar", "w") as t:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    layers = oci.read_layers(oci.parse_source("docker-archive:saved.tar", tmp_path))
    with oci.opened(layers.openers[0][1]) as f:
        assert f.read(1 << 20) == raw
    with pytest.raises(ImageError, match=r"no image matches 0 \(tags: me/app:1\)"):
        oci.read_layers(oci.parse_source("docker-archive:saved.tar:me/app:2", tmp_path))


def test_config_must_list_one_diff_id_per_layer(tmp_path: Path) -> None:
    layers = oci.Layers({"rootfs": {"diff_ids": []}}, "sha256:c")
    layers.openers.append(("sha256:x", lambda: io.BytesIO(b"")))  # type: ignore[arg-type,return-value]
    with pytest.raises(ImageError, match="does not list one sha256 per layer"):
        _ = layers.diff_ids


def test_an_index_of_platforms_picks_linux_amd64(tmp_path: Path) -> None:
    make_layout(tmp_path / "l")
    index = json.loads((tmp_path / "l/index.json").read_text())
    amd64 = index["manifests"][0]
    nested = {"schemaVersion": 2, "manifests": [
        {**amd64, "digest": "sha256:" + "0" * 64, "platform": {"os": "linux", "architecture": "arm64"}},
        {**amd64, "platform": {"os": "linux", "architecture": "amd64"}}]}
    digest = _blob(tmp_path / "l", json.dumps(nested).encode())
    index["manifests"] = [{"mediaType": oci.INDEX_TYPES[0], "digest": digest, "annotations": amd64["annotations"]}]
    (tmp_path / "l/index.json").write_text(json.dumps(index))
    assert len(oci.read_layers(oci.parse_source("oci:l:t", tmp_path)).openers) == 1
    nested["manifests"] = nested["manifests"][:1]
    index["manifests"][0]["digest"] = _blob(tmp_path / "l", json.dumps(nested).encode())
    (tmp_path / "l/index.json").write_text(json.dumps(index))
    with pytest.raises(ImageError, match="has no linux/amd64 image"):
        oci.read_layers(oci.parse_source("oci:l:t", tmp_path))
