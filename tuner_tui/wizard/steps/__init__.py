"""The wizard's six steps, one screen each, in the order STEPS walks them."""

from tuner_tui.wizard.steps.base import WizardStep
from tuner_tui.wizard.steps.data import LEARNED, DataStep
from tuner_tui.wizard.steps.hardware import HardwareStep
from tuner_tui.wizard.steps.hyperparameters import HyperparametersStep
from tuner_tui.wizard.steps.method import MethodStep
from tuner_tui.wizard.steps.model import ModelStep
from tuner_tui.wizard.steps.review import ReviewStep

__all__ = ["LEARNED", "STEPS", "DataStep", "HardwareStep", "HyperparametersStep", "MethodStep", "ModelStep",
           "ReviewStep", "WizardStep"]

STEPS = (HardwareStep, ModelStep, MethodStep, DataStep, HyperparametersStep, ReviewStep)
