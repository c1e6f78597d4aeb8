"""EMA teacher: a no-grad copy of the student whose weights trail the student's.

The decay anneals linearly from `ema_decay` to `ema_end_decay` over `ema_anneal_end_step` updates,
then stays (fairseq's get_annealed_rate); the trainer passes the anneal end scaled to the run's
length (d2v_engine.objective.schedule.run_steps). objective.ema_scope says what is averaged; the rest is
copied from the student at every update (teacher_shared_prefixes):

    transformer  feature encoder copied (data2vec's ema_transformer_only / ema_layers_only /
                 ema_transformer_layers_only; v2's ema_encoder_only): blocks (+ norms) averaged
    context      local feature encoder copied, positional conv / CLS / norms / blocks averaged
                 (data2vec 2.0 with ema_encoder_only false, ema_local_encoder false)
    all          everything averaged (ema_local_encoder true)

As fairseq's EMAModule, a parameter the student does not train (requires_grad false, e.g. the
frozen v2 mask embedding) is copied, never averaged. Under "transformer" and "context" the teacher
runs on the student's own local features (teacher_reads_student_features).
"""
from __future__ import annotations

import copy

import torch
from torch import nn


def ema_decay_at(step: int, start: float, end: float, anneal_end_step: int) -> float:
    """Decay to use for the update that completes `step` (counted from 0)."""
    if anneal_end_step <= 0 or step >= anneal_end_step:
        return end
    return end - (end - start) * (1.0 - step / anneal_end_step)


SCOPES = ("transformer", "context", "all")


def teacher_shared_prefixes(encoder: nn.Module, scope: str) -> tuple[str, ...]:
    """Parameter-name prefixes of `encoder` the teacher copies instead of averaging."""
    if scope == "transformer":
        return tuple(encoder.feature_encoder_prefixes())
    if scope == "context":
        return tuple(encoder.local_encoder_prefixes())
    if scope == "all":
        return ()
    raise ValueError(f"ema scope must be one of {SCOPES}, got {scope!r}")


def teacher_reads_student_features(scope: str) -> bool:
    """True when the teacher encodes the student's local features (fairseq passes
    extractor_out["local_features"], dropout included) instead of embedding the input itself."""
    return scope in ("transformer", "context")


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (a view sharing storage), a plain tensor as is."""
    return t.to_local() if hasattr(t, "to_local") else t


def _end_forward_only_iteration(model: nn.Module) -> None:
    """FSDP2 clears its per-iteration records (the post-forward order it keeps for the backward's
    prefetch) in the root's post-backward callback. The teacher runs no backward, so without this
    its records grow by one entry per group and forward, every step. A torch without
    reset_iter_state keeps that growth (a few references per step)."""
    reset = getattr(model, "reset_iter_state", None)
    if reset is not None:
        reset()


class EMATeacher:
    """Holds the teacher model (eval mode, fp32, no grad) and updates it from the student.

    Under FSDP2 student and teacher parameters are DTensors sharded alike; the update reads their
    local shards at every call rather than keeping views from sharding time (FSDP2 owns the shard
    storage: it re-pads empty shards at its lazy init, for one), and checks that each pair has the
    same shape, so a teacher left unsharded while the student is sharded is an error, not an
    update of the wrong tensors.
    """

    def __init__(self, student: nn.Module, shared_prefixes: tuple[str, ...] = ()):
        self.model = copy.deepcopy(student).float().eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.shared_prefixes = tuple(shared_prefixes)
        frozen = {n for n, p in student.named_parameters() if not p.requires_grad}
        names = [n for n, _ in self.model.named_parameters()]
        copied = {n for n in names if n.startswith(self.shared_prefixes) or n in frozen}
        self.averaged = [n for n in names if n not in copied]
        self.shared = [n for n in names if n in copied]

    def _pairs(self, student: nn.Module, names: list[str]):
        """(teacher shards, student shards) of `names`, as plain local tensors."""
        teacher, ours = [], []
        for n in names:
            t = _local(self.model.get_parameter(n))
            s = _local(student.get_parameter(n).detach())
            if t.shape != s.shape:
                raise RuntimeError(f"EMA teacher: parameter {n} is {tuple(t.shape)} here but "
                                   f"{tuple(s.shape)} in the student (sharded differently?)")
            teacher.append(t)
            ours.append(s)
        return teacher, ours

    @torch.no_grad()
    def update(self, student: nn.Module, decay: float) -> None:
        """teacher = decay * teacher + (1 - decay) * student, as one multi-tensor launch."""
        _end_forward_only_iteration(self.model)
        # Sharded (FSDP2) student and teacher: same placements, so the update is shard-local.
        teacher_avg, student_avg = self._pairs(student, self.averaged)
        if teacher_avg:
            if student_avg[0].dtype != teacher_avg[0].dtype:
                student_avg = [s.to(t.dtype) for s, t in zip(student_avg, teacher_avg)]
            torch._foreach_lerp_(teacher_avg, student_avg, 1.0 - decay)
        teacher_shared, student_shared = self._pairs(student, self.shared)
        if teacher_shared:
            torch._foreach_copy_(teacher_shared, student_shared)
        for name, buf in student.named_buffers():
            self.model.get_buffer(name).copy_(buf)

    def state_dict(self) -> dict:
        return self.model.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state)
