"""A student trained from a kdcache logit cache in a plain PyTorch loop: kdcache only gives the batches
(the cached views, their teacher logits) and the loss. On CPU it ends at the very weights of
  kdcache student --arch resnet18 --cache CACHE --epochs E --batch-size B --lr LR --seed S --T T --alpha A \
      --optimizer sgd --schedule constant --warmup-epochs 0 --momentum 0.9 --weight-decay 5e-4
(tests/test_api.py checks it).  Usage: python examples/own_loop.py --cache saved_models/teacher_logits.h5
"""

import argparse

import torch
import torchvision
from torch import nn

import kdcache


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", required=True, help="a cache written by `kdcache dump-logits`")
    p.add_argument("--data-dir", default=None, help="CIFAR's python batches or the folder holding them (data/)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--T", type=float, default=3.0)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--out", default="own_loop_student.pt", help="where the state dict goes")
    args = p.parse_args(argv)

    views = kdcache.CachedBatches(
        args.cache,
        data_dir=args.data_dir,
        batch_size=args.batch_size,
        seed=args.seed,
        runtime=kdcache.Runtime.create(args.device),
    )
    print(views)
    torch.manual_seed(args.seed)
    model = torchvision.models.resnet18(num_classes=views.num_classes)
    model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)  # a stem for 32-pixel images
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    model.maxpool = nn.Identity()
    model = model.to(views.device, memory_format=torch.channels_last)  # the batches' layout
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    for epoch in range(args.epochs):
        model.train()
        loss_sum = torch.zeros((), device=views.device)
        for b in views.epoch(epoch):
            loss = kdcache.student_loss(
                model(b.x), b.y, b.t, T=args.T, alpha=args.alpha, partner_labels=b.y2, lam=b.lam
            )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.detach() * len(b.y)
        model.eval()
        with torch.no_grad():
            correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in views.test_batches())
        print(
            f"epoch {epoch + 1}  loss {loss_sum.item() / views.num_samples:.4f}  "
            f"test acc {100 * correct / len(views.test_labels):.2f}%",
            flush=True,
        )
    torch.save(model.state_dict(), args.out)
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
