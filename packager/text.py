"""``--tokenizer``: a Hugging Face tokenizer.json that travels in the bundle.

The build checks the file loads and encodes, finds the model inputs it fills (by name, or
as ``--tokenizer-input`` says), and decides the length, padding, task, output and pooling
from the model's signature unless told. The result is the manifest's ``text`` section
(``edge_runtime.manifest.TextSpec``), which the device follows (``edge_runtime.text``).
Everything is checked before any recipe runs; each refusal says how to fix the flag.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edge_runtime.manifest import TEXT_INPUT_ROLES, FeedingSpec, TensorSpec, TextSpec

from .errors import DataError

TOKENIZER_MEMBER = "tokenizer/tokenizer.json"
TEXT_TASKS = ("embedding", "classification")
# Without a fixed sequence length or the tokenizer's own truncation: BERT's positions.
DEFAULT_MAX_LENGTH = 512
# Where a model has several outputs, these hold the embedding (pooled ones first).
EMBEDDING_OUTPUTS = (
    "sentence_embedding",
    "text_embeds",
    "embeddings",
    "last_hidden_state",
    "token_embeddings",
)
PAD_TOKENS = ("[PAD]", "<pad>", "<|pad|>", "<unk>")
# The options that only mean something with --tokenizer (None or empty when not given).
TEXT_OPTIONS = (
    "tokenizer_input",
    "text_max_length",
    "text_padding",
    "text_truncation",
    "text_output",
    "pooling",
)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _names(specs: list[TensorSpec]) -> str:
    return ", ".join(spec.describe() for spec in specs) or "none"


def check_text_options(settings: Any) -> None:
    """The text options need --tokenizer (refused, not ignored, without it)."""
    if settings.tokenizer is not None:
        return
    given = [name for name in TEXT_OPTIONS if getattr(settings, name) not in (None, {})]
    if given:
        flags = ", ".join(_flag(name) for name in given)
        raise DataError(f"{flags}: only with --tokenizer tokenizer.json; add it or leave them out")


def load_tokenizer(path: Path):
    """The tokenizer in ``path``, checked to load and encode a sentence.

    Raises:
        DataError: the file is missing, is not a tokenizer.json, or the tokenizers
            library is not installed.
    """
    try:
        import tokenizers
    except ImportError:
        raise DataError(
            "--tokenizer needs the tokenizers library: pip install 'edgepack[text]'"
        ) from None
    path = Path(path)
    if not path.is_file():
        raise DataError(f"--tokenizer {path}: no such file")
    try:
        tokenizer = tokenizers.Tokenizer.from_file(str(path))
        tokenizer.encode("The quick brown fox jumps over the lazy dog.")
    except Exception as exc:  # the Rust side raises bare Exceptions for bad JSON or fields
        problem = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise DataError(
            f"--tokenizer {path} is not a Hugging Face tokenizer.json ({problem}); save one "
            "with tokenizer.save('tokenizer.json') (tokenizers) or "
            "AutoTokenizer.from_pretrained(...).save_pretrained(DIR) (transformers)"
        ) from None
    return tokenizer


def text_spec(
    settings: Any,
    inputs: list[TensorSpec],
    outputs: list[TensorSpec],
    feeding: FeedingSpec | None = None,
    progress=lambda message: None,
) -> TextSpec | None:
    """The manifest's ``text`` section for the model's signature; None without
    ``--tokenizer``.

    Raises:
        DataError: a bad tokenizer file, a role or input name that does not exist, a
            model input neither the tokenizer nor a ``--constant`` fills, a length,
            padding or pooling the model's shapes do not allow, or a task other than
            embedding or classification.
    """
    check_text_options(settings)
    if settings.tokenizer is None:
        return None
    tokenizer = load_tokenizer(settings.tokenizer)
    task = _task(settings)
    roles = _roles(settings, inputs, feeding)
    ids = next(spec for spec in inputs if spec.name == roles["input_ids"])
    max_length, padding = _length_and_padding(settings, ids, tokenizer)
    output = _output(settings, outputs, task)
    pooling = _pooling(settings, output) if task == "embedding" else None
    pad_id, pad_token = _padding_token(tokenizer)
    spec = TextSpec(
        tokenizer=TOKENIZER_MEMBER,
        inputs=roles,
        max_length=max_length,
        padding=padding,
        truncation=settings.text_truncation is not False,
        pad_id=pad_id,
        pad_token=pad_token,
        task=task,
        output=output.name,
        pooling=pooling,
    )
    filled = ", ".join(f"{name} ({role})" for role, name in roles.items())
    what = {
        None: f"scores from {output.name}",
        "pooled": f"the model's pooled {output.name}",
    }.get(pooling, f"{pooling} pooling of {output.name}")
    progress(
        f"text: {Path(settings.tokenizer).name} fills {filled}; up to {max_length} tokens, "
        f"padded to {padding}; {task}: {what}"
    )
    return spec


def _task(settings: Any) -> str:
    if settings.task in TEXT_TASKS:
        return settings.task
    if settings.task == "auto":
        return "embedding"
    raise DataError(
        f"--tokenizer with --task {settings.task}: the device takes text for --task "
        "embedding or --task classification; pick one, or leave --tokenizer out"
    )


def _roles(settings: Any, inputs: list[TensorSpec], feeding: FeedingSpec | None) -> dict:
    by_name = {spec.name: spec for spec in inputs}
    signature = f"the model's inputs: {_names(inputs)}"
    roles: dict[str, str] = {}
    for role, name in settings.tokenizer_input.items():
        flag = f"--tokenizer-input {role}={name}"
        if role not in TEXT_INPUT_ROLES:
            raise DataError(f"{flag}: the tokenizer gives {', '.join(TEXT_INPUT_ROLES)}")
        if name not in by_name:
            raise DataError(f"{flag}: the model has no input {name!r}; {signature}")
        roles[role] = name
    for role in TEXT_INPUT_ROLES:
        if role not in roles and role in by_name and role not in roles.values():
            roles[role] = role
    if "input_ids" not in roles:
        raise DataError(
            f"--tokenizer: no model input is named input_ids; {signature}. Name the one "
            "that takes token ids with --tokenizer-input input_ids=INPUT"
        )
    constants = set(feeding.constants) if feeding else set()
    taken = list(roles.values())
    twice = sorted({name for name in taken if taken.count(name) > 1})
    if twice:
        raise DataError(f"--tokenizer-input: input {twice[0]!r} is named for two roles")
    for spec in inputs:
        if spec.name not in taken and spec.name not in constants:
            raise DataError(
                f"--tokenizer: input {spec.describe()} is filled neither by the tokenizer nor "
                f"by a --constant; give --tokenizer-input ROLE={spec.name} or "
                f"--constant {spec.name}=VALUE"
            )
        if spec.name in taken and (len(spec.shape) != 2 or "int" not in spec.dtype):
            raise DataError(
                f"--tokenizer: input {spec.describe()} cannot take tokens, which are integers "
                "[batch, tokens]"
            )
    return roles


def _length_and_padding(settings: Any, ids: TensorSpec, tokenizer) -> tuple[int, str]:
    fixed = ids.shape[1] if isinstance(ids.shape[1], int) else None
    if fixed is not None:
        if settings.text_max_length not in (None, fixed):
            raise DataError(
                f"--text-max-length {settings.text_max_length}: input {ids.describe()} takes "
                f"exactly {fixed} tokens; leave the flag out or give {fixed}"
            )
        if settings.text_padding == "longest":
            raise DataError(
                f"--text-padding longest: input {ids.describe()} takes exactly {fixed} "
                "tokens, so every text is padded to that length; leave the flag out"
            )
        return fixed, "max_length"
    own = (tokenizer.truncation or {}).get("max_length")
    max_length = settings.text_max_length or own or DEFAULT_MAX_LENGTH
    return int(max_length), settings.text_padding or "longest"


def _output(settings: Any, outputs: list[TensorSpec], task: str) -> TensorSpec:
    by_name = {spec.name: spec for spec in outputs}
    if settings.text_output is not None:
        if settings.text_output not in by_name:
            raise DataError(
                f"--text-output {settings.text_output}: the model has no output of that name; "
                f"the model's outputs: {_names(outputs)}"
            )
        return by_name[settings.text_output]
    if len(outputs) == 1:
        return outputs[0]
    if task == "embedding":
        for name in EMBEDDING_OUTPUTS:
            if name in by_name:
                return by_name[name]
    raise DataError(
        f"--tokenizer: the model has {len(outputs)} outputs ({_names(outputs)}); name the one "
        f"holding the {task} with --text-output NAME"
    )


def _pooling(settings: Any, output: TensorSpec) -> str:
    rank = len(output.shape)
    if "float" not in output.dtype or rank not in (2, 3):
        raise DataError(
            f"--tokenizer: output {output.describe()} cannot hold an embedding, which is "
            "float [batch, dim] (pooled) or [batch, tokens, dim]; pick another with "
            "--text-output NAME"
        )
    chosen = settings.pooling or ("pooled" if rank == 2 else "mean")
    if (chosen == "pooled") != (rank == 2):
        needs = "[batch, dim]" if chosen == "pooled" else "[batch, tokens, dim]"
        raise DataError(
            f"--pooling {chosen} needs an output {needs}, but {output.describe()} is not; "
            f"leave --pooling out for {'pooled' if rank == 2 else 'mean'}"
        )
    return chosen


def _padding_token(tokenizer) -> tuple[int, str]:
    """The tokenizer's own padding token, else the first of ``PAD_TOKENS`` it knows, else
    id 0 (padding positions are masked out, so any id serves)."""
    own = tokenizer.padding
    if own:
        return int(own["pad_id"]), str(own["pad_token"])
    for token in PAD_TOKENS:
        found = tokenizer.token_to_id(token)
        if found is not None:
            return int(found), token
    return 0, tokenizer.id_to_token(0) or "[PAD]"
