"""First-run command line: `vlserve --version`, a busy port failing before the model loads, and
--kv-cache-memory-bytes (vLLM's flag and size spellings)."""

import re
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

from app.cli import main, parse_serve_args
from app.listen import bind_listener

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_version_prints_the_project_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    assert capsys.readouterr().out.strip() == project["version"]


def test_busy_port_fails_within_three_seconds_naming_the_flag(tiny_model_dir):
    model = str(tiny_model_dir("qwen2_5_vl"))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        start = time.monotonic()
        result = subprocess.run([sys.executable, "-m", "app", "--model", model, "--host", "127.0.0.1",
                                 "--port", str(port), "--device", "cpu"], capture_output=True, text=True, timeout=60)
        elapsed = time.monotonic() - start
    assert result.returncode == 2, result.stderr
    assert f"--port {port}" in result.stderr and "another --port" in result.stderr
    assert elapsed < 3, f"a busy port took {elapsed:.1f} s to report"


@pytest.mark.parametrize("host, port, needle", [("127.0.0.1", 70000, "--port: must be in [0, 65535]"),
                                                ("no-such-host.invalid", 8000, "--host no-such-host.invalid")])
def test_bad_listen_address_names_the_flag(host, port, needle):
    with pytest.raises(ValueError, match=re.escape(needle)):
        bind_listener(host, port)


@pytest.mark.parametrize("text, expected", [("123456789", 123456789), ("2G", 2 << 30), ("1.5g", 1_500_000_000),
                                            ("500M", 500 << 20), ("25.6k", 25_600)])
def test_kv_cache_memory_bytes_takes_vllm_sizes(text, expected):
    kwargs, _ = parse_serve_args(["some/model", "--kv-cache-memory-bytes", text])
    assert kwargs["kv_cache_memory_bytes"] == expected


def test_kv_cache_memory_bytes_rejects_a_non_size(capsys):
    with pytest.raises(SystemExit):
        parse_serve_args(["some/model", "--kv_cache_memory_bytes", "lots"])
    assert "is not a size" in capsys.readouterr().err
