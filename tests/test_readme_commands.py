"""The README's command lines work as written: the first command installs a torch the project accepts
(the CPU build), and the module and tiny-model serve lines parse and build an engine configuration."""

import re
import shlex
import tomllib
from pathlib import Path

from packaging.specifiers import SpecifierSet
from packaging.version import Version

from app.cli import parse_serve_args
from engine.config_loader import create_engine_config

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
TINY = "samples/models/out/qwen2_5_vl"


def bash_blocks() -> list[str]:
    return [block.replace("\\\n", " ") for block in re.findall(r"```bash\n(.*?)```", README, re.S)]


def test_first_command_installs_a_cpu_torch_that_pyproject_accepts():
    first = bash_blocks()[0]
    pinned = re.search(r"pip install torch==(\S+)", first).group(1)
    assert pinned.endswith("+cpu") and "download.pytorch.org/whl/cpu" in first
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    torch_range = next(d for d in dependencies if d.startswith("torch"))[len("torch"):]
    assert Version(pinned) in SpecifierSet(torch_range)
    assert first.split(" && ")[-1].startswith(f"vlserve serve {TINY} --device cpu")


def test_module_and_tiny_model_lines_build_a_config(tiny_model_dir):
    model = str(tiny_model_dir("qwen2_5_vl"))
    module_line = re.search(r"`python -m app (--model [^`]+)`", README).group(1)
    tiny_line = next(block for block in bash_blocks()[1:] if f"vlserve serve {TINY}" in block)
    for argv in (shlex.split(module_line), shlex.split(tiny_line)[2:]):
        argv = [model if arg == TINY else arg for arg in argv]
        engine_kwargs, server_config = parse_serve_args(argv)
        config = create_engine_config(**engine_kwargs)
        assert config.device_config.device == "cpu" and server_config.port == 8000
    assert config.model_config.max_model_len == 8000  # the tiny model's positions reach past it
