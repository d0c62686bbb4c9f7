"""Shared plumbing: the one hook context manager, seeding, device/dtype, hub access, JSON, plots, texts.

Heavy libraries (torch, transformers, datasets, matplotlib) are imported inside the functions that need
them, so that `python main.py --help` stays fast.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import numbers
import os
import random
import re
import socket
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

logger = logging.getLogger(__name__)

REPO_DIR = Path(__file__).resolve().parent
OFFLINE_TEXTS_PATH = REPO_DIR / "data" / "offline_texts.txt"
DEFAULT_DATASET = ("Salesforce/wikitext", "wikitext-2-v1", "train")


class UserInputError(ValueError):
    """Bad input from the user: main.py prints the message on one line and exits with status 2."""


def expand_path(value, flag: str) -> Path:
    """`value` as a Path with a leading ~ or ~user expanded; UserInputError naming `flag` when that home
    folder is unknown (`~nosuchuser/x`)."""
    try:
        return Path(value).expanduser()
    except RuntimeError:
        raise UserInputError(f"{flag} {value}: {str(value).split('/')[0]} names no known home folder; "
                             "give the path in full") from None


def _is_bool(value) -> bool:
    return isinstance(value, bool) or type(value).__name__ == "bool_"  # Python's or numpy's


def nested(d, *keys, default=None):
    """d[k1][k2]...: `default` where a key is missing or a level is not a dict (results of an older run, or of a
    stage that changed its keys)."""
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return default
        d = d[k]
    return d


def whole_number(name: str, value, low: int | None = None, high: int | None = None, context: str = "") -> int:
    """`value` as an int: an integer (Python or numpy) within low..high (either bound optional). A bool
    and any float (1.5, and 1.0 too: an index or a count is never read from a float) are refused, not
    truncated. `context` is added to the message (e.g. what the bounds come from)."""
    more = f" ({context})" if context else ""
    if _is_bool(value) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} {value!r}: must be a whole number (an int), not {type(value).__name__}{more}")
    value = int(value)
    if (low is not None and value < low) or (high is not None and value > high):
        span = (f"in {low}..{high}" if low is not None and high is not None else
                f"at least {low}" if low is not None else f"at most {high}")
        raise ValueError(f"{name} {value}: must be {span}{more}")
    return value


def finite_number(name: str, value) -> float:
    """`value` as a float: a real number (not a bool, not a string) that is finite."""
    if _is_bool(value) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} {value!r}: must be a finite number, not {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} {value}: must be a finite number")
    return value


def shown(value, spec: str = ".3f") -> str:
    """A number as `spec` formats it, or "undefined" for a measure undefined for its input (None)."""
    return "undefined" if value is None else format(value, spec)


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when the message is empty)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# --------------------------------------------------------------------------------------------------
# Hooks
# --------------------------------------------------------------------------------------------------
class StopForward(Exception):
    """Raised inside a hook to end a forward pass early once everything asked for is captured."""


@dataclass
class Trace:
    """What one hooked module saw in one forward pass (detached clones)."""

    name: str
    input: Any = None  # the module's first positional (or first keyword) input tensor
    output: Any = None  # the module's output; the first element of a tuple output (or the one asked for)
    calls: int = 0


def _first_tensor(value):
    import torch

    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    return value


def _clone(value, index: int | None = None):
    import torch

    value = _first_tensor(value) if index is None else value[index]
    return value.detach().clone() if isinstance(value, torch.Tensor) else value


WRITE_SUFFIX = "#write"  # a trace path "P#write": what module P adds to its input (output − input)


def _replace_first(value, new):
    """`value` (a tensor, or a tuple/list whose first element is one) with its first tensor replaced."""
    if isinstance(value, tuple):
        return (new, *value[1:])
    if isinstance(value, list):
        return [new, *value[1:]]
    return new


def _write_edit(edit_output, path, inp, output):
    """For a write path: (the module's new output, the edited write). The edit sees the write w = output −
    input (as the output's first tensor); its edit w' is added back to the input, out' = input + w', where it
    changed anything, and elsewhere the module's own output is kept bit for bit (input + w rounds)."""
    import torch

    out = _first_tensor(output)
    write = out - inp
    if edit_output is None:
        return output, write
    new = edit_output(path, _replace_first(output, write))
    if new is None:
        return output, write
    edited = _first_tensor(new)
    return _replace_first(output, torch.where(edited == write, out, inp + edited)), edited


@contextlib.contextmanager
def trace(
    model,
    paths: Sequence[str],
    retain_input: bool = False,
    retain_output: bool | int = True,
    edit_output: Callable[[str, Any], Any] | None = None,
    edit_input: Callable[[str, Any], Any] | None = None,
    stop: bool = False,
    check_fired: bool = True,
) -> Iterator[dict[str, Trace]]:
    """Hook the modules at `paths` (their `model.named_modules()` names) for the duration of the block.

    Yields `{path: Trace}`; each Trace holds detached clones of the module's input and/or output from
    the last call (`retain_output` an int: that element of a tuple output, e.g. 1 for the attention
    weights of a Transformer attention module, instead of the first). `edit_output(path, output)` may return a replacement output, `edit_input(path, first
    input)` a replacement first input (interventions; the trace then records the edited values).
    With `stop=True` the forward pass is ended (and the StopForward swallowed) as soon as every hooked
    module has run, so work after the last hooked module is skipped.

    Hooks are registered on enter and removed in `finally`, also when the block raises. A path that
    is not a module raises LookupError before anything is registered; on a normal exit, a hook that
    never fired raises RuntimeError (so a wrong path can never yield silently empty results). A path given
    twice raises ValueError (its hook would run, and its edit apply, twice).

    A path `P#write` (`WRITE_SUFFIX`: a block's write to the residual stream) hooks module P, whose output
    must have its input's shape, and sees what P adds to its input: its Trace's `output` is w = output −
    input (the first tensors), `edit_output(path, w)` edits w and the module then returns input + w' where
    the edit changed anything (its own output, bit for bit, elsewhere). `P` and `P#write` may be traced
    together (two hooks on one module). A write path takes no `edit_input` (edit P's input at path P).
    """
    repeated = sorted({p for p in paths if list(paths).count(p) > 1})
    if repeated:  # a second hook on the same module would apply an edit twice
        raise ValueError(f"trace: path {repeated[0]!r} given more than once; give each module once")
    modules = dict(model.named_modules())

    def module_of(path: str) -> str:
        return path[:-len(WRITE_SUFFIX)] if path.endswith(WRITE_SUFFIX) else path

    missing = [p for p in paths if module_of(p) not in modules]
    if missing:
        raise LookupError(f"no module named {missing} in {type(model).__name__}")
    if edit_input is not None and any(p.endswith(WRITE_SUFFIX) for p in paths):
        raise ValueError(f"trace: edit_input on a {WRITE_SUFFIX} path; edit the module's input at its plain path")
    traces = {p: Trace(p) for p in paths}
    handles = []

    def make_hook(path):
        writes = path.endswith(WRITE_SUFFIX)

        def hook(module, args, kwargs, output):
            t = traces[path]
            t.calls += 1
            first_in = args[0] if args else next(iter(kwargs.values()), None)
            if retain_input:
                t.input = _clone(first_in)
            if writes:
                output, write = _write_edit(edit_output, path, _first_tensor(first_in), output)
                if retain_output is not False:
                    t.output = write.detach().clone()
            else:
                if edit_output is not None:
                    new = edit_output(path, output)
                    output = output if new is None else new
                if retain_output is not False:
                    t.output = _clone(output, None if retain_output is True else retain_output)
            if stop and all(tr.calls for tr in traces.values()):
                raise StopForward
            return output if edit_output is not None else None

        return hook

    def make_pre_hook(path):
        def pre_hook(module, args, kwargs):
            if args:
                return (edit_input(path, args[0]), *args[1:]), kwargs
            key = next(iter(kwargs))
            return args, {**kwargs, key: edit_input(path, kwargs[key])}

        return pre_hook

    try:
        for p in paths:
            module = modules[module_of(p)]
            if edit_input is not None:
                handles.append(module.register_forward_pre_hook(make_pre_hook(p), with_kwargs=True))
            handles.append(module.register_forward_hook(make_hook(p), with_kwargs=True))
        try:
            yield traces
        except StopForward:
            pass
        if check_fired:
            silent = [p for p, t in traces.items() if t.calls == 0]
            if silent:
                raise RuntimeError(f"hooks registered on {silent} never fired during the forward pass")
    finally:
        for h in handles:
            h.remove()


# --------------------------------------------------------------------------------------------------
# Seeding, device, dtype
# --------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def in_float64(model):
    """Inside the block every floating-point parameter and buffer of `model` is float64, converted in place
    (the model takes twice its float32 memory while the block runs; no second copy is held), and blocks
    that keep their residual stream in float32 (`residual_in_fp32`, Mamba's default) keep it in float64. On
    exit each tensor gets back its own dtype, value for value (a float32 or half-precision number is a
    float64 number, so the round trip is exact), and each flag its value, also when the block raises. What
    transformers still computes in float32 inside a float64 model stays so: for Mamba the RMS norms, A =
    −exp(A_log) and the logits' last cast. A mixture of experts runs its plain ("eager") expert loop
    inside (torch's grouped matrix product has no float64), its own implementation restored on exit."""
    import torch

    experts = getattr(model.config, "_experts_implementation", None)
    seen, tensors = set(), []
    for t in (*model.parameters(), *model.buffers()):
        if t.is_floating_point() and id(t) not in seen:  # tied weights once
            seen.add(id(t))
            tensors.append((t, t.dtype))
    flags = [m for m in model.modules() if getattr(m, "residual_in_fp32", None) is True]
    try:
        for t, _ in tensors:
            t.data = t.data.to(torch.float64)
        for m in flags:
            m.residual_in_fp32 = False
        if experts not in (None, "eager"):
            model.set_experts_implementation("eager")
        yield model
    finally:
        for t, dtype in tensors:
            t.data = t.data.to(dtype)
        for m in flags:
            m.residual_in_fp32 = True
        if experts not in (None, "eager"):
            model.set_experts_implementation(experts)


def set_seed(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def free_memory_bytes(device) -> int:
    """Memory free for new tensors now: the GPU's free memory on CUDA, else the host's free pages."""
    import torch

    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = ("float32", "bfloat16", "float16")


def resolve_device(name: str = "auto"):
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserInputError("--device cuda: no CUDA device is available here; use --device cpu")
    if name == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise UserInputError("--device mps: MPS is not available here; use --device cpu")
    if name not in DEVICES:
        raise UserInputError(f"--device {name!r} is unknown; choose one of {', '.join(DEVICES)}")
    return torch.device(name)


def resolve_dtype(name: str = "float32"):
    import torch

    if name not in DTYPES:
        raise UserInputError(f"--dtype {name!r} is unknown; choose one of {', '.join(DTYPES)}")
    return getattr(torch, name)


# --------------------------------------------------------------------------------------------------
# Hub access: decide fast whether the Hugging Face hub can be reached
# --------------------------------------------------------------------------------------------------
_HUB_REACHABLE: bool | None = None


def hub_reachable(timeout: float = 2.0) -> bool:
    """True if a TCP connection to the hub endpoint opens within `timeout` s (cached per process).

    HF_HUB_OFFLINE=1 in the environment means unreachable without trying.
    """
    global _HUB_REACHABLE
    if _HUB_REACHABLE is not None:
        return _HUB_REACHABLE
    if os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
        _HUB_REACHABLE = False
        return False
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    result = [False]

    def probe():
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result[0] = True
        except OSError:
            result[0] = False

    worker = threading.Thread(target=probe, daemon=True)
    worker.start()
    worker.join(timeout + 0.5)  # getaddrinfo has no timeout of its own: never wait on it longer
    _HUB_REACHABLE = result[0]
    logger.info("hub %s:%s reachable: %s", host, port, _HUB_REACHABLE)
    return _HUB_REACHABLE


@contextlib.contextmanager
def hub_offline() -> Iterator[None]:
    """Make huggingface_hub / datasets use only their local caches inside the block (no retries)."""
    import huggingface_hub.constants as hub_constants

    saved_env = os.environ.get("HF_HUB_OFFLINE")
    targets = [hub_constants]
    try:
        import datasets.config as datasets_config

        targets.append(datasets_config)
    except ImportError:
        pass
    saved = [(t, t.HF_HUB_OFFLINE) for t in targets]
    os.environ["HF_HUB_OFFLINE"] = "1"
    for t in targets:
        t.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        for t, value in saved:
            t.HF_HUB_OFFLINE = value
        if saved_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = saved_env


# --------------------------------------------------------------------------------------------------
# JSON and plots, written atomically
# --------------------------------------------------------------------------------------------------
def to_jsonable(value):
    """Plain-Python copy of `value`: numpy/torch scalars and arrays become numbers and lists,
    dataclasses become dicts, Paths become strings, and every NaN/inf becomes None (JSON null)."""
    import dataclasses

    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_jsonable(dataclasses.asdict(value))
    mod = type(value).__module__
    if mod.startswith("torch"):
        import torch

        if isinstance(value, torch.Tensor):
            return to_jsonable(value.detach().cpu().float().tolist() if value.is_floating_point()
                               else value.detach().cpu().tolist())
        if isinstance(value, (torch.dtype, torch.device)):
            return str(value)
    if mod == "numpy":
        import numpy as np

        if isinstance(value, np.ndarray):
            return to_jsonable(value.tolist())
        if isinstance(value, np.generic):
            return to_jsonable(value.item())
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


WRITTEN: list[str] = []  # every file this process has written through _atomic_write, in order


def check_writable_dir(path, flag: str) -> Path:
    """Check, without creating anything, that `path` is a folder this process can write in or create:
    its nearest existing ancestor must be a folder in which a file can be made (probed with a temporary
    file that is removed at once). UserInputError naming `flag` otherwise."""
    p = expand_path(path, flag)
    probe = p
    while not (probe.exists() or probe.is_symlink()) and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        where = "is a file, not a folder" if probe == p else f"cannot be created, {probe} is a file"
        raise UserInputError(f"{flag} {path}: {where}; choose another folder")
    try:
        fd, tmp = tempfile.mkstemp(dir=probe, prefix=".write-check-")
        os.close(fd)
        os.unlink(tmp)
    except OSError as exc:
        what = "cannot write in it" if probe == p else f"cannot be created in {probe}"
        raise UserInputError(f"{flag} {path}: {what} ({exc.strerror or exc}); choose a writable folder") from None
    return p


def _atomic_write(path: Path, write: Callable[[Path], None]) -> Path:
    """Write to a temporary file in the same folder, then rename over `path` (never half-written; no
    temporary file is left behind, also on Ctrl-C or SIGTERM)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    umask = os.umask(0)
    os.umask(umask)
    tmp = None
    try:  # Ctrl-C and SIGTERM (main.py turns it into an exception) end here too: the finally removes tmp
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the permissions of a plain open()
        os.replace(tmp, path)
        WRITTEN.append(str(path))
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
    return path


def write_text(path, text: str) -> Path:
    """Atomically write `text` (UTF-8) to `path`."""
    return _atomic_write(Path(path), lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(path, data) -> Path:
    """Atomically write `data` as strict JSON (NaN/inf as null; see `to_jsonable`)."""
    return write_text(path, json.dumps(to_jsonable(data), indent=2, allow_nan=False) + "\n")


NOT_WRITTEN: list[tuple[str, str]] = []  # (path, reason) of every plot save_figure could not write, in order


def save_figure(fig, plots_dir, name: str) -> str:
    """Atomically save a matplotlib figure as `plots_dir/name.png`, close it, return the path. A plot that
    cannot be written (disk full, folder removed) does not end the stage that drew it: the path and the
    reason are added to `NOT_WRITTEN` (the pipeline moves them into the stage's "plots_not_written"), and
    no file is left at the path."""
    import matplotlib.pyplot as plt

    path = Path(plots_dir) / f"{name}.png"
    try:
        _atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
    except OSError as exc:
        logger.warning("plot %s not written: %s", path, exc)
        NOT_WRITTEN.append((str(path), exc.strerror or first_line(exc)))
    finally:
        plt.close(fig)
    return str(path)


def use_agg_backend() -> None:
    import matplotlib

    matplotlib.use("Agg")


# --------------------------------------------------------------------------------------------------
# Texts
# --------------------------------------------------------------------------------------------------
@dataclass
class TextSet:
    texts: list[str]
    source: str  # "wikitext-2-v1 train (datasets)", "file:PATH" or "offline:PATH"
    warning: str | None = None


LINE_BREAK = re.compile(r"\r\n|\r|\n")  # only these end a line (str.splitlines also splits at U+2028, \f, \x1c, ...)


def read_texts_file(path, flag: str = "--texts_file") -> list[str]:
    """One text per line, UTF-8 (a leading byte-order mark is dropped); lines end at \\n, \\r\\n or \\r
    only (a form feed, U+2028 or any other character stays inside its text); blank lines are skipped.
    A missing, unreadable, non-UTF-8 or empty file, or a folder, -> UserInputError naming it."""
    p = expand_path(path, flag)
    fix = "give a UTF-8 text file with one text per line"
    if p.is_dir():
        raise UserInputError(f"{flag} {path}: is a folder, not a file; {fix}")
    if not p.exists():
        raise UserInputError(f"{flag} {path}: no such file; {fix}")
    if not p.is_file():
        raise UserInputError(f"{flag} {path}: not a regular file; {fix}")
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise UserInputError(f"{flag} {path}: cannot be read ({exc.strerror or exc}); {fix}") from None
    skip = 3 if data.startswith(b"\xef\xbb\xbf") else 0  # a UTF-8 byte-order mark is not text
    try:
        text = data[skip:].decode("utf-8")
    except UnicodeDecodeError as exc:
        pos = exc.start + skip
        line = data.count(b"\n", 0, pos) + 1
        raise UserInputError(f"{flag} {path}: not UTF-8 (byte 0x{data[pos]:02x} at byte position {pos}, line "
                             f"{line}); convert it to UTF-8, e.g. with iconv") from None
    texts = [line.strip() for line in LINE_BREAK.split(text) if line.strip()]
    if not texts:
        raise UserInputError(f"{flag} {path}: the file has no non-blank lines; put one text per line")
    return texts


def text_list(value, what: str = "texts") -> list[str]:
    """`value` as a non-empty list of strings: ValueError for a bare string (which would otherwise be
    read character by character), an empty sequence, or an item that is not a string."""
    if isinstance(value, (str, bytes)):
        raise ValueError(f"{what} must be a list of strings, not a single string; wrap it: [{value[:30]!r}]")
    try:
        items = list(value)
    except TypeError:
        raise ValueError(f"{what} must be a list of strings; got {type(value).__name__}") from None
    if not items:
        raise ValueError(f"{what} is empty; give at least one")
    bad = [type(t).__name__ for t in items if not isinstance(t, str)]
    if bad:
        raise ValueError(f"{what} must be strings; got an item of type {bad[0]}")
    return items


def load_texts(texts_file=None, limit: int = 100) -> TextSet:
    """The analysis texts: `texts_file` if given, else WikiText-2 (v1) train through `datasets`
    (non-blank lines, as the original tool), else the repo's own offline texts with a warning."""
    if limit < 1:
        raise UserInputError(f"--text_limit {limit}: must be at least 1")
    if texts_file is not None:
        return TextSet(read_texts_file(texts_file)[:limit], f"file:{Path(texts_file).resolve()}")
    name, config, split = DEFAULT_DATASET
    try:
        texts = _load_dataset_texts(name, config, split, limit)
        return TextSet(texts, f"{name} {config} {split} (datasets)")
    except (OSError, ImportError, _datasets_error()) as exc:  # unreachable or uncached: say so, use ours
        reason = f"{type(exc).__name__}: {first_line(exc)}"
    warning = (f"default corpus {name}/{config} is not available ({reason[:160]}); "
               f"using the {OFFLINE_TEXTS_PATH.name} texts shipped in the repo instead")
    return TextSet(read_texts_file(OFFLINE_TEXTS_PATH)[:limit], f"offline:{OFFLINE_TEXTS_PATH}", warning)


def _datasets_error():
    try:
        from datasets.exceptions import DatasetsError

        return DatasetsError
    except ImportError:
        return ImportError


def _load_dataset_texts(name, config, split, limit) -> list[str]:
    import datasets

    datasets.logging.set_verbosity_error()
    ctx = contextlib.nullcontext() if hub_reachable() else hub_offline()
    with ctx:
        ds = datasets.load_dataset(name, config, split=split)
    texts = []
    for t in ds["text"]:
        if t.strip():
            texts.append(t.strip())
            if len(texts) >= limit:
                break
    return texts


def check_vocab_ids(ids, vocab: int, what: str) -> None:
    """UserInputError when a token id lies beyond the model's `vocab` embeddings (`what` names the text)."""
    if ids and max(ids) >= vocab:
        raise UserInputError(f"{what} gives token id {max(ids)}, beyond the model's {vocab} embeddings: the "
                             "tokenizer and the model do not belong together")


@dataclass
class TokenizedTexts:
    input_ids: list  # one LongTensor (1, L_i) per text
    n_truncated: int
    max_length: int
    lengths: list[int] = field(default_factory=list)


def tokenize_texts(tokenizer, texts: Sequence[str], max_length: int = 256) -> TokenizedTexts:
    """Tokenize each text on its own (no padding), truncating to `max_length` tokens (a long text is
    tokenized only as far as that needs: `token_prefix`); empty results are an error (a text the
    tokenizer maps to nothing cannot be analysed)."""
    import torch

    if max_length < 1:
        raise UserInputError(f"--max_length {max_length}: must be at least 1")
    ids, n_truncated = [], 0
    for t in text_list(texts):
        kept, truncated = token_prefix(tokenizer, t, max_length)
        if not kept:
            raise UserInputError(f"text {t[:40]!r} tokenizes to no tokens; remove it from the texts")
        n_truncated += truncated
        ids.append(torch.tensor([kept], dtype=torch.long))  # (1, L)
    return TokenizedTexts(ids, n_truncated, max_length, [int(x.shape[1]) for x in ids])


TOKEN_MARGIN = 16  # tokens past max_length that a prefix must give before its first max_length are trusted


def token_prefix(tokenizer, text: str, max_length: int) -> tuple[list[int], bool]:
    """(the first `max_length` token ids of `text`, whether the text has more), without tokenizing more of
    a long text than that needs: a character prefix is tokenized, and doubled until it gives
    `max_length + TOKEN_MARGIN` tokens or is the whole text. The ids are those of the whole text's
    tokenization as long as a tokenization is settled `TOKEN_MARGIN` tokens before a cut (true of the
    byte-level BPE and SentencePiece tokenizers here, whose merges do not reach across that many tokens;
    tested against whole-text tokenization)."""
    n_chars = 8 * (max_length + TOKEN_MARGIN)
    while True:
        piece = text[:n_chars]
        got = tokenizer(piece, add_special_tokens=False)["input_ids"]
        if n_chars >= len(text):
            return list(got[:max_length]), len(got) > max_length
        if len(got) >= max_length + TOKEN_MARGIN:
            return list(got[:max_length]), True
        n_chars *= 2
