"""Live neuron steering: one forward pre-hook per steered `down_proj`, driven by in-place tensors.

The input of `down_proj` is the coefficient vector `m = act(gate_proj(x)) * up_proj(x)`; steering rewrites
chosen coefficients before `down_proj` runs, so nothing is computed twice. Each hooked layer owns two
fixed-size buffers that fold its clamp mask, clamp value, gain and offset into one fused multiply-add
(a NaN or inf coefficient at a clamped neuron stays NaN), and the Steerer only ever updates them with
`copy_`: a knob change takes effect at the next forward and never re-traces or recompiles a
`torch.compile`d model (Python numbers and index lists would be baked into the graph; tensors are not).

    m' = where(clamp_mask, value, m * gain + offset)  ==  fill + m * keep      at the steered positions

Modes per concept: `clamp` (the paper's: set the neurons to `sign * strength`), `add` (`+= sign * strength`),
`scale` (`*= strength`). Strengths are bounded per mode (`strength_bound`), so no knob can push a value the
model's dtype cannot hold into a forward: a refused change leaves every setting as it was.

With every concept disabled the buffers are (keep 1, fill 0) and the output is bit-identical to the
unhooked model; `remove()` takes the hooks out entirely. Changing `positions` re-installs the hooks (one
recompile), since the position rule is code, not data. Positions: `all`; `last` (the last position of each
forward: for an autoregressive policy, each decoded token); `plan`, for a policy that says a plan before its
actions (an ECoT-style VLA, `Backbone.plans`): the last position of only the forwards that decide the plan
words, so the steered concept changes what the policy says it will do, and its action tokens are decoded by
unsteered forwards that attend to that plan.

Over 400 lines on purpose: the Steerer, its hook buffers and its two-lock scheme (settings vs forward) are
one piece of concurrency that must be read in one place to be trusted.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace

import torch
from torch import nn

from vla_steer.core.backbone import Backbone

MODES = ("clamp", "add", "scale")
POSITIONS = ("all", "last", "plan")

# Strength bounds (see `strength_bound`). The paper steers OpenVLA with alpha in 2..20 and the MLP coefficients
# of Llama-2 / Gemma rarely exceed a few hundred, so 1e4 is 500x the largest published alpha and far beyond
# any useful clamp or offset, yet small enough that down_proj, summing a few dozen steered neurons, stays
# far from float32/bfloat16 overflow. DTYPE_MARGIN keeps the same headroom in float16 (65504 / 64 ~ 1e3).
# A gain of 100 already multiplies a neuron's contribution hundredfold; overlapping scale concepts multiply.
MAX_ACTIVATION = 1e4
MAX_GAIN = 100.0
DTYPE_MARGIN = 64.0


def strength_bound(mode: str, dtype: torch.dtype = torch.float32) -> float:
    """The largest |strength| (and |value| a steered neuron ends at, overlaps included) `mode` accepts.

    clamp / add: min(MAX_ACTIVATION, finfo(dtype).max / DTYPE_MARGIN), a value the hook's dtype holds with
    room for down_proj's sum; scale: MAX_GAIN. A user steering sensibly never gets near either.
    """
    _check_mode(mode)
    if mode == "scale":
        return MAX_GAIN
    return min(MAX_ACTIVATION, torch.finfo(dtype).max / DTYPE_MARGIN)


@dataclass(frozen=True)
class Neuron:
    """One FFN neuron; `sign` is the polarity its concept is expressed with (+1 top tokens, -1 bottom)."""

    layer: int
    index: int
    sign: float = 1.0


@dataclass
class ConceptState:
    name: str
    neurons: tuple[Neuron, ...]
    mode: str
    strength: float
    enabled: bool


class _LayerBuffers:
    """The fixed-size state one hook reads, only ever written in place.

    `keep` and `fill` fold the four settings into one fused op, `m' = fill + m * keep`:
    clamped neurons get (keep 0, fill value), the others (keep gain, fill offset).

    A batch whose samples run under different settings sets `rows`, (keep, fill) of shape [B, 1, d_mlp],
    one row per sample, for its forwards only; every other forward (one setting, batched or not) reads the
    shared [d_mlp] pair, at today's cost.
    """

    def __init__(self, d_mlp: int, device: torch.device, dtype: torch.dtype):
        self.keep = torch.ones(d_mlp, dtype=dtype, device=device)
        self.fill = torch.zeros(d_mlp, dtype=dtype, device=device)
        self.rows: tuple[torch.Tensor, torch.Tensor] | None = None

    def hook_all(self, module: nn.Module, args: tuple) -> tuple:
        keep, fill = (self.keep, self.fill) if self.rows is None else self.rows
        return (torch.addcmul(fill, args[0], keep), *args[1:])

    def hook_plan(self, backbone: Backbone):
        def hook(module: nn.Module, args: tuple) -> tuple | None:
            return self.hook_last(module, args) if backbone.planning else None

        return hook

    def hook_last(self, module: nn.Module, args: tuple) -> tuple:
        # Token positions are on dim -2; a one-token decode step is its own last position.
        keep, fill = (self.keep, self.fill) if self.rows is None else (self.rows[0][:, 0], self.rows[1][:, 0])
        m = args[0]
        out = m.clone()
        out[..., -1, :] = torch.addcmul(fill, m[..., -1, :], keep)
        return (out, *args[1:])


class Steerer:
    """Steer named concepts (sets of neurons) of a backbone, live and thread-safe.

        steerer = Steerer(backbone)
        steerer.add("fast", direction.neurons, mode="clamp", strength=4.0)
        steerer.set("fast", 8.0)          # from any thread; next forward sees it
        with steerer.apply(fast=6.0): ... # temporary settings, restored on exit
        steerer.remove()                  # unhooked, exactly

    Strengths: |strength| <= `strength_bound(mode, dtype)` (1e4 for clamp/add in float32 and bfloat16,
    ~1e3 in float16, 100 for scale), and the same bound holds for what overlapping enabled concepts add up
    to on one neuron; anything beyond raises ValueError naming the concept and the bound, and changes
    nothing. A `batch()` is all or nothing: an exception inside restores every setting made in it.

    Consistency: every forward of `backbone.root` holds the steerer's forward lock, and the hook buffers
    are written only under it: a `set` from another thread returns at once and is applied when the next
    forward starts, never inside one (no forward mixes old and new settings).
    Under `torch.compile`, register concepts first: a concept on a layer not yet hooked adds a hook
    (one recompile); strengths, modes and on/off never recompile. Known limit: torch runs the
    releasing post-hook only for `Exception`s, so a KeyboardInterrupt inside a forward leaves the
    forward lock with that thread (knob changes still work; other threads' forwards then wait).
    """

    def __init__(self, backbone: Backbone, *, positions: str = "all"):
        self.backbone = backbone
        self._concepts: dict[str, ConceptState] = {}
        self._buffers: dict[int, _LayerBuffers] = {}
        self._handles: dict[int, torch.utils.hooks.RemovableHandle] = {}
        self._guard_handles: list[torch.utils.hooks.RemovableHandle] = []
        # Two locks, so a knob change never waits for an inference: `_lock` guards the settings (held
        # briefly), `_forward` is held for a whole forward or `consistent()` block, and the hook buffers
        # are written only under it. A change made while a forward runs is applied when the next starts.
        self._lock = threading.RLock()
        self._forward = threading.RLock()
        self._frozen = 0  # depth of consistent() blocks, touched only by the thread holding _forward
        self._dirty = False
        self._applied: dict[str, dict] = {}
        self._batch_owner: int | None = None
        self._changes = 0  # depth of nested _change() blocks (a batch holds one open)
        _check_positions(positions, backbone)
        self._positions = positions

    # -- concepts ----------------------------------------------------------------------------------

    def add(
        self,
        name: str,
        neurons: Iterable[Neuron | tuple[int, int] | tuple[int, int, float]],
        *,
        mode: str = "clamp",
        strength: float = 0.0,
        enabled: bool = True,
    ) -> None:
        """Register a concept and hook its layers (once per layer, whatever the number of concepts)."""
        _check_mode(mode)
        strength = self._check_strength(name, strength, mode)
        parsed = tuple(_parse_neuron(name, n) for n in neurons)
        if not parsed:
            raise ValueError(f"concept {name!r} has no neurons")
        for n in parsed:
            if not 0 <= n.layer < self.backbone.n_layers:
                raise ValueError(
                    f"concept {name!r}: layer {n.layer} out of range 0..{self.backbone.n_layers - 1}"
                )
            if not 0 <= n.index < self.backbone.d_mlp:
                raise ValueError(
                    f"concept {name!r}: neuron {n.index} out of range 0..{self.backbone.d_mlp - 1}"
                )
        with self._structural():
            if name in self._concepts:
                raise ValueError(f"concept {name!r} is already registered; discard it first")
            self._concepts[name] = ConceptState(name, parsed, mode, strength, enabled)
            try:
                self.check_bounds()
            except ValueError:
                del self._concepts[name]
                raise
            for layer in sorted({n.layer for n in parsed}):
                self._hook_layer(layer)
            self._refresh()

    def add_direction(
        self,
        direction,
        *,
        mode: str = "clamp",
        strength: float = 0.0,
        enabled: bool = True,
        name: str | None = None,
    ) -> None:
        """Register a discovered `Direction` under its name."""
        self.add(
            name or direction.name, direction.steer_neurons(), mode=mode, strength=strength, enabled=enabled
        )

    def discard(self, name: str) -> None:
        with self._structural():
            self._get(name)
            del self._concepts[name]
            self._refresh()

    def set(
        self, name: str, strength: float, *, mode: str | None = None, enabled: bool | None = None
    ) -> None:
        """Change a concept's strength (and optionally mode / enabled); takes effect at the next forward."""
        if mode is not None:
            _check_mode(mode)
        with self._change():
            c = self._get(name)
            c.strength = self._check_strength(name, strength, mode or c.mode)
            if mode is not None:
                c.mode = mode
            if enabled is not None:
                c.enabled = enabled

    def update(self, strengths: Mapping[str, float], *, enable: bool = False) -> None:
        """Set several strengths at once (and enable them, with `enable`): all or nothing, and no
        forward ever sees some of them changed and not others."""
        with self._change():
            for name, strength in strengths.items():
                c = self._get(name)
                c.strength = self._check_strength(name, strength, c.mode)
                if enable:
                    c.enabled = True

    def enable(self, name: str) -> None:
        with self._change():
            self._get(name).enabled = True

    def disable(self, name: str) -> None:
        with self._change():
            self._get(name).enabled = False

    def off(self) -> None:
        """Disable every concept: outputs equal the unhooked model's until something is enabled."""
        with self._change():
            for c in self._concepts.values():
                c.enabled = False

    def set_positions(self, positions: str) -> None:
        """Steer every token position ('all'), only the last one of each forward ('last'), or only that of
        the forwards that decide a policy's plan ('plan')."""
        _check_positions(positions, self.backbone)
        with self._structural():
            if positions != self._positions:
                self._positions = positions
                for layer in list(self._handles):
                    self._handles.pop(layer).remove()
                    self._hook_layer(layer)

    @property
    def concepts(self) -> list[str]:
        return list(self._concepts)

    def neurons(self, name: str) -> tuple[Neuron, ...]:
        return self._get(name).neurons

    def state(self) -> dict[str, dict]:
        """A snapshot of every concept's settings (what telemetry and the knobs UI show)."""
        with self._lock:
            return _describe(self._concepts.values())

    @property
    def positions(self) -> str:
        return self._positions

    @contextlib.contextmanager
    def apply(self, settings: Mapping[str, float] | None = None, /, **strengths: float) -> Iterator[Steerer]:
        """Enable the named concepts at the given strengths for the block; restore everything after."""
        settings = {**(settings or {}), **strengths}
        with self._lock:
            saved = {n: (c.strength, c.mode, c.enabled) for n, c in self._concepts.items()}
        try:
            self.update(settings, enable=True)
            yield self
        finally:
            with self._lock:
                for name, (strength, mode, enabled) in saved.items():
                    if name in self._concepts:
                        c = self._concepts[name]
                        c.strength, c.mode, c.enabled = strength, mode, enabled
                self._refresh()

    @contextlib.contextmanager
    def batch(self) -> Iterator[Steerer]:
        """Make several setting changes (set, update, enable, disable, off) land together, or not at all:
        no forward starts with only some of them applied, and an exception inside the block restores every
        setting as it was at entry. Adding or removing concepts inside is an error."""
        with self._lock:
            self._batch_owner = threading.get_ident()
            try:
                with self._change():
                    yield self
            finally:
                self._batch_owner = None

    def applied_state(self) -> dict[str, dict]:
        """The settings the hooks hold now (`state()` may be newer, until the next forward starts)."""
        with self._lock:
            return {name: dict(s) for name, s in self._applied.items()}

    @contextlib.contextmanager
    def consistent(self, setting: Setting | Sequence[Setting] | None = None) -> Iterator[Steerer]:
        """Run a block under one setting: a whole inference (prefill and every decoded token) sees the
        settings in force at entry; changes made meanwhile are applied when the next forward starts.

        With `setting` (from `resolve` or `live`), the block runs under that setting instead of the live
        one, which stays as it is and is back in the hooks at the next forward outside the block. A list of
        settings is one per sample of a batched forward (batch dimension first): when they all agree the
        block costs what one setting costs; otherwise each hooked layer gets per-sample rows for the block.
        """
        if isinstance(setting, Sequence) and len({s.key for s in setting}) == 1:
            setting = setting[0]  # the fast path: one shared setting
        with self._forward:
            if setting is not None and self._frozen:
                raise RuntimeError("a consistent(setting) block cannot nest in another consistent() block")
            self._frozen += 1
            try:  # a write failing midway (out of memory) leaves nothing behind: see `finally`
                if isinstance(setting, Setting):
                    self._dirty = (
                        True  # the hooks hold (some of) the request's setting: the next forward re-syncs
                    )
                    self._write(self._compose(setting.concepts.values()))
                elif setting is not None:
                    self._write_rows(setting)
                elif self._frozen == 1:
                    self._sync()
                yield self
            finally:
                self._frozen -= 1
                if setting is not None:
                    for buf in self._buffers.values():
                        buf.rows = None

    def live(self) -> Setting:
        """The live settings as a `Setting` (a copy: later knob changes do not alter it)."""
        with self._lock:
            return Setting({n: replace(c) for n, c in self._concepts.items()})

    def resolve(self, strengths: Mapping[str, float]) -> Setting:
        """A complete setting of this Steerer's concepts: the named ones enabled at those strengths, every
        other one off. Checked like `update` (unknown name: KeyError; strength or overlap out of bounds:
        ValueError, naming the concept); the live settings are not touched. For `consistent(setting)`."""
        with self._lock:
            concepts = {n: replace(c, enabled=False) for n, c in self._concepts.items()}
        for name, strength in strengths.items():
            if name not in concepts:
                self._get(name)  # raises the usual "unknown concept" KeyError
            c = concepts[name]
            c.strength, c.enabled = self._check_strength(name, strength, c.mode), True
        self.check_bounds(concepts.values())
        return Setting(concepts)

    # -- hooks -------------------------------------------------------------------------------------

    @property
    def hooked_layers(self) -> list[int]:
        return sorted(self._handles)

    def remove(self) -> None:
        """Take every hook out; the model is exactly as it was. Concepts are kept for `attach()`."""
        with self._structural():
            for h in [*self._handles.values(), *self._guard_handles]:
                h.remove()
            self._handles.clear()
            self._guard_handles.clear()

    def attach(self) -> None:
        """Re-install hooks for the registered concepts after `remove()`."""
        with self._structural():
            for layer in sorted({n.layer for c in self._concepts.values() for n in c.neurons}):
                self._hook_layer(layer)
            self._refresh()

    def __enter__(self) -> Steerer:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def _hook_layer(self, layer: int) -> None:
        if layer in self._handles:
            return
        down = self.backbone.down_proj(layer)
        if layer not in self._buffers:
            self._buffers[layer] = _LayerBuffers(down.in_features, down.weight.device, down.weight.dtype)
        buf = self._buffers[layer]
        hooks = {"all": buf.hook_all, "last": buf.hook_last}
        hook = buf.hook_plan(self.backbone) if self._positions == "plan" else hooks[self._positions]
        self._handles[layer] = down.register_forward_pre_hook(hook)
        if not self._guard_handles:
            root = self.backbone.root
            self._guard_handles = [
                root.register_forward_pre_hook(self._enter_forward),
                root.register_forward_hook(self._exit_forward, always_call=True),
            ]

    @torch.compiler.disable
    def _enter_forward(self, module, args) -> None:
        self._forward.acquire()
        if not self._frozen:
            self._sync()

    @torch.compiler.disable
    def _exit_forward(self, module, args, output) -> None:
        self._forward.release()

    # -- state -------------------------------------------------------------------------------------

    def _structural(self) -> contextlib.AbstractContextManager:
        """Locks for adding/removing hooks or concepts: waits for a running forward to finish."""
        if self._batch_owner == threading.get_ident():
            # We hold the settings lock; a forward holding the forward lock may be waiting for it.
            raise RuntimeError("add/discard/remove/attach/set_positions cannot run inside Steerer.batch()")
        stack = contextlib.ExitStack()
        stack.enter_context(self._forward)
        stack.enter_context(self._lock)
        return stack

    @contextlib.contextmanager
    def _change(self) -> Iterator[None]:
        """A settings change: checked as a whole (overlaps included), applied whole, or undone whole."""
        with self._lock:
            saved = {n: (c.strength, c.mode, c.enabled) for n, c in self._concepts.items()}
            self._changes += 1
            try:
                yield
                if self._changes == 1:  # inside a batch, only its end state must be within bounds
                    self.check_bounds()
            except BaseException:
                for name, (strength, mode, enabled) in saved.items():
                    if name in self._concepts:
                        c = self._concepts[name]
                        c.strength, c.mode, c.enabled = strength, mode, enabled
                self._refresh()  # the buffers may already hold a step of the failed change
                raise
            finally:
                self._changes -= 1
            self._refresh()

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the steered coefficients (the hook buffers'): what the strength bounds protect."""
        return self.backbone.down_proj(0).weight.dtype

    def _check_strength(self, name: str, strength: float, mode: str) -> float:
        if not isinstance(strength, numbers.Real) or isinstance(strength, bool):
            raise ValueError(f"strength for {name!r} must be a number, got {strength!r}")
        strength = float(strength)
        bound = strength_bound(mode, self.dtype)
        if not math.isfinite(strength):
            raise ValueError(f"strength for {name!r} must be finite, got {strength}")
        if abs(strength) > bound:
            raise ValueError(
                f"strength {strength:g} for {name!r} is out of range for mode {mode!r}: |strength| <= "
                f"{bound:g} ({self.dtype} hooks; see vla_steer.core.steering.strength_bound)"
            )
        return strength

    def check_bounds(self, concepts: Iterable[ConceptState] | None = None) -> None:
        """Raise ValueError if the enabled concepts (the live ones, or `concepts`) together push a neuron
        beyond its mode's bound."""
        act, gain_bound = strength_bound("clamp", self.dtype), strength_bound("scale", self.dtype)
        concepts = list(self._concepts.values() if concepts is None else concepts)
        for layer, (clamp, value, gain, offset) in self._compose(concepts).items():
            over = (torch.where(clamp, value, offset).abs() > act) | (gain.abs() > gain_bound)
            if over.any():
                index = int(over.nonzero()[0, 0])
                names = [
                    c.name
                    for c in concepts
                    if c.enabled and any(n.layer == layer and n.index == index for n in c.neurons)
                ]
                raise ValueError(
                    f"concepts {names} together steer neuron {index} of layer {layer} beyond the bound "
                    f"(|value| <= {act:g} for clamp/add, |gain| <= {gain_bound:g} for scale)"
                )

    def _compose(self, concepts: Iterable[ConceptState] | None = None) -> dict[int, tuple[torch.Tensor, ...]]:
        """(clamp mask, clamp value, gain, offset) per layer of an enabled concept (the live ones, or
        `concepts`), in float64. Registration order decides overlaps: a later clamp wins; offsets add;
        gains multiply."""
        d_mlp = self.backbone.d_mlp
        out: dict[int, tuple[torch.Tensor, ...]] = {}
        for c in self._concepts.values() if concepts is None else concepts:
            if not c.enabled:
                continue
            for n in c.neurons:
                if n.layer not in out:
                    f64 = torch.float64
                    out[n.layer] = (
                        torch.zeros(d_mlp, dtype=torch.bool),
                        torch.zeros(d_mlp, dtype=f64),
                        torch.ones(d_mlp, dtype=f64),
                        torch.zeros(d_mlp, dtype=f64),
                    )
                clamp, value, gain, offset = out[n.layer]
                if c.mode == "clamp":
                    clamp[n.index] = True
                    value[n.index] = n.sign * c.strength
                elif c.mode == "add":
                    offset[n.index] += n.sign * c.strength
                else:
                    gain[n.index] *= c.strength
        return out

    def _get(self, name: str) -> ConceptState:
        try:
            return self._concepts[name]
        except KeyError:
            known = ", ".join(self._concepts) or "none registered"
            raise KeyError(f"unknown concept {name!r} (known: {known})") from None

    def _refresh(self) -> None:
        """The settings changed: apply them now if no forward is running, else when the next one starts."""
        self._dirty = True
        if self._forward.acquire(blocking=False):
            try:
                if not self._frozen:
                    self._sync()
            finally:
                self._forward.release()

    def _sync(self) -> None:
        """Recompute every hooked layer's buffers from the settings and copy them in. Needs `_forward`."""
        with self._lock:
            if not self._dirty:
                return
            self._write(self._compose())
            self._applied = self.state()
            self._dirty = False

    def _write_rows(self, settings: Sequence[Setting]) -> None:
        """Per-sample rows [B, 1, d_mlp] in every hooked layer, one per setting: all built, then all set, so a
        failure (out of memory) sets none. Needs `_forward`."""
        composed = {}  # each distinct setting composed once
        for s in settings:
            if s.key not in composed:
                composed[s.key] = self._compose(s.concepts.values())
        rows = {}
        for layer, buf in self._buffers.items():
            keep, fill = [], []
            for s in settings:
                if layer in composed[s.key]:
                    clamp, value, gain, offset = composed[s.key][layer]
                    keep.append(torch.where(clamp, 0.0, gain))
                    fill.append(torch.where(clamp, value, offset))
                else:
                    keep.append(torch.ones(buf.keep.shape, dtype=torch.float64))
                    fill.append(torch.zeros(buf.keep.shape, dtype=torch.float64))
            like = {"dtype": buf.keep.dtype, "device": buf.keep.device}
            rows[layer] = (torch.stack(keep)[:, None].to(**like), torch.stack(fill)[:, None].to(**like))
        for layer, buf in self._buffers.items():
            buf.rows = rows[layer]

    def _write(self, composed: dict[int, tuple[torch.Tensor, ...]]) -> None:
        """Copy composed settings into every hooked layer's buffers. Needs `_forward`."""
        for layer, buf in self._buffers.items():
            if layer in composed:
                clamp, value, gain, offset = composed[layer]
                buf.keep.copy_(torch.where(clamp, 0.0, gain))
                buf.fill.copy_(torch.where(clamp, value, offset))
            else:
                buf.keep.fill_(1.0)
                buf.fill.zero_()


@dataclass(frozen=True)
class Setting:
    """A complete, checked setting of one Steerer's concepts (`Steerer.resolve`), applied to one inference
    by `Steerer.consistent(setting)` without touching the live knobs."""

    concepts: Mapping[str, ConceptState]

    @property
    def key(self) -> tuple:
        """Equal for settings that steer alike (what lets a batch share one setting)."""
        return tuple((c.name, c.mode, c.strength) for c in self.concepts.values() if c.enabled)

    def state(self) -> dict[str, dict]:
        """In `Steerer.state()`'s format: what an inference under this setting reports."""
        return _describe(self.concepts.values())


def _describe(concepts: Iterable[ConceptState]) -> dict[str, dict]:
    return {
        c.name: {
            "mode": c.mode,
            "strength": c.strength,
            "enabled": c.enabled,
            "n_neurons": len(c.neurons),
            "layers": sorted({n.layer for n in c.neurons}),
        }
        for c in concepts
    }


def _parse_neuron(concept: str, n) -> Neuron:
    """A Neuron from a Neuron or a (layer, index[, sign]) tuple, with integer indices and a finite sign."""
    layer, index, sign = (n.layer, n.index, n.sign) if isinstance(n, Neuron) else (*n, 1.0)[:3]
    if not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in (layer, index)):
        raise ValueError(f"concept {concept!r}: neuron {n!r} needs integer layer and index")
    if not isinstance(sign, numbers.Real) or isinstance(sign, bool) or not math.isfinite(sign) or sign == 0:
        raise ValueError(f"concept {concept!r}: neuron {n!r} needs a finite, non-zero sign")
    return Neuron(int(layer), int(index), float(sign))


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def _check_positions(positions: str, backbone: Backbone) -> None:
    if positions not in POSITIONS:
        raise ValueError(f"positions must be one of {POSITIONS}, got {positions!r}")
    if positions == "plan" and not backbone.plans:
        raise ValueError(
            f"positions='plan' steers the forwards that decide a policy's plan words, and {backbone.name} says "
            "no plan before its actions: use 'all' or 'last'"
        )
