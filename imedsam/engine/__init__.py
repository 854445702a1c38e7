"""Pieces for MONAI/ignite engines: the prompt inferer, handlers and optimiser groups."""

from .handlers import CoarseWeightHandler, EvaluationReport, SavePredictions
from .inferer import PromptInferer
from .optim import parameter_groups
from .prompt_batch import PreparePromptBatch
from .slabs import PrepareSlabBatch

__all__ = ["CoarseWeightHandler", "EvaluationReport", "PreparePromptBatch", "PrepareSlabBatch", "PromptInferer", "SavePredictions", "parameter_groups"]
