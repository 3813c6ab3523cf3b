"""A Llama-family decoder in plain torch, over a paged KV cache.

Shapes use T for the number of tokens in a step (all sequences flattened), H and Hkv
for query and key/value heads, D for head_dim. Q/K/V and gate/up projections are
fused at load time, so a layer is four matmuls.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ember_functions.attention import AttentionBatch, KVCache, paged_attention
from ember_functions.config import ModelConfig
from ember_functions.linear import Linear
from ember_functions.rope import RopeAngles, RotaryEmbedding, apply_rope


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(size, device="meta"), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 whatever the activation dtype, as the reference does.
        # F.rms_norm is, to the bit, x * rsqrt(mean(x^2) + eps), in fewer ops.
        normed = F.rms_norm(x.float(), self.weight.shape, eps=self.eps)
        return self.weight * normed.to(x.dtype)


def _param(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, device="meta"), requires_grad=False)


def _materialized(w: torch.Tensor, gemv: torch.Tensor | None) -> torch.Tensor:
    """``w``, or where it was left unconverted (on the meta device), its single-row copy
    converted to ``w``'s dtype: a new tensor, for packing."""
    return w if not w.is_meta or gemv is None else gemv.to(w.dtype)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, index: int, linear: Linear) -> None:
        super().__init__()
        self.index = index
        self.linear = linear
        # Low-precision copies for single-row decode, by projection (see linear.py).
        self.gemv: dict[str, torch.Tensor] = {}
        # Linear.pack copies, by projection, once LlamaModel.pack_weights reaches this layer.
        self.packed: dict[str, torch.Tensor] = {}
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.q_size = config.q_size
        self.kv_size = config.kv_size
        self.scale = config.head_dim**-0.5
        self.input_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.qkv_weight = _param(config.q_size + 2 * config.kv_size, config.hidden_size)
        self.qkv_bias = _param(config.q_size + 2 * config.kv_size) if config.qkv_bias else None
        self.o_weight = _param(config.hidden_size, config.q_size)
        self.gate_up_weight = _param(2 * config.intermediate_size, config.hidden_size)
        self.down_weight = _param(config.hidden_size, config.intermediate_size)

    def forward(
        self,
        hidden: torch.Tensor,  # [T, hidden]
        angles: RopeAngles,  # of this step's positions, shared by every layer
        kv_cache: KVCache,
        batch: AttentionBatch,
    ) -> torch.Tensor:
        t = hidden.shape[0]
        qkv = self._project("qkv", self.input_norm(hidden), self.qkv_weight, self.qkv_bias)
        # RoPE rotates q and k heads together: one pass over [T, H + Hkv, D].
        qk = qkv[:, : self.q_size + self.kv_size].view(t, self.num_heads + self.num_kv_heads, -1)
        qk = apply_rope(qk, angles)
        q, k = qk.split((self.num_heads, self.num_kv_heads), dim=1)
        v = qkv[:, self.q_size + self.kv_size :].reshape(t, self.num_kv_heads, self.head_dim)
        k_cache, v_cache = kv_cache.layer(self.index)
        attn = paged_attention(q, k, v, k_cache, v_cache, batch, scale=self.scale)
        hidden = hidden + self._project("o", attn.view(t, self.q_size), self.o_weight)
        normed = self.post_attention_norm(hidden)
        gate, up = self._project("gate_up", normed, self.gate_up_weight).chunk(2, -1)
        return hidden + self._project("down", F.silu(gate) * up, self.down_weight)

    def _project(
        self, name: str, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.linear(x, w, b, self.gemv.get(name), self.packed.get(name))

    def matrices(self) -> dict[str, torch.Tensor]:
        return {
            "qkv": self.qkv_weight,
            "o": self.o_weight,
            "gate_up": self.gate_up_weight,
            "down": self.down_weight,
        }

    def unpacked(self, name: str) -> torch.Tensor:  # [out, in], in the compute dtype
        """The matrix ``name`` as packing takes it: itself, or converted from its
        single-row copy where it was left unconverted (a new tensor then)."""
        return _materialized(self.matrices()[name], self.gemv.get(name))

    @property
    def runs_unpacked(self) -> bool:
        """Whether the layer can run without its packed copies: on its matrices, or on
        its single-row copies converted per call (``Linear.converted``) where the
        matrices are on the meta device."""
        return all(not w.is_meta or name in self.gemv for name, w in self.matrices().items())


class LlamaModel(nn.Module):
    """The decoder stack plus the LM head. Built on the meta device, then bound to
    real tensors by :func:`ember_functions.weights.load_model`."""

    def __init__(self, config: ModelConfig, *, linear: Linear) -> None:
        super().__init__()
        self.config = config
        self.linear = linear
        self.head_gemv: torch.Tensor | None = None
        self.head_packed: torch.Tensor | None = None
        self._packed_units = 0  # layers packed so far; the LM head is the last unit
        # Set when the packed matrices are mapped from the host tier (``packed_cache``):
        # the mapping their bytes live in, held as long as they are.
        self._shared_packing: torch.Tensor | None = None
        self.embed = _param(config.vocab_size, config.hidden_size)
        self.decoder_layers = [DecoderLayer(config, i, linear) for i in range(config.num_layers)]
        self.layers = nn.ModuleList(self.decoder_layers)  # registers them as submodules
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = (
            None if config.tie_word_embeddings else _param(config.vocab_size, config.hidden_size)
        )
        self.rope: RotaryEmbedding | None = None

    def init_rope(self, *, max_positions: int, device: torch.device) -> None:
        self.rope = RotaryEmbedding(self.config, max_positions=max_positions, device=device)

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype

    @property
    def device(self) -> torch.device:
        return self.embed.device

    def forward(
        self,
        input_ids: torch.Tensor,  # [T]
        positions: torch.Tensor,  # [T]
        kv_cache: KVCache,
        batch: AttentionBatch,
    ) -> torch.Tensor:  # [T, hidden]
        if self.rope is None:
            raise RuntimeError("call init_rope() (load_model does) before running the model")
        hidden = F.embedding(input_ids, self.embed)
        angles = self.rope.angles(positions)
        for layer in self.decoder_layers:
            hidden = layer(hidden, angles, kv_cache, batch)
        return self.norm(hidden)

    @property
    def head(self) -> torch.Tensor:  # [vocab, hidden]
        return self.embed if self.lm_head is None else self.lm_head

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [N, hidden] -> [N, vocab] fp32
        return self.linear(hidden, self.head, None, self.head_gemv, self.head_packed).float()

    def pack_weights(self, *, max_layers: int | None = None) -> bool:
        """Packs the matrices of up to ``max_layers`` more layers (the LM head counts as
        one, packed last) with :meth:`Linear.pack`; True once every one is packed, or at
        once when packing does not apply. A worker calls it with ``max_layers=1`` while
        idle, so a request never waits on more than one layer's packing.

        Example::

            while not model.pack_weights(max_layers=1):
                pass
        """
        if not self.linear.packs:
            return True
        total = len(self.decoder_layers) + 1
        budget = total if max_layers is None else max_layers
        while self._packed_units < total and budget > 0:
            if self._packed_units < len(self.decoder_layers):
                layer = self.decoder_layers[self._packed_units]
                packed = {name: self.linear.pack(layer.unpacked(name)) for name in layer.matrices()}
                layer.packed = {name: p for name, p in packed.items() if p is not None}
            else:
                self.head_packed = self.linear.pack(self._unpacked_head())
            self._packed_units += 1
            budget -= 1
        if self._packed_units == total:
            self.linear.free_scratch()
        return self._packed_units == total

    def _unpacked_head(self) -> torch.Tensor:  # [vocab, hidden], in the compute dtype
        return _materialized(self.head, self.head_gemv)

    def _runs_unpacked(self, unit: int) -> bool:
        if unit < len(self.decoder_layers):
            return self.decoder_layers[unit].runs_unpacked
        return not self.head.is_meta or self.head_gemv is not None

    def unpack_weights(self) -> int:
        """Drops the packed copy of the last packed layer (or of the LM head, packed
        last); the layer then runs on its original matrices, unpacked. Returns the bytes
        of host RAM that frees, 0 if nothing was packed. A worker calls it when the
        machine runs short of RAM after it packed (see ``host_memory.py``). Shared packed
        matrices are kept: dropping them would free nothing."""
        if self.private_packed_units == 0:
            return 0
        self._packed_units -= 1
        if self._packed_units == len(self.decoder_layers):
            had_copy, self.head_packed = self.head_packed is not None, None
        else:
            layer = self.decoder_layers[self._packed_units]
            had_copy, layer.packed = bool(layer.packed), {}
        # The unit just dropped is the next one to pack: its size is what was freed.
        return self.next_pack_bytes() if had_copy else 0

    @property
    def packed_units(self) -> int:
        """Layers packed so far, counting the LM head (packed last) as one."""
        return self._packed_units

    @property
    def private_packed_units(self) -> int:
        """Packed units this process holds copies of in its own RAM and can give back
        (:meth:`unpack_weights`, last first): 0 once shared, and none from the last one
        that could not run unpacked (a matrix on the meta device, no single-row copy) down."""
        if self._shared_packing is not None:
            return 0
        units = 0
        while units < self._packed_units and self._runs_unpacked(self._packed_units - 1 - units):
            units += 1
        return units

    @property
    def packing_shared(self) -> bool:
        return self._shared_packing is not None

    def unpacked_matrices(self) -> dict[str, torch.Tensor]:
        """Every matrix packing applies to, unpacked, by name (``layers.3.qkv``, ...,
        ``head``), in packing order."""
        out = {
            f"layers.{i}.{name}": w
            for i, layer in enumerate(self.decoder_layers)
            for name, w in layer.matrices().items()
        }
        out["head"] = self.head
        return out

    def matrices_to_check(self) -> dict[str, torch.Tensor]:
        """:meth:`unpacked_matrices` as a stored packed copy is checked against them
        (``PackedCache.load``): the first in the compute dtype, converted from its
        single-row copy where binding left it unconverted (a new tensor then); the rest
        only for their shapes."""
        out = self.unpacked_matrices()
        layer = self.decoder_layers[0]
        name = next(iter(layer.matrices()))
        out[f"layers.0.{name}"] = layer.unpacked(name)
        return out

    def idle_unpacked_matrices(self) -> dict[str, torch.Tensor]:
        """The unpacked matrices no step reads whole now, named as :meth:`unpacked_matrices`
        names them: those of packed layers without a single-row copy (``gemv`` reads the
        unpacked bytes on AVX2), and the LM head once packed. A tied head is the
        embedding, which steps look a few rows up in: handed back, only those rows'
        pages come back, where running the head unpacked had brought in every one."""
        idle = {
            f"layers.{i}.{name}": w
            for i, layer in enumerate(self.decoder_layers)
            if not layer.gemv
            for name, w in layer.matrices().items()
            if name in layer.packed
        }
        if self.head_packed is not None and self.head_gemv is None:
            idle["head"] = self.head
        return idle

    def packed_matrices(self) -> dict[str, torch.Tensor]:
        """The packed copies by the names of :meth:`unpacked_matrices`, once every one is
        packed; empty before, or when packing does not apply."""
        if self._packed_units != len(self.decoder_layers) + 1 or self.head_packed is None:
            return {}
        out = {
            f"layers.{i}.{name}": packed
            for i, layer in enumerate(self.decoder_layers)
            for name, packed in layer.packed.items()
        }
        out["head"] = self.head_packed
        return out

    def adopt_packed(self, matrices: Mapping[str, torch.Tensor], backing: torch.Tensor) -> None:
        """Runs on packed matrices mapped from the host tier (``packed_cache``), named as
        :meth:`packed_matrices` names them; ``backing`` is the mapping they live in."""
        for i, layer in enumerate(self.decoder_layers):
            layer.packed = {name: matrices[f"layers.{i}.{name}"] for name in layer.matrices()}
        self.head_packed = matrices["head"]
        self._packed_units = len(self.decoder_layers) + 1
        self._shared_packing = backing
        self.linear.free_scratch()

    def next_pack_bytes(self) -> int:
        """Bytes of host RAM the next :meth:`pack_weights` unit (a layer, or the LM head
        last) will allocate; 0 once everything is packed or packing does not apply."""
        if not self.linear.packs:
            return 0
        if self._packed_units < len(self.decoder_layers):
            mats = list(self.decoder_layers[self._packed_units].matrices().values())
        elif self._packed_units == len(self.decoder_layers):
            mats = [self.head]
        else:
            return 0
        return sum(m.numel() * self.dtype.itemsize for m in mats)  # packed in compute dtype

    def add_gemv_weights(
        self, dtype: torch.dtype, given: Mapping[str, torch.Tensor] | None = None
    ) -> None:
        """Keeps a ``dtype`` copy of every matrix for single-row decode (see linear.py).
        ``given`` (state-dict names) supplies ones already in ``dtype``, such as the
        checkpoint's own 16-bit tensors, so they are shared instead of converted back."""
        given = given or {}

        def copy(name: str, weight: torch.Tensor) -> torch.Tensor:
            have = given.get(name)
            if have is not None and have.shape == weight.shape and have.dtype == dtype:
                return have
            return weight.to(dtype)

        for i, layer in enumerate(self.decoder_layers):
            p = f"layers.{i}."
            layer.gemv = {
                "qkv": copy(p + "qkv_weight", layer.qkv_weight),
                "o": copy(p + "o_weight", layer.o_weight),
                "gate_up": copy(p + "gate_up_weight", layer.gate_up_weight),
                "down": copy(p + "down_weight", layer.down_weight),
            }
        self.head_gemv = copy("embed" if self.lm_head is None else "lm_head", self.head)

    def decode_bytes_per_token(self) -> int:
        """Weight bytes one single-sequence decode step streams from memory: every
        matrix once (the copy it really reads), norms, and one embedding row."""
        total = self.config.hidden_size * self.embed.element_size()  # the gathered row
        head = self.head_gemv if self.head_gemv is not None else self.head
        total += head.numel() * head.element_size()
        for layer in self.decoder_layers:
            mats = layer.gemv or layer.matrices()
            total += sum(m.numel() * m.element_size() for m in mats.values())
            small = [layer.input_norm.weight, layer.post_attention_norm.weight, layer.qkv_bias]
            total += sum(p.numel() * p.element_size() for p in small if p is not None)
        return total + self.norm.weight.numel() * self.norm.weight.element_size()
