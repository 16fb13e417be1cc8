"""The branching engine: watch a run, roll back, explore futures, continue along the best.

Built on qckpt's public API only. ``LightCone`` drives (or watches) a training
loop; triggers (``branch.triggers``) decide when, interventions
(``branch.interventions``) what to try, ``select`` which future to keep, and
every event is recorded in the repository (``ConeRecord``) for the report
(``write_report``; CLI ``qckpt cone report``). In the Hugging Face Trainer and
Lightning, ``branch.integrations`` runs it from the framework's own loop.
"""

from branch.engine import (
    ConeConfig,
    Decision,
    Future,
    FutureResult,
    LightCone,
    RolloutExecutor,
    Rollouts,
    SequentialRollouts,
    Situation,
    StepResult,
    default_futures,
)
from branch.interventions import (
    ClipGrad,
    Combined,
    Controls,
    DampMoments,
    Intervention,
    ReseedData,
    ScaleLR,
    ScaleWeightDecay,
    SkipBatches,
    Target,
)
from branch.pruning import Pruning
from branch.record import ConeRecord
from branch.rollouts import BatchedRollouts, BatchedStep, RolloutScheduler
from branch.report import write_report
from branch.selection import Comparison, Selection, select
from branch.triggers import (
    ForecastDisagreement,
    GradNormZ,
    InstabilityIndex,
    LossSpike,
    NonFinite,
    Observation,
    Signal,
    Trigger,
)

__all__ = [
    "BatchedRollouts", "BatchedStep", "ClipGrad", "Combined", "Comparison", "ConeConfig", "ConeRecord", "Controls", "DampMoments", "Decision",
    "ForecastDisagreement", "Future", "FutureResult", "GradNormZ", "InstabilityIndex", "Intervention", "LightCone",
    "LossSpike", "NonFinite", "Observation", "Pruning", "ReseedData", "RolloutExecutor", "RolloutScheduler", "Rollouts", "ScaleLR", "ScaleWeightDecay",
    "Selection", "SequentialRollouts", "Signal", "Situation", "SkipBatches", "StepResult", "Target", "Trigger", "default_futures",
    "select", "write_report",
]  # fmt: skip
