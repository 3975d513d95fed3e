"""Package attributes that load their submodule on first use (PEP 562).

Used by packages whose submodules pull in torch or timm, so that importing one light submodule
(e.g. `echocare_dist.models.archs` for config validation) or running `echocare --help` stays fast."""
from __future__ import annotations

import importlib


def lazy_exports(package: str, exports: dict[str, str], namespace: dict):
    """(__getattr__, __dir__) for `package`, whose public name N lives in submodule exports[N]."""
    def __getattr__(name: str):
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{exports[name]}"), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(exports))

    return __getattr__, __dir__
