"""The text pass: each text through the model once, plus once more with a backward where a stage needs a
gradient, with every site that the run's text stages declare; each stage reads what it declared, text by
text, and keeps only its running statistics.

Shapes: one text at a time (b = 1), L tokens, d the model width, e the units of a layer.

A text stage gives a *reader* (`TextReader`): its `request` (`TextRequest`: the layers whose Mamba mixer
input and real output, Transformer attention weights and values, neuron-site activations, and unit-output
gradients it reads), `read(text)` called with each text's `TextCapture`, and `finish()` for its results.
`run_text_pass` merges the requests of every reader and, per text, runs
1. the capture forward (no gradient): the model's own forward with hooks on every requested site,
   stopped after the deepest one. On Mamba-1 / FalconMamba the mixers in which nothing is read run
   `ssm.blocked_inference` (transformers' operations, cache-blocked; on the first text each is checked
   against the mixer's own forward on the same input); a Transformer runs eager attention where attention
   weights are read;
2. the gradient forward (only when a reader asks for gradients): one forward and one backward for every
   requested layer at once (`gradient_pass`), whose neuron sites are read too when their check passes (below).
So each text is embedded at most twice per model, with one layer or many.

**Where the neuron sites are read.** With a gradient forward, the sites are read from it (it runs other
float32 kernels: Mamba's fast scan), after the first text's are checked against its capture forward (the
model's own forward, taken deep enough for that text): they must agree within `SITE_TOLERANCE` (relative
to each layer's largest |a|); otherwise every text's sites come from the capture forward. Without a
gradient forward they come from the capture forward, whose mixers at those layers run their own forward.

A reader that raises is dropped (its error recorded, `TextPassResult.errors`); the other readers go on. A
forward that raises fails the readers that needed it (`run_text_pass`), and later texts' passes serve only
the readers left.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Protocol

import torch

logger = logging.getLogger(__name__)

# How far the neuron sites of another forward path (the gradient forward's fast scan, the blocked forward)
# may be from the model's own forward's (relative to a layer's largest |a|) for them to be used: their scans'
# rounding grows through the layers above (at mamba-130m's shape, random init, 24 layers, 256 tokens: about
# 4e-4 (fast scan) and 2e-4 (blocked) at the deepest layers, 1e-7 at layer 0).
SITE_TOLERANCE = 1e-3


@dataclass(frozen=True)
class TextRequest:
    """What a text stage reads from each text (layer sets)."""

    mixer_io: frozenset = frozenset()  # Mamba mixers: (input, real output) (1, L, d) each
    attention_io: frozenset = frozenset()  # Transformer attention: (A (1, H, L, L), values (1, H, L, d/H),
    # out_proj input (1, L, d), out_proj output (1, L, d)), under eager attention
    sites: frozenset = frozenset()  # the neuron site (`sparsity.neuron_site`): (L, N) float32 numpy
    gradient: frozenset = frozenset()  # ∂ target / ∂ (the input of `adapter.gradient_path(layer)`)
    target: str | None = None  # what the gradient is of (TARGETS); None: the reader reads no gradient

    def __or__(self, other: "TextRequest") -> "TextRequest":
        if self.target and other.target and self.target != other.target:
            raise ValueError(f"two readers ask for gradients of different targets ({self.target}, {other.target}); "
                             "the text pass has one gradient forward")
        return TextRequest(*(getattr(self, f) | getattr(other, f) for f in ("mixer_io", "attention_io", "sites",
                                                                             "gradient")),
                           target=self.target or other.target)


@dataclass
class TextCapture:
    """One text's captures: what the run's readers asked for."""

    index: int  # the text's position in the run
    ids: torch.Tensor  # (1, L) on the model's device
    mixer_io: dict = field(default_factory=dict)  # {layer: (input, output)}
    attention_io: dict = field(default_factory=dict)  # {layer: (A, values, y, out)}
    sites: dict = field(default_factory=dict)  # {layer: (L, N) numpy}
    gradients: dict = field(default_factory=dict)  # {layer: (1, L, ·)}, or {layer: None} where the target is undefined
    target: dict | None = None  # what the gradients are of (`gradient_pass`'s record of this text)
    sites_from: str | None = None  # which forward `sites` come from, and how it was checked


class TextReader(Protocol):
    request: TextRequest

    def read(self, text: TextCapture) -> None: ...

    def finish(self): ...


@dataclass
class TextPassResult:
    results: dict  # {reader name: what its finish() returned}
    errors: dict  # {reader name: "Type: message"} for the readers that raised
    sites_from: str | None  # where the neuron sites were read (for the sparsity stage's "measured_in")
    forwards: int  # model forwards run (capture and gradient forwards)
    wall_time_s: float  # the whole pass, forwards and reading
    read_s: dict  # {reader name: seconds in its read() and finish()}


def _site_paths(adapter, layers) -> dict:
    from sparsity import site_map

    return site_map(adapter, sorted(layers))


@contextlib.contextmanager
def _reading_sites(model, sites: dict, out: dict):
    """Hooks on the neuron sites ({layer: models.Site}); `out` gets {layer: (L, N) float32 numpy}."""
    from sparsity import tracing_sites

    if not sites:
        yield
        return
    with tracing_sites(model, sites, out):
        yield


def capture_forward(model, adapter, ids, mixer_io=(), attention_io=(), sites=(), check_blocked: bool = False
                    ) -> TextCapture:
    """Step 1 for one text `ids` (1, L): the model's own forward with hooks on the requested sites,
    stopped after the deepest (see the module doc). On Mamba-1 / FalconMamba the mixers in which nothing
    is read run `ssm.mixer_forward_blocked`; `check_blocked` (the first text): each of those mixers' output
    is compared with the mixer's own forward on the same input (ReconstructionError beyond 1e-5 of its
    largest |value| in float32 / float64, 1e-2 in half precision)."""
    from ssm import blocked_inference
    from utils import trace

    text = TextCapture(-1, ids)
    layers = {*mixer_io, *attention_io, *sites}
    if not layers:
        return text
    deepest = max(layers)
    site_map = _site_paths(adapter, sites)
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.no_grad())
        if adapter.blocked_forward:  # mixers in which nothing is read run cache-blocked
            idle = [la for la in range(deepest + 1) if la not in mixer_io and la not in sites]
            if idle:
                stack.enter_context(_checked_blocked(model, idle) if check_blocked
                                    else blocked_inference(model, layers=idle))
        mixers = {la: adapter.mixer_path(la) for la in sorted(mixer_io)}
        mio = stack.enter_context(trace(model, list(mixers.values()), retain_input=True)) if mixers else {}
        paths = {la: adapter.attention_paths(la) for la in sorted(attention_io)}
        if paths:
            stack.enter_context(adapter.eager_attention())
            weights = stack.enter_context(trace(model, [p.attention for p in paths.values()], retain_output=1))
            tr = stack.enter_context(trace(model, [q for p in paths.values() for q in (p.qkv, p.out_proj)],
                                           retain_input=True))
        stack.enter_context(_reading_sites(model, site_map, text.sites))
        # entered last, so that its StopForward ends the forward after every other hook has fired
        stack.enter_context(trace(model, [adapter.layer_path(deepest)], retain_output=False, stop=True))
        model(input_ids=ids, use_cache=False)
    text.mixer_io = {la: (mio[p].input, mio[p].output) for la, p in mixers.items()}
    text.attention_io = {la: (weights[p.attention].output, adapter.split_values(tr[p.qkv].output),
                              tr[p.out_proj].input, tr[p.out_proj].output) for la, p in paths.items()}
    return text


def _checked_blocked(model, layers):
    """`ssm.blocked_inference` at `layers`, each mixer's blocked output checked against its own forward."""
    import ssm

    def checked(mixer, hidden_states, cache_params=None, attention_mask=None, **kwargs):
        out = ssm.mixer_forward_blocked(mixer, hidden_states, attention_mask=attention_mask)
        own = type(mixer).forward(mixer, hidden_states, attention_mask=attention_mask)
        worst = float((out - own).abs().max() / own.abs().max().clamp_min(1e-30))
        tolerance = 1e-5 if own.dtype in (torch.float32, torch.float64) else 1e-2
        if worst > tolerance:
            raise ssm.ReconstructionError(f"the blocked mixer forward differs from the mixer's own by {worst:.3g} "
                                          f"(relative) > {tolerance:g}")
        return out

    return ssm.swapped_mixer_forward(model, checked, layers)


# What a gradient can be of: {name: definition} (the attention stage's --attention_target).
TARGETS = {
    "likelihood": "sum over positions t = 0..L-2 of log p(x_{t+1} | x_<=t): the text's own log-likelihood of its "
                  "next tokens (natural log), every query position a target; undefined for a one-token text",
    "last_argmax": "log p(v* | x) at the last position, v* its most probable next token: one target token, so the "
                   "gradient is concentrated on the last positions and the score depends on the text's length and "
                   "on a token that may be one of several near-equally likely ones",
}
DEFAULT_TARGET = "likelihood"
TARGET_UNDEFINED = {"likelihood": "undefined: the likelihood target needs a text of at least 2 tokens (a one-token "
                                  "text has no next token of its own)"}


def check_target(target: str) -> str:
    if target not in TARGETS:
        raise ValueError(f"target {target!r}: choose one of {', '.join(TARGETS)}")
    return target


def target_value(logits: torch.Tensor, ids: torch.Tensor, target: str) -> tuple[torch.Tensor, list[dict]]:
    """(the scalar the gradient is of: the target summed over the batch, per-example records) from the
    logits (b, L', V) of `ids` (b, L) (L' = L, or 1 for `last_argmax`, which reads the last position only).
    Records: likelihood {"target", "n_tokens" (L − 1), "mean_logp" (nats per predicted token)};
    last_argmax {"target", "token_id", "p"}. None for an undefined target (`TARGET_UNDEFINED`)."""
    logp = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), -1)  # (b, L', V)
    if check_target(target) == "last_argmax":
        last = logp[:, -1]  # (b, V)
        top = last.argmax(-1)  # (b,)
        chosen = last.gather(1, top[:, None])[:, 0]  # (b,)
        return chosen.sum(), [{"target": target, "token_id": int(t), "p": float(v.exp())}
                              for t, v in zip(top.tolist(), chosen.detach())]
    if ids.shape[1] < 2:
        return None, [{"target": target, "undefined": TARGET_UNDEFINED[target]} for _ in range(ids.shape[0])]
    own = logp[:, :-1].gather(2, ids[:, 1:, None])[..., 0]  # (b, L − 1): log p(x_{t+1} | x_<=t)
    return own.sum(), [{"target": target, "n_tokens": int(ids.shape[1] - 1), "mean_logp": float(v)}
                       for v in own.detach().mean(1)]


def gradient_pass(model, adapter, ids, layers, sites=(), target: str = DEFAULT_TARGET
                  ) -> tuple[dict, list[dict], dict]:
    """Step 2 for `ids` (b, L; one text in the text pass): ({layer: g (b, L, e)}, per-example target records
    (`target_value`), {layer: site (L, N)}), g = ∂ T / ∂ y with y the layer's unit outputs (every layer's g
    from one backward: a y below another is differentiated through it) and T the `target` (TARGETS) summed
    over the batch; where T is undefined (the likelihood of a one-token text) every g is None and the
    record says why. Mamba-1 / FalconMamba: every mixer runs the fast scan (`ssm.mixer_forward`: the same
    recurrence, tested against the reference scan) for its cheap backward, and y is its float32 scan output
    before the gate. Mamba-2 and Transformers: y is the first input of `adapter.gradient_path(layer)` (the
    gated norm; the attention's output projection). Where y needs no gradient of its own (below every
    differentiated layer) it becomes a leaf. The weights leave the graph for this pass and get their
    requires_grad back afterwards, also on error. `sites`: layers whose neuron site is read here."""
    import ssm
    from utils import trace

    check_target(target)
    layers = sorted(set(layers))
    seen = {}

    def leaf(layer, y):
        y = y if y.requires_grad else y.detach().requires_grad_(True)
        seen[layer] = y
        return y

    if adapter.blocked_forward:
        chosen = {id(adapter.mixer(la)): la for la in layers}

        def fast(mixer, hidden_states, cache_params=None, attention_mask=None, **kwargs):
            la = chosen.get(id(mixer))
            return ssm.mixer_forward(mixer, hidden_states, attention_mask,
                                     on_y=None if la is None else (lambda y: leaf(la, y)))

        swap, hooks = ssm.swapped_mixer_forward(model, fast), contextlib.nullcontext()
    else:
        paths = {adapter.gradient_path(la): la for la in layers}
        swap = contextlib.nullcontext()
        hooks = trace(model, list(paths), retain_output=False, edit_input=lambda p, v: leaf(paths[p], v))
    site_out = {}
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    keep = 1 if target == "last_argmax" else 0  # 0: every position's logits
    try:
        with torch.enable_grad(), swap, hooks, _reading_sites(model, _site_paths(adapter, sites), site_out):
            logits = model(input_ids=ids, use_cache=False, logits_to_keep=keep).logits  # (b, L or 1, V)
        missing = [la for la in layers if la not in seen]
        if missing:
            raise RuntimeError(f"the gradient forward never reached layer {missing[0]}'s unit outputs")
        value, records = target_value(logits, ids, target)
        grads = (dict.fromkeys(layers) if value is None else
                 {la: g.detach() for la, g in zip(layers, torch.autograd.grad(value, [seen[la] for la in layers]))})
    finally:
        for p in frozen:
            p.requires_grad_(True)
    return grads, records, site_out


def site_difference(reference: dict, other: dict) -> float:
    """The largest |other − reference| over the layers of `reference` ({layer: (L, N)}), relative to each
    layer's largest |reference|."""
    import numpy as np

    return max(float(np.abs(other[la] - a).max() / max(float(np.abs(a).max()), 1e-30)) for la, a in reference.items())


def site_tolerance(model) -> float:
    """SITE_TOLERANCE for a float32 model, 1e-9 for a float64 one (both paths then compute in float64), 1e-2
    in half precision (the model's own rounding)."""
    dtype = next(model.parameters()).dtype
    return {torch.float32: SITE_TOLERANCE, torch.float64: 1e-9}.get(dtype, 1e-2)


def run_text_pass(model, adapter, input_ids, readers: dict, progress: bool = False, desc: str = "text pass"
                  ) -> TextPassResult:
    """Every text of `input_ids` (a list of (1, L_i) token-id tensors) through the passes that `readers`
    ({name: TextReader}) need, each reader reading every text (module doc). A forward that fails fails
    the readers that needed it (the capture forward: every reader; the gradient forward: those that read
    gradients, and those whose sites it gave), with its error; the others go on, and the passes of later
    texts serve only the readers left."""
    import time

    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    live, errors, read_s, requests = {}, {}, {}, {}

    def fail(names, exc, where: str) -> None:
        for name in names:
            logger.debug("text stage %s failed (%s)", name, where, exc_info=True)
            errors[name] = f"{type(exc).__name__}: {exc}"
            live.pop(name, None)

    for name, reader in readers.items():
        try:
            requests[name] = reader.request
            live[name] = reader
        except Exception as exc:  # a reader that cannot say what it reads fails its stage only
            fail([name], exc, "request")
    device = next(model.parameters()).device
    sites_from_gradient = None  # decided on the first text read with a gradient forward (module doc)
    forwards = 0
    difference = None
    for k, ids in enumerate(tqdm(input_ids, desc=desc, disable=not progress)):
        if not live:
            break
        want = TextRequest()
        for name in live:
            want = want | requests[name]
        grad_layers = sorted(want.gradient)
        if sites_from_gradient is None and grad_layers and want.sites:
            sites_from_gradient = True
        from_gradient = bool(sites_from_gradient and grad_layers and want.sites)
        ids = ids.to(device)
        in_capture = want.sites if (not from_gradient or difference is None) else ()
        try:
            text = capture_forward(model, adapter, ids, want.mixer_io, want.attention_io, in_capture,
                                   check_blocked=k == 0)
        except Exception as exc:
            fail(list(live), exc, f"the capture forward of text {k}")
            break
        forwards += bool(want.mixer_io or want.attention_io or in_capture)
        text.index = k
        if grad_layers:
            try:
                text.gradients, targets, grad_sites = gradient_pass(
                    model, adapter, ids, grad_layers, want.sites if from_gradient else (),
                    want.target or DEFAULT_TARGET)
                text.target = targets[0]
            except Exception as exc:
                needs = [n for n in live if requests[n].gradient or (from_gradient and requests[n].sites)]
                fail(needs, exc, f"the gradient forward of text {k}")
                grad_sites = None
            forwards += 1
            if from_gradient and grad_sites is not None:
                if difference is None:
                    difference = site_difference(text.sites, grad_sites)
                    if difference > site_tolerance(model):
                        sites_from_gradient = False  # every text's sites from the capture forward
                        logger.warning("neuron sites not read from the gradient forwards (they differ from the "
                                       "capture forward by %.3g, relative): read from the capture forwards",
                                       difference)
                    else:
                        text.sites = grad_sites
                else:
                    text.sites = grad_sites
        if want.sites:
            text.sites_from = _sites_from(bool(sites_from_gradient), difference, model)
        for name, reader in list(live.items()):
            t = time.perf_counter()
            try:
                reader.read(text)
            except Exception as exc:  # this reader's stage fails; the others go on
                fail([name], exc, f"text {k}")
            read_s[name] = read_s.get(name, 0.0) + time.perf_counter() - t
    results = {}
    for name, reader in live.items():
        t = time.perf_counter()
        try:
            results[name] = reader.finish()
        except Exception as exc:
            fail([name], exc, "finish")
        read_s[name] = read_s.get(name, 0.0) + time.perf_counter() - t
    wanted_sites = any(r.sites for r in requests.values())
    where = _sites_from(bool(sites_from_gradient), difference, model) if wanted_sites else None
    return TextPassResult(results, errors, where, forwards, time.perf_counter() - t0, read_s)


def _sites_from(from_gradient: bool, difference: float | None, model) -> str:
    if from_gradient:
        return (f"the text pass's gradient forwards (the first text's sites within {difference:.2g} of the "
                f"model's own forward, relative)")
    if difference is not None:
        return (f"the text pass's capture forwards (the model's own; the gradient forwards' sites differed by "
                f"{difference:.3g}, relative, > {site_tolerance(model):g})")
    return "the text pass's capture forwards (the model's own)"
