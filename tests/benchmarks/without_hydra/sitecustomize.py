"""Put on PYTHONPATH, makes hydra and omegaconf absent, as on the GPU machine's image (see test_gpu_offload.py)."""

import sys
from importlib.machinery import PathFinder

ABSENT = ("hydra", "omegaconf", "hydra_plugins")


class _WithoutHydra:
    """sys.meta_path's PathFinder, except that the absent packages cannot be found."""

    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name.split(".")[0] in ABSENT:
            return None
        return PathFinder.find_spec(name, path, target)

    @classmethod
    def invalidate_caches(cls):
        PathFinder.invalidate_caches()

    @staticmethod
    def find_distributions(*args, **kwargs):
        return PathFinder.find_distributions(*args, **kwargs)


sys.meta_path[:] = [_WithoutHydra if f is PathFinder else f for f in sys.meta_path]
