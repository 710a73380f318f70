"""The step an optimizer would take next with given gradients, computed without changing the optimizer or the model
(tail-patch's step, :mod:`attribution.evaluation.facts`).

Any optimizer that steps each parameter from its own state (SGD, Adam, AdamW, Adafactor, ...) is run as itself:
a one-parameter copy of it, with a clone of that parameter's state, per parameter. Adam and AdamW (their
single-tensor form, the one torch uses on CPU) take a direct form instead: the same torch operations in the same
order, in slices of ``CHUNK`` elements, into new tensors, so that no state is cloned (and, with the momentum off,
Adam's first moment is not read at all). On SmolLM2-135M a step took a median 0.18 s this way against 1.16 s copied
(``scripts/bench_tail_patch.py``; BENCHMARKS.md, "The whole job in 10 minutes"). The two forms agree bit for bit
(tests/attribution/test_optimizer_step.py).
"""
from __future__ import annotations

import contextlib
import copy

import torch
from torch import Tensor

CHUNK = 1 << 18  # elements per slice of the direct Adam form (1 MiB of float32: each temporary stays in cache)


def optimizer_groups(optimizer, model, lr: float | None) -> list[tuple[dict, list[tuple[str, Tensor]]]]:
    """[(hyperparameters, [(name, model parameter)])] per param group of ``optimizer`` (``lr`` instead of the
    group's when given); every parameter must be one of ``model``'s."""
    if isinstance(optimizer, torch.optim.LBFGS):
        raise ValueError("optimizer: LBFGS steps all parameters jointly (a closure, a line search); tail-patch needs an "
                         "optimizer that steps each parameter from its own state (SGD, Adam, AdamW, Adafactor, ...)")
    names = {id(p): n for n, p in model.named_parameters()}
    groups = []
    for group in optimizer.param_groups:
        missing = [tuple(p.shape) for p in group["params"] if id(p) not in names]
        if missing:
            raise ValueError(f"optimizer holds parameters that are not the model's (shapes {missing[:3]}): give the "
                             "optimizer that trained this model")
        hyper = {k: v for k, v in group.items() if k != "params"}
        if lr is not None:
            hyper["lr"] = lr
        groups.append((hyper, [(names[id(p)], p) for p in group["params"]]))
    return groups


def without_momentum(hyper: dict) -> dict:
    """A param group's hyperparameters with the momentum off: Adam-style betas (0, beta2), SGD / RMSprop momentum 0."""
    hyper = dict(hyper)
    if isinstance(hyper.get("betas"), (tuple, list)):
        hyper["betas"] = (0.0, *tuple(hyper["betas"])[1:])
    if "momentum" in hyper:
        hyper["momentum"] = 0.0
        if "nesterov" in hyper:
            hyper["nesterov"] = False
    return hyper


def stepped_parameters(model, optimizer, grads: dict[str, Tensor], lr: float | None, momentum: bool = False,
                       scale: float = 1.0) -> dict[str, Tensor]:
    """{name: the parameter after one step of ``optimizer`` (its class, hyperparameters and state) with ``grads``
    times ``scale``}, new tensors: the model and the optimizer are not touched. Extra memory: the new parameters
    plus one parameter's state at a time (none with the direct Adam form). With ``optimizer=None``: plain SGD at
    ``lr``. A parameter without a gradient keeps its value (torch.optim skips it). ``momentum=False``: the step
    without the optimizer's momentum (:func:`without_momentum`). ``scale`` is applied one parameter at a time (no
    scaled copy of the whole gradient)."""
    if optimizer is None:
        return {n: (p.detach() - lr * (grads[n] * scale)) if n in grads else p.detach() for n, p in model.named_parameters()}
    return {name: step() for name, step in _parameter_steps(model, optimizer, grads, lr, momentum, scale).items()}


def _parameter_steps(model, optimizer, grads: dict[str, Tensor], lr: float | None, momentum: bool,
                     scale: float) -> dict:
    """{name: a function that returns that parameter after the step}, for the parameters with a gradient (checked
    first, so that a state that cannot step is refused before any step is taken)."""
    if optimizer is None:
        params = dict(model.named_parameters())
        return {n: (lambda n=n: params[n].detach() - lr * (grads[n] * scale)) for n in grads if n in params}
    steps = {}
    for hyper, params in optimizer_groups(optimizer, model, lr):
        hyper = hyper if momentum else without_momentum(hyper)
        direct = _direct_adam(optimizer, hyper)
        for name, p in params:
            if name not in grads:
                continue
            state = optimizer.state.get(p)
            if direct and _adam_state(state, p, hyper):
                steps[name] = lambda p=p, g=grads[name], state=state, hyper=hyper: _adam_step(p.detach(), g, state,
                                                                                               hyper, scale)
            else:
                if state and "exp_avg_sq" in state and "exp_avg" not in state:
                    raise ValueError(f"optimizer: the state of parameter {name!r} has no 'exp_avg' (Adam's first "
                                     "moment, dropped to save memory): only a step without momentum (momentum=False) "
                                     "by torch's own single-tensor Adam or AdamW does without it")
                steps[name] = lambda p=p, g=grads[name], state=state, hyper=hyper: _copied_step(optimizer, hyper, p, g,
                                                                                                 state, scale)
    return steps


@contextlib.contextmanager
def stepped_in_forward(model, optimizer, grads: dict[str, Tensor], lr: float | None, momentum: bool = False,
                       scale: float = 1.0):
    """Inside the block, ``model`` computes as if it had taken the step of :func:`stepped_parameters`, while holding
    the stepped values of one module's parameters at a time: each module that owns a parameter with a gradient
    steps it in a forward pre-hook and drops it after its forward (a weight two modules share, as tied embeddings,
    is stepped for each). A parameter read outside its own module's forward would get the unstepped value, so such
    a read raises a RuntimeError (a torch-function mode watches every torch call for the parameters; their shape,
    dtype and device may be read anywhere), and between forwards the parameters hold NaN (a stride-0 tensor: no
    memory). The parameters are restored after the block. For evaluations without a gradient."""
    steps = _parameter_steps(model, optimizer, grads, lr, momentum, scale)
    params = dict(model.named_parameters())
    stepped_ids = {id(params[name]): name for name in steps}
    originals = {name: params[name].data for name in steps}
    guard = _ReadsOutsideTheirModule(stepped_ids)
    swapped: dict[int, list] = {}

    def own(module):
        return [p for p in module._parameters.values() if p is not None and id(p) in stepped_ids]

    def before(module, args):
        if torch.is_grad_enabled():  # a backward would read the swapped tensors' later values
            raise RuntimeError("stepped_in_forward evaluates without a gradient: run the forward under torch.no_grad()")
        with guard.paused():
            held = own(module)
            swapped.setdefault(id(module), []).append([p.data for p in held])
            for p in held:
                p.data = originals[stepped_ids[id(p)]]  # the step reads the parameter's own value
                p.data = steps[stepped_ids[id(p)]]()
                guard.active[id(p)] = guard.active.get(id(p), 0) + 1

    def after(module, args, output):
        with guard.paused():
            for p, data in zip(own(module), swapped[id(module)].pop()):
                p.data = data
                guard.active[id(p)] -= 1

    owners = [m for m in model.modules() if own(m)]
    handles = []
    try:
        for name in steps:
            params[name].data = _nan_placeholder(originals[name])
        for module in owners:
            handles.append(module.register_forward_pre_hook(before))
            handles.append(module.register_forward_hook(after, always_call=True))
        with guard:
            yield model
    finally:
        for handle in handles:
            handle.remove()
        for name, data in originals.items():
            params[name].data = data


_METADATA = frozenset({"shape", "dtype", "device", "ndim", "requires_grad", "is_leaf", "layout", "is_cuda", "is_meta",
                       "is_sparse", "is_quantized", "grad_fn", "names", "is_nested", "size", "dim", "numel",
                       "is_floating_point", "is_complex", "element_size", "get_device"})


class _ReadsOutsideTheirModule(torch.overrides.TorchFunctionMode):
    """Raises when a torch call reads one of the watched parameters (``ids``: {id: name}) while none of the modules
    that own it is in its forward (``active``: {id: depth}); metadata (:data:`_METADATA`) is free to read."""

    def __init__(self, ids: dict[int, str]):
        super().__init__()
        self.ids, self.active, self.watching = ids, {}, True

    @contextlib.contextmanager
    def paused(self):
        self.watching = False
        try:
            yield
        finally:
            self.watching = True

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.watching:
            name = getattr(func, "__name__", None)
            if name == "__get__":
                name = getattr(getattr(func, "__self__", None), "__name__", None)
            if name not in _METADATA:
                for value in (*args, *kwargs.values()):
                    for item in value if isinstance(value, (list, tuple)) else (value,):
                        if id(item) in self.ids and not self.active.get(id(item)):
                            raise RuntimeError(
                                f"stepped_in_forward: the model read parameter {self.ids[id(item)]!r} outside its own "
                                f"module's forward ({name or func}), where it cannot be stepped: evaluate with the "
                                "whole stepped copy, stepped_parameters(...), instead")
        return func(*args, **kwargs)


def _nan_placeholder(like: Tensor) -> Tensor:
    """A tensor of ``like``'s shape and dtype, all NaN, that takes no memory (one element, stride 0)."""
    return torch.full((), float("nan"), dtype=like.dtype, device=like.device).expand(like.shape)


def check_stepped_result(value: float) -> float:
    """``value`` (a result computed inside :func:`stepped_in_forward`) when it is a number; a NaN means that the step
    gave NaN, or that the model read a stepped parameter's NaN placeholder past the watch."""
    if value != value:
        raise RuntimeError("stepped_in_forward: the result is NaN: the step gave NaN, or the model read a parameter "
                           "outside its own module's forward; evaluate with the whole stepped copy, "
                           "stepped_parameters(...), to tell which")
    return value


def _copied_step(optimizer, hyper: dict, p: Tensor, grad: Tensor, state: dict | None, scale: float) -> Tensor:
    """``p`` after one step of a one-parameter copy of ``optimizer`` (``hyper``, a clone of ``state``)."""
    clone = p.detach().clone().requires_grad_(True)
    clone.grad = grad * scale if scale != 1.0 else grad
    single = type(optimizer)([{**hyper, "params": [clone]}])
    if state:
        single.state[clone] = {k: v.clone() if torch.is_tensor(v) else copy.deepcopy(v) for k, v in state.items()}
    single.step()
    return clone.detach()


def _direct_adam(optimizer, hyper: dict) -> bool:
    """Whether a group of ``optimizer`` takes the direct Adam form: torch's own Adam or AdamW class in its
    single-tensor form (not fused, foreach, amsgrad, maximize, capturable or differentiable), a float learning rate."""
    return (type(optimizer) in (torch.optim.Adam, torch.optim.AdamW)
            and not any(hyper.get(flag) for flag in ("amsgrad", "maximize", "capturable", "differentiable", "fused",
                                                      "foreach"))
            and isinstance(hyper.get("lr"), float) and all(isinstance(b, float) for b in hyper.get("betas", (None,))))


def _adam_state(state: dict | None, p: Tensor, hyper: dict) -> bool:
    """Whether ``state`` is a stepped Adam state of a real floating parameter ``p`` (else the copied step runs); the
    first moment ``exp_avg`` may be missing when ``hyper``'s beta1 is 0 (the step does not read it then)."""
    needed = ("step", "exp_avg_sq") if hyper["betas"][0] == 0 else ("step", "exp_avg", "exp_avg_sq")
    return (bool(state) and all(torch.is_tensor(state.get(k)) for k in needed)
            and state["exp_avg_sq"].shape == p.shape and p.is_floating_point() and not p.is_complex())


def _adam_step(p: Tensor, grad: Tensor, state: dict, hyper: dict, scale: float) -> Tensor:
    """``p`` after torch's single-tensor Adam / AdamW step (``hyper``: lr, betas, eps, weight_decay,
    decoupled_weight_decay) from ``state`` with ``grad * scale``: the operations of torch.optim.adam's
    ``_single_tensor_adam`` in their order, on slices of :data:`CHUNK` elements, into a new tensor; the state
    is read, never written."""
    lr, (beta1, beta2), eps, decay = hyper["lr"], hyper["betas"], hyper["eps"], hyper["weight_decay"]
    decoupled = hyper.get("decoupled_weight_decay", False)
    step = float(state["step"]) + 1
    step_size = lr / (1 - beta1 ** step)
    correction2_sqrt = (1 - beta2 ** step) ** 0.5
    out = torch.empty_like(p, memory_format=torch.contiguous_format)  # reshape(-1) must be a view of it
    flat = [t.reshape(-1) for t in (p, grad, state.get("exp_avg", grad), state["exp_avg_sq"], out)]
    for start in range(0, p.numel(), CHUNK):
        param, g, exp_avg, exp_avg_sq, new = (t[start:start + CHUNK] for t in flat)
        if scale != 1.0:
            g = g * scale
        if decay != 0:
            if decoupled:
                param = param.mul(1 - lr * decay)
            else:
                g = g.add(param, alpha=decay)
        exp_avg = g if beta1 == 0 else exp_avg.lerp(g, 1 - beta1)  # lerp to weight 1 returns g itself (finite g)
        exp_avg_sq = exp_avg_sq.mul(beta2).addcmul_(g, g, value=1 - beta2)
        denom = (exp_avg_sq.sqrt_() / correction2_sqrt).add_(eps)
        torch.addcdiv(param, exp_avg, denom, value=-step_size, out=new)
    return out
