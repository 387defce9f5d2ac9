"""Chains of stages: the spec (:mod:`.spec`), the runner (:mod:`.runner`), the prefix cache
(:mod:`.cache`), replay (:mod:`.replay`) and the result schema (:mod:`.result`)."""

from chaincomp.chain.cache import (
    CACHE_FORMAT,
    CacheStats,
    PrefixCache,
    code_fingerprint,
    prefix_keys,
)
from chaincomp.chain.replay import load_chain, replay, save_chain, trainable_names
from chaincomp.chain.result import RESULT_SCHEMA, ChainResult, StepResult
from chaincomp.chain.runner import run_chain
from chaincomp.chain.spec import ChainSpec, Step, chain_spec

__all__ = [
    "CACHE_FORMAT",
    "RESULT_SCHEMA",
    "CacheStats",
    "ChainResult",
    "ChainSpec",
    "PrefixCache",
    "Step",
    "StepResult",
    "chain_spec",
    "code_fingerprint",
    "load_chain",
    "prefix_keys",
    "replay",
    "run_chain",
    "save_chain",
    "trainable_names",
]
