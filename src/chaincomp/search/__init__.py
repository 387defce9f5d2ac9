"""Optuna search over chain orders and stage hyperparameters.

The modules, by job: :mod:`.space` (orders x stage hyperparameters), :mod:`.config` (the
``search`` config section), :mod:`.storage` (journal / database storage, stale trials),
:mod:`.samplers` (the Optuna sampler), :mod:`.objective` (one trial = one chain), :mod:`.front`
(the Pareto front and its files) and :mod:`.driver` (``chaincomp sweep``: the study and its
workers).
"""

from chaincomp.search.config import SearchConfig
from chaincomp.search.driver import sweep
from chaincomp.search.space import Param, SearchSpace, build_space, enumerate_orders

__all__ = ["Param", "SearchConfig", "SearchSpace", "build_space", "enumerate_orders", "sweep"]
