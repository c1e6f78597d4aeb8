"""Linear probe of a run's encoder: how linearly separable are its frozen, mean-pooled features?

    d2v-probe RUN_DIR_OR_CHECKPOINT [--max-samples N] [--data PATH]

The student encoder (eval mode, no grad) embeds the labelled data of the run's modality; the last
hidden states are mean-pooled over non-padded positions (image: patch tokens, CLS left out). A
multinomial logistic regression (standardized features, L-BFGS, small L2) is trained on a fixed
seeded 80/20 split and scored on the 20%. The same is done for the same architecture at its random
initialization (the run's own initial weights: torch.manual_seed(seed) before build_model). Both
accuracies go to stdout and to <run dir>/probe.json (a checkpoint file: <its name>.probe.json
beside it).

Labelled data per modality (the embedded data/ sets unless --data says otherwise):
    image: the run's data.path when it has class folders, else data/images/digits; center crop
    audio: train.tsv + valid.tsv (+ .label) in the folder of the run's manifest (data/audio)
    text:  the "probe" split of the run's text folder (data/text)
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import torch

from d2v_engine.data import build_dataset
from d2v_engine.errors import D2VError, DataError
from d2v_engine.handoff.export import load_encoder

ROOT = Path(__file__).resolve().parents[2]  # the checkout: configs/, data/
DEFAULT_DATA = {"image": ROOT / "data/images/digits", "audio": ROOT / "data/audio",
                "text": ROOT / "data/text"}
SPLIT_SEED = 0
BATCH = 64


def _labelled(dataset, what) -> None:
    if getattr(dataset, "labels", None) is None:
        raise DataError(f"{what} has no labels to probe with")


def probe_datasets(cfg, data_path: str | Path | None = None) -> list:
    """The labelled datasets (augment off) the probe embeds for the run's modality."""
    data_cfg = copy.deepcopy(cfg.data)
    data_cfg.augment = False
    data_cfg.on_bad_file = "fail"
    modality = cfg.modality
    if modality == "image":
        path = Path(data_path) if data_path else None
        if path is None:
            run_path = Path(cfg.data.path) if cfg.data.path else None
            if run_path is not None and run_path.is_dir():
                try:
                    ds = build_dataset(_with_path(data_cfg, run_path), "image")
                    if ds.labels is not None:
                        return [ds]
                except D2VError:
                    pass
            path = DEFAULT_DATA["image"]
        ds = build_dataset(_with_path(data_cfg, path), "image")
        _labelled(ds, path)
        return [ds]
    if modality == "audio":
        data_cfg.min_sample_size = 0
        if data_path:
            folder = Path(data_path)
        else:
            run_path = Path(cfg.data.path) if cfg.data.path else DEFAULT_DATA["audio"]
            folder = run_path if run_path.is_dir() else run_path.parent
        if folder.is_file():  # one manifest
            ds = build_dataset(_with_path(data_cfg, folder), "audio")
            _labelled(ds, folder)
            return [ds]
        out = []
        for split in ("train", "valid"):
            if (folder / f"{split}.tsv").is_file() and (folder / f"{split}.label").is_file():
                out.append(build_dataset(_with_path(data_cfg, folder), "audio", split))
        if not out:
            raise DataError(f"{folder}: no train.tsv/valid.tsv with .label files to probe with")
        return out
    folder = Path(data_path) if data_path else Path(cfg.data.path or DEFAULT_DATA["text"])
    ds = build_dataset(_with_path(data_cfg, folder), "text", "probe")
    _labelled(ds, folder / "probe.label")
    return [ds]


def _with_path(data_cfg, path):
    d = copy.deepcopy(data_cfg)
    d.path = str(path)
    return d


def _pad_batch(sources: list[torch.Tensor], pad_value) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(s.shape[0] for s in sources)
    out = torch.full((len(sources), length), pad_value, dtype=sources[0].dtype)
    pad = torch.ones(len(sources), length, dtype=torch.bool)
    for i, s in enumerate(sources):
        out[i, :s.shape[0]] = s
        pad[i, :s.shape[0]] = False
    return out, pad


@torch.no_grad()
def embed_all(wrapper, items: list[tuple], batch_size: int = BATCH) -> torch.Tensor:
    """N x C mean-pooled last hidden states of (dataset, index) items, in order."""
    wrapper.eval()
    modality, n_extra = wrapper.modality, wrapper.num_extra_tokens
    rng = np.random.default_rng(0)  # unused: augment is off
    feats = []
    for start in range(0, len(items), batch_size):
        samples = [ds.load(i, rng)["source"] for ds, i in items[start:start + batch_size]]
        if modality == "image":
            source, pad = torch.stack(samples), None
        elif modality == "audio":
            source, pad = _pad_batch(samples, 0.0)
            if not pad.any():
                pad = None
        else:
            source, pad = _pad_batch(samples, wrapper.cfg.model.pad_id)
        x, x_pad = wrapper.encode_with_padding(source, pad)
        x = x[:, n_extra:].float()
        if x_pad is None:
            feats.append(x.mean(1))
        else:
            keep = (~x_pad[:, n_extra:]).float().unsqueeze(-1)
            feats.append((x * keep).sum(1) / keep.sum(1).clamp(min=1.0))
    return torch.cat(feats)


def logistic_regression_accuracy(train_x, train_y, test_x, test_y, num_classes: int,
                                 steps: int = 100, weight_decay: float = 1e-4) -> float:
    """Multinomial logistic regression (L-BFGS, L2) on standardized features; test accuracy."""
    mean, std = train_x.mean(0), train_x.std(0).clamp(min=1e-6)
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    torch.manual_seed(0)
    linear = torch.nn.Linear(train_x.shape[1], num_classes).double()
    torch.nn.init.zeros_(linear.weight)
    torch.nn.init.zeros_(linear.bias)
    train_x, test_x = train_x.double(), test_x.double()
    opt = torch.optim.LBFGS(linear.parameters(), lr=1.0, max_iter=steps, history_size=20,
                            tolerance_grad=1e-9, tolerance_change=1e-12,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(linear(train_x), train_y)
        loss = loss + weight_decay * linear.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        pred = linear(test_x).argmax(1)
    return (pred == test_y).double().mean().item()


def labelled_split(cfg, max_samples: int = 1000, data_path: str | Path | None = None):
    """(items, labels, n_train, num_classes): the probe's seeded subset of (dataset, index)
    items, train part first (80%), and their int64 labels."""
    datasets = probe_datasets(cfg, data_path)
    items = [(ds, i) for ds in datasets for i in range(len(ds))]
    labels = torch.tensor([ds.labels[i] for ds, i in items], dtype=torch.long)
    g = torch.Generator().manual_seed(SPLIT_SEED)
    order = torch.randperm(len(items), generator=g)
    if max_samples and len(order) > max_samples:
        order = order[:max_samples]
    n_test = max(1, round(0.2 * len(order)))
    n_train = len(order) - n_test
    if n_train < 2:
        raise DataError(f"only {len(order)} labelled samples: too few to probe")
    items = [items[i] for i in order.tolist()]
    labels = labels[order]
    return items, labels, n_train, int(labels.max()) + 1


def probe_accuracy(feats: torch.Tensor, labels: torch.Tensor, n_train: int,
                   num_classes: int) -> float:
    """Test accuracy of the logistic regression on N x D features, the first n_train to train."""
    return logistic_regression_accuracy(feats[:n_train], labels[:n_train], feats[n_train:],
                                        labels[n_train:], num_classes)


def run_probe(checkpoint: str | Path, max_samples: int = 1000, data_path: str | Path | None = None,
              write: bool = True) -> dict:
    """Probes the checkpoint and the random-init encoder; writes <run dir>/probe.json for a run
    directory, <checkpoint name>.probe.json beside a checkpoint file (the run's own probe.json,
    of its newest checkpoint, stays)."""
    torch.set_grad_enabled(False)
    try:
        trained = load_encoder(checkpoint)
        random_init = load_encoder(checkpoint, random_init=True)
        cfg = trained.cfg
        items, labels, n_train, num_classes = labelled_split(cfg, max_samples, data_path)
        result = {"modality": cfg.modality, "checkpoint": str(trained.checkpoint_path),
                  "num_train": n_train, "num_test": len(items) - n_train}
        for key, wrapper in (("checkpoint_accuracy", trained), ("random_init_accuracy", random_init)):
            result[key] = probe_accuracy(embed_all(wrapper, items), labels, n_train, num_classes)
    finally:
        torch.set_grad_enabled(True)
    if write:
        ckpt = Path(trained.checkpoint_path)
        out = ckpt.with_name(f"{ckpt.stem}.probe.json") if Path(checkpoint).is_file() \
            else ckpt.parent / "probe.json"
        out.write_text(json.dumps(result, indent=1) + "\n")
        result["probe_json"] = str(out)
    return result


def print_probe(r: dict) -> None:
    print(f"{r['modality']} linear probe ({r['num_train']} train / {r['num_test']} test): "
          f"checkpoint {r['checkpoint_accuracy']:.4f}, random init {r['random_init_accuracy']:.4f} "
          f"-> {r['probe_json']}", flush=True)
