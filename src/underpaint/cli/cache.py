"""The feature-caching flags of the generation commands: DeepCache (SD/SDXL) and First Block Cache (FLUX).

Both trade picture quality for speed and are off unless asked for. A flag given here wins over
what ``--from-infotext`` brings; ``--deepcache 0`` and ``--first-block-cache 0`` turn an
infotext's cache off.
"""

from __future__ import annotations

import argparse
from dataclasses import replace

from ..errors import InvalidParameter
from ..params import DeepCacheOptions, GenerationParams

_DEEPCACHE_DETAIL = (("deepcache_branch", "branch", "--deepcache-branch"), ("deepcache_start", "start", "--deepcache-start"),
                     ("deepcache_end", "end", "--deepcache-end"))


def add_cache_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("feature caching", "reuse model features between steps: faster, and the picture drifts "
                                                "from the uncached one (off by default)")
    g.add_argument("--deepcache", type=int, default=None, metavar="INTERVAL",
                   help="DeepCache (SD/SDXL): run the whole UNet every INTERVAL-th step and only its shallow "
                        "branch on the steps between (2-5 is the usual range; 0 or 1: off)")
    g.add_argument("--deepcache-branch", type=int, default=None, metavar="N",
                   help="DeepCache's branch: 0 (default) is the shallowest and fastest; larger keeps more "
                        "of the UNet fresh (SD 1.x/2.x: 0-11, SDXL: 0-8)")
    g.add_argument("--deepcache-start", type=int, default=None, metavar="STEP",
                   help="DeepCache: steps before this one always run in full (default 0)")
    g.add_argument("--deepcache-end", type=int, default=None, metavar="STEP",
                   help="DeepCache: this step and the ones after it run in full (default: none)")
    g.add_argument("--first-block-cache", type=float, default=None, metavar="THRESHOLD",
                   help="First Block Cache (FLUX): skip the transformer blocks after the first while its "
                        "output changes by at most THRESHOLD relative to the last full step (0.12 is a common "
                        "choice for FLUX.1-dev; larger is faster and drifts further; 0: off)")


def with_cache(params: GenerationParams, args: argparse.Namespace) -> GenerationParams:
    """The caching flags over the request (and over what an infotext brought)."""
    interval = getattr(args, "deepcache", None)
    deepcache = params.deepcache
    if interval is not None:
        if interval < 0:
            raise InvalidParameter("--deepcache", interval, "an interval of 2 or more (0 or 1: off)")
        deepcache = None if interval <= 1 else replace(deepcache or DeepCacheOptions(), interval=interval)
    changes = {name: getattr(args, dest) for dest, name, _ in _DEEPCACHE_DETAIL if getattr(args, dest, None) is not None}
    if changes:
        if deepcache is None:
            flag = next(flag for dest, _, flag in _DEEPCACHE_DETAIL if getattr(args, dest, None) is not None)
            raise InvalidParameter(flag, getattr(args, flag[2:].replace("-", "_")), "used with --deepcache INTERVAL")
        deepcache = replace(deepcache, **changes)
    if deepcache is not params.deepcache:
        params = params.replace(deepcache=deepcache)
    threshold = getattr(args, "first_block_cache", None)
    if threshold is not None:
        if not 0 <= threshold <= 1:
            raise InvalidParameter("--first-block-cache", threshold, "a threshold from 0 (off) to 1")
        params = params.replace(first_block_cache=threshold)
    return params
