"""The names of the registered cells and tasks as plain tuples, for code that must not import JAX.

Config validation (:func:`jbptt.experiment.config.validate`) checks ``model.cell`` and ``task.name`` against
:func:`cell_names` and :func:`task_names`, so ``jbptt --help`` and config errors answer without loading the library.
:data:`CELL_NAMES` and :data:`TASK_NAMES` must equal the registries ``sorted(jbptt.cells.CELLS)`` and
``sorted(jbptt.tasks.TASKS)`` as shipped (``tests/test_startup.py`` checks it): a cell or task added to jbptt is also
named here.
"""

import sys

CELL_NAMES = (
    "diagonal_linear", "elman", "esn", "gru", "indrnn", "lru", "lstm", "sparse_elman", "sparse_gru", "sparse_lstm",
)
"""Sorted names of :data:`jbptt.cells.CELLS`."""

TASK_NAMES = (
    "adding", "brackets", "chars", "copy", "delayed_recall", "digits", "mackey_glass", "speech_digits", "translate",
)
"""Sorted names of :data:`jbptt.tasks.TASKS`."""


def _with_registry(names: tuple, module: str, registry: str) -> tuple:
    """``names`` plus those registered at run time, when the registry's module is already loaded (never loads it)."""
    mod = sys.modules.get(module)
    return tuple(sorted(set(names) | set(getattr(mod, registry, ())))) if mod is not None else names


def cell_names() -> tuple:
    """:data:`CELL_NAMES`, plus cells a program added to :data:`jbptt.cells.CELLS` if that module is loaded."""
    return _with_registry(CELL_NAMES, "jbptt.cells", "CELLS")


def task_names() -> tuple:
    """:data:`TASK_NAMES`, plus tasks registered with :func:`jbptt.tasks.register_task` if that module is loaded."""
    return _with_registry(TASK_NAMES, "jbptt.tasks", "TASKS")
