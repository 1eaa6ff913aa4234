"""Model weights: find the checkpoint directory, stream its safetensors, place each tensor in
its parameter, and check that nothing is missing or left over.

Caller: engine.config_loader (resolve_model_path) and engine.runner.model_runner (the rest).
Models call `load_named_weights` from their `load_weights`; `load_checked` wraps that with the
missing/unexpected check. Parameter keys: a plain parameter is its name; a packed parameter
(see engine.layers.linear) is one key per shard, "name#shard_id".
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from engine.layers.linear import default_weight_loader

Weights = Iterable[tuple[str, torch.Tensor]]


# --- locating a checkpoint -------------------------------------------------------------------

def resolve_model_path(model: str, revision: str | None = None, trust_remote_code: bool = False,
                       use_modelscope: bool | None = None, download_dir: str | None = None) -> str:
    """A local directory holding config.json; else a snapshot from the HF cache / hub
    (HF_HUB_OFFLINE=1: cache only) or, with VLSERVE_USE_MODELSCOPE=True, from ModelScope.
    `download_dir` (--download-dir): the cache folder to read and download into instead of HF's."""
    del trust_remote_code  # remote code is never run; kept for vLLM's signature
    if os.path.isdir(model):
        return _check_model_dir(model)
    if _looks_like_path(model):
        raise ValueError(f"--model: directory {model!r} does not exist")
    if use_modelscope is None:
        use_modelscope = os.environ.get("VLSERVE_USE_MODELSCOPE", "").strip().lower() in ("1", "true")
    if use_modelscope:
        path = _modelscope_snapshot(model, revision, download_dir)
    else:
        path = _hf_snapshot(model, revision, download_dir)
    return _check_model_dir(path)


def _looks_like_path(model: str) -> bool:
    return model.startswith(("/", "./", "../", "~")) or model.count("/") > 1


def _hf_snapshot(model: str, revision: str | None, download_dir: str | None = None) -> str:
    from huggingface_hub import snapshot_download

    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    try:
        return snapshot_download(model, revision=revision, local_files_only=offline,
                                 cache_dir=download_dir or _hf_cache_dir(),
                                 allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model",
                                                 "*.jinja", "*.tiktoken", "*.py"])
    except Exception as exc:  # hub errors come in many classes
        where = "the local HF cache (HF_HUB_OFFLINE=1)" if offline else "the HF hub or cache"
        raise ValueError(f"--model: cannot find {model!r} in {where}: {_hub_error_text(exc, model, offline)}") from exc


def _hub_error_text(exc: Exception, model: str, offline: bool) -> str:
    """What to do, in command-line terms (huggingface_hub's own texts speak of its Python arguments)."""
    from huggingface_hub.errors import (GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    if offline:
        return (f"it has not been downloaded. Unset HF_HUB_OFFLINE to let vlserve download it, download it "
                f"first (hf download {model}), or pass a local directory as the model")
    if isinstance(exc, GatedRepoError):
        return "the model is gated: accept its terms on the hub, then set HF_TOKEN"
    if isinstance(exc, RepositoryNotFoundError):
        return "no such model on the hub (a private one needs HF_TOKEN)"
    if isinstance(exc, RevisionNotFoundError):
        return "--revision names no branch, tag or commit of this model"
    if isinstance(exc, LocalEntryNotFoundError):
        return "the hub cannot be reached and the model is not in the HF cache (set HF_HOME / HF_HUB_CACHE?)"
    return str(exc).splitlines()[0]


def _hf_cache_dir() -> str | None:
    # Read at call time: huggingface_hub freezes these variables when it is first imported.
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return None


def _modelscope_snapshot(model: str, revision: str | None, download_dir: str | None = None) -> str:
    try:
        from modelscope import snapshot_download
    except ImportError as exc:
        raise ValueError("VLSERVE_USE_MODELSCOPE is set but the modelscope package is not installed "
                         "(pip install modelscope)") from exc
    return snapshot_download(model, revision=revision, cache_dir=download_dir)


def _check_model_dir(path: str) -> str:
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"--model: no config.json in {path}")
    return path


def safetensors_files(path: str) -> list[str]:
    """The shard files of a checkpoint: those named by model.safetensors.index.json, else all
    *.safetensors in the directory."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        missing = [s for s in shards if not os.path.isfile(os.path.join(path, s))]
        if missing:
            raise ValueError(f"{index} names shards that are not there: {missing}")
        return [os.path.join(path, s) for s in shards]
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise ValueError(f"no *.safetensors in {path}")
    return [os.path.join(path, f) for f in files]


def iterate_weights(path: str) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (checkpoint name, CPU tensor) over every shard, with a progress bar over shards
    when stderr is a terminal and there is more than one."""
    from safetensors import safe_open
    from tqdm import tqdm

    files = safetensors_files(path)
    disable = len(files) == 1 or not sys.stderr.isatty()
    for file in tqdm(files, desc="Loading safetensors shards", disable=disable):
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


# --- placing tensors in parameters -----------------------------------------------------------

def rename(name: str, prefix_map: dict[str, str]) -> str:
    """Apply the first matching checkpoint-prefix -> model-prefix rule (a HF layout change)."""
    for old, new in prefix_map.items():
        if name.startswith(old):
            return new + name[len(old):]
    return name


def load_named_weights(params: dict[str, nn.Parameter], weights: Weights,
                       packed_modules_mapping: dict[str, list[str]] | None = None,
                       prefix_map: dict[str, str] | None = None,
                       skip: Iterable[str] = ()) -> set[str]:
    """Copy each checkpoint tensor into its parameter; return the parameter keys loaded.
    packed_modules_mapping: fused module -> its checkpoint modules in shard order, e.g.
    {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}.
    Names matching `skip` (after renaming) are ignored; any other unknown name is an error."""
    shard_of = _shard_table(packed_modules_mapping or {})
    loaded, unexpected = set(), []
    skip = tuple(skip)
    for ckpt_name, tensor in weights:
        name = rename(ckpt_name, prefix_map or {})
        if skip and name.startswith(skip):
            continue
        key = _load_one(params, name, tensor, shard_of)
        if key is None:
            unexpected.append(ckpt_name)
        else:
            loaded.add(key)
    if unexpected:
        raise ValueError(f"checkpoint has {len(unexpected)} weights the model does not expect: "
                         f"{sorted(unexpected)[:20]}")
    return loaded


def _shard_table(packed: dict[str, list[str]]) -> dict[str, tuple[str, object]]:
    """checkpoint module name -> (fused module name, shard id)."""
    table = {}
    for fused, parts in packed.items():
        ids = ("q", "k", "v") if parts == ["q_proj", "k_proj", "v_proj"] else range(len(parts))
        for part, shard_id in zip(parts, ids):
            table[part] = (fused, shard_id)
    return table


def _load_one(params, name: str, tensor: torch.Tensor, shard_of) -> str | None:
    for part, (fused, shard_id) in shard_of.items():
        token = f".{part}."
        if token in name:
            fused_name = name.replace(token, f".{fused}.")
            param = params.get(fused_name)
            if param is None:
                return None
            param.weight_loader(param, tensor, shard_id)
            return f"{fused_name}#{shard_id}"
    param = params.get(name)
    if param is None:
        return None
    getattr(param, "weight_loader", default_weight_loader)(param, tensor)
    return name


def expected_weight_keys(model: nn.Module) -> set[str]:
    keys = set()
    for name, param in model.named_parameters():
        shard_ids = getattr(param, "shard_ids", None)
        keys.update({f"{name}#{s}" for s in shard_ids} if shard_ids else {name})
    return keys


def load_checked(model: nn.Module, weights: Weights) -> set[str]:
    """model.load_weights(weights), then fail listing every parameter (or shard) not loaded."""
    loaded = model.load_weights(weights)
    missing = expected_weight_keys(model) - loaded
    if missing:
        raise ValueError(f"checkpoint is missing {len(missing)} weights of "
                         f"{type(model).__name__}: {sorted(missing)[:20]}")
    return loaded


@torch.no_grad()
def init_dummy_weights(model: nn.Module, seed: int = 0, low: float = -1e-3, high: float = 1e-3) -> None:
    """load_format="dummy": fill every parameter in place (on its device) with uniform noise;
    norm weights get 1 + noise so activations keep a sane scale."""
    generator = None
    for name, param in model.named_parameters():
        if generator is None or generator.device != param.device:
            generator = torch.Generator(param.device).manual_seed(seed)
        param.uniform_(low, high, generator=generator)
        if param.dim() == 1 and "norm" in name:
            param.add_(1.0)
