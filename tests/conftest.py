"""Session fixtures shared by every test: tiny HF checkpoints and sample media, built once and cached.

`tiny_model_dir(name)` -> Path of samples/models/out/<name> ("qwen2", "qwen2_vl", "qwen2_5_vl",
"qwen3_vl", "internvl", "internvl_chat");
`media_dir` -> Path of samples/media/out. Both are rebuilt when their builder sources (or the installed
transformers / PyAV version) change: a stamp file inside the directory holds that hash. Builds happen in
a temporary sibling directory under an exclusive file lock and are renamed into place, so concurrent
pytest processes never see a half-written directory.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
MODELS_DIR = REPO_ROOT / "samples" / "models"
MEDIA_DIR = REPO_ROOT / "samples" / "media"
STAMP_NAME = ".build_stamp"


def _load_module(path: Path):
    spec = importlib.util.spec_from_file_location(f"_vlserve_sample_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _source_stamp(sources: list[Path], extra: str) -> str:
    digest = hashlib.sha256(extra.encode())
    for source in sources:
        digest.update(source.name.encode() + b"\0" + source.read_bytes())
    return digest.hexdigest()


def build_cached(target: Path, stamp: str, build: Callable[[Path], object]) -> Path:
    """Return target, (re)building it with build(tmp_dir) unless its stamp file already equals stamp."""
    target.parent.mkdir(parents=True, exist_ok=True)
    stamp_file = target / STAMP_NAME
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if stamp_file.exists() and stamp_file.read_text() == stamp:
            return target
        tmp_dir = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            build(tmp_dir)
            (tmp_dir / STAMP_NAME).write_text(stamp)
            if target.exists():
                shutil.rmtree(target)
            tmp_dir.rename(target)
        finally:
            shutil.rmtree(tmp_dir, ignore_errors=True)
    return target


@pytest.fixture(scope="session")
def tiny_model_dir() -> Callable[[str], Path]:
    import transformers

    builder = _load_module(MODELS_DIR / "build_tiny.py")
    sources = [MODELS_DIR / "build_tiny.py", MODELS_DIR / "tiny_tokenizer.py",
               REPO_ROOT / "chat_templates" / "qwen3_vl.jinja"]  # the tiny Qwen3-VL's template
    stamp = _source_stamp(sources, f"transformers={transformers.__version__}")
    # InternVL ("internvl": transformers' layout, "internvl_chat": the original layout) has its own builder.
    internvl = _load_module(MODELS_DIR / "build_tiny_internvl.py")
    internvl_stamp = _source_stamp(sources + [MODELS_DIR / "build_tiny_internvl.py"],
                                   f"transformers={transformers.__version__}")

    def get(name: str, scale: str = "default", shape: str = "default") -> Path:
        """`scale`: build_tiny.INIT_SCALES key, `shape`: build_tiny.SHAPES; other than the defaults,
        checkpoints live in out/<name>-<scale>-<shape>."""
        variant = (scale, shape) != ("default", "default")
        if name in internvl.MODEL_NAMES:
            if variant:
                raise ValueError(f"scale/shape variants exist for {builder.MODEL_NAMES} only, not {name!r}")
            return build_cached(MODELS_DIR / "out" / name, internvl_stamp, lambda tmp: internvl.build(name, tmp))
        if name not in builder.MODEL_NAMES:
            raise ValueError(f"name: unknown tiny model {name!r}; expected one of "
                             f"{builder.MODEL_NAMES + internvl.MODEL_NAMES}")
        target = MODELS_DIR / "out" / (f"{name}-{scale}-{shape}" if variant else name)
        return build_cached(target, stamp, lambda tmp: builder.build(name, tmp, scale, shape))

    return get


@pytest.fixture(scope="session")
def media_dir() -> Path:
    import av
    import PIL

    maker = _load_module(MEDIA_DIR / "make_media.py")
    stamp = _source_stamp([MEDIA_DIR / "make_media.py"], f"av={av.__version__} pillow={PIL.__version__}")
    return build_cached(MEDIA_DIR / "out", stamp, maker.make_all)
