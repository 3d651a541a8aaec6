"""Typed model configs, one per family, built from a transformers `config.json` dict and back.

`config_from_hf` is the only place that knows transformers' key names (both the 4.x `rope_theta` +
`rope_scaling` spelling and the 5.x `rope_parameters` one); models only see these dataclasses.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from nanoseek.errors import BadInputError, UnsupportedError


@dataclass
class RopeConfig:
    """Rotary embedding parameters. `rope_type` is one of default, linear, llama3, yarn."""

    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    # llama3
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int | None = None
    # yarn
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True

    def to_hf(self) -> dict[str, Any]:
        out: dict[str, Any] = {"rope_type": self.rope_type, "rope_theta": self.theta}
        if self.rope_type in ("linear", "llama3", "yarn"):
            out["factor"] = self.factor
        if self.rope_type == "llama3":
            out.update(low_freq_factor=self.low_freq_factor, high_freq_factor=self.high_freq_factor,
                       original_max_position_embeddings=self.original_max_position_embeddings)
        if self.rope_type == "yarn":
            out.update(beta_fast=self.beta_fast, beta_slow=self.beta_slow, truncate=self.truncate)
            for k in ("mscale", "mscale_all_dim", "attention_factor", "original_max_position_embeddings"):
                if getattr(self, k) is not None:
                    out[k] = getattr(self, k)
        return out


@dataclass
class DenseConfig:
    """Llama / Qwen2 decoder: GQA attention, SwiGLU MLP, RMSNorm, optional qkv bias and tied head."""

    arch: str = "llama"  # "llama" or "qwen2"
    vocab_size: int = 32000
    hidden_size: int = 576
    intermediate_size: int = 1536
    num_hidden_layers: int = 30
    num_attention_heads: int = 9
    num_key_value_heads: int = 3
    head_dim: int | None = None
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 8192
    rope: RopeConfig = field(default_factory=RopeConfig)
    attention_bias: bool = False  # q/k/v bias (always on for qwen2)
    o_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self) -> None:
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise BadInputError(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                                f"num_key_value_heads={self.num_key_value_heads}")

    @property
    def rope_dim(self) -> int:
        return self.head_dim


@dataclass
class DeepseekConfig:
    """DeepSeek-V3 decoder: MLA attention, DeepSeekMoE (after `first_k_dense_replace` dense layers), MTP."""

    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 61
    num_attention_heads: int = 128
    # MLA (DeepSeek-V2 §2.1)
    q_lora_rank: int | None = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    rope_interleave: bool = True
    # DeepSeekMoE (V3 §2.1.2)
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 8
    n_group: int = 8
    topk_group: int = 4
    routed_scaling_factor: float = 2.5
    norm_topk_prob: bool = True
    scoring_func: str = "sigmoid"  # V3 sigmoid; V2 softmax
    first_k_dense_replace: int = 3
    # training knobs (V3 §2.1.2, §2.2); not part of transformers' config
    bias_update_speed: float = 0.001  # γ
    seq_aux_alpha: float = 0.0001  # α
    mtp_loss_weight: float = 0.3  # λ
    num_nextn_predict_layers: int = 0  # MTP depth D
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 4096
    rope: RopeConfig = field(default_factory=RopeConfig)
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1

    def __post_init__(self) -> None:
        e, g = self.n_routed_experts, self.n_group
        if e % g or e // g < 2:
            raise BadInputError(f"n_routed_experts={e} must split into n_group={g} groups of at least 2")
        if self.topk_group * (e // g) < self.num_experts_per_tok:
            raise BadInputError(f"topk_group={self.topk_group} groups of {e // g} experts cannot hold "
                                f"num_experts_per_tok={self.num_experts_per_tok}")
        if self.scoring_func not in ("sigmoid", "softmax"):
            raise UnsupportedError(f"scoring_func {self.scoring_func!r} (expected sigmoid or softmax)")

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def rope_dim(self) -> int:
        return self.qk_rope_head_dim


# --- DeepSeek-V3.2 (DeepSeek Sparse Attention) ---------------------------------------------------------------


@dataclass
class DeepseekV32Config(DeepseekConfig):
    """DeepSeek-V3.2: V3 with DeepSeek Sparse Attention in every layer (V3.2 report §2.1, models/dsa.py): a
    lightning indexer of `index_n_heads` × `index_head_dim` scores past tokens from the query latent and MLA
    attends only to the `index_topk` best. The indexer reads the query latent, so `q_lora_rank` is required."""

    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 2048

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.q_lora_rank is None:
            raise BadInputError("q_lora_rank: DeepSeek-V3.2 needs a query latent (its lightning indexer reads it)")
        if not self.rope_interleave:  # the checkpoints (and transformers) rotate MLA's rope slice in pairs
            raise BadInputError("rope_interleave=false: DeepSeek-V3.2 rotates MLA's rope dims in interleaved pairs")
        if self.index_head_dim < self.qk_rope_head_dim:
            raise BadInputError(f"index_head_dim={self.index_head_dim} is narrower than its rotary part "
                                f"qk_rope_head_dim={self.qk_rope_head_dim}")
        for k in ("index_n_heads", "index_topk"):
            if getattr(self, k) < 1:
                raise BadInputError(f"{k}={getattr(self, k)} must be at least 1")


def _v32_from_hf(d: dict[str, Any], rope: RopeConfig) -> DeepseekV32Config:
    """transformers' DeepseekV32Config keys → ours; what we do not implement is refused naming its key."""
    if d.get("q_lora_rank") is None:
        raise BadInputError("config.json: q_lora_rank is missing or null; DeepSeek-V3.2's indexer needs the query "
                            "latent")
    for key, want in (("hidden_act", "silu"), ("attention_bias", False), ("scoring_func", "sigmoid"),
                      ("topk_method", "noaux_tc")):
        if key in d and d[key] != want:
            raise UnsupportedError(f"config.json {key}={d[key]!r} for deepseek_v32 (supported: {want!r})")
    layers = d.get("layer_types")
    if layers is not None and any(t != "indexed_attention" for t in layers):
        raise UnsupportedError(f"config.json layer_types {sorted(set(layers))} (deepseek_v32 supports only "
                               "'indexed_attention')")
    kw = _pick(d, DeepseekV32Config)
    kw.pop("rope_interleave", None)  # transformers' V3.2 always rotates MLA's rope slice in interleaved pairs
    mlp = d.get("mlp_layer_types")
    if mlp is not None:  # transformers lets this list override first_k_dense_replace
        k = next((i for i, t in enumerate(mlp) if t != "dense"), len(mlp))
        if len(mlp) != kw.get("num_hidden_layers", len(mlp)) or any(t != "sparse" for t in mlp[k:]):
            raise UnsupportedError(f"config.json mlp_layer_types {mlp} (supported: 'dense' layers, then 'sparse')")
        kw["first_k_dense_replace"] = k
    kw.setdefault("n_group", 1)
    kw.setdefault("topk_group", 1)
    return DeepseekV32Config(rope=rope, **kw)


def _v32_to_hf(base: dict[str, Any]) -> None:
    base.update(architectures=["DeepseekV32ForCausalLM"], model_type="deepseek_v32")
    base.pop("rope_interleave")


# --- end DeepSeek-V3.2 ----------------------------------------------------------------------------------------

# --- DeepSeek-V4 (compressed attention, mHC, hash-routed MoE) -----------------------------------------------
V4_LAYER_TYPES = ("sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention")
V4_MLP_TYPES = ("hash_moe", "moe")
V4_SCORING = ("sqrtsoftplus", "softmax", "sigmoid")
_V4_RATIO_TO_TYPE = {0: "sliding_attention", 4: "compressed_sparse_attention", 128: "heavily_compressed_attention"}


@dataclass
class DeepseekV4Config:
    """DeepSeek-V4 decoder (V4 report §2): per-layer sliding / CSA / HCA attention with one shared K=V head,
    mHC residual streams, hash-routed MoE in the first layers then top-k MoE with sqrtsoftplus scores.
    Field names are transformers' `DeepseekV4Config` ones; `rope` is the main (sliding-layer) rotary,
    `compress_rope` the one of CSA/HCA layers and their compressed entries."""

    vocab_size: int = 129280
    hidden_size: int = 4096
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 43
    num_attention_heads: int = 64
    head_dim: int = 512
    qk_rope_head_dim: int = 64
    q_lora_rank: int = 1024
    layer_types: list[str] = field(default_factory=list)  # one of V4_LAYER_TYPES per layer
    compress_rate_csa: int = 4       # m (§2.3.1)
    compress_rate_hca: int = 128     # m' (§2.3.2)
    sliding_window: int = 128        # n_win, every layer's local window
    o_groups: int = 8
    o_lora_rank: int = 1024
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 512
    hc_mult: int = 4                 # mHC streams (§2.2)
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    mlp_layer_types: list[str] = field(default_factory=list)  # one of V4_MLP_TYPES per layer
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 6
    scoring_func: str = "sqrtsoftplus"
    routed_scaling_factor: float = 1.5
    swiglu_limit: float = 10.0
    # training knobs, not transformers': aux-loss-free bias speed γ, sequence balance α, the hash table's seed
    bias_update_speed: float = 0.001
    seq_aux_alpha: float = 0.0001
    hash_seed: int = 0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 4096
    rope: RopeConfig = field(default_factory=RopeConfig)
    compress_rope: RopeConfig = field(default_factory=lambda: RopeConfig(theta=160000.0))
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1

    def __post_init__(self) -> None:
        n = self.num_hidden_layers
        if not self.layer_types:  # V4-Pro's schedule: two HCA layers, then CSA / HCA alternating
            self.layer_types = ["heavily_compressed_attention"] * min(n, 2) + [
                "compressed_sparse_attention" if i % 2 else "heavily_compressed_attention" for i in range(n - 2)]
        if not self.mlp_layer_types:
            self.mlp_layer_types = ["hash_moe"] * min(n, 3) + ["moe"] * max(0, n - 3)
        for key, values, allowed in (("layer_types", self.layer_types, V4_LAYER_TYPES),
                                     ("mlp_layer_types", self.mlp_layer_types, V4_MLP_TYPES)):
            bad = [v for v in values if v not in allowed]
            if bad:
                raise BadInputError(f"{key}: {bad[0]!r} is not a DeepSeek-V4 type (expected one of {', '.join(allowed)})")
            if len(values) != n:
                raise BadInputError(f"{key} has {len(values)} entries but num_hidden_layers={n}")
        for key in ("sliding_window", "compress_rate_csa", "compress_rate_hca", "index_topk", "hc_mult",
                    "hc_sinkhorn_iters", "o_groups", "num_experts_per_tok"):
            if getattr(self, key) < 1:
                raise BadInputError(f"{key}: {getattr(self, key)} (must be at least 1)")
        if self.scoring_func not in V4_SCORING:
            raise BadInputError(f"scoring_func: {self.scoring_func!r} is not supported (expected one of {', '.join(V4_SCORING)})")
        if (self.num_attention_heads * self.head_dim) % self.o_groups:
            raise BadInputError(f"o_groups={self.o_groups} does not divide num_attention_heads*head_dim")
        if self.qk_rope_head_dim % 2 or self.qk_rope_head_dim > self.head_dim:
            raise BadInputError(f"qk_rope_head_dim={self.qk_rope_head_dim} must be even and at most head_dim")
        if self.num_experts_per_tok > self.n_routed_experts:
            raise BadInputError(f"num_experts_per_tok={self.num_experts_per_tok} > n_routed_experts")

    @property
    def rope_dim(self) -> int:
        return self.qk_rope_head_dim

    def compress_rate(self, layer_type: str) -> int:
        return {"compressed_sparse_attention": self.compress_rate_csa,
                "heavily_compressed_attention": self.compress_rate_hca}.get(layer_type, 0)


def _v4_from_hf(d: dict[str, Any]) -> DeepseekV4Config:
    """transformers' DeepseekV4Config keys, including the legacy spellings its __post_init__ folds in
    (compress_ratios, compress_rate_csa/hca, num_hash_layers, qk_rope_head_dim, flat rope_scaling)."""
    if d.get("num_key_value_heads", 1) != 1:
        raise BadInputError(f"num_key_value_heads: {d['num_key_value_heads']} (DeepSeek-V4 has one shared K=V head)")
    if d.get("hidden_act", "silu") != "silu":
        raise BadInputError(f"hidden_act: {d['hidden_act']!r} is not supported (expected silu)")
    kw = _pick(d, DeepseekV4Config)
    n = d.get("num_hidden_layers", DeepseekV4Config.num_hidden_layers)
    rates = dict(d.get("compress_rates") or {})
    for short, long in (("csa", "compressed_sparse_attention"), ("hca", "heavily_compressed_attention")):
        if d.get(f"compress_rate_{short}") is not None:
            rates[long] = d[f"compress_rate_{short}"]
        if long in rates:
            kw[f"compress_rate_{short}"] = int(rates[long])
    unknown = sorted(set(rates) - set(V4_LAYER_TYPES[1:]))
    if unknown:
        raise BadInputError(f"compress_rates: unknown layer type {unknown[0]!r}")
    if not d.get("layer_types") and d.get("compress_ratios") is not None:
        try:
            kw["layer_types"] = [_V4_RATIO_TO_TYPE[r] for r in d["compress_ratios"]]
        except KeyError as e:
            raise BadInputError(f"compress_ratios: unsupported ratio {e.args[0]!r} (expected 0, 4 or 128)") from None
    if not d.get("mlp_layer_types") and d.get("num_hash_layers") is not None:
        h = int(d["num_hash_layers"])
        kw["mlp_layer_types"] = ["hash_moe"] * min(n, h) + ["moe"] * max(0, n - h)
    for k in ("layer_types", "mlp_layer_types"):
        if k in kw:
            kw[k] = list(kw[k])[:n]  # checkpoints may list the MTP layer too
    head_dim = d.get("head_dim", DeepseekV4Config.head_dim)
    if d.get("qk_rope_head_dim") is None:
        kw["qk_rope_head_dim"] = int(head_dim * (d.get("partial_rotary_factor") or 64 / 512))
    rp = d.get("rope_parameters") or {}
    if isinstance(rp.get("main"), dict) and isinstance(rp.get("compress"), dict):
        main, comp = _rope_from_hf({"rope_parameters": rp["main"]}), _rope_from_hf({"rope_parameters": rp["compress"],
                                    "max_position_embeddings": d.get("max_position_embeddings")})
    else:  # flat: the scaling (YaRN) applies to the compressed layers only, at compress_rope_theta
        flat = {**(d.get("rope_scaling") or {}), **{k: v for k, v in rp.items() if k not in ("main", "compress")}}
        main = RopeConfig(theta=float(d.get("rope_theta", 10000.0)))
        comp_d = {**flat, "rope_theta": d.get("compress_rope_theta", 160000.0)}
        comp_d.setdefault("rope_type", comp_d.pop("type", "default"))
        if comp_d["rope_type"] == "yarn":
            comp_d.setdefault("attention_factor", 1.0)  # V4 does not scale cos/sin by YaRN's mscale
        comp = _rope_from_hf({"rope_parameters": comp_d, "max_position_embeddings": d.get("max_position_embeddings")})
    try:
        return DeepseekV4Config(rope=main, compress_rope=comp, **kw)
    except TypeError as e:
        raise BadInputError(f"config.json: {e}") from None


def _v4_to_hf(cfg: DeepseekV4Config) -> dict[str, Any]:
    base = {k: v for k, v in dataclasses.asdict(cfg).items()
            if k not in ("rope", "compress_rope", "bias_update_speed", "seq_aux_alpha", "hash_seed",
                         "compress_rate_csa", "compress_rate_hca", "qk_rope_head_dim")}
    main, comp = cfg.rope.to_hf(), cfg.compress_rope.to_hf()
    factor = cfg.qk_rope_head_dim / cfg.head_dim
    main["partial_rotary_factor"] = comp["partial_rotary_factor"] = factor
    base.update(architectures=["DeepseekV4ForCausalLM"], model_type="deepseek_v4", hidden_act="silu",
                num_key_value_heads=1, partial_rotary_factor=factor, rope_theta=cfg.rope.theta,
                compress_rope_theta=cfg.compress_rope.theta, rope_parameters={"main": main, "compress": comp},
                compress_rates={"compressed_sparse_attention": cfg.compress_rate_csa,
                                "heavily_compressed_attention": cfg.compress_rate_hca},
                num_nextn_predict_layers=0, norm_topk_prob=True, torch_dtype="float32")
    return base
# --- end DeepSeek-V4 ---------------------------------------------------------------------------------------


ModelConfig = DenseConfig | DeepseekConfig | DeepseekV4Config  # (DeepseekV32Config is a DeepseekConfig)

ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "DeepseekV3ForCausalLM": "deepseek_v3",
    "DeepseekV32ForCausalLM": "deepseek_v32",
    "DeepseekV4ForCausalLM": "deepseek_v4",
}


def _rope_from_hf(d: dict[str, Any]) -> RopeConfig:
    params = dict(d.get("rope_parameters") or {})
    legacy = d.get("rope_scaling") or {}
    if legacy:
        params = {**legacy, **params}
    theta = params.get("rope_theta", d.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ("default", "linear", "llama3", "yarn"):
        raise UnsupportedError(f"rope type {rope_type!r} (supported: default, linear, llama3, yarn)")
    known = {f.name for f in dataclasses.fields(RopeConfig)}
    kw = {k: v for k, v in params.items() if k in known and v is not None}
    kw.update(theta=float(theta), rope_type=rope_type)
    if rope_type == "yarn" and kw.get("original_max_position_embeddings") is None:
        kw["original_max_position_embeddings"] = d.get("max_position_embeddings")
    return RopeConfig(**kw)


def _pick(d: dict[str, Any], cls: type) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)} - {"rope", "arch"}
    return {k: d[k] for k in names if k in d and d[k] is not None}


def config_from_hf(d: dict[str, Any]) -> ModelConfig:
    """Build a nanoseek config from a transformers config.json dict."""
    archs = d.get("architectures") or []
    model_type = d.get("model_type")
    arch = next((ARCHITECTURES[a] for a in archs if a in ARCHITECTURES), None)
    if arch is None and model_type in ("llama", "qwen2", "deepseek_v3", "deepseek_v32", "deepseek_v4"):
        arch = model_type
    if arch is None:
        raise UnsupportedError(f"architecture {archs or model_type!r} "
                               f"(supported: {', '.join(ARCHITECTURES)})")
    if arch == "deepseek_v4":
        return _v4_from_hf(d)
    rope = _rope_from_hf(d)
    try:
        if arch == "deepseek_v32":
            return _v32_from_hf(d, rope)
        if arch == "deepseek_v3":
            kw = _pick(d, DeepseekConfig)
            for k in ("q_lora_rank",):  # null is meaningful here: a single q_proj
                if k in d:
                    kw[k] = d[k]
            kw.setdefault("n_group", 1)
            kw.setdefault("topk_group", 1)
            return DeepseekConfig(rope=rope, **kw)
        kw = _pick(d, DenseConfig)
        if arch == "qwen2":
            kw["attention_bias"] = True
            if d.get("use_sliding_window"):
                raise UnsupportedError("Qwen2 sliding-window attention (use_sliding_window=true)")
        else:  # Llama puts the same bias switch on o_proj; Qwen2 never biases o_proj
            kw["o_bias"] = bool(d.get("attention_bias", False))
        return DenseConfig(arch=arch, rope=rope, **kw)
    except TypeError as e:  # a field with the wrong type, e.g. a string where an int belongs
        raise BadInputError(f"config.json: {e}") from None


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """The transformers config.json dict for `cfg` (5.x spelling)."""
    if isinstance(cfg, DeepseekV4Config):
        return _v4_to_hf(cfg)
    base = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("rope", "arch")}
    base["rope_parameters"] = cfg.rope.to_hf()
    if isinstance(cfg, DeepseekConfig):
        for k in ("bias_update_speed", "seq_aux_alpha", "mtp_loss_weight", "scoring_func"):
            base.pop(k)
        base.update(architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3", hidden_act="silu",
                    num_key_value_heads=cfg.num_attention_heads, head_dim=cfg.qk_rope_head_dim,
                    attention_bias=False)
        if isinstance(cfg, DeepseekV32Config):
            _v32_to_hf(base)
    else:
        name = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[cfg.arch]
        base.update(architectures=[name], model_type=cfg.arch, hidden_act="silu")
        if cfg.arch == "qwen2":
            for k in ("attention_bias", "o_bias", "mlp_bias"):
                base.pop(k)
        else:
            base.pop("o_bias")
    base["torch_dtype"] = "float32"
    return base
