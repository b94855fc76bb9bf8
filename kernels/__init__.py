"""Posterior-velocity op for Posterior-Augmented Flow Matching: a PyTorch reference and fused Triton kernels.

Importing this package never touches a GPU driver; the Triton kernels are imported on first use.

This folder is installed as `pafm_kernels` (pyproject.toml maps the name). Run from the checkout (`python -m ...`),
the repository root is on sys.path and this file would also answer `import kernels`, shadowing the unrelated
`kernels` distribution that transformers imports; under any name but its own it hands the import over to whatever
is installed under that name, or fails as not installed.
"""
if __name__ == "pafm_kernels":
    from .posterior_velocity import PosteriorTarget, combine_posteriors, pool_squared_norms, posterior_velocity

    __all__ = ["posterior_velocity", "combine_posteriors", "pool_squared_norms", "PosteriorTarget"]
else:
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _elsewhere = [p for p in sys.path if os.path.abspath(p or os.curdir) != _checkout]
    _spec = importlib.machinery.PathFinder.find_spec(__name__, _elsewhere)
    if _spec is None:
        raise ModuleNotFoundError(f"No module named {__name__!r}", name=__name__)
    _module = importlib.util.module_from_spec(_spec)
    sys.modules[__name__] = _module  # the import statement returns what sys.modules holds once this file has run
    _spec.loader.exec_module(_module)
