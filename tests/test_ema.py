import torch
from torch import nn

from d2v_engine.objective.ema import EMATeacher


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.front = nn.Linear(3, 4)
        self.body = nn.Linear(4, 4)
        self.register_buffer("count", torch.zeros(()))


def test_ema_update_is_a_lerp_of_every_averaged_parameter():
    torch.manual_seed(0)
    student = Toy()
    ema = EMATeacher(student)
    before = {n: p.clone() for n, p in ema.model.named_parameters()}
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
    ema.update(student, 0.9)
    for n, p in ema.model.named_parameters():
        expect = 0.9 * before[n] + 0.1 * student.get_parameter(n)
        torch.testing.assert_close(p, expect, rtol=1e-6, atol=1e-7)


def test_shared_parameters_are_copied_not_averaged_and_buffers_follow():
    torch.manual_seed(0)
    student = Toy()
    ema = EMATeacher(student, shared_prefixes=("front.",))
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
        student.count.fill_(7)
    ema.update(student, 0.99)
    assert torch.equal(ema.model.front.weight, student.front.weight)
    assert not torch.allclose(ema.model.body.weight, student.body.weight)
    assert ema.model.count.item() == 7


def test_teacher_needs_no_gradients_and_is_in_eval_mode():
    ema = EMATeacher(Toy().train())
    assert not ema.model.training
    assert all(not p.requires_grad for p in ema.model.parameters())
