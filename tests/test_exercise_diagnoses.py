"""Wrong answers written as a student would write them, and the diagnosis each one must get.

Each answer is the source of notebook cells, executed in a fresh namespace as a notebook would run
it (so an answer may call the student's own function from an earlier task). Every answer must
fail with its named diagnosis, never with a generic message or a checker error, and earn exactly
the partial credit of the outputs it gets right. ``python tests/test_exercise_diagnoses.py``
prints the table mistake -> message.
"""

from __future__ import annotations

import textwrap

import numpy as np
import pytest
import torch

from normcourse.exercises import check_answer

torch.set_num_threads(1)

BN_BACKWARD = """
def batchnorm_backward(dout, x, gamma, eps=1e-5):
    n = x.shape[0]
    mu = x.mean(axis=0)
    invstd = 1.0 / np.sqrt(x.var(axis=0) + eps)
    xhat = (x - mu) * invstd
    dbeta = dout.sum(axis=0)
    dgamma = (dout * xhat).sum(axis=0)
    dx = gamma * invstd / n * (n * dout - dbeta - xhat * dgamma)
    {tail}
"""

LN_BACKWARD = """
def layernorm_backward(dout, x, gamma, eps=1e-5):
    d = x.shape[-1]
    mu = x.mean(axis=-1, keepdims=True)
    invstd = 1.0 / np.sqrt(x.var(axis=-1, keepdims=True) + eps)
    xhat = (x - mu) * invstd
    g = dout * gamma
    dx = invstd / d * (d * g - g.sum(-1, keepdims=True) - xhat * (g * xhat).sum(-1, keepdims=True))
    dgamma, dbeta = (dout * xhat).sum(axis=0), dout.sum(axis=0)
    {tail}
"""

R_D = """
def renorm_r_d(batch_mean, batch_std, running_mean, running_std, rmax, dmax):
    r = np.clip(batch_std / running_std, {r_bounds})
    d = np.clip((batch_mean - running_mean) / running_std, {d_bounds})
    return r, d
"""
R_D_RIGHT = R_D.format(r_bounds="1 / rmax, rmax", d_bounds="-dmax, dmax")
R_D_INVERTED = """
def renorm_r_d(batch_mean, batch_std, running_mean, running_std, rmax, dmax):
    r = np.clip(running_std / batch_std, 1 / rmax, rmax)
    d = np.clip((batch_mean - running_mean) / running_std, -dmax, dmax)
    return r, d
"""

RENORM_FORWARD = """
def batch_renorm_forward(x, gamma, beta, running_mean, running_std, training, rmax=3.0, dmax=5.0,
                         momentum=0.01, eps=1e-5):
    if not training:
        return gamma * (x - running_mean) / running_std + beta
    mu_b = x.mean(axis=0)
    sigma_b = np.sqrt(x.var(axis=0) + eps)
    r, d = renorm_r_d(mu_b, sigma_b, running_mean, running_std, rmax, dmax)
    out = gamma * ((x - mu_b) / sigma_b * r + d) + beta
    {update}
    return out{cast}
"""
IN_PLACE = ("running_mean += momentum * (mu_b - running_mean)\n"
            "    running_std += momentum * (sigma_b - running_std)")
REBINDS_MEAN = ("running_mean = running_mean + momentum * (mu_b - running_mean)\n"
                "    running_std += momentum * (sigma_b - running_std)")

RENORM_BACKWARD = """
def batch_renorm_backward(dout, x, gamma, running_mean, running_std, rmax=3.0, dmax=5.0, eps=1e-5):
    n = x.shape[0]
    mu_b = x.mean(axis=0)
    sigma_b = np.sqrt(x.var(axis=0) + eps)
    r, d = renorm_r_d(mu_b, sigma_b, running_mean, running_std, rmax, dmax)
    xhat_b = (x - mu_b) / sigma_b
    dbeta = dout.sum(axis=0)
    dgamma = (dout * (xhat_b * r + d)).sum(axis=0)
    dx = gamma * r / sigma_b / n * (n * dout - dbeta - xhat_b * (dout * xhat_b).sum(axis=0))
    return dx, dgamma, dbeta
"""

UPDATE_KERAS = """
def update_running_stats(running_mean, running_var, x, momentum=0.1):
    new_mean = momentum * running_mean + (1 - momentum) * x.mean(axis=0)
    new_var = momentum * running_var + (1 - momentum) * x.var(axis=0, ddof=1)
    return new_mean, new_var
"""

# (mistake, task, cells' source, diagnosis name, points earned)
WRONG_ANSWERS = [
    ("backward returns (dgamma, dbeta, dx)", "02.batchnorm_backward",
     BN_BACKWARD.format(tail="return dgamma, dbeta, dx"), "wrong_order", 0),
    ("backward returns (dx, dbeta, dgamma)", "02.batchnorm_backward",
     BN_BACKWARD.format(tail="return dx, dbeta, dgamma"), "wrong_order", 2),
    ("backward computes dx in float32", "02.batchnorm_backward",
     BN_BACKWARD.format(tail="return dx.astype(np.float32), dgamma, dbeta"), "float32", 2),
    ("backward: dx divided by N - 1 instead of N (no known mistake)", "02.batchnorm_backward",
     BN_BACKWARD.format(tail="return dx * n / (n - 1), dgamma, dbeta"), "unexplained", 2),
    ("forward returns (out, cache)", "02.batchnorm_forward", """
def batchnorm_forward(x, gamma, beta, eps=1e-5):
    mu, var = x.mean(axis=0), x.var(axis=0)
    xhat = (x - mu) / np.sqrt(var + eps)
    out = gamma * xhat + beta
    return out, (xhat, gamma, var, eps)
""", "out_and_cache", 0),
    ("forward computed in float32", "02.batchnorm_forward", """
def batchnorm_forward(x, gamma, beta, eps=1e-5):
    x = x.astype(np.float32)
    return gamma * (x - x.mean(0)) / np.sqrt(x.var(0) + eps) + beta
""", "float32", 0),
    ("forward as float32 torch tensors", "02.batchnorm_forward", """
def batchnorm_forward(x, gamma, beta, eps=1e-5):
    x = torch.tensor(x, dtype=torch.float32)
    var, mu = torch.var_mean(x, dim=0, unbiased=False)
    return torch.tensor(gamma) * (x - mu) / torch.sqrt(var + eps) + torch.tensor(beta)
""", "float32", 0),
    ("spatial BN with reshape(-1, C), channel axis not moved", "02.spatial_batchnorm_forward", """
def spatial_batchnorm_forward(x, gamma, beta, eps=1e-5):
    N, C, H, W = x.shape
    flat = x.reshape(-1, C)
    out = gamma * (flat - flat.mean(0)) / np.sqrt(flat.var(0) + eps) + beta
    return out.reshape(N, C, H, W)
""", "reshape_without_transpose", 0),
    ("update_running_stats returns (new_var, new_mean)", "04.update_running_stats", """
def update_running_stats(running_mean, running_var, x, momentum=0.1):
    new_mean = (1 - momentum) * running_mean + momentum * x.mean(axis=0)
    new_var = (1 - momentum) * running_var + momentum * x.var(axis=0, ddof=1)
    return new_var, new_mean
""", "wrong_order", 0),
    ("train/eval forward reusing a wrong (Keras) update_running_stats", "04.batchnorm_forward",
     UPDATE_KERAS + """
def batchnorm_forward(x, gamma, beta, running_mean, running_var, training, momentum=0.1, eps=1e-5):
    if training:
        mean, var = x.mean(axis=0), x.var(axis=0)
        running_mean[...], running_var[...] = update_running_stats(running_mean, running_var, x,
                                                                   momentum)
    else:
        mean, var = running_mean, running_var
    return gamma * (x - mean) / np.sqrt(var + eps) + beta
""", "wrong_helper", 1),
    ("train/eval forward rebinding running_mean and running_var", "04.batchnorm_forward", """
def batchnorm_forward(x, gamma, beta, running_mean, running_var, training, momentum=0.1, eps=1e-5):
    if training:
        mean, var = x.mean(axis=0), x.var(axis=0)
        running_mean = (1 - momentum) * running_mean + momentum * mean
        running_var = (1 - momentum) * running_var + momentum * x.var(axis=0, ddof=1)
    else:
        mean, var = running_mean, running_var
    return gamma * (x - mean) / np.sqrt(var + eps) + beta
""", "no_update", 1),
    ("fold returns (b2, W2)", "04.fold_batchnorm_into_linear", """
def fold_batchnorm_into_linear(W, b, gamma, beta, running_mean, running_var, eps=1e-5):
    b = np.zeros(W.shape[0]) if b is None else b
    scale = gamma / np.sqrt(running_var + eps)
    return scale * (b - running_mean) + beta, scale[:, None] * W
""", "wrong_order", 0),
    ("layer norm forward returns (out, cache)", "05.layernorm_forward", """
def layernorm_forward(x, gamma, beta, eps=1e-5):
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    xhat = (x - mu) / np.sqrt(var + eps)
    return gamma * xhat + beta, {"xhat": xhat, "var": var}
""", "out_and_cache", 0),
    ("layer norm backward returns (dx, dbeta, dgamma)", "05.layernorm_backward",
     LN_BACKWARD.format(tail="return dx, dbeta, dgamma"), "wrong_order", 2),
    ("layer norm backward: dx misses the 1 / D (no known mistake)", "05.layernorm_backward",
     LN_BACKWARD.format(tail="return dx * d, dgamma, dbeta"), "unexplained", 2),
    ("layer norm over channels with reshape(-1, C)", "05.layernorm_channels_first", """
def layernorm_channels_first(x, gamma, beta, eps=1e-5):
    N, C, H, W = x.shape
    flat = x.reshape(-1, C)
    mu, var = flat.mean(1, keepdims=True), flat.var(1, keepdims=True)
    return (gamma * (flat - mu) / np.sqrt(var + eps) + beta).reshape(N, C, H, W)
""", "reshape_without_transpose", 0),
    ("r and d with np.clip bounds swapped", "06.renorm_r_d",
     R_D.format(r_bounds="rmax, 1 / rmax", d_bounds="dmax, -dmax"), "clip_bounds_swapped", 0),
    ("only r's np.clip bounds swapped", "06.renorm_r_d",
     R_D.format(r_bounds="rmax, 1 / rmax", d_bounds="-dmax, dmax"), "clip_bounds_swapped", 1),
    ("renorm forward rebinding running_mean", "06.batch_renorm_forward",
     R_D_RIGHT + RENORM_FORWARD.format(update=REBINDS_MEAN, cast=""), "no_update", 2),
    ("renorm forward calling a wrong renorm_r_d", "06.batch_renorm_forward",
     R_D_INVERTED + RENORM_FORWARD.format(update=IN_PLACE, cast=""), "wrong_helper", 2),
    ("renorm forward returning float32", "06.batch_renorm_forward",
     R_D_RIGHT + RENORM_FORWARD.format(update=IN_PLACE, cast=".astype(np.float32)"), "float32", 2),
    ("renorm backward calling a wrong renorm_r_d", "06.batch_renorm_backward",
     R_D.format(r_bounds="rmax, 1 / rmax", d_bounds="dmax, -dmax") + RENORM_BACKWARD,
     "wrong_helper", 1),
    ("schedule returns (dmax_now, rmax_now)", "06.renorm_limits", """
def renorm_limits(step, rmax=3.0, dmax=5.0, warmup_steps=5000, rmax_steps=40000, dmax_steps=25000):
    def progress(end):
        return 0.0 if step < warmup_steps else min(1.0, (step - warmup_steps) / (end - warmup_steps))
    return dmax * progress(dmax_steps), 1.0 + (rmax - 1.0) * progress(rmax_steps)
""", "wrong_order", 0),
]


def student_function(task_id: str, source: str):
    """Run the cells' source in a fresh notebook-like namespace; return the task's function."""
    from normcourse.exercises.catalog import task

    namespace = {"np": np, "torch": torch}
    exec(textwrap.dedent(source), namespace)
    return namespace[task(task_id).function]


@pytest.mark.parametrize("mistake, task_id, source, name, points", WRONG_ANSWERS,
                         ids=[w[0] for w in WRONG_ANSWERS])
def test_student_wrong_answer_gets_its_named_diagnosis(mistake, task_id, source, name, points):
    result = check_answer(task_id, student_function(task_id, source))
    assert result.status == "fail", result.message
    assert "checker itself failed" not in result.message
    assert result.points == points, result.line()
    if name == "unexplained":  # no known mistake: which outputs are right, which wrong, by how much
        assert result.mistakes == []
        assert "are right; `dx` is wrong (largest relative error" in result.message
    else:
        assert result.mistakes == [name], result.message


def test_the_messages_say_what_to_do():
    bn_order, bn_swap = WRONG_ANSWERS[0], WRONG_ANSWERS[1]
    message = check_answer(bn_order[1], student_function(bn_order[1], bn_order[2])).message
    assert "you returned (dgamma, dbeta, dx); return (dx, dgamma, dbeta)" in message
    message = check_answer(bn_swap[1], student_function(bn_swap[1], bn_swap[2])).message
    assert "you returned (dx, dbeta, dgamma)" in message
    helper = next(w for w in WRONG_ANSWERS if w[3] == "wrong_helper" and w[1].startswith("06"))
    message = check_answer(helper[1], student_function(helper[1], helper[2])).message
    assert message.startswith("Fix `renorm_r_d` first: `batch_renorm_forward` calls your "
                              "`renorm_r_d`, which fails its own check: r is the batch std")
    # The chapter-4 and chapter-6 rebinding diagnoses share one message, naming each buffer.
    rebinds = [check_answer(w[1], student_function(w[1], w[2])).message
               for w in WRONG_ANSWERS if w[3] == "no_update"]
    assert all(m.startswith("The running statistics did not change in training mode. Update "
                            "them in place") for m in rebinds)
    assert "(running_mean, running_var)" in rebinds[0] and "(running_mean, running_std)" in rebinds[1]


def test_partial_credit_shows_in_the_verdict_line():
    answer = WRONG_ANSWERS[2]  # dx in float32: dgamma and dbeta earn their points
    line = check_answer(answer[1], student_function(answer[1], answer[2])).line()
    assert line.startswith("[FAIL] 02.batchnorm_backward (batch norm backward pass, training "
                           "mode): 2/4 points (dx 0/2, dgamma 1/1, dbeta 1/1). `dx` is float32")


def table() -> str:
    """The markdown table mistake -> diagnosis -> points -> message."""
    rows = ["| mistake | task | diagnosis | points | message |", "| --- | --- | --- | --- | --- |"]
    for mistake, task_id, source, _, _ in WRONG_ANSWERS:
        result = check_answer(task_id, student_function(task_id, source))
        rows.append(f"| {mistake} | {task_id} | {', '.join(result.mistakes) or '(none)'} | "
                    f"{result.points}/{result.max_points} | {result.message} |")
    return "\n".join(rows)


def test_the_tasks_own_functions_run_once_per_case_and_an_answer_on_every_check():
    from normcourse.exercises.diagnosis import Case, Mistake, OutputTask

    calls = {"correct": 0, "mistake": 0, "answer": 0}

    def counted(name, shift):
        def function(x):
            calls[name] += 1
            return x + shift
        return function

    task = OutputTask(
        id="00.double", title="double", function="double", correct=counted("correct", 0.0),
        cases=(Case("ones", lambda: {"x": np.ones(3)}), Case("range", lambda: {"x": np.arange(3.0)})),
        mistakes=(Mistake("plus_one", "you added one", counted("mistake", 1.0)),))
    answer = counted("answer", 1.0)  # makes the known mistake
    for _ in range(3):
        result = task.check(answer)
        assert result.status == "fail" and result.mistakes == ["plus_one"]
    assert task.check(counted("answer", 0.0)).status == "pass"
    assert calls == {"correct": 2, "mistake": 2, "answer": 3 * 2 + 2}  # 2 cases, 4 checks
    # Later calls get copies: a caller that writes into its outputs changes no later check.
    task.run(task.correct, task.cases[0])[0][:] = 7.0
    assert task.check(counted("answer", 0.0)).status == "pass"
    # A case that is not the task's own runs every time.
    other = Case("twos", lambda: {"x": np.full(3, 2.0)})
    task.run(task.correct, other), task.run(task.correct, other)
    assert calls["correct"] == 4


if __name__ == "__main__":
    print(table())
