"""chaincomp: chain D/P/Q/E compression of CNNs, measure every step, search orders, track in MLflow."""

from chaincomp.errors import ChaincompError, ConfigError, DataError

__all__ = ["ChaincompError", "ConfigError", "DataError"]
__version__ = "0.1.0"
