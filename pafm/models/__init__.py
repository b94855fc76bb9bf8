"""SiT and MMDiT velocity models, built by name: `build_model("SiT-B/2", input_size=32, in_channels=4)`."""
from .mmdit import MMDiT
from .registry import build_model, list_models, model_from_config
from .sit import SiT

__all__ = ["build_model", "model_from_config", "list_models", "SiT", "MMDiT"]
