"""Weight references: local files, cached http(s) downloads with sha256 checks, safe loading."""

from __future__ import annotations

import hashlib
import os
import pickle
from pathlib import Path

import pytest
import torch
from torch import nn

from detforge.errors import CheckpointError, ConfigError
from detforge.models import weights as weights_module
from detforge.models.weights import (
    WeightsReport,
    default_cache_dir,
    load_state_dict_file,
    load_weights,
    resolve_weights,
)
from helpers import FileServer


def _serve_state_dict(file_server: FileServer, name: str = "tiny.pt") -> tuple[str, bytes]:
    torch.manual_seed(0)
    path = file_server.root / name
    torch.save({"model": nn.Linear(3, 2).state_dict(), "step": 7}, path)
    return f"{file_server.url}/{name}", path.read_bytes()


def test_download_once_then_served_from_cache(file_server: FileServer, tmp_path: Path) -> None:
    url, data = _serve_state_dict(file_server)
    cache = tmp_path / "cache"
    first = resolve_weights(url, cache_dir=cache)
    second = resolve_weights(url, cache_dir=cache)
    assert first == second and first.read_bytes() == data
    assert first.parent == cache and first.name.startswith("tiny-") and first.suffix == ".pt"
    assert file_server.requests == ["/tiny.pt"]
    assert [p.name for p in cache.iterdir()] == [first.name]  # no temporary file left behind


def test_sha256_prefix_accepted(file_server: FileServer, tmp_path: Path) -> None:
    url, data = _serve_state_dict(file_server)
    digest = hashlib.sha256(data).hexdigest()
    assert resolve_weights(url, sha256=digest[:10], cache_dir=tmp_path).read_bytes() == data
    assert resolve_weights(url, sha256=digest.upper(), cache_dir=tmp_path).read_bytes() == data


def test_sha256_mismatch_errors_and_leaves_no_file(file_server: FileServer, tmp_path: Path) -> None:
    url, _ = _serve_state_dict(file_server)
    cache = tmp_path / "cache"
    with pytest.raises(CheckpointError, match=r"does not match the expected 00000000.*deleted"):
        resolve_weights(url, sha256="0" * 64, cache_dir=cache)
    assert list(cache.iterdir()) == []


def test_cached_file_with_wrong_hash_is_fetched_again(file_server: FileServer, tmp_path: Path) -> None:
    url, data = _serve_state_dict(file_server)
    path = resolve_weights(url, cache_dir=tmp_path)
    path.write_bytes(b"corrupted")
    again = resolve_weights(url, sha256=hashlib.sha256(data).hexdigest(), cache_dir=tmp_path)
    assert again.read_bytes() == data and len(file_server.requests) == 2


def test_http_404_names_the_url(file_server: FileServer, tmp_path: Path) -> None:
    url = f"{file_server.url}/missing.pt"
    with pytest.raises(CheckpointError, match=rf"{url}: download failed: HTTP 404"):
        resolve_weights(url, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists() or list((tmp_path / "cache").iterdir()) == []


def test_unreachable_host_is_a_checkpoint_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="http://127.0.0.1:9/x.pt: download failed"):
        resolve_weights("http://127.0.0.1:9/x.pt", cache_dir=tmp_path)


def test_bad_sha256_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="weights_sha256"):
        resolve_weights(tmp_path / "x.pt", sha256="not-hex")


def test_local_paths(tmp_path: Path) -> None:
    path = tmp_path / "w.pt"
    torch.save(nn.Linear(3, 2).state_dict(), path)
    assert resolve_weights(str(path)) == path
    assert resolve_weights(f"file://{path}") == path
    with pytest.raises(CheckpointError, match=r"sha256 .* does not match"):
        resolve_weights(path, sha256="0" * 8)
    assert path.exists()  # the user's own file is never deleted
    with pytest.raises(CheckpointError, match=r"nope\.pt: weights file not found"):
        resolve_weights(tmp_path / "nope.pt")


def test_registry_references_need_a_resolver(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(CheckpointError, match=r"'s3:' references are not supported"):
        resolve_weights("s3://bucket/detector.pt")
    target = tmp_path / "w.pt"
    monkeypatch.setitem(weights_module.REFERENCE_RESOLVERS, "model", lambda ref: target)
    assert resolve_weights("model:detector@production") == target


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DETFORGE_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path / "weights"
    monkeypatch.delenv("DETFORGE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "detforge" / "weights"


def test_load_weights_from_url_reports_keys(
    file_server: FileServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DETFORGE_CACHE", str(tmp_path))
    url, _ = _serve_state_dict(file_server)
    target = nn.Linear(3, 2)
    report = load_weights(target, url)
    assert isinstance(report, WeightsReport)
    assert report.loaded == ["weight", "bias"] and not report.missing and not report.unexpected
    torch.testing.assert_close(target.weight, torch.load(resolve_weights(url), weights_only=True)["model"]["weight"])
    assert "loaded 2 tensors" in report.summary()


def test_plain_state_dict_and_ddp_prefix(tmp_path: Path) -> None:
    source = nn.Linear(3, 2)
    path = tmp_path / "ddp.pt"
    torch.save({f"module.{k}": v for k, v in source.state_dict().items()}, path)
    assert set(load_state_dict_file(path)) == {"weight", "bias"}


class _Payload:
    """Unpickling this runs ``os.mkdir(marker)``: what a malicious checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.mkdir, (str(self.marker),)


def test_code_in_a_pickle_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"model": {"weight": torch.zeros(2)}, "payload": _Payload(marker)}, path)
    with pytest.raises(CheckpointError, match=r"evil\.pt: refused to load"):
        load_weights(nn.Linear(1, 2), path)
    assert not marker.exists()
    pickle.loads(pickle.dumps(_Payload(tmp_path / "live")))  # the payload is real when unpickled unsafely
    assert (tmp_path / "live").is_dir()


def test_truncated_and_foreign_files(tmp_path: Path) -> None:
    good = tmp_path / "good.pt"
    torch.save(nn.Linear(3, 2).state_dict(), good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"truncated\.pt: not a readable PyTorch weights file"):
        load_state_dict_file(truncated)
    listing = tmp_path / "list.pt"
    torch.save([1, 2, 3], listing)
    with pytest.raises(CheckpointError, match=r"list\.pt: expected a state dict"):
        load_state_dict_file(listing)


def test_other_architecture_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.pt"
    torch.save(nn.Linear(5, 4).state_dict(), path)
    with pytest.raises(CheckpointError, match=r"2 tensors have other shapes.*another architecture"):
        load_weights(nn.Linear(3, 2), path)
    torch.save(nn.Conv2d(1, 1, 1).state_dict(), path)
    with pytest.raises(CheckpointError, match="no tensor matches"):
        load_weights(nn.Sequential(nn.Linear(3, 2)), path)
