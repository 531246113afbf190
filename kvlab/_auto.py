"""``import kvlab`` makes `transformers`' Auto classes know kvlab's exports (``model_type: kvlab``), so that
``AutoModelForCausalLM.from_pretrained(export_dir)`` loads one with the installed kvlab, without
``trust_remote_code``.

Registering needs `transformers` and kvlab's ``PreTrainedModel`` (seconds of imports), which most uses of
kvlab never touch; so it waits until the program imports `transformers`' Auto models (now, if it has).
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import logging
import sys

AUTO_MODULE = "transformers.models.auto.modeling_auto"
log = logging.getLogger("kvlab")


def register() -> None:
    """Register kvlab's config and model classes with AutoConfig and AutoModelForCausalLM (idempotent)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from kvlab.archs.hf_modeling import KvlabConfig, KvlabForCausalLM

    AutoConfig.register("kvlab", KvlabConfig, exist_ok=True)
    AutoModelForCausalLM.register(KvlabConfig, KvlabForCausalLM, exist_ok=True)


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: when ``AUTO_MODULE`` is imported, it lets the other finders find it and registers
    once it has run."""

    def find_spec(self, name, path, target=None):
        if name != AUTO_MODULE:
            return None
        sys.meta_path.remove(self)  # once only; and the real finders find the module
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        run_module = spec.loader.exec_module

        def exec_module(module):
            run_module(module)
            sys.modules[name] = module  # as the import system will: register() imports from it
            try:
                register()
            except ImportError as e:  # a transformers without what kvlab's classes need: remote code still works
                log.debug("kvlab: not registered with transformers' Auto classes: %s", e)

        spec.loader.exec_module = exec_module
        return spec


def install() -> None:
    if AUTO_MODULE in sys.modules:
        register()
    elif not any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())
