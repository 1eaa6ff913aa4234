"""Vision towers: one ViT per module; the engine's VL models compose them with an LM.

Caller: `engine.models.*`. Every tower takes (pixel_values [N_patches, patch_dim], grid_thw
[num_items, 3]) for all items of a step and returns their LM-space embeddings concatenated in
item order; `load_weights(iter of (name relative to the tower, tensor)) -> set[str]` loads them.
"""

from vision.towers.qwen2_5_vl import Qwen2_5_VisionTransformer
from vision.towers.qwen2_vl import Qwen2VisionTransformer
from vision.towers.qwen3_vl import Qwen3VisionTransformer

__all__ = ["Qwen2VisionTransformer", "Qwen2_5_VisionTransformer", "Qwen3VisionTransformer"]
