"""What every SAE architecture shares: the decoder, its unit-norm constraint, the encoding,
and what an architecture declares about itself (its plug-in interface).

Parameter names and shapes follow docs/method.md sec. 1 (the SAELens convention):
W_enc [d_in, d_sae], W_dec [d_sae, d_in], b_dec [d_in], per-feature vectors [d_sae].

An architecture is one file in gsae_pl/saes/ with an `SAE` subclass registered in
`ARCHITECTURES` (below) under the name `sae.architecture` takes; the registry imports every
file of the package on first lookup, so a new file needs no edit elsewhere. Besides `encode`
it declares, as class attributes and class methods (defaults below):
  Config          a dataclass of its own `sae.` fields (flat YAML keys; choices in field
                  metadata); the `sae:` schema is the common fields plus the union of these
  check(cfg)      refusals of setting combinations it cannot train
  provides        the Encoding fields its reference path fills (what loss terms may read)
  aux_applies     whether the aux term applies (it decodes ReLU(pi_gate), method sec. 2)
  resample_roles  its per-feature parameters and how a resample re-initialises each
  bias_parameters its per-feature bias / threshold vectors, whose distributions are logged
  saelens         its SAELens architecture name, or None: export refuses it
  saelens_weights the checkpoint tensors SAELens's format holds, or a refusal
  saelens_cfg(sae_cfg)  cfg.json fields its SAELens form needs beyond the common ones
                  (e.g. topk's `k`); {} by default
  callbacks(cfg)  Lightning callbacks it needs during training (e.g. a stage switch)
  encoder_matrices(sae_cfg)  how many [d_in, d_sae] encoder matrices it holds (memory.py)
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, NamedTuple, Optional, Union

import torch
from torch import Tensor, nn

from gsae_pl.errors import UserError
from gsae_pl.registry import Registry
from gsae_pl.saes.kernels import SparseCodes, decode_codes

Codes = Union[Tensor, SparseCodes]
# The Encoding fields the fast kernels of saes/kernels.py return (pre_acts, pi_mag stay inside
# their backward): a loss term reading any other field makes `encode` take the reference path.
FAST_FIELDS = ("f", "gate_acts", "fired")


# SAELens architecture name -> its parameters beyond W_enc, W_dec, b_dec (all [d_sae]).
ENCODER_PARAMS = {"gated": ("b_gate", "r_mag", "b_mag"), "standard": ("b_enc",),
                  "jumprelu": ("b_enc", "threshold"), "topk": ("b_enc",)}


@dataclass
class NoFields:
    """An architecture without `sae.` fields of its own."""


class Encoding(NamedTuple):
    """The intermediates of one encoder pass, so no loss term recomputes a matmul.

    f         feature activations the decoder reads (f_tilde for the gated SAE)
    gate_acts what the sparsity penalty and the aux term see: ReLU(pi_gate) for gated
              (eq. 8), f itself for the baseline
    fired     per feature, the number of rows of the batch where f != 0 (for L0 and density)
    pre_acts  the pre-activation that decides which features fire: pi_gate for gated
              SAEs, the encoder's pre-activation z for the baseline, JumpReLU and the
              selection SAEs
    pi_mag    magnitude pre-activation (gated only)
    f and gate_acts are dense [B, d_sae] or, on the sparse path, `SparseCodes` sharing the
    gate's support. pre_acts and pi_mag are materialised by the reference path only: the
    fast paths keep them inside their backward (saes/kernels.py), as no loss term reads them.
    """

    f: Codes
    gate_acts: Codes
    fired: Tensor
    pre_acts: Optional[Tensor] = None
    pi_mag: Optional[Tensor] = None


class SAE(nn.Module):
    """Decoder half and constraints; subclasses define the encoder and `encode`."""

    Config: ClassVar[type] = NoFields
    provides: ClassVar[tuple[str, ...]] = FAST_FIELDS
    aux_applies: ClassVar[bool] = False
    # Per-feature parameter -> how a resample re-initialises it (gsae_pl/run/resample.py):
    # "direction" its row (axis 0) := the new unit direction; "encoder" its column (axis 1)
    # := the direction, scaled like the alive columns; "zero" its entry := 0; "init" its
    # entry := initial_entry(name), the value it started training with (a threshold).
    resample_roles: ClassVar[dict[str, str]] = {"W_dec": "direction"}
    # Per-feature bias / threshold vectors [d_sae], whose histograms and negative fraction
    # gsae_pl/run/bias_histograms.py logs (docs/method.md sec. 6). None: the "zero" entries
    # of resample_roles (b_enc, b_gate, ...); name them when those hold a non-bias too.
    bias_parameters: ClassVar[Optional[tuple[str, ...]]] = None
    saelens: ClassVar[Optional[str]] = None
    # Why AuxK (losses/auxk.py) could not train this architecture's dead latents even with
    # their counts kept, where that is so (docs/method.md sec. 4); the refusal says it.
    auxk_unfit: ClassVar[Optional[str]] = None

    def __init__(self, d_in: int, d_sae: int, unit_norm_decoder: bool = True):
        super().__init__()
        self.d_in, self.d_sae = d_in, d_sae
        self.unit_norm_decoder = unit_norm_decoder
        self.reference_only = False  # set by `serve`: a term reads what the kernels lack
        # Init decision (docs/method.md sec. 1): random unit decoder rows, W_enc = W_dec^T.
        W_dec = torch.randn(d_sae, d_in)
        self.W_dec = nn.Parameter(W_dec / W_dec.norm(dim=1, keepdim=True))
        self.b_dec = nn.Parameter(torch.zeros(d_in))

    def encode(self, x: Tensor) -> Encoding:
        raise NotImplementedError

    def decode(self, f: Codes) -> Tensor:
        return decode_codes(f, self.W_dec, self.b_dec)

    def forward(self, x: Tensor) -> tuple[Tensor, Encoding]:
        enc = self.encode(x)
        return self.decode(enc.f), enc

    def set_reads(self, reads) -> None:
        """Fill the Encoding fields `reads` (the objective's terms' union) on every path:
        a field the fast kernels do not return sends `encode` to the reference path.
        Reading nothing more costs nothing: the kernels stay in use."""
        self.reference_only = bool(set(reads) - set(FAST_FIELDS))

    def frozen_parameters(self) -> list[nn.Parameter]:
        """Parameters the optimiser must leave untouched at this step (SAEModule drops
        their gradients before it runs, whatever the architecture)."""
        return []

    def lr_scales(self) -> dict[str, float]:
        """Parameter name -> multiplier of the optimiser's lr for that parameter alone, for
        a parameter whose natural step differs from the rest's (JumpReLU's threshold);
        {}: one lr for every parameter, one optimiser group."""
        return {}

    # ---- the plug-in interface (module docstring) --------------------------------------
    @classmethod
    def check(cls, cfg: Any) -> None:
        """Refuse (UserError) setting combinations this architecture cannot train."""

    @classmethod
    def encoder_matrices(cls, sae_cfg: Any) -> int:
        return 1

    def callbacks(self, cfg: Any) -> list:
        return []

    def initial_entry(self, name: str) -> float:
        """The per-feature value parameter `name` (resample role "init") starts at."""
        raise NotImplementedError(f"{type(self).__name__} gives {name} no initial entry")

    @classmethod
    def saelens_cfg(cls, sae_cfg: dict) -> dict:
        """Fields its SAELens form adds to cfg.json (e.g. {"k": ...} for topk)."""
        return {}

    @classmethod
    def saelens_weights(cls, sae_cfg: dict, weights: dict[str, Tensor]) -> dict[str, Tensor]:
        """The checkpoint's `sae.*` tensors under their SAELens names (not yet folded with
        norm_scale); UserError when SAELens's format cannot hold this SAE."""
        if cls.saelens is None:
            raise UserError(f"sae.architecture={sae_cfg['architecture']} has no SAELens "
                            "equivalent: nothing written")
        names = ["W_enc", "W_dec", "b_dec", *ENCODER_PARAMS[cls.saelens]]
        return {name: weights[f"sae.{name}"] for name in names}

    def init_b_dec(self, sample: Tensor, how: str) -> None:
        """b_dec from a data sample (docs/method.md sec. 1): zeros, mean or geometric median."""
        with torch.no_grad():
            if how == "mean":
                self.b_dec.copy_(sample.mean(0))
            elif how == "geometric_median":
                self.b_dec.copy_(geometric_median(sample))
            else:
                self.b_dec.zero_()

    @torch.no_grad()
    def remove_parallel_grad(self) -> None:
        """Drop the part of each W_dec row's gradient along the row (tangent to the sphere)."""
        if not self.unit_norm_decoder or self.W_dec.grad is None:
            return
        W, g = self.W_dec, self.W_dec.grad
        g -= (g * W).sum(1, keepdim=True) * W  # rows of W have unit norm here

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """What the SAE's constraints need after each optimiser step: here, W_dec's rows back
        on the unit sphere; an architecture adds its own (JumpReLU projects its threshold)."""
        if self.unit_norm_decoder:
            self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)


def geometric_median(points: Tensor, iters: int = 50, eps: float = 1e-6) -> Tensor:
    """Weiszfeld's algorithm: robust to the few very high-norm rows real activations have."""
    points = points.double()
    median = points.mean(0)
    for _ in range(iters):
        weights = 1.0 / (points - median).norm(dim=1).clamp_min(eps)
        new = (weights[:, None] * points).sum(0) / weights.sum()
        if (new - median).norm() < eps * (1 + median.norm()):
            break
        median = new
    return median.float()


# ---- the registry, the common `sae:` fields, and building an SAE from its block ----------
# Choice lists read the shipped architectures in this order, then any other by name.
ARCHITECTURES: Registry[type[SAE]] = Registry(
    "sae.architecture", "gsae_pl.saes",
    order=("relu", "gated", "prolu", "rescale_shift", "topk", "batchtopk", "jumprelu",
           "matryoshka_batchtopk"))


@dataclass
class SAECommon:
    """The `sae:` fields every architecture shares; each architecture adds its own `Config`,
    and gsae_pl/config.py joins them into one flat block."""

    # relu | gated (method sec. 1) | prolu (sec. 5) | rescale_shift | any registered name
    architecture: str = field(default="gated", metadata={"choices": ARCHITECTURES.names})
    d_sae: int = field(default=512, metadata={"range": "positive"})
    unit_norm_decoder: bool = True  # project grads + renormalise W_dec rows each step
    b_dec_init: str = field(default="mean",  # of a data sample
                            metadata={"choices": ("zeros", "mean", "geometric_median")})
    kernel: str = field(default="auto",  # saes/kernels.py
                        metadata={"choices": ("auto", "reference", "dense", "sparse")})
    # torch.compile the fused pointwise maths
    compile: str = field(default="auto", metadata={"choices": ("auto", "always", "never")})


# Settings of the common `sae:` fields, under the constructor argument that takes them.
COMMON_ARGS = {"d_sae": "d_sae", "unit_norm_decoder": "unit_norm_decoder",
               "kernel": "kernel", "compile_mode": "compile"}


def build_sae(sae_cfg, d_in: int, reads=()) -> SAE:
    """An SAE from the `sae:` config block that fills the Encoding fields `reads` (the loss
    terms'). The architecture gets its own fields (`**own`, read through its `Config`) and
    the common ones its constructor names (prolu has one path: no kernel, no compile)."""
    cls = ARCHITECTURES[sae_cfg.architecture]
    takes = set(_constructor_parameters(cls))
    common = {arg: sae_cfg[key] for arg, key in COMMON_ARGS.items() if arg in takes}
    own = {f.name: sae_cfg[f.name] for f in fields(cls.Config)}
    sae = cls(d_in=d_in, **common, **own)
    sae.set_reads(reads)
    return sae


def _constructor_parameters(cls: type) -> dict:
    """The parameters of the first constructor along the MRO that names them: a wrapper
    `__init__(self, *args, **kwargs)` (a test's spy, a decorator) passes them on."""
    for klass in cls.__mro__:
        if "__init__" in vars(klass):
            params = inspect.signature(vars(klass)["__init__"]).parameters
            if not any(p.kind is p.VAR_POSITIONAL for p in params.values()):
                return {name: p for name, p in params.items() if name != "self"}
    return {}
