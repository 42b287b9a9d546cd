"""Generation settings, declared once: transformers' generation_config fields that ortseq honours.

`GenerationSettings` is the table: one dataclass field per setting, with transformers' name, default
and meaning, and metadata saying how to check a value, what to tell users and how the CLI spells it.
Everything else is derived from it:

- the manifest's `generation` section (a GenerationSettings, written at export),
- the search settings (runtime/search.py's SearchSettings adds the special token ids),
- the keywords `Seq2SeqModel.generate()`/`summarize()` accept (`resolve_settings` checks them),
- the HTTP request's `parameters` (runtime/serving/schema.py builds its pydantic model from here),
- the flags of `ortseq generate` (`add_generation_arguments`, `generation_overrides`).

Fields of a checkpoint's generation config that would change the tokens and that ortseq does not
honour are listed in REFUSED; export refuses them by name (see `settings_from_generation_config`).
Plain Python: the exporter and the runtime both read this module, and neither needs torch for it.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any, Literal

PROMPT_LEN = 1  # an encoder-decoder's decoder starts from one token: decoder_start_token_id
DEFAULT_NEW_TOKENS = 20  # transformers' max_length default, counted in new tokens (see resolve_settings)


class GenerationSettingError(ValueError):
    """A generation setting has a value ortseq cannot honour; the message names it."""


# ---- checks: each takes (name, value, vocab_size) and returns the value in its canonical form ----


def _integer(minimum: int, optional: bool = False) -> Callable:
    def check(name: str, value, vocab_size: int | None):
        if value is None and optional:
            return None
        if isinstance(value, bool) or not _is_int(value) or value < minimum:
            raise GenerationSettingError(f"{name} must be an integer of at least {minimum}, got {value!r}")
        return int(value)

    return check


def _number(positive: bool = False) -> Callable:
    def check(name: str, value, vocab_size: int | None):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise GenerationSettingError(f"{name} must be a finite number, got {value!r}")
        if positive and value <= 0:
            raise GenerationSettingError(f"{name} must be larger than 0, got {value!r}")
        return float(value)

    return check


def _boolean(name: str, value, vocab_size: int | None):
    if not isinstance(value, bool):
        raise GenerationSettingError(f"{name} must be true or false, got {value!r}")
    return value


def _early_stopping(name: str, value, vocab_size: int | None):
    if value not in (True, False, "never") or not isinstance(value, (bool, str)):
        raise GenerationSettingError(f"{name} must be true, false or 'never', got {value!r}")
    return value


def _token(name: str, value, vocab_size: int | None):
    if value is None:
        return None
    if isinstance(value, bool) or not _is_int(value) or value < 0 or (vocab_size is not None and value >= vocab_size):
        raise GenerationSettingError(f"{name} must be a token id in [0, {vocab_size or 'vocab'}), got {value!r}")
    return int(value)


def _tokens(name: str, value, vocab_size: int | None):
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)) or not value:
        raise GenerationSettingError(f"{name} must be a non-empty list of token ids, got {value!r}")
    return tuple(_token(name, token, vocab_size) for token in value)


def _token_lists(name: str, value, vocab_size: int | None):
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)) or not value:
        raise GenerationSettingError(f"{name} must be a non-empty list of lists of token ids, got {value!r}")
    return tuple(_tokens(name, sequence, vocab_size) for sequence in value)


def _is_int(value) -> bool:
    return isinstance(value, int) or type(value).__name__ in {"int64", "int32", "int16", "int8", "uint8", "intc"}


# ---- how the CLI spells each kind of value ----


def _comma_ints(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated token ids like 5,17,42, got {text!r}") from None


def _json_token_lists(text: str) -> list:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise argparse.ArgumentTypeError(f"expected JSON like [[5, 17], [42]], got {text!r}") from None


_FLAG_TYPES = {"int": int, "float": float, "tokens": _comma_ints, "token_lists": _json_token_lists}


def _setting(default, check: Callable, help: str, flag: str, json_type: Any) -> Any:
    """One row of the table. flag: "int", "float", "bool", "tokens" (5,17,42) or "token_lists" (JSON)."""
    return field(default=default, metadata={"check": check, "help": help, "flag": flag, "json_type": json_type})


@dataclass(frozen=True)
class GenerationSettings:
    """transformers' generation_config fields that ortseq honours, with transformers' defaults.

    max_length None means the checkpoint leaves it unset: transformers then generates up to 20 new
    tokens (its default of 20 grows by the decoder start). Token lists are tuples (hashable).
    Every field can also be set per call (generate(), summarize(), CLI, HTTP).
    """

    num_beams: int = _setting(1, _integer(1), "beams (1 = greedy)", "int", int)
    max_new_tokens: int | None = _setting(None, _integer(1, optional=True), "most tokens to generate", "int", int)
    max_length: int | None = _setting(
        None,
        _integer(PROMPT_LEN + 1, optional=True),
        "most decoder tokens, the start token included (max_new_tokens wins when both are set)",
        "int",
        int,
    )
    min_new_tokens: int | None = _setting(
        None, _integer(0, optional=True), "fewest tokens before the end token is allowed", "int", int
    )
    min_length: int = _setting(
        0, _integer(0), "fewest decoder tokens (start included) before the end token (min_new_tokens wins)", "int", int
    )
    length_penalty: float = _setting(
        1.0, _number(), "beam score exponent on length, as in transformers", "float", float
    )
    early_stopping: bool | str = _setting(
        False, _early_stopping, "beam search stopping rule: true, false or 'never'", "bool", bool | Literal["never"]
    )
    no_repeat_ngram_size: int = _setting(0, _integer(0), "forbid repeating n-grams of this size (0 = off)", "int", int)
    encoder_no_repeat_ngram_size: int = _setting(
        0, _integer(0), "forbid n-grams of this size that occur in the input (0 = off)", "int", int
    )
    repetition_penalty: float = _setting(
        1.0, _number(positive=True), "divide positive / multiply negative scores of generated tokens", "float", float
    )
    encoder_repetition_penalty: float = _setting(
        1.0, _number(positive=True), "favour (> 1) or avoid (< 1) tokens of the input", "float", float
    )
    bad_words_ids: tuple[tuple[int, ...], ...] | None = _setting(
        None, _token_lists, "token sequences never to generate, e.g. [[5, 17], [42]]", "token_lists", list[list[int]]
    )
    suppress_tokens: tuple[int, ...] | None = _setting(
        None, _tokens, "token ids never to generate, e.g. 5,17,42", "tokens", list[int]
    )
    begin_suppress_tokens: tuple[int, ...] | None = _setting(
        None, _tokens, "token ids not to generate first (after a forced first token)", "tokens", list[int]
    )
    forced_bos_token_id: int | None = _setting(None, _token, "token forced as the first generated one", "int", int)
    forced_eos_token_id: int | None = _setting(None, _token, "token forced at the last position", "int", int)
    remove_invalid_values: bool = _setting(False, _boolean, "replace inf/nan scores by finite ones", "bool", bool)
    num_return_sequences: int = _setting(
        1, _integer(1), "hypotheses returned per input (at most num_beams)", "int", int
    )

    def checked(self, vocab_size: int | None = None) -> GenerationSettings:
        """These settings with every value checked and in canonical form (GenerationSettingError names a bad one)."""
        return type(self)(**{f.name: f.metadata["check"](f.name, getattr(self, f.name), vocab_size) for f in _table()})


def _table():
    return fields(GenerationSettings)


SETTING_NAMES: tuple[str, ...] = tuple(f.name for f in _table())


def setting_help(name: str) -> str:
    return next(f.metadata["help"] for f in _table() if f.name == name)


def json_types() -> dict[str, tuple[Any, str]]:
    """name -> (JSON value type, help) for request schemas; None always means "the model's default"."""
    return {f.name: (f.metadata["json_type"], f.metadata["help"]) for f in _table()}


def from_json(values: dict) -> GenerationSettings:
    """A manifest's generation section; fields it lacks (older manifests) take transformers' defaults."""
    unknown = set(values) - set(SETTING_NAMES)
    if unknown:
        raise GenerationSettingError(f"unknown generation settings {sorted(unknown)}")
    return GenerationSettings(**values).checked()


def resolve_settings(
    defaults: GenerationSettings, overrides: dict, vocab_size: int, max_positions: int
) -> GenerationSettings:
    """One call's settings: the overrides that are not None on top of the model's defaults, checked,
    with the lengths resolved as transformers 5.x's `_prepare_generated_length` does:

    - max_length becomes the total decoder length: PROMPT_LEN + max_new_tokens when max_new_tokens is
      set (call or model; it wins over max_length), else max_length when the call or the model sets it,
      else transformers' default of 20 grown by the decoder start (20 new tokens), capped at the positions.
    - min_length likewise: PROMPT_LEN + min_new_tokens when min_new_tokens is set, else min_length.
    max_new_tokens and min_new_tokens are then None: the lengths say everything.
    """
    unknown = set(overrides) - set(SETTING_NAMES)
    if unknown:
        raise GenerationSettingError(f"unknown generation settings {sorted(unknown)}; known: {list(SETTING_NAMES)}")
    merged = dict(_as_dict(defaults)) | {name: value for name, value in overrides.items() if value is not None}
    settings = GenerationSettings(**merged).checked(vocab_size)
    if settings.max_new_tokens is not None:
        max_length = PROMPT_LEN + settings.max_new_tokens
    elif settings.max_length is not None:
        max_length = settings.max_length
    else:
        max_length = min(DEFAULT_NEW_TOKENS + PROMPT_LEN, max_positions)
    min_length = settings.min_length if settings.min_new_tokens is None else PROMPT_LEN + settings.min_new_tokens
    if settings.min_new_tokens is not None and settings.min_new_tokens > max_length - PROMPT_LEN:
        raise GenerationSettingError(
            f"min_new_tokens ({settings.min_new_tokens}) is larger than max_new_tokens ({max_length - PROMPT_LEN})"
        )
    if max_length > max_positions:
        raise GenerationSettingError(
            f"max_new_tokens ({max_length - PROMPT_LEN}) is more than the model's "
            f"{max_positions - PROMPT_LEN} decoder positions allow"
        )
    for forced in ("forced_bos_token_id", "forced_eos_token_id"):  # transformers refuses these too
        if getattr(settings, forced) is not None and getattr(settings, forced) in (settings.suppress_tokens or ()):
            raise GenerationSettingError(
                f"{forced} ({getattr(settings, forced)}) is also in suppress_tokens: forcing a suppressed token "
                "leaves nothing to generate; to keep the end token away early, use min_new_tokens"
            )
    if settings.num_return_sequences > settings.num_beams:
        raise GenerationSettingError(
            f"num_return_sequences ({settings.num_return_sequences}) must not exceed num_beams ({settings.num_beams})"
        )
    return _replace(settings, max_length=max_length, min_length=min_length, max_new_tokens=None, min_new_tokens=None)


def non_default(settings: GenerationSettings, names) -> list[str]:
    """Which of these settings differ from transformers' defaults."""
    defaults = GenerationSettings()
    return [name for name in names if getattr(settings, name) != getattr(defaults, name)]


def _as_dict(settings: GenerationSettings) -> dict:
    return {name: getattr(settings, name) for name in SETTING_NAMES}


def _replace(settings: GenerationSettings, **changes) -> GenerationSettings:
    return type(settings)(**(_as_dict(settings) | changes))


# ---- the command line ----


def add_generation_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per setting (`--num-beams`, `--bad-words-ids '[[5, 17]]'`, `--suppress-tokens 5,17`, ...);
    a flag left out takes the model's default."""
    group = parser.add_argument_group("generation settings (default: the model's generation config)")
    for f in _table():
        flag, help = "--" + f.name.replace("_", "-"), f.metadata["help"]
        if f.metadata["flag"] == "bool":
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help)
        else:
            group.add_argument(flag, dest=f.name, type=_FLAG_TYPES[f.metadata["flag"]], help=help)


def generation_overrides(args: argparse.Namespace) -> dict:
    """The settings given on the command line, as keyword arguments of Seq2SeqModel.generate()."""
    return {name: getattr(args, name) for name in SETTING_NAMES if getattr(args, name, None) is not None}


# ---- a checkpoint's generation config ----


def _set(value) -> bool:
    return value is not None and value is not False


def _differs(default) -> Callable[[Any], bool]:
    return lambda value: value is not None and value != default


# Fields of transformers' GenerationConfig that change greedy or beam-search tokens and that ortseq does
# not honour: field -> when its value matters. Sampling knobs (temperature, top_k, top_p, min_p, top_h,
# typical_p, epsilon_cutoff, eta_cutoff) only matter with do_sample, refused itself. Fields that do not
# change the tokens (use_cache, cache_*, output_*, return_dict_in_generate, compile_config, token ids,
# which the model family reads) are not listed.
REFUSED: dict[str, Callable[[Any], bool]] = {
    "do_sample": _set,
    "num_beam_groups": _differs(1),
    "diversity_penalty": _differs(0.0),
    "penalty_alpha": _differs(0.0),  # contrastive search
    "dola_layers": _set,
    "constraints": _set,
    "force_words_ids": _set,
    "sequence_bias": _set,
    "exponential_decay_length_penalty": _set,
    "renormalize_logits": _set,
    "guidance_scale": _differs(1.0),
    "watermarking_config": _set,
    "low_memory": _set,
    "stop_strings": _set,
    "max_time": _set,
    "token_healing": _set,
    "use_mtp": _set,  # assisted decoding
    "prompt_lookup_num_tokens": _set,
    "assistant_early_exit": _set,
}


def settings_from_generation_config(config: dict) -> tuple[GenerationSettings, dict]:
    """The table's fields from a checkpoint's generation config (GenerationConfig.to_dict() of
    transformers 5.x, where unset fields are None), and the refused fields it sets: {name: value}.
    None and absent fields take transformers' defaults; max_length stays None when unset."""
    refused = {name: config[name] for name, matters in REFUSED.items() if matters(config.get(name))}
    values = {name: config[name] for name in SETTING_NAMES if config.get(name) is not None}
    forced_eos = values.get("forced_eos_token_id")
    if isinstance(forced_eos, (list, tuple)):  # transformers takes a list; ortseq honours a single id
        if len(set(forced_eos)) == 1:
            values["forced_eos_token_id"] = forced_eos[0]
        else:
            refused["forced_eos_token_id"] = values.pop("forced_eos_token_id")
    return GenerationSettings(**values).checked(), refused
