"""kagglekd: distil a large (often Mixture-of-Experts) causal LM into a small dense student on Kaggle GPUs."""

from kagglekd.config import DistillConfig
from kagglekd.errors import ConfigError, DataError, KaggleKDError

__version__ = "0.1.0"
__all__ = ["DistillConfig", "ConfigError", "DataError", "KaggleKDError", "Distiller", "__version__"]


def __getattr__(name):
    # The trainer pulls in torch/transformers/accelerate; import it only when asked for.
    if name == "Distiller":
        from kagglekd.trainer import Distiller

        return Distiller
    raise AttributeError(name)
