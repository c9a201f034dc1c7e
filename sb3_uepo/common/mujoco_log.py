"""Keep MuJoCo's ``MUJOCO_LOG.TXT`` out of the user's working directory.

Owns: where MuJoCo's warnings go. MuJoCo's default log handler prints a warning (e.g. "Nan, Inf or huge value in
QACC ... The simulation is unstable") to the console and appends it to ``MUJOCO_LOG.TXT`` in the current
directory (MuJoCo 4: ``mjLogConfig.logto_file``, default file ``MUJOCO_LOG.TXT``). Once configured here:

* warnings become Python warnings of category :class:`MuJoCoWarning` (filter them with :mod:`warnings`;
  when a filter turns them into errors they go to the ``sb3_uepo.mujoco`` logger instead, because an
  exception cannot cross MuJoCo's C callback);
* MuJoCo's own log file is switched off.

Set ``UEPO_MUJOCO_LOG=/path/to/file`` to keep MuJoCo's handler and have it write its log to that file instead.

Cheap: ``import sb3_uepo`` calls :func:`install_mujoco_log_hook`, which configures MuJoCo right away when it is
already imported, and otherwise the first time anything imports it (MuJoCo's import takes ~0.3 s; we do not
trigger it). Must not touch: anything else about MuJoCo.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import warnings
from types import ModuleType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import importlib.machinery

LOG_FILE_VARIABLE = "UEPO_MUJOCO_LOG"
LOGGER_NAME = "sb3_uepo.mujoco"


class MuJoCoWarning(RuntimeWarning):
    """A warning raised by the MuJoCo simulator (e.g. an unstable simulation)."""


def forward_mujoco_warning(message: str) -> None:
    """MuJoCo's user-warning callback: a Python warning, or a log record when warnings are errors.

    Never raises: an exception inside MuJoCo's C callback aborts the process.
    """
    try:
        warnings.warn(f"MuJoCo: {message}", MuJoCoWarning, stacklevel=2)
    except BaseException:  # a warnings filter set to "error" (e.g. pytest -W error)
        try:
            import logging

            logging.getLogger(LOGGER_NAME).warning("MuJoCo: %s", message)
        except BaseException:
            pass


def configure_mujoco_logging(module: ModuleType | None = None) -> None:
    """Route MuJoCo's warnings to Python and switch off its log file (or point it at ``$UEPO_MUJOCO_LOG``).

    A warning callback installed by the user before this call is kept.

    :param module: the imported ``mujoco`` module (imported here when None)
    """
    mujoco = module if module is not None else importlib.import_module("mujoco")
    log_file = os.environ.get(LOG_FILE_VARIABLE)
    log_config_type = getattr(mujoco, "MjLogConfig", None)  # MuJoCo >= 4
    if log_config_type is not None:
        config = log_config_type.get()
        config.logto_file = bool(log_file)
        if log_file:
            config.logfile = os.path.abspath(os.path.expanduser(log_file))
        config.set()
    if not log_file and mujoco.get_mju_user_warning() is None:
        mujoco.set_mju_user_warning(forward_mujoco_warning)


def install_mujoco_log_hook() -> None:
    """Configure MuJoCo now if it is imported, else right after its first import (without importing it)."""
    module = sys.modules.get("mujoco")
    if module is not None:
        _configure_quietly(module)
    elif not any(isinstance(finder, _MuJoCoImportHook) for finder in sys.meta_path):
        sys.meta_path.insert(0, _MuJoCoImportHook())


def _configure_quietly(module: ModuleType) -> None:
    try:
        configure_mujoco_logging(module)
    except Exception as exc:  # an unexpected MuJoCo build must never break an import
        import logging

        logging.getLogger(LOGGER_NAME).debug("could not configure MuJoCo logging: %s", exc)


class _MuJoCoImportHook:
    """One-shot import hook (a ``sys.meta_path`` finder): finds ``mujoco`` with the normal machinery and
    configures it once it has loaded."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname != "mujoco":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        spec.loader = _ConfigureAfterLoading(spec.loader)  # type: ignore[assignment]
        return spec


class _ConfigureAfterLoading:
    """Loader wrapper: the original loader runs the module, then MuJoCo gets configured."""

    def __init__(self, loader: Any) -> None:
        self._loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        module.__loader__ = self._loader  # the module should not see this wrapper afterwards
        if module.__spec__ is not None:
            module.__spec__.loader = self._loader
        self._loader.exec_module(module)
        _configure_quietly(module)

    def __getattr__(self, name: str) -> Any:  # resource readers and the like
        return getattr(self._loader, name)
