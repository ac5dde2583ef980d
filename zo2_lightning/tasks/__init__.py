"""Data for ZO fine-tuning: MeZO's prompted tasks, LM-BFF's masked-LM tasks, plain text and a synthetic task.

``dm = PromptDataModule("sst2", tokenizer, data_dir="data/sst2")``; the ``task/`` configs build these.
Templates (:mod:`.templates`), reading (:mod:`.loading`), sampling (:mod:`.sampling`), batching
(:mod:`.collate`) and scoring (:mod:`.scoring`) each live in their own module.
"""

from zo2_lightning.tasks.datamodules import PromptDataModule, TextFileDataModule
from zo2_lightning.tasks.synthetic import SyntheticDataModule
from zo2_lightning.tasks.templates import TASKS, Example, TaskSpec

__all__ = ["TASKS", "Example", "PromptDataModule", "SyntheticDataModule", "TaskSpec", "TextFileDataModule"]
