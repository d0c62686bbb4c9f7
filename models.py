"""Model loading and architecture adapters.

An adapter names, for one model family, where its layers live and where each neuron *site* is: the
module path to hook, whether the site is that module's input or output, and its
width. Everything else in the tool addresses layers and sites through the adapter, never by raw path
or raw `hidden_states` index (those differ between families: HF Mamba's has no embedding entry and
ends with the final norm's output; GPT-2's starts with the embeddings and its last entry is the last
layer's output after the final norm).
"""
from __future__ import annotations

import contextlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from utils import UserInputError, expand_path, first_line, hub_offline, hub_reachable

logger = logging.getLogger(__name__)

class NotApplicable(Exception):
    """An analysis that does not apply to this architecture (e.g. Δ on a Transformer)."""


REFERENCE_DIR = Path(__file__).resolve().parent / "reference_models"
# Family -> (default hub model, shipped reference model of the same architecture)
DEFAULT_MODELS = {"mamba": ("state-spaces/mamba-130m-hf", REFERENCE_DIR / "mamba"),
                  "transformer": ("gpt2", REFERENCE_DIR / "transformer")}

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


# What a site is, so that sites of two architectures can be paired like with like (the comparison):
SITE_KINDS = {
    "write": "the block's write to the residual stream (block output − block input): Mamba mixer_out, a "
             "Transformer's block_out (= attn_out + mlp_out in GPT-2; the parallel sum in GPT-NeoX)",
    "residual": "the residual stream after the block",
    "inner": "the layer's inner neurons: Mamba ssm (the gated scan output, e), a Transformer's mlp (after the "
             "activation)",
    "component": "one part of a Transformer block's write (attn_out or mlp_out); a Mamba block has one part, "
                 "its mixer, so it has no counterpart there",
    "path": "one of the parallel paths of a layer (Falcon-H1's ssm_path and attn_path, each before its "
            "multiplier); no other family has parallel paths",
}


@dataclass(frozen=True)
class SiteSpec:
    path: str  # module path template with {layer}; "P#write" (utils.WRITE_SUFFIX): module P's output − input
    capture: str  # "output" or "input" of that module (of a #write path: "output", the write)
    size_attr: str  # adapter attribute holding the site's width
    description: str
    kind: str = "component"  # a key of SITE_KINDS


@dataclass(frozen=True)
class Site:
    """One neuron site at one layer: hook `path`, read its `capture`, `size` dimensions."""

    name: str
    layer: int
    path: str
    capture: str
    size: int


class ArchitectureAdapter:
    family: str = ""
    display_name: str = ""  # how the summary names the family
    layers_path: str = ""
    sites: dict[str, SiteSpec] = {}
    default_causal_site: str = "residual"
    position_embedding_path: str | None = None  # absolute position embeddings added to the input embeddings
    # how the model is told positions: None (a Mamba: only through the order of its recurrence)
    position_encoding: str | None = None
    # the state-space math of the layers: "mamba1" (Mamba-1 and FalconMamba: Δ and A per channel, ssm.py's
    # recomputation, blocked forward and fast scan) or "mamba2"; None for a Transformer
    ssm_kind: str | None = None
    # the transformers class of the family's mixer, by name (`mixer_adapter` tells a mixer's family by it)
    mixer_class: str | None = None
    # the mixer divides Δ's low-rank input (dt_low), B and C by a weightless RMS norm (eps `mixer.rms_eps`)
    normalises_scan_inputs: bool = False
    # the mixer passes Δ's low-rank input, B and C through weighted RMS norms (Jamba's dt/b/c_layernorm)
    weighted_scan_input_norms: bool = False
    # what transformers computes in float32 in the mixer even in a float64 model, so that the model's own
    # output carries float32 rounding there (`ssm.computes_partly_in_float32`)
    float32_parts: tuple[str, ...] = ()

    def __init__(self, model):
        self.model = model
        self.config = model.config

    @property
    def n_layers(self) -> int:
        return int(self.config.num_hidden_layers)

    @property
    def hidden_size(self) -> int:  # d
        return int(self.config.hidden_size)

    @property
    def inner_size(self) -> int:  # e (Mamba d_inner) or the MLP width
        raise NotImplementedError

    @property
    def max_positions(self) -> int | None:
        return max_positions(self.config)

    @property
    def is_ssm(self) -> bool:
        """A family with state-space layers (Δ, hidden attention, the `ssm` site): Mamba-1, FalconMamba,
        Mamba-2, and the hybrids (at their state-space layers: `has_ssm`)."""
        return self.ssm_kind is not None

    hybrid = False  # layers of different kinds (HybridAdapter)

    def layer_kind(self, layer: int) -> str:
        """What layer `layer` computes (a key of LAYER_KINDS): every layer of a pure family is of one kind."""
        self.check_layer(layer)
        return "ssm" if self.is_ssm else "attention"

    def has_ssm(self, layer: int) -> bool:
        return "ssm" in self.layer_kind(layer)

    def has_attention(self, layer: int) -> bool:
        return "attention" in self.layer_kind(layer)

    def _lacks(self, layer: int, what: str) -> NotApplicable:
        return NotApplicable(f"not applicable to {self.family}: its layers have no {what}")

    @property
    def blocked_forward(self) -> bool:
        """Its mixers may run `ssm.mixer_forward_blocked` (transformers' Mamba-1 slow path, cache-blocked):
        Mamba-1 and FalconMamba."""
        return self.ssm_kind == "mamba1" and not self.hybrid

    def check_layer(self, layer: int) -> int:
        if not 0 <= layer < self.n_layers:
            raise UserInputError(
                f"--layer {layer} is out of range for this {self.family} model with {self.n_layers} layers; "
                f"valid layers are 0..{self.n_layers - 1}")
        return layer

    def layer_path(self, layer: int) -> str:
        return f"{self.layers_path}.{self.check_layer(layer)}"

    def site(self, name: str, layer: int) -> Site:
        if name not in self.sites:
            raise UserInputError(
                f"site {name!r} does not exist for {self.family}; choose one of {', '.join(self.sites)}")
        spec = self.sites[name]
        return Site(name, self.check_layer(layer), spec.path.format(layer=layer), spec.capture,
                    int(getattr(self, spec.size_attr)))

    def site_of_kind(self, kind: str) -> str | None:
        """The name of this family's site of `kind` (a key of SITE_KINDS), or None when it has none."""
        if kind not in SITE_KINDS:
            raise ValueError(f"site kind {kind!r}: choose one of {', '.join(SITE_KINDS)}")
        return next((n for n, s in self.sites.items() if s.kind == kind), None)

    def describe(self) -> dict:
        return {"family": self.family, "display_name": self.display_name, "ssm_kind": self.ssm_kind,
                "n_layers": self.n_layers,
                "hidden_size": self.hidden_size,
                "inner_size": self.inner_size,
                "sites": {n: {"path": s.path, "capture": s.capture, "size": int(getattr(self, s.size_attr)),
                              "kind": s.kind, "description": s.description} for n, s in self.sites.items()}}


class MambaAdapter(ArchitectureAdapter):
    family = "mamba"
    display_name = "Mamba"
    ssm_kind = "mamba1"
    mixer_class = "MambaMixer"
    layers_path = "backbone.layers"
    default_causal_site = "mixer_out"
    sites = {
        "mixer_out": SiteSpec("backbone.layers.{layer}.mixer", "output", "hidden_size",
                              "mixer output before the residual add (d): the block's write to the residual "
                              "stream (block = h + mixer(norm(h)))", "write"),
        "ssm": SiteSpec("backbone.layers.{layer}.mixer.out_proj", "input", "inner_size",
                        "u = y * SiLU(z), the gated scan output entering out_proj (e)", "inner"),
        "residual": SiteSpec("backbone.layers.{layer}", "output", "hidden_size",
                             "residual stream after the block (d)", "residual"),
    }

    @property
    def inner_size(self) -> int:
        return int(self.config.intermediate_size)

    def mixer(self, layer: int):
        return self.model.backbone.layers[self.check_layer(layer)].mixer

    def mixer_path(self, layer: int) -> str:
        return f"{self.layer_path(layer)}.mixer"

    def gradient_path(self, layer: int) -> str:
        """The module whose first input is the layer's unit outputs y, where `passes.gradient_pass` takes
        a gradient: Mamba-1 and FalconMamba have none (y is inside their forward, taken there from the
        fast scan)."""
        raise NotImplementedError("Mamba-1 / FalconMamba: the gradient pass reads y in the fast forward")


class FalconMambaAdapter(MambaAdapter):
    """FalconMamba: a Mamba-1 mixer whose Δ input (dt_low), B and C pass through a weightless RMS norm
    (eps `mixer.rms_eps`) before use (`ssm.mixer_projections`); the same module paths and sites."""

    family = "falcon_mamba"
    display_name = "FalconMamba"
    mixer_class = "FalconMambaMixer"
    normalises_scan_inputs = True
    float32_parts = ("the weightless RMS norms of dt_low, B and C",)


class Mamba2Adapter(MambaAdapter):
    """Mamba-2: the same module paths and sites (`ssm` is then the gated RMS norm's output, the input of
    out_proj); Δ and A are one value per head, so the delta stage's units are the heads, and the hidden
    attention is one L×L matrix per head (ssm.py's Mamba-2 section)."""

    family = "mamba2"
    display_name = "Mamba-2"
    ssm_kind = "mamba2"
    mixer_class = "Mamba2Mixer"
    float32_parts = ("the scan",)

    @property
    def inner_size(self) -> int:  # I = H heads x P head dims
        return int(self.config.num_heads) * int(self.config.head_dim)

    @property
    def n_heads(self) -> int:  # H
        return int(self.config.num_heads)

    def gradient_path(self, layer: int) -> str:
        """The gated RMS norm, whose first input is the scan output y."""
        return f"{self.mixer_path(layer)}.norm"


def _transformer_sites(block: str, attn: str, out_proj: str, write: str) -> dict[str, SiteSpec]:
    from utils import WRITE_SUFFIX

    return {
        "mlp": SiteSpec(block + ".mlp.act", "output", "inner_size", "MLP hidden units after the activation",
                        "inner"),
        "attn_out": SiteSpec(block + "." + attn, "output", "hidden_size", "attention output (d)"),
        "attn_heads": SiteSpec(f"{block}.{attn}.{out_proj}", "input", "hidden_size",
                               "the heads' concatenated outputs entering the attention's output projection (d = H "
                               "heads x d/H; dim k: head k // (d/H)): the attention neurons' units, where y = A v "
                               "holds dimension by dimension"),
        "mlp_out": SiteSpec(block + ".mlp", "output", "hidden_size", "MLP output (d)"),
        "block_out": SiteSpec(block + WRITE_SUFFIX, "output", "hidden_size",
                              f"the block's write to the residual stream: block output − block input = {write} "
                              "(d); ablating dim k sets the block's output to input + s·(output − input) there",
                              "write"),
        "residual": SiteSpec(block, "output", "hidden_size", "residual stream after the block (d)", "residual"),
    }


@dataclass(frozen=True)
class AttentionPaths:
    """A Transformer layer's attention modules by `named_modules()` path."""

    attention: str  # the attention module: returns (output (b, L, d), weights (b, H, L, L) under eager attention)
    qkv: str  # the projection whose output holds the values
    out_proj: str  # the output projection: its input is the heads' concatenated output y (b, L, d)


class TransformerAdapter(ArchitectureAdapter):
    """GPT-2 and GPT-NeoX: where each layer's attention weights, values and output projection are."""

    block: str = ""  # path template of one layer, with {layer}
    attention_name: str = ""  # the attention module within the block
    qkv_name: str = ""  # the q/k/v projection within the attention module
    out_proj_name: str = ""  # the output projection within the attention module

    @property
    def n_heads(self) -> int:  # H
        return int(self.config.num_attention_heads)

    @property
    def head_dim(self) -> int:  # d / H
        return self.hidden_size // self.n_heads

    def attention_paths(self, layer: int) -> AttentionPaths:
        attn = f"{self.block.format(layer=self.check_layer(layer))}.{self.attention_name}"
        return AttentionPaths(attn, f"{attn}.{self.qkv_name}", f"{attn}.{self.out_proj_name}")

    def gradient_path(self, layer: int) -> str:
        """The attention's output projection, whose first input is the heads' concatenated output y."""
        return self.attention_paths(layer).out_proj

    def split_values(self, qkv_out):
        """The values (b, H, L, d/H) from the q/k/v projection's output (b, L, 3d)."""
        raise NotImplementedError

    @contextlib.contextmanager
    def eager_attention(self):
        """Inside the block the model runs transformers' plain ("eager") attention, whose modules return
        their attention weights; the model's own implementation (e.g. sdpa) is restored in `finally`."""
        before = self.config._attn_implementation
        if before != "eager":
            self.model.set_attn_implementation("eager")
        try:
            yield
        finally:
            if before != "eager":
                self.model.set_attn_implementation(before)


class GPT2Adapter(TransformerAdapter):
    family = "gpt2"
    display_name = "GPT-2"
    layers_path = "transformer.h"
    default_causal_site = "block_out"  # the block's write, as Mamba's mixer_out (like with like)
    position_embedding_path = "transformer.wpe"
    position_encoding = "learned absolute position embeddings, added to the input"
    sites = _transformer_sites("transformer.h.{layer}", "attn", "c_proj", "attn_out + mlp_out")
    block, attention_name, qkv_name, out_proj_name = "transformer.h.{layer}", "attn", "c_attn", "c_proj"

    @property
    def inner_size(self) -> int:
        return int(self.config.n_inner or 4 * self.config.hidden_size)

    def split_values(self, qkv_out):
        b, L, _ = qkv_out.shape  # c_attn's output is [q (d) | k (d) | v (d)], each head-major
        d = self.hidden_size
        return qkv_out[..., 2 * d:].reshape(b, L, self.n_heads, self.head_dim).transpose(1, 2)  # (b, H, L, d/H)


class GPTNeoXAdapter(TransformerAdapter):
    family = "gpt_neox"
    display_name = "GPT-NeoX"
    layers_path = "gpt_neox.layers"
    default_causal_site = "block_out"  # the block's write, as Mamba's mixer_out (like with like)
    sites = _transformer_sites("gpt_neox.layers.{layer}", "attention", "dense",
                               "attn_out + mlp_out (with use_parallel_residual the MLP reads the block input; "
                               "otherwise the input plus attn_out)")
    position_encoding = "rotary (relative positions, inside attention; no absolute position input)"
    block, attention_name, qkv_name, out_proj_name = "gpt_neox.layers.{layer}", "attention", "query_key_value", "dense"

    @property
    def inner_size(self) -> int:
        return int(self.config.intermediate_size)

    def split_values(self, qkv_out):
        b, L, _ = qkv_out.shape  # query_key_value's output is per head [q | k | v], each d/H wide
        hd = self.head_dim
        return qkv_out.reshape(b, L, self.n_heads, 3 * hd)[..., 2 * hd:].transpose(1, 2)  # (b, H, L, d/H)


# --------------------------------------------------------------------------------------------------
# Hybrid models: layers of different kinds in one network
# --------------------------------------------------------------------------------------------------
# What a layer of a hybrid computes, by kind (`HybridAdapter.layer_kind`): the analyses that apply there
LAYER_KINDS = {
    "ssm": "a state-space (Mamba) mixer: Δ, the hidden attention and the ssm neurons are defined here",
    "attention": "softmax attention: the attention heads are defined here (no Δ)",
    "ssm+attention": "a state-space mixer and attention in one layer (Falcon-H1: in parallel on the same input; "
                     "Zamba2's hybrid layers: a shared attention block, then the layer's own Mamba)",
    "feed_forward": "an MLP or mixture-of-experts block with no mixing across positions (Nemotron-H)",
}
# transformers' names of a layer's kind (config.layer_types), old and new, by our kind
_LAYER_TYPES = {"mamba": "ssm", "linear_attention": "ssm", "attention": "attention", "full_attention": "attention",
                "hybrid": "ssm+attention", "mlp": "feed_forward", "moe": "feed_forward"}


class HybridAdapter(ArchitectureAdapter):
    """A model whose layers differ in kind (LAYER_KINDS), read from the config's `layer_types`. Every layer
    has the block sites `block_out` (its write to the residual stream) and `residual`; a layer with a
    state-space mixer also has `ssm` (the gated scan output entering out_proj) and the analyses of Δ and
    the hidden attention; `neurons` is each layer's own neuron site (`neuron_path`). A site or module a
    layer lacks raises NotApplicable naming the layer and its kind."""

    hybrid = True
    layers_path = "model.layers"
    default_causal_site = "block_out"
    mixer_class = None  # the state-space mixer's transformers class, set by each family
    ssm_name = "mamba"  # the state-space mixer within a block
    attention_name = "self_attn"  # the attention within a block
    qkv_name, out_proj_name = "v_proj", "o_proj"
    ssm_inner_attr = "mamba_d_ssm"  # config attribute of the mixer's inner width (else mamba_expand x d)

    @property
    def layer_types(self) -> list[str]:
        return list(self.config.layer_types)

    def layer_kind(self, layer: int) -> str:
        """The kind of `layer` (a key of LAYER_KINDS)."""
        kind = self.layer_types[self.check_layer(layer)]
        if kind not in _LAYER_TYPES:
            raise UserInputError(f"layer {layer} of this {self.family} model has kind {kind!r}, which this version "
                                 f"does not know; known: {', '.join(_LAYER_TYPES)}")
        return _LAYER_TYPES[kind]

    def has_ssm(self, layer: int) -> bool:
        return "ssm" in self.layer_kind(layer)

    def has_attention(self, layer: int) -> bool:
        return "attention" in self.layer_kind(layer)

    def layers_of_kind(self, part: str) -> list[int]:
        """The layers with a state-space mixer (`part` "ssm") or attention ("attention")."""
        return [la for la in range(self.n_layers) if part in self.layer_kind(la)]

    def _lacks(self, layer: int, what: str) -> NotApplicable:
        kind = self.layer_kind(layer)
        return NotApplicable(f"layer {layer} of this {self.display_name} model has no {what}: it is of kind {kind} "
                             f"({LAYER_KINDS[kind]})")

    @property
    def inner_size(self) -> int:  # the state-space mixer's inner width I
        value = getattr(self.config, self.ssm_inner_attr, None)
        return int(value) if value else int(self.config.mamba_expand * self.hidden_size)

    @property
    def n_heads(self) -> int:  # H of the state-space mixer
        return int(self.config.mamba_n_heads)

    @property
    def state_size(self) -> int:  # N of the state-space mixer
        c = self.config
        return int(getattr(c, "mamba_d_state", None) or getattr(c, "ssm_state_size", None) or c.state_size)

    def ssm_module_path(self, layer: int) -> str:
        """The state-space mixer within block `layer` (relative to the block)."""
        return self.ssm_name

    def mixer_path(self, layer: int) -> str:
        if not self.has_ssm(layer):
            raise self._lacks(layer, "state-space mixer")
        return f"{self.layer_path(layer)}.{self.ssm_module_path(layer)}"

    def mixer(self, layer: int):
        return self.model.get_submodule(self.mixer_path(layer))

    def attention_module_path(self, layer: int) -> str:
        return self.attention_name

    def neuron_path(self, layer: int) -> tuple[str, str]:
        """(path, description) of the module whose input is layer `layer`'s neurons: the state-space mixer's
        out_proj (its gated scan output) where the layer has one, else its dense MLP's down projection (the
        hidden units after the activation and any gating). NotApplicable where the layer has neither."""
        if self.has_ssm(layer):
            return f"{self.mixer_path(layer)}.out_proj", "the state-space mixer's gated scan output entering out_proj"
        mlp = self.mlp_down_path(layer)
        if mlp is None:
            raise self._lacks(layer, "state-space mixer and no dense MLP (its neurons would be " + self.no_mlp_why(layer)
                              + ")")
        return f"{self.layer_path(layer)}.{mlp}", "the dense MLP's hidden units entering its down projection"

    def mlp_down_path(self, layer: int) -> str | None:
        """The dense MLP's down projection within block `layer`, or None."""
        return "feed_forward.down_proj"

    def mlp_width(self, layer: int) -> int:
        return int(self.config.intermediate_size)

    def no_mlp_why(self, layer: int) -> str:
        return "the experts' units of a mixture of experts, which this version does not read"

    def site(self, name: str, layer: int) -> Site:
        from utils import WRITE_SUFFIX

        layer = self.check_layer(layer)
        block = self.layer_path(layer)
        if name == "block_out":
            return Site(name, layer, block + WRITE_SUFFIX, "output", self.hidden_size)
        if name == "residual":
            return Site(name, layer, block, "output", self.hidden_size)
        if name == "ssm":
            return Site(name, layer, f"{self.mixer_path(layer)}.out_proj", "input", self.inner_size)
        if name == "neurons":
            path, _ = self.neuron_path(layer)
            return Site(name, layer, path, "input", self.inner_size if self.has_ssm(layer) else self.mlp_width(layer))
        if name == "attn_heads":
            paths = self.attention_paths(layer)
            return Site(name, layer, paths.out_proj, "input", self.attention_width)
        if name in self.path_sites:
            part = self.ssm_name if name == "ssm_path" else self.attention_name
            return Site(name, layer, f"{block}.{part}", "output", self.hidden_size)
        raise UserInputError(f"site {name!r} does not exist for {self.family}; choose one of {', '.join(self.sites)}")

    path_sites: tuple = ()

    @property
    def sites(self) -> dict[str, SiteSpec]:
        from utils import WRITE_SUFFIX

        block = self.layers_path + ".{layer}"
        out = {
            "block_out": SiteSpec(block + WRITE_SUFFIX, "output", "hidden_size",
                                  "the block's write to the residual stream: block output − block input (d), at every "
                                  "layer whatever its kind", "write"),
            "residual": SiteSpec(block, "output", "hidden_size", "residual stream after the block (d)", "residual"),
            "neurons": SiteSpec(block + ".<the layer's neuron module>", "input", "inner_size",
                                "each layer's neurons: at a layer with a state-space mixer its gated scan output "
                                "entering out_proj (I), elsewhere the dense MLP's hidden units entering its down "
                                "projection", "inner"),
            "ssm": SiteSpec(block + "." + self.ssm_name + ".out_proj", "input", "inner_size",
                            "the state-space mixer's gated scan output entering out_proj (I); state-space layers only "
                            "(each layer's mixer path: architecture.mixer_paths)", "inner"),
            "attn_heads": SiteSpec(block + "." + self.attention_name + "." + self.out_proj_name, "input",
                                   "attention_width", "the heads' concatenated outputs entering the attention's output "
                                   "projection (H x d_h): the softmax attention neurons' units; attention layers only"),
        }
        if "ssm_path" in self.path_sites:
            out["ssm_path"] = SiteSpec(block + "." + self.ssm_name, "output", "hidden_size",
                                       "the state-space path's output (d), before its multiplier: beside attn_path, the "
                                       "two parallel paths of one layer", "path")
            out["attn_path"] = SiteSpec(block + "." + self.attention_name, "output", "hidden_size",
                                        "the attention path's output (d), before its multiplier", "path")
        return out

    def attention_paths(self, layer: int) -> AttentionPaths:
        if not self.has_attention(layer):
            raise self._lacks(layer, "attention")
        attn = f"{self.layer_path(layer)}.{self.attention_module_path(layer)}"
        return AttentionPaths(attn, f"{attn}.{self.qkv_name}", f"{attn}.{self.out_proj_name}")

    @property
    def attention_heads(self) -> int:  # H of the attention layers
        return int(self.config.num_attention_heads)

    @property
    def attention_width(self) -> int:  # H x d_h: the width of the attention's output projection's input
        return self.attention_heads * self.attention_head_dim

    @property
    def attention_head_dim(self) -> int:  # d_h of the attention layers
        return int(getattr(self.config, "head_dim", None) or self.hidden_size // self.attention_heads)

    def split_values(self, v_out):
        """The values per attention head (b, H, L, d_h) from v_proj's output (b, L, H_kv d_h): with grouped-query
        attention head h reads key/value head h // (H / H_kv), as transformers' repeat_kv gives it."""
        b, L, _ = v_out.shape
        hd = self.attention_head_dim
        v = v_out.reshape(b, L, -1, hd).transpose(1, 2)  # (b, H_kv, L, d_h)
        return v.repeat_interleave(self.attention_heads // v.shape[1], dim=1)  # (b, H, L, d_h)

    eager_attention = TransformerAdapter.eager_attention

    def gradient_path(self, layer: int) -> str:
        """Where the gradient pass takes ∂ target / ∂ (unit outputs) at `layer`: a state-space layer's gated
        RMS norm (its first input is the scan output y; Mamba-2 mixers), an attention layer's output projection
        (its input is the heads' concatenated output)."""
        if not self.has_ssm(layer):
            return self.attention_paths(layer).out_proj
        if self.ssm_kind != "mamba2":
            raise NotApplicable(f"the {self.display_name} mixer's scan output is inside its forward, with no module of "
                                "its own to take a gradient at")
        return f"{self.mixer_path(layer)}.norm"

    def describe(self) -> dict:
        out = super().describe()
        out["layer_kinds"] = [self.layer_kind(la) for la in range(self.n_layers)]
        out["layer_kind_definitions"] = {k: LAYER_KINDS[k] for k in dict.fromkeys(out["layer_kinds"])}
        out["sites"]["neurons"]["size"] = None  # each layer's own: neuron_sites
        out["mixer_paths"] = {la: self.mixer_path(la) for la in range(self.n_layers) if self.has_ssm(la)}
        out["neuron_sites"] = []  # each layer's `neurons` site: its module, width and meaning, or why it has none
        for la in range(self.n_layers):
            try:
                path, what = self.neuron_path(la)
                out["neuron_sites"].append({"layer": la, "path": path, "size": self.site("neurons", la).size,
                                            "description": what})
            except NotApplicable as exc:
                out["neuron_sites"].append({"layer": la, "not_applicable": str(exc)})
        return out


class AttentionLayersView:
    """A hybrid's attention layers seen as a Transformer's, for the softmax attention neurons
    (`attention_neurons.TransformerAttentionNeurons`): the units are the heads' concatenated outputs (H x d_h
    of them) entering each attention layer's output projection. Everything else is the hybrid's adapter."""

    is_ssm = False

    def __init__(self, hybrid: HybridAdapter):
        self.hybrid = hybrid

    def __getattr__(self, name):
        return getattr(self.hybrid, name)

    n_heads = property(lambda self: self.hybrid.attention_heads)
    head_dim = property(lambda self: self.hybrid.attention_head_dim)
    hidden_size = property(lambda self: self.hybrid.attention_width)

    def gradient_path(self, layer: int) -> str:
        """The attention's output projection, whose input is the heads' concatenated output (also at a layer
        that has a state-space mixer beside it, where the hybrid's own gradient path is the mixer's)."""
        return self.hybrid.attention_paths(layer).out_proj


class JambaAdapter(HybridAdapter):
    """Jamba: Mamba-1 mixers (`.mamba`) whose Δ input, B and C pass through weighted RMS norms, and one
    attention layer in `attn_layer_period`; the feed-forward is a mixture of experts at every
    `expert_layer_period`-th layer, a gated MLP elsewhere."""

    family = "jamba"
    display_name = "Jamba"
    ssm_kind = "mamba1"
    mixer_class = "JambaMambaMixer"
    weighted_scan_input_norms = True
    float32_parts = ("the RMS norms of Δ's input, B and C", "the scan")
    position_encoding = ("no position input (attention layers without position embeddings; positions only through the "
                         "Mamba layers' recurrence)")

    @property
    def inner_size(self) -> int:
        return int(self.config.mamba_expand * self.hidden_size)

    @property
    def n_heads(self) -> int:
        raise NotApplicable("Jamba's Mamba-1 mixers have one Δ per channel, no heads")

    def mlp_down_path(self, layer: int) -> str | None:
        c = self.config
        moe = c.num_experts > 1 and layer % c.expert_layer_period == c.expert_layer_offset
        return None if moe else "feed_forward.down_proj"


class BambaAdapter(HybridAdapter):
    family = "bamba"
    display_name = "Bamba"
    ssm_kind = "mamba2"
    mixer_class = "BambaMixer"
    float32_parts = ("the scan", "the gated RMS norm")
    position_encoding = "rotary on half of each attention head's dimensions (attention layers only)"


class GraniteMoeHybridAdapter(HybridAdapter):
    """Granite 4.0: Mamba-2 or attention layers, each followed by a sparse mixture of experts plus a shared
    dense MLP; the layers' writes are scaled by `residual_multiplier`, the embeddings by
    `embedding_multiplier`, the logits divided by `logits_scaling`."""

    family = "granitemoehybrid"
    display_name = "Granite 4.0 (GraniteMoeHybrid)"
    ssm_kind = "mamba2"
    mixer_class = "GraniteMoeHybridMambaLayer"
    float32_parts = ("the scan", "the gated RMS norm")
    position_encoding = "per config.position_embedding_type: rotary inside attention, or none"

    def mlp_down_path(self, layer: int) -> str | None:
        return "shared_mlp.output_linear"

    def mlp_width(self, layer: int) -> int:
        return int(self.config.shared_intermediate_size)

    def neuron_path(self, layer: int) -> tuple[str, str]:
        path, what = super().neuron_path(layer)
        return path, what if self.has_ssm(layer) else ("the shared dense MLP's hidden units entering its output "
                                                        "projection (the sparse experts' units are not included)")


class Zamba2Adapter(HybridAdapter):
    """Zamba2: Mamba-2 layers, and hybrid layers in which a shared attention block (its weights shared
    among the hybrid layers) reads the residual stream beside the embeddings, then the layer's own Mamba-2
    mixer (`.mamba_decoder.mamba`) runs."""

    family = "zamba2"
    display_name = "Zamba2"
    ssm_kind = "mamba2"
    mixer_class = "Zamba2MambaMixer"
    float32_parts = ("the scan", "the gated RMS norm")
    position_encoding = "rotary in the shared attention when use_mem_rope, else none"

    @property
    def n_heads(self) -> int:
        return int(self.config.n_mamba_heads)

    def ssm_module_path(self, layer: int) -> str:
        return "mamba_decoder.mamba" if self.layer_kind(layer) == "ssm+attention" else "mamba"

    def attention_paths(self, layer: int) -> AttentionPaths:
        if not self.has_attention(layer):
            raise self._lacks(layer, "attention")
        raise NotApplicable(f"layer {layer}: Zamba2's attention block is shared among its hybrid layers (one module at "
                            "several depths), so its heads are not one layer's; this version does not read them")


class NemotronHAdapter(HybridAdapter):
    """Nemotron-H: every block is one norm and one `.mixer`, which is Mamba-2, attention, an MLP or a mixture
    of experts."""

    family = "nemotron_h"
    display_name = "Nemotron-H"
    ssm_kind = "mamba2"
    mixer_class = "NemotronHMamba2Mixer"
    float32_parts = ("the scan", "the gated RMS norm")
    ssm_name = attention_name = "mixer"
    position_encoding = ("no position input (attention layers without position embeddings; positions only through the "
                         "Mamba layers' recurrence)")

    @property
    def inner_size(self) -> int:
        return int(self.config.mamba_num_heads) * int(self.config.mamba_head_dim)

    @property
    def n_heads(self) -> int:
        return int(self.config.mamba_num_heads)

    def mlp_down_path(self, layer: int) -> str | None:
        return "mixer.down_proj" if self.layer_types[layer] == "mlp" else None

    def no_mlp_why(self, layer: int) -> str:
        if self.layer_types[layer] == "moe":
            return "the experts' units of a mixture of experts, which this version does not read"
        return "its attention heads, the attention stage's units"


class FalconH1Adapter(HybridAdapter):
    """Falcon-H1: in every layer a Mamba-2 mixer (`.mamba`) and attention (`.self_attn`) read the same normed
    input in parallel, and the layer writes mamba_out · ssm_out_multiplier + attn_out · attention_out_multiplier;
    the mixer scales its input by `ssm_in_multiplier` and in_proj's output by `mup_vector` (one multiplier
    each for z, x, B, C and Δ's input), and its gated RMS norm may be absent (`mamba_rms_norm`)."""

    family = "falcon_h1"
    display_name = "Falcon-H1"
    ssm_kind = "mamba2"
    mixer_class = "FalconH1Mixer"
    float32_parts = ("the scan", "the gated RMS norm")
    position_encoding = "rotary inside attention"
    path_sites = ("ssm_path", "attn_path")

    def gradient_path(self, layer: int) -> str:
        if self.has_ssm(layer) and not self.config.mamba_rms_norm:
            raise NotApplicable("this Falcon-H1 mixer has no gated RMS norm (mamba_rms_norm false): its scan output "
                                "is gated inside the forward, with no module of its own to take a gradient at")
        return super().gradient_path(layer)


HYBRID_ADAPTERS = {a.family: a for a in (JambaAdapter, BambaAdapter, GraniteMoeHybridAdapter, Zamba2Adapter,
                                         NemotronHAdapter, FalconH1Adapter)}
ADAPTERS = {"mamba": MambaAdapter, "falcon_mamba": FalconMambaAdapter, "mamba2": Mamba2Adapter,
            "gpt2": GPT2Adapter, "gpt_neox": GPTNeoXAdapter, **HYBRID_ADAPTERS}
SSM_FAMILIES = frozenset(f for f, a in ADAPTERS.items() if a.ssm_kind is not None)
SUPPORTED = ("Mamba-1 (MambaForCausalLM), FalconMamba (FalconMambaForCausalLM), Mamba-2 (Mamba2ForCausalLM), "
             "GPT-2 (GPT2LMHeadModel), GPT-NeoX/Pythia (GPTNeoXForCausalLM), and the hybrids Jamba, Bamba, Granite 4.0 "
             "(GraniteMoeHybrid), Zamba2, Nemotron-H, Falcon-H1")


def mixer_adapter(mixer) -> type[ArchitectureAdapter]:
    """The adapter class of the state-space family whose layers `mixer` is the mixer of, by the mixer's
    class (transformers' `MambaMixer`, `FalconMambaMixer`, `Mamba2Mixer`, or a subclass of one): what
    ssm.py knows of a mixer (`ssm_kind`, `normalises_scan_inputs`, `float32_parts`) comes from it. TypeError
    for a module that is the mixer of no supported state-space family."""
    by_class = {a.mixer_class: a for a in ADAPTERS.values() if a.mixer_class}
    for cls in type(mixer).__mro__:
        if cls.__name__ in by_class:
            return by_class[cls.__name__]
    raise TypeError(f"{type(mixer).__name__} is not the mixer of a supported state-space family; expected one of "
                    f"{', '.join(by_class)} (Mamba-1, FalconMamba, Mamba-2)")


def max_positions(config) -> int | None:
    """How many positions a Transformer's position embeddings cover; None for Mamba (no limit)."""
    for attr in ("n_positions", "max_position_embeddings"):
        if getattr(config, attr, None):
            return int(getattr(config, attr))
    return None


def require_mamba(adapter: ArchitectureAdapter, why: str = "Δ exists only in Mamba layers") -> None:
    if not adapter.is_ssm:
        raise NotApplicable(f"not applicable to {adapter.family}: {why}")


def require_ssm_layer(adapter: ArchitectureAdapter, layer: int) -> None:
    """NotApplicable unless `layer` has a state-space mixer (every layer of a Mamba; some of a hybrid's)."""
    require_mamba(adapter)
    if not adapter.has_ssm(layer):
        raise adapter._lacks(layer, "state-space mixer")


def ssm_layers(adapter: ArchitectureAdapter, layers) -> list[int]:
    """Those of `layers` that have a state-space mixer, in their order."""
    return [la for la in layers if adapter.has_ssm(la)]


def check_supported(config, flag: str = "--model", name: str = "") -> str:
    model_type = getattr(config, "model_type", None)
    if model_type not in ADAPTERS:
        who = f"{flag} {name}: " if name else ""
        raise UserInputError(f"{who}architecture {model_type!r} is not supported; supported: {SUPPORTED}")
    return model_type


def get_adapter(model) -> ArchitectureAdapter:
    return ADAPTERS[check_supported(model.config)](model)


def config_adapter(config) -> ArchitectureAdapter:
    """The adapter of a model known only by its config (layers, sites, widths, positions; no module),
    for checking a run's flags before the weights load."""
    from types import SimpleNamespace

    return ADAPTERS[check_supported(config)](SimpleNamespace(config=config))


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------
@dataclass
class ModelSource:
    requested: str  # what the user asked for
    resolved_path: str | None  # the local folder the weights were read from
    origin: str  # "local", "hub-cache" or "hub"


@dataclass
class LoadedModel:
    model: object
    tokenizer: object
    source: ModelSource

    def __iter__(self):  # model, tokenizer, source = load_model_and_tokenizer(...)
        return iter((self.model, self.tokenizer, self.source))


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or name.count("/") > 1 or not HUB_ID.match(name)


def resolve_model_source(name_or_path: str, flag: str = "--model") -> ModelSource:
    """Decide where a model comes from without importing torch/transformers: an existing local folder,
    the local Hugging Face cache, or the hub (probed for a couple of seconds at most). Bad input ->
    UserInputError naming `flag`, the value and the fix."""
    name = str(name_or_path)
    folder = expand_path(name, flag)
    if folder.is_dir():
        odd = sorted(e.name for e in folder.iterdir() if not (e.is_file() or e.is_dir()))
        if odd:  # a FIFO or device would block the reader; a dangling link reads nothing
            raise UserInputError(f"{flag} {name}: {odd[0]} in the folder is not a regular file (a FIFO, device, "
                                 "socket or broken link); replace it with the file save_pretrained writes")
        if not (folder / "config.json").is_file():
            raise UserInputError(f"{flag} {name}: the folder has no config.json; "
                                 "give a folder written by save_pretrained")
        return ModelSource(name, str(folder.resolve()), "local")
    if folder.exists():
        raise UserInputError(f"{flag} {name}: is a file, not a folder; give a save_pretrained folder or a hub id")
    if _looks_like_path(name):
        raise UserInputError(f"{flag} {name}: no such folder; give an existing save_pretrained folder "
                             "or a Hugging Face hub id such as state-spaces/mamba-130m-hf")
    cached = _cached_folder(name)
    if cached is not None:
        return ModelSource(name, cached, "hub-cache")
    if not hub_reachable():
        raise UserInputError(
            f"{flag} {name}: not in the local Hugging Face cache and the hub is unreachable; "
            "pass a local folder made with save_pretrained, or retry with network access")
    return ModelSource(name, None, "hub")


def resolve_default_model(kind: str = "mamba") -> tuple[ModelSource, str | None]:
    """The model to use when the user named none: the default hub model if it is cached or the hub
    answers (decided in seconds), else the shipped reference model of the same architecture, with a
    warning. Returns (source, warning or None). Never used for a model the user named."""
    hub_id, reference = DEFAULT_MODELS[kind]
    cached = _cached_folder(hub_id)
    if cached is not None:
        return ModelSource(hub_id, cached, "hub-cache"), None
    if hub_reachable():
        return ModelSource(hub_id, None, "hub"), None
    if not (reference / "config.json").is_file():
        raise UserInputError(f"{hub_id} is neither cached nor reachable and the shipped reference model "
                             f"{reference} is missing; pass --model, or run train_reference_models.py")
    warning = (f"{hub_id} is neither in the local cache nor reachable; using the shipped reference {kind} "
               f"({reference.relative_to(reference.parents[1])}, see reference_models/MODEL_CARD.md)")
    return ModelSource(str(reference), str(reference), "reference"), warning


@dataclass
class ModelFiles:
    """What `inspect_model` read: everything of a model but its weights."""

    config: object
    tokenizer: object


PROBE_TEXT = "The quick brown fox jumps over the lazy dog."


def _load_errors() -> tuple:
    """What a damaged or incomplete model folder raises inside from_pretrained."""
    import pickle

    from safetensors import SafetensorError

    return OSError, ValueError, RuntimeError, EOFError, KeyError, pickle.UnpicklingError, SafetensorError


def _from_where(source: ModelSource) -> tuple[str, bool]:
    """(what to pass to from_pretrained, local_files_only)."""
    if source.origin in ("local", "reference"):
        return source.resolved_path, True
    return source.requested, source.origin == "hub-cache"


@contextlib.contextmanager
def _reading(source: ModelSource, flag: str):
    """Inside: read `source` (from the cache only, for a cached hub model); a load failure becomes one
    UserInputError naming `flag`, the model and the first line of the cause."""
    try:
        with hub_offline() if source.origin == "hub-cache" else contextlib.nullcontext():
            yield
    except UserInputError:
        raise
    except _load_errors() as exc:
        raise UserInputError(f"{flag} {source.requested}: could not be loaded ({first_line(exc)[:200]}); "
                             "check the hub id or the folder's contents") from None


def inspect_model(source: ModelSource, flag: str = "--model") -> ModelFiles:
    """Everything about a model that can be checked without loading its weights, in about a second: the
    config (its architecture must be supported), a tokenizer that turns text into tokens, and for a
    folder on disk weight files that exist and whose safetensors headers are intact (a truncated file
    fails here). Failures are one UserInputError naming `flag`, the model and what is wrong."""
    from transformers import AutoConfig, AutoTokenizer

    name, local_only = _from_where(source)
    with _reading(source, flag):
        config = AutoConfig.from_pretrained(name, local_files_only=local_only)
        check_supported(config, flag, source.requested)
        tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=local_only)
    if not tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"]:
        raise UserInputError(f"{flag} {source.requested}: its tokenizer turns text into no tokens (are the "
                             "tokenizer files missing?); save them there with tokenizer.save_pretrained")
    if source.origin in ("local", "reference"):
        _check_weight_files(Path(source.resolved_path), flag, source.requested)
    return ModelFiles(config, tokenizer)


def _check_weight_files(folder: Path, flag: str, name: str) -> None:
    import json
    import zipfile

    from safetensors import SafetensorError, safe_open

    files = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin"))
    if not files:
        raise UserInputError(f"{flag} {name}: no weight files (model.safetensors or pytorch_model.bin) in the "
                             "folder; give a folder written by save_pretrained")
    for index in folder.glob("*.index.json"):
        try:
            shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (OSError, ValueError, KeyError, AttributeError) as exc:
            raise UserInputError(f"{flag} {name}: {index.name} is damaged ({type(exc).__name__}); "
                                 "save the model again") from None
        missing = sorted(s for s in shards if not (folder / s).is_file())
        if missing:
            raise UserInputError(f"{flag} {name}: {index.name} names {missing[0]}, which is missing; "
                                 "copy the whole folder again")
    for f in files:
        try:
            if f.suffix == ".safetensors":  # the header must parse and cover the whole file
                with safe_open(str(f), framework="pt"):
                    pass
            else:
                with open(f, "rb") as fh:
                    zipped = fh.read(4) == b"PK\x03\x04"
                if zipped:  # torch.save's zip format: a truncated file has no central directory
                    zipfile.ZipFile(f).close()
        except (SafetensorError, OSError, zipfile.BadZipFile) as exc:
            raise UserInputError(f"{flag} {name}: weight file {f.name} is damaged ({first_line(exc)[:160]}); copy or save "
                                 "the model again") from None


def load_model_and_tokenizer(name_or_path, device="cpu", dtype="float32", flag: str = "--model",
                             files: ModelFiles | None = None) -> LoadedModel:
    """Load a supported causal LM and its tokenizer from a local folder or a hub id (or an already
    resolved ModelSource), in eval mode.

    A local folder (save_pretrained layout) is read directly; a hub id from the local cache when it is
    there, else from the hub if that answers (see `resolve_model_source`). Everything `inspect_model`
    checks is checked first (`files`: its result, when the caller has it already); every failure is a
    one-line UserInputError naming `flag`.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from utils import resolve_device, resolve_dtype

    device = resolve_device(device) if isinstance(device, str) else device
    dtype = resolve_dtype(dtype) if isinstance(dtype, str) else dtype
    source = (name_or_path if isinstance(name_or_path, ModelSource)
              else resolve_model_source(name_or_path, flag))
    files = files or inspect_model(source, flag)
    name, local_only = _from_where(source)
    with _reading(source, flag):  # mismatched shapes are reported in `info` (and refused below), not raised
        model, info = AutoModelForCausalLM.from_pretrained(name, config=files.config, local_files_only=local_only,
                                                           output_loading_info=True, ignore_mismatched_sizes=True)
    check_loaded_whole(info, flag, source)
    if source.origin == "hub":
        source.resolved_path = _cached_folder(source.requested)
    model.to(device=device, dtype=dtype)
    if dtype == torch.float64 and getattr(model.config, "_experts_implementation", None) not in (None, "eager"):
        model.set_experts_implementation("eager")  # torch's grouped matrix product of the experts has no float64
    model.eval()
    logger.info("loaded %s (%s) from %s on %s as %s", source.requested, type(model).__name__,
                source.resolved_path, device, dtype)
    return LoadedModel(model, files.tokenizer, source)


def _natural(key: str) -> list:
    """Sort key that orders layer numbers as numbers (layers.2 before layers.10)."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", key)]


def check_loaded_whole(info: dict, flag: str, source: ModelSource) -> None:
    """Refuse a model whose weights do not cover its architecture: `info` is from_pretrained's loading
    info. Every parameter and persistent buffer the config's architecture expects must have been read
    from the weights with its shape (a missing one would be left at its random initialisation), and the
    weights must hold nothing the architecture lacks (e.g. layers beyond the config's layer count).
    UserInputError naming the folder (or hub id) and the first missing, mismatched or unexpected tensors."""
    where = f"{flag} {source.requested}" + (f" ({source.resolved_path})" if source.resolved_path
                                             and source.resolved_path != source.requested else "")

    def first(keys, n: int = 3) -> str:
        keys = sorted(keys, key=_natural)
        return ", ".join(keys[:n]) + (f" and {len(keys) - n} more" if len(keys) > n else "")

    mismatched = sorted(info.get("mismatched_keys") or [], key=lambda m: _natural(m[0]))
    if mismatched:
        key, got, want = mismatched[0]
        raise UserInputError(f"{where}: {len(mismatched)} weight tensors do not fit the config, e.g. {key} is "
                             f"{tuple(got)} in the weights, the config asks for {tuple(want)}; the config and "
                             "the weights belong to different models")
    missing, unexpected = info.get("missing_keys") or (), info.get("unexpected_keys") or ()
    if missing:
        more = f"; and the weights hold {len(unexpected)} tensors it does not use" if unexpected else ""
        raise UserInputError(f"{where}: {len(missing)} tensors of the config's architecture are not in the weights "
                             f"(they would stay at their random initialisation): {first(missing)}{more}; the "
                             "config and the weights belong to different models, or the weights are incomplete")
    if unexpected:
        raise UserInputError(f"{where}: the weights hold {len(unexpected)} tensors the config's architecture does "
                             f"not have: {first(unexpected)}; does config.json give the model's layer count and "
                             "shape?")
    if info.get("error_msgs"):
        raise UserInputError(f"{where}: the weights could not be read whole ({first_line(info['error_msgs'][0])})")


def _cached_folder(repo_id: str) -> str | None:
    from huggingface_hub import try_to_load_from_cache

    hit = try_to_load_from_cache(repo_id, "config.json")
    return str(Path(hit).parent) if isinstance(hit, str) else None
