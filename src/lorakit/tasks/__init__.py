"""Built-in tasks with deterministic generators, used by the demo and the tests.

See ``lorakit.tasks.registry`` for the row convention (conversational prompt/completion).
"""

from lorakit.tasks.metrics import METRICS, get_metric, score_contains, score_normalized
from lorakit.tasks.registry import TASKS, Task, get_task, list_tasks, make_split, row_answer, score_exact

__all__ = ["METRICS", "TASKS", "Task", "get_metric", "get_task", "list_tasks", "make_split", "row_answer",
           "score_contains", "score_exact", "score_normalized"]
