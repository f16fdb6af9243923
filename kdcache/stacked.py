"""Several students of one architecture trained as one fused model (`torch.func`).

The students' weights and BatchNorm buffers are stacked along a new first dimension
(`stack_module_state`); one `vmap` of `functional_call` runs all of them on the same batch; their
losses are summed, so each student's slice of the stacked weights gets its own gradient; one optimiser
over the stacked tensors is, element by element, one optimiser per student (SGD, Adam and weight decay
act on each element alone). Dropout draws a different mask for each student (`randomness="different"`),
so students with dropout match the loop backend in distribution, not bit for bit.

On a GPU, where small students are bound by kernel launches, fusing is where the speed is; on a
2-core CPU the loop backend is faster (see docs/benchmarks.md). Equality with the loop backend is
tested on CPU either way.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from kdcache.batches import Batch
from kdcache.runtime import Runtime


class Stacked:
    """A `train.Member` holding `len(models)` students: one step trains them all."""

    def __init__(self, models: list[nn.Module], loss_fns: list, rt: Runtime, make_optimizer):
        """`make_optimizer(model)` -> (optimiser, schedule), as for one student: it is given a shell of the
        architecture whose parameters are the stacked tensors."""
        from torch.func import stack_module_state

        self.size, self.rt, self.loss_fns = len(models), rt, loss_fns
        models = [m.to(rt.device) for m in models]
        self.template = copy.deepcopy(models[0])  # what each student's weights are loaded into for evaluation
        params, buffers = stack_module_state(models)
        trained = {k: p.requires_grad for k, p in models[0].named_parameters()}  # frozen stays frozen
        self.params = {k: nn.Parameter(v.detach().clone(), requires_grad=trained[k]) for k, v in params.items()}
        self.buffers = buffers
        # a shell with the stacked tensors in the architecture's places, so the optimiser finds BatchNorm biases
        self.shell = copy.deepcopy(models[0]).to("meta")
        for name, p in self.params.items():
            owner, _, leaf = name.rpartition(".")
            setattr(self.shell.get_submodule(owner) if owner else self.shell, leaf, p)
        self.optimizer, self.scheduler = make_optimizer(self.shell)
        self.base = copy.deepcopy(models[0]).to("meta")
        self.rng: torch.Tensor | None = None
        self._training = True

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def train(self) -> None:
        self._training = True

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        from torch.func import functional_call, vmap

        self.base.train(self._training)

        def one(p, b, x):
            return functional_call(self.base, (p, b), (x,))

        return vmap(one, in_dims=(0, 0, None), randomness="different")(self.params, self.buffers, x)

    def step(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss [k], correct [k]) as device tensors."""
        x = self.rt.input(batch.x)
        with self.rt.autocast():
            out = self._forward(x)  # [k, B, C]
        losses = torch.stack([fn(out[j], batch) for j, fn in enumerate(self.loss_fns)])
        self.optimizer.zero_grad(set_to_none=True)
        losses.sum().backward()
        self.optimizer.step()
        self.scheduler.step()
        return losses.detach(), (out.argmax(-1) == batch.y).sum(1)

    def student(self, j: int) -> nn.Module:
        """Student j as a plain module (a copy of its weights and buffers)."""
        model = copy.deepcopy(self.template)
        state = {k: v[j].detach() for k, v in self.params.items()} | {k: v[j] for k, v in self.buffers.items()}
        model.load_state_dict(state)
        return model

    def finite(self) -> list[bool]:
        tensors = [t for t in (*self.params.values(), *self.buffers.values()) if t.is_floating_point()]
        per = torch.stack([torch.isfinite(t.reshape(self.size, -1)).all(1) for t in tensors]).all(0)
        return per.tolist()

    def evaluated(self) -> list[tuple[nn.Module, None]]:
        return [(self.student(j), None) for j in range(self.size)]

    def state_dict(self) -> dict:
        return {
            "params": {k: v.detach() for k, v in self.params.items()},
            "buffers": self.buffers,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": self.rng,
        }

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            for k, v in state["params"].items():
                self.params[k].copy_(v)
            for k, v in state["buffers"].items():
                self.buffers[k].copy_(v)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.rng = state["rng"]
