"""The quality report of a quantized export: how closely it follows the fp32 export it was made from.

On a fixed set of inputs (quality_texts.txt: 16 news-like documents, written once with
exporter.tiny.trained.synthetic_documents(16, seed=20_000), a seed its training never uses; tokenized with
the export's own tokenizer, so they work for any model) both exports decode greedily and with beams; the
report gives, per mode:

* exact_match: the fraction of inputs whose whole output sequence (up to EOS) is identical;
* token_agreement: position-wise agreement over the fp32 outputs, i.e. the number of positions
  i < len(fp32 output) where both outputs hold the same token, divided by the total fp32 length
  (a quantized output that is shorter, longer or shifted loses the positions it gets wrong);

and, teacher-forced on the fp32 greedy tokens for the first `logit_steps` decode steps, the max
and mean |logit_quantized - logit_fp32| over every vocabulary entry of those steps.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ...runtime.model import Seq2SeqModel

QUALITY_TEXTS = Path(__file__).with_name("quality_texts.txt")


@dataclass(frozen=True)
class ReportSettings:
    num_beams: int = 4
    max_new_tokens: int = 32
    logit_steps: int = 8


def default_texts() -> list[str]:
    return [line for line in QUALITY_TEXTS.read_text().splitlines() if line.strip()]


def quality_report(
    reference: Seq2SeqModel, quantized: Seq2SeqModel, texts: list[str], settings: ReportSettings = ReportSettings()
) -> dict:
    """Compare quantized against reference (the fp32 export) on texts; plain JSON values."""
    input_ids, attention_mask = reference.tokenizer.encode(texts)
    max_new = min(settings.max_new_tokens, reference.manifest.dims.max_position_embeddings - 1)
    report: dict = {"inputs": len(texts), "settings": asdict(settings)}
    greedy_reference = None
    for mode, beams in (("greedy", 1), (f"beam{settings.num_beams}", settings.num_beams)):
        kwargs = {"num_beams": beams, "max_new_tokens": max_new}
        expected = reference.generate(input_ids, attention_mask, **kwargs)
        actual = quantized.generate(input_ids, attention_mask, **kwargs)
        eos = reference.manifest.special_tokens.eos_token_id
        report[mode] = sequence_agreement(expected, actual, eos)
        greedy_reference = expected if beams == 1 else greedy_reference
    report["logits"] = logit_error(reference, quantized, input_ids, attention_mask, greedy_reference, settings)
    return report


def _until_eos(row: np.ndarray, eos: int) -> list[int]:
    tokens = [int(t) for t in row[1:]]  # without the decoder start token
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens


def sequence_agreement(expected: np.ndarray, actual: np.ndarray, eos: int) -> dict:
    """exact_match and token_agreement of actual against expected (see the module docstring)."""
    exact, agreeing, total = 0, 0, 0
    for want_row, got_row in zip(expected, actual):
        want, got = _until_eos(want_row, eos), _until_eos(got_row, eos)
        exact += want == got
        agreeing += sum(w == g for w, g in zip(want, got))
        total += len(want)
    return {"exact_match": exact / len(expected), "token_agreement": agreeing / max(total, 1)}


def logit_error(reference, quantized, input_ids, attention_mask, tokens: np.ndarray, settings: ReportSettings) -> dict:
    """max / mean |logit difference| over the first steps, both models fed the fp32 greedy tokens."""
    steps = min(settings.logit_steps, tokens.shape[1] - 1)
    want = reference.sessions.teacher_forced_logits(input_ids, attention_mask, tokens[:, :steps])
    got = quantized.sessions.teacher_forced_logits(input_ids, attention_mask, tokens[:, :steps])
    eos = reference.manifest.special_tokens.eos_token_id
    # step t counts while its row is unfinished: no EOS among the generated tokens fed so far (1..t)
    fed_eos = np.cumsum(tokens[:, 1:steps] == eos, axis=1)
    live = np.concatenate([np.ones((tokens.shape[0], 1), dtype=bool), fed_eos == 0], axis=1)
    error = np.abs(got - want)[live]
    return {
        "steps": steps,
        "max_abs_error": float(error.max()),
        "mean_abs_error": float(error.mean()),
        "fp32_logit_std": float(want[live].std()),  # the scale the errors compare to
    }


def format_report(report: dict) -> str:
    """The report as a few human-readable lines (what `ortseq quantize` prints)."""
    lines = [f"quality vs fp32 on {report['inputs']} fixed inputs:"]
    for mode in (key for key in report if key.startswith(("greedy", "beam"))):
        stats = report[mode]
        lines.append(
            f"  {mode:7s} exact-sequence match {stats['exact_match']:.3f}, token agreement {stats['token_agreement']:.3f}"
        )
    logits = report["logits"]
    lines.append(
        f"  logits (first {logits['steps']} steps, teacher-forced): max |error| {logits['max_abs_error']:.4f}, "
        f"mean |error| {logits['mean_abs_error']:.4f} (fp32 logit std {logits['fp32_logit_std']:.3f})"
    )
    return "\n".join(lines)


def lowest_agreement(report: dict) -> tuple[str, float]:
    """(mode, token agreement) of the mode that agrees least: what the quality gate checks."""
    modes = [key for key in report if key.startswith(("greedy", "beam"))]
    worst = min(modes, key=lambda mode: report[mode]["token_agreement"])
    return worst, report[worst]["token_agreement"]
