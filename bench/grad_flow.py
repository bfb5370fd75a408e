"""Which trainable parameter groups receive gradient from which term of Eq. 22 (issue 20 point 4).

One batch of the tiny preset's source data under the defaults: the gradient norm each group gets
from each term, at initialisation and after one optimiser step (alpha of Eq. 11 starts at 0, so
the text-latent attention gets gradient only once alpha has moved).

    python bench/grad_flow.py --data data/synthetic [--set l_seg_on=p_map ...]
"""
from __future__ import annotations

import argparse

import torch

from ssvp.config import load_config
from ssvp.engine import FeatureSource, _loader, build_model, make_optimizer, seed_everything, training_splits, with_backbone_sizes
from ssvp.losses import GRADIENT_TERMS, gradient_table, total_loss


def print_table(title: str, table: dict[str, dict[str, float]]) -> None:
    print(f"\n{title}\n| group | " + " | ".join(GRADIENT_TERMS) + " |")
    print("|---|" + "---|" * len(GRADIENT_TERMS))
    for group, row in table.items():
        print(f"| {group} | " + " | ".join("0" if v == 0 else f"{v:.2e}" for v in row.values()) + " |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="folder of `ssvp make-synthetic`")
    ap.add_argument("--config", default="configs/tiny.yaml")
    ap.add_argument("--set", nargs="*", default=[], help="overrides KEY=VALUE")
    args = ap.parse_args()
    overrides = dict(kv.split("=", 1) for kv in args.set)
    data = {"data.source": f"synthetic:{args.data}/domain_a", "data.targets": [f"synthetic:{args.data}/domain_b"]}
    cfg = load_config(args.config, {**data, "train.device": "cpu", **overrides})
    seed_everything(cfg.train.seed)
    device = torch.device("cpu")
    model = build_model(cfg, device)
    train_ds = with_backbone_sizes(training_splits(cfg)[0], model)
    features = FeatureSource(cfg, model, device)
    batch = next(iter(_loader(features.dataset(train_ds), cfg.train.batch_size, True, cfg, cfg.train.seed)))
    feats, names, masks, labels = features.batch(batch), list(batch["cls_name"]), batch["mask"], batch["label"]
    head = model.head.train()
    print(f"batch: {len(names)} images, {int(labels.sum())} anomalous; overrides {overrides or 'none (defaults)'}")
    torch.manual_seed(0)
    print_table("at initialisation", gradient_table(head, head(feats, names, masks.shape[-1]), masks, labels, cfg.model))
    optimizer = make_optimizer(cfg, model)
    loss, _ = total_loss(head(feats, names, masks.shape[-1]), masks, labels, cfg.model)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    torch.manual_seed(0)
    print_table("after one step", gradient_table(head, head(feats, names, masks.shape[-1]), masks, labels, cfg.model))


if __name__ == "__main__":
    main()
