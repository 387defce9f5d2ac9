"""Optuna search over chain orders and stage hyperparameters (see :mod:`chaincomp.search.study`)."""

from chaincomp.search.space import Param, SearchSpace, build_space, enumerate_orders
from chaincomp.search.study import SearchConfig, sweep

__all__ = ["Param", "SearchConfig", "SearchSpace", "build_space", "enumerate_orders", "sweep"]
