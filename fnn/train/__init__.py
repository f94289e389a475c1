"""Training: train state, jitted steps, the training loop and plots."""

from fnn.train.checkpoint import CheckpointError as CheckpointError
from fnn.train.checkpoint import latest_step as latest_step
from fnn.train.checkpoint import list_steps as list_steps
from fnn.train.checkpoint import restore_checkpoint as restore_checkpoint
from fnn.train.checkpoint import restore_latest_intact as restore_latest_intact
from fnn.train.checkpoint import save_checkpoint as save_checkpoint
from fnn.train.debug import find_nonfinite as find_nonfinite
from fnn.train.groups import ParamGroups as ParamGroups
from fnn.train.groups import decay_mask as decay_mask
from fnn.train.groups import leaf_paths as leaf_paths
from fnn.train.groups import param_groups as param_groups
from fnn.train.groups import select as select
from fnn.train.groups import take as take
from fnn.train.loop import NonFiniteError as NonFiniteError
from fnn.train.loop import evaluate as evaluate
from fnn.train.loop import evaluate_batches as evaluate_batches
from fnn.train.loop import fit as fit
from fnn.train.loop import train as train
from fnn.train.loop import train_learner as train_learner
from fnn.train.learner import Learner as Learner
from fnn.train.learner import supervised as supervised
from fnn.train.generative import diffusion as diffusion
from fnn.train.generative import gan as gan
from fnn.train.parallel import DATA_AXIS as DATA_AXIS
from fnn.train.parallel import DataParallel as DataParallel
from fnn.train.parallel import data_mesh as data_mesh
from fnn.train.parallel import data_parallel as data_parallel
from fnn.train.parallel import replicate as replicate
from fnn.train.parallel import shard_batch as shard_batch
from fnn.train.parallel import unreplicate as unreplicate
from fnn.train.state import TrainState as TrainState
from fnn.train.state import create_train_state as create_train_state
from fnn.train.step import make_eval_step as make_eval_step
from fnn.train.step import make_train_step as make_train_step
from fnn.train.step import train_step_fn as train_step_fn
from fnn.train.tasks import Task as Task
from fnn.train.tasks import classification_task as classification_task
from fnn.train.tasks import language_model_task as language_model_task

__all__ = ["TrainState", "create_train_state", "make_train_step", "make_eval_step",
           "train_step_fn", "fit", "train", "train_learner", "Learner", "supervised", "gan",
           "diffusion",
           "evaluate", "evaluate_batches",
           "NonFiniteError", "Task", "classification_task",
           "language_model_task", "CheckpointError", "save_checkpoint", "restore_checkpoint",
           "restore_latest_intact", "param_groups", "ParamGroups", "decay_mask", "select",
           "leaf_paths", "take",
           "list_steps", "latest_step", "find_nonfinite", "DATA_AXIS", "DataParallel",
           "data_parallel", "data_mesh", "replicate", "shard_batch", "unreplicate"]
