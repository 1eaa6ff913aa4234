"""GET /v1/models: the served model names, each with its root (what was loaded), max_model_len and
the sampling defaults from the generation config (`default_sampling_params`).

Caller: Litestar (registered by app.server).
"""

from __future__ import annotations

from litestar import Controller, get
from litestar.di import NamedDependency

from app.auth import require_api_key
from app.protocol import ModelCard, ModelList
from app.serving import ServingContext


class ModelsController(Controller):
    path = "/v1/models"
    guards = [require_api_key]
    tags = ["models"]

    @get("")
    async def list_models(self, serving: NamedDependency[ServingContext]) -> ModelList:
        defaults = serving.client.frontend.config.model_config.get_diff_sampling_param()
        return ModelList(data=[ModelCard(id=name, root=serving.config.model, max_model_len=serving.max_model_len,
                                         default_sampling_params=defaults)
                               for name in serving.config.served_names])
