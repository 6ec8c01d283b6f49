"""Tasks: the `Example` container, the dataset registry, file readers, loaders and answer extractors."""
from exgrpo.tasks.example import Example
from exgrpo.tasks.files import DatasetError
from exgrpo.tasks.loaders import LoadResult
from exgrpo.tasks.registry import PAPER_TASKS, TASKS, Task, get_task, load_examples

__all__ = ["Example", "DatasetError", "LoadResult", "Task", "TASKS", "PAPER_TASKS", "get_task",
           "load_examples"]
