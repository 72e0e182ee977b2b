"""timm's own model tests (tests/test_models.py of the installed timm's source distribution, which
``bash tests_timm/fetch.sh`` downloads beside this file; not kept in the repository) run on the
lcnn_* models: this conftest registers them before timm's test module collects its model list, offline.

    bash tests_timm/fetch.sh
    python -m pytest tests_timm -k lcnn_ -m "base or cfg or features or fxforward or fxbackward or torchscript"

Every test runs on every lcnn_* model except the TorchScript ones on the LCNN variants, which
refuse scripting by design (one clear error pointing to lcnn_zoo.fold: see README, Deployment);
their softplus/ReLU baselines and folded LCNNs script (tests/test_guarantees.py).
"""
import os
import tempfile

_HOME = tempfile.mkdtemp(prefix="lcnn-zoo-timm-suite-")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HOME", _HOME)
os.environ["LCNN_ZOO_PUBLISHED"] = os.path.join(_HOME, "published.json")

import pytest  # noqa: E402
import timm  # noqa: E402,F401

import lcnn_zoo  # noqa: E402,F401  (registers lcnn_* in timm)

_SCRIPTABLE_SUFFIXES = ("_softplus", "_relu")


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="LCNN variants refuse TorchScript by design: script lcnn_zoo.fold(model)")
    for item in items:
        name = getattr(item, "callspec", None) and item.callspec.params.get("model_name")
        if (isinstance(name, str) and name.startswith("lcnn_") and "torchscript" in item.name
                and not name.split(".")[0].endswith(_SCRIPTABLE_SUFFIXES)):
            item.add_marker(skip)
