"""Chains of stages: the runner, the prefix cache and replay (see :mod:`chaincomp.chain.runner`)."""

from chaincomp.chain.runner import (
    CacheStats,
    ChainSpec,
    PrefixCache,
    Step,
    chain_spec,
    load_chain,
    prefix_keys,
    replay,
    run_chain,
)

__all__ = [
    "CacheStats",
    "ChainSpec",
    "PrefixCache",
    "Step",
    "chain_spec",
    "load_chain",
    "prefix_keys",
    "replay",
    "run_chain",
]
