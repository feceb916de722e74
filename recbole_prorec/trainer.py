"""RecBole's trainer, made safe for torch>=2.6 checkpoints, CPU DDP and wall-clock budgets, with
a learning-rate schedule, a per-epoch record of losses and validation scores, and resumable runs.

RecBole pickles its whole ``Config`` into checkpoints and reloads them with ``torch.load``,
which refuses arbitrary objects under ``weights_only=True``. We store state dicts plus plain
data only, and always reload with ``weights_only=True``.

A run keeps two files in ``checkpoint_dir``: ``<model>-<time>.pth``, the best epoch's weights
(RecBole's), and ``<model>-<time>.resume.pth``, everything needed to go on after the last
completed epoch (weights, optimizer, schedule, early-stopping state, curve, time spent, RNG
states). The second is rewritten before every epoch and removed when training ends normally;
SIGINT or SIGTERM stop training at the next batch boundary and leave it for ``--resume``.
With ``ema_decay`` the trainer validates and saves an exponential moving average of the weights
(``ParameterAverage``); the resume state keeps the raw weights and the average both.
"""
from __future__ import annotations

import ctypes
import functools
import math
import random
import signal
import threading
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from time import monotonic
from typing import Any, Iterator, Mapping

import numpy as np
import torch
from recbole.trainer import PretrainTrainer, Trainer
from recbole.utils import set_color

from recbole_prorec import distributed as ddp
from recbole_prorec.config import plain_config
from recbole_prorec.files import atomic_file


SCHEDULES = ("constant", "inverse_sqrt", "cosine")
# keys that change what a model's weights compute, with the value of checkpoints written before the key existed
ARCHITECTURE_KEYS = {"last_code_token": "shared", "integrated_item_tokens": False, "history_tokens": "codes"}


def trained_form(saved: Mapping[str, Any]) -> dict[str, Any]:
    """The architecture a checkpoint's weights were trained in, from its saved config: each of
    ``ARCHITECTURE_KEYS`` as saved, or the form of the time before that key existed."""
    return {key: saved.get(key, before_the_key) for key, before_the_key in ARCHITECTURE_KEYS.items()}

# settings a resumed run may change without a warning: where output goes and how it is shown
RESUME_FREE_KEYS = {"show_progress", "train_time_budget", "epochs", "log_wandb", "state", "gpu_id", "device",
                    "checkpoint_dir", "local_rank", "world_size", "nproc", "offset", "ip", "port", "worker"}


def lr_factor(step: int, warmup: int, schedule: str, total_steps: int, min_ratio: float = 0.0) -> float:
    """Multiplier of the learning rate after ``step`` optimizer steps: linear warmup over ``warmup``
    steps, then ``schedule``: constant, inverse square root of the step (1 at the end of warmup),
    or a cosine from 1 down to ``min_ratio`` at ``total_steps``."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "inverse_sqrt":
        return math.sqrt(max(warmup, 1) / (step + 1))
    if schedule == "cosine":
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return 1.0


RESUME_SUFFIX = ".resume.pth"


def release_freed_memory() -> None:
    """Hand the heap pages that training freed back to the OS (glibc only; elsewhere a no-op).

    PRORec's batches allocate tensors of varying sizes, and glibc keeps the freed pages: on ml-100k
    the process grew from 0.4 to 2.7 GB in three epochs, of which all but about 0.15 GB came back
    with ``malloc_trim`` (``docs/RESULTS.md``, memory). Called after every epoch, validation and
    ``release_memory_every`` training batches."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """glibc, loaded once, or None where there is none (macOS, musl)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "malloc_trim") else None


class ParameterAverage:
    """An exponential moving average of a model's parameters, updated after every optimizer step.

    Why: late in training each step still moves the weights by the learning rate's noise; the
    average over the last ~1 / (1 - decay) steps sits nearer the middle of that walk, which is
    what a checkpoint should be judged and kept by. The decay starts low, (1 + t) / (10 + t) at
    step t, as TensorFlow's ``ExponentialMovingAverage`` does, so the first epochs are not pinned
    to the initial weights. Buffers are not averaged.
    """

    def __init__(self, model: torch.nn.Module, decay: float):
        self.model = model
        named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        self.names = [name for name, _ in named]
        self.params = [p for _, p in named]
        self.average = [p.detach().clone() for p in self.params]
        self.decay, self.steps = decay, 0

    @torch.no_grad()
    def update(self) -> None:
        self.steps += 1
        weight = 1 - min(self.decay, (1 + self.steps) / (10 + self.steps))
        for average, param in zip(self.average, self.params):
            average.lerp_(param, weight)

    def load(self, average: Mapping[str, torch.Tensor], steps: int) -> None:
        """Go on with a resumed run's average (``tensors()`` of it) after ``steps`` updates."""
        if set(average) != set(self.names):
            raise ValueError(f"the saved weight average has parameters {sorted(set(average) ^ set(self.names))} "
                             "that this model lacks or the other way round")
        for name, mine in zip(self.names, self.average):
            mine.copy_(average[name])
        self.steps = steps

    def tensors(self) -> dict[str, torch.Tensor]:
        """The averaged parameters by name."""
        return dict(zip(self.names, self.average))

    def averaged_state(self) -> dict[str, torch.Tensor]:
        """The model's state dict with the averaged parameters (under every name that shares them)."""
        with self.applied():
            return {name: value.detach().clone() for name, value in self.model.state_dict().items()}

    @contextmanager
    def applied(self) -> Iterator[None]:
        """The model holds the averaged parameters inside the block and its own ones again after."""
        raw = [p.detach().clone() for p in self.params]
        self.copy_to_model()
        try:
            yield
        finally:
            with torch.no_grad():
                for param, value in zip(self.params, raw):
                    param.copy_(value)

    @torch.no_grad()
    def copy_to_model(self) -> None:
        for param, average in zip(self.params, self.average):
            param.copy_(average)


class _BudgetExhausted(Exception):
    """Raised between epochs once the configured ``train_time_budget`` is spent."""


class _StopRequested(Exception):
    """Raised at a batch boundary after SIGINT or SIGTERM."""


class RunInterrupted(Exception):
    """Training was stopped by a signal; ``resume_file`` holds the state after the last completed
    epoch (None when no epoch had completed: nothing to resume)."""

    def __init__(self, signal_name: str, epoch: int, resume_file: str | None):
        self.signal_name, self.epoch, self.resume_file = signal_name, epoch, resume_file
        self.label = ""  # the model label of the run, set by the runner
        where = f"the state after epoch {epoch - 1} is in {resume_file}" if resume_file else "no epoch had completed"
        super().__init__(f"{signal_name} received: training stopped during epoch {epoch}; {where}")


def load_checkpoint(path: str, device: torch.device | str = "cpu") -> dict:
    return torch.load(path, map_location=device, weights_only=True)


def run_mismatch(saved: dict, config) -> str | None:
    """Why a checkpoint's config belongs to another run (None if it is this model on this data).
    PRORec's weights fit any dataset's codes of the same depth, so shapes alone prove nothing: the
    data folder's last two parts name the dataset and, for PRORec, its Stage-I output."""
    for key, part in (("model", str), ("dataset", str), ("data_path", lambda p: Path(p).parts[-2:])):
        if saved.get(key) is None or part(saved[key]) != part(config[key]):
            return f"checkpoint was trained with {key}={saved.get(key)!r}, this run has {key}={config[key]!r}"
    return None


def latest_resume_file(config) -> str:
    """The newest resume state in ``checkpoint_dir`` of this model on this data (``--resume``)."""
    folder = Path(config["checkpoint_dir"])
    for path in sorted(folder.glob(f"*{RESUME_SUFFIX}"), key=lambda p: p.stat().st_mtime, reverse=True):
        if run_mismatch(torch.load(path, weights_only=True, mmap=True)["config"], config) is None:  # no tensor read
            return str(path)
    raise FileNotFoundError(f"no resume state (*{RESUME_SUFFIX}) of model {config['model']} on {config['data_path']} "
                            f"in checkpoint_dir {folder}: nothing to resume")


def _rng_states(loader_generator: torch.Generator) -> dict:
    """Python's, NumPy's, torch's (CPU and CUDA) and the training loader's RNG states, as plain
    data and tensors so that they load under ``weights_only=True``."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    version, python_state, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "python": [version, list(python_state), gauss],
        "loader": loader_generator.get_state(),
    }


def _set_rng_states(states: dict, loader_generator: torch.Generator) -> None:
    torch.set_rng_state(states["torch"].cpu())
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in states["cuda"]])
    keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state(("MT19937", keys.cpu().numpy().astype(np.uint32), pos, has_gauss, cached))
    version, python_state, gauss = states["python"]
    random.setstate((version, tuple(python_state), gauss))
    loader_generator.set_state(states["loader"].cpu())


class _StoppableLoader:
    """The training loader, checking between batches whether a signal asked training to stop."""

    def __init__(self, loader, trainer: "SafeTrainer"):
        self._loader, self._trainer = loader, trainer

    def __iter__(self) -> Iterator:
        every = self._trainer.config["release_memory_every"] or 0
        for number, batch in enumerate(self._loader):
            if self._trainer.stop_signal:
                raise _StopRequested
            if every and number and number % every == 0:
                release_freed_memory()
            self._trainer.batch = number
            yield batch

    def __len__(self) -> int:
        return len(self._loader)

    def __getattr__(self, name: str):
        return getattr(self._loader, name)


class SafeTrainer(Trainer):
    """Trainer with ``weights_only`` checkpoints, gloo DDP on CPU, a time budget and bookkeeping.

    Records ``best_epoch`` (epoch of the best validation score), ``train_time`` (seconds spent in
    training epochs, evaluation excluded), ``epochs_run`` and ``curve``: one entry per validated
    epoch with its mean losses per batch, validation metrics, the model's evaluation diagnostics
    (rates of the counts of ``pop_eval_counts``, if it has them) and the seconds spent so far.
    """

    def __init__(self, config, model):
        distributed = ddp.is_distributed(config)
        # RecBole builds DDP with device_ids=[rank], which only works on CUDA; we build it below.
        config["single_spec"] = True
        try:
            super().__init__(config, model)
        finally:
            config["single_spec"] = not distributed
        if distributed:
            self.model, self.distributed_model = ddp.wrap(model, config)
            # only rank 0 writes checkpoints; every rank must read that file
            self.saved_model_file = ddp.from_main(self.saved_model_file, config)
        self.time_budget = config["train_time_budget"]
        self.check_config(config)
        self.best_epoch = -1
        self.train_time = 0.0
        self.epochs_run = 0
        self.curve: list[dict[str, float]] = []
        self._fit_start = 0.0
        self._batches_per_epoch = 1
        self._epoch = -1
        self._epoch_losses: tuple | float = ()
        self._last_eval_stats: dict[str, float] = {}
        self._scheduled = False
        self.lr_step = 0  # optimizer steps taken, saved in checkpoints so a resumed schedule goes on
        self.average: ParameterAverage | None = None  # with ema_decay: the weights validated and saved
        self.stop_signal: str | None = None  # set by SIGINT/SIGTERM during fit
        self.batch = -1  # the training batch in progress (from 0)
        self.resume_file: str | None = None  # this run's resume state, once written
        self._saving = True
        self._resumed: dict | None = None  # RNG states and epoch of a resume state, until applied
        self._elapsed_before = 0.0  # fit seconds of the run this one resumes

    @staticmethod
    def check_config(config) -> None:
        """Refuse training settings that cannot run; the runner asks before Stage I, the trainer again."""
        if config["lr_scheduler"] not in SCHEDULES:
            raise ValueError(f"lr_scheduler must be one of {SCHEDULES}, got {config['lr_scheduler']!r}")
        decay = config["ema_decay"]
        if decay is not None and not (isinstance(decay, (int, float)) and 0 <= decay < 1):
            raise ValueError(f"ema_decay must lie in [0, 1), or be ~ (off), got {decay!r}")

    def _build_optimizer(self, **kwargs) -> torch.optim.Optimizer:
        """RecBole's optimizer; Adam and AdamW in torch's fused form, the same update in one kernel
        over all parameters instead of one small kernel per tensor (PRORec on Beauty, 2-core CPU:
        9.7 -> 1.7 ms per step, about 4 % of a training step)."""
        optimizer = super()._build_optimizer(**kwargs)
        if type(optimizer) not in (torch.optim.Adam, torch.optim.AdamW):
            return optimizer
        groups = [{**group, "fused": True, "foreach": None} for group in optimizer.param_groups]
        return type(optimizer)(groups, fused=True)

    def _add_schedule(self, batches_per_epoch: int, epochs: int) -> None:
        """Attach the schedule to the optimizer once, when the epoch length is known (a cosine
        spans ``lr_decay_steps``, 0: ``epochs`` epochs); it starts at ``lr_step``."""
        if self._scheduled:
            return
        self._scheduled = True
        warmup, schedule = self.config["warmup_steps"] or 0, self.config["lr_scheduler"]
        total, low = self.config["lr_decay_steps"] or epochs * batches_per_epoch, self.config["lr_min_ratio"]
        start = self.lr_step
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_factor(start + step, warmup, schedule, total, low))

        def advance(*_) -> None:
            self.lr_step += 1
            scheduler.step()

        self.optimizer.register_step_post_hook(advance)
        if self.config["ema_decay"] is not None:  # from the weights training starts with (a resumed run's too)
            self.average = ParameterAverage(self.model, self.config["ema_decay"])
            if self._resumed is not None and "parameter_average" in self._resumed:
                self.average.load(self._resumed["parameter_average"], self._resumed["average_steps"])
            self.optimizer.register_step_post_hook(lambda *_: self.average.update())

    def fit(self, train_data, valid_data=None, verbose=True, saved=True, show_progress=False, callback_fn=None):
        """RecBole's fit, within the time budget (a resumed run's time counts), stoppable by a signal
        at a batch boundary (raising ``RunInterrupted``); the resume state goes when it ends."""
        self._fit_start = monotonic() - self._elapsed_before
        self._saving = saved
        self._add_schedule(len(train_data), self.epochs)
        with self._signals_stop_training():
            try:
                result = super().fit(train_data, valid_data, verbose, saved, show_progress, callback_fn)
            except _BudgetExhausted:
                self.logger.info(
                    set_color("train_time_budget", "yellow")
                    + f" of {self.time_budget}s spent after {self.epochs_run} epochs; stopping"
                )
                if saved and self.best_epoch < 0:
                    self._save_checkpoint(self.epochs_run - 1, verbose=verbose)
                result = self.best_valid_score, self.best_valid_result
            except _StopRequested:
                stop = RunInterrupted(self.stop_signal, self._epoch + 1, self.resume_file)
                self.logger.warning(str(stop))
                raise stop from None
        if self.average is not None:  # the model leaves fit with the weights it was last validated with
            self.average.copy_to_model()
        if self.resume_file and ddp.is_main(self.config):
            Path(self.resume_file).unlink(missing_ok=True)
        return result

    @contextmanager
    def _signals_stop_training(self):
        """SIGINT and SIGTERM set ``stop_signal`` (training stops at the next batch boundary); a
        second one acts at once. Python only lets the main thread install handlers."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

        def handler(signum, frame):
            if self.stop_signal:
                signal.signal(signum, previous[signum])
                signal.raise_signal(signum)
                return
            self.stop_signal = signal.Signals(signum).name
            self.logger.warning(f"{self.stop_signal}: stopping at the next batch boundary (send it again to stop now)")

        for sig in previous:
            signal.signal(sig, handler)
        try:
            yield
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)

    def _train_epoch(self, train_data, epoch_idx, loss_func=None, show_progress=False):
        if self._resumed is not None:
            _set_rng_states(self._resumed["rng"], train_data.generator)
        elif self.epochs_run and self._saving:
            self._save_resume_state(epoch_idx - 1, train_data.generator)
        self._resumed = None
        if self.time_budget and monotonic() - self._fit_start >= self.time_budget and self.epochs_run:
            raise _BudgetExhausted
        start = monotonic()
        if hasattr(self.model, "set_epoch"):  # a model's per-epoch schedule (PRORec's ID dropout)
            self.model.set_epoch(epoch_idx)
        self._batches_per_epoch = len(train_data)
        loss = super()._train_epoch(_StoppableLoader(train_data, self), epoch_idx, loss_func, show_progress)
        release_freed_memory()
        self.train_time += monotonic() - start
        self.epochs_run += 1
        self._epoch = epoch_idx
        self._epoch_losses = loss
        return loss

    def _check_nan(self, loss: torch.Tensor) -> None:
        """Stop on a NaN or infinite loss, naming where; the best checkpoint so far stays."""
        if not torch.isfinite(loss):
            kept = f"the best checkpoint so far is {self.saved_model_file}" if self.best_epoch >= 0 else "no checkpoint yet"
            raise FloatingPointError(f"training loss is {loss.item()} in epoch {self._epoch + 1}, batch {self.batch}: "
                                     f"stopping ({kept}); a lower learning_rate or clip_grad_norm may help")

    def _mean_losses(self, losses) -> dict[str, float]:
        """An epoch's summed losses as means per batch, named by the model's ``loss_names`` (a single
        loss is ``loss``); empty when the names do not match the parts."""
        losses = losses if isinstance(losses, tuple) else (losses,)
        names = getattr(self.model, "loss_names", None) or ("loss",)
        if len(names) != len(losses):
            return {}
        return {name: float(loss) / max(1, self._batches_per_epoch) for name, loss in zip(names, losses)}

    def _add_train_loss_to_tensorboard(self, epoch_idx, losses, tag="Loss/Train"):
        """Each loss part under its name (``Loss/Train/gen_l1``, ...) as a mean per batch, where
        RecBole writes the epoch's sums as ``Loss/Train0``, ``Loss/Train1``, ..."""
        named = self._mean_losses(losses)
        if not named:
            return super()._add_train_loss_to_tensorboard(epoch_idx, losses, tag)
        for name, value in named.items():
            self.tensorboard.add_scalar(f"{tag}/{name}", value, epoch_idx)

    def _validated_weights(self) -> AbstractContextManager:
        """A block in which the model holds the weights validation scores: the average, with ``ema_decay``."""
        return self.average.applied() if self.average is not None else nullcontext()

    def evaluate_validated(self, eval_data) -> dict:
        """``eval_data``'s metrics of the weights validation scores, so a split evaluated beside
        validation during ``fit`` measures the model validation measured."""
        with self._validated_weights():
            return self.evaluate(eval_data, load_best_model=False)

    def _valid_epoch(self, valid_data, show_progress=False):
        with self._validated_weights():
            score, result = super()._valid_epoch(valid_data, show_progress)
        release_freed_memory()
        stats = {"train_s": self.train_time, "elapsed_s": monotonic() - self._fit_start,
                 **self._mean_losses(self._epoch_losses), **self._last_eval_stats, **dict(result)}
        # plain numbers, so the resume state, JSON ledgers and weights_only loads take the curve as it is
        self.curve.append({"epoch": int(self._epoch), **{k: float(v) for k, v in stats.items()}})
        return score, result

    def _generate_train_loss_output(self, epoch_idx, s_time, e_time, losses):
        means = self._mean_losses(losses) if isinstance(losses, tuple) else {}
        if not means:
            return super()._generate_train_loss_output(epoch_idx, s_time, e_time, losses)
        parts = ", ".join(set_color(name, "blue") + f": {loss:.4f}" for name, loss in means.items())
        return (
            set_color("epoch %d training", "green") % epoch_idx
            + " ["
            + set_color("time", "blue")
            + f": {e_time - s_time:.2f}s, mean per batch: {parts}]"
        )

    def _checkpoint_state(self, epoch: int, validated: bool = True) -> dict[str, Any]:
        """What every checkpoint holds: plain config, weights, optimizer, schedule and early-stopping
        counters, as tensors and plain data only (``weights_only`` loads). The weights are the ones
        validated (the average, with ``ema_decay``) unless ``validated`` is False: the training ones."""
        averaged = validated and self.average is not None
        weights = self.average.averaged_state() if averaged else self.model.state_dict()
        return {
            "config": plain_config(self.config),
            "epoch": int(epoch),
            "cur_step": int(self.cur_step),
            "best_valid_score": float(self.best_valid_score),
            "lr_step": int(self.lr_step),
            "state_dict": weights,
            # FDSA, DIN & co. list whole submodules here; their weights are in state_dict already
            "other_parameter": {
                k: v for k, v in (self.model.other_parameter() or {}).items() if not isinstance(v, torch.nn.Module)
            },
            "optimizer": self.optimizer.state_dict(),
        }

    def _save_checkpoint(self, epoch, verbose=True, **kwargs):
        if not ddp.is_main(self.config):
            return
        self.best_epoch = epoch
        saved_model_file = kwargs.pop("saved_model_file", self.saved_model_file)
        with atomic_file(saved_model_file, binary=True) as handle:  # a crash keeps the last best
            torch.save(self._checkpoint_state(epoch), handle)
        if verbose:
            self.logger.info(set_color("Saving current", "blue") + f": {saved_model_file}")

    def _save_resume_state(self, epoch: int, loader_generator: torch.Generator) -> None:
        """Everything that decides the rest of the run, as it stands after ``epoch`` (validated,
        early stopping updated); written to a temporary file first, so a kill never leaves half
        a state behind."""
        if not ddp.is_main(self.config):
            return
        state = {
            **self._checkpoint_state(epoch, validated=False),
            **({"parameter_average": self.average.tensors(), "average_steps": self.average.steps}
               if self.average is not None else {}),
            "best_checkpoint": self.saved_model_file,
            "best_valid_result": {k: float(v) for k, v in (self.best_valid_result or {}).items()},
            "best_epoch": int(self.best_epoch),
            "train_time": float(self.train_time),
            "epochs_run": int(self.epochs_run),
            "elapsed": float(monotonic() - self._fit_start),
            "curve": self.curve,
            "rng": _rng_states(loader_generator),
        }
        path = str(Path(self.saved_model_file).with_suffix(RESUME_SUFFIX))
        with atomic_file(path, binary=True) as handle:
            torch.save(state, handle)
        self.resume_file = path

    def resume_checkpoint(self, resume_file):
        """Continue the run whose resume state is ``resume_file``: weights, optimizer, schedule,
        early stopping, best result and checkpoint, curve, time spent and RNG states (applied when
        the next epoch starts, so that it shuffles and samples as the uninterrupted run would)."""
        state = load_checkpoint(str(resume_file), self.device)
        if "rng" not in state:
            raise ValueError(f"{resume_file} holds one epoch's weights, not a resume state: "
                             f"resume from the {RESUME_SUFFIX} file of the same run")
        if not Path(state["best_checkpoint"]).is_file():
            raise FileNotFoundError(f"{resume_file} continues a run whose best checkpoint "
                                    f"{state['best_checkpoint']} is gone: cannot resume")
        self._load_state(state)
        self.optimizer.load_state_dict(state["optimizer"])
        self.saved_model_file, self.resume_file = state["best_checkpoint"], str(resume_file)
        self.start_epoch, self._epoch = state["epoch"] + 1, state["epoch"]
        for key in ("lr_step", "cur_step", "best_valid_score", "best_epoch", "train_time", "epochs_run", "curve"):
            setattr(self, key, state[key])
        self.best_valid_result = state["best_valid_result"] or None
        self._elapsed_before = state["elapsed"]
        self._resumed = state
        now = plain_config(self.config)
        changed = sorted(k for k, v in state["config"].items() if k not in RESUME_FREE_KEYS and now.get(k, v) != v)
        if changed:
            self.logger.warning(f"resuming with settings that differ from the interrupted run's: {', '.join(changed)}")
        self.logger.info(f"Resuming from {resume_file}: epoch {self.start_epoch} onwards, "
                         f"{self._elapsed_before:.0f}s of the time budget spent")

    def _load_state(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint["config"]
        mismatch = run_mismatch(saved, self.config)
        if mismatch:
            raise ValueError(mismatch)
        for key, was in trained_form(saved).items():  # PRORec's forms have different weights
            mode = self.config[key]
            if mode is not None and was != mode:
                raise ValueError(f"checkpoint was trained with {key}={was!r}, this run has {key}={mode!r}")
        self.model.load_state_dict(checkpoint["state_dict"])
        self.model.load_other_parameter(checkpoint.get("other_parameter"))

    def load_best(self, model_file: str | None = None) -> None:
        """Load the best checkpoint's weights (``model_file``, else this run's) into the model."""
        ddp.wait_for_all()  # until rank 0 has written the checkpoint
        checkpoint_file = model_file or self.saved_model_file
        self._load_state(load_checkpoint(checkpoint_file, self.device))
        self.logger.info(f"Loading model structure and parameters from {checkpoint_file}")

    @torch.no_grad()
    def evaluate(self, eval_data, load_best_model=True, model_file=None, show_progress=False):
        if eval_data and load_best_model:
            self.load_best(model_file)
        pop_counts = getattr(self.model, "pop_eval_counts", None)
        if pop_counts:
            pop_counts()  # drop counts left from outside an evaluation
        result = super().evaluate(eval_data, load_best_model=False, show_progress=show_progress)
        self._last_eval_stats = self._rates(pop_counts()) if pop_counts else {}
        if self._last_eval_stats:
            self.logger.info("evaluation diagnostics: " + ", ".join(f"{k} {v:.4f}" for k, v in self._last_eval_stats.items()))
        return result


    def _rates(self, counts: dict[str, int]) -> dict[str, float]:
        """Diagnostic counts as shares of ``users``, summed over DDP ranks first (each rank
        evaluates its own share of the users, as RecBole's metrics are)."""
        counts = ddp.summed(counts, self.config, self.device)
        users = counts.pop("users", 0)
        return {k: v / users for k, v in counts.items()} if users else {}


class SafePretrainer(SafeTrainer, PretrainTrainer):
    """RecBole's self-supervised pre-training loop (S3Rec's ``train_stage: pretrain``), saved safely.

    Runs ``pretrain_epochs`` epochs (within ``train_time_budget``, whose rest goes to fine-tuning) and leaves
    the weights in ``saved_model_file`` for the fine-tuning model's ``pre_model_path``.
    """

    def pretrain(self, train_data, verbose=True, show_progress=False):
        self._fit_start = monotonic()
        self._saving = False  # pre-training is not resumable: its epochs are not RecBole's fit
        self._add_schedule(len(train_data), self.config["pretrain_epochs"])
        try:
            super().pretrain(train_data, verbose, show_progress)
        except _BudgetExhausted:
            self.logger.info(f"train_time_budget of {self.time_budget}s spent after {self.epochs_run} pre-training epochs")
        self.save_pretrained_model(self.epochs_run - 1, self.saved_model_file)
        return self.saved_model_file

    def save_pretrained_model(self, epoch, saved_model_file):
        if not ddp.is_main(self.config):
            return
        # with ema_decay, fine-tuning starts from the average, as every checkpoint of fit holds it
        weights = self.average.averaged_state() if self.average is not None else self.model.state_dict()
        state = {"config": plain_config(self.config), "epoch": int(epoch), "state_dict": weights}
        with atomic_file(saved_model_file, binary=True) as handle:
            torch.save(state, handle)
        self.saved_model_file = saved_model_file
