"""A model's answers on images: logits in batches (`predict`), test-time augmentation (`TTAModel`),
accuracy, and how closely a student matches its teacher (`fidelity`)."""

from __future__ import annotations

import torch
from torch import nn

from kdcache.batches import gather_rows
from kdcache.config import TTA_LEVELS
from kdcache.models import unwrap
from kdcache.runtime import Runtime
from kdcache.views import Views, normalize, render_views


@torch.no_grad()
def predict(
    model: nn.Module,
    images: torch.Tensor,
    mean,
    std,
    rt: Runtime,
    *,
    rows: torch.Tensor | None = None,
    views: Views | None = None,
    batch_size: int = 1024,
) -> torch.Tensor:
    """float32 logits for uint8 images: [N, C] for the plain images, or, with `rows` [M] and
    their `views` [M], [M, C] for those views of images[rows].

    A compiled model sees one batch shape only: a short last batch is padded with zero
    images (and their logits dropped), since a second shape means a recompilation.
    """
    model.eval()
    one_shape = unwrap(model) is not model
    outs = []
    total = len(images) if rows is None else len(rows)
    for start in range(0, total, batch_size):
        if rows is None:
            x = normalize(images[start : start + batch_size].to(rt.device, non_blocking=True), mean, std)
        else:
            part = slice(start, start + batch_size)
            v = views[part]
            if isinstance(images, torch.Tensor):
                block, local = images, rows[part].to(images.device)
                v = v.to(images.device)
            else:  # a host store: gather this batch's rows (and partners) first
                block, local, partner = gather_rows(
                    images, rows[part], None if v.mix is None else v.mix.partner, rt.device
                )
                v = v.to(rt.device).with_partners(partner)
            x = render_views(block, local, v, mean, std)
        n = len(x)
        if one_shape and n < batch_size:
            x = torch.cat([x, x.new_zeros((batch_size - n, *x.shape[1:]))])
        with rt.autocast():
            outs.append(model(rt.input(x))[:n].float())
    return torch.cat(outs)


class TTAModel(nn.Module):
    """A model's logits averaged over mirrored (and shifted) copies of its input, as airbench
    evaluates: `flip` = mean of the view's and its mirror's logits (a two-member ensemble);
    `flip-translate` = half that, half the same over the input shifted by one pixel up-left and
    down-right (reflect padding)."""

    LEVELS = TTA_LEVELS
    PASSES = {"none": 1, "flip": 2, "flip-translate": 6}  # the model's passes over the input, per level

    def __init__(self, model: nn.Module, level: str):
        super().__init__()
        self.model, self.level = model, level

    def _mirrored(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * (self.model(x) + self.model(x.flip(-1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.level == "none":
            return self.model(x)
        logits = self._mirrored(x)
        if self.level == "flip":
            return logits
        h, w = x.shape[-2:]
        padded = nn.functional.pad(x, (1, 1, 1, 1), mode="reflect")
        fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
        shifted = [padded[..., :h, :w], padded[..., 2 : h + 2, 2 : w + 2]]
        return 0.5 * logits + 0.25 * sum(self._mirrored(v.contiguous(memory_format=fmt)) for v in shifted)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return (logits.argmax(1).cpu() == labels.cpu()).float().mean().item()


def fidelity(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> dict:
    """How closely the student matches the teacher on the same images: top-1 agreement and
    KL(teacher || student) at T = 1 (mean over images, nats)."""
    s, t = student_logits.float().cpu(), teacher_logits.float().cpu()
    kl = torch.nn.functional.kl_div(s.log_softmax(1), t.log_softmax(1), reduction="batchmean", log_target=True)
    return {"teacher_agreement": (s.argmax(1) == t.argmax(1)).float().mean().item(), "teacher_kl": kl.item()}
