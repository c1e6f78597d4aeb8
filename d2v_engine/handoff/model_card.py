"""The README.md model card of an export: the run's own facts, read from the run directory.

Architecture (from the config and the exported model), objective (v1 / v2), data (the prepare
report.json beside data.path, the text folder's meta.json, or the audio manifest's sizes), steps
and the final logged loss (metrics.jsonl), the linear probe (probe.json), the training command
(command.txt), and every config key that differs from the paper's recipe (configs/<modality>_base
.yaml for v1, configs/<modality>_v2.yaml for v2). What the run directory lacks is said, not guessed.
"""
from __future__ import annotations

import json
from pathlib import Path

from d2v_engine.config import BOOKKEEPING, Config, flatten, load_config, to_dict
from d2v_engine.handoff.export_processors import ROOT, resolve_data_path

HF_CLASS = {"audio": "Data2VecAudioModel", "image": "Data2VecVisionModel",
            "text": "Data2VecTextModel"}
HEAD_CLASS = {"audio": "Data2VecAudioForSequenceClassification",
              "image": "Data2VecVisionForImageClassification",
              "text": "Data2VecTextForSequenceClassification"}
PIPELINE = {"audio": "audio-classification", "image": "image-feature-extraction",
            "text": "feature-extraction"}
def recipe_file(cfg: Config) -> Path:
    name = "v2" if cfg.objective.mode == "v2" else "base"
    return ROOT / "configs" / f"{cfg.modality}_{name}.yaml"


def recipe_differences(cfg: Config) -> tuple[Path, list[tuple[str, object, object]] | None]:
    """(recipe config file, [(key, this run's value, the recipe's)]) over every key that changes
    what is learned (BOOKKEEPING left out); None when the recipe file is not there."""
    path = recipe_file(cfg)
    if not path.is_file():
        return path, None
    ours = flatten(to_dict(cfg))
    theirs = flatten(to_dict(load_config(path)))
    diffs = [(k, ours[k], theirs.get(k)) for k in sorted(ours)
             if ours[k] != theirs.get(k) and not k.startswith(BOOKKEEPING)]
    return path, diffs


def final_loss(run_dir: Path, step: int) -> tuple[int, float] | None:
    """(step, loss) of the last metrics.jsonl training row at or before `step`."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    found = None
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "event" not in row and "loss" in row and row.get("step", step + 1) <= step:
            found = (row["step"], row["loss"])
    return found


def data_facts(cfg: Config) -> list[str]:
    """Lines on the pretraining data: prepare report counts and hours, or what the data says."""
    path = resolve_data_path(cfg.data.path) if cfg.data.path else None
    if path is None:
        return [f"`data.path`: `{cfg.data.path}` (not found at export time)"]
    lines = [f"`data.path`: `{cfg.data.path}`"]
    folder = path if path.is_dir() else path.parent
    report = folder / "report.json"
    if report.is_file():
        r = json.loads(report.read_text())
        rejected = r.get("rejected") or {}
        text = f"prepare report ({report.name}): {r.get('accepted')} files accepted"
        text += (", rejected " + ", ".join(f"{n} {k}" for k, n in rejected.items())
                 if rejected else ", none rejected")
        if "total_seconds" in r:
            text += f", {r['total_seconds'] / 3600:.2f} h of audio"
        if "total_tokens" in r:
            text += f", {r['total_tokens']} tokens"
        if r.get("classes"):
            text += f", {r['classes']} classes"
        lines.append(text)
    else:
        lines.append("no prepare report (report.json) beside data.path")
    if cfg.modality == "text" and (folder / "meta.json").is_file():
        meta = json.loads((folder / "meta.json").read_text())
        lines.append(f"token folder: vocabulary {meta.get('vocab_size')}, documents "
                     f"{meta.get('num_docs')}, tokens {meta.get('num_tokens')}")
        if meta.get("source"):
            lines.append(f"source: {meta['source']}")
    if cfg.modality == "audio" and not report.is_file():
        manifest = path if path.is_file() else path / "train.tsv"
        if manifest.is_file():
            sizes = [int(line.split("\t")[1]) for line in manifest.read_text().splitlines()[1:]
                     if "\t" in line]
            lines.append(f"manifest {manifest.name}: {len(sizes)} files, "
                         f"{sum(sizes) / cfg.data.sample_rate / 3600:.2f} h at "
                         f"{cfg.data.sample_rate} Hz")
    return lines


def _architecture(cfg: Config, num_params: int) -> list[str]:
    m = cfg.model
    ln = "pre-LN" if m.layer_norm_first else "post-LN"
    lines = [f"`transformers.{HF_CLASS[cfg.modality]}`, {num_params / 1e6:.2f} M parameters",
             f"Transformer: {m.depth} blocks, width {m.embed_dim}, {m.num_heads} heads, FFN "
             f"{m.ffn_dim}, {ln}"]
    if cfg.modality == "image":
        lines.append(f"ViT patches {m.patch_size} px on {m.img_size} px images, CLS token first; "
                     + ("shared relative position bias" if m.rel_pos_bias
                        else "absolute position embeddings"))
    elif cfg.modality == "audio":
        lines.append(f"waveform CNN (channels, kernel, stride) {m.conv_layers}, convolutional "
                     f"positions (depth {m.conv_pos_depth}, {m.conv_pos_groups} groups)")
    else:
        lines.append(f"vocabulary {m.vocab_size}, {m.max_positions} positions, pad id {m.pad_id}")
    return lines


def _objective(cfg: Config) -> str:
    o = cfg.objective
    loss = f"smooth L1 (beta {o.loss_beta})" if o.loss_beta else "L2"
    common = (f"targets: average of the EMA teacher's top {o.top_k} block outputs "
              f"({o.layer_output}, per-layer norm {o.layer_norm}, final norm {o.final_norm}); "
              f"{loss} loss; EMA decay {o.ema_decay} -> {o.ema_end_decay} over "
              f"{o.ema_anneal_end_step} steps")
    if o.mode == "v2":
        return (f"data2vec 2.0 (v2): {o.clone_batch} masks per sample share one teacher pass; "
                f"a {o.decoder_layers}-layer conv decoder (dim {o.decoder_dim}) predicts the "
                f"targets from the visible tokens; {common}")
    return f"data2vec 1.0 (v1): the student predicts the targets at masked positions; {common}"


def _inputs(cfg: Config, processor: dict) -> list[str]:
    if cfg.modality == "audio":
        return [f"`AutoFeatureExtractor`: Wav2Vec2FeatureExtractor, {cfg.data.sample_rate} Hz "
                f"mono, "
                f"per-utterance normalization {'on' if cfg.data.normalize else 'off'}, attention "
                "mask returned (1 = keep; pad with 0.0).",
                "Exact to our loader with `trust_remote_code=True` (d2v_processing.py: "
                "normalization eps 1e-5, fairseq's); the stock class divides by sqrt(var + 1e-7), "
                "which moves normalized samples by up to (1e-5 - 1e-7) / (2 var) relative.",
                f"Our eval path also crops an utterance to data.max_sample_size="
                f"{cfg.data.max_sample_size} samples after normalizing; the processor does not "
                "crop. Other rates: resample to the sampling rate first."]
    if cfg.modality == "image":
        s = cfg.data.img_size
        return [f"`AutoImageProcessor`: short side to {s} px (PIL {cfg.data.interpolation}), "
                f"center crop {s}x{s}, "
                "/255, ImageNet mean/std; CLS token first in `last_hidden_state`.",
                "Exact to our loader with `trust_remote_code=True` (d2v_processing.py, PIL "
                "backend). The stock processor floors the center-crop offset where torchvision "
                "and our loader round it (a 1-pixel shift when the cropped-away length is 3 mod "
                "4), composites transparency onto white where we drop alpha, and with "
                "torchvision installed defaults to torchvision's resize (pass backend=\"pil\").",
                "Pipelines given a file path apply its EXIF orientation; our loader does not."]
    ids = processor.get("special_ids", {})
    return [f"`AutoTokenizer`: the tokenizer.json the data was encoded with "
            f"(`{processor.get('tokenizer_file')}`); `tokenizer(text)` gives <s> ... </s> as our "
            f"loader, special ids {ids}.",
            f"Pretraining used samples of at most data.max_tokens={cfg.data.max_tokens} tokens "
            f"(`truncation=True, max_length={cfg.data.max_tokens}` reproduces them); the model "
            f"takes up to {cfg.model.max_positions}."]


def _bullets(items: list[str]) -> str:
    return "\n".join(f"- {x}" for x in items)


def write_model_card(out_dir: Path, cfg: Config, checkpoint: Path, step: int, num_params: int,
                     processor_facts: dict, command: str) -> Path:
    """Writes out_dir/README.md; returns its path. processor_facts: from build_processor."""
    run_dir = Path(checkpoint).parent
    m = cfg.modality
    version = "2.0" if cfg.objective.mode == "v2" else "1.0"
    loss = final_loss(run_dir, step)
    if loss is None:
        loss_text = "not logged (no metrics.jsonl row)"
    else:  # a non-finite loss is logged as a string
        value = f"{loss[1]:.4f}" if isinstance(loss[1], float) else str(loss[1])
        loss_text = f"{value} (metrics.jsonl, step {loss[0]})"
    train_cmd = run_dir / "command.txt"
    train_cmd = train_cmd.read_text().strip() if train_cmd.is_file() else "not recorded"
    probe = run_dir / "probe.json"
    if probe.is_file():
        p = json.loads(probe.read_text())
        probe_text = (f"linear probe (`d2v-probe`, {p['num_train']} train / "
                      f"{p['num_test']} test, checkpoint {Path(p['checkpoint']).name}): accuracy "
                      f"{p['checkpoint_accuracy']:.4f}, random init "
                      f"{p['random_init_accuracy']:.4f}")
    else:
        probe_text = "no linear probe recorded (run `d2v-probe RUN_DIR`)"
    recipe, diffs = recipe_differences(cfg)
    if diffs is None:
        differences = f"The recipe config `{recipe.name}` was not found at export time."
    else:
        rows = "\n".join(f"| `{k}` | `{ours}` | `{theirs}` |" for k, ours, theirs in diffs)
        differences = (f"Keys whose value differs from `configs/{recipe.name}` (logging and "
                       "scheduling keys left out):\n\n| key | this run | recipe |\n"
                       f"| --- | --- | --- |\n{rows or '| (none) | | |'}")
    load = {"audio": "AutoFeatureExtractor", "image": "AutoImageProcessor",
            "text": "AutoTokenizer"}[m]
    remote = "" if m == "text" else ", trust_remote_code=True"
    head_note = "  # a new, untrained head" if m == "audio" else ""
    card = f"""---
library_name: transformers
tags: [data2vec, self-supervised, {m}, d2v-engine]
---
# {cfg.run.name}: data2vec {version} {m} encoder

Pretrained with d2v-engine, exported from `{checkpoint}` by `{command}`.

## Architecture
{_bullets(_architecture(cfg, num_params))}

## Pretraining
- objective: {_objective(cfg)}
- steps: {step} (train.max_steps {cfg.train.max_steps}), global batch \
{cfg.train.global_batch}, optim.lr {cfg.optim.lr}
- final loss: {loss_text}
- command: `{train_cmd}`
- {probe_text}

## Data
{_bullets(data_facts(cfg))}

## Inputs
{_bullets(_inputs(cfg, processor_facts))}

```python
from transformers import AutoModel, {load}, pipeline
model = AutoModel.from_pretrained(PATH)
processor = {load}.from_pretrained(PATH{remote})
pipe = pipeline("{PIPELINE[m]}", model=PATH{remote}){head_note}
```
Fine-tuning: `{HEAD_CLASS[m]}.from_pretrained(PATH, num_labels=N)` (a new head).

## Differences from the paper's recipe
{differences}
"""
    path = Path(out_dir) / "README.md"
    path.write_text(card)
    return path
