"""Model-location errors speak the command line (flags, environment variables, `hf download`), never
huggingface_hub's Python arguments."""

import pytest

from engine.weights import resolve_model_path


def test_offline_and_not_cached_says_what_to_do(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError) as error:
        resolve_model_path("org/absent")
    message = str(error.value)
    assert message.startswith("--model: cannot find 'org/absent' in the local HF cache (HF_HUB_OFFLINE=1)")
    assert "Unset HF_HUB_OFFLINE" in message and "hf download org/absent" in message
    assert "local_files_only" not in message and "pass '" not in message


def test_unreachable_hub_speaks_cli(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    with pytest.raises(ValueError) as error:
        resolve_model_path("org/absent")
    message = str(error.value)
    assert message.startswith("--model: cannot find 'org/absent' in the HF hub or cache")
    assert "local_files_only" not in message
