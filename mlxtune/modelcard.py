"""Model cards: the README.md that `push` uploads and `export` writes beside what it exports.

    write_model_card(folder, *, run_dir, what, repo_id=None, report=None, online=False) -> folder/README.md

`what` is what the folder holds: "adapter" (mlxtune's adapter files), "peft" (a PEFT adapter), "mlx-lm" (an
mlx-lm adapter), "fused" (the merged model as a Hugging Face dir) or "gguf" (the merged model for llama.cpp). The card is built with
huggingface_hub's own `ModelCardData` / `EvalResult` and read back with `ModelCard` before it is written, so what
lands is metadata the Hub accepts:

- base_model: the base's hub id when the run's base is one (a hub id, or a path inside the Hugging Face cache);
  a local base is named in the text only (a local path is no hub id).
- library_name: mlxtune for mlxtune's adapter files, peft for a PEFT adapter, mlx for an mlx-lm adapter,
  transformers for the fused model (none for GGUF, which the Hub recognises by its files); tags; datasets when the training data is a hub dataset;
  pipeline_tag: text-generation.
- license: the base's, read from its model card (the base dir's README.md, or the Hugging Face cache; with
  `online`, fetched from the Hub); left out when unknown.
- model-index: the metrics of the run's eval report.json (`report`, else RUN/report.json, RUN/eval/report.json
  or the newest RUN/*/report.json); for a base-vs-tuned report, the tuned model's.

The text says how the adapter was trained (rank, alpha, targets, layers, steps, data, the final losses of
metrics.jsonl) and how to load what the folder holds with mlxtune, PEFT, transformers, mlx-lm or llama.cpp.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from . import fsio
from .errors import ConfigError, MlxtuneError
from .hub import is_hub_id

PathLike = Union[str, os.PathLike]

WHATS = ("adapter", "peft", "mlx-lm", "fused", "gguf")
"What a card can describe (and `push --what` can upload)."
CARD_FILE = "README.md"
LIBRARY = {"adapter": "mlxtune", "peft": "peft", "mlx-lm": "mlx", "fused": "transformers", "gguf": None}
# Report keys → model-index metric types (Hugging Face metric ids where one exists).
METRIC_TYPES = {"loss": "loss", "ppl": "perplexity", "bpb": "bits_per_byte", "bleu": "bleu", "chrf": "chrf",
                "rouge1": "rouge1", "rouge2": "rouge2", "rougeL": "rougeL", "exact_match": "exact_match",
                "bertscore_f1": "bertscore"}
_CACHE_DIR = re.compile(r"models--([\w.-]+?)--([\w.-]+)/snapshots/")


@dataclass
class RunFacts:
    """What a card says about a run, read from its files."""

    run_dir: Path
    adapter: Any
    "The adapters.AdapterSpec of the run's adapter."
    config: dict
    "config.yaml as written by the trainer ({} when the adapter is not inside a run dir)."
    base_path: str
    base_hub_id: Optional[str]
    train: Optional[dict] = None
    "The last training record of metrics.jsonl."
    val: Optional[dict] = None
    "The last validation record."
    report: Optional[dict] = None
    datasets: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------------
# Public API


def write_model_card(folder: PathLike, *, run_dir: PathLike, what: str, repo_id: Optional[str] = None,
                     report: Optional[PathLike] = None, online: bool = False) -> Path:
    """Write folder/README.md describing `what` (see WHATS) made from the run `run_dir`; returns its path.
    `repo_id` (USER/NAME) is used in the loading instructions; `report` is an eval report.json (or its dir)."""
    if what not in WHATS:
        raise ConfigError(f"what: {what!r} is not one of {', '.join(WHATS)}")
    folder = Path(folder)
    facts = run_facts(run_dir, report)
    gguf = sorted(folder.glob("*.gguf"))
    text = render_card(facts, what, repo_id=repo_id, name=repo_id or folder.name, online=online,
                       gguf_name=gguf[0].name if gguf else "model-f16.gguf", plot=(folder / "loss.png").is_file())
    path = folder / CARD_FILE
    fsio.write_bytes(path, text)
    return path


def render_card(facts: RunFacts, what: str, *, repo_id: Optional[str], name: str, online: bool = False,
                gguf_name: str = "model-f16.gguf", plot: bool = False) -> str:
    """The card's text: YAML metadata (validated by huggingface_hub) and the body."""
    from huggingface_hub import ModelCard

    data = card_data(facts, what, name=name, online=online)
    body = card_body(facts, what, repo_id=repo_id, name=name, gguf_name=gguf_name, plot=plot)
    text = f"---\n{data.to_yaml()}\n---\n\n{body}"
    ModelCard(text)  # parses the YAML and the model-index back: raises on anything malformed
    return text


def run_facts(run_dir: PathLike, report: Optional[PathLike] = None) -> RunFacts:
    """Read a run dir (or a checkpoint / best dir inside one): adapter, config.yaml, metrics.jsonl, eval report."""
    import yaml

    from .adapters import read_adapter
    from .generation import find_run_config
    from .trackers import read_metrics

    spec = read_adapter(run_dir)
    config_path = find_run_config(run_dir)
    config = yaml.safe_load(config_path.read_text()) if config_path is not None else {}
    root = config_path.parent if config_path is not None else Path(run_dir)
    base_path = str(spec.base.get("path") or (config.get("model") or {}).get("path") or "")
    config_base = str((config.get("model") or {}).get("path") or "")
    facts = RunFacts(run_dir=root, adapter=spec, config=config, base_path=base_path,
                     base_hub_id=base_hub_id(config_base) or base_hub_id(base_path))
    records = read_metrics(root)
    facts.train = next((r for r in reversed(records) if "train_loss" in r), None)
    facts.val = next((r for r in reversed(records) if "val_loss" in r), None)
    report_path = find_report(root, report)
    if report_path is not None:
        try:
            facts.report = json.loads(report_path.read_text())
        except (OSError, ValueError) as e:
            raise MlxtuneError(f"{report_path}: not a readable eval report ({e})") from None
    train_data = str((config.get("data") or {}).get("train") or "")
    facts.datasets = [train_data] if train_data and not Path(train_data).exists() and is_hub_id(train_data) else []
    return facts


def base_hub_id(path: str) -> Optional[str]:
    """The hub id of a base model given as one, or as a snapshot path in the Hugging Face cache; else None."""
    if not path:
        return None
    m = _CACHE_DIR.search(Path(path).as_posix())
    if m:
        return f"{m.group(1)}/{m.group(2)}"
    return path if is_hub_id(path) and not Path(path).exists() else None


def find_report(run_dir: Path, report: Optional[PathLike] = None) -> Optional[Path]:
    """The eval report.json to publish: `report` (a file or its dir), else the run's (see the module docstring)."""
    if report is not None:
        p = Path(report)
        p = p / "report.json" if p.is_dir() else p
        if not p.is_file():
            raise ConfigError(f"report {report}: no report.json there (write one with `mlxtune eval ... --out DIR`)")
        return p
    for p in (run_dir / "report.json", run_dir / "eval" / "report.json"):
        if p.is_file():
            return p
    found = sorted(run_dir.glob("*/report.json"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


# ---------------------------------------------------------------------------------------------------------
# Metadata


def card_data(facts: RunFacts, what: str, *, name: str, online: bool = False):
    """huggingface_hub.ModelCardData for the card (eval results as model-index)."""
    from huggingface_hub import ModelCardData

    tags = ["mlxtune", "mlx", "lora", "text-generation"]
    tags += {"adapter": ["adapter"], "peft": ["peft", "adapter"], "mlx-lm": ["mlx-lm", "adapter"],
             "fused": ["safetensors"], "gguf": ["gguf"]}[what]
    model_type = facts.adapter.base.get("model_type")
    if model_type:
        tags.append(str(model_type))
    license_ = base_license(facts, online=online)
    results = eval_results(facts.report) if facts.report else []
    return ModelCardData(
        base_model=facts.base_hub_id, library_name=LIBRARY[what], tags=tags, datasets=facts.datasets or None,
        license=license_.get("license"), license_name=license_.get("license_name"),
        license_link=license_.get("license_link"), pipeline_tag="text-generation",
        model_name=name if results else None, eval_results=results or None)


def eval_results(report: dict) -> list:
    """The report's metrics (the tuned model's in a comparison) as huggingface_hub EvalResults."""
    from huggingface_hub import EvalResult

    from .eval.report import METRICS

    metrics = report.get("tuned") or report.get("metrics") or {}
    source, split = _data_source(str(report.get("data") or "data"))
    if is_hub_id(source) and not Path(source).exists():
        dataset_type, dataset_name = source, source
    else:  # a local file or dir: the `datasets` builder that reads it, and its name
        dataset_type = "parquet" if source.endswith(".parquet") else "json"
        dataset_name = Path(source).name or source
    out = []
    for key, label, _ in METRICS:
        value = metrics.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and key in METRIC_TYPES:
            out.append(EvalResult(task_type="text-generation", task_name="Text Generation", dataset_type=dataset_type,
                                  dataset_name=dataset_name, dataset_split=split, metric_type=METRIC_TYPES[key],
                                  metric_name=label, metric_value=float(value)))
    return out


def _data_source(desc: str) -> tuple[str, Optional[str]]:
    """(source, split) from a report's data description, "PATH (split)"."""
    m = re.fullmatch(r"(.*) \((train|valid|test)\)", desc)
    return (m.group(1), m.group(2)) if m else (desc, None)


def base_license(facts: RunFacts, *, online: bool = False) -> dict:
    """{license, license_name, license_link} from the base model's own card, where it can be found; else {}."""
    from huggingface_hub import ModelCard

    card_path = None
    local = Path(facts.base_path) if facts.base_path else None
    if local is not None and local.is_dir() and (local / CARD_FILE).is_file():
        card_path = local / CARD_FILE
    elif facts.base_hub_id:
        card_path = _hub_card(facts.base_hub_id, online)
    if card_path is None:
        return {}
    try:
        data = ModelCard.load(card_path).data
    except Exception:  # a base card we cannot parse: say nothing rather than guess
        return {}
    return {k: getattr(data, k, None) for k in ("license", "license_name", "license_link") if getattr(data, k, None)}


def _hub_card(repo_id: str, online: bool) -> Optional[Path]:
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    cached = try_to_load_from_cache(repo_id, CARD_FILE)
    if isinstance(cached, str):
        return Path(cached)
    if not online:
        return None
    try:
        return Path(hf_hub_download(repo_id, CARD_FILE))
    except Exception:  # gated, missing or unreachable: the license is left out
        return None


# ---------------------------------------------------------------------------------------------------------
# Body


def card_body(facts: RunFacts, what: str, *, repo_id: Optional[str], name: str,
              gguf_name: str = "model-f16.gguf", plot: bool = False) -> str:
    """Markdown: what it is, how it was trained (with loss.png when `plot`), its evaluation, how to load it."""
    base = facts.base_hub_id or (Path(facts.base_path).name if facts.base_path else "an unrecorded base model")
    base_ref = f"[{base}](https://huggingface.co/{base})" if facts.base_hub_id else f"`{base}` (a local model)"
    kind = {"adapter": "A LoRA adapter (mlxtune's format)", "peft": "A LoRA adapter (PEFT format)",
            "mlx-lm": "A LoRA adapter (mlx-lm format)",
            "fused": "The LoRA fine-tune merged into its base model (a Hugging Face model dir)",
            "gguf": "The LoRA fine-tune merged into its base model, as GGUF for llama.cpp"}[what]
    origin = ("trained with mlxtune (LoRA on MLX)" if facts.config
              else f"converted by mlxtune from a {facts.adapter.format} adapter")
    lines = [f"# {name.split('/')[-1]}", "", f"{kind} for {base_ref}, {origin}.", "",
             "## Training", ""]
    lines += _training_lines(facts)
    if plot:
        lines += ["", "![training and validation loss](loss.png)"]
    if facts.report:
        lines += ["", "## Evaluation", ""] + _eval_lines(facts.report)
    lines += ["", "## How to use it", ""] + usage(what, repo_id or name, base, bool(facts.base_hub_id), gguf_name)
    return "\n".join(lines) + "\n"


def _training_lines(facts: RunFacts) -> list[str]:
    spec, cfg = facts.adapter, facts.config
    train, data = cfg.get("train") or {}, cfg.get("data") or {}
    layers = "all" if spec.layers is None else (f"the last {spec.layers}" if isinstance(spec.layers, int)
                                                else ", ".join(map(str, spec.layers)))
    out = []
    if spec.base.get("fingerprint"):
        quantized = spec.base.get("quantization")
        out.append(f"- base model fingerprint: `{spec.base['fingerprint']}`"
                   + (f", quantized at load: {quantized}" if quantized else ""))
    out += [f"- LoRA: rank {spec.rank}, alpha {spec.alpha:g} (scale {spec.alpha / spec.rank:g}), dropout {spec.dropout:g}",
            f"- targets: {', '.join(spec.targets)}; layers: {layers}"]
    if data.get("train"):
        source = str(data["train"])
        shown = source if facts.datasets else Path(source).name
        out.append(f"- data: `{shown}` (format {data.get('format', 'auto')}, template {data.get('template', 'auto')}, "
                   f"max_length {data.get('max_length')}, loss on {data.get('train_on', 'responses')})")
    if train:
        out.append(f"- optimizer: AdamW, learning rate {train.get('learning_rate')} ({train.get('schedule')}), "
                   f"batch size {train.get('batch_size')} x {train.get('grad_accumulation')} accumulation, seed "
                   f"{train.get('seed')}")
    if facts.train:
        t = facts.train
        out.append(f"- {t['step']} optimizer steps; final training loss {t['train_loss']:.4f}"
                   + (f" on {int(t['trained_tokens']):,} trained tokens" if "trained_tokens" in t else ""))
    if facts.val:
        out.append(f"- final validation loss {facts.val['val_loss']:.4f} (perplexity {facts.val.get('val_ppl', 0):.3f}) "
                   f"at step {facts.val['step']}")
    return out


def _eval_lines(report: dict) -> list[str]:
    from .eval.report import METRICS, fmt

    compare = "tuned" in report
    source, split = _data_source(str(report.get("data") or "data"))
    shown = source if is_hub_id(source) and not Path(source).exists() else Path(source).name
    out = [f"On `{shown}`" + (f" ({split} split)" if split else "") + f": {report.get('n_examples')} examples scored, {report.get('n_generated')} "
           "generated (greedy).", ""]
    out += ["| metric | base | tuned |", "|---|---:|---:|"] if compare else ["| metric | value |", "|---|---:|"]
    for key, label, _ in METRICS:
        if compare and key in report["tuned"]:
            out.append(f"| {label} | {fmt(report['base'].get(key))} | {fmt(report['tuned'][key])} |")
        elif not compare and key in (report.get("metrics") or {}):
            out.append(f"| {label} | {fmt(report['metrics'][key])} |")
    return out


def usage(what: str, ref: str, base: str, base_on_hub: bool, gguf_name: str = "model-f16.gguf") -> list[str]:
    """How to load `what` from `ref` (a repo id, or a local folder name)."""
    local = ref.split("/")[-1]
    get = [f"hf download {ref} --local-dir {local}"] if "/" in ref else []
    base_arg = base if base_on_hub else "BASE_MODEL_DIR"
    if what in ("adapter", "peft"):
        out = ["With mlxtune (Apple silicon, or Linux with MLX):", "", "```bash", *get,
               f"mlxtune generate --model {base_arg} --adapter {local} --prompt \"Hello\"", "```", "",
               "```python", "import mlxtune", f"model, tokenizer = mlxtune.load(\"{base_arg}\", adapter=\"{local}\")", "```"]
        if what == "adapter":
            out += ["", f"As a PEFT or mlx-lm adapter: `mlxtune export {local} --format peft --out {local}-peft` "
                    f"(or `--format mlx-lm`)."]
        else:
            out += ["", "With PEFT (transformers):", "", "```python", "from peft import PeftModel",
                    "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                    f"base = AutoModelForCausalLM.from_pretrained(\"{base_arg}\")",
                    f"model = PeftModel.from_pretrained(base, \"{ref}\")",
                    f"tokenizer = AutoTokenizer.from_pretrained(\"{base_arg}\")", "```"]
        return out
    if what == "mlx-lm":
        return ["With mlx-lm:", "", "```bash", *get,
                f"mlx_lm.generate --model {base_arg} --adapter-path {local} --prompt \"Hello\"", "```", "",
                "```python", "from mlx_lm import load", f"model, tokenizer = load(\"{base_arg}\", adapter_path=\"{local}\")",
                "```", "", f"mlxtune reads it too: `mlxtune generate --model {base_arg} --adapter {local} ...`."]
    if what == "fused":
        return ["With mlx-lm:", "", "```bash", f"mlx_lm.generate --model {ref} --prompt \"Hello\"", "```", "",
                "With transformers:", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
                f"model = AutoModelForCausalLM.from_pretrained(\"{ref}\")",
                f"tokenizer = AutoTokenizer.from_pretrained(\"{ref}\")", "```", "", "With mlxtune:", "", "```bash",
                *get, f"mlxtune generate --model {local} --prompt \"Hello\"", "```"]
    return ["With llama.cpp:", "", "```bash", f"llama-cli -hf {ref}" if "/" in ref else f"llama-cli -m {local}/{gguf_name}",
            "```", "", "With mlxtune:", "", "```bash", *get,
            f"mlxtune generate --model {local}/{gguf_name} --prompt \"Hello\"", "```"]
