"""Names that moved out of the kernels still resolve there for one release, with a warning."""

from __future__ import annotations

import importlib

import pytest

from optishear_lightning import dispatch, export


@pytest.mark.parametrize(
    ("old_module", "name", "home"),
    [
        ("optishear_lightning.kernels", "triton_prune", dispatch),
        ("optishear_lightning.kernels", "export_semi_structured", export),
        ("optishear_lightning.kernels.fused", "try_fused_prune_", dispatch),
        ("optishear_lightning.kernels.fused", "deferred_nan_checks", dispatch),
        ("optishear_lightning.kernels.semi_structured", "SemiStructuredExport", export),
    ],
)
def test_moved_names_warn_and_resolve(old_module, name, home):
    module = importlib.import_module(old_module)
    with pytest.warns(DeprecationWarning, match=f"moved to {home.__name__}.{name}"):
        assert getattr(module, name) is getattr(home, name)


def test_unknown_names_are_still_errors():
    from optishear_lightning.kernels import fused

    with pytest.raises(AttributeError, match="no attribute 'export_semi_structured'"):
        fused.export_semi_structured  # noqa: B018  (moved from semi_structured, not fused)
