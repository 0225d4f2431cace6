"""Data layer: the task registry: `get_task(name)` -> a Task (see `base.Task`)."""
from __future__ import annotations

from importlib import import_module

from raydllm.data.tasks.base import DataError, Example, Task

# name -> (module, class). Imported lazily so a task's optional dependencies cost nothing elsewhere.
REGISTRY = {
    "gsm8k": ("gsm8k", "Gsm8kTask"),
    "nlrx": ("nlrx", "NlRxTask"),
    "django": ("django", "DjangoTask"),
    "spider": ("spider", "SpiderTask"),
    "text": ("text", "TextTask"),
}


def get_task(name: str, **kwargs) -> Task:
    if name not in REGISTRY:
        raise DataError(f"task: unknown task {name!r}; choose one of {', '.join(sorted(REGISTRY))}")
    module, cls = REGISTRY[name]
    return getattr(import_module(f"{__name__}.{module}"), cls)(**kwargs)


__all__ = ["DataError", "Example", "Task", "get_task", "REGISTRY"]
