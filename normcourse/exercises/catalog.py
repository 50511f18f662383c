"""The course's catalogue: chapters, their exercise tasks, written questions and prerequisites.

The one source read by the instructor page (``book/instructors.md``, written by
``python -m normcourse instructors --write book/instructors.md``), by the README of a class bundle,
by the grader and by ``check``. Each chapter's auto-checked tasks live in the module
``normcourse/exercises/tasks/ch<slug>.py`` (e.g. ``tasks/ch02_batch_norm.py``), found from the
chapter's slug: adding a chapter's exercises means adding its entry here and that module.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from normcourse.exercises.diagnosis import Task
from normcourse.validation import check_choice

__all__ = ["Chapter", "CHAPTERS", "TASKS", "chapter", "is_chapter", "tasks_for_chapter", "task"]


@dataclass(frozen=True)
class Chapter:
    """One chapter of the book and its exercise notebook (both named ``slug``)."""

    number: int
    slug: str  # "02_batch_norm": book/02_batch_norm.md and exercises/02_batch_norm.ipynb
    title: str
    objectives: tuple[str, ...]
    reading_minutes: int
    exercise_minutes: int
    prerequisites: tuple[str, ...]  # what to know first (chapters as slugs, or skills)
    questions: tuple[str, ...]  # the written questions' topics, in notebook order

    @property
    def tasks_module(self) -> str:
        """The module holding this chapter's ``TASKS``, e.g. ``"...tasks.ch02_batch_norm"``."""
        return f"normcourse.exercises.tasks.ch{self.slug}"

    @property
    def tasks(self) -> tuple[Task, ...]:
        """The chapter's auto-checked tasks, in notebook order."""
        return importlib.import_module(self.tasks_module).TASKS

    @property
    def question_ids(self) -> tuple[str, ...]:
        """Ids of the written questions (``"02.q1"``, ...): the answer cells' metadata
        ``{"normcourse": {"question": id}}`` in the notebooks."""
        return tuple(f"{self.number:02d}.q{i}" for i in range(1, len(self.questions) + 1))


CHAPTERS: tuple[Chapter, ...] = (
    Chapter(
        1, "01_input_normalization", "Input normalization",
        (
            "explain why features on different scales or far from zero mean slow down gradient "
            "descent (condition number, largest stable learning rate 2 / lambda_max)",
            "standardize features with statistics fitted on the training set only",
            "differentiate a standardization with fixed statistics",
            "predict, run and explain a learning-rate sweep of gradient descent on raw and "
            "standardized features",
        ),
        45, 55,
        ("NumPy arrays and broadcasting", "gradient descent", "eigenvalues of a symmetric matrix"),
        (
            "why the test set is standardized with the training set's statistics",
            "what standardization does to constant pixels, with and without the floor eps",
            "prediction and measurement: steps of gradient descent at fractions of "
            "2 / lambda_max, raw and standardized",
        ),
    ),
    Chapter(
        2, "02_batch_norm", "Batch normalization",
        (
            "implement batch norm's forward pass (Algorithm 1 of the paper) for (N, D) and "
            "(N, C, H, W) inputs",
            "derive and implement the backward pass, and check it with a centered-difference "
            "gradient check and a random upstream gradient",
            "explain the roles of gamma, beta and eps",
            "measure what the backward pass projects out, and where eps makes "
            "sum(xhat * dx) = 0 fail",
        ),
        60, 90,
        ("01_input_normalization", "the chain rule on computational graphs"),
        (
            "why a gradient check with dout = 1 passes even for a wrong backward pass",
            "why batch norm has gamma and beta, and why a bias before it is useless",
            "prediction and measurement: the sums of dx and of xhat * dx as eps grows",
        ),
    ),
    Chapter(
        3, "03_training_with_batch_norm", "Training with batch normalization",
        (
            "place batch norm in a network (no bias before it, before the nonlinearity)",
            "write training and evaluation steps that switch train and eval mode correctly",
            "explain batch norm's scale invariance and what it does to the gradients",
            "freeze batch norm for fine-tuning",
        ),
        60, 45,
        ("02_batch_norm", "a PyTorch training loop (modules, optimizers, cross-entropy)"),
        (
            "what scale invariance does to the weight gradients as the weights grow",
            "two batch-norm causes of a high accuracy on training batches but a low one in eval",
            "prediction and result of the learning-rate sweep experiment",
        ),
    ),
    Chapter(
        4, "04_test_time_statistics", "Test-time statistics",
        (
            "maintain running averages with PyTorch's momentum convention and the unbiased "
            "variance",
            "implement train and eval mode of batch norm",
            "fold an eval-mode batch norm into the preceding linear layer",
        ),
        45, 50,
        ("02_batch_norm", "03_training_with_batch_norm"),
        (
            "translating Keras' momentum=0.99 into PyTorch's momentum=0.1 convention",
            "why the running variance is unbiased but the batch is normalized with the biased one",
            "prediction and result of the batch-size experiment (eval mode against batch "
            "statistics)",
        ),
    ),
    Chapter(
        5, "05_layer_norm", "Layer normalization",
        (
            "implement layer norm's forward and backward passes",
            "choose the normalized axes for (N, D) and (N, C, H, W) inputs",
            "compare layer norm and batch norm at small batch sizes and at test time",
            "measure how one example's output depends on the rest of its batch, for batch "
            "norm (train and eval mode) and layer norm",
        ),
        45, 60,
        ("02_batch_norm",),
        (
            "for which a layer norm is invariant to rescaling an example, LN(a x) = LN(x)",
            "why layer norm needs no running statistics, at batch size 1 and at test time",
            "prediction and measurement: how much one example's output changes when its "
            "batch-mates are replaced, by batch size",
        ),
    ),
    Chapter(
        6, "06_batch_renorm", "Batch renormalization",
        (
            "derive the corrections r and d and explain why they are constants for the gradient",
            "implement batch renorm's forward and backward passes and its rmax / dmax schedule",
            "explain when batch renorm helps: small or non-i.i.d. mini-batches",
        ),
        60, 60,
        ("04_test_time_statistics",),
        (
            "why r and d are constants in the backward pass",
            "what batch renorm is with rmax = 1 and dmax = 0, and why the schedule starts there",
            "prediction and result of the non-i.i.d. experiment, and why a short run differs",
        ),
    ),
    Chapter(
        7, "07_why_batch_norm_works", "Why batch norm works",
        (
            "measure internal covariate shift as the BN paper did (input moments) and as "
            "Santurkar et al. did (the change of a layer's gradient when the layers below step)",
            "build noisy batch norm and say what it shows about the covariate-shift explanation",
            "measure the loss and the gradient along the gradient direction (loss variation, "
            "gradient predictiveness, effective beta-smoothness)",
            "derive the scale invariance of a layer before batch norm, the effective learning "
            "rate lr / ||w||^2 and what weight decay does to it",
            "explain dropout's variance shift before batch norm",
        ),
        50, 60,
        ("03_training_with_batch_norm",),
        (
            "what noisy batch norm's result says about the internal-covariate-shift "
            "explanation, and what Santurkar et al.'s gradient measure captures that the input "
            "moments do not",
            "what weight decay does to the weights of a layer followed by batch norm, and what "
            "happens to their norm without it under plain SGD",
        ),
    ),
    Chapter(
        8, "08_normalization_without_the_batch", "Normalization without the batch",
        (
            "implement group norm with the right group reshape, forward and backward",
            "derive RMSNorm's backward pass from layer norm's",
            "standardize a convolution's weights per output filter",
        ),
        50, 60,
        ("05_layer_norm",),
        (
            "which of batch, layer, instance and group norm depend on the other examples of "
            "the batch, and what group norm is with G = 1 and G = C",
            "why weight standardization is paired with an activation normalization",
        ),
    ),
    Chapter(
        9, "09_normalization_in_transformers", "Normalization in transformers",
        (
            "write a pre-LN and a post-LN residual block and say where each puts the norm",
            "implement a linear learning-rate warm-up",
            "measure per-block gradient norms of a shared weight",
            "explain why a transformer normalizes over features, not over the batch",
        ),
        50, 50,
        ("05_layer_norm", "08_normalization_without_the_batch",
         "self-attention and the transformer encoder"),
        (
            "why a pre-LN transformer needs a final norm before the output head and a post-LN "
            "one does not",
            "why post-LN needs a learning-rate warm-up with Adam and pre-LN does not",
        ),
    ),
    Chapter(
        10, "10_batch_norm_across_devices", "Batch norm across devices",
        (
            "say what a data-parallel worker's batch norm computes, and simulate k workers with "
            "ghost batches",
            "combine the workers' statistics with an all-reduce of counts, sums and sums of "
            "squares, or with Chan et al.'s merge of means and M2",
            "derive synchronized batch norm's backward pass: all-reduce two per-feature sums",
            "apply Goyal et al.'s rule and decide when not to synchronize",
        ),
        50, 50,
        ("02_batch_norm", "04_test_time_statistics",
         "data parallelism (DistributedDataParallel)"),
        (
            "why averaging the workers' variances is wrong, even with equal slices",
            "what Goyal et al.'s rule keeps fixed when workers are added, and when not to "
            "synchronize batch norm",
        ),
    ),
)

BY_NUMBER = {c.number: c for c in CHAPTERS}
BY_SLUG = {c.slug: c for c in CHAPTERS}

# Every task of every chapter, by id ("02.batchnorm_forward"), in chapter and notebook order.
TASKS: dict[str, Task] = {t.id: t for c in CHAPTERS for t in c.tasks}


def chapter(key: int | str) -> Chapter:
    """Look a chapter up by number (2), two-digit key ("02"), slug ("02_batch_norm") or task id
    ("02.batchnorm_forward"). Raises ValueError naming the chapters for any other key."""
    if isinstance(key, str) and key in BY_SLUG:
        return BY_SLUG[key]
    prefix = str(key).split("_")[0].split(".")[0]
    number = int(prefix) if prefix.isdigit() else key
    check_choice(number, tuple(BY_NUMBER), "chapter")
    return BY_NUMBER[number]


def is_chapter(prerequisite: str) -> bool:
    """Whether a prerequisite names a chapter (by its slug) rather than a skill."""
    return prerequisite in BY_SLUG


def tasks_for_chapter(key: int | str) -> tuple[Task, ...]:
    """The tasks of a chapter (any key ``chapter`` accepts), in notebook order."""
    return chapter(key).tasks


def task(task_id: str) -> Task:
    """The task with id ``task_id``; raises ValueError naming the tasks for an unknown id."""
    check_choice(task_id, tuple(TASKS), "exercise task")
    return TASKS[task_id]
