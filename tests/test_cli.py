"""The ``shmcache`` command, run as a real subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from _samples import CacheFactory, text_generations

from shmcache import SharedMemoryCache


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "shmcache", *args],
        capture_output=True, text=True, timeout=60, check=False,
    )


@pytest.fixture
def filled(make_cache: CacheFactory) -> SharedMemoryCache:
    cache = make_cache("cli")
    cache.update("p1", "llm-a", text_generations("one"))
    cache.update("p2", "llm-b", text_generations("two"))
    cache.lookup("p1", "llm-a")
    cache.flush()
    return cache


def test_ls_lists_caches(filled: SharedMemoryCache, cache_dir: Path) -> None:
    (cache_dir / "old.v0.shm").write_bytes(b"an older release's segment")
    result = run_cli("ls", "--directory", str(cache_dir))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split()[:3] == ["NAME", "FORMAT", "SIZE"]
    assert any(line.split()[:4] == ["cli", "v1", "1.0", "MiB"] for line in lines)
    assert any(line.startswith("old") and "other shmcache release" in line for line in lines)
    assert (cache_dir / "old.v0.shm").read_bytes() == b"an older release's segment"


def test_ls_empty_directory(tmp_path: Path) -> None:
    result = run_cli("ls", "--directory", str(tmp_path))
    assert result.returncode == 0 and "no caches" in result.stdout


def test_stats_json_counts_nothing_itself(filled: SharedMemoryCache, cache_dir: Path) -> None:
    before = filled.stats()
    result = run_cli("stats", "cli", "--directory", str(cache_dir), "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["entries"] == 2 and data["updates"] == 2 and data["hits"] == 1
    assert data["size_bytes"] == 1 << 20 and data["path"] == filled.path
    run_cli("stats", "cli", "--directory", str(cache_dir))
    assert filled.stats() == before


def test_stats_text(filled: SharedMemoryCache, cache_dir: Path) -> None:
    result = run_cli("stats", "cli", "--directory", str(cache_dir))
    assert result.returncode == 0
    assert "entries" in result.stdout and "2" in result.stdout


def test_clear_by_llm_string_then_all(filled: SharedMemoryCache, cache_dir: Path) -> None:
    result = run_cli("clear", "cli", "--llm-string", "llm-a", "--directory", str(cache_dir))
    assert result.returncode == 0, result.stderr
    assert filled.lookup("p1", "llm-a") is None
    assert filled.lookup("p2", "llm-b") == text_generations("two")
    assert run_cli("clear", "cli", "--directory", str(cache_dir)).returncode == 0
    assert filled.lookup("p2", "llm-b") is None
    assert filled.stats().entries == 0


def test_check_ok_then_damaged(filled: SharedMemoryCache, cache_dir: Path) -> None:
    ok = run_cli("check", "cli", "--directory", str(cache_dir))
    assert ok.returncode == 0 and ok.stdout.startswith("ok:")
    data = Path(filled.path).read_bytes()
    at = data.index(b"one")
    with open(filled.path, "r+b") as handle:
        handle.seek(at)
        handle.write(b"ONE")
    bad = run_cli("check", "cli", "--directory", str(cache_dir))
    assert bad.returncode == 1
    assert "DAMAGED" in bad.stdout and "crc" in bad.stdout
    assert filled.lookup("p1", "llm-a") is None  # never the damaged value


def test_check_damaged_header(filled: SharedMemoryCache, cache_dir: Path) -> None:
    with open(filled.path, "r+b") as handle:
        handle.write(b"NOTACACHE")
    result = run_cli("check", "cli", "--directory", str(cache_dir))
    assert result.returncode == 1
    assert "shmcache rm cli" in result.stdout


def test_rm_removes_the_segment(filled: SharedMemoryCache, cache_dir: Path) -> None:
    result = run_cli("rm", "cli", "--directory", str(cache_dir))
    assert result.returncode == 0
    assert not Path(filled.path).exists()
    assert filled.lookup("p2", "llm-b") == text_generations("two")  # still attached
    again = run_cli("rm", "cli", "--directory", str(cache_dir))
    assert again.returncode == 2 and "no cache named" in again.stderr


@pytest.mark.parametrize("command", ["stats", "clear", "check"])
def test_missing_cache_is_an_error_and_is_not_created(command: str, tmp_path: Path) -> None:
    result = run_cli(command, "absent", "--directory", str(tmp_path))
    assert result.returncode != 0
    assert "no cache named 'absent'" in result.stderr + result.stdout
    assert not (tmp_path / "absent.v1.shm").exists()


def test_bad_name_and_usage(tmp_path: Path) -> None:
    bad = run_cli("stats", "../etc", "--directory", str(tmp_path))
    assert bad.returncode == 2 and "invalid cache name" in bad.stderr
    assert run_cli().returncode == 2
    assert run_cli("frobnicate").returncode == 2
