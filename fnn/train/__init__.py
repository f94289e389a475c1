"""Training: train state, jitted steps, the training loop and plots."""

from fnn.train.loop import evaluate as evaluate
from fnn.train.loop import fit as fit
from fnn.train.plot import plot_history as plot_history
from fnn.train.state import TrainState as TrainState
from fnn.train.state import create_train_state as create_train_state
from fnn.train.step import make_eval_step as make_eval_step
from fnn.train.step import make_train_step as make_train_step
from fnn.train.step import train_step_fn as train_step_fn

__all__ = ["TrainState", "create_train_state", "make_train_step", "make_eval_step",
           "train_step_fn", "fit", "evaluate", "plot_history"]
